//! The durable change log: every change and database broadcast the replication stream delivers,
//! kept on local disk in segments so that a client can resume from a cursor after a disconnect
//! or a gateway restart, with no gap and no duplicate, or be told plainly that it cannot.
//!
//! Shape: the dispatcher encodes each event as it receives it ([`Appender`]) and hands whole
//! chunks to one writer thread, which writes them, syncs them to disk, and only then advances the
//! [`Acknowledgement`] — so the flush position confirmed to Postgres means "durable in the log".
//! Readers ([`reader::LogReader`]) open segments on their own and read up to a bound they were
//! given; they never see a record the writer has not finished writing.
//!
//! On disk: `meta.json` (which cluster, database and slot the log belongs to, and its `epoch`, a
//! random number that changes whenever continuity with the slot is lost), a `lock` file held
//! while a gateway uses the directory, and segments named after the position just before their
//! first record. A segment starts with a header (magic, epoch, that position) and the relation
//! records it needs, and ends on a commit. On open, the last segment is checked record by record
//! and cut back to its last whole transaction; a torn or corrupt tail is never read.
//!
//! Owns: the files, the retention policy (age and size, whole segments, oldest first, never the
//! one being written), cursors and the gap rule. Must not: touch sockets or the index, or log row
//! values.

pub mod reader;
pub mod record;

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use crate::change::{ChangeEvent, Position, Relation};
use crate::replication::ack::Acknowledgement;
use crate::replication::lsn::Lsn;

pub use reader::{Entry, LogReadError, LogReader};

/// `meta.json`'s format version.
const META_VERSION: u32 = 1;
/// The log directory's mode: the log holds every row before row-level security.
pub const DIR_MODE: u32 = 0o700;
/// Every file's mode in the log directory.
pub const FILE_MODE: u32 = 0o600;
const MAGIC: &[u8; 8] = b"WCLOG01\n";
/// Magic, epoch, the position before the segment's first record.
pub const SEGMENT_HEADER: usize = 8 + 4 + 8 + 4;
/// The appender hands a chunk to the writer at least this often.
const CHUNK_BYTES: usize = 256 * 1024;
/// How often retention runs while nothing rolls a segment.
const RETENTION_EVERY: Duration = Duration::from_secs(30);

/// Where the log lives and how much it keeps.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub dir: PathBuf,
    /// Segments whose newest record is older than this are removed.
    pub max_age: Duration,
    /// The oldest segments are removed while the log is larger than this.
    pub max_bytes: u64,
    /// A segment is closed (at the next commit) once it is this large.
    pub segment_bytes: u64,
}

/// Which stream a log belongs to: a log is only continued by the same cluster, database and slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub system_id: String,
    pub database: String,
    pub slot: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Meta {
    version: u32,
    epoch: u32,
    #[serde(flatten)]
    identity: Identity,
}

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

fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |source| LogError::Io { path: path.to_owned(), action, source }
}

/// An opaque, ordered resume token: the log's epoch and a position. Printed as 32 upper-case
/// hexadecimal digits; within one epoch, cursors order as their strings do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub epoch: u32,
    pub position: Position,
}

impl Cursor {
    /// The 32 hexadecimal digits (epoch, LSN, place in the transaction), without the
    /// formatting machinery: this runs once per change delivered.
    pub fn to_hex(&self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = [0u8; 32];
        let mut put = |at: usize, width: usize, v: u64| {
            for i in 0..width {
                out[at + i] = DIGITS[((v >> (4 * (width - 1 - i))) & 0xF) as usize];
            }
        };
        put(0, 8, u64::from(self.epoch));
        put(8, 16, self.position.lsn.0);
        put(24, 8, u64::from(self.position.seq));
        out
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hexadecimal digits are ASCII.
        f.write_str(std::str::from_utf8(&self.to_hex()).unwrap_or_default())
    }
}

/// The text is not a cursor walcast issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid cursor {0:?}: expected the 32 hexadecimal digits of a delivered change's cursor, or an \
     ISO 8601 commit timestamp with a zone"
)]
pub struct ParseCursorError(pub String);

impl std::str::FromStr for Cursor {
    type Err = ParseCursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseCursorError(s.chars().take(64).collect());
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let epoch = u32::from_str_radix(&s[..8], 16).map_err(|_| err())?;
        let lsn = u64::from_str_radix(&s[8..24], 16).map_err(|_| err())?;
        let seq = u32::from_str_radix(&s[24..], 16).map_err(|_| err())?;
        Ok(Cursor { epoch, position: Position { lsn: Lsn(lsn), seq } })
    }
}

