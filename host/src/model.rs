//! Domain types shared by every layer: entity refs, write sets and the storage key
//! layout. Pure data and validation: no I/O, no tokio, no wasmtime, no sled.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Position of an entry in the commit log. The first entry has index 1; 0 means
/// "nothing" (e.g. nothing applied yet).
pub type LogIndex = u64;

/// Longest entity id accepted, in bytes (DESIGN.md §2).
pub const MAX_ENTITY_ID_BYTES: usize = 256;
/// Longest entity type name accepted, in bytes.
pub const MAX_TYPE_NAME_BYTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("entity type must not be empty")]
    EmptyType,
    #[error("entity type is {0} bytes; the limit is {MAX_TYPE_NAME_BYTES}")]
    TypeTooLong(usize),
    #[error(
        "entity type {0:?} may only contain lowercase ASCII letters, digits, '-' and '_', and must start with a letter"
    )]
    BadTypeChars(String),
    #[error("entity id must not be empty")]
    EmptyId,
    #[error("entity id is {0} bytes; the limit is {MAX_ENTITY_ID_BYTES}")]
    IdTooLong(usize),
    #[error("entity id contains a control character at byte {0}")]
    IdControlChar(usize),
    #[error("entity ref {0:?} must have the form TYPE/ID")]
    BadRef(String),
    #[error("corrupt write set: {0}")]
    CorruptWriteSet(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("idempotency key must be 1..={MAX_IDEMPOTENCY_KEY_BYTES} bytes without control characters")]
    BadIdempotencyKey,
}

/// Checks an entity type name: `[a-z][a-z0-9_-]*`, at most 64 bytes.
pub fn validate_type_name(name: &str) -> Result<(), ModelError> {
    if name.is_empty() {
        return Err(ModelError::EmptyType);
    }
    if name.len() > MAX_TYPE_NAME_BYTES {
        return Err(ModelError::TypeTooLong(name.len()));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !(first_ok && rest_ok) {
        return Err(ModelError::BadTypeChars(name.to_owned()));
    }
    Ok(())
}

/// Checks an entity id: any UTF-8 up to 256 bytes without control characters.
/// Control characters are refused because ids appear in logs and terminals, and
/// because NUL separates the parts of a storage key.
pub fn validate_entity_id(id: &str) -> Result<(), ModelError> {
    if id.is_empty() {
        return Err(ModelError::EmptyId);
    }
    if id.len() > MAX_ENTITY_ID_BYTES {
        return Err(ModelError::IdTooLong(id.len()));
    }
    if let Some((pos, _)) = id.char_indices().find(|(_, c)| c.is_control()) {
        return Err(ModelError::IdControlChar(pos));
    }
    Ok(())
}

/// `(type, id)`: the address of one entity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityRef {
    pub entity_type: String,
    pub id: String,
}

impl EntityRef {
    /// Builds a validated ref.
    pub fn new(entity_type: impl Into<String>, id: impl Into<String>) -> Result<Self, ModelError> {
        let r = Self { entity_type: entity_type.into(), id: id.into() };
        validate_type_name(&r.entity_type)?;
        validate_entity_id(&r.id)?;
        Ok(r)
    }

    /// Parses `TYPE/ID` (the id may itself contain '/').
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        let (t, id) = s.split_once('/').ok_or_else(|| ModelError::BadRef(s.to_owned()))?;
        Self::new(t, id)
    }
}

impl fmt::Display for EntityRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.entity_type, self.id)
    }
}

