//! Changes over HTTP: Server-Sent Events (resume with `Last-Event-ID`, across a gateway killed
//! with SIGKILL) and long-poll, with their errors.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::support::{anon_key, exec, fresh_db, pool, TestApp};

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, v text);
CREATE TABLE ledger (seq bigserial PRIMARY KEY, item bigint NOT NULL);
";

/// One SSE message: (id, event, data).
pub(super) type Message = (Option<String>, String, Value);

/// A minimal `EventSource`: reads messages off a streaming response.
pub(super) struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    pub(super) async fn open(
        base: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<Sse, (u16, String)> {
        let mut req = reqwest::Client::new()
            .get(format!("{base}/v1/tables/public.items/changes?{query}"))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.map_err(|e| (0, e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            return Err((status, resp.text().await.unwrap_or_default()));
        }
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Ok(Sse { resp, buf: String::new() })
    }

    /// The next message (comments and `retry:` skipped); `None` when the stream ends.
    pub(super) async fn next(&mut self) -> Option<Message> {
        // Keep-alive comments do not count: a message must come within the deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut event = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).expect("data is JSON"));
                    }
                }
                if let (Some(event), Some(data)) = (event, data) {
                    return Some((id, event, data));
                }
                continue;
            }
            // `None` after 20 s without a message, as at the end of the stream.
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk()).await.ok()?.ok()??;
            self.buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }
}

pub(super) fn key_query() -> String {
    format!("access_token={}", anon_key())
}

pub(super) async fn get_json(url: &str) -> (u16, Value) {
    let resp =
        reqwest::Client::new().get(url).header("accept", "application/json").send().await.expect("get");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn event_stream_delivers_changes_and_resumes_with_last_event_id() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn(&url).await;
    let base = format!("http://{}", app.addr);

    let mut sse =
        Sse::open(&base, &format!("{}&events=insert,delete&select=v", key_query()), None).await.unwrap();
    exec(&p, "INSERT INTO items VALUES (1, 'a'), (2, 'b'); UPDATE items SET v = 'x' WHERE id = 1; DELETE FROM items WHERE id = 2")
        .await;
    let (id1, event, data) = sse.next().await.unwrap();
    assert_eq!((event.as_str(), &data["record"]), ("insert", &serde_json::json!({"id": 1, "v": "a"})));
    assert_eq!(data["cursor"].as_str(), id1.as_deref(), "the event id is the change's cursor");
    assert_eq!(
        (data["schema"].as_str(), data["table"].as_str(), data["type"].as_str()),
        (Some("public"), Some("items"), Some("INSERT"))
    );
    let (id2, event, _) = sse.next().await.unwrap();
    assert_eq!(event, "insert");
    let (_, event, data) = sse.next().await.unwrap();
    assert_eq!(
        (event.as_str(), &data["old_record"]["id"]),
        ("delete", &serde_json::json!(2)),
        "no update: events=insert,delete"
    );
    drop(sse);

    // Missed while disconnected; Last-Event-ID resumes right after the second insert.
    exec(&p, "INSERT INTO items VALUES (3, 'c'); INSERT INTO items VALUES (4, 'd')").await;
    let mut sse = Sse::open(&base, &format!("{}&events=insert", key_query()), id2.as_deref()).await.unwrap();
    for want in [3, 4] {
        let (_, event, data) = sse.next().await.unwrap();
        assert_eq!((event.as_str(), data["record"]["id"].as_i64()), ("insert", Some(want)));
    }
    exec(&p, "INSERT INTO items VALUES (5, 'e')").await;
    assert_eq!(sse.next().await.unwrap().2["record"]["id"], 5);

    // A cursor from another log: a gap event, then live changes.
    let foreign = format!("00000000{}", &id1.as_deref().unwrap()[8..]);
    let mut gap = Sse::open(&base, &key_query(), Some(&foreign)).await.unwrap();
    let (_, event, data) = gap.next().await.unwrap();
    assert_eq!((event.as_str(), data["code"].as_str()), ("gap", Some("other_log")));

    // Refusals, each with a reason.
    let (status, body) = Sse::open(&base, "", None).await.err().unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, body) = Sse::open(&base, &format!("{}&filter=nope", key_query()), None).await.err().unwrap();
    assert!(status == 400 && body.contains("filter"), "{status} {body}");
    let (status, body) = Sse::open(&base, &key_query(), Some("not-a-cursor")).await.err().unwrap();
    assert!(status == 400 && body.contains("invalid cursor"), "{status} {body}");
    let (status, _) = get_json(&format!("{base}/v1/tables/items/changes?{}", key_query())).await;
    assert_eq!(status, 400, "schema.table required");
    app.stop().await;
}

