//! Host side of the `conflux:entity` imports (`state`, `context`) and the
//! per-instance resource limiter. State writes are buffered in [`TurnState`];
//! reads see the turn's own writes first, then the committed store.

use super::HostState;
use super::conflux::entity::{context, state, types};
use crate::config::RuntimeConfig;
use crate::model::{EntityRef, Keyspace, entity_prefix, state_key};
use crate::storage::StateStore;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Longest guest log message kept; the rest is cut so a guest cannot flood the
/// host log with one call.
const MAX_LOG_MESSAGE_BYTES: usize = 4096;

/// Everything one turn has done so far.
pub struct TurnState {
    entity: EntityRef,
    invocation_id: String,
    caller: Option<EntityRef>,
    now_ms: u64,
    reader: Arc<dyn StateStore>,
    writes: BTreeMap<String, Option<Vec<u8>>>,
    written_bytes: usize,
}

impl TurnState {
    pub fn new(
        entity: EntityRef,
        invocation_id: String,
        caller: Option<EntityRef>,
        now_ms: u64,
        reader: Arc<dyn StateStore>,
    ) -> Self {
        Self { entity, invocation_id, caller, now_ms, reader, writes: BTreeMap::new(), written_bytes: 0 }
    }

    pub fn into_writes(self) -> BTreeMap<String, Option<Vec<u8>>> {
        self.writes
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
        self.limit_breach = Some(message.clone());
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
        let turn = self.turn()?;
        turn.written_bytes += key.len() + value_len;
        let total = turn.written_bytes;
        if total > cfg.max_write_set_bytes {
            return Err(self.breach(format!("the turn wrote {total} bytes; the limit is {}", cfg.max_write_set_bytes)));
        }
        Ok(())
    }
}

impl types::Host for HostState {}

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
        let entity = &self.entity;
        let invocation = self.turn.as_ref().map(|t| t.invocation_id.as_str()).unwrap_or("");
        match level {
            0 => tracing::trace!(target: "conflux::guest", %entity, invocation, "{message}"),
            1 => tracing::debug!(target: "conflux::guest", %entity, invocation, "{message}"),
            2 => tracing::info!(target: "conflux::guest", %entity, invocation, "{message}"),
            3 => tracing::warn!(target: "conflux::guest", %entity, invocation, "{message}"),
            _ => tracing::error!(target: "conflux::guest", %entity, invocation, "{message}"),
        }
        Ok(())
    }
}

/// Caps memory and table growth of one instance and remembers whether a cap
/// was hit, so an ensuing trap is reported as out-of-memory.
pub struct Limiter {
    max_memory_bytes: usize,
    max_table_elements: usize,
    breached: bool,
}

impl Limiter {
    pub fn new(cfg: &RuntimeConfig) -> Self {
        Self {
            max_memory_bytes: cfg.max_memory_bytes as usize,
            max_table_elements: cfg.max_table_elements as usize,
            breached: false,
        }
    }

    pub fn breached(&self) -> bool {
        self.breached
    }

    pub fn reset_breach(&mut self) {
        self.breached = false;
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_memory_bytes {
            self.breached = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_table_elements {
            self.breached = true;
            return Ok(false);
        }
        Ok(true)
    }
}
