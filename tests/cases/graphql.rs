//! GraphQL at `/graphql`, spoken frame by frame: the `graphql-transport-ws` handshake and every
//! close code of the protocol, the legacy `graphql-ws` subprotocol, queries over the socket and
//! over HTTP (introspection), and row-level security per subscriber. (`clients.rs` drives the
//! `graphql-ws` npm client.)

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{anon_key, exec, fresh_db, pool, token_expiring, user, TestApp};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A GraphQL WebSocket speaking `protocol`.
pub(super) async fn open(app: &TestApp, protocol: &str) -> Socket {
    let mut request = format!("ws://{}/graphql", app.addr).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", protocol.parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request).await.expect("upgrade");
    assert_eq!(response.headers()["sec-websocket-protocol"], protocol);
    socket
}

pub(super) async fn send(s: &mut Socket, v: Value) {
    s.send(Message::Text(v.to_string().into())).await.expect("send");
}

/// The next message as JSON (the server's pings answered), or `{"close": [code, reason]}`.
async fn recv(s: &mut Socket) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), s.next()).await.expect("a message within 20 s");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                if v["type"] == "ping" {
                    // As a client does: the server's keep-alive gets a pong.
                    send(s, json!({"type": "pong"})).await;
                    continue;
                }
                return v;
            }
            Some(Ok(Message::Close(c))) => {
                return json!({"close": c.map(|c| (u16::from(c.code), c.reason.to_string()))})
            }
            Some(Ok(_)) => continue,
            other => return json!({"close": null, "ended": format!("{other:?}")}),
        }
    }
}

/// The close code the server ends with.
async fn closed_with(s: &mut Socket) -> u16 {
    loop {
        let v = recv(s).await;
        if let Some(close) = v.get("close") {
            return close[0].as_u64().unwrap_or(0) as u16;
        }
    }
}

pub(super) async fn init(s: &mut Socket, payload: Value) {
    send(s, json!({"type": "connection_init", "payload": payload})).await;
    assert_eq!(recv(s).await, json!({"type": "connection_ack"}));
}

/// Subscribes `id` and waits until it delivers: inserts probe rows (`probe` makes one from a
/// number) until the first result arrives, which it returns.
async fn subscribed(
    s: &mut Socket,
    p: &sqlx::PgPool,
    id: &str,
    query: &str,
    probe: impl Fn(u32) -> String,
) -> Value {
    send(s, json!({"type": "subscribe", "id": id, "payload": {"query": query}})).await;
    delivering(s, p, &[id], probe).await.remove(id).expect("a result")
}

/// Waits until every subscription of `ids` (subscribed already) delivers: inserts probe rows
/// (`probe` makes one from a number) until each has had a result, and returns each one's first.
/// Anything but a result of one of them fails.
pub(super) async fn delivering(
    s: &mut Socket,
    p: &sqlx::PgPool,
    ids: &[&str],
    probe: impl Fn(u32) -> String,
) -> std::collections::HashMap<String, Value> {
    let mut first = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for n in 0.. {
        assert!(tokio::time::Instant::now() < deadline, "{ids:?}: not all delivered within 30 s: {first:?}");
        exec(p, &probe(n)).await;
        while let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(500), s.next()).await
        {
            let v: Value = serde_json::from_str(&t).expect("JSON");
            if v["type"] == "ping" {
                send(s, json!({"type": "pong"})).await;
                continue;
            }
            let id = v["id"].as_str().unwrap_or_default().to_owned();
            assert!(v["type"] == "next" && ids.contains(&id.as_str()), "{v}");
            first.entry(id).or_insert(v);
            if first.len() == ids.len() {
                return first;
            }
        }
    }
    unreachable!()
}

