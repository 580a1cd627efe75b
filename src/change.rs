//! The change model: one committed row change as every later stage sees it, and its JSON.
//!
//! Owns: `Relation` (a published table's shape, shared by `Arc`), `Change` (kind, new/old tuple,
//! commit LSN and time, cursor), and rendering records as `to_jsonb`-equal JSON. Must not: touch
//! sockets or subscriptions. A `Change` is not `Clone`: the fan-out shares it by reference.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;

use crate::replication::lsn::Lsn;
use crate::replication::pgoutput::{Tuple, Value};
use crate::replication::values::{write_json, write_json_str, TypeInfo};
use crate::replication::wire::PG_EPOCH_OFFSET_MICROS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Insert => "INSERT",
            ChangeKind::Update => "UPDATE",
            ChangeKind::Delete => "DELETE",
            ChangeKind::Truncate => "TRUNCATE",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

impl ReplicaIdentity {
    pub fn from_byte(b: u8) -> Self {
        match b {
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => ReplicaIdentity::Default,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: Arc<str>,
    pub ty: Arc<TypeInfo>,
    /// Part of the replica identity: carried by the old row of UPDATE/DELETE. Under REPLICA
    /// IDENTITY FULL every column is; this is not the primary key.
    pub is_key: bool,
    /// Part of the table's primary key (from the catalog): kept by `select`.
    pub in_primary_key: bool,
}

/// A published table as the latest Relation message described it.
#[derive(Debug)]
pub struct Relation {
    pub id: u32,
    pub schema: Arc<str>,
    pub table: Arc<str>,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
    /// `[{"name":…,"type":…},…]`, rendered once per Relation message.
    pub columns_json: Bytes,
    by_name: HashMap<Arc<str>, usize>,
}

impl Relation {
    pub fn new(
        id: u32,
        schema: &str,
        table: &str,
        replica_identity: ReplicaIdentity,
        columns: Vec<Column>,
    ) -> Self {
        let mut json = Vec::with_capacity(columns.len() * 32);
        json.push(b'[');
        for (i, c) in columns.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(b"{\"name\":");
            write_json_str(&mut json, &c.name);
            json.extend_from_slice(b",\"type\":");
            write_json_str(&mut json, &c.ty.name);
            json.push(b'}');
        }
        json.push(b']');
        let by_name = columns.iter().enumerate().map(|(i, c)| (Arc::clone(&c.name), i)).collect();
        Relation {
            id,
            schema: schema.into(),
            table: table.into(),
            replica_identity,
            columns,
            columns_json: Bytes::from(json),
            by_name,
        }
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
}

/// Where an event stands in the total commit order: its transaction's commit LSN, then its place
/// in the transaction (changes and database broadcasts share one count, from 0). A position is
/// stable across gateway restarts: decoding the same WAL numbers it the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub lsn: Lsn,
    pub seq: u32,
}

impl Position {
    pub const ZERO: Position = Position { lsn: Lsn::ZERO, seq: 0 };

    /// After every event of the transaction committed at `lsn` (a commit's own position).
    pub fn end_of(lsn: Lsn) -> Position {
        Position { lsn, seq: u32::MAX }
    }
}

/// One committed change. Changes of one transaction share `commit_lsn` and `commit_ts` and are
/// numbered by `seq` in commit order.
#[derive(Debug)]
pub struct Change {
    pub relation: Arc<Relation>,
    pub kind: ChangeKind,
    /// The new row (INSERT, UPDATE).
    pub new: Option<Tuple>,
    /// The old row (UPDATE when the server sent one, DELETE): key columns, or all with
    /// REPLICA IDENTITY FULL.
    pub old: Option<Tuple>,
    pub commit_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_ts: i64,
    /// Position in the transaction, from 0.
    pub seq: u32,
    /// The transaction's id (32 bits, as pgoutput sends it; 0 when not known, e.g. replayed).
    pub xid: u32,
    /// A row of an initial snapshot (INSERT-shaped, `"snapshot":true` in `data`), not a change.
    pub snapshot: bool,
}

impl Change {
    pub fn position(&self) -> Position {
        Position { lsn: self.commit_lsn, seq: self.seq }
    }

    /// An opaque string that orders changes totally: commit LSN, then position in the transaction.
    pub fn cursor(&self) -> String {
        format!("{:016X}{:08X}", self.commit_lsn.0, self.seq)
    }

