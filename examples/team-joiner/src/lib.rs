//! The `team-joiner` example entity (deployed as type `user`): one entity per user,
//! which serialises every change to that user, so a user can never end up on two teams.
//!
//! See README.md for why this needs an entity rather than a stateless check.

use conflux_sdk::prelude::*;

/// One user. Its state is the struct itself, stored under `$self`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct User {
    team: Option<String>,
}

#[entity]
impl User {
    /// Puts this user on `team` and returns it. Joining the same team again succeeds
    /// (idempotent); joining a different team while on one fails.
    pub fn join(&mut self, team: String) -> Result<String, Error> {
        if team.trim().is_empty() {
            return Err(Error::bad_request("team name must not be empty"));
        }
        match &self.team {
            Some(current) if *current != team => {
                Err(Error::failed(format!("user {} is already on team {current}", context::self_ref().id)))
            }
            Some(_) => Ok(team),
            None => {
                let me = context::self_ref().id;
                log::info(&format!("user {me} joined team {team}"));
                self.team = Some(team.clone());
                // Committed with this turn and delivered effectively once: the
                // team's member list converges to the users' view.
                messaging::send(&EntityRef::new("team", team.clone()), "add_member", &me)?;
                Ok(team)
            }
        }
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
    fn join_then_team() {
        let mut h = sue();
        assert_eq!(h.call::<User, _, Option<String>>("team", &()).unwrap(), None);
        assert_eq!(h.call::<User, _, String>("join", "red").unwrap(), "red");
        assert_eq!(h.call::<User, _, Option<String>>("team", &()).unwrap().as_deref(), Some("red"));
        assert_eq!(h.logs().len(), 1);
        assert_eq!(h.logs()[0].message, "user sue joined team red");
        let sent = h.sent();
        assert_eq!(sent.len(), 1, "one message to the team");
        assert_eq!((sent[0].target.to_string(), sent[0].operation.as_str()), ("team/red".to_string(), "add_member"));
        assert_eq!(sent[0].arg::<String>(), "sue");
    }

    #[test]
    fn joining_the_same_team_again_is_idempotent() {
        let mut h = sue();
        h.call::<User, _, String>("join", "red").unwrap();
        let before = h.get_raw("$self").unwrap().to_vec();
        assert_eq!(h.call::<User, _, String>("join", "red").unwrap(), "red");
        assert_eq!(h.get_raw("$self").unwrap(), before);
        assert_eq!(h.sent().len(), 1, "re-joining sends nothing");
    }

    #[test]
    fn second_team_is_refused() {
        let mut h = sue();
        h.call::<User, _, String>("join", "red").unwrap();
        match h.call::<User, _, String>("join", "blue") {
            Err(Error::Failed(m)) => assert_eq!(m, "user sue is already on team red"),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(h.entity::<User>().team.as_deref(), Some("red"));
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
