//! Gateways as nodes of one cluster (a real nats-server and Postgres): every node serves every
//! change, a cursor from one node resumes on another, and the slot moves when its owner stops.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cases::sse::{at_least, check_against_ledger, get_json, key_query, Sse, WRITERS};
use crate::support::{exec, fresh_db, pool, wait_for, TestApp};
use walcast::local_nats::LocalNats;

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, v text);
CREATE TABLE ledger (seq bigserial PRIMARY KEY, item bigint NOT NULL);
CREATE TABLE marks (id bigint PRIMARY KEY);
";

/// A private nats-server with JetStream for one test.
pub(super) async fn nats_server(test: &str) -> LocalNats {
    let dir = std::env::temp_dir().join(format!("walcast-nats-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    LocalNats::start(dir).await.expect("starting nats-server (Debian: apt-get install nats-server)")
}

/// Node `name` of the cluster on `nats`, in this process, with its own change log.
async fn node(url: &str, nats: &LocalNats, name: &str) -> TestApp {
    let db = url.rsplit('/').next().unwrap_or("").to_owned();
    let nats_url = nats.url();
    TestApp::spawn_with(url, |c| {
        c.cluster.nats_url = Some(nats_url);
        c.cluster.node_id = Some(name.to_owned());
        c.cluster.lease_secs = 2;
        c.changelog.dir = crate::support::log_dir(&format!("{db}-{name}"));
    })
    .await
}

/// Commits `items` rows (and their `ledger` rows) from `WRITERS` writers until `stop`.
pub(super) fn writers(
    p: &sqlx::PgPool,
    stop: &Arc<AtomicBool>,
    committed: &Arc<AtomicI64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let (p, stop, committed) = (p.clone(), Arc::clone(stop), Arc::clone(committed));
            tokio::spawn(async move {
                let mut id = w;
                while !stop.load(Ordering::Relaxed) {
                    exec(
                        &p,
                        &format!(
                            "INSERT INTO items VALUES ({id}, 'v'); INSERT INTO ledger (item) VALUES ({id})"
                        ),
                    )
                    .await;
                    committed.fetch_add(1, Ordering::Relaxed);
                    id += WRITERS;
                }
            })
        })
        .collect()
}

/// Rows of `marks` (ids 1, 2, 3, …) committed one by one at 100 a second until stopped: the
/// table the official client follows. realtime-js has no cursor, so a client that cannot keep
/// up is dropped and misses what comes meanwhile (as with any Phoenix server); it is given a
/// pace a client keeps on a loaded machine, while `items` takes the writers' full load.
struct Marks {
    last: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Marks {
    fn start(p: &sqlx::PgPool) -> Marks {
        let (last, stop) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, l, s) = (p.clone(), Arc::clone(&last), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(10));
            while !s.load(Ordering::Relaxed) {
                pace.tick().await;
                let id = l.load(Ordering::Relaxed) + 1;
                exec(&p, &format!("INSERT INTO marks VALUES ({id})")).await;
                l.store(id, Ordering::Relaxed);
            }
        });
        Marks { last, stop, task }
    }

    /// The last mark committed.
    fn last(&self) -> i64 {
        self.last.load(Ordering::Relaxed)
    }

    /// Stops; returns the last mark committed.
    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        let last = Arc::clone(&self.last);
        self.task.await.expect("marks");
        last.load(Ordering::Relaxed)
    }
}

/// The official client's subscription to `marks`, on `endpoint`.
async fn official_client(endpoint: &str) -> crate::cases::clients::ClientProcess {
    let bindings = serde_json::json!([{"event": "INSERT", "schema": "public", "table": "marks"}]);
    let mut official = crate::cases::clients::node_client_for(endpoint, "1.0.0", &bindings, usize::MAX, 300);
    official.subscribed().await;
    official
}

