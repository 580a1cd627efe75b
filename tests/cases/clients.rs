//! End-to-end with the official clients from their registries: `@supabase/realtime-js` under
//! node (both serializers) and the Python `realtime` client. `.ci/run` installs them; locally,
//! run `npm ci` in tests/clients/node and create tests/clients/python/.venv from requirements.txt.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::support::{self, exec, fresh_db, pool, TestApp};

const SCHEMA: &str = "
CREATE TABLE todos (id bigint PRIMARY KEY, task text, tags text[], meta jsonb, due timestamptz);
CREATE TABLE notes (id int PRIMARY KEY, body text);
ALTER TABLE notes REPLICA IDENTITY FULL;
";

pub(super) fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// A client process whose output is read as it comes (as an application handles events when
/// they arrive): a test that looks later finds it waiting, and the client never blocks on a
/// full pipe and stops reading its socket.
pub(super) struct ClientProcess {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ClientProcess {
    fn spawn(mut cmd: Command) -> ClientProcess {
        let mut child = cmd
            .env("WALCAST_TEST_APIKEY", support::anon_key())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("client starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        ClientProcess { child, lines }
    }

    pub(super) async fn next(&mut self) -> Value {
        self.next_within(Duration::from_secs(40)).await.expect("client output within 40 s")
    }

    /// The next line the client printed, or `None` after `wait` without one.
    pub(super) async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let line = tokio::time::timeout(wait, self.lines.recv()).await.ok()?.expect("client exited early");
        Some(serde_json::from_str(&line).unwrap_or_else(|_| panic!("client printed {line}")))
    }

    /// Waits for SUBSCRIBED; panics on an error status.
    pub(super) async fn subscribed(&mut self) {
        loop {
            let ev = self.next().await;
            if ev["kind"] == "status" {
                let status = ev["status"].as_str().unwrap_or("");
                assert!(status.ends_with("SUBSCRIBED"), "client status {ev}");
                return;
            }
        }
    }

    async fn changes(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let ev = self.next().await;
            match ev["kind"].as_str() {
                Some("change") => out.push(ev),
                Some("timeout") => panic!("client timed out after {} changes: {out:?}", out.len()),
                _ => {}
            }
        }
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(status.success(), "client exit {status}");
        out
    }
}

fn node_client(endpoint: &str, vsn: &str, bindings: &Value, expected: usize) -> ClientProcess {
    node_client_for(endpoint, vsn, bindings, expected, 30)
}

/// `subscribe.mjs`, giving up after `secs`.
pub(super) fn node_client_for(
    endpoint: &str,
    vsn: &str,
    bindings: &Value,
    expected: usize,
    secs: u32,
) -> ClientProcess {
    let dir = clients_dir().join("node");
    assert!(
        dir.join("node_modules/@supabase/realtime-js").exists(),
        "@supabase/realtime-js is not installed: run `npm ci` in {} (or .ci/run)",
        dir.display()
    );
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .env("WALCAST_TEST_CLIENT_SECS", secs.to_string())
        .arg("subscribe.mjs")
        .arg(endpoint)
        .arg(vsn)
        .arg(bindings.to_string())
        .arg(expected.to_string());
    ClientProcess::spawn(cmd)
}

fn python_client(endpoint: &str, bindings: &Value, expected: usize) -> ClientProcess {
    let dir = clients_dir().join("python");
    let python = dir.join(".venv/bin/python");
    assert!(
        python.exists(),
        "the Python realtime client is not installed: create {}/.venv and pip install -r requirements.txt (or .ci/run)",
        dir.display()
    );
    let mut cmd = Command::new(python);
    cmd.current_dir(&dir)
        .arg("subscribe.py")
        .arg(endpoint)
        .arg(bindings.to_string())
        .arg(expected.to_string());
    ClientProcess::spawn(cmd)
}

fn bindings() -> Value {
    json!([
        {"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=eq.1"},
        {"event": "*", "schema": "public", "table": "notes"}
    ])
}

async fn commit_workload(p: &sqlx::PgPool) {
    exec(p, "INSERT INTO todos VALUES (2, 'not mine', '{}', null, null)").await;
    exec(
        p,
        r#"INSERT INTO todos VALUES (1, 'mine', '{a,"b c"}', '{"k": [1, 2]}', '2025-11-19 00:22:40.877+00')"#,
    )
    .await;
    exec(p, "INSERT INTO notes VALUES (7, 'hello'); UPDATE notes SET body = 'bye' WHERE id = 7; DELETE FROM notes WHERE id = 7;").await;
}

fn check_js_payloads(changes: &[Value]) {
    let p: Vec<&Value> = changes.iter().map(|c| &c["payload"]).collect();
    assert_eq!(changes[0]["binding"], 0);
    assert_eq!(p[0]["eventType"], "INSERT");
    assert_eq!(
        p[0]["new"],
        json!({"id": 1, "task": "mine", "tags": ["a", "b c"], "meta": {"k": [1, 2]}, "due": "2025-11-19T00:22:40.877+00:00"})
    );
    assert_eq!(p[0]["old"], json!({}));
    assert!(p[0]["commit_timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", p[0]);
    assert_eq!((p[0]["schema"].as_str(), p[0]["table"].as_str()), (Some("public"), Some("todos")));
    let kinds: Vec<&str> = p[1..].iter().map(|x| x["eventType"].as_str().unwrap_or("")).collect();
    assert_eq!(kinds, ["INSERT", "UPDATE", "DELETE"]);
    assert_eq!(p[2]["new"], json!({"id": 7, "body": "bye"}));
    assert_eq!(p[2]["old"], json!({"id": 7, "body": "hello"}));
    assert_eq!(p[3]["old"], json!({"id": 7, "body": "bye"}));
    assert_eq!(p[3]["new"], json!({}));
}

async fn realtime_js(vsn: &str) {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn(&url).await;
    let mut client = node_client(&format!("ws://{}/realtime/v1", app.addr), vsn, &bindings(), 4);
    client.subscribed().await;
    commit_workload(&p).await;
    let changes = client.changes(4).await;
    check_js_payloads(&changes);
    app.stop().await;
}

#[tokio::test]
async fn realtime_js_vsn_2() {
    realtime_js("2.0.0").await;
}

#[tokio::test]
async fn realtime_js_vsn_1() {
    realtime_js("1.0.0").await;
}

#[tokio::test]
async fn python_realtime_client() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn(&url).await;
    let mut client = python_client(&format!("ws://{}/realtime/v1", app.addr), &bindings(), 4);
    client.subscribed().await;
    commit_workload(&p).await;
    let changes = client.changes(4).await;
    let data: Vec<&Value> = changes.iter().map(|c| &c["payload"]["data"]).collect();
    assert_eq!(changes[0]["binding"], 0);
    assert_eq!(data[0]["type"], "INSERT");
    assert_eq!(data[0]["record"]["tags"], json!(["a", "b c"]));
    assert_eq!(data[0]["record"]["id"], 1);
    let kinds: Vec<&str> = data[1..].iter().map(|d| d["type"].as_str().unwrap_or("")).collect();
    assert_eq!(kinds, ["INSERT", "UPDATE", "DELETE"]);
    assert_eq!(data[3]["old_record"], json!({"id": 7, "body": "bye"}));
    app.stop().await;
}

