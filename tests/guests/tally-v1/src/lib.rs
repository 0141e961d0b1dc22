//! Version 1 of the `tally` test entity: keeps a bare number under state key `n`
//! (not the SDK's `$self`), so version 2 must migrate it. No `#[migrate]`.

use conflux_sdk::prelude::*;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Tally;

#[entity]
impl Tally {
    /// Adds `by` to the number and returns it.
    pub fn add(&self, by: i64) -> Result<i64, Error> {
        let n = state::get::<i64>("n")?.unwrap_or(0) + by;
        state::set("n", &n)?;
        Ok(n)
    }

    /// The number.
    pub fn get(&self) -> Result<i64, Error> {
        Ok(state::get::<i64>("n")?.unwrap_or(0))
    }
}
