//! The metadata group: one Raft group, apart from the data shards, with a
//! replica on every member. It holds the component registry (type records:
//! versions, digests and sizes — never component bytes, which members fetch
//! from each other by digest), so a deploy is one small metadata write that
//! every node applies, then fetches, checks and compiles before serving it. `MetaLog` lets a node that does
//! not lead the group commit through the one that does.

pub use super::raft::META_SHARD;
use super::raft::NodeId;
use super::shape::ClusterShape;
use super::sharded::LocalShard;
use super::wire::Peers;
use crate::log::{CommitLog, LogError, LogStats};
use crate::model::{LogIndex, WriteSet};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Pause between attempts while the group elects or its leader is unreachable.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The metadata group's commit log on one member. Metadata writes are
/// whole-record puts, so a write retried after an unknown outcome does no
/// harm; registry changes are also conditional on the record they read
/// (`Op::Expect`), so a retry of one that did commit applies nothing and
/// reports a conflict, which the registry resolves by reading the record.
pub struct MetaLog {
    node: NodeId,
    local: LocalShard,
    /// Whom to ask while no leader is known.
    shape: Arc<ClusterShape>,
    peers: Arc<dyn Peers>,
    timeout: Duration,
}

impl MetaLog {
    pub fn new(
        node: NodeId,
        local: LocalShard,
        shape: Arc<ClusterShape>,
        peers: Arc<dyn Peers>,
        timeout: Duration,
    ) -> Self {
        Self { node, local, shape, peers, timeout }
    }
}

impl CommitLog for MetaLog {
    /// Commits through the group's leader, then waits until this replica has
    /// applied the write, so what the caller reads next includes it.
    fn propose(&self, ws: WriteSet) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        let (me, local, shape, peers, timeout) =
            (self.node, self.local.clone(), self.shape.clone(), self.peers.clone(), self.timeout);
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            let mut next_guess = 0usize;
            loop {
                let leader = super::raft::leader_of(&local.raft.metrics().borrow());
                let attempt = match leader {
                    Some(l) if l == me => local.log.propose(ws.clone()).await,
                    Some(l) => peers.propose(l, META_SHARD, ws.clone()).await,
                    None => {
                        next_guess += 1;
                        let members = shape.members();
                        let guess = members.get(next_guess % members.len().max(1)).copied().unwrap_or(me);
                        if guess == me {
                            Err(LogError::NotLeader { leader: None })
                        } else {
                            peers.propose(guess, META_SHARD, ws.clone()).await
                        }
                    }
                };
                match attempt {
                    Ok(index) => {
                        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                        local
                            .raft
                            .wait(Some(left))
                            .applied_index_at_least(Some(index - 1), "metadata write applied here")
                            .await
                            .map_err(|e| {
                                LogError::Aborted(format!("the metadata write committed but did not apply here: {e}"))
                            })?;
                        return Ok(index);
                    }
                    // Nothing applied, but the caller reads the store next
                    // to see what its write conflicted with: wait until
                    // this replica has applied that far.
                    Err(LogError::Conflict { key, index }) => {
                        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                        let _ = local
                            .raft
                            .wait(Some(left))
                            .applied_index_at_least(Some(index.saturating_sub(1)), "metadata conflict applied here")
                            .await;
                        return Err(LogError::Conflict { key, index });
                    }
                    Err(e @ (LogError::NotLeader { .. } | LogError::Aborted(_))) => {
                        if Instant::now() + RETRY_PAUSE >= deadline {
                            return Err(LogError::Aborted(format!(
                                "no metadata leader accepted the write within {timeout:?} (is a majority of nodes up?): {e}"
                            )));
                        }
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    fn last_durable_index(&self) -> LogIndex {
        self.local.log.last_durable_index()
    }

    fn applied_index(&self) -> LogIndex {
        self.local.log.applied_index()
    }

    fn stats(&self) -> LogStats {
        self.local.log.stats()
    }

    fn shutdown(&self) -> BoxFuture<'static, Result<(), LogError>> {
        self.local.log.shutdown()
    }
}
