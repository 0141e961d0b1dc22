//! The cluster layer: membership, shard placement, shard Raft groups and the
//! transport between nodes. [`placement`] holds the pure placement decisions;
//! [`raft`] the openraft pieces of one shard group; [`harness`] an in-process
//! multi-node transport that drops, delays, duplicates and partitions
//! messages on command, for tests and simulations; [`shards`] the replicas
//! one node holds and their status; [`sharded`] those replicas as one store,
//! log and router; [`meta`] the metadata group; [`shape`] the cluster's
//! membership and layout as that group records them; [`driver`] the replica
//! moves that grow, drain and heal a cluster; [`handoff`] how a leader hands
//! a shard's leadership to another replica.

pub mod driver;
pub mod handoff;
pub mod harness;
pub mod meta;
pub mod placement;
pub mod raft;
pub mod shape;
pub mod sharded;
pub mod shards;

#[cfg(test)]
pub(crate) mod tests;
