//! `live`: live queries under load, and GraphQL's fan-out against Phoenix's.
//!
//! 1. Q live queries (`/v1/ws`, `live: true`), each `grp=eq.<k>` over one table of 10·Q rows; a
//!    writer commits R changes/s, each an UPDATE of one row's body, and one in five also moves
//!    the row to the next group (the filtered column): the row's new query gets `update` (or
//!    `enter`), its old one `leave`. Every change yields exactly one message that carries the
//!    row's stamp. Latency (commit → receipt), losses, and the gateway's memory per live query
//!    (RSS after the queries' snapshots against before they connected).
//! 2. C sockets on one table's INSERTs through Phoenix, then the same through GraphQL
//!    (`graphql-transport-ws`, a typed subscription selecting two columns): the same deliveries,
//!    compared in the same run (the fixed rate, then the highest rate within the p99 bound).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::client::{connect_all, phoenix_join, ws_config, ws_connect, Socket};
use crate::bench::gateway::{apikey, BenchGateway};
use crate::bench::realtime::{print_header, search_rates, spawn_reader, step, Receiver, Source, Step};
use crate::bench::sockets::{database, drop_objects, ensure_open_files, teardown};
use crate::bench::BenchOptions;

#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// Live queries (part 1).
    pub queries: usize,
    /// Changes committed per second in part 1.
    pub rate: u64,
    pub seconds: u64,
    /// Sockets of the fan-out comparison (part 2).
    pub clients: usize,
    /// Changes per second of part 2's fixed run.
    pub fanout_rate: u64,
    pub steps: Vec<u64>,
    pub step_seconds: u64,
    pub step_tries: u32,
    pub p99_bound_ms: f64,
    pub gateway_bin: PathBuf,
    pub gateway_url: Option<String>,
}

const STEP: &str = "SELECT walcast_bench_live_step($1, $2)";
const INSERT: &str = "INSERT INTO walcast_bench_items (id, k, body) VALUES ($1, 0, $2)";

/// The live table, its rows and the writer's step function for `q` queries.
fn setup_sql(q: usize) -> String {
    let rows = 10 * q;
    format!(
        "DROP TABLE IF EXISTS walcast_bench_live;
         CREATE TABLE walcast_bench_live (id bigint PRIMARY KEY, grp int NOT NULL, body text NOT NULL);
         INSERT INTO walcast_bench_live SELECT g, g % {q}, 'start' FROM generate_series(0, {rows} - 1) g;
         CREATE OR REPLACE FUNCTION walcast_bench_live_step(seq bigint, stamp text) RETURNS void
         LANGUAGE sql AS $$
             UPDATE walcast_bench_live
                SET body = stamp, grp = CASE WHEN seq % 5 = 0 THEN (grp + 1) % {q} ELSE grp END
              WHERE id = (seq * 7919) % {rows}
         $$;"
    )
}

/// A `/v1/ws` socket with one live query, once its snapshot has ended.
async fn live_query(addr: &str, k: usize) -> anyhow::Result<Socket> {
    let mut ws = ws_connect(format!("ws://{addr}/v1/ws?apikey={}", apikey())).await?;
    let subscribe = json!({"type": "subscribe", "channel": "table:public.walcast_bench_live", "live": true,
                           "filter": format!("grp=eq.{k}")});
    ws.send(Message::Text(subscribe.to_string().into())).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "live query {k}: no snapshot-end within 60 s");
        let Some(msg) = tokio::time::timeout(Duration::from_secs(60), ws.next()).await?.transpose()? else {
            anyhow::bail!("live query {k}: closed before its snapshot ended");
        };
        if let Message::Text(t) = msg {
            anyhow::ensure!(!t.contains("\"type\":\"error\""), "live query {k}: {t}");
            if t.contains("\"snapshot-end\"") {
                return Ok(ws);
            }
        }
    }
}

