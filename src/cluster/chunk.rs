//! The body of one message on the cluster's stream: a run of whole events in commit order,
//! self-contained, so that a node can start reading at any message.
//!
//! Layout: `WCS1`, the number of transactions named (u32 LE), for each its commit LSN (u64 LE)
//! and transaction id (u32 LE), then change-log records (`log::record`: length, CRC-32C, tag):
//! the relation record of every table before the chunk's first change of it, then the
//! changes, database broadcasts and commits. The transaction ids travel beside the records
//! (which do not keep them) because a snapshot's hand-off on every node decides by them.
//!
//! Must not: panic on any input (a message is wire input); decide where a chunk ends (the
//! owner does).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::change::{ChangeEvent, Position, Relation};
use crate::log::record::{self, Record, RecordError};
use crate::replication::lsn::Lsn;

const MAGIC: &[u8; 4] = b"WCS1";

/// Why a chunk could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChunkError {
    #[error("not a walcast stream chunk (bad magic)")]
    Magic,
    #[error("chunk header ends early at byte {at}")]
    Header { at: usize },
    #[error("chunk record: {0}")]
    Record(#[from] RecordError),
    #[error("chunk change at byte {at} refers to relation {id}, which the chunk does not describe")]
    UnknownRelation { at: usize, id: u32 },
    #[error("chunk change at byte {at} is in a transaction the header does not name")]
    UnknownTransaction { at: usize },
}

/// Events gathered into one chunk.
#[derive(Debug, Default)]
pub struct ChunkBuilder {
    records: Vec<u8>,
    xids: Vec<(Lsn, u32)>,
    /// Relations described in this chunk (by id, the `Arc` they were described with).
    described: HashMap<u32, Arc<Relation>>,
    events: usize,
    /// How many of the events are changes.
    changes: u64,
    through: Option<Position>,
    commit_end: Option<Lsn>,
    /// The last event pushed was a commit.
    ends_txn: bool,
}

/// A finished chunk.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub bytes: Bytes,
    /// The position of its last event.
    pub through: Option<Position>,
    /// The end LSN of its last commit (what the slot may be acknowledged up to once the chunk is
    /// stored).
    pub commit_end: Option<Lsn>,
    /// How many changes it holds.
    pub changes: u64,
}

impl ChunkBuilder {
    pub fn push(&mut self, event: &ChangeEvent) {
        match event {
            ChangeEvent::Change(c) => {
                if !self.described.get(&c.relation.id).is_some_and(|r| Arc::ptr_eq(r, &c.relation)) {
                    record::encode_relation(&mut self.records, &c.relation);
                    self.described.insert(c.relation.id, Arc::clone(&c.relation));
                }
                if self.xids.last().is_none_or(|(lsn, _)| *lsn != c.commit_lsn) {
                    self.xids.push((c.commit_lsn, c.xid));
                }
                record::encode_change(&mut self.records, c);
                self.changes += 1;
                self.through = Some(c.position());
            }
            ChangeEvent::Broadcast(b) => {
                record::encode_broadcast(&mut self.records, b.position, &b.raw);
                self.through = Some(b.position);
            }
            ChangeEvent::Commit { commit_lsn, end_lsn } => {
                record::encode_commit(&mut self.records, *commit_lsn, *end_lsn);
                self.through = Some(Position::end_of(*commit_lsn));
                self.commit_end = Some(*end_lsn);
            }
        }
        self.events += 1;
        self.ends_txn = matches!(event, ChangeEvent::Commit { .. });
    }

    /// Whether the events pushed end on a commit (and there are some).
    pub fn ends_on_commit(&self) -> bool {
        self.events > 0 && self.ends_txn
    }

    /// Events pushed since the last `finish`.
    pub fn len(&self) -> usize {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Bytes of records so far.
    pub fn bytes(&self) -> usize {
        self.records.len()
    }

    /// The chunk of everything pushed; the builder starts afresh.
    pub fn finish(&mut self) -> Chunk {
        let mut out = Vec::with_capacity(8 + self.xids.len() * 12 + self.records.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.xids.len() as u32).to_le_bytes());
        for (lsn, xid) in &self.xids {
            out.extend_from_slice(&lsn.0.to_le_bytes());
            out.extend_from_slice(&xid.to_le_bytes());
        }
        out.extend_from_slice(&self.records);
        let chunk = Chunk {
            bytes: Bytes::from(out),
            through: self.through,
            commit_end: self.commit_end,
            changes: self.changes,
        };
        *self = ChunkBuilder::default();
        chunk
    }
}

