//! What the scheduler's tests build on: entity refs and messages for the
//! background loops' tests, and a [`Harness`] — one scheduler over a memory
//! store and a scripted in-memory commit log ([`MemLog`]: counts proposals
//! and lead confirmations, holds commits at a gate, fails a proposal on
//! request), with guest components from `target/guests` deployed.

use super::{Invocation, Route, Router, Scheduler};
use crate::config::Config;
use crate::log::{CommitLog, LogError, LogStats};
use crate::model::{EntityRef, LogIndex, Message, WriteSet};
use crate::storage::{ApplyStore, MemStore, StateStore};
use futures::future::BoxFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) fn entity(id: &str) -> EntityRef {
    EntityRef::new("t", id).unwrap()
}

pub(crate) fn message(sender: &EntityRef, seq: u64, target: &EntityRef) -> Message {
    Message {
        sender: sender.clone(),
        seq,
        target: target.clone(),
        operation: "op".into(),
        payload: vec![],
        kind: Default::default(),
    }
}

/// A commit log in memory: each proposal applies to the store in order, once
/// the gate is open. Proposals are counted as they arrive.
pub(crate) struct MemLog {
    store: Arc<MemStore>,
    applied: Arc<Mutex<LogIndex>>,
    proposals: AtomicU64,
    confirmations: AtomicU64,
    open: tokio::sync::watch::Sender<bool>,
    /// The error the next proposal to arrive fails with (nothing applied).
    fail_next: Mutex<Option<LogError>>,
    /// How the last proposal placed in order ended (`None`: applied), for
    /// the next one: it applies only after that one, and only if it did.
    last_placed: Mutex<Option<tokio::sync::oneshot::Receiver<Option<LogError>>>>,
}

impl MemLog {
    pub(crate) fn new(store: Arc<MemStore>) -> Self {
        Self {
            store,
            applied: Arc::new(Mutex::new(0)),
            proposals: AtomicU64::new(0),
            confirmations: AtomicU64::new(0),
            open: tokio::sync::watch::channel(true).0,
            fail_next: Mutex::new(None),
            last_placed: Mutex::new(None),
        }
    }

    pub(crate) fn proposals(&self) -> u64 {
        self.proposals.load(Ordering::SeqCst)
    }

    pub(crate) fn confirmations(&self) -> u64 {
        self.confirmations.load(Ordering::SeqCst)
    }

    /// Proposals arriving from now on wait until [`MemLog::release`].
    pub(crate) fn hold(&self) {
        self.open.send_replace(false);
    }

    pub(crate) fn release(&self) {
        self.open.send_replace(true);
    }

    pub(crate) fn fail_next(&self, e: LogError) {
        *self.fail_next.lock().unwrap() = Some(e);
    }
}