/// A client process driven by JSON-line commands (`peer.mjs` / `peer.py`).
pub(super) struct Peer {
    name: &'static str,
    child: Child,
    stdin: tokio::process::ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Events read while waiting for another kind, kept in order for later waits.
    pending: std::collections::VecDeque<Value>,
}

impl Peer {
    fn spawn(name: &'static str, mut cmd: Command) -> Peer {
        let mut child = cmd
            .env("WALCAST_TEST_APIKEY", support::anon_key())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("client starts");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        Peer { name, child, stdin, lines: BufReader::new(stdout).lines(), pending: Default::default() }
    }

    pub(super) fn js(name: &'static str, endpoint: &str, vsn: &str, topic: &str, config: Value) -> Peer {
        Peer::js_as(name, endpoint, vsn, topic, config, None)
    }

    /// A realtime-js peer whose `accessToken` option yields `token`.
    fn js_as(
        name: &'static str,
        endpoint: &str,
        vsn: &str,
        topic: &str,
        config: Value,
        token: Option<&str>,
    ) -> Peer {
        let dir = clients_dir().join("node");
        let mut cmd = Command::new("node");
        cmd.current_dir(&dir).arg("peer.mjs").arg(endpoint).arg(vsn).arg(topic).arg(config.to_string());
        if let Some(t) = token {
            cmd.env("WALCAST_TEST_ACCESS_TOKEN", t);
        }
        Peer::spawn(name, cmd)
    }

    /// A generic WebSocket client (Python `websockets`): lines in are frames out, and back.
    fn plain(name: &'static str, url: &str) -> Peer {
        let dir = clients_dir().join("python");
        let mut cmd = Command::new(dir.join(".venv/bin/python"));
        cmd.current_dir(&dir).arg("plain.py").arg(url);
        Peer::spawn(name, cmd)
    }

    /// The `graphql-ws` npm client on `url`, with `init` as its connection params.
    fn graphql(name: &'static str, url: &str, init: Value) -> Peer {
        let dir = clients_dir().join("node");
        let mut cmd = Command::new("node");
        cmd.current_dir(&dir).arg("graphql.mjs").arg(url).arg(init.to_string());
        Peer::spawn(name, cmd)
    }

    /// The `socket.io-client` npm package on `url`, with `options` as `io()` takes them.
    pub(super) fn socketio(name: &'static str, url: &str, options: Value) -> Peer {
        let dir = clients_dir().join("node");
        let mut cmd = Command::new("node");
        cmd.current_dir(&dir).arg("socketio.mjs").arg(url).arg(options.to_string());
        Peer::spawn(name, cmd)
    }

    /// The `python-socketio` client on `url`, with `options` (`auth`, `transports`).
    pub(super) fn python_socketio(name: &'static str, url: &str, options: Value) -> Peer {
        let dir = clients_dir().join("python");
        let mut cmd = Command::new(dir.join(".venv/bin/python"));
        cmd.current_dir(&dir).arg("socketio_client.py").arg(url).arg(options.to_string());
        Peer::spawn(name, cmd)
    }

    /// Headless Chromium driven by playwright-core (`browser.mjs`): `goto` and `eval` commands.
    pub(super) fn browser(name: &'static str) -> Peer {
        let dir = clients_dir().join("node");
        let mut cmd = Command::new("node");
        cmd.current_dir(&dir).arg("browser.mjs");
        Peer::spawn(name, cmd)
    }

    /// urql's client (`@urql/core`), its subscriptions over the `graphql-ws` client.
    fn urql(name: &'static str, url: &str, init: Value) -> Peer {
        let dir = clients_dir().join("node");
        let mut cmd = Command::new("node");
        cmd.current_dir(&dir).arg("graphql.mjs").arg(url).arg(init.to_string()).arg("urql");
        Peer::spawn(name, cmd)
    }

    /// The first frame of `type` (others are kept for later waits).
    async fn frame(&mut self, kind: &str) -> Value {
        self.until(kind, |v| v["type"] == kind).await
    }

    async fn raw(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        self.stdin.write_all(format!("{line}\n").as_bytes()).await.expect("write to client");
        self.stdin.flush().await.expect("flush");
    }

    fn python(name: &'static str, endpoint: &str, topic: &str, config: Value) -> Peer {
        Peer::python_as(name, endpoint, topic, config, None)
    }

    /// A Python peer that calls `set_auth(token)` before it joins.
    fn python_as(
        name: &'static str,
        endpoint: &str,
        topic: &str,
        config: Value,
        token: Option<&str>,
    ) -> Peer {
        let dir = clients_dir().join("python");
        let mut cmd = Command::new(dir.join(".venv/bin/python"));
        cmd.current_dir(&dir).arg("peer.py").arg(endpoint).arg(topic).arg(config.to_string());
        if let Some(t) = token {
            cmd.env("WALCAST_TEST_ACCESS_TOKEN", t);
        }
        Peer::spawn(name, cmd)
    }

    /// The first status event, whatever it is.
    async fn status(&mut self) -> Value {
        loop {
            let v = self.next("a status").await;
            if v["kind"] == "status" {
                return v;
            }
        }
    }

    pub(super) async fn cmd(&mut self, v: Value) {
        use tokio::io::AsyncWriteExt;
        let line = format!("{v}\n");
        self.stdin.write_all(line.as_bytes()).await.expect("write to client");
        self.stdin.flush().await.expect("flush");
    }

