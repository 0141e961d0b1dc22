//! The `counter` example entity: a running total per id, with `add` and `get`.
//!
//! Deploy as entity type `counter`; see README.md.

use conflux_sdk::prelude::*;

/// One counter. Its state is the struct itself, stored under `$self`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counter {
    total: i64,
}

#[entity]
impl Counter {
    /// Adds `n` (may be negative) and returns the new total. Refuses to overflow.
    pub fn add(&mut self, n: i64) -> Result<i64, Error> {
        self.total = self
            .total
            .checked_add(n)
            .ok_or_else(|| Error::failed(format!("adding {n} to {} would overflow", self.total)))?;
        Ok(self.total)
    }

    /// The current total.
    pub fn get(&self) -> i64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    fn harness() -> TestHarness {
        TestHarness::new("counter", "c1")
    }

    #[test]
    fn add_and_get() {
        let mut h = harness();
        assert_eq!(h.call::<Counter, _, i64>("get", &()).unwrap(), 0);
        assert_eq!(h.call::<Counter, _, i64>("add", &5).unwrap(), 5);
        assert_eq!(h.call::<Counter, _, i64>("add", &-2).unwrap(), 3);
        assert_eq!(h.invoke::<Counter>("get", b"").unwrap(), b"3");
        assert_eq!(h.invoke::<Counter>("get", b"null").unwrap(), b"3");
        assert_eq!(h.get_raw("$self").unwrap(), br#"{"total":3}"#);
    }

    #[test]
    fn reads_do_not_write_state() {
        let mut h = harness();
        h.call::<Counter, _, i64>("get", &()).unwrap();
        assert!(h.get_raw("$self").is_none());
        // Adding zero to a fresh counter leaves its JSON unchanged: nothing is written.
        h.call::<Counter, _, i64>("add", &0).unwrap();
        assert!(h.get_raw("$self").is_none());
    }

    #[test]
    fn bad_payload_is_bad_request_and_state_is_unchanged() {
        let mut h = harness();
        h.call::<Counter, _, i64>("add", &7).unwrap();
        let before = h.get_raw("$self").unwrap().to_vec();
        for bad in [&b"\"five\""[..], b"1.5", b"{", b"", b"null"] {
            match h.invoke::<Counter>("add", bad) {
                Err(Error::BadRequest(m)) => assert!(m.contains("'add'"), "{m}"),
                other => panic!("expected BadRequest for {bad:?}, got {other:?}"),
            }
        }
        assert!(matches!(h.invoke::<Counter>("get", b"1"), Err(Error::BadRequest(_))));
        assert_eq!(h.get_raw("$self").unwrap(), before);
    }

    #[test]
    fn overflow_fails_and_keeps_total() {
        let mut h = harness();
        h.call::<Counter, _, i64>("add", &i64::MAX).unwrap();
        match h.call::<Counter, _, i64>("add", &1) {
            Err(Error::Failed(m)) => assert!(m.contains("overflow"), "{m}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(h.entity::<Counter>().total, i64::MAX);
    }

    #[test]
    fn unknown_operation_lists_offered_ones() {
        let mut h = harness();
        match h.invoke::<Counter>("reset", b"") {
            Err(Error::UnknownOperation(m)) => {
                assert_eq!(m, "unknown operation 'reset' for entity type Counter; offered: add, get")
            }
            other => panic!("expected UnknownOperation, got {other:?}"),
        }
        assert_eq!(<Counter as conflux_sdk::Entity>::OPERATIONS, ["add", "get"]);
    }

    #[test]
    fn ids_are_independent() {
        let mut a = TestHarness::new("counter", "a");
        let mut b = TestHarness::new("counter", "b");
        a.call::<Counter, _, i64>("add", &1).unwrap();
        assert_eq!(b.call::<Counter, _, i64>("get", &()).unwrap(), 0);
    }
}
