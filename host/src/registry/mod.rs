//! The component registry: upload, validation against the `entity` world,
//! content-addressed storage (sha256), numbered immutable versions per type, the
//! active version, an optional canary (a version pinned for listed entity ids),
//! rollback/promote, and a cache of compiled artifacts so a restart does not
//! recompile. This is the hot-swap seam: the scheduler asks [`Registry::version_for`]
//! at the start of every turn.
//!
//! Registry metadata is written through the commit log (keyspace `Registry`),
//! so a deploy is durable and atomic like any turn. Component bytes never go
//! through the log: they are written and fsync'd to `components/<sha256>.wasm`
//! (the node's content-addressed store) before the record that names them by
//! digest and size is proposed; a cluster member that applies a record whose
//! component it lacks fetches it from the other members by digest, in
//! `FETCH_CHUNK_BYTES` chunks ([`ComponentPeers`]), checks the digest, stores it,
//! then loads it like any other. A version is compiled and linked before any
//! record points at it, so a component that does not compile or validate never
//! becomes active. What a deploy or an activation does to a [`TypeRecord`] is
//! decided by pure functions (`plan_*`); the change is proposed on condition
//! that the stored record is still the one it was planned from (`Op::Expect`),
//! so concurrent changes through different members cannot overwrite each other
//! and a retried proposal cannot apply twice.

mod validate;

use crate::config::RegistryConfig;
use crate::log::CommitLog;
use crate::model::{EntityRef, Keyspace, Op, WriteSet, validate_type_name};
use crate::runtime::{Prepared, Runtime};
use crate::storage::StateStore;
use crate::storage::durable_file::write_durably;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use wasmtime::component::Component;

pub use validate::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown entity type {0:?}; deploy a component for it first")]
    UnknownType(String),
    #[error("invalid entity type name: {0}")]
    BadTypeName(#[from] crate::model::ModelError),
    #[error("component is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("component storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("registry metadata: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("registry commit: {0}")]
    Log(#[from] crate::log::LogError),
    #[error("corrupt registry record for {name:?}: {message}")]
    Corrupt { name: String, message: String },
    #[error("component {digest} of type {name:?} is missing from {path}")]
    MissingComponent { name: String, digest: String, path: PathBuf },
    #[error("entity type {name:?} has no version {version}; its versions are {known}")]
    UnknownVersion { name: String, version: u32, known: String },
    #[error("bad canary: {0}")]
    BadCanary(String),
    #[error("committed, but not every member serves it yet: {0}")]
    NotPropagated(String),
    /// Another change of the type's record committed between the read this
    /// change was planned from and its commit: nothing of it applied.
    #[error(
        "the registry record of {name:?} changed while this change was being made (a concurrent deploy, rollback \
         or promote, maybe through another member); nothing changed: check `conflux versions {name}` and retry"
    )]
    Conflict { name: String },
    /// The type is recorded in the registry but this node has not fetched or
    /// compiled its component yet (it joined or restarted recently, or the
    /// deploy is still reaching it): retry shortly.
    #[error("entity type {name:?} is deployed but this node is still loading its component; retry shortly")]
    Loading { name: String },
    /// No member could provide a component this node needs.
    #[error("cannot fetch component {digest} from the other members: {message}")]
    Fetch { digest: String, message: String },
}

/// Most entity ids one canary may list; a canary is a handful of test entities.
pub const MAX_CANARY_IDS: usize = 1000;

/// A version pinned for some entities of a type while the others stay on the active one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryRecord {
    pub version: u32,
    /// Sorted and without duplicates.
    pub ids: Vec<String>,
}

/// One immutable version of a type, as recorded in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u32,
    /// Lowercase hex sha256 of the component bytes.
    pub digest: String,
    pub size_bytes: u64,
    pub deployed_at_ms: u64,
}

/// Everything the registry knows about one entity type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeRecord {
    pub name: String,
    pub versions: Vec<VersionRecord>,
    pub active: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryRecord>,
    /// Changes committed to this record so far (0 for records written before
    /// it was counted): a member serving revision N or later serves this
    /// change or one made after it.
    #[serde(default)]
    pub revision: u64,
}

/// A record change decided by a `plan_*` function, with what to tell the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan<O> {
    /// `None`: nothing changes.
    record: Option<TypeRecord>,
    outcome: O,
}