#[tokio::test]
async fn the_protocol_handshake_queries_and_every_close_code() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE items (id bigint PRIMARY KEY, v text)").await;
    let app = TestApp::spawn_with(&url, |c| {
        c.auth.timeout_secs = 2;
        c.max_channels_per_socket = 3;
    })
    .await;
    let key = json!({"apikey": anon_key()});

    // A query over the socket: one result, then complete; ping answered with pong.
    let mut s = open(&app, "graphql-transport-ws").await;
    init(&mut s, json!({"Authorization": format!("Bearer {}", anon_key())})).await;
    send(&mut s, json!({"type": "subscribe", "id": "q", "payload": {"query": "{ _health }"}})).await;
    assert_eq!(
        recv(&mut s).await,
        json!({"type": "next", "id": "q", "payload": {"data": {"_health": "ok"}}})
    );
    assert_eq!(recv(&mut s).await, json!({"type": "complete", "id": "q"}));
    send(&mut s, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut s).await, json!({"type": "pong"}));
    // A document that does not validate: `error`, and the connection stays.
    send(&mut s, json!({"type": "subscribe", "id": "bad", "payload": {"query": "subscription { nope }"}}))
        .await;
    let e = recv(&mut s).await;
    assert_eq!((e["type"].as_str(), e["id"].as_str()), (Some("error"), Some("bad")), "{e}");
    assert!(e["payload"][0]["message"].as_str().unwrap_or("").contains("nope"), "{e}");
    // A binding the core refuses (an unknown column): an error result naming it.
    let refused = "subscription { items_changes(filter: \"nope=eq.1\") { type } }";
    send(&mut s, json!({"type": "subscribe", "id": "r", "payload": {"query": refused}})).await;
    let e = recv(&mut s).await;
    assert!(e.to_string().contains("nope"), "{e}");
    // 4409: an id that is running.
    let live = "subscription { items_changes { type } }";
    send(&mut s, json!({"type": "subscribe", "id": "dup", "payload": {"query": live}})).await;
    send(&mut s, json!({"type": "subscribe", "id": "dup", "payload": {"query": live}})).await;
    assert_eq!(closed_with(&mut s).await, 4409);

    // As many running operations as a socket may join channels (3 here); the next is refused.
    let mut s = open(&app, "graphql-transport-ws").await;
    init(&mut s, key.clone()).await;
    for id in ["1", "2", "3", "4"] {
        send(&mut s, json!({"type": "subscribe", "id": id, "payload": {"query": live}})).await;
    }
    let e = recv(&mut s).await;
    assert_eq!((e["type"].as_str(), e["id"].as_str()), (Some("error"), Some("4")), "{e}");
    assert!(e["payload"][0]["message"].as_str().unwrap_or("").contains("at most 3"), "{e}");

    // 4401: a subscribe before connection_init.
    let mut s = open(&app, "graphql-transport-ws").await;
    send(&mut s, json!({"type": "subscribe", "id": "1", "payload": {"query": "{ _health }"}})).await;
    assert_eq!(closed_with(&mut s).await, 4401);
    // 4403: a token that does not verify; and with none.
    let mut s = open(&app, "graphql-transport-ws").await;
    send(&mut s, json!({"type": "connection_init", "payload": {"Authorization": "Bearer nope"}})).await;
    assert_eq!(closed_with(&mut s).await, 4403);
    let mut s = open(&app, "graphql-transport-ws").await;
    send(&mut s, json!({"type": "connection_init"})).await;
    assert_eq!(closed_with(&mut s).await, 4403);
    // 4429: a second connection_init.
    let mut s = open(&app, "graphql-transport-ws").await;
    init(&mut s, key.clone()).await;
    send(&mut s, json!({"type": "connection_init", "payload": key})).await;
    assert_eq!(closed_with(&mut s).await, 4429);
    // 4400: a message that is not one.
    let mut s = open(&app, "graphql-transport-ws").await;
    send(&mut s, json!({"type": "subscribe", "id": "1"})).await;
    assert_eq!(closed_with(&mut s).await, 4400);
    // 4408: no connection_init within auth.timeout_secs (2 s here).
    let mut s = open(&app, "graphql-transport-ws").await;
    assert_eq!(closed_with(&mut s).await, 4408);
    // 4403 again when the token of the connection expires.
    let mut s = open(&app, "graphql-transport-ws").await;
    init(&mut s, json!({"Authorization": format!("Bearer {}", token_expiring("anon", None, 2))})).await;
    assert_eq!(closed_with(&mut s).await, 4403);

    // The legacy subprotocol: start / data / stop, connection_error for a bad token.
    let mut s = open(&app, "graphql-ws").await;
    send(&mut s, json!({"type": "connection_init", "payload": {"apikey": "nope"}})).await;
    assert_eq!(recv(&mut s).await["type"], "connection_error");
    let mut s = open(&app, "graphql-ws").await;
    init(&mut s, json!({"apikey": anon_key()})).await;
    send(&mut s, json!({"type": "start", "id": "h", "payload": {"query": "{ _health }"}})).await;
    assert_eq!(
        recv(&mut s).await,
        json!({"type": "data", "id": "h", "payload": {"data": {"_health": "ok"}}})
    );
    assert_eq!(recv(&mut s).await, json!({"type": "complete", "id": "h"}));

    // An upgrade without a GraphQL subprotocol is refused.
    let mut request = format!("ws://{}/graphql", app.addr).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "soap".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_err());

    // Introspection over HTTP, as GraphiQL asks it.
    let body = json!({"query": "{ __schema { subscriptionType { fields { name } } } }"});
    let resp = reqwest::Client::new()
        .post(format!("http://{}/graphql", app.addr))
        .header("apikey", anon_key())
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    let fields: Vec<&str> = v["data"]["__schema"]["subscriptionType"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(fields, ["changes", "items_changes", "items_live"], "{v}");
    let anonymous = reqwest::Client::new()
        .post(format!("http://{}/graphql", app.addr))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    app.stop().await;
}

const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";

