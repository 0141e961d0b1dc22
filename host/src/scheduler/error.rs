//! The error taxonomy: [`ErrorKind`], the one list of the kinds of failure
//! users see (`conflux-error-kind`, the JSON error's `kind`, the error
//! metrics' label, a forwarded failure's kind) with everything that follows
//! from a kind — its gRPC code, its HTTP status, whether a call that failed
//! with it may be retried, and what the deliverer does with a message that
//! failed with it — and [`InvokeError`], how an invocation fails, which names
//! its kind. Nothing else spells a kind or maps one: the API, the gateway,
//! the cluster's forwarding and the deliverer all ask the enum.

use crate::log::LogError;
use crate::registry::RegistryError;
use crate::runtime::{RuntimeError, TrapKind, TurnError};
use tonic::Code;

/// Declares [`ErrorKind`] from one table of variants and wire names, so a
/// kind's name is written once.
macro_rules! error_kinds {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)+) => {
        /// A stable, machine-readable name of a failure. The wire form
        /// ([`ErrorKind::as_str`]) never changes for a kind: clients branch on it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorKind {
            $($(#[$doc])* $variant,)+
        }

        impl ErrorKind {
            /// Every kind, in declaration order.
            pub const ALL: &'static [ErrorKind] = &[$(ErrorKind::$variant,)+];

            /// The kind's name on the wire, e.g. `idempotency-key-reused`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorKind::$variant => $name,)+
                }
            }

            /// The kind a wire name stands for; `None` for a name this node
            /// does not know (another version's).
            pub fn parse(name: &str) -> Option<ErrorKind> {
                match name {
                    $($name => Some(ErrorKind::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

error_kinds! {
    // An invocation's own failures.
    /// No such entity type is deployed.
    UnknownType = "unknown-type",
    /// The type is deployed but this member is still fetching or compiling it.
    ComponentLoading = "component-loading",
    BadOperation = "bad-operation",
    MailboxFull = "mailbox-full",
    Overloaded = "overloaded",
    ShuttingDown = "shutting-down",
    MigrationFailed = "migration-failed",
    OutboxFull = "outbox-full",
    BadIdempotencyKey = "bad-idempotency-key",
    IdempotencyKeyReused = "idempotency-key-reused",
    // The guest's answers.
    BadRequest = "bad-request",
    UnknownOperation = "unknown-operation",
    Failed = "failed",
    // Traps, one per `TrapKind`.
    OutOfFuel = "out-of-fuel",
    Timeout = "timeout",
    OutOfMemory = "out-of-memory",
    StackOverflow = "stack-overflow",
    LimitExceeded = "limit-exceeded",
    Trap = "trap",
    /// The component could not be instantiated (other than for lack of room).
    Instantiate = "instantiate",
    /// The write set was not confirmed committed (or a registry write's).
    Commit = "commit",
    Internal = "internal",
    /// This node does not lead the entity's shard (between members only).
    NotLeader = "not-leader",
    /// No leader of the shard could be reached.
    Unavailable = "unavailable",
    // The registry's.
    BadTypeName = "bad-type-name",
    TooLarge = "too-large",
    InvalidComponent = "invalid-component",
    UnknownVersion = "unknown-version",
    BadCanary = "bad-canary",
    NotPropagated = "not-propagated",
    /// A registry change raced another one, which won.
    Conflict = "conflict",
    ComponentFetch = "component-fetch",
    Registry = "registry",
    // The API's refusals of a request.
    BadEntity = "bad-entity",
    BadProtobuf = "bad-protobuf",
    PayloadTooLarge = "payload-too-large",
    MessageTooLarge = "message-too-large",
    BadVersion = "bad-version",
    BadUpload = "bad-upload",
    TruncatedUpload = "truncated-upload",
    BadCursor = "bad-cursor",
    BadNode = "bad-node",
    NoSuchNode = "no-such-node",
    LastNode = "last-node",
    NotCommitted = "not-committed",
    /// A read of data this member holds no replica of.
    NotHere = "not-here",
    Storage = "storage",
    Unauthenticated = "unauthenticated",
    // The HTTP gateway's and the transport's.
    BadBody = "bad-body",
    BadJson = "bad-json",
    UnsupportedMediaType = "unsupported-media-type",
    /// No such HTTP route.
    NotFound = "not-found",
    HostNotAllowed = "host-not-allowed",
    CrossOrigin = "cross-origin",
    Unimplemented = "unimplemented",
    /// Any other refusal by the gRPC transport; it keeps the transport's code.
    Transport = "transport",
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no [`ErrorKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error kind {0:?}")]
pub struct UnknownKind(pub String);

impl std::str::FromStr for ErrorKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorKind::parse(s).ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

impl From<TrapKind> for ErrorKind {
    fn from(t: TrapKind) -> Self {
        match t {
            TrapKind::OutOfFuel => ErrorKind::OutOfFuel,
            TrapKind::Timeout => ErrorKind::Timeout,
            TrapKind::OutOfMemory => ErrorKind::OutOfMemory,
            TrapKind::StackOverflow => ErrorKind::StackOverflow,
            TrapKind::LimitExceeded => ErrorKind::LimitExceeded,
            TrapKind::Trap => ErrorKind::Trap,
        }
    }
}

/// Whether a call the shard's leader failed with a kind may run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The failure is an answer (or retrying cannot help).
    Never,
    /// The call may have run: only a deduplicated call (an idempotency key, a
    /// message sequence) may run again.
    IfGuarded,
    /// Refused before anything ran.
    Always,
}

/// What the deliverer does with a message whose delivery failed with a kind:
/// whose fault it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Retrying cannot help (an unknown type, the receiver refused it):
    /// dead-letter it now.
    Permanent,
    /// The receiver's own code failed (a trap, a failed migration): retried
    /// with backoff, each failure counting toward `delivery_max_attempts`.
    ReceiverFault,
    /// The infrastructure could not deliver it (no leader, an unreachable
    /// node, a commit not confirmed, shutdown, a full mailbox, an overloaded
    /// node): nothing the receiver did. Retried with capped backoff for as
    /// long as the message is in the outbox, never dead-lettered for it.
    Unavailable,
}

impl ErrorKind {
    /// The gRPC code a failure of this kind is answered with. [`Transport`]
    /// (a refusal by tonic itself) keeps tonic's code; `Internal` stands in.
    ///
    /// [`Transport`]: ErrorKind::Transport
    pub fn grpc_code(self) -> Code {
        use ErrorKind::*;
        match self {
            UnknownType | UnknownOperation | UnknownVersion | NoSuchNode | NotFound => Code::NotFound,
            BadOperation | BadIdempotencyKey | BadRequest | BadTypeName | TooLarge | InvalidComponent | BadCanary
            | BadEntity | BadProtobuf | PayloadTooLarge | MessageTooLarge | BadVersion | BadUpload
            | TruncatedUpload | BadCursor | BadNode | BadBody | BadJson | UnsupportedMediaType => Code::InvalidArgument,
            MailboxFull | Overloaded | OutboxFull => Code::ResourceExhausted,
            ComponentLoading | ShuttingDown | Instantiate | Commit | NotLeader | Unavailable | NotPropagated
            | ComponentFetch | NotCommitted => Code::Unavailable,
            MigrationFailed | IdempotencyKeyReused | Failed | LastNode | NotHere => Code::FailedPrecondition,
            OutOfFuel | Timeout | OutOfMemory | StackOverflow | LimitExceeded | Trap | Conflict => Code::Aborted,
            Internal | Registry | Storage | Transport => Code::Internal,
            Unauthenticated => Code::Unauthenticated,
            HostNotAllowed | CrossOrigin => Code::PermissionDenied,
            Unimplemented => Code::Unimplemented,
        }
    }

    /// The HTTP status of a failure of this kind: its gRPC code's
    /// ([`http_status_of_code`]), except where HTTP has a more precise one.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::PayloadTooLarge | ErrorKind::MessageTooLarge => 413,
            // A reused idempotency key is refused like payment APIs refuse it.
            ErrorKind::IdempotencyKeyReused => 422,
            ErrorKind::UnsupportedMediaType => 415,
            // A registry change that lost a race: the client's view is stale.
            ErrorKind::Conflict => 409,
            k => http_status_of_code(k.grpc_code()),
        }
    }

    /// Whether a call the shard's leader failed with this kind may run again
    /// (on the leader a retry finds). A kind says what it means coming from
    /// the leader; failures of the forwarding itself are the
    /// [`InvokeError`]'s to judge.
    pub fn retry(self) -> Retry {
        match self {
            // Refused before running: a follower, a leader shutting down.
            ErrorKind::NotLeader | ErrorKind::ShuttingDown => Retry::Always,
            // A commit that failed as leadership moved may still be applied by
            // the next leader.
            ErrorKind::Commit => Retry::IfGuarded,
            _ => Retry::Never,
        }
    }

    /// Whether a call that failed with this kind may run again; `guarded`:
    /// it carries an idempotency key or a message sequence.
    pub fn is_retryable(self, guarded: bool) -> bool {
        match self.retry() {
            Retry::Never => false,
            Retry::IfGuarded => guarded,
            Retry::Always => true,
        }
    }

    /// What the deliverer does with a message that failed with this kind.
    /// Decided by kind rather than by [`InvokeError`] variant, so a failure
    /// reported by another node counts like the same failure here.
    pub fn disposition(self) -> Disposition {
        use ErrorKind::*;
        match self {
            UnknownType | BadOperation | BadIdempotencyKey | IdempotencyKeyReused | BadRequest | UnknownOperation
            | Failed => Disposition::Permanent,
            MigrationFailed | OutOfFuel | Timeout | OutOfMemory | StackOverflow | LimitExceeded | Trap
            | Instantiate => Disposition::ReceiverFault,
            // A member still fetching the receiver's component, or any
            // refusal of the infrastructure's.
            ComponentLoading | MailboxFull | Overloaded | ShuttingDown | OutboxFull | Commit | Internal | NotLeader
            | Unavailable => Disposition::Unavailable,
            // Kinds no invocation fails with: a delivery never meets them,
            // and one reported by a newer node is not the receiver's fault.
            BadTypeName | TooLarge | InvalidComponent | UnknownVersion | BadCanary | NotPropagated | Conflict
            | ComponentFetch | Registry | BadEntity | BadProtobuf | PayloadTooLarge | MessageTooLarge | BadVersion
            | BadUpload | TruncatedUpload | BadCursor | BadNode | NoSuchNode | LastNode | NotCommitted | NotHere
            | Storage | Unauthenticated | BadBody | BadJson | UnsupportedMediaType | NotFound | HostNotAllowed
            | CrossOrigin | Unimplemented | Transport => Disposition::Unavailable,
        }
    }
}

/// The HTTP status of a gRPC code (as grpc-gateway maps them, except that a
/// refused business rule — FAILED_PRECONDITION — is a 409 Conflict, and a
/// trapped turn — ABORTED — a 500: the entity's code failed, not the request).
pub fn http_status_of_code(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::FailedPrecondition => 409,
        Code::ResourceExhausted => 429,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        Code::Cancelled => 499,
        Code::Unimplemented => 501,
        Code::Aborted | Code::Internal | Code::Unknown | Code::DataLoss => 500,
    }
}

/// One call of one operation on one entity.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub entity: crate::model::EntityRef,
    pub operation: String,
    pub payload: Vec<u8>,
    pub caller: Option<crate::model::EntityRef>,
    /// A client's retry key: the first successful reply under it is stored and
    /// returned to every retry instead of running the turn again.
    pub idempotency_key: Option<String>,
    /// Set when this invocation delivers a message from an outbox: the sender's
    /// sequence, by which the receiver drops duplicates.
    pub message_seq: Option<u64>,
    /// What the delivered message is: a plain send (also every client call),
    /// an ask to answer, or a reply that runs a continuation.
    pub kind: crate::model::MessageKind,
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error(transparent)]
    UnknownType(RegistryError),
    #[error("operation name must be 1..=128 printable characters")]
    BadOperation,
    #[error("entity {entity} has {depth} invocations waiting; try again later")]
    MailboxFull { entity: String, depth: usize },
    #[error("the node is handling {0} invocations; try again later")]
    Overloaded(usize),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("the node's outbox holds {0} undelivered messages; try again later")]
    OutboxFull(u64),
    #[error(transparent)]
    BadIdempotencyKey(crate::model::ModelError),
    /// A retry under an idempotency key whose first call had another
    /// operation or payload: it would get that call's reply.
    #[error(
        "idempotency key {key:?} was first used for another call (a different operation or payload) \
         on {entity}; use a new key for a new call"
    )]
    IdempotencyKeyReused { entity: String, key: String },
    #[error(
        "entity {entity} could not migrate from version {from_version} to version {to_version}: {cause}; \
         it keeps its version-{from_version} state (deploy a fix or roll back)"
    )]
    MigrationFailed { entity: String, from_version: u32, to_version: u32, cause: TurnError },
    #[error(transparent)]
    Turn(#[from] TurnError),
    #[error(transparent)]
    Instantiate(#[from] RuntimeError),
    #[error("commit failed: {0}")]
    Commit(#[from] LogError),
    #[error("internal error: {0}")]
    Internal(String),
    /// This node does not lead the entity's shard (or has not caught up as its
    /// leader yet); nothing ran. The router retries on `leader`.
    #[error("this node does not lead the entity's shard (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    NotHere { leader: Option<u64> },
    /// The shard has no reachable leader within the forwarding deadline.
    #[error("no leader of the entity's shard could be reached: {0}")]
    NoLeader(String),
    /// A forwarded invocation could not reach `node`; nothing ran there.
    #[error("node {node} is unreachable: {message}")]
    Unreachable { node: u64, message: String },
    /// The connection to `node` failed after the invocation was sent: it may
    /// or may not have run.
    #[error("lost the connection to node {node} during the call (the outcome is unknown): {message}")]
    Lost { node: u64, message: String },
    /// The shard's leader ran the invocation and it failed there; `kind` and
    /// `code` are the leader's (a kind this node does not know arrives as
    /// `Internal`, with the leader's code).
    #[error("{message}")]
    Remote { kind: ErrorKind, code: i32, message: String },
}

impl InvokeError {
    /// The kind of this failure: the API's `conflux-error-kind`, the label of
    /// the error metrics.
    pub fn kind(&self) -> ErrorKind {
        match self {
            InvokeError::UnknownType(RegistryError::Loading { .. }) => ErrorKind::ComponentLoading,
            InvokeError::UnknownType(_) => ErrorKind::UnknownType,
            InvokeError::BadOperation => ErrorKind::BadOperation,
            InvokeError::MailboxFull { .. } => ErrorKind::MailboxFull,
            InvokeError::Overloaded(_) => ErrorKind::Overloaded,
            InvokeError::ShuttingDown => ErrorKind::ShuttingDown,
            InvokeError::MigrationFailed { .. } => ErrorKind::MigrationFailed,
            InvokeError::OutboxFull(_) => ErrorKind::OutboxFull,
            InvokeError::BadIdempotencyKey(_) => ErrorKind::BadIdempotencyKey,
            InvokeError::IdempotencyKeyReused { .. } => ErrorKind::IdempotencyKeyReused,
            InvokeError::Turn(t) => match t {
                TurnError::BadRequest(_) => ErrorKind::BadRequest,
                TurnError::UnknownOperation(_) => ErrorKind::UnknownOperation,
                TurnError::Failed(_) => ErrorKind::Failed,
                TurnError::Trapped { kind, .. } => ErrorKind::from(*kind),
                TurnError::MigrationFailed { .. } => ErrorKind::MigrationFailed,
            },
            InvokeError::Instantiate(RuntimeError::Exhausted { .. }) => ErrorKind::Overloaded,
            InvokeError::Instantiate(_) => ErrorKind::Instantiate,
            InvokeError::Commit(_) => ErrorKind::Commit,
            InvokeError::Internal(_) => ErrorKind::Internal,
            InvokeError::NotHere { .. } => ErrorKind::NotLeader,
            InvokeError::NoLeader(_) | InvokeError::Unreachable { .. } | InvokeError::Lost { .. } => {
                ErrorKind::Unavailable
            }
            InvokeError::Remote { kind, .. } => *kind,
        }
    }

    /// The gRPC code the API answers this failure with: its kind's, or, for
    /// a failure reported by the shard's leader, the leader's.
    pub fn grpc_code(&self) -> Code {
        match self {
            InvokeError::Remote { code, .. } => Code::from(*code),
            e => e.kind().grpc_code(),
        }
    }

    /// What the deliverer does with a message that failed this way.
    pub fn disposition(&self) -> Disposition {
        self.kind().disposition()
    }

    /// Whether running the invocation again is safe and may succeed: nothing
    /// ran, or whatever ran is deduplicated (`guarded`: the invocation carries
    /// an idempotency key or a message sequence).
    pub(super) fn is_retryable(&self, guarded: bool) -> bool {
        match self {
            // The forwarding's own failures, which only this node sees: the
            // leader was not reached (nothing ran) or the answer was lost.
            InvokeError::NoLeader(_) | InvokeError::Unreachable { .. } => true,
            InvokeError::Lost { .. } => guarded,
            // This node is shutting down: it stops routing.
            InvokeError::ShuttingDown => false,
            e => e.kind().is_retryable(guarded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_wire_name() {
        let mut names = std::collections::BTreeSet::new();
        for &kind in ErrorKind::ALL {
            assert!(names.insert(kind.as_str()), "{kind:?} shares its name");
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
            assert_eq!(kind.as_str().parse::<ErrorKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
            // A kind is a header value and a metrics label.
            assert!(kind.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'-'), "{kind}");
        }
        assert_eq!(ErrorKind::parse("no-such-kind"), None);
        assert!("no-such-kind".parse::<ErrorKind>().is_err());
        let traps = [
            TrapKind::OutOfFuel,
            TrapKind::Timeout,
            TrapKind::OutOfMemory,
            TrapKind::StackOverflow,
            TrapKind::LimitExceeded,
            TrapKind::Trap,
        ];
        for t in traps {
            assert_eq!(ErrorKind::from(t).as_str(), t.as_str(), "the trap's own name is its kind");
        }
    }

    #[test]
    fn the_readme_lists_every_kind() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("| failure | gRPC code | `conflux-error-kind` |").expect("README's error-kind table");
        let table: String = readme[start..].lines().take_while(|l| l.starts_with('|')).collect::<Vec<_>>().join("\n");
        let missing: Vec<&str> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).filter(|k| !table.contains(&format!("`{k}`"))).collect();
        assert!(missing.is_empty(), "README's error-kind table lacks {missing:?}");
    }

    #[test]
    fn status_mapping_is_the_contract() {
        let cases = [
            (ErrorKind::UnknownType, Code::NotFound, 404),
            (ErrorKind::BadRequest, Code::InvalidArgument, 400),
            (ErrorKind::Failed, Code::FailedPrecondition, 409),
            (ErrorKind::IdempotencyKeyReused, Code::FailedPrecondition, 422),
            (ErrorKind::Timeout, Code::Aborted, 500),
            (ErrorKind::MailboxFull, Code::ResourceExhausted, 429),
            (ErrorKind::ComponentLoading, Code::Unavailable, 503),
            (ErrorKind::Conflict, Code::Aborted, 409),
            (ErrorKind::PayloadTooLarge, Code::InvalidArgument, 413),
            (ErrorKind::UnsupportedMediaType, Code::InvalidArgument, 415),
            (ErrorKind::CrossOrigin, Code::PermissionDenied, 403),
            (ErrorKind::Unauthenticated, Code::Unauthenticated, 401),
        ];
        for (kind, code, http) in cases {
            assert_eq!((kind.grpc_code(), kind.http_status()), (code, http), "{kind}");
        }
    }

    #[test]
    fn only_calls_that_did_not_run_or_are_deduplicated_are_retried() {
        let remote = |kind| InvokeError::Remote { kind, code: 14, message: String::new() };
        let never_ran = [
            InvokeError::NotHere { leader: Some(2) },
            InvokeError::NoLeader("election".into()),
            InvokeError::Unreachable { node: 2, message: "refused".into() },
            remote(ErrorKind::ShuttingDown),
        ];
        for e in &never_ran {
            assert!(e.is_retryable(false) && e.is_retryable(true), "{e:?}");
        }
        let unknown_outcome = [
            InvokeError::Commit(LogError::NotLeader { leader: None }),
            InvokeError::Lost { node: 2, message: "reset".into() },
            remote(ErrorKind::Commit),
        ];
        for e in &unknown_outcome {
            assert!(!e.is_retryable(false) && e.is_retryable(true), "{e:?}");
        }
        let answered = [
            remote(ErrorKind::Failed),
            InvokeError::Turn(TurnError::Failed("no".into())),
            InvokeError::BadOperation,
            InvokeError::ShuttingDown,
        ];
        for e in &answered {
            assert!(!e.is_retryable(true), "{e:?}");
        }
        // A kind received from another node keeps its meaning.
        assert_eq!(remote(ErrorKind::Failed).disposition(), Disposition::Permanent);
        assert_ne!(remote(ErrorKind::Timeout).disposition(), Disposition::Permanent);
        assert_eq!(InvokeError::NotHere { leader: None }.kind(), ErrorKind::NotLeader);
    }
}
