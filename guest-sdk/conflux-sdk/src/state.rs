//! The entity's own key/value state, as typed (JSON) and raw byte helpers.
//!
//! Writes go to the turn's write buffer and are committed atomically only if the
//! operation returns `Ok`; reads see the turn's own writes. The key `"$self"` is used
//! by `#[entity]` to hold the entity struct itself — avoid writing it by hand.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, sys};

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::failed(format!("state key '{key}' does not hold the expected JSON: {e}")))
}

/// Reads `key` and parses it as JSON. `Ok(None)` if the key is absent; `Error::Failed`
/// if the stored bytes are not valid JSON for `T`.
pub fn get<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    get_raw(key).map(|bytes| decode(key, &bytes)).transpose()
}

/// Stores `value` as JSON under `key`.
pub fn set<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), Error> {
    let bytes =
        serde_json::to_vec(value).map_err(|e| Error::failed(format!("cannot serialise state key '{key}': {e}")))?;
    set_raw(key, &bytes);
    Ok(())
}

/// Deletes `key` (no-op if absent).
pub fn delete(key: &str) {
    sys::state_delete(key)
}

/// Entries whose keys start with `prefix`, in byte order, strictly after `start_after`,
/// at most `limit` of them, each parsed as JSON.
pub fn list<T: DeserializeOwned>(
    prefix: &str,
    start_after: Option<&str>,
    limit: u32,
) -> Result<Vec<(String, T)>, Error> {
    list_raw(prefix, start_after, limit)
        .into_iter()
        .map(|(k, v)| {
            let t = decode(&k, &v)?;
            Ok((k, t))
        })
        .collect()
}

/// Reads the raw bytes of `key`.
pub fn get_raw(key: &str) -> Option<Vec<u8>> {
    sys::state_get(key)
}

/// Stores raw bytes under `key`.
pub fn set_raw(key: &str, value: &[u8]) {
    sys::state_set(key, value)
}

/// Like [`list`], without JSON parsing.
pub fn list_raw(prefix: &str, start_after: Option<&str>, limit: u32) -> Vec<(String, Vec<u8>)> {
    sys::state_list(prefix, start_after, limit)
}
