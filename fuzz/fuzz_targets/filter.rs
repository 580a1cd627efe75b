//! The filter parser, compiler (typed casts, patterns) and evaluator must never panic.
#![no_main]
use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walcast::change::{Change, ChangeKind, Column, Relation, ReplicaIdentity};
use walcast::filter::{parse, CompiledFilter};
use walcast::replication::lsn::Lsn;
use walcast::replication::pgoutput::{Tuple, Value};
use walcast::replication::values::TypeCatalog;

const COLUMNS: &[(&str, u32, &str)] = &[
    ("i", 20, "42"),
    ("f", 701, "2.5"),
    ("b", 16, "t"),
    ("t", 25, "hello"),
    ("u", 2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ("ts", 1184, "2024-05-01 10:00:00+00"),
    ("d", 1082, "2024-05-01"),
];

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(filter) = parse(s) else { return };
    let cat = TypeCatalog::default();
    let columns: Vec<Column> = COLUMNS
        .iter()
        .filter_map(|(n, oid, _)| {
            Some(Column {
                name: (*n).into(),
                ty: Arc::clone(cat.get(*oid)?),
                is_key: *n == "i",
                in_primary_key: *n == "i",
            })
        })
        .collect();
    let relation = Arc::new(Relation::new(1, "public", "t", ReplicaIdentity::Default, columns));
    let Ok(compiled) = CompiledFilter::compile(&filter, |name| {
        let i = relation.column_index(name)?;
        let type_name = cat.get(COLUMNS[i].1).map(|t| &*t.name).unwrap_or("text");
        Some((Arc::clone(&relation.columns[i].name), type_name))
    }) else {
        return;
    };
    let row = Tuple(COLUMNS.iter().map(|(_, _, v)| Value::Text(Bytes::from_static(v.as_bytes()))).collect());
    let change = Change {
        relation: Arc::clone(&relation),
        kind: ChangeKind::Insert,
        new: Some(row),
        old: None,
        commit_lsn: Lsn(1),
        commit_ts: 0,
        seq: 0,
        xid: 0,
        snapshot: false,
    };
    let _ = compiled.matches(&change, None);
});
