//! `ShardStateMachine`: openraft's `RaftStateMachine` for one shard replica,
//! on a `SledStore` tree. Applying an entry applies its write set (blank and
//! membership entries apply nothing but advance the index) and, with the
//! same atomicity, records the last applied log id and membership, so data
//! and raft metadata can never disagree after a crash: the store buffers
//! applies in memory and writes data, meta and applied index to sled only
//! together, in one batch (see `storage::SledStore`).
//!
//! Snapshots stream: a snapshot is a file (see [`super::snapshot_file`]),
//! built from a point-in-time view of the store taken when openraft asks for
//! a builder (between two applies, so exactly the state at the last applied
//! log id) and written pair by pair while applies go on; it is sent to a
//! follower in chunks read from the file, received into a file, and
//! installed pair by pair. No step holds the shard in memory or the apply
//! lock for a scan.
//!
//! Durability: sled is not synced per apply, nor even written per apply (the
//! store's apply buffer); the raft log is the durability boundary and
//! openraft re-applies what sled lost or never got. Two moments need the
//! store itself durable, because the log behind them is purged: building a
//! snapshot (sled is persisted before the snapshot file is published) and
//! installing one (the received file is made durable and published first,
//! then the store is replaced from it and persisted; a crash in between
//! leaves the file ahead of the store, and opening the replica installs it
//! again). Files are published atomically: fsync, rename, fsync directory.

use super::snapshot_file::{self, SnapshotFile, SnapshotReader, SnapshotWriter};
use super::{
    Entry, LogId, NodeId, ShardApplied, ShardTypes, SnapshotMeta, StorageError, StoredMembership, storage_err,
};
use crate::model::WriteSet;
use crate::storage::{PointInTime, SledStore, StateStore};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot};
use serde::{Deserialize, Serialize};
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

