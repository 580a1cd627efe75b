//! Socket.IO end to end with the official `socket.io-client` (npm): over WebSocket and over
//! long-polling upgraded to WebSocket, table subscriptions with filters and acknowledgements,
//! every refusal, rooms shared with realtime-js (broadcast and presence), binary payloads, row-level
//! security per subscriber, token expiry, and a resume after a lost connection with an exact ledger.

use std::time::Duration;

use serde_json::{json, Value};

use super::clients::Peer;
use crate::support::{self, exec, fresh_db, pool, TestApp};

/// `emit` with an acknowledgement: the ack's response.
async fn call(c: &mut Peer, id: &str, event: &str, data: Value) -> Value {
    c.cmd(json!({"op": "emit", "id": id, "event": event, "data": data})).await;
    let ack = c.until(&format!("the ack of {id}"), |v| v["event"] == "ack" && v["id"] == id).await;
    assert!(ack.get("error").is_none(), "{ack}");
    ack["response"].clone()
}

/// The next event `name` the server emitted: its arguments.
async fn event(c: &mut Peer, name: &str) -> Vec<Value> {
    let v = c.until(name, |v| v["event"] == "message" && v["name"] == name).await;
    v["args"].as_array().cloned().unwrap_or_default()
}

async fn connected(c: &mut Peer) -> String {
    let v = c.until("connect", |v| v["event"] == "connect" || v["event"] == "connect_error").await;
    assert_eq!(v["event"], "connect", "{v}");
    v["transport"].as_str().unwrap_or("").to_owned()
}

fn anon() -> Value {
    json!({"auth": {"token": support::anon_key()}})
}

/// Inserts probe rows (`probe(id)` the statement for one) until `c`'s subscription delivers one
/// (it is live), and drains them up to the last; returns the next free id.
async fn until_live(c: &mut Peer, p: &sqlx::PgPool, probe: impl Fn(i64) -> String, first_id: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut n = first_id;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no change delivered within 30 s");
        exec(p, &probe(n)).await;
        n += 1;
        let delivered = |v: &Value| v["event"] == "message" && v["name"] == "change";
        if let Some(v) = c.within(Duration::from_millis(300), delivered).await {
            // Probes inserted after the first delivered one still come: drain up to the last.
            let last = n - 1;
            if v["args"][0]["record"]["id"] != last {
                let is_last = |v: &Value| v["name"] == "change" && v["args"][0]["record"]["id"] == last;
                c.until("the last probe", is_last).await;
            }
            return n;
        }
    }
}

