//! Broadcast and presence over a raw WebSocket (both serializers on one topic), REST broadcast,
//! broadcast from the database, and the per-socket limits with Supabase's error shapes.

use serde_json::{json, Value};

use crate::support::{exec, fresh_db, http_post, http_post_with, pool, token, TestApp, Ws};

async fn app_with(tweak: impl FnOnce(&mut walcast::config::Config)) -> (TestApp, sqlx::PgPool) {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE items (id bigint PRIMARY KEY, name text)").await;
    (TestApp::spawn_with(&url, tweak).await, p)
}

/// The event of a frame in either text serializer.
fn event_of(f: &Value) -> &str {
    if f.is_array() { f[3].as_str() } else { f["event"].as_str() }.unwrap_or("")
}

fn is_broadcast(f: &Value) -> bool {
    f.get("binary").is_some() || event_of(f) == "broadcast"
}

/// (event, payload, meta) of a broadcast frame in any of its three forms.
fn broadcast_parts(f: &Value) -> (String, Value, Value) {
    if let Some(b) = f.get("binary") {
        return (b["event"].as_str().unwrap_or("").into(), b["payload"].clone(), b["meta"].clone());
    }
    let p = if f.is_array() { &f[4] } else { &f["payload"] };
    assert_eq!(p["type"], "broadcast", "{f}");
    (
        p["event"].as_str().unwrap_or("").into(),
        p["payload"].clone(),
        p.get("meta").cloned().unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn broadcast_reaches_both_serializers_with_self_and_ack() {
    let (app, _p) = app_with(|_| {}).await;
    let mut v1 = app.ws(None).await;
    let mut v2 = app.ws(Some("2.0.0")).await;
    let mut sender = app.ws(Some("2.0.0")).await;
    v1.join_config("room", json!({"broadcast": {"self": false}})).await;
    v2.join_config("room", json!({})).await;
    let reply = sender.join_config("room", json!({"broadcast": {"self": "true", "ack": true}})).await;
    assert_eq!(reply["status"], "ok");

    // v2.0.0 text array push, JSON payload.
    let r = sender
        .push(
            Some("j1"),
            "realtime:room",
            "broadcast",
            json!({"type": "broadcast", "event": "cursor", "payload": {"x": 1}}),
        )
        .await;
    let f = v1.recv_until("broadcast", is_broadcast).await;
    assert_eq!(
        f,
        json!({"topic": "realtime:room", "event": "broadcast", "ref": null,
               "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 1}}}),
        "1.0.0 members get JSON text"
    );
    let f = v2.recv_until("broadcast", is_broadcast).await;
    assert_eq!(
        f,
        json!({"binary": {"topic": "realtime:room", "event": "cursor", "meta": null, "json": true, "payload": {"x": 1}}}),
        "2.0.0 members get kind-4 binary frames"
    );
    // self: true echoes to the sender, ack: true answers the push.
    let mut got_ack = false;
    let mut got_echo = false;
    while !(got_ack && got_echo) {
        let f = sender.recv().await;
        if f.get("binary").is_some() {
            got_echo = true;
        } else {
            let (_, e, p, fr, _) = sender.parts(&f);
            if e == "phx_reply" && fr == json!(r) {
                assert_eq!(p, json!({"status": "ok", "response": {}}));
                got_ack = true;
            }
        }
    }

    // v1.0.0 JSON push from a member without self: others receive, it does not.
    v1.push(
        Some("j1"),
        "realtime:room",
        "broadcast",
        json!({"type": "broadcast", "event": "typing", "payload": true}),
    )
    .await;
    let f = v2.recv_until("broadcast", is_broadcast).await;
    assert_eq!(broadcast_parts(&f), ("typing".into(), json!(true), Value::Null));
    v1.expect_quiet("no echo without self").await;

    // Binary kind-3 pushes, JSON and binary encodings.
    sender.push_binary("j1", "realtime:room", "blob", false, &[0, 159, 146, 150]).await;
    let f = v2.recv_until("binary broadcast", |f| f.get("binary").is_some()).await;
    assert_eq!(f["binary"]["json"], false);
    assert_eq!(f["binary"]["payload"], json!([0, 159, 146, 150]));
    sender.push_binary("j1", "realtime:room", "pos", true, br#"{"y":2}"#).await;
    let f = v1.recv_until("broadcast", is_broadcast).await;
    assert_eq!(
        broadcast_parts(&f),
        ("pos".into(), json!({"y": 2}), Value::Null),
        "the binary payload was skipped for 1.0.0"
    );
    app.stop().await;
}

#[tokio::test]
async fn oversized_broadcasts_are_refused_and_rate_limits_close_the_channel() {
    let (app, _p) = app_with(|c| {
        c.max_broadcast_payload_bytes = 64;
        c.max_events_per_second = 3;
        c.max_joins_per_second = 4;
    })
    .await;
    let mut a = app.ws(Some("2.0.0")).await;
    let mut b = app.ws(None).await;
    a.join_config("room", json!({"broadcast": {"ack": true}})).await;
    b.join_config("room", json!({})).await;
    let big = "x".repeat(100);
    let r = a
        .push(
            Some("j1"),
            "realtime:room",
            "broadcast",
            json!({"type": "broadcast", "event": "e", "payload": big}),
        )
        .await;
    let f = a.recv().await;
    assert_eq!(
        f,
        json!(["j1", r, "realtime:room", "phx_reply", {"status": "error", "response": {"error": "payload_size_exceeded"}}])
    );
    b.expect_quiet("nothing delivered over the size limit").await;

    // The same limit for binary pushes.
    let r = a.push_binary("j1", "realtime:room", "e", false, &[7u8; 100]).await;
    assert_eq!(a.recv().await[4]["response"]["error"], "payload_size_exceeded", "ref {r}");

    // The refused ones counted; one more fits this second's window of 3, the next closes.
    a.push(
        Some("j1"),
        "realtime:room",
        "broadcast",
        json!({"type": "broadcast", "event": "e", "payload": 1}),
    )
    .await;
    a.recv_until("ack", |f| f[3] == "phx_reply").await;
    a.push(
        Some("j1"),
        "realtime:room",
        "broadcast",
        json!({"type": "broadcast", "event": "e", "payload": 2}),
    )
    .await;
    let sys = a.recv_until("system", |f| f[3] == "system").await;
    assert_eq!(
        sys,
        json!(["j1", null, "realtime:room", "system",
               {"extension": "system", "status": "error", "message": "Too many messages per second", "channel": "room"}])
    );
    assert_eq!(a.recv().await, json!(["j1", "j1", "realtime:room", "phx_close", {}]));
    let f = b.recv_until("broadcast", is_broadcast).await;
    assert_eq!(f["payload"]["payload"], 1, "only the one within the limit was delivered");
    b.expect_quiet("the rate-limited message was not delivered").await;

    // Joins per second: the fifth join within a second is refused with Supabase's reason.
    let mut c = app.ws(None).await;
    let mut reasons = Vec::new();
    for i in 0..5 {
        let reply = c.join_config(&format!("j{i}"), json!({})).await;
        reasons.push(reply["response"]["reason"].clone());
    }
    // The window may roll over once on a slow machine, so look for the refusal in order.
    let refused: Vec<&Value> = reasons.iter().filter(|r| !r.is_null()).collect();
    assert!(
        refused.iter().all(|r| *r == "ClientJoinRateLimitReached: Too many joins per second"),
        "{reasons:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn presence_sync_join_leave_across_serializers() {
    let (app, _p) = app_with(|_| {}).await;
    let mut alice = app.ws(Some("2.0.0")).await;
    alice.join_config("lobby", json!({"presence": {"key": "alice", "enabled": true}})).await;
    assert_eq!(alice.recv().await, json!(["j1", null, "realtime:lobby", "presence_state", {}]));
    let r = alice
        .push(
            Some("j1"),
            "realtime:lobby",
            "presence",
            json!({"type": "presence", "event": "track", "payload": {"online_at": 1}}),
        )
        .await;
    let reply = alice.recv().await;
    assert_eq!(reply, json!(["j1", r, "realtime:lobby", "phx_reply", {"status": "ok", "response": {}}]));
    let diff = alice.recv().await;
    assert_eq!(diff[3], "presence_diff");
    let meta = &diff[4]["joins"]["alice"]["metas"][0];
    assert_eq!(meta["online_at"], 1);
    let alice_ref = meta["phx_ref"].as_str().expect("phx_ref").to_owned();

    // A 1.0.0 client without presence enabled: its first track brings the state, then the diff.
    let mut bob = app.ws(None).await;
    bob.join_config("lobby", json!({"presence": {"key": "bob"}})).await;
    bob.push(
        Some("j1"),
        "realtime:lobby",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"n": 2}}),
    )
    .await;
    let mut events = Vec::new();
    while events.len() < 3 {
        let f = bob.recv().await;
        events.push((f["event"].as_str().unwrap_or("").to_owned(), f["payload"].clone()));
    }
    assert_eq!(events[0].0, "phx_reply");
    assert_eq!(events[1].0, "presence_state");
    assert_eq!(events[1].1["alice"]["metas"][0]["phx_ref"], json!(alice_ref));
    assert_eq!(events[2].0, "presence_diff");
    assert_eq!(events[2].1["joins"]["bob"]["metas"][0]["n"], 2);
    let d = alice.recv_until("bob joins", |f| f[3] == "presence_diff").await;
    assert!(d[4]["joins"]["bob"].is_object(), "{d}");

    // Non-map payloads and unknown events are errors for that push only.
    let r = bob
        .push(
            Some("j1"),
            "realtime:lobby",
            "presence",
            json!({"type": "presence", "event": "track", "payload": [1]}),
        )
        .await;
    let f = bob.recv_until("error reply", |f| f["ref"] == json!(r)).await;
    assert_eq!(
        f["payload"],
        json!({"status": "error", "response": {"reason": "Presence track payload must be a map"}})
    );
    let r = bob
        .push(Some("j1"), "realtime:lobby", "presence", json!({"type": "presence", "event": "jump"}))
        .await;
    let f = bob.recv_until("error reply", |f| f["ref"] == json!(r)).await;
    assert_eq!(f["payload"]["status"], "error");

    // A socket that dies: its presence leaves.
    drop(bob);
    let d = alice.recv_until("bob leaves", |f| f[3] == "presence_diff").await;
    assert!(d[4]["leaves"]["bob"].is_object(), "{d}");
    assert_eq!(d[4]["joins"], json!({}));

    // Untrack.
    let mut carol = app.ws(Some("2.0.0")).await;
    carol.join_config("lobby", json!({"presence": {"key": "carol", "enabled": true}})).await;
    let state = carol.recv_until("state", |f| f[3] == "presence_state").await;
    assert_eq!(
        state[4].as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["alice".to_owned()])
    );
    alice
        .push(Some("j1"), "realtime:lobby", "presence", json!({"type": "presence", "event": "untrack"}))
        .await;
    let d = carol.recv_until("alice leaves", |f| f[3] == "presence_diff").await;
    assert_eq!(d[4]["leaves"]["alice"]["metas"][0]["phx_ref"], json!(alice_ref));
    app.stop().await;
}

#[tokio::test]
async fn presence_limits_close_the_channel() {
    let (app, _p) = app_with(|c| {
        c.max_presence_events = 2;
        c.max_presence_payload_bytes = 100;
    })
    .await;
    let mut a = app.ws(Some("2.0.0")).await;
    a.join_config("p", json!({"presence": {"key": "a"}})).await;
    a.push(
        Some("j1"),
        "realtime:p",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"big": "x".repeat(200)}}),
    )
    .await;
    let sys = a.recv_until("system", |f| f[3] == "system").await;
    assert_eq!(sys[4]["message"], "Track message size exceeded");
    assert_eq!(a.recv().await[3], "phx_close");
    a.join_config("p", json!({"presence": {"key": "a"}})).await;
    a.push(
        Some("j1"),
        "realtime:p",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {}}),
    )
    .await;
    let reply = a.recv_until("reply", |f| f[3] == "phx_reply").await;
    assert_eq!(reply[4]["status"], "ok", "the second event of the window is allowed");
    a.push(Some("j1"), "realtime:p", "presence", json!({"type": "presence", "event": "untrack"})).await;
    let sys = a.recv_until("system", |f| f[3] == "system").await;
    assert_eq!(
        sys[4]["message"], "Client presence rate limit exceeded",
        "2 events per window, this is the third"
    );
    app.stop().await;
}

