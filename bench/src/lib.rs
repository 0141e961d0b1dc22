//! The benchmark suite behind `conflux-bench` and `cargo xtask bench-peers`.
//!
//! - [`load`]: the load generator (fixed concurrency, bounded in time and in
//!   request count, hdrhistogram latencies).
//! - [`target`]: the one interface every system under test implements (counter
//!   `add`/`get`, user `join`/`teams`), with implementations for Conflux
//!   ([`conflux`], gRPC), anything behind HTTP/1.1 ([`http`]: Restate's ingress
//!   and the PostgreSQL service) and in-process Rust ([`native`]).
//! - [`workload`]: the counter and team-joiner workloads and their correctness
//!   checks.
//! - [`procs`]: starting and stopping the systems (each a guarded child process
//!   in a temporary directory on 127.0.0.1) and sampling their memory.
//! - [`peers`]: the side-by-side run that `cargo xtask bench-peers` drives.
//! - [`scenarios`]: Conflux-only measurements: hot swap under load, messaging.
//! - [`cluster`]: one node against three, and shard counts, in one run.

pub mod cluster;
pub mod conflux;
pub mod http;
pub mod load;
pub mod native;
pub mod peers;
pub mod procs;
pub mod scenarios;
pub mod systems;
pub mod target;
pub mod workload;

use std::path::PathBuf;

/// The workspace root (the parent of `bench/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("bench/ has a parent").to_owned()
}
