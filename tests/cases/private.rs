//! Private channels against a real database: the policies on `realtime.messages` decide who may
//! join, receive and send broadcasts, and track and see presence; token refresh re-evaluates
//! them; REST sends to private topics are checked; broadcast replay returns the newest private
//! messages, then live ones without repeats.
//!
//! Users: A is a member of `room` who may write and use presence, C a read-only member without
//! presence, B no member at all.

use serde_json::{json, Value};

use crate::support::{exec, fresh_db, http_post_with, pool, token, token_expiring, TestApp, Ws};

pub(super) const PATH: &str = "/realtime/v1/websocket";
pub(super) const A: &str = "00000000-0000-0000-0000-00000000000a";
pub(super) const B: &str = "00000000-0000-0000-0000-00000000000b";
pub(super) const C: &str = "00000000-0000-0000-0000-00000000000c";

/// Policies in the style of Supabase's documentation: membership decides, per extension.
pub(super) const POLICIES: &str = "
CREATE TABLE room_members (room text, user_id uuid, writer bool NOT NULL, presence bool NOT NULL);
GRANT SELECT ON room_members TO authenticated;
CREATE POLICY members_read ON realtime.messages FOR SELECT TO authenticated USING (
    EXISTS (SELECT 1 FROM public.room_members m
             WHERE m.room = realtime.topic() AND m.user_id = auth.uid()
               AND (messages.extension = 'broadcast' OR m.presence)));
CREATE POLICY members_write ON realtime.messages FOR INSERT TO authenticated WITH CHECK (
    EXISTS (SELECT 1 FROM public.room_members m
             WHERE m.room = realtime.topic() AND m.user_id = auth.uid() AND m.writer
               AND (messages.extension = 'broadcast' OR m.presence)));
";

async fn app() -> (TestApp, sqlx::PgPool) {
    let url = fresh_db().await;
    let p = pool(&url).await;
    // The realtime schema comes with the gateway's migrations.
    let app = TestApp::spawn(&url).await;
    exec(&p, crate::support::AUTH_UID).await;
    exec(&p, POLICIES).await;
    exec(
        &p,
        &format!(
            "INSERT INTO room_members VALUES ('room', '{A}', true, true), ('room', '{C}', false, false)"
        ),
    )
    .await;
    (app, p)
}

pub(super) fn user(sub: &str) -> String {
    token("authenticated", Some(sub))
}

async fn connect(app: &TestApp, key: &str) -> Ws {
    Ws::connect_with(app.addr, PATH, None, Some(key)).await.expect("connect")
}

/// A private join of `realtime:room` with `config` merged in; returns the reply payload.
pub(super) async fn join_private(ws: &mut Ws, config: Value) -> Value {
    let mut c = json!({"private": true});
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), config) {
        c.extend(extra);
    }
    ws.join_config("room", c).await
}

/// The next broadcast's payload (`{type, event, payload, meta?}`).
pub(super) async fn next_broadcast(ws: &mut Ws) -> Value {
    ws.recv_until("a broadcast", |f| f["event"] == "broadcast").await["payload"].clone()
}

/// The events of every frame up to and including a broadcast named `marker`.
pub(super) async fn events_until(ws: &mut Ws, marker: &str) -> Vec<String> {
    let mut events = Vec::new();
    loop {
        let f = ws.recv().await;
        let event = f["event"].as_str().unwrap_or("").to_owned();
        if event == "broadcast" && f["payload"]["event"] == marker {
            return events;
        }
        events.push(event);
    }
}

/// Pushes `event` with `payload` on the joined `realtime:room`; returns its ref.
pub(super) async fn push_room(ws: &mut Ws, event: &str, payload: Value) -> String {
    ws.push(Some("j1"), "realtime:room", event, payload).await
}

/// The reply to push `r`.
pub(super) async fn reply_to(ws: &mut Ws, r: &str) -> Value {
    ws.recv_until("a reply", |f| f["event"] == "phx_reply" && f["ref"] == r).await["payload"].clone()
}

