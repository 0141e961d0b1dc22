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

use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
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

/// Identifies one ask of this entity: what [`Ask::then`] returns and what the
/// continuation's [`AskContext::id`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AskId(pub String);

impl std::fmt::Display for AskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an ask brought no value back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskError {
    /// The callee's operation returned this error (its kind and message).
    Refused(Error),
    /// No reply came within the ask's [`Ask::timeout`]; a later reply is dropped.
    TimedOut,
    /// The ask could not be processed: the callee's type is not deployed, or
    /// its code kept trapping. Says why.
    Undeliverable(String),
    /// The callee answered, but not with JSON of the type the continuation expects.
    BadReply(String),
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Refused(e) => write!(f, "the callee refused: {e}"),
            AskError::TimedOut => f.write_str("the ask timed out"),
            AskError::Undeliverable(why) => write!(f, "the ask was undeliverable: {why}"),
            AskError::BadReply(why) => write!(f, "the reply does not parse: {why}"),
        }
    }
}

impl std::error::Error for AskError {}

/// A continuation that propagates an ask's failure with `?` fails its turn.
impl From<AskError> for Error {
    fn from(e: AskError) -> Self {
        Error::failed(e)
    }
}

/// What a continuation knows about the ask it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskContext {
    /// The ask's id, as [`Ask::then`] returned it.
    pub id: AskId,
    /// The entity that was asked.
    pub callee: EntityRef,
    context: Vec<u8>,
}

impl AskContext {
    /// The value passed to [`Ask::context`], parsed as `C`.
    pub fn context<C: DeserializeOwned>(&self) -> Result<C, Error> {
        let bytes: &[u8] = if self.context.is_empty() { b"null" } else { &self.context };
        serde_json::from_slice(bytes).map_err(|e| Error::failed(format!("the ask's context does not parse: {e}")))
    }

    /// The context's bytes as the ask stored them.
    pub fn context_raw(&self) -> &[u8] {
        &self.context
    }
}

/// The reply a continuation turn runs for, before it is typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawReply {
    /// The ask's id, the callee and the context.
    pub ask: AskContext,
    /// The callee's reply bytes, or why there are none.
    pub outcome: Result<Vec<u8>, AskError>,
}

/// In a continuation turn, the reply it runs for; `None` in any other turn.
/// `#[continuation]` methods receive it typed; this is for hand-written dispatch.
pub fn reply() -> Option<RawReply> {
    sys::reply()
}

/// Names an operation of this entity that runs when a reply arrives, taking
/// the reply as `R` (`Result<T, AskError>`). `#[entity]` generates one per
/// `#[continuation]` method: `Self::ON_ADDED` for `on_added`.
pub struct Continuation<R> {
    name: &'static str,
    _reply: PhantomData<fn() -> R>,
}

impl<R> Continuation<R> {
    /// The continuation operation `name` (what `#[entity]` generates).
    pub const fn new(name: &'static str) -> Self {
        Continuation { name, _reply: PhantomData }
    }

    /// Its operation name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl<R> Clone for Continuation<R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R> Copy for Continuation<R> {}

impl<R> std::fmt::Debug for Continuation<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Continuation({})", self.name)
    }
}

/// An ask being built: [`ask`], or a typed client's method (`Team::ask("red").add_member(&me)`).
/// Nothing is sent until [`then`](Ask::then) names the continuation.
#[must_use = "an ask is sent only by `.then(continuation)`"]
pub struct Ask<T> {
    target: EntityRef,
    operation: String,
    payload: Result<Vec<u8>, Error>,
    context: Result<Vec<u8>, Error>,
    timeout: Option<Duration>,
    _reply: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Ask<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ask")
            .field("target", &self.target)
            .field("operation", &self.operation)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Asks `target` to run `operation(arg)` (as JSON); its reply, parsed as `T`,
/// comes back to the continuation [`Ask::then`] names.
pub fn ask<T, A: Serialize + ?Sized>(target: &EntityRef, operation: &str, arg: &A) -> Ask<T> {
    Ask {
        target: target.clone(),
        operation: operation.to_owned(),
        payload: payload(operation, arg),
        context: Ok(Vec::new()),
        timeout: None,
        _reply: PhantomData,
    }
}

impl<T> Ask<T> {
    /// If no reply came within `timeout`, the continuation gets
    /// [`AskError::TimedOut`] instead (durably: a timer), and a later reply is dropped.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// A value handed to the continuation unchanged ([`AskContext::context`]):
    /// what the caller needs to resume, without a state key of its own.
    pub fn context<C: Serialize + ?Sized>(mut self, context: &C) -> Self {
        self.context = serde_json::to_vec(context)
            .map_err(|e| Error::failed(format!("cannot serialise the context of '{}': {e}", self.operation)));
        self
    }

    /// Sends the ask when this turn commits; its reply runs `continuation`.
    pub fn then(self, continuation: Continuation<Result<T, AskError>>) -> Result<AskId, Error> {
        self.then_named(continuation.name)
    }

    /// Like [`then`](Ask::then), naming the continuation operation (for
    /// continuations not written with `#[continuation]`).
    pub fn then_named(self, continuation: &str) -> Result<AskId, Error> {
        let payload = self.payload?;
        let context = self.context?;
        let timeout_ms = self.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        Ok(AskId(sys::ask(&self.target, &self.operation, &payload, continuation, &context, timeout_ms)))
    }
}

/// How a continuation's reply parameter is made from the raw reply.
pub trait FromReply: Sized {
    /// Converts the outcome of an ask.
    fn from_reply(outcome: Result<Vec<u8>, AskError>) -> Self;
}

impl<T: DeserializeOwned> FromReply for Result<T, AskError> {
    fn from_reply(outcome: Result<Vec<u8>, AskError>) -> Self {
        let bytes = outcome?;
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| AskError::BadReply(e.to_string()))
    }
}

impl AskContext {
    pub(crate) fn new(id: String, callee: EntityRef, context: Vec<u8>) -> Self {
        AskContext { id: AskId(id), callee, context }
    }
}