/// The independent key spaces of the store. Each write-set operation names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Keyspace {
    /// Entity state; keys laid out by [`state_key`].
    State = 1,
    /// Component registry metadata (types, versions, active pointers).
    Registry = 2,
    /// Host bookkeeping per entity, keyed by [`entity_prefix`]: an [`EntityMeta`]
    /// (the version that last committed its state, its next outbox sequence).
    /// Guests cannot read or write it.
    EntityMeta = 3,
    /// Committed messages waiting for delivery: [`outbox_key`] → [`Message`].
    Outbox = 4,
    /// Pending timers: [`timer_due_key`] → [`Message`] and [`timer_id_key`] → due time.
    Timers = 5,
    /// Per receiver and sender, the highest message sequence processed (u64 LE):
    /// [`inbox_key`]. Deduplicates redelivered messages.
    Inbox = 6,
    /// Stored replies of idempotent invocations and their expiry index.
    Idempotency = 7,
    /// Messages that could not be delivered: [`dead_letter_key`] → [`DeadLetter`].
    DeadLetters = 8,
    /// An entity's asks still waiting for their reply: [`ask_key`] → [`PendingAsk`].
    /// A reply is processed only while its ask is here, and processing it
    /// removes it: that makes the continuation run once per ask, whichever
    /// comes first of the reply, a failure report and the timeout.
    Asks = 9,
}

impl Keyspace {
    pub const ALL: [Keyspace; 9] = [
        Keyspace::State,
        Keyspace::Registry,
        Keyspace::EntityMeta,
        Keyspace::Outbox,
        Keyspace::Timers,
        Keyspace::Inbox,
        Keyspace::Idempotency,
        Keyspace::DeadLetters,
        Keyspace::Asks,
    ];

    pub fn as_byte(self) -> u8 {
        self as u8
    }

    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_byte() == b)
    }
}

/// One change in a write set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        keyspace: Keyspace,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        keyspace: Keyspace,
        key: Vec<u8>,
    },
    /// A precondition, not a change: the whole write set applies only if
    /// `key` holds exactly `value` (`None`: is absent) when it is applied.
    /// Checked by the replicated state machine in log order, so every
    /// replica decides alike (compare-and-set of registry records). Added
    /// last, so write sets encoded before it existed still decode.
    Expect {
        keyspace: Keyspace,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
}

impl Op {
    pub fn keyspace(&self) -> Keyspace {
        match self {
            Op::Put { keyspace, .. } | Op::Delete { keyspace, .. } | Op::Expect { keyspace, .. } => *keyspace,
        }
    }

    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } | Op::Expect { key, .. } => key,
        }
    }
}

/// Everything one turn (or one registry change) changes. It is the unit of the
/// commit log and is applied to storage atomically. Later ops on the same key win.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteSet {
    pub ops: Vec<Op>,
}

impl WriteSet {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Approximate encoded size, for batching limits.
    pub fn approx_bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, .. } => 8 + key.len() + value.len(),
                Op::Delete { key, .. } => 8 + key.len(),
                Op::Expect { key, value, .. } => 8 + key.len() + value.as_ref().map_or(0, Vec::len),
            })
            .sum::<usize>()
            + 8
    }

    /// Whether the write set carries preconditions ([`Op::Expect`]): it must
    /// then travel in a Raft entry of its own, since a failed precondition
    /// skips the whole entry.
    pub fn is_conditional(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::Expect { .. }))
    }

    /// Stable binary encoding used in the log.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("write sets always serialise")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        postcard::from_bytes(bytes).map_err(|e| ModelError::CorruptWriteSet(e.to_string()))
    }
}

/// Separates the parts of a state key. Types and ids never contain it (they are
/// validated), so `type \0 id \0` is an exact, order-preserving entity prefix.
const SEP: u8 = 0;

/// Prefix under which all of one entity's state keys live.
pub fn entity_prefix(entity: &EntityRef) -> Vec<u8> {
    let mut k = Vec::with_capacity(entity.entity_type.len() + entity.id.len() + 2);
    k.extend_from_slice(entity.entity_type.as_bytes());
    k.push(SEP);
    k.extend_from_slice(entity.id.as_bytes());
    k.push(SEP);
    k
}