#[tokio::test]
async fn long_poll_returns_waiting_changes_holds_when_none_and_answers_a_gap_with_409() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn(&url).await;
    let changes = format!("http://{}/v1/tables/public.items/changes?{}", app.addr, key_query());

    // No cursor and nothing new: the current position after `wait`.
    let (status, first) = get_json(&format!("{changes}&wait=1")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["changes"], serde_json::json!([]));
    let start = first["cursor"].as_str().expect("a cursor to poll from").to_owned();

    exec(&p, "INSERT INTO items VALUES (1, 'a'); INSERT INTO items VALUES (2, 'b'); INSERT INTO items VALUES (3, 'c')").await;
    let mut got = Vec::new();
    let mut cursor = start;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "three changes by long-poll within 20 s: {got:?}");
        let (status, body) = get_json(&format!("{changes}&since={cursor}&limit=2&wait=5")).await;
        assert_eq!(status, 200, "{body}");
        let batch = body["changes"].as_array().cloned().unwrap_or_default();
        assert!(batch.len() <= 2, "limit holds");
        got.extend(batch.iter().map(|c| c["record"]["id"].as_i64().unwrap()));
        cursor = body["cursor"].as_str().unwrap().to_owned();
    }
    assert_eq!(got, [1, 2, 3], "each exactly once, in order");

    // A held request returns when a change commits.
    let poll = tokio::spawn({
        let url = format!("{changes}&since={cursor}&wait=30");
        async move { get_json(&url).await }
    });
    exec(&p, "INSERT INTO items VALUES (4, 'd')").await;
    let (status, body) = poll.await.unwrap();
    assert_eq!((status, body["changes"][0]["record"]["id"].as_i64()), (200, Some(4)));

    let foreign = format!("00000000{}", &cursor[8..]);
    let (status, body) = get_json(&format!("{changes}&since={foreign}&wait=5")).await;
    assert_eq!(
        (status, body["error"].as_str(), body["code"].as_str()),
        (409, Some("gap"), Some("other_log")),
        "{body}"
    );
    app.stop().await;
}

/// A gateway in a child process, so that it can be killed with SIGKILL.
async fn spawn_gateway(url: &str, slot: &str, log_dir: &std::path::Path) -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
        .arg("serve")
        .env("WALCAST_DATABASE_URL", url)
        .env("WALCAST_LISTEN", format!("127.0.0.1:{port}"))
        .env("WALCAST_SLOT", slot)
        .env("WALCAST_CHANGELOG__DIR", log_dir)
        .env("WALCAST_AUTH__JWT_SECRET", crate::support::TEST_SECRET)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("gateway process");
    let base = format!("http://127.0.0.1:{port}");
    let ready = format!("{base}/readyz");
    crate::support::wait_for("gateway process ready", Duration::from_secs(30), || async {
        let body = reqwest::get(&ready).await.ok()?.text().await.ok()?;
        body.contains("\"ready\":true").then_some(())
    })
    .await;
    (child, base)
}

