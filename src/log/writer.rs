//! The writer thread: appends the appender's chunks, syncs them (one sync for everything
//! waiting), publishes what is written and durable, and only then advances the
//! acknowledgement; rolls segments at a commit (each new one starts with the relations it
//! needs) and applies retention by age and size, oldest first, never the segment being written.
//!
//! Must not: acknowledge anything not synced; go on after a failed write or sync.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use crate::change::Position;
use crate::log::appender::Chunk;
use crate::log::files::{create_segment, io, segment_path, sync_dir, LogError, SEGMENT_HEADER};
use crate::replication::ack::Acknowledgement;

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

/// What the log handle and the writer share.
pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) epoch: u32,
    /// The last position written (readable by readers).
    pub(super) written: watch::Sender<Position>,
    /// The last position synced to disk.
    pub(super) durable: watch::Sender<Position>,
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

pub(super) struct SegmentFile {
    pub(super) path: PathBuf,
    pub(super) len: u64,
}

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) settings: LogSettings,
    pub(super) file: File,
    /// Oldest first; the last is being written.
    pub(super) segments: VecDeque<SegmentFile>,
    /// The latest relation record of each id.
    pub(super) relations: HashMap<u32, Bytes>,
    pub(super) last: Position,
    pub(super) ends_txn: bool,
    pub(super) ack: Acknowledgement,
    pub(super) _lock: File,
}

impl Writer {
    /// Starts the writer thread; it stops once the returned sender (the appender's) is dropped.
    pub(super) fn spawn(mut self) -> std::io::Result<(std::sync::mpsc::Sender<Chunk>, WriterHandle)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("walcast-log".into()).spawn(move || self.run(rx))?;
        Ok((tx, WriterHandle { thread: Some(thread) }))
    }

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
