//! counter example (being written).
