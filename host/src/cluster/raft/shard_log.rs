//! `ShardLog`: the `CommitLog` of one shard replica, so the scheduler commits
//! a turn's write set through Raft exactly as it does through `LocalLog`. A
//! proposal resolves once the entry is committed by a majority and applied
//! to this replica's store; only the leader accepts proposals.
//!
//! Indexes are the store's: raft index + 1 (see `state_machine`). Unlike
//! `LocalLog`, they are not contiguous per proposal: leader changes and
//! membership changes add entries of their own.

use super::{ClientWriteError, Replica};
use crate::log::{CommitLog, LogError, LogStats};
use crate::model::{LogIndex, WriteSet};
use crate::storage::StateStore;
use futures::future::BoxFuture;
use openraft::error::RaftError;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct ShardLog {
    replica: Replica,
    proposals: Arc<AtomicU64>,
}

impl std::fmt::Debug for ShardLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardLog").field("shard", &self.replica.shard).finish_non_exhaustive()
    }
}

impl ShardLog {
    pub fn new(replica: Replica) -> Self {
        Self { replica, proposals: Arc::new(AtomicU64::new(0)) }
    }
}

fn log_error(e: RaftError<super::NodeId, ClientWriteError>) -> LogError {
    if let Some(f) = e.forward_to_leader::<openraft::BasicNode>() {
        return LogError::NotLeader { leader: f.leader_id };
    }
    match e {
        RaftError::Fatal(openraft::error::Fatal::Stopped) => LogError::ShutDown,
        e => LogError::Aborted(e.to_string()),
    }
}

impl CommitLog for ShardLog {
    fn propose(&self, ws: WriteSet) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        let raft = self.replica.raft.clone();
        let proposals = self.proposals.clone();
        Box::pin(async move {
            let resp = raft.client_write(ws).await.map_err(log_error)?;
            proposals.fetch_add(1, Ordering::Relaxed);
            // client_write answers after this replica applied the entry.
            Ok(resp.log_id.index + 1)
        })
    }

    /// What this replica has applied: an applied entry is committed, so on
    /// a majority of disks.
    fn last_durable_index(&self) -> LogIndex {
        self.applied_index()
    }

    fn applied_index(&self) -> LogIndex {
        self.replica.state.store().applied_index().unwrap_or(0)
    }

    fn stats(&self) -> LogStats {
        LogStats { proposals: self.proposals.load(Ordering::Relaxed), ..LogStats::default() }
    }

    fn shutdown(&self) -> BoxFuture<'static, Result<(), LogError>> {
        let replica = self.replica.clone();
        Box::pin(async move {
            replica.raft.shutdown().await.map_err(|e| LogError::Aborted(e.to_string()))?;
            replica.state.store().persist().map_err(LogError::from)
        })
    }
}
