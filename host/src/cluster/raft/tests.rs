//! openraft's storage conformance suite over `WalLogStore` and
//! `ShardStateMachine`, plus restart and snapshot checks of our own.

use super::*;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{RaftLogReader, RaftSnapshotBuilder};
use std::sync::Arc;
use std::time::Duration;

/// Opens a fresh log and state machine in a temporary directory; the
/// directory (and the sled database) live as long as the returned guard.
struct TempStores;

struct Guard {
    _dir: tempfile::TempDir,
}

/// The shard under test shares its node WAL with a neighbour that has
/// entries of its own, so every check below also checks that the groups'
/// logs stay apart.
fn open_stores(dir: &std::path::Path) -> (WalLogStore, ShardStateMachine) {
    let wal = NodeWal::open(&dir.join("wal"), NodeWalOptions::new(Duration::from_micros(100))).unwrap();
    let neighbour = 9;
    wal.open_shard(neighbour).unwrap();
    if wal.log_state(neighbour).unwrap().1.is_none() {
        let records = (0..3).map(|i| (((1, 1), i), vec![i as u8; 10])).collect();
        wal.append(neighbour, records, false, None).unwrap();
    }
    let log = WalLogStore::open(&wal, 0).unwrap();
    let sled_dir = dir.join("sled");
    let db = sled::Config::new().path(&sled_dir).open().unwrap();
    // Nothing reaches sled unless something needs it there (a snapshot, a
    // persist, a drop): every read here goes through the apply buffer.
    let store = crate::storage::SledStore::in_db(&db, "shard-0", &sled_dir)
        .unwrap()
        .with_apply_buffer(crate::storage::conformance::UNBOUNDED);
    let sm = ShardStateMachine::open(Arc::new(store), &dir.join("sm")).unwrap();
    (log, sm)
}

impl StoreBuilder<ShardTypes, WalLogStore, ShardStateMachine, Guard> for TempStores {
    async fn build(&self) -> Result<(Guard, WalLogStore, ShardStateMachine), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let (log, sm) = open_stores(dir.path());
        Ok((Guard { _dir: dir }, log, sm))
    }
}

type S = Suite<ShardTypes, WalLogStore, ShardStateMachine, TempStores, Guard>;

#[tokio::test]
async fn wal_log_and_sled_state_machine_pass_openraft_suite() {
    let mut failed = Vec::new();
    macro_rules! run {
        ($($name:ident)*) => {$(
            let (_g, log, sm) = TempStores.build().await.unwrap();
            if let Err(e) = S::$name(log, sm).await { failed.push(format!("{}: {e}", stringify!($name))); }
        )*};
    }
    run!(last_membership_in_log_initial last_membership_in_log last_membership_in_log_multi_step get_membership_initial get_membership_from_log_and_empty_sm get_membership_from_empty_log_and_sm get_membership_from_log_le_sm_last_applied get_membership_from_log_gt_sm_last_applied_1 get_membership_from_log_gt_sm_last_applied_2 get_initial_state_without_init get_initial_state_with_state get_initial_state_last_log_gt_sm get_initial_state_last_log_lt_sm get_initial_state_log_ids get_initial_state_re_apply_committed save_vote get_log_entries limited_get_log_entries try_get_log_entry initial_logs get_log_state get_log_id last_id_in_log last_applied_state purge_logs_upto_0 purge_logs_upto_5 purge_logs_upto_20 delete_logs_since_11 delete_logs_since_0 append_to_log snapshot_meta apply_single apply_multiple);
    S::transfer_snapshot(&TempStores).await.unwrap();
    assert!(failed.is_empty(), "{failed:#?}");
}

/// The one suite case left out above, `get_initial_state_membership_from_log_and_sm`,
/// appends index 1 after openraft's start-up purged the log up to index 2,
/// something a running Raft never does. raft-log refuses to move a log
/// backwards, and that refusal is worth keeping: this test pins it.
#[tokio::test]
async fn the_wal_refuses_to_append_behind_its_purge_point() {
    let (_g, mut log, _) = TempStores.build().await.unwrap();
    log.purge(LogId::new(openraft::CommittedLeaderId::new(1, 0), 2)).await.unwrap();
    let err = openraft::storage::RaftLogStorageExt::blocking_append(&mut log, [entry(1, 1, put("k", "v"))])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not consecutive"), "{err}");
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.unwrap().index, 2);
}

fn put(key: &str, value: &str) -> WriteSet {
    WriteSet {
        ops: vec![crate::model::Op::Put {
            keyspace: crate::model::Keyspace::State,
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }],
    }
}

fn entry(term: u64, index: u64, ws: WriteSet) -> Entry {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
        payload: openraft::EntryPayload::Normal(ws.into()),
    }
}