#[tokio::test]
async fn socketio_clients_subscribe_over_websocket_and_upgraded_polling() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE todos (id bigint PRIMARY KEY, task text, done bool DEFAULT false)").await;
    let app = TestApp::spawn(&url).await;
    let base = format!("http://{}", app.addr);
    let mut ws = Peer::socketio(
        "socket.io ws",
        &base,
        json!({"auth": {"token": support::anon_key()}, "transports": ["websocket"]}),
    );
    assert_eq!(connected(&mut ws).await, "websocket");
    let mut polling = Peer::socketio("socket.io polling", &base, anon());
    let open = polling.until("open", |v| v["event"] == "open").await;
    assert_eq!(open["transport"], "polling", "the default client starts with long-polling");
    connected(&mut polling).await;
    let up = polling.until("upgrade", |v| v["event"] == "upgrade").await;
    assert_eq!(up["transport"], "websocket");

    // A client that emits before it is connected (the library sends it right after the
    // handshake): the event is handled, not lost.
    let mut eager = Peer::socketio("socket.io eager", &base, anon());
    eager.cmd(json!({"op": "emit", "id": "e", "event": "join", "data": {"room": "early"}})).await;
    let ack = eager.until("the early ack", |v| v["event"] == "ack" && v["id"] == "e").await;
    assert_eq!(ack["response"], json!({"ok": true, "room": "early"}), "{ack}");

    let sub = json!({"table": "todos", "filter": "done=eq.false", "events": ["insert", "update"]});
    let a = call(&mut ws, "s1", "subscribe", sub.clone()).await;
    assert_eq!(a["ok"], true, "{a}");
    let b = call(&mut polling, "s1", "subscribe", sub.clone()).await;
    assert_eq!(b["id"], a["id"], "the same subscription has the same id on every socket");
    let id = a["id"].clone();
    let again = call(&mut ws, "s2", "subscribe", sub).await;
    assert!(
        again["ok"] == false && again["error"].as_str().unwrap().contains("already subscribed"),
        "{again}"
    );

    let probe = |n: i64| format!("INSERT INTO todos (id, task) VALUES ({n}, 'probe')");
    let mut next = until_live(&mut ws, &p, probe, 1000).await;
    next = until_live(&mut polling, &p, probe, next).await;
    let _ = next;
    exec(&p, "INSERT INTO todos VALUES (1, 'a'); INSERT INTO todos VALUES (2, 'b', true); UPDATE todos SET task = 'a2' WHERE id = 1").await;
    for c in [&mut ws, &mut polling] {
        let not_probe = |v: &Value| v["name"] == "change" && v["args"][0]["record"]["task"] != "probe";
        let insert = c.until("the insert", not_probe).await;
        let m = &insert["args"][0];
        assert_eq!((&m["id"], &m["type"], &m["record"]["task"]), (&id, &json!("INSERT"), &json!("a")), "{m}");
        assert!(m["cursor"].is_string() && m["commit_timestamp"].is_string(), "{m}");
        assert_eq!((&m["schema"], &m["table"]), (&json!("public"), &json!("todos")));
        let update = c.until("the update", not_probe).await;
        assert_eq!(
            (&update["args"][0]["type"], &update["args"][0]["record"]["task"]),
            (&json!("UPDATE"), &json!("a2"))
        );
    }

    // Refusals reach the acknowledgement; the socket stays.
    for (data, says) in [
        (json!({"table": "nope"}), "does not exist"),
        (json!({"table": "todos", "filter": "nope=eq.1"}), "nope"),
        (json!({"schema": "public"}), "needs a \"table\""),
        (json!({"table": "todos", "events": 5}), "strings"),
    ] {
        let r = call(&mut ws, "bad", "subscribe", data.clone()).await;
        assert!(r["ok"] == false && r["error"].as_str().unwrap_or("").contains(says), "{data}: {r}");
    }
    let r = call(&mut ws, "u", "frobnicate", json!({})).await;
    assert!(r["ok"] == false && r["error"].as_str().unwrap().contains("unknown event"), "{r}");
    let r = call(&mut ws, "u", "unsubscribe", json!({"id": 1})).await;
    assert_eq!(r, json!({"ok": false, "error": "not subscribed"}));
    let r = call(&mut ws, "u", "unsubscribe", json!({"id": id})).await;
    assert_eq!(r, json!({"ok": true, "id": id}));
    // Unsubscribed: the next change reaches the polling client only.
    exec(&p, "INSERT INTO todos VALUES (3, 'c')").await;
    let third = |v: &Value| v["name"] == "change" && v["args"][0]["record"]["id"] == 3;
    polling.until("row 3", third).await;
    assert!(ws.within(Duration::from_millis(500), third).await.is_none());

    // A token that does not verify: connect_error with the token's error.
    let mut refused = Peer::socketio("socket.io refused", &base, json!({"auth": {"token": "nope"}}));
    let e = refused.until("connect_error", |v| v["event"] == "connect_error").await;
    assert_eq!(e["message"], "The token provided is not a valid JWT", "{e}");
    let mut none = Peer::socketio("socket.io no token", &base, json!({}));
    let e = none.until("connect_error", |v| v["event"] == "connect_error").await;
    assert_eq!(e["message"], "API key is missing", "{e}");
    ws.exit().await;
    polling.exit().await;
    app.stop().await;
}