/// Why a resume cannot continue without a gap: the client must load its state again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Gap {
    #[error("the cursor is older than the retained change log")]
    Expired,
    #[error("the cursor belongs to another change log (another database, slot, or a log that was reset)")]
    OtherLog,
    #[error("this gateway keeps no change log")]
    NoLog,
}

impl Gap {
    /// A short machine-readable reason.
    pub fn code(self) -> &'static str {
        match self {
            Gap::Expired => "expired",
            Gap::OtherLog => "other_log",
            Gap::NoLog => "no_log",
        }
    }
}

struct Shared {
    dir: PathBuf,
    epoch: u32,
    /// The last position written (readable by readers).
    written: watch::Sender<Position>,
    /// The last position synced to disk.
    durable: watch::Sender<Position>,
}

/// A handle on an open log: cursors, gap checks and readers. Cheap to clone.
#[derive(Clone)]
pub struct ChangeLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ChangeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeLog").field("dir", &self.shared.dir).field("epoch", &self.shared.epoch).finish()
    }
}

/// What opening found.
#[derive(Debug, Clone, Copy)]
pub struct Recovered {
    /// The last whole transaction kept: its commit LSN (transactions at or before it are not
    /// appended again) and its end LSN (already safe to confirm).
    pub last_commit: Lsn,
    pub last_commit_end: Lsn,
    /// Bytes cut from a torn or corrupt tail.
    pub cut_bytes: u64,
    /// The log was started afresh (new epoch): there was none, or it belonged to another
    /// stream, or the slot was new.
    pub reset: bool,
}