    /// `commit_timestamp` as clients see it: UTC ISO 8601 with milliseconds and `Z`.
    pub fn commit_timestamp(&self) -> String {
        format_timestamp_millis(self.commit_ts.saturating_add(PG_EPOCH_OFFSET_MICROS))
    }

    /// Column values of `new` that the server did not send (unchanged TOAST) and the old row
    /// cannot supply: left out of `record`.
    pub fn unchanged_toast(&self) -> Vec<Arc<str>> {
        let Some(new) = &self.new else {
            return Vec::new();
        };
        new.0
            .iter()
            .enumerate()
            .filter(|(i, v)| matches!(v, Value::UnchangedToast) && self.old_text(*i).is_none())
            .filter_map(|(i, _)| self.relation.columns.get(i).map(|c| Arc::clone(&c.name)))
            .collect()
    }

    fn old_text(&self, i: usize) -> Option<&Bytes> {
        match self.old.as_ref()?.0.get(i)? {
            Value::Text(t) => Some(t),
            _ => None,
        }
    }

    /// The row a filter sees: the new row, or for DELETE the old one.
    pub fn filter_row(&self) -> Option<&Tuple> {
        match self.kind {
            ChangeKind::Delete => self.old.as_ref(),
            _ => self.new.as_ref(),
        }
    }

    /// Text of column `i` in the filter row; `None` for NULL or a value not carried.
    pub fn filter_value(&self, i: usize) -> Option<&[u8]> {
        let row = self.filter_row()?;
        match row.0.get(i)? {
            Value::Text(t) => Some(t),
            Value::UnchangedToast => self.old_text(i).map(|b| &b[..]),
            Value::Null => None,
        }
    }

    /// Whether column `i` is present (possibly NULL) in the filter row.
    pub fn filter_carries(&self, i: usize) -> bool {
        match self.filter_row().and_then(|r| r.0.get(i)) {
            None => false,
            Some(Value::UnchangedToast) => self.old_text(i).is_some(),
            Some(_) => self.kind != ChangeKind::Delete || self.old_row_has(i),
        }
    }

    fn old_row_has(&self, i: usize) -> bool {
        // A key-only old row sends NULL for non-key columns.
        self.relation.replica_identity == ReplicaIdentity::Full
            || self.relation.columns.get(i).is_some_and(|c| c.is_key)
    }

    /// Writes `record` (the new row) as a JSON object, limited to `select` columns if given.
    pub fn write_record(&self, out: &mut Vec<u8>, select: Option<&dyn Fn(&str) -> bool>) -> bool {
        let Some(new) = &self.new else { return false };
        let fields = self.relation.columns.iter().zip(&new.0).enumerate().filter_map(|(i, (col, v))| {
            if select.is_some_and(|s| !s(&col.name)) {
                return None;
            }
            match v {
                Value::Text(t) => Some((col, Some(&t[..]))),
                Value::Null => Some((col, None)),
                // Unsent TOAST: from a full old row, or left out.
                Value::UnchangedToast => self.old_text(i).map(|t| (col, Some(&t[..]))),
            }
        });
        write_object(out, fields);
        true
    }

    /// Writes `old_record`: the columns the old row carries (key columns, or all with FULL).
    /// An UPDATE that did not change the replica identity key comes without an old row; its
    /// key columns are then those of the new row (the key did not change).
    pub fn write_old_record(&self, out: &mut Vec<u8>, select: Option<&dyn Fn(&str) -> bool>) -> bool {
        if self.kind == ChangeKind::Insert {
            return false;
        }
        let full = self.relation.replica_identity == ReplicaIdentity::Full;
        let old = match (&self.old, &self.new) {
            (Some(old), _) => &old.0[..],
            (None, Some(new)) if self.kind == ChangeKind::Update => &new.0[..],
            _ => &[],
        };
        let fields = self.relation.columns.iter().zip(old).filter_map(|(col, v)| {
            if select.is_some_and(|s| !s(&col.name)) || !(full || col.is_key) {
                return None;
            }
            match v {
                Value::Text(t) => Some((col, Some(&t[..]))),
                Value::Null => Some((col, None)),
                Value::UnchangedToast => None,
            }
        });
        write_object(out, fields);
        true
    }

