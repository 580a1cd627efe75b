//! Row-level security for `postgres_changes` against a real database: each subscriber receives
//! exactly the row versions its role, with its claims, may SELECT — `auth.uid()` policies,
//! role-based policies, a subquery into a membership table that changes mid-stream, column
//! grants, a row whose successive versions belong to different users, DELETEs, BYPASSRLS, table
//! owners with and without FORCE, policy errors, token refresh, and key-only DELETEs.
//!
//! "Did not receive" is proven with a marker: after the changes under test, a change every
//! subscriber may see is committed, and each subscriber's next frames must be exactly what it
//! may see followed by the marker.

use serde_json::{json, Value};

use crate::support::{connect, exec, token, user, TestApp, Ws};

const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";

const SCHEMA: &str = "

CREATE TABLE docs (id int PRIMARY KEY, owner uuid, body text, secret text, public bool NOT NULL DEFAULT false);
ALTER TABLE docs REPLICA IDENTITY FULL;
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON docs FOR SELECT TO authenticated USING (owner = auth.uid());
CREATE POLICY published ON docs FOR SELECT TO anon, authenticated USING (public);
CREATE POLICY not_hidden ON docs AS RESTRICTIVE FOR SELECT USING (body IS DISTINCT FROM 'hidden');
REVOKE SELECT ON docs FROM authenticated;
GRANT SELECT (id, owner, body, public) ON docs TO authenticated;

CREATE TABLE members (room int, user_id uuid);
GRANT SELECT ON members TO authenticated;
CREATE TABLE messages (id int PRIMARY KEY, room int, body text);
ALTER TABLE messages REPLICA IDENTITY FULL;
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY in_room ON messages FOR SELECT TO authenticated USING (
    EXISTS (SELECT 1 FROM members m WHERE m.room = messages.room AND m.user_id = auth.uid()));

CREATE TABLE open_notes (id int PRIMARY KEY, body text);
CREATE TABLE staff_only (id int PRIMARY KEY);
REVOKE SELECT ON staff_only FROM anon, authenticated;
CREATE TABLE keyed (id int PRIMARY KEY, owner uuid);
ALTER TABLE keyed ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON keyed FOR SELECT TO authenticated USING (owner = auth.uid());
";

async fn app(tweak: impl FnOnce(&mut walcast::config::Config)) -> (TestApp, sqlx::PgPool) {
    crate::support::rls_app(SCHEMA, tweak).await
}

/// Joins with one binding on `table`; returns the `system` message.
async fn subscribe(ws: &mut Ws, name: &str, table: &str) -> Value {
    let (_, system) = ws.join(name, json!([{"event": "*", "schema": "public", "table": table}])).await;
    system
}

/// The next `postgres_changes` data object.
async fn next_change(ws: &mut Ws) -> Value {
    ws.recv_until("a change", |f| f["event"] == "postgres_changes").await["payload"]["data"].clone()
}

/// The next changes up to and including one whose record has `marker` as body; returns their
/// (type, id) pairs, without the marker.
async fn changes_until_marker(ws: &mut Ws, marker: &str) -> Vec<(String, i64)> {
    let mut seen = Vec::new();
    loop {
        let d = next_change(ws).await;
        if d["record"]["body"] == marker {
            return seen;
        }
        let row = if d["type"] == "DELETE" { &d["old_record"] } else { &d["record"] };
        seen.push((d["type"].as_str().unwrap_or("").to_owned(), row["id"].as_i64().unwrap_or(-1)));
    }
}

fn ty(t: &str, id: i64) -> (String, i64) {
    (t.to_owned(), id)
}

/// The next `system` error about `postgres_changes` (changes withheld); its payload.
async fn withheld_notice(ws: &mut Ws) -> Value {
    let f = ws
        .recv_until("a withheld notice", |f| {
            f["event"] == "system"
                && f["payload"]["status"] == "error"
                && f["payload"]["extension"] == "postgres_changes"
        })
        .await;
    f["payload"].clone()
}

/// A in room 1 and B in room 2, each subscribed to `messages`.
async fn room_members(app: &TestApp, p: &sqlx::PgPool) -> (Ws, Ws) {
    exec(p, &format!("INSERT INTO members VALUES (1, '{A}'), (2, '{B}')")).await;
    let mut a = connect(app, &user(A)).await;
    let mut b = connect(app, &user(B)).await;
    subscribe(&mut a, "room", "messages").await;
    subscribe(&mut b, "room", "messages").await;
    (a, b)
}

