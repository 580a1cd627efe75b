//! `socketio`: Socket.IO's fan-out against Phoenix's, the same deliveries in the same run, and
//! the gateway's memory per idle Socket.IO socket.
//!
//! 0. Idle, first, on a gateway that has held no other sockets: N Phoenix sockets, each with
//!    one subscription, then N Socket.IO sockets likewise: the gateway's RSS growth per socket.
//! 1. Same table: C sockets subscribed to every INSERT of one table, first through Phoenix, then
//!    through Socket.IO (WebSocket transport): a fixed rate, then the highest rate with nothing
//!    lost and p99 within the bound.
//! 2. Own key: C sockets each subscribed to the rows of its own key (`k=eq.<i>`); every change
//!    reaches one socket. The same two sides.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::bench::client::{connect_all, phoenix_join, ws_connect, Socket};
use crate::bench::gateway::{apikey, BenchGateway};
use crate::bench::live::until_all_deliver;
use crate::bench::realtime::{print_header, search_rates, step, Receiver, Source, Step};
use crate::bench::sockets::{database, ensure_open_files, teardown};
use crate::bench::BenchOptions;

#[derive(Debug, Clone)]
pub struct SocketIoOptions {
    pub clients: usize,
    /// Changes per second of the same-table fixed run.
    pub rate: u64,
    /// Changes per second of the own-key fixed run.
    pub own_rate: u64,
    /// Rates the own-key search tries (`steps` is the same-table search's).
    pub own_steps: Vec<u64>,
    pub seconds: u64,
    /// Idle sockets per side.
    pub idle: usize,
    pub steps: Vec<u64>,
    pub step_seconds: u64,
    pub step_tries: u32,
    pub p99_bound_ms: f64,
    pub gateway_bin: PathBuf,
    pub gateway_url: Option<String>,
}

const TABLE: &str = "walcast_bench_items";

/// The next text frame, within 30 s (a ping meanwhile is answered).
async fn text(ws: &mut Socket, what: &str) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2" => ws.send(Message::Text("3".into())).await?,
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.to_string()),
            Ok(Some(Ok(_))) => continue,
            other => anyhow::bail!("socket.io {what}: {other:?}"),
        }
    }
}

/// A Socket.IO socket over WebSocket, connected to `/` with the bench key, and subscribed to
/// `subscription` once acknowledged.
async fn socketio(addr: &str, subscription: Option<Value>) -> anyhow::Result<Socket> {
    let mut ws = ws_connect(format!("ws://{addr}/socket.io/?EIO=4&transport=websocket")).await?;
    let open = text(&mut ws, "open").await?;
    anyhow::ensure!(open.starts_with('0'), "socket.io open: {open}");
    ws.send(Message::Text(format!("40{}", json!({"token": apikey()})).into())).await?;
    let connected = text(&mut ws, "connect").await?;
    anyhow::ensure!(connected.starts_with("40"), "socket.io connect: {connected}");
    if let Some(sub) = subscription {
        ws.send(Message::Text(format!("420{}", json!(["subscribe", sub])).into())).await?;
        let ack = text(&mut ws, "subscribe").await?;
        anyhow::ensure!(ack.starts_with("430") && ack.contains("\"ok\":true"), "socket.io subscribe: {ack}");
    }
    Ok(ws)
}

/// Readers that record stamped frames and answer the server's pings (Engine.IO closes a socket
/// that does not).
fn readers(sockets: Vec<Socket>, start: Instant) -> (Vec<Arc<Receiver>>, Vec<tokio::task::JoinHandle<()>>) {
    let (mut receivers, mut tasks) = (Vec::new(), Vec::new());
    for mut ws in sockets {
        let r = Receiver::expecting(None);
        let into = Arc::clone(&r);
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                match &msg {
                    Message::Text(t)
                        if t.as_str() == "2" && ws.send(Message::Text("3".into())).await.is_err() =>
                    {
                        return
                    }
                    Message::Text(t) if t.as_str() == "2" => {}
                    Message::Text(t) => into.record(t.as_bytes(), start),
                    Message::Binary(b) => into.record(b, start),
                    _ => {}
                }
            }
        }));
        receivers.push(r);
    }
    (receivers, tasks)
}