#[tokio::test]
async fn log_vote_state_and_snapshot_survive_reopen() {
    use crate::storage::StateStore;
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, mut sm) = open_stores(dir.path());
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(3, i, put(&format!("k{i}"), "v"))).collect();
        // Appended through the same path openraft uses, then waited for.
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, entries.clone()).await.unwrap();
        sm.apply(entries[..3].to_vec()).await.unwrap();
        let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.unwrap().index, 3);
        sm.apply(entries[3..].to_vec()).await.unwrap();
        log.purge(snap.meta.last_log_id.unwrap()).await.unwrap();
    }
    let (mut log, mut sm) = open_stores(dir.path());
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.unwrap().index, 3);
    assert_eq!(state.last_log_id.unwrap().index, 5);
    let rest = log.try_get_log_entries(0..10).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(rest[0].payload, openraft::EntryPayload::Normal(put("k4", "v").into()));
    // The snapshot is the current one after a restart, with its data.
    let current = sm.get_current_snapshot().await.unwrap().expect("snapshot survives restart");
    assert_eq!(current.meta.last_log_id.unwrap().index, 3);
    let (applied, _) = sm.applied_state().await.unwrap();
    // sled was persisted at the snapshot; later applies may or may not have
    // reached disk, so the applied index is at least the snapshot's.
    assert!(applied.unwrap().index >= 3);
    assert_eq!(sm.store().get(crate::model::Keyspace::State, b"k2").unwrap().as_deref(), Some(&b"v"[..]));
}

#[tokio::test]
async fn installing_a_snapshot_replaces_the_data() {
    use crate::storage::StateStore;
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (_, mut leader) = open_stores(a.path());
    let (_, mut follower) = open_stores(b.path());
    leader.apply(vec![entry(1, 1, put("x", "1")), entry(1, 2, put("y", "2"))]).await.unwrap();
    follower.apply(vec![entry(1, 1, put("stale", "gone"))]).await.unwrap();
    let snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    follower.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    let store = follower.store();
    assert_eq!(store.get(crate::model::Keyspace::State, b"y").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(store.get(crate::model::Keyspace::State, b"stale").unwrap(), None);
    // The store counts from 1: raft index 2 is store index 3.
    assert_eq!(store.applied_index().unwrap(), 3);
    assert_eq!(follower.applied_state().await.unwrap().0.unwrap().index, 2);
}

fn del(key: &str) -> WriteSet {
    WriteSet {
        ops: vec![crate::model::Op::Delete { keyspace: crate::model::Keyspace::State, key: key.as_bytes().to_vec() }],
    }
}

fn state_of(sm: &ShardStateMachine) -> Vec<(Vec<u8>, Vec<u8>)> {
    use crate::storage::StateStore;
    sm.store().scan(crate::model::Keyspace::State, b"", None, usize::MAX).unwrap()
}

/// openraft asks for a builder between two applies and builds beside the
/// applies that follow: the snapshot is the state at the last log id
/// applied when the builder was taken, whatever is applied while it is
/// built. (A builder that read the store when it ran instead held the apply
/// lock for its whole scan, stalling every commit meanwhile.)
#[tokio::test]
async fn a_snapshot_is_the_state_when_its_builder_was_taken_whatever_is_applied_meanwhile() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (_, mut sm) = open_stores(a.path());
    sm.apply(vec![entry(1, 1, put("k1", "v1")), entry(1, 2, put("k2", "v1")), entry(1, 3, put("k3", "v1"))])
        .await
        .unwrap();
    let at_builder = state_of(&sm);
    let mut builder = sm.get_snapshot_builder().await;
    sm.apply(vec![entry(1, 4, put("k1", "v2")), entry(1, 5, del("k2")), entry(1, 6, put("k9", "v1"))]).await.unwrap();
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.unwrap().index, 3, "the snapshot is at the builder's log id");
    assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);

    let (_, mut other) = open_stores(b.path());
    other.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(state_of(&other), at_builder, "the snapshot holds exactly the state at its log id");
    assert_eq!(other.applied_state().await.unwrap().0.unwrap().index, 3);
    assert_eq!(state_of(&sm).len(), 3, "the builder changed nothing");
}

/// A crash after a received snapshot file was published but before the
/// store was replaced from it leaves the file ahead of the store: opening
/// the replica installs it (streaming from the file).
#[tokio::test]
async fn a_snapshot_file_ahead_of_the_store_is_installed_on_open() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (_, mut leader) = open_stores(a.path());
    leader.apply((1..=50).map(|i| entry(1, i, put(&format!("k{i}"), "v"))).collect::<Vec<_>>()).await.unwrap();
    leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    {
        let (_, mut behind) = open_stores(b.path());
        behind.apply(vec![entry(1, 1, put("stale", "x"))]).await.unwrap();
    }
    std::fs::copy(a.path().join("sm").join("snapshot.bin"), b.path().join("sm").join("snapshot.bin")).unwrap();
    // Leftovers of a half-received snapshot are removed.
    std::fs::write(b.path().join("sm").join(".snapshot-half"), b"partial").unwrap();
    let (_, mut reopened) = open_stores(b.path());
    assert_eq!(state_of(&reopened), state_of(&leader));
    assert_eq!(reopened.applied_state().await.unwrap().0.unwrap().index, 50);
    assert!(!b.path().join("sm").join(".snapshot-half").exists());
}

