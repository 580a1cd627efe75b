//! What a live query holds: the primary keys of the rows in its result, and the transition a
//! committed change makes to that result — a row enters, is updated, or leaves — decided from
//! the set it holds, not from the old row (which a table without REPLICA IDENTITY FULL does not
//! send).
//!
//! The caller says whether the change's new row belongs in the result (it passes the filter
//! and the subscriber may read it); this module says what that means for the client's copy of
//! the result. Applied to every change of the table in commit order, starting from a snapshot
//! consistent with the first, the client's copy stays equal to the query's result.
//!
//! Owns: the set, its bound, and the keys of changes. Must not: evaluate filters, ask Postgres,
//! or render anything.

use std::collections::HashSet;

use bytes::Bytes;

use crate::change::{Change, ChangeKind, Relation};
use crate::replication::pgoutput::{Tuple, Value};

/// A row's primary key: the text of its key columns, in the table's column order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey(pub Box<[Bytes]>);

/// What a change does to a live query's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// A row now in the result (inserted, or updated into it).
    Enter(RowKey),
    /// A row in the result changed and is still in it.
    Update(RowKey),
    /// A row left the result (deleted, updated out of it, or its key changed).
    Leave(RowKey),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    #[error("table {table} has no primary key: a live query needs one to follow rows")]
    NoPrimaryKey { table: String },
    #[error("a change to {table} does not carry its row's primary key")]
    KeyUnknown { table: String },
    #[error("the live query's result grew past {max} rows; narrow its filter or add a limit")]
    TooManyRows { max: usize },
}

/// The keys of the rows in one live query's result, at most `max` of them.
#[derive(Debug)]
pub struct LiveSet {
    keys: HashSet<RowKey>,
    max: usize,
}

impl LiveSet {
    /// An empty set for a live query over `relation`, refused when it has no primary key.
    pub fn new(relation: &Relation, max: usize) -> Result<LiveSet, LiveError> {
        if !relation.columns.iter().any(|c| c.in_primary_key) {
            return Err(LiveError::NoPrimaryKey { table: format!("{}.{}", relation.schema, relation.table) });
        }
        Ok(LiveSet { keys: HashSet::new(), max })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, key: &RowKey) -> bool {
        self.keys.contains(key)
    }

    /// Takes a snapshot row (INSERT-shaped) into the result.
    pub fn load(&mut self, row: &Change) -> Result<RowKey, LiveError> {
        let key = new_key(row)?;
        self.insert(key.clone())?;
        Ok(key)
    }

    /// What `change` does to the result, given whether its new row belongs in it (`belongs`:
    /// passes the filter and may be read by the subscriber; ignored for DELETE). Updates the set.
    /// TRUNCATE empties it: every row leaves.
    pub fn apply(&mut self, change: &Change, belongs: bool) -> Result<Vec<Transition>, LiveError> {
        match change.kind {
            ChangeKind::Insert => {
                let key = new_key(change)?;
                Ok(self.arrive(key, belongs)?.into_iter().collect())
            }
            ChangeKind::Update => {
                let new = new_key(change)?;
                let old = old_key(change)?.unwrap_or_else(|| new.clone());
                if old == new {
                    return Ok(self.arrive(new, belongs)?.into_iter().collect());
                }
                // The key changed: the old row leaves, the new one may enter.
                let mut out: Vec<Transition> = self.depart(old).into_iter().collect();
                out.extend(self.arrive(new, belongs)?);
                Ok(out)
            }
            ChangeKind::Delete => {
                let key = old_key(change)?.ok_or_else(|| unknown(change))?;
                Ok(self.depart(key).into_iter().collect())
            }
            ChangeKind::Truncate => Ok(self.keys.drain().map(Transition::Leave).collect()),
        }
    }

    /// The row with `key` exists now; `belongs` says whether it is in the result.
    fn arrive(&mut self, key: RowKey, belongs: bool) -> Result<Option<Transition>, LiveError> {
        match (self.keys.contains(&key), belongs) {
            (true, true) => Ok(Some(Transition::Update(key))),
            (true, false) => {
                self.keys.remove(&key);
                Ok(Some(Transition::Leave(key)))
            }
            (false, true) => {
                self.insert(key.clone())?;
                Ok(Some(Transition::Enter(key)))
            }
            (false, false) => Ok(None),
        }
    }

    /// The row with `key` is gone (or no longer has that key).
    fn depart(&mut self, key: RowKey) -> Option<Transition> {
        self.keys.remove(&key).then_some(Transition::Leave(key))
    }

    fn insert(&mut self, key: RowKey) -> Result<(), LiveError> {
        if self.keys.len() >= self.max && !self.keys.contains(&key) {
            return Err(LiveError::TooManyRows { max: self.max });
        }
        self.keys.insert(key);
        Ok(())
    }
}

