//! The realtime scenarios, each against the raw-WebSocket relay (`relay.rs`) in the same run:
//!
//! - `same-table`: C clients, each on its own channel topic, each subscribed to every INSERT of
//!   one table; a writer commits R changes/s. Every change goes to every client. The fixed rate
//!   runs against the relay too, so a goal at that rate can be read against the machine's limit,
//!   and then against the relay told of each change once its INSERT has committed (`relay+db`):
//!   the database's share of the latency, on the same cores, which no gateway can avoid.
//! - `broadcast`: S sockets in T topics; one member of each topic broadcasts R messages/s, the
//!   others receive them.
//! - `presence`: S sockets in T topics each track once; the time until every socket's presence
//!   state is complete, and the gateway's memory.
//!
//! Latency runs from just before a message is sent (the INSERT, or the broadcast push) to its
//! receipt, on one clock: every message carries `t=<µs since the run started>`. A step passes when
//! nothing is lost and p99 ≤ the bound; the highest passing rate is compared with the relay's.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

use crate::bench::client::{connect_all, phoenix_join, ws_connect, Socket};
use crate::bench::gateway::{proc_usage, BenchGateway};
use crate::bench::sockets::{database, ensure_open_files, teardown};
use crate::bench::BenchOptions;

#[derive(Debug, Clone)]
pub struct RealtimeOptions {
    /// Receiving sockets (same-table, presence) or all sockets (broadcast).
    pub clients: usize,
    /// Topics (broadcast, presence).
    pub topics: usize,
    /// The fixed-rate measurement: changes/s (same-table) or messages/s per topic (broadcast).
    pub rate: u64,
    pub seconds: u64,
    /// Seconds per step of the search for the highest rate within the latency bound.
    pub step_seconds: u64,
    /// Rates tried in the search, ascending; empty skips the search.
    pub steps: Vec<u64>,
    /// Tries a rate gets to hold the latency bound before the search stops (a loss stops it at
    /// once): one burst of load from outside can spoil a single try.
    pub step_tries: u32,
    /// The latency bound of the search, in ms.
    pub p99_bound_ms: f64,
    pub gateway_bin: PathBuf,
    pub gateway_url: Option<String>,
}

/// Receipts of one socket.
#[derive(Debug)]
pub(crate) struct Receiver {
    receipts: Mutex<Receipts>,
    pub(crate) received: AtomicU64,
    /// Stamped frames that lack `must_contain` (rows this socket must never see).
    pub(crate) leaked: AtomicU64,
    must_contain: Option<Vec<u8>>,
}

impl Receiver {
    fn new() -> Arc<Receiver> {
        Receiver::expecting(None)
    }

    pub(crate) fn expecting(must_contain: Option<Vec<u8>>) -> Arc<Receiver> {
        Arc::new(Receiver {
            receipts: Mutex::new(Receipts {
                latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!()),
                arrivals: Vec::new(),
            }),
            received: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
            must_contain,
        })
    }
}

/// What one socket received during a step: the latency of each frame, and when each stamp arrived
/// (to tell, per message, the first receipt from the last one across all sockets).
#[derive(Debug)]
struct Receipts {
    latency: Histogram<u64>,
    /// (stamp, arrival), both in µs since the run started.
    arrivals: Vec<(u64, u64)>,
}

/// The `t=<µs>` stamp in a frame's bytes (near its end, so searched from there).
fn find_stamp(bytes: &[u8]) -> Option<u64> {
    let at = bytes.windows(2).rposition(|w| w == b"t=")? + 2;
    let digits = bytes[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&bytes[at..at + digits]).ok()?.parse().ok()
}

fn micros_since(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// Records every stamped frame the socket receives.
pub(crate) fn spawn_reader(
    mut stream: SplitStream<Socket>,
    start: Instant,
    r: Arc<Receiver>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let bytes: &[u8] = match &msg {
                Message::Text(t) => t.as_bytes(),
                Message::Binary(b) => b,
                _ => continue,
            };
            r.record(bytes, start);
        }
    })
}

