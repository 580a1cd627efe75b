//! Initial snapshots with a consistent hand-off: the rows a subscription matches now, an end
//! marker, then exactly the changes the snapshot does not reflect — under concurrent inserts,
//! updates and deletes (SSE), with filters and row-level security (Phoenix), and on long-poll.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::sse::{get_json, key_query, Sse};
use crate::support::{exec, fresh_db, pool, token, wait_for, TestApp, Ws};

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, v text);
INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 3000) g;
";

/// Reads a snapshot, then applies changes strictly (an insert of a present row, or an update or
/// delete of an absent one, fails the test) until the insert of row -1.
async fn follow(mut sse: Sse) -> BTreeMap<i64, String> {
    let mut rows = BTreeMap::new();
    let text = |d: &Value| d["record"]["v"].as_str().expect("v").to_owned();
    loop {
        let (id, event, data) = sse.next().await.expect("snapshot message");
        match event.as_str() {
            "snapshot" => {
                assert_eq!(
                    (id, data["type"].as_str(), &data["snapshot"]),
                    (None, Some("INSERT"), &json!(true))
                );
                let key = data["record"]["id"].as_i64().expect("id");
                assert!(rows.insert(key, text(&data)).is_none(), "row {key} twice in the snapshot");
            }
            "snapshot-end" => {
                assert_eq!(data["rows"].as_u64(), Some(rows.len() as u64), "{data}");
                assert!(id.is_some() && data["cursor"].as_str() == id.as_deref(), "{data}");
                break;
            }
            other => panic!("{other} before the end of the snapshot: {data}"),
        }
    }
    loop {
        let (_, event, data) = sse.next().await.expect("change");
        match event.as_str() {
            "insert" => {
                let key = data["record"]["id"].as_i64().expect("id");
                assert!(
                    rows.insert(key, text(&data)).is_none(),
                    "insert of row {key}, which the snapshot had"
                );
                if key == -1 {
                    return rows;
                }
            }
            "update" => {
                let key = data["record"]["id"].as_i64().expect("id");
                assert!(rows.insert(key, text(&data)).is_some(), "update of row {key}, absent");
            }
            "delete" => {
                let key = data["old_record"]["id"].as_i64().expect("id");
                assert!(rows.remove(&key).is_some(), "delete of row {key}, absent");
            }
            other => panic!("unexpected {other}: {data}"),
        }
    }
}

