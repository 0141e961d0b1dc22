//! Host side of the `conflux:entity` imports (`state`, `context`, `messaging`)
//! and the per-instance resource limiter. State writes and sent messages are
//! buffered in [`TurnState`]; reads see the turn's own writes first, then the
//! committed store. Nothing here commits: the scheduler turns a finished
//! [`TurnState`] into a write set.

use super::HostState;
use super::conflux::entity::{context, messaging, state, types};
use crate::config::RuntimeConfig;
use crate::model::{
    AskFailure, EntityRef, Keyspace, MessageKind, PendingAsk, RefusalKind, entity_prefix, state_key, timer_id_key,
    valid_operation_name,
};
use crate::storage::StateStore;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest guest log message kept; the rest is cut so a guest cannot flood the
/// host log with one call.
const MAX_LOG_MESSAGE_BYTES: usize = 4096;

/// A message a turn sent (or a timer it set), committed with the turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Its sequence in the sender's outbox: with the sender, the message's id.
    pub seq: u64,
    pub target: EntityRef,
    pub operation: String,
    pub payload: Vec<u8>,
    /// For a timer: when it is due (Unix ms).
    pub due_at_ms: Option<u64>,
    pub kind: MessageKind,
}

/// The reply a continuation turn runs for (what WIT `reply` returns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyIn {
    /// The ask's sequence in this entity's outbox: its id.
    pub ask_seq: u64,
    pub callee: EntityRef,
    pub outcome: Result<Vec<u8>, AskFailure>,
    pub context: Vec<u8>,
}

/// A pending timer a turn cancelled: its sequence and due time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelledTimer {
    pub seq: u64,
    pub due_at_ms: u64,
}

/// Everything one turn has done so far.
pub struct TurnState {
    entity: EntityRef,
    invocation_id: String,
    caller: Option<EntityRef>,
    now_ms: u64,
    reader: Arc<dyn StateStore>,
    writes: BTreeMap<String, Option<Vec<u8>>>,
    written_bytes: usize,
    next_seq: u64,
    sent: Vec<OutgoingMessage>,
    cancelled: Vec<CancelledTimer>,
    asks: Vec<(u64, PendingAsk)>,
    /// Set for a continuation turn.
    pub(super) reply: Option<ReplyIn>,
}

/// What a finished turn leaves to commit.
#[derive(Debug, Clone, Default)]
pub struct TurnEffects {
    pub writes: BTreeMap<String, Option<Vec<u8>>>,
    pub sent: Vec<OutgoingMessage>,
    pub cancelled: Vec<CancelledTimer>,
    /// The asks this turn made, by their sequence: recorded as pending.
    pub asks: Vec<(u64, PendingAsk)>,
    /// The sender's next outbox sequence after this turn.
    pub next_seq: u64,
}

impl TurnState {
    pub fn new(
        entity: EntityRef,
        invocation_id: String,
        caller: Option<EntityRef>,
        now_ms: u64,
        next_seq: u64,
        reader: Arc<dyn StateStore>,
    ) -> Self {
        Self {
            entity,
            invocation_id,
            caller,
            now_ms,
            reader,
            writes: BTreeMap::new(),
            written_bytes: 0,
            next_seq,
            sent: Vec::new(),
            cancelled: Vec::new(),
            asks: Vec::new(),
            reply: None,
        }
    }

    pub fn into_effects(self) -> TurnEffects {
        TurnEffects {
            writes: self.writes,
            sent: self.sent,
            cancelled: self.cancelled,
            asks: self.asks,
            next_seq: self.next_seq,
        }
    }
}

fn wit_ref(r: &EntityRef) -> types::EntityRef {
    types::EntityRef { entity_type: r.entity_type.clone(), id: r.id.clone() }
}

impl HostState {
    fn turn(&mut self) -> wasmtime::Result<&mut TurnState> {
        self.turn.as_mut().ok_or_else(|| wasmtime::format_err!("host function called outside a turn"))
    }

    fn breach(&mut self, message: String) -> wasmtime::Error {
        self.breach = Some((super::TrapKind::LimitExceeded, message.clone()));
        wasmtime::format_err!(message)
    }