    async fn next(&mut self, what: &str) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(40), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{}: no output within 40 s while waiting for {what}", self.name))
            .expect("read")
            .unwrap_or_else(|| panic!("{} exited early", self.name));
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{} printed {line}", self.name));
        assert_ne!(v["kind"], "timeout", "{} timed out", self.name);
        v
    }

    /// The first event satisfying `pred` within `wait`, or `None`; others stay queued.
    pub(super) async fn within(&mut self, wait: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        if let Some(at) = self.pending.iter().position(&pred) {
            return self.pending.remove(at);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line()).await.ok()?;
            let line = line.expect("read").unwrap_or_else(|| panic!("{} exited early", self.name));
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("{} printed {line}", self.name));
            if pred(&v) {
                return Some(v);
            }
            self.pending.push_back(v);
        }
    }

    /// The first event satisfying `pred`; others stay queued for later waits (presence events,
    /// which arrive at any time, are dropped).
    pub(super) async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.pending.iter().position(&pred) {
            return self.pending.remove(at).unwrap_or_default();
        }
        loop {
            let v = self.next(what).await;
            if pred(&v) {
                return v;
            }
            if v["kind"] != "presence" {
                self.pending.push_back(v.clone());
            }
            assert!(
                v["kind"] != "status" || v["status"].as_str().is_some_and(|s| s.ends_with("SUBSCRIBED")),
                "{} while waiting for {what}: {v}",
                self.name
            );
        }
    }

    pub(super) async fn subscribed(&mut self) {
        let v = self.until("SUBSCRIBED", |v| v["kind"] == "status").await;
        assert!(v["status"].as_str().is_some_and(|s| s.ends_with("SUBSCRIBED")), "{}: {v}", self.name);
    }

    /// The next broadcast: (event, payload, meta).
    pub(super) async fn broadcast(&mut self) -> (String, Value, Value) {
        let v = self.until("a broadcast", |v| v["kind"] == "broadcast").await;
        (v["event"].as_str().unwrap_or("").to_owned(), v["payload"].clone(), v["meta"].clone())
    }

    async fn sent(&mut self) -> Value {
        let v = self.until("a command result", |v| v["kind"] == "sent").await;
        assert!(v.get("error").is_none_or(Value::is_null), "{}: {v}", self.name);
        v["result"].clone()
    }

    /// Waits until the presence state, as this client shows it, has exactly `keys`.
    pub(super) async fn presence_keys(&mut self, keys: &[&str]) -> Value {
        let mut want: Vec<&str> = keys.to_vec();
        want.sort();
        loop {
            self.cmd(json!({"op": "state"})).await;
            let v = self.until("state", |v| v["kind"] == "state").await;
            let mut have: Vec<String> =
                v["state"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
            have.sort();
            if have == want {
                return v["state"].clone();
            }
            // Presence events arrive asynchronously; wait for the next one, then look again.
            self.until("a presence event", |v| v["kind"] == "presence").await;
        }
    }

    /// Waits until the presence state, as this client shows it, has `n` metas under `key`.
    async fn presence_metas(&mut self, key: &str, n: usize) -> Value {
        loop {
            self.cmd(json!({"op": "state"})).await;
            let v = self.until("state", |v| v["kind"] == "state").await;
            if v["state"][key].as_array().map(Vec::len) == Some(n) {
                return v["state"].clone();
            }
            // Presence events arrive asynchronously; wait for the next one, then look again.
            self.until("a presence event", |v| v["kind"] == "presence").await;
        }
    }

    /// The events read and not yet taken that `pred` accepts.
    pub(super) fn pending_where(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.pending.iter().filter(|v| pred(v)).cloned().collect()
    }

    pub(super) async fn exit(mut self) {
        self.cmd(json!({"op": "exit"})).await;
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(status.success(), "{} exit {status}", self.name);
    }
}

/// A broadcast from `from` that every peer in `to` sees next, proving nothing else came first.
async fn fence(from: &mut Peer, to: &mut [&mut Peer], n: u32) {
    from.cmd(json!({"op": "send", "event": "fence", "payload": {"n": n}})).await;
    from.sent().await;
    for p in to.iter_mut() {
        let (event, payload, _) = p.broadcast().await;
        assert_eq!(
            (event.as_str(), &payload),
            ("fence", &json!({"n": n})),
            "{}: nothing before the fence",
            p.name
        );
    }
}

#[tokio::test]
async fn broadcast_with_the_official_clients() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn(&url).await;
    let endpoint = format!("ws://{}/realtime/v1", app.addr);
    let mut js2 =
        Peer::js("js 2.0.0", &endpoint, "2.0.0", "room", json!({"broadcast": {"self": true, "ack": true}}));
    let mut js1 = Peer::js("js 1.0.0", &endpoint, "1.0.0", "room", json!({"broadcast": {"self": false}}));
    let mut py =
        Peer::python("python", &endpoint, "room", json!({"broadcast": {"self": false, "ack": false}}));
    for peer in [&mut js2, &mut js1, &mut py] {
        peer.subscribed().await;
    }

    // JSON broadcast from a 2.0.0 client (binary kind 3 on the wire): ack, self echo, both serializers.
    js2.cmd(json!({"op": "send", "event": "cursor", "payload": {"x": 1, "y": [2, 3]}})).await;
    assert_eq!(js2.sent().await, "ok", "ack: true resolves after the server's reply");
    for peer in [&mut js2, &mut js1, &mut py] {
        let (event, payload, _) = peer.broadcast().await;
        assert_eq!((event.as_str(), payload), ("cursor", json!({"x": 1, "y": [2, 3]})), "{}", peer.name);
    }

    // From a 1.0.0 client without self: not echoed.
    js1.cmd(json!({"op": "send", "event": "typing", "payload": {"on": true}})).await;
    js1.sent().await;
    for peer in [&mut js2, &mut py] {
        assert_eq!(peer.broadcast().await.0, "typing", "{}", peer.name);
    }
    fence(&mut js2, &mut [&mut js1, &mut py], 1).await;
    assert_eq!(js2.broadcast().await.0, "fence", "self: true echoes the fence");

    // Binary payload: 2.0.0 members receive the bytes; 1.0.0 members receive nothing.
    js2.cmd(json!({"op": "send", "event": "blob", "bytes": [0, 1, 2, 255]})).await;
    js2.sent().await;
    let (event, payload, _) = js2.broadcast().await;
    assert_eq!((event.as_str(), payload), ("blob", json!({"bytes": [0, 1, 2, 255]})));
    fence(&mut js2, &mut [&mut js1, &mut py], 2).await;
    js2.broadcast().await;

    // From Python (1.0.0 JSON push).
    py.cmd(json!({"op": "send", "event": "from_py", "payload": {"n": 3}})).await;
    py.sent().await;
    for peer in [&mut js2, &mut js1] {
        assert_eq!(peer.broadcast().await, ("from_py".into(), json!({"n": 3}), Value::Null), "{}", peer.name);
    }

    // REST: realtime-js httpSend (single-message endpoint, JSON and binary) and Python http_send.
    js1.cmd(json!({"op": "httpSend", "event": "rest", "payload": {"via": "http"}})).await;
    assert_eq!(js1.sent().await, json!({"success": true}));
    for peer in [&mut js2, &mut js1, &mut py] {
        assert_eq!(peer.broadcast().await.1, json!({"via": "http"}), "{}", peer.name);
    }
    js1.cmd(json!({"op": "httpSend", "event": "rest_bytes", "bytes": [9, 8]})).await;
    js1.sent().await;
    assert_eq!(js2.broadcast().await.1, json!({"bytes": [9, 8]}));
    py.cmd(json!({"op": "httpSend", "event": "rest_py", "payload": {"via": "python"}})).await;
    py.sent().await;
    // REST messages have no sender channel: every member receives them, the sender's too.
    for peer in [&mut js2, &mut js1, &mut py] {
        assert_eq!(peer.broadcast().await.0, "rest_py", "{}", peer.name);
    }

    // realtime-js send() on a client that is not connected falls back to the batch endpoint.
    js1.cmd(json!({"op": "restBatch", "event": "batched", "payload": {"via": "batch"}})).await;
    assert_eq!(js1.sent().await, "ok");
    for peer in [&mut js2, &mut js1, &mut py] {
        assert_eq!(
            peer.broadcast().await,
            ("batched".into(), json!({"via": "batch"}), Value::Null),
            "{}",
            peer.name
        );
    }

    // From the database: delivered on commit with meta.id; a rollback delivers nothing.
    exec(&p, "BEGIN; SELECT realtime.send('{\"lost\": 1}', 'db', 'room', false); ROLLBACK;").await;
    exec(&p, "SELECT realtime.send('{\"kept\": 1}', 'db', 'room', false)").await;
    for peer in [&mut js2, &mut js1, &mut py] {
        let (event, payload, meta) = peer.broadcast().await;
        assert_eq!(
            (event.as_str(), &payload["kept"]),
            ("db", &json!(1)),
            "{}: the rolled-back one never came",
            peer.name
        );
        assert!(meta["id"].is_string() && payload["id"] == meta["id"], "{}: {payload} {meta}", peer.name);
    }
    for peer in [js2, js1, py] {
        peer.exit().await;
    }
    app.stop().await;
}

