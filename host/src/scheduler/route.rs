//! The [`Router`] port: how a node finds the leader of an entity's shard and
//! hands it an invocation, the retry loop that follows the leader through
//! elections ([`Scheduler::invoke`]), and the leadership checks a turn makes —
//! the term it runs in, the fenced commit, confirming the lead before
//! answering from what it read. Every node routes: a node alone leads all
//! its shards, in their terms.

use super::warm::SlotState;
use super::{Inner, Invocation, InvokeError, Scheduler};
use crate::log::LogError;
use crate::model::{EntityRef, WriteSet};
use std::time::Duration;
use tokio::time::Instant;

/// Where the turns of an entity run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On this node, which leads the entity's shard and has applied its log.
    /// `epoch` is the leadership term: what a slot cached under another term
    /// may be stale.
    Here { epoch: u64 },
    /// On another node, the shard's leader as far as this node knows.
    There { node: u64 },
    /// No leader is known (an election is under way).
    Unknown,
}

/// How a clustered node finds the leader of an entity's shard and hands it an
/// invocation. A single node has none: everything runs here.
pub trait Router: Send + Sync + 'static {
    fn route(&self, entity: &EntityRef) -> Route;
    /// Runs `inv` on `node` (which runs it only if it leads the shard).
    fn forward(&self, node: u64, inv: Invocation) -> futures::future::BoxFuture<'static, Result<Vec<u8>, InvokeError>>;
    /// Learns who leads the entity's shard from a node that refused it.
    fn hint(&self, entity: &EntityRef, leader: Option<u64>);
    /// How long one invocation may look for its leader.
    fn forward_timeout(&self) -> Duration;
}

/// First and largest pause between attempts to find a shard's leader. An
/// attempt is cheap (a metrics read, or a call refused at once), and the
/// largest pause adds directly to the failover gap callers see.
const ROUTE_RETRY_MIN: Duration = Duration::from_millis(20);
const ROUTE_RETRY_MAX: Duration = Duration::from_millis(100);

impl Scheduler {
    /// Runs one invocation as a turn and returns its reply once the turn's
    /// writes are durable. On a cluster the turn runs on the leader of the
    /// entity's shard: this node, or the one it is forwarded to.
    pub async fn invoke(&self, inv: Invocation) -> Result<Vec<u8>, InvokeError> {
        let router = self.inner.router.clone();
        let deadline = Instant::now() + router.forward_timeout();
        let guarded = inv.idempotency_key.is_some() || inv.message_seq.is_some();
        let mut pause = ROUTE_RETRY_MIN;
        loop {
            let result = match router.route(&inv.entity) {
                Route::Here { epoch } => self.invoke_here_as(inv.clone(), epoch).await,
                Route::There { node } => router.forward(node, inv.clone()).await,
                Route::Unknown => Err(InvokeError::NoLeader("an election is under way".into())),
            };
            // What a failed forward says about the leader is noted even when
            // the call is not retried here: the caller's own retry (an
            // unguarded call that lost its connection) must not take the same
            // dead route again.
            match &result {
                Err(InvokeError::NotHere { leader }) => router.hint(&inv.entity, *leader),
                Err(InvokeError::Unreachable { .. } | InvokeError::Lost { .. }) => router.hint(&inv.entity, None),
                _ => {}
            }
            match result {
                Err(e) if e.is_retryable(guarded) && Instant::now() + pause < deadline => {
                    tracing::debug!(entity = %inv.entity, "looking for the shard's leader: {e}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(ROUTE_RETRY_MAX);
                }
                Err(InvokeError::NotHere { leader }) => {
                    return Err(InvokeError::NoLeader(format!(
                        "gave up after {:?}; last known leader: {leader:?}",
                        router.forward_timeout()
                    )));
                }
                other => return other,
            }
        }
    }

    /// Runs an invocation forwarded by another node, only if this node leads
    /// the entity's shard: it is never forwarded again.
    pub async fn invoke_here(&self, inv: Invocation) -> Result<Vec<u8>, InvokeError> {
        match self.inner.router.route(&inv.entity) {
            Route::Here { epoch } => self.invoke_here_as(inv, epoch).await,
            Route::There { node } => Err(InvokeError::NotHere { leader: Some(node) }),
            Route::Unknown => Err(InvokeError::NotHere { leader: None }),
        }
    }
}

impl Inner {
    /// The leadership term in which this node runs `entity`'s turns now, or
    /// `None` if it does not.
    pub(super) fn epoch_of(&self, entity: &EntityRef) -> Option<u64> {
        match self.router.route(entity) {
            Route::Here { epoch } => Some(epoch),
            _ => None,
        }
    }

    /// Commits a write set computed under `epoch`, fenced by it: if the
    /// entry lands in another term nothing of it applies.
    pub(super) fn commit_in(
        &self,
        ws: WriteSet,
        epoch: u64,
    ) -> futures::future::BoxFuture<'static, Result<crate::model::LogIndex, LogError>> {
        self.log.propose_fenced(ws, epoch)
    }

    /// Confirms this node still leads the entity's shard in
    /// `epoch` before it answers from what it read; if not, drops the slot's
    /// instance and refuses with `NotHere` (nothing was written: always safe
    /// to retry on the current leader).
    pub(super) async fn confirm_or_refuse(
        &self,
        entity: &EntityRef,
        epoch: u64,
        slot_state: &mut SlotState,
    ) -> Result<(), InvokeError> {
        let Err(e) = self.log.confirm_lead(entity, epoch).await else { return Ok(()) };
        slot_state.resident = None;
        Err(match e {
            LogError::NotLeader { leader } => InvokeError::NotHere { leader },
            LogError::ShutDown => InvokeError::ShuttingDown,
            _ => InvokeError::NotHere { leader: None },
        })
    }
}