    /// One line of `walcast tail`: the change with its cursor.
    pub fn to_tail_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"cursor\":");
        write_json_str(&mut out, &self.cursor());
        out.push(b',');
        self.write_data_fields(&mut out, None);
        out.push(b'}');
        out
    }

    /// Writes `"schema":…,"table":…,"type":…,"commit_timestamp":…,"columns":…,"record":…,
    /// "old_record":…` (record/old_record only where they apply) plus `unchanged_toast` when some
    /// values were left out.
    pub fn write_data_fields(&self, out: &mut Vec<u8>, select: Option<&dyn Fn(&str) -> bool>) {
        self.write_fields(out, select, false, false, None)
    }

    /// `write_data_fields`, with `columns` limited to `select` when `limit_columns` (columns a
    /// subscriber may not see are not named either) and `old_record` left empty when `strip_old`.
    fn write_fields(
        &self,
        out: &mut Vec<u8>,
        select: Option<&dyn Fn(&str) -> bool>,
        limit_columns: bool,
        strip_old: bool,
        cursor: Option<&str>,
    ) {
        out.extend_from_slice(b"\"schema\":");
        write_json_str(out, &self.relation.schema);
        out.extend_from_slice(b",\"table\":");
        write_json_str(out, &self.relation.table);
        out.extend_from_slice(b",\"type\":\"");
        out.extend_from_slice(self.kind.as_str().as_bytes());
        if self.snapshot {
            out.extend_from_slice(b"\",\"snapshot\":true");
        } else {
            out.push(b'"');
        }
        out.extend_from_slice(b",\"commit_timestamp\":");
        write_json_str(out, &self.commit_timestamp());
        if let Some(cursor) = cursor {
            out.extend_from_slice(b",\"cursor\":");
            write_json_str(out, cursor);
        }
        out.extend_from_slice(b",\"columns\":");
        match select.filter(|_| limit_columns) {
            None => out.extend_from_slice(&self.relation.columns_json),
            Some(keep) => {
                out.push(b'[');
                let shown = self.relation.columns.iter().filter(|c| keep(&c.name));
                for (i, c) in shown.enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(b"{\"name\":");
                    write_json_str(out, &c.name);
                    out.extend_from_slice(b",\"type\":");
                    write_json_str(out, &c.ty.name);
                    out.push(b'}');
                }
                out.push(b']');
            }
        }
        if self.new.is_some() {
            out.extend_from_slice(b",\"record\":");
            self.write_record(out, select);
        }
        if matches!(self.kind, ChangeKind::Update | ChangeKind::Delete) {
            out.extend_from_slice(b",\"old_record\":");
            if strip_old {
                out.extend_from_slice(b"{}");
            } else {
                self.write_old_record(out, select);
            }
        }
        let toast: Vec<Arc<str>> =
            self.unchanged_toast().into_iter().filter(|n| select.is_none_or(|keep| keep(n))).collect();
        if !toast.is_empty() {
            out.extend_from_slice(b",\"unchanged_toast\":[");
            for (i, name) in toast.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_str(out, name);
            }
            out.push(b']');
        }
    }

    /// The row version as `{"column": text-or-null, …}`: what a row-level security check
    /// rebuilds the row from. `old` picks the old row. Unsent TOAST values come from a full old
    /// row or are left out (NULL to the check).
    pub fn write_row_text(&self, out: &mut Vec<u8>, old: bool) {
        let row = if old { self.old.as_ref() } else { self.new.as_ref() };
        out.push(b'{');
        let Some(row) = row else {
            out.push(b'}');
            return;
        };
        let mut n = 0;
        for (i, (col, v)) in self.relation.columns.iter().zip(&row.0).enumerate() {
            let text = match v {
                Value::Text(t) => Some(&t[..]),
                Value::Null => None,
                Value::UnchangedToast => match self.old_text(i) {
                    Some(t) if !old => Some(&t[..]),
                    _ => continue,
                },
            };
            if n > 0 {
                out.push(b',');
            }
            n += 1;
            write_json_str(out, &col.name);
            out.push(b':');
            match text {
                Some(t) => crate::replication::values::write_json_string(out, t),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
    }
}

/// How one subscriber sees a change: the columns it asked for (`select`, plus the primary key),
/// minus the columns it may not read (`hidden`), and whether its `old_record` is withheld.
#[derive(Debug, Clone, Copy, Default)]
pub struct View<'a> {
    pub select: Option<&'a [Arc<str>]>,
    pub hidden: Option<&'a [Arc<str>]>,
    pub strip_old: bool,
    /// The change's resume cursor (when a change log keeps it).
    pub cursor: Option<&'a str>,
}