#[tokio::test]
async fn presence_with_the_official_clients() {
    let url = fresh_db().await;
    let app = TestApp::spawn(&url).await;
    let endpoint = format!("ws://{}/realtime/v1", app.addr);
    let mut a = Peer::js("js 2.0.0", &endpoint, "2.0.0", "lobby", json!({"presence": {"key": "alice"}}));
    let mut b = Peer::js("js 1.0.0", &endpoint, "1.0.0", "lobby", json!({"presence": {"key": "bob"}}));
    let mut c = Peer::python("python", &endpoint, "lobby", json!({"presence": {"key": "carol"}}));
    for peer in [&mut a, &mut b, &mut c] {
        peer.subscribed().await;
    }
    a.cmd(json!({"op": "track", "payload": {"name": "Alice"}})).await;
    assert_eq!(a.sent().await, "ok");
    b.cmd(json!({"op": "track", "payload": {"name": "Bob"}})).await;
    b.sent().await;
    c.cmd(json!({"op": "track", "payload": {"name": "Carol"}})).await;
    c.sent().await;
    for peer in [&mut a, &mut b, &mut c] {
        let state = peer.presence_keys(&["alice", "bob", "carol"]).await;
        assert_eq!(state["alice"][0]["name"], "Alice", "{}: {state}", peer.name);
        assert!(
            state["alice"][0]["presence_ref"].is_string() || state["alice"][0]["phx_ref"].is_string(),
            "{state}"
        );
    }
    // A second tab for alice: two presences under one key.
    let mut a2 =
        Peer::js("js second tab", &endpoint, "2.0.0", "lobby", json!({"presence": {"key": "alice"}}));
    a2.subscribed().await;
    a2.cmd(json!({"op": "track", "payload": {"name": "Alice", "tab": 2}})).await;
    a2.sent().await;
    let join = a.until("alice's second join", |v| v["event"] == "join" && v["key"] == "alice").await;
    assert_eq!(join["presences"][0]["tab"], 2, "{join}");
    a.presence_metas("alice", 2).await;
    // Untrack, and a client that dies: both leave for everyone.
    c.cmd(json!({"op": "untrack"})).await;
    c.sent().await;
    let leave = b.until("carol leaves", |v| v["event"] == "leave" && v["key"] == "carol").await;
    assert_eq!(leave["presences"][0]["name"], "Carol");
    drop(b);
    for peer in [&mut a, &mut c] {
        peer.presence_keys(&["alice"]).await;
    }
    a2.exit().await;
    // The key stays while one tab tracks it: wait for the second tab's meta to leave.
    let state = c.presence_metas("alice", 1).await;
    assert_eq!(state["alice"].as_array().map(Vec::len), Some(1), "{state}");
    assert_eq!(state.as_object().map(|o| o.len()), Some(1), "{state}");
    a.exit().await;
    c.exit().await;
    app.stop().await;
}

#[tokio::test]
async fn tokens_with_the_official_clients() {
    let url = fresh_db().await;
    let app = TestApp::spawn(&url).await;
    let endpoint = format!("ws://{}/realtime/v1", app.addr);
    let config = json!({"broadcast": {"self": true, "ack": true}});
    let user = support::token("authenticated", Some("user-1"));
    let expired = support::token_expiring("authenticated", Some("user-1"), -60);

    // realtime-js with the accessToken option, Python with set_auth: joined with the user token.
    let mut js = Peer::js_as("js user", &endpoint, "2.0.0", "room", config.clone(), Some(&user));
    let mut py = Peer::python_as("python user", &endpoint, "room", config.clone(), Some(&user));
    js.subscribed().await;
    py.subscribed().await;
    fence(&mut js, &mut [&mut py], 1).await;
    assert_eq!(js.broadcast().await.0, "fence");

    // An expired user token: the join is refused with Supabase's reason, on both clients.
    for mut peer in [
        Peer::js_as("js expired", &endpoint, "2.0.0", "room", config.clone(), Some(&expired)),
        Peer::python_as("python expired", &endpoint, "room", config.clone(), Some(&expired)),
    ] {
        let v = peer.status().await;
        assert!(v["status"].as_str().is_some_and(|s| s.ends_with("CHANNEL_ERROR")), "{}: {v}", peer.name);
        let err = v["error"].as_str().unwrap_or("");
        assert!(err.contains("InvalidJWTToken: Token has expired"), "{}: {err}", peer.name);
    }

    // setAuth with a new valid token: pushed to the joined channel, which stays open.
    js.cmd(json!({"op": "setAuth", "token": support::token("authenticated", Some("user-1"))})).await;
    js.sent().await;
    fence(&mut js, &mut [&mut py], 2).await;
    assert_eq!(js.broadcast().await.0, "fence");
    // setAuth with a forged token closes the channel for that client only.
    let forged = support::signed(
        &json!({"role": "service_role", "exp": walcast::auth::unix_now() + 600}),
        "forged-secret-forged-secret-forged-secret",
    );
    js.cmd(json!({"op": "setAuth", "token": forged})).await;
    let v = js.status().await;
    assert!(
        v["status"].as_str().is_some_and(|s| s.ends_with("CLOSED") || s.ends_with("CHANNEL_ERROR")),
        "{v}"
    );
    py.cmd(json!({"op": "send", "event": "still", "payload": {}})).await;
    py.sent().await;
    assert_eq!(py.broadcast().await.0, "still", "the other client's channel is untouched");
    py.exit().await;
    app.stop().await;
}

/// Rows owned by users (`owner = auth.uid()`), and a private room whose members are listed.
const OWNED: &str = "
CREATE TABLE docs (id int PRIMARY KEY, owner uuid, body text);
ALTER TABLE docs REPLICA IDENTITY FULL;
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON docs FOR SELECT TO authenticated USING (owner = auth.uid());
CREATE TABLE room_members (room text, user_id uuid);
GRANT SELECT ON room_members TO authenticated;
";

const ROOM_POLICIES: &str = "
CREATE POLICY members ON realtime.messages FOR SELECT TO authenticated USING (
    EXISTS (SELECT 1 FROM public.room_members m WHERE m.room = realtime.topic() AND m.user_id = auth.uid()));
CREATE POLICY members_send ON realtime.messages FOR INSERT TO authenticated WITH CHECK (
    EXISTS (SELECT 1 FROM public.room_members m WHERE m.room = realtime.topic() AND m.user_id = auth.uid()));
";

impl Peer {
    /// The (type, id) of each change up to the one whose record's body is `end`, in the shape
    /// the client delivers (realtime-js: `eventType`/`new`/`old`; Python: `data`).
    async fn changes_until(&mut self, end: &str) -> Vec<(String, i64)> {
        let mut seen = Vec::new();
        loop {
            let v = self.until("a change", |v| v["kind"] == "change").await;
            let p = &v["payload"];
            let (kind, new, old) = if p.get("eventType").is_some() {
                (&p["eventType"], &p["new"], &p["old"])
            } else {
                (&p["data"]["type"], &p["data"]["record"], &p["data"]["old_record"])
            };
            if new["body"] == end {
                return seen;
            }
            let id = if kind == "DELETE" { &old["id"] } else { &new["id"] };
            seen.push((kind.as_str().unwrap_or("").to_owned(), id.as_i64().unwrap_or(-1)));
        }
    }
}

