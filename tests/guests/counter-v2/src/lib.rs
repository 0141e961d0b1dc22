//! Version 2 of `examples/counter` for the hot-swap tests. It keeps the same state
//! (`{"total": n}` under `$self`), so no migration is needed, but its replies say which
//! version answered: `add` returns `{"total": n, "version": 2}`, and it adds `version`
//! and `reset`.

use conflux_sdk::prelude::*;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counter {
    total: i64,
}

/// What `add` returns in version 2.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Added {
    pub total: i64,
    pub version: u32,
}

#[entity]
impl Counter {
    /// Adds `n` and returns the new total, tagged with this code's version.
    pub fn add(&mut self, n: i64) -> Result<Added, Error> {
        self.total = self.total.checked_add(n).ok_or_else(|| Error::failed("counter would overflow"))?;
        Ok(Added { total: self.total, version: 2 })
    }

    pub fn get(&self) -> i64 {
        self.total
    }

    /// Which code answers: 2.
    pub fn version(&self) -> u32 {
        2
    }

    /// Sets the total back to zero.
    pub fn reset(&mut self) {
        self.total = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    #[test]
    fn reads_version_one_state() {
        let mut h = TestHarness::new("counter", "c");
        h.set_raw("$self", r#"{"total":5}"#);
        assert_eq!(h.call::<Counter, _, Added>("add", &1).unwrap(), Added { total: 6, version: 2 });
        h.call::<Counter, _, ()>("reset", &()).unwrap();
        assert_eq!(h.call::<Counter, _, i64>("get", &()).unwrap(), 0);
    }
}