impl Change {
    /// The `data` object of a change as clients receive it: `schema`, `table`, `type`,
    /// `commit_timestamp`, `columns`, `record`/`old_record` where they apply, and `errors`.
    /// With `select`, records keep the selected columns plus the primary key; `hidden` columns
    /// appear nowhere (not in `columns` either). A record over `max_record_bytes` is sent with
    /// only its small values and `errors: ["Error 413: Payload Too Large"]`.
    pub fn render_data(&self, view: View<'_>, max_record_bytes: usize) -> Vec<u8> {
        let rel = &self.relation;
        let View { select, hidden, strip_old, cursor } = view;
        let hidden = hidden.filter(|h| !h.is_empty());
        let keep = |name: &str| {
            hidden.is_none_or(|h| !h.iter().any(|c| &**c == name))
                && select.is_none_or(|cols| {
                    cols.iter().any(|c| &**c == name)
                        || rel.column_index(name).is_some_and(|i| rel.columns[i].in_primary_key)
                })
        };
        let limited = select.is_some() || hidden.is_some();
        let mut out = Vec::with_capacity(256);
        out.push(b'{');
        let pred: &dyn Fn(&str) -> bool = &keep;
        self.write_fields(&mut out, limited.then_some(pred), hidden.is_some(), strip_old, cursor);
        if out.len() <= max_record_bytes {
            out.extend_from_slice(b",\"errors\":null}");
            return out;
        }
        // Too large: keep only small values.
        let small = |name: &str| {
            keep(name)
                && rel.column_index(name).is_some_and(|i| {
                    let len = |t: Option<&Tuple>| match t.and_then(|t| t.0.get(i)) {
                        Some(Value::Text(b)) => b.len(),
                        _ => 0,
                    };
                    len(self.new.as_ref()) <= 64 && len(self.old.as_ref()) <= 64
                })
        };
        out.clear();
        out.push(b'{');
        self.write_fields(&mut out, Some(&small), hidden.is_some(), strip_old, cursor);
        out.extend_from_slice(b",\"errors\":[\"Error 413: Payload Too Large\"]}");
        out
    }
}

/// Writes `{"name":value,…}` for (column, text) pairs; `None` text is SQL NULL.
fn write_object<'a>(out: &mut Vec<u8>, fields: impl Iterator<Item = (&'a Column, Option<&'a [u8]>)>) {
    out.push(b'{');
    for (n, (col, text)) in fields.enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write_json_str(out, &col.name);
        out.push(b':');
        match text {
            Some(t) => write_json(out, &col.ty, t),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
}