/// The writer thread; joining it waits for the last chunk to be synced.
pub struct WriterHandle {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriterHandle {
    /// Waits (blocking) until the writer has synced everything it was given and stopped. The
    /// writer stops once every [`Appender`] is dropped.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Creates the log's directory (the log holds rows before any row-level security: readable by
/// the gateway's user only) and takes its lock, held for as long as the writer runs.
fn lock_dir(dir: &Path) -> Result<File, LogError> {
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

/// The log's epoch: its own, when it belongs to `identity` and may be kept; otherwise a new
/// one, with the old segments removed and the new identity recorded. Returns (epoch, kept).
fn choose_epoch(
    dir: &Path,
    identity: &Identity,
    fresh_slot: bool,
    segments: &mut Vec<(Position, PathBuf)>,
) -> Result<(u32, bool), LogError> {
    let meta_path = dir.join("meta.json");
    let meta: Option<Meta> = match std::fs::read(&meta_path) {
        Ok(b) => serde_json::from_slice(&b).ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&meta_path, "reading")(e)),
    };
    if let Some(m) = meta.as_ref().filter(|m| m.version == META_VERSION && m.identity == *identity) {
        if !fresh_slot || segments.is_empty() {
            return Ok((m.epoch, true));
        }
    }
    if !segments.is_empty() {
        tracing::warn!(dir = %dir.display(), "change log belongs to another stream (or the slot is new); starting a new log");
    }
    for (_, path) in segments.drain(..) {
        std::fs::remove_file(&path).map_err(io(&path, "removing an old segment"))?;
    }
    let epoch = loop {
        let e = fastrand::u32(..);
        if e != 0 && meta.as_ref().is_none_or(|m| m.epoch != e) {
            break e;
        }
    };
    let m = Meta { version: META_VERSION, epoch, identity: identity.clone() };
    let tmp = dir.join("meta.json.tmp");
    let body = serde_json::to_vec_pretty(&m).unwrap_or_default();
    write_synced(&tmp, &body)?;
    std::fs::rename(&tmp, &meta_path).map_err(io(&meta_path, "replacing"))?;
    sync_dir(dir)?;
    Ok((epoch, false))
}

/// The segment to append to: the last one, its torn tail cut back (noted in `recovered`), or a
/// first one. Returns the file, its length and the last position in the log.
fn open_tail(
    dir: &Path,
    epoch: u32,
    segments: &mut Vec<(Position, PathBuf)>,
    recovered: &mut Recovered,
) -> Result<(File, u64, Position), LogError> {
    match segments.last() {
        Some((prev, path)) => {
            let tail = recover_tail(path, epoch)?;
            recovered.cut_bytes = tail.cut;
            if let Some((commit, end)) = tail.commit {
                recovered.last_commit = commit;
                recovered.last_commit_end = end;
            }
            let mut f = OpenOptions::new().append(true).open(path).map_err(io(path, "opening"))?;
            let _ = f.seek(SeekFrom::End(0));
            Ok((f, tail.len, tail.last.unwrap_or(*prev)))
        }
        None => {
            let path = segment_path(dir, Position::ZERO);
            let f = create_segment(&path, epoch, Position::ZERO)?;
            sync_dir(dir)?;
            segments.push((Position::ZERO, path));
            Ok((f, SEGMENT_HEADER as u64, Position::ZERO))
        }
    }
}

impl ChangeLog {
    /// Opens (or creates) the log in `settings.dir` for `identity`, recovers its tail, and
    /// starts the writer thread, which advances `ack` as chunks become durable. A log that
    /// belongs to another stream, or any log when `fresh_slot` (the slot cannot have streamed
    /// what comes before it), is started afresh with a new epoch: cursors into it get a gap.
    pub fn open(
        settings: &LogSettings,
        identity: &Identity,
        fresh_slot: bool,
        ack: Acknowledgement,
    ) -> Result<(ChangeLog, Appender, WriterHandle, Recovered), LogError> {
        let dir = &settings.dir;
        let lock = lock_dir(dir)?;
        let mut segments = list_segments(dir)?;
        let (epoch, keep) = choose_epoch(dir, identity, fresh_slot, &mut segments)?;
        let mut recovered =
            Recovered { last_commit: Lsn::ZERO, last_commit_end: Lsn::ZERO, cut_bytes: 0, reset: !keep };
        let (file, size, last) = open_tail(dir, epoch, &mut segments, &mut recovered)?;
        if recovered.cut_bytes > 0 {
            tracing::warn!(
                bytes = recovered.cut_bytes,
                "change log: cut a torn or corrupt tail back to its last whole transaction"
            );
        }
        ack.advance(recovered.last_commit_end);

        let shared = Arc::new(Shared {
            dir: dir.clone(),
            epoch,
            written: watch::Sender::new(last),
            durable: watch::Sender::new(last),
        });
        let mut sizes: VecDeque<SegmentFile> = segments
            .iter()
            .map(|(_, path)| SegmentFile {
                path: path.clone(),
                len: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            })
            .collect();
        if let Some(s) = sizes.back_mut() {
            s.len = size;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mut writer = Writer {
            shared: Arc::clone(&shared),
            settings: settings.clone(),
            file,
            segments: sizes,
            relations: HashMap::new(),
            last,
            ends_txn: true,
            ack,
            _lock: lock,
        };
        let thread = std::thread::Builder::new()
            .name("walcast-log".into())
            .spawn(move || writer.run(rx))
            .map_err(io(dir, "starting the writer thread"))?;
        let appender = Appender {
            tx,
            buf: Vec::with_capacity(CHUNK_BYTES),
            relations: Vec::new(),
            emitted: HashMap::new(),
            through: None,
            commit_end: None,
            ends_txn: true,
        };
        Ok((ChangeLog { shared }, appender, WriterHandle { thread: Some(thread) }, recovered))
    }

    pub fn epoch(&self) -> u32 {
        self.shared.epoch
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The cursor of `position` in this log.
    pub fn cursor(&self, position: Position) -> Cursor {
        Cursor { epoch: self.shared.epoch, position }
    }

    /// The last position written (readers may read up to it).
    pub fn written(&self) -> watch::Receiver<Position> {
        self.shared.written.subscribe()
    }

    /// The last position synced to disk.
    pub fn durable(&self) -> Position {
        *self.shared.durable.borrow()
    }

    /// Whether everything after `cursor` is still in the log.
    pub fn check(&self, cursor: &Cursor) -> Result<(), Gap> {
        if cursor.epoch != self.shared.epoch {
            return Err(Gap::OtherLog);
        }
        let segments = list_segments(&self.shared.dir).map_err(|_| Gap::Expired)?;
        match segments.first() {
            Some((oldest, _)) if *oldest > cursor.position => Err(Gap::Expired),
            _ => Ok(()),
        }
    }

    /// Where to resume for "changes committed at or after `unix_micros`": the position just
    /// before the first such change (`through` when there is none up to it). A time before the
    /// retained log is a gap, unless the log still holds everything since its epoch began.
    /// Blocking IO; `through` must have been written.
    pub fn position_at(&self, unix_micros: i64, through: Position) -> Result<Position, LogReadError> {
        let target = unix_micros.saturating_sub(crate::replication::wire::PG_EPOCH_OFFSET_MICROS);
        let epoch = self.shared.epoch;
        let segments = list_segments(&self.shared.dir)?;
        // The first change of a segment and its commit time.
        let first_change = |seg: &(Position, PathBuf)| -> Result<Option<i64>, LogReadError> {
            let mut r = LogReader::new(vec![seg.clone()], epoch, seg.0, through)?;
            loop {
                let batch = r.next_batch(64)?;
                if batch.is_empty() {
                    return Ok(None);
                }
                if let Some(ts) = batch.iter().find_map(|e| match e {
                    Entry::Change(c) => Some(c.commit_ts),
                    Entry::Broadcast(_) => None,
                }) {
                    return Ok(Some(ts));
                }
            }
        };
        // The newest segment that starts before the target time.
        let mut start = None;
        for (i, seg) in segments.iter().enumerate().rev() {
            if first_change(seg)?.is_some_and(|ts| ts < target) {
                start = Some(i);
                break;
            }
        }
        let start = match start {
            Some(i) => segments[i].0,
            None => match segments.first() {
                Some((oldest, _)) if *oldest > Position::ZERO => return Err(Gap::Expired.into()),
                _ => return Ok(Position::ZERO),
            },
        };
        let mut r = LogReader::new(segments, epoch, start, through)?;
        loop {
            let batch = r.next_batch(512)?;
            if batch.is_empty() {
                return Ok(through);
            }
            for e in &batch {
                if let Entry::Change(c) = e {
                    if c.commit_ts >= target {
                        // Every event of this transaction and later is after this position.
                        return Ok(Position::end_of(Lsn(c.commit_lsn.0.saturating_sub(1))));
                    }
                }
            }
        }
    }

    /// A reader of the records after `after`, up to and including `through` (which must have
    /// been written: see [`ChangeLog::written`]).
    pub fn read(&self, after: &Cursor, through: Position) -> Result<LogReader, Gap> {
        self.check(after)?;
        let segments = list_segments(&self.shared.dir).map_err(|_| Gap::Expired)?;
        LogReader::new(segments, self.shared.epoch, after.position, through)
    }
}

/// Segments in `dir`, oldest first, each with the position before its first record.
fn list_segments(dir: &Path) -> Result<Vec<(Position, PathBuf)>, LogError> {
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

fn segment_path(dir: &Path, prev: Position) -> PathBuf {
    dir.join(format!("{:016X}{:08X}.seg", prev.lsn.0, prev.seq))
}

fn segment_header(epoch: u32, prev: Position) -> [u8; SEGMENT_HEADER] {
    let mut h = [0; SEGMENT_HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&epoch.to_le_bytes());
    h[12..20].copy_from_slice(&prev.lsn.0.to_le_bytes());
    h[20..24].copy_from_slice(&prev.seq.to_le_bytes());
    h
}

/// Checks a segment header; returns the position it names.
fn check_header(h: &[u8], epoch: u32, path: &Path) -> Result<Position, LogError> {
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

fn create_segment(path: &Path, epoch: u32, prev: Position) -> Result<File, LogError> {
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

fn write_synced(path: &Path, body: &[u8]) -> Result<(), LogError> {
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

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "syncing the directory"))
}

/// What the last segment holds once cut back to its last whole transaction.
struct Tail {
    /// The file's length after the cut.
    len: u64,
    cut: u64,
    /// The last commit kept: (commit LSN, end LSN).
    commit: Option<(Lsn, Lsn)>,
    /// The position of the last record kept.
    last: Option<Position>,
}

/// Reads the last segment record by record; everything after the last commit record (a torn
/// write, a corrupt record, or a transaction that was not finished) is cut off.
fn recover_tail(path: &Path, epoch: u32) -> Result<Tail, LogError> {
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
    let cut = (bytes.len() - keep) as u64;
    if cut > 0 {
        let f = OpenOptions::new().write(true).open(path).map_err(io(path, "opening to cut"))?;
        f.set_len(keep as u64).map_err(io(path, "cutting the torn tail"))?;
        f.sync_all().map_err(io(path, "syncing"))?;
    }
    Ok(Tail { len: keep as u64, cut, commit, last })
}

/// The position a segment's file name (`<16 hex LSN><8 hex seq>.seg`) says comes before it;
/// `None` for any other file.
fn segment_prev(path: &Path) -> Option<Position> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".seg")?;
    if stem.len() != 24 {
        return None;
    }
    Some(Position {
        lsn: Lsn(u64::from_str_radix(stem.get(..16)?, 16).ok()?),
        seq: u32::from_str_radix(stem.get(16..)?, 16).ok()?,
    })
}

/// One chunk of encoded records, handed from the appender to the writer.
struct Chunk {
    bytes: Vec<u8>,
    /// Relation records in this chunk, by relation id (the writer repeats the latest of each at
    /// the head of every new segment).
    relations: Vec<(u32, Bytes)>,
    /// The position of the last record in the chunk.
    through: Option<Position>,
    /// End LSN of the last commit in the chunk.
    commit_end: Option<Lsn>,
    /// The chunk ends on a commit (a segment may be closed after it).
    ends_txn: bool,
}

/// The dispatcher's side: encodes events in order and hands them to the writer.
pub struct Appender {
    tx: std::sync::mpsc::Sender<Chunk>,
    buf: Vec<u8>,
    relations: Vec<(u32, Bytes)>,
    /// The relation each id was last written with. Held, not remembered by address: a new
    /// Relation message makes a new `Arc`, and holding the old one keeps its address from being
    /// reused by a later description of the table (which would then never reach the log).
    emitted: HashMap<u32, Arc<Relation>>,
    through: Option<Position>,
    commit_end: Option<Lsn>,
    ends_txn: bool,
}

impl Appender {
    /// Encodes one event. Chunks go to the writer when large, or on [`Appender::flush`].
    pub fn append(&mut self, event: &ChangeEvent) {
        match event {
            ChangeEvent::Change(c) => {
                if !self.emitted.get(&c.relation.id).is_some_and(|r| Arc::ptr_eq(r, &c.relation)) {
                    let start = self.buf.len();
                    record::encode_relation(&mut self.buf, &c.relation);
                    self.relations.push((c.relation.id, Bytes::copy_from_slice(&self.buf[start..])));
                    self.emitted.insert(c.relation.id, Arc::clone(&c.relation));
                }
                record::encode_change(&mut self.buf, c);
                self.through = Some(c.position());
                self.ends_txn = false;
            }
            ChangeEvent::Broadcast(b) => {
                record::encode_broadcast(&mut self.buf, b.position, &b.raw);
                self.through = Some(b.position);
                self.ends_txn = false;
            }
            ChangeEvent::Commit { commit_lsn, end_lsn } => {
                record::encode_commit(&mut self.buf, *commit_lsn, *end_lsn);
                self.through = Some(Position::end_of(*commit_lsn));
                self.commit_end = Some(*end_lsn);
                self.ends_txn = true;
            }
        }
        if self.buf.len() >= CHUNK_BYTES {
            self.flush();
        }
    }

