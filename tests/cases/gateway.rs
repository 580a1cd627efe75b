//! The Supabase-compatible gateway over a raw WebSocket: exact frames for vsn 1.0.0 and 2.0.0,
//! filters, errors, limits, health and shutdown.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{exec, fresh_db, http_get, pool, TestApp, Ws};

const SCHEMA: &str = "
CREATE TABLE todos (id bigint PRIMARY KEY, task text, done bool DEFAULT false, due timestamptz);
CREATE TABLE notes (id int PRIMARY KEY, body text);
ALTER TABLE notes REPLICA IDENTITY FULL;
";

async fn app() -> (TestApp, sqlx::PgPool) {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    (TestApp::spawn(&url).await, p)
}

#[tokio::test]
async fn v1_join_reply_system_and_change_frames() {
    let (app, p) = app().await;
    let mut ws = app.ws(None).await;
    let binding = json!({"event": "*", "schema": "public", "table": "todos", "filter": "id=eq.1"});
    let r = ws
        .push(Some("1"), "realtime:room", "phx_join", json!({"config": {"postgres_changes": [binding]}}))
        .await;
    let reply = ws.recv().await;
    let id = reply["payload"]["response"]["postgres_changes"][0]["id"].as_u64().expect("integer id");
    assert_eq!(
        reply,
        json!({"topic": "realtime:room", "event": "phx_reply", "ref": r,
               "payload": {"status": "ok", "response": {"postgres_changes": [
                   {"event": "*", "schema": "public", "table": "todos", "filter": "id=eq.1", "id": id}]}}})
    );
    let mut system = ws.recv().await;
    // Where the bindings went live (resuming from it misses nothing): 32 hexadecimal digits.
    let cursor = system["payload"].as_object_mut().and_then(|p| p.remove("cursor"));
    let cursor = cursor.as_ref().and_then(Value::as_str).unwrap_or_else(|| panic!("no cursor in {system}"));
    assert!(cursor.len() == 32 && cursor.bytes().all(|b| b.is_ascii_hexdigit()), "{cursor}");
    assert_eq!(
        system,
        json!({"topic": "realtime:room", "event": "system", "ref": null,
               "payload": {"extension": "postgres_changes", "status": "ok", "message": "Subscribed to PostgreSQL", "channel": "room"}})
    );
    exec(&p, "INSERT INTO todos (id, task) VALUES (2, 'other'), (1, 'mine')").await;
    let change = ws.recv().await;
    assert_eq!(
        (change["topic"].as_str(), change["event"].as_str()),
        (Some("realtime:room"), Some("postgres_changes"))
    );
    assert_eq!(change["ref"], Value::Null);
    let payload = &change["payload"];
    assert_eq!(payload["ids"], json!([id]));
    let data = &payload["data"];
    assert_eq!(data["type"], "INSERT");
    assert_eq!((data["schema"].as_str(), data["table"].as_str()), (Some("public"), Some("todos")));
    assert_eq!(data["record"], json!({"id": 1, "task": "mine", "done": false, "due": null}));
    assert!(data.get("old_record").is_none(), "INSERT has no old_record");
    assert_eq!(data["errors"], Value::Null);
    assert_eq!(data["columns"][0], json!({"name": "id", "type": "int8"}));
    let ts = data["commit_timestamp"].as_str().expect("timestamp");
    assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
    app.stop().await;
}

