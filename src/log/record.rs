//! The change log's on-disk records: how a relation, a change, a database broadcast and a commit
//! are laid out, and the framing that lets a reader tell a whole record from a torn or corrupt
//! one.
//!
//! A record is `[body length: u32 LE][CRC-32C of tag + body: u32 LE][tag: u8][body]`. Integers
//! are little-endian; strings and byte strings are a `u32` length and the bytes. Owns: encoding
//! and decoding, nothing else. Must not: do IO, or panic on any input — decoding returns
//! [`RecordError`] naming the byte offset.

use std::sync::Arc;

use bytes::Bytes;

use crate::change::{Column, Position, Relation, ReplicaIdentity};
use crate::replication::lsn::Lsn;
use crate::replication::pgoutput::{Tuple, Value};
use crate::replication::values::{TypeInfo, TypeKind};

/// Bytes before a record's tag: length and checksum.
pub const FRAME_HEADER: usize = 8;
/// A record body larger than this is corrupt (a row is at most 1 GiB in Postgres, and the
/// log never holds one whole transaction in one record).
pub const MAX_BODY: usize = 1 << 30;
/// How deeply array and composite types may nest in a relation record.
const MAX_TYPE_DEPTH: u32 = 32;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

const TAG_RELATION: u8 = 1;
const TAG_CHANGE: u8 = 2;
const TAG_BROADCAST: u8 = 3;
const TAG_COMMIT: u8 = 4;

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record ends early at byte {at} (needs {needed} more)")]
    Truncated { at: usize, needed: usize },
    #[error("record checksum mismatch at byte {at}")]
    Checksum { at: usize },
    #[error("record length {len} at byte {at} is implausible")]
    Length { at: usize, len: usize },
    #[error("unknown record tag {tag} at byte {at}")]
    Tag { at: usize, tag: u8 },
    #[error("invalid {what} at byte {at}")]
    Invalid { at: usize, what: &'static str },
}

/// A change as the log keeps it; the relation is referred to by id.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRecord {
    pub position: Position,
    pub commit_ts: i64,
    pub relation_id: u32,
    pub kind: crate::change::ChangeKind,
    pub new: Option<Tuple>,
    pub old: Option<Tuple>,
}

impl ChangeRecord {
    /// The change, with its table's `relation` (the one its id referred to where it was read)
    /// and its transaction's id (0 where that was not kept).
    pub fn into_change(self, relation: &Arc<Relation>, xid: u32) -> crate::change::Change {
        crate::change::Change {
            relation: Arc::clone(relation),
            kind: self.kind,
            new: self.new,
            old: self.old,
            commit_lsn: self.position.lsn,
            commit_ts: self.commit_ts,
            seq: self.position.seq,
            xid,
            snapshot: false,
        }
    }
}

/// A database broadcast record read back: its message, placed at `position`; `None` (logged)
/// when the message cannot be read, which readers skip.
pub fn broadcast_at(position: Position, raw: &[u8], reader: &str) -> Option<crate::change::DbBroadcast> {
    match crate::change::DbBroadcast::decode(raw) {
        Ok(mut b) => {
            b.position = position;
            Some(b)
        }
        Err(e) => {
            tracing::warn!(error = %e, reader, "skipping an unreadable database broadcast");
            None
        }
    }
}

/// One decoded record.
#[derive(Debug, Clone)]
pub enum Record {
    /// A table's shape; changes after it in the segment refer to it by id.
    Relation(Arc<Relation>),
    Change(ChangeRecord),
    /// A `realtime.messages` row as the trigger emitted it.
    Broadcast {
        position: Position,
        raw: Bytes,
    },
    /// The end of a transaction: everything before it in the log is whole.
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
    },
}

impl Record {
    /// Where the record stands in commit order; `None` for relations.
    pub fn position(&self) -> Option<Position> {
        match self {
            Record::Relation(_) => None,
            Record::Change(c) => Some(c.position),
            Record::Broadcast { position, .. } => Some(*position),
            Record::Commit { commit_lsn, .. } => Some(Position::end_of(*commit_lsn)),
        }
    }
}