impl Receiver {
    /// Records a frame the socket received, if it carries a stamp.
    pub(crate) fn record(&self, bytes: &[u8], start: Instant) {
        let Some(t) = find_stamp(bytes) else { return };
        if let Some(needle) = &self.must_contain {
            if !bytes.windows(needle.len()).any(|w| w == &needle[..]) {
                self.leaked.fetch_add(1, Ordering::Relaxed);
            }
        }
        let now = micros_since(start);
        let us = now.saturating_sub(t).max(1);
        if let Ok(mut rc) = self.receipts.lock() {
            let _ = rc.latency.record(us.min(60_000_000));
            rc.arrivals.push((t, now));
        }
        self.received.fetch_add(1, Ordering::Relaxed);
    }
}

/// One measured step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    pub(crate) rate: u64,
    sent: u64,
    expected: u64,
    pub(crate) delivered: u64,
    secs: f64,
    p50: f64,
    pub(crate) p99: f64,
    max: f64,
    /// For INSERTs: from the stamp until the INSERT returned (committed), p50 and p99 in ms —
    /// the part of the latency the database takes before the gateway can see the change.
    commit: Option<(f64, f64)>,
    /// Per message across all its receivers, p50 / p99 in ms: the first receipt after the stamp,
    /// the first receipt after the INSERT returned (INSERTs only), and the last receipt after the
    /// first — the hop to the server against the fan-out's spread.
    first: (f64, f64),
    first_after_commit: Option<(f64, f64)>,
    spread: (f64, f64),
}

/// p50 and p99 of a histogram of µs, in ms.
fn p50_p99(h: &Histogram<u64>) -> (f64, f64) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    (ms(0.5), ms(0.99))
}

impl Step {
    pub(crate) fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        json!({"rate": self.rate, "sent": self.sent, "delivered": self.delivered, "lost": self.lost(),
               "deliveries_per_sec": (self.delivered as f64 / self.secs).round(),
               "latency_ms": {"p50": self.p50, "p99": self.p99, "max": self.max},
               "commit_ms": self.commit.map(|(p50, p99)| json!({"p50": p50, "p99": p99})),
               "first_receipt_ms": {"p50": self.first.0, "p99": self.first.1},
               "first_receipt_after_commit_ms":
                   self.first_after_commit.map(|(p50, p99)| json!({"p50": p50, "p99": p99})),
               "last_after_first_receipt_ms": {"p50": self.spread.0, "p99": self.spread.1}})
    }

    pub(crate) fn print(&self, who: &str) {
        println!(
            "{who:>8} {:>8} {:>12.0} {:>10} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>13}",
            self.rate,
            self.delivered as f64 / self.secs,
            self.delivered,
            self.lost(),
            self.p50,
            self.p99,
            self.max,
            self.commit.map(|(p50, p99)| format!("{p50:.2} / {p99:.2}")).unwrap_or_default()
        );
        let pair = |(p50, p99): (f64, f64)| format!("{p50:.2} / {p99:.2}");
        println!(
            "{:>8} first receipt {}{} · last after first {}",
            "",
            pair(self.first),
            self.first_after_commit.map(|c| format!(" (after commit {})", pair(c))).unwrap_or_default(),
            pair(self.spread)
        );
    }
}

pub(crate) fn print_header() {
    println!(
        "{:>8} {:>8} {:>12} {:>10} {:>6} {:>9} {:>9} {:>9} {:>13}",
        "server", "rate", "deliveries/s", "delivered", "lost", "p50 ms", "p99 ms", "max ms", "commit p50/p99"
    );
}