#[tokio::test]
async fn v2_arrays_heartbeat_leave_and_unmatched_topics() {
    let (app, p) = app().await;
    let mut ws = app.ws(Some("2.0.0")).await;
    let hb = ws.push(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ws.recv().await, json!([null, hb, "phoenix", "phx_reply", {"status": "ok", "response": {}}]));

    let r = ws.push(Some("7"), "realtime:nope", "broadcast", json!({})).await;
    assert_eq!(
        ws.recv().await,
        json!(["7", r, "realtime:nope", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );

    let binding = json!({"event": "UPDATE", "schema": "public", "table": "todos"});
    let r = ws
        .push(Some("3"), "realtime:b", "phx_join", json!({"config": {"postgres_changes": [binding]}}))
        .await;
    let reply = ws.recv().await;
    assert_eq!(
        (reply[0].as_str(), reply[1].as_str(), reply[3].as_str()),
        (Some("3"), Some(r.as_str()), Some("phx_reply"))
    );
    let id = reply[4]["response"]["postgres_changes"][0]["id"].clone();
    let system = ws.recv().await;
    assert_eq!(
        (system[0].as_str(), &system[1], system[3].as_str()),
        (Some("3"), &Value::Null, Some("system"))
    );
    assert_eq!(system[4]["status"], "ok");

    exec(&p, "INSERT INTO todos (id, task) VALUES (5, 'a'); UPDATE todos SET task = 'b' WHERE id = 5;").await;
    let change = ws.recv().await;
    assert_eq!(
        (&change[0], &change[1], change[2].as_str(), change[3].as_str()),
        (&Value::Null, &Value::Null, Some("realtime:b"), Some("postgres_changes"))
    );
    assert_eq!(change[4]["ids"], json!([id]));
    assert_eq!(change[4]["data"]["type"], "UPDATE", "the INSERT did not match event UPDATE");
    assert_eq!(change[4]["data"]["old_record"], json!({"id": 5}), "the key, as Supabase sends it");

    let l = ws.push(Some("3"), "realtime:b", "phx_leave", json!({})).await;
    assert_eq!(ws.recv().await, json!(["3", l, "realtime:b", "phx_reply", {"status": "ok", "response": {}}]));
    assert_eq!(ws.recv().await, json!(["3", "3", "realtime:b", "phx_close", {}]));
    exec(&p, "UPDATE todos SET task = 'c' WHERE id = 5").await;
    let hb = ws.push(None, "phoenix", "heartbeat", json!({})).await;
    let next = ws.recv().await;
    assert_eq!(next[1].as_str(), Some(hb.as_str()), "no change after leaving: {next}");
    app.stop().await;
}

#[tokio::test]
async fn filters_compare_by_type_and_ids_are_per_channel() {
    let (app, p) = app().await;
    let mut ws = app.ws(Some("2.0.0")).await;
    let b1 = json!({"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=gt.9"});
    let b2 = json!({"event": "*", "schema": "public", "table": "todos", "filter": "task=in.(x,\"y,z\")"});
    let (reply, system) = ws.join("a", json!([b1, b2])).await;
    assert_eq!(system["status"], "ok", "{system}");
    let ids: Vec<Value> = reply["response"]["postgres_changes"]
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["id"].clone())
        .collect();
    let b3 = json!({"event": "*", "schema": "public", "table": "todos", "filter": "due=lt.2024-01-01T12:00:00+02:00"});
    let (reply2, _) = ws.join("b", json!([b3])).await;
    let id3 = reply2["response"]["postgres_changes"][0]["id"].clone();

    // 10 > 9 numerically (as strings "10" < "9"); task "y,z" matches the quoted list item.
    exec(&p, "INSERT INTO todos (id, task, due) VALUES (10, 'y,z', '2024-01-01 09:59:59+00')").await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let f = ws.recv().await;
        got.push((f[2].as_str().unwrap_or("").to_owned(), f[4]["ids"].clone()));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got[0],
        ("realtime:a".to_owned(), json!(ids)),
        "one push per channel with all its matching ids"
    );
    assert_eq!(got[1], ("realtime:b".to_owned(), json!([id3])));

    exec(&p, "INSERT INTO todos (id, task, due) VALUES (3, 'q', '2024-01-01 10:00:01+00')").await;
    let hb = ws.push(None, "phoenix", "heartbeat", json!({})).await;
    let f = ws.recv().await;
    assert_eq!(f[1].as_str(), Some(hb.as_str()), "nothing matched id 3: {f}");
    app.stop().await;
}

#[tokio::test]
async fn binding_errors_keep_the_channel_open() {
    let (app, p) = app().await;
    let mut ws = app.ws(None).await;
    let cases = [
        (
            json!({"event": "*", "schema": "public", "table": "missing"}),
            "Unable to subscribe to changes with given parameters",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "todos", "filter": "id=eq"}),
            "Error parsing `filter` params",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "todos", "filter": "nope=eq.1"}),
            "invalid column for filter nope",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "todos", "filter": "id=eq.abc"}),
            "invalid input syntax for type int8",
        ),
        (
            json!({"event": "DELETE", "schema": "public", "table": "todos", "filter": "task=eq.a"}),
            "REPLICA IDENTITY FULL",
        ),
    ];
    for (i, (binding, message)) in cases.iter().enumerate() {
        let (reply, system) = ws.join(&format!("e{i}"), json!([binding])).await;
        assert_eq!(reply["status"], "ok", "the join itself succeeds");
        assert_eq!(system["status"], "error");
        let m = system["message"].as_str().unwrap_or("");
        assert!(m.contains(message), "{m:?} should contain {message:?}");
    }
    // DELETE on a FULL identity table may filter on any column, and the old row is whole.
    let (_, system) = ws
        .join(
            "full",
            json!([{"event": "DELETE", "schema": "public", "table": "notes", "filter": "body=eq.bye"}]),
        )
        .await;
    assert_eq!(system["status"], "ok");
    exec(&p, "INSERT INTO notes VALUES (1, 'bye'), (2, 'stay'); DELETE FROM notes;").await;
    let payload = ws.recv_event("postgres_changes").await;
    assert_eq!(payload["data"]["old_record"], json!({"id": 1, "body": "bye"}));
    assert!(payload["data"].get("record").is_none(), "DELETE has no record");
    // Malformed frames get an answer and do not close the socket.
    ws.send_text("{not json").await;
    let f = ws.recv().await;
    assert_eq!(f["payload"]["status"], "error");
    let hb = ws.push(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ws.recv().await["ref"], json!(hb));
    app.stop().await;
}