#[tokio::test]
async fn socketio_rooms_are_shared_with_realtime_js_broadcast_presence_and_binary() {
    let url = fresh_db().await;
    let app = TestApp::spawn(&url).await;
    let base = format!("http://{}", app.addr);
    let endpoint = format!("ws://{}/realtime/v1", app.addr);
    let mut a = Peer::socketio("socket.io a", &base, anon());
    let mut b = Peer::socketio(
        "socket.io b",
        &base,
        json!({"auth": {"token": support::anon_key()}, "transports": ["polling"]}),
    );
    connected(&mut a).await;
    connected(&mut b).await;
    let mut js = Peer::js("js", &endpoint, "2.0.0", "lobby", json!({"presence": {"key": "js"}}));
    js.subscribed().await;
    assert_eq!(
        call(&mut a, "j", "join", json!({"room": "lobby", "key": "a"})).await,
        json!({"ok": true, "room": "lobby"})
    );
    assert_eq!(call(&mut b, "j", "join", json!({"room": "lobby", "key": "b"})).await["ok"], true);

    // Socket.IO → realtime-js and the other Socket.IO client, acknowledged after delivery.
    let r =
        call(&mut a, "b1", "broadcast", json!({"room": "lobby", "event": "typing", "payload": {"who": "a"}}))
            .await;
    assert_eq!(r, json!({"ok": true, "room": "lobby"}));
    let (event_name, payload, _) = js.broadcast().await;
    assert_eq!((event_name.as_str(), payload), ("typing", json!({"who": "a"})));
    assert_eq!(event(&mut b, "typing").await, [json!({"who": "a"}), json!({"room": "lobby"})]);
    // realtime-js → Socket.IO.
    js.cmd(json!({"op": "send", "event": "wave", "payload": {"from": "js"}})).await;
    assert_eq!(event(&mut a, "wave").await[0], json!({"from": "js"}));
    assert_eq!(event(&mut b, "wave").await[0], json!({"from": "js"}));
    // A name the client library keeps is refused from a sender, and arrives renamed from others.
    let r =
        call(&mut a, "b2", "broadcast", json!({"room": "lobby", "event": "disconnect", "payload": 1})).await;
    assert!(r["ok"] == false && r["error"].as_str().unwrap().contains("reserved"), "{r}");
    js.cmd(json!({"op": "send", "event": "change", "payload": {"x": 1}})).await;
    assert_eq!(
        event(&mut a, "broadcast").await[0],
        json!({"room": "lobby", "event": "change", "payload": {"x": 1}})
    );
    // Binary: an attachment, as a Buffer to the other Socket.IO client, as bytes to realtime-js.
    a.cmd(json!({"op": "emit", "id": "bin", "event": "broadcast", "data": {"room": "lobby", "event": "blob"}, "binary": "AP8B"})).await;
    let ack = a.until("the binary ack", |v| v["event"] == "ack" && v["id"] == "bin").await;
    assert_eq!(ack["response"]["ok"], true, "{ack}");
    assert_eq!(event(&mut b, "blob").await, [json!({"binary": "AP8B"}), json!({"room": "lobby"})]);
    let (event_name, payload, _) = js.broadcast().await;
    assert_eq!((event_name.as_str(), payload), ("blob", json!({"bytes": [0, 255, 1]})));

    // Presence: a tracks; realtime-js and b see it; a leaves the room.
    let r = call(&mut a, "t", "track", json!({"room": "lobby", "state": {"name": "ada"}})).await;
    assert_eq!(r["ok"], true, "{r}");
    let state = js.presence_keys(&["a"]).await;
    assert_eq!(state["a"][0]["name"], "ada", "{state}");
    let diff = b.until("a's join", |v| v["name"] == "presence" && v["args"][0]["type"] == "diff").await;
    assert_eq!(diff["args"][0]["joins"]["a"]["metas"][0]["name"], "ada", "{diff}");
    js.cmd(json!({"op": "track", "payload": {"name": "js"}})).await;
    let diff =
        a.until("js's join", |v| v["name"] == "presence" && v["args"][0]["joins"]["js"].is_object()).await;
    assert_eq!(diff["args"][0]["room"], "lobby");
    assert_eq!(
        call(&mut a, "l", "leave", json!({"room": "lobby"})).await,
        json!({"ok": true, "room": "lobby"})
    );
    js.presence_keys(&["js"]).await;
    let r = call(&mut a, "b3", "broadcast", json!({"room": "lobby", "event": "typing"})).await;
    assert!(r["ok"] == false, "not in the room any more: {r}");
    a.exit().await;
    b.exit().await;
    js.exit().await;
    app.stop().await;
}

