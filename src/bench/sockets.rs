//! `fanout`, `sse` and `idle`: many clients against a gateway child process.
//!
//! fanout (Phoenix WebSocket clients) and sse (Server-Sent Events streams): C clients, client i
//! following the table with an `eq` filter on key i mod K; a writer commits R changes/s for D
//! seconds, each for a random key, so each change reaches C/K clients. Latency runs from just
//! before the writer sends the INSERT (autocommit, on a connection already in hand) to receipt by
//! each client (same clock), so it includes the commit itself.
//! idle: S sockets joined to one channel each; gateway RSS before and after.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::client::Socket;
use crate::bench::gateway::{raise_nofile_limit, BenchGateway};
use crate::bench::BenchOptions;
use crate::local_postgres::{LocalPostgres, LocalPostgresOptions};

#[derive(Debug, Clone)]
pub struct SocketOptions {
    pub clients: usize,
    /// Distinct filter keys (0: one per client): each change reaches clients / keys clients.
    pub keys: usize,
    pub transport: Transport,
    pub rate: u64,
    pub seconds: u64,
    /// The walcast binary to run as the gateway.
    pub gateway_bin: PathBuf,
    /// Measure this running gateway (`ws://host:port`) instead of starting one; its publication
    /// must include `public.walcast_bench_items` in the same database.
    pub gateway_url: Option<String>,
}

/// How the fanout clients connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Phoenix WebSocket (`postgres_changes`).
    Phoenix,
    /// `GET /v1/tables/…/changes` as Server-Sent Events.
    Sse,
}

pub(crate) struct Env {
    /// A throwaway cluster (its directory goes when it stops), unless `--database-url` was given.
    cluster: Option<LocalPostgres>,
    pub(crate) url: String,
    /// The gateway's slot, unique to this run (slots are cluster-wide).
    pub(crate) slot: String,
}

/// Raises the open-file limit and checks that `sockets` connections fit under it.
pub(crate) fn ensure_open_files(sockets: usize) -> anyhow::Result<()> {
    let nofile = raise_nofile_limit();
    anyhow::ensure!(
        nofile >= sockets as u64 + 200,
        "open-file limit {nofile} is too low for {sockets} sockets: raise it (ulimit -n {})",
        sockets + 1000
    );
    Ok(())
}