    fn record_write(&mut self, key: &str, value_len: usize) -> wasmtime::Result<()> {
        let cfg = self.cfg.clone();
        if key.len() > cfg.max_state_key_bytes {
            return Err(self.breach(format!(
                "state key is {} bytes; the limit is {}",
                key.len(),
                cfg.max_state_key_bytes
            )));
        }
        if value_len > cfg.max_state_value_bytes {
            return Err(self.breach(format!(
                "state value for key {key:?} is {value_len} bytes; the limit is {}",
                cfg.max_state_value_bytes
            )));
        }
        // Stored under `type \0 id \0 key`: the entity prefix is part of
        // every key the write set carries, so it counts toward the limit
        // (an entity with a long id writing many small keys otherwise
        // passes the check with an entry several times the limit).
        let prefix = self.entity_prefix_bytes()?;
        self.add_written(prefix + key.len() + value_len)
    }

    /// The bytes of the turn's entity prefix (`type \0 id \0`).
    fn entity_prefix_bytes(&mut self) -> wasmtime::Result<usize> {
        let e = &self.turn()?.entity;
        Ok(e.entity_type.len() + e.id.len() + 2)
    }

    /// Counts bytes toward the turn's write-set limit (state writes and messages).
    fn add_written(&mut self, bytes: usize) -> wasmtime::Result<()> {
        let limit = self.cfg.max_write_set_bytes;
        let turn = self.turn()?;
        turn.written_bytes += bytes;
        let total = turn.written_bytes;
        if total > limit {
            return Err(self.breach(format!("the turn wrote {total} bytes; the limit is {limit}")));
        }
        Ok(())
    }
}

impl types::Host for HostState {}

/// What an outbox record stores besides the sender's prefix, the target, the
/// operation and the payload (sequence, lengths, due time), rounded up.
const MESSAGE_RECORD_OVERHEAD_BYTES: usize = 32;

impl HostState {
    /// Validates and buffers one outgoing message; traps on a malformed one.
    fn queue_message(
        &mut self,
        target: types::EntityRef,
        operation: String,
        payload: Vec<u8>,
        due_at_ms: Option<u64>,
        kind: MessageKind,
    ) -> wasmtime::Result<u64> {
        let target = match EntityRef::new(target.entity_type, target.id) {
            Ok(t) => t,
            Err(e) => return Err(self.breach(format!("message target is invalid: {e}"))),
        };
        if !valid_operation_name(&operation) {
            return Err(self.breach("message operation must be 1..=128 printable characters".into()));
        }
        let max = self.cfg.max_messages_per_turn;
        if self.turn()?.sent.len() >= max {
            return Err(self.breach(format!("the turn sent more than {max} messages")));
        }
        if payload.len() > self.cfg.max_state_value_bytes {
            return Err(self.breach(format!(
                "message payload is {} bytes; the limit is {}",
                payload.len(),
                self.cfg.max_state_value_bytes
            )));
        }
        // The outbox record's key is the sender's prefix and a sequence; its
        // value names the target, the operation and the payload.
        let key = self.entity_prefix_bytes()? + MESSAGE_RECORD_OVERHEAD_BYTES;
        self.add_written(key + target.entity_type.len() + target.id.len() + operation.len() + payload.len())?;
        let turn = self.turn()?;
        let seq = turn.next_seq;
        turn.next_seq += 1;
        turn.sent.push(OutgoingMessage { seq, target, operation, payload, due_at_ms, kind });
        Ok(seq)
    }
}

fn wit_call_error(kind: RefusalKind, message: String) -> types::CallError {
    match kind {
        RefusalKind::BadRequest => types::CallError::BadRequest(message),
        RefusalKind::UnknownOperation => types::CallError::UnknownOperation(message),
        RefusalKind::Failed => types::CallError::Failed(message),
    }
}

impl messaging::Host for HostState {
    fn send(&mut self, target: types::EntityRef, operation: String, payload: Vec<u8>) -> wasmtime::Result<()> {
        self.queue_message(target, operation, payload, None, MessageKind::Send).map(|_| ())
    }

    fn send_after(
        &mut self,
        delay_ms: u64,
        target: types::EntityRef,
        operation: String,
        payload: Vec<u8>,
    ) -> wasmtime::Result<String> {
        let delay = delay_ms.min(self.cfg.max_timer_delay_ms);
        let due = self.turn()?.now_ms.saturating_add(delay);
        self.queue_message(target, operation, payload, Some(due), MessageKind::Send).map(|seq| seq.to_string())
    }

