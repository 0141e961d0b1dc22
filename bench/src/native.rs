//! The ceiling on this machine: the same counter and team-joiner logic as plain
//! Rust in the load generator's process, a `HashMap` behind one mutex, called
//! directly by the callers' tokio tasks (no RPC, no serialisation).
//!
//! Three durability settings:
//! - [`NativeLog::None`]: memory only.
//! - [`NativeLog::FsyncEach`]: every change is appended to a log file and
//!   fdatasync'd while the mutex is held, before the reply — one fdatasync per
//!   change, no group commit (changes are serialised behind the sync).
//! - [`NativeLog::GroupCommit`]: changes are applied and appended to an
//!   in-memory buffer under the mutex; one flusher thread writes and fdatasyncs
//!   whatever has accumulated, and each caller is answered once the sync that
//!   covers its change (and everything before it) has returned.

use crate::target::{CallError, Target};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeLog {
    None,
    FsyncEach,
    GroupCommit,
}

#[derive(Default)]
struct State {
    counters: HashMap<String, i64>,
    teams: HashMap<String, String>,
    /// The log file ([`NativeLog::FsyncEach`]).
    file: Option<File>,
}

struct Pending {
    buf: Vec<u8>,
    /// Changes appended so far.
    appended: u64,
}

/// Group commit: the buffer, the flusher's wake-up, and what is durable.
struct Group {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// (changes durable, the log failed)
    durable: watch::Sender<(u64, bool)>,
    stop: AtomicBool,
}

struct Inner {
    state: Mutex<State>,
    mode: NativeLog,
    group: Option<Arc<Group>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(g) = &self.group {
            g.stop.store(true, Ordering::Relaxed);
            g.wake.notify_all();
        }
    }
}

/// In-process counter and users. Clones share the state.
#[derive(Clone)]
pub struct NativeTarget(Arc<Inner>);

/// What a call changed, as one log record.
enum Change {
    None,
    Record(String),
}

impl NativeTarget {
    /// A fresh state; with a log, the log file is created as `dir/native.log`.
    pub fn new(mode: NativeLog, dir: &Path) -> anyhow::Result<Self> {
        let mut state = State::default();
        let mut group = None;
        match mode {
            NativeLog::None => {}
            NativeLog::FsyncEach => state.file = Some(File::create(dir.join("native.log"))?),
            NativeLog::GroupCommit => {
                let mut file = File::create(dir.join("native.log"))?;
                let g = Arc::new(Group {
                    pending: Mutex::new(Pending { buf: Vec::new(), appended: 0 }),
                    wake: Condvar::new(),
                    durable: watch::Sender::new((0, false)),
                    stop: AtomicBool::new(false),
                });
                let flusher = g.clone();
                std::thread::Builder::new().name("native-log-flusher".into()).spawn(move || {
                    loop {
                        let (buf, upto) = {
                            let mut p = flusher.pending.lock().expect("pending lock");
                            while p.buf.is_empty() {
                                if flusher.stop.load(Ordering::Relaxed) {
                                    return;
                                }
                                p = flusher.wake.wait_timeout(p, Duration::from_millis(100)).expect("pending lock").0;
                            }
                            (std::mem::take(&mut p.buf), p.appended)
                        };
                        let ok = file.write_all(&buf).and_then(|_| file.sync_data()).is_ok();
                        flusher.durable.send_replace((upto, !ok));
                        if !ok {
                            return;
                        }
                    }
                })?;
                group = Some(g);
            }
        }
        Ok(Self(Arc::new(Inner { state: Mutex::new(state), mode, group })))
    }

    /// Runs `f` on the state under the mutex, logs its change as the mode says,
    /// and returns its result once that change is durable.
    async fn apply<T, F>(&self, f: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: FnOnce(&mut State) -> (Change, Result<T, CallError>) + Send + 'static,
    {
        match self.0.mode {
            NativeLog::None => {
                let mut s = self.0.state.lock().expect("state lock");
                f(&mut s).1
            }
            NativeLog::FsyncEach => {
                let inner = self.0.clone();
                tokio::task::spawn_blocking(move || {
                    let mut s = inner.state.lock().expect("state lock");
                    let (change, result) = f(&mut s);
                    if let (Change::Record(r), Some(file)) = (change, s.file.as_mut()) {
                        file.write_all(r.as_bytes())
                            .and_then(|_| file.sync_data())
                            .map_err(|e| CallError::Failed(format!("log: {e}")))?;
                    }
                    result
                })
                .await
                .map_err(|e| CallError::Failed(format!("log task: {e}")))?
            }
            NativeLog::GroupCommit => {
                let g = self.0.group.as_ref().expect("group commit has a group");
                let (seq, result) = {
                    let mut s = self.0.state.lock().expect("state lock");
                    let (change, result) = f(&mut s);
                    let mut p = g.pending.lock().expect("pending lock");
                    if let Change::Record(r) = change {
                        p.buf.extend_from_slice(r.as_bytes());
                        p.appended += 1;
                    }
                    // Even an unchanged reply waits until what it read is durable.
                    (p.appended, result)
                };
                g.wake.notify_one();
                let mut rx = g.durable.subscribe();
                let (_, failed) = *rx
                    .wait_for(|(d, failed)| *failed || *d >= seq)
                    .await
                    .map_err(|_| CallError::Failed("log flusher stopped".into()))?;
                if failed {
                    return Err(CallError::Failed("log write or fdatasync failed".into()));
                }
                result
            }
        }
    }
}

impl Target for NativeTarget {
    async fn add(&self, key: &str, n: i64) -> Result<i64, CallError> {
        let key = key.to_owned();
        self.apply(move |s| {
            let total = s.counters.entry(key.clone()).or_insert(0);
            *total += n;
            let t = *total;
            (Change::Record(format!("add\t{key}\t{n}\n")), Ok(t))
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<i64, CallError> {
        let s = self.0.state.lock().expect("state lock");
        Ok(s.counters.get(key).copied().unwrap_or(0))
    }

    async fn join(&self, user: &str, team: &str) -> Result<(), CallError> {
        let (user, team) = (user.to_owned(), team.to_owned());
        self.apply(move |s| match s.teams.get(&user) {
            Some(current) if *current == team => (Change::None, Ok(())),
            Some(_) => (Change::None, Err(CallError::Refused)),
            None => {
                let record = format!("join\t{user}\t{team}\n");
                s.teams.insert(user, team);
                (Change::Record(record), Ok(()))
            }
        })
        .await
    }

    async fn teams(&self, user: &str) -> Result<Vec<String>, CallError> {
        let s = self.0.state.lock().expect("state lock");
        Ok(s.teams.get(user).cloned().into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_mode_counts_and_refuses_a_second_team() {
        for mode in [NativeLog::None, NativeLog::FsyncEach, NativeLog::GroupCommit] {
            let dir = tempfile::tempdir().unwrap();
            let t = NativeTarget::new(mode, dir.path()).unwrap();
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let t = t.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..50 {
                        t.add("k", 1).await.unwrap();
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            assert_eq!(t.get("k").await.unwrap(), 400, "{mode:?}");
            t.join("sue", "red").await.unwrap();
            t.join("sue", "red").await.unwrap();
            assert!(matches!(t.join("sue", "blue").await, Err(CallError::Refused)));
            assert_eq!(t.teams("sue").await.unwrap(), ["red"]);
            if mode != NativeLog::None {
                let log = std::fs::read_to_string(dir.path().join("native.log")).unwrap();
                assert_eq!(log.lines().count(), 401, "{mode:?}");
            }
        }
    }
}