/// A GraphQL socket subscribed to `query`.
async fn graphql_subscription(addr: &str, query: &str) -> anyhow::Result<Socket> {
    let mut request = format!("ws://{addr}/graphql").into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true).await?;
    let init =
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", apikey())}});
    ws.send(Message::Text(init.to_string().into())).await?;
    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await? {
        Some(Ok(Message::Text(t))) if t.contains("connection_ack") => {}
        other => anyhow::bail!("GraphQL connection_init: {other:?}"),
    }
    let subscribe = json!({"type": "subscribe", "id": "1", "payload": {"query": query}});
    ws.send(Message::Text(subscribe.to_string().into())).await?;
    Ok(ws)
}

/// Readers for `sockets`, with the sinks kept open.
fn readers(
    sockets: Vec<Socket>,
    start: Instant,
) -> (Vec<Arc<Receiver>>, Vec<tokio::task::JoinHandle<()>>, Vec<impl Sized>) {
    let (mut receivers, mut tasks, mut sinks) = (Vec::new(), Vec::new(), Vec::new());
    for ws in sockets {
        let (sink, stream) = ws.split();
        let r = Receiver::expecting(None);
        tasks.push(spawn_reader(stream, start, Arc::clone(&r)));
        receivers.push(r);
        sinks.push(sink);
    }
    (receivers, tasks, sinks)
}

