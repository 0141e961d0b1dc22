//! The filesystem's state, with no FUSE in it: a *live* tree (what processes
//! see) and a *durable* record (what a power cut leaves), per inode.
//!
//! The durable record of an inode changes only when it is synced: `fsync` /
//! `fdatasync` of a file copies its data and size, `fsync` of a directory
//! copies its entries (the names, not the files they name). This is the
//! contract `fsync(2)` documents and nothing more — a new or renamed name
//! survives only once its directory is synced; a file whose name survived but
//! whose data was never synced comes back empty. A power cut rebuilds the live
//! tree from the durable records reachable from the root and drops the rest.
//!
//! That is [`Names::OnDirSync`]. [`Names::Immediate`] is the other way a real
//! filesystem fails (ext4 with `data=writeback`, LazyFS over a journaled
//! filesystem): every create, rename and unlink is durable at once, while data
//! still needs its fsync — so a file renamed into place before its data was
//! synced comes back under the new name, empty.
//!
//! File data is kept in 4 KiB blocks shared (`Arc`) between the live and the
//! durable copy, so a sync costs one pointer copy per block and a write copies
//! only the block it touches.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::time::SystemTime;

/// The root directory's inode number (FUSE's).
pub const ROOT: u64 = 1;

const BLOCK: usize = 4096;

/// Errors of filesystem operations, each one errno.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not supported")]
    Unsupported,
}

/// A file's bytes: a size and the blocks written so far (holes read as zeros).
#[derive(Clone, Debug, Default)]
pub struct Data {
    size: u64,
    blocks: BTreeMap<u64, Arc<[u8; BLOCK]>>,
}

impl Data {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Up to `len` bytes from `offset` (fewer at the end of the file).
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        if offset >= self.size || len == 0 {
            return Vec::new();
        }
        let end = self.size.min(offset.saturating_add(len as u64));
        let mut out = vec![0u8; (end - offset) as usize];
        let first = offset / BLOCK as u64;
        let last = (end - 1) / BLOCK as u64;
        for (&b, block) in self.blocks.range(first..=last) {
            let block_start = b * BLOCK as u64;
            let from = offset.max(block_start);
            let to = end.min(block_start + BLOCK as u64);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&block[(from - block_start) as usize..(to - block_start) as usize]);
        }
        out
    }

    pub fn write(&mut self, offset: u64, bytes: &[u8]) {
        let mut pos = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let b = pos / BLOCK as u64;
            let within = (pos % BLOCK as u64) as usize;
            let n = (BLOCK - within).min(rest.len());
            let block = self.blocks.entry(b).or_insert_with(|| Arc::new([0u8; BLOCK]));
            // Copies the block only if the durable record still shares it.
            Arc::make_mut(block)[within..within + n].copy_from_slice(&rest[..n]);
            pos += n as u64;
            rest = &rest[n..];
        }
        self.size = self.size.max(offset + bytes.len() as u64);
    }

    pub fn set_size(&mut self, size: u64) {
        if size < self.size {
            let keep = size.div_ceil(BLOCK as u64);
            self.blocks.split_off(&keep);
            let within = (size % BLOCK as u64) as usize;
            if within != 0
                && let Some(block) = self.blocks.get_mut(&(size / BLOCK as u64))
            {
                // A later extension must read zeros here, not the old bytes.
                Arc::make_mut(block)[within..].fill(0);
            }
        }
        self.size = size;
    }
}

/// What an inode holds.
#[derive(Clone, Debug)]
pub enum Content {
    File(Data),
    Dir(BTreeMap<OsString, u64>),
    Symlink(OsString),
}

/// The kind of an inode, as `stat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// An inode: content and the metadata `stat` shows.
#[derive(Clone, Debug)]
pub struct Inode {
    pub content: Content,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Inode {
    fn new(content: Content, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        Inode { content, perm, uid, gid, atime: now, mtime: now, ctime: now }
    }

    pub fn kind(&self) -> Kind {
        match self.content {
            Content::File(_) => Kind::File,
            Content::Dir(_) => Kind::Dir,
            Content::Symlink(_) => Kind::Symlink,
        }
    }

    /// What survives of this inode if only its name was synced: the same
    /// kind, empty (a symlink's target is part of creating it).
    fn placeholder(&self) -> Inode {
        let content = match &self.content {
            Content::File(_) => Content::File(Data::default()),
            Content::Dir(_) => Content::Dir(BTreeMap::new()),
            Content::Symlink(t) => Content::Symlink(t.clone()),
        };
        Inode { content, ..self.clone() }
    }
}

/// What `stat` shows of an inode.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// What a new name is created as.
#[derive(Clone, Debug)]
pub enum NewNode {
    File,
    Dir,
    Symlink(OsString),
}

/// When a change of names (create, link, rename, unlink) becomes durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Names {
    /// Only when its directory is fsynced (what `fsync(2)` promises).
    #[default]
    OnDirSync,
    /// At once, before any data written to the files it names.
    Immediate,
}

