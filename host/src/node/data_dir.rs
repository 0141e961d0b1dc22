//! The data directory as a node finds it at start-up: its lock (one daemon
//! per directory), `cluster.json` (the member it was created as, and the
//! settings it refuses to change), the secret a node started alone generates,
//! the replicas on disk, and a single node's older data adopted into the
//! metadata group.

use super::NodeError;
use crate::cluster::raft::ShardId;
use crate::cluster::sharded::LocalShard;
use crate::log::CommitLog;
use crate::model::Keyspace;
use crate::storage::StateStore;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

/// Lock file in the data directory, held (flock) while a node has it open.
pub(super) const LOCK_FILE: &str = "conflux.lock";
/// Where a node started alone without a configured secret keeps the one it
/// generated.
const SECRET_FILE: &str = "cluster.secret";
/// Written when a cluster member first opens its data directory: what must
/// not change for the life of the cluster.
pub(super) const CLUSTER_FILE: &str = "cluster.json";

/// The settings a member's data is laid out by (ids, not addresses: a member
/// may move). Written once the member's replicas exist.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct ClusterIdentity {
    pub(super) node_id: u64,
    /// The founding members; empty on a member that joined later.
    pub(super) members: Vec<u64>,
    pub(super) shard_count: u32,
    pub(super) replication_factor: usize,
}

impl ClusterIdentity {
    /// What `c` founds (a node started alone is its cluster's only founder).
    pub(super) fn of(c: &crate::config::ClusterConfig) -> Self {
        let mut members: Vec<u64> = c.nodes.iter().map(|m| m.id).collect();
        if c.started_alone() {
            members.push(c.node_id());
        }
        members.sort_unstable();
        Self { node_id: c.node_id(), members, shard_count: c.shard_count(), replication_factor: c.replication_factor }
    }

    /// Founded by this node alone (it may have grown since).
    pub(super) fn alone(&self) -> bool {
        self.members == [self.node_id]
    }

    /// Durably (temp file, fsync, rename, fsync directory): a node whose
    /// power is cut after this returns restarts as the same member, and one
    /// cut before finds no identity rather than an empty file.
    pub(super) fn write(&self, dir: &Path) -> Result<(), NodeError> {
        let file = dir.join(CLUSTER_FILE);
        let json = serde_json::to_vec_pretty(self).expect("serialisable");
        crate::storage::durable_file::write_durably(&file, &json)
            .map_err(|source| NodeError::DataDir { path: file.display().to_string(), source })
    }
}

