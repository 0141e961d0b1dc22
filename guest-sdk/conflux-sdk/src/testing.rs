//! A native test harness: run entity operations with plain `cargo test`, no host.
//!
//! [`TestHarness`] keeps one entity's committed state in memory and runs every call as
//! a turn with the same semantics as the Conflux host: writes are buffered, reads see
//! the turn's own writes, and the buffer is committed only if the operation returns
//! `Ok` — it is discarded on `Err` or panic (the panic is then resumed).
//!
//! Only available on non-`wasm32` targets.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::log::Level;
use crate::messaging::{AskContext, AskError, AskId, RawReply, TimerId};
use crate::sys::native::{self, Asked, Sent, Turn};
use crate::{Entity, EntityRef, Error, SELF_KEY};

/// One line logged by the entity during a harness call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Its severity.
    pub level: Level,
    /// Its text.
    pub message: String,
}

/// A message an entity sent (committed), as the harness records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    /// The addressee.
    pub target: EntityRef,
    /// The operation to run there.
    pub operation: String,
    /// Its payload (JSON when sent with [`crate::messaging::send`]).
    pub payload: Vec<u8>,
    /// For a timer: its id and delay.
    pub timer: Option<(TimerId, u64)>,
}

impl SentMessage {
    /// The payload parsed as JSON `T`. Panics if it is not (this is a test helper).
    pub fn arg<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("payload of '{}' is not valid JSON for the type: {e}", self.operation))
    }
}

fn sent_message(s: Sent) -> SentMessage {
    SentMessage {
        target: s.target,
        operation: s.operation,
        payload: s.payload,
        timer: s.timer_id.map(|id| (TimerId(id), s.delay_ms.unwrap_or(0))),
    }
}

/// An ask an entity made (committed) that has had no reply yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAsk {
    /// Its id, as `then` returned it.
    pub id: AskId,
    /// The callee.
    pub target: EntityRef,
    /// The operation asked for.
    pub operation: String,
    /// Its payload (JSON when built with [`crate::messaging::ask`] or a typed client).
    pub payload: Vec<u8>,
    /// The operation of this entity its reply runs.
    pub continuation: String,
    /// The context the continuation gets back.
    pub context: Vec<u8>,
    /// Its timeout in milliseconds, if it has one.
    pub timeout_ms: Option<u64>,
}

impl PendingAsk {
    /// The payload parsed as JSON `T`. Panics if it is not (this is a test helper).
    pub fn arg<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("payload of ask '{}' is not valid JSON for the type: {e}", self.operation))
    }
}

fn pending_ask(a: Asked) -> PendingAsk {
    PendingAsk {
        id: AskId(a.id),
        target: a.target,
        operation: a.operation,
        payload: a.payload,
        continuation: a.continuation,
        context: a.context,
        timeout_ms: a.timeout_ms,
    }
}

/// Runs operations of one entity instance (`entity_type/id`) against an in-memory store.
///
/// ```
/// # use conflux_sdk::prelude::*;
/// # use conflux_sdk::testing::TestHarness;
/// # #[derive(Default, Serialize, Deserialize)] struct Counter { total: i64 }
/// # #[entity] impl Counter { pub fn add(&mut self, n: i64) -> i64 { self.total += n; self.total } }
/// let mut h = TestHarness::new("counter", "c1");
/// let total: i64 = h.call::<Counter, _, i64>("add", &5)?;
/// assert_eq!(total, 5);
/// assert_eq!(h.invoke::<Counter>("add", b"2")?, b"7");
/// # Ok::<(), conflux_sdk::Error>(())
/// ```
#[derive(Debug)]
pub struct TestHarness {
    self_ref: EntityRef,
    caller: Option<EntityRef>,
    now_ms: u64,
    store: BTreeMap<String, Vec<u8>>,
    logs: Vec<LogRecord>,
    invocations: u64,
    /// Messages sent by committed turns, oldest first (timers included when set).
    sent: Vec<SentMessage>,
    /// Timers set by committed turns and not cancelled, by id.
    timers: BTreeMap<String, Sent>,
    next_timer: u64,
    /// Asks made by committed turns and not yet answered, by id.
    asks: BTreeMap<String, PendingAsk>,
}

