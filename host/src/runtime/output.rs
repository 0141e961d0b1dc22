//! Guest stdout/stderr: routed to the host log line by line, tagged with the
//! entity ref. The last few stderr lines of the current turn are kept so a trap
//! (e.g. a Rust panic, which prints its message before it aborts) can be
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

#[derive(Clone)]
pub struct GuestOutput {
    tag: Arc<str>,
    stream: &'static str,
    inner: Arc<Mutex<Lines>>,
}

#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
    recent: std::collections::VecDeque<String>,
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
    pub fn new(tag: Arc<str>, stream: &'static str) -> Self {
        Self { tag, stream, inner: Arc::new(Mutex::new(Lines::default())) }
    }

    /// Forgets the lines of earlier turns.
    pub fn start_turn(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).recent.clear();
    }

    /// The last lines written during this turn (a trailing partial line
    /// included), joined with " / ", if any.
    pub fn recent(&self) -> Option<String> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !g.partial.is_empty() {
            let line = String::from_utf8_lossy(&g.partial).into_owned();
            g.partial.clear();
            self.emit(&line);
            g.remember(line);
        }
        let lines: Vec<String> = g.recent.drain(..).collect();
        (!lines.is_empty()).then(|| lines.join(" / "))
    }

    fn emit(&self, line: &str) {
        tracing::info!(target: "conflux::guest", entity = %self.tag, stream = self.stream, "{line}");
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
                self.emit(&line);
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