/// Replication reads a bounded batch: a follower catching up from large
/// entries gets them a few at a time, and one entry larger than the bound
/// still goes alone.
#[tokio::test]
async fn replication_reads_at_most_max_append_bytes_but_never_nothing() {
    let (_g, mut log, _) = TempStores.build().await.unwrap();
    let big = "x".repeat(100 * 1024);
    let huge = "y".repeat(super::log_store::MAX_APPEND_BYTES * 2);
    let mut entries: Vec<Entry> = (1..=6).map(|i| entry(1, i, put(&format!("k{i}"), &big))).collect();
    entries.push(entry(1, 7, put("huge", &huge)));
    openraft::storage::RaftLogStorageExt::blocking_append(&mut log, entries).await.unwrap();
    let indexes = |es: Vec<Entry>| es.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
    // 100 KiB entries: two fit in 256 KiB, a third does not.
    assert_eq!(indexes(log.limited_get_log_entries(1, 8).await.unwrap()), [1, 2]);
    assert_eq!(indexes(log.limited_get_log_entries(5, 8).await.unwrap()), [5, 6]);
    assert_eq!(indexes(log.limited_get_log_entries(7, 8).await.unwrap()), [7]);
    assert_eq!(indexes(log.try_get_log_entries(1..8).await.unwrap()).len(), 7, "the unlimited read is whole");
}

/// A fenced write set applies only in an entry of the term it names; in any
/// other it is skipped (the index still advances), and every replica, which
/// decides from the entry alone, skips it alike.
#[tokio::test]
async fn a_fenced_write_set_applies_only_in_its_own_term() {
    use crate::model::Keyspace;
    use crate::storage::StateStore;
    let (_g, _log, mut sm) = TempStores.build().await.unwrap();
    let fenced = |term: u64, index: u64, key: &str, fence_term: u64| Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
        payload: openraft::EntryPayload::Normal(ShardWrite { ws: put(key, "v"), fence_term: Some(fence_term) }),
    };
    let outcomes = sm
        .apply([fenced(2, 1, "same-term", 2), fenced(3, 2, "stale", 2), entry(3, 3, put("unfenced", "v"))])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![ShardApplied::Applied, ShardApplied::Fenced { entry_term: 3 }, ShardApplied::Applied]);
    let store = sm.store();
    assert!(store.get(Keyspace::State, b"same-term").unwrap().is_some());
    assert!(store.get(Keyspace::State, b"stale").unwrap().is_none(), "a write fenced by another term was applied");
    assert!(store.get(Keyspace::State, b"unfenced").unwrap().is_some());
    assert_eq!(store.applied_index().unwrap(), 4, "the skipped entry still counts as applied");
}

/// A conditional write set (compare-and-set) applies only if its expected
/// value is what the store holds at its place in the log, counting the
/// entries applied before it in the same call; a failed one is skipped whole
/// and named, so of two changes planned from the same read exactly one wins,
/// and a retried proposal that already applied finds its own value.
#[tokio::test]
async fn a_conditional_write_set_applies_only_if_its_expectation_holds() {
    use crate::model::{Keyspace, Op};
    use crate::storage::StateStore;
    let (_g, _log, mut sm) = TempStores.build().await.unwrap();
    let cas = |expected: Option<&str>, new: &str| WriteSet {
        ops: vec![
            Op::Expect { keyspace: Keyspace::Registry, key: b"rec".to_vec(), value: expected.map(|v| v.into()) },
            Op::Put { keyspace: Keyspace::Registry, key: b"rec".to_vec(), value: new.into() },
            Op::Put { keyspace: Keyspace::Registry, key: format!("by-{new}").into_bytes(), value: vec![] },
        ],
    };
    // Two changes planned from "nothing", one planned from "a": in one apply
    // call, the first wins, the second conflicts, the third sees the first.
    let outcomes = sm
        .apply([entry(1, 1, cas(None, "a")), entry(1, 2, cas(None, "b")), entry(1, 3, cas(Some("a"), "c"))])
        .await
        .unwrap();
    let conflict = ShardApplied::Conflict { key: b"rec".to_vec() };
    assert_eq!(outcomes, vec![ShardApplied::Applied, conflict.clone(), ShardApplied::Applied]);
    // Across apply calls the store decides: a retry of "a → c" conflicts.
    assert_eq!(sm.apply([entry(1, 4, cas(Some("a"), "c"))]).await.unwrap(), vec![conflict]);
    let store = sm.store();
    assert_eq!(store.get(Keyspace::Registry, b"rec").unwrap().as_deref(), Some(&b"c"[..]));
    assert!(store.get(Keyspace::Registry, b"by-b").unwrap().is_none(), "a conflicting write set applied in part");
    assert!(store.get(Keyspace::Registry, b"by-a").unwrap().is_some());
    assert_eq!(store.applied_index().unwrap(), 5, "a conflicting entry still counts as applied");
}

