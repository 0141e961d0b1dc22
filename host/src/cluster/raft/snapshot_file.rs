//! The snapshot file of a shard replica: its format, written and read as a
//! stream (never whole in memory), and [`SnapshotFile`], the `SnapshotData`
//! that openraft reads chunk by chunk to send to a follower and that a
//! follower writes the chunks it receives into.
//!
//! Format: a magic number, the snapshot's meta (postcard, length-prefixed),
//! one record per keyspace pair (u32 LE key length ≥ 1, key, u32 LE value
//! length, value), an end mark (u32 0) and the number of records (u64 LE).
//! The meta rides in the file so that a rename replaces meta and data as one;
//! the count catches a file cut short.

use super::SnapshotMeta;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

const MAGIC: &[u8; 8] = b"CFXSNAP1";
/// Names of files being written (built or received) start with this; what a
/// crash leaves of them is removed when the replica opens.
pub const TEMP_PREFIX: &str = ".snapshot-";
const IO_BUFFER_BYTES: usize = 1 << 20;
/// No key or value comes near this; a larger length means a corrupt file
/// (and must not turn into an allocation of that size).
const MAX_FIELD_BYTES: u32 = 1 << 30;

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {what}"))
}

/// Writes a snapshot file record by record.
pub struct SnapshotWriter {
    out: BufWriter<std::fs::File>,
    count: u64,
}

impl SnapshotWriter {
    pub fn new(file: std::fs::File, meta: &SnapshotMeta) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(IO_BUFFER_BYTES, file);
        let meta = postcard::to_allocvec(meta).map_err(invalid)?;
        out.write_all(MAGIC)?;
        out.write_all(&field_len(meta.len())?.to_le_bytes())?;
        out.write_all(&meta)?;
        Ok(Self { out, count: 0 })
    }

    pub fn record(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        if key.is_empty() {
            return Err(invalid("an empty key"));
        }
        self.out.write_all(&field_len(key.len())?.to_le_bytes())?;
        self.out.write_all(key)?;
        self.out.write_all(&field_len(value.len())?.to_le_bytes())?;
        self.out.write_all(value)?;
        self.count += 1;
        Ok(())
    }

    /// Ends the file and makes it durable; returns the record count.
    pub fn finish(mut self) -> io::Result<u64> {
        self.out.write_all(&0u32.to_le_bytes())?;
        self.out.write_all(&self.count.to_le_bytes())?;
        let file = self.out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        Ok(self.count)
    }
}

fn field_len(len: usize) -> io::Result<u32> {
    u32::try_from(len).ok().filter(|l| *l <= MAX_FIELD_BYTES).ok_or_else(|| invalid(format!("a field of {len} bytes")))
}

/// Reads a snapshot file: first its meta, then its records as an iterator,
/// which fails if the file ends early or its count does not match.
pub struct SnapshotReader<R> {
    input: BufReader<R>,
    meta: SnapshotMeta,
    count: u64,
    done: bool,
}

impl<R: Read> SnapshotReader<R> {
    pub fn new(input: R) -> io::Result<Self> {
        let mut input = BufReader::with_capacity(IO_BUFFER_BYTES, input);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(|_| invalid("too short for a header"))?;
        if &magic != MAGIC {
            return Err(invalid("not a snapshot file of this format"));
        }
        let meta = read_field(&mut input)?;
        let meta = postcard::from_bytes(&meta).map_err(invalid)?;
        Ok(Self { input, meta, count: 0, done: false })
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    fn next_record(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let key = read_field(&mut self.input)?;
        if key.is_empty() {
            let mut count = [0u8; 8];
            self.input.read_exact(&mut count).map_err(|_| invalid("cut short in its end mark"))?;
            let count = u64::from_le_bytes(count);
            if count != self.count {
                return Err(invalid(format!("{} records, but its end mark says {count}", self.count)));
            }
            if self.input.read(&mut [0u8])? != 0 {
                return Err(invalid("bytes after its end mark"));
            }
            return Ok(None);
        }
        let value = read_field(&mut self.input)?;
        self.count += 1;
        Ok(Some((key, value)))
    }
}

fn read_field(input: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).map_err(|_| invalid("cut short"))?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FIELD_BYTES {
        return Err(invalid(format!("a field of {len} bytes")));
    }
    let mut field = vec![0u8; len as usize];
    input.read_exact(&mut field).map_err(|_| invalid("cut short"))?;
    Ok(field)
}