/// How the sockets subscribe.
#[derive(Debug, Clone, Copy)]
enum Shape {
    SameTable,
    OwnKey,
}

/// Socket `i` of `who`, subscribed as `shape` says.
async fn subscriber(addr: String, who: &str, shape: Shape, i: usize) -> anyhow::Result<Socket> {
    let filter = match shape {
        Shape::SameTable => None,
        Shape::OwnKey => Some(format!("k=eq.{i}")),
    };
    if who == "phoenix" {
        let mut binding = json!({"event": "INSERT", "schema": "public", "table": TABLE});
        if let Some(f) = &filter {
            binding["filter"] = json!(f);
        }
        phoenix_join(&addr, format!("realtime:s{i}"), json!({"postgres_changes": [binding]}), true).await
    } else {
        let mut sub = json!({"table": TABLE, "events": "insert"});
        if let Some(f) = &filter {
            sub["filter"] = json!(f);
        }
        socketio(&addr, Some(sub)).await
    }
}

/// One side of a comparison.
struct Side {
    fixed: Step,
    steps: Vec<Step>,
    best: Option<Step>,
}

impl Side {
    fn json(&self) -> Value {
        json!({"fixed": self.fixed.json(), "steps": self.steps.iter().map(Step::json).collect::<Vec<_>>(),
               "max_rate": self.best.map(|b| b.rate)})
    }
}