/// What the data directory says this node is (`None`: a new directory), after
/// refusing settings it was not created with: a member's data under another
/// id; a node started alone restarted with founders (it grows by others
/// joining it); a founder's under another member list, shard count or
/// replication factor, or without its cluster settings; a joined member's as
/// a founder.
pub(super) fn check_cluster_identity(
    dir: &Path,
    cluster: &crate::config::ClusterConfig,
) -> Result<Option<ClusterIdentity>, NodeError> {
    let file = dir.join(CLUSTER_FILE);
    let bad = |m: String| Err(NodeError::Cluster(format!("data directory {}: {m}", dir.display())));
    let stored = match std::fs::read(&file) {
        Ok(bytes) => Some(
            serde_json::from_slice::<ClusterIdentity>(&bytes)
                .map_err(|e| NodeError::Cluster(format!("{} is corrupt: {e}", file.display())))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(NodeError::DataDir { path: file.display().to_string(), source }),
    };
    let Some(s) = stored else { return Ok(None) };
    let wanted = ClusterIdentity::of(cluster);
    match () {
        _ if s.node_id != wanted.node_id && !(cluster.started_alone() && cluster.node_id == 0) => {
            bad(format!("it holds the data of member {}, not {}", s.node_id, wanted.node_id))
        }
        _ if s.alone() && !cluster.nodes.is_empty() => bad(format!(
            "it holds a single node's data (node {}, started alone; see {CLUSTER_FILE}); it grows when other \
             nodes start with --join pointing at it, not by restarting it with founders (--peer)",
            s.node_id
        )),
        _ if !s.alone() && cluster.started_alone() => bad(format!(
            "it holds the data of cluster member {} (see {CLUSTER_FILE}); start it with that member's [cluster] \
             settings",
            s.node_id
        )),
        _ if cluster.join.is_none() && s.members.is_empty() => {
            bad(format!("member {} joined an existing cluster; restart it with --join, not --peer", s.node_id))
        }
        _ if !cluster.nodes.is_empty() && s != wanted => bad(format!(
            "it was created as {s:?}, but the configuration says {wanted:?}; changing a cluster's founding members, \
             shard count or replication factor is not supported"
        )),
        _ if s.alone() && cluster.shard_count.is_some_and(|n| n != s.shard_count) => bad(format!(
            "it was created with {} shards, but the configuration says {}; a cluster's shard count is fixed when \
             it is created",
            s.shard_count,
            cluster.shard_count()
        )),
        _ => Ok(Some(s)),
    }
}

/// The data shards this node has a replica of on disk (`shards/<n>`).
pub(super) fn shards_on_disk(dir: &Path) -> Result<Vec<ShardId>, NodeError> {
    let shards = dir.join("shards");
    let entries = match std::fs::read_dir(&shards) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(NodeError::DataDir { path: shards.display().to_string(), source }),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NodeError::DataDir { path: shards.display().to_string(), source })?;
        if let Some(shard) = entry.file_name().to_str().and_then(|n| n.parse::<ShardId>().ok()) {
            found.push(shard);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// What is wrong with the directory a replica failed to open in.
pub(super) fn replica_open_error(dir: &Path, source: crate::cluster::raft::ReplicaError) -> NodeError {
    let path = dir.display().to_string();
    match source {
        crate::cluster::raft::ReplicaError::Store(source) => NodeError::StoreOpen { path, source },
        source => NodeError::LogOpen { path, source: Box::new(source) },
    }
}

/// [`replica_open_error`] for a replica the shard set opened.
pub(super) fn set_opened(dir: &Path) -> impl Fn(crate::cluster::shards::ShardSetError) -> NodeError + '_ {
    move |e| match e {
        crate::cluster::shards::ShardSetError::Replica { source, .. } => replica_open_error(dir, *source),
        e => NodeError::Cluster(format!("data directory {}: cannot open a shard replica: {e}", dir.display())),
    }
}

/// Moves the registry of a single node's data from before every node was a
/// member (kept in shard 0) into the metadata group, where every member's
/// registry lives. Idempotent: a start interrupted before it wrote the
/// cluster identity copies the same records again.
pub(super) async fn adopt_single_node_registry(
    meta: &LocalShard,
    data: &BTreeMap<ShardId, LocalShard>,
) -> Result<(), String> {
    let Some(shard0) = data.get(&0) else { return Ok(()) };
    // Bounded: the registry holds records, not components; a page at a time.
    const PAGE: usize = 256;
    let mut after: Option<Vec<u8>> = None;
    let mut copied = 0usize;
    loop {
        let rows = shard0
            .store
            .scan(Keyspace::Registry, b"", after.as_deref(), PAGE)
            .map_err(|e| format!("reading the single node's registry: {e}"))?;
        let Some((last, _)) = rows.last() else { break };
        after = Some(last.clone());
        copied += rows.len();
        let ws = crate::model::WriteSet {
            ops: rows
                .into_iter()
                .map(|(key, value)| crate::model::Op::Put { keyspace: Keyspace::Registry, key, value })
                .collect(),
        };
        meta.log.propose(ws).await.map_err(|e| format!("moving the registry into the metadata group: {e}"))?;
    }
    if copied > 0 {
        tracing::info!(records = copied, "moved a single node's registry into its metadata group");
    }
    Ok(())
}

/// The secret of a node started alone without one: generated on its first
/// start and kept in the data directory (readable by its owner only, as the
/// temporary file it is written through is), where the operator finds it to
/// give to nodes joining this one.
pub(super) fn own_secret(dir: &Path) -> Result<crate::config::Secret, NodeError> {
    let file = dir.join(SECRET_FILE);
    let data_dir = |source| NodeError::DataDir { path: file.display().to_string(), source };
    match std::fs::read_to_string(&file) {
        Ok(s) => return Ok(crate::config::Secret::new(s.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(data_dir(e)),
    }
    use rand::Rng as _;
    let secret: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(32).map(char::from).collect();
    crate::storage::durable_file::write_durably(&file, secret.as_bytes()).map_err(data_dir)?;
    tracing::info!(file = %file.display(), "generated this node's cluster secret: nodes join it with --cluster-secret set to the file's contents");
    Ok(crate::config::Secret::new(secret))
}

/// Takes the data directory's exclusive lock, or says who holds it.
pub(super) fn lock_data_dir(dir: &Path) -> Result<File, NodeError> {
    let path = dir.display().to_string();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|source| NodeError::Lock { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(NodeError::InUse { path }),
        Err(TryLockError::Error(source)) => Err(NodeError::Lock { path, source }),
    }
}
