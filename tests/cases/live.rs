//! Live queries end to end over Server-Sent Events: the rows that match first, then `enter`,
//! `update` and `leave`, each once and in commit order, so that a client applying them holds
//! exactly what `SELECT … WHERE filter` returns as that subscriber — on tables with the default
//! replica identity (no old row: a leave is known from the keys the query holds) and with FULL,
//! with row-level security deciding per subscriber, checked against the database after every
//! transaction of a seeded random workload.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::sse::{key_query, Sse};
use crate::support::{exec, fresh_db, pool, user, TestApp, Ws};

/// What a client applying a live query's messages holds.
#[derive(Debug, Default)]
struct Applied {
    /// The result: id → record.
    rows: BTreeMap<i64, Value>,
    /// Snapshot rows being collected (they replace `rows` at `snapshot-end`).
    incoming: Option<BTreeMap<i64, Value>>,
    /// Snapshots completed (one per connection).
    ready: u32,
    /// Messages that a correct stream never sends (an enter of a row held, an update or leave
    /// of one not held, an unknown event).
    violations: Vec<String>,
    errors: Vec<Value>,
    /// Every message's event name, in order.
    events: Vec<String>,
    /// The keys of snapshot rows, in the order they came.
    snapshot_order: Vec<i64>,
}

impl Applied {
    fn apply(&mut self, event: &str, data: &Value) {
        self.events.push(event.to_owned());
        let id = data["key"]["id"].as_i64();
        let mut bad = |why: &str| self.violations.push(format!("{why}: {event} {data}"));
        match (event, id) {
            ("snapshot", Some(id)) => {
                self.snapshot_order.push(id);
                if self
                    .incoming
                    .get_or_insert_with(BTreeMap::new)
                    .insert(id, data["record"].clone())
                    .is_some()
                {
                    bad("a snapshot row twice");
                }
            }
            ("snapshot-end", _) => {
                self.rows = self.incoming.take().unwrap_or_default();
                self.ready += 1;
            }
            ("enter", Some(id)) => {
                if self.rows.insert(id, data["record"].clone()).is_some() {
                    bad("enter of a row held");
                }
            }
            ("update", Some(id)) => {
                if self.rows.insert(id, data["record"].clone()).is_none() {
                    bad("update of a row not held");
                }
            }
            ("leave", Some(id)) => {
                if self.rows.remove(&id).is_none() {
                    bad("leave of a row not held");
                }
                if data.get("record").is_some_and(|r| !r.is_null()) {
                    bad("a leave with a record");
                }
            }
            ("error", _) => self.errors.push(data.clone()),
            _ => bad("unexpected"),
        }
    }
}

/// A live query over SSE, read and applied in the background.
struct LiveClient {
    applied: Arc<Mutex<Applied>>,
    /// Bumped after each message is applied.
    changed: tokio::sync::watch::Receiver<u64>,
    reader: tokio::task::JoinHandle<()>,
}

impl LiveClient {
    async fn open(base: &str, table: &str, query: &str) -> LiveClient {
        let path = format!("/v1/tables/public.{table}/changes");
        let mut sse = match Sse::open_at(base, &path, &format!("live=true&{query}"), None).await {
            Ok(s) => s,
            Err((status, body)) => panic!("live query refused: {status} {body}"),
        };
        // A live query may rightly stay quiet for as long as nothing it holds changes.
        sse.quiet = Duration::from_secs(3600);
        let applied = Arc::new(Mutex::new(Applied::default()));
        let into = Arc::clone(&applied);
        let (tx, changed) = tokio::sync::watch::channel(0u64);
        let reader = tokio::spawn(async move {
            while let Some((_, event, data)) = sse.next().await {
                into.lock().unwrap().apply(&event, &data);
                tx.send_modify(|n| *n += 1);
            }
        });
        let client = LiveClient { applied, changed, reader };
        client.wait("its snapshot", |a| a.ready >= 1).await;
        client
    }

