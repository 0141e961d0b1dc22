//! The joining side of a join: a new node asks a member of the cluster to
//! let it in (the member passes the request to the metadata group's leader,
//! which adds the node as a learner of the metadata group; see
//! [`super::service::ClusterNode::join`]), retrying while the cluster elects
//! or the member is not up yet.

use super::raft::NodeId;
use super::wire::{JoinGrant, Wire};
use std::time::Duration;

/// How long a joining node keeps asking to be let in.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two asks.
const JOIN_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The peer-book entry the member asked is kept under while the join runs:
/// its id is unknown, and 0 names no member.
const JOIN_VIA: NodeId = 0;

/// Asks the member at `join_addr` to add this node (`node`, reached at
/// `addr`) to the cluster; returns the cluster's shard count and replication
/// factor. Retried while the cluster elects or the member is not up yet.
pub async fn join(wire: &dyn Wire, join_addr: &str, node: NodeId, addr: &str) -> Result<JoinGrant, String> {
    wire.set_peer(JOIN_VIA, join_addr).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let outcome = loop {
        match wire.join(JOIN_VIA, node, addr).await {
            Ok(grant) => break Ok(grant),
            // Unreachable, no answer (a connection lost mid-call: the member
            // asked was stopped), or "not now": another try may get in.
            Err(e) if e.may_succeed_later() && tokio::time::Instant::now() < deadline => {
                tracing::info!("joining through {join_addr}: {}; retrying", e.reason());
                tokio::time::sleep(JOIN_RETRY_PAUSE).await;
            }
            Err(e) => break Err(format!("joining through {join_addr}: {}", e.reason())),
        }
    };
    wire.remove_peer(JOIN_VIA);
    outcome
}
