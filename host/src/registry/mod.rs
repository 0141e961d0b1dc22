//! The component registry: upload, validation against the `entity` world,
//! content-addressed storage (sha256), numbered versions per type, the active
//! version, and a cache of compiled artifacts so a restart does not recompile.
//!
//! Registry metadata is written through the commit log (keyspace `Registry`),
//! so a deploy is durable and atomic like any turn. Component bytes are written
//! and fsync'd to `components/` before the metadata that names them.

mod validate;

use crate::config::RegistryConfig;
use crate::log::CommitLog;
use crate::model::{Keyspace, Op, WriteSet, validate_type_name};
use crate::runtime::{Prepared, Runtime};
use crate::storage::StateStore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
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
}

impl TypeRecord {
    fn version(&self, v: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| r.version == v)
    }
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
}

struct TypeState {
    record: TypeRecord,
    active: Arc<LoadedVersion>,
}

pub struct Registry {
    runtime: Arc<Runtime>,
    log: Arc<dyn CommitLog>,
    cfg: RegistryConfig,
    components_dir: PathBuf,
    artifacts_dir: PathBuf,
    types: RwLock<HashMap<String, TypeState>>,
    /// Deploys are serialised so version numbers are assigned without races.
    deploy_lock: tokio::sync::Mutex<()>,
}

const TYPE_KEY_PREFIX: &str = "type/";

fn type_key(name: &str) -> Vec<u8> {
    format!("{TYPE_KEY_PREFIX}{name}").into_bytes()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

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
        std::fs::create_dir_all(&components_dir)?;
        std::fs::create_dir_all(&artifacts_dir)?;
        let reg = Self {
            runtime,
            log,
            cfg: cfg.clone(),
            components_dir,
            artifacts_dir,
            types: RwLock::new(HashMap::new()),
            deploy_lock: tokio::sync::Mutex::new(()),
        };
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let page = store.scan(Keyspace::Registry, TYPE_KEY_PREFIX.as_bytes(), start_after.as_deref(), 256)?;
            let Some((last, _)) = page.last() else { break };
            start_after = Some(last.clone());
            for (key, value) in &page {
                let name = String::from_utf8_lossy(&key[TYPE_KEY_PREFIX.len()..]).into_owned();
                let record: TypeRecord = serde_json::from_slice(value)
                    .map_err(|e| RegistryError::Corrupt { name: name.clone(), message: e.to_string() })?;
                let active = reg.load_version(&record, record.active)?;
                tracing::info!(entity_type = %name, version = record.active, "loaded component");
                reg.types.write().expect("registry lock").insert(name, TypeState { record, active });
            }
        }
        Ok(reg)
    }

    /// The version new turns of `type_name` run.
    pub fn active(&self, type_name: &str) -> Result<Arc<LoadedVersion>, RegistryError> {
        let types = self.types.read().expect("registry lock");
        types.get(type_name).map(|t| t.active.clone()).ok_or_else(|| RegistryError::UnknownType(type_name.to_owned()))
    }

    /// All types with their versions, sorted by name.
    pub fn list(&self) -> Vec<TypeRecord> {
        let types = self.types.read().expect("registry lock");
        let mut out: Vec<TypeRecord> = types.values().map(|t| t.record.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Validates, compiles and stores a component, then makes it the active
    /// version of `type_name`. Nothing changes unless every step succeeds.
    pub async fn deploy(self: &Arc<Self>, type_name: &str, bytes: Vec<u8>) -> Result<DeployOutcome, RegistryError> {
        validate_type_name(type_name)?;
        if bytes.len() > self.cfg.max_component_bytes {
            return Err(RegistryError::TooLarge { size: bytes.len(), limit: self.cfg.max_component_bytes });
        }
        validate::check_header(&bytes)?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let _guard = self.deploy_lock.lock().await;
        let existing = self.types.read().expect("registry lock").get(type_name).map(|t| t.record.clone());
        if let Some(rec) = &existing
            && rec.version(rec.active).is_some_and(|v| v.digest == digest)
        {
            return Ok(DeployOutcome { version: rec.active, digest, unchanged: true });
        }
        // Compile and check off the async threads: Cranelift takes tens of ms.
        let this = self.clone();
        let digest2 = digest.clone();
        let prepared = tokio::task::spawn_blocking(move || this.compile_and_store(&digest2, &bytes))
            .await
            .map_err(|e| RegistryError::Io(std::io::Error::other(e.to_string())))??;
        let size_bytes = std::fs::metadata(self.component_path(&digest))?.len();
        let mut record =
            existing.unwrap_or_else(|| TypeRecord { name: type_name.to_owned(), versions: vec![], active: 0 });
        let version = record.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        record.versions.push(VersionRecord { version, digest: digest.clone(), size_bytes, deployed_at_ms: now_ms() });
        record.active = version;
        let ws = WriteSet {
            ops: vec![Op::Put {
                keyspace: Keyspace::Registry,
                key: type_key(type_name),
                value: serde_json::to_vec(&record).expect("records serialise"),
            }],
        };
        self.log.propose(ws).await?;
        let active =
            Arc::new(LoadedVersion { type_name: type_name.to_owned(), version, digest: digest.clone(), prepared });
        self.types.write().expect("registry lock").insert(type_name.to_owned(), TypeState { record, active });
        tracing::info!(entity_type = type_name, version, %digest, "deployed component");
        Ok(DeployOutcome { version, digest, unchanged: false })
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

    fn compile_and_store(&self, digest: &str, bytes: &[u8]) -> Result<Prepared, RegistryError> {
        let component =
            Component::new(self.runtime.engine(), bytes).map_err(|e| ValidationError::Compile(format!("{e:#}")))?;
        validate::check_world(self.runtime.engine(), &component)?;
        let prepared = self.runtime.prepare(&component).map_err(|e| ValidationError::Link(e.to_string()))?;
        write_durably(&self.component_path(digest), bytes)?;
        self.write_artifact(digest, &component);
        Ok(prepared)
    }

    /// Artifacts are a cache: failing to write one only costs a recompile later.
    fn write_artifact(&self, digest: &str, component: &Component) {
        let path = self.artifact_path(digest);
        let result = component.serialize().map_err(|e| std::io::Error::other(format!("{e:#}"))).and_then(|b| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, b)?;
            std::fs::rename(&tmp, &path)
        });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "cannot cache compiled component: {e}");
        }
    }

    fn load_version(&self, record: &TypeRecord, version: u32) -> Result<Arc<LoadedVersion>, RegistryError> {
        let v = record.version(version).ok_or_else(|| RegistryError::Corrupt {
            name: record.name.clone(),
            message: format!("active version {version} is not among its versions"),
        })?;
        let artifact = self.artifact_path(&v.digest);
        let component = match load_artifact(self.runtime.engine(), &artifact) {
            Some(c) => c,
            None => {
                let path = self.component_path(&v.digest);
                let bytes = std::fs::read(&path).map_err(|_| RegistryError::MissingComponent {
                    name: record.name.clone(),
                    digest: v.digest.clone(),
                    path: path.clone(),
                })?;
                let c = Component::new(self.runtime.engine(), &bytes)
                    .map_err(|e| ValidationError::Compile(format!("{e:#}")))?;
                self.write_artifact(&v.digest, &c);
                c
            }
        };
        let prepared = self.runtime.prepare(&component).map_err(|e| ValidationError::Link(e.to_string()))?;
        Ok(Arc::new(LoadedVersion { type_name: record.name.clone(), version, digest: v.digest.clone(), prepared }))
    }
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

/// Writes a file so that it survives a crash once this returns: temp file,
/// fsync, rename, fsync of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
