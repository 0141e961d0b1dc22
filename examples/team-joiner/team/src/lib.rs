//! The `team` side of the team-joiner example (deployed as type `team`): a team's
//! member list. Users add themselves by message when they join (see
//! `examples/team-joiner`), so each team's list converges to what the users say.

use conflux_sdk::prelude::*;
use std::collections::BTreeSet;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Team {
    members: BTreeSet<String>,
}

#[entity]
impl Team {
    /// (From a `user`.) Adds the calling user. Idempotent.
    pub fn add_member(&mut self, user: String) -> Result<(), Error> {
        match context::caller() {
            Some(c) if c.entity_type == "user" && c.id == user => {
                self.members.insert(user);
                Ok(())
            }
            _ => Err(Error::bad_request("'add_member' is sent by the joining user")),
        }
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
    }
}