impl TypeRecord {
    fn version(&self, v: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| r.version == v)
    }

    /// The version entity `id` runs: the canary's if it lists `id`, else the active one.
    pub fn version_for(&self, id: &str) -> u32 {
        match &self.canary {
            Some(c) if c.ids.binary_search_by(|x| x.as_str().cmp(id)).is_ok() => c.version,
            _ => self.active,
        }
    }

    fn next_version(&self) -> u32 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1
    }

    fn known_versions(&self) -> String {
        self.versions.iter().map(|v| v.version.to_string()).collect::<Vec<_>>().join(", ")
    }

    /// What deploying bytes with `digest` does. Bytes equal to the active version change
    /// nothing; bytes equal to an earlier version reuse its number (a version is its
    /// content); other bytes become version N+1. Without a canary the version becomes
    /// active for everyone and any canary ends; with one it is pinned for `canary` ids.
    fn plan_deploy(
        existing: Option<&TypeRecord>,
        name: &str,
        digest: &str,
        size_bytes: u64,
        now_ms: u64,
        canary: Option<Vec<String>>,
    ) -> Result<Plan<DeployOutcome>, RegistryError> {
        let canary = canary.map(canary_ids).transpose()?;
        let empty = TypeRecord { name: name.to_owned(), versions: vec![], active: 0, canary: None, revision: 0 };
        let rec = existing.unwrap_or(&empty);
        let previous_active = existing.map(|r| r.active);
        let same = rec.versions.iter().find(|v| v.digest == digest).map(|v| v.version);
        let mut outcome = DeployOutcome {
            version: same.unwrap_or_else(|| rec.next_version()),
            digest: digest.to_owned(),
            unchanged: false,
            reused: same.is_some(),
            previous_active,
            canary: None,
        };
        if same.is_some() && same == previous_active {
            outcome.unchanged = true;
            outcome.canary = rec.canary.as_ref().map(|c| c.ids.clone());
            return Ok(Plan { record: None, outcome });
        }
        let mut next = rec.clone();
        next.revision += 1;
        if same.is_none() {
            next.versions.push(VersionRecord {
                version: outcome.version,
                digest: digest.to_owned(),
                size_bytes,
                deployed_at_ms: now_ms,
            });
        }
        match canary {
            None => {
                next.active = outcome.version;
                next.canary = None;
            }
            Some(ids) => {
                if existing.is_none() {
                    return Err(RegistryError::BadCanary(format!(
                        "{name} has no active version yet; deploy its first version without --canary"
                    )));
                }
                outcome.canary = Some(ids.clone());
                next.canary = Some(CanaryRecord { version: outcome.version, ids });
            }
        }
        Ok(Plan { record: Some(next), outcome })
    }

    /// What making `version` active for every entity does (rollback or promote); it
    /// ends any canary.
    fn plan_activate(&self, version: u32) -> Result<Plan<ActivateOutcome>, RegistryError> {
        if self.version(version).is_none() {
            return Err(RegistryError::UnknownVersion {
                name: self.name.clone(),
                version,
                known: self.known_versions(),
            });
        }
        let outcome = ActivateOutcome {
            active: version,
            previous_active: self.active,
            unchanged: version == self.active && self.canary.is_none(),
            ended_canary: self.canary.clone(),
        };
        if outcome.unchanged {
            return Ok(Plan { record: None, outcome });
        }
        let mut next = self.clone();
        next.revision += 1;
        next.active = version;
        next.canary = None;
        Ok(Plan { record: Some(next), outcome })
    }
}

/// Validates, sorts and de-duplicates canary ids.
fn canary_ids(ids: Vec<String>) -> Result<Vec<String>, RegistryError> {
    let mut ids: Vec<String> = ids.into_iter().map(|i| i.trim().to_owned()).filter(|i| !i.is_empty()).collect();
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Err(RegistryError::BadCanary("list at least one entity id".into()));
    }
    if ids.len() > MAX_CANARY_IDS {
        return Err(RegistryError::BadCanary(format!("{} ids; the limit is {MAX_CANARY_IDS}", ids.len())));
    }
    for id in &ids {
        crate::model::validate_entity_id(id).map_err(|e| RegistryError::BadCanary(format!("id {id:?}: {e}")))?;
    }
    Ok(ids)
}

/// A version compiled and checked against the linker, ready to instantiate.
pub struct LoadedVersion {
    pub type_name: String,
    pub version: u32,
    pub digest: String,
    pub prepared: Prepared,
}

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployOutcome {
    pub version: u32,
    pub digest: String,
    /// The bytes were identical to the active version: nothing changed.
    pub unchanged: bool,
    /// The bytes were identical to this earlier version, which was reused.
    pub reused: bool,
    /// The active version before the deploy (`None` for a new type).
    pub previous_active: Option<u32>,
    /// The ids the version is pinned for, when deployed as a canary.
    pub canary: Option<Vec<String>>,
}

/// What a rollback or promote did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivateOutcome {
    pub active: u32,
    pub previous_active: u32,
    /// The version was already active for everyone.
    pub unchanged: bool,
    /// The canary that was in place, now ended.
    pub ended_canary: Option<CanaryRecord>,
}

/// A component compiled and checked but not stored or recorded (a dry run).
pub struct Candidate {
    pub digest: String,
    /// The version number a deploy of these bytes would get.
    pub version: u32,
    pub loaded: Arc<LoadedVersion>,
}

struct TypeState {
    record: TypeRecord,
    /// The active version and the canary's, compiled and ready.
    loaded: BTreeMap<u32, Arc<LoadedVersion>>,
}

impl TypeState {
    fn for_id(&self, id: &str) -> Arc<LoadedVersion> {
        let v = self.record.version_for(id);
        self.loaded.get(&v).cloned().expect("the active and canary versions are always loaded")
    }
}

/// The largest piece of a component asked of a peer in one call: big enough
/// that a 64 MiB component takes 64 calls, small enough that one call never
/// holds a connection (shared with Raft traffic) for long.
pub const FETCH_CHUNK_BYTES: u32 = 1 << 20;
/// How long one chunk may take to arrive before the peer is given up on.
const FETCH_CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an invocation of a type that is recorded but not loaded here yet
/// waits for the load before failing with `RegistryError::Loading`.
pub const LOADING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A piece of a component as a peer sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentChunk {
    pub data: Vec<u8>,
    /// The size of the whole component on the peer.
    pub total_bytes: u64,
}

/// Where a cluster member gets components it lacks: the other members, by
/// digest (the wire lives in `api::cluster`; a single node has none).
pub trait ComponentPeers: Send + Sync + 'static {
    /// The other members, in the order to ask them.
    fn members(&self) -> Vec<u64>;
    /// Up to `max_bytes` of component `digest` from `offset`, from `node`.
    fn read_chunk(
        &self,
        node: u64,
        digest: &str,
        offset: u64,
        max_bytes: u32,
    ) -> futures::future::BoxFuture<'static, Result<ComponentChunk, String>>;
}