impl TestHarness {
    /// A harness for the entity `entity_type/id`, with empty state, no caller and
    /// `now_ms` = 0.
    pub fn new(entity_type: impl Into<String>, id: impl Into<String>) -> Self {
        TestHarness {
            self_ref: EntityRef::new(entity_type, id),
            caller: None,
            now_ms: 0,
            store: BTreeMap::new(),
            logs: Vec::new(),
            invocations: 0,
            sent: Vec::new(),
            timers: BTreeMap::new(),
            next_timer: 1,
            asks: BTreeMap::new(),
        }
    }

    /// The ref the entity sees as [`crate::context::self_ref`].
    pub fn self_ref(&self) -> &EntityRef {
        &self.self_ref
    }

    /// Sets what [`crate::context::caller`] returns in later calls.
    pub fn set_caller(&mut self, caller: Option<EntityRef>) {
        self.caller = caller;
    }

    /// Sets what [`crate::context::now_ms`] returns in later calls.
    pub fn set_now_ms(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// Runs operation `op` with a raw payload as one turn; returns the raw reply.
    ///
    /// The turn's writes are committed only if the result is `Ok`. If the operation
    /// panics, the writes are discarded and the panic is resumed.
    pub fn invoke<E: Entity>(&mut self, op: &str, payload: &[u8]) -> Result<Vec<u8>, Error> {
        self.turn(None, || E::dispatch(op, payload))
    }

    /// Delivers the reply to pending ask `id` as the host does: one turn of its
    /// continuation, after which the ask is settled — even if the continuation
    /// returns an error (its writes are discarded, as on the host). Panics if
    /// no such ask is pending (a test helper).
    pub fn reply<E: Entity>(&mut self, id: &AskId, outcome: Result<Vec<u8>, AskError>) -> Result<Vec<u8>, Error> {
        let ask =
            self.asks.remove(&id.0).unwrap_or_else(|| panic!("no pending ask {id} (pending: {:?})", self.asks.keys()));
        let reply =
            RawReply { ask: AskContext::new(ask.id.0.clone(), ask.target.clone(), ask.context.clone()), outcome };
        let caller = self.caller.replace(ask.target.clone());
        let result = self.turn(Some(reply), || E::dispatch(&ask.continuation, b""));
        self.caller = caller;
        result
    }

    /// Delivers the reply `value` (as JSON) to pending ask `id`; see [`reply`](Self::reply).
    pub fn reply_ok<E: Entity, T: Serialize + ?Sized>(&mut self, id: &AskId, value: &T) -> Result<Vec<u8>, Error> {
        let bytes =
            serde_json::to_vec(value).map_err(|e| Error::bad_request(format!("cannot serialise reply: {e}")))?;
        self.reply::<E>(id, Ok(bytes))
    }

    /// Runs pending ask `id` on `callee` (another harness, as its entity `C`,
    /// seeing this entity as its caller), then delivers its answer or refusal to
    /// this entity's continuation: an ask's round trip with both turns atomic.
    pub fn answer<E: Entity, C: Entity>(&mut self, id: &AskId, callee: &mut TestHarness) -> Result<Vec<u8>, Error> {
        let ask = self.asks.get(&id.0).unwrap_or_else(|| panic!("no pending ask {id}")).clone();
        let caller = callee.caller.replace(self.self_ref.clone());
        let answer = callee.invoke::<C>(&ask.operation, &ask.payload);
        callee.caller = caller;
        self.reply::<E>(id, answer.map_err(AskError::Refused))
    }

    /// Asks made by committed turns that have had no reply yet, in id order.
    pub fn asks(&self) -> Vec<PendingAsk> {
        self.asks.values().cloned().collect()
    }

    /// Runs the entity's `#[migrate]` function (a no-op without one) as one turn, as the
    /// host does before the first turn on a new version, with the registry version that
    /// last committed the state. Its writes are committed only if it returns `Ok`.
    pub fn migrate<E: Entity>(&mut self, from_version: u32) -> Result<(), Error> {
        self.turn(None, || E::migrate(from_version))
    }

    /// Runs `body` as one turn with the host's commit-or-discard semantics.
    fn turn<T>(&mut self, reply: Option<RawReply>, body: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        self.invocations += 1;
        native::begin(Turn {
            store: std::mem::take(&mut self.store),
            writes: BTreeMap::new(),
            self_ref: self.self_ref.clone(),
            caller: self.caller.clone(),
            invocation_id: format!("test-{}-{}", self.self_ref, self.invocations),
            now_ms: self.now_ms,
            logs: Vec::new(),
            timers: std::mem::take(&mut self.timers),
            sent: Vec::new(),
            cancelled: Vec::new(),
            next_timer: self.next_timer,
            asked: Vec::new(),
            reply,
        });
        let outcome = catch_unwind(AssertUnwindSafe(body));
        let turn = native::end().expect("conflux-sdk: the harness turn vanished during a call");
        self.store = turn.store;
        self.timers = turn.timers;
        self.next_timer = turn.next_timer;
        self.logs
            .extend(turn.logs.into_iter().map(|l| LogRecord { level: Level::from_u8(l.level), message: l.message }));
        match outcome {
            Ok(Ok(value)) => {
                for (key, write) in turn.writes {
                    match write {
                        Some(value) => self.store.insert(key, value),
                        None => self.store.remove(&key),
                    };
                }
                for id in turn.cancelled {
                    self.timers.remove(&id);
                }
                for s in turn.sent {
                    if let Some(id) = &s.timer_id {
                        self.timers.insert(id.clone(), s.clone());
                    }
                    self.sent.push(sent_message(s));
                }
                for a in turn.asked {
                    self.asks.insert(a.id.clone(), pending_ask(a));
                }
                Ok(value)
            }
            Ok(Err(e)) => Err(e),
            Err(panic) => resume_unwind(panic),
        }
    }

    /// Runs operation `op` with `arg` serialised as the JSON payload, and parses the JSON
    /// reply as `R`. Pass `&()` for operations without an argument.
    ///
    /// A reply that is not valid JSON for `R` is reported as `Error::Failed`.
    pub fn call<E: Entity, A: Serialize + ?Sized, R: DeserializeOwned>(
        &mut self,
        op: &str,
        arg: &A,
    ) -> Result<R, Error> {
        let payload =
            serde_json::to_vec(arg).map_err(|e| Error::bad_request(format!("cannot serialise argument: {e}")))?;
        let reply = self.invoke::<E>(op, &payload)?;
        serde_json::from_slice(&reply).map_err(|e| {
            Error::failed(format!(
                "reply of '{op}' ({}) does not parse as the requested type: {e}",
                String::from_utf8_lossy(&reply)
            ))
        })
    }

    /// The committed bytes under `key`, if any.
    pub fn get_raw(&self, key: &str) -> Option<&[u8]> {
        self.store.get(key).map(Vec::as_slice)
    }

    /// The committed value under `key`, parsed as JSON. Panics if it is not valid JSON
    /// for `T` (this is a test helper).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.get_raw(key).map(|bytes| {
            serde_json::from_slice(bytes)
                .unwrap_or_else(|e| panic!("state key '{key}' is not valid JSON for the type: {e}"))
        })
    }

    /// Seeds committed state directly (outside any turn).
    pub fn set_raw(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.store.insert(key.into(), value.into());
    }

    /// The entity struct as committed under `"$self"`, or `E::default()` if absent.
    pub fn entity<E: Entity>(&self) -> E {
        self.get(SELF_KEY).unwrap_or_default()
    }

    /// All committed state, in key order.
    pub fn state(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.store
    }

    /// Everything logged so far (including by calls that failed).
    pub fn logs(&self) -> &[LogRecord] {
        &self.logs
    }

    /// Messages (and timers) sent by committed turns, oldest first.
    pub fn sent(&self) -> &[SentMessage] {
        &self.sent
    }

    /// Returns and forgets the messages sent so far.
    pub fn take_sent(&mut self) -> Vec<SentMessage> {
        std::mem::take(&mut self.sent)
    }

    /// Timers set by committed turns and not cancelled, in id order.
    pub fn timers(&self) -> Vec<SentMessage> {
        self.timers.values().cloned().map(sent_message).collect()
    }

    /// Forgets the captured logs.
    pub fn clear_logs(&mut self) {
        self.logs.clear();
    }
}