    fn ask(
        &mut self,
        target: types::EntityRef,
        operation: String,
        payload: Vec<u8>,
        continuation: String,
        context: Vec<u8>,
        timeout_ms: Option<u64>,
    ) -> wasmtime::Result<String> {
        if !valid_operation_name(&continuation) {
            return Err(self.breach("an ask's continuation must be 1..=128 printable characters".into()));
        }
        if context.len() > self.cfg.max_state_value_bytes {
            return Err(self.breach(format!(
                "an ask's context is {} bytes; the limit is {}",
                context.len(),
                self.cfg.max_state_value_bytes
            )));
        }
        let seq = self.queue_message(target, operation.clone(), payload, None, MessageKind::Ask)?;
        let callee = self.turn()?.sent.last().expect("queued just now").target.clone();
        // The timeout is a timer to this entity itself carrying the failure,
        // guarded like any reply by the pending record.
        let timer = match timeout_ms {
            None => None,
            Some(ms) => {
                let due = self.turn()?.now_ms.saturating_add(ms.min(self.cfg.max_timer_delay_ms));
                let me = wit_ref(&self.entity);
                let kind = MessageKind::Reply { ask_seq: seq, outcome: Err(AskFailure::TimedOut) };
                let timer_seq = self.queue_message(me, operation, Vec::new(), Some(due), kind)?;
                Some((timer_seq, due))
            }
        };
        // The pending record: its key (the entity prefix and a sequence) and
        // its value (callee, continuation, context, timer).
        let prefix = self.entity_prefix_bytes()?;
        self.add_written(
            prefix
                + MESSAGE_RECORD_OVERHEAD_BYTES
                + callee.entity_type.len()
                + callee.id.len()
                + continuation.len()
                + context.len(),
        )?;
        self.turn()?.asks.push((seq, PendingAsk { callee, continuation, context, timer }));
        Ok(seq.to_string())
    }

    fn reply(&mut self) -> wasmtime::Result<Option<messaging::AskReply>> {
        let Some(r) = self.turn()?.reply.clone() else { return Ok(None) };
        let outcome = match r.outcome {
            Ok(value) => Ok(value),
            Err(AskFailure::Refused { kind, message }) => {
                Err(messaging::AskError::Refused(wit_call_error(kind, message)))
            }
            Err(AskFailure::TimedOut) => Err(messaging::AskError::TimedOut),
            Err(AskFailure::Undeliverable(why)) => Err(messaging::AskError::Undeliverable(why)),
        };
        Ok(Some(messaging::AskReply {
            ask_id: r.ask_seq.to_string(),
            callee: wit_ref(&r.callee),
            outcome,
            context: r.context,
        }))
    }