/// How a clustered registry learns that the other members serve a record
/// (a single node has no others).
pub trait Propagation: Send + Sync + 'static {
    /// Resolves once every member that is up serves `record` or a later
    /// revision of it (a concurrent change may have followed); the error
    /// names the members that did not in time.
    fn await_members(&self, record: &TypeRecord) -> futures::future::BoxFuture<'static, Result<(), String>>;
}

pub struct Registry {
    runtime: Arc<Runtime>,
    propagation: std::sync::OnceLock<Arc<dyn Propagation>>,
    component_peers: std::sync::OnceLock<Arc<dyn ComponentPeers>>,
    /// A cluster member: a recorded component missing here is fetched, and
    /// its type waits (`Loading`) meanwhile. A single node: it is corruption.
    member: bool,
    /// Bumped whenever a refresh loaded something: what `await_loaded` waits on.
    loads: tokio::sync::watch::Sender<u64>,
    store: Arc<dyn StateStore>,
    log: Arc<dyn CommitLog>,
    cfg: RegistryConfig,
    components_dir: PathBuf,
    artifacts_dir: PathBuf,
    types: RwLock<BTreeMap<String, TypeState>>,
    /// Deploys are serialised so version numbers are assigned without races.
    deploy_lock: Arc<tokio::sync::Mutex<()>>,
}

const TYPE_KEY_PREFIX: &str = "type/";
/// Component bytes by digest, as registries before content-addressed
/// transfer wrote them with the record that first used them: still read (and
/// served to members that lack them), never written.
const COMPONENT_KEY_PREFIX: &str = "component/";

fn component_key(digest: &str) -> Vec<u8> {
    format!("{COMPONENT_KEY_PREFIX}{digest}").into_bytes()
}

fn type_key(name: &str) -> Vec<u8> {
    format!("{TYPE_KEY_PREFIX}{name}").into_bytes()
}

use crate::model::unix_ms as now_ms;

impl Registry {
    /// Opens the registry under `data_dir` and loads the active version of
    /// every type (from cached artifacts when they fit this engine). A
    /// recorded component missing from `components/` fails the open.
    pub fn open(
        cfg: &RegistryConfig,
        data_dir: &Path,
        runtime: Arc<Runtime>,
        store: Arc<dyn StateStore>,
        log: Arc<dyn CommitLog>,
    ) -> Result<Self, RegistryError> {
        Self::open_with(cfg, data_dir, runtime, store, log, false)
    }

    /// Opens the registry of a cluster member: like [`Registry::open`], but a
    /// type whose component this node does not hold yet stays `Loading` until
    /// `refresh_in_background` has fetched it from the other members.
    pub fn open_member(
        cfg: &RegistryConfig,
        data_dir: &Path,
        runtime: Arc<Runtime>,
        store: Arc<dyn StateStore>,
        log: Arc<dyn CommitLog>,
    ) -> Result<Self, RegistryError> {
        Self::open_with(cfg, data_dir, runtime, store, log, true)
    }

    fn open_with(
        cfg: &RegistryConfig,
        data_dir: &Path,
        runtime: Arc<Runtime>,
        store: Arc<dyn StateStore>,
        log: Arc<dyn CommitLog>,
        member: bool,
    ) -> Result<Self, RegistryError> {
        let components_dir = data_dir.join("components");
        let artifacts_dir = data_dir.join("artifacts");
        crate::storage::durable_file::create_dir_all_durably(&components_dir)?;
        crate::storage::durable_file::create_dir_all_durably(&artifacts_dir)?;
        let reg = Self {
            runtime,
            propagation: std::sync::OnceLock::new(),
            component_peers: std::sync::OnceLock::new(),
            member,
            loads: tokio::sync::watch::Sender::new(0),
            store: store.clone(),
            log,
            cfg: cfg.clone(),
            components_dir,
            artifacts_dir,
            types: RwLock::new(BTreeMap::new()),
            deploy_lock: Arc::new(tokio::sync::Mutex::new(())),
        };
        // Nobody else holds the registry yet, so no deploy can race the load.
        match reg.refresh_locked() {
            Ok(_) => {}
            // A member fetches what it lacks once it can reach the others.
            Err(RegistryError::Loading { name }) if member => {
                tracing::info!(entity_type = %name, "a component is not here yet: fetching it from the members");
            }
            Err(e) => return Err(e),
        }
        Ok(reg)
    }

    /// Makes deploys, rollbacks and promotes wait until every member serves them.
    pub fn set_propagation(&self, p: Arc<dyn Propagation>) {
        let _ = self.propagation.set(p);
    }

    /// Where this member fetches the components it lacks.
    pub fn set_component_peers(&self, p: Arc<dyn ComponentPeers>) {
        let _ = self.component_peers.set(p);
    }

    /// The stored record of `type_name` as its exact bytes (what a change is
    /// conditional on) and decoded.
    fn stored_record(&self, type_name: &str) -> Result<(Option<Vec<u8>>, Option<TypeRecord>), RegistryError> {
        let bytes = self.store.get(Keyspace::Registry, &type_key(type_name))?;
        let record = match &bytes {
            Some(b) => Some(
                serde_json::from_slice(b)
                    .map_err(|e| RegistryError::Corrupt { name: type_name.to_owned(), message: e.to_string() })?,
            ),
            None => None,
        };
        Ok((bytes, record))
    }

