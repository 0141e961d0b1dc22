//! `ShardStateMachine`: openraft's `RaftStateMachine` for one shard replica,
//! on a `SledStore` tree. Applying an entry applies its write set (blank and
//! membership entries apply nothing but advance the index) and, in the same
//! sled batch, records the last applied log id and membership, so data and
//! raft metadata can never disagree after a crash.
//!
//! Durability: sled is not synced per apply; the raft log is the durability
//! boundary and openraft re-applies what sled lost. Two moments need the
//! store itself durable, because the log behind them is purged: building a
//! snapshot and installing one. Both persist sled first, then write the
//! snapshot file atomically (temp file, fsync, rename, fsync directory).

use super::{
    Entry, LogId, NodeId, ShardApplied, ShardTypes, SnapshotMeta, StorageError, StoredMembership, storage_err,
};
use crate::model::WriteSet;
use crate::storage::{SledStore, StateStore};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot};
use serde::{Deserialize, Serialize};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const LAST_APPLIED_KEY: &[u8] = b"\0raft_last_applied";
const MEMBERSHIP_KEY: &[u8] = b"\0raft_membership";
const SNAPSHOT_FILE: &str = "snapshot.bin";

/// The store's applied index for a raft log id. Raft's first entry has index
/// 0 (the initial membership), while the store uses 0 for "nothing applied",
/// so the store counts from 1.
fn store_index(log_id: Option<&LogId>) -> crate::model::LogIndex {
    log_id.map_or(0, |id| id.index + 1)
}

/// What a snapshot's bytes hold: every keyspace pair of the shard.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The snapshot file: meta and data together, so they are replaced as one.
#[derive(Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The state machine of one shard replica. Clones share everything (the
/// snapshot builder is a clone that runs beside the applying task).
#[derive(Clone)]
pub struct ShardStateMachine {
    store: Arc<SledStore>,
    dir: PathBuf,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
}

impl std::fmt::Debug for ShardStateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStateMachine").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(v: &T, subject: ErrorSubject<NodeId>) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(v).map_err(|e| storage_err(subject, ErrorVerb::Write, e))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], subject: ErrorSubject<NodeId>) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| storage_err(subject, ErrorVerb::Read, e))
}

fn sm_err(verb: ErrorVerb) -> impl Fn(crate::storage::StorageError) -> StorageError {
    move |e| storage_err(ErrorSubject::StateMachine, verb, e)
}