#[tokio::test]
async fn each_subscriber_gets_the_row_versions_it_may_see() {
    let (app, p) = app(|_| {}).await;
    let mut a = connect(&app, &user(A)).await;
    let mut b = connect(&app, &user(B)).await;
    let mut anon = connect(&app, &crate::support::anon_key()).await;
    let mut service = connect(&app, &token("service_role", None)).await;
    for ws in [&mut a, &mut b, &mut anon, &mut service] {
        let system = subscribe(ws, "docs", "docs").await;
        assert_eq!(system["status"], "ok", "{system}");
    }
    exec(
        &p,
        &format!(
            "INSERT INTO docs VALUES (1, '{A}', 'a1', 's1'), (2, '{A}', 'a2', 's2'), (3, '{B}', 'b3', 's3');
             INSERT INTO docs VALUES (4, '{A}', 'hidden', 's4');
             UPDATE docs SET body = 'v1' WHERE id = 1;
             UPDATE docs SET owner = '{B}', body = 'v2' WHERE id = 1;
             DELETE FROM docs WHERE id = 2;
             INSERT INTO docs VALUES (5, NULL, 'marker', 's5', true);"
        ),
    )
    .await;
    // A: its inserts, v1 of row 1 (not v2, which belongs to B), the delete of its row 2.
    assert_eq!(
        changes_until_marker(&mut a, "marker").await,
        [ty("INSERT", 1), ty("INSERT", 2), ty("UPDATE", 1), ty("DELETE", 2)]
    );
    // B: its insert and v2 of row 1 — not v1, not the delete of A's row.
    assert_eq!(changes_until_marker(&mut b, "marker").await, [ty("INSERT", 3), ty("UPDATE", 1)]);
    // anon sees public rows only; service_role bypasses row-level security.
    assert_eq!(changes_until_marker(&mut anon, "marker").await, []);
    assert_eq!(
        changes_until_marker(&mut service, "marker").await,
        [
            ty("INSERT", 1),
            ty("INSERT", 2),
            ty("INSERT", 3),
            ty("INSERT", 4),
            ty("UPDATE", 1),
            ty("UPDATE", 1),
            ty("DELETE", 2)
        ]
    );

    // What B got for v2: the new version, without the column it may not read, and without the
    // old version (owned by A).
    exec(
        &p,
        &format!(
            "UPDATE docs SET body = 'v3' WHERE id = 1; INSERT INTO docs VALUES (6, '{B}', 'marker2', 's6')"
        ),
    )
    .await;
    let d = next_change(&mut b).await;
    assert_eq!(d["record"], json!({"id": 1, "owner": B, "body": "v3", "public": false}), "{d}");
    assert_eq!(d["old_record"], json!({"id": 1, "owner": B, "body": "v2", "public": false}), "{d}");
    assert!(!d.to_string().contains("secret") && !d.to_string().contains("s1"), "{d}");
    let d = next_change(&mut b).await;
    assert_eq!(d["record"]["body"], "marker2");
    // A row moving from A to B: B receives it with the old record withheld.
    exec(&p, &format!("UPDATE docs SET owner = '{B}' WHERE id = 3; INSERT INTO docs VALUES (7, '{A}', 'x', 's'); UPDATE docs SET owner = '{B}' WHERE id = 7")).await;
    let d = next_change(&mut b).await;
    assert_eq!((d["type"].as_str(), d["record"]["id"].as_i64()), (Some("UPDATE"), Some(3)));
    assert_eq!(d["old_record"], json!({"id": 3, "owner": B, "body": "b3", "public": false}));
    let d = next_change(&mut b).await;
    assert_eq!((d["type"].as_str(), d["record"]["id"].as_i64()), (Some("UPDATE"), Some(7)));
    assert_eq!(d["old_record"], json!({}), "the old version was A's: {d}");
    let secret_free =
        |v: &Value| v["columns"].as_array().is_some_and(|c| c.iter().all(|c| c["name"] != "secret"));
    assert!(secret_free(&d), "{d}");
    app.stop().await;
}