#[tokio::test]
async fn joins_broadcasts_and_presence_follow_the_policies() {
    let (app, p) = app().await;
    let mut a = connect(&app, &user(A)).await;
    let mut b = connect(&app, &user(B)).await;
    let mut c = connect(&app, &user(C)).await;

    let reply = join_private(&mut a, json!({"presence": {"key": "a", "enabled": true}})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(a.recv_event("presence_state").await, json!({}));
    let reply = join_private(&mut b, json!({})).await;
    assert_eq!(
        reply,
        json!({"status": "error", "response": {"reason":
            "Unauthorized: You do not have permissions to read from this Channel topic: room"}})
    );
    // C may read broadcasts, not presence: it joins, but gets no presence state.
    let reply = join_private(&mut c, json!({"presence": {"key": "c", "enabled": true}})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    // The public channel of the same name is another channel, open to B.
    let reply = b.join_config("room", json!({})).await;
    assert_eq!(reply["status"], "ok");

    // A writes; C reads (and received no presence state before it); B's public channel hears
    // nothing.
    push_room(&mut a, "broadcast", json!({"type": "broadcast", "event": "hello", "payload": {"from": "a"}}))
        .await;
    assert_eq!(events_until(&mut c, "hello").await, Vec::<String>::new());
    // C may not write: a precise error to C, nothing to anyone.
    let r =
        push_room(&mut c, "broadcast", json!({"type": "broadcast", "event": "nope", "payload": {}})).await;
    assert_eq!(
        reply_to(&mut c, &r).await,
        json!({"status": "error", "response": {"reason":
            "Unauthorized: You do not have permissions to write to this Channel topic: room"}})
    );
    // Presence: A tracks; C, without presence read, sees no diff.
    let r = push_room(
        &mut a,
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"online": true}}),
    )
    .await;
    assert_eq!(reply_to(&mut a, &r).await["status"], "ok");
    let diff = a.recv_event("presence_diff").await;
    assert!(diff["joins"]["a"].is_object(), "{diff}");
    // A database broadcast to the private topic reaches its readers only.
    exec(&p, "SELECT realtime.send('{\"n\": 1}'::jsonb, 'marker', 'room', true)").await;
    assert_eq!(events_until(&mut c, "marker").await, Vec::<String>::new(), "C saw nothing but the marker");
    assert!(events_until(&mut a, "marker").await.iter().all(|e| e != "broadcast"), "no echo to A");
    b.expect_quiet("a private broadcast does not reach the public channel").await;
    // C may not track.
    let r = push_room(&mut c, "presence", json!({"type": "presence", "event": "track", "payload": {}})).await;
    let refused = reply_to(&mut c, &r).await;
    assert_eq!(refused["status"], "error", "{refused}");
    assert!(
        refused["response"]["reason"].as_str().is_some_and(|r| r.starts_with("Unauthorized: ")),
        "{refused}"
    );
    a.expect_quiet("a refused track is not seen").await;
    app.stop().await;
}

