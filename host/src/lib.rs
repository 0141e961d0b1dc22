//! Conflux host: runs WebAssembly entities durably on a cluster of nodes
//! (a node started alone is a cluster of one).
//! See ARCHITECTURE.md for the layers and their invariants.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod determinism;
pub mod log;
pub mod model;
pub mod node;
pub mod registry;
pub mod runtime;
pub mod scheduler;
pub mod storage;
pub mod telemetry;

#[cfg(test)]
mod fuzz_tests;

#[cfg(test)]
mod layering_tests;