/// Appends one framed record to `out`; `body` writes the body after the tag.
fn frame(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.push(tag);
    body(out);
    let len = (out.len() - start - FRAME_HEADER - 1) as u32;
    let crc = CRC.checksum(&out[start + FRAME_HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_position(out: &mut Vec<u8>, p: Position) {
    out.extend_from_slice(&p.lsn.0.to_le_bytes());
    out.extend_from_slice(&p.seq.to_le_bytes());
}

fn put_type(out: &mut Vec<u8>, ty: &TypeInfo) {
    out.extend_from_slice(&ty.oid.to_le_bytes());
    put_str(out, ty.name.as_bytes());
    match &ty.kind {
        TypeKind::Bool => out.push(0),
        TypeKind::Number => out.push(1),
        TypeKind::Json => out.push(2),
        TypeKind::Timestamp => out.push(3),
        TypeKind::TimestampTz => out.push(4),
        TypeKind::Text => out.push(5),
        TypeKind::Array { element, delimiter } => {
            out.push(6);
            out.push(*delimiter);
            put_type(out, element);
        }
        TypeKind::Composite { fields } => {
            out.push(7);
            out.extend_from_slice(&(fields.len() as u32).to_le_bytes());
            for (name, ty) in fields {
                put_str(out, name.as_bytes());
                put_type(out, ty);
            }
        }
    }
}

fn put_tuple(out: &mut Vec<u8>, t: &Tuple) {
    out.extend_from_slice(&(t.0.len() as u32).to_le_bytes());
    for v in &t.0 {
        match v {
            Value::Null => out.push(b'n'),
            Value::UnchangedToast => out.push(b'u'),
            Value::Text(b) => {
                out.push(b't');
                put_str(out, b);
            }
        }
    }
}

fn identity_byte(r: ReplicaIdentity) -> u8 {
    match r {
        ReplicaIdentity::Default => b'd',
        ReplicaIdentity::Nothing => b'n',
        ReplicaIdentity::Full => b'f',
        ReplicaIdentity::Index => b'i',
    }
}

fn kind_byte(k: crate::change::ChangeKind) -> u8 {
    use crate::change::ChangeKind::*;
    match k {
        Insert => b'I',
        Update => b'U',
        Delete => b'D',
        Truncate => b'T',
    }
}

pub fn encode_relation(out: &mut Vec<u8>, rel: &Relation) {
    frame(out, TAG_RELATION, |out| {
        out.extend_from_slice(&rel.id.to_le_bytes());
        put_str(out, rel.schema.as_bytes());
        put_str(out, rel.table.as_bytes());
        out.push(identity_byte(rel.replica_identity));
        out.extend_from_slice(&(rel.columns.len() as u32).to_le_bytes());
        for c in &rel.columns {
            put_str(out, c.name.as_bytes());
            out.push(u8::from(c.is_key) | (u8::from(c.in_primary_key) << 1));
            put_type(out, &c.ty);
        }
    })
}

pub fn encode_change(out: &mut Vec<u8>, c: &crate::change::Change) {
    frame(out, TAG_CHANGE, |out| {
        put_position(out, c.position());
        out.extend_from_slice(&c.commit_ts.to_le_bytes());
        out.extend_from_slice(&c.relation.id.to_le_bytes());
        out.push(kind_byte(c.kind));
        out.push(u8::from(c.new.is_some()) | (u8::from(c.old.is_some()) << 1));
        if let Some(t) = &c.new {
            put_tuple(out, t);
        }
        if let Some(t) = &c.old {
            put_tuple(out, t);
        }
    })
}

pub fn encode_broadcast(out: &mut Vec<u8>, position: Position, raw: &[u8]) {
    frame(out, TAG_BROADCAST, |out| {
        put_position(out, position);
        put_str(out, raw);
    })
}

pub fn encode_commit(out: &mut Vec<u8>, commit_lsn: Lsn, end_lsn: Lsn) {
    frame(out, TAG_COMMIT, |out| {
        out.extend_from_slice(&commit_lsn.0.to_le_bytes());
        out.extend_from_slice(&end_lsn.0.to_le_bytes());
    })
}

/// The frame at the start of `buf`: `Ok(None)` when `buf` does not yet hold all of it (a reader
/// needs more bytes, or the log ends in a torn write); `Ok(Some(len))` with the whole frame's
/// length once it is there and its checksum holds. `at` is `buf`'s offset in the file, for errors.
pub fn frame_len(buf: &[u8], at: usize) -> Result<Option<usize>, RecordError> {
    if buf.len() < FRAME_HEADER + 1 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_BODY {
        return Err(RecordError::Length { at, len });
    }
    let total = FRAME_HEADER + 1 + len;
    if buf.len() < total {
        return Ok(None);
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if CRC.checksum(&buf[FRAME_HEADER..total]) != crc {
        return Err(RecordError::Checksum { at });
    }
    Ok(Some(total))
}

/// Decodes one whole, checked frame (as [`frame_len`] measured it). Relation ids of changes
/// are left for the reader to resolve. Values are slices of `frame`.
pub fn decode(frame: &Bytes, at: usize) -> Result<Record, RecordError> {
    let mut r = Cursor { buf: frame, pos: FRAME_HEADER, base: at };
    let tag = r.u8()?;
    let record = match tag {
        TAG_RELATION => Record::Relation(Arc::new(r.relation()?)),
        TAG_CHANGE => {
            let position = r.position()?;
            let commit_ts = r.i64()?;
            let relation_id = r.u32()?;
            let kind = match r.u8()? {
                b'I' => crate::change::ChangeKind::Insert,
                b'U' => crate::change::ChangeKind::Update,
                b'D' => crate::change::ChangeKind::Delete,
                b'T' => crate::change::ChangeKind::Truncate,
                _ => return Err(r.invalid("change kind")),
            };
            let flags = r.u8()?;
            let new = if flags & 1 != 0 { Some(r.tuple()?) } else { None };
            let old = if flags & 2 != 0 { Some(r.tuple()?) } else { None };
            Record::Change(ChangeRecord { position, commit_ts, relation_id, kind, new, old })
        }
        TAG_BROADCAST => {
            let position = r.position()?;
            let raw = r.bytes()?;
            Record::Broadcast { position, raw }
        }
        TAG_COMMIT => Record::Commit { commit_lsn: Lsn(r.u64()?), end_lsn: Lsn(r.u64()?) },
        tag => return Err(RecordError::Tag { at, tag }),
    };
    if r.pos != frame.len() {
        return Err(r.invalid("record length (trailing bytes)"));
    }
    Ok(record)
}

/// Checked reads over one frame.
struct Cursor<'a> {
    buf: &'a Bytes,
    pos: usize,
    /// The frame's offset in its file.
    base: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, RecordError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(RecordError::Truncated { at: self.base + self.pos, needed: n - left });
        }
        let range = self.pos..self.pos + n;
        self.pos += n;
        Ok(range)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let range = self.take(N)?;
        let mut a = [0; N];
        a.copy_from_slice(&self.buf[range]);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, RecordError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn position(&mut self) -> Result<Position, RecordError> {
        Ok(Position { lsn: Lsn(self.u64()?), seq: self.u32()? })
    }

    fn bytes(&mut self) -> Result<Bytes, RecordError> {
        let n = self.u32()? as usize;
        let range = self.take(n)?;
        Ok(self.buf.slice(range))
    }

    fn string(&mut self, what: &'static str) -> Result<Arc<str>, RecordError> {
        let at = self.pos;
        let b = self.bytes()?;
        std::str::from_utf8(&b).map(Arc::from).map_err(|_| RecordError::Invalid { at: self.base + at, what })
    }

    /// A count of items that each take at least `min` bytes: more than the rest could hold is
    /// corrupt (and must not size an allocation).
    fn count(&mut self, min: usize, what: &'static str) -> Result<usize, RecordError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min) > self.buf.len() - self.pos {
            return Err(self.invalid(what));
        }
        Ok(n)
    }

    fn invalid(&self, what: &'static str) -> RecordError {
        RecordError::Invalid { at: self.base + self.pos, what }
    }

    fn tuple(&mut self) -> Result<Tuple, RecordError> {
        let n = self.count(1, "column count")?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => Value::Text(self.bytes()?),
                _ => return Err(self.invalid("value tag")),
            });
        }
        Ok(Tuple(values))
    }

    fn type_info(&mut self, depth: u32) -> Result<TypeInfo, RecordError> {
        if depth > MAX_TYPE_DEPTH {
            return Err(self.invalid("type nesting"));
        }
        let oid = self.u32()?;
        let name = self.string("type name")?;
        let kind = match self.u8()? {
            0 => TypeKind::Bool,
            1 => TypeKind::Number,
            2 => TypeKind::Json,
            3 => TypeKind::Timestamp,
            4 => TypeKind::TimestampTz,
            5 => TypeKind::Text,
            6 => {
                let delimiter = self.u8()?;
                TypeKind::Array { element: Arc::new(self.type_info(depth + 1)?), delimiter }
            }
            7 => {
                let n = self.count(10, "field count")?;
                let mut fields = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = self.string("field name")?.to_string();
                    fields.push((name, Arc::new(self.type_info(depth + 1)?)));
                }
                TypeKind::Composite { fields }
            }
            _ => return Err(self.invalid("type kind")),
        };
        Ok(TypeInfo { oid, name, kind })
    }

    fn relation(&mut self) -> Result<Relation, RecordError> {
        let id = self.u32()?;
        let schema = self.string("schema name")?;
        let table = self.string("table name")?;
        let identity = match self.u8()? {
            b @ (b'd' | b'n' | b'f' | b'i') => ReplicaIdentity::from_byte(b),
            _ => return Err(self.invalid("replica identity")),
        };
        let n = self.count(14, "column count")?;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.string("column name")?;
            let flags = self.u8()?;
            let ty = Arc::new(self.type_info(0)?);
            columns.push(Column { name, ty, is_key: flags & 1 != 0, in_primary_key: flags & 2 != 0 });
        }
        Ok(Relation::new(id, &schema, &table, identity, columns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, ChangeKind};
    use crate::replication::values::TypeCatalog;

    fn relation() -> Arc<Relation> {
        let cat = TypeCatalog::default();
        let composite = TypeInfo {
            oid: 90000,
            name: "pair".into(),
            kind: TypeKind::Composite {
                fields: vec![
                    ("a".into(), Arc::clone(cat.get(23).unwrap())),
                    ("b".into(), Arc::clone(cat.get(25).unwrap())),
                ],
            },
        };
        let array = TypeInfo {
            oid: 90001,
            name: "_pair".into(),
            kind: TypeKind::Array { element: Arc::new(composite.clone()), delimiter: b',' },
        };
        let col = |name: &str, ty: TypeInfo, key: bool| Column {
            name: name.into(),
            ty: Arc::new(ty),
            is_key: key,
            in_primary_key: key,
        };
        Arc::new(Relation::new(
            7,
            "public",
            "todos",
            ReplicaIdentity::Full,
            vec![
                col("id", (**cat.get(20).unwrap()).clone(), true),
                col("p", composite, false),
                col("ps", array, false),
            ],
        ))
    }

    fn change(rel: &Arc<Relation>) -> Change {
        Change {
            relation: Arc::clone(rel),
            kind: ChangeKind::Update,
            new: Some(Tuple(vec![Value::Text(Bytes::from_static(b"1")), Value::UnchangedToast, Value::Null])),
            old: Some(Tuple(vec![Value::Text(Bytes::from_static(b"1")), Value::Null, Value::Null])),
            commit_lsn: Lsn(0x1_0000_0010),
            commit_ts: 777,
            seq: 3,
            xid: 0,
            snapshot: false,
        }
    }

    fn all_records() -> Vec<u8> {
        let rel = relation();
        let mut out = Vec::new();
        encode_relation(&mut out, &rel);
        encode_change(&mut out, &change(&rel));
        encode_broadcast(&mut out, Position { lsn: Lsn(0x1_0000_0010), seq: 4 }, br#"{"id":"x"}"#);
        encode_commit(&mut out, Lsn(0x1_0000_0010), Lsn(0x1_0000_0040));
        out
    }

    fn decode_all(buf: &[u8]) -> Result<Vec<Record>, RecordError> {
        let buf = Bytes::copy_from_slice(buf);
        let mut at = 0;
        let mut out = Vec::new();
        while at < buf.len() {
            let Some(len) = frame_len(&buf[at..], at)? else {
                return Err(RecordError::Truncated { at, needed: 1 });
            };
            out.push(decode(&buf.slice(at..at + len), at)?);
            at += len;
        }
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let rel = relation();
        let records = decode_all(&all_records()).unwrap();
        assert_eq!(records.len(), 4);
        let Record::Relation(r) = &records[0] else { panic!("{records:?}") };
        assert_eq!(
            (r.id, &*r.schema, &*r.table, r.replica_identity),
            (7, "public", "todos", ReplicaIdentity::Full)
        );
        assert_eq!(r.columns.len(), 3);
        for (a, b) in r.columns.iter().zip(&rel.columns) {
            assert_eq!(
                (&a.name, &*a.ty, a.is_key, a.in_primary_key),
                (&b.name, &*b.ty, b.is_key, b.in_primary_key)
            );
        }
        assert_eq!(r.columns_json, rel.columns_json);
        let c = change(&rel);
        let Record::Change(cr) = &records[1] else { panic!() };
        assert_eq!(
            cr,
            &ChangeRecord {
                position: c.position(),
                commit_ts: 777,
                relation_id: 7,
                kind: ChangeKind::Update,
                new: c.new.clone(),
                old: c.old
            }
        );
        let Record::Broadcast { position, raw } = &records[2] else { panic!() };
        assert_eq!((position.seq, &raw[..]), (4, &br#"{"id":"x"}"#[..]));
        assert_eq!(records[3].position(), Some(Position::end_of(Lsn(0x1_0000_0010))));
        assert!(
            records[1].position() < records[2].position() && records[2].position() < records[3].position()
        );
    }

    #[test]
    fn every_truncation_is_incomplete_never_a_panic() {
        let all = all_records();
        for cut in 0..all.len() {
            let r = decode_all(&all[..cut]);
            if cut == 0 {
                assert!(r.unwrap().is_empty());
            } else {
                assert!(r.is_err() || r.as_ref().is_ok_and(|v| v.len() < 4), "cut {cut}");
            }
        }
        // A frame cut short is "not yet whole", not corrupt.
        assert_eq!(frame_len(&all[..20], 0), Ok(None));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let all = all_records();
        for i in 0..all.len() {
            let mut bad = all.clone();
            bad[i] ^= 0x40;
            match decode_all(&bad) {
                Err(_) => {}
                Ok(v) => panic!("flip at {i} decoded as {} records", v.len()),
            }
        }
    }

    #[test]
    fn malformed_bodies_with_good_checksums_are_errors() {
        // Bodies framed correctly (so the checksum holds) but wrong inside.
        let cases: Vec<(u8, Vec<u8>)> = vec![
            (9, vec![]),
            (TAG_COMMIT, vec![1, 2, 3]),
            (TAG_COMMIT, vec![0; 17]),
            (TAG_CHANGE, [&[0u8; 24][..], &[b'X', 0]].concat()),
            (TAG_CHANGE, [&[0u8; 24][..], &[b'I', 1], &0xFFFF_FFFFu32.to_le_bytes()].concat()),
            (TAG_CHANGE, [&[0u8; 24][..], &[b'I', 1], &1u32.to_le_bytes(), b"?"].concat()),
            (TAG_RELATION, [&7u32.to_le_bytes()[..], &100u32.to_le_bytes()].concat()),
            (TAG_BROADCAST, [&[0u8; 12][..], &50u32.to_le_bytes(), b"ab"].concat()),
        ];
        for (tag, body) in cases {
            let mut out = Vec::new();
            frame(&mut out, tag, |o| o.extend_from_slice(&body));
            assert!(decode_all(&out).is_err(), "tag {tag} body {body:?}");
        }
        // A type nested deeper than allowed.
        let mut deep = Vec::new();
        frame(&mut deep, TAG_RELATION, |o| {
            o.extend_from_slice(&1u32.to_le_bytes());
            put_str(o, b"s");
            put_str(o, b"t");
            o.push(b'd');
            o.extend_from_slice(&1u32.to_le_bytes());
            put_str(o, b"c");
            o.push(0);
            for _ in 0..40 {
                o.extend_from_slice(&1u32.to_le_bytes());
                put_str(o, b"_x");
                o.push(6);
                o.push(b',');
            }
            o.extend_from_slice(&[0; 64]);
        });
        assert!(matches!(decode_all(&deep), Err(RecordError::Invalid { what: "type nesting", .. })));
        // An absurd length is refused before anything is allocated.
        let huge = [&u32::MAX.to_le_bytes()[..], &[0; 8]].concat();
        assert!(matches!(frame_len(&huge, 0), Err(RecordError::Length { .. })));
    }
}