/// A table each user sees only their own rows of.
const DOCS: &str = "
    CREATE TABLE docs (id bigint PRIMARY KEY, owner uuid, body text);
    ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON docs FOR SELECT TO authenticated USING (owner = auth.uid());
    GRANT SELECT ON docs TO authenticated;";

const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";

/// The bodies of `c`'s `change` events until one whose body is `end`, in order (probes skipped).
async fn bodies_until(c: &mut Peer, end: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    loop {
        let args = event(c, "change").await;
        let body = args[0]["record"]["body"].as_str().unwrap_or("").to_owned();
        if body == "probe" {
            continue;
        }
        seen.push((body.clone(), args[0]["cursor"].as_str().unwrap_or("").to_owned()));
        if body == end {
            return seen;
        }
    }
}

#[tokio::test]
async fn socketio_row_level_security_token_expiry_and_resume_with_an_exact_ledger() {
    let (app, p) = support::rls_app(DOCS, |_| {}).await;
    let base = format!("http://{}", app.addr);
    let mut clients = Vec::new();
    for (name, sub) in [("socket.io a", A), ("socket.io b", B)] {
        let mut c = Peer::socketio(name, &base, json!({"auth": {"token": support::user(sub)}}));
        connected(&mut c).await;
        let r = call(&mut c, "s", "subscribe", json!({"table": "docs", "events": "insert"})).await;
        assert_eq!(r["ok"], true, "{r}");
        // Live once its own probe row arrives.
        let first = 1000 * (1 + i64::from(sub == B));
        until_live(&mut c, &p, |n| format!("INSERT INTO docs VALUES ({n}, '{sub}', 'probe')"), first).await;
        clients.push(c);
    }
    exec(&p, &format!("INSERT INTO docs VALUES (1, '{A}', 'a1'), (2, '{B}', 'b1'), (3, '{A}', 'a-end'), (4, '{B}', 'b-end')")).await;
    let seen_a = bodies_until(&mut clients[0], "a-end").await;
    assert_eq!(seen_a.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(), ["a1", "a-end"]);
    let seen_b = bodies_until(&mut clients[1], "b-end").await;
    assert_eq!(seen_b.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(), ["b1", "b-end"]);

    // The connection drops; changes commit meanwhile; the client reconnects and resumes after its
    // last cursor: each missed row once, in order, then live ones.
    let last = seen_a.last().unwrap().1.clone();
    let a = &mut clients[0];
    a.cmd(json!({"op": "drop"})).await;
    a.until("disconnect", |v| v["event"] == "disconnect").await;
    for n in 0..20 {
        exec(&p, &format!("INSERT INTO docs VALUES ({}, '{A}', 'missed {n}')", 10 + n)).await;
    }
    a.cmd(json!({"op": "connect"})).await;
    connected(a).await;
    let r = call(a, "r", "subscribe", json!({"table": "docs", "events": "insert", "since": last})).await;
    assert_eq!(r["ok"], true, "{r}");
    exec(&p, &format!("INSERT INTO docs VALUES (50, '{A}', 'live')")).await;
    let ledger: Vec<String> = bodies_until(a, "live").await.into_iter().map(|(b, _)| b).collect();
    let mut want: Vec<String> = (0..20).map(|n| format!("missed {n}")).collect();
    want.push("live".into());
    assert_eq!(ledger, want, "no gap, no repeat");

    // A token that expires: the client is told why, then disconnected.
    let exp_in = 3;
    let short = support::token_expiring("authenticated", Some(A), exp_in);
    let mut expiring = Peer::socketio("socket.io expiring", &base, json!({"auth": {"token": short}}));
    connected(&mut expiring).await;
    let why = event(&mut expiring, "error").await;
    assert!(why[0]["message"].as_str().unwrap_or("").contains("Token has expired"), "{why:?}");
    let d = expiring.until("disconnect", |v| v["event"] == "disconnect").await;
    assert_eq!(d["reason"], "io server disconnect", "{d}");

    // A `token` event replaces it: a refused one in the ack; an accepted one keeps the
    // connection past the first token's expiry.
    let short = support::token_expiring("authenticated", Some(A), exp_in);
    let expires = walcast::auth::unix_now() + exp_in;
    let mut refreshed = Peer::socketio("socket.io refreshed", &base, json!({"auth": {"token": short}}));
    connected(&mut refreshed).await;
    let r = call(&mut refreshed, "t", "token", json!({"token": "nope"})).await;
    assert_eq!(r, json!({"ok": false, "error": "The token provided is not a valid JWT"}));
    let r = call(&mut refreshed, "t", "token", json!({"token": support::user(A)})).await;
    assert_eq!(r, json!({"ok": true}));
    let r = call(&mut refreshed, "s", "subscribe", json!({"table": "docs", "events": "insert"})).await;
    assert_eq!(r["ok"], true, "{r}");
    // Waiting on the clock itself: until the first token is past its expiry.
    while walcast::auth::unix_now() <= expires + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    exec(&p, &format!("INSERT INTO docs VALUES (60, '{A}', 'after expiry')")).await;
    assert_eq!(bodies_until(&mut refreshed, "after expiry").await.len(), 1);
    for c in clients {
        c.exit().await;
    }
    app.stop().await;
}

