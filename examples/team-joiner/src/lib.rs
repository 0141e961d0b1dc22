//! The `team-joiner` example entity (deployed as type `user`): one entity per user,
//! which serialises every change to that user, so a user can never end up on two teams.
//!
//! See README.md for why this needs an entity rather than a stateless check.

use conflux_sdk::prelude::*;
use team::Team;

/// One user. Its state is the struct itself, stored under `$self`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct User {
    /// The team that accepted this user.
    team: Option<String>,
    /// The team asked to accept this user, until it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    joining: Option<String>,
}

#[entity]
impl User {
    /// Asks `team` to take this user and returns it; the user is on it once the
    /// team accepts ([`team`](Self::team) shows it then). Joining the same team
    /// again succeeds (idempotent); joining another while on one, or while
    /// another is answering, fails.
    pub fn join(&mut self, team: String) -> Result<String, Error> {
        if team.trim().is_empty() {
            return Err(Error::bad_request("team name must not be empty"));
        }
        let me = context::self_ref().id;
        match (&self.team, &self.joining) {
            (Some(current), _) | (None, Some(current)) if *current != team => {
                Err(Error::failed(format!("user {me} is already on team {current}")))
            }
            (Some(_), _) | (None, Some(_)) => Ok(team),
            (None, None) => {
                // Committed with this turn; the team's answer runs `on_added`
                // as a turn of its own, effectively once.
                Team::ask(team.clone()).add_member(&me).context(&team).then(Self::ON_ADDED)?;
                self.joining = Some(team.clone());
                Ok(team)
            }
        }
    }

    /// The team's answer: on it if accepted; free again if refused.
    #[continuation]
    pub fn on_added(&mut self, reply: Result<(), AskError>, ask: AskContext) -> Result<(), Error> {
        let team: String = ask.context()?;
        if self.joining.as_ref() != Some(&team) {
            return Ok(());
        }
        self.joining = None;
        let me = context::self_ref().id;
        match reply {
            Ok(()) => {
                log::info(&format!("user {me} joined team {team}"));
                self.team = Some(team);
            }
            Err(e) => log::warn(&format!("user {me} did not join team {team}: {e}")),
        }
        Ok(())
    }

    /// The user's team, or `null` if none.
    pub fn team(&self) -> Option<String> {
        self.team.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    fn sue() -> TestHarness {
        TestHarness::new("user", "sue")
    }

    #[test]
    fn join_asks_the_team_and_is_on_it_once_accepted() {
        let mut h = sue();
        assert_eq!(h.call::<User, _, Option<String>>("team", &()).unwrap(), None);
        assert_eq!(h.call::<User, _, String>("join", "red").unwrap(), "red");
        assert_eq!(h.call::<User, _, Option<String>>("team", &()).unwrap(), None, "not before the team says so");
        let asks = h.asks();
        assert_eq!(asks.len(), 1, "one ask to the team");
        assert_eq!((asks[0].target.to_string(), asks[0].operation.as_str()), ("team/red".to_string(), "add_member"));
        assert_eq!(asks[0].arg::<String>(), "sue");
        // The real team entity answers, in its own harness.
        let mut red = TestHarness::new("team", "red");
        h.answer::<User, Team>(&asks[0].id, &mut red).unwrap();
        assert_eq!(h.call::<User, _, Option<String>>("team", &()).unwrap().as_deref(), Some("red"));
        assert_eq!(red.call::<Team, _, Vec<String>>("members", &()).unwrap(), ["sue"]);
        assert_eq!(h.logs().last().unwrap().message, "user sue joined team red");
        assert_eq!(h.get_raw("$self").unwrap(), br#"{"team":"red"}"#, "the state JSON every SDK reads");
    }

    #[test]
    fn a_full_team_refuses_and_the_user_is_not_left_on_it() {
        let mut h = sue();
        let mut red = TestHarness::new("team", "red");
        red.call::<Team, _, ()>("limit", &0).unwrap();
        h.call::<User, _, String>("join", "red").unwrap();
        let ask = h.asks().remove(0);
        h.answer::<User, Team>(&ask.id, &mut red).unwrap();
        assert_eq!(h.call::<User, _, Option<String>>("team", &()).unwrap(), None);
        assert!(h.asks().is_empty());
        // Free to join another team.
        assert_eq!(h.call::<User, _, String>("join", "blue").unwrap(), "blue");
    }

    #[test]
    fn a_second_team_is_refused_while_the_first_answers_and_after() {
        let mut h = sue();
        h.call::<User, _, String>("join", "red").unwrap();
        match h.call::<User, _, String>("join", "blue") {
            Err(Error::Failed(m)) => assert_eq!(m, "user sue is already on team red"),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(h.call::<User, _, String>("join", "red").unwrap(), "red", "idempotent while pending");
        assert_eq!(h.asks().len(), 1, "re-joining asks nothing");
        let id = h.asks()[0].id.clone();
        h.reply_ok::<User, _>(&id, &()).unwrap();
        assert!(h.call::<User, _, String>("join", "blue").is_err());
        assert_eq!(h.entity::<User>().team.as_deref(), Some("red"));
    }

    #[test]
    fn only_a_reply_runs_the_continuation() {
        let mut h = sue();
        match h.invoke::<User>("on_added", b"[]") {
            Err(Error::BadRequest(m)) => assert!(m.contains("continuation"), "{m}"),
            other => panic!("expected BadRequest, got {other:?}"),
        }
    }

    #[test]
    fn empty_team_is_bad_request() {
        let mut h = sue();
        assert!(matches!(h.call::<User, _, String>("join", ""), Err(Error::BadRequest(_))));
        assert!(matches!(h.invoke::<User>("join", b""), Err(Error::BadRequest(_))));
        assert!(matches!(h.invoke::<User>("join", b"7"), Err(Error::BadRequest(_))));
        assert!(h.get_raw("$self").is_none());
    }

    #[test]
    fn unknown_operation() {
        let mut h = sue();
        match h.invoke::<User>("leave", b"") {
            Err(Error::UnknownOperation(m)) => assert!(m.ends_with("offered: join, team"), "{m}"),
            other => panic!("expected UnknownOperation, got {other:?}"),
        }
    }
}