#[tokio::test]
async fn refresh_reevaluates_and_rest_sends_are_checked() {
    let (app, _p) = app().await;
    let mut a = connect(&app, &user(A)).await;
    let reply = join_private(&mut a, json!({})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    // A fresh token for the same member keeps the channel (no reply).
    push_room(
        &mut a,
        "access_token",
        json!({"access_token": token_expiring("authenticated", Some(A), 7200)}),
    )
    .await;
    a.expect_quiet("a valid refresh has no reply").await;

    // REST: a member who may write → 202 and delivered; read-only and non-members → 403.
    let send = |key: String, path: &'static str, body: &'static [u8]| {
        let addr = app.addr;
        async move {
            let auth = format!("Authorization: Bearer {key}");
            http_post_with(addr, path, &[&auth, "Content-Type: application/json"], body).await
        }
    };
    let (status, _) = send(user(A), "/api/broadcast/room/events/rest?private=true", b"{\"ok\":1}").await;
    assert_eq!(status, 202);
    assert_eq!(next_broadcast(&mut a).await["event"], "rest");
    for who in [C, B] {
        let (status, body) = send(user(who), "/api/broadcast/room/events/rest?private=true", b"{}").await;
        assert_eq!((status, body.as_str()), (403, r#"{"message":"Unauthorized"}"#));
    }
    let batch = br#"{"messages":[{"topic":"room","event":"pub","payload":{}},
                                 {"topic":"room","event":"priv","payload":{},"private":true}]}"#;
    let (status, _) = send(user(C), "/api/broadcast", batch).await;
    assert_eq!(status, 403, "one private topic C may not write refuses the batch");
    a.expect_quiet("nothing from refused REST sends").await;
    let (status, _) = send(user(A), "/api/broadcast", batch).await;
    assert_eq!(status, 202);
    assert_eq!(next_broadcast(&mut a).await["event"], "priv");

    // Refreshing to a token whose policies deny reading closes the channel.
    push_room(&mut a, "access_token", json!({"access_token": user(B)})).await;
    let system = a.recv_event("system").await;
    assert_eq!(
        (&system["status"], &system["message"]),
        (&json!("error"), &json!("You no longer have permission to read from this Channel topic: room"))
    );
    a.recv_event("phx_close").await;
    app.stop().await;
}

/// Unix milliseconds now, by the database's clock.
async fn now_ms(p: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
        .fetch_one(p)
        .await
        .expect("now")
}

#[tokio::test]
async fn replay_sends_recent_private_messages_then_live_ones_once() {
    let (app, p) = app().await;
    // Old, then three recent (one transaction each: distinct insertion times), and messages that
    // are not the room's private broadcasts.
    exec(&p, "SELECT realtime.send('{\"n\": 0}'::jsonb, 'old', 'room', true)").await;
    exec(&p, "UPDATE realtime.messages SET inserted_at = inserted_at - interval '1 hour'").await;
    let since = now_ms(&p).await - 1000;
    for n in 1..=3 {
        exec(&p, &format!("SELECT realtime.send('{{\"n\": {n}}}'::jsonb, 'e{n}', 'room', true)")).await;
    }
    exec(&p, "SELECT realtime.send('{\"n\": 9}'::jsonb, 'public', 'room', false)").await;
    exec(&p, "SELECT realtime.send('{\"n\": 9}'::jsonb, 'elsewhere', 'other', true)").await;

    let mut a = connect(&app, &user(A)).await;
    let reply = join_private(&mut a, json!({"broadcast": {"replay": {"since": since, "limit": 2}}})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let mut replayed_ids = Vec::new();
    for n in [2, 3] {
        let m = next_broadcast(&mut a).await;
        assert_eq!((&m["event"], &m["payload"]["n"]), (&json!(format!("e{n}")), &json!(n)), "{m}");
        assert_eq!(m["meta"]["replayed"], true, "{m}");
        replayed_ids.push(m["meta"]["id"].as_str().expect("meta.id").to_owned());
    }
    // Then live, without repeating what was replayed (the stream may still be delivering it).
    exec(&p, "SELECT realtime.send('{\"n\": 4}'::jsonb, 'e4', 'room', true)").await;
    let live = next_broadcast(&mut a).await;
    assert_eq!(live["event"], "e4", "{live}");
    assert!(live["meta"].get("replayed").is_none(), "{live}");
    a.expect_quiet("each message once").await;

    // limit is clamped to 1..=25: 0 replays the newest one.
    let mut a2 = connect(&app, &user(A)).await;
    let reply = join_private(&mut a2, json!({"broadcast": {"replay": {"since": since, "limit": 0}}})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(next_broadcast(&mut a2).await["event"], "e4");

    // Refusals, with Supabase's reasons.
    let reason = |v: Value| v["response"]["reason"].as_str().unwrap_or("").to_owned();
    let mut x = connect(&app, &user(A)).await;
    let public = x.join_config("room", json!({"broadcast": {"replay": {"since": since}}})).await;
    assert_eq!(reason(public), "UnableToReplayMessages: Replay is not allowed for public channels");
    let bad = join_private(&mut x, json!({"broadcast": {"replay": {"since": "yesterday"}}})).await;
    assert_eq!(reason(bad), "UnableToReplayMessages: Replay params are not valid");
    let mut b = connect(&app, &user(B)).await;
    let denied = join_private(&mut b, json!({"broadcast": {"replay": {"since": since}}})).await;
    assert_eq!(
        reason(denied),
        "Unauthorized: You do not have permissions to read from this Channel topic: room"
    );
    app.stop().await;
}
