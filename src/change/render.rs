//! A change as JSON: `record`/`old_record` equal to `to_jsonb`, the row text the row-level
//! security check rebuilds rows from, the `walcast tail` line, and Supabase's `data` object
//! for a subscriber's `View` (its `select`, hidden columns, withheld `old_record`, and the
//! "Error 413" form of a record over the size limit).
//!
//! Must not: decide who sees what; a `View` is given.

use std::sync::Arc;

use crate::change::{Change, ChangeKind, Column, Relation, ReplicaIdentity};
use crate::replication::pgoutput::{Tuple, Value};
use crate::replication::values::{write_json, write_json_str};

impl Change {
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
            Some(keep) => write_columns(out, &self.relation, &|c| keep(&c.name)),
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
        let keep = |name: &str| keeps(rel, select, hidden, name);
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

/// Whether a view shows the column `name`: asked for (`select`, or part of the primary key)
/// and not `hidden`.
fn keeps(rel: &Relation, select: Option<&[Arc<str>]>, hidden: Option<&[Arc<str>]>, name: &str) -> bool {
    hidden.is_none_or(|h| !h.iter().any(|c| &**c == name))
        && select.is_none_or(|cols| {
            cols.iter().any(|c| &**c == name)
                || rel.column_index(name).is_some_and(|i| rel.columns[i].in_primary_key)
        })
}

/// What a live query's message says happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveKind {
    /// A row of the initial result.
    Snapshot,
    Enter,
    Update,
    Leave,
}

impl LiveKind {
    /// The change type a client of `postgres_changes` applies it as: a row to put (INSERT), to
    /// replace (UPDATE) or to remove by its key (DELETE).
    pub fn change_type(self) -> &'static str {
        match self {
            LiveKind::Snapshot | LiveKind::Enter => "INSERT",
            LiveKind::Update => "UPDATE",
            LiveKind::Leave => "DELETE",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LiveKind::Snapshot => "snapshot",
            LiveKind::Enter => "enter",
            LiveKind::Update => "update",
            LiveKind::Leave => "leave",
        }
    }
}

/// Writes `{"kind":…,"type":…,"schema":…,"table":…,"commit_timestamp":…,"cursor":…,"columns":[…]`
/// (cursor when known; the columns `shown`), the start of every live query message.
fn write_live_head(
    out: &mut Vec<u8>,
    kind: LiveKind,
    rel: &Relation,
    (timestamp, cursor): (&str, Option<&str>),
    shown: &dyn Fn(&Column) -> bool,
) {
    out.extend_from_slice(b"{\"kind\":\"");
    out.extend_from_slice(kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"type\":\"");
    out.extend_from_slice(kind.change_type().as_bytes());
    out.extend_from_slice(b"\",\"schema\":");
    write_json_str(out, &rel.schema);
    out.extend_from_slice(b",\"table\":");
    write_json_str(out, &rel.table);
    out.extend_from_slice(b",\"commit_timestamp\":");
    write_json_str(out, timestamp);
    if let Some(cursor) = cursor {
        out.extend_from_slice(b",\"cursor\":");
        write_json_str(out, cursor);
    }
    out.extend_from_slice(b",\"columns\":");
    write_columns(out, rel, shown);
}

/// `[{"name":…,"type":…},…]` of the columns `shown`.
fn write_columns(out: &mut Vec<u8>, rel: &Relation, shown: &dyn Fn(&Column) -> bool) {
    out.push(b'[');
    for (i, c) in rel.columns.iter().filter(|c| shown(c)).enumerate() {
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

impl Change {
    /// A live query's message about this change's new row (`kind` snapshot, enter or update):
    /// the head, `key` (the primary key's columns; also as `old_record` of an update) and
    /// `record` as the view shows it. A record over `max_record_bytes` keeps only its small
    /// values and says so in `errors`.
    pub fn render_live(&self, kind: LiveKind, view: View<'_>, max_record_bytes: usize) -> Vec<u8> {
        let rel = &self.relation;
        let hidden = view.hidden.filter(|h| !h.is_empty());
        let keep = |name: &str| keeps(rel, view.select, hidden, name);
        let mut out = Vec::with_capacity(256);
        let stamp = self.commit_timestamp();
        write_live_head(&mut out, kind, rel, (&stamp, view.cursor), &|c| keep(&c.name));
        let primary = |name: &str| rel.column_index(name).is_some_and(|i| rel.columns[i].in_primary_key);
        let key_at = out.len() + 7;
        out.extend_from_slice(b",\"key\":");
        self.write_record(&mut out, Some(&primary));
        if kind == LiveKind::Update {
            let key = out[key_at..].to_vec();
            out.extend_from_slice(b",\"old_record\":");
            out.extend_from_slice(&key);
        }
        out.extend_from_slice(b",\"record\":");
        let start = out.len();
        self.write_record(&mut out, Some(&keep));
        if out.len() - start <= max_record_bytes {
            out.push(b'}');
            return out;
        }
        out.truncate(start);
        let small = |name: &str| {
            keep(name)
                && rel.column_index(name).is_some_and(|i| match self.new.as_ref().and_then(|t| t.0.get(i)) {
                    Some(Value::Text(b)) => b.len() <= 64,
                    _ => true,
                })
        };
        self.write_record(&mut out, Some(&small));
        out.extend_from_slice(b",\"errors\":[\"Error 413: Payload Too Large\"]}");
        out
    }
}

/// A live query's `leave` message: the head and the `key` of the row that left (`key`: the
/// text of the primary key's columns, in the table's column order).
pub fn render_live_leave(
    rel: &Relation,
    key: &[bytes::Bytes],
    timestamp: &str,
    cursor: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_live_head(&mut out, LiveKind::Leave, rel, (timestamp, cursor), &|c| c.in_primary_key);
    let key_at = out.len() + 7;
    out.extend_from_slice(b",\"key\":");
    let columns = rel.columns.iter().filter(|c| c.in_primary_key);
    write_object(&mut out, columns.zip(key).map(|(c, t)| (c, Some(&t[..]))));
    let key = out[key_at..].to_vec();
    out.extend_from_slice(b",\"old_record\":");
    out.extend_from_slice(&key);
    out.push(b'}');
    out
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
