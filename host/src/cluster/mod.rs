//! The cluster layer: membership, shard placement, rebalancing and request
//! forwarding. So far it holds the placement decisions ([`placement`]), pure
//! functions the clustered node will feed to its Raft groups; a node still
//! runs as the single replica of a single shard.

pub mod placement;
