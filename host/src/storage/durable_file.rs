//! Replacing a file whole and durably: the new content goes to a temporary
//! file beside it, is fsynced, renamed over the old name, and the directory
//! is fsynced. A crash or power cut at any point leaves the old file or the
//! new one, never an empty or partial one (what `std::fs::write`, which
//! truncates first and syncs nothing, can leave). A crash may leave a
//! temporary file (named `.<name>.tmp…`) behind; readers ignore it.

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