/// How a step sends its messages: `send(seq, stamp)` for each tick.
pub(crate) enum Source {
    /// INSERTs through a pool: the statement takes the row id ($1) and the stamp ($2). With a
    /// publisher, each committed INSERT is then followed by the frame for the stamp taken before
    /// it, sent on that socket: a relay that learns of each change the moment its commit returns,
    /// with the database's work on the same cores.
    Db(sqlx::PgPool, &'static str, Option<Publisher>),
    /// One publishing socket per topic, with the frame for a stamp.
    Sockets(Vec<SplitSink<Socket, Message>>, fn(usize, u64) -> Message),
}

/// A publishing socket shared by the INSERT tasks, with the frame for a stamp.
pub(crate) type Publisher = (Arc<tokio::sync::Mutex<SplitSink<Socket, Message>>>, fn(usize, u64) -> Message);

/// Sends `rate` messages per second (per publishing socket) for `seconds`, then waits until every
/// receiver has its share or nothing moved for 5 s. `fanout` is how many receivers each message
/// reaches.
pub(crate) async fn step(
    source: &mut Source,
    receivers: &[Arc<Receiver>],
    start: Instant,
    rate: u64,
    seconds: u64,
    fanout: u64,
    seq: &mut i64,
) -> anyhow::Result<Step> {
    for r in receivers {
        if let Ok(mut rc) = r.receipts.lock() {
            rc.latency.reset();
            rc.arrivals.clear();
        }
        r.received.store(0, Ordering::Relaxed);
    }
    // Sockets take turns, one message per tick, so the messages of all topics are spread evenly
    // over each second rather than sent in bursts.
    let streams = match source {
        Source::Db(..) => 1,
        Source::Sockets(sinks, _) => sinks.len().max(1) as u64,
    };
    let ticks = rate * seconds * streams;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / (rate * streams) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let began = Instant::now();
    let mut sent = 0u64;
    let mut inflight = Vec::new();
    let mut commits = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut committed_at = std::collections::HashMap::new();
    for n in 0..ticks {
        tick.tick().await;
        match source {
            Source::Db(pool, sql, then) => {
                *seq += 1;
                let (pool, id, sql, then) = (pool.clone(), *seq, *sql, then.clone());
                inflight.push(tokio::spawn(async move {
                    let mut conn = pool.acquire().await?;
                    let t = micros_since(start);
                    sqlx::query(sql).bind(id).bind(format!("t={t}")).execute(&mut *conn).await?;
                    let took = micros_since(start).saturating_sub(t).max(1);
                    drop(conn);
                    if let Some((sink, frame)) = then {
                        sink.lock().await.send(frame(0, t)).await.map_err(anyhow::Error::from)?;
                    }
                    Ok::<_, anyhow::Error>((t, took))
                }));
                if inflight.len() >= 256 {
                    for h in inflight.drain(..) {
                        let (t, took) = h.await??;
                        let _ = commits.record(took.min(60_000_000));
                        committed_at.insert(t, t + took);
                    }
                }
            }
            Source::Sockets(sinks, frame) => {
                let i = (n % streams) as usize;
                sinks[i].send(frame(i, micros_since(start))).await?;
            }
        }
        sent += 1;
    }
    for h in inflight.drain(..) {
        let (t, took) = h.await??;
        let _ = commits.record(took.min(60_000_000));
        committed_at.insert(t, t + took);
    }
    let expected = sent * fanout;
    let total = |rs: &[Arc<Receiver>]| rs.iter().map(|r| r.received.load(Ordering::Relaxed)).sum::<u64>();
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        let n = total(receivers);
        if n >= expected || moved.elapsed() > Duration::from_secs(5) {
            break;
        }
        if n != last {
            (last, moved) = (n, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = began.elapsed().as_secs_f64().max(1e-9).min(seconds as f64 + 5.0);
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    // stamp → (first, last) receipt
    let mut span = std::collections::HashMap::<u64, (u64, u64)>::new();
    for r in receivers {
        if let Ok(rc) = r.receipts.lock() {
            all.add(&rc.latency)?;
            for &(t, at) in &rc.arrivals {
                let e = span.entry(t).or_insert((at, at));
                e.0 = e.0.min(at);
                e.1 = e.1.max(at);
            }
        }
    }
    let new = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3);
    let (mut first, mut after_commit, mut spread) = (new()?, new()?, new()?);
    for (&t, &(a, b)) in &span {
        let _ = first.record(a.saturating_sub(t).clamp(1, 60_000_000));
        let _ = spread.record(b.saturating_sub(a).clamp(1, 60_000_000));
        if let Some(&c) = committed_at.get(&t) {
            let _ = after_commit.record(a.saturating_sub(c).clamp(1, 60_000_000));
        }
    }
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    Ok(Step {
        rate,
        sent,
        expected,
        delivered: total(receivers),
        secs: secs.max(seconds as f64),
        p50: ms(0.5),
        p99: ms(0.99),
        max: all.max() as f64 / 1000.0,
        commit: (!commits.is_empty()).then(|| p50_p99(&commits)),
        first: p50_p99(&first),
        first_after_commit: (!after_commit.is_empty()).then(|| p50_p99(&after_commit)),
        spread: p50_p99(&spread),
    })
}

/// Runs the steps in order through `search_rates` and returns every try with the highest passing
/// rate.
async fn search(
    who: &str,
    source: &mut Source,
    receivers: &[Arc<Receiver>],
    start: Instant,
    o: &RealtimeOptions,
    fanout: u64,
    seq: &mut i64,
) -> anyhow::Result<(Vec<Step>, Option<Step>)> {
    let run = async |rate| {
        let s = step(source, receivers, start, rate, o.step_seconds, fanout, seq).await?;
        s.print(who);
        Ok(s)
    };
    search_rates(&o.steps, o.step_tries, o.p99_bound_ms, run, |s| s.lost() > 0).await
}

/// The search for the highest rate within the p99 bound: the rates in order, each up to `tries`
/// times (one burst of load from outside can spoil a single try); the first rate that misses the
/// bound in every try ends it, and so does a try that `fails` (a loss, a leak) at once. Returns
/// every try run, with the highest rate that passed.
pub(crate) async fn search_rates(
    rates: &[u64],
    tries: u32,
    p99_bound_ms: f64,
    mut run: impl AsyncFnMut(u64) -> anyhow::Result<Step>,
    fails: impl Fn(&Step) -> bool,
) -> anyhow::Result<(Vec<Step>, Option<Step>)> {
    let mut steps = Vec::new();
    let mut best = None;
    'rates: for &rate in rates {
        for _ in 0..tries.max(1) {
            let s = run(rate).await?;
            steps.push(s);
            if fails(&s) {
                break 'rates;
            }
            if s.p99 <= p99_bound_ms {
                best = Some(s);
                continue 'rates;
            }
        }
        break;
    }
    Ok((steps, best))
}

/// The relay as a child process.
struct Relay {
    child: Child,
    addr: String,
}

impl Relay {
    async fn start(bin: &PathBuf) -> anyhow::Result<Relay> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["bench", "relay", "--listen", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "relay did not start within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Relay { child, addr })
    }

