//! The interface every system under test implements: the counter entity
//! (`add`, `get`) and the team-joiner user entity (`join`, `teams`).

use std::future::Future;

/// Why a call did not succeed.
#[derive(Debug)]
pub enum CallError {
    /// The system answered with the refusal the workload expects (`join` of a
    /// second team: FAILED_PRECONDITION / HTTP 409).
    Refused,
    /// Anything else: transport error, timeout, unexpected status or reply.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused => f.write_str("refused"),
            CallError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CallError {}

/// One system under test. Cheap to clone; clones share connections.
pub trait Target: Clone + Send + Sync + 'static {
    /// Counter `key`: add `n`, return the new total.
    fn add(&self, key: &str, n: i64) -> impl Future<Output = Result<i64, CallError>> + Send;
    /// Counter `key`: the total (0 if never written).
    fn get(&self, key: &str) -> impl Future<Output = Result<i64, CallError>> + Send;
    /// User `user`: join `team`. Joining the team one is on succeeds; joining a
    /// second team is refused ([`CallError::Refused`]).
    fn join(&self, user: &str, team: &str) -> impl Future<Output = Result<(), CallError>> + Send;
    /// User `user`: every team the system has them on (one at most if correct).
    fn teams(&self, user: &str) -> impl Future<Output = Result<Vec<String>, CallError>> + Send;
}

/// Parses a `team` reply: `null`, `"red"` or `["red", "blue"]`.
pub fn parse_teams(body: &[u8]) -> Result<Vec<String>, CallError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Null) => Ok(vec![]),
        Ok(serde_json::Value::String(s)) => Ok(vec![s]),
        Ok(serde_json::Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s),
                other => Err(CallError::Failed(format!("team is not a string: {other}"))),
            })
            .collect(),
        Ok(other) => Err(CallError::Failed(format!("unexpected team reply {other}"))),
        Err(e) => Err(CallError::Failed(format!("team reply is not JSON: {e}"))),
    }
}

/// Parses a counter reply (a JSON integer).
pub fn parse_total(body: &[u8]) -> Result<i64, CallError> {
    serde_json::from_slice::<i64>(body).map_err(|e| {
        CallError::Failed(format!("counter reply {:?} is not an integer: {e}", String::from_utf8_lossy(body)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn team_replies() {
        assert!(parse_teams(b"null").unwrap().is_empty());
        assert_eq!(parse_teams(br#""red""#).unwrap(), ["red"]);
        assert_eq!(parse_teams(br#"["red","blue"]"#).unwrap(), ["red", "blue"]);
        assert!(parse_teams(b"7").is_err());
        assert_eq!(parse_total(b"42").unwrap(), 42);
        assert!(parse_total(b"\"x\"").is_err());
    }
}