    /// Every type record in the store.
    fn stored_records(&self) -> Result<Vec<TypeRecord>, RegistryError> {
        let mut records = Vec::new();
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.scan(Keyspace::Registry, TYPE_KEY_PREFIX.as_bytes(), start_after.as_deref(), 256)?;
            let Some((last, _)) = page.last() else { break };
            start_after = Some(last.clone());
            for (key, value) in &page {
                let name = String::from_utf8_lossy(&key[TYPE_KEY_PREFIX.len()..]).into_owned();
                let record: TypeRecord = serde_json::from_slice(value)
                    .map_err(|e| RegistryError::Corrupt { name: name.clone(), message: e.to_string() })?;
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Loads what the store records that is not loaded yet (see
    /// `refresh_locked`). The deploy lock is awaited, not blocked on, so no
    /// blocking thread sits waiting for a deploy that itself waits on the
    /// network; then the loading runs on the blocking pool.
    /// On a member, components the store's records need and this node
    /// lacks are fetched from the other members first (a failure leaves
    /// their types `Loading`, reported as the error, for the next refresh).
    pub async fn refresh_in_background(
        self: &Arc<Self>,
    ) -> Result<Result<usize, RegistryError>, tokio::task::JoinError> {
        let guard = self.deploy_lock.clone().lock_owned().await;
        if let Some(peers) = self.component_peers.get() {
            let missing = match self.missing_components() {
                Ok(m) => m,
                Err(e) => return Ok(Err(e)),
            };
            for (digest, size) in missing {
                if let Err(e) = self.fetch_component(peers.as_ref(), &digest, size).await {
                    tracing::warn!(%digest, "{e}");
                }
            }
        }
        let this = self.clone();
        crate::determinism::blocking(move || {
            let _guard = guard;
            this.refresh_locked()
        })
        .await
    }

    /// The (digest, size) of every component a stored record's active or
    /// canary version needs that this node holds neither as a file nor in
    /// the store (as older registries kept them), for the types whose record
    /// changed since they were loaded.
    fn missing_components(&self) -> Result<Vec<(String, u64)>, RegistryError> {
        let mut missing = Vec::new();
        for record in self.stored_records()? {
            if self.types.read().expect("registry lock").get(&record.name).is_some_and(|t| t.record == record) {
                continue;
            }
            for v in [Some(record.active), record.canary.as_ref().map(|c| c.version)].into_iter().flatten() {
                let Some(v) = record.version(v) else { continue };
                if !self.component_path(&v.digest).exists()
                    && self.store.get(Keyspace::Registry, &component_key(&v.digest))?.is_none()
                    && !missing.iter().any(|(d, _)| d == &v.digest)
                {
                    missing.push((v.digest.clone(), v.size_bytes));
                }
            }
        }
        Ok(missing)
    }

    /// Fetches component `digest` (`size` bytes) from the first member that
    /// has it, chunk by chunk into a temporary file, checks that the bytes
    /// hash to `digest`, and publishes it as `components/<digest>.wasm`.
    async fn fetch_component(&self, peers: &dyn ComponentPeers, digest: &str, size: u64) -> Result<(), RegistryError> {
        let fail = |message: String| RegistryError::Fetch { digest: digest.to_owned(), message };
        if size as usize > self.cfg.max_component_bytes {
            return Err(fail(format!("it is recorded as {size} bytes; the limit is {}", self.cfg.max_component_bytes)));
        }
        let mut errors = Vec::new();
        for node in peers.members() {
            match self.fetch_from(peers, node, digest, size).await {
                Ok(()) => {
                    tracing::info!(%digest, size, from = node, "fetched component");
                    return Ok(());
                }
                Err(e) => errors.push(format!("node {node}: {e}")),
            }
        }
        if errors.is_empty() {
            errors.push("no other member is known".into());
        }
        Err(fail(errors.join("; ")))
    }

    async fn fetch_from(&self, peers: &dyn ComponentPeers, node: u64, digest: &str, size: u64) -> Result<(), String> {
        let tmp = self.components_dir.join(format!("{digest}.part"));
        let path = self.component_path(digest);
        let blocking = |e: tokio::task::JoinError| e.to_string();
        let t = tmp.clone();
        let mut file = crate::determinism::blocking(move || std::fs::File::create(&t))
            .await
            .map_err(blocking)?
            .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        while offset < size {
            let chunk =
                tokio::time::timeout(FETCH_CHUNK_TIMEOUT, peers.read_chunk(node, digest, offset, FETCH_CHUNK_BYTES))
                    .await
                    .map_err(|_| format!("no chunk within {FETCH_CHUNK_TIMEOUT:?}"))??;
            if chunk.total_bytes != size {
                return Err(format!("it holds {} bytes, the record says {size}", chunk.total_bytes));
            }
            let len = chunk.data.len() as u64;
            if len == 0 || offset + len > size || len > u64::from(FETCH_CHUNK_BYTES) {
                return Err(format!("sent {len} bytes at offset {offset} of {size}"));
            }
            hasher.update(&chunk.data);
            file = crate::determinism::blocking(move || file.write_all(&chunk.data).map(|()| file))
                .await
                .map_err(blocking)?
                .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
            offset += len;
        }
        let got = hex::encode(hasher.finalize());
        if got != digest {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("its bytes hash to {got}"));
        }
        let t = tmp.clone();
        crate::determinism::blocking(move || publish(file, &t, &path))
            .await
            .map_err(blocking)?
            .map_err(|e| format!("storing {}: {e}", tmp.display()))
    }

    /// Up to `max_bytes` of component `digest` from `offset`, and its size:
    /// what this node serves to members fetching it. Blocking: reads a file.
    pub fn read_component_chunk(
        &self,
        digest: &str,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ComponentChunk, RegistryError> {
        use std::io::{Read, Seek};
        // The digest names a file: only a sha256 in lowercase hex may.
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(RegistryError::Corrupt { name: digest.to_owned(), message: "not a sha256 digest".into() });
        }
        let path = self.component_path(digest);
        let missing =
            || RegistryError::MissingComponent { name: String::new(), digest: digest.to_owned(), path: path.clone() };
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Deployed by an older registry, with the bytes in the store.
                let bytes = self.store.get(Keyspace::Registry, &component_key(digest))?.ok_or_else(missing)?;
                let start = (offset as usize).min(bytes.len());
                let end = start.saturating_add(max_bytes).min(bytes.len());
                return Ok(ComponentChunk { data: bytes[start..end].to_vec(), total_bytes: bytes.len() as u64 });
            }
            Err(e) => return Err(e.into()),
        };
        let total_bytes = file.metadata()?.len();
        let len = total_bytes.saturating_sub(offset).min(max_bytes as u64) as usize;
        let mut data = vec![0; len];
        file.seek(std::io::SeekFrom::Start(offset.min(total_bytes)))?;
        file.read_exact(&mut data)?;
        Ok(ComponentChunk { data, total_bytes })
    }