/// Reads an official client's marks until `through`: they must follow on one from the next
/// (none missed, none twice, in commit order). Returns the first.
async fn official_marks(who: &str, official: &mut crate::cases::clients::ClientProcess, through: i64) -> i64 {
    let (mut seen, mut other): (Vec<i64>, Vec<String>) = (Vec::new(), Vec::new());
    while seen.last().is_none_or(|l| *l < through) {
        let Some(ev) = official.next_within(Duration::from_secs(40)).await else {
            panic!(
                "{who}: marks {:?}..{:?}, then 40 s of silence; besides changes: {other:?}",
                seen.first(),
                seen.last()
            )
        };
        assert_ne!(ev["kind"], "timeout", "{who}: realtime-js gave up after {} changes", seen.len());
        if ev["kind"] == "change" {
            let id = ev["payload"]["new"]["id"].as_i64().expect("an id");
            if let Some(last) = seen.last() {
                assert_eq!(id, last + 1, "{who}: mark {id} after {last}; besides changes: {other:?}");
            }
            seen.push(id);
        } else {
            other.push(format!("after {}: {ev}", seen.len()));
        }
    }
    seen[0]
}

/// Reads `sse` until it has `want` deliveries in `got`.
async fn read_until(who: &str, sse: &mut Sse, got: &mut Vec<(String, i64)>, want: usize) {
    while got.len() < want {
        let Some((id, event, data)) = sse.next().await else {
            panic!("{who}: {} of {want} received, then 20 s of silence", got.len())
        };
        assert_eq!(event, "insert", "{who}: {data}");
        got.push((id.expect("id"), data["record"]["id"].as_i64().expect("id")));
    }
}

#[tokio::test]
async fn every_node_serves_every_change_and_a_cursor_resumes_on_another_node_across_a_handover() {
    let nats = nats_server("nodes").await;
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let nodes =
        vec![node(&url, &nats, "a").await, node(&url, &nats, "b").await, node(&url, &nats, "c").await];
    let bases: Vec<String> = nodes.iter().map(|n| format!("http://{}", n.addr)).collect();
    let mut clients = Vec::new();
    for base in &bases {
        clients.push((Sse::open(base, &key_query(), None).await.expect("subscribe"), Vec::new()));
    }

    // The cluster as each node reports it: one owner, three nodes alive.
    let owner = wait_for("an owner, and three nodes alive", Duration::from_secs(30), || async {
        let (_, v) = get_json(&format!("{}/v1/cluster", bases[1])).await;
        let alive = v["nodes"].as_array().map(Vec::len) == Some(3);
        v["owner"].as_str().filter(|_| alive).map(str::to_owned)
    })
    .await;
    let owner_at = ["a", "b", "c"].iter().position(|n| *n == owner).expect("a node's name");
    // The official client, on a node that is not the owner, through the handover.
    let mut official = official_client(&format!("ws://{}/realtime/v1", nodes[(owner_at + 1) % 3].addr)).await;

    let (stop, committed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicI64::new(0)));
    let writing = writers(&p, &stop, &committed);
    let marks = Marks::start(&p);
    for (i, (sse, got)) in clients.iter_mut().enumerate() {
        read_until(&format!("client of node {i}"), sse, got, 200).await;
    }
    let metrics = crate::support::http_get(&format!("{}/metrics", bases[owner_at])).await.expect("metrics");
    assert!(metrics.contains("walcast_cluster_slot_owner 1"), "{metrics}");
    let other =
        crate::support::http_get(&format!("{}/metrics", bases[(owner_at + 1) % 3])).await.expect("metrics");
    assert!(other.contains("walcast_cluster_slot_owner 0"), "{other}");

    // The owner stops mid-stream: it releases the lease and another node takes the slot; its
    // client goes on at the next node from its last cursor.
    let mut nodes: Vec<Option<TestApp>> = nodes.into_iter().map(Some).collect();
    nodes[owner_at].take().expect("owner").stop().await;
    let (_, mut moved) = clients.remove(owner_at);
    let next = (owner_at + 1) % 3;
    let last = moved.last().map(|(c, _)| c.clone());
    let mut resumed = Sse::open(&bases[next], &key_query(), last.as_deref()).await.expect("resume elsewhere");
    let down_at = committed.load(Ordering::Relaxed);
    wait_for("writes after the stop", Duration::from_secs(60), at_least(&committed, down_at + 300)).await;
    let last_mark = marks.stop().await;
    stop.store(true, Ordering::Relaxed);
    for w in writing {
        w.await.expect("writer");
    }
    let ledger: Vec<i64> =
        sqlx::query_scalar("SELECT item FROM ledger ORDER BY seq").fetch_all(&p).await.expect("ledger");
    read_until("the owner's client, moved", &mut resumed, &mut moved, ledger.len()).await;
    check_against_ledger("the owner's client, moved", &moved, &ledger);
    for (i, (sse, got)) in clients.iter_mut().enumerate() {
        let who = format!("client {i} of a surviving node");
        read_until(&who, sse, got, ledger.len()).await;
        check_against_ledger(&who, got, &ledger);
    }
    assert_eq!(official_marks("realtime-js on a surviving node", &mut official, last_mark).await, 1);
    // The stream counted every change across the handover (an item and a ledger row per write,
    // and the marks), and each node has read them all.
    let changes = 2 * ledger.len() as u64 + last_mark as u64;
    for base in bases.iter().enumerate().filter(|(i, _)| *i != owner_at).map(|(_, b)| b) {
        let (_, v) = get_json(&format!("{base}/v1/cluster")).await;
        assert_eq!(v["stream"]["changes"], changes, "{v}");
        wait_for("no lag in changes", Duration::from_secs(30), || async {
            let m = crate::support::http_get(&format!("{base}/metrics")).await.ok()?;
            m.contains("walcast_cluster_consumer_lag_changes 0\n").then_some(())
        })
        .await;
    }
    // Every node hands out the same cursor for the same change.
    assert_eq!(clients[0].1, clients[1].1, "surviving nodes: the same cursors");
    assert_eq!(moved, clients[0].1, "the moved client: the same cursors");
    let (_, v) = get_json(&format!("{}/v1/cluster", bases[next])).await;
    assert!(v["owner"].as_str().is_some_and(|o| o != owner), "the slot moved: {v}");
    for n in nodes.into_iter().flatten() {
        n.stop().await;
    }
}