#[tokio::test]
async fn rest_broadcast_endpoints() {
    let (app, _p) = app_with(|c| c.max_broadcast_payload_bytes = 1000).await;
    let mut v1 = app.ws(None).await;
    let mut v2 = app.ws(Some("2.0.0")).await;
    v1.join_config("news", json!({})).await;
    v2.join_config("news", json!({})).await;

    let body = json!({"messages": [{"topic": "news", "event": "headline", "payload": {"t": "a"}},
                                   {"topic": "news", "event": "headline", "payload": {"t": "b"}, "id": "m2"}]});
    let (status, resp) =
        http_post(app.addr, "/api/broadcast", "application/json", body.to_string().as_bytes()).await;
    assert_eq!((status, resp.as_str()), (202, ""));
    for want in [("a", Value::Null), ("b", json!({"id": "m2"}))] {
        let f = v1.recv_until("broadcast", is_broadcast).await;
        assert_eq!(broadcast_parts(&f), ("headline".into(), json!({"t": want.0}), want.1.clone()));
        let f = v2.recv_until("broadcast", is_broadcast).await;
        assert_eq!(broadcast_parts(&f), ("headline".into(), json!({"t": want.0}), want.1));
    }

    let (status, _) =
        http_post(app.addr, "/realtime/v1/api/broadcast/news/events/ping", "application/json", br#"{"n":1}"#)
            .await;
    assert_eq!(status, 202);
    for ws in [&mut v1, &mut v2] {
        let f = ws.recv_until("broadcast", is_broadcast).await;
        assert_eq!(broadcast_parts(&f), ("ping".into(), json!({"n": 1}), Value::Null));
    }
    let (status, _) =
        http_post(app.addr, "/api/broadcast/news/events/bytes", "application/octet-stream", &[1, 2, 3]).await;
    assert_eq!(status, 202);
    let f = v2.recv_until("binary", |f| f.get("binary").is_some()).await;
    assert_eq!(f["binary"]["payload"], json!([1, 2, 3]));
    v1.expect_quiet("1.0.0 receives no binary payloads").await;

    let (status, resp) = http_post(app.addr, "/api/broadcast/news/events/x", "text/plain", b"hi").await;
    assert_eq!(status, 415);
    assert_eq!(
        serde_json::from_str::<Value>(&resp).ok(),
        Some(json!({"error": "Unsupported Media Type. Use application/json or application/octet-stream"}))
    );
    let big = json!({"messages": [{"topic": "news", "event": "e", "payload": "x".repeat(2000)}]});
    let (status, resp) =
        http_post(app.addr, "/api/broadcast", "application/json", big.to_string().as_bytes()).await;
    assert_eq!((status, resp.contains("Payload size exceeds tenant limit")), (422, true), "{resp}");
    let (status, _) = http_post(app.addr, "/api/broadcast", "application/json", b"{\"nope\":1}").await;
    assert_eq!(status, 400);
    v2.expect_quiet("refused requests deliver nothing").await;
    // Private and public channels of one name are distinct (service_role may write anywhere).
    let service = format!("Authorization: Bearer {}", token("service_role", None));
    let (status, _) = http_post_with(
        app.addr,
        "/api/broadcast/news/events/secret?private=true",
        &[&service, "Content-Type: application/json"],
        b"1",
    )
    .await;
    assert_eq!(status, 202);
    v2.expect_quiet("a private send does not reach the public channel").await;
    app.stop().await;
}

#[tokio::test]
async fn broadcast_from_the_database_on_commit_in_order() {
    let (app, p) = app_with(|_| {}).await;
    exec(
        &p,
        "CREATE FUNCTION items_broadcast() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM realtime.broadcast_changes('items:' || coalesce(NEW.id, OLD.id)::text, TG_OP, TG_OP,
                                              TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
           RETURN NULL;
         END $$;
         CREATE TRIGGER items_broadcast AFTER INSERT OR UPDATE OR DELETE ON items
           FOR EACH ROW EXECUTE FUNCTION items_broadcast();",
    )
    .await;
    let mut public = app.ws(Some("2.0.0")).await;
    // service_role bypasses the policies on realtime.messages, so it may join private channels.
    let service = token("service_role", None);
    let addr = app.addr;
    let connect = |key: String| async move {
        Ws::connect_with(addr, "/realtime/v1/websocket", None, Some(&key)).await.expect("connect")
    };
    let mut private = connect(service.clone()).await;
    let mut item = connect(service).await;
    let (_, system) =
        public.join("room", json!([{"event": "INSERT", "schema": "public", "table": "items"}])).await;
    assert_eq!(system["status"], "ok");
    let reply =
        private.join_config("room", json!({"private": true, "broadcast": {"replication_ready": true}})).await;
    assert_eq!(reply["status"], "ok");
    let ready = private.recv().await;
    assert_eq!(
        ready,
        json!({"topic": "realtime:room", "event": "system", "ref": null,
               "payload": {"extension": "system", "status": "ok", "message": "Replication connection established", "channel": "room"}})
    );
    item.join_config("items:1", json!({"private": true})).await;

    // A rolled-back transaction delivers nothing.
    exec(&p, "BEGIN; SELECT realtime.send('{\"lost\": true}', 'e', 'room', false); ROLLBACK;").await;
    // In commit order with row changes.
    exec(
        &p,
        "BEGIN;
         SELECT realtime.send('{\"n\": 1}'::jsonb, 'first', 'room', false);
         INSERT INTO items VALUES (1, 'one');
         SELECT realtime.send_binary('\\x00ff'::bytea, 'second', 'room', false);
         SELECT realtime.send('{\"p\": true}'::jsonb, 'private', 'room');
         COMMIT;",
    )
    .await;
    let f = public.recv_until("first", |f| f.get("binary").is_some() || f[3] == "postgres_changes").await;
    let b = &f["binary"];
    assert_eq!(b["event"], "first", "{f}");
    let id = b["meta"]["id"].as_str().expect("meta.id").to_owned();
    assert_eq!(b["payload"], json!({"n": 1, "id": id}), "send puts the id into the payload");
    let f = public.recv().await;
    assert_eq!(f[3], "postgres_changes", "the row change comes between the two sends: {f}");
    let f = public.recv().await;
    assert_eq!((&f["binary"]["event"], &f["binary"]["payload"]), (&json!("second"), &json!([0, 255])));
    public.expect_quiet("nothing from the rolled-back transaction, nothing private").await;

    let f = private.recv_until("private", |f| f["event"] == "broadcast").await;
    assert_eq!(f["payload"]["event"], "private");
    assert_eq!(f["payload"]["payload"]["p"], true);
    assert!(f["payload"]["meta"]["id"].is_string());

    // broadcast_changes from a trigger (private by default, like realtime.send).
    let f = item.recv_until("trigger broadcast", |f| f["event"] == "broadcast").await;
    assert_eq!(f["payload"]["event"], "INSERT");
    assert_eq!(f["payload"]["payload"]["record"], json!({"id": 1, "name": "one"}), "{f}");
    assert_eq!(f["payload"]["payload"]["old_record"], Value::Null);
    assert_eq!(
        (&f["payload"]["payload"]["operation"], &f["payload"]["payload"]["table"]),
        (&json!("INSERT"), &json!("items"))
    );
    exec(&p, "UPDATE items SET name = 'uno' WHERE id = 1").await;
    let f = item.recv_until("update", |f| f["event"] == "broadcast").await;
    assert_eq!(f["payload"]["payload"]["old_record"]["name"], "one");
    assert_eq!(f["payload"]["payload"]["record"]["name"], "uno");
    let mut tx = p.begin().await.expect("begin");
    sqlx::query("SELECT set_config('realtime.topic', 'abc', true)").execute(&mut *tx).await.expect("set");
    let t: Option<String> =
        sqlx::query_scalar("SELECT realtime.topic()").fetch_one(&mut *tx).await.expect("topic()");
    assert_eq!(t.as_deref(), Some("abc"));
    tx.rollback().await.expect("rollback");
    let t: Option<String> =
        sqlx::query_scalar("SELECT realtime.topic()").fetch_one(&p).await.expect("topic()");
    assert_eq!(t, None, "realtime.topic() is null outside a send");
    app.stop().await;
}

#[tokio::test]
async fn old_messages_are_pruned_and_an_existing_realtime_schema_is_left_alone() {
    let (app, p) = app_with(|_| {}).await;
    exec(
        &p,
        "INSERT INTO realtime.messages (topic, extension, event, payload, inserted_at)
              VALUES ('t', 'broadcast', 'old', '{}', now() - interval '4 days'),
                     ('t', 'broadcast', 'new', '{}', now())",
    )
    .await;
    let n = walcast::replication::slot::delete_old_messages(&p, std::time::Duration::from_secs(72 * 3600))
        .await
        .expect("prune");
    assert_eq!(n, Some(1));
    let left: Vec<String> =
        sqlx::query_scalar("SELECT event FROM realtime.messages").fetch_all(&p).await.expect("rows");
    assert_eq!(left, ["new"]);
    app.stop().await;

    // A database whose `realtime` schema predates walcast keeps it untouched.
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(
        &p,
        "CREATE SCHEMA realtime; CREATE TABLE realtime.messages (id int, inserted_at timestamp);
              INSERT INTO realtime.messages VALUES (1, now() - interval '10 days');",
    )
    .await;
    let app = TestApp::spawn(&url).await;
    let n = walcast::replication::slot::delete_old_messages(&p, std::time::Duration::from_secs(1))
        .await
        .expect("prune");
    assert_eq!(n, None);
    let fns: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_proc WHERE pronamespace = 'realtime'::regnamespace")
            .fetch_one(&p)
            .await
            .expect("count");
    assert_eq!(fns, 0, "no functions were added to the existing schema");
    app.stop().await;
}
