//! `slow-readers`: what clients that cannot keep up cost everyone else. A few normal Phoenix
//! subscribers follow every INSERT of `walcast_bench_items` while a writer commits R changes/s;
//! their latency is measured in three phases of the same writes: alone; beside S readers on
//! each transport (Phoenix, `/v1/ws`, Server-Sent Events, long-poll) following the same table
//! and reading as fast as they can (the cost of the fan-out itself); and beside as many slow
//! readers, each reading one message (or one body chunk) per interval. A reader the gateway
//! closes connects again after a second, as a real client would. Reports the three latency
//! distributions, the slow phase's p99 against the other two, what the normal subscribers lost,
//! and how the gateway handled the slow readers (from `/metrics`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::client::{phoenix_join, ws_connect, Socket};
use crate::bench::gateway::{apikey, http_get, BenchGateway};
use crate::bench::sockets::{database, ensure_open_files, teardown};
use crate::bench::BenchOptions;

#[derive(Debug, Clone)]
pub struct SlowOptions {
    /// Slow readers on each of the four transports.
    pub per_transport: usize,
    /// Normal subscribers whose latency is measured.
    pub normal: usize,
    pub rate: u64,
    /// Seconds of writing in each phase.
    pub seconds: u64,
    /// How long a slow reader waits between two reads.
    pub read_every: Duration,
    pub gateway_bin: std::path::PathBuf,
}

const TABLE: &str = "public.walcast_bench_items";
const KINDS: [&str; 4] = ["phoenix", "plain", "sse", "long-poll"];

/// Each receipt of a normal subscriber: (subscriber, row id, instant).
type Receipts = Arc<Mutex<Vec<(u32, i64, Instant)>>>;

/// A Phoenix socket joined to every INSERT of the table.
async fn phoenix(addr: &str, topic: &str) -> anyhow::Result<Socket> {
    let binding = json!({"event": "INSERT", "schema": "public", "table": "walcast_bench_items"});
    phoenix_join(addr, format!("realtime:{topic}"), json!({"postgres_changes": [binding]}), true).await
}

/// A normal subscriber: reads every frame at once and notes when each change arrived.
async fn normal(mut ws: Socket, i: u32, receipts: Receipts) {
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            if let Some((id, _)) = super::soak::id_and_cursor(&t) {
                crate::locks::lock(&receipts).push((i, id, Instant::now()));
            }
        }
    }
}

/// One reader of `kind`, for ever: connect, read one message (or chunk) per `every` (zero: as
/// fast as it comes), and connect again a second after the gateway closes it. Counts its
/// connections.
async fn slow(addr: String, kind: &'static str, i: usize, every: Duration, connects: Arc<AtomicU64>) {
    let http = reqwest::Client::new();
    let changes = format!("http://{addr}/v1/tables/{TABLE}/changes?events=insert&apikey={}", apikey());
    let mut cursor: Option<String> = None;
    loop {
        connects.fetch_add(1, Ordering::Relaxed);
        let _ = match kind {
            "phoenix" => match phoenix(&addr, &format!("slow{i}")).await {
                Ok(ws) => read_ws_slowly(ws, every).await,
                Err(e) => Err(e),
            },
            "plain" => plain(&addr, every).await,
            "sse" => match http.get(&changes).header("accept", "text/event-stream").send().await {
                Ok(resp) => read_body_slowly(resp, every).await.map(drop),
                Err(e) => Err(e.into()),
            },
            _ => long_poll(&http, &changes, &mut cursor, every).await,
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn read_ws_slowly(mut ws: Socket, every: Duration) -> anyhow::Result<()> {
    loop {
        if !every.is_zero() {
            tokio::time::sleep(every).await;
        }
        match ws.next().await {
            Some(Ok(Message::Close(_))) | None => return Ok(()),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(_)) => {}
        }
    }
}

async fn plain(addr: &str, every: Duration) -> anyhow::Result<()> {
    let mut ws = ws_connect(format!("ws://{addr}/v1/ws?apikey={}", apikey())).await?;
    let subscribe = json!({"type": "subscribe", "channel": format!("table:{TABLE}"), "events": "insert"});
    ws.send(Message::Text(subscribe.to_string().into())).await?;
    read_ws_slowly(ws, every).await
}

/// Reads a body one chunk per `every`; returns it.
async fn read_body_slowly(mut resp: reqwest::Response, every: Duration) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        if !every.is_zero() {
            tokio::time::sleep(every).await;
        }
        match resp.chunk().await? {
            Some(chunk) => body.extend_from_slice(&chunk),
            None => return Ok(body),
        }
    }
}

