//! The change model: one committed row change as every later stage sees it, and its JSON.
//!
//! Owns: `Relation` (a published table's shape, shared by `Arc`), `Change` (kind, new/old tuple,
//! commit LSN and time, cursor), `ChangeEvent`. Beside it: `render` (a change as JSON),
//! `position`, `time`, `broadcast`. Must not: touch sockets or subscriptions. A `Change` is not `Clone`: the fan-out shares it by reference.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

pub mod broadcast;
mod position;
mod render;
mod time;

pub use broadcast::{DbBroadcast, DbBroadcastError};
pub use position::Position;
pub use render::{render_live_leave, LiveKind, View};
pub use time::{civil_from_days, days_from_civil, format_timestamp_millis, parse_timestamp};

use crate::replication::lsn::Lsn;
use crate::replication::pgoutput::{Tuple, Value};
use crate::replication::values::{write_json_str, TypeInfo};
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

/// One committed change. Changes of one transaction share `commit_lsn` and `commit_ts` and are
/// numbered by `seq` in commit order.
#[derive(Debug, Clone)]
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
    /// A change of `relation` at LSN 1, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(
        relation: &Arc<Relation>,
        kind: ChangeKind,
        new: Option<Tuple>,
        old: Option<Tuple>,
    ) -> Change {
        Change {
            relation: Arc::clone(relation),
            kind,
            new,
            old,
            commit_lsn: Lsn(1),
            commit_ts: 0,
            seq: 0,
            xid: 0,
            snapshot: false,
        }
    }

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

impl ChangeEvent {
    /// Where the event stands in the commit order (a commit: after every event of its
    /// transaction).
    pub fn position(&self) -> Position {
        match self {
            ChangeEvent::Change(c) => c.position(),
            ChangeEvent::Broadcast(b) => b.position,
            ChangeEvent::Commit { commit_lsn, .. } => Position::end_of(*commit_lsn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