#[tokio::test]
async fn python_socketio_client_subscribes_with_a_filter_and_shares_a_room() {
    let (app, p) = support::rls_app(DOCS, |_| {}).await;
    let base = format!("http://{}", app.addr);
    let mut py =
        Peer::python_socketio("python-socketio", &base, json!({"auth": {"token": support::user(A)}}));
    connected(&mut py).await;
    let mut node = Peer::socketio("socket.io node", &base, json!({"auth": {"token": support::user(B)}}));
    connected(&mut node).await;

    let r = call(&mut py, "s", "subscribe", json!({"table": "docs", "filter": "body=neq.drop"})).await;
    assert_eq!(r["ok"], true, "{r}");
    until_live(&mut py, &p, |n| format!("INSERT INTO docs VALUES ({n}, '{A}', 'probe')"), 1000).await;
    exec(
        &p,
        &format!(
            "INSERT INTO docs VALUES (1, '{A}', 'keep'), (2, '{A}', 'drop'), (3, '{B}', 'not mine'), (4, '{A}', 'end')"
        ),
    )
    .await;
    let seen: Vec<String> = bodies_until(&mut py, "end").await.into_iter().map(|(b, _)| b).collect();
    assert_eq!(seen, ["keep", "end"], "the filter and row-level security both apply");

    // One room: binary from Python to node, JSON from node to Python.
    assert_eq!(call(&mut py, "j", "join", json!({"room": "team"})).await["ok"], true);
    assert_eq!(call(&mut node, "j", "join", json!({"room": "team"})).await["ok"], true);
    py.cmd(json!({"op": "emit", "id": "bin", "event": "broadcast", "data": {"room": "team", "event": "file"}, "binary": "3q2+7w=="}))
        .await;
    let ack = py.until("the ack", |v| v["event"] == "ack" && v["id"] == "bin").await;
    assert_eq!(ack["response"], json!({"ok": true, "room": "team"}));
    assert_eq!(event(&mut node, "file").await, [json!({"binary": "3q2+7w=="}), json!({"room": "team"})]);
    let r =
        call(&mut node, "b", "broadcast", json!({"room": "team", "event": "hello", "payload": [1, "two"]}))
            .await;
    assert_eq!(r["ok"], true);
    assert_eq!(event(&mut py, "hello").await, [json!([1, "two"]), json!({"room": "team"})]);
    py.exit().await;
    node.exit().await;
    app.stop().await;
}