#[tokio::test]
async fn an_event_stream_resumes_without_loss_across_a_gateway_killed_with_sigkill_under_load() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let db = url.rsplit('/').next().unwrap().to_owned();
    let slot: String = format!("slot_{db}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let log_dir = crate::support::log_dir(&format!("{db}-killed"));
    let (mut gateway, base) = spawn_gateway(&url, &slot, &log_dir).await;

    // Subscribed (the response has begun) before the first write.
    let mut sse = Sse::open(&base, &key_query(), None).await.unwrap();
    // One writer, one transaction per row (items + ledger together): commit order = id order.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let writer = tokio::spawn({
        let (p, stop, written) = (p.clone(), Arc::clone(&stop), Arc::clone(&written));
        async move {
            let mut id = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                id += 1;
                exec(
                    &p,
                    &format!("INSERT INTO items VALUES ({id}, 'v'); INSERT INTO ledger (item) VALUES ({id})"),
                )
                .await;
                written.store(id, std::sync::atomic::Ordering::Relaxed);
            }
            id
        }
    });

    let mut got: Vec<i64> = Vec::new();
    let mut last: Option<String> = None;
    let mut early = None;
    while got.len() < 300 {
        let (id, event, data) = sse.next().await.expect("stream open");
        assert_eq!(event, "insert", "{data}");
        got.push(data["record"]["id"].as_i64().unwrap());
        if got.len() == 100 {
            early = id.clone();
        }
        last = id;
    }
    gateway.start_kill().expect("SIGKILL");
    let _ = gateway.wait().await;
    // Whatever was already sent arrives; then the stream ends.
    while let Some((id, _, data)) = sse.next().await {
        got.push(data["record"]["id"].as_i64().unwrap());
        last = id;
    }
    // Transactions keep committing while the gateway is down.
    let down_at = written.load(std::sync::atomic::Ordering::Relaxed);
    crate::support::wait_for("writes while the gateway is down", Duration::from_secs(30), || {
        let written = Arc::clone(&written);
        async move { (written.load(std::sync::atomic::Ordering::Relaxed) >= down_at + 200).then_some(()) }
    })
    .await;

    let (_gateway, base) = spawn_gateway(&url, &slot, &log_dir).await;
    let mut sse = Sse::open(&base, &key_query(), last.as_deref()).await.unwrap();
    // A client that was further behind replays from before the kill, through the restart.
    let mut behind = Sse::open(&base, &key_query(), early.as_deref()).await.unwrap();
    crate::support::wait_for("writes after the restart", Duration::from_secs(30), || {
        let written = Arc::clone(&written);
        async move { (written.load(std::sync::atomic::Ordering::Relaxed) >= down_at + 400).then_some(()) }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = writer.await.unwrap();
    let ledger: Vec<i64> =
        sqlx::query_scalar("SELECT item FROM ledger ORDER BY seq").fetch_all(&p).await.unwrap();
    assert_eq!(ledger.len() as i64, total);
    while got.len() < ledger.len() {
        let Some((_, event, data)) = sse.next().await else {
            let missing: Vec<&i64> = ledger.iter().filter(|i| !got.contains(i)).take(20).collect();
            panic!(
                "{} of {} received within 20 s of each other; missing {missing:?}",
                got.len(),
                ledger.len()
            )
        };
        assert_eq!(event, "insert", "{data}");
        got.push(data["record"]["id"].as_i64().unwrap());
    }
    assert_eq!(got, ledger, "exactly the committed set, in commit order");
    let mut replayed = Vec::new();
    while replayed.len() < ledger.len() - 100 {
        let Some((_, _, data)) = behind.next().await else {
            panic!("{} of {} replayed", replayed.len(), ledger.len() - 100)
        };
        replayed.push(data["record"]["id"].as_i64().unwrap());
    }
    assert_eq!(replayed, ledger[100..], "replayed across the kill: nothing lost, nothing twice");
    drop(sse);
    let _ = std::fs::remove_dir_all(&log_dir);
}
