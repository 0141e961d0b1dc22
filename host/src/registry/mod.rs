//! The component registry: upload, validation against the `entity` world,
//! content-addressed storage (sha256), numbered immutable versions per type, the
//! active version, an optional canary (a version pinned for listed entity ids),
//! rollback/promote, and a cache of compiled artifacts so a restart does not
//! recompile. This is the hot-swap seam: the scheduler asks [`Registry::version_for`]
//! at the start of every turn.
//!
//! Registry metadata is written through the commit log (keyspace `Registry`),
//! so a deploy is durable and atomic like any turn. Component bytes are written
//! and fsync'd to `components/` before the metadata that names them, and a
//! version is compiled and linked before any record points at it, so a component
//! that does not compile or validate never becomes active. What a deploy or an
//! activation does to a [`TypeRecord`] is decided by pure functions (`plan_*`).

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
        let empty = TypeRecord { name: name.to_owned(), versions: vec![], active: 0, canary: None };
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

/// How a clustered registry learns that the other members serve a record
/// (a single node has no others).
pub trait Propagation: Send + Sync + 'static {
    /// Resolves once every member that is up serves `record`; the error names
    /// the members that did not in time.
    fn await_members(&self, record: &TypeRecord) -> futures::future::BoxFuture<'static, Result<(), String>>;
}

pub struct Registry {
    runtime: Arc<Runtime>,
    propagation: std::sync::OnceLock<Arc<dyn Propagation>>,
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
/// Component bytes by digest, written with the record of the version that
/// first uses them: on a cluster this is how every node gets them.
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
    /// every type (from cached artifacts when they fit this engine).
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
            store: store.clone(),
            log,
            cfg: cfg.clone(),
            components_dir,
            artifacts_dir,
            types: RwLock::new(BTreeMap::new()),
            deploy_lock: Arc::new(tokio::sync::Mutex::new(())),
        };
        // Nobody else holds the registry yet, so no deploy can race the load.
        reg.refresh_locked()?;
        Ok(reg)
    }

    /// Makes deploys, rollbacks and promotes wait until every member serves them.
    pub fn set_propagation(&self, p: Arc<dyn Propagation>) {
        let _ = self.propagation.set(p);
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
    pub async fn refresh_in_background(
        self: &Arc<Self>,
    ) -> Result<Result<usize, RegistryError>, tokio::task::JoinError> {
        let guard = self.deploy_lock.clone().lock_owned().await;
        let this = self.clone();
        crate::determinism::blocking(move || {
            let _guard = guard;
            this.refresh_locked()
        })
        .await
    }

    /// Loads what the store records that is not loaded yet: every type at
    /// open, and on a cluster the records another node committed (called
    /// when the metadata replica applies something). Each changed type's
    /// active and canary versions are compiled (or loaded from the artifact
    /// cache) first, then switched to, so turns never wait on a compile.
    /// Returns how many types changed. Blocking: compiles. The caller holds
    /// the deploy lock (or the only handle on the registry).
    fn refresh_locked(&self) -> Result<usize, RegistryError> {
        let mut changed = 0;
        for record in self.stored_records()? {
            let mut loaded = match self.types.read().expect("registry lock").get(&record.name) {
                Some(t) if t.record == record => continue,
                Some(t) => t.loaded.clone(),
                None => BTreeMap::new(),
            };
            let keep = [Some(record.active), record.canary.as_ref().map(|c| c.version)];
            loaded.retain(|v, _| keep.contains(&Some(*v)));
            for v in keep.into_iter().flatten() {
                if let std::collections::btree_map::Entry::Vacant(slot) = loaded.entry(v) {
                    slot.insert(self.load_version(&record, v)?);
                }
            }
            tracing::info!(entity_type = %record.name, version = record.active, canary = ?record.canary, "loaded component");
            self.types.write().expect("registry lock").insert(record.name.clone(), TypeState { record, loaded });
            changed += 1;
        }
        Ok(changed)
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
        let t = types.get(&entity.entity_type).ok_or_else(|| RegistryError::UnknownType(entity.entity_type.clone()))?;
        Ok(t.for_id(&entity.id))
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
        let existing = self.types.read().expect("registry lock").get(type_name).map(|t| t.record.clone());
        let plan =
            TypeRecord::plan_deploy(existing.as_ref(), type_name, &digest, bytes.len() as u64, now_ms(), canary)?;
        let Some(record) = plan.record else { return Ok(plan.outcome) };
        let version = plan.outcome.version;
        let (loaded, component) = if plan.outcome.reused {
            (self.loaded_or_load(&record, version).await?, None)
        } else {
            // Compile and check off the async threads: Cranelift takes tens of ms.
            let this = self.clone();
            let d = digest.clone();
            let (prepared, bytes) =
                background_compile(move || Ok((this.compile_and_store(&d, &bytes)?, bytes))).await?;
            let loaded =
                Arc::new(LoadedVersion { type_name: type_name.to_owned(), version, digest: digest.clone(), prepared });
            (loaded, Some((digest.clone(), bytes)))
        };
        let propagated = self.commit(record, Some(loaded), component).await?;
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
        let existing = self.get(type_name)?;
        let plan = existing.plan_activate(version)?;
        let Some(record) = plan.record else { return Ok(plan.outcome) };
        let loaded = self.loaded_or_load(&record, version).await?;
        let propagated = self.commit(record, Some(loaded), None).await?;
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
        let this = self.clone();
        let record = record.clone();
        crate::determinism::blocking(move || this.load_version(&record, version))
            .await
            .map_err(|e| RegistryError::Io(std::io::Error::other(e.to_string())))?
    }

    /// Makes `record` durable through the log, then visible: from here on turns
    /// start on its versions. Keeps exactly the active and canary versions loaded.
    /// `component` (digest, bytes) is stored with the record that first uses it.
    async fn commit(
        &self,
        record: TypeRecord,
        new: Option<Arc<LoadedVersion>>,
        component: Option<(String, Vec<u8>)>,
    ) -> Result<Propagated, RegistryError> {
        let mut ws = WriteSet::default();
        if let Some((digest, bytes)) = component {
            ws.ops.push(Op::Put { keyspace: Keyspace::Registry, key: component_key(&digest), value: bytes });
        }
        ws.ops.push(Op::Put {
            keyspace: Keyspace::Registry,
            key: type_key(&record.name),
            value: serde_json::to_vec(&record).expect("records serialise"),
        });
        self.log.propose(ws).await?;
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
                    // Deployed through another node: the bytes came with the record.
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
        assert_eq!((rec.active, &rec.canary), (1, &None));
        assert!(!serde_json::to_string(&rec).unwrap().contains("canary"));
    }
}
