//! The error type every operation and SDK call reports, and its mapping onto the WIT
//! `call-error` variant.

use std::fmt;

/// Why an operation failed. Any error aborts the turn: nothing it wrote is committed.
///
/// The host maps each variant onto a gRPC status code for the client:
///
/// | variant              | gRPC code             |
/// |----------------------|-----------------------|
/// | `BadRequest`         | `INVALID_ARGUMENT`    |
/// | `UnknownOperation`   | `NOT_FOUND`           |
/// | `Failed`             | `FAILED_PRECONDITION` |
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The payload was not acceptable (bad JSON, wrong shape, invalid value).
    BadRequest(String),
    /// The entity does not offer the requested operation.
    UnknownOperation(String),
    /// The request was understood but refused by the entity's rules.
    Failed(String),
}

impl Error {
    /// An [`Error::BadRequest`] with the given message.
    pub fn bad_request(message: impl fmt::Display) -> Self {
        Error::BadRequest(message.to_string())
    }

    /// An [`Error::Failed`] with the given message.
    pub fn failed(message: impl fmt::Display) -> Self {
        Error::Failed(message.to_string())
    }

    /// An [`Error::UnknownOperation`] with the given message.
    pub fn unknown_operation(message: impl fmt::Display) -> Self {
        Error::UnknownOperation(message.to_string())
    }

    /// The human-readable message, without the kind prefix.
    pub fn message(&self) -> &str {
        match self {
            Error::BadRequest(m) | Error::UnknownOperation(m) | Error::Failed(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadRequest(m) => write!(f, "bad request: {m}"),
            Error::UnknownOperation(m) => write!(f, "unknown operation: {m}"),
            Error::Failed(m) => write!(f, "failed: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// A JSON (de)serialisation error is the caller's fault unless said otherwise.
impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::BadRequest(e.to_string())
    }
}

impl From<Error> for crate::bindings::conflux::entity::types::CallError {
    fn from(e: Error) -> Self {
        use crate::bindings::conflux::entity::types::CallError;
        match e {
            Error::BadRequest(m) => CallError::BadRequest(m),
            Error::UnknownOperation(m) => CallError::UnknownOperation(m),
            Error::Failed(m) => CallError::Failed(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_constructors() {
        assert_eq!(Error::bad_request("x").to_string(), "bad request: x");
        assert_eq!(Error::failed(42).to_string(), "failed: 42");
        assert_eq!(Error::failed("m").message(), "m");
        let e: Error = serde_json::from_str::<i64>("nope").unwrap_err().into();
        assert!(matches!(e, Error::BadRequest(_)));
    }

    #[test]
    fn converts_to_call_error() {
        use crate::bindings::conflux::entity::types::CallError;
        assert!(matches!(CallError::from(Error::failed("f")), CallError::Failed(m) if m == "f"));
        assert!(matches!(
            CallError::from(Error::unknown_operation("u")),
            CallError::UnknownOperation(m) if m == "u"
        ));
        assert!(matches!(
            CallError::from(Error::bad_request("b")),
            CallError::BadRequest(m) if m == "b"
        ));
    }
}
