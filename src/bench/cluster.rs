//! `cluster`: the cost of running as a cluster over NATS JetStream, against a single gateway in
//! the same run on the same rows. Ingest: the rate at which a node that reads the stream (not
//! the slot owner) takes in a backlog, against a single gateway reading the slot. Latency:
//! commit to receipt at a steady rate, through a cluster node that is not the owner, against a
//! single gateway. Failover: the slot owner killed (SIGKILL) repeatedly under a steady writer;
//! the time until a change committed after the kill reaches a client of the surviving node, and
//! that client's ledger (lost, repeated). Fan-out: the same event-stream clients spread over
//! one, two and three nodes; CPU per delivery over all nodes.
//! Must not: assert timings; it reports them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::bench::gateway::{apikey, http_get, BENCH_SECRET};
use crate::bench::BenchOptions;
use crate::local_nats::LocalNats;
use crate::local_postgres::{LocalPostgres, LocalPostgresOptions};

const TABLE: &str = "walcast_bench_cluster";
const LEASE_SECS: &str = "2";

/// Microseconds since the Unix epoch.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A gateway process: a single one, or a node of the cluster on `nats`.
struct Node {
    child: Option<Child>,
    addr: String,
    log_dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Node {
    async fn start(bin: &Path, url: &str, slot: &str, nats: Option<(&str, &str)>) -> anyhow::Result<Node> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let name = nats.map_or("single", |(_, n)| n);
        let log_dir =
            std::env::temp_dir().join(format!("walcast-bench-cluster-{}-{slot}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&log_dir);
        let mut env = vec![
            ("WALCAST_DATABASE_URL".to_owned(), url.to_owned()),
            ("WALCAST_LISTEN".into(), format!("127.0.0.1:{port}")),
            ("WALCAST_SLOT".into(), slot.to_owned()),
            ("WALCAST_PUBLICATION".into(), TABLE.into()),
            ("WALCAST_TABLES".into(), format!("public.{TABLE}")),
            ("WALCAST_CHANGELOG__DIR".into(), log_dir.display().to_string()),
            ("WALCAST_AUTH__JWT_SECRET".into(), BENCH_SECRET.into()),
            ("WALCAST_CLIENT_QUEUE".into(), "65536".into()),
        ];
        if let Some((nats, name)) = nats {
            env.push(("WALCAST_CLUSTER__NATS_URL".into(), nats.to_owned()));
            env.push(("WALCAST_CLUSTER__NODE_ID".into(), name.to_owned()));
            env.push(("WALCAST_CLUSTER__LEASE_SECS".into(), LEASE_SECS.into()));
            // One cluster per slot: its own stream and buckets.
            env.push(("WALCAST_CLUSTER__PREFIX".into(), slot.to_owned()));
        }
        let mut node = Node { child: None, addr: format!("127.0.0.1:{port}"), log_dir, env };
        node.launch(bin).await?;
        Ok(node)
    }

    /// Starts the process; returns once it is ready.
    async fn launch(&mut self, bin: &Path) -> anyhow::Result<()> {
        self.spawn(bin)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http_get(&self.addr, "/readyz").await.is_ok_and(|b| b.contains("\"ready\":true")) {
            anyhow::ensure!(Instant::now() < deadline, "node {} not ready within 60 s", self.addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Starts the process and returns at once (a backlog keeps it from being ready).
    fn spawn(&mut self, bin: &Path) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// A counter or gauge from `/metrics`.
    async fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(&self.addr, "/metrics").await.ok()?;
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The slot owner's name, as this node sees it.
    async fn owner(&self) -> Option<String> {
        let body = http_get(&self.addr, "/v1/cluster").await.ok()?;
        let json: serde_json::Value = serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()?;
        json["owner"].as_str().map(str::to_owned)
    }

    fn name(&self) -> &str {
        self.env.iter().find(|(k, _)| k == "WALCAST_CLUSTER__NODE_ID").map_or("single", |(_, v)| v)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.log_dir);
    }
}

/// What one run needs: the database, the binary, NATS.
struct Setup {
    url: String,
    bin: PathBuf,
    nats: LocalNats,
    pool: sqlx::PgPool,
}

pub async fn run(
    opts: &BenchOptions,
    bin: &Path,
    rows: u64,
    kills: u32,
) -> anyhow::Result<serde_json::Value> {
    let root = std::env::temp_dir().join(format!("walcast-bench-cluster-{}", std::process::id()));
    let pg = match &opts.database_url {
        Some(_) => None,
        None => Some(LocalPostgres::start(LocalPostgresOptions::throwaway(root.join("pg"))).await?),
    };
    let url =
        opts.database_url.clone().or_else(|| pg.as_ref().map(|c| c.url("postgres"))).unwrap_or_default();
    let nats = LocalNats::start(root.join("nats")).await?;
    let pool = crate::connect_pool(&url).await?;
    sqlx::raw_sql(crate::local_postgres::API_ROLES_SQL).execute(&pool).await?;
    for stmt in [
        format!("DROP PUBLICATION IF EXISTS {TABLE}"),
        format!("DROP TABLE IF EXISTS {TABLE}"),
        format!(
            "CREATE TABLE {TABLE} (id bigint PRIMARY KEY, body text NOT NULL, \
             at_us bigint NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1e6)::bigint)"
        ),
        format!("GRANT SELECT ON {TABLE} TO anon, authenticated, service_role"),
    ] {
        sqlx::query(&stmt).execute(&pool).await?;
    }
    let setup = Setup { url, bin: bin.to_owned(), nats, pool };
    let ingest = ingest(&setup, rows).await?;
    let latency = latency(&setup).await?;
    let failover = failover(&setup, kills).await?;
    let mut spread = Vec::new();
    for nodes in 1..=3 {
        spread.push(fanout(&setup, nodes, 300).await?);
    }
    let result = serde_json::json!({"scenario": "cluster", "ingest": ingest, "latency": latency,
        "failover": failover, "fanout": spread});
    println!("{}", serde_json::to_string_pretty(&result)?);
    crate::bench::write_json(opts, &result)?;
    let mut setup = setup;
    setup.nats.stop().await;
    if let Some(pg) = pg {
        pg.stop().await;
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(result)
}

/// Drops a bench slot, if any.
async fn drop_slot(pool: &sqlx::PgPool, slot: &str) {
    let _ = sqlx::query("SELECT pg_drop_replication_slot($1)").bind(slot).execute(pool).await;
}

/// Rows `from..from+n` in transactions of 1,000.
async fn insert(pool: &sqlx::PgPool, from: u64, n: u64) -> anyhow::Result<()> {
    let mut at = from;
    while at < from + n {
        let end = (at + 1000).min(from + n);
        sqlx::query(&format!(
            "INSERT INTO {TABLE} (id, body) SELECT g, 'row ' || g || ' of the cluster bench' FROM generate_series({at}, {}) g",
            end - 1
        ))
        .execute(pool)
        .await?;
        at = end;
    }
    Ok(())
}

/// Changes per second `nodes` take in from a backlog of `n`: from the first change any of them
/// has to the moment all have all of it, by their `walcast_changes_received_total`, polled every
/// 5 ms.
async fn intake(nodes: &[&Node], n: u64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    loop {
        let mut counts = Vec::with_capacity(nodes.len());
        for node in nodes {
            counts.push(node.metric("walcast_changes_received_total").await.unwrap_or(0.0));
        }
        if first.is_none() && counts.iter().any(|c| *c >= 1.0) {
            first = Some(Instant::now());
        }
        if counts.iter().all(|c| *c >= n as f64) {
            let t0 = first.unwrap_or_else(Instant::now);
            return Ok(n as f64 / t0.elapsed().as_secs_f64().max(1e-9));
        }
        anyhow::ensure!(Instant::now() < deadline, "{counts:?} of {n} changes within 10 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A backlog of `rows` read by a single gateway, and by a cluster node that is not the owner.
async fn ingest(s: &Setup, rows: u64) -> anyhow::Result<serde_json::Value> {
    let single_slot = format!("walcast_bench_cl_single_{}", std::process::id());
    let cluster_slot = format!("walcast_bench_cl_nodes_{}", std::process::id());
    let nats = s.nats.url();
    // Slots made first (each gateway's first start), then stopped while the backlog is written.
    let mut single = Node::start(&s.bin, &s.url, &single_slot, None).await?;
    let mut a = Node::start(&s.bin, &s.url, &cluster_slot, Some((&nats, "ingest-a"))).await?;
    let mut b = Node::start(&s.bin, &s.url, &cluster_slot, Some((&nats, "ingest-b"))).await?;
    for n in [&mut single, &mut a, &mut b] {
        n.kill().await;
    }
    eprintln!("cluster: writing a backlog of {rows} rows");
    insert(&s.pool, 0, rows).await?;
    single.spawn(&s.bin)?;
    let single_rate = intake(&[&single], rows).await?;
    single.kill().await;
    // The owner publishes; both nodes read the stream; done when the last has every change.
    a.spawn(&s.bin)?;
    b.spawn(&s.bin)?;
    let cluster_rate = intake(&[&a, &b], rows).await?;
    a.kill().await;
    b.kill().await;
    drop_slot(&s.pool, &single_slot).await;
    drop_slot(&s.pool, &cluster_slot).await;
    sqlx::query(&format!("TRUNCATE {TABLE}")).execute(&s.pool).await?;
    eprintln!("cluster ingest: single {single_rate:.0}/s, through the stream {cluster_rate:.0}/s");
    Ok(serde_json::json!({
        "rows": rows,
        "single_changes_per_s": single_rate.round(),
        "cluster_reader_changes_per_s": cluster_rate.round(),
        "ratio": (cluster_rate / single_rate * 100.0).round() / 100.0,
    }))
}

/// One delivery as a client saw it: the row's id, its commit-to-receipt time, its cursor.
type Seen = (i64, i64, String);

/// An SSE client of `addr` (from `last_id`, if given): each row it receives, until its stream
/// ends.
fn sse_feed(addr: &str, last_id: Option<String>) -> tokio::sync::mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let url = format!("http://{addr}/v1/tables/public.{TABLE}/changes?apikey={}", apikey());
    tokio::spawn(async move {
        let mut req = reqwest::Client::new().get(&url).header("accept", "text/event-stream");
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let mut resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                eprintln!(
                    "cluster: event stream refused: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                );
                return;
            }
            Err(e) => {
                eprintln!("cluster: event stream: {e}");
                return;
            }
        };
        let mut buf = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else { continue };
                let (Some(id), Some(at), Some(cursor)) =
                    (v["record"]["id"].as_i64(), v["record"]["at_us"].as_i64(), v["cursor"].as_str())
                else {
                    continue;
                };
                if tx.send((id, now_us() - at, cursor.to_owned())).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Commits one row per transaction, ids from `next`, about `rate` a second, until `stop`.
fn writer(
    pool: sqlx::PgPool,
    next: Arc<AtomicI64>,
    rate: u32,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let id = next.load(Ordering::Relaxed);
            let sql = format!("INSERT INTO {TABLE} (id, body) VALUES ({id}, 'steady')");
            if sqlx::query(&sql).execute(&pool).await.is_ok() {
                next.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

/// p50 and p99 in milliseconds of commit-to-receipt times (µs).
fn percentiles(lat: &[i64]) -> anyhow::Result<(f64, f64)> {
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for l in lat {
        h.saturating_record(u64::try_from(*l).unwrap_or(1).max(1));
    }
    Ok((h.value_at_quantile(0.5) as f64 / 1000.0, h.value_at_quantile(0.99) as f64 / 1000.0))
}

/// Commit-to-receipt at 200 changes a second for 10 s, through `addr`.
async fn steady(s: &Setup, addr: &str, first_id: i64) -> anyhow::Result<(f64, f64, usize)> {
    let mut feed = sse_feed(addr, None);
    // The stream is open once the response began: a moment to be sure it is subscribed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (next, stop) = (Arc::new(AtomicI64::new(first_id)), Arc::new(AtomicBool::new(false)));
    let w = writer(s.pool.clone(), Arc::clone(&next), 200, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    w.await?;
    let want = (next.load(Ordering::Relaxed) - first_id) as usize;
    let mut lat = Vec::with_capacity(want);
    while lat.len() < want {
        match tokio::time::timeout(Duration::from_secs(20), feed.recv()).await {
            Ok(Some((_, l, _))) => lat.push(l),
            _ => anyhow::bail!("{} of {want} changes arrived", lat.len()),
        }
    }
    let (p50, p99) = percentiles(&lat)?;
    Ok((p50, p99, want))
}

/// The same steady load through a single gateway and through a cluster node that does not own
/// the slot.
async fn latency(s: &Setup) -> anyhow::Result<serde_json::Value> {
    let slot = format!("walcast_bench_cl_lat_{}", std::process::id());
    let mut single = Node::start(&s.bin, &s.url, &slot, None).await?;
    let (s50, s99, n) = steady(s, &single.addr, 1_000_000_000).await?;
    single.kill().await;
    drop_slot(&s.pool, &slot).await;
    let nats = s.nats.url();
    let mut a = Node::start(&s.bin, &s.url, &slot, Some((&nats, "lat-a"))).await?;
    let mut b = Node::start(&s.bin, &s.url, &slot, Some((&nats, "lat-b"))).await?;
    let owner = wait_owner(&a, None).await?;
    let reader = if owner == "lat-a" { &b } else { &a };
    let (c50, c99, _) = steady(s, &reader.addr, 2_000_000_000).await?;
    a.kill().await;
    b.kill().await;
    drop_slot(&s.pool, &slot).await;
    eprintln!(
        "cluster latency: single p50 {s50:.2} ms p99 {s99:.2} ms; cluster p50 {c50:.2} ms p99 {c99:.2} ms"
    );
    Ok(serde_json::json!({
        "changes": n, "rate_per_s": 200,
        "single_p50_ms": s50, "single_p99_ms": s99,
        "cluster_p50_ms": c50, "cluster_p99_ms": c99,
        "added_p50_ms": ((c50 - s50) * 100.0).round() / 100.0,
    }))
}

/// The owner's name once there is one other than `not`, as `node` sees it.
async fn wait_owner(node: &Node, not: Option<&str>) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(o) = node.owner().await.filter(|o| Some(o.as_str()) != not) {
            return Ok(o);
        }
        anyhow::ensure!(Instant::now() < deadline, "no slot owner within 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The owner of two nodes killed `kills` times under a steady writer; a client always on the
/// node that survives, resuming by cursor when it moves.
async fn failover(s: &Setup, kills: u32) -> anyhow::Result<serde_json::Value> {
    let slot = format!("walcast_bench_cl_fo_{}", std::process::id());
    let nats = s.nats.url();
    let mut nodes = [
        Node::start(&s.bin, &s.url, &slot, Some((&nats, "fo-a"))).await?,
        Node::start(&s.bin, &s.url, &slot, Some((&nats, "fo-b"))).await?,
    ];
    let first_id = 3_000_000_000;
    // The client subscribes (on the node that does not own the slot) before the first write.
    let owner = wait_owner(&nodes[0], None).await?;
    let live = usize::from(nodes[0].name() == owner);
    let mut feed = Some((live, sse_feed(&nodes[live].addr, None)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (next, stop) = (Arc::new(AtomicI64::new(first_id)), Arc::new(AtomicBool::new(false)));
    let w = writer(s.pool.clone(), Arc::clone(&next), 100, Arc::clone(&stop));
    let mut got: Vec<Seen> = Vec::new();
    let mut times = Vec::new();
    for round in 0..kills {
        let owner = wait_owner(&nodes[0], None).await?;
        let (dead, live) = if nodes[0].name() == owner { (0, 1) } else { (1, 0) };
        // The client moves to the survivor with its last cursor, if it is not there.
        if feed.as_ref().is_none_or(|(at, _)| *at != live) {
            let last = got.last().map(|(_, _, c)| c.clone());
            feed = Some((live, sse_feed(&nodes[live].addr, last)));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let Some((_, rx)) = feed.as_mut() else { continue };
        // Flowing before the kill.
        let before = got.len() + 50;
        while got.len() < before {
            got.push(
                tokio::time::timeout(Duration::from_secs(30), rx.recv())
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("stream ended"))?,
            );
        }
        nodes[dead].kill().await;
        let killed_us = now_us();
        let killed = Instant::now();
        loop {
            let seen = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
            let committed_at = now_us() - seen.1;
            got.push(seen);
            if committed_at > killed_us {
                break;
            }
        }
        times.push(killed.elapsed().as_secs_f64());
        eprintln!(
            "cluster failover {round}: {owner} killed; a change committed after it arrived {:.2} s later",
            killed.elapsed().as_secs_f64()
        );
        nodes[dead].launch(&s.bin).await?;
    }
    stop.store(true, Ordering::Relaxed);
    w.await?;
    let want = (next.load(Ordering::Relaxed) - first_id) as usize;
    if let Some((_, rx)) = feed.as_mut() {
        while got.len() < want {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some(seen)) => got.push(seen),
                _ => break,
            }
        }
    }
    let ids: HashSet<i64> = got.iter().map(|(id, _, _)| *id).collect();
    let missing: Vec<i64> = (first_id..first_id + want as i64).filter(|id| !ids.contains(id)).collect();
    let lost = missing.len();
    if lost > 0 {
        eprintln!(
            "cluster failover: {lost} of {want} not received (first missing: {:?}; received {})",
            missing.iter().take(5).map(|id| id - first_id).collect::<Vec<_>>(),
            got.len()
        );
    }
    let repeated = got.len() - ids.len();
    for n in &mut nodes {
        n.kill().await;
    }
    drop_slot(&s.pool, &slot).await;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "kills": kills, "lease_secs": LEASE_SECS.parse::<u32>().unwrap_or(0),
        "seconds_p50": sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        "seconds_max": sorted.last().copied().unwrap_or(0.0),
        "seconds": times, "changes": want, "lost": lost, "repeated": repeated,
    }))
}

/// `clients` event streams spread over `count` nodes, a writer at 100 changes a second for 10 s:
/// CPU per delivery, over all nodes and per node.
async fn fanout(s: &Setup, count: usize, clients: usize) -> anyhow::Result<serde_json::Value> {
    let slot = format!("walcast_bench_cl_fan{count}_{}", std::process::id());
    let nats = s.nats.url();
    let mut nodes = Vec::new();
    for i in 0..count {
        nodes.push(Node::start(&s.bin, &s.url, &slot, Some((&nats, &format!("fan-{i}")))).await?);
    }
    let mut feeds: Vec<_> = (0..clients).map(|i| sse_feed(&nodes[i % count].addr, None)).collect();
    tokio::time::sleep(Duration::from_millis(500 + 2 * clients as u64)).await;
    let pids: Vec<u32> = nodes.iter().filter_map(|n| n.child.as_ref().and_then(Child::id)).collect();
    let before: Vec<f64> = pids.iter().map(|p| crate::bench::gateway::proc_usage(*p).0).collect();
    let first_id = 4_000_000_000 + count as i64 * 100_000_000;
    let (next, stop) = (Arc::new(AtomicI64::new(first_id)), Arc::new(AtomicBool::new(false)));
    let w = writer(s.pool.clone(), Arc::clone(&next), 100, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    w.await?;
    let changes = (next.load(Ordering::Relaxed) - first_id) as usize;
    let mut lat = Vec::with_capacity(changes * clients);
    for feed in &mut feeds {
        for _ in 0..changes {
            match tokio::time::timeout(Duration::from_secs(30), feed.recv()).await {
                Ok(Some((_, l, _))) => lat.push(l),
                _ => anyhow::bail!("a client stopped receiving"),
            }
        }
    }
    let cpu: Vec<f64> =
        pids.iter().zip(&before).map(|(p, b)| crate::bench::gateway::proc_usage(*p).0 - b).collect();
    let deliveries = (changes * clients) as f64;
    let total: f64 = cpu.iter().sum();
    let (p50, p99) = percentiles(&lat)?;
    for n in &mut nodes {
        n.kill().await;
    }
    drop_slot(&s.pool, &slot).await;
    let per_delivery_us = total / deliveries * 1e6;
    eprintln!(
        "cluster fan-out over {count} node(s): {clients} clients, {changes} changes: {per_delivery_us:.2} µs CPU per delivery (all nodes), per node {:?} CPU-s; p50 {p50:.2} ms p99 {p99:.2} ms",
        cpu.iter().map(|c| (c * 100.0).round() / 100.0).collect::<Vec<_>>()
    );
    Ok(serde_json::json!({
        "nodes": count, "clients": clients, "changes": changes,
        "cpu_us_per_delivery": (per_delivery_us * 100.0).round() / 100.0,
        "cpu_seconds_per_node": cpu, "p50_ms": p50, "p99_ms": p99,
    }))
}
