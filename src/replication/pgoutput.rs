//! The pgoutput decoder (protocol version 1): one `decode` call turns the payload of one XLogData
//! message into a [`Message`]. Column values are slices of the input `Bytes`, never copies.
//!
//! Owns: the byte layout of Begin, Commit, Origin, Relation, Type, Insert, Update, Delete,
//! Truncate and Message. Must not: panic on any input, hold state (the relation cache lives in
//! `relations.rs`), or interpret column values (that is `values.rs`).

use bytes::Bytes;

use crate::replication::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin { commit_lsn: Lsn, name: String },
    Relation(RelationBody),
    Type { oid: u32, namespace: String, name: String },
    Insert { relation_id: u32, new: Tuple },
    Update { relation_id: u32, old: Option<OldTuple>, new: Tuple },
    Delete { relation_id: u32, old: OldTuple },
    Truncate { options: u8, relation_ids: Vec<u32> },
    Message(LogicalMessage),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record; the same value Commit carries as `commit_lsn`.
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_ts: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once the transaction is handled.
    pub end_lsn: Lsn,
    pub commit_ts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key sent with UPDATE/DELETE).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The old row of an UPDATE or DELETE: only the key columns (`K`) or the whole row (`O`).
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    Key(Tuple),
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// One row as sent: a value per column of the relation, in column order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tuple(pub Vec<Value>);

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value the server did not send (`u`).
    UnchangedToast,
    /// The column's text output, exactly as the type's output function wrote it.
    Text(Bytes),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Why a payload could not be decoded. `tag` is the message's first byte, `offset` the byte
/// position in the payload where decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput message {tag:?} at byte {offset}: {kind}", tag = char::from(*.tag))]
pub struct DecodeError {
    pub tag: u8,
    pub offset: usize,
    pub kind: DecodeErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeErrorKind {
    #[error("empty message")]
    Empty,
    #[error("unexpected end of message: {needed} more bytes needed")]
    UnexpectedEnd { needed: usize },
    #[error("unknown message tag")]
    UnknownTag,
    #[error("string is not terminated by a NUL byte")]
    UnterminatedString,
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("unknown tuple value kind {0:#04x}")]
    UnknownValueKind(u8),
    #[error("binary tuple values are not supported (the stream was started with binary 'true')")]
    BinaryValue,
    #[error("negative count or length {0}")]
    Negative(i64),
    #[error("expected one of {expected:?}, found {found:#04x}")]
    UnexpectedByte { expected: &'static [u8], found: u8 },
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// Decodes one pgoutput message. The returned values borrow `buf`'s storage.
pub fn decode(buf: Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError { tag: 0, offset: 0, kind: DecodeErrorKind::Empty });
    };
    let mut r = Reader { buf, pos: 1, tag };
    let msg = match tag {
        b'B' => Message::Begin(Begin { final_lsn: Lsn(r.u64()?), commit_ts: r.i64()?, xid: r.u32()? }),
        b'C' => Message::Commit(Commit {
            flags: r.u8()?,
            commit_lsn: Lsn(r.u64()?),
            end_lsn: Lsn(r.u64()?),
            commit_ts: r.i64()?,
        }),
        b'O' => Message::Origin { commit_lsn: Lsn(r.u64()?), name: r.cstr()? },
        b'R' => Message::Relation(r.relation()?),
        b'Y' => Message::Type { oid: r.u32()?, namespace: r.cstr()?, name: r.cstr()? },
        b'I' => {
            let relation_id = r.u32()?;
            r.expect_byte(b"N")?;
            Message::Insert { relation_id, new: r.tuple()? }
        }
        b'U' => {
            let relation_id = r.u32()?;
            let old = match r.expect_byte(b"KON")? {
                b'K' => Some(OldTuple::Key(r.tuple_then(b"N")?)),
                b'O' => Some(OldTuple::Full(r.tuple_then(b"N")?)),
                _ => None,
            };
            Message::Update { relation_id, old, new: r.tuple()? }
        }
        b'D' => {
            let relation_id = r.u32()?;
            let old = match r.expect_byte(b"KO")? {
                b'K' => OldTuple::Key(r.tuple()?),
                _ => OldTuple::Full(r.tuple()?),
            };
            Message::Delete { relation_id, old }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let options = r.u8()?;
            // Each id is 4 bytes: check the length before reserving anything.
            r.need(n.saturating_mul(4))?;
            let mut relation_ids = Vec::with_capacity(n);
            for _ in 0..n {
                relation_ids.push(r.u32()?);
            }
            Message::Truncate { options, relation_ids }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = Lsn(r.u64()?);
            let prefix = r.cstr()?;
            let len = r.len_i32()?;
            let content = r.take(len)?;
            Message::Message(LogicalMessage { transactional: flags & 1 == 1, lsn, prefix, content })
        }
        _ => return Err(r.error(DecodeErrorKind::UnknownTag)),
    };
    r.finish()?;
    Ok(msg)
}