/// A Socket.IO client that speaks the protocol by hand over WebSocket: connected to `/` with the
/// anon key and subscribed to `subscription`, then left alone (it never reads again).
async fn raw_subscriber(
    addr: std::net::SocketAddr,
    subscription: Value,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connects");
    // The next packet; a ping is answered, as every client does.
    let next = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2" => {
                ws.send(Message::Text("3".into())).await.expect("pong");
            }
            Ok(Some(Ok(Message::Text(t)))) => break t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("raw socket.io client: {other:?}"),
        }
    };
    assert!(next(&mut ws).await.starts_with('0'), "the Engine.IO handshake");
    ws.send(Message::Text(format!("40{}", json!({"token": support::anon_key()})).into()))
        .await
        .expect("send");
    let connected = next(&mut ws).await;
    assert!(connected.starts_with("40"), "connected to /: {connected}");
    ws.send(Message::Text(format!("420{}", json!(["subscribe", subscription])).into())).await.expect("send");
    let ack = next(&mut ws).await;
    assert!(ack.starts_with("430") && ack.contains("\"ok\":true"), "{ack}");
    ws
}

#[tokio::test]
async fn a_socketio_client_that_does_not_read_is_disconnected_without_slowing_others() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE todos (id bigint PRIMARY KEY, task text)").await;
    let app = TestApp::spawn_with(&url, |c| c.client_queue = 16).await;
    let base = format!("http://{}", app.addr);
    let subscription = json!({"table": "todos", "events": "insert"});
    let slow = raw_subscriber(app.addr, subscription.clone()).await;
    let mut fast = Peer::socketio("socket.io reading", &base, anon());
    connected(&mut fast).await;
    assert_eq!(call(&mut fast, "s", "subscribe", subscription).await["ok"], true);
    let metrics_url = format!("http://{}/metrics", app.addr);
    let mut disconnected_after = None;
    for i in 1..=400i64 {
        exec(&p, &format!("INSERT INTO todos VALUES ({i}, repeat('x', 200000))")).await;
        let row = |v: &Value| v["name"] == "change" && v["args"][0]["record"]["id"] == i;
        fast.until(&format!("row {i}"), row).await;
        let metrics = support::http_get(&metrics_url).await.expect("metrics");
        if metrics.contains("walcast_slow_client_disconnects_total 1\n") {
            disconnected_after = Some(i);
            break;
        }
    }
    let after = disconnected_after.expect("the client that never reads is disconnected");
    exec(&p, &format!("INSERT INTO todos VALUES ({}, 'small')", after + 1)).await;
    let next = |v: &Value| v["name"] == "change" && v["args"][0]["record"]["id"] == after + 1;
    fast.until("the next row", next).await;
    drop(slow);
    fast.exit().await;
    app.stop().await;
}

/// One long-polling request: its status and body.
async fn polling(http: &reqwest::Client, method: reqwest::Method, url: &str, body: &[u8]) -> (u16, String) {
    let request = http.request(method, url).body(body.to_vec()).timeout(Duration::from_secs(30));
    let response = request.send().await.expect("a long-polling request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("a body"))
}

/// GETs until a payload holds a packet `want` accepts; the packets read on the way.
async fn poll_until(http: &reqwest::Client, url: &str, want: impl Fn(&str) -> bool) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|p: &String| want(p)) {
        assert!(tokio::time::Instant::now() < deadline, "no such packet within 30 s: {seen:?}");
        let (status, body) = polling(http, reqwest::Method::GET, url, b"").await;
        assert_eq!(status, 200, "{body}");
        seen.extend(body.split('\u{1e}').map(str::to_owned));
    }
    seen
}

