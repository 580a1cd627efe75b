//! `match`: time per change through the subscription index and dispatch with 10, 1k and 100k
//! `eq` subscriptions on one table, each change matching exactly one of them.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::change::{Change, ChangeKind, Column, Relation, ReplicaIdentity};
use crate::filter::{self, CompiledFilter};
use crate::protocol::phoenix::{PhoenixEncoder, Vsn};
use crate::realtime::dispatch::live::dispatch;
use crate::realtime::dispatch::render::Scratch;
use crate::realtime::outbox::{Outbox, OutboxReceiver};
use crate::realtime::{Hub, Limits, Member, TopicKey};
use crate::replication::lsn::Lsn;
use crate::replication::pgoutput::{Tuple, Value};
use crate::replication::values::TypeCatalog;
use crate::subscribe::{BindingSpec, EventFilter};

/// Nanoseconds per change for `subs` subscriptions over `changes` changes: (index lookup and
/// filter evaluation alone, full dispatch with rendering, framing and queueing).
pub fn measure(subs: usize, changes: usize) -> (f64, f64) {
    let cat = TypeCatalog::default();
    let relation = Arc::new(Relation::new(
        1,
        "public",
        "items",
        ReplicaIdentity::Default,
        vec![
            Column {
                name: "id".into(),
                ty: Arc::clone(cat.get(20).unwrap_or_else(|| unreachable!())),
                is_key: true,
                in_primary_key: true,
            },
            Column {
                name: "body".into(),
                ty: Arc::clone(cat.get(25).unwrap_or_else(|| unreachable!())),
                is_key: false,
                in_primary_key: false,
            },
        ],
    ));
    let hub = Hub::with_limits(Limits { max_record_bytes: 1 << 20, ..Limits::default() });
    let encoder = PhoenixEncoder::shared(Vsn::V2);
    let mut receivers: Vec<OutboxReceiver> = Vec::with_capacity(subs);
    {
        let Ok(mut index) = hub.index().write() else {
            return (f64::NAN, f64::NAN);
        };
        for k in 0..subs {
            let (outbox, rx) = Outbox::new(changes.max(1), metrics::Histogram::noop());
            receivers.push(rx);
            let sink = Arc::new(Member {
                id: k as u64,
                session: k as u64,
                key: TopicKey { topic: format!("realtime:item-{k}").into(), private: false },
                address: None,
                outbox,
                encoder: Arc::clone(&encoder),
                echo_own: false,
                subject: std::sync::RwLock::new(None),
                reads: crate::realtime::Member::reads_of(&crate::auth::topics::TopicAccess::ALL).into(),
                replay: None,
                resume: None,
                seen: Default::default(),
                change_envelope: Default::default(),
                told_withheld: Default::default(),
                live: None,
            });
            let parsed = filter::parse(&format!("id=eq.{k}")).unwrap_or_default();
            let compiled = CompiledFilter::compile(&parsed, |n| {
                relation.column_index(n).map(|i| (Arc::clone(&relation.columns[i].name), "int8"))
            })
            .unwrap_or_default();
            index.insert(
                sink,
                BindingSpec {
                    id: k as u32,
                    event: EventFilter::All,
                    schema: "public".into(),
                    table: Some("items".into()),
                    filter: compiled,
                    select: None,
                    full_identity: false,
                    live: None,
                },
            );
        }
    }
    let change = |i: usize, key: usize| Change {
        relation: Arc::clone(&relation),
        kind: ChangeKind::Insert,
        new: Some(Tuple(vec![
            Value::Text(Bytes::from(key.to_string())),
            Value::Text(Bytes::from_static(b"hello world")),
        ])),
        old: None,
        commit_lsn: Lsn(i as u64),
        commit_ts: 0,
        seq: 0,
        xid: 0,
        snapshot: false,
    };
    let mut scratch = Scratch::default();
    // Warm-up: one change per subscriber, so every queue is past its first allocation, as in a
    // running gateway; then empty the queues.
    for k in 0..subs {
        dispatch(&hub, &change(k, k), &mut scratch);
    }
    for rx in receivers.iter_mut() {
        while rx.try_recv().is_some() {}
    }
    let mut rng = fastrand::Rng::with_seed(1);
    let batch: Vec<Change> = (0..changes).map(|i| change(i, rng.usize(..subs))).collect();
    let start = Instant::now();
    let mut matched = 0;
    {
        let index = crate::locks::read(hub.index());
        for c in &batch {
            matched += index.count_matching(c);
        }
    }
    let index_only = start.elapsed();
    debug_assert_eq!(matched, changes);
    let start = Instant::now();
    let mut delivered = 0;
    for c in &batch {
        delivered += dispatch(&hub, c, &mut scratch).unwrap_or(0);
    }
    let elapsed = start.elapsed();
    debug_assert_eq!(delivered, changes);
    drop(receivers);
    (index_only.as_nanos() as f64 / changes as f64, elapsed.as_nanos() as f64 / changes as f64)
}

pub fn run(opts: &super::BenchOptions, changes: usize) -> anyhow::Result<serde_json::Value> {
    let mut index_ns = serde_json::Map::new();
    let mut dispatch_ns = serde_json::Map::new();
    println!("{:>14} {:>18} {:>22}", "subscriptions", "index ns/change", "dispatch ns/change");
    for subs in [10usize, 1_000, 100_000] {
        eprintln!("match: {subs} subscriptions…");
        // Best of three, to damp scheduler noise.
        let (mut best_index, mut best_dispatch) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            let (i, d) = measure(subs, changes);
            best_index = best_index.min(i);
            best_dispatch = best_dispatch.min(d);
        }
        println!("{subs:>14} {best_index:>18.0} {best_dispatch:>22.0}");
        index_ns.insert(subs.to_string(), serde_json::json!(best_index.round()));
        dispatch_ns.insert(subs.to_string(), serde_json::json!(best_dispatch.round()));
    }
    let (cpu, rss) = super::process_usage();
    let v = serde_json::json!({"scenario": "match", "ns_per_change": index_ns, "dispatch_ns_per_change": dispatch_ns,
                               "cpu_seconds": cpu, "peak_rss_bytes": rss});
    super::write_json(opts, &v)?;
    Ok(v)
}