impl<R: Read> Iterator for SnapshotReader<R> {
    type Item = io::Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_record() {
            Ok(Some(pair)) => Some(Ok(pair)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Reads the whole file at `path` and returns its meta if it is a complete,
/// well-formed snapshot file.
pub fn validate(path: &Path) -> io::Result<SnapshotMeta> {
    let mut reader = SnapshotReader::new(std::fs::File::open(path)?)?;
    for pair in reader.by_ref() {
        pair?;
    }
    Ok(reader.meta)
}

/// openraft's `SnapshotData` for a shard: a snapshot file, read or written
/// through tokio's blocking pool. Under a simulation it does its I/O inline
/// instead, so it ends in the simulated instant it began in (see
/// [`crate::determinism`]). A file being received is a temporary file that
/// is removed unless it is installed.
pub struct SnapshotFile {
    io: FileIo,
    temp: Option<tempfile::TempPath>,
}

enum FileIo {
    Pooled(tokio::fs::File),
    Inline { file: std::fs::File, seek: Option<io::Result<u64>> },
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFile").field("temp", &self.temp).finish_non_exhaustive()
    }
}

impl SnapshotFile {
    fn new(file: std::fs::File, temp: Option<tempfile::TempPath>) -> Self {
        let io = if crate::determinism::simulated() {
            FileIo::Inline { file, seek: None }
        } else {
            FileIo::Pooled(tokio::fs::File::from_std(file))
        };
        Self { io, temp }
    }

    /// The snapshot file at `path`, for reading.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self::new(std::fs::File::open(path)?, None))
    }

    /// A new temporary file in `dir`, to receive a snapshot into.
    pub fn temp_in(dir: &Path) -> io::Result<Self> {
        let (file, path) = temp_file_in(dir)?.into_parts();
        Ok(Self::new(file, Some(path)))
    }

    /// The file, positioned at its start, and its temporary path if it is
    /// a temporary file (the path removes the file when dropped).
    pub async fn into_parts(self) -> io::Result<(std::fs::File, Option<tempfile::TempPath>)> {
        let mut file = match self.io {
            FileIo::Pooled(f) => f.into_std().await,
            FileIo::Inline { file, .. } => file,
        };
        file.seek(SeekFrom::Start(0))?;
        Ok((file, self.temp))
    }
}

/// A new temporary file in `dir` whose name marks it as one.
pub fn temp_file_in(dir: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new().prefix(TEMP_PREFIX).tempfile_in(dir)
}

impl AsyncRead for SnapshotFile {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            FileIo::Pooled(f) => Pin::new(f).poll_read(cx, buf),
            FileIo::Inline { file, .. } => {
                let n = file.read(buf.initialize_unfilled())?;
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            FileIo::Pooled(f) => Pin::new(f).poll_write(cx, buf),
            FileIo::Inline { file, .. } => Poll::Ready(file.write(buf)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            FileIo::Pooled(f) => Pin::new(f).poll_flush(cx),
            FileIo::Inline { file, .. } => Poll::Ready(file.flush()),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            FileIo::Pooled(f) => Pin::new(f).poll_shutdown(cx),
            FileIo::Inline { file, .. } => Poll::Ready(file.flush()),
        }
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        match &mut self.get_mut().io {
            FileIo::Pooled(f) => Pin::new(f).start_seek(position),
            FileIo::Inline { file, seek } => {
                *seek = Some(file.seek(position));
                Ok(())
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match &mut self.get_mut().io {
            FileIo::Pooled(f) => Pin::new(f).poll_complete(cx),
            FileIo::Inline { file, seek } => Poll::Ready(seek.take().unwrap_or_else(|| file.stream_position())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), index)),
            last_membership: Default::default(),
            snapshot_id: format!("2-{index}-0"),
        }
    }

    #[test]
    fn a_written_file_reads_back_and_a_cut_or_padded_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut w = SnapshotWriter::new(std::fs::File::create(&path).unwrap(), &meta(7)).unwrap();
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..100u32).map(|i| (vec![1, i as u8], vec![7; i as usize])).collect();
        for (k, v) in &pairs {
            w.record(k, v).unwrap();
        }
        assert_eq!(w.finish().unwrap(), 100);
        assert_eq!(validate(&path).unwrap(), meta(7));
        let read: Vec<_> =
            SnapshotReader::new(std::fs::File::open(&path).unwrap()).unwrap().map(Result::unwrap).collect();
        assert_eq!(read, pairs);

        let bytes = std::fs::read(&path).unwrap();
        for cut in [4, 20, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(validate(&path).is_err(), "a file cut at {cut} of {} bytes was accepted", bytes.len());
        }
        std::fs::write(&path, [&bytes[..], b"x"].concat()).unwrap();
        assert!(validate(&path).is_err(), "a padded file was accepted");
        let mut miscounted = bytes.clone();
        let n = miscounted.len();
        miscounted[n - 8] = 99;
        std::fs::write(&path, miscounted).unwrap();
        assert!(validate(&path).is_err(), "a file whose count is wrong was accepted");
    }
}
