//! Resuming from the change log: cursors on every change, replay after a cursor with no gap and
//! no repeat (while running and across a restart), and the gap signal when it cannot.

use serde_json::{json, Value};

use crate::support::{exec, fresh_db, pool, TestApp, Ws};

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, v text);
CREATE TABLE other (id bigint PRIMARY KEY);
";

async fn app() -> (TestApp, sqlx::PgPool, String) {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    (TestApp::spawn(&url).await, p, url)
}

fn inserts(since: Option<&str>) -> Value {
    let mut b = json!({"event": "INSERT", "schema": "public", "table": "items"});
    if let Some(c) = since {
        b["since"] = json!(c);
    }
    json!([b])
}

/// The next `postgres_changes` delivery: (record id, cursor).
async fn next_change(ws: &mut Ws) -> (i64, String) {
    let p = ws.recv_event("postgres_changes").await;
    let data = &p["data"];
    let id = data["record"]["id"].as_i64().unwrap_or_else(|| panic!("no id in {p}"));
    let cursor = data["cursor"].as_str().unwrap_or_else(|| panic!("no cursor in {p}")).to_owned();
    (id, cursor)
}

async fn insert_each(p: &sqlx::PgPool, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        exec(p, &format!("INSERT INTO items VALUES ({id}, 'v{id}'); INSERT INTO other VALUES ({id})")).await;
    }
}

#[tokio::test]
async fn a_channel_resumes_after_its_cursor_without_gaps_or_repeats_across_a_restart() {
    let (app, p, url) = app().await;
    let mut ws = app.ws(None).await;
    let (_, system) = ws.join("feed", inserts(None)).await;
    assert_eq!(system["status"], "ok", "{system}");
    insert_each(&p, 1..=3).await;
    let mut seen = Vec::new();
    for want in 1..=3 {
        let (id, cursor) = next_change(&mut ws).await;
        assert_eq!(id, want);
        seen.push(cursor);
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "cursors ascend: {seen:?}");
    assert_eq!(seen[0].len(), 32);
    drop(ws);

    // Missed while away: 4..=8 (with UPDATEs and another table the binding does not match).
    insert_each(&p, 4..=8).await;
    exec(&p, "UPDATE items SET v = 'changed' WHERE id = 2").await;
    let mut ws = app.ws(None).await;
    let (_, system) = ws.join("feed", inserts(Some(&seen[1]))).await;
    assert_eq!(system["status"], "ok", "{system}");
    let mut cursors = Vec::new();
    for want in 3..=8 {
        let (id, cursor) = next_change(&mut ws).await;
        assert_eq!(id, want, "replayed in order from just after the cursor");
        cursors.push(cursor);
    }
    assert_eq!(cursors[0], seen[2], "a change's cursor is the same live and replayed");
    insert_each(&p, 9..=9).await;
    assert_eq!(next_change(&mut ws).await.0, 9, "then live, nothing repeated");
    ws.expect_quiet("nothing after the live change").await;
    drop(ws);
    app.stop().await;

    // A restart keeps the history; the slot's re-sent transactions are not logged twice.
    let app = TestApp::spawn(&url).await;
    insert_each(&p, 10..=10).await;
    let mut ws = app.ws(None).await;
    ws.join("feed", inserts(Some(&cursors[2]))).await;
    for want in 6..=10 {
        assert_eq!(next_change(&mut ws).await.0, want);
    }
    insert_each(&p, 11..=11).await;
    assert_eq!(next_change(&mut ws).await.0, 11);
    ws.expect_quiet("no repeats after a restart").await;
    app.stop().await;
}

/// A channel that has received no change yet resumes from the cursor its `system` message
/// carries: the changes committed while it was away arrive, none from before it joined.
#[tokio::test]
async fn a_channel_that_received_nothing_resumes_from_its_join_cursor() {
    let (app, p, _) = app().await;
    insert_each(&p, 1..=2).await;
    let mut ws = app.ws(None).await;
    // The log has seen 1..=2 before this join: wait until a binding would receive them live.
    let mut probe = app.ws(None).await;
    probe.join("probe", inserts(None)).await;
    insert_each(&p, 3..=3).await;
    assert_eq!(next_change(&mut probe).await.0, 3);
    let (_, system) = ws.join("feed", inserts(None)).await;
    assert_eq!(system["status"], "ok", "{system}");
    let cursor = system["cursor"].as_str().unwrap_or_else(|| panic!("no cursor in {system}")).to_owned();
    assert_eq!(cursor.len(), 32, "{system}");
    drop(ws);

    insert_each(&p, 4..=5).await;
    assert_eq!(next_change(&mut probe).await.0, 4);
    assert_eq!(next_change(&mut probe).await.0, 5);
    let mut ws = app.ws(None).await;
    ws.join("feed", inserts(Some(&cursor))).await;
    assert_eq!(next_change(&mut ws).await.0, 4, "the first change after the join, none before it");
    assert_eq!(next_change(&mut ws).await.0, 5);
    ws.expect_quiet("nothing else").await;
    app.stop().await;
}

#[tokio::test]
async fn cursors_it_cannot_serve_get_a_gap_and_bad_ones_an_error() {
    let (app, p, _) = app().await;
    let mut ws = app.ws(None).await;
    ws.join("feed", inserts(None)).await;
    insert_each(&p, 1..=1).await;
    let (_, cursor) = next_change(&mut ws).await;

    // Another log's cursor (another epoch): a gap signal, then live changes as usual.
    let foreign =
        format!("{:08X}{}", u32::from_str_radix(&cursor[..8], 16).unwrap().wrapping_add(1), &cursor[8..]);
    let mut other = app.ws(None).await;
    other.join("feed", inserts(Some(&foreign))).await;
    let gap = other.recv_event("system").await;
    assert_eq!(gap["gap"], "other_log", "{gap}");
    assert_eq!(gap["status"], "error");
    assert!(gap["message"].as_str().unwrap_or("").contains("load the current state again"), "{gap}");
    insert_each(&p, 2..=2).await;
    assert_eq!(next_change(&mut other).await.0, 2);

    // Not a cursor at all: the join is refused.
    let topic = "realtime:bad";
    let r = other
        .push(Some("9"), topic, "phx_join", json!({"config": {"postgres_changes": inserts(Some("nope"))}}))
        .await;
    let reply =
        other.recv_until("the refused join", |f| f["event"] == "phx_reply" && f["ref"] == json!(r)).await;
    assert_eq!(reply["payload"]["status"], "error");
    let reason = reply["payload"]["response"]["reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("InvalidCursor: invalid cursor"), "{reason}");
    app.stop().await;
}
