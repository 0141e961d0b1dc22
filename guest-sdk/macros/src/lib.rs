//! Procedural macros for conflux-sdk.