    /// Waits until `type_name` is loaded here, up to `wait`: for a type the
    /// registry records but has not fetched or compiled yet. `UnknownType`
    /// at once if no record names it, `Loading` if the wait ran out.
    pub async fn await_loaded(&self, type_name: &str, wait: std::time::Duration) -> Result<(), RegistryError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut loads = self.loads.subscribe();
        loop {
            match self.check_type(type_name) {
                Err(RegistryError::Loading { .. }) => {}
                other => return other,
            }
            if tokio::time::timeout_at(deadline, loads.changed()).await.is_err() {
                return Err(RegistryError::Loading { name: type_name.to_owned() });
            }
        }
    }

    /// Whether `type_name` can run here: loaded, `Loading` (recorded, not
    /// loaded yet), or `UnknownType`.
    pub fn check_type(&self, type_name: &str) -> Result<(), RegistryError> {
        if self.exists(type_name) {
            return Ok(());
        }
        Err(self.not_loaded(type_name))
    }

    /// The error for a type this node has not loaded.
    fn not_loaded(&self, type_name: &str) -> RegistryError {
        match self.store.get(Keyspace::Registry, &type_key(type_name)) {
            Ok(Some(_)) => RegistryError::Loading { name: type_name.to_owned() },
            _ => RegistryError::UnknownType(type_name.to_owned()),
        }
    }

    /// Loads what the store records that is not loaded yet: every type at
    /// open, and on a cluster the records another node committed (called
    /// when the metadata replica applies something). Each changed type's
    /// active and canary versions are compiled (or loaded from the artifact
    /// cache) first, then switched to, so turns never wait on a compile.
    /// Returns how many types changed. Blocking: compiles. The caller holds
    /// the deploy lock (or the only handle on the registry).
    /// On a member, a type whose component is not here yet is skipped (it
    /// keeps the version it had, if any) and the first such type is
    /// reported as `Loading` once the others are loaded.
    fn refresh_locked(&self) -> Result<usize, RegistryError> {
        let mut changed = 0;
        let mut pending = None;
        'records: for record in self.stored_records()? {
            let mut loaded = match self.types.read().expect("registry lock").get(&record.name) {
                Some(t) if t.record == record => continue,
                Some(t) => t.loaded.clone(),
                None => BTreeMap::new(),
            };
            let keep = [Some(record.active), record.canary.as_ref().map(|c| c.version)];
            loaded.retain(|v, _| keep.contains(&Some(*v)));
            for v in keep.into_iter().flatten() {
                if let std::collections::btree_map::Entry::Vacant(slot) = loaded.entry(v) {
                    match self.load_version(&record, v) {
                        Ok(l) => slot.insert(l),
                        Err(RegistryError::MissingComponent { .. }) if self.member => {
                            pending.get_or_insert_with(|| record.name.clone());
                            continue 'records;
                        }
                        Err(e) => return Err(e),
                    };
                }
            }
            tracing::info!(entity_type = %record.name, version = record.active, canary = ?record.canary, "loaded component");
            self.types.write().expect("registry lock").insert(record.name.clone(), TypeState { record, loaded });
            changed += 1;
        }
        if changed > 0 {
            self.loads.send_modify(|n| *n += 1);
        }
        match pending {
            Some(name) => Err(RegistryError::Loading { name }),
            None => Ok(changed),
        }
    }

    /// The version new turns of `type_name` run (ignoring any canary).
    pub fn active(&self, type_name: &str) -> Result<Arc<LoadedVersion>, RegistryError> {
        let types = self.types.read().expect("registry lock");
        let t = types.get(type_name).ok_or_else(|| RegistryError::UnknownType(type_name.to_owned()))?;
        Ok(t.loaded.get(&t.record.active).cloned().expect("the active version is always loaded"))
    }

    /// The version the next turn of `entity` runs: the canary's if it lists the id,
    /// else the active one.
    pub fn version_for(&self, entity: &EntityRef) -> Result<Arc<LoadedVersion>, RegistryError> {
        let types = self.types.read().expect("registry lock");
        match types.get(&entity.entity_type) {
            Some(t) => Ok(t.for_id(&entity.id)),
            None => {
                drop(types);
                Err(self.not_loaded(&entity.entity_type))
            }
        }
    }

    /// Whether `type_name` is deployed.
    pub fn exists(&self, type_name: &str) -> bool {
        self.types.read().expect("registry lock").contains_key(type_name)
    }

    /// One type's record.
    pub fn get(&self, type_name: &str) -> Result<TypeRecord, RegistryError> {
        let types = self.types.read().expect("registry lock");
        types.get(type_name).map(|t| t.record.clone()).ok_or_else(|| RegistryError::UnknownType(type_name.to_owned()))
    }

    /// All types with their versions, sorted by name.
    pub fn list(&self) -> Vec<TypeRecord> {
        let types = self.types.read().expect("registry lock");
        let mut out: Vec<TypeRecord> = types.values().map(|t| t.record.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn check_upload(&self, type_name: &str, bytes: &[u8]) -> Result<String, RegistryError> {
        validate_type_name(type_name)?;
        if bytes.len() > self.cfg.max_component_bytes {
            return Err(RegistryError::TooLarge { size: bytes.len(), limit: self.cfg.max_component_bytes });
        }
        validate::check_header(bytes)?;
        Ok(hex::encode(Sha256::digest(bytes)))
    }

    /// Validates, compiles and stores a component, then makes it the active version
    /// of `type_name` — or, with `canary`, the version of only those entity ids.
    /// Nothing changes unless every step succeeds.
    pub async fn deploy(
        self: &Arc<Self>,
        type_name: &str,
        bytes: Vec<u8>,
        canary: Option<Vec<String>>,
    ) -> Result<DeployOutcome, RegistryError> {
        let digest = self.check_upload(type_name, &bytes)?;
        let guard = self.deploy_lock.lock().await;
        // Planned from the committed record, and committed only if it is
        // still the one: a concurrent change through another member wins or
        // loses whole.
        let (read, existing) = self.stored_record(type_name)?;
        let plan =
            TypeRecord::plan_deploy(existing.as_ref(), type_name, &digest, bytes.len() as u64, now_ms(), canary)?;
        let Some(record) = plan.record else { return Ok(plan.outcome) };
        let version = plan.outcome.version;
        let loaded = if plan.outcome.reused {
            self.loaded_or_load(&record, version).await?
        } else {
            // Compile and check off the async threads: Cranelift takes tens
            // of ms. The bytes are stored (fsync'd, by digest) before the
            // record naming them is proposed: the other members fetch them
            // from here.
            let this = self.clone();
            let d = digest.clone();
            let prepared = background_compile(move || this.compile_and_store(&d, &bytes)).await?;
            Arc::new(LoadedVersion { type_name: type_name.to_owned(), version, digest: digest.clone(), prepared })
        };
        let propagated = self.commit(record, read, Some(loaded)).await?;
        drop(guard);
        propagated.wait().await?;
        tracing::info!(entity_type = type_name, version, %digest, canary = ?plan.outcome.canary, "deployed component");
        Ok(plan.outcome)
    }

    /// Makes `version` (which must exist) active for every entity of `type_name`,
    /// ending any canary. Used by rollback and promote; the version is loaded
    /// before the switch.
    pub async fn activate(self: &Arc<Self>, type_name: &str, version: u32) -> Result<ActivateOutcome, RegistryError> {
        let guard = self.deploy_lock.lock().await;
        let (read, existing) = self.stored_record(type_name)?;
        let existing = existing.ok_or_else(|| RegistryError::UnknownType(type_name.to_owned()))?;
        let plan = existing.plan_activate(version)?;
        let Some(record) = plan.record else { return Ok(plan.outcome) };
        let loaded = self.loaded_or_load(&record, version).await?;
        let propagated = self.commit(record, read, Some(loaded)).await?;
        drop(guard);
        propagated.wait().await?;
        tracing::info!(entity_type = type_name, version, previous = plan.outcome.previous_active, "activated version");
        Ok(plan.outcome)
    }

    /// Validates and compiles `bytes` as the next version of `type_name` without
    /// storing or recording anything.
    pub async fn compile_candidate(
        self: &Arc<Self>,
        type_name: &str,
        bytes: Vec<u8>,
    ) -> Result<Candidate, RegistryError> {
        let digest = self.check_upload(type_name, &bytes)?;
        let existing = self.types.read().expect("registry lock").get(type_name).map(|t| t.record.clone());
        let version = existing
            .as_ref()
            .and_then(|r| r.versions.iter().find(|v| v.digest == digest).map(|v| v.version))
            .unwrap_or_else(|| existing.as_ref().map_or(1, TypeRecord::next_version));
        let this = self.clone();
        let prepared = background_compile(move || this.compile(&bytes).map(|(_, p)| p)).await?;
        let loaded =
            Arc::new(LoadedVersion { type_name: type_name.to_owned(), version, digest: digest.clone(), prepared });
        Ok(Candidate { digest, version, loaded })
    }

    /// The already loaded `version`, or loads it (from the artifact cache) off the async threads.
    async fn loaded_or_load(
        self: &Arc<Self>,
        record: &TypeRecord,
        version: u32,
    ) -> Result<Arc<LoadedVersion>, RegistryError> {
        if let Some(l) =
            self.types.read().expect("registry lock").get(&record.name).and_then(|t| t.loaded.get(&version))
        {
            return Ok(l.clone());
        }
        // A rollback on a member to a version it never loaded: fetch it first.
        if let (Some(peers), Some(v)) = (self.component_peers.get(), record.version(version)) {
            if !self.component_path(&v.digest).exists()
                && self.store.get(Keyspace::Registry, &component_key(&v.digest))?.is_none()
            {
                self.fetch_component(peers.as_ref(), &v.digest, v.size_bytes).await?;
            }
        }
        let this = self.clone();
        let record = record.clone();
        crate::determinism::blocking(move || this.load_version(&record, version))
            .await
            .map_err(|e| RegistryError::Io(std::io::Error::other(e.to_string())))?
    }

    /// Makes `record` durable through the log, then visible: from here on turns
    /// start on its versions. Keeps exactly the active and canary versions loaded.
    /// The write applies only if the stored record is still `read` (its
    /// bytes; `None`: no record), else `Conflict`. The write carries the
    /// record alone (digests and sizes, never component bytes).
    async fn commit(
        &self,
        record: TypeRecord,
        read: Option<Vec<u8>>,
        new: Option<Arc<LoadedVersion>>,
    ) -> Result<Propagated, RegistryError> {
        let key = type_key(&record.name);
        let value = serde_json::to_vec(&record).expect("records serialise");
        let ws = WriteSet {
            ops: vec![
                Op::Expect { keyspace: Keyspace::Registry, key: key.clone(), value: read },
                Op::Put { keyspace: Keyspace::Registry, key: key.clone(), value: value.clone() },
            ],
        };
        match self.log.propose(ws).await {
            Ok(_) => {}
            // The log retries a proposal whose outcome it did not learn; if
            // the first attempt committed, the retry finds our own record.
            Err(crate::log::LogError::Conflict { .. })
                if self.store.get(Keyspace::Registry, &key)?.as_deref() == Some(value.as_slice()) => {}
            Err(crate::log::LogError::Conflict { .. }) => {
                return Err(RegistryError::Conflict { name: record.name.clone() });
            }
            Err(e) => return Err(e.into()),
        }
        let wait = {
            let mut types = self.types.write().expect("registry lock");
            let mut loaded = types.remove(&record.name).map(|t| t.loaded).unwrap_or_default();
            if let Some(n) = new {
                loaded.insert(n.version, n);
            }
            let keep = [Some(record.active), record.canary.as_ref().map(|c| c.version)];
            loaded.retain(|v, _| keep.contains(&Some(*v)));
            debug_assert!(keep.iter().flatten().all(|v| loaded.contains_key(v)));
            let wait = self.propagation.get().map(|p| p.await_members(&record));
            types.insert(record.name.clone(), TypeState { record, loaded });
            wait
        };
        self.loads.send_modify(|n| *n += 1);
        Ok(Propagated(wait))
    }

    fn component_path(&self, digest: &str) -> PathBuf {
        self.components_dir.join(format!("{digest}.wasm"))
    }

    fn artifact_path(&self, digest: &str) -> PathBuf {
        // The engine's compatibility hash keeps artifacts of another wasmtime
        // build or configuration from ever being loaded.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&self.runtime.engine().precompile_compatibility_hash(), &mut h);
        let compat = std::hash::Hasher::finish(&h);
        self.artifacts_dir.join(format!("{digest}-{compat:016x}.cwasm"))
    }

    /// Compiles and checks a component against the world and the linker.
    fn compile(&self, bytes: &[u8]) -> Result<(Component, Prepared), RegistryError> {
        let component =
            Component::new(self.runtime.engine(), bytes).map_err(|e| ValidationError::Compile(format!("{e:#}")))?;
        let prepared = self.prepare(&component)?;
        Ok((component, prepared))
    }

    /// The one way a component becomes runnable, whether it was just uploaded,
    /// loaded at start-up, or arrived through the metadata group: its imports
    /// are checked against the allow-list, then it is linked.
    fn prepare(&self, component: &Component) -> Result<Prepared, RegistryError> {
        validate::check_world(self.runtime.engine(), component)?;
        Ok(self.runtime.prepare(component).map_err(|e| ValidationError::Link(e.to_string()))?)
    }

    fn compile_and_store(&self, digest: &str, bytes: &[u8]) -> Result<Prepared, RegistryError> {
        let (component, prepared) = self.compile(bytes)?;
        write_durably(&self.component_path(digest), bytes)?;
        self.write_artifact(digest, &component);
        Ok(prepared)
    }

    /// Artifacts are a cache: failing to write one only costs a recompile
    /// later. But the one under the name must be whole: it is loaded as
    /// machine code, so it is synced before it is renamed into place (a
    /// rename that reaches the disk before the data would leave the name
    /// pointing at an empty or torn file after a power cut).
    fn write_artifact(&self, digest: &str, component: &Component) {
        let path = self.artifact_path(digest);
        let result = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
            .and_then(|b| write_durably(&path, &b));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "cannot cache compiled component: {e}");
        }
    }

    fn load_version(&self, record: &TypeRecord, version: u32) -> Result<Arc<LoadedVersion>, RegistryError> {
        let v = record.version(version).ok_or_else(|| RegistryError::Corrupt {
            name: record.name.clone(),
            message: format!("version {version} is not among its versions"),
        })?;
        let artifact = self.artifact_path(&v.digest);
        let component = match load_artifact(self.runtime.engine(), &artifact) {
            Some(c) => c,
            None => {
                let path = self.component_path(&v.digest);
                let bytes = match std::fs::read(&path) {
                    Ok(b) => b,
                    // Deployed by an older registry: the bytes came with the record.
                    Err(_) => {
                        let stored =
                            self.store.get(Keyspace::Registry, &component_key(&v.digest))?.ok_or_else(|| {
                                RegistryError::MissingComponent {
                                    name: record.name.clone(),
                                    digest: v.digest.clone(),
                                    path: path.clone(),
                                }
                            })?;
                        write_durably(&path, &stored)?;
                        stored
                    }
                };
                let digest = hex::encode(Sha256::digest(&bytes));
                if digest != v.digest {
                    return Err(RegistryError::Corrupt {
                        name: record.name.clone(),
                        message: format!("version {version}'s component bytes hash to {digest}, not {}", v.digest),
                    });
                }
                let c = Component::new(self.runtime.engine(), &bytes)
                    .map_err(|e| ValidationError::Compile(format!("{e:#}")))?;
                self.write_artifact(&v.digest, &c);
                c
            }
        };
        let prepared = self.prepare(&component)?;
        Ok(Arc::new(LoadedVersion { type_name: record.name.clone(), version, digest: v.digest.clone(), prepared }))
    }
}