/// A node in a child process (so that it can be killed with SIGKILL, or stopped with SIGSTOP),
/// on `port`, with its own change log.
struct NodeProcess {
    name: String,
    port: u16,
    log_dir: std::path::PathBuf,
    child: Option<tokio::process::Child>,
    /// The database and slot it serves, for what a stalled test prints.
    db: (String, String),
}

impl NodeProcess {
    async fn start(url: &str, slot: &str, nats: &str, name: &str) -> NodeProcess {
        let db = crate::support::db_name(url);
        let port = crate::support::free_port();
        let log_dir = crate::support::log_dir(&format!("{db}-proc-{name}"));
        let db = (url.to_owned(), slot.to_owned());
        let mut node = NodeProcess { name: name.to_owned(), port, log_dir, child: None, db };
        node.launch(url, slot, nats).await;
        node
    }

    async fn launch(&mut self, url: &str, slot: &str, nats: &str) {
        let env = [
            ("WALCAST_CLUSTER__NATS_URL", nats.to_owned()),
            ("WALCAST_CLUSTER__NODE_ID", self.name.clone()),
            ("WALCAST_CLUSTER__LEASE_SECS", "2".to_owned()),
        ];
        let log = std::env::var("NODE_LOG").unwrap_or_else(|_| "walcast=info".into());
        let child =
            crate::support::GatewayProcess { url, slot, port: self.port, log_dir: &self.log_dir, env: &env }
                .start(self.log_file(), &log, &self.name)
                .await;
        self.child = Some(child);
    }

    /// Where its log goes (appended across restarts), for a failing test's reader.
    fn log_path(&self) -> std::path::PathBuf {
        self.log_dir.with_extension("log")
    }

    fn log_file(&self) -> std::fs::File {
        let _ = std::fs::create_dir_all(self.log_dir.parent().expect("a parent"));
        std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("node log file")
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running") as i32
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL");
            let _ = child.wait().await;
        }
    }
}