#[tokio::test]
async fn row_level_security_and_private_channels_with_the_official_clients() {
    const A: &str = "00000000-0000-0000-0000-00000000000a";
    const B: &str = "00000000-0000-0000-0000-00000000000b";
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, crate::support::AUTH_UID).await;
    exec(&p, OWNED).await;
    let app = TestApp::spawn(&url).await;
    exec(&p, ROOM_POLICIES).await;
    exec(&p, &format!("INSERT INTO room_members VALUES ('room', '{A}')")).await;
    let endpoint = format!("ws://{}/realtime/v1", app.addr);
    let (a, b) = (support::token("authenticated", Some(A)), support::token("authenticated", Some(B)));
    let docs = json!([{"event": "*", "schema": "public", "table": "docs"}]);

    // A member on the private room with realtime-js; B on the public one with Python.
    let private =
        json!({"private": true, "broadcast": {"self": true, "ack": true}, "postgres_changes": docs});
    let mut js = Peer::js_as("js A", &endpoint, "2.0.0", "room", private, Some(&a));
    let mut py = Peer::python_as("python B", &endpoint, "room", json!({"postgres_changes": docs}), Some(&b));
    js.subscribed().await;
    py.subscribed().await;
    // B is no member: its private joins are refused, on both clients.
    for mut peer in [
        Peer::js_as("js B private", &endpoint, "2.0.0", "room", json!({"private": true}), Some(&b)),
        Peer::python_as("python B private", &endpoint, "room", json!({"private": true}), Some(&b)),
    ] {
        let v = peer.status().await;
        assert!(v["status"].as_str().is_some_and(|s| s.ends_with("CHANNEL_ERROR")), "{}: {v}", peer.name);
        let err = v["error"].as_str().unwrap_or("");
        assert!(
            err.contains("Unauthorized: You do not have permissions to read from this Channel topic: room"),
            "{}: {err}",
            peer.name
        );
    }

    // Each sees only its own rows' versions.
    exec(
        &p,
        &format!(
            "INSERT INTO docs VALUES (1, '{A}', 'a1'), (2, '{B}', 'b2');
             UPDATE docs SET body = 'a1 v2' WHERE id = 1;
             DELETE FROM docs WHERE id = 2;
             INSERT INTO docs VALUES (3, '{A}', 'end'), (4, '{B}', 'end');"
        ),
    )
    .await;
    let own = |pairs: &[(&str, i64)]| pairs.iter().map(|(k, i)| ((*k).to_owned(), *i)).collect::<Vec<_>>();
    assert_eq!(js.changes_until("end").await, own(&[("INSERT", 1), ("UPDATE", 1)]));
    assert_eq!(py.changes_until("end").await, own(&[("INSERT", 2), ("DELETE", 2)]));

    // The member may send on the private room.
    js.cmd(json!({"op": "send", "event": "hi", "payload": {"n": 1}})).await;
    assert_eq!(js.sent().await, "ok");
    assert_eq!(js.broadcast().await.0, "hi");

    // setAuth to B's token: reading the private room is revoked, so the channel closes.
    js.cmd(json!({"op": "setAuth", "token": b})).await;
    js.sent().await;
    let v = js.status().await;
    assert!(
        v["status"].as_str().is_some_and(|s| s.ends_with("CLOSED") || s.ends_with("CHANNEL_ERROR")),
        "{v}"
    );
    exec(&p, &format!("INSERT INTO docs VALUES (5, '{B}', 'b5'), (6, '{B}', 'end')")).await;
    assert_eq!(py.changes_until("end").await, own(&[("INSERT", 5)]), "the other client is untouched");
    py.exit().await;
    app.stop().await;
}

