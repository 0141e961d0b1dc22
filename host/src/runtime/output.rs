//! Guest stdout/stderr: routed to the host log line by line, tagged with the
//! entity ref and the invocation id, and published to [`GuestLogs`] for
//! `conflux logs`. The last few stderr lines of the current turn are kept so a
//! trap (e.g. a Rust panic, which prints its message before it aborts) can be
//! reported with its message.

use bytes::Bytes;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// A partial line longer than this is emitted as is: a guest cannot make the
/// host buffer unbounded output.
const MAX_LINE_BYTES: usize = 8192;
/// Lines of the current turn kept for error reports.
const RECENT_LINES: usize = 4;

/// Followers of `conflux logs --follow` that fall this many lines behind lose
/// the oldest (and are told how many).
const FOLLOW_BUFFER_LINES: usize = 4096;

/// One line a guest wrote.
#[derive(Debug, Clone)]
pub struct GuestLogLine {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// `type/id` of the entity.
    pub entity: Arc<str>,
    pub invocation_id: Arc<str>,
    /// `stdout`, `stderr`, or the level of a `context.log` call (`info`, `warn`…).
    pub stream: &'static str,
    pub line: String,
}

/// The node's recent guest output (a bounded ring) and its live followers.
pub struct GuestLogs {
    recent: Mutex<std::collections::VecDeque<Arc<GuestLogLine>>>,
    capacity: usize,
    live: tokio::sync::broadcast::Sender<Arc<GuestLogLine>>,
}

impl GuestLogs {
    pub fn new(capacity: usize) -> Self {
        let (live, _) = tokio::sync::broadcast::channel(FOLLOW_BUFFER_LINES);
        Self { recent: Mutex::new(Default::default()), capacity: capacity.max(1), live }
    }

    fn publish(&self, line: GuestLogLine) {
        let line = Arc::new(line);
        // Under the ring's lock, so `tail_and_follow` sees each line exactly once.
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(line.clone());
        // No receiver is not an error: nobody follows.
        let _ = self.live.send(line);
    }

    /// The last `n` retained lines that pass `keep`, oldest first, and a
    /// receiver of every line published after them.
    pub fn tail_and_follow(
        &self,
        n: usize,
        keep: impl Fn(&GuestLogLine) -> bool,
    ) -> (Vec<Arc<GuestLogLine>>, tokio::sync::broadcast::Receiver<Arc<GuestLogLine>>) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let mut tail: Vec<_> = recent.iter().rev().filter(|l| keep(l)).take(n).cloned().collect();
        tail.reverse();
        (tail, self.live.subscribe())
    }
}

#[derive(Clone)]
pub struct GuestOutput {
    tag: Arc<str>,
    stream: &'static str,
    inner: Arc<Mutex<Lines>>,
    logs: Arc<GuestLogs>,
}

#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
    recent: std::collections::VecDeque<String>,
    /// The invocation whose turn is running (or ran last).
    invocation: Option<Arc<str>>,
}

impl Lines {
    fn remember(&mut self, line: String) {
        // Rust's panic hook adds a hint about backtraces that says nothing here.
        if line.trim().is_empty() || line.starts_with("note: run with `RUST_BACKTRACE") {
            return;
        }
        if self.recent.len() == RECENT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }
}

impl GuestOutput {
    pub fn new(tag: Arc<str>, stream: &'static str, logs: Arc<GuestLogs>) -> Self {
        Self { tag, stream, inner: Arc::new(Mutex::new(Lines::default())), logs }
    }

    /// Forgets the lines of earlier turns; what follows belongs to `invocation_id`.
    pub fn start_turn(&self, invocation_id: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.recent.clear();
        g.invocation = Some(invocation_id.into());
    }

