//! Cranelift's incremental compilation cache: compiled machine code per
//! function, keyed by a hash of the function's IR and the compiler's settings.
//!
//! Why: a TypeScript or Python component is 12–18 MB, nearly all of it the
//! interpreter (SpiderMonkey, CPython), and the interpreter's functions are the
//! same in every component of that language and every version of one entity —
//! the user's code is data in the interpreter's snapshot. Caching per function
//! turns the second such compile from ~20 s into the cost of translating and
//! hashing. The whole-component cache (`runtime.compile_cache_dir`, wasmtime's
//! own) only helps for the same bytes.
//!
//! Where: files under `runtime.compile_cache_dir`'s `functions/` (shared by
//! the nodes of one machine, written by rename so concurrent writers never
//! expose half a file); none without that setting — not in memory either: an
//! interpreter's functions take ~90 MB, too much to hold in every node for
//! the next deploy's sake. Bounded by `runtime.max_function_cache_bytes`: once
//! full, new functions are compiled but not kept. A corrupt or foreign entry
//! is harmless: Cranelift checks what it reads and compiles afresh on a
//! mismatch.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Names a file being written; such files are not entries.
const TMP_PREFIX: &str = ".tmp-";

/// A bounded store of compiled functions (see the module doc).
#[derive(Debug)]
pub struct FunctionCache {
    /// One file per key under here, fanned out by the key's first byte.
    dir: PathBuf,
    /// Bytes held: as found at start plus what this process added.
    bytes: AtomicU64,
    max_bytes: u64,
    full_reported: AtomicBool,
    /// Distinguishes this process's temporary files from another's.
    tmp_seq: AtomicU64,
}

impl FunctionCache {
    /// A cache in `dir` (created if missing), counting what is already there
    /// against `max_bytes`.
    pub fn in_dir(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            bytes: AtomicU64::new(dir_bytes(dir)?),
            dir: dir.to_path_buf(),
            max_bytes,
            full_reported: AtomicBool::new(false),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn file_of(&self, key: &[u8]) -> PathBuf {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let fan = hex.get(..2).unwrap_or("00");
        self.dir.join(fan).join(hex)
    }

    /// Claims room for `len` more bytes, or reports (once) that the cache is full.
    fn reserve(&self, len: u64) -> bool {
        let fits = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_add(len).filter(|n| *n <= self.max_bytes))
            .is_ok();
        if !fits && !self.full_reported.swap(true, Ordering::Relaxed) {
            tracing::info!(
                max_bytes = self.max_bytes,
                "the function compile cache is full; new functions are not kept"
            );
        }
        fits
    }

    fn write_file(&self, path: &Path, value: &[u8]) -> std::io::Result<()> {
        let parent = path.parent().expect("a fanned-out path has a parent");
        std::fs::create_dir_all(parent)?;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = parent.join(format!("{TMP_PREFIX}{}-{seq}", std::process::id()));
        std::fs::write(&tmp, value)?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        std::fs::read(self.file_of(key)).ok().map(Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let path = self.file_of(key);
        let len = (key.len() + value.len()) as u64;
        if path.exists() || !self.reserve(len) {
            return false;
        }
        match self.write_file(&path, &value) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(path = %path.display(), "cannot keep a compiled function: {e}");
                self.bytes.fetch_sub(len, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Bytes of the entries under `dir`, two levels deep (the fan-out). Another
/// node of the machine may be writing meanwhile: its temporary files are not
/// entries, and one renamed or removed between listing and reading its size
/// counts as nothing rather than failing the node's start.
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    fn vanished(e: std::io::Error) -> std::io::Result<u64> {
        if e.kind() == std::io::ErrorKind::NotFound { Ok(0) } else { Err(e) }
    }
    let mut total = 0;
    for fan in std::fs::read_dir(dir)? {
        let fan = fan?;
        if !fan.file_type()?.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(fan.path())? {
            let f = f?;
            if f.file_name().as_encoded_bytes().starts_with(TMP_PREFIX.as_bytes()) {
                continue;
            }
            total += f.metadata().map(|m| m.len()).or_else(vanished)?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::CacheStore;

    #[test]
    fn entries_survive_in_a_directory_and_the_bound_holds_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let c = FunctionCache::in_dir(dir.path(), 100).unwrap();
        assert!(c.get(b"k1").is_none());
        assert!(c.insert(b"k1", vec![7; 40]));
        assert!(!c.insert(b"k1", vec![7; 40]), "an entry is written once");
        assert_eq!(c.get(b"k1").as_deref(), Some(&[7u8; 40][..]));
        // Reopened (another node of the machine): what is there counts.
        let again = FunctionCache::in_dir(dir.path(), 100).unwrap();
        assert_eq!(again.bytes(), 40);
        assert_eq!(again.get(b"k1").as_deref(), Some(&[7u8; 40][..]));
        assert!(again.insert(b"k2", vec![1; 50]));
        assert!(!again.insert(b"k3", vec![1; 50]), "full: not kept");
        assert!(again.get(b"k3").is_none());
        assert_eq!(again.bytes(), 40 + 52);
    }

    /// Nodes of one machine share the directory: one counts it at start while
    /// another writes (a temporary file renamed away) — a file that vanishes
    /// mid-count is not an error. Seen as a node failing to start in CI.
    #[test]
    fn counting_tolerates_files_another_node_renames_or_removes_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let fan = dir.path().join("ab");
        std::fs::create_dir_all(&fan).unwrap();
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let writer = {
            let (fan, done) = (fan.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..20_000u32 {
                    let tmp = fan.join(format!("{TMP_PREFIX}1-{i}"));
                    std::fs::write(&tmp, [0u8; 16]).unwrap();
                    let kept = fan.join(format!("ab{i:08x}"));
                    std::fs::rename(&tmp, &kept).unwrap();
                    std::fs::remove_file(&kept).unwrap();
                }
                done.store(true, Ordering::Relaxed);
            })
        };
        let mut counts = 0;
        while !done.load(Ordering::Relaxed) {
            let c = FunctionCache::in_dir(dir.path(), 1 << 20).expect("a vanished file is not an error");
            assert!(c.bytes() <= 16, "temporary files do not count, so at most one entry: {}", c.bytes());
            counts += 1;
        }
        writer.join().unwrap();
        assert!(counts > 0);
    }
}