/// The other members' switch to a committed record, awaited after the
/// deploy lock is released (so members' own deploys and refreshes proceed).
struct Propagated(Option<futures::future::BoxFuture<'static, Result<(), String>>>);

impl Propagated {
    /// Hot swap is cluster-wide: once this resolves, a call through any
    /// member runs the new version.
    async fn wait(self) -> Result<(), RegistryError> {
        match self.0 {
            Some(wait) => wait.await.map_err(RegistryError::NotPropagated),
            None => Ok(()),
        }
    }
}

/// Runs a compilation on its own low-priority thread (nice 10): Cranelift then
/// only takes CPU that running turns leave idle, so a deploy does not spike the
/// latency of calls in flight. The thread ends with the compilation, so the
/// lowered priority never leaks into the turn threads.
async fn background_compile<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    if crate::determinism::simulated() {
        // A simulation's compile ends in the simulated instant it began in.
        return work();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("conflux-compile".into()).spawn(move || {
        // On Linux this applies to the calling thread only; failing to lower it is harmless.
        let _ = rustix::process::setpriority_process(None, 10);
        let _ = tx.send(work());
    })?;
    rx.await.map_err(|_| RegistryError::Io(std::io::Error::other("the compile thread panicked")))?
}

#[allow(unsafe_code)]
fn load_artifact(engine: &wasmtime::Engine, path: &Path) -> Option<Component> {
    if !path.exists() {
        return None;
    }
    // SAFETY: artifacts are only ever written by this host, from components it
    // compiled itself, into its own data directory, under a name that includes
    // the engine's compatibility hash; users can never upload precompiled code.
    match unsafe { Component::deserialize_file(engine, path) } {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring unusable compiled artifact: {e:#}");
            None
        }
    }
}

/// Makes `tmp` (written through `file`) durable and renames it to `path`.
fn publish(file: std::fs::File, tmp: &Path, path: &Path) -> std::io::Result<()> {
    file.sync_all()?;
    drop(file);
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(rec: Option<&TypeRecord>, digest: &str, canary: Option<&[&str]>) -> Plan<DeployOutcome> {
        let canary = canary.map(|ids| ids.iter().map(|s| s.to_string()).collect());
        TypeRecord::plan_deploy(rec, "counter", digest, 10, 1000, canary).unwrap()
    }

    fn record(p: Plan<DeployOutcome>) -> TypeRecord {
        p.record.expect("the plan changes the record")
    }

    #[test]
    fn deploys_number_versions_and_identical_bytes_change_nothing() {
        let v1 = record(deploy(None, "aa", None));
        assert_eq!((v1.active, v1.versions.len()), (1, 1));
        let same = deploy(Some(&v1), "aa", None);
        assert!(same.record.is_none() && same.outcome.unchanged && same.outcome.version == 1);
        let v2 = deploy(Some(&v1), "bb", None);
        assert_eq!((v2.outcome.version, v2.outcome.previous_active, v2.outcome.reused), (2, Some(1), false));
        let v2 = record(v2);
        assert_eq!(v2.active, 2);
        // Bytes of an earlier version reuse its number instead of minting a new one.
        let back = deploy(Some(&v2), "aa", None);
        assert!(back.outcome.reused && !back.outcome.unchanged && back.outcome.version == 1);
        let back = record(back);
        assert_eq!((back.active, back.versions.len()), (1, 2));
        // Every change counts: propagation waits for this revision or a later one.
        assert_eq!((v1.revision, v2.revision, back.revision), (1, 2, 3));
    }

    #[test]
    fn a_canary_pins_listed_ids_until_promote_or_rollback() {
        let v1 = record(deploy(None, "aa", None));
        let c = deploy(Some(&v1), "bb", Some(&["z", "a", "a", " "]));
        assert_eq!(c.outcome.canary.as_deref(), Some(&["a".to_string(), "z".to_string()][..]));
        let c = record(c);
        assert_eq!(c.active, 1);
        assert_eq!((c.version_for("a"), c.version_for("z"), c.version_for("b")), (2, 2, 1));
        let promoted = c.plan_activate(2).unwrap();
        assert_eq!(promoted.outcome.ended_canary.as_ref().map(|c| c.version), Some(2));
        let promoted = promoted.record.unwrap();
        assert_eq!((promoted.active, promoted.canary.is_none(), promoted.version_for("b")), (2, true, 2));
        // Rolling back while a canary runs ends it too.
        let rolled = c.plan_activate(1).unwrap();
        assert!(!rolled.outcome.unchanged);
        assert_eq!(rolled.record.unwrap().version_for("a"), 1);
    }

    #[test]
    fn bad_canaries_and_unknown_versions_are_refused() {
        let fresh = TypeRecord::plan_deploy(None, "counter", "aa", 1, 1, Some(vec!["a".into()]));
        assert!(matches!(fresh, Err(RegistryError::BadCanary(m)) if m.contains("first version")));
        let v1 = record(deploy(None, "aa", None));
        for ids in [vec![], vec![" ".to_string()], vec!["bad\nid".to_string()]] {
            assert!(matches!(
                TypeRecord::plan_deploy(Some(&v1), "counter", "bb", 1, 1, Some(ids)),
                Err(RegistryError::BadCanary(_))
            ));
        }
        let too_many = (0..=MAX_CANARY_IDS).map(|i| i.to_string()).collect();
        assert!(TypeRecord::plan_deploy(Some(&v1), "counter", "bb", 1, 1, Some(too_many)).is_err());
        let e = v1.plan_activate(7).unwrap_err().to_string();
        assert!(e.contains("no version 7") && e.contains("versions are 1"), "{e}");
        assert!(v1.plan_activate(1).unwrap().outcome.unchanged);
    }

    #[test]
    fn records_without_a_canary_field_still_load() {
        let old = r#"{"name":"counter","versions":[{"version":1,"digest":"aa","size_bytes":1,"deployed_at_ms":2}],"active":1}"#;
        let rec: TypeRecord = serde_json::from_str(old).unwrap();
        assert_eq!((rec.active, &rec.canary, rec.revision), (1, &None, 0));
        assert!(!serde_json::to_string(&rec).unwrap().contains("canary"));
    }
}
