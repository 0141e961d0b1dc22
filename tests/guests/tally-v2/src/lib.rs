//! Version 2 of the `tally` test entity: a JSON object under `$self` instead of
//! version 1's bare number under `n`. Its `#[migrate]` moves the number over and
//! counts how often it ran (the tests check: exactly once per entity). To exercise
//! failures it refuses negative numbers and panics (traps) on 13; a number of
//! 10⁹ + r makes it burn r rounds of CPU first (a slow migration).

use conflux_sdk::prelude::*;

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tally {
    pub count: i64,
    /// The version this entity migrated from (0 if it was created by version 2).
    pub migrated_from: u32,
    /// How many times a migration ran on this entity.
    pub migrations: u32,
}

/// Numbers from here on make the migration slow.
const SLOW: i64 = 1_000_000_000;

fn spin(rounds: u64) -> u64 {
    let mut x: u64 = 1;
    for i in 0..rounds {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
    x
}

#[entity]
impl Tally {
    pub fn add(&mut self, by: i64) -> i64 {
        self.count += by;
        self.count
    }

    /// The whole object, so tests can see the migration bookkeeping.
    pub fn get(&self) -> &Self {
        self
    }

    /// Burns CPU for `rounds` iterations and returns a checksum.
    pub fn spin(&self, rounds: u64) -> u64 {
        spin(rounds)
    }

    #[migrate]
    fn upgrade(from_version: u32) -> Result<(), Error> {
        let Some(n) = state::get::<i64>("n")? else {
            return Ok(());
        };
        if n == 13 {
            panic!("thirteen is unlucky; refusing to migrate");
        }
        if n < 0 {
            return Err(Error::failed(format!("cannot migrate a negative tally ({n})")));
        }
        if n >= SLOW {
            std::hint::black_box(spin((n - SLOW) as u64));
        }
        let mut tally: Tally = state::get(conflux_sdk::SELF_KEY)?.unwrap_or_default();
        tally.count += n;
        tally.migrated_from = from_version;
        tally.migrations += 1;
        state::set(conflux_sdk::SELF_KEY, &tally)?;
        state::delete("n");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    #[test]
    fn migrates_the_bare_number_once() {
        let mut h = TestHarness::new("tally", "t");
        h.set_raw("n", "41");
        h.migrate::<Tally>(1).unwrap();
        assert_eq!(h.entity::<Tally>(), Tally { count: 41, migrated_from: 1, migrations: 1 });
        assert!(h.get_raw("n").is_none());
        // Running it again finds nothing to move.
        h.migrate::<Tally>(1).unwrap();
        assert_eq!(h.entity::<Tally>().migrations, 1);
        assert_eq!(h.call::<Tally, _, i64>("add", &1).unwrap(), 42);
    }

    #[test]
    fn a_refused_migration_commits_nothing() {
        let mut h = TestHarness::new("tally", "t");
        h.set_raw("n", "-5");
        assert!(matches!(h.migrate::<Tally>(1), Err(Error::Failed(m)) if m.contains("negative")));
        assert_eq!(h.get_raw("n"), Some(&b"-5"[..]));
        assert!(h.get_raw("$self").is_none());
    }
}
