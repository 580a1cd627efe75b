//! `soak`: many Phoenix WebSocket clients for a long time, with steady changes and a share of the
//! clients reconnecting every minute, resuming from their last cursor. Reports the gateway's RSS
//! and open file descriptors at the start and at the end, and every change a client should have
//! received and did not (or received twice).
//!
//! Client i follows `walcast_bench_items` with an `eq` filter on key i mod K; the writer commits R
//! changes/s for a random key each. Every client was joined before the first change, and resumes
//! with `since` (its last cursor, or the join's when no change has arrived yet) when it
//! reconnects, so it should end with exactly the changes of its key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::client::{phoenix_join_answer, Socket};
use crate::bench::gateway::BenchGateway;
use crate::bench::sockets::{database, ensure_open_files, teardown};
use crate::bench::BenchOptions;

#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub clients: usize,
    /// Clients per key: each change reaches this many.
    pub per_key: usize,
    pub rate: u64,
    pub seconds: u64,
    /// Percent of the clients that reconnect each minute.
    pub reconnect_percent: f64,
    pub gateway_bin: std::path::PathBuf,
}

/// What one client received: ids (in order) and its last cursor.
#[derive(Default)]
struct Received {
    ids: Vec<i64>,
    cursor: Option<String>,
}

fn binding(key: usize, since: Option<&str>) -> serde_json::Value {
    let mut b = json!({"event": "INSERT", "schema": "public", "table": "walcast_bench_items",
                       "filter": format!("k=eq.{key}")});
    if let Some(c) = since {
        b["since"] = json!(c);
    }
    b
}

/// Connects and joins `realtime:c<i>` (resuming after `since`); returns once subscribed, with the
/// cursor the bindings went live at.
async fn join(addr: &str, i: usize, key: usize, since: Option<&str>) -> anyhow::Result<(Socket, String)> {
    let config = json!({"postgres_changes": [binding(key, since)]});
    let (ws, answer) = phoenix_join_answer(addr, format!("realtime:c{i}"), config, true, None).await?;
    let Some(cursor) = cursor_of(&answer) else {
        anyhow::bail!("the join's system message has no cursor: {answer}")
    };
    Ok((ws, cursor))
}

/// The record id and cursor of a change frame.
pub(crate) fn id_and_cursor(frame: &str) -> Option<(i64, Option<String>)> {
    let at = frame.find("\"record\":{\"id\":")? + "\"record\":{\"id\":".len();
    let rest = &frame[at..];
    let end = rest.find(|c: char| !c.is_ascii_digit() && c != '-')?;
    let id = rest[..end].parse().ok()?;
    Some((id, cursor_of(frame)))
}

/// The `cursor` a frame carries.
fn cursor_of(frame: &str) -> Option<String> {
    let at = frame.find("\"cursor\":\"")? + "\"cursor\":\"".len();
    let rest = &frame[at..];
    rest.find('"').map(|end| rest[..end].to_owned())
}

/// One client's place in the run.
struct Client {
    addr: String,
    i: usize,
    key: usize,
    received: Arc<Mutex<Received>>,
    /// Told when it is to reconnect.
    reconnect: Arc<Notify>,
    /// Reconnects of every client.
    reconnects: Arc<AtomicU64>,
    stop: Arc<Notify>,
}