/// A subscriber whose filter matches only some rows of a batch has just those rows checked for
/// it: they must be found among the others by their position in the batch.
#[tokio::test]
async fn filtered_subscribers_get_the_visible_rows_they_match() {
    let (app, p) = app(|_| {}).await;
    let mut a = connect(&app, &user(A)).await;
    let mut b = connect(&app, &user(B)).await;
    let binding = json!([{"event": "INSERT", "schema": "public", "table": "docs", "filter": "body=eq.x"}]);
    let (_, system) = a.join("docs", binding).await;
    assert_eq!(system["status"], "ok", "{system}");
    assert_eq!(subscribe(&mut b, "docs", "docs").await["status"], "ok");
    exec(
        &p,
        &format!(
            "INSERT INTO docs VALUES (1, '{A}', 'y', 's'), (2, '{A}', 'x', 's'), (3, '{B}', 'x', 's'),
                                     (4, '{A}', 'y', 's'), (5, '{A}', 'x', 's');
             INSERT INTO docs VALUES (6, NULL, 'x', 's', true);
             INSERT INTO docs VALUES (7, NULL, 'marker', 's', true);"
        ),
    )
    .await;
    let mut got = Vec::new();
    while got.last() != Some(&6) {
        got.push(next_change(&mut a).await["record"]["id"].as_i64().unwrap_or(-1));
    }
    assert_eq!(got, [2, 5, 6], "A's rows with body x, then the public one");
    assert_eq!(changes_until_marker(&mut b, "marker").await, [ty("INSERT", 3), ty("INSERT", 6)]);
    app.stop().await;
}

#[tokio::test]
async fn policies_with_subqueries_follow_the_membership_table() {
    let (app, p) = app(|_| {}).await;
    let (mut a, mut b) = room_members(&app, &p).await;
    exec(&p, "INSERT INTO messages VALUES (1, 1, 'for room 1'), (2, 2, 'for room 2')").await;
    assert_eq!(next_change(&mut a).await["record"]["id"], 1);
    assert_eq!(next_change(&mut b).await["record"]["id"], 2);
    // B joins room 1 mid-stream: from then on it receives room 1's messages.
    exec(&p, &format!("INSERT INTO members VALUES (1, '{B}')")).await;
    exec(&p, "INSERT INTO messages VALUES (3, 1, 'after B joined')").await;
    assert_eq!(next_change(&mut a).await["record"]["id"], 3);
    assert_eq!(next_change(&mut b).await["record"]["id"], 3);
    app.stop().await;
}

#[tokio::test]
async fn a_subquery_is_evaluated_for_each_subscriber_of_a_batch() {
    let (app, p) = app(|_| {}).await;
    let (mut a, mut b) = room_members(&app, &p).await;
    // One statement: the rows are checked together, for both users. A policy's subquery must
    // not answer the second user with what it found for the first.
    exec(
        &p,
        "INSERT INTO messages SELECT g, 1 + g % 2, CASE WHEN g > 16 THEN 'marker' ELSE 'm' END
           FROM generate_series(1, 18) g",
    )
    .await;
    let even: Vec<_> = (1..=8).map(|i| ty("INSERT", 2 * i)).collect();
    let odd: Vec<_> = (0..8).map(|i| ty("INSERT", 2 * i + 1)).collect();
    assert_eq!(changes_until_marker(&mut a, "marker").await, even, "room 1's rows only");
    assert_eq!(changes_until_marker(&mut b, "marker").await, odd, "room 2's rows only");
    app.stop().await;
}

#[tokio::test]
async fn subscribe_time_refusals_and_notices() {
    // A role tokens may name (auth.roles) that the database does not have.
    let (app, p) = app(|c| c.auth.roles.push("nobody_here".into())).await;
    let _ = p;
    let mut a = connect(&app, &user(A)).await;
    let system = subscribe(&mut a, "staff", "staff_only").await;
    assert_eq!(system["status"], "error", "{system}");
    let message = system["message"].as_str().unwrap_or("");
    assert!(
        message.contains("permission denied for table public.staff_only")
            && message.contains("authenticated"),
        "{message}"
    );
    // A filter or select on a column the role may not read would leak it.
    let (_, system) = a
        .join("f", json!([{"event": "*", "schema": "public", "table": "docs", "filter": "secret=eq.x"}]))
        .await;
    assert_eq!(system["status"], "error", "{system}");
    assert!(
        system["message"].as_str().unwrap_or("").contains("permission denied for column secret"),
        "{system}"
    );
    // Key-only DELETEs cannot be checked: the subscriber is told they are withheld.
    let system = subscribe(&mut a, "keyed", "keyed").await;
    assert_eq!(system["status"], "ok", "{system}");
    let message = system["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("Subscribed to PostgreSQL; DELETE events on public.keyed are not delivered"),
        "{message}"
    );
    // Only DELETEs are affected, and tables without row-level security say nothing.
    let (_, system) = a.join("ins", json!([{"event": "INSERT", "schema": "public", "table": "keyed"}])).await;
    assert_eq!(system["message"], "Subscribed to PostgreSQL");
    let system = subscribe(&mut a, "open", "open_notes").await;
    assert_eq!(system["message"], "Subscribed to PostgreSQL");
    // A role that does not exist is refused with Postgres's reason.
    let mut ghost = connect(&app, &token("nobody_here", Some(A))).await;
    let system = subscribe(&mut ghost, "docs", "docs").await;
    assert_eq!(system["status"], "error", "{system}");
    assert!(
        system["message"].as_str().unwrap_or("").contains("role \"nobody_here\" does not exist"),
        "{system}"
    );
    app.stop().await;
}

