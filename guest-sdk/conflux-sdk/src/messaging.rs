//! Messages to other entities and to the future (timers).
//!
//! Sending is part of the turn: messages are committed atomically with the turn's
//! state changes and leave only after it commits — a turn that returns an error or
//! panics sends nothing. The platform delivers each message at least once and the
//! receiver drops duplicates, so every message is processed **effectively once**;
//! messages from one sender to one receiver are processed in the order they were
//! sent. The receiver sees the sender as [`crate::context::caller`]. A message the
//! receiver refuses (an `Err` from its operation) or that names an unknown type
//! becomes a *dead letter* (`conflux dead-letters`); it is never retried forever.
//! The reply of a message's operation is discarded: to answer, send a message back.
//!
//! `#[entity]` also generates typed senders for your own entity type:
//! `Account::send_to("b").deposit(&10)?` and
//! `Account::send_after(Duration::from_secs(5), "b").deposit(&10)?` (which returns a
//! [`TimerId`]). For other types, name the operation: `send(&team, "add_member", &id)`.
//!
//! ```
//! use conflux_sdk::prelude::*;
//! use conflux_sdk::testing::TestHarness;
//! use std::time::Duration;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Reminder { timer: Option<TimerId> }
//!
//! #[entity]
//! impl Reminder {
//!     /// Pings `user/<id>` in an hour, unless cancelled first.
//!     pub fn arm(&mut self, user: String) -> Result<(), Error> {
//!         let target = EntityRef::new("user", user);
//!         self.timer = Some(messaging::send_after(Duration::from_secs(3600), &target, "ping", &())?);
//!         Ok(())
//!     }
//!     pub fn disarm(&mut self) -> bool {
//!         self.timer.take().is_some_and(|t| messaging::cancel(&t))
//!     }
//! }
//!
//! let mut h = TestHarness::new("reminder", "r1");
//! h.call::<Reminder, _, ()>("arm", "sue")?;
//! assert_eq!(h.timers().len(), 1);
//! assert_eq!(h.timers()[0].target, EntityRef::new("user", "sue"));
//! assert!(h.call::<Reminder, _, bool>("disarm", &())?);
//! assert!(h.timers().is_empty());
//! # Ok::<(), conflux_sdk::Error>(())
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{EntityRef, Error, sys};

/// Identifies a pending timer of this entity, for [`cancel`]. Keep it in your state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TimerId(pub String);

impl std::fmt::Display for TimerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn payload<A: Serialize + ?Sized>(operation: &str, arg: &A) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(arg).map_err(|e| Error::failed(format!("cannot serialise the payload of '{operation}': {e}")))
}

/// Sends `operation(arg)` (as JSON) to `target` when this turn commits.
pub fn send<A: Serialize + ?Sized>(target: &EntityRef, operation: &str, arg: &A) -> Result<(), Error> {
    send_raw(target, operation, &payload(operation, arg)?);
    Ok(())
}

/// Sends `operation` with a raw payload to `target` when this turn commits.
pub fn send_raw(target: &EntityRef, operation: &str, payload: &[u8]) {
    sys::send(target, operation, payload)
}

/// Sends `operation(arg)` to `target` once `delay` has passed (durably: the timer
/// survives restarts). Returns its id for [`cancel`].
pub fn send_after<A: Serialize + ?Sized>(
    delay: Duration,
    target: &EntityRef,
    operation: &str,
    arg: &A,
) -> Result<TimerId, Error> {
    let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    Ok(TimerId(sys::send_after(delay_ms, target, operation, &payload(operation, arg)?)))
}

/// Cancels a pending timer of this entity, as part of this turn. Returns whether it
/// was pending: if so it will never fire (provided this turn commits).
pub fn cancel(timer: &TimerId) -> bool {
    sys::cancel(&timer.0)
}
