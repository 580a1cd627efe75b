//! Hostile input and failing authorization against a real database: every answer that is not an
//! explicit yes withholds (a table dropped, or dropped and created again under its name, live and
//! on replay), tokens cannot name a privileged role, crafted cursors and oversized joins get
//! precise errors, and the change log is readable by its owner only.
//!
//! "Did not receive" is proven with a marker: after the changes under test, a change the
//! subscriber may see is committed, and its next frames must be exactly what it may see followed
//! by the marker.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{connect, exec, fresh_db, pool, token, user, wait_for, TestApp, Ws};

const PATH: &str = "/realtime/v1/websocket";
const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";

/// `docs`: each user sees its own rows. `gate`: every row is visible, once the advisory lock
/// `GATE` is free (its policy waits for it), so a test can hold the dispatcher's check of a
/// batch while it changes the catalog. `notes`: no row-level security (markers).
const SCHEMA: &str = "
CREATE TABLE docs (id int PRIMARY KEY, owner uuid, body text);
ALTER TABLE docs REPLICA IDENTITY FULL;
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON docs FOR SELECT TO authenticated USING (owner = auth.uid());
GRANT SELECT ON docs TO authenticated;

CREATE FUNCTION public.wait_for_gate() RETURNS bool LANGUAGE sql VOLATILE AS
  'SELECT pg_advisory_lock_shared(4242) IS NOT NULL AND pg_advisory_unlock_shared(4242)';
CREATE TABLE gate (id int PRIMARY KEY);
ALTER TABLE gate ENABLE ROW LEVEL SECURITY;
CREATE POLICY waits ON gate FOR SELECT TO authenticated USING (public.wait_for_gate());
GRANT SELECT ON gate TO authenticated;

CREATE TABLE notes (id int PRIMARY KEY, body text);
GRANT SELECT ON notes TO authenticated;

CREATE TABLE loose (id int, body text);
GRANT SELECT ON loose TO authenticated;
";

/// `docs` as it is created again after a DROP: every row visible to everyone.
const DOCS_AGAIN: &str = "
CREATE TABLE docs (id int PRIMARY KEY, owner uuid, body text);
ALTER TABLE docs REPLICA IDENTITY FULL;
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY everyone ON docs FOR SELECT USING (true);
GRANT SELECT ON docs TO authenticated;
";

async fn app(tweak: impl FnOnce(&mut walcast::config::Config)) -> (TestApp, sqlx::PgPool) {
    crate::support::rls_app(SCHEMA, tweak).await
}

fn all_of(table: &str) -> Value {
    json!({"event": "*", "schema": "public", "table": table})
}

/// The tables' names of the changes before the marker (a `notes` row with body `marker`),
/// with their record ids; `system` errors about withheld changes as ("withheld", 0).
async fn until_marker(ws: &mut Ws) -> (Vec<(String, i64)>, Vec<String>) {
    let mut changes = Vec::new();
    let mut notices = Vec::new();
    loop {
        let f = ws
            .recv_until("a change or notice", |f| {
                f["event"] == "postgres_changes"
                    || (f["event"] == "system" && f["payload"]["extension"] == "postgres_changes")
            })
            .await;
        if f["event"] == "system" {
            notices.push(f["payload"]["message"].as_str().unwrap_or("").to_owned());
            continue;
        }
        let d = &f["payload"]["data"];
        if d["table"] == "notes" && d["record"]["body"] == "marker" {
            return (changes, notices);
        }
        let row = if d["type"] == "DELETE" { &d["old_record"] } else { &d["record"] };
        changes.push((d["table"].as_str().unwrap_or("").to_owned(), row["id"].as_i64().unwrap_or(-1)));
    }
}

/// Holds the advisory lock the `gate` policy waits for, on a connection of its own.
async fn close_gate(p: &sqlx::PgPool) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    let mut held = p.acquire().await.expect("connection");
    sqlx::query("SELECT pg_advisory_lock(4242)").execute(&mut *held).await.expect("lock");
    held
}

/// Releases the gate's lock (a session lock: returning the connection to the pool would keep it).
async fn open_gate(mut held: sqlx::pool::PoolConnection<sqlx::Postgres>) {
    sqlx::query("SELECT pg_advisory_unlock(4242)").execute(&mut *held).await.expect("unlock");
}

/// Waits until a check is blocked on the gate.
async fn check_waits_at_gate(p: &sqlx::PgPool) {
    wait_for("a row check waiting at the gate", Duration::from_secs(20), || {
        let p = p.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted",
            )
            .fetch_one(&p)
            .await
            .ok()?;
            (n > 0).then_some(())
        }
    })
    .await;
}

/// A table dropped after its changes committed, and created again under the same name with a
/// policy that shows every row, before the dispatcher checks the changes: the check is about the
/// table the rows were decoded under, which is gone, so nobody receives them, and each
/// subscriber is told once why.
#[tokio::test]
async fn changes_of_a_table_dropped_before_their_check_are_withheld() {
    let (app, p) = app(|_| {}).await;
    let mut a = connect(&app, &user(A)).await;
    let (_, system) = a.join("t", json!([all_of("docs"), all_of("gate"), all_of("notes")])).await;
    assert_eq!(system["status"], "ok", "{system}");
    exec(&p, &format!("INSERT INTO docs VALUES (1, '{A}', 'mine before')")).await;
    exec(&p, "INSERT INTO notes VALUES (1, 'marker')").await;
    assert_eq!(until_marker(&mut a).await, (vec![("docs".to_owned(), 1)], vec![]));

    // The dispatcher's check of the gate row waits; the docs rows queue behind it.
    let held = close_gate(&p).await;
    exec(&p, "INSERT INTO gate VALUES (1)").await;
    check_waits_at_gate(&p).await;
    exec(&p, &format!("INSERT INTO docs VALUES (2, '{B}', 'b'), (3, '{A}', 'mine'), (4, NULL, 'nobody''s')"))
        .await;
    exec(&p, "DROP TABLE docs").await;
    exec(&p, DOCS_AGAIN).await;
    exec(&p, "INSERT INTO notes VALUES (2, 'marker')").await;
    open_gate(held).await;
    let (changes, notices) = until_marker(&mut a).await;
    assert_eq!(changes, [("gate".to_owned(), 1)], "no row of the dropped table");
    assert_eq!(
        notices,
        ["changes of public.docs are withheld from this subscription: the table no longer exists"]
    );
    // The table under the same name is a new one: its rows are checked against its own policy.
    exec(&p, &format!("INSERT INTO docs VALUES (5, '{B}', 'b'); INSERT INTO notes VALUES (3, 'marker')"))
        .await;
    assert_eq!(until_marker(&mut a).await, (vec![("docs".to_owned(), 5)], vec![]), "told once");
    app.stop().await;
}

