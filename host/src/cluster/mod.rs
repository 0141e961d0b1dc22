//! The cluster layer: membership, shard placement, shard Raft groups and the
//! transport between nodes. [`placement`] holds the pure placement decisions;
//! [`raft`] the openraft pieces of one shard group; [`harness`] an in-process
//! multi-node transport that drops, delays, duplicates and partitions
//! messages on command, for tests and simulations; [`shards`] the replicas
//! one node holds and their status; [`sharded`] those replicas as one store,
//! log and router; [`meta`] the metadata group; [`shape`] the cluster's
//! membership and layout as that group records them; [`driver`] the replica
//! moves that grow, drain and heal a cluster; [`handoff`] how a leader hands
//! a shard's leadership to another replica. [`wire`] is the one port for
//! node-to-node calls (in domain terms; `api::cluster` implements it over
//! gRPC); [`member`] what a member's cluster parts share and the calls that
//! run here or on another member alike; [`service`] what a member does when
//! another calls it; [`join`] the joining side; [`propagation`] the
//! registry's view of the other members; [`view`] status and drain.

pub mod driver;
pub mod handoff;
pub mod harness;
pub mod join;
pub mod member;
pub mod meta;
pub mod placement;
pub mod propagation;
pub mod raft;
pub mod service;
pub mod shape;
pub mod sharded;
pub mod shards;
pub mod view;
pub mod wire;

#[cfg(test)]
pub(crate) mod tests;