    /// Hands what is encoded to the writer.
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let chunk = Chunk {
            bytes: std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES)),
            relations: std::mem::take(&mut self.relations),
            through: self.through.take(),
            commit_end: self.commit_end.take(),
            ends_txn: self.ends_txn,
        };
        // A writer that has stopped has logged why; the acknowledgement no longer advances,
        // so nothing is confirmed that is not kept.
        let _ = self.tx.send(chunk);
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.flush();
    }
}

struct SegmentFile {
    path: PathBuf,
    len: u64,
}

struct Writer {
    shared: Arc<Shared>,
    settings: LogSettings,
    file: File,
    /// Oldest first; the last is being written.
    segments: VecDeque<SegmentFile>,
    /// The latest relation record of each id.
    relations: HashMap<u32, Bytes>,
    last: Position,
    ends_txn: bool,
    ack: Acknowledgement,
    _lock: File,
}

impl Writer {
    fn run(&mut self, rx: std::sync::mpsc::Receiver<Chunk>) {
        let mut last_retention = std::time::Instant::now();
        loop {
            let first = match rx.recv_timeout(RETENTION_EVERY) {
                Ok(c) => Some(c),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut commit_end = None;
            let mut next = first;
            let mut failed = false;
            // Write everything waiting, then sync once (group commit).
            while let Some(chunk) = next {
                if let Err(e) = self.write(&chunk) {
                    tracing::error!(error = %crate::errors::chain(&e),
                        "change log write failed; the acknowledgement stops here");
                    failed = true;
                    break;
                }
                commit_end = chunk.commit_end.or(commit_end);
                next = rx.try_recv().ok();
            }
            if failed {
                // Stop: nothing more is acknowledged, so nothing unkept is confirmed.
                return;
            }
            if self.segments.back().is_some() {
                if let Err(e) = self.file.sync_data() {
                    tracing::error!(error = %e, "change log sync failed; the acknowledgement stops here");
                    return;
                }
                self.shared.durable.send_replace(self.last);
                if let Some(end) = commit_end {
                    self.ack.advance(end);
                }
            }
            if last_retention.elapsed() >= RETENTION_EVERY {
                self.retain();
                last_retention = std::time::Instant::now();
            }
        }
    }

    fn write(&mut self, chunk: &Chunk) -> Result<(), LogError> {
        let current = self.segments.back().map_or(0, |s| s.len);
        if self.ends_txn && current >= self.settings.segment_bytes {
            self.roll()?;
        }
        let path = self.segments.back().map(|s| s.path.clone()).unwrap_or_default();
        self.file.write_all(&chunk.bytes).map_err(io(&path, "appending"))?;
        if let Some(s) = self.segments.back_mut() {
            s.len += chunk.bytes.len() as u64;
        }
        for (id, rec) in &chunk.relations {
            self.relations.insert(*id, rec.clone());
        }
        if let Some(p) = chunk.through {
            self.last = p;
            self.shared.written.send_replace(p);
        }
        self.ends_txn = chunk.ends_txn;
        Ok(())
    }

    /// Closes the current segment (synced) and starts the next with the relations it needs.
    fn roll(&mut self) -> Result<(), LogError> {
        let old = self.segments.back().map(|s| s.path.clone()).unwrap_or_default();
        self.file.sync_data().map_err(io(&old, "syncing"))?;
        let path = segment_path(&self.shared.dir, self.last);
        let mut f = create_segment(&path, self.shared.epoch, self.last)?;
        let mut len = SEGMENT_HEADER as u64;
        for rec in self.relations.values() {
            f.write_all(rec).map_err(io(&path, "writing relations"))?;
            len += rec.len() as u64;
        }
        sync_dir(&self.shared.dir)?;
        self.file = f;
        self.segments.push_back(SegmentFile { path, len });
        self.retain();
        Ok(())
    }

    /// Removes the oldest segments while the log is over its size or they are over its age;
    /// never the segment being written.
    fn retain(&mut self) {
        let now = SystemTime::now();
        while self.segments.len() > 1 {
            let total: u64 = self.segments.iter().map(|s| s.len).sum();
            let Some(oldest) = self.segments.front() else { break };
            let too_old = std::fs::metadata(&oldest.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > self.settings.max_age);
            if total <= self.settings.max_bytes && !too_old {
                break;
            }
            match std::fs::remove_file(&oldest.path) {
                Ok(()) => {
                    tracing::info!(segment = %oldest.path.display(), bytes = oldest.len, "change log: removed a segment past retention");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, segment = %oldest.path.display(), "change log: could not remove a segment");
                    break;
                }
            }
            self.segments.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, ChangeKind, Column, Relation, ReplicaIdentity};
    use crate::replication::pgoutput::{Tuple, Value};
    use crate::replication::values::TypeCatalog;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "walcast-log-unit-{name}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn settings(dir: &Path) -> LogSettings {
        LogSettings {
            dir: dir.to_owned(),
            max_age: Duration::from_secs(3600),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
        }
    }