fn unknown(change: &Change) -> LiveError {
    LiveError::KeyUnknown { table: format!("{}.{}", change.relation.schema, change.relation.table) }
}

/// The key of the change's new row (an unchanged TOASTed key value taken from the old row).
fn new_key(change: &Change) -> Result<RowKey, LiveError> {
    let new = change.new.as_ref().ok_or_else(|| unknown(change))?;
    key_of(&change.relation, new, change.old.as_ref()).ok_or_else(|| unknown(change))
}

/// The key of the change's old row, when the server sent one: `None` when it did not (an
/// UPDATE that kept its key, under the default replica identity); an error when it sent one
/// without the primary key (a replica identity on another index).
fn old_key(change: &Change) -> Result<Option<RowKey>, LiveError> {
    match &change.old {
        None => Ok(None),
        Some(old) => key_of(&change.relation, old, None).map(Some).ok_or_else(|| unknown(change)),
    }
}

fn key_of(relation: &Relation, row: &Tuple, fallback: Option<&Tuple>) -> Option<RowKey> {
    let mut parts = Vec::new();
    for (i, c) in relation.columns.iter().enumerate() {
        if !c.in_primary_key {
            continue;
        }
        let value = match row.0.get(i)? {
            Value::Text(t) => t.clone(),
            Value::UnchangedToast => match fallback?.0.get(i)? {
                Value::Text(t) => t.clone(),
                _ => return None,
            },
            Value::Null => return None,
        };
        parts.push(value);
    }
    Some(RowKey(parts.into_boxed_slice()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::change::{Column, ReplicaIdentity};
    use crate::replication::values::TypeCatalog;

    /// `(id bigint PRIMARY KEY, v bigint)`.
    fn relation(identity: ReplicaIdentity) -> Arc<Relation> {
        let cat = TypeCatalog::default();
        let column = |name: &str, pk: bool| Column {
            name: name.into(),
            ty: Arc::clone(cat.get(20).expect("int8")),
            is_key: pk || identity == ReplicaIdentity::Full,
            in_primary_key: pk,
        };
        Arc::new(Relation::new(1, "public", "t", identity, vec![column("id", true), column("v", false)]))
    }

    fn tuple(id: i64, v: Option<i64>) -> Tuple {
        let text = |n: i64| Value::Text(Bytes::from(n.to_string()));
        Tuple(vec![text(id), v.map_or(Value::Null, text)])
    }

    fn change(relation: &Arc<Relation>, kind: ChangeKind, new: Option<Tuple>, old: Option<Tuple>) -> Change {
        Change::for_test(relation, kind, new, old)
    }

    fn key(id: i64) -> RowKey {
        RowKey(vec![Bytes::from(id.to_string())].into_boxed_slice())
    }

    #[test]
    fn enter_update_leave_without_the_old_row() {
        let rel = relation(ReplicaIdentity::Default);
        let mut set = LiveSet::new(&rel, 10).unwrap();
        let insert = |id, v| change(&rel, ChangeKind::Insert, Some(tuple(id, Some(v))), None);
        let update = |id, v| change(&rel, ChangeKind::Update, Some(tuple(id, Some(v))), None);
        assert_eq!(set.apply(&insert(1, 5), true).unwrap(), [Transition::Enter(key(1))]);
        assert_eq!(set.apply(&insert(2, 6), false).unwrap(), []);
        assert_eq!(set.apply(&update(1, 7), true).unwrap(), [Transition::Update(key(1))]);
        // Updated out of the filter: it leaves though no old row came.
        assert_eq!(set.apply(&update(1, 8), false).unwrap(), [Transition::Leave(key(1))]);
        assert_eq!(set.apply(&update(2, 9), true).unwrap(), [Transition::Enter(key(2))]);
        // A key-only old row: the primary key changed.
        let moved = change(&rel, ChangeKind::Update, Some(tuple(3, Some(9))), Some(tuple(2, None)));
        assert_eq!(set.apply(&moved, true).unwrap(), [Transition::Leave(key(2)), Transition::Enter(key(3))]);
        let deleted = change(&rel, ChangeKind::Delete, None, Some(tuple(3, None)));
        assert_eq!(set.apply(&deleted, false).unwrap(), [Transition::Leave(key(3))]);
        assert!(set.is_empty());
        let truncated = change(&rel, ChangeKind::Truncate, None, None);
        set.apply(&insert(4, 1), true).unwrap();
        assert_eq!(set.apply(&truncated, false).unwrap(), [Transition::Leave(key(4))]);
    }

    #[test]
    fn refusals() {
        let cat = TypeCatalog::default();
        let no_pk = Relation::new(
            2,
            "public",
            "log",
            ReplicaIdentity::Full,
            vec![Column {
                name: "line".into(),
                ty: Arc::clone(cat.get(25).unwrap()),
                is_key: true,
                in_primary_key: false,
            }],
        );
        assert!(matches!(LiveSet::new(&no_pk, 1), Err(LiveError::NoPrimaryKey { .. })));
        let rel = relation(ReplicaIdentity::Default);
        let mut set = LiveSet::new(&rel, 1).unwrap();
        set.apply(&change(&rel, ChangeKind::Insert, Some(tuple(1, None)), None), true).unwrap();
        let second = change(&rel, ChangeKind::Insert, Some(tuple(2, None)), None);
        assert_eq!(set.apply(&second, true), Err(LiveError::TooManyRows { max: 1 }));
        // A delete whose old row lacks the key (a replica identity on another index).
        let keyless = change(&rel, ChangeKind::Delete, None, Some(Tuple(vec![Value::Null, Value::Null])));
        assert!(matches!(set.apply(&keyless, false), Err(LiveError::KeyUnknown { .. })));
        let toasted = Tuple(vec![Value::UnchangedToast, Value::Null]);
        let update = change(&rel, ChangeKind::Update, Some(toasted), None);
        assert!(matches!(set.apply(&update, true), Err(LiveError::KeyUnknown { .. })));
    }

    /// Random inserts, updates (of the filtered column and of the key) and deletes on a table
    /// with either replica identity: after every change, the client's copy built from the
    /// transitions equals the rows that pass the filter.
    #[test]
    fn the_clients_copy_equals_the_query_result_after_every_change() {
        for (seed, identity) in
            [(1, ReplicaIdentity::Default), (2, ReplicaIdentity::Full), (3, ReplicaIdentity::Default)]
        {
            let mut rng = fastrand::Rng::with_seed(seed);
            let rel = relation(identity);
            let full = identity == ReplicaIdentity::Full;
            let belongs = |v: Option<i64>| v.is_some_and(|v| v % 3 == 0);
            let mut table: BTreeMap<i64, Option<i64>> = BTreeMap::new();
            // The snapshot: some rows first.
            for id in 0..20 {
                table.insert(id, rng.bool().then(|| rng.i64(0..30)));
            }
            let mut set = LiveSet::new(&rel, 10_000).unwrap();
            let mut copy: BTreeMap<RowKey, Option<i64>> = BTreeMap::new();
            for (id, v) in table.iter().filter(|(_, v)| belongs(**v)) {
                let k = set.load(&change(&rel, ChangeKind::Insert, Some(tuple(*id, *v)), None)).unwrap();
                copy.insert(k, *v);
            }
            for _ in 0..5_000 {
                let ids: Vec<i64> = table.keys().copied().collect();
                let pick = (!ids.is_empty()).then(|| ids[rng.usize(..ids.len())]);
                let c = match (rng.u8(0..4), pick) {
                    (0, _) | (_, None) => {
                        let id = rng.i64(0..60);
                        if table.contains_key(&id) {
                            continue;
                        }
                        let v = rng.bool().then(|| rng.i64(0..30));
                        table.insert(id, v);
                        change(&rel, ChangeKind::Insert, Some(tuple(id, v)), None)
                    }
                    (1, Some(id)) => {
                        let (before, v) = (table[&id], rng.bool().then(|| rng.i64(0..30)));
                        table.insert(id, v);
                        change(&rel, ChangeKind::Update, Some(tuple(id, v)), full.then(|| tuple(id, before)))
                    }
                    (2, Some(id)) => {
                        let to = rng.i64(0..60);
                        if table.contains_key(&to) {
                            continue;
                        }
                        let before = table.remove(&id).unwrap();
                        let v = if rng.bool() { before } else { rng.bool().then(|| rng.i64(0..30)) };
                        table.insert(to, v);
                        let old = if full { tuple(id, before) } else { tuple(id, None) };
                        change(&rel, ChangeKind::Update, Some(tuple(to, v)), Some(old))
                    }
                    (_, Some(id)) => {
                        let before = table.remove(&id).unwrap();
                        let old = if full { tuple(id, before) } else { tuple(id, None) };
                        change(&rel, ChangeKind::Delete, None, Some(old))
                    }
                };
                let new_v = c.new.as_ref().map(|t| match &t.0[1] {
                    Value::Text(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
                    _ => None,
                });
                for t in set.apply(&c, belongs(new_v.flatten())).unwrap() {
                    match t {
                        Transition::Enter(k) => {
                            assert!(copy.insert(k, new_v.flatten()).is_none(), "entered twice")
                        }
                        Transition::Update(k) => {
                            assert!(copy.insert(k, new_v.flatten()).is_some(), "update of a row not held")
                        }
                        Transition::Leave(k) => assert!(copy.remove(&k).is_some(), "left without being held"),
                    }
                }
                let want: BTreeMap<RowKey, Option<i64>> =
                    table.iter().filter(|(_, v)| belongs(**v)).map(|(id, v)| (key(*id), *v)).collect();
                assert_eq!(copy, want, "seed {seed}");
                assert_eq!(set.len(), want.len());
            }
        }
    }
}