#[tokio::test]
async fn select_and_payload_too_large() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn_with(&url, |c| c.max_record_bytes = 2048).await;
    let mut ws = app.ws(None).await;
    let (_, s) = ws
        .join("s", json!([{"event": "INSERT", "schema": "public", "table": "todos", "select": ["task"]}]))
        .await;
    assert_eq!(s["status"], "ok");
    exec(&p, "INSERT INTO todos (id, task) VALUES (1, 'small')").await;
    let payload = ws.recv_event("postgres_changes").await;
    assert_eq!(
        payload["data"]["record"],
        json!({"id": 1, "task": "small"}),
        "select keeps the listed columns and the key"
    );
    ws.push(Some("2"), "realtime:s", "phx_leave", json!({})).await;
    let (_, _) = ws.join("big", json!([{"event": "INSERT", "schema": "public", "table": "todos"}])).await;
    exec(&p, "INSERT INTO todos (id, task) VALUES (2, repeat('x', 5000))").await;
    let payload = ws.recv_event("postgres_changes").await;
    assert_eq!(payload["data"]["errors"], json!(["Error 413: Payload Too Large"]));
    assert_eq!(payload["data"]["record"]["id"], 2);
    assert!(payload["data"]["record"].get("task").is_none());
    app.stop().await;
}

#[tokio::test]
async fn limits_idle_timeout_and_frame_size() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn_with(&url, |c| {
        c.idle_timeout_secs = 1;
        c.max_frame_bytes = 4096;
    })
    .await;
    let mut ws = app.ws(None).await;
    ws.send_text(&format!(
        "{{\"topic\":\"phoenix\",\"event\":\"heartbeat\",\"payload\":\"{}\",\"ref\":\"1\"}}",
        "x".repeat(10_000)
    ))
    .await;
    let f = ws.try_recv(Duration::from_secs(10)).await.expect("close frame");
    assert_eq!(f["close"][0], 1009, "{f}");
    let mut idle = app.ws(None).await;
    let f = idle.try_recv(Duration::from_secs(10)).await.expect("close frame");
    assert_eq!(f["close"][0], 1000, "{f}");
    assert_eq!(f["close"][1], "idle timeout");
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_metrics_and_shutdown() {
    let (app, p) = app().await;
    let health = http_get(&format!("http://{}/healthz", app.addr)).await.expect("healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http_get(&format!("http://{}/readyz", app.addr)).await.expect("readyz");
    assert!(ready.starts_with("HTTP/1.1 200") && ready.contains("\"ready\":true"), "{ready}");
    let mut ws = Ws::connect(app.addr, "/socket/websocket", Some("1.0.0")).await;
    ws.join("m", json!([{"event": "*", "schema": "public", "table": "todos"}])).await;
    exec(&p, "INSERT INTO todos (id) VALUES (1)").await;
    ws.recv_event("postgres_changes").await;
    let metrics = http_get(&format!("http://{}/metrics", app.addr)).await.expect("metrics");
    for m in [
        "walcast_connected_clients 1",
        "walcast_subscriptions 1",
        "walcast_frames_delivered_total 1",
        "walcast_replication_connected 1",
    ] {
        assert!(metrics.contains(m), "{m} missing:\n{metrics}");
    }
    let addr = app.addr;
    app.shutdown.cancel();
    let f = ws.try_recv(Duration::from_secs(10)).await.expect("close frame on shutdown");
    assert_eq!(f["close"][0], 1001, "{f}");
    tokio::time::timeout(Duration::from_secs(10), app.handle)
        .await
        .expect("stops within 10 s")
        .expect("task")
        .expect("ok");
    assert!(http_get(&format!("http://{addr}/healthz")).await.is_err(), "no longer accepting");
}

#[tokio::test]
async fn slow_client_is_disconnected_without_slowing_others() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn_with(&url, |c| c.client_queue = 16).await;
    let mut slow = app.ws(None).await;
    slow.join("slow", json!([{"event": "INSERT", "schema": "public", "table": "todos"}])).await;
    let mut fast = app.ws(None).await;
    fast.join("fast", json!([{"event": "INSERT", "schema": "public", "table": "todos"}])).await;
    // One large change at a time: the reading client keeps up, the one that never reads falls
    // behind by its kernel buffers plus its queue, and is cut off.
    let metrics_url = format!("http://{}/metrics", app.addr);
    let mut disconnected_after = None;
    for i in 1..=400u64 {
        exec(&p, &format!("INSERT INTO todos (id, task) VALUES ({i}, repeat('x', 200000))")).await;
        let payload = fast.recv_event("postgres_changes").await;
        assert_eq!(payload["data"]["record"]["id"], i, "the reading client gets every change in order");
        let metrics = http_get(&metrics_url).await.expect("metrics");
        if metrics.contains("walcast_slow_client_disconnects_total 1\n") {
            disconnected_after = Some(i);
            break;
        }
    }
    let after = disconnected_after.expect("the client that never reads is disconnected");
    // The reading client is unaffected and still receives changes.
    exec(&p, &format!("INSERT INTO todos (id, task) VALUES ({}, 'small')", after + 1)).await;
    assert_eq!(fast.recv_event("postgres_changes").await["data"]["record"]["id"], after + 1);
    // The slow client finds a close frame after what was already buffered.
    let close = loop {
        let f = slow.try_recv(Duration::from_secs(10)).await.expect("frames, then a close");
        if f.get("close").is_some() {
            break f;
        }
    };
    assert_eq!(close["close"][0], 1008, "{close}");
    assert!(close["close"][1].as_str().unwrap_or("").contains("too slow"), "{close}");
    app.stop().await;
}

