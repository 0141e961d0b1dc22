//! JSON views of API messages (HTTP gateway and the CLI's `--json`): payload
//! bytes are shown as the JSON value they hold, or as a string when they are
//! not JSON (an entity not built with conflux-sdk may reply with raw bytes).

use serde::{Serialize, Serializer};

/// Serializes payload bytes as the JSON they contain, else as (lossy) text.
pub fn bytes<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_slice::<serde_json::Value>(b) {
        Ok(v) => v.serialize(s),
        Err(_) => s.serialize_str(&String::from_utf8_lossy(b)),
    }
}

#[cfg(test)]
mod tests {
    use crate::pb;

    #[test]
    fn payloads_show_as_the_json_they_hold() {
        let r = pb::InvokeResponse { reply: br#"{"total":3}"#.to_vec() };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"reply":{"total":3}}"#);
        let raw = pb::InvokeResponse { reply: b"not json".to_vec() };
        assert_eq!(serde_json::to_string(&raw).unwrap(), r#"{"reply":"not json"}"#);
    }
}