impl ShardStateMachine {
    /// Wraps `store` (the shard's tree) and loads the last snapshot from
    /// `dir`. If the snapshot is ahead of the store (a crash between the two
    /// writes of an install), the snapshot is installed again.
    pub fn open(store: Arc<SledStore>, dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        let sm = Self { store, dir: dir.to_path_buf(), current: Arc::new(Mutex::new(None)) };
        let path = dir.join(SNAPSHOT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let snap: StoredSnapshot = decode(&bytes, ErrorSubject::Snapshot(None))?;
                let applied = sm.store.applied_index().map_err(sm_err(ErrorVerb::Read))?;
                if store_index(snap.meta.last_log_id.as_ref()) > applied {
                    sm.replace_state(&snap.meta, &snap.data)?;
                }
                *sm.lock_current()? = Some(snap);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e)),
        }
        Ok(sm)
    }

    /// The shard's data, for reads by the node that leads it.
    pub fn store(&self) -> &Arc<SledStore> {
        &self.store
    }

    fn lock_current(&self) -> Result<std::sync::MutexGuard<'_, Option<StoredSnapshot>>, StorageError> {
        self.current
            .lock()
            .map_err(|_| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, "snapshot lock poisoned"))
    }

    fn read_applied(&self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let last = match self.store.get_meta(LAST_APPLIED_KEY).map_err(sm_err(ErrorVerb::Read))? {
            Some(bytes) => decode(&bytes, ErrorSubject::StateMachine)?,
            None => None,
        };
        let membership = match self.store.get_meta(MEMBERSHIP_KEY).map_err(sm_err(ErrorVerb::Read))? {
            Some(bytes) => decode(&bytes, ErrorSubject::StateMachine)?,
            None => StoredMembership::default(),
        };
        Ok((last, membership))
    }

    /// Replaces the store's content with a snapshot's and makes it durable.
    fn replace_state(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let data: SnapshotData = decode(data, subject.clone())?;
        let index = store_index(meta.last_log_id.as_ref());
        let applied_meta = [
            (LAST_APPLIED_KEY, encode(&meta.last_log_id, subject.clone())?),
            (MEMBERSHIP_KEY, encode(&meta.last_membership, subject.clone())?),
        ];
        self.store.replace_all(&data.pairs, index, &applied_meta).map_err(sm_err(ErrorVerb::Write))?;
        self.store.persist().map_err(sm_err(ErrorVerb::Write))
    }

    /// Writes the snapshot file atomically and makes it the current one.
    fn save_snapshot(&self, snap: StoredSnapshot) -> Result<(), StorageError> {
        let subject = ErrorSubject::Snapshot(Some(snap.meta.signature()));
        let err = |e: std::io::Error| storage_err(subject.clone(), ErrorVerb::Write, e);
        let tmp = self.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let mut file = std::fs::File::create(&tmp).map_err(err)?;
        file.write_all(&encode(&snap, subject.clone())?).map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, self.dir.join(SNAPSHOT_FILE)).map_err(err)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err)?;
        *self.lock_current()? = Some(snap);
        Ok(())
    }

    fn build_blocking(&self) -> Result<Snapshot<ShardTypes>, StorageError> {
        let export = self.store.export(&[LAST_APPLIED_KEY, MEMBERSHIP_KEY]).map_err(sm_err(ErrorVerb::Read))?;
        let last_log_id: Option<LogId> = match &export.meta[0] {
            Some(bytes) => decode(bytes, ErrorSubject::StateMachine)?,
            None => None,
        };
        let last_membership: StoredMembership = match &export.meta[1] {
            Some(bytes) => decode(bytes, ErrorSubject::StateMachine)?,
            None => StoredMembership::default(),
        };
        // Everything up to the snapshot must be durable in sled before
        // openraft purges the log behind it.
        self.store.persist().map_err(sm_err(ErrorVerb::Write))?;
        let snapshot_id = format!(
            "{}-{}-{}",
            last_log_id.map_or(0, |id| id.leader_id.term),
            last_log_id.map_or(0, |id| id.index),
            crate::model::unix_ms()
        );
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        let data = encode(&SnapshotData { pairs: export.pairs }, ErrorSubject::Snapshot(Some(meta.signature())))?;
        self.save_snapshot(StoredSnapshot { meta: meta.clone(), data: data.clone() })?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftSnapshotBuilder<ShardTypes> for ShardStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<ShardTypes>, StorageError> {
        let this = self.clone();
        crate::determinism::blocking(move || this.build_blocking())
            .await
            .map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?
    }
}

impl RaftStateMachine<ShardTypes> for ShardStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.read_applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ShardApplied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let empty = WriteSet::default();
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else { return Ok(Vec::new()) };
        let mut membership = None;
        let mut batch = Vec::with_capacity(entries.len());
        let mut outcomes = Vec::with_capacity(entries.len());
        for entry in &entries {
            let index = store_index(Some(&entry.log_id));
            let entry_term = entry.log_id.leader_id.term;
            match &entry.payload {
                EntryPayload::Normal(w) if w.admits(entry_term) => {
                    batch.push((index, &w.ws));
                    outcomes.push(ShardApplied::Applied);
                }
                EntryPayload::Normal(_) => {
                    batch.push((index, &empty));
                    outcomes.push(ShardApplied::Fenced { entry_term });
                }
                EntryPayload::Blank => {
                    batch.push((index, &empty));
                    outcomes.push(ShardApplied::Applied);
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                    batch.push((index, &empty));
                    outcomes.push(ShardApplied::Applied);
                }
            }
        }
        let mut meta = vec![(LAST_APPLIED_KEY, encode(&Some(last), ErrorSubject::Apply(last))?)];
        if let Some(m) = &membership {
            meta.push((MEMBERSHIP_KEY, encode(m, ErrorSubject::Apply(last))?));
        }
        self.store
            .apply_with_meta(&batch, &meta)
            .map_err(|e| storage_err(ErrorSubject::Apply(last), ErrorVerb::Write, e))?;
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let this = self.clone();
        let meta = meta.clone();
        let data = snapshot.into_inner();
        crate::determinism::blocking(move || {
            this.replace_state(&meta, &data)?;
            this.save_snapshot(StoredSnapshot { meta, data })
        })
        .await
        .map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<ShardTypes>>, StorageError> {
        Ok(self
            .lock_current()?
            .as_ref()
            .map(|s| Snapshot { meta: s.meta.clone(), snapshot: Box::new(Cursor::new(s.data.clone())) }))
    }
}