/// A snapshot file as written before snapshots streamed: meta and data
/// (a postcard `LegacyData`) in one postcard record.
#[derive(Serialize, Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct LegacyData {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The state machine of one shard replica. Clones share everything.
#[derive(Clone)]
pub struct ShardStateMachine {
    store: Arc<SledStore>,
    dir: PathBuf,
    /// The meta of the snapshot in `dir/SNAPSHOT_FILE`, if any. Held while
    /// that file is replaced or opened, so a reader opens the file it names.
    current: Arc<Mutex<Option<SnapshotMeta>>>,
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
    /// Wraps `store` (the shard's tree) and finds the last snapshot in
    /// `dir`. If the snapshot is ahead of the store (a crash during an
    /// install), the snapshot is installed again.
    pub fn open(store: Arc<SledStore>, dir: &Path) -> Result<Self, StorageError> {
        let err = |verb| move |e: std::io::Error| storage_err(ErrorSubject::Snapshot(None), verb, e);
        crate::storage::durable_file::create_dir_all_durably(dir).map_err(err(ErrorVerb::Write))?;
        // Files a crash left half-written or half-received.
        for entry in std::fs::read_dir(dir).map_err(err(ErrorVerb::Read))? {
            let entry = entry.map_err(err(ErrorVerb::Read))?;
            if entry.file_name().to_string_lossy().starts_with(snapshot_file::TEMP_PREFIX) {
                std::fs::remove_file(entry.path()).map_err(err(ErrorVerb::Delete))?;
            }
        }
        let sm = Self { store, dir: dir.to_path_buf(), current: Arc::new(Mutex::new(None)) };
        let path = dir.join(SNAPSHOT_FILE);
        match std::fs::File::open(&path) {
            Ok(file) => {
                let reader = match SnapshotReader::new(file) {
                    Ok(reader) => reader,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        sm.convert_legacy(&path, &e)?;
                        SnapshotReader::new(std::fs::File::open(&path).map_err(err(ErrorVerb::Read))?)
                            .map_err(err(ErrorVerb::Read))?
                    }
                    Err(e) => return Err(err(ErrorVerb::Read)(e)),
                };
                let meta = reader.meta().clone();
                let applied = sm.store.applied_index().map_err(sm_err(ErrorVerb::Read))?;
                if store_index(meta.last_log_id.as_ref()) > applied {
                    sm.load_store(reader)?;
                }
                *sm.lock_current()? = Some(meta);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(ErrorVerb::Read)(e)),
        }
        Ok(sm)
    }

    /// Rewrites a snapshot file of the format before snapshots streamed
    /// (meta and all pairs in one postcard record) in the current format.
    /// It is read whole, once, on the first start after the upgrade.
    fn convert_legacy(&self, path: &Path, why: &std::io::Error) -> Result<(), StorageError> {
        let err = |e: &dyn std::fmt::Display| {
            storage_err(
                ErrorSubject::Snapshot(None),
                ErrorVerb::Read,
                format!("{}: {why}; nor is it an older snapshot file: {e}", path.display()),
            )
        };
        let bytes = std::fs::read(path).map_err(|e| err(&e))?;
        let legacy: LegacySnapshot = postcard::from_bytes(&bytes).map_err(|e| err(&e))?;
        let data: LegacyData = postcard::from_bytes(&legacy.data).map_err(|e| err(&e))?;
        let (file, temp) = snapshot_file::temp_file_in(&self.dir).map_err(|e| err(&e))?.into_parts();
        let mut writer = SnapshotWriter::new(file, &legacy.meta).map_err(|e| err(&e))?;
        for (k, v) in &data.pairs {
            writer.record(k, v).map_err(|e| err(&e))?;
        }
        writer.finish().map_err(|e| err(&e))?;
        crate::storage::durable_file::publish(temp, path).map_err(|e| err(&e))
    }

    /// The shard's data, for reads by the node that leads it.
    pub fn store(&self) -> &Arc<SledStore> {
        &self.store
    }

    fn lock_current(&self) -> Result<std::sync::MutexGuard<'_, Option<SnapshotMeta>>, StorageError> {
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

    /// Replaces the store's content with a snapshot file's, pair by pair,
    /// and makes it durable. The file must already be durable in place: a
    /// crash midway leaves the store behind it, to be redone on open.
    fn load_store<R: std::io::Read>(&self, reader: SnapshotReader<R>) -> Result<(), StorageError> {
        let meta = reader.meta().clone();
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let applied_meta = [
            (LAST_APPLIED_KEY, encode(&meta.last_log_id, subject.clone())?),
            (MEMBERSHIP_KEY, encode(&meta.last_membership, subject.clone())?),
        ];
        let pairs = reader.map(|pair| {
            pair.map_err(|e| crate::storage::StorageError::Corrupt(format!("snapshot {}: {e}", meta.snapshot_id)))
        });
        self.store
            .replace_from(pairs, store_index(meta.last_log_id.as_ref()), &applied_meta)
            .map_err(|e| storage_err(subject.clone(), ErrorVerb::Write, e))?;
        self.store.persist().map_err(|e| storage_err(subject, ErrorVerb::Write, e))
    }

    /// Makes the durable temporary file `temp` the current snapshot, unless
    /// (and `force` is off) the current one is at least as recent. Returns
    /// the current snapshot's meta.
    fn publish(
        &self,
        temp: tempfile::TempPath,
        meta: &SnapshotMeta,
        force: bool,
    ) -> Result<SnapshotMeta, StorageError> {
        let err = |e: std::io::Error| storage_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write, e);
        let mut current = self.lock_current()?;
        if let Some(c) = current.as_ref().filter(|c| !force && c.last_log_id >= meta.last_log_id) {
            // `temp` is removed when dropped.
            return Ok(c.clone());
        }
        crate::storage::durable_file::publish(temp, &self.dir.join(SNAPSHOT_FILE)).map_err(err)?;
        *current = Some(meta.clone());
        Ok(meta.clone())
    }

    /// The current snapshot, opened for reading.
    fn current_snapshot(&self) -> Result<Option<Snapshot<ShardTypes>>, StorageError> {
        let current = self.lock_current()?;
        let Some(meta) = current.as_ref() else { return Ok(None) };
        let file = SnapshotFile::open(&self.dir.join(SNAPSHOT_FILE))
            .map_err(|e| storage_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e))?;
        Ok(Some(Snapshot { meta: meta.clone(), snapshot: Box::new(file) }))
    }

    /// Writes the snapshot of `view` to a file and publishes it. A view
    /// superseded by an install yields the installed snapshot instead, which
    /// is newer: openraft ignores a build that is not.
    fn build_blocking(&self, view: PointInTime) -> Result<Snapshot<ShardTypes>, StorageError> {
        let last_log_id: Option<LogId> = match &view.meta[0] {
            Some(bytes) => decode(bytes, ErrorSubject::StateMachine)?,
            None => None,
        };
        let last_membership: StoredMembership = match &view.meta[1] {
            Some(bytes) => decode(bytes, ErrorSubject::StateMachine)?,
            None => StoredMembership::default(),
        };
        let snapshot_id = format!(
            "{}-{}-{}",
            last_log_id.map_or(0, |id| id.leader_id.term),
            last_log_id.map_or(0, |id| id.index),
            crate::model::unix_ms()
        );
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let io_err = |e: std::io::Error| storage_err(subject.clone(), ErrorVerb::Write, e);
        let (file, temp) = snapshot_file::temp_file_in(&self.dir).map_err(io_err)?.into_parts();
        let mut writer = SnapshotWriter::new(file, &meta).map_err(io_err)?;
        let scanned = view.scan(|k, v| {
            writer.record(k, v).map_err(|e| crate::storage::StorageError::Io {
                context: "writing snapshot",
                path: temp.to_path_buf(),
                source: e,
            })
        });
        drop(view);
        match scanned {
            Ok(_) => {}
            Err(crate::storage::StorageError::Superseded) => {
                if let Some(current) = self.current_snapshot()? {
                    return Ok(current);
                }
                // An install publishes its file before it supersedes views,
                // so this is not reached; an empty meta is ignored anyway.
                let snapshot = Box::new(SnapshotFile::open(&temp).map_err(io_err)?);
                return Ok(Snapshot { meta: SnapshotMeta::default(), snapshot });
            }
            Err(e) => return Err(storage_err(subject, ErrorVerb::Read, e)),
        }
        writer.finish().map_err(io_err)?;
        // Everything up to the snapshot must be durable in sled before
        // openraft purges the log behind it.
        self.store.persist().map_err(sm_err(ErrorVerb::Write))?;
        self.publish(temp, &meta, false)?;
        self.current_snapshot()?.ok_or_else(|| storage_err(subject, ErrorVerb::Read, "the published snapshot is gone"))
    }

    /// Publishes a received snapshot file and replaces the store from it.
    /// `file` may be a temporary file in this replica's directory (received
    /// here; it is moved into place) or any snapshot file (copied first).
    fn install_blocking(
        &self,
        meta: &SnapshotMeta,
        mut file: std::fs::File,
        temp: Option<tempfile::TempPath>,
    ) -> Result<(), StorageError> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let io_err = |e: std::io::Error| storage_err(subject.clone(), ErrorVerb::Write, e);
        let temp = match temp.filter(|t| t.parent() == Some(self.dir.as_path())) {
            Some(temp) => {
                file.sync_all().map_err(io_err)?;
                temp
            }
            None => {
                let (mut copy, temp) = snapshot_file::temp_file_in(&self.dir).map_err(io_err)?.into_parts();
                std::io::copy(&mut file, &mut copy).map_err(io_err)?;
                copy.sync_all().map_err(io_err)?;
                temp
            }
        };
        let found = snapshot_file::validate(&temp).map_err(io_err)?;
        if found.last_log_id != meta.last_log_id || found.snapshot_id != meta.snapshot_id {
            return Err(storage_err(
                subject,
                ErrorVerb::Read,
                format!("the received file holds snapshot {found}, not {meta}"),
            ));
        }
        // Opened before the rename: the handle reads this file whatever
        // replaces it later.
        let data = std::fs::File::open(&temp).map_err(io_err)?;
        self.publish(temp, meta, true)?;
        self.load_store(SnapshotReader::new(data).map_err(io_err)?)
    }
}