/// The entity a store key belongs to, as `(type, id)`: every key but the
/// registry's embeds one entity prefix, at an offset fixed by its keyspace and
/// leading tag. The cluster places keys on shards by it. `None` for registry
/// keys and for keys (or scan prefixes) too short to name a whole entity.
pub fn entity_of_key(keyspace: Keyspace, key: &[u8]) -> Option<(&str, &str)> {
    let offset = match keyspace {
        Keyspace::Registry => return None,
        Keyspace::State | Keyspace::EntityMeta | Keyspace::Outbox | Keyspace::Inbox | Keyspace::Asks => 0,
        Keyspace::DeadLetters => 8,
        Keyspace::Timers => match key.first()? {
            b'd' => 9,
            b'i' => 1,
            _ => return None,
        },
        Keyspace::Idempotency => match key.first()? {
            b'k' => 1,
            b'e' => 10,
            _ => return None,
        },
    };
    let rest = key.get(offset..)?;
    let type_end = rest.iter().position(|b| *b == SEP)?;
    let id_len = rest[type_end + 1..].iter().position(|b| *b == SEP)?;
    let ty = std::str::from_utf8(&rest[..type_end]).ok()?;
    let id = std::str::from_utf8(&rest[type_end + 1..type_end + 1 + id_len]).ok()?;
    Some((ty, id))
}

/// Wall-clock time in Unix milliseconds (0 if the clock is before 1970; a
/// simulation's clock under one: see [`crate::determinism`]).
pub fn unix_ms() -> u64 {
    crate::determinism::unix_ms()
}

/// Prefix under which all entities of one type live.
pub fn type_prefix(entity_type: &str) -> Vec<u8> {
    let mut k = entity_type.as_bytes().to_vec();
    k.push(SEP);
    k
}

/// The entity id of a state key under `type_prefix(entity_type)` (whose length is
/// `type_prefix_len`), or `None` if the key is not laid out by [`state_key`].
pub fn id_of_state_key(key: &[u8], type_prefix_len: usize) -> Option<&str> {
    let rest = key.get(type_prefix_len..)?;
    let end = rest.iter().position(|b| *b == SEP)?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// A key that sorts after every state key of `entity` and before those of any other
/// entity of its type, for skipping to the next entity in a scan: `type \0 id \x01`.
/// Ids are UTF-8 without control characters, so no id's keys fall between.
pub fn after_entity(entity_type: &str, id: &str) -> Vec<u8> {
    let mut k = type_prefix(entity_type);
    k.extend_from_slice(id.as_bytes());
    k.push(SEP + 1);
    k
}

/// A host record kept in the store, in postcard encoding.
pub trait Record: Serialize + serde::de::DeserializeOwned {
    /// What it is, for error messages.
    const WHAT: &str;

    fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("host records always serialise")
    }

    fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        postcard::from_bytes(bytes).map_err(|e| ModelError::Corrupt(format!("{}: {e}", Self::WHAT)))
    }
}

/// Host bookkeeping for one entity ([`Keyspace::EntityMeta`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityMeta {
    /// The registry version that last committed the entity's state.
    pub version: Option<u32>,
    /// The sequence number the entity's next outgoing message or timer gets.
    pub next_seq: u64,
}

impl Record for EntityMeta {
    const WHAT: &str = "entity meta";
}

/// A message between entities, as kept in an outbox, a timer or a dead letter.
/// `(sender, seq)` is its id: unique, and increasing per sender in send order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub sender: EntityRef,
    pub seq: u64,
    pub target: EntityRef,
    pub operation: String,
    pub payload: Vec<u8>,
    /// Last, so that a record written before kinds existed decodes as a `Send`.
    pub kind: MessageKind,
}

/// What a message asks of its receiver besides running its operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    /// One-way: the receiver's answer is discarded.
    #[default]
    Send,
    /// An ask: the receiver's answer (or refusal) goes back to the sender as a
    /// `Reply` committed with the receiver's turn.
    Ask,
    /// The answer to the receiver's ask `ask_seq` (the ask's sequence in the
    /// receiver's own outbox). Its operation is empty: the receiver's
    /// [`PendingAsk`] names the continuation it runs.
    Reply { ask_seq: u64, outcome: Result<Vec<u8>, AskFailure> },
}

