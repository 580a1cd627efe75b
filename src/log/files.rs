//! The log's files: directory and file modes, the lock, segment names and headers, synced
//! writes, and the recovery of the last segment's tail; `LogError`, the typed error of them all.
//!
//! Must not: decide retention or epochs, or encode records (`record`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::change::Position;
use crate::log::record;
use crate::replication::lsn::Lsn;

/// The log directory's mode: the log holds every row before row-level security.
pub const DIR_MODE: u32 = 0o700;
/// Every file's mode in the log directory.
pub const FILE_MODE: u32 = 0o600;
pub(super) const MAGIC: &[u8; 8] = b"WCLOG01\n";
/// Magic, epoch, the position before the segment's first record.
pub const SEGMENT_HEADER: usize = 8 + 4 + 8 + 4;
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("change log {path}: {action}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("change log {0} is in use by another walcast process")]
    Locked(PathBuf),
    #[error("change log {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

pub(super) fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |source| LogError::Io { path: path.to_owned(), action, source }
}

/// Creates the log's directory (the log holds rows before any row-level security: readable by
/// the gateway's user only) and takes its lock, held for as long as the writer runs.
pub(super) fn lock_dir(dir: &Path) -> Result<File, LogError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io(dir, "creating the directory"))?;
    let lock_path = dir.join("lock");
    let lock = OpenOptions::new()
        .mode(FILE_MODE)
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path, "opening the lock file"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| LogError::Locked(dir.to_path_buf()))?;
    Ok(lock)
}

/// Segments in `dir`, oldest first, each with the position before its first record.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<(Position, PathBuf)>, LogError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir, "listing"))? {
        let path = entry.map_err(io(dir, "listing"))?.path();
        if let Some(prev) = segment_prev(&path) {
            out.push((prev, path));
        }
    }
    out.sort();
    Ok(out)
}

pub(super) fn segment_path(dir: &Path, prev: Position) -> PathBuf {
    dir.join(format!("{:016X}{:08X}.seg", prev.lsn.0, prev.seq))
}

pub(super) fn segment_header(epoch: u32, prev: Position) -> [u8; SEGMENT_HEADER] {
    let mut h = [0; SEGMENT_HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&epoch.to_le_bytes());
    h[12..20].copy_from_slice(&prev.lsn.0.to_le_bytes());
    h[20..24].copy_from_slice(&prev.seq.to_le_bytes());
    h
}

/// Checks a segment header; returns the position it names.
pub(super) fn check_header(h: &[u8], epoch: u32, path: &Path) -> Result<Position, LogError> {
    let corrupt = |m: &str| LogError::Corrupt { path: path.to_owned(), message: m.to_owned() };
    if h.len() < SEGMENT_HEADER || &h[..8] != MAGIC {
        return Err(corrupt("not a change log segment (bad header)"));
    }
    let e = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if e != epoch {
        return Err(corrupt("segment of another log epoch"));
    }
    let mut lsn = [0; 8];
    lsn.copy_from_slice(&h[12..20]);
    let seq = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
    Ok(Position { lsn: Lsn(u64::from_le_bytes(lsn)), seq })
}

pub(super) fn create_segment(path: &Path, epoch: u32, prev: Position) -> Result<File, LogError> {
    let mut f = OpenOptions::new()
        .mode(FILE_MODE)
        .create_new(true)
        .append(true)
        .open(path)
        .map_err(io(path, "creating a segment"))?;
    f.write_all(&segment_header(epoch, prev)).map_err(io(path, "writing a segment header"))?;
    f.sync_data().map_err(io(path, "syncing"))?;
    Ok(f)
}

pub(super) fn write_synced(path: &Path, body: &[u8]) -> Result<(), LogError> {
    let mut f = OpenOptions::new()
        .mode(FILE_MODE)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io(path, "creating"))?;
    f.write_all(body).map_err(io(path, "writing"))?;
    f.sync_all().map_err(io(path, "syncing"))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "syncing the directory"))
}

/// What the last segment holds once cut back to its last whole transaction.
pub(super) struct Tail {
    /// The file's length after the cut.
    pub(super) len: u64,
    pub(super) cut: u64,
    /// The last commit kept: (commit LSN, end LSN).
    pub(super) commit: Option<(Lsn, Lsn)>,
    /// The position of the last record kept.
    pub(super) last: Option<Position>,
}

/// Reads the last segment record by record; everything after the last commit record (a torn
/// write, a corrupt record, or a transaction that was not finished) is cut off.
pub(super) fn recover_tail(path: &Path, epoch: u32) -> Result<Tail, LogError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io(path, "reading"))?;
    if bytes.len() < SEGMENT_HEADER {
        // A segment whose header never made it to disk: write it again.
        let mut f =
            OpenOptions::new().write(true).truncate(true).open(path).map_err(io(path, "repairing"))?;
        let prev = segment_prev(path).unwrap_or(Position::ZERO);
        f.write_all(&segment_header(epoch, prev)).map_err(io(path, "repairing"))?;
        f.sync_data().map_err(io(path, "syncing"))?;
        return Ok(Tail { len: SEGMENT_HEADER as u64, cut: bytes.len() as u64, commit: None, last: None });
    }
    check_header(&bytes, epoch, path)?;
    let bytes = Bytes::from(bytes);
    let (keep, commit, last) = scan(&bytes);
    let cut = (bytes.len() - keep) as u64;
    if cut > 0 {
        let f = OpenOptions::new().write(true).open(path).map_err(io(path, "opening to cut"))?;
        f.set_len(keep as u64).map_err(io(path, "cutting the torn tail"))?;
        f.sync_all().map_err(io(path, "syncing"))?;
    }
    Ok(Tail { len: keep as u64, cut, commit, last })
}

/// The whole transactions at the start of a segment's bytes (header checked): where they end,
/// the last commit's (commit, end) LSNs, and the last position.
fn scan(bytes: &Bytes) -> (usize, Option<(Lsn, Lsn)>, Option<Position>) {
    let mut at = SEGMENT_HEADER;
    let mut keep = SEGMENT_HEADER;
    let mut commit = None;
    let mut last = None;
    while at < bytes.len() {
        let Ok(Some(len)) = record::frame_len(&bytes[at..], at) else { break };
        let Ok(rec) = record::decode(&bytes.slice(at..at + len), at) else { break };
        at += len;
        if let record::Record::Commit { commit_lsn, end_lsn } = rec {
            commit = Some((commit_lsn, end_lsn));
            last = Some(Position::end_of(commit_lsn));
            keep = at;
        }
    }
    (keep, commit, last)
}

/// The last whole transaction's position in a segment, read without changing the file; `None`
/// when it holds none (or not even a whole header).
pub(super) fn last_position(path: &Path, epoch: u32) -> Result<Option<Position>, LogError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io(path, "reading"))?;
    if bytes.len() < SEGMENT_HEADER {
        return Ok(None);
    }
    check_header(&bytes, epoch, path)?;
    Ok(scan(&Bytes::from(bytes)).2)
}

/// The position a segment's file name (`<16 hex LSN><8 hex seq>.seg`) says comes before it;
/// `None` for any other file.
pub(super) fn segment_prev(path: &Path) -> Option<Position> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".seg")?;
    if stem.len() != 24 {
        return None;
    }
    Some(Position {
        lsn: Lsn(u64::from_str_radix(stem.get(..16)?, 16).ok()?),
        seq: u32::from_str_radix(stem.get(16..)?, 16).ok()?,
    })
}