/// Checked reads over one payload. Every read returns an error instead of panicking.
struct Reader {
    buf: Bytes,
    pos: usize,
    tag: u8,
}

impl Reader {
    fn error(&self, kind: DecodeErrorKind) -> DecodeError {
        DecodeError { tag: self.tag, offset: self.pos, kind }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        let have = self.remaining();
        if have < n {
            return Err(self.error(DecodeErrorKind::UnexpectedEnd { needed: n - have }));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut out = [0u8; N];
        if let Some(src) = self.buf.get(self.pos..self.pos + N) {
            out.copy_from_slice(src);
        }
        self.pos += N;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn len_i32(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i32()?;
        usize::try_from(n).map_err(|_| DecodeError {
            tag: self.tag,
            offset: at,
            kind: DecodeErrorKind::Negative(n.into()),
        })
    }

    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error(DecodeErrorKind::UnterminatedString));
        };
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| self.error(DecodeErrorKind::InvalidUtf8))?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    /// Reads one byte that must be one of `expected`.
    fn expect_byte(&mut self, expected: &'static [u8]) -> Result<u8, DecodeError> {
        let at = self.pos;
        let b = self.u8()?;
        if expected.contains(&b) {
            Ok(b)
        } else {
            Err(DecodeError {
                tag: self.tag,
                offset: at,
                kind: DecodeErrorKind::UnexpectedByte { expected, found: b },
            })
        }
    }

    fn tuple_then(&mut self, next: &'static [u8]) -> Result<Tuple, DecodeError> {
        let t = self.tuple()?;
        self.expect_byte(next)?;
        Ok(t)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let at = self.pos;
        let n = self.i16()?;
        let n = usize::try_from(n).map_err(|_| DecodeError {
            tag: self.tag,
            offset: at,
            kind: DecodeErrorKind::Negative(n.into()),
        })?;
        // Every value takes at least its kind byte.
        self.need(n)?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let at = self.pos;
            let value = match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.len_i32()?;
                    Value::Text(self.take(len)?)
                }
                b'b' => {
                    return Err(DecodeError { tag: self.tag, offset: at, kind: DecodeErrorKind::BinaryValue })
                }
                other => {
                    return Err(DecodeError {
                        tag: self.tag,
                        offset: at,
                        kind: DecodeErrorKind::UnknownValueKind(other),
                    })
                }
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn relation(&mut self) -> Result<RelationBody, DecodeError> {
        let id = self.u32()?;
        let namespace = self.cstr()?;
        let name = self.cstr()?;
        let replica_identity = self.u8()?;
        let at = self.pos;
        let n = self.i16()?;
        let n = usize::try_from(n).map_err(|_| DecodeError {
            tag: self.tag,
            offset: at,
            kind: DecodeErrorKind::Negative(n.into()),
        })?;
        // flags + NUL + oid + typmod: at least 10 bytes per column.
        self.need(n.saturating_mul(10))?;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            let flags = self.u8()?;
            columns.push(RelationColumn {
                is_key: flags & 1 == 1,
                name: self.cstr()?,
                type_oid: self.u32()?,
                type_modifier: self.i32()?,
            });
        }
        Ok(RelationBody { id, namespace, name, replica_identity, columns })
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.error(DecodeErrorKind::Trailing(n))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn begin() {
        let m = decode(b(&[
            b"B",
            &0x0000_0001_0000_0010u64.to_be_bytes(),
            &5i64.to_be_bytes(),
            &7u32.to_be_bytes(),
        ]))
        .unwrap();
        assert_eq!(m, Message::Begin(Begin { final_lsn: Lsn(0x1_0000_0010), commit_ts: 5, xid: 7 }));
    }

    #[test]
    fn commit() {
        let m = decode(b(&[b"C", &[0], &10u64.to_be_bytes(), &20u64.to_be_bytes(), &(-3i64).to_be_bytes()]))
            .unwrap();
        assert_eq!(
            m,
            Message::Commit(Commit { flags: 0, commit_lsn: Lsn(10), end_lsn: Lsn(20), commit_ts: -3 })
        );
    }

    #[test]
    fn origin() {
        let m = decode(b(&[b"O", &9u64.to_be_bytes(), b"node_a\0"])).unwrap();
        assert_eq!(m, Message::Origin { commit_lsn: Lsn(9), name: "node_a".into() });
    }

    fn relation_bytes() -> Bytes {
        b(&[
            b"R",
            &16385u32.to_be_bytes(),
            b"public\0todos\0d",
            &2i16.to_be_bytes(),
            &[1],
            b"id\0",
            &20u32.to_be_bytes(),
            &(-1i32).to_be_bytes(),
            &[0],
            b"task\0",
            &25u32.to_be_bytes(),
            &(-1i32).to_be_bytes(),
        ])
    }

    #[test]
    fn relation() {
        let m = decode(relation_bytes()).unwrap();
        let Message::Relation(r) = m else { panic!("not a relation") };
        assert_eq!(r.id, 16385);
        assert_eq!((r.namespace.as_str(), r.name.as_str(), r.replica_identity), ("public", "todos", b'd'));
        assert_eq!(r.columns.len(), 2);
        assert!(r.columns[0].is_key && !r.columns[1].is_key);
        assert_eq!(
            (r.columns[1].name.as_str(), r.columns[1].type_oid, r.columns[1].type_modifier),
            ("task", 25, -1)
        );
    }

    #[test]
    fn type_message() {
        let m = decode(b(&[b"Y", &16400u32.to_be_bytes(), b"public\0mood\0"])).unwrap();
        assert_eq!(m, Message::Type { oid: 16400, namespace: "public".into(), name: "mood".into() });
    }

    fn tuple_bytes() -> Vec<u8> {
        [&3i16.to_be_bytes()[..], b"t", &2i32.to_be_bytes(), b"42", b"n", b"u"].concat()
    }

    #[test]
    fn insert() {
        let m = decode(b(&[b"I", &1u32.to_be_bytes(), b"N", &tuple_bytes()])).unwrap();
        assert_eq!(
            m,
            Message::Insert {
                relation_id: 1,
                new: Tuple(vec![text("42"), Value::Null, Value::UnchangedToast])
            }
        );
    }

    #[test]
    fn update_without_old() {
        let m = decode(b(&[b"U", &1u32.to_be_bytes(), b"N", &tuple_bytes()])).unwrap();
        assert!(matches!(m, Message::Update { old: None, .. }));
    }

    #[test]
    fn update_with_key_and_full_old() {
        for (k, full) in [(b"K", false), (b"O", true)] {
            let m = decode(b(&[b"U", &1u32.to_be_bytes(), k, &tuple_bytes(), b"N", &tuple_bytes()])).unwrap();
            let Message::Update { old: Some(old), new, .. } = m else { panic!("no old tuple") };
            assert_eq!(matches!(old, OldTuple::Full(_)), full);
            assert_eq!(old.tuple(), &new);
        }
    }

    #[test]
    fn delete() {
        let m = decode(b(&[b"D", &1u32.to_be_bytes(), b"K", &tuple_bytes()])).unwrap();
        assert!(matches!(m, Message::Delete { old: OldTuple::Key(_), .. }));
        let m = decode(b(&[b"D", &1u32.to_be_bytes(), b"O", &tuple_bytes()])).unwrap();
        assert!(matches!(m, Message::Delete { old: OldTuple::Full(_), .. }));
    }

    #[test]
    fn truncate() {
        let m =
            decode(b(&[b"T", &2u32.to_be_bytes(), &[1], &5u32.to_be_bytes(), &6u32.to_be_bytes()])).unwrap();
        assert_eq!(m, Message::Truncate { options: 1, relation_ids: vec![5, 6] });
    }

    #[test]
    fn logical_message() {
        let m = decode(b(&[b"M", &[0], &77u64.to_be_bytes(), b"walcast\0", &3i32.to_be_bytes(), b"abc"]))
            .unwrap();
        assert_eq!(
            m,
            Message::Message(LogicalMessage {
                transactional: false,
                lsn: Lsn(77),
                prefix: "walcast".into(),
                content: Bytes::from_static(b"abc"),
            })
        );
    }

    #[test]
    fn values_borrow_the_input() {
        let input = b(&[b"I", &1u32.to_be_bytes(), b"N", &tuple_bytes()]);
        let Message::Insert { new, .. } = decode(input.clone()).unwrap() else { unreachable!() };
        let Value::Text(v) = &new.0[0] else { unreachable!() };
        let start = input.as_ptr() as usize;
        let p = v.as_ptr() as usize;
        assert!(p >= start && p < start + input.len(), "value was copied");
    }

    #[test]
    fn errors_name_tag_and_offset() {
        let e = decode(Bytes::new()).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Empty);

        let e = decode(b(&[b"B", &[0, 0, 0]])).unwrap_err();
        assert_eq!((e.tag, e.offset), (b'B', 1));
        assert_eq!(e.kind, DecodeErrorKind::UnexpectedEnd { needed: 5 });
        assert!(e.to_string().contains("'B'") && e.to_string().contains("byte 1"), "{e}");

        let e = decode(Bytes::from_static(b"Z")).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::UnknownTag);

        // Insert without the 'N' marker.
        let e = decode(b(&[b"I", &1u32.to_be_bytes(), b"X"])).unwrap_err();
        assert_eq!(e.offset, 5);
        assert!(matches!(e.kind, DecodeErrorKind::UnexpectedByte { found: b'X', .. }));

        // Binary value.
        let e = decode(b(&[
            b"I",
            &1u32.to_be_bytes(),
            b"N",
            &1i16.to_be_bytes(),
            b"b",
            &1i32.to_be_bytes(),
            b"x",
        ]))
        .unwrap_err();
        assert_eq!((e.offset, e.kind), (8, DecodeErrorKind::BinaryValue));

        // Unknown value kind.
        let e = decode(b(&[b"I", &1u32.to_be_bytes(), b"N", &1i16.to_be_bytes(), b"q"])).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::UnknownValueKind(b'q'));

        // Negative and oversized lengths.
        let e =
            decode(b(&[b"I", &1u32.to_be_bytes(), b"N", &1i16.to_be_bytes(), b"t", &(-5i32).to_be_bytes()]))
                .unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Negative(-5));
        let e = decode(b(&[
            b"I",
            &1u32.to_be_bytes(),
            b"N",
            &1i16.to_be_bytes(),
            b"t",
            &100i32.to_be_bytes(),
            b"ab",
        ]))
        .unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::UnexpectedEnd { needed: 98 });
        let e = decode(b(&[b"I", &1u32.to_be_bytes(), b"N", &(-1i16).to_be_bytes()])).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Negative(-1));

        // Huge counts are refused before allocating.
        let e = decode(b(&[b"T", &u32::MAX.to_be_bytes(), &[0]])).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::UnexpectedEnd { .. }));
        let e = decode(b(&[b"R", &1u32.to_be_bytes(), b"a\0b\0d", &i16::MAX.to_be_bytes()])).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::UnexpectedEnd { .. }));

        // Strings.
        let e = decode(b(&[b"O", &9u64.to_be_bytes(), b"abc"])).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::UnterminatedString);
        let e = decode(b(&[b"O", &9u64.to_be_bytes(), b"\xff\0"])).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::InvalidUtf8);

        // Trailing bytes.
        let e = decode(b(&[b"O", &9u64.to_be_bytes(), b"a\0zz"])).unwrap_err();
        assert_eq!((e.offset, e.kind), (11, DecodeErrorKind::Trailing(2)));
    }

    #[test]
    fn every_truncation_of_valid_messages_is_an_error_not_a_panic() {
        let samples = [
            relation_bytes(),
            b(&[b"I", &1u32.to_be_bytes(), b"N", &tuple_bytes()]),
            b(&[b"U", &1u32.to_be_bytes(), b"O", &tuple_bytes(), b"N", &tuple_bytes()]),
            b(&[b"M", &[1], &77u64.to_be_bytes(), b"p\0", &3i32.to_be_bytes(), b"abc"]),
        ];
        for s in samples {
            for cut in 0..s.len() {
                assert!(decode(s.slice(..cut)).is_err(), "prefix of {cut} bytes decoded");
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(42);
        let tags = b"BCORYIUDTMZ";
        for _ in 0..200_000 {
            let len = rng.usize(0..64);
            let mut v: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if let Some(first) = v.first_mut() {
                *first = tags[rng.usize(..tags.len())];
            }
            let _ = decode(Bytes::from(v));
        }
    }
}
