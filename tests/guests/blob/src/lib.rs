//! A guest for the rebalance benchmark (type `blob`): each entity holds one
//! opaque value, so a benchmark can fill a shard with megabytes of state in a
//! few calls. `put` stores its argument, `size` says how long the stored value
//! is.

use conflux_sdk::prelude::*;

/// The state key of the value. It is kept out of `$self` so the bytes are
/// stored as given, not re-encoded as JSON on every turn.
const DATA: &str = "data";

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Blob {}

#[entity]
impl Blob {
    /// Replaces the stored value with the bytes of `data`; returns their length.
    pub fn put(&mut self, data: String) -> usize {
        state::set_raw(DATA, data.as_bytes());
        data.len()
    }

    /// The length of the stored value (0 before the first `put`).
    pub fn size(&self) -> usize {
        state::get_raw(DATA).map_or(0, |d| d.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    #[test]
    fn put_replaces_the_value_and_size_reports_it() {
        let mut h = TestHarness::new("blob", "b");
        assert_eq!(h.call::<Blob, _, usize>("size", &()).unwrap(), 0);
        assert_eq!(h.call::<Blob, _, usize>("put", "x".repeat(1000).as_str()).unwrap(), 1000);
        assert_eq!(h.call::<Blob, _, usize>("put", "abc").unwrap(), 3);
        assert_eq!(h.get_raw(DATA).unwrap(), b"abc");
        assert_eq!(h.call::<Blob, _, usize>("size", &()).unwrap(), 3);
    }
}