    /// Connects and waits until the relay has made the socket a member of `group`.
    async fn connect(&self, group: String) -> anyhow::Result<Socket> {
        let mut ws = ws_connect(format!("ws://{}/?group={group}", self.addr)).await?;
        let first = tokio::time::timeout(Duration::from_secs(60), ws.next()).await?.transpose()?;
        anyhow::ensure!(
            first.as_ref().and_then(|m| m.to_text().ok()) == Some(super::relay::READY),
            "the relay's first message was {first:?}, not its ready signal"
        );
        Ok(ws)
    }

    fn usage(&self) -> Option<(f64, u64, u64)> {
        self.child.id().map(proc_usage)
    }
}

/// A figure as printed: two decimals, or `n/a` when there is none (a ratio where a side had no passing
/// step, CPU of an external gateway).
fn shown(figure: Option<f64>) -> String {
    figure.map(|r| format!("{r:.2}")).unwrap_or_else(|| "n/a".into())
}

/// The same-table writer's statement: row id, stamp.
const INSERT_STAMPED: &str = "INSERT INTO walcast_bench_items (id, k, body) VALUES ($1, 0, $2)";

/// A change frame's worth of bytes for the relay, stamped.
fn relay_change_frame(_: usize, t: u64) -> Message {
    Message::Text(
        format!(
            "[null,null,\"realtime:c0\",\"postgres_changes\",{{\"ids\":[1234567],\"data\":{{\"schema\":\"public\",\
             \"table\":\"walcast_bench_items\",\"type\":\"INSERT\",\"commit_timestamp\":\"2026-11-22T00:00:00.000Z\",\
             \"columns\":[{{\"name\":\"id\",\"type\":\"int8\"}},{{\"name\":\"k\",\"type\":\"int4\"}},{{\"name\":\"body\",\"type\":\"text\"}}],\
             \"record\":{{\"id\":1,\"k\":0,\"body\":\"t={t}\"}},\"errors\":null}}}}]"
        )
        .into(),
    )
}

fn walcast_broadcast_frame(topic: usize, t: u64) -> Message {
    Message::Text(
        format!("[\"1\",null,\"realtime:b{topic}\",\"broadcast\",{{\"type\":\"broadcast\",\"event\":\"m\",\"payload\":{{\"m\":\"t={t}\"}}}}]")
            .into(),
    )
}

fn relay_broadcast_frame(topic: usize, t: u64) -> Message {
    // The same bytes a walcast member receives (kind 4), sent as they are.
    let payload = format!("{{\"m\":\"t={t}\"}}");
    let topic = format!("realtime:b{topic}");
    let mut f = vec![4u8, topic.len() as u8, 1, 0, 1];
    f.extend_from_slice(topic.as_bytes());
    f.push(b'm');
    f.extend_from_slice(payload.as_bytes());
    Message::Binary(f.into())
}

/// Receivers, their reader tasks, and the sockets' sending halves.
struct Split {
    receivers: Vec<Arc<Receiver>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sinks: Vec<SplitSink<Socket, Message>>,
}

fn split_readers(sockets: Vec<Socket>, start: Instant) -> Split {
    let mut receivers = Vec::new();
    let mut tasks = Vec::new();
    let mut sinks = Vec::new();
    for ws in sockets {
        let (sink, stream) = ws.split();
        let r = Receiver::new();
        tasks.push(spawn_reader(stream, start, Arc::clone(&r)));
        receivers.push(r);
        sinks.push(sink);
    }
    Split { receivers, tasks, sinks }
}

pub async fn same_table(opts: &BenchOptions, o: &RealtimeOptions) -> anyhow::Result<serde_json::Value> {
    ensure_open_files(o.clients + 10)?;
    let start = Instant::now();
    let env = database(opts, "same_table").await?;
    let gw = BenchGateway::start(o.gateway_url.as_deref(), &o.gateway_bin, &env.url, &env.slot, 4096).await?;
    eprintln!("same-table: {} clients joining, each on its own topic…", o.clients);
    let binding = json!({"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "walcast_bench_items"}]});
    let addr = gw.addr().to_owned();
    let sockets =
        connect_all(o.clients, |i| phoenix_join(&addr, format!("realtime:c{i}"), binding.clone(), true))
            .await?;
    let Split { receivers, tasks, sinks: _sinks } = split_readers(sockets, start);
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&env.url).await?;
    let mut source = Source::Db(pool.clone(), INSERT_STAMPED, None);
    let mut seq = 0i64;
    print_header();
    eprintln!("same-table: {} changes/s for {} s", o.rate, o.seconds);
    let cpu0 = gw.usage().map(|u| u.0);
    let fixed = step(&mut source, &receivers, start, o.rate, o.seconds, o.clients as u64, &mut seq).await?;
    fixed.print("walcast");
    let usage = gw.usage();
    let (w_steps, w_best) =
        search("walcast", &mut source, &receivers, start, o, o.clients as u64, &mut seq).await?;
    for t in tasks {
        t.abort();
    }
    gw.stop().await;

    // The database stays up (idle) for the relay, so both halves share the machine alike.
    eprintln!("same-table: the raw-WebSocket relay, same clients and rates…");
    let relay = Relay::start(&o.gateway_bin).await?;
    let sockets = connect_all(o.clients, |_| relay.connect("g0".into())).await?;
    let Split { receivers, tasks, sinks: _sinks } = split_readers(sockets, start);
    let publisher = relay.connect("g0".into()).await?;
    let (sink, _stream) = publisher.split();
    let mut source = Source::Sockets(vec![sink], relay_change_frame);
    let relay_cpu0 = relay.usage().map(|u| u.0);
    let relay_fixed =
        step(&mut source, &receivers, start, o.rate, o.seconds, o.clients as u64, &mut seq).await?;
    relay_fixed.print("relay");
    let relay_cpu = relay.usage().map(|u| u.0).zip(relay_cpu0).map(|(u, c)| u - c);
    let (r_steps, r_best) =
        search("relay", &mut source, &receivers, start, o, o.clients as u64, &mut seq).await?;
    // The same relay told of each change once its INSERT has committed: the latency a gateway
    // would have if it learned of a change the moment its commit returned.
    let Source::Sockets(mut sinks, _) = source else { unreachable!() };
    let sink = Arc::new(tokio::sync::Mutex::new(sinks.remove(0)));
    let mut source = Source::Db(pool.clone(), INSERT_STAMPED, Some((sink, relay_change_frame)));
    eprintln!("same-table: the relay, each message sent once its INSERT has committed…");
    let committed_fixed =
        step(&mut source, &receivers, start, o.rate, o.seconds, o.clients as u64, &mut seq).await?;
    committed_fixed.print("relay+db");
    let (c_steps, c_best) =
        search("relay+db", &mut source, &receivers, start, o, o.clients as u64, &mut seq).await?;
    for t in tasks {
        t.abort();
    }
    pool.close().await;
    teardown(env).await;
    let relay_usage = relay.usage();
    drop(relay);
    let rate_ratio = |base: Option<Step>| w_best.zip(base).map(|(w, b)| w.rate as f64 / b.rate as f64);
    let (ratio, committed_ratio) = (rate_ratio(r_best), rate_ratio(c_best));
    println!(
        "highest rate with 0 lost and p99 <= {} ms: walcast {:?}, relay {:?}, ratio {}",
        o.p99_bound_ms,
        w_best.map(|s| s.rate),
        r_best.map(|s| s.rate),
        shown(ratio)
    );
    println!(
        "against the relay told after each commit: relay+db {:?}, ratio {}",
        c_best.map(|s| s.rate),
        shown(committed_ratio)
    );
    let gateway_cpu = usage.zip(cpu0).map(|(u, c)| u.0 - c);
    let per_delivery = |cpu: Option<f64>, s: &Step| cpu.map(|c| c * 1e6 / s.delivered.max(1) as f64);
    println!(
        "CPU in the fixed run: walcast {} s ({} µs per delivery), relay {} s ({} µs per delivery)",
        shown(gateway_cpu),
        shown(per_delivery(gateway_cpu, &fixed)),
        shown(relay_cpu),
        shown(per_delivery(relay_cpu, &relay_fixed))
    );
    let v = json!({
        "scenario": "same-table", "clients": o.clients,
        "fixed": fixed.json(), "relay_fixed": relay_fixed.json(),
        "gateway_cpu_seconds_fixed": gateway_cpu.map(|c| (c * 100.0).round() / 100.0),
        "relay_cpu_seconds_fixed": relay_cpu.map(|c| (c * 100.0).round() / 100.0),
        "gateway_peak_rss_bytes": usage.map(|u| u.2),
        "walcast_steps": w_steps.iter().map(Step::json).collect::<Vec<_>>(),
        "relay_steps": r_steps.iter().map(Step::json).collect::<Vec<_>>(),
        "walcast_max_rate": w_best.map(|s| s.rate), "relay_max_rate": r_best.map(|s| s.rate),
        "ratio": ratio, "relay_peak_rss_bytes": relay_usage.map(|u| u.2),
        "relay_committed_fixed": committed_fixed.json(),
        "relay_committed_steps": c_steps.iter().map(Step::json).collect::<Vec<_>>(),
        "relay_committed_max_rate": c_best.map(|s| s.rate), "committed_ratio": committed_ratio,
    });
    super::write_json(opts, &v)?;
    Ok(v)
}

pub async fn broadcast(opts: &BenchOptions, o: &RealtimeOptions) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        o.topics > 0 && o.clients >= 2 * o.topics,
        "broadcast needs at least two sockets per topic"
    );
    ensure_open_files(o.clients + 10)?;
    let start = Instant::now();
    let per_topic = o.clients / o.topics;
    let receivers_per_message = (per_topic - 1) as u64;
    let env = database(opts, "broadcast").await?;
    let gw = BenchGateway::start(o.gateway_url.as_deref(), &o.gateway_bin, &env.url, &env.slot, 4096).await?;
    eprintln!("broadcast: {} sockets in {} topics…", per_topic * o.topics, o.topics);
    let addr = gw.addr().to_owned();
    // Socket i is in topic i % topics; sockets 0..topics are the senders.
    let sockets = connect_all(per_topic * o.topics, |i| {
        phoenix_join(
            &addr,
            format!("realtime:b{}", i % o.topics),
            json!({"broadcast": {"self": false}}),
            false,
        )
    })
    .await?;
    let Split { receivers, tasks, mut sinks } = split_readers(sockets, start);
    let senders: Vec<_> = sinks.drain(..o.topics).collect();
    let mut source = Source::Sockets(senders, walcast_broadcast_frame);
    let mut seq = 0;
    print_header();
    let cpu0 = gw.usage().map(|u| u.0);
    let fixed =
        step(&mut source, &receivers, start, o.rate, o.seconds, receivers_per_message, &mut seq).await?;
    fixed.print("walcast");
    let usage = gw.usage();
    let (w_steps, w_best) =
        search("walcast", &mut source, &receivers, start, o, receivers_per_message, &mut seq).await?;
    for t in tasks {
        t.abort();
    }
    drop(sinks);
    gw.stop().await;
    teardown(env).await;

