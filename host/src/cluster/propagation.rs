//! The registry's view of the other members, through the [`Wire`]:
//! [`OtherMembers`], both its `Propagation` (a deploy waits until every
//! member that is up serves it) and its `ComponentPeers` (the members it
//! fetches a component it lacks from, asked in turn).

use super::raft::NodeId;
use super::shape::ClusterShape;
use super::wire::Wire;
use crate::registry::{ComponentChunk, ComponentPeers, Propagation, TypeRecord};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

/// How long a deploy waits for the other members to serve it.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a deploy asks a member whether it serves the new record yet.
const PROPAGATION_POLL: Duration = Duration::from_millis(50);
/// How long one such question may take.
const LOADED_TYPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The other members of a cluster, as the registry sees them: asked
/// whether they serve a record ([`Propagation`]) and for the components
/// this node lacks ([`ComponentPeers`]).
pub struct OtherMembers {
    node: NodeId,
    wire: Arc<dyn Wire>,
    shape: Arc<ClusterShape>,
}

impl OtherMembers {
    pub fn new(node: NodeId, wire: Arc<dyn Wire>, shape: Arc<ClusterShape>) -> Self {
        Self { node, wire, shape }
    }
}

impl Propagation for OtherMembers {
    fn await_members(&self, record: &TypeRecord) -> BoxFuture<'static, Result<(), String>> {
        let others: Vec<NodeId> = self.shape.members().into_iter().filter(|n| *n != self.node).collect();
        let waits: Vec<_> = others
            .into_iter()
            .map(|node| {
                let wire = self.wire.clone();
                let want = record.clone();
                async move {
                    let deadline = tokio::time::Instant::now() + PROPAGATION_TIMEOUT;
                    loop {
                        match wire.loaded_type(node, &want.name, LOADED_TYPE_TIMEOUT).await {
                            // A later revision includes this change or a
                            // concurrent one that followed it.
                            Ok(Some(served)) if served == want || served.revision > want.revision => return Ok(()),
                            Ok(_) => {}
                            // Down (or not dialled yet): it loads the record
                            // when it starts.
                            Err(e) if e.never_sent() => return Ok(()),
                            Err(_) => {}
                        }
                        if tokio::time::Instant::now() >= deadline {
                            return Err(node);
                        }
                        tokio::time::sleep(PROPAGATION_POLL).await;
                    }
                }
            })
            .collect();
        Box::pin(async move {
            let late: Vec<NodeId> =
                futures::future::join_all(waits).await.into_iter().filter_map(Result::err).collect();
            if late.is_empty() {
                Ok(())
            } else {
                Err(format!("nodes {late:?} did not load it within {PROPAGATION_TIMEOUT:?}"))
            }
        })
    }
}

impl ComponentPeers for OtherMembers {
    /// Starting after this node, so members do not all ask the same one.
    fn members(&self) -> Vec<u64> {
        let members = self.shape.members();
        let (after, before): (Vec<NodeId>, Vec<NodeId>) =
            members.into_iter().filter(|n| *n != self.node).partition(|n| *n > self.node);
        after.into_iter().chain(before).collect()
    }

    fn read_chunk(
        &self,
        node: u64,
        digest: &str,
        offset: u64,
        max_bytes: u32,
    ) -> BoxFuture<'static, Result<ComponentChunk, String>> {
        let call = self.wire.read_component(node, digest, offset, max_bytes);
        // The registry names the node itself.
        Box::pin(async move { call.await.map_err(|e| e.reason()) })
    }
}