/// A subscriber resuming from a cursor taken before its table was dropped and created again
/// (with a policy that shows every row): the replayed changes of the old table are withheld —
/// the other user's rows, and its own too, since the table they were checked against is gone.
#[tokio::test]
async fn a_replay_of_a_dropped_table_withholds_its_changes() {
    let (app, p) = app(|_| {}).await;
    let mut a = connect(&app, &user(A)).await;
    let (_, system) = a.join("t", json!([all_of("docs"), all_of("notes")])).await;
    assert_eq!(system["status"], "ok", "{system}");
    exec(&p, &format!("INSERT INTO docs VALUES (1, '{A}', 'mine')")).await;
    let first = a.recv_event("postgres_changes").await;
    let cursor = first["data"]["cursor"].as_str().expect("cursor").to_owned();
    drop(a);
    exec(&p, &format!("INSERT INTO docs VALUES (2, '{B}', 'b'), (3, '{A}', 'mine too')")).await;
    exec(&p, "DROP TABLE docs").await;
    exec(&p, DOCS_AGAIN).await;
    exec(
        &p,
        &format!("INSERT INTO docs VALUES (4, '{B}', 'new table'); INSERT INTO notes VALUES (1, 'marker')"),
    )
    .await;

    let mut a = connect(&app, &user(A)).await;
    let mut docs = all_of("docs");
    docs["since"] = json!(cursor);
    let mut notes = all_of("notes");
    notes["since"] = json!(cursor);
    let (reply, system) = a.join("t", json!([docs, notes])).await;
    assert_eq!(system["status"], "ok", "{reply} {system}");
    let (changes, notices) = until_marker(&mut a).await;
    assert_eq!(changes, [("docs".to_owned(), 4)], "only the new table's row, which its policy shows");
    assert_eq!(
        notices,
        ["changes of public.docs are withheld from this subscription: the table no longer exists"]
    );
    app.stop().await;
}

/// A table whose column was dropped after its changes committed: the rows carry a column the
/// table no longer has, so the policy would be evaluated on another shape: withheld.
#[tokio::test]
async fn changes_checked_against_an_altered_table_are_withheld() {
    let (app, p) = app(|_| {}).await;
    let mut a = connect(&app, &user(A)).await;
    let (_, system) = a.join("t", json!([all_of("docs"), all_of("gate"), all_of("notes")])).await;
    assert_eq!(system["status"], "ok", "{system}");
    let held = close_gate(&p).await;
    exec(&p, "INSERT INTO gate VALUES (1)").await;
    check_waits_at_gate(&p).await;
    exec(&p, &format!("INSERT INTO docs VALUES (1, '{A}', 'mine')")).await;
    exec(&p, "ALTER TABLE docs DROP COLUMN body").await;
    exec(&p, "INSERT INTO notes VALUES (1, 'marker')").await;
    open_gate(held).await;
    let (changes, notices) = until_marker(&mut a).await;
    assert_eq!(changes, [("gate".to_owned(), 1)]);
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].contains("the table was altered after the change"), "{notices:?}");
    app.stop().await;
}

/// A signed token naming a role outside `auth.roles` is refused before anything else: `none`
/// (which would reset to the gateway's own login, a superuser here) and `postgres` among them.
#[tokio::test]
async fn tokens_naming_reserved_or_unlisted_roles_are_refused() {
    let (app, p) = app(|_| {}).await;
    for role in [
        "none",
        "NONE",
        "postgres",
        "pg_read_all_data",
        "pg_write_server_files",
        "public",
        "session_user",
        "",
    ] {
        let refused = Ws::connect_with(app.addr, PATH, None, Some(&token(role, Some(B)))).await;
        let Err((status, body)) = refused else { panic!("{role:?} was accepted") };
        assert_eq!(status, 401, "{role:?}: {body}");
        let body: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["error"], format!("Token role {role:?} is not allowed"), "{role:?}");
    }
    // Nor as a join's own token, nor as a refresh.
    let mut a = connect(&app, &user(A)).await;
    let r = a
        .push(
            Some("j1"),
            "realtime:t",
            "phx_join",
            json!({"config": {"postgres_changes": [all_of("docs")]}, "access_token": token("none", None)}),
        )
        .await;
    let reply = a.recv_until("the join reply", |f| f["event"] == "phx_reply" && f["ref"] == r.as_str()).await;
    assert_eq!(reply["payload"]["status"], "error", "{reply}");
    assert_eq!(reply["payload"]["response"]["reason"], "InvalidJWTToken: Token role \"none\" is not allowed");
    let (_, system) = a.join("docs", json!([all_of("docs"), all_of("notes")])).await;
    assert_eq!(system["status"], "ok", "{system}");
    a.push(Some("j1"), "realtime:docs", "access_token", json!({"access_token": token("postgres", None)}))
        .await;
    let closed = a.recv_until("the channel closed", |f| f["event"] == "system").await;
    assert!(closed["payload"]["message"].as_str().unwrap_or("").contains("not allowed"), "{closed}");
    a.recv_event("phx_close").await;
    exec(&p, &format!("INSERT INTO docs VALUES (1, '{B}', 'b'); INSERT INTO notes VALUES (1, 'marker')"))
        .await;
    a.expect_quiet("nothing after the refused refresh closed the channel").await;
    app.stop().await;
}

