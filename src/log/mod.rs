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
//! Here: `ChangeLog` (open: the lock, `meta.json` and the epoch, tail recovery; cursors, the
//! gap check, readers). Beside it: `appender` (chunks), `writer` (the thread: append, sync,
//! acknowledge, roll, retention), `files` (modes, segment names and headers, tail recovery),
//! `cursor` (cursors and gaps), `record` (framing and bodies), `reader`.
//! Must not: touch sockets or the index, or log row values.

pub mod appender;
pub mod cursor;
pub mod files;
pub mod reader;
pub mod record;
pub mod writer;

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::change::Position;
use crate::log::files::{
    create_segment, io, list_segments, lock_dir, recover_tail, segment_path, sync_dir, write_synced,
};
use crate::log::writer::{SegmentFile, Shared, Writer};
use crate::replication::ack::Acknowledgement;
use crate::replication::lsn::Lsn;

pub use appender::Appender;
pub use cursor::{Cursor, Gap, ParseCursorError};
pub use files::{LogError, DIR_MODE, FILE_MODE, SEGMENT_HEADER};
pub use reader::{Entry, LogReadError, LogReader};
pub use writer::{LogSettings, WriterHandle};

/// `meta.json`'s format version.
const META_VERSION: u32 = 1;
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

/// Where a log's events come from, which decides when its contents may be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Straight from the replication slot. `fresh`: the slot was just made, so it cannot have
    /// streamed what comes before it, and a log kept from before would have a hole.
    Slot { fresh: bool },
    /// From a cluster's stream, whose epoch every node's log shares (so cursors are valid on
    /// every node) and whose oldest chunk follows `begin`: a log that ends before `begin` can
    /// no longer be continued and starts afresh at `begin`, in the same epoch.
    Stream { epoch: u32, begin: Position },
}

/// The log's epoch: its own, when it belongs to `identity` and may be kept; otherwise a new
/// one (the stream's, for `Origin::Stream`), with the old segments removed and the new identity
/// recorded. Returns (epoch, kept).
fn choose_epoch(
    dir: &Path,
    identity: &Identity,
    origin: Origin,
    segments: &mut Vec<(Position, PathBuf)>,
) -> Result<(u32, bool), LogError> {
    let meta_path = dir.join("meta.json");
    let meta: Option<Meta> = match std::fs::read(&meta_path) {
        Ok(b) => serde_json::from_slice(&b).ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&meta_path, "reading")(e)),
    };
    if let Some(m) = meta.as_ref().filter(|m| m.version == META_VERSION && m.identity == *identity) {
        let keep = match origin {
            Origin::Slot { fresh } => !fresh || segments.is_empty(),
            Origin::Stream { epoch, begin } => m.epoch == epoch && !ends_before(m.epoch, segments, begin)?,
        };
        if keep {
            return Ok((m.epoch, true));
        }
    }
    if !segments.is_empty() {
        tracing::warn!(dir = %dir.display(), "change log belongs to another stream, or cannot be continued; starting a new log");
    }
    for (_, path) in segments.drain(..) {
        std::fs::remove_file(&path).map_err(io(&path, "removing an old segment"))?;
    }
    let epoch = match origin {
        Origin::Stream { epoch, .. } => epoch,
        Origin::Slot { .. } => loop {
            let e = fastrand::u32(..);
            if e != 0 && meta.as_ref().is_none_or(|m| m.epoch != e) {
                break e;
            }
        },
    };
    let m = Meta { version: META_VERSION, epoch, identity: identity.clone() };
    let tmp = dir.join("meta.json.tmp");
    let body = serde_json::to_vec_pretty(&m).unwrap_or_default();
    write_synced(&tmp, &body)?;
    std::fs::rename(&tmp, &meta_path).map_err(io(&meta_path, "replacing"))?;
    sync_dir(dir)?;
    Ok((epoch, false))
}

/// Whether the log in `segments` ends before `begin` (what its last whole transaction reached,
/// read without changing anything).
fn ends_before(epoch: u32, segments: &[(Position, PathBuf)], begin: Position) -> Result<bool, LogError> {
    let Some((prev, path)) = segments.last() else {
        return Ok(begin > Position::ZERO);
    };
    let last = files::last_position(path, epoch)?.unwrap_or(*prev);
    Ok(last < begin)
}

/// The segment to append to: the last one, its torn tail cut back (noted in `recovered`), or a
/// first one. Returns the file, its length and the last position in the log.
fn open_tail(
    dir: &Path,
    epoch: u32,
    begin: Position,
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
            let path = segment_path(dir, begin);
            let f = create_segment(&path, epoch, begin)?;
            sync_dir(dir)?;
            segments.push((begin, path));
            Ok((f, SEGMENT_HEADER as u64, begin))
        }
    }
}

