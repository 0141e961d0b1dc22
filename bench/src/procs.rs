//! Starting and stopping the systems under test, and sampling their memory.
//!
//! Every process is a [`Proc`]: dropping it (on success, error, panic, or when
//! the run is interrupted) signals the process, waits a grace period, then
//! kills it. Each system runs in its own temporary directory on 127.0.0.1,
//! on ports the kernel reported free.

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A child process that is stopped when dropped.
pub struct Proc {
    name: String,
    child: Child,
    signal: Signal,
    grace: Duration,
    log: Option<PathBuf>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proc({} pid {})", self.name, self.child.id())
    }
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log` (if given).
    /// Dropping it sends `signal`, waits up to `grace`, then sends SIGKILL.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: Option<&Path>,
        signal: Signal,
        grace: Duration,
    ) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null());
        if let Some(log) = log {
            let f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        let child = cmd.spawn().with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self { name: name.into(), child, signal, grace, log: log.map(Path::to_owned) })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}){}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// The last lines of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        let Some(log) = &self.log else { return String::new() };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        format!("; last lines of {}:\n    {tail}", log.display())
    }

    /// Stops the process: its signal, the grace period, then SIGKILL.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Some(pid) = Pid::from_raw(self.child.id() as i32) {
            let _ = kill_process(pid, self.signal);
        }
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `conflux serve` (`cmd` is the binary, with any environment set)
/// listening on `addr` with data in `dir` and the further `args`; waits until
/// it listens. Its output goes to `dir` + `.log`, which is returned. Stopped
/// with SIGTERM (then SIGKILL) when the `Proc` drops.
pub fn spawn_conflux_serve(
    mut cmd: Command,
    addr: &str,
    dir: &Path,
    args: &[String],
) -> anyhow::Result<(Proc, PathBuf)> {
    cmd.arg("serve").arg("--listen").arg(addr).arg("--data-dir").arg(dir).args(args);
    let log = dir.with_extension("log");
    let (proc, _) = spawn_announcing(
        "conflux",
        cmd,
        &log,
        "conflux listening on ",
        Duration::from_secs(60),
        Signal::TERM,
        Duration::from_secs(10),
    )?;
    Ok((proc, log))
}

/// Spawns `cmd` with a piped stdout and waits until it prints a line starting
/// with `prefix`; returns the rest of that line. Later stdout lines are
/// appended to `log`; stderr goes to `log` directly.
pub fn spawn_announcing(
    name: &str,
    mut cmd: Command,
    log: &Path,
    prefix: &str,
    timeout: Duration,
    signal: Signal,
    grace: Duration,
) -> anyhow::Result<(Proc, String)> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut out = f.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(f);
    let mut child = cmd.spawn().with_context(|| format!("starting {name} ({cmd:?})"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut p = Proc { name: name.into(), child, signal, grace, log: Some(log.to_owned()) };
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(out, "{line}");
            if let Some(rest) = line.strip_prefix(&prefix)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(rest) => return Ok((p, rest)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => p.check_running()?,
            Err(_) => {
                p.check_running()?;
                bail!("{name} did not announce itself within {timeout:?}{}", p.log_tail());
            }
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The founders of a cluster on 127.0.0.1: their addresses (ports free a
/// moment ago) and the `conflux serve` flags that make each one of them.
pub struct Founders {
    pub addrs: Vec<String>,
    /// `--peer`'s value: `1=addr,2=addr,…`.
    peers: String,
    secret: String,
    shards: u32,
}

impl Founders {
    pub fn new(nodes: usize, secret: &str, shards: u32) -> anyhow::Result<Self> {
        let addrs: Vec<String> =
            (0..nodes).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<anyhow::Result<_>>()?;
        let peers = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        Ok(Self { addrs, peers, secret: secret.to_owned(), shards })
    }

    /// The flags of founder `i` (node id `i + 1`).
    pub fn args(&self, i: usize) -> Vec<String> {
        vec![
            "--node-id".into(),
            (i + 1).to_string(),
            "--peer".into(),
            self.peers.clone(),
            "--cluster-secret".into(),
            self.secret.clone(),
            "--set".into(),
            format!("cluster.shard_count={}", self.shards),
        ]
    }
}

/// Whether this process runs as root (PostgreSQL refuses to).
pub fn is_root() -> bool {
    rustix::process::getuid().is_root()
}

/// Runs a command to completion, returning its trimmed stdout.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Samples the memory of a set of processes and their descendants every 200 ms
/// and keeps the peak of their summed proportional set size (PSS, so shared
/// pages — PostgreSQL's shared buffers, the load generator's own binary — are
/// counted once across processes).
pub struct MemSampler {
    roots: Arc<Vec<u32>>,
    peak_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl MemSampler {
    pub fn start(roots: Vec<u32>) -> Self {
        let roots = Arc::new(roots);
        let peak_kb = Arc::new(AtomicU64::new(tree_pss_kb(&roots)));
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, halt, roots_) = (peak_kb.clone(), stop.clone(), roots.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                peak.fetch_max(tree_pss_kb(&roots_), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self { roots, peak_kb, stop }
    }

    /// The peak since the last call (MB), including a sample taken now, and
    /// starts a new period.
    pub fn take_peak_mb(&self) -> f64 {
        let now = tree_pss_kb(&self.roots);
        self.peak_kb.fetch_max(now, Ordering::Relaxed);
        self.peak_kb.swap(now, Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for MemSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `roots` and all their live descendants.
fn tree_of(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(ppid) = parent_pid(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut tree = Vec::new();
    let mut stack = roots.to_vec();
    while let Some(pid) = stack.pop() {
        tree.push(pid);
        if let Some(c) = children.get(&pid) {
            stack.extend(c);
        }
    }
    tree
}

/// Summed PSS (kB) of `roots` and all their descendants.
pub fn tree_pss_kb(roots: &[u32]) -> u64 {
    tree_of(roots).into_iter().map(pss_kb).sum()
}

/// CPU time (user + system, µs) that `roots` and their live descendants have
/// used so far, from /proc/<pid>/stat. Differences over a cell give a
/// system's CPU per call (threads are included: they share the stat).
pub fn tree_cpu_us(roots: &[u32]) -> u64 {
    // USER_HZ: the unit of /proc's times, 100 on every Linux ABI.
    let ticks_per_sec = 100;
    let ticks: u64 = tree_of(roots).into_iter().filter_map(cpu_ticks).sum();
    ticks * 1_000_000 / ticks_per_sec
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After `(comm)`: state ppid … with utime and stime the 12th and 13th fields.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may contain spaces and parentheses.
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

fn pss_kb(pid: u32) -> u64 {
    let field = |file: &str, name: &str| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    field("smaps_rollup", "Pss:").or_else(|| field("status", "VmRSS:")).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        assert!(tree_pss_kb(&[std::process::id()]) > 0);
        assert_eq!(parent_pid(std::process::id()), Some(std::os::unix::process::parent_id()));
        let before = tree_cpu_us(&[std::process::id()]);
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        assert!(tree_cpu_us(&[std::process::id()]) > before, "a busy loop costs this process CPU time");
    }
}