pub(crate) async fn database(opts: &BenchOptions, name: &str) -> anyhow::Result<Env> {
    let root = std::env::temp_dir().join(format!("walcast-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cluster = match &opts.database_url {
        Some(_) => None,
        None => {
            eprintln!("{name}: starting a throwaway PostgreSQL in {}", root.display());
            let mut o = LocalPostgresOptions::throwaway(&root);
            o.settings.push(("max_connections".into(), "300".into()));
            Some(LocalPostgres::start(o).await?)
        }
    };
    let url = match (&opts.database_url, &cluster) {
        (Some(u), _) => u.clone(),
        (None, Some(c)) => c.url("postgres"),
        _ => unreachable!(),
    };
    let pool = crate::connect_pool(&url).await?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS walcast_bench_items; \
         CREATE TABLE walcast_bench_items (id bigint PRIMARY KEY, k int4 NOT NULL, body text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    sqlx::raw_sql(crate::local_postgres::API_ROLES_SQL).execute(&pool).await?;
    pool.close().await;
    Ok(Env { cluster, url, slot: format!("walcast_bench_{name}_{}", std::process::id()) })
}

/// Drops what a scenario made beyond the shared table (`sql`: its DROP statements).
pub(crate) async fn drop_objects(env: &Env, sql: &str) {
    if let Ok(p) = crate::connect_pool(&env.url).await {
        let _ = sqlx::raw_sql(sql).execute(&p).await;
        p.close().await;
    }
}

pub(crate) async fn teardown(env: Env) {
    if let Ok(pool) = crate::connect_pool(&env.url).await {
        let _ = sqlx::raw_sql("DROP TABLE IF EXISTS walcast_bench_items").execute(&pool).await;
        let _ = sqlx::query("SELECT pg_drop_replication_slot($1)").bind(&env.slot).execute(&pool).await;
        pool.close().await;
    }
    if let Some(c) = env.cluster {
        c.stop().await;
    }
}

/// Opens `n` sockets, socket `i` joined to `realtime:c<i>` with an `eq` filter on key `i mod
/// keys`; returns once all are subscribed.
async fn join_all(addr: &str, n: usize, keys: usize) -> anyhow::Result<Vec<Socket>> {
    crate::bench::client::connect_all(n, |i| {
        let binding = serde_json::json!({"event": "INSERT", "schema": "public",
            "table": "walcast_bench_items", "filter": format!("k=eq.{}", i % keys)});
        crate::bench::client::phoenix_join_as(
            addr,
            format!("realtime:c{i}"),
            serde_json::json!({"postgres_changes": [binding]}),
            true,
            None,
        )
    })
    .await
}

/// Opens `n` event streams, stream `i` with the filter `k=eq.<i mod keys>`; each is subscribed
/// once its response has begun.
async fn open_streams(addr: &str, n: usize, keys: usize) -> anyhow::Result<Vec<reqwest::Response>> {
    let client = reqwest::Client::new();
    let key = crate::bench::gateway::apikey();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = (out.len()..(out.len() + 200).min(n)).map(|i| {
            let url = format!(
                "http://{addr}/v1/tables/public.walcast_bench_items/changes?events=insert&filter=k=eq.{}&access_token={key}",
                i % keys
            );
            client.get(url).header("accept", "text/event-stream").send()
        });
        for r in futures_util::future::join_all(batch).await {
            let r = r?;
            anyhow::ensure!(r.status().is_success(), "stream refused: {}", r.status());
            out.push(r);
        }
        if n >= 1000 && out.len() % 1000 == 0 {
            eprintln!("  {} streams open", out.len());
        }
    }
    Ok(out)
}

/// Each receipt: (client, row id, instant).
type Receipts = Arc<Mutex<Vec<(u32, i64, Instant)>>>;

fn record(receipts: &Receipts, client: u32, text: &str) {
    let now = Instant::now();
    if let Some(id) = record_id(text) {
        if let Ok(mut r) = receipts.lock() {
            r.push((client, id, now));
        }
    }
}

/// Readers that record every change their client receives.
async fn start_readers(
    addr: &str,
    s: &SocketOptions,
    keys: usize,
    receipts: &Receipts,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut readers = Vec::with_capacity(s.clients);
    match s.transport {
        Transport::Phoenix => {
            for (i, mut ws) in join_all(addr, s.clients, keys).await?.into_iter().enumerate() {
                let receipts = Arc::clone(receipts);
                readers.push(tokio::spawn(async move {
                    while let Some(Ok(msg)) = ws.next().await {
                        if let Message::Text(t) = msg {
                            record(&receipts, i as u32, &t);
                        }
                    }
                }));
            }
        }
        Transport::Sse => {
            for (i, mut resp) in open_streams(addr, s.clients, keys).await?.into_iter().enumerate() {
                let receipts = Arc::clone(receipts);
                readers.push(tokio::spawn(async move {
                    let mut buf = String::new();
                    while let Ok(Some(chunk)) = resp.chunk().await {
                        buf.push_str(&String::from_utf8_lossy(&chunk));
                        while let Some(end) = buf.find("\n\n") {
                            record(&receipts, i as u32, &buf[..end]);
                            buf.drain(..end + 2);
                        }
                    }
                }));
            }
        }
    }
    Ok(readers)
}

pub async fn fanout(opts: &BenchOptions, s: &SocketOptions) -> anyhow::Result<serde_json::Value> {
    ensure_open_files(s.clients)?;
    let name = match s.transport {
        Transport::Phoenix => "fanout",
        Transport::Sse => "sse",
    };
    let keys = if s.keys == 0 { s.clients } else { s.keys.min(s.clients) };
    let env = database(opts, name).await?;
    let gw = BenchGateway::start(s.gateway_url.as_deref(), &s.gateway_bin, &env.url, &env.slot, 4096).await?;
    eprintln!("{name}: {} clients over {keys} keys subscribing…", s.clients);
    let receipts: Receipts = Arc::new(Mutex::new(Vec::with_capacity((s.rate * s.seconds) as usize)));
    let readers = start_readers(gw.addr(), s, keys, &receipts).await?;
    let cpu0 = gw.usage().map(|u| u.0);

    eprintln!("{name}: writing {} changes/s for {} s", s.rate, s.seconds);
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&env.url).await?;
    let total = s.rate * s.seconds;
    let sent: Arc<Mutex<HashMap<i64, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(total as usize)));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / s.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut rng = fastrand::Rng::with_seed(9);
    let mut expected = 0u64;
    let mut inflight = Vec::new();
    let started = Instant::now();
    for id in 0..total as i64 {
        tick.tick().await;
        let k = rng.usize(..keys);
        expected += (s.clients / keys + usize::from(k < s.clients % keys)) as u64;
        let k = k as i32;
        let pool = pool.clone();
        let sent = Arc::clone(&sent);
        inflight.push(tokio::spawn(async move {
            // The clock starts once a connection is in hand, so pool waits do not count.
            let mut conn = pool.acquire().await?;
            let before = Instant::now();
            if let Ok(mut m) = sent.lock() {
                m.insert(id, before);
            }
            sqlx::query("INSERT INTO walcast_bench_items (id, k, body) VALUES ($1, $2, 'payload')")
                .bind(id)
                .bind(k)
                .execute(&mut *conn)
                .await
        }));
        if inflight.len() >= 256 {
            for h in inflight.drain(..) {
                h.await??;
            }
        }
    }
    for h in inflight.drain(..) {
        h.await??;
    }
    let write_secs = started.elapsed().as_secs_f64();
    // Wait for the stragglers: until everything arrived or 10 s without progress.
    let mut last = 0;
    let mut last_change = Instant::now();
    loop {
        let n = receipts.lock().map(|r| r.len()).unwrap_or(0);
        if n as u64 >= expected || last_change.elapsed() > Duration::from_secs(10) {
            break;
        }
        if n != last {
            last = n;
            last_change = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end_usage = gw.usage();
    for r in &readers {
        r.abort();
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let sent = sent.lock().map(|m| m.clone()).unwrap_or_default();
    let receipts = receipts.lock().map(|r| r.clone()).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let mut repeated = 0u64;
    for (client, id, at) in &receipts {
        if let Some(t0) = sent.get(id) {
            if seen.insert((*client, *id)) {
                let us = at.saturating_duration_since(*t0).as_micros().max(1) as u64;
                let _ = hist.record(us.min(60_000_000));
            } else {
                repeated += 1;
            }
        }
    }
    let delivered = seen.len() as u64;
    let lost = expected.saturating_sub(delivered);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let v = serde_json::json!({
        "scenario": name,
        "clients": s.clients,
        "keys": keys,
        "expected": expected,
        "repeated": repeated,
        "changes_per_sec": (total as f64 / write_secs).round(),
        "delivered": delivered,
        "lost": lost,
        "latency_ms": {"p50": ms(0.50), "p95": ms(0.95), "p99": ms(0.99), "max": hist.max() as f64 / 1000.0},
        "cpu_seconds": end_usage.zip(cpu0).map(|(u, c0)| ((u.0 - c0) * 100.0).round() / 100.0),
        "peak_rss_bytes": end_usage.map(|u| u.2),
    });
    println!(
        "{:>8} {:>6} {:>10} {:>10} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "clients",
        "keys",
        "changes/s",
        "delivered",
        "lost",
        "repeated",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms"
    );
    println!(
        "{:>8} {:>6} {:>10.0} {:>10} {:>6} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        s.clients,
        keys,
        total as f64 / write_secs,
        delivered,
        lost,
        repeated,
        ms(0.5),
        ms(0.95),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    if let (Some((cpu1, _, peak)), Some(cpu0)) = (end_usage, cpu0) {
        println!("gateway: {:.2} CPU s during the run, peak RSS {} MiB", cpu1 - cpu0, peak / (1 << 20));
    }
    pool.close().await;
    gw.stop().await;
    teardown(env).await;
    super::write_json(opts, &v)?;
    Ok(v)
}

/// The `id` of `record` in a postgres_changes frame.
fn record_id(frame: &str) -> Option<i64> {
    let at = frame.find("\"record\":{\"id\":")? + "\"record\":{\"id\":".len();
    let rest = &frame[at..];
    let end = rest.find(|c: char| !c.is_ascii_digit() && c != '-')?;
    rest[..end].parse().ok()
}

pub async fn idle(opts: &BenchOptions, s: &SocketOptions) -> anyhow::Result<serde_json::Value> {
    ensure_open_files(s.clients)?;
    let env = database(opts, "idle").await?;
    let gw = BenchGateway::start(s.gateway_url.as_deref(), &s.gateway_bin, &env.url, &env.slot, 1024).await?;
    // Warm the gateway's allocator and catalog cache with one client first.
    let warm = join_all(gw.addr(), 1, 1).await?;
    let Some((_, before, _)) = gw.usage() else {
        anyhow::bail!("idle measures the gateway's memory, which needs the gateway as a child process (no --gateway-url)");
    };
    eprintln!("idle: opening {} sockets…", s.clients);
    let sockets = join_all(gw.addr(), s.clients, s.clients).await?;
    let (cpu, after, peak) = gw.usage().unwrap_or_default();
    let per = after.saturating_sub(before) as f64 / s.clients as f64;
    println!("{:>8} {:>14} {:>14} {:>16}", "sockets", "rss before", "rss after", "bytes/socket");
    println!("{:>8} {:>14} {:>14} {:>16.0}", s.clients, before, after, per);
    let v = serde_json::json!({
        "scenario": "idle",
        "sockets": s.clients,
        "rss_bytes_before": before,
        "rss_bytes_after": after,
        "rss_bytes_per_socket": per.round(),
        "cpu_seconds": cpu,
        "peak_rss_bytes": peak,
    });
    drop(sockets);
    drop(warm);
    gw.stop().await;
    teardown(env).await;
    super::write_json(opts, &v)?;
    Ok(v)
}
