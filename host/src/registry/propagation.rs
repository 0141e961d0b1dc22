//! How the registry reaches the other members of a cluster: fetching the
//! components a record names and this member lacks from the members that
//! hold them (by digest, in chunks, sha256 checked, stored durably) before
//! loading it; serving chunks of its own components to them; and waiting for
//! a deploy to reach every member (the [`Propagation`] hook).

use super::{Registry, RegistryError, TypeRecord, component_key, publish};
use crate::model::Keyspace;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::sync::Arc;

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
/// digest (`cluster::propagation::OtherMembers`, over the cluster's wire).
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

/// How the registry learns that the other members serve a record (a node
/// alone has no others).
pub trait Propagation: Send + Sync + 'static {
    /// Resolves once every member that is up serves `record` or a later
    /// revision of it (a concurrent change may have followed); the error
    /// names the members that did not in time.
    fn await_members(&self, record: &TypeRecord) -> futures::future::BoxFuture<'static, Result<(), String>>;
}

impl Registry {
    /// Loads what the store records that is not loaded yet (see
    /// `refresh_locked`). The deploy lock is awaited, not blocked on, so no
    /// blocking thread sits waiting for a deploy that itself waits on the
    /// network; then the loading runs on the blocking pool.
    /// Components the store's records need and this node
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
    pub(super) async fn fetch_component(
        &self,
        peers: &dyn ComponentPeers,
        digest: &str,
        size: u64,
    ) -> Result<(), RegistryError> {
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
}

/// The other members' switch to a committed record, awaited after the
/// deploy lock is released (so members' own deploys and refreshes proceed).
pub(super) struct Propagated(pub(super) Option<futures::future::BoxFuture<'static, Result<(), String>>>);

impl Propagated {
    /// Hot swap is cluster-wide: once this resolves, a call through any
    /// member runs the new version.
    pub(super) async fn wait(self) -> Result<(), RegistryError> {
        match self.0 {
            Some(wait) => wait.await.map_err(RegistryError::NotPropagated),
            None => Ok(()),
        }
    }
}