/// Each node's view of the cluster and the end of its log: what a stalled test prints.
async fn describe(nodes: &[NodeProcess]) -> String {
    let mut out = String::new();
    if let Some(n) = nodes.first() {
        let slot = async {
            let p = sqlx::PgPool::connect(&n.db.0).await.ok()?;
            let row: Option<(Option<i32>, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT s.active_pid, s.confirmed_flush_lsn::text, \
                 (SELECT string_agg(state || ' sent ' || sent_lsn || ' flush ' || coalesce(flush_lsn::text, '-'), '; ') \
                  FROM pg_stat_replication r WHERE r.pid = s.active_pid) \
                 FROM pg_replication_slots s WHERE slot_name = $1",
            )
            .bind(&n.db.1)
            .fetch_optional(&p)
            .await
            .ok()?;
            let wal: Option<String> =
                sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&p).await.ok();
            Some(format!("slot {row:?}, WAL at {wal:?}"))
        };
        let slot = tokio::time::timeout(Duration::from_secs(5), slot).await.ok().flatten();
        out.push_str(&format!("--- {}\n", slot.as_deref().unwrap_or("(slot unknown)")));
    }
    for n in nodes {
        let view = async { reqwest::get(format!("{}/v1/cluster", n.base())).await.ok()?.text().await.ok() };
        let view = tokio::time::timeout(Duration::from_secs(5), view).await.ok().flatten();
        let metrics = async { reqwest::get(format!("{}/metrics", n.base())).await.ok()?.text().await.ok() };
        let metrics = tokio::time::timeout(Duration::from_secs(5), metrics).await.ok().flatten();
        let metrics: Vec<&str> = metrics
            .as_deref()
            .unwrap_or("")
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.contains("_cluster_") || l.contains("_replication_") || l.contains("changes_"))
            })
            .collect();
        let log = std::fs::read_to_string(n.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        out.push_str(&format!(
            "--- node {} ({}): /v1/cluster {}\n{}\n{tail}\n",
            n.name,
            n.log_path().display(),
            view.as_deref().unwrap_or("(no answer)"),
            metrics.join(", ")
        ));
    }
    out
}

/// The owner's name as `base` reports it, once there is one other than `not`.
async fn owner_other_than(base: &str, not: Option<&str>) -> String {
    wait_for("a slot owner", Duration::from_secs(60), || async {
        let (_, v) = get_json(&format!("{base}/v1/cluster")).await;
        v["owner"].as_str().filter(|o| Some(*o) != not).map(str::to_owned)
    })
    .await
}

/// An SSE client of one node that moves to another node with its last cursor when its node's
/// stream ends, as a client behind a load balancer does.
struct Roaming {
    sse: Sse,
    at: usize,
    got: Vec<(String, i64)>,
    moves: u32,
}

impl Roaming {
    async fn open(nodes: &[NodeProcess], at: usize) -> Roaming {
        let sse = Sse::open(&nodes[at].base(), &key_query(), None).await.expect("subscribe");
        Roaming { sse, at, got: Vec::new(), moves: 0 }
    }

    /// Reads until `want` deliveries; when the stream ends, reconnects to the next node that
    /// answers, with the last cursor.
    async fn read_until(&mut self, nodes: &[NodeProcess], want: usize) {
        if let Err(stall) = self.read_while(nodes, |got| got.len() < want).await {
            panic!("{stall}");
        }
    }

    /// Reads until row `id` has arrived.
    async fn read_through(&mut self, nodes: &[NodeProcess], id: i64) {
        if let Err(stall) = self.read_while(nodes, |got| got.last().is_none_or(|(_, last)| *last != id)).await
        {
            panic!("{stall}");
        }
    }

