//! What a slot remembers of its entity's [`EntityMeta`] record: the version
//! that last committed its state (which decides whether the next turn
//! migrates first) and the sender's next outbox sequence.

use super::InvokeError;
use crate::model::{EntityMeta, EntityRef, Keyspace, Record, entity_prefix};
use crate::storage::StateStore;

/// What the slot remembers of the entity's [`EntityMeta`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MetaCache {
    pub(super) stored: StoredVersion,
    pub(super) next_seq: u64,
}

impl MetaCache {
    /// Reads it from the store (the meta record, else whether the entity has state).
    pub(super) fn load(store: &dyn StateStore, entity: &EntityRef) -> Result<Self, InvokeError> {
        let internal = |e: &dyn std::fmt::Display| InvokeError::Internal(format!("reading meta of {entity}: {e}"));
        let prefix = entity_prefix(entity);
        let meta = match store.get(Keyspace::EntityMeta, &prefix).map_err(|e| internal(&e))? {
            Some(bytes) => EntityMeta::decode(&bytes).map_err(|e| internal(&e))?,
            None => EntityMeta::default(),
        };
        let stored = match meta.version {
            Some(v) => StoredVersion::At(v),
            None => {
                let any = store.scan(Keyspace::State, &prefix, None, 1).map_err(|e| internal(&e))?;
                if any.is_empty() { StoredVersion::Fresh } else { StoredVersion::Unrecorded }
            }
        };
        Ok(MetaCache { stored, next_seq: meta.next_seq })
    }
}

/// The version that last committed an entity's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StoredVersion {
    /// No state and no record: nothing to migrate.
    Fresh,
    /// State written before versions were recorded; migrates as from version 0.
    Unrecorded,
    At(u32),
}

impl StoredVersion {
    pub(super) fn version(self) -> Option<u32> {
        match self {
            StoredVersion::At(v) => Some(v),
            _ => None,
        }
    }

    /// The version to migrate from before running `version`, if any.
    pub(super) fn migrate_from(self, version: u32) -> Option<u32> {
        match self {
            StoredVersion::Fresh => None,
            StoredVersion::Unrecorded => Some(0),
            StoredVersion::At(v) => (v != version).then_some(v),
        }
    }
}