impl CommitLog for MemLog {
    fn propose(&self, ws: WriteSet) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        self.proposals.fetch_add(1, Ordering::SeqCst);
        let failure = self.fail_next.lock().unwrap().take();
        let mut open = self.open.subscribe();
        let store = self.store.clone();
        // The index is taken at apply time, in the order proposals pass the gate.
        let applied = self.applied.clone();
        Box::pin(async move {
            open.wait_for(|open| *open).await.map_err(|_| LogError::ShutDown)?;
            if let Some(e) = failure {
                return Err(e);
            }
            let mut index = applied.lock().unwrap();
            *index += 1;
            store.apply(&[(*index, &ws)])?;
            Ok(*index)
        })
    }

    /// Placed at once; applied in placement order once the gate is open, by
    /// a task of its own (nobody need wait for it). A proposal placed after
    /// one that failed fails with its error: like a replicated log, this one
    /// never commits an entry whose predecessor it could not write.
    fn propose_in_order(&self, ws: WriteSet, _: u64) -> BoxFuture<'static, crate::log::Placed> {
        self.proposals.fetch_add(1, Ordering::SeqCst);
        let failure = self.fail_next.lock().unwrap().take();
        let mut open = self.open.subscribe();
        let (store, applied) = (self.store.clone(), self.applied.clone());
        let (done, next) = tokio::sync::oneshot::channel();
        let before = self.last_placed.lock().unwrap().replace(next);
        let (reply, outcome) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let earlier = match before {
                Some(before) => before.await.unwrap_or(Some(LogError::ShutDown)),
                None => None,
            };
            let result = async {
                open.wait_for(|open| *open).await.map_err(|_| LogError::ShutDown)?;
                if let Some(e) = earlier.or(failure) {
                    return Err(e);
                }
                let mut index = applied.lock().unwrap();
                *index += 1;
                store.apply(&[(*index, &ws)])?;
                Ok(*index)
            }
            .await;
            let _ = done.send(result.as_ref().err().cloned());
            let _ = reply.send(result);
        });
        Box::pin(async move {
            Ok(Box::pin(async move { outcome.await.unwrap_or(Err(LogError::ShutDown)) }) as BoxFuture<'static, _>)
        })
    }

    fn confirm_lead(&self, _: &EntityRef, _: u64) -> BoxFuture<'static, Result<(), LogError>> {
        self.confirmations.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn last_durable_index(&self) -> LogIndex {
        *self.applied.lock().unwrap()
    }

    fn applied_index(&self) -> LogIndex {
        *self.applied.lock().unwrap()
    }

    fn stats(&self) -> LogStats {
        LogStats { proposals: self.proposals(), ..LogStats::default() }
    }

    fn shutdown(&self) -> BoxFuture<'static, Result<(), LogError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Every entity's turns run here, in term 1.
struct Here;

impl Router for Here {
    fn route(&self, _: &EntityRef) -> Route {
        Route::Here { epoch: 1 }
    }

    fn forward(&self, _: u64, _: Invocation) -> BoxFuture<'static, Result<Vec<u8>, super::InvokeError>> {
        Box::pin(async { Err(super::InvokeError::NotHere { leader: None }) })
    }

    fn hint(&self, _: &EntityRef, _: Option<u64>) {}

    fn forward_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// A scheduler on a [`MemLog`] with guests deployed.
pub(crate) struct Harness {
    pub(crate) scheduler: Scheduler,
    pub(crate) log: Arc<MemLog>,
    _dir: tempfile::TempDir,
}

/// A guest component built by `scripts/test.sh` (`target/guests`).
pub(crate) fn guest(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guests/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?} (build the guests: scripts/test.sh): {e}"))
}

impl Harness {
    /// Deploys each `(type, guest)` and starts a scheduler configured by `cfg`.
    pub(crate) async fn new(cfg: Config, types: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(MemStore::new());
        let log = Arc::new(MemLog::new(store.clone()));
        let (runtime, registry) = {
            let (cfg, path, store, log) = (cfg.clone(), dir.path().to_path_buf(), store.clone(), log.clone());
            tokio::task::spawn_blocking(move || {
                let runtime = Arc::new(crate::runtime::Runtime::new(&cfg.runtime).unwrap());
                let store: Arc<dyn StateStore> = store;
                let log: Arc<dyn CommitLog> = log;
                let registry = crate::registry::Registry::open(&cfg.registry, &path, runtime.clone(), store, log);
                (runtime, Arc::new(registry.unwrap()))
            })
            .await
            .unwrap()
        };
        for (type_name, name) in types {
            registry.deploy(type_name, guest(name), None).await.unwrap();
        }
        let scheduler = Scheduler::new(
            &cfg.scheduler,
            cfg.commit_room_bytes(),
            runtime,
            registry,
            store,
            log.clone(),
            Arc::new(Here),
        );
        Self { scheduler, log, _dir: dir }
    }

    /// Waits (generously) until `cond` holds.
    pub(crate) async fn until(&self, what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A call of `operation` on `entity` with a JSON `payload`.
pub(crate) fn call(entity: &EntityRef, operation: &str, payload: &str) -> Invocation {
    Invocation {
        entity: entity.clone(),
        operation: operation.into(),
        payload: payload.as_bytes().to_vec(),
        caller: None,
        idempotency_key: None,
        message_seq: None,
        kind: crate::model::MessageKind::Send,
    }
}