    fn cancel(&mut self, timer_id: String) -> wasmtime::Result<bool> {
        let Ok(seq) = timer_id.parse::<u64>() else { return Ok(false) };
        let turn = self.turn()?;
        // A timer set earlier in this same turn simply never leaves.
        if let Some(pos) = turn.sent.iter().position(|m| m.seq == seq && m.due_at_ms.is_some()) {
            // An ask's timeout stays with its ask.
            if matches!(turn.sent[pos].kind, MessageKind::Reply { .. }) {
                return Ok(false);
            }
            turn.sent.remove(pos);
            return Ok(true);
        }
        if turn.cancelled.iter().any(|c| c.seq == seq) {
            return Ok(false);
        }
        let due = turn
            .reader
            .get(Keyspace::Timers, &timer_id_key(&turn.entity, seq))
            .map_err(|e| wasmtime::format_err!("state store: {e}"))?;
        match due.as_deref().and_then(|d| <[u8; 8]>::try_from(d).ok()) {
            Some(d) => {
                turn.cancelled.push(CancelledTimer { seq, due_at_ms: u64::from_be_bytes(d) });
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl state::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let turn = self.turn()?;
        if let Some(v) = turn.writes.get(&key) {
            return Ok(v.clone());
        }
        let k = state_key(&turn.entity, &key);
        turn.reader.get(Keyspace::State, &k).map_err(|e| wasmtime::format_err!("state store: {e}"))
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        self.record_write(&key, value.len())?;
        self.turn()?.writes.insert(key, Some(value));
        Ok(())
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.record_write(&key, 0)?;
        self.turn()?.writes.insert(key, None);
        Ok(())
    }

    fn list(
        &mut self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
        let limit = limit.min(self.cfg.max_list_keys) as usize;
        let turn = self.turn()?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let in_range = |k: &str| k.starts_with(&prefix) && start_after.as_deref().is_none_or(|s| k > s);
        // Buffered deletes can hide at most this many stored keys, so fetching
        // that many extra guarantees the first `limit` merged keys are complete.
        let hidden = turn.writes.iter().filter(|(k, v)| v.is_none() && in_range(k)).count();
        let base = entity_prefix(&turn.entity);
        let mut full_prefix = base.clone();
        full_prefix.extend_from_slice(prefix.as_bytes());
        let full_start = start_after.as_ref().map(|s| {
            let mut k = base.clone();
            k.extend_from_slice(s.as_bytes());
            k
        });
        let stored = turn
            .reader
            .scan(Keyspace::State, &full_prefix, full_start.as_deref(), limit + hidden)
            .map_err(|e| wasmtime::format_err!("state store: {e}"))?;
        let mut merged: BTreeMap<String, Vec<u8>> =
            stored.into_iter().map(|(k, v)| (String::from_utf8_lossy(&k[base.len()..]).into_owned(), v)).collect();
        for (k, v) in turn.writes.iter().filter(|(k, _)| in_range(k)) {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}

impl context::Host for HostState {
    fn self_ref(&mut self) -> wasmtime::Result<types::EntityRef> {
        Ok(wit_ref(&self.entity))
    }

    fn caller(&mut self) -> wasmtime::Result<Option<types::EntityRef>> {
        Ok(self.turn()?.caller.as_ref().map(wit_ref))
    }

    fn invocation_id(&mut self) -> wasmtime::Result<String> {
        Ok(self.turn()?.invocation_id.clone())
    }

    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(self.turn()?.now_ms)
    }

    fn log(&mut self, level: u8, message: String) -> wasmtime::Result<()> {
        let mut message = message;
        if message.len() > MAX_LOG_MESSAGE_BYTES {
            let mut cut = MAX_LOG_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        self.stdout.log_call(level, &message);
        Ok(())
    }
}

/// Linear memory held by all instances of a node, against
/// `runtime.max_total_guest_memory_bytes`.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicUsize,
    limit: usize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Self {
        Self { used: AtomicUsize::new(0), limit }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(bytes).filter(|n| *n <= self.limit))
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Which memory bound a refused growth hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBreach {
    /// The instance's own bound (`runtime.max_memory_bytes`, all memories together).
    Instance,
    /// The node's bound on all instances together.
    Node,
    /// A table grew past `runtime.max_table_elements`.
    Table,
}

/// Caps memory and table growth of one instance — all its linear memories
/// together, and the node's memory budget — and remembers whether a cap was
/// hit, so an ensuing trap is reported as out-of-memory.
pub struct Limiter {
    max_memory_bytes: usize,
    max_table_elements: usize,
    budget: Arc<MemoryBudget>,
    /// Bytes of linear memory this instance holds (taken from `budget`).
    held: usize,
    breached: Option<MemoryBreach>,
}

impl Limiter {
    pub fn new(cfg: &RuntimeConfig, budget: Arc<MemoryBudget>) -> Self {
        Self {
            max_memory_bytes: cfg.max_memory_bytes as usize,
            max_table_elements: cfg.max_table_elements as usize,
            budget,
            held: 0,
            breached: None,
        }
    }

    pub fn breached(&self) -> Option<MemoryBreach> {
        self.breached
    }

    pub fn reset_breach(&mut self) {
        self.breached = None;
    }

    pub fn memory_bytes(&self) -> usize {
        self.held
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    // Also called when a memory is created, with `current` 0: every byte of
    // every memory passes through here.
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        if self.held.saturating_add(more) > self.max_memory_bytes {
            self.breached = Some(MemoryBreach::Instance);
            return Ok(false);
        }
        if !self.budget.try_take(more) {
            self.breached = Some(MemoryBreach::Node);
            return Ok(false);
        }
        self.held += more;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_table_elements {
            self.breached = Some(MemoryBreach::Table);
            return Ok(false);
        }
        Ok(true)
    }
}
