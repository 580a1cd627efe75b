//! Reading the change log: the changes and database broadcasts after a position, up to a bound,
//! rebuilt as the dispatcher saw them (`Change` with its `Relation`, `DbBroadcast`).
//!
//! Owns: walking segments in order and resolving relation ids. Must not: read past its bound
//! (records after it may be half written), or write anything. Blocking IO: run it on a blocking
//! thread.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::change::{Change, DbBroadcast, Position, Relation};
use crate::log::cursor::Gap;
use crate::log::files::{check_header, LogError, SEGMENT_HEADER};
use crate::log::record::{self, Record};

/// Bytes read from a segment at a time.
const READ_BYTES: usize = 1 << 20;

/// One event read back.
#[derive(Debug)]
pub enum Entry {
    Change(Change),
    Broadcast(DbBroadcast),
}

impl Entry {
    pub fn position(&self) -> Position {
        match self {
            Entry::Change(c) => c.position(),
            Entry::Broadcast(b) => b.position,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogReadError {
    #[error(transparent)]
    Gap(#[from] Gap),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("change log {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: record::RecordError,
    },
    #[error("change log {path}: a change refers to relation {id}, which no record before it describes")]
    UnknownRelation { path: PathBuf, id: u32 },
}

/// Reads the events after one position up to a bound.
pub struct LogReader {
    /// Segments still to read, the current one first.
    segments: VecDeque<(Position, PathBuf)>,
    epoch: u32,
    after: Position,
    through: Position,
    file: Option<File>,
    /// Unparsed bytes of the current segment, from `offset` in the file.
    buf: Bytes,
    offset: usize,
    eof: bool,
    relations: HashMap<u32, Arc<Relation>>,
    done: bool,
}

impl LogReader {
    pub(crate) fn new(
        segments: Vec<(Position, PathBuf)>,
        epoch: u32,
        after: Position,
        through: Position,
    ) -> Result<LogReader, Gap> {
        // Start in the last segment that begins at or before `after`.
        let start = segments.iter().rposition(|(prev, _)| *prev <= after).ok_or(Gap::Expired)?;
        Ok(LogReader {
            segments: segments.into_iter().skip(start).collect(),
            epoch,
            after,
            through,
            file: None,
            buf: Bytes::new(),
            offset: 0,
            eof: false,
            relations: HashMap::new(),
            done: after >= through,
        })
    }

    /// The position this reader stops after.
    pub fn through(&self) -> Position {
        self.through
    }

    /// Up to `max` events, in order; empty once everything up to the bound was read.
    pub fn next_batch(&mut self, max: usize) -> Result<Vec<Entry>, LogReadError> {
        let mut out = Vec::new();
        while !self.done && out.len() < max {
            let Some((frame, at)) = self.next_frame()? else {
                self.done = true;
                break;
            };
            let path = || self.segments.front().map(|(_, p)| p.clone()).unwrap_or_default();
            let rec =
                record::decode(&frame, at).map_err(|source| LogReadError::Record { path: path(), source })?;
            if let Some(p) = rec.position() {
                if p > self.through {
                    self.done = true;
                    break;
                }
                if p <= self.after {
                    if let Record::Relation(r) = rec {
                        self.relations.insert(r.id, r);
                    }
                    continue;
                }
            }
            match rec {
                Record::Relation(r) => {
                    self.relations.insert(r.id, r);
                }
                Record::Change(c) => {
                    let relation = self
                        .relations
                        .get(&c.relation_id)
                        .ok_or_else(|| LogReadError::UnknownRelation { path: path(), id: c.relation_id })?;
                    out.push(Entry::Change(c.into_change(relation, 0)));
                }
                Record::Broadcast { position, raw } => {
                    out.extend(record::broadcast_at(position, &raw, "change log").map(Entry::Broadcast));
                }
                Record::Commit { .. } => {}
            }
        }
        Ok(out)
    }

    /// The next whole frame, moving to the next segment at the end of one; `None` at the end of
    /// the last segment.
    fn next_frame(&mut self) -> Result<Option<(Bytes, usize)>, LogReadError> {
        loop {
            if self.file.is_none() && !self.open_current()? {
                return Ok(None);
            }
            let path = self.segments.front().map(|(_, p)| p.clone()).unwrap_or_default();
            match record::frame_len(&self.buf, self.offset) {
                Ok(Some(len)) => {
                    let frame = self.buf.split_to(len);
                    let at = self.offset;
                    self.offset += len;
                    return Ok(Some((frame, at)));
                }
                Ok(None) if !self.eof => {
                    self.fill().map_err(|e| LogError::Io { path, action: "reading", source: e })?
                }
                Ok(None) => {
                    // The end of this segment (a partial frame here is one still being written).
                    self.file = None;
                    self.segments.pop_front();
                    if self.segments.is_empty() {
                        return Ok(None);
                    }
                }
                Err(source) => return Err(LogReadError::Record { path, source }),
            }
        }
    }

    /// Opens the current segment and checks its header; `false` when there is none left.
    fn open_current(&mut self) -> Result<bool, LogReadError> {
        let Some((_, path)) = self.segments.front() else { return Ok(false) };
        let mut f = match File::open(path) {
            Ok(f) => f,
            // Removed by retention since it was listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Gap::Expired.into()),
            Err(e) => return Err(LogError::Io { path: path.clone(), action: "opening", source: e }.into()),
        };
        let mut header = [0; SEGMENT_HEADER];
        f.read_exact(&mut header).map_err(|e| LogError::Io {
            path: path.clone(),
            action: "reading the header",
            source: e,
        })?;
        check_header(&header, self.epoch, path)?;
        self.file = Some(f);
        self.buf = Bytes::new();
        self.offset = SEGMENT_HEADER;
        self.eof = false;
        Ok(true)
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let Some(f) = self.file.as_mut() else { return Ok(()) };
        let mut v = Vec::with_capacity(self.buf.len() + READ_BYTES);
        v.extend_from_slice(&self.buf);
        let start = v.len();
        v.resize(start + READ_BYTES, 0);
        let mut filled = start;
        while filled < v.len() {
            match f.read(&mut v[filled..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        v.truncate(filled);
        self.buf = Bytes::from(v);
        Ok(())
    }
}
