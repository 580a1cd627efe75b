//! The dispatcher's side of the log: events encoded in order into chunks (with the relation
//! records they need), handed to the writer thread whole.
//!
//! Must not: write files or wait for the disk.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::change::{ChangeEvent, Position, Relation};
use crate::log::record;
use crate::replication::lsn::Lsn;

/// The appender hands a chunk to the writer at least this often.
const CHUNK_BYTES: usize = 256 * 1024;
/// One chunk of encoded records, handed from the appender to the writer.
pub(super) struct Chunk {
    pub(super) bytes: Vec<u8>,
    /// Relation records in this chunk, by relation id (the writer repeats the latest of each at
    /// the head of every new segment).
    pub(super) relations: Vec<(u32, Bytes)>,
    /// The position of the last record in the chunk.
    pub(super) through: Option<Position>,
    /// End LSN of the last commit in the chunk.
    pub(super) commit_end: Option<Lsn>,
    /// The chunk ends on a commit (a segment may be closed after it).
    pub(super) ends_txn: bool,
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
    pub(super) fn new(tx: std::sync::mpsc::Sender<Chunk>) -> Appender {
        Appender {
            tx,
            buf: Vec::with_capacity(CHUNK_BYTES),
            relations: Vec::new(),
            emitted: HashMap::new(),
            through: None,
            commit_end: None,
            ends_txn: true,
        }
    }

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