/// `serve` refuses to start when `auth.roles` names a privileged role (a superuser here) that
/// `auth.privileged_roles` does not allow, and starts when it does.
#[tokio::test]
async fn privileged_token_roles_are_refused_at_start_unless_allowed() {
    let url = fresh_db().await;
    let db = url.rsplit('/').next().unwrap_or("").split('?').next().unwrap_or("");
    let slot = format!("slot_{db}");
    let mut config = walcast::config::Config {
        database_url: Some(url.clone()),
        listen: "127.0.0.1:0".parse().expect("addr"),
        slot,
        ..walcast::config::Config::default()
    };
    config.auth.jwt_secret = Some(crate::support::TEST_SECRET.into());
    config.changelog.enabled = false;
    config.auth.roles.push("postgres".into());
    let refused = walcast::Gateway::prepare(config.clone(), true).await;
    let Err(e) = refused else { panic!("a superuser token role was accepted") };
    let text = crate::support::error_text(&e);
    assert!(text.contains("role postgres is privileged (SUPERUSER"), "{text}");
    config.auth.privileged_roles.push("postgres".into());
    let gateway = walcast::Gateway::prepare(config, true).await.expect("allowed explicitly");
    drop(gateway);
}

/// A crafted `since` (a multi-byte character where a zone's digits go) is a precise refusal of
/// that join, and the socket goes on serving.
#[tokio::test]
async fn crafted_cursors_are_refused_without_harm() {
    let (app, p) = app(|_| {}).await;
    let mut a = connect(&app, &user(A)).await;
    for since in ["2024-01-01T00:00:00+0\u{e9}0", "2024-01-01T00:00:00+\u{e9}", "\u{e9}", "00000000", "zz:zz"]
    {
        let mut b = all_of("notes");
        b["since"] = json!(since);
        let reply = a.join_config("crafted", json!({"postgres_changes": [b]})).await;
        assert_eq!(reply["status"], "error", "{since:?}: {reply}");
        let reason = reply["response"]["reason"].as_str().unwrap_or("");
        assert!(reason.starts_with("InvalidCursor: "), "{since:?}: {reason}");
    }
    let (_, system) = a.join("notes", json!([all_of("notes")])).await;
    assert_eq!(system["status"], "ok", "{system}");
    exec(&p, "INSERT INTO notes VALUES (1, 'marker')").await;
    assert_eq!(until_marker(&mut a).await, (vec![], vec![]));
    app.stop().await;
}

/// More bindings than `max_bindings_per_join` in one join: refused with a reason that says the
/// limit, before any catalog or policy lookup.
#[tokio::test]
async fn a_join_with_too_many_bindings_is_refused() {
    let (app, _p) = app(|c| c.max_bindings_per_join = 5).await;
    let mut a = connect(&app, &user(A)).await;
    let bindings: Vec<Value> =
        (0..6).map(|i| json!({"event": "*", "schema": "public", "table": format!("missing_{i}")})).collect();
    let reply = a.join_config("many", json!({"postgres_changes": bindings})).await;
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(
        reply["response"]["reason"],
        "TooManyBindings: a join may carry at most 5 postgres_changes bindings"
    );
    let (_, system) = a.join("few", Value::Array(vec![all_of("notes"); 5])).await;
    assert_eq!(system["status"], "ok", "{system}");
    app.stop().await;
}