/// A replica whose store lost its apply buffer in a crash finds in sled an
/// older state that agrees with itself (data, Raft's last applied log id and
/// the applied index of one moment), and gets every lost entry back from its
/// log when it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_a_crash_took_from_the_apply_buffer_are_applied_again_on_restart() {
    use crate::log::CommitLog;
    use crate::model::Keyspace;
    use crate::storage::StateStore;
    let dir = tempfile::tempdir().unwrap();
    let config = crate::log::LogConfig::default();
    let written_at = {
        let log = super::open_solo_with(dir.path(), &config, crate::storage::conformance::UNBOUNDED).await.unwrap();
        for i in 0..5 {
            log.propose(put(&format!("early{i}"), "v")).await.unwrap();
        }
        log.store().write_out().unwrap();
        let written_at = log.store().applied_index().unwrap();
        for i in 0..20 {
            log.propose(put(&format!("late{i}"), "v")).await.unwrap();
        }
        assert!(log.store().get(Keyspace::State, b"late19").unwrap().is_some());
        assert!(log.store().applied_index().unwrap() >= written_at + 20);
        log.store().close_discarding();
        log.shutdown().await.unwrap();
        written_at
    };
    {
        // What sled holds: the state at the last write, whole.
        let sled_dir = dir.path().join("state");
        let db = sled::Config::new().path(&sled_dir).open().unwrap();
        let store = crate::storage::SledStore::in_db(&db, "shard-0", &sled_dir).unwrap();
        assert_eq!(store.applied_index().unwrap(), written_at);
        let last: Option<LogId> =
            postcard::from_bytes(&store.get_meta(b"\0raft_last_applied").unwrap().unwrap()).unwrap();
        assert_eq!(last.map(|id| id.index + 1), Some(written_at), "raft's applied log id agrees with the store's");
        let keys = store.scan(Keyspace::State, b"", None, 100).unwrap();
        assert_eq!(keys.len(), 5, "the five early keys, none of the late: {keys:?}");
    }
    let log = super::open_solo(dir.path(), &config).await.unwrap();
    for i in 0..20 {
        let key = format!("late{i}");
        assert!(log.store().get(Keyspace::State, key.as_bytes()).unwrap().is_some(), "{key} was not applied again");
    }
    log.shutdown().await.unwrap();
}

/// A replica written before the node WAL (its own raft-log WAL in
/// `shards/<n>/wal`) is moved into the node WAL, vote, purge point and
/// entries, and its old directory goes.
#[tokio::test]
async fn a_replica_wal_of_the_older_layout_is_moved_into_the_node_wal() {
    use raft_log::api::raft_log_writer::RaftLogWriter;
    let dir = tempfile::tempdir().unwrap();
    let old_dir = dir.path().join("shards").join("3").join("wal");
    std::fs::create_dir_all(&old_dir).unwrap();
    let entries: Vec<Entry> = (0..6).map(|i| entry(2, i, put(&format!("k{i}"), "v"))).collect();
    {
        let mut old = log_store::legacy::open(&old_dir).unwrap();
        old.save_vote(((2, 1), true)).unwrap();
        let records = entries.iter().map(|e| {
            (
                ((e.log_id.leader_id.term, e.log_id.leader_id.node_id), e.log_id.index),
                postcard::to_allocvec(&e.payload).unwrap(),
            )
        });
        old.append(records).unwrap();
        old.purge(((2, 1), 1)).unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        old.flush(true, Some(log_store::Flushed::Block(tx))).unwrap();
        rx.recv().unwrap().unwrap();
    }
    let wal = NodeWal::open(&dir.path().join("wal"), NodeWalOptions::new(Duration::from_micros(100))).unwrap();
    assert_eq!(log_store::legacy::import(&wal, 3, &old_dir).unwrap(), 4);
    assert!(!old_dir.exists(), "the old WAL directory is deleted once moved");
    let mut log = WalLogStore::open(&wal, 3).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(2, 1)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
    assert_eq!(log.try_get_log_entries(0..10).await.unwrap(), entries[2..].to_vec());
}