#[tokio::test]
async fn key_only_deletes_are_withheld_unless_configured() {
    for deliver in [false, true] {
        let (app, p) = app(|c| {
            if deliver {
                c.auth.key_only_deletes = walcast::auth::rls::KeyOnlyDeletes::Deliver;
            }
        })
        .await;
        exec(&p, &format!("INSERT INTO keyed VALUES (1, '{A}')")).await;
        let mut a = connect(&app, &user(A)).await;
        let mut b = connect(&app, &user(B)).await;
        subscribe(&mut a, "keyed", "keyed").await;
        subscribe(&mut b, "keyed", "keyed").await;
        exec(&p, &format!("DELETE FROM keyed WHERE id = 1; INSERT INTO keyed VALUES (2, '{A}'), (3, '{B}')"))
            .await;
        let first = next_change(&mut a).await;
        if deliver {
            assert_eq!((first["type"].as_str(), &first["old_record"]), (Some("DELETE"), &json!({"id": 1})));
            assert_eq!(next_change(&mut a).await["record"]["id"], 2);
            // B may SELECT the table, so the opt-in delivers the key to B too.
            assert_eq!(next_change(&mut b).await["type"], "DELETE");
        } else {
            assert_eq!((first["type"].as_str(), first["record"]["id"].as_i64()), (Some("INSERT"), Some(2)));
        }
        assert_eq!(next_change(&mut b).await["record"]["id"], 3);
        app.stop().await;
    }
}

/// Policies are evaluated when a change is dispatched, so a catalog change reaches every change
/// dispatched after it; what this pins down is that no change committed after a catalog change
/// is judged by a cached answer from before it (the Relation message resets the cache).
#[tokio::test]
async fn catalog_changes_reach_every_later_change() {
    let (app, p) = app(|c| {
        let owner = format!("owner_{}", c.slot);
        c.auth.roles.push(owner);
    })
    .await;
    let owner = format!("owner_{}", app.slot);
    exec(
        &p,
        &format!(
            "CREATE ROLE {owner} NOLOGIN; GRANT USAGE ON SCHEMA auth TO {owner}; ALTER TABLE docs OWNER TO {owner};
             CREATE POLICY owner_sees_public ON docs FOR SELECT TO {owner} USING (public);"
        ),
    )
    .await;
    let mut o = connect(&app, &token(&owner, Some(A))).await;
    let mut b = connect(&app, &user(B)).await;
    subscribe(&mut o, "docs", "docs").await;
    subscribe(&mut b, "docs", "docs").await;
    subscribe(&mut b, "open", "open_notes").await;
    // The owner bypasses row-level security and B reads open_notes (no row-level security):
    // both answers are now cached.
    exec(&p, &format!("INSERT INTO docs VALUES (1, '{B}', 'before', 's')")).await;
    exec(&p, "INSERT INTO open_notes VALUES (1, 'before')").await;
    assert_eq!(next_change(&mut o).await["record"]["id"], 1);
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next_change(&mut b).await;
        got.push((d["table"].as_str().unwrap_or("").to_owned(), d["record"]["id"].as_i64().unwrap_or(-1)));
    }
    assert_eq!(got, [("docs".to_owned(), 1), ("open_notes".to_owned(), 1)]);
    // Forcing row-level security binds the owner to its policy; enabling it on open_notes (no
    // policy) hides that table from B. Each statement is a transaction of its own.
    for sql in [
        "ALTER TABLE docs FORCE ROW LEVEL SECURITY".to_owned(),
        "ALTER TABLE open_notes ENABLE ROW LEVEL SECURITY".to_owned(),
        format!("INSERT INTO docs VALUES (2, '{B}', 'after', 's')"),
        "INSERT INTO open_notes VALUES (2, 'after')".to_owned(),
        format!("INSERT INTO docs VALUES (3, '{A}', 'marker', 's', true)"),
    ] {
        exec(&p, &sql).await;
    }
    assert_eq!(changes_until_marker(&mut o, "marker").await, [], "row 2 is not public");
    let mut got = Vec::new();
    loop {
        let d = next_change(&mut b).await;
        if d["record"]["body"] == "marker" {
            break;
        }
        got.push((d["table"].as_str().unwrap_or("").to_owned(), d["record"]["id"].as_i64().unwrap_or(-1)));
    }
    assert_eq!(got, [("docs".to_owned(), 2)], "nothing from open_notes once it has row-level security");
    app.stop().await;
}

