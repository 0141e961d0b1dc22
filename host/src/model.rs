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
    /// Host bookkeeping per entity, keyed by [`entity_prefix`]: the registry version
    /// that last committed the entity's state (little-endian u32), so a new version
    /// knows when to run the guest's migration. Guests cannot read or write it.
    EntityMeta = 3,
}

impl Keyspace {
    pub const ALL: [Keyspace; 3] = [Keyspace::State, Keyspace::Registry, Keyspace::EntityMeta];

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
    Put { keyspace: Keyspace, key: Vec<u8>, value: Vec<u8> },
    Delete { keyspace: Keyspace, key: Vec<u8> },
}

impl Op {
    pub fn keyspace(&self) -> Keyspace {
        match self {
            Op::Put { keyspace, .. } | Op::Delete { keyspace, .. } => *keyspace,
        }
    }

    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
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
            })
            .sum::<usize>()
            + 8
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

/// Encodes the version an entity's state was last committed under ([`Keyspace::EntityMeta`]).
pub fn encode_entity_version(version: u32) -> Vec<u8> {
    version.to_le_bytes().to_vec()
}

pub fn decode_entity_version(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// Storage key of one state key of one entity.
pub fn state_key(entity: &EntityRef, key: &str) -> Vec<u8> {
    let mut k = entity_prefix(entity);
    k.extend_from_slice(key.as_bytes());
    k
}

#[cfg(test)]
mod tests {
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
        assert_eq!(decode_entity_version(&encode_entity_version(7)), Some(7));
        assert_eq!(decode_entity_version(b"xy"), None);
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
        assert!(WriteSet::decode(&[0xff, 0xff, 0xff]).is_err());
    }
}