/// The plain JSON WebSocket protocol (`/v1/ws`) from a generic client (Python `websockets`):
/// ping, auth by message, a table channel with filter / events / select and a snapshot, live
/// changes with cursors, errors, a broadcast room shared with Phoenix clients, and a resume with
/// `since` after unsubscribing.
#[tokio::test]
async fn plain_websocket_protocol_from_a_generic_client() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(
        &p,
        "CREATE TABLE items (id bigint PRIMARY KEY, v text, w text); \
              INSERT INTO items SELECT g, 'v' || g, 'w' FROM generate_series(1, 5) g",
    )
    .await;
    let app = TestApp::spawn(&url).await;
    let mut c = Peer::plain("python websockets", &format!("ws://{}/v1/ws", app.addr));

    c.cmd(json!({"type": "ping", "id": 1})).await;
    assert_eq!(c.frame("pong").await, json!({"type": "pong", "id": 1}));
    let table = "table:public.items";
    c.cmd(json!({"type": "subscribe", "channel": table})).await;
    let e = c.frame("error").await;
    assert!(e["message"].as_str().is_some_and(|m| m.contains("auth")), "{e}");
    c.cmd(json!({"type": "auth", "token": "not-a-jwt"})).await;
    assert!(c.frame("error").await["message"].is_string());
    c.cmd(json!({"type": "auth", "token": support::anon_key(), "id": "a"})).await;
    assert_eq!(c.frame("authenticated").await["id"], "a");

    c.cmd(json!({"type": "subscribe", "channel": table, "filter": "nope"})).await;
    assert!(c.frame("error").await["message"].as_str().is_some_and(|m| m.contains("filter")));
    c.cmd(json!({"type": "subscribe", "id": 3, "channel": table, "filter": "id=lte.3",
                 "events": ["insert", "update"], "select": ["v"], "snapshot": true}))
        .await;
    let sub = c.frame("subscribed").await;
    assert!(sub["id"] == 3 && sub["cursor"].as_str().is_some_and(|c| c.len() == 32), "{sub}");
    let mut rows = Vec::new();
    let end = loop {
        let f = c.until("snapshot", |v| v["type"] == "change" || v["type"] == "snapshot-end").await;
        if f["type"] == "snapshot-end" {
            break f;
        }
        assert_eq!(
            (&f["channel"], &f["data"]["snapshot"], f.get("cursor")),
            (&json!(table), &json!(true), None)
        );
        rows.push(f["data"]["record"].clone());
    };
    rows.sort_by_key(|r| r["id"].as_i64());
    assert_eq!(rows, [json!({"id": 1, "v": "v1"}), json!({"id": 2, "v": "v2"}), json!({"id": 3, "v": "v3"})]);
    assert_eq!(end["rows"], 3, "{end}");

    exec(
        &p,
        "INSERT INTO items VALUES (9, 'x', 'w'); UPDATE items SET v = 'B' WHERE id = 2; \
              DELETE FROM items WHERE id = 1; INSERT INTO items VALUES (0, 'z', 'w')",
    )
    .await;
    let update = c.frame("change").await;
    assert_eq!(
        (&update["data"]["type"], &update["data"]["record"]),
        (&json!("UPDATE"), &json!({"id": 2, "v": "B"}))
    );
    let cursor = update["cursor"].as_str().expect("cursor").to_owned();
    assert_eq!(update["data"]["cursor"], cursor.as_str(), "one change shape: the cursor is in data too");
    let insert = c.frame("change").await;
    assert_eq!(insert["data"]["record"], json!({"id": 0, "v": "z"}), "no delete (events), no id 9 (filter)");
    c.cmd(json!({"type": "ping", "id": "fence"})).await;
    let next = c.next("the fence").await;
    assert_eq!(next["type"], "pong", "nothing else was delivered: {next}");

    // Errors, each to this client only.
    c.raw("{not json").await;
    assert!(c.frame("error").await["message"].as_str().is_some_and(|m| m.starts_with("invalid JSON")));
    c.cmd(json!({"type": "hello"})).await;
    assert!(c.frame("error").await["message"].as_str().is_some_and(|m| m.contains("unknown message type")));
    c.cmd(json!({"type": "subscribe", "channel": "table:items"})).await;
    assert!(c.frame("error").await["message"].as_str().is_some_and(|m| m.contains("table:<schema>.<table>")));
    c.cmd(json!({"type": "subscribe", "channel": table})).await;
    assert!(c.frame("error").await["message"].as_str().is_some_and(|m| m.contains("already subscribed")));

    // A broadcast room shared with a Phoenix client.
    let mut phx = app.ws(None).await;
    let reply = phx.join_config("chat", json!({"broadcast": {"self": false}})).await;
    assert_eq!(reply["status"], "ok");
    c.cmd(json!({"type": "subscribe", "channel": "chat"})).await;
    assert_eq!(c.frame("subscribed").await["channel"], "chat");
    c.cmd(json!({"type": "publish", "id": 7, "channel": "chat", "event": "typing", "data": {"who": "py"}}))
        .await;
    assert_eq!(c.frame("published").await["id"], 7);
    let b = phx.recv_event("broadcast").await;
    assert_eq!((&b["event"], &b["payload"]), (&json!("typing"), &json!({"who": "py"})));
    phx.push(
        Some("j1"),
        "realtime:chat",
        "broadcast",
        json!({"type": "broadcast", "event": "hi", "payload": {"n": 1}}),
    )
    .await;
    let m = c.frame("message").await;
    assert_eq!(m, json!({"type": "message", "channel": "chat", "event": "hi", "data": {"n": 1}}));

    // Unsubscribed, the client misses changes; subscribing with `since` replays them.
    c.cmd(json!({"type": "unsubscribe", "channel": table})).await;
    assert_eq!(c.frame("unsubscribed").await["channel"], table);
    exec(&p, "UPDATE items SET v = 'C' WHERE id = 3").await;
    c.cmd(json!({"type": "subscribe", "channel": table, "filter": "id=lte.3", "since": cursor})).await;
    c.frame("subscribed").await;
    let mut replayed = Vec::new();
    for _ in 0..3 {
        let f = c.frame("change").await;
        let id = if f["data"]["type"] == "DELETE" {
            &f["data"]["old_record"]["id"]
        } else {
            &f["data"]["record"]["id"]
        };
        replayed.push(json!([f["data"]["type"], id]));
    }
    assert_eq!(
        replayed,
        [json!(["DELETE", 1]), json!(["INSERT", 0]), json!(["UPDATE", 3])],
        "after the cursor, in order"
    );

    // Database broadcasts carry a cursor; a room resumed from one gets those it missed.
    exec(&p, "SELECT realtime.send('{\"n\": 1}'::jsonb, 'db', 'chat', false)").await;
    let first = c.frame("message").await;
    assert_eq!((&first["event"], &first["data"]["n"]), (&json!("db"), &json!(1)), "{first}");
    let room_cursor = first["cursor"].as_str().expect("a database broadcast's cursor").to_owned();
    c.cmd(json!({"type": "unsubscribe", "channel": "chat"})).await;
    assert_eq!(c.frame("unsubscribed").await["channel"], "chat");
    exec(&p, "SELECT realtime.send('{\"n\": 2}'::jsonb, 'db', 'chat', false)").await;
    exec(&p, "SELECT realtime.send('{\"n\": 3}'::jsonb, 'db', 'chat', false)").await;
    c.cmd(json!({"type": "subscribe", "channel": "chat", "since": "2026-01-01T00:00:00Z"})).await;
    assert!(c.frame("error").await["message"].as_str().is_some_and(|m| m.contains("from a cursor")));
    c.cmd(json!({"type": "subscribe", "channel": "chat", "since": room_cursor})).await;
    c.frame("subscribed").await;
    for n in [2, 3] {
        let m = c.frame("message").await;
        assert_eq!(m["data"]["n"], n, "{m}");
        assert!(m["cursor"].as_str() > Some(room_cursor.as_str()), "{m}");
    }
    app.stop().await;
}

/// A GET with the `curl` command line: (status, JSON body).
async fn curl(url: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-H", "Accept: application/json", "-w", "\n%{http_code}", url])
        .output()
        .await
        .expect("curl runs (apt-get install curl)");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("a status line");
    (status.trim().parse().expect("a status"), serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn long_poll_from_curl() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE items (id bigint PRIMARY KEY, v text)").await;
    let app = TestApp::spawn(&url).await;
    let changes =
        format!("http://{}/v1/tables/public.items/changes?access_token={}", app.addr, support::anon_key());

    let (status, first) = curl(&format!("{changes}&wait=0")).await;
    assert_eq!((status, &first["changes"]), (200, &json!([])), "{first}");
    let mut cursor = first["cursor"].as_str().expect("a cursor").to_owned();
    // A held poll answers when a change commits.
    let held = tokio::spawn(curl_owned(format!("{changes}&since={cursor}&wait=30")));
    // The poll is held once the gateway counts its client; only then commit.
    crate::support::wait_for("the poll to be held", std::time::Duration::from_secs(20), || {
        let addr = app.addr;
        async move {
            let m = support::http_get(&format!("http://{addr}/metrics")).await.ok()?;
            let gauge = format!("{} ", walcast::server::metrics::CLIENTS);
            m.lines().any(|l| l.starts_with(&gauge) && !l.ends_with(" 0")).then_some(())
        }
    })
    .await;
    exec(&p, "INSERT INTO items VALUES (1, 'a')").await;
    let (status, body) = held.await.unwrap();
    assert_eq!((status, body["changes"][0]["record"]["id"].as_i64()), (200, Some(1)), "{body}");
    cursor = body["cursor"].as_str().unwrap().to_owned();
    // Waiting changes come at once, `limit` at a time, each once.
    exec(&p, "INSERT INTO items VALUES (2, 'b'); INSERT INTO items VALUES (3, 'c')").await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let (status, body) = curl(&format!("{changes}&since={cursor}&limit=1&wait=20")).await;
        assert_eq!(status, 200, "{body}");
        got.extend(body["changes"].as_array().unwrap().iter().map(|c| c["record"]["id"].as_i64().unwrap()));
        cursor = body["cursor"].as_str().unwrap().to_owned();
    }
    assert_eq!(got, [2, 3]);
    let (status, body) = curl(&format!("{changes}&since=00000000{}", &cursor[8..])).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("other_log")), "{body}");
    app.stop().await;
}

