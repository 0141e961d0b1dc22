//! Conflux guest SDK (being written).