    /// Reads while `more`; `Err` with what the nodes say after a minute with nothing new.
    async fn read_while(
        &mut self,
        nodes: &[NodeProcess],
        more: impl Fn(&[(String, i64)]) -> bool,
    ) -> Result<(), String> {
        // Progress, not speed: it fails only after a minute with nothing new.
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while more(&self.got) {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{} received (last {:?}), then nothing for 60 s at node {}\n{}",
                    self.got.len(),
                    self.got.last(),
                    nodes[self.at].name,
                    describe(nodes).await
                ));
            }
            let next = tokio::time::timeout_at(deadline, self.sse.next());
            let Ok(next) = next.await else { continue };
            match next {
                Some((id, event, data)) => {
                    deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    assert_eq!(event, "insert", "{data}");
                    self.got.push((id.expect("id"), data["record"]["id"].as_i64().expect("id")));
                }
                None => {
                    // As `EventSource` does: the last id the stream carried (its opening one
                    // before any change).
                    let last = self.sse.last_id().map(str::to_owned);
                    let mut refused = Vec::new();
                    for step in 1..=nodes.len() {
                        let at = (self.at + step) % nodes.len();
                        match Sse::open(&nodes[at].base(), &key_query(), last.as_deref()).await {
                            Ok(sse) => {
                                eprintln!(
                                    "roaming client: node {} -> {} after {} (refused: {refused:?})",
                                    nodes[self.at].name,
                                    nodes[at].name,
                                    self.got.len()
                                );
                                (self.sse, self.at) = (sse, at);
                                self.moves += 1;
                                refused.clear();
                                break;
                            }
                            Err((status, _)) => refused.push((nodes[at].name.clone(), status)),
                        }
                    }
                    if !refused.is_empty() {
                        // No node answered: wait as an `EventSource` does before it tries again.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        Ok(())
    }
}

#[tokio::test]
async fn owners_killed_mid_stream_and_partitioned_lose_nothing_and_repeat_nothing() {
    let nats = nats_server("failover").await;
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let slot = format!("slot_{db}").to_ascii_lowercase();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(NodeProcess::start(&url, &slot, &nats.url(), name).await);
    }
    let mut clients = Vec::new();
    for at in 0..nodes.len() {
        clients.push(Roaming::open(&nodes, at).await);
    }
    let (stop, committed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicI64::new(0)));
    let writing = writers(&p, &stop, &committed);
    let marks = Marks::start(&p);
    let (mut failovers, mut markers) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let before = owner_other_than(&nodes[0].base(), None).await;
        let at = nodes.iter().position(|n| n.name == before).expect("owner is a node");
        if round == 1 {
            // A large transaction, committed just before the kill: the owner is mid-publish.
            exec(&p, "INSERT INTO items SELECT -g, 'big' FROM generate_series(1, 20000) g").await;
        }
        let survivor = (at + 1) % nodes.len();
        // The official client on the surviving node, through the kill.
        let mut official =
            official_client(&format!("ws://127.0.0.1:{}/realtime/v1", nodes[survivor].port)).await;
        let want = clients[survivor].got.len() + 50;
        clients[survivor].read_until(&nodes, want).await;
        nodes[at].kill().await;
        // A marker committed after the kill: the time until a survivor's client has it is the
        // failover as a client sees it.
        let killed = std::time::Instant::now();
        let marker = -(1_000_000 + round);
        exec(&p, &format!("INSERT INTO items VALUES ({marker}, 'marker')")).await;
        markers.push(marker);
        let next = owner_other_than(&nodes[survivor].base(), Some(&before)).await;
        clients[survivor].read_through(&nodes, marker).await;
        failovers.push(killed.elapsed());
        // Every mark from its first through one committed after the kill: no gap, no repeat,
        // no resync.
        let after_kill = marks.last() + 1;
        wait_for("a mark after the kill", Duration::from_secs(60), || async {
            (marks.last() >= after_kill).then_some(())
        })
        .await;
        let who = format!("round {round}: realtime-js on node {}", nodes[survivor].name);
        official_marks(&who, &mut official, after_kill).await;
        eprintln!("failover {round}: {before} killed, {next} took the slot; a change committed after the kill arrived after {:?}", killed.elapsed());
        nodes[at].launch(&url, &slot, &nats.url()).await;
    }

    // A partitioned owner (stopped, then resumed after the lease moved) is fenced.
    let before = owner_other_than(&nodes[0].base(), None).await;
    let at = nodes.iter().position(|n| n.name == before).expect("owner is a node");
    nodes[at].signal("-STOP");
    let survivor = (at + 1) % nodes.len();
    let next = owner_other_than(&nodes[survivor].base(), Some(&before)).await;
    let mark = committed.load(Ordering::Relaxed);
    wait_for("writes under the new owner", Duration::from_secs(60), at_least(&committed, mark + 200)).await;
    nodes[at].signal("-CONT");
    wait_for("the old owner steps down", Duration::from_secs(30), || async {
        let (_, v) = get_json(&format!("{}/v1/cluster", nodes[at].base())).await;
        (v["this_node_owns_the_slot"] == false && v["owner"] == next.as_str()).then_some(())
    })
    .await;
    let mark = committed.load(Ordering::Relaxed);
    wait_for("writes after the partition healed", Duration::from_secs(60), at_least(&committed, mark + 100))
        .await;

    marks.stop().await;
    stop.store(true, Ordering::Relaxed);
    for w in writing {
        w.await.expect("writer");
    }
    let mut ledger: Vec<i64> =
        sqlx::query_scalar("SELECT item FROM ledger ORDER BY seq").fetch_all(&p).await.expect("ledger");
    ledger.extend((1..=20000).map(|g| -g));
    ledger.extend(markers);
    for (i, c) in clients.iter_mut().enumerate() {
        let read = c.read_while(&nodes, |got| got.len() < ledger.len()).await;
        let who = format!("client {i} ({} moves)", c.moves);
        if let Err(stall) = read {
            eprintln!("{who}: {stall}");
        }
        check_against_ledger(&who, &c.got, &ledger);
    }
    assert_eq!(clients[0].got, clients[1].got, "the same cursors everywhere");
    assert_eq!(clients[1].got, clients[2].got, "the same cursors everywhere");
    eprintln!("failovers (kill to a change delivered on a survivor): {failovers:?}");
    for n in &mut nodes {
        n.kill().await;
    }
}

