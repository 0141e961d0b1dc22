//! Keeping a member in step with its metadata group: the cluster's shape
//! read from this node's replica (members, layout, drains), new members'
//! addresses handed to the wire, and the registry refreshed after every
//! apply — the readiness to take replicas follows from both.

use crate::cluster::member::Member;
use crate::cluster::shape::{DRAINING_KEY_PREFIX, LAYOUT_KEY, Layout, Shape, draining_node};
use crate::cluster::sharded::LocalShard;
use crate::model::Keyspace;
use crate::registry::Registry;
use crate::storage::StateStore;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The cluster's shape as this node's metadata replica holds it: members
/// from the group's membership (`founders` until it has one), the layout
/// (`initial` until the driver records one) and the drains.
pub(super) fn read_shape(meta: &LocalShard, founders: &BTreeMap<u64, String>, initial: &Layout) -> Shape {
    let m = meta.raft.metrics().borrow().clone();
    let mut members: BTreeMap<u64, String> =
        m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
    if members.is_empty() {
        members = founders.clone();
    }
    let layout = match meta.store.get(Keyspace::Registry, LAYOUT_KEY.as_bytes()) {
        Ok(Some(bytes)) => Layout::decode(&bytes).unwrap_or_else(|e| {
            tracing::error!("the recorded cluster layout is unreadable: {e}");
            initial.clone()
        }),
        Ok(None) => initial.clone(),
        Err(e) => {
            tracing::error!("reading the cluster layout: {e}");
            initial.clone()
        }
    };
    // Bounded: one record per member being drained.
    let draining = match meta.store.scan(Keyspace::Registry, DRAINING_KEY_PREFIX.as_bytes(), None, 4096) {
        Ok(rows) => rows.iter().filter_map(|(k, _)| draining_node(k)).collect(),
        Err(e) => {
            tracing::error!("reading the drained members: {e}");
            Default::default()
        }
    };
    Shape { members, draining, layout }
}

/// Keeps this node in step with the metadata group: whenever its replica
/// applies something, the cluster's shape is re-read (and new members'
/// addresses handed to the transport), and the registry re-reads its records
/// and compiles what changed before switching to it.
pub(super) async fn follow_meta(
    member: Member,
    initial: Layout,
    founders: BTreeMap<u64, String>,
    registry: Arc<Registry>,
) {
    let mut metrics = member.meta.raft.metrics();
    let mut seen = (None, None);
    // The addresses handed to the transport: replacing one drops its pooled
    // connection, so only a new or moved member's is set. The `--peer` list
    // says how this node reaches each founder (through a proxy, say), so it
    // wins over the address the metadata group recorded. Only that list: a
    // founder restarting after others joined must still dial them (the
    // simulation found a restarted founder that never could).
    let mut dialled = founders.clone();
    let mut registry_loaded = true;
    loop {
        let (applied, membership, last_log) = {
            let m = metrics.borrow_and_update();
            (m.last_applied.map(|id| id.index), m.membership_config.log_id().map(|id| id.index), m.last_log_index)
        };
        if (applied, membership) != seen {
            seen = (applied, membership);
            let shape = read_shape(&member.meta, &founders, &initial);
            for (node, addr) in &shape.members {
                if dialled.get(node) != Some(addr) && *node != member.node && !founders.contains_key(node) {
                    match member.wire.set_peer(*node, addr) {
                        Ok(()) => {
                            dialled.insert(*node, addr.clone());
                        }
                        Err(e) => tracing::error!(node, "a member's address is unusable: {e}"),
                    }
                }
            }
            member.shape.set(shape);
            let votes = member
                .meta
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == member.node);
            let refreshed = match registry.refresh_in_background().await {
                Ok(Ok(0)) => true,
                Ok(Ok(n)) => {
                    tracing::info!(types = n, "registry caught up with the metadata group");
                    true
                }
                Ok(Err(e @ crate::registry::RegistryError::Loading { .. })) => {
                    tracing::warn!("registry refresh: {e}");
                    false
                }
                Ok(Err(e)) => {
                    tracing::error!("registry refresh failed: {e}");
                    false
                }
                Err(e) => {
                    tracing::error!("registry refresh panicked: {e}");
                    false
                }
            };
            registry_loaded = refreshed;
            if votes && refreshed && !member.ready.swap(true, std::sync::atomic::Ordering::SeqCst) {
                tracing::info!("caught up with the metadata group: ready for replicas");
            }
            // Every record this replica holds is applied and loaded: an
            // unknown type is unknown (a learner, which never votes, gets
            // there by applying its whole log).
            if refreshed && (member.ready.load(std::sync::atomic::Ordering::SeqCst) || applied >= last_log) {
                registry.set_synced(true);
            }
        }
        if registry_loaded {
            if metrics.changed().await.is_err() {
                return;
            }
        } else {
            // A component could not be fetched yet (its holders unreachable):
            // try again even if the metadata group stays quiet.
            match tokio::time::timeout(REFRESH_RETRY, metrics.changed()).await {
                Ok(Err(_)) => return,
                Ok(Ok(())) => {}
                Err(_) => seen = (None, None),
            }
        }
    }
}

/// How soon a member retries loading components it could not fetch.
const REFRESH_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