    fn identity() -> Identity {
        Identity { system_id: "42".into(), database: "db".into(), slot: "s".into() }
    }

    fn relation(id: u32) -> Arc<Relation> {
        let cat = TypeCatalog::default();
        let col = |name: &str, oid: u32, key: bool| Column {
            name: name.into(),
            ty: Arc::clone(cat.get(oid).unwrap()),
            is_key: key,
            in_primary_key: key,
        };
        Arc::new(Relation::new(
            id,
            "public",
            "t",
            ReplicaIdentity::Default,
            vec![col("id", 20, true), col("v", 25, false)],
        ))
    }

    /// Transaction `n` (commit LSN 100·n): `rows` inserts.
    fn txn(rel: &Arc<Relation>, n: u64, rows: u32) -> Vec<ChangeEvent> {
        let mut out: Vec<ChangeEvent> = (0..rows)
            .map(|i| {
                ChangeEvent::Change(Change {
                    relation: Arc::clone(rel),
                    kind: ChangeKind::Insert,
                    new: Some(Tuple(vec![
                        Value::Text(Bytes::from(format!("{n}{i:03}"))),
                        Value::Text(Bytes::from(format!("value {n}/{i}"))),
                    ])),
                    old: None,
                    commit_lsn: Lsn(100 * n),
                    commit_ts: n as i64,
                    seq: i,
                    xid: 0,
                    snapshot: false,
                })
            })
            .collect();
        out.push(ChangeEvent::Commit { commit_lsn: Lsn(100 * n), end_lsn: Lsn(100 * n + 8) });
        out
    }

