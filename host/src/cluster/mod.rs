//! The cluster layer: membership, shard placement, shard Raft groups and the
//! transport between nodes. [`placement`] holds the pure placement decisions;
//! [`raft`] the openraft pieces of one shard group; [`harness`] an in-process
//! multi-node transport that drops, delays, duplicates and partitions
//! messages on command, for tests and simulations; [`shards`] the replicas
//! one node holds and their status. `conflux serve` runs its data as shard 0
//! with itself as the only voter; multi-node serving is not wired in yet.

pub mod harness;
pub mod meta;
pub mod placement;
pub mod raft;
pub mod sharded;
pub mod shards;

#[cfg(test)]
pub(crate) mod tests;