async fn curl_owned(url: String) -> (u16, Value) {
    curl(&url).await
}

/// realtime-js resumes after a reconnect with `since` set to the last `commit_timestamp` it saw
/// (the callback payload carries no cursor), and takes a snapshot into its INSERT handler.
#[tokio::test]
async fn realtime_js_resumes_with_since_and_reads_a_snapshot() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn(&url).await;
    let endpoint = format!("ws://{}/realtime/v1", app.addr);
    let binding = json!({"event": "INSERT", "schema": "public", "table": "notes"});
    let mut first = node_client(&endpoint, "2.0.0", &json!([binding]), 3);
    first.subscribed().await;
    for id in 1..=3 {
        exec(&p, &format!("INSERT INTO notes VALUES ({id}, 'n{id}')")).await;
    }
    let seen = first.changes(3).await;
    let last = seen[2]["payload"]["commit_timestamp"].as_str().expect("commit_timestamp").to_owned();

    // Missed while disconnected.
    for id in 4..=6 {
        exec(&p, &format!("INSERT INTO notes VALUES ({id}, 'n{id}')")).await;
    }
    let mut resumed = binding.clone();
    resumed["since"] = json!(last);
    let mut second = node_client(&endpoint, "2.0.0", &json!([resumed]), 100);
    second.subscribed().await;
    exec(&p, "INSERT INTO notes VALUES (7, 'live')").await;
    let mut ids = Vec::new();
    while ids.last() != Some(&7) {
        let ev = second.next().await;
        assert_ne!(ev["kind"], "timeout", "{ids:?}");
        if ev["kind"] == "change" {
            ids.push(ev["payload"]["new"]["id"].as_i64().expect("id"));
        }
    }
    // Changes of the last millisecond seen may repeat (the timestamp has millisecond
    // precision); nothing after it is missed, and the order is the commit order.
    let from = ids.iter().position(|&id| id == 4).unwrap_or_else(|| panic!("4 missed: {ids:?}"));
    assert_eq!(ids[from..], [4, 5, 6, 7], "{ids:?}");
    assert!(ids[..from].contains(&3) && ids[..from].iter().all(|&id| id <= 3), "{ids:?}");

    // A snapshot: current rows reach the INSERT handler, then the `system` end marker, then live.
    let mut snap = binding.clone();
    snap["snapshot"] = json!(true);
    let mut third = node_client(&endpoint, "2.0.0", &json!([snap]), 8);
    let mut rows = Vec::new();
    let mut ended = false;
    while !ended {
        let ev = third.next().await;
        match ev["kind"].as_str() {
            Some("change") => rows.push(ev["payload"]["new"]["id"].as_i64().expect("id")),
            Some("system") if ev["payload"]["snapshot"] == "end" => {
                assert_eq!(ev["payload"]["rows"], 7, "{ev}");
                ended = true;
            }
            Some("status") => {
                assert!(ev["status"].as_str().is_some_and(|s| s.ends_with("SUBSCRIBED")), "{ev}")
            }
            _ => {}
        }
    }
    rows.sort_unstable();
    assert_eq!(rows, (1..=7).collect::<Vec<_>>());
    exec(&p, "INSERT INTO notes VALUES (8, 'after')").await;
    let live = third.changes(1).await;
    assert_eq!(live[0]["payload"]["new"]["id"], 8);
    app.stop().await;
}

/// The `graphql-ws` client's next result of subscription `id` (its `data`).
async fn graphql_next(c: &mut Peer, id: &str) -> Value {
    let v = c.until(&format!("a result of {id}"), |v| v["id"] == id && v["event"] != "disposed").await;
    assert_eq!(v["event"], "next", "{v}");
    v["payload"]["data"].clone()
}

#[tokio::test]
async fn graphql_ws_client_typed_generic_and_live_subscriptions() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    exec(&p, "INSERT INTO todos VALUES (1, 'a', '{x}', '{\"k\": 1}', NULL), (2, 'b', NULL, NULL, NULL)")
        .await;
    let app = TestApp::spawn(&url).await;
    let endpoint = format!("ws://{}/graphql", app.addr);
    let mut c = Peer::graphql(
        "graphql-ws",
        &endpoint,
        json!({"Authorization": format!("Bearer {}", support::anon_key())}),
    );
    c.until("connected", |v| v["event"] == "connected").await;

    // A live query: its rows, READY, then rows entering and leaving.
    let live = "subscription { todos_live(filter: \"task=eq.a\") { kind key record { id task tags meta } } }";
    c.cmd(json!({"op": "subscribe", "id": "live", "query": live})).await;
    let first = graphql_next(&mut c, "live").await;
    assert_eq!(
        first["todos_live"],
        json!({"kind": "SNAPSHOT", "key": {"id": 1}, "record": {"id": 1, "task": "a", "tags": ["x"], "meta": {"k": 1}}})
    );
    assert_eq!(graphql_next(&mut c, "live").await["todos_live"]["kind"], "READY");

    // Typed and generic change subscriptions; each is live once it delivers (probe rows until then).
    let typed = "subscription { todos_changes(events: [INSERT, UPDATE], filter: \"id=gt.100\") { type cursor record { id task } oldRecord { id } } }";
    c.cmd(json!({"op": "subscribe", "id": "typed", "query": typed})).await;
    let generic = "subscription($t: String!) { changes(table: $t, events: [INSERT]) { type table record } }";
    c.cmd(json!({"op": "subscribe", "id": "generic", "query": generic, "variables": {"t": "public.notes"}}))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut typed_live, mut generic_live) = (false, false);
    let mut n = 0;
    while !(typed_live && generic_live) {
        assert!(tokio::time::Instant::now() < deadline, "subscriptions not delivering within 30 s");
        n += 1;
        exec(
            &p,
            &format!(
                "INSERT INTO todos VALUES ({}, 'probe'); INSERT INTO notes VALUES ({n}, 'probe')",
                100 + n
            ),
        )
        .await;
        let probe = |v: &Value| v["event"] == "next" && v["id"] != "live";
        while let Some(v) = c.within(Duration::from_millis(300), probe).await {
            typed_live |= v["id"] == "typed";
            generic_live |= v["id"] == "generic";
        }
    }
    exec(&p, "INSERT INTO todos VALUES (500, 'new'); UPDATE todos SET task = 'newer' WHERE id = 500; INSERT INTO notes VALUES (500, 'hello')").await;
    let mut typed_seen = Vec::new();
    while typed_seen.len() < 2 {
        let d = graphql_next(&mut c, "typed").await;
        let change = &d["todos_changes"];
        if change["record"]["task"] != "probe" {
            assert!(change["cursor"].is_string(), "{d}");
            typed_seen.push(json!([change["type"], change["record"], change["oldRecord"]]));
        }
    }
    assert_eq!(
        typed_seen,
        [
            json!(["INSERT", {"id": 500, "task": "new"}, null]),
            json!(["UPDATE", {"id": 500, "task": "newer"}, {"id": 500}]),
        ]
    );
    loop {
        let d = graphql_next(&mut c, "generic").await;
        if d["changes"]["record"]["body"] == "hello" {
            assert_eq!(
                d["changes"],
                json!({"type": "INSERT", "table": "notes", "record": {"id": 500, "body": "hello"}})
            );
            break;
        }
    }
    // The live query saw none of that; now a row enters and one leaves.
    exec(&p, "UPDATE todos SET task = 'a' WHERE id = 2; UPDATE todos SET task = 'z' WHERE id = 1").await;
    let enter = graphql_next(&mut c, "live").await;
    assert_eq!(enter["todos_live"]["kind"], "ENTER", "{enter}");
    assert_eq!(enter["todos_live"]["record"]["id"], 2);
    let leave = graphql_next(&mut c, "live").await;
    assert_eq!(leave["todos_live"], json!({"kind": "LEAVE", "key": {"id": 1}, "record": null}));

    // A document that does not validate reaches the client's error callback.
    c.cmd(json!({"op": "subscribe", "id": "bad", "query": "subscription { todos_changes { nope } }"})).await;
    let e = c.until("the error", |v| v["id"] == "bad").await;
    assert_eq!(e["event"], "error", "{e}");
    assert!(e["errors"][0]["message"].as_str().unwrap_or("").contains("nope"), "{e}");
    c.cmd(json!({"op": "exit"})).await;

    // A token that does not verify: the client sees the socket closed with 4403.
    let mut refused = Peer::graphql("graphql-ws refused", &endpoint, json!({"Authorization": "Bearer nope"}));
    let closed = refused.until("closed", |v| v["event"] == "closed").await;
    assert_eq!(closed["code"], 4403, "{closed}");
    app.stop().await;
}