/// Formats microseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_timestamp_millis(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let millis = unix_micros.rem_euclid(1_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        let mut s = String::with_capacity(28);
        let _ = write!(
            s,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            tod / 3600,
            (tod % 3600) / 60,
            tod % 60
        );
        return s;
    }
    // The usual case, digit by digit (this runs once per change delivered).
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y as u64);
    put(5, 2, u64::from(m));
    put(8, 2, u64::from(d));
    put(11, 2, (tod / 3600) as u64);
    put(14, 2, ((tod % 3600) / 60) as u64);
    put(17, 2, (tod % 60) as u64);
    put(20, 3, millis as u64);
    String::from(std::str::from_utf8(&b).unwrap_or_default())
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses an ISO 8601 timestamp with a zone (`2026-11-22T10:00:00.123Z`, `…+02:00`; a space
/// may stand for the `T`) into microseconds since the Unix epoch.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    let digits = |part: &[u8]| -> Option<i64> {
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let num = |r: std::ops::Range<usize>| digits(b.get(r)?);
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut at = 19;
    let mut micros = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 6 {
                micros = micros * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return None;
        }
        for _ in (at - start).min(6)..6 {
            micros *= 10;
        }
    }
    // Bytes, not string slices: the text may hold multi-byte characters anywhere.
    let offset_secs = match &b[at..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (oh, om) = match rest {
                [h1, h2, b':', m1, m2] | [h1, h2, m1, m2] => (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?),
                [h1, h2] => (digits(&[*h1, *h2])?, 0),
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let secs = oh * 3600 + om * 60;
            if *sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    secs.checked_mul(1_000_000)?.checked_add(micros)
}

/// (year, month, day) → days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_as_clients_print_them() {
        let t = parse_timestamp("2026-11-22T10:00:00.123Z").unwrap();
        assert_eq!(format_timestamp_millis(t), "2026-11-22T10:00:00.123Z");
        assert_eq!(parse_timestamp("2026-11-22 12:00:00.123+02:00"), Some(t));
        assert_eq!(parse_timestamp("2026-11-22T09:30:00.123456-0030"), Some(t + 456));
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0));
        for bad in [
            "",
            "2026-11-22",
            "2026-11-22T10:00:00",
            "2026-13-01T00:00:00Z",
            "2026-11-22T10:00:00.Z",
            "x026-11-22T10:00:00Z",
            "2026-11-22T10:00:00+2",
            // Multi-byte characters where the offset's digits are expected.
            "2024-01-01T00:00:00+0é0",
            "2024-01-01T00:00:00+é00",
            "2024-01-01T00:00:00+é",
            "2024-01-01T00:00:00.éZ",
            "2024-01-01T00:00:00+24:00",
            "2024-01-01T00:00:00+-1:00",
            "2024-01-01T00:00:00+00:60",
            "é024-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad:?}");
        }
    }
    use crate::replication::values::TypeCatalog;

    fn relation(identity: ReplicaIdentity) -> Arc<Relation> {
        let cat = TypeCatalog::default();
        Arc::new(Relation::new(
            1,
            "public",
            "todos",
            identity,
            vec![
                Column {
                    name: "id".into(),
                    ty: Arc::clone(cat.get(20).unwrap()),
                    is_key: true,
                    in_primary_key: true,
                },
                Column {
                    name: "task".into(),
                    ty: Arc::clone(cat.get(25).unwrap()),
                    is_key: identity == ReplicaIdentity::Full,
                    in_primary_key: false,
                },
                Column {
                    name: "body".into(),
                    ty: Arc::clone(cat.get(25).unwrap()),
                    is_key: identity == ReplicaIdentity::Full,
                    in_primary_key: false,
                },
            ],
        ))
    }

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn timestamps_and_cursor() {
        assert_eq!(format_timestamp_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_timestamp_millis(1_763_511_760_877_123), "2025-11-19T00:22:40.877Z");
        assert_eq!(format_timestamp_millis(-1), "1969-12-31T23:59:59.999Z");
        for d in [-800_000i64, -1, 0, 1, 59, 60, 365, 10_957, 20_000, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        let c = Change {
            relation: relation(ReplicaIdentity::Default),
            kind: ChangeKind::Insert,
            new: Some(Tuple(vec![t("1"), Value::Null, t("x")])),
            old: None,
            commit_lsn: Lsn(0x10),
            commit_ts: 0,
            seq: 2,
            xid: 0,
            snapshot: false,
        };
        assert_eq!(c.cursor(), "000000000000001000000002");
        assert!(c.cursor() < Change { seq: 10, ..c }.cursor());
    }

    #[test]
    fn update_with_unchanged_toast() {
        let c = Change {
            relation: relation(ReplicaIdentity::Default),
            kind: ChangeKind::Update,
            new: Some(Tuple(vec![t("1"), t("a"), Value::UnchangedToast])),
            old: None,
            commit_lsn: Lsn(1),
            commit_ts: 0,
            seq: 0,
            xid: 0,
            snapshot: false,
        };
        let json = String::from_utf8(c.to_tail_json()).unwrap();
        assert!(json.contains(r#""record":{"id":1,"task":"a"}"#), "{json}");
        // No old row was sent (the key did not change): the key comes from the new row.
        assert!(json.contains(r#""old_record":{"id":1}"#), "{json}");
        assert!(json.contains(r#""unchanged_toast":["body"]"#), "{json}");
        serde_json::from_str::<serde_json::Value>(&json).unwrap();

        // With a full old row the value comes from there.
        let c = Change {
            relation: relation(ReplicaIdentity::Full),
            old: Some(Tuple(vec![t("1"), t("b"), t("long")])),
            ..c
        };
        let json = String::from_utf8(c.to_tail_json()).unwrap();
        assert!(json.contains(r#""record":{"id":1,"task":"a","body":"long"}"#), "{json}");
        assert!(json.contains(r#""old_record":{"id":1,"task":"b","body":"long"}"#), "{json}");
        assert!(!json.contains("unchanged_toast"), "{json}");
    }

    #[test]
    fn select_keeps_the_primary_key_not_the_identity() {
        let c = Change {
            relation: relation(ReplicaIdentity::Full),
            kind: ChangeKind::Update,
            new: Some(Tuple(vec![t("1"), t("a"), t("b")])),
            old: Some(Tuple(vec![t("1"), t("x"), t("y")])),
            commit_lsn: Lsn(1),
            commit_ts: 0,
            seq: 0,
            xid: 0,
            snapshot: false,
        };
        let select: Vec<Arc<str>> = vec!["task".into()];
        let view = View { select: Some(&select), ..View::default() };
        let v: serde_json::Value = serde_json::from_slice(&c.render_data(view, 1 << 20)).unwrap();
        assert_eq!(v["record"], serde_json::json!({"id": 1, "task": "a"}));
        assert_eq!(v["old_record"], serde_json::json!({"id": 1, "task": "x"}));
        assert_eq!(v["errors"], serde_json::Value::Null);
    }

    #[test]
    fn hidden_columns_appear_nowhere_and_old_records_can_be_withheld() {
        let c = Change {
            relation: relation(ReplicaIdentity::Full),
            kind: ChangeKind::Update,
            new: Some(Tuple(vec![t("1"), t("a"), t("secret-new")])),
            old: Some(Tuple(vec![t("1"), t("x"), t("secret-old")])),
            commit_lsn: Lsn(1),
            commit_ts: 0,
            seq: 0,
            xid: 0,
            snapshot: false,
        };
        let hidden: Vec<Arc<str>> = vec!["body".into()];
        let view = View { hidden: Some(&hidden), ..View::default() };
        let data = c.render_data(view, 1 << 20);
        assert!(!String::from_utf8_lossy(&data).contains("secret"), "{}", String::from_utf8_lossy(&data));
        let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
        assert_eq!(v["record"], serde_json::json!({"id": 1, "task": "a"}));
        assert_eq!(v["old_record"], serde_json::json!({"id": 1, "task": "x"}));
        let names: Vec<&str> =
            v["columns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["id", "task"]);
        // Even the primary key goes when it is hidden.
        let hidden: Vec<Arc<str>> = vec!["id".into()];
        let select: Vec<Arc<str>> = vec!["task".into()];
        let view = View { select: Some(&select), hidden: Some(&hidden), strip_old: true, ..View::default() };
        let v: serde_json::Value = serde_json::from_slice(&c.render_data(view, 1 << 20)).unwrap();
        assert_eq!(v["record"], serde_json::json!({"task": "a"}));
        assert_eq!(v["old_record"], serde_json::json!({}));
        // Without a view nothing changes.
        let v: serde_json::Value = serde_json::from_slice(&c.render_data(View::default(), 1 << 20)).unwrap();
        assert_eq!(v["columns"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn row_text_is_what_the_check_rebuilds_rows_from() {
        let c = Change {
            relation: relation(ReplicaIdentity::Full),
            kind: ChangeKind::Update,
            new: Some(Tuple(vec![t("1"), Value::Null, Value::UnchangedToast])),
            old: Some(Tuple(vec![t("1"), t("x\"y"), t("long")])),
            commit_lsn: Lsn(1),
            commit_ts: 0,
            seq: 0,
            xid: 0,
            snapshot: false,
        };
        let text = |old| {
            let mut out = Vec::new();
            c.write_row_text(&mut out, old);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        // Values stay text (the check casts them); unsent TOAST comes from the old row.
        assert_eq!(text(false), serde_json::json!({"id": "1", "task": null, "body": "long"}));
        assert_eq!(text(true), serde_json::json!({"id": "1", "task": "x\"y", "body": "long"}));
    }

    #[test]
    fn database_broadcasts_decode() {
        let b = DbBroadcast::decode(
            br#"{"id":"u1","topic":"room","event":"e","private":true,"payload":{"x":1},"binary_payload":null}"#,
        )
        .unwrap();
        assert_eq!((&*b.topic, b.private, b.message.event.as_str()), ("realtime:room", true, "e"));
        let crate::realtime::broadcast::BroadcastPayload::Json(p) = &b.message.payload else { panic!() };
        assert_eq!(serde_json::from_slice::<serde_json::Value>(p).unwrap(), serde_json::json!({"x": 1}));
        assert_eq!(b.message.meta.as_deref(), Some(&br#"{"id":"u1"}"#[..]));
        let b = DbBroadcast::decode(
            br#"{"id":"u2","topic":"t","event":"e","payload":null,"binary_payload":"00ff10"}"#,
        )
        .unwrap();
        assert_eq!(
            b.message.payload,
            crate::realtime::broadcast::BroadcastPayload::Binary(Bytes::from_static(&[0, 255, 16]))
        );
        assert!(!b.private);
        for bad in [&b"nope"[..], br#"{"id":"u","topic":"t","binary_payload":"0"}"#, br#"{"topic":"t"}"#] {
            assert!(DbBroadcast::decode(bad).is_err());
        }
    }

    #[test]
    fn delete_has_no_record() {
        let c = Change {
            relation: relation(ReplicaIdentity::Default),
            kind: ChangeKind::Delete,
            new: None,
            old: Some(Tuple(vec![t("5"), Value::Null, Value::Null])),
            commit_lsn: Lsn(1),
            commit_ts: 0,
            seq: 0,
            xid: 0,
            snapshot: false,
        };
        let json = String::from_utf8(c.to_tail_json()).unwrap();
        assert!(!json.contains("\"record\""), "{json}");
        assert!(json.contains(r#""old_record":{"id":5}"#), "{json}");
        assert_eq!(c.filter_value(0), Some(&b"5"[..]));
        assert!(c.filter_carries(0) && !c.filter_carries(1));
    }
}

/// A broadcast sent from the database (`realtime.send`), delivered when its transaction commits.
#[derive(Debug)]
pub struct DbBroadcast {
    /// Where it was committed (set by the replication task).
    pub position: Position,
    /// The message as the trigger emitted it (what the change log keeps).
    pub raw: Bytes,
    /// The channel topic (`realtime:<topic>`).
    pub topic: Arc<str>,
    pub private: bool,
    pub message: crate::realtime::broadcast::BroadcastMessage,
}

/// Why a database broadcast message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DbBroadcastError {
    #[error("not the expected JSON object")]
    Json(#[source] serde_json::Error),
    #[error("binary_payload is not hex")]
    Hex,
}

impl DbBroadcast {
    /// The logical decoding message prefix the `realtime.messages` trigger emits under.
    pub const PREFIX: &'static str = "walcast.broadcast";

    /// Reads the message the trigger emits:
    /// `{"id","topic","event","private","payload"|null,"binary_payload": hex|null}`. Every message
    /// carries `meta: {"id": …}` (`realtime.send` also puts the id into the payload).
    pub fn decode(content: &[u8]) -> Result<DbBroadcast, DbBroadcastError> {
        #[derive(serde::Deserialize)]
        struct Row {
            id: String,
            topic: String,
            event: Option<String>,
            #[serde(default)]
            private: bool,
            payload: Option<serde_json::Value>,
            binary_payload: Option<String>,
        }
        use crate::realtime::broadcast::{BroadcastMessage, BroadcastPayload};
        let row: Row = serde_json::from_slice(content).map_err(DbBroadcastError::Json)?;
        let payload = match (row.binary_payload, row.payload) {
            (Some(hex), _) => {
                BroadcastPayload::Binary(Bytes::from(decode_hex(&hex).ok_or(DbBroadcastError::Hex)?))
            }
            (None, payload) => {
                let payload = payload.unwrap_or(serde_json::Value::Null);
                BroadcastPayload::Json(Bytes::from(
                    serde_json::to_vec(&payload).map_err(DbBroadcastError::Json)?,
                ))
            }
        };
        let meta = serde_json::to_vec(&serde_json::json!({"id": row.id})).map_err(DbBroadcastError::Json)?;
        Ok(DbBroadcast {
            position: Position::ZERO,
            raw: Bytes::copy_from_slice(content),
            topic: format!("realtime:{}", row.topic).into(),
            private: row.private,
            message: BroadcastMessage {
                event: row.event.unwrap_or_default(),
                payload,
                meta: Some(Bytes::from(meta)),
                logged: None,
            },
        })
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("\\x").unwrap_or(s).as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// What the replication stage hands the fan-out stage, in commit order.
#[derive(Debug)]
pub enum ChangeEvent {
    Change(Change),
    /// A message committed to `realtime.messages`.
    Broadcast(DbBroadcast),
    /// The transaction whose changes came before is complete. Once the fan-out has dispatched
    /// it, `end_lsn` may be confirmed to Postgres.
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
    },
}
