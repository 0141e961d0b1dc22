//! Facts about the current turn: who we are, who called, the invocation id and time.

use crate::{EntityRef, sys};

/// This entity's own ref (`type/id`).
pub fn self_ref() -> EntityRef {
    sys::self_ref()
}

/// The entity that sent this invocation, or `None` for a client call.
pub fn caller() -> Option<EntityRef> {
    sys::caller()
}

/// The unique id of this invocation.
pub fn invocation_id() -> String {
    sys::invocation_id()
}

/// Host wall-clock time in milliseconds since the Unix epoch, fixed for the whole turn.
pub fn now_ms() -> u64 {
    sys::now_ms()
}