#[tokio::test]
async fn urql_subscribes_with_variables_typename_and_an_ordered_live_query() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    exec(&p, "INSERT INTO todos VALUES (1, 'a'), (2, 'b'), (3, 'a'), (4, 'a')").await;
    let app = TestApp::spawn(&url).await;
    let endpoint = format!("ws://{}/graphql", app.addr);
    let mut c =
        Peer::urql("urql", &endpoint, json!({"Authorization": format!("Bearer {}", support::anon_key())}));
    c.until("connected", |v| v["event"] == "connected").await;

    // `__typename` in selections (as normalized caches ask for it); `where` takes variables;
    // `orderBy` orders the initial result.
    let live = "subscription($task: String) { todos_live(where: {task: {_eq: $task}}, orderBy: [{id: desc}]) { __typename kind key record { __typename id task } } }";
    c.cmd(json!({"op": "subscribe", "id": "live", "query": live, "variables": {"task": "a"}})).await;
    let mut order = Vec::new();
    loop {
        let d = graphql_next(&mut c, "live").await;
        let m = &d["todos_live"];
        assert_eq!(m["__typename"], "todos_Live", "{d}");
        if m["kind"] == "READY" {
            break;
        }
        assert_eq!(m["kind"], "SNAPSHOT", "{d}");
        assert_eq!(m["record"]["__typename"], "todos", "{d}");
        assert_eq!(m["record"]["task"], "a", "{d}");
        order.push(m["key"]["id"].as_i64().unwrap());
    }
    assert_eq!(order, [4, 3, 1]);
    exec(&p, "UPDATE todos SET task = 'a' WHERE id = 2; DELETE FROM todos WHERE id = 4").await;
    let enter = graphql_next(&mut c, "live").await;
    assert_eq!(
        (&enter["todos_live"]["kind"], &enter["todos_live"]["record"]["id"]),
        (&json!("ENTER"), &json!(2)),
        "{enter}"
    );
    let leave = graphql_next(&mut c, "live").await;
    assert_eq!(
        (&leave["todos_live"]["kind"], &leave["todos_live"]["key"]),
        (&json!("LEAVE"), &json!({"id": 4}))
    );

    // A typed change subscription with a variable in `where`: only the selected columns come.
    let typed = "subscription($min: BigInt) { todos_changes(where: {id: {_gt: $min}}, events: [INSERT]) { type record { __typename id } } }";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    c.cmd(json!({"op": "subscribe", "id": "typed", "query": typed, "variables": {"min": 100}})).await;
    let mut n = 100;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "the subscription did not deliver within 30 s");
        n += 1;
        exec(&p, &format!("INSERT INTO todos VALUES ({n}, 'probe'), (50, 'below') ON CONFLICT DO NOTHING"))
            .await;
        if let Some(v) = c.within(Duration::from_millis(300), |v| v["id"] == "typed").await {
            assert_eq!(v["event"], "next", "{v}");
            let record = &v["payload"]["data"]["todos_changes"]["record"];
            assert_eq!(record, &json!({"__typename": "todos", "id": record["id"].clone()}), "{v}");
            assert!(record["id"].as_i64().unwrap() > 100, "{v}");
            break;
        }
    }
    // A refusal reaches urql's result as its error.
    c.cmd(json!({"op": "subscribe", "id": "bad", "query": "subscription { todos_live(orderBy: [{meta: asc}], limit: 0) { kind } }"})).await;
    let e = c.until("the error", |v| v["id"] == "bad").await;
    assert_eq!(e["event"], "error", "{e}");
    assert!(e["errors"][0]["message"].as_str().unwrap_or("").contains("limit"), "{e}");
    c.cmd(json!({"op": "exit"})).await;
    app.stop().await;
}

#[tokio::test]
async fn realtime_js_follows_a_live_query_as_inserts_updates_and_deletes() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    exec(&p, "INSERT INTO todos VALUES (1, 'a', '{x}', NULL, NULL), (2, 'b', NULL, NULL, NULL)").await;
    let app = TestApp::spawn(&url).await;
    let endpoint = format!("ws://{}/realtime/v1", app.addr);
    // The opt-in: `live: true` on a `postgres_changes` binding (realtime-js passes it through).
    let binding =
        json!({"event": "*", "schema": "public", "table": "todos", "filter": "task=eq.a", "live": true});
    let mut js = Peer::js("js live", &endpoint, "2.0.0", "tasks", json!({"postgres_changes": [binding]}));
    js.subscribed().await;
    let next = async |js: &mut Peer| {
        let v = js.until("a change", |v| v["kind"] == "change").await;
        let p = &v["payload"];
        json!([p["eventType"], p["new"], p["old"]])
    };
    // The result now: row 1, as an INSERT.
    assert_eq!(
        next(&mut js).await,
        json!(["INSERT", {"id": 1, "task": "a", "tags": ["x"], "meta": null, "due": null}, {}])
    );
    // Row 2 enters, row 1 leaves (no old row is sent for either: default replica identity), row
    // 2 changes and stays.
    exec(&p, "UPDATE todos SET task = 'a' WHERE id = 2; UPDATE todos SET task = 'z' WHERE id = 1").await;
    assert_eq!(
        next(&mut js).await,
        json!(["INSERT", {"id": 2, "task": "a", "tags": null, "meta": null, "due": null}, {}])
    );
    assert_eq!(next(&mut js).await, json!(["DELETE", {}, {"id": 1}]));
    exec(&p, "UPDATE todos SET tags = '{q}' WHERE id = 2").await;
    assert_eq!(
        next(&mut js).await,
        json!(["UPDATE", {"id": 2, "task": "a", "tags": ["q"], "meta": null, "due": null}, {"id": 2}])
    );
    app.stop().await;
}