/// One client: reads its socket, and reconnects from its last cursor when told to.
async fn client(c: Client, mut ws: Socket) {
    let Client { addr, i, key, received, reconnect, reconnects, stop } = c;
    loop {
        tokio::select! {
            _ = stop.notified() => return,
            _ = reconnect.notified() => {
                let _ = ws.close(None).await;
                drop(ws);
                let since = crate::locks::lock(&received).cursor.clone();
                ws = loop {
                    match join(&addr, i, key, since.as_deref()).await {
                        // Its own cursor is never older than the join's: the replay after it
                        // follows.
                        Ok((ws, _)) => break ws,
                        Err(e) => {
                            eprintln!("soak: client {i} could not reconnect ({e}); trying again");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                };
                reconnects.fetch_add(1, Ordering::Relaxed);
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Some((id, cursor)) = id_and_cursor(&t) {
                        let mut r = crate::locks::lock(&received);
                        r.ids.push(id);
                        if cursor.is_some() {
                            r.cursor = cursor;
                        }
                    }
                }
                Some(Ok(_)) => {}
                _ => {
                    eprintln!("soak: client {i}'s socket closed by the gateway");
                    return;
                }
            },
        }
    }
}

/// Each client, with what it received and how to tell it to reconnect.
type Clients = [(Arc<Mutex<Received>>, Arc<Notify>)];

/// Waits until `expected` deliveries arrived, or 60 s pass without one.
async fn wait_delivered(clients: &Clients, expected: usize) {
    let count = || -> usize { clients.iter().map(|(r, _)| crate::locks::lock(r).ids.len()).sum() };
    let mut last = (count(), Instant::now());
    while last.0 < expected && last.1.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = count();
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
}

/// (lost, repeated): the changes of each client's key it did not receive, and the ones it
/// received more than once.
fn tally(clients: &Clients, by_key: &HashMap<usize, Vec<i64>>, keys: usize) -> (usize, usize) {
    let (mut lost, mut repeated) = (0, 0);
    for (i, (received, _)) in clients.iter().enumerate() {
        let want = by_key.get(&(i % keys)).map(Vec::as_slice).unwrap_or(&[]);
        let got = &crate::locks::lock(received).ids;
        let mut distinct = got.clone();
        distinct.sort_unstable();
        distinct.dedup();
        repeated += got.len() - distinct.len();
        for id in want.iter().filter(|id| distinct.binary_search(id).is_err()) {
            if lost < 10 {
                eprintln!("soak: client {i} (key {}) did not receive change {id}", i % keys);
            }
            lost += 1;
        }
    }
    (lost, repeated)
}

/// Commits `s.rate` changes a second for `s.seconds`, each for a random key, and tells a share of
/// the clients to reconnect every second; returns the ids committed per key and the last id.
async fn write_changes(
    pool: &sqlx::PgPool,
    s: &SoakOptions,
    keys: usize,
    clients: &Clients,
    child: &crate::bench::gateway::GatewayProcess,
    reconnects: &AtomicU64,
) -> anyhow::Result<(HashMap<usize, Vec<i64>>, i64)> {
    let pid = child.pid;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut by_key: HashMap<usize, Vec<i64>> = HashMap::new();
    let started = Instant::now();
    let mut next_id = 0i64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let per_tick = s.rate as f64 / 10.0;
    let mut owed = 0.0;
    let reconnect_per_sec = s.clients as f64 * s.reconnect_percent / 100.0 / 60.0;
    let mut reconnect_owed = 0.0;
    let mut last_second = 0;
    while started.elapsed() < Duration::from_secs(s.seconds) {
        tick.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            next_id += 1;
            let key = rng.usize(..keys);
            sqlx::query("INSERT INTO walcast_bench_items VALUES ($1, $2, 'soak')")
                .bind(next_id)
                .bind(key as i32)
                .execute(pool)
                .await?;
            by_key.entry(key).or_default().push(next_id);
        }
        let second = started.elapsed().as_secs();
        if second != last_second {
            last_second = second;
            reconnect_owed += reconnect_per_sec;
            while reconnect_owed >= 1.0 {
                reconnect_owed -= 1.0;
                clients[rng.usize(..clients.len())].1.notify_one();
            }
            if second.is_multiple_of(60) {
                let (_, rss, _) = child.usage();
                eprintln!(
                    "soak: {second} s, {next_id} changes, {} reconnects, RSS {rss} bytes, {} fds",
                    reconnects.load(Ordering::Relaxed),
                    open_fds(pid)
                );
            }
        }
    }
    Ok((by_key, next_id))
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

pub async fn run(opts: &BenchOptions, s: &SoakOptions) -> anyhow::Result<serde_json::Value> {
    ensure_open_files(s.clients)?;
    let env = database(opts, "soak").await?;
    let gw = BenchGateway::start(None, &s.gateway_bin, &env.url, &env.slot, 1024).await?;
    let BenchGateway::Child(child) = &gw else { anyhow::bail!("soak needs the gateway as a child process") };
    let pid = child.pid;
    let addr = gw.addr().to_owned();
    let keys = (s.clients / s.per_key.max(1)).max(1);
    eprintln!("soak: joining {} clients over {keys} keys…", s.clients);
    let stop = Arc::new(Notify::new());
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(s.clients);
    let mut tasks = Vec::with_capacity(s.clients);
    for chunk in (0..s.clients).collect::<Vec<_>>().chunks(200) {
        let joined =
            futures_util::future::join_all(chunk.iter().map(|&i| join(&addr, i, i % keys, None))).await;
        for (&i, joined) in chunk.iter().zip(joined) {
            let (ws, cursor) = joined?;
            // Resuming from where the bindings went live misses nothing even before the first
            // change arrives.
            let received = Arc::new(Mutex::new(Received { ids: Vec::new(), cursor: Some(cursor) }));
            let reconnect = Arc::new(Notify::new());
            let c = Client {
                addr: addr.clone(),
                i,
                key: i % keys,
                received: Arc::clone(&received),
                reconnect: Arc::clone(&reconnect),
                reconnects: Arc::clone(&reconnects),
                stop: Arc::clone(&stop),
            };
            tasks.push(tokio::spawn(client(c, ws)));
            clients.push((received, reconnect));
        }
    }
    let (_, rss_start, _) = child.usage();
    let fds_start = open_fds(pid);
    eprintln!(
        "soak: {} clients joined; RSS {rss_start} bytes, {fds_start} fds; running {} s",
        s.clients, s.seconds
    );

    let pool = crate::connect_pool(&env.url).await?;
    let (by_key, next_id) = write_changes(&pool, s, keys, &clients, child, &reconnects).await?;
    let expected: usize = (0..s.clients).map(|i| by_key.get(&(i % keys)).map_or(0, Vec::len)).sum();
    wait_delivered(&clients, expected).await;
    let (cpu, rss_end, peak) = child.usage();
    let fds_end = open_fds(pid);
    let (lost, repeated) = tally(&clients, &by_key, keys);
    stop.notify_waiters();
    for t in tasks {
        t.abort();
    }
    println!(
        "{:>8} {:>8} {:>10} {:>11} {:>14} {:>14} {:>9} {:>9} {:>6} {:>9}",
        "clients",
        "seconds",
        "changes",
        "reconnects",
        "rss start",
        "rss end",
        "fds start",
        "fds end",
        "lost",
        "repeated"
    );
    println!(
        "{:>8} {:>8} {:>10} {:>11} {:>14} {:>14} {:>9} {:>9} {:>6} {:>9}",
        s.clients,
        s.seconds,
        next_id,
        reconnects.load(Ordering::Relaxed),
        rss_start,
        rss_end,
        fds_start,
        fds_end,
        lost,
        repeated
    );
    let v = json!({
        "scenario": "soak",
        "clients": s.clients,
        "keys": keys,
        "seconds": s.seconds,
        "rate": s.rate,
        "changes": next_id,
        "deliveries_expected": expected,
        "reconnects": reconnects.load(Ordering::Relaxed),
        "rss_bytes_start": rss_start,
        "rss_bytes_end": rss_end,
        "peak_rss_bytes": peak,
        "open_fds_start": fds_start,
        "open_fds_end": fds_end,
        "gateway_cpu_seconds": cpu,
        "lost": lost,
        "repeated": repeated,
    });
    pool.close().await;
    gw.stop().await;
    teardown(env).await;
    super::write_json(opts, &v)?;
    Ok(v)
}
