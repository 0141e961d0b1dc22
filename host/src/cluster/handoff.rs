//! Handing a shard's leadership to another of its replicas.
//!
//! openraft 0.9 has no leadership transfer, so the leader hands off by going
//! quiet. It stops taking turns for the shard (its router answers "election
//! under way", and callers wait and retry), waits until the target has its
//! whole log, and turns its heartbeats off. Once the followers' leader lease
//! has run out, it asks the target to campaign. The target's log is as long as
//! any, so the others vote for it, and the old leader steps down when it sees
//! the higher term. Followers would start an election on their own only a
//! random election timeout after the lease, so the target is first.
//!
//! Whatever happens, the old leader's heartbeats and turns resume afterwards;
//! if the handoff failed, it still leads. Raft keeps every outcome safe: at
//! worst another replica wins the election.

use super::raft::{NodeId, leader_of};
use super::sharded::LocalShard;
use std::future::Future;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("node {me} does not lead this shard (leader: {leader:?})")]
    NotLeader { me: NodeId, leader: Option<NodeId> },
    #[error("node {0} is not a voting replica of this shard")]
    NotAVoter(NodeId),
    #[error("node {to} did not catch up with the leader's log within {within:?}")]
    Behind { to: NodeId, within: Duration },
    #[error("asking node {to} to campaign: {message}")]
    Campaign { to: NodeId, message: String },
    #[error("node {to} did not take over within {within:?} (leader now: {leader:?})")]
    NotTaken { to: NodeId, within: Duration, leader: Option<NodeId> },
}

/// Resumes the leader's turns and heartbeats however the handoff ends.
struct Resume<'a>(&'a LocalShard);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.raft.runtime_config().heartbeat(true);
        self.0.set_handing_off(false);
    }
}

/// How far behind the target may be when the pause begins.
const SERVING_SLACK_ENTRIES: u64 = 64;

/// How long the paused leader waits for the target to receive the entries
/// that were in flight when the pause began.
const PAUSED_CATCH_UP: Duration = Duration::from_millis(500);

/// On the leader of `shard`: hands its leadership to `to`, another voter.
/// `campaign` asks `to` to start an election; it is polled once the lease
/// has run out. The target first catches up while the shard still serves
/// (bounded by `within`); the pause itself lasts at most about
/// `PAUSED_CATCH_UP` + 1.25 leases + 2 leases (lease: `election_timeout_max`).
pub async fn hand_off<F>(shard: &LocalShard, to: NodeId, within: Duration, campaign: F) -> Result<(), HandoffError>
where
    F: Future<Output = Result<(), String>>,
{
    let raft = &shard.raft;
    let m = raft.metrics().borrow().clone();
    if leader_of(&m) != Some(m.id) {
        return Err(HandoffError::NotLeader { me: m.id, leader: leader_of(&m) });
    }
    if to == m.id {
        return Ok(());
    }
    if !m.membership_config.membership().voter_ids().any(|v| v == to) {
        return Err(HandoffError::NotAVoter(to));
    }
    let within_of_log = |slack: u64| {
        move |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>| {
            super::raft::matched_index(m, to).is_some_and(|i| i + slack >= m.last_log_index.unwrap_or(0))
        }
    };
    // Catching up by ordinary replication first, while the shard serves
    // (under load a follower is always a few entries behind).
    raft.wait(Some(within))
        .metrics(within_of_log(SERVING_SLACK_ENTRIES), "the target is close behind")
        .await
        .map_err(|_| HandoffError::Behind { to, within })?;
    shard.set_handing_off(true);
    let _resume = Resume(shard);
    // Turns that were running when the pause began still commit; the target
    // must have them too, or the others would not vote for it.
    raft.wait(Some(PAUSED_CATCH_UP))
        .metrics(within_of_log(0), "the target has the whole log")
        .await
        .map_err(|_| HandoffError::Behind { to, within: PAUSED_CATCH_UP })?;
    raft.runtime_config().heartbeat(false);
    // A follower refuses to vote while the lease from its last heartbeat
    // lasts (openraft's `leader_lease` is `election_timeout_max`).
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    tokio::time::sleep(lease + lease / 4).await;
    campaign.await.map_err(|message| HandoffError::Campaign { to, message })?;
    // An election between caught-up replicas takes a round trip or two.
    let takeover = 2 * lease;
    let taken = raft.wait(Some(takeover)).metrics(|m| leader_of(m) == Some(to), "the target leads").await;
    match taken {
        Ok(_) => Ok(()),
        Err(_) => Err(HandoffError::NotTaken { to, within: takeover, leader: leader_of(&raft.metrics().borrow()) }),
    }
}