/// The events of a chunk, in order. A database broadcast whose message cannot be read is
/// skipped (as the change log's reader does); anything else that does not read is an error.
pub fn decode(bytes: &Bytes) -> Result<Vec<ChangeEvent>, ChunkError> {
    if bytes.get(..4) != Some(&MAGIC[..]) {
        return Err(ChunkError::Magic);
    }
    let count = read_u32(bytes, 4)? as usize;
    let header_end =
        count.checked_mul(12).and_then(|n| n.checked_add(8)).ok_or(ChunkError::Header { at: 4 })?;
    if header_end > bytes.len() {
        return Err(ChunkError::Header { at: bytes.len() });
    }
    let xids: HashMap<Lsn, u32> = (0..count)
        .map(|i| 8 + i * 12)
        .map(|at| Ok((Lsn(read_u64(bytes, at)?), read_u32(bytes, at + 8)?)))
        .collect::<Result<_, ChunkError>>()?;
    let mut relations: HashMap<u32, Arc<Relation>> = HashMap::new();
    let mut events = Vec::new();
    let mut at = header_end;
    while at < bytes.len() {
        let len = record::frame_len(&bytes[at..], at)?
            .ok_or(RecordError::Truncated { at, needed: bytes.len().saturating_sub(at).max(1) })?;
        let rec = record::decode(&bytes.slice(at..at + len), at)?;
        match rec {
            Record::Relation(r) => {
                relations.insert(r.id, r);
            }
            Record::Change(c) => {
                let relation = relations
                    .get(&c.relation_id)
                    .ok_or(ChunkError::UnknownRelation { at, id: c.relation_id })?;
                let xid = *xids.get(&c.position.lsn).ok_or(ChunkError::UnknownTransaction { at })?;
                events.push(ChangeEvent::Change(c.into_change(relation, xid)));
            }
            Record::Broadcast { position, raw } => {
                events
                    .extend(record::broadcast_at(position, &raw, "stream chunk").map(ChangeEvent::Broadcast));
            }
            Record::Commit { commit_lsn, end_lsn } => {
                events.push(ChangeEvent::Commit { commit_lsn, end_lsn })
            }
        }
        at += len;
    }
    Ok(events)
}