    /// The last lines written during this turn (a trailing partial line
    /// included), joined with " / ", if any.
    pub fn recent(&self) -> Option<String> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !g.partial.is_empty() {
            let line = String::from_utf8_lossy(&g.partial).into_owned();
            g.partial.clear();
            self.emit(g.invocation.clone(), self.stream, &line);
            g.remember(line);
        }
        let lines: Vec<String> = g.recent.drain(..).collect();
        (!lines.is_empty()).then(|| lines.join(" / "))
    }

    /// A `context.log` call of the current turn (levels 0 trace … 4 error):
    /// to the host log at that level and to the guest logs, tagged like a line
    /// of output but with the level as its stream.
    pub fn log_call(&self, level: u8, message: &str) {
        const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];
        let invocation = self.inner.lock().unwrap_or_else(|p| p.into_inner()).invocation.clone();
        self.emit(invocation, LEVELS[usize::from(level.min(4))], message);
    }

    fn emit(&self, invocation: Option<Arc<str>>, stream: &'static str, line: &str) {
        let invocation = invocation.unwrap_or_else(|| "-".into());
        // `tracing` levels are constants per call site: one site per level.
        macro_rules! event {
            ($level:expr) => {
                tracing::event!(target: "conflux::guest", $level, entity = %self.tag, invocation = %invocation, stream, "{line}")
            };
        }
        match stream {
            "trace" => event!(tracing::Level::TRACE),
            "debug" => event!(tracing::Level::DEBUG),
            "warn" => event!(tracing::Level::WARN),
            "error" => event!(tracing::Level::ERROR),
            _ => event!(tracing::Level::INFO),
        }
        self.logs.publish(GuestLogLine {
            at_ms: crate::model::unix_ms(),
            entity: self.tag.clone(),
            invocation_id: invocation,
            stream,
            line: line.to_owned(),
        });
    }

    fn write_bytes(&self, bytes: &[u8]) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for &b in bytes {
            if b == b'\n' || g.partial.len() >= MAX_LINE_BYTES {
                let line = String::from_utf8_lossy(&g.partial).into_owned();
                g.partial.clear();
                if b != b'\n' {
                    g.partial.push(b);
                }
                self.emit(g.invocation.clone(), self.stream, &line);
                g.remember(line);
            } else {
                g.partial.push(b);
            }
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(entity: &str, text: &str) -> GuestLogLine {
        GuestLogLine { at_ms: 0, entity: entity.into(), invocation_id: "i".into(), stream: "stdout", line: text.into() }
    }

    #[test]
    fn the_ring_is_bounded_and_the_tail_is_filtered_oldest_first() {
        let logs = GuestLogs::new(3);
        for (e, t) in [("a/1", "one"), ("b/1", "two"), ("a/1", "three"), ("a/2", "four")] {
            logs.publish(line(e, t));
        }
        let (tail, _) = logs.tail_and_follow(10, |_| true);
        let texts: Vec<&str> = tail.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["two", "three", "four"], "the oldest line was pushed out");
        let (tail, _) = logs.tail_and_follow(1, |l| l.entity.starts_with("a/"));
        assert_eq!(tail.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["four"]);
    }

    #[test]
    fn followers_see_each_later_line_once_and_learn_what_they_missed() {
        let logs = GuestLogs::new(10);
        logs.publish(line("a/1", "before"));
        let (tail, mut live) = logs.tail_and_follow(10, |_| true);
        assert_eq!(tail.len(), 1);
        logs.publish(line("a/1", "after"));
        assert_eq!(live.try_recv().unwrap().line, "after");
        assert!(live.try_recv().is_err(), "nothing twice");
        for i in 0..FOLLOW_BUFFER_LINES + 5 {
            logs.publish(line("a/1", &i.to_string()));
        }
        assert!(matches!(live.try_recv(), Err(tokio::sync::broadcast::error::TryRecvError::Lagged(5))));
    }

    #[test]
    fn output_splits_lines_and_tags_them_with_the_invocation() {
        let logs = Arc::new(GuestLogs::new(10));
        let out = GuestOutput::new("t/1".into(), "stderr", logs.clone());
        out.start_turn("inv-1");
        out.write_bytes(b"first\nsec");
        out.write_bytes(b"ond\npartial");
        assert_eq!(out.recent().as_deref(), Some("first / second / partial"));
        let (tail, _) = logs.tail_and_follow(10, |_| true);
        let got: Vec<(&str, &str, &str)> =
            tail.iter().map(|l| (&*l.entity, &*l.invocation_id, l.line.as_str())).collect();
        assert_eq!(got, [("t/1", "inv-1", "first"), ("t/1", "inv-1", "second"), ("t/1", "inv-1", "partial")]);
    }
}