    /// Waits until `cond` holds of what it applied; `Err` with what it holds after 30 s.
    async fn reach(&self, cond: impl Fn(&Applied) -> bool) -> Result<(), String> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            changed.borrow_and_update();
            {
                let a = self.applied.lock().unwrap();
                if cond(&a) {
                    return Ok(());
                }
            }
            let why = match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => "its stream ended",
                Err(_) => "30 s passed",
            };
            let a = self.applied.lock().unwrap();
            return Err(format!(
                "{why}; it holds {:?}; violations {:?}; errors {:?}; events {:?}",
                a.rows, a.violations, a.errors, a.events
            ));
        }
    }

    /// The live query `{table}_live(where: …)` over GraphQL (`graphql-transport-ws`), as `sub`.
    async fn open_graphql(app: &TestApp, table: &str, where_: &str, sub: &str) -> LiveClient {
        let mut socket = super::graphql::open(app, "graphql-transport-ws").await;
        super::graphql::init(&mut socket, json!({"Authorization": format!("Bearer {}", user(sub))})).await;
        let query = format!("subscription {{ {table}_live(where: {where_}) {{ kind key record {{ id owner shared n tag }} }} }}");
        super::graphql::send(
            &mut socket,
            json!({"type": "subscribe", "id": "live", "payload": {"query": query}}),
        )
        .await;
        let applied = Arc::new(Mutex::new(Applied::default()));
        let into = Arc::clone(&applied);
        let (tx, changed) = tokio::sync::watch::channel(0u64);
        let field = format!("{table}_live");
        let reader = tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(Ok(message)) = socket.next().await {
                let tokio_tungstenite::tungstenite::Message::Text(text) = message else { continue };
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] == "ping" {
                    // As a graphql-ws client does: the server's ping gets a pong.
                    use futures_util::SinkExt;
                    let pong = tokio_tungstenite::tungstenite::Message::Text(r#"{"type":"pong"}"#.into());
                    if socket.send(pong).await.is_err() {
                        return;
                    }
                    continue;
                }
                let data = &v["payload"]["data"][&field];
                let event = match (v["type"].as_str(), data["kind"].as_str()) {
                    (Some("next"), Some("READY")) => "snapshot-end".to_owned(),
                    (Some("next"), Some(kind)) => kind.to_ascii_lowercase(),
                    _ => format!("unexpected {v}"),
                };
                into.lock().unwrap().apply(&event, data);
                tx.send_modify(|n| *n += 1);
            }
        });
        let client = LiveClient { applied, changed, reader };
        client.wait("its snapshot", |a| a.ready >= 1).await;
        client
    }

    /// Over SSE when `sent` is a filter, over GraphQL when it is a `where` (`{…}`).
    async fn open_as(app: &TestApp, table: &str, sent: &str, sub: &str) -> LiveClient {
        if sent.starts_with('{') {
            return LiveClient::open_graphql(app, table, sent, sub).await;
        }
        let filter =
            if sent.is_empty() { String::new() } else { format!("&filter={}", sent.replace('=', "%3D")) };
        LiveClient::open(
            &format!("http://{}", app.addr),
            table,
            &format!("access_token={}{filter}", user(sub)),
        )
        .await
    }

    async fn wait(&self, what: &str, cond: impl Fn(&Applied) -> bool) {
        if let Err(state) = self.reach(cond).await {
            panic!("{what}: {state}");
        }
    }

    fn rows(&self) -> BTreeMap<i64, Value> {
        self.applied.lock().unwrap().rows.clone()
    }

    fn check_clean(&self) {
        let a = self.applied.lock().unwrap();
        assert!(a.violations.is_empty(), "protocol violations: {:?}", a.violations);
        assert!(a.errors.is_empty(), "errors: {:?}", a.errors);
    }
}