/// Commits stamped rows with `statement` until every receiver has had one (a subscription
/// without an acknowledgement is live once it delivers). The statement takes the first row id
/// (`$1`) and the stamp (`$2`) and commits `rows` rows with the ids from `$1` on.
pub(crate) async fn until_all_deliver(
    pool: &sqlx::PgPool,
    (statement, rows): (&str, i64),
    receivers: &[Arc<Receiver>],
    start: Instant,
    seq: &mut i64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let all = || receivers.iter().all(|r| r.received.load(std::sync::atomic::Ordering::Relaxed) > 0);
    while !all() {
        anyhow::ensure!(Instant::now() < deadline, "subscriptions not delivering within 120 s");
        let t = start.elapsed().as_micros();
        sqlx::query(statement).bind(*seq + 1).bind(format!("t={t}")).execute(pool).await?;
        *seq += rows;
        let wait = Instant::now() + Duration::from_millis(500);
        while !all() && Instant::now() < wait {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// One side of the fan-out comparison.
struct Side {
    fixed: Step,
    steps: Vec<Step>,
    best: Option<Step>,
}

pub async fn run(opts: &BenchOptions, o: &LiveOptions) -> anyhow::Result<serde_json::Value> {
    ensure_open_files(o.queries.max(o.clients) + 20)?;
    let start = Instant::now();
    let env = database(opts, "live").await?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&env.url).await?;
    sqlx::raw_sql(&setup_sql(o.queries)).execute(&pool).await?;
    let gw = BenchGateway::start(o.gateway_url.as_deref(), &o.gateway_bin, &env.url, &env.slot, 4096).await?;
    let addr = gw.addr().to_owned();
    let mut seq = 0i64;

    // 1. Live queries.
    eprintln!("live: {} live queries over {} rows…", o.queries, 10 * o.queries);
    let rss_before = gw.usage().map(|u| u.1);
    let sockets = connect_all(o.queries, |k| live_query(&addr, k)).await?;
    let rss_after = gw.usage().map(|u| u.1);
    let per_query = rss_before.zip(rss_after).map(|(b, a)| a.saturating_sub(b) / o.queries as u64);
    let (receivers, tasks, sinks) = readers(sockets, start);
    print_header();
    let mut source = Source::Db(pool.clone(), STEP, None);
    let live = step(&mut source, &receivers, start, o.rate, o.seconds, 1, &mut seq).await?;
    live.print("live");
    for t in tasks {
        t.abort();
    }
    drop(sinks);
    println!(
        "{} live queries at {} changes/s (1 in 5 moves a row between queries): p99 {:.2} ms, {} lost; \
         gateway memory per live query {}",
        o.queries,
        o.rate,
        live.p99,
        live.lost(),
        per_query.map(|b| format!("{:.1} KiB", b as f64 / 1024.0)).unwrap_or_else(|| "unknown".into())
    );

    // 2. GraphQL against Phoenix, the same deliveries.
    let mut sides = Vec::new();
    for who in ["phoenix", "graphql"] {
        eprintln!("live: {} {who} subscribers to every INSERT…", o.clients);
        let sockets = connect_all(o.clients, |i| {
            let addr = addr.clone();
            async move {
                if who == "phoenix" {
                    let binding = json!({"event": "INSERT", "schema": "public", "table": "walcast_bench_items"});
                    phoenix_join(&addr, format!("realtime:fan{i}"), json!({"postgres_changes": [binding]}), true).await
                } else {
                    let query = "subscription { walcast_bench_items_changes(events: [INSERT]) { record { id body } } }";
                    graphql_subscription(&addr, query).await
                }
            }
        })
        .await?;
        let (receivers, tasks, sinks) = readers(sockets, start);
        until_all_deliver(&pool, (INSERT, 1), &receivers, start, &mut seq).await?;
        let mut source = Source::Db(pool.clone(), INSERT, None);
        let fanout = o.clients as u64;
        let fixed = step(&mut source, &receivers, start, o.fanout_rate, o.seconds, fanout, &mut seq).await?;
        fixed.print(who);
        let run = async |rate| {
            let s = step(&mut source, &receivers, start, rate, o.step_seconds, fanout, &mut seq).await?;
            s.print(who);
            Ok(s)
        };
        let (steps, best) =
            search_rates(&o.steps, o.step_tries, o.p99_bound_ms, run, |s| s.lost() > 0).await?;
        for t in tasks {
            t.abort();
        }
        drop(sinks);
        sides.push(Side { fixed, steps, best });
    }
    pool.close().await;
    gw.stop().await;
    drop_objects(
        &env,
        "DROP TABLE IF EXISTS walcast_bench_live; DROP FUNCTION IF EXISTS walcast_bench_live_step",
    )
    .await;
    teardown(env).await;
    let (phoenix, graphql) = (&sides[0], &sides[1]);
    let per_sec = |s: &Step| s.delivered as f64 / o.seconds as f64;
    println!(
        "fan-out at {} changes/s to {} sockets: graphql {:.0} deliveries/s (p99 {:.2} ms, {} lost), \
         phoenix {:.0} deliveries/s (p99 {:.2} ms, {} lost)",
        o.fanout_rate,
        o.clients,
        per_sec(&graphql.fixed),
        graphql.fixed.p99,
        graphql.fixed.lost(),
        per_sec(&phoenix.fixed),
        phoenix.fixed.p99,
        phoenix.fixed.lost(),
    );
    let ratio = graphql.best.zip(phoenix.best).map(|(g, p)| g.rate as f64 / p.rate as f64);
    if !o.steps.is_empty() {
        println!(
            "highest rate with 0 lost and p99 <= {} ms: graphql {:?}, phoenix {:?} (graphql / phoenix {})",
            o.p99_bound_ms,
            graphql.best.map(|s| s.rate),
            phoenix.best.map(|s| s.rate),
            ratio.map(|r| format!("{r:.2}")).unwrap_or_else(|| "?".into())
        );
    }
    let side = |s: &Side| {
        json!({"fixed": s.fixed.json(), "steps": s.steps.iter().map(Step::json).collect::<Vec<_>>(),
               "max_rate": s.best.map(|b| b.rate)})
    };
    let v = json!({
        "scenario": "live", "queries": o.queries, "rate": o.rate, "seconds": o.seconds,
        "live": live.json(), "gateway_bytes_per_live_query": per_query,
        "fanout": {"clients": o.clients, "rate": o.fanout_rate, "phoenix": side(phoenix), "graphql": side(graphql),
                   "graphql_over_phoenix": ratio},
    });
    super::write_json(opts, &v)?;
    Ok(v)
}