#[tokio::test]
async fn snapshot_hand_off_under_concurrent_writes_equals_the_final_table() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn(&url).await;
    let base = format!("http://{}", app.addr);

    // Three writers: single- and multi-statement transactions, some held open for a moment so
    // that snapshots are taken while transactions are in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let next_id = Arc::new(AtomicU64::new(3001));
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let (p, stop, committed, next_id) =
            (p.clone(), Arc::clone(&stop), Arc::clone(&committed), Arc::clone(&next_id));
        writers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(w);
            while !stop.load(Ordering::Relaxed) {
                let mut tx = p.begin().await.expect("begin");
                for _ in 0..rng.u32(1..4) {
                    let high = next_id.load(Ordering::Relaxed) as i64;
                    let sql = match rng.u32(0..10) {
                        0..=3 => format!(
                            "INSERT INTO items VALUES ({}, 'new{w}')",
                            next_id.fetch_add(1, Ordering::Relaxed)
                        ),
                        4..=7 => {
                            format!("UPDATE items SET v = 'u{}' WHERE id = {}", rng.u32(..), rng.i64(1..high))
                        }
                        _ => format!("DELETE FROM items WHERE id = {}", rng.i64(1..high)),
                    };
                    sqlx::query(&sql).execute(&mut *tx).await.expect("write");
                }
                if rng.u32(0..4) == 0 {
                    sqlx::query("SELECT pg_sleep(0.003)").execute(&mut *tx).await.expect("sleep");
                }
                tx.commit().await.expect("commit");
                committed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Four subscribers, each snapshotting at a different moment of the load.
    let mut followers = Vec::new();
    for k in 1..=4u64 {
        let c = Arc::clone(&committed);
        wait_for("writes", Duration::from_secs(60), || {
            let c = Arc::clone(&c);
            async move { (c.load(Ordering::Relaxed) >= k * 150).then_some(()) }
        })
        .await;
        let sse = Sse::open(&base, &format!("{}&snapshot=true", key_query()), None).await.expect("open");
        followers.push(tokio::spawn(follow(sse)));
    }
    let c = Arc::clone(&committed);
    wait_for("writes after the last snapshot", Duration::from_secs(60), || {
        let c = Arc::clone(&c);
        async move { (c.load(Ordering::Relaxed) >= 900).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    exec(&p, "INSERT INTO items VALUES (-1, 'end')").await;

    let table: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, v FROM items ORDER BY id").fetch_all(&p).await.expect("table");
    let table: BTreeMap<i64, String> = table.into_iter().collect();
    for f in followers {
        let seen = f.await.expect("follower");
        assert_eq!(seen.len(), table.len(), "row count");
        assert!(seen == table, "a follower's rows differ from the table");
    }
    app.stop().await;
}

const RLS_SCHEMA: &str = "
CREATE TABLE notes (id int PRIMARY KEY, owner uuid, body text);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON notes FOR SELECT TO authenticated USING (owner = auth.uid());
";
const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";

#[tokio::test]
async fn phoenix_snapshot_applies_filters_and_row_level_security_then_hands_off() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, crate::support::AUTH_UID).await;
    exec(&p, RLS_SCHEMA).await;
    exec(
        &p,
        &format!(
            "INSERT INTO notes SELECT g, CASE WHEN g % 2 = 0 THEN '{A}'::uuid ELSE '{B}'::uuid END, \
             CASE WHEN g % 3 = 0 THEN 'skip' ELSE 'n' || g END FROM generate_series(1, 600) g"
        ),
    )
    .await;
    let app = TestApp::spawn(&url).await;
    let mut ws =
        Ws::connect_with(app.addr, "/realtime/v1/websocket", None, Some(&token("authenticated", Some(A))))
            .await
            .expect("connect");
    let binding = json!([{"event": "INSERT", "schema": "public", "table": "notes", "filter": "body=neq.skip",
                          "snapshot": true}]);
    let (reply, system) = ws.join("notes", binding).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(system["status"], "ok", "{system}");

    // A's rows (even ids) that are not 'skip' (multiples of 3): ids 2, 4, 8, 10, …
    let want: Vec<i64> = (1..=600).filter(|g| g % 2 == 0 && g % 3 != 0).collect();
    let mut got = Vec::new();
    let end = loop {
        let f = ws.recv().await;
        let (_, event, payload, _, _) = ws.parts(&f);
        match event.as_str() {
            "postgres_changes" => {
                let data = &payload["data"];
                assert_eq!(
                    (data["type"].as_str(), &data["snapshot"]),
                    (Some("INSERT"), &json!(true)),
                    "{data}"
                );
                assert_eq!(data["record"]["owner"], A);
                assert!(data.get("cursor").is_none(), "snapshot rows have no cursor: {data}");
                got.push(data["record"]["id"].as_i64().expect("id"));
            }
            "system" => break payload,
            other => panic!("unexpected {other}: {f}"),
        }
    };
    got.sort_unstable();
    assert_eq!(got, want, "the snapshot is A's rows that pass the filter");
    assert_eq!(
        (end["snapshot"].as_str(), end["rows"].as_u64()),
        (Some("end"), Some(want.len() as u64)),
        "{end}"
    );
    assert!(end["cursor"].as_str().is_some_and(|c| c.len() == 32), "{end}");

    // Live: B's row and a filtered-out row are not delivered; A's next row is, once.
    exec(
        &p,
        &format!(
            "INSERT INTO notes VALUES (1001, '{B}', 'b'); INSERT INTO notes VALUES (1002, '{A}', 'skip'); \
             INSERT INTO notes VALUES (1003, '{A}', 'live')"
        ),
    )
    .await;
    let f = ws.recv_event("postgres_changes").await;
    assert_eq!((f["data"]["record"]["id"].as_i64(), f["data"].get("snapshot")), (Some(1003), None), "{f}");
    ws.expect_quiet("nothing after A's live row").await;

    // Refusals: a snapshot with a cursor, and a snapshot of a whole schema.
    let r = ws
        .join_config(
            "both",
            json!({"postgres_changes": [{"event": "*", "schema": "public", "table": "notes", "snapshot": true,
                                         "since": end["cursor"]}]}),
        )
        .await;
    assert!(r["response"]["reason"].as_str().is_some_and(|m| m.starts_with("InvalidSnapshot")), "{r}");
    let (_, system) = ws.join("schema", json!([{"event": "*", "schema": "public", "snapshot": true}])).await;
    assert!(
        system["status"] == "error"
            && system["message"].as_str().is_some_and(|m| m.contains("invalid snapshot")),
        "{system}"
    );
    app.stop().await;
}

#[tokio::test]
async fn long_poll_snapshot_returns_the_rows_and_a_cursor_to_poll_from() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE items (id bigint PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        .await;
    let app = TestApp::spawn(&url).await;
    let base = format!("http://{}/v1/tables/public.items/changes?{}", app.addr, key_query());

    // Pages of `limit` rows: the first names the next.
    let (status, body) = get_json(&format!("{base}&snapshot=true&filter=id=gte.2&limit=1&wait=1")).await;
    assert_eq!(status, 200, "{body}");
    let ids = |body: &Value| -> Vec<i64> {
        body["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .map(|c| c["record"]["id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ids(&body), [2], "{body}");
    assert!(body["changes"].as_array().unwrap().iter().all(|c| c["snapshot"] == true));
    let next = body["snapshot_next"].as_str().expect("snapshot_next").to_owned();
    let (status, body) =
        get_json(&format!("{base}&filter=id=gte.2&limit=1&wait=1&snapshot_after={next}")).await;
    assert_eq!(status, 200, "{body}");
    // No row after 3: the last page, with the hand-off cursor.
    assert_eq!(ids(&body), [3], "{body}");
    assert!(body.get("snapshot_next").is_none(), "{body}");
    let cursor = body["cursor"].as_str().expect("cursor").to_owned();
    let (status, body) = get_json(&format!("{base}&snapshot=true&filter=id=gte.2&limit=2&wait=1")).await;
    assert_eq!((status, ids(&body)), (200, vec![2, 3]), "one page when it holds every row: {body}");
    assert!(body.get("snapshot_next").is_none() && body["cursor"] == cursor, "{body}");

    exec(&p, "INSERT INTO items VALUES (4, 'd'), (0, 'z'); UPDATE items SET v = 'B' WHERE id = 2").await;
    let got = super::sse::poll_changes(&format!("{base}&filter=id=gte.2"), &cursor, 2).await;
    let changes: Vec<(String, i64)> = got
        .iter()
        .map(|c| (c["type"].as_str().unwrap().to_owned(), c["record"]["id"].as_i64().unwrap()))
        .collect();
    assert_eq!(changes, [("INSERT".to_owned(), 4), ("UPDATE".to_owned(), 2)], "{got:?}");

    let (status, body) = get_json(&format!("{base}&snapshot=maybe")).await;
    assert!(status == 400 && body["error"].as_str().is_some_and(|e| e.contains("snapshot")), "{body}");
    let (status, body) = get_json(&format!("{base}&snapshot=true&since={cursor}")).await;
    assert!(status == 400 && body["error"].as_str().is_some_and(|e| e.contains("InvalidSnapshot")), "{body}");
    app.stop().await;
}

/// Pages follow a composite primary key of types whose text must parse back exactly (text with
/// quotes and commas, a time zone, a fraction of a second): every row once, in key order.
#[tokio::test]
async fn long_poll_snapshot_pages_follow_a_composite_key() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(
        &p,
        "CREATE TABLE pairs (a text, b timestamptz, n int, PRIMARY KEY (a, b)); \
         INSERT INTO pairs VALUES ('x', '2026-01-01 00:00:00.123456+02', 1), ('x', '2026-01-01 00:00:00.123457+02', 2), \
           ('x,\"y', '2025-06-01 12:00:00+00', 3), ('y', '2024-01-01 00:00:00+00', 4), ('', '2024-01-01 00:00:00+00', 0)",
    )
    .await;
    let app = TestApp::spawn(&url).await;
    let base = format!("http://{}/v1/tables/public.pairs/changes?{}&limit=2&wait=1", app.addr, key_query());
    let (mut url, mut seen) = (format!("{base}&snapshot=true"), Vec::new());
    for page in 0.. {
        assert!(page < 5, "pages never end: {seen:?}");
        let (status, body) = get_json(&url).await;
        assert_eq!(status, 200, "{body}");
        let rows = body["changes"].as_array().expect("changes");
        assert!(rows.len() <= 2, "{body}");
        seen.extend(rows.iter().map(|r| r["record"]["n"].as_i64().expect("n")));
        match body["snapshot_next"].as_str() {
            Some(next) => url = format!("{base}&snapshot_after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, [0, 1, 2, 3, 4], "in key order, each once");
    app.stop().await;
}