#[tokio::test]
async fn a_failing_policy_denies_its_subscriber_only_and_refresh_switches_users() {
    let (app, p) = app(|_| {}).await;
    exec(
        &p,
        &format!(
            "CREATE FUNCTION auth.fragile() RETURNS bool LANGUAGE plpgsql STABLE AS $$
             BEGIN
                 IF auth.uid() = '{B}' THEN RAISE EXCEPTION 'fragile policy'; END IF;
                 RETURN true;
             END $$;
             CREATE POLICY fragile ON messages FOR SELECT TO authenticated USING (auth.fragile());"
        ),
    )
    .await;
    let mut a = connect(&app, &user(A)).await;
    let mut b = connect(&app, &user(B)).await;
    subscribe(&mut a, "room", "messages").await;
    let system = subscribe(&mut b, "room", "messages").await;
    assert_eq!(system["status"], "ok", "{system}");
    exec(&p, "INSERT INTO messages VALUES (1, 1, 'one'), (2, 2, 'two')").await;
    assert_eq!(next_change(&mut a).await["record"]["id"], 1);
    assert_eq!(next_change(&mut a).await["record"]["id"], 2);
    // B is told, once, that its changes are withheld and why, without the policy's own text.
    let notice = withheld_notice(&mut b).await;
    assert_eq!(
        notice["message"],
        "changes of public.messages are withheld from this subscription: a row-level security policy raised an error for this subscriber"
    );
    // B switches to A's token: from then on it reads as A.
    b.push(Some("j1"), "realtime:room", "access_token", json!({"access_token": user(A)})).await;
    b.expect_quiet("a good refresh has no reply").await;
    exec(&p, "INSERT INTO messages VALUES (3, 3, 'three')").await;
    assert_eq!(next_change(&mut a).await["record"]["id"], 3);
    assert_eq!(next_change(&mut b).await["record"]["id"], 3, "B got nothing while its policy failed");
    app.stop().await;
}

/// Subscribers of a table without filters are grouped by subject once and the grouping reused
/// across changes: a join, a leave and a token refresh in between must each be seen by the
/// very next change.
#[tokio::test]
async fn joins_leaves_and_refreshes_between_changes_are_seen() {
    let (app, p) = app(|_| {}).await;
    let mut a = connect(&app, &user(A)).await;
    assert_eq!(subscribe(&mut a, "docs", "docs").await["status"], "ok");
    exec(&p, &format!("INSERT INTO docs VALUES (1, '{A}', 'a1', 's'); INSERT INTO docs VALUES (2, NULL, 'm1', 's', true);")).await;
    assert_eq!(changes_until_marker(&mut a, "m1").await, [ty("INSERT", 1)]);

    // B joins between two changes of the same table and kind.
    let mut b = connect(&app, &user(B)).await;
    assert_eq!(subscribe(&mut b, "docs", "docs").await["status"], "ok");
    exec(&p, &format!("INSERT INTO docs VALUES (3, '{B}', 'b3', 's'); INSERT INTO docs VALUES (4, NULL, 'm2', 's', true);")).await;
    assert_eq!(changes_until_marker(&mut b, "m2").await, [ty("INSERT", 3)]);
    assert_eq!(changes_until_marker(&mut a, "m2").await, []);

    // A switches to B's token: the next change is judged as B.
    a.push(Some("j1"), "realtime:docs", "access_token", json!({"access_token": user(B)})).await;
    a.expect_quiet("a refresh has no reply").await;
    exec(&p, &format!("INSERT INTO docs VALUES (5, '{B}', 'b5', 's'); INSERT INTO docs VALUES (6, NULL, 'm3', 's', true);")).await;
    assert_eq!(changes_until_marker(&mut a, "m3").await, [ty("INSERT", 5)]);
    assert_eq!(changes_until_marker(&mut b, "m3").await, [ty("INSERT", 5)]);

    // B leaves: nothing more reaches it.
    let r = b.push(Some("j1"), "realtime:docs", "phx_leave", json!({})).await;
    b.recv_until("the leave reply", |f| f["event"] == "phx_reply" && f["ref"] == r.as_str()).await;
    b.recv_event("phx_close").await;
    exec(&p, &format!("INSERT INTO docs VALUES (7, '{B}', 'b7', 's'); INSERT INTO docs VALUES (8, NULL, 'm4', 's', true);")).await;
    assert_eq!(changes_until_marker(&mut a, "m4").await, [ty("INSERT", 7)]);
    b.expect_quiet("nothing after the leave").await;
    app.stop().await;
}
