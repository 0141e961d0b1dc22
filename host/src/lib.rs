//! Conflux host: runs Wasm entities durably. See ARCHITECTURE.md for the map.

pub mod model;
pub mod cli;
pub mod log;
pub mod storage;