/// What one power cut threw away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Inodes changed since their last sync (data or entries) whose changes were lost.
    pub unsynced_inodes: usize,
    /// Inodes that existed before the cut and are gone after it.
    pub vanished_inodes: usize,
}

/// Counters over the filesystem's life (across cuts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub file_syncs: u64,
    pub dir_syncs: u64,
    pub writes: u64,
    pub cuts: u64,
}

/// The whole filesystem.
#[derive(Debug)]
pub struct Fs {
    live: HashMap<u64, Inode>,
    /// Names pointing at each live inode.
    links: HashMap<u64, u32>,
    /// Open handles per live inode: an unlinked file stays until closed.
    open: HashMap<u64, u32>,
    durable: HashMap<u64, Inode>,
    /// Live inodes changed since their last sync.
    dirty: HashSet<u64>,
    next_ino: u64,
    names: Names,
    stats: Stats,
}

impl Default for Fs {
    fn default() -> Self {
        Fs::new(Names::default())
    }
}

impl Fs {
    /// An empty filesystem whose (empty) root directory is durable.
    pub fn new(names: Names) -> Fs {
        let root = Inode::new(Content::Dir(BTreeMap::new()), 0o755, 0, 0);
        Fs {
            live: HashMap::from([(ROOT, root.clone())]),
            links: HashMap::from([(ROOT, 1)]),
            open: HashMap::new(),
            durable: HashMap::from([(ROOT, root)]),
            dirty: HashSet::new(),
            next_ino: ROOT + 1,
            names,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn node(&self, ino: u64) -> Result<&Inode, FsError> {
        self.live.get(&ino).ok_or(FsError::NotFound)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Inode, FsError> {
        self.live.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, FsError> {
        match &self.node(dir)?.content {
            Content::Dir(e) => Ok(e),
            _ => Err(FsError::NotDir),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, FsError> {
        self.dirty.insert(dir);
        let node = self.node_mut(dir)?;
        let now = SystemTime::now();
        node.mtime = now;
        node.ctime = now;
        match &mut node.content {
            Content::Dir(e) => Ok(e),
            _ => Err(FsError::NotDir),
        }
    }

    pub fn attr(&self, ino: u64) -> Result<Attr, FsError> {
        let node = self.node(ino)?;
        let (size, nlink) = match &node.content {
            Content::File(d) => (d.size(), self.links.get(&ino).copied().unwrap_or(0)),
            Content::Dir(e) => (e.len() as u64, 2),
            Content::Symlink(t) => (t.len() as u64, self.links.get(&ino).copied().unwrap_or(0)),
        };
        Ok(Attr {
            ino,
            kind: node.kind(),
            size,
            perm: node.perm,
            nlink,
            uid: node.uid,
            gid: node.gid,
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, FsError> {
        self.entries(parent)?.get(name).copied().ok_or(FsError::NotFound)
    }

    /// Creates `name` in `parent`; `Exists` if the name is taken.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        what: NewNode,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64, FsError> {
        if self.entries(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        let content = match what {
            NewNode::File => Content::File(Data::default()),
            NewNode::Dir => Content::Dir(BTreeMap::new()),
            NewNode::Symlink(target) => Content::Symlink(target),
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        self.live.insert(ino, Inode::new(content, perm, uid, gid));
        self.links.insert(ino, 1);
        self.dirty.insert(ino);
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        self.names_changed(&[parent]);
        Ok(ino)
    }

    /// A second name for the file `ino`.
    pub fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Result<(), FsError> {
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(FsError::Invalid);
        }
        if self.entries(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        *self.links.entry(ino).or_default() += 1;
        self.names_changed(&[parent]);
        Ok(())
    }

    /// Removes a name (`dir`: rmdir, which needs an empty directory).
    pub fn unlink(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), FsError> {
        let ino = self.lookup(parent, name)?;
        match (&self.node(ino)?.content, dir) {
            (Content::Dir(e), true) if !e.is_empty() => return Err(FsError::NotEmpty),
            (Content::Dir(_), true) => {}
            (Content::Dir(_), false) => return Err(FsError::IsDir),
            (_, true) => return Err(FsError::NotDir),
            (_, false) => {}
        }
        self.entries_mut(parent)?.remove(name);
        self.drop_link(ino);
        self.names_changed(&[parent]);
        Ok(())
    }

    fn drop_link(&mut self, ino: u64) {
        let links = self.links.entry(ino).or_default();
        *links = links.saturating_sub(1);
        if *links == 0 {
            self.links.remove(&ino);
            self.forget_if_unused(ino);
        }
    }

    fn forget_if_unused(&mut self, ino: u64) {
        if !self.links.contains_key(&ino) && !self.open.contains_key(&ino) {
            // The durable record (if any) stays: a synced name may still point here.
            self.live.remove(&ino);
            self.dirty.remove(&ino);
        }
    }

    /// `rename(2)` (with `noreplace`: RENAME_NOREPLACE).
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        noreplace: bool,
    ) -> Result<(), FsError> {
        let ino = self.lookup(parent, name)?;
        self.entries(new_parent)?;
        let is_dir = self.node(ino)?.kind() == Kind::Dir;
        if let Ok(old) = self.lookup(new_parent, new_name) {
            if old == ino {
                return Ok(());
            }
            if noreplace {
                return Err(FsError::Exists);
            }
            match (&self.node(old)?.content, is_dir) {
                (Content::Dir(e), true) if !e.is_empty() => return Err(FsError::NotEmpty),
                (Content::Dir(_), true) => {}
                (Content::Dir(_), false) => return Err(FsError::IsDir),
                (_, true) => return Err(FsError::NotDir),
                (_, false) => {}
            }
            self.entries_mut(new_parent)?.remove(new_name);
            self.drop_link(old);
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(new_parent)?.insert(new_name.to_owned(), ino);
        self.node_mut(ino)?.ctime = SystemTime::now();
        self.names_changed(&[parent, new_parent]);
        Ok(())
    }

    /// Names in `dir`, in order.
    pub fn list(&self, dir: u64) -> Result<Vec<(OsString, u64, Kind)>, FsError> {
        Ok(self
            .entries(dir)?
            .iter()
            .map(|(n, &i)| (n.clone(), i, self.live.get(&i).map_or(Kind::File, Inode::kind)))
            .collect())
    }

    pub fn readlink(&self, ino: u64) -> Result<OsString, FsError> {
        match &self.node(ino)?.content {
            Content::Symlink(t) => Ok(t.clone()),
            _ => Err(FsError::Invalid),
        }
    }

    fn data(&self, ino: u64) -> Result<&Data, FsError> {
        match &self.node(ino)?.content {
            Content::File(d) => Ok(d),
            Content::Dir(_) => Err(FsError::IsDir),
            Content::Symlink(_) => Err(FsError::Invalid),
        }
    }

    fn data_mut(&mut self, ino: u64) -> Result<&mut Data, FsError> {
        self.dirty.insert(ino);
        let node = self.node_mut(ino)?;
        let now = SystemTime::now();
        node.mtime = now;
        node.ctime = now;
        match &mut node.content {
            Content::File(d) => Ok(d),
            Content::Dir(_) => Err(FsError::IsDir),
            Content::Symlink(_) => Err(FsError::Invalid),
        }
    }

    pub fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, FsError> {
        Ok(self.data(ino)?.read(offset, len))
    }

    pub fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<usize, FsError> {
        self.data_mut(ino)?.write(offset, bytes);
        self.stats.writes += 1;
        Ok(bytes.len())
    }

    pub fn set_size(&mut self, ino: u64, size: u64) -> Result<(), FsError> {
        self.data_mut(ino)?.set_size(size);
        Ok(())
    }

    /// `fallocate(2)` mode 0 (and KEEP_SIZE, which changes nothing visible).
    pub fn allocate(&mut self, ino: u64, offset: u64, len: u64, keep_size: bool) -> Result<(), FsError> {
        let end = offset.checked_add(len).ok_or(FsError::Invalid)?;
        if !keep_size && end > self.data(ino)?.size() {
            self.set_size(ino, end)?;
        }
        Ok(())
    }

    /// Changes metadata (mode bits, owner, times): dirty until synced.
    pub fn set_meta(&mut self, ino: u64, change: impl FnOnce(&mut Inode)) -> Result<(), FsError> {
        self.dirty.insert(ino);
        let node = self.node_mut(ino)?;
        change(node);
        node.ctime = SystemTime::now();
        Ok(())
    }

    pub fn opened(&mut self, ino: u64) -> Result<(), FsError> {
        self.node(ino)?;
        *self.open.entry(ino).or_default() += 1;
        Ok(())
    }

    pub fn released(&mut self, ino: u64) {
        if let Some(n) = self.open.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&ino);
                self.forget_if_unused(ino);
            }
        }
    }

    /// `fsync`/`fdatasync` of a file or a directory: its durable record
    /// becomes its live state. For a directory that is its list of names;
    /// an inode named there that was never synced survives as an empty one.
    pub fn sync(&mut self, ino: u64) -> Result<(), FsError> {
        if self.node(ino)?.kind() == Kind::Dir {
            self.stats.dir_syncs += 1;
            self.persist_entries(ino);
        } else {
            self.stats.file_syncs += 1;
            let node = self.node(ino)?.clone();
            self.durable.insert(ino, node);
        }
        self.dirty.remove(&ino);
        Ok(())
    }

    /// A directory's names become durable; a name of an inode never synced
    /// keeps an empty one of its kind.
    fn persist_entries(&mut self, dir: u64) {
        let Some(node) = self.live.get(&dir).cloned() else { return };
        if let Content::Dir(entries) = &node.content {
            for child in entries.values() {
                if !self.durable.contains_key(child)
                    && let Some(c) = self.live.get(child)
                {
                    self.durable.insert(*child, c.placeholder());
                }
            }
        }
        self.durable.insert(dir, node);
    }

    fn names_changed(&mut self, dirs: &[u64]) {
        if self.names == Names::Immediate {
            for &d in dirs {
                self.persist_entries(d);
                self.dirty.remove(&d);
            }
        }
    }

    /// The power goes out: the live tree becomes what the durable records
    /// reachable from the root describe. Open handles are gone (the
    /// processes holding them died with the power).
    pub fn power_cut(&mut self) -> CutReport {
        let before: HashSet<u64> = self.live.keys().copied().collect();
        let unsynced = self.dirty.len();
        let mut live = HashMap::new();
        let mut links: HashMap<u64, u32> = HashMap::from([(ROOT, 1)]);
        let mut stack = vec![ROOT];
        if let Some(root) = self.durable.get(&ROOT) {
            live.insert(ROOT, root.clone());
        }
        while let Some(dir) = stack.pop() {
            let Some(Inode { content: Content::Dir(entries), .. }) = self.durable.get(&dir) else { continue };
            for child in entries.values() {
                *links.entry(*child).or_default() += 1;
                if live.contains_key(child) {
                    continue;
                }
                if let Some(c) = self.durable.get(child) {
                    if c.kind() == Kind::Dir {
                        stack.push(*child);
                    }
                    live.insert(*child, c.clone());
                }
            }
        }
        self.durable.retain(|ino, _| live.contains_key(ino));
        let vanished = before.iter().filter(|i| !live.contains_key(i)).count();
        self.live = live;
        self.links = links;
        self.open.clear();
        self.dirty.clear();
        self.stats.cuts += 1;
        CutReport { unsynced_inodes: unsynced, vanished_inodes: vanished }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn file(fs: &mut Fs, parent: u64, name: &str, bytes: &[u8]) -> u64 {
        let ino = fs.create(parent, n(name), NewNode::File, 0o644, 0, 0).unwrap();
        fs.write(ino, 0, bytes).unwrap();
        ino
    }

    fn read_path(fs: &Fs, path: &[&str]) -> Option<Vec<u8>> {
        let mut ino = ROOT;
        for p in path {
            ino = fs.lookup(ino, n(p)).ok()?;
        }
        fs.read(ino, 0, 1 << 20).ok()
    }

    #[test]
    fn unsynced_data_and_unsynced_names_are_lost() {
        let mut fs = Fs::new(Names::OnDirSync);
        let a = file(&mut fs, ROOT, "a", b"data");
        // Data synced, name not: the file is gone.
        fs.sync(a).unwrap();
        fs.power_cut();
        assert_eq!(read_path(&fs, &["a"]), None);

        // Name synced, data not: the file is there, empty.
        let b = file(&mut fs, ROOT, "b", b"data");
        fs.sync(ROOT).unwrap();
        fs.write(b, 4, b"more").unwrap();
        fs.power_cut();
        assert_eq!(read_path(&fs, &["b"]), Some(vec![]));

        // Both: everything synced survives, later writes do not.
        let b = fs.lookup(ROOT, n("b")).unwrap();
        fs.write(b, 0, b"synced").unwrap();
        fs.sync(b).unwrap();
        fs.write(b, 0, b"XX").unwrap();
        fs.write(b, 100, b"tail").unwrap();
        let report = fs.power_cut();
        assert_eq!(report.unsynced_inodes, 1);
        assert_eq!(read_path(&fs, &["b"]), Some(b"synced".to_vec()));
    }

    #[test]
    fn a_rename_survives_only_once_its_directory_is_synced() {
        let mut fs = Fs::new(Names::OnDirSync);
        let old = file(&mut fs, ROOT, "cfg", b"old");
        fs.sync(old).unwrap();
        fs.sync(ROOT).unwrap();
        let tmp = file(&mut fs, ROOT, "cfg.tmp", b"new");
        fs.sync(tmp).unwrap();
        fs.rename(ROOT, n("cfg.tmp"), ROOT, n("cfg"), false).unwrap();
        assert_eq!(read_path(&fs, &["cfg"]), Some(b"new".to_vec()));
        fs.power_cut();
        assert_eq!(read_path(&fs, &["cfg"]), Some(b"old".to_vec()));
        assert_eq!(read_path(&fs, &["cfg.tmp"]), None);

        let tmp = file(&mut fs, ROOT, "cfg.tmp", b"new");
        fs.sync(tmp).unwrap();
        fs.rename(ROOT, n("cfg.tmp"), ROOT, n("cfg"), false).unwrap();
        fs.sync(ROOT).unwrap();
        fs.power_cut();
        assert_eq!(read_path(&fs, &["cfg"]), Some(b"new".to_vec()));
    }

    #[test]
    fn a_new_directory_needs_its_parent_synced() {
        let mut fs = Fs::new(Names::OnDirSync);
        let d = fs.create(ROOT, n("d"), NewNode::Dir, 0o755, 0, 0).unwrap();
        let f = file(&mut fs, d, "f", b"x");
        fs.sync(f).unwrap();
        fs.sync(d).unwrap();
        fs.power_cut();
        assert_eq!(read_path(&fs, &["d", "f"]), None);
        assert!(fs.lookup(ROOT, n("d")).is_err());

        let d = fs.create(ROOT, n("d"), NewNode::Dir, 0o755, 0, 0).unwrap();
        let f = file(&mut fs, d, "f", b"x");
        fs.sync(f).unwrap();
        fs.sync(d).unwrap();
        fs.sync(ROOT).unwrap();
        fs.power_cut();
        assert_eq!(read_path(&fs, &["d", "f"]), Some(b"x".to_vec()));
    }

    #[test]
    fn an_unsynced_unlink_comes_back() {
        let mut fs = Fs::new(Names::OnDirSync);
        let f = file(&mut fs, ROOT, "f", b"x");
        fs.sync(f).unwrap();
        fs.sync(ROOT).unwrap();
        fs.unlink(ROOT, n("f"), false).unwrap();
        assert_eq!(read_path(&fs, &["f"]), None);
        fs.power_cut();
        assert_eq!(read_path(&fs, &["f"]), Some(b"x".to_vec()));
        fs.unlink(ROOT, n("f"), false).unwrap();
        fs.sync(ROOT).unwrap();
        fs.power_cut();
        assert_eq!(read_path(&fs, &["f"]), None);
    }

    #[test]
    fn immediate_names_keep_a_rename_but_not_the_unsynced_data_behind_it() {
        let mut fs = Fs::new(Names::Immediate);
        let d = fs.create(ROOT, n("d"), NewNode::Dir, 0o755, 0, 0).unwrap();
        let old = file(&mut fs, d, "cfg", b"old");
        fs.sync(old).unwrap();
        let tmp = file(&mut fs, d, "cfg.tmp", b"new");
        fs.rename(d, n("cfg.tmp"), d, n("cfg"), false).unwrap();
        fs.power_cut();
        // The rename reached the disk, the data it pointed at did not.
        assert_eq!(read_path(&fs, &["d", "cfg"]), Some(vec![]));
        assert!(fs.lookup(d, n("cfg.tmp")).is_err());
        let _ = tmp;
    }

    #[test]
    fn truncation_and_holes_read_as_zeros() {
        let mut d = Data::default();
        d.write(0, &[7u8; 10_000]);
        d.set_size(5000);
        d.set_size(9000);
        let bytes = d.read(0, 9000);
        assert!(bytes[..5000].iter().all(|&b| b == 7));
        assert!(bytes[5000..].iter().all(|&b| b == 0));
        d.write(20_000, b"z");
        assert_eq!(d.size(), 20_001);
        assert_eq!(d.read(19_999, 10), vec![0, b'z']);
    }
}
