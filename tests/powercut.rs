//! Power cuts, not just `kill -9`: every node's data directory lives on a
//! `powercut-fs` mount (FUSE, in memory), which keeps only what was fsynced —
//! file data synced on the file, names synced on their directory — when the
//! power is cut. A `kill -9` leaves the page cache behind, so only a cut can
//! show a missing fsync. The real `conflux` binary runs on it under
//! concurrent adds; then every process is killed, the unsynced state dropped,
//! and the nodes restarted on what survived: every acknowledged add is there,
//! none is applied twice, and no node needs repair to start.
//!
//! The daemons' logs go outside the mounts. Each directory the node needs
//! is created by the node itself, so its durability is tested too.

mod support;

use powercut_fs::{Names, PowercutMount};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::*;

/// One test at a time: each loads the machine's cores, and a cluster's
/// elections starve beside another test's load.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Snapshots, store persists and WAL purges happen often, so a cut can land
/// around any of them.
const COMPACT: &str = "log.compact_every_entries=300";
/// On the cluster, every waiting turn fills a batch: a turn that finds its
/// entity's commit in flight runs at once and is placed behind it
/// (pipelined), so cuts also land between pipelined commits.
const PIPELINE: &str = "scheduler.max_turns_per_commit=1";

fn mount(root: &Path, name: &str, names: Names) -> PowercutMount {
    let dir = root.join(name);
    std::fs::create_dir(&dir).unwrap();
    PowercutMount::mount_with(&dir, names).unwrap_or_else(|e| {
        panic!("{e}: the power-cut tests need /dev/fuse and root (or fusermount3, from Debian's fuse3)")
    })
}

/// Shows the tail of each daemon log if the test fails.
struct ShowLogsOnFailure(Vec<PathBuf>);

impl Drop for ShowLogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for l in &self.0 {
                let log = std::fs::read_to_string(l).unwrap_or_default();
                let lines: Vec<&str> = log.lines().filter(|l| !l.contains("openraft")).collect();
                eprintln!("--- {} (last 40 lines) ---", l.display());
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn single_node_survives_a_power_cut(names: Names) {
    let _one = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let mut disk = mount(root.path(), "disk", names);
    let data = disk.path().join("conflux");
    let log = root.path().join("daemon.log");
    let _show = ShowLogsOnFailure(vec![log.clone()]);
    let listen = "127.0.0.1:0";
    let mut d = Daemon::start_logging_to(&data, &log, listen, &["--set", COMPACT]);
    deploy(&d, "counter", &guest_wasm("counter"));
    let runtime = rt();
    let (tally, stop) = (Tally::new(), Arc::new(AtomicBool::new(false)));
    let tasks = start_adds(&runtime, std::slice::from_ref(&d.addr), &tally, &stop);
    std::thread::sleep(Duration::from_millis(1500));
    d.kill9();
    let report = disk.power_cut().unwrap();
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert!(tally.total_acked() > 100, "the load did not get going: {} acks", tally.total_acked());
    eprintln!("power cut dropped {report:?}; {:?}; {} adds acknowledged", disk.stats(), tally.total_acked());
    assert!(report.unsynced_inodes > 0, "the cut dropped nothing, so it tested nothing: {report:?}");

    // No repair: the same command starts it on what survived.
    let d = Daemon::start_logging_to(&data, &log, listen, &["--set", COMPACT]);
    runtime.block_on(async {
        check_counters(&d.addr, &tally).await;
        // And it goes on serving writes.
        let mut c = d.client().await;
        call(&mut c, "counter", "after-cut", "add", "1").await.unwrap();
    });
    // The compiled artifact was synced before it was renamed into place, so
    // the name never points at an empty (or torn) file, which would be loaded
    // as machine code.
    assert!(!d.log().contains("unusable compiled artifact"), "{}", d.log());
}

#[test]
fn a_single_node_loses_no_acknowledged_add_to_a_power_cut() {
    single_node_survives_a_power_cut(Names::OnDirSync);
}

/// The other way a filesystem fails: renames and creates reach the disk at
/// once, data only when synced (a name may come back pointing at nothing).
#[test]
fn a_single_node_survives_a_power_cut_that_keeps_names_but_not_data() {
    single_node_survives_a_power_cut(Names::Immediate);
}

const SECRET: &str = "powercut-test-secret-0123456789";

/// Three members, each on its own power-cut mount, logging outside it.
struct PowerCluster {
    // Fields drop in order: the logs are shown and the members killed
    // before their mounts go.
    _show: ShowLogsOnFailure,
    nodes: Vec<Option<Daemon>>,
    disks: Vec<PowercutMount>,
    addrs: Vec<String>,
    peers: String,
    logs: Vec<PathBuf>,
}

impl PowerCluster {
    fn start(root: &Path) -> PowerCluster {
        let disks: Vec<PowercutMount> = (1..=3).map(|i| mount(root, &format!("disk{i}"), Names::OnDirSync)).collect();
        let addrs: Vec<String> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string())
            .collect();
        let peers = addrs.iter().enumerate().map(|(k, a)| format!("{}={a}", k + 1)).collect::<Vec<_>>().join(",");
        let logs: Vec<PathBuf> = (1..=3).map(|i| root.join(format!("n{i}.log"))).collect();
        let mut c =
            PowerCluster { disks, addrs, peers, _show: ShowLogsOnFailure(logs.clone()), logs, nodes: Vec::new() };
        c.nodes = (0..3).map(|i| Some(c.daemon(i))).collect();
        c
    }