impl Drop for LiveClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The rows of `table` matching `condition`, as `sub` may see them (`None`: as the gateway,
/// with authentication off): id → `to_jsonb(row)`.
async fn expected(p: &sqlx::PgPool, table: &str, condition: &str, sub: Option<&str>) -> BTreeMap<i64, Value> {
    let mut tx = p.begin().await.unwrap();
    if let Some(sub) = sub {
        sqlx::query("SET LOCAL ROLE authenticated").execute(&mut *tx).await.unwrap();
        let claims = serde_json::json!({"sub": sub, "role": "authenticated"}).to_string();
        sqlx::query("SELECT set_config('request.jwt.claims', $1, true)")
            .bind(claims)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let sql = format!(
        "SELECT coalesce(jsonb_object_agg(id, to_jsonb(t)), '{{}}')::text FROM {table} t WHERE {condition}"
    );
    let text: String = sqlx::query_scalar(&sql).fetch_one(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let map: BTreeMap<String, Value> = serde_json::from_str(&text).unwrap();
    map.into_iter().map(|(k, v)| (k.parse().unwrap(), v)).collect()
}

fn ids(rows: &BTreeMap<i64, Value>) -> Vec<i64> {
    rows.keys().copied().collect()
}

#[tokio::test]
async fn a_live_query_follows_rows_into_and_out_of_its_filter_without_the_old_row() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(
        &p,
        "CREATE TABLE tasks (id bigint PRIMARY KEY, status text, n int, note text);
         CREATE TABLE nokey (a int);
         INSERT INTO tasks VALUES (1, 'open', 1, 'a'), (2, 'done', 2, 'b'), (3, 'open', 3, 'c');",
    )
    .await;
    let app = TestApp::spawn(&url).await;
    let base = format!("http://{}", app.addr);
    let live =
        LiveClient::open(&base, "tasks", &format!("{}&filter=status%3Deq.open&select=n", key_query())).await;
    assert_eq!(ids(&live.rows()), [1, 3], "the snapshot is the rows that match now");
    assert_eq!(live.rows()[&1], serde_json::json!({"id": 1, "n": 1}), "select keeps n and the key");

    // Default replica identity: the server sends no old row for these updates.
    exec(&p, "UPDATE tasks SET status = 'done' WHERE id = 1").await;
    live.wait("1 leaves", |a| !a.rows.contains_key(&1)).await;
    exec(&p, "UPDATE tasks SET status = 'open', n = 20 WHERE id = 2").await;
    live.wait("2 enters", |a| a.rows.get(&2).is_some_and(|r| r["n"] == 20)).await;
    exec(&p, "UPDATE tasks SET n = 30 WHERE id = 3").await;
    live.wait("3 is updated", |a| a.rows.get(&3).is_some_and(|r| r["n"] == 30)).await;
    // A change to a row outside the result: nothing.
    exec(&p, "UPDATE tasks SET n = 99 WHERE id = 1; INSERT INTO tasks VALUES (4, 'done', 4, 'd')").await;
    // A key change: the old key leaves, the new one enters.
    exec(&p, "UPDATE tasks SET id = 30 WHERE id = 3").await;
    live.wait("3 became 30", |a| a.rows.contains_key(&30) && !a.rows.contains_key(&3)).await;
    exec(&p, "DELETE FROM tasks WHERE id = 2; INSERT INTO tasks VALUES (5, 'open', 5, 'e')").await;
    live.wait("2 deleted, 5 inserted", |a| ids(&a.rows) == [5, 30]).await;
    {
        let a = live.applied.lock().unwrap();
        let changes: Vec<&str> =
            a.events.iter().skip_while(|e| *e != "snapshot-end").skip(1).map(String::as_str).collect();
        assert_eq!(changes, ["leave", "enter", "update", "leave", "enter", "leave", "enter"]);
    }
    exec(&p, "TRUNCATE tasks").await;
    live.wait("every row leaves on TRUNCATE", |a| a.rows.is_empty()).await;
    live.check_clean();

    // A second client in the middle of it all gets the same result.
    exec(&p, "INSERT INTO tasks VALUES (6, 'open', 6, 'f'), (7, 'done', 7, 'g')").await;
    live.wait("6 enters", |a| a.rows.contains_key(&6)).await;
    let other =
        LiveClient::open(&base, "tasks", &format!("{}&filter=status%3Deq.open&select=n", key_query())).await;
    assert_eq!(other.rows(), live.rows());

    // An order for the initial result: n descending, nulls first; the key breaks ties.
    exec(&p, "INSERT INTO tasks VALUES (9, 'open', NULL, 'i'), (10, 'open', 6, 'j')").await;
    let ordered = LiveClient::open(&base, "tasks", &format!("{}&order=n.desc.nullsfirst", key_query())).await;
    assert_eq!(ordered.applied.lock().unwrap().snapshot_order, [9, 7, 6, 10]);
    exec(&p, "DELETE FROM tasks WHERE id IN (9, 10)").await;
    ordered.wait("9 and 10 leave", |a| ids(&a.rows) == [6, 7]).await;
    live.wait("9 and 10 leave", |a| ids(&a.rows) == [6]).await;

    // Refusals, each with a reason.
    let refused = |query: String, table: &'static str| {
        let base = base.clone();
        async move {
            let path = format!("/v1/tables/public.{table}/changes");
            Sse::open_at(&base, &path, &query, None).await.err().expect("refused")
        }
    };
    let (status, body) = refused(format!("live=true&order=nope.desc&{}", key_query()), "tasks").await;
    assert!(status == 400 && body.contains("nope") && body.contains("is not a column"), "{status} {body}");
    let (status, body) = refused(format!("order=n.desc&{}", key_query()), "tasks").await;
    assert!(status == 400 && body.contains("order applies to a live query"), "{status} {body}");
    let (status, body) = refused(format!("live=true&{}", key_query()), "nokey").await;
    assert!(status == 400 && body.contains("no primary key"), "{status} {body}");
    let (status, body) = refused(format!("live=true&events=insert&{}", key_query()), "tasks").await;
    assert!(status == 400 && body.contains("every event"), "{status} {body}");
    let (status, body) = refused(format!("live=maybe&{}", key_query()), "tasks").await;
    assert!(status == 400 && body.contains("live"), "{status} {body}");
    let (status, body) =
        super::sse::get_json(&format!("{base}/v1/tables/public.tasks/changes?live=true&{}", key_query()))
            .await;
    assert!(status == 400 && body.to_string().contains("event stream"), "{status} {body}");

    // The same live query over the JSON WebSocket: `live` messages with the same data.
    let mut ws = Ws::connect(app.addr, "/v1/ws", None).await;
    let subscribe = json!({"type": "subscribe", "channel": "table:public.tasks", "live": true,
                           "filter": "status=eq.open", "select": ["n"]});
    ws.send_text(&subscribe.to_string()).await;
    let mut held = BTreeMap::new();
    loop {
        let f = ws.recv().await;
        match (f["type"].as_str(), f["data"]["kind"].as_str()) {
            (Some("subscribed"), _) => {}
            (Some("live"), Some("snapshot")) => {
                held.insert(f["data"]["key"]["id"].as_i64().unwrap(), f["data"]["record"].clone());
            }
            (Some("snapshot-end"), _) => break,
            _ => panic!("unexpected before the end of the snapshot: {f}"),
        }
    }
    assert_eq!(held, live.rows());
    exec(&p, "UPDATE tasks SET status = 'done' WHERE id = 6").await;
    let f = ws.recv().await;
    assert_eq!(
        (f["type"].as_str(), f["channel"].as_str()),
        (Some("live"), Some("table:public.tasks")),
        "{f}"
    );
    assert_eq!((f["data"]["kind"].as_str(), &f["data"]["key"]), (Some("leave"), &json!({"id": 6})), "{f}");
    assert!(f["cursor"].is_string() && f["data"]["cursor"] == f["cursor"], "{f}");
    let refused =
        json!({"type": "subscribe", "channel": "table:public.tasks", "live": true, "events": "insert"});
    let mut other_ws = Ws::connect(app.addr, "/v1/ws", None).await;
    other_ws.send_text(&refused.to_string()).await;
    let f = other_ws.recv().await;
    assert!(f["type"] == "error" && f["message"].as_str().unwrap_or("").contains("every event"), "{f}");
    exec(&p, "UPDATE tasks SET status = 'open' WHERE id = 6").await;

    // A result that grows past its limit ends the query with an error that says so.
    let bounded = LiveClient::open(&base, "tasks", &format!("{}&limit=2", key_query())).await;
    assert_eq!(ids(&bounded.rows()), [6, 7]);
    exec(&p, "INSERT INTO tasks VALUES (8, 'open', 8, 'h')").await;
    bounded.wait("the limit error", |a| !a.errors.is_empty()).await;
    let error = bounded.applied.lock().unwrap().errors[0].to_string();
    assert!(error.contains("grew past 2 rows"), "{error}");
    app.stop().await;
}

/// A seeded generator (xorshift64*), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";

const ORACLE_SCHEMA: &str = "
CREATE TABLE live_d (id bigint PRIMARY KEY, owner uuid, shared bool NOT NULL DEFAULT false, n int, tag text);
CREATE TABLE live_f (id bigint PRIMARY KEY, owner uuid, shared bool NOT NULL DEFAULT false, n int, tag text);
ALTER TABLE live_f REPLICA IDENTITY FULL;
ALTER TABLE live_d ENABLE ROW LEVEL SECURITY;
ALTER TABLE live_f ENABLE ROW LEVEL SECURITY;
CREATE POLICY see ON live_d FOR SELECT TO authenticated USING (owner = auth.uid() OR shared);
CREATE POLICY see ON live_f FOR SELECT TO authenticated USING (owner = auth.uid() OR shared);
";

/// One random statement on `table`: inserts, updates of the filtered columns, of the owner and
/// the sharing (row-level security), key changes, deletes, and now and then a TRUNCATE.
fn random_statement(rng: &mut Rng, table: &str) -> String {
    let id = rng.below(40) + 1;
    let other = rng.below(40) + 1;
    let owner = [A, B][rng.below(2) as usize];
    let n = rng.below(100);
    let tag = ["x", "y", "z"][rng.below(3) as usize];
    match rng.below(100) {
        0..=29 => format!(
            "INSERT INTO {table} VALUES ({id}, '{owner}', {}, {n}, '{tag}') ON CONFLICT (id) DO NOTHING",
            rng.below(4) == 0
        ),
        30..=54 => format!("UPDATE {table} SET n = {n} WHERE id = {id}"),
        55..=64 => format!("UPDATE {table} SET tag = '{tag}', n = n + 1 WHERE id = {id}"),
        65..=72 => format!("UPDATE {table} SET owner = '{owner}' WHERE id = {id}"),
        73..=78 => format!("UPDATE {table} SET shared = NOT shared WHERE id = {id}"),
        79..=84 => format!(
            "UPDATE {table} SET id = {other} WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM {table} WHERE id = {other})"
        ),
        85..=98 => format!("DELETE FROM {table} WHERE id = {id}"),
        _ => format!("TRUNCATE {table}"),
    }
}

#[tokio::test]
async fn live_queries_equal_their_select_as_each_subscriber_after_every_transaction() {
    let seed =
        std::env::var("WALCAST_LIVE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1234_u64);
    eprintln!("live query oracle: seed {seed} (WALCAST_LIVE_SEED repeats it)");
    let (app, p) = crate::support::rls_app(ORACLE_SCHEMA, |_| {}).await;
    // (table, filter as sent — over SSE, or a GraphQL `where` — the same condition in SQL,
    // subscriber)
    let queries: [(&str, &str, &str, &str); 8] = [
        ("live_d", "n=gt.50", "n > 50", A),
        ("live_d", "or=(n.lt.20,tag.eq.x)", "(n < 20 OR tag = 'x')", B),
        ("live_d", "", "true", A),
        ("live_f", "n=gte.30,tag=neq.z", "n >= 30 AND tag <> 'z'", A),
        ("live_f", "not.and=(n.gt.10,n.lt.90)", "NOT (n > 10 AND n < 90)", B),
        ("live_f", "tag=in.(x,y)", "tag IN ('x','y')", B),
        ("live_d", "{n: {_gte: 40, _lte: 70}}", "n BETWEEN 40 AND 70", B),
        (
            "live_f",
            r#"{_or: [{n: {_lt: 15}}, {_not: {tag: {_in: ["x", "z"]}}}], shared: {_eq: false}}"#,
            "(n < 15 OR NOT tag IN ('x','z')) AND shared = false",
            A,
        ),
    ];
    let mut clients = Vec::new();
    for (table, sent, _, sub) in &queries {
        clients.push(LiveClient::open_as(&app, table, sent, sub).await);
    }
    let mut rng = Rng(seed | 1);
    let mut statements = 0;
    for step in 0..2000 {
        let table = ["live_d", "live_f"][rng.below(2) as usize];
        let n = rng.below(4) + 1;
        let body: Vec<String> = (0..n).map(|_| random_statement(&mut rng, table)).collect();
        statements += body.len();
        exec(&p, &format!("BEGIN; {}; COMMIT", body.join("; "))).await;
        for ((table, _, condition, sub), client) in queries.iter().zip(&clients) {
            let want = expected(&p, table, condition, Some(sub)).await;
            if let Err(state) = client.reach(|a| a.rows == want).await {
                panic!("seed {seed}, step {step} ({body:?}): {table} where {condition} as {sub}\n want {want:?}\n the client {state}");
            }
        }
    }
    for c in &clients {
        c.check_clean();
    }
    eprintln!(
        "live query oracle: {statements} statements in 2000 transactions, 8 live queries (6 over SSE, 2 over GraphQL) equal after each"
    );

    // Snapshots taken while transactions commit: the hand-off neither drops nor repeats a change.
    let writer = {
        let (p, mut rng) = (p.clone(), Rng(rng.0));
        tokio::spawn(async move {
            for _ in 0..300 {
                let table = ["live_d", "live_f"][rng.below(2) as usize];
                let body: Vec<String> = (0..3).map(|_| random_statement(&mut rng, table)).collect();
                exec(&p, &format!("BEGIN; {}; COMMIT", body.join("; "))).await;
            }
        })
    };
    let mut late = Vec::new();
    for (table, sent, _, sub) in &queries {
        late.push(LiveClient::open_as(&app, table, sent, sub).await);
    }
    writer.await.unwrap();
    for (i, client) in clients.iter().chain(&late).enumerate() {
        let (table, _, condition, sub) = queries[i % queries.len()];
        let want = expected(&p, table, condition, Some(sub)).await;
        if let Err(state) = client.reach(|a| a.rows == want).await {
            panic!("seed {seed}, after concurrent writes: client {i}: {table} where {condition}\n want {want:?}\n the client {state}");
        }
        client.check_clean();
    }
    app.stop().await;
}