/// Why an ask got no value back (WIT `ask-error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AskFailure {
    /// The callee's operation returned this error.
    Refused { kind: RefusalKind, message: String },
    /// The ask's timeout passed first.
    TimedOut,
    /// The ask could not be processed (unknown type, a callee that kept trapping).
    Undeliverable(String),
}

/// Which WIT `call-error` a callee returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    BadRequest,
    UnknownOperation,
    Failed,
}

impl fmt::Display for AskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AskFailure::Refused { kind, message } => write!(f, "refused ({kind:?}): {message}"),
            AskFailure::TimedOut => f.write_str("timed out"),
            AskFailure::Undeliverable(why) => write!(f, "undeliverable: {why}"),
        }
    }
}

/// A [`Message`] as written before [`MessageKind`] existed.
#[derive(Deserialize)]
struct MessageV1 {
    sender: EntityRef,
    seq: u64,
    target: EntityRef,
    operation: String,
    payload: Vec<u8>,
}

impl From<MessageV1> for Message {
    fn from(m: MessageV1) -> Self {
        Message {
            sender: m.sender,
            seq: m.seq,
            target: m.target,
            operation: m.operation,
            payload: m.payload,
            kind: MessageKind::Send,
        }
    }
}

impl Record for Message {
    const WHAT: &str = "message";

    fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        // A record written before kinds existed ends where `kind` would start.
        postcard::from_bytes::<Message>(bytes)
            .or_else(|_| postcard::from_bytes::<MessageV1>(bytes).map(Message::from))
            .map_err(|e| ModelError::Corrupt(format!("{}: {e}", Self::WHAT)))
    }
}

/// A message given up on, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message: Message,
    pub reason: String,
    pub attempts: u32,
    pub at_ms: u64,
}

/// How a [`DeadLetter`] is stored: the message's kind goes last, after the
/// fields a letter written before kinds existed ends with.
#[derive(Serialize, Deserialize)]
struct DeadLetterWire {
    sender: EntityRef,
    seq: u64,
    target: EntityRef,
    operation: String,
    payload: Vec<u8>,
    reason: String,
    attempts: u32,
    at_ms: u64,
    kind: Option<MessageKind>,
}

impl DeadLetter {
    pub fn encode(&self) -> Vec<u8> {
        let m = self.message.clone();
        let wire = DeadLetterWire {
            sender: m.sender,
            seq: m.seq,
            target: m.target,
            operation: m.operation,
            payload: m.payload,
            reason: self.reason.clone(),
            attempts: self.attempts,
            at_ms: self.at_ms,
            kind: Some(m.kind),
        };
        postcard::to_allocvec(&wire).expect("host records always serialise")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct V1 {
            message: MessageV1,
            reason: String,
            attempts: u32,
            at_ms: u64,
        }
        let wire = match postcard::from_bytes::<DeadLetterWire>(bytes) {
            Ok(w) => w,
            Err(_) => {
                let v1 =
                    postcard::from_bytes::<V1>(bytes).map_err(|e| ModelError::Corrupt(format!("dead letter: {e}")))?;
                return Ok(DeadLetter {
                    message: v1.message.into(),
                    reason: v1.reason,
                    attempts: v1.attempts,
                    at_ms: v1.at_ms,
                });
            }
        };
        Ok(DeadLetter {
            message: Message {
                sender: wire.sender,
                seq: wire.seq,
                target: wire.target,
                operation: wire.operation,
                payload: wire.payload,
                kind: wire.kind.unwrap_or_default(),
            },
            reason: wire.reason,
            attempts: wire.attempts,
            at_ms: wire.at_ms,
        })
    }
}

/// An ask waiting for its reply, kept by the asking entity ([`Keyspace::Asks`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAsk {
    /// Who was asked.
    pub callee: EntityRef,
    /// The operation of the asking entity its reply runs.
    pub continuation: String,
    /// The caller's bytes, handed to the continuation unchanged.
    pub context: Vec<u8>,
    /// The timeout's timer in the asker's timers: its sequence and due time.
    pub timer: Option<(u64, u64)>,
}