impl ChangeLog {
    /// Opens (or creates) the log in `settings.dir` for `identity`, recovers its tail, and
    /// starts the writer thread, which advances `ack` as chunks become durable. A log that
    /// belongs to another stream, or one `origin` says cannot be continued (the slot cannot have
    /// streamed what comes before it; the cluster's stream no longer holds what follows it), is
    /// started afresh (with a new epoch, or the stream's): cursors into it get a gap.
    pub fn open(
        settings: &LogSettings,
        identity: &Identity,
        origin: Origin,
        ack: Acknowledgement,
    ) -> Result<(ChangeLog, Appender, WriterHandle, Recovered), LogError> {
        let dir = &settings.dir;
        let lock = lock_dir(dir)?;
        let mut segments = list_segments(dir)?;
        let (epoch, keep) = choose_epoch(dir, identity, origin, &mut segments)?;
        let begin = match origin {
            Origin::Stream { begin, .. } => begin,
            Origin::Slot { .. } => Position::ZERO,
        };
        let mut recovered =
            Recovered { last_commit: Lsn::ZERO, last_commit_end: Lsn::ZERO, cut_bytes: 0, reset: !keep };
        let (file, size, last) = open_tail(dir, epoch, begin, &mut segments, &mut recovered)?;
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
        let writer = Writer {
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
        let (tx, handle) = writer.spawn().map_err(io(dir, "starting the writer thread"))?;
        Ok((ChangeLog { shared }, Appender::new(tx), handle, recovered))
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::change::ChangeEvent;
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
            ChangeLog::open(&settings(&dir), &identity(), Origin::Slot { fresh: false }, ack.clone())
                .unwrap();
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
            ChangeLog::open(&settings(&dir), &identity(), Origin::Slot { fresh: false }, ack.clone())
                .unwrap();
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
        let (log, mut app, writer, _) = ChangeLog::open(
            &settings(&dir),
            &identity(),
            Origin::Slot { fresh: false },
            Acknowledgement::new(),
        )
        .unwrap();
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

        let (log, app, writer, rec) = ChangeLog::open(
            &settings(&dir),
            &identity(),
            Origin::Slot { fresh: false },
            Acknowledgement::new(),
        )
        .unwrap();
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
        let (log, app, writer, rec) = ChangeLog::open(
            &settings(&dir),
            &identity(),
            Origin::Slot { fresh: false },
            Acknowledgement::new(),
        )
        .unwrap();
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
            ChangeLog::open(&s, &identity(), Origin::Slot { fresh: false }, Acknowledgement::new()).unwrap();
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
        let (log, mut app, writer, _) = ChangeLog::open(
            &settings(&dir),
            &identity(),
            Origin::Slot { fresh: false },
            Acknowledgement::new(),
        )
        .unwrap();
        assert!(matches!(
            ChangeLog::open(
                &settings(&dir),
                &identity(),
                Origin::Slot { fresh: false },
                Acknowledgement::new()
            ),
            Err(LogError::Locked(_))
        ));
        write(&mut app, &txn(&rel, 1, 1));
        drop(app);
        writer.join();
        let old = log.epoch();
        drop(log);
        let (log, app, writer, rec) = ChangeLog::open(
            &settings(&dir),
            &identity(),
            Origin::Slot { fresh: true },
            Acknowledgement::new(),
        )
        .unwrap();
        assert!(rec.reset && log.epoch() != old && rec.last_commit == Lsn::ZERO);
        assert_eq!(log.check(&Cursor { epoch: old, position: Position::ZERO }), Err(Gap::OtherLog));
        drop(app);
        writer.join();
        drop(log);
        let other = Identity { slot: "t".into(), ..identity() };
        let (log2, app, writer, rec) =
            ChangeLog::open(&settings(&dir), &other, Origin::Slot { fresh: false }, Acknowledgement::new())
                .unwrap();
        assert!(rec.reset);
        drop(app);
        writer.join();
        drop(log2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_fed_by_a_cluster_stream_takes_its_epoch_and_starts_where_the_stream_does() {
        let dir = temp_dir("stream");
        let rel = relation(1);
        let open = |epoch: u32, begin: u64| {
            let origin = Origin::Stream { epoch, begin: Position::end_of(Lsn(begin)) };
            ChangeLog::open(&settings(&dir), &identity(), origin, Acknowledgement::new()).unwrap()
        };
        // A new node's log begins where the stream's oldest chunk does: older cursors are a gap.
        let (log, mut app, writer, rec) = open(7, 300);
        assert!(rec.reset);
        assert_eq!((log.epoch(), *log.written().borrow()), (7, Position::end_of(Lsn(300))));
        assert_eq!(log.check(&log.cursor(Position::end_of(Lsn(200)))), Err(Gap::Expired));
        assert_eq!(log.check(&log.cursor(Position::end_of(Lsn(300)))), Ok(()));
        write(&mut app, &txn(&rel, 4, 2));
        write(&mut app, &txn(&rel, 5, 1));
        drop(app);
        writer.join();
        drop(log);
        // The stream still holds what follows the log's end: kept.
        let (log, app, writer, rec) = open(7, 450);
        assert!(!rec.reset);
        assert_eq!(read_all(&log, Position::end_of(Lsn(300)), log.durable()).unwrap().len(), 3);
        drop(app);
        writer.join();
        drop(log);
        // The stream moved past the log's end while the node was away: afresh, same epoch.
        let (log, app, writer, rec) = open(7, 900);
        assert!(rec.reset);
        assert_eq!((log.epoch(), *log.written().borrow()), (7, Position::end_of(Lsn(900))));
        assert_eq!(log.check(&log.cursor(Position::end_of(Lsn(500)))), Err(Gap::Expired));
        drop(app);
        writer.join();
        drop(log);
        // Another stream epoch: its epoch.
        let (log, app, writer, rec) = open(8, 900);
        assert!(rec.reset && log.epoch() == 8);
        assert_eq!(log.check(&Cursor { epoch: 7, position: Position::end_of(Lsn(900)) }), Err(Gap::OtherLog));
        drop(app);
        writer.join();
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
