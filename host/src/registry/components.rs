//! The component store and compiled artifacts: component bytes
//! content-addressed in `components/<sha256>.wasm` (never in the log),
//! compiled artifacts cached in `artifacts/` by digest and the engine's
//! compatibility hash, compilation on a low-priority thread, and loading a
//! recorded version (bytes checked against the record's digest, then
//! [`Registry::prepare`]: the import allow-list, then link).

use super::{LoadedVersion, Registry, RegistryError, TypeRecord, ValidationError, component_key, validate};
use crate::model::Keyspace;
use crate::runtime::Prepared;
use crate::storage::durable_file::write_durably;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wasmtime::component::Component;

impl Registry {
    pub(super) fn component_path(&self, digest: &str) -> PathBuf {
        self.components_dir.join(format!("{digest}.wasm"))
    }

    pub(super) fn artifact_path(&self, digest: &str) -> PathBuf {
        // The engine's compatibility hash keeps artifacts of another wasmtime
        // build or configuration from ever being loaded.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&self.runtime.engine().precompile_compatibility_hash(), &mut h);
        let compat = std::hash::Hasher::finish(&h);
        self.artifacts_dir.join(format!("{digest}-{compat:016x}.cwasm"))
    }

    /// Compiles and checks a component against the world and the linker.
    pub(super) fn compile(&self, bytes: &[u8]) -> Result<(Component, Prepared), RegistryError> {
        let component =
            Component::new(self.runtime.engine(), bytes).map_err(|e| ValidationError::Compile(format!("{e:#}")))?;
        let prepared = self.prepare(&component)?;
        Ok((component, prepared))
    }

    /// The one way a component becomes runnable, whether it was just uploaded,
    /// loaded at start-up, or arrived through the metadata group: its imports
    /// are checked against the allow-list, then it is linked.
    pub(super) fn prepare(&self, component: &Component) -> Result<Prepared, RegistryError> {
        validate::check_world(self.runtime.engine(), component)?;
        Ok(self.runtime.prepare(component).map_err(|e| ValidationError::Link(e.to_string()))?)
    }

    pub(super) fn compile_and_store(&self, digest: &str, bytes: &[u8]) -> Result<Prepared, RegistryError> {
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
    pub(super) fn write_artifact(&self, digest: &str, component: &Component) {
        let path = self.artifact_path(digest);
        let result = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
            .and_then(|b| write_durably(&path, &b));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "cannot cache compiled component: {e}");
        }
    }

    pub(super) fn load_version(&self, record: &TypeRecord, version: u32) -> Result<Arc<LoadedVersion>, RegistryError> {
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

/// Runs a compilation on its own low-priority thread (nice 10): Cranelift then
/// only takes CPU that running turns leave idle, so a deploy does not spike the
/// latency of calls in flight. The thread ends with the compilation, so the
/// lowered priority never leaks into the turn threads.
pub(super) async fn background_compile<T: Send + 'static>(
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
pub(super) fn load_artifact(engine: &wasmtime::Engine, path: &Path) -> Option<Component> {
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
pub(super) fn publish(file: std::fs::File, tmp: &Path, path: &Path) -> std::io::Result<()> {
    file.sync_all()?;
    drop(file);
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