fn read_u32(b: &[u8], at: usize) -> Result<u32, ChunkError> {
    let s = b.get(at..at + 4).ok_or(ChunkError::Header { at })?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn read_u64(b: &[u8], at: usize) -> Result<u64, ChunkError> {
    let s = b.get(at..at + 8).ok_or(ChunkError::Header { at })?;
    let mut a = [0; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, ChangeKind, Column, DbBroadcast, ReplicaIdentity};
    use crate::replication::pgoutput::{Tuple, Value};
    use crate::replication::values::TypeCatalog;

    fn relation(id: u32, name: &str) -> Arc<Relation> {
        let cat = TypeCatalog::default();
        let ty = Arc::clone(cat.get(25).expect("text"));
        let column = Column { name: "v".into(), ty, is_key: true, in_primary_key: true };
        Arc::new(Relation::new(id, "public", name, ReplicaIdentity::Default, vec![column]))
    }

    fn insert(rel: &Arc<Relation>, lsn: u64, seq: u32, xid: u32, v: &str) -> ChangeEvent {
        ChangeEvent::Change(Change {
            relation: Arc::clone(rel),
            kind: ChangeKind::Insert,
            new: Some(Tuple(vec![Value::Text(Bytes::from(v.to_owned()))])),
            old: None,
            commit_lsn: Lsn(lsn),
            commit_ts: 1_000 + lsn as i64,
            seq,
            xid,
            snapshot: false,
        })
    }

    /// Two transactions over two tables and a database broadcast, as a chunk.
    fn sample() -> (Vec<ChangeEvent>, Chunk) {
        let (a, b) = (relation(10, "a"), relation(11, "b"));
        let mut raw = DbBroadcast::decode(
            br#"{"id":"u1","topic":"room","event":"e","private":false,"payload":{"x":1},"binary_payload":null}"#,
        )
        .expect("broadcast");
        raw.position = Position { lsn: Lsn(200), seq: 1 };
        let events = vec![
            insert(&a, 100, 0, 7, "one"),
            insert(&b, 100, 1, 7, "two"),
            ChangeEvent::Commit { commit_lsn: Lsn(100), end_lsn: Lsn(108) },
            insert(&a, 200, 0, 9, "three"),
            ChangeEvent::Broadcast(raw),
            ChangeEvent::Commit { commit_lsn: Lsn(200), end_lsn: Lsn(208) },
        ];
        let mut builder = ChunkBuilder::default();
        for e in &events {
            builder.push(e);
        }
        assert_eq!(builder.len(), 6);
        let chunk = builder.finish();
        assert!(builder.is_empty(), "a finished builder starts afresh");
        (events, chunk)
    }

    /// What an event is, as comparable text (changes have no `PartialEq`).
    fn describe(e: &ChangeEvent) -> String {
        match e {
            ChangeEvent::Change(c) => {
                format!(
                    "{} {} xid {} {}",
                    c.relation.table,
                    c.cursor(),
                    c.xid,
                    String::from_utf8_lossy(&c.to_tail_json())
                )
            }
            ChangeEvent::Broadcast(b) => format!("broadcast {:?} {}", b.position, b.topic),
            ChangeEvent::Commit { commit_lsn, end_lsn } => format!("commit {commit_lsn} {end_lsn}"),
        }
    }

    #[test]
    fn a_chunk_reads_back_every_event_with_its_transaction_id() {
        let (events, chunk) = sample();
        assert_eq!(chunk.through, Some(Position::end_of(Lsn(200))));
        assert_eq!(chunk.commit_end, Some(Lsn(208)));
        let back = decode(&chunk.bytes).expect("decode");
        let want: Vec<String> = events.iter().map(describe).collect();
        assert_eq!(back.iter().map(describe).collect::<Vec<_>>(), want);
        // Self-contained: a chunk of a later transaction describes its tables again.
        let mut builder = ChunkBuilder::default();
        builder.push(&insert(&relation(10, "a"), 300, 0, 11, "four"));
        let later = decode(&builder.finish().bytes).expect("decode a chunk on its own");
        assert_eq!(later.len(), 1);
    }

    #[test]
    fn malformed_chunks_are_errors_never_panics() {
        let (_, chunk) = sample();
        let bytes = chunk.bytes;
        assert_eq!(decode(&Bytes::from_static(b"")).err(), Some(ChunkError::Magic));
        assert_eq!(decode(&Bytes::from_static(b"WCS2\0\0\0\0")).err(), Some(ChunkError::Magic));
        assert_eq!(decode(&Bytes::from_static(b"WCS1\x01")).err(), Some(ChunkError::Header { at: 4 }));
        assert_eq!(
            decode(&Bytes::from_static(b"WCS1\xff\xff\xff\xff")).err(),
            Some(ChunkError::Header { at: 8 })
        );
        // Every truncation and every single-byte change is an error or fewer events, never a
        // panic.
        for cut in 0..bytes.len() {
            let _ = decode(&bytes.slice(..cut));
        }
        for at in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[at] ^= 0x5a;
            let _ = decode(&Bytes::from(b));
        }
        // A change whose table the chunk does not describe, or whose transaction it does not name.
        let header_end = 8 + 2 * 12;
        let mut no_xids = b"WCS1\0\0\0\0".to_vec();
        no_xids.extend_from_slice(&bytes[header_end..]);
        assert!(matches!(decode(&Bytes::from(no_xids)), Err(ChunkError::UnknownTransaction { .. })));
        let mut only_change = bytes[..header_end].to_vec();
        let mut rec = Vec::new();
        let ChangeEvent::Change(c) = insert(&relation(10, "a"), 100, 0, 7, "x") else { unreachable!() };
        record::encode_change(&mut rec, &c);
        only_change.extend_from_slice(&rec);
        assert_eq!(
            decode(&Bytes::from(only_change)).err(),
            Some(ChunkError::UnknownRelation { at: header_end, id: 10 })
        );
    }
}
