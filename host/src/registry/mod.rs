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
//!
//! This file owns the [`Registry`] (open, what is loaded, deploy, activate,
//! commit); [`versions`] the records and their pure planning;
//! [`components`] the component store, compiled artifacts and loading a
//! version; [`propagation`] fetching components from and serving them to
//! other members, and waiting for a deploy to reach them; [`validate`] the
//! upload checks.

mod components;
mod propagation;
mod validate;
mod versions;

use crate::config::RegistryConfig;
use crate::log::CommitLog;
use crate::model::{EntityRef, Keyspace, Op, WriteSet, validate_type_name};
use crate::runtime::{Prepared, Runtime};
use crate::storage::StateStore;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use components::{background_compile, publish};
use propagation::Propagated;
pub use propagation::{ComponentChunk, ComponentPeers, FETCH_CHUNK_BYTES, LOADING_WAIT, Propagation};
pub use validate::{ValidationError, check_declared_imports};
pub use versions::{ActivateOutcome, CanaryRecord, DeployOutcome, MAX_CANARY_IDS, TypeRecord, VersionRecord};

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

/// A version compiled and checked against the linker, ready to instantiate.
pub struct LoadedVersion {
    pub type_name: String,
    pub version: u32,
    pub digest: String,
    pub prepared: Prepared,
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

pub struct Registry {
    runtime: Arc<Runtime>,
    propagation: std::sync::OnceLock<Arc<dyn Propagation>>,
    component_peers: std::sync::OnceLock<Arc<dyn ComponentPeers>>,
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
    /// Whether the store holds every record the metadata group committed. A
    /// member that restarted re-applies its metadata log after the API is up
    /// (after a power cut, records not yet flushed are missing until then):
    /// meanwhile a type it does not know may exist, so it is `Loading`
    /// (retryable), never `UnknownType`.
    synced: std::sync::atomic::AtomicBool,
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
    /// every type (from cached artifacts when they fit this engine). A type
    /// whose component this node does not hold yet (recorded by a deploy
    /// through another member) stays `Loading` until `refresh_in_background`
    /// has fetched it from the other members.
    pub fn open(
        cfg: &RegistryConfig,
        data_dir: &Path,
        runtime: Arc<Runtime>,
        store: Arc<dyn StateStore>,
        log: Arc<dyn CommitLog>,
    ) -> Result<Self, RegistryError> {
        let components_dir = data_dir.join("components");
        let artifacts_dir = data_dir.join("artifacts");
        crate::storage::durable_file::create_dir_all_durably(&components_dir)?;
        crate::storage::durable_file::create_dir_all_durably(&artifacts_dir)?;
        let reg = Self {
            runtime,
            propagation: std::sync::OnceLock::new(),
            component_peers: std::sync::OnceLock::new(),
            loads: tokio::sync::watch::Sender::new(0),
            store: store.clone(),
            log,
            cfg: cfg.clone(),
            components_dir,
            artifacts_dir,
            types: RwLock::new(BTreeMap::new()),
            deploy_lock: Arc::new(tokio::sync::Mutex::new(())),
            synced: std::sync::atomic::AtomicBool::new(true),
        };
        // Nobody else holds the registry yet, so no deploy can race the load.
        match reg.refresh_locked() {
            Ok(_) => {}
            // What this node lacks is fetched once it can reach the others.
            Err(RegistryError::Loading { name }) => {
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
            _ if !self.synced.load(std::sync::atomic::Ordering::Acquire) => {
                RegistryError::Loading { name: type_name.to_owned() }
            }
            _ => RegistryError::UnknownType(type_name.to_owned()),
        }
    }

    /// Says whether the store holds everything the metadata group committed
    /// (see `synced`). A registry opens synced; a cluster member clears it
    /// until its metadata replica has caught up.
    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, std::sync::atomic::Ordering::Release);
    }

    /// Loads what the store records that is not loaded yet: every type at
    /// open, and on a cluster the records another node committed (called
    /// when the metadata replica applies something). Each changed type's
    /// active and canary versions are compiled (or loaded from the artifact
    /// cache) first, then switched to, so turns never wait on a compile.
    /// Returns how many types changed. Blocking: compiles. The caller holds
    /// the deploy lock (or the only handle on the registry).
    /// A type whose component is not here yet is skipped (it
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
                        Err(RegistryError::MissingComponent { .. }) => {
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
        validate::check_declared_imports(bytes)?;
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
        if let (Some(peers), Some(v)) = (self.component_peers.get(), record.version(version))
            && !self.component_path(&v.digest).exists()
            && self.store.get(Keyspace::Registry, &component_key(&v.digest))?.is_none()
        {
            self.fetch_component(peers.as_ref(), &v.digest, v.size_bytes).await?;
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
}