#[tokio::test]
async fn binary_broadcast_frames_are_parsed() {
    use futures_util::SinkExt;
    let (app, _p) = app().await;
    let mut ws = app.ws(Some("2.0.0")).await;
    let r = ws
        .push(Some("j1"), "realtime:bin", "phx_join", json!({"config": {"broadcast": {"ack": true}}}))
        .await;
    assert_eq!(ws.recv().await[1], json!(r));
    let (join_ref, msg_ref, topic, event, meta, payload) =
        ("j1", "9", "realtime:bin", "cursor", "{}", r#"{"x":1}"#);
    let mut frame = vec![
        3u8,
        join_ref.len() as u8,
        msg_ref.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        meta.len() as u8,
        1,
    ];
    for part in [join_ref, msg_ref, topic, event, meta, payload] {
        frame.extend_from_slice(part.as_bytes());
    }
    ws.inner.send(tokio_tungstenite::tungstenite::Message::Binary(frame.into())).await.expect("send");
    assert_eq!(
        ws.recv().await,
        json!(["j1", "9", "realtime:bin", "phx_reply", {"status": "ok", "response": {}}])
    );
    // A truncated binary frame gets an error naming the problem; the socket stays usable.
    ws.inner
        .send(tokio_tungstenite::tungstenite::Message::Binary(vec![3u8, 200, 0].into()))
        .await
        .expect("send");
    let err = ws.recv().await;
    assert_eq!((err[2].as_str(), err[4]["status"].as_str()), (Some("phoenix"), Some("error")), "{err}");
    assert!(err[4]["response"]["reason"].as_str().unwrap_or("").contains("header"), "{err}");
    let hb = ws.push(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ws.recv().await[1], json!(hb));
    app.stop().await;
}

#[tokio::test]
async fn rejoin_replaces_and_wildcards_match() {
    let (app, p) = app().await;
    let mut ws = app.ws(Some("2.0.0")).await;
    let (first, _) = ws.join("x", json!([{"event": "INSERT", "schema": "public", "table": "todos"}])).await;
    let (second, s) =
        ws.join("x", json!([{"event": "*", "schema": "*"}, {"event": "DELETE", "schema": "public"}])).await;
    assert_eq!(s["status"], "ok", "{s}");
    let old_id = first["response"]["postgres_changes"][0]["id"].clone();
    let any_id = second["response"]["postgres_changes"][0]["id"].clone();
    let delete_id = second["response"]["postgres_changes"][1]["id"].clone();
    assert_ne!(old_id, any_id);
    exec(&p, "INSERT INTO notes VALUES (1, 'n'); DELETE FROM notes;").await;
    let insert = ws.recv_event("postgres_changes").await;
    assert_eq!(insert["ids"], json!([any_id]), "only the new channel's bindings: {insert}");
    assert_eq!(insert["data"]["table"], "notes");
    let delete = ws.recv_event("postgres_changes").await;
    let mut ids: Vec<u64> = delete["ids"].as_array().expect("ids").iter().filter_map(Value::as_u64).collect();
    ids.sort();
    let mut want = vec![any_id.as_u64().expect("id"), delete_id.as_u64().expect("id")];
    want.sort();
    assert_eq!(ids, want, "one push carrying both matching bindings");
    let hb = ws.push(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ws.recv().await[1], json!(hb), "no duplicate push from the replaced channel");
    app.stop().await;
}