/// The change log holds every row before row-level security: its directory is created 0700 and
/// every file in it 0600.
#[tokio::test]
async fn the_change_log_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let (app, p) = app(|_| {}).await;
    exec(&p, "INSERT INTO notes VALUES (1, 'x')").await;
    let db = app.db_url.rsplit('/').next().unwrap_or("").split('?').next().unwrap_or("");
    let dir = crate::support::log_dir(db);
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("dir") {
        let path = entry.expect("entry").path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert!(files >= 3, "lock, meta.json and a segment: {files}");
    let loose = walcast::check::changelog_permissions(&dir);
    assert_eq!(loose.level, walcast::check::Level::Ok, "{loose}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let loose = walcast::check::changelog_permissions(&dir);
    assert_eq!(loose.level, walcast::check::Level::Warn, "{loose}");
    assert!(loose.message.contains("chmod -R go-rwx"), "{loose}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    app.stop().await;
}

/// Reads until the server closes the connection (end of stream or reset); returns what it read.
/// Panics when it is still open after `within`.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream, within: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => panic!("the connection is still open: {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn metric(app: &TestApp, name: &str) -> Option<i64> {
    let text = crate::support::http_get(&format!("http://{}/metrics", app.addr)).await.ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{name} ")))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// Slowloris: a connection that sends nothing, and one that sends its request a byte at a time
/// slower than the header timeout allows, are both closed; a prompt request on another
/// connection is served meanwhile.
#[tokio::test]
async fn slow_and_silent_connections_are_closed_by_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let (app, _p) = app(|c| c.header_read_timeout_secs = 1).await;
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.expect("connect");
    let mut dribbling = tokio::net::TcpStream::connect(app.addr).await.expect("connect");
    let dribble = tokio::spawn(async move {
        // One byte every 200 ms, never finishing the headers, until the server hangs up.
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter().chain(b"a".repeat(400).iter()) {
            if dribbling.write_all(&[*b]).await.is_err() {
                return dribbling;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        dribbling
    });
    let served = crate::support::http_get(&format!("http://{}/healthz", app.addr)).await.expect("served");
    assert!(served.starts_with("HTTP/1.1 200") && served.ends_with("\r\n\r\nok"), "{served}");
    let said = read_until_closed(&mut silent, Duration::from_secs(15)).await;
    assert_eq!(said, "", "nothing is said to a silent connection");
    let mut dribbling = dribble.await.expect("dribbler");
    let said = read_until_closed(&mut dribbling, Duration::from_secs(15)).await;
    assert!(said.is_empty() || said.starts_with("HTTP/1.1 408"), "{said}");
    let closed = wait_for("the silent close counted", Duration::from_secs(10), || async {
        metric(&app, "walcast_silent_connections_closed_total").await.filter(|n| *n >= 1)
    })
    .await;
    assert!(closed >= 1);
    app.stop().await;
}

/// `max_connections` and `max_connections_per_ip`: the connection over a limit is answered 503
/// with the reason and closed; the refusals are counted; the held connections keep working.
#[tokio::test]
async fn connections_over_the_limits_are_refused_and_counted() {
    for (total, per_ip, reason, metric_name) in [
        (3, 0, "too many connections", "walcast_connections_refused_total"),
        (100, 2, "too many connections from this address", "walcast_connections_refused_per_ip_total"),
    ] {
        let (app, p) = app(|c| {
            c.max_connections = total;
            c.max_connections_per_ip = per_ip;
        })
        .await;
        let held = if per_ip > 0 { per_ip } else { total };
        let mut sockets = Vec::new();
        for _ in 0..held {
            let mut ws = connect(&app, &user(A)).await;
            let (_, system) = ws.join("notes", json!([all_of("notes")])).await;
            assert_eq!(system["status"], "ok", "{system}");
            sockets.push(ws);
        }
        let mut over = tokio::net::TcpStream::connect(app.addr).await.expect("connect");
        let said = read_until_closed(&mut over, Duration::from_secs(10)).await;
        assert!(said.starts_with("HTTP/1.1 503"), "{said}");
        assert!(said.ends_with(&format!("{{\"error\":\"{reason}\"}}")), "{said}");
        exec(&p, "INSERT INTO notes VALUES (1, 'marker')").await;
        for ws in &mut sockets {
            assert_eq!(until_marker(ws).await, (vec![], vec![]));
        }
        sockets.pop();
        let refused = wait_for("the refusal counted", Duration::from_secs(10), || async {
            metric(&app, metric_name).await.filter(|n| *n >= 1)
        })
        .await;
        assert_eq!(refused, 1);
        app.stop().await;
    }
}

/// A client that stops reading its event stream is disconnected once a write has waited
/// `write_timeout_secs`; the gateway's other clients are unaffected.
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_at_the_write_deadline() {
    use tokio::io::AsyncWriteExt;
    let (app, p) = app(|c| c.write_timeout_secs = 1).await;
    exec(&p, "ALTER TABLE notes ALTER COLUMN body SET STORAGE EXTERNAL").await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut stalled = socket.connect(app.addr).await.expect("connect");
    let request = format!(
        "GET /v1/tables/public.notes/changes?apikey={} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
        crate::support::anon_key()
    );
    stalled.write_all(request.as_bytes()).await.expect("request");
    let mut reader = connect(&app, &user(A)).await;
    let (_, system) = reader.join("notes", json!([all_of("notes")])).await;
    assert_eq!(system["status"], "ok", "{system}");
    // The reading client reads all along, as a real one does (it is under the same write
    // deadline): the ids of its changes, until the marker.
    let reading = tokio::spawn(async move {
        let mut ids = Vec::new();
        while let Some(f) = reader.try_recv(Duration::from_secs(60)).await {
            let d = &f["payload"]["data"];
            if f["event"] == "postgres_changes" && d["table"] == "notes" {
                if d["record"]["body"] == "marker" {
                    return ids;
                }
                ids.push(d["record"]["id"].as_i64().unwrap_or(-1));
            }
        }
        panic!("the reading client's socket went quiet or closed after {} changes", ids.len());
    });
    // Far more than the socket buffers hold, for a client that reads nothing.
    for i in 0..40 {
        exec(&p, &format!("INSERT INTO notes VALUES ({i}, repeat('x', 200000))")).await;
    }
    let timeouts = wait_for("a write timeout", Duration::from_secs(30), || async {
        metric(&app, "walcast_write_timeouts_total").await.filter(|n| *n >= 1)
    })
    .await;
    assert!(timeouts >= 1);
    exec(&p, "INSERT INTO notes VALUES (1000, 'marker')").await;
    let ids =
        tokio::time::timeout(Duration::from_secs(60), reading).await.expect("the marker").expect("reader");
    assert_eq!(ids, (0..40).collect::<Vec<i64>>(), "the reading client got every change, in order");
    drop(stalled);
    app.stop().await;
}

/// `/v1/ws` without a token: the client must authenticate within `auth.timeout_secs`; pinging
/// does not keep an unauthenticated socket open. One that authenticates in time stays.
#[tokio::test]
async fn unauthenticated_plain_sockets_must_authenticate_in_time() {
    let (app, _p) = app(|c| c.auth.timeout_secs = 1).await;
    let mut late = Ws::connect_with(app.addr, "/v1/ws", None, None).await.expect("upgrade");
    let mut prompt = Ws::connect_with(app.addr, "/v1/ws", None, None).await.expect("upgrade");
    prompt.send_text(&json!({"type": "auth", "token": user(A), "id": 1}).to_string()).await;
    assert_eq!(prompt.recv().await["type"], "authenticated");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut said = Vec::new();
    let close = 'closed: loop {
        assert!(tokio::time::Instant::now() < deadline, "still open: {said:?}");
        // A ping every 300 ms: traffic, but no authentication.
        if !late.try_send_text(&json!({"type": "ping"}).to_string()).await {
            panic!("the socket was closed without a close frame: {said:?}");
        }
        while let Some(f) = late.try_recv(Duration::from_millis(300)).await {
            if f.get("close").is_some() {
                break 'closed f;
            }
            if f["type"] != "pong" {
                said.push(f);
            }
        }
    };
    assert_eq!(close["close"], json!([1008, "authentication timeout"]), "{close}");
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0]["message"].as_str().unwrap_or("").starts_with("authentication timeout"), "{said:?}");
    // The authenticated one outlived the deadline.
    prompt.send_text(&json!({"type": "ping", "id": 2}).to_string()).await;
    assert_eq!(prompt.recv().await["type"], "pong");
    app.stop().await;
}

