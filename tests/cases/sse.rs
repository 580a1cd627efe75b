//! Changes over HTTP: Server-Sent Events (resume with `Last-Event-ID`, across a gateway killed
//! with SIGKILL) and long-poll, with their errors.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::support::{anon_key, exec, fresh_db, http_post, pool, TestApp};

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, v text);
CREATE TABLE ledger (seq bigserial PRIMARY KEY, item bigint NOT NULL);
";

/// One SSE message: (id, event, data).
pub(super) type Message = (Option<String>, String, Value);

/// A minimal `EventSource`: reads messages off a streaming response.
/// An event stream read as a browser's `EventSource` reads it: when the gateway ends the stream
/// because the client fell behind (`client too slow`), it reconnects with `Last-Event-ID` set to
/// the last id it saw and goes on; the caller sees one unbroken sequence of messages.
pub(super) struct Sse {
    resp: reqwest::Response,
    buf: String,
    /// Where it was opened, for reconnecting.
    url: String,
    /// The last message id seen (or the one it was opened with).
    last_id: Option<String>,
    /// Reconnects after `client too slow`.
    pub(super) reconnects: u32,
    /// How long it waits for a message before taking the stream as ended.
    pub(super) quiet: Duration,
}

impl Sse {
    /// The change stream of `public.items`.
    pub(super) async fn open(
        base: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<Sse, (u16, String)> {
        Sse::open_at(base, "/v1/tables/public.items/changes", query, last_event_id).await
    }

    pub(super) async fn open_at(
        base: &str,
        path: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<Sse, (u16, String)> {
        let url = format!("{base}{path}?{query}");
        let resp = Sse::request(&url, last_event_id).await?;
        Ok(Sse {
            resp,
            buf: String::new(),
            url,
            last_id: last_event_id.map(str::to_owned),
            reconnects: 0,
            quiet: Duration::from_secs(20),
        })
    }

    async fn request(url: &str, last_event_id: Option<&str>) -> Result<reqwest::Response, (u16, String)> {
        let mut req = reqwest::Client::new().get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.map_err(|e| (0, e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            return Err((status, resp.text().await.unwrap_or_default()));
        }
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Ok(resp)
    }

    /// The stream's opening id (the cursor it starts after), read from its first lines.
    pub(super) async fn opening_id(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(at) = self.buf.find("\n\nid: ") {
                let rest = &self.buf[at + 6..];
                if let Some(end) = rest.find("\n\n") {
                    return rest[..end].to_owned();
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk()).await;
            let chunk = chunk.expect("the opening lines within 20 s").expect("read").expect("not ended");
            self.buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// The id a reconnect sends as `Last-Event-ID`: the last one the stream carried.
    pub(super) fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// The next message; a `client too slow` end is followed by a reconnect from the last id
    /// seen, as `EventSource` does, and is not returned.
    pub(super) async fn next(&mut self) -> Option<Message> {
        loop {
            let message = self.next_raw().await?;
            if message.0.is_some() {
                self.last_id.clone_from(&message.0);
            }
            let too_slow = message.1 == "error"
                && message.2["message"].as_str().is_some_and(|m| m.starts_with("client too slow"));
            if !too_slow {
                return Some(message);
            }
            self.reconnects += 1;
            eprintln!("event stream: client too slow, reconnecting from {:?}", self.last_id);
            self.resp = Sse::request(&self.url, self.last_id.as_deref()).await.ok()?;
            self.buf.clear();
        }
    }

    /// The next message as sent (comments and `retry:` skipped); `None` when the stream ends.
    async fn next_raw(&mut self) -> Option<Message> {
        // Keep-alive comments do not count: a message must come within the deadline.
        let deadline = tokio::time::Instant::now() + self.quiet;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut event = None;
                let mut data: Option<String> = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        // Lines of one message's data join with a newline.
                        match &mut data {
                            Some(d) => {
                                d.push('\n');
                                d.push_str(v);
                            }
                            None => data = Some(v.to_owned()),
                        }
                    }
                }
                if let (Some(event), Some(data)) = (event, data) {
                    let data = serde_json::from_str(&data).expect("data is JSON");
                    return Some((id, event, data));
                }
                // A block with an id and no data sets the last event id, as in a browser.
                if id.is_some() {
                    self.last_id = id;
                }
                continue;
            }
            // `None` after `quiet` without a message, as at the end of the stream.
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

/// Long-polls `changes` (a URL with its query) from `cursor` as a client does, from each answer's
/// cursor, until `want` changes arrived (a transaction's changes may span answers); panics after
/// 30 s.
pub(super) async fn poll_changes(changes: &str, cursor: &str, want: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (mut got, mut cursor) = (Vec::new(), cursor.to_owned());
    while got.len() < want {
        assert!(std::time::Instant::now() < deadline, "{} of {want} changes within 30 s: {got:?}", got.len());
        let (status, body) = get_json(&format!("{changes}&since={cursor}&wait=5")).await;
        assert_eq!(status, 200, "{body}");
        got.extend(body["changes"].as_array().into_iter().flatten().cloned());
        if let Some(c) = body["cursor"].as_str() {
            cursor = c.to_owned();
        }
    }
    got
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

    // A stream cut before its first change: its opening id resumes from where it began.
    let mut early = Sse::open(&base, &format!("{}&events=insert", key_query()), None).await.unwrap();
    let opening = early.opening_id().await;
    drop(early);
    exec(&p, "INSERT INTO items VALUES (6, 'f'); INSERT INTO items VALUES (7, 'g')").await;
    let mut again =
        Sse::open(&base, &format!("{}&events=insert", key_query()), Some(&opening)).await.unwrap();
    for want in [6, 7] {
        let (_, event, data) = again.next().await.unwrap();
        assert_eq!((event.as_str(), data["record"]["id"].as_i64()), ("insert", Some(want)));
    }

    // PostgREST's logical groups: rows 8 and 9 match one side each, 10 neither.
    let or = "filter=id%3Dgt.7,or%3D(id.eq.8,and(v.eq.z,id.not.in.(8,10)))";
    let mut grouped = Sse::open(&base, &format!("{}&{or}", key_query()), None).await.unwrap();
    exec(&p, "INSERT INTO items VALUES (8, 'h'), (9, 'z'), (10, 'z'), (11, 'y'), (12, 'z')").await;
    for want in [8, 9, 12] {
        assert_eq!(grouped.next().await.unwrap().2["record"]["id"], want);
    }

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
    let (status, body) = Sse::open(&base, &format!("{}&filter=or%3D(id.eq.1,nope.eq.2)", key_query()), None)
        .await
        .err()
        .unwrap();
    assert!(status == 400 && body.contains("nope"), "{status} {body}");
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

/// `SELECT realtime.send(…)` of `{"n": n}` as event `event` to the public topic `room`.
fn send_sql(event: &str, n: i64, private: bool) -> String {
    format!("SELECT realtime.send('{{\"n\": {n}}}'::jsonb, '{event}', 'room', {private})")
}

#[tokio::test]
async fn channel_stream_names_events_after_broadcasts_and_resumes_database_broadcasts_without_loss() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    let app = TestApp::spawn(&url).await;
    let base = format!("http://{}", app.addr);
    let path = "/v1/channels/room/events";
    let rest = |event: &str| {
        serde_json::json!({"messages": [{"topic": "room", "event": event, "payload": {"who": "rest"}}]})
            .to_string()
    };
    let mut sse = Sse::open_at(&base, path, &key_query(), None).await.unwrap();

    // A client's broadcast: named after its event, no id (it is not kept).
    let (status, _) =
        http_post(app.addr, "/api/broadcast", "application/json", rest("typing").as_bytes()).await;
    assert_eq!(status, 202);
    let (id, event, data) = sse.next().await.unwrap();
    assert_eq!((id, event.as_str()), (None, "typing"));
    assert_eq!(data, serde_json::json!({"event": "typing", "data": {"who": "rest"}}));

    // A database broadcast: its cursor is the id; private ones stay on the private channel; the
    // stream's own event names are not taken by a broadcast.
    exec(&p, &send_sql("secret", 0, true)).await;
    exec(&p, &send_sql("db", 1, false)).await;
    exec(&p, &send_sql("error", 2, false)).await;
    let (first, event, data) = sse.next().await.unwrap();
    assert_eq!((event.as_str(), data["data"]["n"].as_i64()), ("db", Some(1)), "{data}");
    assert!(first.is_some() && data["meta"]["id"].is_string(), "{data}");
    let (last, event, data) = sse.next().await.unwrap();
    assert_eq!((event.as_str(), data["event"].as_str()), ("broadcast", Some("error")));
    assert!(last > first, "ids increase");
    drop(sse);

    // A writer sends 400 more; a reader resumes from the last id it saw, leaves at n = 120, and
    // comes back once the writer is past 200: the log replays what it missed while the writer
    // goes on, then it follows live. Every n once, in order; the REST broadcast sent while it was
    // away is not kept, so not replayed.
    const TOTAL: i64 = 400;
    let sent = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let writer = tokio::spawn({
        let (p, sent) = (p.clone(), Arc::clone(&sent));
        async move {
            for n in 3..=TOTAL {
                exec(&p, &send_sql("seq", n, false)).await;
                sent.store(n, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let mut got = Vec::new();
    let mut last = last.expect("an id");
    let mut sse = Sse::open_at(&base, path, &key_query(), Some(&last)).await.unwrap();
    loop {
        let (id, event, data) = sse.next().await.expect("a broadcast within 20 s");
        assert_eq!(event, "seq", "{data}");
        got.push(data["data"]["n"].as_i64().unwrap());
        last = id.expect("database broadcasts have ids");
        if got.len() == 118 {
            break;
        }
    }
    drop(sse);
    let (status, _) =
        http_post(app.addr, "/api/broadcast", "application/json", rest("away").as_bytes()).await;
    assert_eq!(status, 202);
    crate::support::wait_for("the writer past 200", Duration::from_secs(60), at_least(&sent, 200)).await;
    let mut sse = Sse::open_at(&base, path, &key_query(), Some(&last)).await.unwrap();
    while got.last() != Some(&TOTAL) {
        let (id, event, data) = sse.next().await.expect("a broadcast within 20 s");
        assert_eq!((event.as_str(), id.is_some()), ("seq", true), "only the database broadcasts: {data}");
        got.push(data["data"]["n"].as_i64().unwrap());
    }
    writer.await.unwrap();
    assert_eq!(got, (3..=TOTAL).collect::<Vec<_>>(), "each once, in order");

    // Refusals, each with a reason.
    let (status, body) = Sse::open_at(&base, path, "", None).await.err().unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, body) =
        Sse::open_at(&base, path, &format!("{}&private=true", key_query()), None).await.err().unwrap();
    assert!(
        status == 403 && body.contains("You do not have permissions to read from this Channel topic: room"),
        "{status} {body}"
    );
    let (status, body) =
        Sse::open_at(&base, path, &format!("{}&since=2026-01-01T00:00:00Z", key_query()), None)
            .await
            .err()
            .unwrap();
    assert!(status == 400 && body.contains("event id"), "{status} {body}");
    let (status, body) = Sse::open_at(&base, path, &key_query(), Some("nope")).await.err().unwrap();
    assert!(status == 400 && body.contains("invalid cursor"), "{status} {body}");
    app.stop().await;
}

/// A gateway in a child process on `port`, so that it can be killed with SIGKILL and come back
/// at the same address.
async fn spawn_gateway(
    url: &str,
    slot: &str,
    log_dir: &std::path::Path,
    port: u16,
) -> (tokio::process::Child, String) {
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

/// A browser-style `EventSource` (the `eventsource` npm package) in a node process.
struct NodeEventSource {
    _child: tokio::process::Child,
    _stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl NodeEventSource {
    fn spawn(url: &str) -> NodeEventSource {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node");
        assert!(
            dir.join("node_modules/eventsource").exists(),
            "run `npm ci` in {} (or .ci/run)",
            dir.display()
        );
        let mut child = tokio::process::Command::new("node")
            .current_dir(&dir)
            .arg("eventsource.mjs")
            .arg(url)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        use tokio::io::AsyncBufReadExt;
        NodeEventSource { _child: child, _stdin: stdin, lines: tokio::io::BufReader::new(stdout).lines() }
    }

    /// The next line of `kind`, within 30 s.
    async fn next(&mut self, kind: &str) -> Value {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("EventSource: nothing within 30 s while waiting for {kind}"))
                .expect("read")
                .expect("EventSource exited");
            let v: Value = serde_json::from_str(&line).expect("JSON line");
            if v["kind"] == kind {
                return v;
            }
        }
    }
}

/// Writers committing one `items` row and its `ledger` row per transaction, concurrently: writer
/// `w` writes ids `w, w + WRITERS, …` in order.
pub(super) const WRITERS: i64 = 4;

/// A condition for `wait_for`: `counter` has reached `n`.
pub(super) fn at_least(
    counter: &Arc<std::sync::atomic::AtomicI64>,
    n: i64,
) -> impl FnMut() -> std::future::Ready<Option<()>> {
    let counter = Arc::clone(counter);
    move || std::future::ready((counter.load(std::sync::atomic::Ordering::Relaxed) >= n).then_some(()))
}

/// Checks a client's (cursor, id) deliveries against the ledger: the same set, each once, cursors
/// strictly increasing (commit order), and each writer's ids in the order it committed them.
pub(super) fn check_against_ledger(who: &str, got: &[(String, i64)], ledger: &[i64]) {
    let mut ids: Vec<i64> = got.iter().map(|(_, id)| *id).collect();
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "{who}: cursors not strictly increasing");
    for w in 0..WRITERS {
        let mine: Vec<i64> = ids.iter().copied().filter(|id| *id >= 0 && id % WRITERS == w).collect();
        assert!(mine.windows(2).all(|p| p[0] < p[1]), "{who}: writer {w}'s commits out of order");
    }
    ids.sort_unstable();
    let mut want = ledger.to_vec();
    want.sort_unstable();
    let missing: Vec<&i64> = want.iter().filter(|i| ids.binary_search(i).is_err()).take(10).collect();
    assert_eq!(
        ids.len(),
        want.len(),
        "{who}: {} received, {} committed; missing {missing:?}",
        ids.len(),
        want.len()
    );
    assert!(ids == want, "{who}: not exactly the committed set; missing {missing:?}");
}

#[tokio::test]
async fn event_streams_resume_without_loss_across_a_gateway_killed_with_sigkill_under_load() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
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
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (mut gateway, base) = spawn_gateway(&url, &slot, &log_dir, port).await;

    // Subscribed (the responses have begun) before the first write.
    let mut sse = Sse::open(&base, &key_query(), None).await.unwrap();
    let mut browser =
        NodeEventSource::spawn(&format!("{base}/v1/tables/public.items/changes?{}", key_query()));
    browser.next("open").await;
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(0));
    let started = std::time::Instant::now();
    let writers = crate::cases::nodes::writers(&p, &stop, &committed);

    let mut got: Vec<(String, i64)> = Vec::new();
    let mut early = None;
    while got.len() < 600 {
        let (id, event, data) = sse.next().await.expect("stream open");
        assert_eq!(event, "insert", "{data}");
        got.push((id.clone().expect("id"), data["record"]["id"].as_i64().unwrap()));
        if got.len() == 100 {
            early = id;
        }
    }
    gateway.start_kill().expect("SIGKILL");
    let _ = gateway.wait().await;
    // Whatever was already sent arrives; then the stream ends.
    while let Some((id, _, data)) = sse.next().await {
        got.push((id.expect("id"), data["record"]["id"].as_i64().unwrap()));
    }
    // Transactions keep committing while the gateway is down.
    let down_at = committed.load(Ordering::Relaxed);
    crate::support::wait_for(
        "writes while the gateway is down",
        Duration::from_secs(30),
        at_least(&committed, down_at + 500),
    )
    .await;

    let (_gateway, base) = spawn_gateway(&url, &slot, &log_dir, port).await;
    let last = got.last().map(|(c, _)| c.clone());
    let mut sse = Sse::open(&base, &key_query(), last.as_deref()).await.unwrap();
    // A client that was further behind replays from before the kill, through the restart.
    let mut behind = Sse::open(&base, &key_query(), early.as_deref()).await.unwrap();
    crate::support::wait_for(
        "writes after the restart",
        Duration::from_secs(30),
        at_least(&committed, down_at + 1000),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed();
    let ledger: Vec<i64> =
        sqlx::query_scalar("SELECT item FROM ledger ORDER BY seq").fetch_all(&p).await.unwrap();
    assert_eq!(ledger.len() as i64, committed.load(Ordering::Relaxed));
    eprintln!(
        "sigkill test: {} transactions in {:.1} s ({:.0}/s)",
        ledger.len(),
        elapsed.as_secs_f64(),
        ledger.len() as f64 / elapsed.as_secs_f64()
    );
    while got.len() < ledger.len() {
        let Some((id, event, data)) = sse.next().await else {
            panic!("{} of {} received within 20 s of each other", got.len(), ledger.len())
        };
        assert_eq!(event, "insert", "{data}");
        got.push((id.expect("id"), data["record"]["id"].as_i64().unwrap()));
    }
    check_against_ledger("live client", &got, &ledger);
    let mut replayed = Vec::new();
    while replayed.len() < ledger.len() - 100 {
        let Some((id, _, data)) = behind.next().await else {
            panic!("{} of {} replayed", replayed.len(), ledger.len() - 100)
        };
        replayed.push((id.expect("id"), data["record"]["id"].as_i64().unwrap()));
    }
    assert_eq!(replayed[..], got[100..], "replayed across the kill: the same changes, same cursors");
    // The EventSource reconnected by itself with Last-Event-ID (after connection errors).
    let mut seen = Vec::new();
    while seen.len() < ledger.len() {
        let v = browser.next("event").await;
        assert_eq!(v["event"], "insert", "{v}");
        seen.push((v["id"].as_str().expect("id").to_owned(), v["data"]["record"]["id"].as_i64().unwrap()));
    }
    check_against_ledger("EventSource", &seen, &ledger);
    drop(sse);
    let _ = std::fs::remove_dir_all(&log_dir);
}

/// Retention exceeded: a cursor whose segment was removed gets the gap signal (SSE `gap`,
/// long-poll 409), never a silent skip; a recent cursor still resumes.
#[tokio::test]
async fn a_cursor_older_than_retention_gets_a_gap() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn_with(&url, |c| {
        c.changelog.segment_bytes = 16 * 1024;
        c.changelog.max_bytes = 64 * 1024;
    })
    .await;
    let base = format!("http://{}", app.addr);
    let mut sse = Sse::open(&base, &key_query(), None).await.unwrap();
    // About 300 KiB of changes in 60 transactions: segments roll and the oldest are removed.
    for t in 0..60 {
        exec(
            &p,
            &format!(
                "INSERT INTO items SELECT g, repeat('x', 1000) FROM generate_series({}, {}) g",
                t * 5,
                t * 5 + 4
            ),
        )
        .await;
    }
    let mut cursors = Vec::new();
    while cursors.len() < 300 {
        let (id, _, _) = sse.next().await.expect("change");
        cursors.push(id.expect("id"));
    }
    // The log writer trails delivery a little: wait until it has rolled past the first segment.
    let poll = format!("{base}/v1/tables/public.items/changes?{}&wait=0&since={}", key_query(), cursors[0]);
    let body = crate::support::wait_for("the oldest segment removed", Duration::from_secs(20), || async {
        let (status, body) = get_json(&poll).await;
        assert!(status == 200 || status == 409, "{status} {body}");
        (status == 409).then_some(body)
    })
    .await;
    assert_eq!(body["code"], "expired", "{body}");
    let (_, event, data) =
        Sse::open(&base, &key_query(), Some(&cursors[0])).await.unwrap().next().await.unwrap();
    assert_eq!((event.as_str(), data["code"].as_str()), ("gap", Some("expired")), "{data}");
    // The last few are still kept: resuming there replays the rest.
    let mut recent = Sse::open(&base, &key_query(), Some(&cursors[295])).await.unwrap();
    for want in &cursors[296..] {
        let (id, event, _) = recent.next().await.unwrap();
        assert_eq!((event.as_str(), id.as_deref()), ("insert", Some(want.as_str())));
    }
    app.stop().await;
}