impl Record for PendingAsk {
    const WHAT: &str = "pending ask";
}

/// A stored reply of an idempotent invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotentReply {
    pub expires_at_ms: u64,
    pub reply: Vec<u8>,
    /// [`request_digest`] of the call that stored it: a retry must be the same
    /// call. `None` in records written before digests were kept.
    pub request: Option<[u8; 32]>,
}

/// The stored form before the request digest was kept.
#[derive(Deserialize)]
struct IdempotentReplyV1 {
    expires_at_ms: u64,
    reply: Vec<u8>,
}

impl Record for IdempotentReply {
    const WHAT: &str = "idempotent reply";

    fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        // postcard is not self-describing: a record of the older layout has
        // no trailing digest and must be read as such.
        match postcard::from_bytes::<Self>(bytes) {
            Ok(r) => Ok(r),
            Err(e) => match postcard::from_bytes::<IdempotentReplyV1>(bytes) {
                Ok(v1) => Ok(Self { expires_at_ms: v1.expires_at_ms, reply: v1.reply, request: None }),
                Err(_) => Err(ModelError::Corrupt(format!("{}: {e}", Self::WHAT))),
            },
        }
    }
}

/// What makes two calls under one idempotency key the same call: the
/// operation and the payload (SHA-256 over both, the operation length-prefixed).
pub fn request_digest(operation: &str, payload: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update((operation.len() as u64).to_le_bytes());
    h.update(operation.as_bytes());
    h.update(payload);
    h.finalize().into()
}

/// [`Keyspace::Outbox`] key: `sender \0 id \0 seq(be)`, so one sender's messages are
/// contiguous and in send order.
pub fn outbox_key(sender: &EntityRef, seq: u64) -> Vec<u8> {
    let mut k = entity_prefix(sender);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence at the end of an outbox, timer-id or dead-letter key.
pub fn seq_of_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(key.len().checked_sub(8)?..)?.try_into().ok()?))
}

/// [`Keyspace::Asks`] key: `asker \0 id \0 ask-seq(be)`.
pub fn ask_key(asker: &EntityRef, ask_seq: u64) -> Vec<u8> {
    outbox_key(asker, ask_seq)
}

/// [`Keyspace::Timers`] key ordered by due time: `d due(be) sender \0 id \0 seq(be)`.
pub fn timer_due_key(due_ms: u64, sender: &EntityRef, seq: u64) -> Vec<u8> {
    let mut k = vec![b'd'];
    k.extend_from_slice(&due_ms.to_be_bytes());
    k.extend_from_slice(&outbox_key(sender, seq));
    k
}

/// [`Keyspace::Timers`] key of one timer by its id: `i sender \0 id \0 seq(be)` → due (be).
pub fn timer_id_key(sender: &EntityRef, seq: u64) -> Vec<u8> {
    let mut k = vec![b'i'];
    k.extend_from_slice(&outbox_key(sender, seq));
    k
}

/// Prefix of all [`timer_due_key`]s.
pub const TIMER_DUE_PREFIX: &[u8] = b"d";

/// The due time of a [`timer_due_key`].
pub fn due_of_timer_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?))
}

/// [`Keyspace::Inbox`] key: `receiver \0 id \0 sender \0 id \0`.
pub fn inbox_key(receiver: &EntityRef, sender: &EntityRef) -> Vec<u8> {
    let mut k = entity_prefix(receiver);
    k.extend_from_slice(&entity_prefix(sender));
    k
}

/// [`Keyspace::Idempotency`] key of a stored reply: `k entity \0 id \0 key`.
pub fn idempotency_key(entity: &EntityRef, key: &str) -> Vec<u8> {
    let mut k = vec![b'k'];
    k.extend_from_slice(&entity_prefix(entity));
    k.extend_from_slice(key.as_bytes());
    k
}

