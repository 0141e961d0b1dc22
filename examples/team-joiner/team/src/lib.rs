//! The `team` side of the team-joiner example (deployed as type `team`): a team's
//! member list, with an optional capacity. A joining user asks to be added (see
//! `examples/team-joiner`); a full team refuses, and the user is then not on it.
//!
//! Other crates use its typed client (`Team::ask("red").add_member(&me)`) by
//! depending on this crate with feature `client`, which leaves this crate's
//! handler export out of theirs.

use conflux_sdk::prelude::*;
use std::collections::BTreeSet;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Team {
    members: BTreeSet<String>,
    /// At most this many members; unlimited if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    capacity: Option<usize>,
}

#[entity]
impl Team {
    /// (From a `user`.) Adds the calling user; a full team refuses. Idempotent.
    pub fn add_member(&mut self, user: String) -> Result<(), Error> {
        match context::caller() {
            Some(c) if c.entity_type == "user" && c.id == user => {
                let full = self.capacity.is_some_and(|cap| self.members.len() >= cap);
                if full && !self.members.contains(&user) {
                    return Err(Error::failed(format!("team {} is full", context::self_ref().id)));
                }
                self.members.insert(user);
                Ok(())
            }
            _ => Err(Error::bad_request("'add_member' is sent by the joining user")),
        }
    }

    /// Limits the team to `capacity` members from now on.
    pub fn limit(&mut self, capacity: usize) {
        self.capacity = Some(capacity);
    }

    /// The members, sorted.
    pub fn members(&self) -> Vec<String> {
        self.members.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    #[test]
    fn only_the_user_adds_itself() {
        let mut h = TestHarness::new("team", "red");
        assert!(h.call::<Team, _, ()>("add_member", "sue").is_err());
        h.set_caller(Some(EntityRef::new("user", "sue")));
        h.call::<Team, _, ()>("add_member", "sue").unwrap();
        h.call::<Team, _, ()>("add_member", "sue").unwrap();
        assert!(h.call::<Team, _, ()>("add_member", "bob").is_err());
        assert_eq!(h.call::<Team, _, Vec<String>>("members", &()).unwrap(), ["sue"]);
        assert_eq!(h.get_raw("$self").unwrap(), br#"{"members":["sue"]}"#, "the state JSON every SDK reads");
    }

    #[test]
    fn a_full_team_refuses_newcomers_but_not_members() {
        let mut h = TestHarness::new("team", "red");
        h.call::<Team, _, ()>("limit", &1).unwrap();
        h.set_caller(Some(EntityRef::new("user", "sue")));
        h.call::<Team, _, ()>("add_member", "sue").unwrap();
        h.call::<Team, _, ()>("add_member", "sue").unwrap();
        h.set_caller(Some(EntityRef::new("user", "bob")));
        match h.call::<Team, _, ()>("add_member", "bob") {
            Err(Error::Failed(m)) => assert_eq!(m, "team red is full"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