#[tokio::test]
async fn with_nats_away_nodes_keep_their_clients_stop_confirming_and_catch_up_when_it_returns() {
    let mut nats = nats_server("away").await;
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let nodes = [node(&url, &nats, "a").await, node(&url, &nats, "b").await];
    let bases: Vec<String> = nodes.iter().map(|n| format!("http://{}", n.addr)).collect();
    let mut clients = Vec::new();
    for base in &bases {
        clients.push((Sse::open(base, &key_query(), None).await.expect("subscribe"), Vec::new()));
    }
    let mut official = official_client(&format!("ws://{}/realtime/v1", nodes[1].addr)).await;
    let (stop, committed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicI64::new(0)));
    let writing = writers(&p, &stop, &committed);
    let marks = Marks::start(&p);
    for (i, (sse, got)) in clients.iter_mut().enumerate() {
        read_until(&format!("client of node {i}"), sse, got, 100).await;
    }

    nats.stop().await;
    for base in &bases {
        wait_for("not ready while NATS is away", Duration::from_secs(30), || async {
            let (status, body) = get_json(&format!("{base}/readyz")).await;
            (status == 503).then_some(body)
        })
        .await;
    }
    let slot = &nodes[0].slot;
    let confirmed = || async {
        let lsn: Option<String> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .fetch_one(&p)
        .await
        .expect("slot");
        let lsn = lsn.expect("a confirmed position");
        let (hi, lo) = lsn.split_once('/').expect("an LSN");
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    let mark = committed.load(Ordering::Relaxed);
    wait_for("writes while NATS is away", Duration::from_secs(60), at_least(&committed, mark + 300)).await;
    let held = confirmed().await;
    let wal: String =
        sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&p).await.expect("wal");
    // Written while NATS was away: not confirmed, so the slot keeps it.
    let mark = committed.load(Ordering::Relaxed);
    wait_for("more writes while NATS is away", Duration::from_secs(60), at_least(&committed, mark + 100))
        .await;
    assert_eq!(confirmed().await, held, "the slot was confirmed while NATS was away (WAL at {wal})");

    nats.restart().await.expect("nats-server again");
    for n in &nodes {
        n.wait_ready().await;
    }
    let mark = committed.load(Ordering::Relaxed);
    wait_for("writes after NATS returned", Duration::from_secs(60), at_least(&committed, mark + 200)).await;
    let last_mark = marks.stop().await;
    stop.store(true, Ordering::Relaxed);
    for w in writing {
        w.await.expect("writer");
    }
    let ledger: Vec<i64> =
        sqlx::query_scalar("SELECT item FROM ledger ORDER BY seq").fetch_all(&p).await.expect("ledger");
    for (i, (sse, got)) in clients.iter_mut().enumerate() {
        let who = format!("client of node {i}, connected throughout");
        read_until(&who, sse, got, ledger.len()).await;
        check_against_ledger(&who, got, &ledger);
    }
    assert_eq!(official_marks("realtime-js, connected throughout", &mut official, last_mark).await, 1);
    wait_for("the slot confirmed past the outage", Duration::from_secs(60), || async {
        (confirmed().await > held).then_some(())
    })
    .await;
    for n in nodes {
        n.stop().await;
    }
}