/// [`Keyspace::Idempotency`] expiry index: `e expires(be) <idempotency_key>`.
pub fn idempotency_expiry_key(expires_at_ms: u64, record_key: &[u8]) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(&expires_at_ms.to_be_bytes());
    k.extend_from_slice(record_key);
    k
}

/// Prefix of all [`idempotency_expiry_key`]s.
pub const IDEMPOTENCY_EXPIRY_PREFIX: &[u8] = b"e";

/// Splits an [`idempotency_expiry_key`] into its expiry and record key.
pub fn split_idempotency_expiry_key(key: &[u8]) -> Option<(u64, &[u8])> {
    let expires = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    Some((expires, key.get(9..)?))
}

/// [`Keyspace::DeadLetters`] key: `at(be) sender \0 id \0 seq(be)`, oldest first.
pub fn dead_letter_key(at_ms: u64, sender: &EntityRef, seq: u64) -> Vec<u8> {
    let mut k = at_ms.to_be_bytes().to_vec();
    k.extend_from_slice(&outbox_key(sender, seq));
    k
}

/// Whether `name` may name an operation (or an ask's continuation): 1..=128
/// bytes, no control characters. Checked where a client calls and where a
/// guest sends.
pub fn valid_operation_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && !name.chars().any(char::is_control)
}

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// Checks a client's idempotency key: 1..=256 bytes, no control characters.
pub fn validate_idempotency_key(key: &str) -> Result<(), ModelError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES || key.chars().any(char::is_control) {
        return Err(ModelError::BadIdempotencyKey);
    }
    Ok(())
}

