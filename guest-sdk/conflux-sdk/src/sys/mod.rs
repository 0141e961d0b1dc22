//! The platform layer: the only code that talks to the outside world.
//!
//! On `wasm32` every function calls the WIT imports of world `conflux:entity/entity`.
//! On every other target it uses the thread-local turn installed by
//! [`crate::testing::TestHarness`], so entities can be unit-tested natively with no host.
//! Both back ends offer exactly the same functions with the same semantics.

#[cfg(target_arch = "wasm32")]
mod wasm;
#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::*;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::{
    ask, caller, cancel, invocation_id, log, now_ms, reply, self_ref, send, send_after, state_delete, state_get,
    state_list, state_set,
};