#[tokio::test]
async fn engine_io_requests_are_checked_and_long_polling_carries_acks_changes_and_binary() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE notes (id bigint PRIMARY KEY, body text)").await;
    let app = TestApp::spawn(&url).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/socket.io/", app.addr);
    let get = reqwest::Method::GET;
    for (query, code) in [
        ("EIO=3&transport=polling", 5),
        ("EIO=4&transport=carrier-pigeon", 0),
        ("EIO=4&transport=polling&sid=nope", 1),
    ] {
        let (status, body) = polling(&http, get.clone(), &format!("{base}?{query}"), b"").await;
        assert_eq!(
            (status, serde_json::from_str::<Value>(&body).unwrap()["code"].as_u64()),
            (400, Some(code))
        );
    }
    let (status, body) =
        polling(&http, reqwest::Method::POST, &format!("{base}?EIO=4&transport=polling"), b"").await;
    assert_eq!((status, body.contains("\"code\":2")), (400, true), "{body}");

    // The handshake, then a connect with the anon key.
    let (status, open) = polling(&http, get.clone(), &format!("{base}?EIO=4&transport=polling"), b"").await;
    assert_eq!(status, 200);
    let open: Value = serde_json::from_str(open.strip_prefix('0').expect("an open packet")).unwrap();
    assert_eq!(open["upgrades"], json!(["websocket"]));
    assert!(open["pingInterval"].as_u64().is_some_and(|ms| ms > 0), "{open}");
    let session = format!("{base}?EIO=4&transport=polling&sid={}", open["sid"].as_str().unwrap());
    let post = async |body: &[u8]| {
        let (status, text) = polling(&http, reqwest::Method::POST, &session, body).await;
        assert_eq!((status, text.as_str()), (200, "ok"));
    };
    post(format!("40{}", json!({"token": support::anon_key()})).as_bytes()).await;
    poll_until(&http, &session, |p| p.starts_with("40{\"sid\":")).await;

    // Two events in one payload: each acknowledged, the unknown one refused.
    post(b"420[\"subscribe\",{\"table\":\"notes\"}]\x1e421[\"nope\",{}]\x1e422[\"join\",{\"room\":\"r\",\"self\":true}]").await;
    let seen = poll_until(&http, &session, |p| p.starts_with("432")).await;
    assert!(seen.iter().any(|p| p.starts_with("430[{") && p.contains("\"ok\":true")), "{seen:?}");
    assert!(seen.iter().any(|p| p == r#"431[{"error":"unknown event \"nope\"","ok":false}]"#), "{seen:?}");
    exec(&p, "INSERT INTO notes VALUES (1, 'polled')").await;
    let seen = poll_until(&http, &session, |p| p.starts_with("42[\"change\"")).await;
    let change = seen.iter().find(|p| p.starts_with("42[\"change\"")).unwrap();
    let change: Value = serde_json::from_str(&change[2..]).unwrap();
    assert_eq!(change[1]["record"], json!({"id": 1, "body": "polled"}));

    // A binary broadcast: its attachment as base64, in and out.
    let blob = r#"451-3["broadcast",{"room":"r","event":"blob","payload":{"_placeholder":true,"num":0}}]"#;
    post(format!("{blob}\x1ebAP8=").as_bytes()).await;
    let seen = poll_until(&http, &session, |p| p == "bAP8=").await;
    let at = seen.iter().position(|p| p == "bAP8=").unwrap();
    assert_eq!(seen[at - 1], r#"451-["blob",{"_placeholder":true,"num":0},{"room":"r"}]"#, "{seen:?}");

    // A malformed packet: the client is told why, then the session ends.
    post(b"4Z").await;
    let seen = poll_until(&http, &session, |p| p == "1").await;
    assert!(seen.iter().any(|p| p.starts_with("42[\"error\"") && p.contains("malformed packet")), "{seen:?}");
    let (status, body) = polling(&http, get, &session, b"").await;
    assert_eq!((status, body.contains("\"code\":1")), (400, true), "{body}");
    app.stop().await;
}

#[tokio::test]
async fn a_socketio_connection_is_pinged_and_closed_when_its_pongs_stop() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = fresh_db().await;
    // Idle after 3 s: pings every second, a pong due within one.
    let app = TestApp::spawn_with(&url, |c| c.idle_timeout_secs = 3).await;
    let ws_url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", app.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.expect("connects");
    let open = match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("the open packet: {other:?}"),
    };
    let open: Value = serde_json::from_str(&open[1..]).unwrap();
    assert_eq!((open["pingInterval"].as_u64(), open["upgrades"].clone()), (Some(1000), json!([])));
    // Five pings answered: the connection stays, past its idle time.
    for _ in 0..5 {
        let ping = tokio::time::timeout(Duration::from_secs(30), ws.next()).await;
        assert!(matches!(&ping, Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2"), "{ping:?}");
        ws.send(Message::Text("3".into())).await.expect("pong");
    }
    // Pongs stop: the server closes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "still open 30 s after the pongs stopped");
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2" => continue,
            Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => break,
            other => panic!("after the pongs stopped: {other:?}"),
        }
    }
    app.stop().await;
}