/// Builds a snapshot from the view its state machine took when openraft
/// asked for the builder (see [`RaftStateMachine::get_snapshot_builder`]).
pub struct ShardSnapshotBuilder {
    sm: ShardStateMachine,
    view: Option<Result<PointInTime, crate::storage::StorageError>>,
}

impl RaftSnapshotBuilder<ShardTypes> for ShardSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<ShardTypes>, StorageError> {
        let view = self
            .view
            .take()
            .ok_or_else(|| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, "a builder builds once"))?
            .map_err(sm_err(ErrorVerb::Read))?;
        let sm = self.sm.clone();
        crate::determinism::blocking(move || sm.build_blocking(view))
            .await
            .map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?
    }
}

impl ShardStateMachine {
    /// The key of the first precondition ([`crate::model::Op::Expect`]) of
    /// `ws` that does not hold, if any: against the store as `earlier` (the
    /// write sets of this apply call before `ws`, not in the store yet)
    /// leave it. Every replica applies the same entries in the same order
    /// onto the same state, so all decide alike.
    fn failed_expectation(
        &self,
        earlier: &[(crate::model::LogIndex, &WriteSet)],
        ws: &WriteSet,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        use crate::model::Op;
        for op in &ws.ops {
            let Op::Expect { keyspace, key, value } = op else { continue };
            let pending = earlier.iter().rev().flat_map(|(_, w)| w.ops.iter().rev()).find_map(|o| match o {
                Op::Put { keyspace: k, key: kk, value } if k == keyspace && kk == key => Some(Some(value.clone())),
                Op::Delete { keyspace: k, key: kk } if k == keyspace && kk == key => Some(None),
                _ => None,
            });
            let current = match pending {
                Some(v) => v,
                None => self
                    .store
                    .get(*keyspace, key)
                    .map_err(|e| storage_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?,
            };
            if current != *value {
                return Ok(Some(key.clone()));
            }
        }
        Ok(None)
    }
}

impl RaftStateMachine<ShardTypes> for ShardStateMachine {
    type SnapshotBuilder = ShardSnapshotBuilder;

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
                EntryPayload::Normal(w) if w.admits(entry_term) => match self.failed_expectation(&batch, &w.ws)? {
                    None => {
                        batch.push((index, &w.ws));
                        outcomes.push(ShardApplied::Applied);
                    }
                    Some(key) => {
                        batch.push((index, &empty));
                        outcomes.push(ShardApplied::Conflict { key });
                    }
                },
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