    fn write(appender: &mut Appender, events: &[ChangeEvent]) {
        for e in events {
            appender.append(e);
        }
        appender.flush();
    }

    fn read_all(
        log: &ChangeLog,
        after: Position,
        through: Position,
    ) -> Result<Vec<(Position, String)>, reader::LogReadError> {
        let mut r = log.read(&log.cursor(after), through)?;
        let mut out = Vec::new();
        loop {
            let batch = r.next_batch(7)?;
            if batch.is_empty() {
                return Ok(out);
            }
            for e in batch {
                let Entry::Change(c) = e else { panic!("broadcast") };
                let mut v = Vec::new();
                c.write_record(&mut v, None);
                out.push((c.position(), String::from_utf8(v).unwrap()));
            }
        }
    }

    #[test]
    fn cursors_print_and_parse() {
        let c = Cursor { epoch: 0xAB, position: Position { lsn: Lsn(0x1_0000_0002), seq: 3 } };
        let s = c.to_string();
        assert_eq!(s, "000000AB000000010000000200000003");
        assert_eq!(s.parse::<Cursor>(), Ok(c));
        for bad in ["", "xyz", &s[1..], &format!("{s}0"), "0000000G000000010000000200000003"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
        let later = Cursor { position: Position { lsn: Lsn(0x1_0000_0002), seq: 4 }, ..c };
        assert!(c < later && c.to_string() < later.to_string());
        let max = Cursor { epoch: u32::MAX, position: Position { lsn: Lsn(u64::MAX - 1), seq: 0xFEDC_BA98 } };
        assert_eq!(max.to_string(), "FFFFFFFFFFFFFFFFFFFFFFFEFEDCBA98");
        assert_eq!(max.to_string().parse::<Cursor>(), Ok(max));
    }

    #[test]
    fn appended_transactions_survive_a_restart_and_read_back_in_order() {
        let dir = temp_dir("restart");
        let rel = relation(1);
        let ack = Acknowledgement::new();
        let (log, mut app, writer, rec) =
            ChangeLog::open(&settings(&dir), &identity(), false, ack.clone()).unwrap();
        assert!(rec.reset);
        for n in 1..=3 {
            write(&mut app, &txn(&rel, n, 3));
        }
        drop(app);
        writer.join();
        assert_eq!(ack.get(), Lsn(308), "acknowledged once durable");
        let all = read_all(&log, Position::ZERO, log.durable()).unwrap();
        assert_eq!(all.len(), 9);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(all[4].1, r#"{"id":2001,"v":"value 2/1"}"#);
        // From a cursor in the middle: strictly after it.
        let mid = all[4].0;
        let rest = read_all(&log, mid, log.durable()).unwrap();
        assert_eq!(rest, all[5..].to_vec());
        // Up to a bound: nothing after it.
        let bounded = read_all(&log, Position::ZERO, all[2].0).unwrap();
        assert_eq!(bounded, all[..3].to_vec());
        let epoch = log.epoch();
        drop(log);

        let ack = Acknowledgement::new();
        let (log, mut app, writer, rec) =
            ChangeLog::open(&settings(&dir), &identity(), false, ack.clone()).unwrap();
        assert!(!rec.reset && rec.cut_bytes == 0);
        assert_eq!((rec.last_commit, rec.last_commit_end, log.epoch()), (Lsn(300), Lsn(308), epoch));
        assert_eq!(ack.get(), Lsn(308));
        // A relation not written since the restart is written again before its first change.
        write(&mut app, &txn(&rel, 4, 2));
        drop(app);
        writer.join();
        let all = read_all(&log, all[8].0, log.durable()).unwrap();
        assert_eq!(
            all.iter().map(|(_, r)| r.as_str()).collect::<Vec<_>>(),
            [r#"{"id":4000,"v":"value 4/0"}"#, r#"{"id":4001,"v":"value 4/1"}"#]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_back_to_the_last_whole_transaction() {
        let dir = temp_dir("torn");
        let rel = relation(1);
        let (log, mut app, writer, _) =
            ChangeLog::open(&settings(&dir), &identity(), false, Acknowledgement::new()).unwrap();
        write(&mut app, &txn(&rel, 1, 2));
        write(&mut app, &txn(&rel, 2, 2));
        drop(app);
        writer.join();
        let whole = std::fs::metadata(segment_path(&dir, Position::ZERO)).unwrap().len();
        drop(log);
        let seg = segment_path(&dir, Position::ZERO);
        // An unfinished transaction, then half a record.
        let mut tail = Vec::new();
        for e in &txn(&rel, 3, 2)[..2] {
            if let ChangeEvent::Change(c) = e {
                record::encode_change(&mut tail, c);
            }
        }
        let mut half = Vec::new();
        record::encode_commit(&mut half, Lsn(300), Lsn(308));
        tail.extend_from_slice(&half[..half.len() - 3]);
        OpenOptions::new().append(true).open(&seg).unwrap().write_all(&tail).unwrap();

        let (log, app, writer, rec) =
            ChangeLog::open(&settings(&dir), &identity(), false, Acknowledgement::new()).unwrap();
        assert_eq!(rec.cut_bytes, tail.len() as u64);
        assert_eq!(rec.last_commit, Lsn(200));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), whole);
        assert_eq!(read_all(&log, Position::ZERO, log.durable()).unwrap().len(), 4);
        drop(app);
        writer.join();
        drop(log);

        // A flipped byte inside the last transaction: cut back to the one before.
        let mut bytes = std::fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 30] ^= 0xFF;
        std::fs::write(&seg, &bytes).unwrap();
        let (log, app, writer, rec) =
            ChangeLog::open(&settings(&dir), &identity(), false, Acknowledgement::new()).unwrap();
        assert!(rec.cut_bytes > 0);
        assert_eq!(rec.last_commit, Lsn(100));
        assert_eq!(read_all(&log, Position::ZERO, log.durable()).unwrap().len(), 2);
        drop(app);
        writer.join();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn segments_roll_carry_their_relations_and_expire_into_a_gap() {
        let dir = temp_dir("roll");
        let rel = relation(1);
        let s = LogSettings { segment_bytes: 4096, max_bytes: 4 * 4096, ..settings(&dir) };
        let (log, mut app, writer, _) =
            ChangeLog::open(&s, &identity(), false, Acknowledgement::new()).unwrap();
        for n in 1..=200 {
            write(&mut app, &txn(&rel, n, 3));
        }
        drop(app);
        writer.join();
        let segments = list_segments(&dir).unwrap();
        assert!(segments.len() >= 3 && segments.len() <= 6, "{} segments", segments.len());
        let total: u64 = segments.iter().map(|(_, p)| std::fs::metadata(p).unwrap().len()).sum();
        assert!(total <= 5 * 4096, "retention keeps the log near its size: {total}");
        // The oldest transactions are gone: a cursor before them is a gap.
        let first = Cursor { epoch: log.epoch(), position: Position { lsn: Lsn(100), seq: 0 } };
        assert_eq!(log.check(&first), Err(Gap::Expired));
        assert!(matches!(log.read(&first, log.durable()), Err(Gap::Expired)));
        // From the start of the oldest kept segment, reading crosses into later ones, each
        // bringing its own relation records.
        let (oldest, _) = segments[0];
        let all = read_all(&log, oldest, log.durable()).unwrap();
        assert_eq!(all.last().map(|(p, _)| p.lsn), Some(Lsn(20_000)));
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(all.len() % 3, 0);
        // Another log's cursor.
        let other = Cursor { epoch: log.epoch().wrapping_add(1), ..first };
        assert_eq!(log.check(&other), Err(Gap::OtherLog));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_of_another_stream_or_a_new_slot_starts_afresh_and_one_process_holds_it() {
        let dir = temp_dir("reset");
        let rel = relation(1);
        let (log, mut app, writer, _) =
            ChangeLog::open(&settings(&dir), &identity(), false, Acknowledgement::new()).unwrap();
        assert!(matches!(
            ChangeLog::open(&settings(&dir), &identity(), false, Acknowledgement::new()),
            Err(LogError::Locked(_))
        ));
        write(&mut app, &txn(&rel, 1, 1));
        drop(app);
        writer.join();
        let old = log.epoch();
        drop(log);
        let (log, app, writer, rec) =
            ChangeLog::open(&settings(&dir), &identity(), true, Acknowledgement::new()).unwrap();
        assert!(rec.reset && log.epoch() != old && rec.last_commit == Lsn::ZERO);
        assert_eq!(log.check(&Cursor { epoch: old, position: Position::ZERO }), Err(Gap::OtherLog));
        drop(app);
        writer.join();
        drop(log);
        let other = Identity { slot: "t".into(), ..identity() };
        let (log2, app, writer, rec) =
            ChangeLog::open(&settings(&dir), &other, false, Acknowledgement::new()).unwrap();
        assert!(rec.reset);
        drop(app);
        writer.join();
        drop(log2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