    eprintln!("broadcast: the raw-WebSocket relay…");
    let relay = Relay::start(&o.gateway_bin).await?;
    let sockets = connect_all(per_topic * o.topics, |i| relay.connect(format!("b{}", i % o.topics))).await?;
    let Split { receivers, tasks, mut sinks } = split_readers(sockets, start);
    let senders: Vec<_> = sinks.drain(..o.topics).collect();
    let mut source = Source::Sockets(senders, relay_broadcast_frame);
    let (r_steps, r_best) =
        search("relay", &mut source, &receivers, start, o, receivers_per_message, &mut seq).await?;
    for t in tasks {
        t.abort();
    }
    drop(relay);
    let per_sec = |s: &Step| s.delivered as f64 / s.secs;
    let ratio = match (&w_best, &r_best) {
        (Some(w), Some(r)) => Some(per_sec(w) / per_sec(r)),
        _ => None,
    };
    println!(
        "highest delivered msgs/s with 0 lost and p99 <= {} ms: walcast {:?}, relay {:?}, ratio {}",
        o.p99_bound_ms,
        w_best.as_ref().map(|s| per_sec(s).round()),
        r_best.as_ref().map(|s| per_sec(s).round()),
        shown(ratio)
    );
    let v = json!({
        "scenario": "broadcast", "sockets": per_topic * o.topics, "topics": o.topics,
        "fixed": fixed.json(),
        "gateway_cpu_seconds_fixed": usage.zip(cpu0).map(|(u, c)| ((u.0 - c) * 100.0).round() / 100.0),
        "gateway_peak_rss_bytes": usage.map(|u| u.2),
        "walcast_steps": w_steps.iter().map(Step::json).collect::<Vec<_>>(),
        "relay_steps": r_steps.iter().map(Step::json).collect::<Vec<_>>(),
        "walcast_max_deliveries_per_sec": w_best.as_ref().map(per_sec),
        "relay_max_deliveries_per_sec": r_best.as_ref().map(per_sec),
        "ratio": ratio,
    });
    super::write_json(opts, &v)?;
    Ok(v)
}