/// A token refresh re-checks the channel's bindings as a join would: a filter on a column the
/// new role may not read closes the channel (it would otherwise answer as an oracle for it).
#[tokio::test]
async fn a_refresh_to_a_role_that_may_not_read_a_filtered_column_closes_the_channel() {
    let (app, p) = app(|_| {}).await;
    exec(
        &p,
        "CREATE TABLE cards (id int PRIMARY KEY, pin text);
         GRANT SELECT ON cards TO authenticated; REVOKE SELECT ON cards FROM anon;
         GRANT SELECT (id) ON cards TO anon;",
    )
    .await;
    let mut a = connect(&app, &user(A)).await;
    let filtered = json!({"event": "*", "schema": "public", "table": "cards", "filter": "pin=eq.1234"});
    let (_, system) = a.join("cards", json!([filtered])).await;
    assert_eq!(system["status"], "ok", "{system}");
    // A refresh to another user of the same role keeps it.
    a.push(Some("j1"), "realtime:cards", "access_token", json!({"access_token": user(B)})).await;
    a.expect_quiet("the same role may keep its filter").await;
    a.push(Some("j1"), "realtime:cards", "access_token", json!({"access_token": crate::support::anon_key()}))
        .await;
    let closed = a.recv_until("the channel closed", |f| f["event"] == "system").await;
    let message = closed["payload"]["message"].as_str().unwrap_or("");
    assert!(message.contains("permission denied for column pin"), "{closed}");
    a.recv_event("phx_close").await;
    exec(&p, "INSERT INTO cards VALUES (1, '1234')").await;
    a.expect_quiet("nothing after the channel closed").await;
    app.stop().await;
}

/// Sessions of this database in a snapshot's transaction (reading rows, or waiting between
/// reads), holding back vacuum (`backend_xmin`).
async fn snapshots_held(p: &sqlx::PgPool) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND backend_xmin IS NOT NULL AND query LIKE '%num_nulls(%'",
    )
    .fetch_one(p)
    .await
    .ok()
}

/// An event stream with `snapshot=true` whose client stops reading: the snapshot's transaction
/// (which holds back vacuum) is given up after `snapshot_hold_secs`, not held for as long as
/// the connection lasts.
#[tokio::test]
async fn a_snapshot_does_not_hold_its_transaction_for_a_client_that_stops_reading() {
    use tokio::io::AsyncWriteExt;
    let (app, p) = app(|c| {
        c.snapshot_hold_secs = 1;
        c.write_timeout_secs = 600;
        c.client_queue = 16;
    })
    .await;
    exec(&p, "INSERT INTO notes SELECT g, repeat('x', 2000) FROM generate_series(1, 5000) g").await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut stalled = socket.connect(app.addr).await.expect("connect");
    let request = format!(
        "GET /v1/tables/public.notes/changes?snapshot=true&apikey={} HTTP/1.1\r\nHost: x\r\n\
         Accept: text/event-stream\r\n\r\n",
        crate::support::anon_key()
    );
    stalled.write_all(request.as_bytes()).await.expect("request");
    wait_for("the snapshot's transaction open", Duration::from_secs(20), || async {
        snapshots_held(&p).await.filter(|n| *n >= 1)
    })
    .await;
    wait_for("the snapshot's transaction given up", Duration::from_secs(20), || async {
        snapshots_held(&p).await.filter(|n| *n == 0)
    })
    .await;
    // The gateway goes on serving: a reader of the same table gets a new change (only that one:
    // its queue is small, and the rows above may still be on their way).
    let mut reader = connect(&app, &user(A)).await;
    let marker = json!({"event": "INSERT", "schema": "public", "table": "notes", "filter": "id=eq.0"});
    let (_, system) = reader.join("notes", json!([marker])).await;
    assert_eq!(system["status"], "ok", "{system}");
    exec(&p, "INSERT INTO notes VALUES (0, 'marker')").await;
    assert_eq!(until_marker(&mut reader).await, (vec![], vec![]));
    drop(stalled);
    app.stop().await;
}

/// A long-poll with `snapshot=true` reads the snapshot in pages of `limit` rows, in primary-key
/// order, each answer naming the next (`snapshot_next`): every row exactly once, nothing gathered
/// in memory past a page, and rows written between pages are not lost: the last page hands off
/// at the first page's cursor, so the changes after it follow. A table without a primary key
/// cannot be paged: past one answer's bound it is refused (413) with a pointer to the event
/// stream.
#[tokio::test]
async fn a_long_poll_snapshot_is_read_in_pages() {
    let (app, p) = app(|_| {}).await;
    // The rows are through the gateway (a later change on another table arrived) before the
    // snapshot: the changes after its hand-off are only those made while paging.
    let mut probe = app.ws(None).await;
    let marker = json!({"event": "INSERT", "schema": "public", "table": "loose", "filter": "id=eq.20000"});
    probe.join("probe", json!([marker])).await;
    exec(&p, "INSERT INTO notes SELECT g, 'n' FROM generate_series(1, 2500) g").await;
    exec(&p, "INSERT INTO loose VALUES (20000, 'marker')").await;
    probe.recv_event("postgres_changes").await;
    let base =
        format!("http://{}/v1/tables/public.notes/changes?apikey={}", app.addr, crate::support::anon_key());
    let mut url = format!("{base}&snapshot=true&limit=1000&wait=1");
    let (mut ids, mut pages) = (Vec::new(), 0);
    let cursor = loop {
        let (status, body) = super::sse::get_json(&url).await;
        assert_eq!(status, 200, "{body}");
        let rows = body["changes"].as_array().unwrap_or_else(|| panic!("no changes in {body}"));
        assert!(rows.len() <= 1000 && rows.iter().all(|r| r["snapshot"] == true), "page {pages}");
        ids.extend(rows.iter().map(|r| r["record"]["id"].as_i64().unwrap_or(-1)));
        pages += 1;
        if pages == 1 {
            // Between pages: a row in a page still to come, one in a page already read, and a
            // change to a row already read.
            exec(&p, "INSERT INTO notes VALUES (2600, 'late'), (0, 'early'); UPDATE notes SET body = 'x' WHERE id = 5")
                .await;
        }
        match body["snapshot_next"].as_str() {
            Some(next) => {
                assert!(body["cursor"].is_null(), "{body}");
                url = format!("{base}&limit=1000&wait=1&snapshot_after={next}");
            }
            None => break body["cursor"].as_str().map(str::to_owned),
        }
        assert!(pages < 10, "pages never end");
    };
    assert_eq!(pages, 3, "2,501 rows in pages of 1,000");
    let want: Vec<i64> = (1..=2500).chain([2600]).collect();
    assert_eq!(ids, want, "every row once, in key order (a row of a page to come included)");
    // The changes from the hand-off cursor include those made between pages.
    let cursor = cursor.expect("the last page has the hand-off cursor");
    let got = super::sse::poll_changes(&base, &cursor, 3).await;
    let changes: Vec<(String, i64)> = got
        .iter()
        .map(|c| (c["type"].as_str().unwrap_or("").to_owned(), c["record"]["id"].as_i64().unwrap_or(-1)))
        .collect();
    assert_eq!(changes, [("INSERT".into(), 2600), ("INSERT".into(), 0), ("UPDATE".into(), 5)], "{got:?}");

    let (status, body) = super::sse::get_json(&format!("{base}&snapshot_after=not-a-token")).await;
    assert!(status == 400 && body["error"].as_str().unwrap_or("").contains("snapshot_after"), "{body}");

    exec(&p, "INSERT INTO loose SELECT g, 'n' FROM generate_series(1, 10001) g").await;
    let loose =
        format!("http://{}/v1/tables/public.loose/changes?apikey={}", app.addr, crate::support::anon_key());
    let (status, body) = super::sse::get_json(&format!("{loose}&snapshot=true&wait=1")).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains("Accept: text/event-stream"), "{body}");
    let (status, body) =
        super::sse::get_json(&format!("{loose}&snapshot=true&wait=1&filter=id=lte.10")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"].as_array().map(Vec::len), Some(10), "{body}");
    app.stop().await;
}