/// One long-poll from the last cursor, its answer read slowly.
async fn long_poll(
    http: &reqwest::Client,
    changes: &str,
    cursor: &mut Option<String>,
    every: Duration,
) -> anyhow::Result<()> {
    let mut url = format!("{changes}&wait=5&limit=1000");
    if let Some(c) = cursor.as_deref() {
        url.push_str(&format!("&since={c}"));
    }
    let resp = http.get(url).header("accept", "application/json").send().await?;
    let body: serde_json::Value = serde_json::from_slice(&read_body_slowly(resp, every).await?)?;
    if let Some(c) = body["cursor"].as_str() {
        *cursor = Some(c.to_owned());
    }
    Ok(())
}

/// Commits `rate` INSERTs a second for `seconds`, ids from `first`; returns when each was sent.
async fn write(
    pool: &sqlx::PgPool,
    rate: u64,
    seconds: u64,
    first: i64,
) -> anyhow::Result<HashMap<i64, Instant>> {
    let mut conn = pool.acquire().await?;
    let mut sent = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for id in first..first + (rate * seconds) as i64 {
        tick.tick().await;
        sent.insert(id, Instant::now());
        sqlx::query("INSERT INTO walcast_bench_items (id, k, body) VALUES ($1, 0, 'payload')")
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(sent)
}

/// The normal subscribers' latencies of the changes in `sent`, once all arrived (or 10 s passed
/// without one): (p50 ms, p99 ms, max ms, lost).
async fn measure(
    receipts: &Receipts,
    sent: &HashMap<i64, Instant>,
    normal: usize,
) -> anyhow::Result<(f64, f64, f64, usize)> {
    let expected = sent.len() * normal;
    let count = || crate::locks::lock(receipts).iter().filter(|(_, id, _)| sent.contains_key(id)).count();
    let mut last = (count(), Instant::now());
    while last.0 < expected && last.1.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count();
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut seen = std::collections::HashSet::new();
    for (client, id, at) in crate::locks::lock(receipts).iter() {
        if let Some(t0) = sent.get(id) {
            if seen.insert((*client, *id)) {
                hist.record(at.saturating_duration_since(*t0).as_micros().max(1) as u64)?;
            }
        }
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok((ms(0.5), ms(0.99), hist.max() as f64 / 1000.0, expected - seen.len()))
}

/// A counter of the gateway's `/metrics`.
async fn metric(addr: &str, name: &str) -> u64 {
    let text = http_get(addr, "/metrics").await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Readers of every kind, `per_transport` each, reading one message per `every`; returns their
/// tasks and connection counts (by kind).
async fn start_readers(
    addr: &str,
    per_transport: usize,
    every: Duration,
) -> (Vec<JoinHandle<()>>, Vec<Arc<AtomicU64>>) {
    let connects: Vec<Arc<AtomicU64>> = KINDS.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut tasks = Vec::new();
    for i in 0..per_transport {
        for (kind, count) in KINDS.iter().zip(&connects) {
            tasks.push(tokio::spawn(slow(addr.to_owned(), kind, i, every, Arc::clone(count))));
        }
        if i % 100 == 99 {
            // Let each hundred connect before the next.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (tasks, connects)
}

/// One phase's figures for the normal subscribers: (p50 ms, p99 ms, max ms, lost).
type Latency = (f64, f64, f64, usize);

/// What a phase with readers measured.
struct Loaded {
    latency: Latency,
    connections: Vec<u64>,
    closed: u64,
    caught_up: u64,
    cpu: f64,
}

/// Writes one phase's changes (ids after `first`) with `per_transport` readers of each kind
/// reading one message per `every`, then stops them.
async fn loaded_phase(
    gw: &BenchGateway,
    pool: &sqlx::PgPool,
    s: &SlowOptions,
    receipts: &Receipts,
    every: Duration,
    first: i64,
) -> anyhow::Result<Loaded> {
    let addr = gw.addr();
    let (tasks, connects) = start_readers(addr, s.per_transport, every).await;
    let closed0 = metric(addr, crate::server::metrics::SLOW_DISCONNECTS).await;
    let caught0 = metric(addr, crate::server::metrics::SLOW_CATCHUPS).await;
    let cpu0 = gw.usage().map_or(0.0, |u| u.0);
    let sent = write(pool, s.rate, s.seconds, first).await?;
    let latency = measure(receipts, &sent, s.normal).await?;
    let loaded = Loaded {
        latency,
        connections: connects.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
        closed: metric(addr, crate::server::metrics::SLOW_DISCONNECTS).await - closed0,
        caught_up: metric(addr, crate::server::metrics::SLOW_CATCHUPS).await - caught0,
        cpu: gw.usage().map_or(0.0, |u| u.0) - cpu0,
    };
    for t in tasks {
        t.abort();
    }
    Ok(loaded)
}

fn latency_json(l: &Latency) -> serde_json::Value {
    json!({"p50_ms": l.0, "p99_ms": l.1, "max_ms": l.2, "lost": l.3})
}

fn loaded_json(l: &Loaded) -> serde_json::Value {
    let mut v = latency_json(&l.latency);
    v["connections"] = KINDS.iter().zip(&l.connections).map(|(k, c)| (k.to_string(), json!(c))).collect();
    v["slow_clients_closed"] = json!(l.closed);
    v["slow_clients_caught_up"] = json!(l.caught_up);
    v["gateway_cpu_seconds"] = json!(l.cpu);
    v
}

pub async fn run(opts: &BenchOptions, s: &SlowOptions) -> anyhow::Result<serde_json::Value> {
    ensure_open_files(s.per_transport * KINDS.len() + s.normal)?;
    let env = database(opts, "slow").await?;
    let gw = BenchGateway::start(None, &s.gateway_bin, &env.url, &env.slot, 1024).await?;
    let receipts: Receipts = Arc::new(Mutex::new(Vec::new()));
    let mut normals = Vec::new();
    for i in 0..s.normal {
        let ws = phoenix(gw.addr(), &format!("normal{i}")).await?;
        normals.push(tokio::spawn(normal(ws, i as u32, Arc::clone(&receipts))));
    }
    let pool = crate::connect_pool(&env.url).await?;
    let per_phase = (s.rate * s.seconds) as i64;

    eprintln!(
        "slow-readers: {} normal subscribers alone, {} changes/s for {} s",
        s.normal, s.rate, s.seconds
    );
    let sent = write(&pool, s.rate, s.seconds, 1).await?;
    let alone = measure(&receipts, &sent, s.normal).await?;
    eprintln!("slow-readers: beside {} fast readers on each of {KINDS:?}", s.per_transport);
    let fast = loaded_phase(&gw, &pool, s, &receipts, Duration::ZERO, 1 + per_phase).await?;
    eprintln!(
        "slow-readers: beside {} slow readers on each (one read per {:?})",
        s.per_transport, s.read_every
    );
    let slow = loaded_phase(&gw, &pool, s, &receipts, s.read_every, 1 + 2 * per_phase).await?;
    for t in normals {
        t.abort();
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "{:>14} {:>9} {:>9} {:>9} {:>6} {:>8} {:>9} {:>7}",
        "phase", "p50 ms", "p99 ms", "max ms", "lost", "closed", "caught up", "CPU-s"
    );
    println!("{:>14} {:>9.2} {:>9.2} {:>9.2} {:>6}", "alone", alone.0, alone.1, alone.2, alone.3);
    for (name, l) in [("fast readers", &fast), ("slow readers", &slow)] {
        let m = &l.latency;
        println!(
            "{name:>14} {:>9.2} {:>9.2} {:>9.2} {:>6} {:>8} {:>9} {:>7.1}",
            m.0, m.1, m.2, m.3, l.closed, l.caught_up, l.cpu
        );
    }
    println!(
        "slow phase p99 / fast phase p99 = {:.2} (goal ≤ 2); / alone = {:.2}; reader connections {KINDS:?}: fast {:?}, slow {:?}",
        ratio(slow.latency.1, fast.latency.1),
        ratio(slow.latency.1, alone.1),
        fast.connections,
        slow.connections
    );
    let v = json!({
        "scenario": "slow-readers",
        "per_transport": s.per_transport,
        "normal": s.normal,
        "rate": s.rate,
        "seconds": s.seconds,
        "read_every_ms": s.read_every.as_millis() as u64,
        "alone": latency_json(&alone),
        "fast": loaded_json(&fast),
        "slow": loaded_json(&slow),
        "p99_slow_over_fast": ratio(slow.latency.1, fast.latency.1),
        "p99_slow_over_alone": ratio(slow.latency.1, alone.1),
    });
    pool.close().await;
    gw.stop().await;
    teardown(env).await;
    super::write_json(opts, &v)?;
    Ok(v)
}