/// A Phoenix (2.0.0) client of `node` in `realtime:room` with presence key `key`, past its
/// `presence_state`, which is returned.
async fn member(node: &NodeProcess, key: &str) -> (crate::support::Ws, serde_json::Value) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", node.port).parse().expect("addr");
    let mut ws = crate::support::Ws::connect(addr, "/realtime/v1/websocket", Some("2.0.0")).await;
    let config = serde_json::json!({"broadcast": {"self": false}, "presence": {"key": key, "enabled": true}});
    let reply = ws.join_config("room", config).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let state = ws.recv_until("presence_state", |f| f[3] == "presence_state").await;
    (ws, state[4].clone())
}

/// The next broadcast `ws` receives (a 2.0.0 client gets them as binary frames): (event,
/// payload).
async fn next_broadcast(ws: &mut crate::support::Ws) -> (String, serde_json::Value) {
    let f = ws.recv_until("a broadcast", |f| f["binary"]["event"].is_string()).await;
    (f["binary"]["event"].as_str().unwrap_or("").to_owned(), f["binary"]["payload"].clone())
}

#[tokio::test]
async fn broadcasts_and_presence_reach_members_on_every_node_and_a_dead_nodes_presences_leave() {
    use serde_json::json;
    let nats = nats_server("bus").await;
    let url = fresh_db().await;
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let slot = format!("slot_{db}").to_ascii_lowercase();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(NodeProcess::start(&url, &slot, &nats.url(), name).await);
    }
    let (mut alice, _) = member(&nodes[0], "alice").await;
    let (mut bob, _) = member(&nodes[1], "bob").await;
    let (mut carol, _) = member(&nodes[2], "carol").await;

    // Presence: alice tracks on a; bob (b) and carol (c) see her join.
    alice
        .push(
            Some("j1"),
            "realtime:room",
            "presence",
            json!({"type": "presence", "event": "track", "payload": {"n": 1}}),
        )
        .await;
    for ws in [&mut bob, &mut carol] {
        let d = ws
            .recv_until("alice joins", |f| f[3] == "presence_diff" && f[4]["joins"]["alice"].is_object())
            .await;
        assert_eq!(d[4]["joins"]["alice"]["metas"][0]["n"], 1, "{d}");
    }
    bob.push(
        Some("j1"),
        "realtime:room",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"n": 2}}),
    )
    .await;
    alice.recv_until("bob joins", |f| f[3] == "presence_diff" && f[4]["joins"]["bob"].is_object()).await;
    // A member who joins later, on a third node, gets the whole cluster's state.
    let (mut dave, state) = member(&nodes[2], "dave").await;
    assert!(state["alice"].is_object() && state["bob"].is_object(), "{state}");

    // Broadcasts: from a socket on b, REST on c, and the database; each arrives once.
    bob.push(
        Some("j1"),
        "realtime:room",
        "broadcast",
        json!({"type": "broadcast", "event": "hi", "payload": {"from": "bob"}}),
    )
    .await;
    for ws in [&mut alice, &mut carol, &mut dave] {
        assert_eq!(next_broadcast(ws).await, ("hi".into(), json!({"from": "bob"})));
    }
    let rest = |event: &str| {
        json!({"messages": [{"topic": "room", "event": event, "payload": {"via": "rest"}}]}).to_string()
    };
    let c_addr: std::net::SocketAddr = format!("127.0.0.1:{}", nodes[2].port).parse().unwrap();
    let (status, body) =
        crate::support::http_post(c_addr, "/api/broadcast", "application/json", rest("r1").as_bytes()).await;
    assert_eq!(status, 202, "{body}");
    for ws in [&mut alice, &mut bob, &mut carol, &mut dave] {
        assert_eq!(next_broadcast(ws).await, ("r1".into(), json!({"via": "rest"})));
    }
    let p = pool(&url).await;
    exec(&p, "SELECT realtime.send('{\"n\": 3}'::jsonb, 'db', 'room', false)").await;
    for ws in [&mut alice, &mut bob, &mut carol] {
        let (event, payload) = next_broadcast(ws).await;
        assert_eq!(event, "db", "{payload}");
        assert_eq!(payload["n"], 3);
    }
    // A fence after it: the database broadcast came once, not once per node it passed.
    crate::support::http_post(c_addr, "/api/broadcast", "application/json", rest("fence").as_bytes()).await;
    for ws in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(next_broadcast(ws).await.0, "fence", "the database broadcast arrived twice");
    }

    // Node a dies: alice's presence leaves everywhere else, within the lease.
    nodes[0].kill().await;
    for ws in [&mut bob, &mut carol, &mut dave] {
        let d = ws
            .recv_until("alice leaves", |f| f[3] == "presence_diff" && f[4]["leaves"]["alice"].is_object())
            .await;
        assert_eq!(d[4]["leaves"]["alice"]["metas"][0]["n"], 1, "{d}");
    }
    let (_eve, state) = member(&nodes[1], "eve").await;
    assert!(state["alice"].is_null() && state["bob"].is_object(), "{state}");
    for n in &mut nodes {
        n.kill().await;
    }
}