/// Storage key of one state key of one entity.
pub fn state_key(entity: &EntityRef, key: &str) -> Vec<u8> {
    let mut k = entity_prefix(entity);
    k.extend_from_slice(key.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_entity_key_names_its_entity() {
        let e = EntityRef::new("account", "alice").unwrap();
        let peer = EntityRef::new("ledger", "main").unwrap();
        let want = Some(("account", "alice"));
        let keys = [
            (Keyspace::State, state_key(&e, "balance")),
            (Keyspace::EntityMeta, entity_prefix(&e)),
            (Keyspace::Outbox, outbox_key(&e, 7)),
            (Keyspace::Inbox, inbox_key(&e, &peer)),
            (Keyspace::Timers, timer_due_key(1234, &e, 7)),
            (Keyspace::Timers, timer_id_key(&e, 7)),
            (Keyspace::Idempotency, idempotency_key(&e, "retry-1")),
            (Keyspace::Idempotency, idempotency_expiry_key(99, &idempotency_key(&e, "retry-1"))),
            (Keyspace::DeadLetters, dead_letter_key(5, &e, 7)),
        ];
        for (keyspace, key) in &keys {
            assert_eq!(entity_of_key(*keyspace, key), want, "{keyspace:?} {key:?}");
        }
        assert_eq!(entity_of_key(Keyspace::Registry, b"type/account"), None);
        // A prefix that stops inside the entity names none.
        assert_eq!(entity_of_key(Keyspace::State, &type_prefix("account")), None);
        assert_eq!(entity_of_key(Keyspace::Timers, b"d"), None);
    }

    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_entity_id("alice").is_ok());
        assert!(validate_entity_id("ünïcødé/with/slash").is_ok());
        assert_eq!(validate_entity_id(""), Err(ModelError::EmptyId));
        assert_eq!(validate_entity_id(&"x".repeat(257)), Err(ModelError::IdTooLong(257)));
        assert_eq!(validate_entity_id("a\nb"), Err(ModelError::IdControlChar(1)));
        assert_eq!(validate_entity_id("a\0b"), Err(ModelError::IdControlChar(1)));
        assert!(validate_entity_id(&"x".repeat(256)).is_ok());
    }

    #[test]
    fn type_names_are_validated() {
        assert!(validate_type_name("team-joiner_2").is_ok());
        assert!(validate_type_name("Counter").is_err());
        assert!(validate_type_name("9lives").is_err());
        assert!(validate_type_name("").is_err());
        assert!(validate_type_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn entity_skipping_keys_stay_between_entities() {
        let a = EntityRef::new("t", "a").unwrap();
        let a1 = EntityRef::new("t", "a1").unwrap();
        let last_of_a = state_key(&a, "\u{10ffff}\u{10ffff}");
        let skip = after_entity("t", "a");
        assert!(last_of_a < skip, "every key of a sorts before the skip key");
        assert!(skip < entity_prefix(&a1), "and the next entity after it");
        let plen = type_prefix("t").len();
        assert_eq!(id_of_state_key(&state_key(&a1, "k"), plen), Some("a1"));
        assert_eq!(id_of_state_key(b"t\0broken", plen), None);
        let meta = EntityMeta { version: Some(7), next_seq: 9 };
        assert_eq!(EntityMeta::decode(&meta.encode()).unwrap(), meta);
        assert!(EntityMeta::decode(b"").is_err());
    }

    #[test]
    fn message_keys_order_as_delivery_needs() {
        let a = EntityRef::new("t", "a").unwrap();
        let b = EntityRef::new("t", "b").unwrap();
        // One sender's messages are contiguous and in sequence order.
        assert!(outbox_key(&a, 2) < outbox_key(&a, 10) && outbox_key(&a, u64::MAX) < outbox_key(&b, 0));
        assert_eq!(seq_of_key(&outbox_key(&a, 42)), Some(42));
        assert_eq!(seq_of_key(b"short"), None);
        // Timers order by due time first, whoever sent them.
        assert!(timer_due_key(5, &b, 1) < timer_due_key(6, &a, 0));
        assert_eq!(due_of_timer_key(&timer_due_key(77, &a, 3)), Some(77));
        assert_eq!(seq_of_key(&timer_id_key(&a, 3)), Some(3));
        let rk = idempotency_key(&a, "k1");
        assert_eq!(split_idempotency_expiry_key(&idempotency_expiry_key(99, &rk)), Some((99, &rk[..])));
        assert!(validate_idempotency_key("order-17").is_ok());
        assert!(validate_idempotency_key("").is_err() && validate_idempotency_key("a\nb").is_err());
        assert!(validate_idempotency_key(&"x".repeat(257)).is_err());
    }

    #[test]
    fn refs_parse() {
        let r = EntityRef::parse("counter/a/b").unwrap();
        assert_eq!(r.entity_type, "counter");
        assert_eq!(r.id, "a/b");
        assert!(EntityRef::parse("counter").is_err());
        assert!(EntityRef::parse("counter/").is_err());
    }

    #[test]
    fn entity_prefixes_do_not_overlap() {
        let a = EntityRef::new("t", "a").unwrap();
        let ab = EntityRef::new("t", "ab").unwrap();
        let ka = state_key(&a, "bx");
        assert!(ka.starts_with(&entity_prefix(&a)));
        assert!(!ka.starts_with(&entity_prefix(&ab)));
        assert!(state_key(&ab, "").starts_with(&type_prefix("t")));
    }

    #[test]
    fn write_sets_round_trip() {
        let ws = WriteSet {
            ops: vec![
                Op::Put { keyspace: Keyspace::State, key: b"k".to_vec(), value: vec![0, 1, 2] },
                Op::Delete { keyspace: Keyspace::Registry, key: b"r".to_vec() },
            ],
        };
        assert_eq!(WriteSet::decode(&ws.encode()).unwrap(), ws);
        // Adding `Expect` left the encoding of the older ops as it was.
        let mut conditional = ws.clone();
        conditional.ops.push(Op::Expect { keyspace: Keyspace::Registry, key: b"r".to_vec(), value: None });
        assert!(conditional.encode()[1..].starts_with(&ws.encode()[1..]) && conditional.is_conditional());
        assert_eq!(WriteSet::decode(&conditional.encode()).unwrap(), conditional);
        assert!(WriteSet::decode(&[0xff, 0xff, 0xff]).is_err());
    }
}