/// REST broadcast: a sender over its messages per second gets 429 and nothing is delivered;
/// a request naming more private topics than allowed (each is a policy check) gets 400.
#[tokio::test]
async fn rest_broadcast_is_rate_limited_per_sender_and_bounded_in_private_topics() {
    let (app, _p) = app(|c| {
        c.max_rest_messages_per_second = 5;
        c.max_rest_private_topics = 3;
    })
    .await;
    let bearer = format!("Authorization: Bearer {}", user(A));
    let post = |messages: Vec<Value>| {
        let bearer = bearer.clone();
        let addr = app.addr;
        async move {
            let body = json!({"messages": messages}).to_string();
            crate::support::http_post_with(
                addr,
                "/api/broadcast",
                &[&bearer, "Content-Type: application/json"],
                body.as_bytes(),
            )
            .await
        }
    };
    let mut listener = connect(&app, &user(B)).await;
    let reply = listener.join_config("room", json!({"broadcast": {"self": false}})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let message = |i: usize| json!({"topic": "room", "event": "e", "payload": {"i": i}});
    let (status, body) = post((0..6).map(message).collect()).await;
    assert_eq!((status, body.contains("Too many messages per second")), (429, true), "{body}");
    let private: Vec<Value> = (0..4)
        .map(|i| json!({"topic": format!("p{i}"), "event": "e", "payload": {}, "private": true}))
        .collect();
    let (status, body) = post(private).await;
    assert_eq!((status, body.contains("at most 3 private topics")), (400, true), "{body}");
    let (status, body) = post(vec![message(99)]).await;
    assert_eq!(status, 202, "{body}");
    let got = listener.recv_event("broadcast").await;
    assert_eq!(got["payload"]["i"], 99, "only the accepted message was delivered: {got}");
    app.stop().await;
}

/// `admin_listen`: `/metrics` is served on the admin address only; `/readyz` on both.
#[tokio::test]
async fn metrics_can_move_to_an_admin_address() {
    let url = fresh_db().await;
    let db = crate::support::db_name(&url);
    let mut config = walcast::config::Config {
        database_url: Some(url.clone()),
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: Some("127.0.0.1:0".parse().expect("addr")),
        slot: format!("slot_{db}"),
        ..walcast::config::Config::default()
    };
    config.auth.jwt_secret = Some(crate::support::TEST_SECRET.into());
    config.changelog.dir = crate::support::log_dir(&format!("{db}-admin"));
    let gateway = walcast::Gateway::prepare(config, true).await.expect("gateway");
    let (public, admin) = (gateway.local_addr(), gateway.admin_addr().expect("admin address"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(gateway.run(shutdown.clone()));
    let get = |addr: std::net::SocketAddr, path: &'static str| async move {
        crate::support::http_get(&format!("http://{addr}{path}")).await.unwrap_or_default()
    };
    wait_for("ready on both addresses", Duration::from_secs(20), || async {
        let both = get(public, "/readyz").await.starts_with("HTTP/1.1 200")
            && get(admin, "/readyz").await.starts_with("HTTP/1.1 200");
        both.then_some(())
    })
    .await;
    let metrics = get(admin, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("walcast_http_connections"), "{metrics}");
    assert!(get(public, "/metrics").await.starts_with("HTTP/1.1 404"));
    shutdown.cancel();
    run.await.expect("run").expect("clean stop");
}

/// An event stream whose client falls behind (its queue fills while it is not reading) is not
/// dropped: it goes on from the change log after the last id it was sent, at its own pace, and
/// the client ends with every change exactly once, in order.
#[tokio::test]
async fn an_event_stream_that_falls_behind_catches_up_from_the_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (app, p) = app(|c| {
        c.client_queue = 8;
        c.write_timeout_secs = 600;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut slow = socket.connect(app.addr).await.expect("connect");
    let request = format!(
        "GET /v1/tables/public.notes/changes?apikey={} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
        crate::support::anon_key()
    );
    slow.write_all(request.as_bytes()).await.expect("request");
    // The stream has begun (its first bytes are waiting) before the first change.
    let mut first = [0u8; 1];
    slow.read_exact(&mut first).await.expect("stream begun");
    const N: i64 = 2000;
    for chunk in 0..N / 100 {
        exec(
            &p,
            &format!(
                "INSERT INTO notes SELECT g, repeat('x', 3000) FROM generate_series({}, {}) g",
                chunk * 100 + 1,
                chunk * 100 + 100
            ),
        )
        .await;
    }
    // Not reading until the queue has overflowed.
    wait_for("the stream fell behind", Duration::from_secs(30), || async {
        metric(&app, "walcast_slow_client_catchups_total").await.filter(|n| *n >= 1)
    })
    .await;
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ids.len() < N as usize {
        let n = tokio::time::timeout_at(deadline, slow.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{} of {N} within 60 s", ids.len()))
            .expect("read");
        assert!(n > 0, "the stream ended after {} of {N}", ids.len());
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            assert!(!block.contains("event: error"), "{block}");
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                let v: Value = serde_json::from_str(data).expect("json");
                if let Some(id) = v["record"]["id"].as_i64() {
                    ids.push(id);
                }
            }
        }
    }
    assert_eq!(ids, (1..=N).collect::<Vec<_>>(), "every change once, in order");
    app.stop().await;
}

/// Mutations of a valid message: bytes flipped, cut short, repeated, spliced with random bytes,
/// or random bytes alone.
fn mangle(rng: &mut fastrand::Rng, valid: &[u8]) -> Vec<u8> {
    let mut m = valid.to_vec();
    match rng.u8(..6) {
        0 => {
            for _ in 0..rng.usize(1..8) {
                if !m.is_empty() {
                    let at = rng.usize(..m.len());
                    m[at] = rng.u8(..);
                }
            }
        }
        1 => m.truncate(rng.usize(..=m.len())),
        2 => {
            let at = rng.usize(..=m.len());
            let junk: Vec<u8> = (0..rng.usize(1..64)).map(|_| rng.u8(..)).collect();
            m.splice(at..at, junk);
        }
        3 => m = (0..rng.usize(0..256)).map(|_| rng.u8(..)).collect(),
        4 => m = format!("{}{}", "[".repeat(rng.usize(1..5000)), "]".repeat(rng.usize(0..3))).into_bytes(),
        _ => m = m.repeat(rng.usize(2..50)),
    }
    m
}

/// A gateway process whose log is kept, for a test that must find no panic in it.
async fn gateway_process(
    url: &str,
    tag: &str,
) -> (tokio::process::Child, std::net::SocketAddr, std::path::PathBuf) {
    let db = crate::support::db_name(url);
    let port = crate::support::free_port();
    let log_path = std::env::temp_dir().join(format!("walcast-{db}-{tag}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
        .arg("serve")
        .env("WALCAST_DATABASE_URL", url)
        .env("WALCAST_LISTEN", format!("127.0.0.1:{port}"))
        .env("WALCAST_SLOT", format!("slot_{db}"))
        .env("WALCAST_CHANGELOG__DIR", crate::support::log_dir(&format!("{db}-{tag}")))
        .env("WALCAST_AUTH__JWT_SECRET", crate::support::TEST_SECRET)
        .env("WALCAST_MAX_FRAME_BYTES", "65536")
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("gateway process");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_for("gateway process ready", Duration::from_secs(30), || async {
        let body = crate::support::http_get(&format!("http://{addr}/readyz")).await.ok()?;
        body.contains("\"ready\":true").then_some(())
    })
    .await;
    (child, addr, log_path)
}

/// Malformed and oversized input of every protocol — Phoenix text and binary frames, plain
/// WebSocket messages, query strings of the changes endpoint, REST broadcast bodies — from many
/// connections, 10,000 messages in all: each gets an error or a close for its own connection,
/// a well-behaved subscriber meanwhile receives every change, and the gateway's log has no
/// panic in it.
#[tokio::test]
async fn malformed_input_of_every_protocol_harms_nobody_else() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, crate::support::AUTH_UID).await;
    exec(&p, SCHEMA).await;
    let (mut gateway, addr, log_path) = gateway_process(&url, "hostile").await;
    let mut good = Ws::connect_with(addr, PATH, Some("2.0.0"), Some(&user(A))).await.expect("connect");
    let (_, system) = good.join("notes", json!([all_of("notes")])).await;
    assert_eq!(system["status"], "ok", "{system}");

    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let key = user(B);
    let phoenix_join =
        json!(["1", "1", "realtime:x", "phx_join", {"config": {"postgres_changes": [all_of("notes")]}}])
            .to_string();
    let phoenix_push =
        json!(["1", "2", "realtime:x", "broadcast", {"type": "broadcast", "event": "e", "payload": {}}])
            .to_string();
    let plain = json!({"type": "subscribe", "channel": "table:public.notes", "filter": "id=eq.1", "id": 1})
        .to_string();
    let rest = json!({"messages": [{"topic": "x", "event": "e", "payload": {"a": 1}}]}).to_string();
    let mut sent = 0;
    let mut inserted = 0;
    while sent < 10_000 {
        // Changes keep flowing to the good subscriber throughout.
        inserted += 1;
        exec(&p, &format!("INSERT INTO notes VALUES ({inserted}, 'n')")).await;
        // One connection of each kind per round, each sent mangled messages until it closes.
        let (vsn, path) = [(Some("2.0.0"), PATH), (None, PATH), (None, "/v1/ws")][rng.usize(..3)];
        let mut ws = match Ws::connect_with(addr, path, vsn, Some(&key)).await {
            Ok(ws) => ws,
            Err((status, body)) => panic!("{path} refused: {status} {body}"),
        };
        for _ in 0..100 {
            let base = if path == PATH { [&phoenix_join, &phoenix_push][rng.usize(..2)] } else { &plain };
            let m = mangle(&mut rng, base.as_bytes());
            sent += 1;
            let ok = match String::from_utf8(m) {
                Ok(text) if rng.bool() => ws.try_send_text(&text).await,
                Ok(text) => ws.try_send_binary(text.into_bytes()).await,
                Err(e) => ws.try_send_binary(e.into_bytes()).await,
            };
            if !ok {
                break;
            }
        }
        // Oversized: a frame past max_frame_bytes closes with 1009.
        if rng.u8(..10) == 0 {
            let _ = ws.try_send_text(&"x".repeat(70_000)).await;
        }
        drop(ws);
        for _ in 0..20 {
            let q = String::from_utf8_lossy(&mangle(
                &mut rng,
                b"filter=id=eq.1&events=insert,update&select=id,body&since=00000001000000000000000000000000",
            ))
            .into_owned();
            let q: String = q.chars().filter(|c| !c.is_control() && *c != ' ' && *c != '#').collect();
            let _ = crate::support::http_get(&format!(
                "http://{addr}/v1/tables/public.notes/changes?apikey={key}&wait=0&{q}"
            ))
            .await;
            let body = mangle(&mut rng, rest.as_bytes());
            let bearer = format!("Authorization: Bearer {key}");
            let _ = crate::support::http_post_with(
                addr,
                "/api/broadcast",
                &[&bearer, "Content-Type: application/json"],
                &body,
            )
            .await;
            sent += 2;
        }
    }
    // Oversized REST body and request line.
    let big = vec![b'x'; 70_000];
    let bearer = format!("Authorization: Bearer {key}");
    let (status, _) = crate::support::http_post_with(
        addr,
        "/api/broadcast",
        &[&bearer, "Content-Type: application/json"],
        &big,
    )
    .await;
    assert_eq!(status, 413);
    let long = crate::support::http_get(&format!(
        "http://{addr}/v1/tables/public.notes/changes?filter={}",
        "a".repeat(100_000)
    ))
    .await;
    assert!(long.map_or(true, |r| r.starts_with("HTTP/1.1 4")), "a huge request line is refused");

    exec(&p, "INSERT INTO notes VALUES (0, 'marker')").await;
    let mut got = Vec::new();
    loop {
        let f = good.recv_event("postgres_changes").await;
        let id = f["data"]["record"]["id"].as_i64().unwrap_or(-1);
        if id == 0 {
            break;
        }
        got.push(id);
    }
    assert_eq!(got, (1..=inserted).collect::<Vec<_>>(), "the good subscriber got every change");
    assert!(gateway.try_wait().expect("status").is_none(), "the gateway is still running");
    let _ = gateway.start_kill();
    let _ = gateway.wait().await;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!log.contains("panicked"), "a panic in the gateway's log:\n{log}");
    let _ = std::fs::remove_file(&log_path);
}

#[tokio::test]
async fn logs_carry_session_and_join_spans_but_no_row_values_filters_or_tokens() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE notes (id int PRIMARY KEY, body text)").await;
    // A gateway of its own, as an operator runs it, its log (at debug) in a file.
    let db = crate::support::db_name(&url);
    let port = crate::support::free_port();
    let log_dir = crate::support::log_dir(&format!("{db}-logged"));
    let _ = std::fs::create_dir_all(log_dir.parent().expect("a parent"));
    let log_path = log_dir.with_extension("log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let env = [("WALCAST_LOG_FORMAT", "pretty".to_owned())];
    let slot = format!("slot_{db}");
    let gateway =
        crate::support::GatewayProcess { url: &url, slot: &slot, port, log_dir: &log_dir, env: &env };
    let mut child = gateway.start(log_file, "walcast=debug", "logged").await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let secret_token = user(A);
    let mut ws = Ws::connect_with(addr, PATH, None, Some(&secret_token)).await.expect("connects");
    let filter = "body=eq.filter-value-7f3a";
    let (_, status) = ws
        .join("notes-room", json!([{"event": "*", "schema": "public", "table": "notes", "filter": filter}]))
        .await;
    assert_eq!(status["status"], "ok", "{status}");
    exec(&p, "INSERT INTO notes VALUES (1, 'filter-value-7f3a'), (2, 'row-value-91c2')").await;
    ws.recv_event("postgres_changes").await;
    // A refused join logs too.
    let refused = Ws::connect_with(addr, PATH, None, Some("not-a-token-5d1e")).await;
    assert_eq!(refused.err().map(|e| e.0), Some(401));
    drop(ws);
    // The same subscription as an event stream (its first chunk read, then gone) and a long-poll.
    let http = reqwest::Client::new();
    let changes = format!("http://{addr}/v1/tables/public.notes/changes?filter={filter}&wait=0");
    let mut stream = http
        .get(&changes)
        .header("accept", "text/event-stream")
        .bearer_auth(&secret_token)
        .send()
        .await
        .expect("an event stream");
    assert_eq!(stream.status(), 200);
    stream.chunk().await.expect("its first chunk");
    drop(stream);
    let poll = http.get(&changes).bearer_auth(&secret_token).send().await.expect("a long-poll");
    assert_eq!(poll.status(), 200, "{:?}", poll.text().await);
    // And as a GraphQL subscription, which ends when its socket closes.
    graphql_subscription(addr, &p, &secret_token, filter).await;
    // Each session's end is logged once the gateway has seen it go.
    let logs = wait_for("the sessions' ends in the log", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move {
            let ends = text.lines().filter(|l| l.contains("disconnected")).count();
            (ends >= 3).then_some(text)
        }
    })
    .await;
    child.start_kill().expect("stop the gateway");
    let _ = child.wait().await;
    assert!(logs.contains("session{id="), "a span per session: {logs}");
    assert!(
        logs.contains("join{session=") && logs.contains("topic=realtime:notes-room"),
        "a span per join: {logs}"
    );
    for protocol in ["phoenix", "sse", "long-poll", "graphql"] {
        let joined = logs.lines().any(|l| {
            l.contains(&format!("protocol=\"{protocol}\""))
                && l.contains("join{session=")
                && l.contains("joined")
        });
        assert!(joined, "a {protocol} session's join logged in its span: {logs}");
    }
    assert!(logs.contains("operation{id=op-1}"), "a GraphQL operation's span: {logs}");
    for secret in ["filter-value-7f3a", "row-value-91c2", secret_token.as_str(), "not-a-token-5d1e"] {
        assert!(!logs.contains(secret), "{secret} was logged: {logs}");
    }
}

/// A GraphQL subscription to `notes` with `filter` (`body=eq.…`), ended by closing its socket
/// once it has delivered a row.
async fn graphql_subscription(addr: std::net::SocketAddr, p: &sqlx::PgPool, token: &str, filter: &str) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/graphql").into_client_request().expect("request");
    request.headers_mut().insert("sec-websocket-protocol", "graphql-transport-ws".parse().expect("header"));
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.expect("upgrade");
    super::graphql::init(&mut socket, json!({"Authorization": format!("Bearer {token}")})).await;
    let query = format!("subscription {{ notes_changes(filter: \"{filter}\") {{ type }} }}");
    super::graphql::send(
        &mut socket,
        json!({"type": "subscribe", "id": "op-1", "payload": {"query": query}}),
    )
    .await;
    let body = filter.strip_prefix("body=eq.").expect("a body filter");
    super::graphql::delivering(&mut socket, p, &["op-1"], |n| {
        format!("INSERT INTO notes VALUES ({}, '{body}')", 1000 + n)
    })
    .await;
    socket.close(None).await.expect("close");
}