pub async fn presence(opts: &BenchOptions, o: &RealtimeOptions) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(o.topics > 0 && o.clients >= o.topics, "presence needs at least one socket per topic");
    ensure_open_files(o.clients + 10)?;
    let per_topic = o.clients / o.topics;
    let n = per_topic * o.topics;
    let env = database(opts, "presence").await?;
    let gw = BenchGateway::start(o.gateway_url.as_deref(), &o.gateway_bin, &env.url, &env.slot, 4096).await?;
    let addr = gw.addr().to_owned();
    eprintln!("presence: {n} sockets joining {} topics…", o.topics);
    let rss_before = gw.usage().map(|u| u.1);
    let sockets = connect_all(n, |i| {
        phoenix_join(
            &addr,
            format!("realtime:p{}", i % o.topics),
            json!({"presence": {"key": format!("user{i}"), "enabled": true}}),
            false,
        )
    })
    .await?;
    let rss_joined = gw.usage().map(|u| u.1);
    // Each socket counts the keys it knows; complete at `per_topic`.
    let complete = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let done_at: Arc<Mutex<Option<Duration>>> = Arc::default();
    let mut sinks = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for ws in sockets {
        let (sink, mut stream) = ws.split();
        sinks.push(sink);
        let (complete, done_at) = (Arc::clone(&complete), Arc::clone(&done_at));
        tasks.push(tokio::spawn(async move {
            let mut keys: HashSet<String> = HashSet::new();
            let mut counted = false;
            while let Some(Ok(Message::Text(t))) = stream.next().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else { continue };
                match v[3].as_str() {
                    Some("presence_state") => {
                        keys.extend(v[4].as_object().into_iter().flat_map(|o| o.keys().cloned()))
                    }
                    Some("presence_diff") => {
                        keys.extend(v[4]["joins"].as_object().into_iter().flat_map(|o| o.keys().cloned()));
                        for k in v[4]["leaves"].as_object().into_iter().flat_map(|o| o.keys()) {
                            keys.remove(k);
                        }
                    }
                    _ => continue,
                }
                if !counted && keys.len() >= per_topic {
                    counted = true;
                    if complete.fetch_add(1, Ordering::AcqRel) + 1 == n as u64 {
                        if let Ok(mut d) = done_at.lock() {
                            *d = Some(started.elapsed());
                        }
                    }
                }
            }
        }));
    }
    eprintln!("presence: every socket tracks once…");
    for (i, sink) in sinks.iter_mut().enumerate() {
        let track = json!(["1", "2", format!("realtime:p{}", i % o.topics), "presence",
                           {"type": "presence", "event": "track", "payload": {"user": i, "online_at": 1_763_769_600}}]);
        sink.send(Message::Text(track.to_string().into())).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while complete.load(Ordering::Acquire) < n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = done_at.lock().ok().and_then(|d| *d);
    let usage = gw.usage();
    for t in tasks {
        t.abort();
    }
    gw.stop().await;
    teardown(env).await;
    let complete_n = complete.load(Ordering::Acquire);
    println!(
        "{:>8} {:>7} {:>10} {:>14} {:>16} {:>16}",
        "sockets", "topics", "complete", "time to all ms", "rss joined MiB", "rss after MiB"
    );
    println!(
        "{n:>8} {:>7} {complete_n:>10} {:>14} {:>16} {:>16}",
        o.topics,
        elapsed.map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0)).unwrap_or_else(|| "incomplete".into()),
        rss_joined.map(|r| r >> 20).unwrap_or(0),
        usage.map(|u| u.1 >> 20).unwrap_or(0)
    );
    let v = json!({
        "scenario": "presence", "sockets": n, "topics": o.topics, "complete": complete_n,
        "ms_until_every_state_complete": elapsed.map(|d| d.as_secs_f64() * 1000.0),
        "gateway_rss_bytes": {"before": rss_before, "joined": rss_joined, "tracked": usage.map(|u| u.1)},
        "gateway_cpu_seconds": usage.map(|u| u.0),
    });
    super::write_json(opts, &v)?;
    anyhow::ensure!(complete_n == n as u64, "only {complete_n} of {n} sockets saw a complete presence state");
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_at(rate: u64, p99: f64, lost: u64) -> Step {
        Step {
            rate,
            sent: 10,
            expected: 10,
            delivered: 10 - lost,
            secs: 1.0,
            p50: p99 / 2.0,
            p99,
            max: p99,
            commit: None,
            first: (0.0, 0.0),
            first_after_commit: None,
            spread: (0.0, 0.0),
        }
    }

    /// Runs `search_rates` over scripted tries: the p99 of each try in order, a loss as a
    /// negative p99.
    fn search_scripted(rates: &[u64], tries: u32, script: &[f64]) -> (Vec<(u64, f64)>, Option<u64>) {
        let mut script = script.iter().copied();
        let run = async |rate| {
            let p99 = script.next().expect("the search ran more tries than scripted");
            Ok(step_at(rate, p99.abs(), u64::from(p99 < 0.0)))
        };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (steps, best) = rt.block_on(search_rates(rates, tries, 50.0, run, |s| s.lost() > 0)).unwrap();
        (steps.iter().map(|s| (s.rate, s.p99)).collect(), best.map(|s| s.rate))
    }

    #[test]
    fn a_rate_gets_its_tries_and_the_first_rate_missing_in_all_of_them_ends_the_search() {
        // 100 misses once, then holds; 200 misses twice: the search ends there.
        let (steps, best) = search_scripted(&[50, 100, 200, 300], 2, &[10.0, 60.0, 40.0, 70.0, 80.0]);
        assert_eq!(steps, vec![(50, 10.0), (100, 60.0), (100, 40.0), (200, 70.0), (200, 80.0)]);
        assert_eq!(best, Some(100));
        // One try per rate: the first miss ends it.
        let (steps, best) = search_scripted(&[50, 100, 200], 1, &[10.0, 60.0]);
        assert_eq!(steps.len(), 2);
        assert_eq!(best, Some(50));
        // A loss is never retried.
        let (steps, best) = search_scripted(&[50, 100], 3, &[-10.0]);
        assert_eq!(steps.len(), 1);
        assert_eq!(best, None);
    }
}