/// The deliveries of `shape` through `who`: its fixed rate, then the rate search.
#[allow(clippy::too_many_arguments)]
async fn measure(
    o: &SocketIoOptions,
    (addr, pool, statement): (&str, &sqlx::PgPool, &'static str),
    who: &'static str,
    shape: Shape,
    rate: u64,
    start: Instant,
    seq: &mut i64,
) -> anyhow::Result<Side> {
    eprintln!("socketio: {} {who} sockets, {shape:?}…", o.clients);
    let sockets = connect_all(o.clients, |i| subscriber(addr.to_owned(), who, shape, i)).await?;
    let (receivers, tasks) = readers(sockets, start);
    // Own keys: a row for every key at once (a row at a time would take as many rounds as there
    // are sockets).
    let warm_up = match shape {
        Shape::SameTable => (statement.to_owned(), 1),
        Shape::OwnKey => (
            format!(
                "INSERT INTO {TABLE} (id, k, body) SELECT g, g % {n}, $2 FROM generate_series($1::int8, $1::int8 + {n} - 1) g",
                n = o.clients
            ),
            o.clients as i64,
        ),
    };
    until_all_deliver(pool, (&warm_up.0, warm_up.1), &receivers, start, seq).await?;
    let fanout = match shape {
        Shape::SameTable => o.clients as u64,
        Shape::OwnKey => 1,
    };
    let mut source = Source::Db(pool.clone(), statement, None);
    let fixed = step(&mut source, &receivers, start, rate, o.seconds, fanout, seq).await?;
    fixed.print(who);
    let run = async |rate| {
        let s = step(&mut source, &receivers, start, rate, o.step_seconds, fanout, seq).await?;
        s.print(who);
        Ok(s)
    };
    let rates = match shape {
        Shape::SameTable => &o.steps,
        Shape::OwnKey => &o.own_steps,
    };
    let (steps, best) = search_rates(rates, o.step_tries, o.p99_bound_ms, run, |s| s.lost() > 0).await?;
    for t in tasks {
        t.abort();
    }
    Ok(Side { fixed, steps, best })
}

/// The gateway's RSS growth per idle socket of `who` (each with one subscription).
async fn idle_bytes(
    gw: &BenchGateway,
    o: &SocketIoOptions,
    who: &'static str,
) -> anyhow::Result<Option<f64>> {
    let Some((_, before, _)) = gw.usage() else { return Ok(None) };
    let addr = gw.addr().to_owned();
    let sockets = connect_all(o.idle, |i| subscriber(addr.clone(), who, Shape::OwnKey, i)).await?;
    let after = gw.usage().map(|u| u.1).unwrap_or(before);
    drop(sockets);
    Ok(Some(after.saturating_sub(before) as f64 / o.idle as f64))
}

pub async fn run(opts: &BenchOptions, o: &SocketIoOptions) -> anyhow::Result<Value> {
    ensure_open_files(o.clients.max(o.idle) + 20)?;
    let start = Instant::now();
    let env = database(opts, "socketio").await?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&env.url).await?;
    let gw = BenchGateway::start(o.gateway_url.as_deref(), &o.gateway_bin, &env.url, &env.slot, 4096).await?;
    let addr = gw.addr().to_owned();
    // Each row's key is its sequence number modulo the sockets: own-key rows reach one socket.
    let own_key: &'static str = Box::leak(
        format!("INSERT INTO {TABLE} (id, k, body) VALUES ($1, $1 % {}, $2)", o.clients).into_boxed_str(),
    );
    let same_table = "INSERT INTO walcast_bench_items (id, k, body) VALUES ($1, -1, $2)";
    eprintln!("socketio: {} idle sockets per side…", o.idle);
    // First, on a gateway that has held no other sockets; Phoenix's first: memory freed by the
    // larger sockets would be reused by the smaller.
    let idle_phoenix = idle_bytes(&gw, o, "phoenix").await?;
    let idle_socketio = idle_bytes(&gw, o, "socketio").await?;
    let kib =
        |b: Option<f64>| b.map(|b| format!("{:.1} KiB", b / 1024.0)).unwrap_or_else(|| "unknown".into());
    println!(
        "idle, one subscription each: socketio {} per socket, phoenix {} per socket ({} sockets)",
        kib(idle_socketio),
        kib(idle_phoenix),
        o.idle
    );
    let mut seq = 0i64;
    print_header();
    let mut results = Vec::new();
    for (shape, statement, rate) in
        [(Shape::SameTable, same_table, o.rate), (Shape::OwnKey, own_key, o.own_rate)]
    {
        let phoenix = measure(o, (&addr, &pool, statement), "phoenix", shape, rate, start, &mut seq).await?;
        let socketio =
            measure(o, (&addr, &pool, statement), "socketio", shape, rate, start, &mut seq).await?;
        let ratio = socketio.best.zip(phoenix.best).map(|(s, p)| s.rate as f64 / p.rate as f64);
        println!(
            "{shape:?} at {rate} changes/s to {} sockets: socketio p99 {:.2} ms ({} lost), phoenix p99 {:.2} ms ({} lost); \
             highest rate within p99 {} ms: socketio {:?}, phoenix {:?} (socketio / phoenix {})",
            o.clients,
            socketio.fixed.p99,
            socketio.fixed.lost(),
            phoenix.fixed.p99,
            phoenix.fixed.lost(),
            o.p99_bound_ms,
            socketio.best.map(|s| s.rate),
            phoenix.best.map(|s| s.rate),
            ratio.map(|r| format!("{r:.2}")).unwrap_or_else(|| "?".into())
        );
        results.push(json!({"shape": format!("{shape:?}"), "rate": rate, "phoenix": phoenix.json(),
                            "socketio": socketio.json(), "socketio_over_phoenix": ratio}));
    }
    pool.close().await;
    gw.stop().await;
    teardown(env).await;
    let v = json!({
        "scenario": "socketio", "clients": o.clients, "seconds": o.seconds, "fanout": results,
        "idle": {"sockets": o.idle, "socketio_bytes_per_socket": idle_socketio, "phoenix_bytes_per_socket": idle_phoenix},
    });
    super::write_json(opts, &v)?;
    Ok(v)
}
