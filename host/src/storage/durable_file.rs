//! Replacing a file whole and durably: the new content goes to a temporary
//! file beside it, is fsynced, renamed over the old name, and the directory
//! is fsynced. A crash or power cut at any point leaves the old file or the
//! new one, never an empty or partial one (what `std::fs::write`, which
//! truncates first and syncs nothing, can leave). A crash may leave a
//! temporary file (named `.<name>.tmp…`) behind; readers ignore it.
//!
//! Also creating directories durably: a directory made with
//! `create_dir_all` exists only in the page cache until its parent is
//! fsynced, and so does everything below it, however carefully each file in
//! it is synced.

use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` durably (see the module doc).
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    publish(stage(path, bytes)?, path)
}

/// The first half of [`write_durably`]: `bytes` in a synced temporary file
/// beside `path`, which `publish` moves into place. Dropping the result
/// instead removes it.
pub fn stage(path: &Path, bytes: &[u8]) -> io::Result<tempfile::TempPath> {
    let dir = parent(path)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut file = tempfile::Builder::new().prefix(&format!(".{name}.tmp")).tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    Ok(file.into_temp_path())
}

/// Renames the synced temporary file `temp` to `path` and syncs the
/// directory, so the new name survives a power cut.
pub fn publish(temp: tempfile::TempPath, path: &Path) -> io::Result<()> {
    temp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(parent(path)?)?.sync_all()
}

/// `create_dir_all` whose result survives a power cut: each directory it
/// creates is made durable by fsyncing its parent. The parent of `path`
/// itself is synced even when `path` existed: a process killed between
/// creating it and syncing may have left it only in the page cache. Call it
/// before writing anything below `path`.
pub fn create_dir_all_durably(path: &Path) -> io::Result<()> {
    // The missing tail of the path, nearest the root last.
    let mut missing = Vec::new();
    let mut p = path;
    while !p.as_os_str().is_empty() && !p.is_dir() {
        missing.push(p);
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    if missing.is_empty() {
        return std::fs::File::open(parent(path)?)?.sync_all();
    }
    for dir in missing.into_iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            // Made a moment ago by someone else: still synced below, for we
            // cannot know whether its creator has synced its parent yet.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(e),
        }
        std::fs::File::open(parent(dir)?)?.sync_all()?;
    }
    Ok(())
}

fn parent(path: &Path) -> io::Result<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Ok(Path::new(".")),
        Some(p) => Ok(p),
        None => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no directory", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_dir_all_durably_makes_the_missing_chain() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all_durably(&deep).unwrap();
        assert!(deep.is_dir());
        // Existing: fine, and idempotent.
        create_dir_all_durably(&deep).unwrap();
        std::fs::write(dir.path().join("a/file"), b"x").unwrap();
        assert!(create_dir_all_durably(&dir.path().join("a/file/d")).is_err());
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        write_durably(&path, b"old").unwrap();
        // Staged, then the process dies before the rename: the temporary
        // file stays behind, as after a real crash.
        let staged = stage(&path, b"new content").unwrap();
        let left = staged.keep().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(left.file_name().unwrap().to_string_lossy().starts_with(".cluster.json.tmp"));
        // The next write replaces it whole.
        write_durably(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }
}