    fn daemon(&self, i: usize) -> Daemon {
        let id = (i + 1).to_string();
        let data = self.disks[i].path().join("conflux");
        let args = [
            "--node-id",
            &id,
            "--peer",
            &self.peers,
            "--cluster-secret",
            SECRET,
            "--set",
            "cluster.shard_count=4",
            "--set",
            COMPACT,
            "--set",
            PIPELINE,
        ];
        Daemon::start_logging_to(&data, &self.logs[i], &self.addrs[i], &args)
    }

    /// Kills the members `which` and cuts their power; returns what was lost.
    fn power_cut(&mut self, which: &[usize]) -> Vec<powercut_fs::CutReport> {
        for &i in which {
            self.nodes[i].take().expect("running").kill9();
        }
        which.iter().map(|&i| self.disks[i].power_cut().unwrap()).collect()
    }

    fn restart(&mut self, which: &[usize]) {
        for &i in which {
            self.nodes[i] = Some(self.daemon(i));
        }
    }

    fn node(&self, i: usize) -> &Daemon {
        self.nodes[i].as_ref().expect("running")
    }
}

/// Adds through every member for a while, then the power of the members
/// `cut` goes out; they restart on what survived, and every counter is
/// checked through every member.
fn cluster_survives_a_power_cut(cut: &[usize]) {
    let _one = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let mut cluster = PowerCluster::start(root.path());
    deploy(cluster.node(0), "counter", &guest_wasm("counter"));
    let runtime = rt();
    let (tally, stop) = (Tally::new(), Arc::new(AtomicBool::new(false)));
    // Callers only on the members whose power goes out: their first error
    // ends them, so what they count is what was acknowledged before the cut.
    let through: Vec<String> = cut.iter().map(|&i| cluster.addrs[i].clone()).collect();
    let tasks = start_adds(&runtime, &through, &tally, &stop);
    std::thread::sleep(Duration::from_millis(2000));
    let reports = cluster.power_cut(cut);
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    eprintln!("power cuts dropped {reports:?}; {} adds acknowledged", tally.total_acked());
    assert!(tally.total_acked() > 100, "the load did not get going: {} acks", tally.total_acked());
    cluster.restart(cut);
    runtime.block_on(async {
        for i in 0..3 {
            check_counters(&cluster.addrs[i], &tally).await;
        }
        let mut c = cluster.node(1).client().await;
        call(&mut c, "counter", "after-cut", "add", "1").await.unwrap();
    });
}

#[test]
fn a_three_node_cluster_loses_no_acknowledged_add_when_every_member_loses_power() {
    cluster_survives_a_power_cut(&[0, 1, 2]);
}

/// Two of three lose power while the third runs on: the two come back on
/// what they synced, rejoin, and nothing acknowledged is lost or doubled.
#[test]
fn a_three_node_cluster_loses_no_acknowledged_add_when_a_majority_loses_power() {
    cluster_survives_a_power_cut(&[0, 1]);
}