#[tokio::test]
async fn private_channels_are_checked_on_the_node_that_holds_the_member_and_cross_nodes_as_such() {
    use crate::cases::private::{
        events_until, join_private, push_room, reply_to, user, A, B, C, PATH, POLICIES,
    };
    use serde_json::json;
    let nats = nats_server("private").await;
    let url = fresh_db().await;
    let p = pool(&url).await;
    let one = node(&url, &nats, "one").await;
    let two = node(&url, &nats, "two").await;
    exec(&p, crate::support::AUTH_UID).await;
    exec(&p, POLICIES).await;
    exec(
        &p,
        &format!(
            "INSERT INTO room_members VALUES ('room', '{A}', true, true), ('room', '{C}', false, false)"
        ),
    )
    .await;
    let connect = |addr, key: String| async move {
        crate::support::Ws::connect_with(addr, PATH, None, Some(&key)).await.expect("connect")
    };
    let mut a = connect(one.addr, user(A)).await;
    let mut b = connect(two.addr, user(B)).await;
    let mut c = connect(two.addr, user(C)).await;
    assert_eq!(join_private(&mut a, json!({})).await["status"], "ok");
    let refused = join_private(&mut b, json!({})).await;
    assert_eq!(refused["status"], "error", "B is no member, on any node: {refused}");
    assert_eq!(join_private(&mut c, json!({})).await["status"], "ok");
    // B listens on the public channel of the same name, on C's node.
    assert_eq!(b.join_config("room", json!({})).await["status"], "ok");

    // A writes on node one; C reads on node two; B's public channel hears nothing of it.
    push_room(&mut a, "broadcast", json!({"type": "broadcast", "event": "hello", "payload": {"from": "a"}}))
        .await;
    assert_eq!(events_until(&mut c, "hello").await, Vec::<String>::new());
    // C may not write, on its node: an error to C, nothing to A.
    let r =
        push_room(&mut c, "broadcast", json!({"type": "broadcast", "event": "nope", "payload": {}})).await;
    assert_eq!(reply_to(&mut c, &r).await["status"], "error");
    push_room(&mut a, "broadcast", json!({"type": "broadcast", "event": "fence", "payload": {}})).await;
    assert_eq!(events_until(&mut c, "fence").await, Vec::<String>::new(), "C's refused message went out");
    // The public channel of the same name: its members on either node hear it, the private
    // members do not.
    let mut d = connect(one.addr, user(B)).await;
    assert_eq!(d.join_config("room", json!({})).await["status"], "ok");
    b.push(
        Some("j1"),
        "realtime:room",
        "broadcast",
        json!({"type": "broadcast", "event": "public", "payload": {}}),
    )
    .await;
    let f = d.recv_until("the public broadcast", |f| f["event"] == "broadcast").await;
    assert_eq!(f["payload"]["event"], "public", "{f}");
    a.expect_quiet("the private member heard the public channel").await;
    one.stop().await;
    two.stop().await;
}