#[tokio::test]
async fn each_subscriber_receives_the_rows_its_token_may_read() {
    let schema = "
        CREATE TABLE docs (id bigint PRIMARY KEY, owner uuid, body text, secret text);
        ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
        CREATE POLICY own ON docs FOR SELECT TO authenticated USING (owner = auth.uid());
        REVOKE SELECT ON docs FROM authenticated;
        GRANT SELECT (id, owner, body) ON docs TO authenticated;";
    let (app, p) = crate::support::rls_app(schema, |_| {}).await;
    let mut subscribers = Vec::new();
    for sub in [A, B] {
        let mut s = open(&app, "graphql-transport-ws").await;
        init(&mut s, json!({"Authorization": format!("Bearer {}", user(sub))})).await;
        let query = "subscription { docs_changes(events: [INSERT]) { record { id owner body } } }";
        // Each sees its own probe row; the other's probes are not for it.
        let first = subscribed(&mut s, &p, "d", query, |n| {
            format!("INSERT INTO docs VALUES ({}, '{sub}', 'probe')", 1000 * (1 + u32::from(sub == B)) + n)
        })
        .await;
        assert_eq!(first["payload"]["data"]["docs_changes"]["record"]["owner"], sub);
        subscribers.push(s);
    }
    // A column the role may not read: neither in a `where` (a live query's enters and leaves would
    // tell its values), nor in a selection, nor in an `orderBy` (the order would tell them).
    for (id, query) in [
        ("w", "subscription { docs_live(where: {secret: {_eq: \"x\"}}) { kind } }"),
        ("s", "subscription { docs_changes { record { id secret } } }"),
        ("o", "subscription { docs_live(orderBy: [{secret: desc}]) { kind } }"),
    ] {
        send(&mut subscribers[0], json!({"type": "subscribe", "id": id, "payload": {"query": query}})).await;
        // (Probe rows of the running subscription may come first.)
        let e = loop {
            let v = recv(&mut subscribers[0]).await;
            if v["id"] != "d" {
                break v;
            }
        };
        assert_eq!((e["type"].as_str(), e["id"].as_str()), (Some("error"), Some(id)), "{e}");
        assert!(e.to_string().contains("permission denied for column secret"), "{e}");
    }
    exec(&p, &format!("INSERT INTO docs VALUES (1, '{A}', 'for a'), (2, '{B}', 'for b'), (3, '{A}', 'end a'), (4, '{B}', 'end b')")).await;
    for (s, sub) in subscribers.iter_mut().zip([A, B]) {
        let mut bodies = Vec::new();
        loop {
            let v = recv(s).await;
            let record = &v["payload"]["data"]["docs_changes"]["record"];
            if record["body"] == "probe" {
                continue;
            }
            assert_eq!(record["owner"], sub, "{v}");
            bodies.push(record["body"].as_str().unwrap().to_owned());
            if bodies.last().unwrap().starts_with("end") {
                break;
            }
        }
        let mine = if sub == A { ["for a", "end a"] } else { ["for b", "end b"] };
        assert_eq!(bodies, mine);
    }
    app.stop().await;
}

/// The `next` results of `id` until one whose record has `v == last`; their (id, cursor).
/// Another operation's results are skipped.
async fn rows_until(s: &mut Socket, id: &str, last: &str) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    loop {
        let v = recv(s).await;
        if v["id"] != id {
            // A result of an operation completed meanwhile (as a client, ignored).
            continue;
        }
        assert_eq!(v["type"].as_str(), Some("next"), "{v}");
        let change = &v["payload"]["data"]["items_changes"];
        let record = &change["record"];
        if record["v"] == "probe" {
            continue;
        }
        out.push((record["id"].as_i64().unwrap(), change["cursor"].as_str().unwrap().to_owned()));
        if record["v"] == last {
            return out;
        }
    }
}

#[tokio::test]
async fn a_subscription_resumes_after_its_cursor_with_since() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE items (id bigint PRIMARY KEY, v text)").await;
    let app = TestApp::spawn(&url).await;
    let mut s = open(&app, "graphql-transport-ws").await;
    init(&mut s, json!({"apikey": anon_key()})).await;
    let query = "subscription { items_changes(events: [INSERT]) { cursor record { id v } } }";
    subscribed(&mut s, &p, "a", query, |n| format!("INSERT INTO items VALUES ({}, 'probe')", 1000 + n)).await;
    exec(&p, "INSERT INTO items VALUES (1, 'one'); INSERT INTO items VALUES (2, 'two')").await;
    let seen = rows_until(&mut s, "a", "two").await;
    assert_eq!(seen.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
    // Unsubscribed, the client misses 3 and 4; it resumes after 2's cursor.
    send(&mut s, json!({"type": "complete", "id": "a"})).await;
    exec(&p, "INSERT INTO items VALUES (3, 'three'); INSERT INTO items VALUES (4, 'four')").await;
    let resumed = format!(
        "subscription {{ items_changes(events: [INSERT], since: \"{}\") {{ cursor record {{ id v }} }} }}",
        seen[1].1
    );
    send(&mut s, json!({"type": "subscribe", "id": "b", "payload": {"query": resumed}})).await;
    let replayed = rows_until(&mut s, "b", "four").await;
    assert_eq!(replayed.iter().map(|r| r.0).collect::<Vec<_>>(), [3, 4], "nothing missed, nothing twice");
    // And it goes on live.
    exec(&p, "INSERT INTO items VALUES (5, 'five')").await;
    assert_eq!(rows_until(&mut s, "b", "five").await[0].0, 5);
    app.stop().await;
}