    /// Called between two applies: the view it opens is exactly the state
    /// at the last applied log id, and later applies do not change it.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let view = self.store.point_in_time(&[LAST_APPLIED_KEY, MEMBERSHIP_KEY]);
        ShardSnapshotBuilder { sm: self.clone(), view: Some(view) }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        let file = SnapshotFile::temp_in(&self.dir)
            .map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<SnapshotFile>) -> Result<(), StorageError> {
        let (file, temp) = snapshot
            .into_parts()
            .await
            .map_err(|e| storage_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e))?;
        let this = self.clone();
        let meta = meta.clone();
        crate::determinism::blocking(move || this.install_blocking(&meta, file, temp))
            .await
            .map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<ShardTypes>>, StorageError> {
        self.current_snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica upgraded from a version whose snapshot file held everything
    /// in one record starts: the file is rewritten in the streamed format
    /// and, being ahead of the store, installed.
    #[test]
    fn a_snapshot_file_of_the_older_format_is_converted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let sm_dir = dir.path().join("sm");
        std::fs::create_dir_all(&sm_dir).unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(2, 1), 4)),
            last_membership: StoredMembership::default(),
            snapshot_id: "2-4-0".into(),
        };
        let pairs = vec![(b"\x01a".to_vec(), b"1".to_vec()), (b"\x01b".to_vec(), b"2".to_vec())];
        let data = postcard::to_allocvec(&LegacyData { pairs }).unwrap();
        let legacy = postcard::to_allocvec(&LegacySnapshot { meta: meta.clone(), data }).unwrap();
        std::fs::write(sm_dir.join(SNAPSHOT_FILE), legacy).unwrap();
        let db = sled::Config::new().path(dir.path().join("sled")).open().unwrap();
        let store = Arc::new(SledStore::in_db(&db, "shard-0", &dir.path().join("sled")).unwrap());
        let sm = ShardStateMachine::open(store, &sm_dir).unwrap();
        assert_eq!(snapshot_file::validate(&sm_dir.join(SNAPSHOT_FILE)).unwrap(), meta);
        assert_eq!(sm.lock_current().unwrap().clone(), Some(meta));
        assert_eq!(sm.store().get(crate::model::Keyspace::State, b"b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(sm.store().applied_index().unwrap(), 5);
        // Garbage is neither format: an error, not a lost snapshot.
        std::fs::write(sm_dir.join(SNAPSHOT_FILE), b"garbage").unwrap();
        let store = Arc::new(SledStore::in_db(&db, "shard-1", &dir.path().join("sled")).unwrap());
        assert!(ShardStateMachine::open(store, &sm_dir).is_err());
    }
}
