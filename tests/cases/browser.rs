//! Browser pages on other origins, in a real headless Chromium: the browser's own EventSource
//! across a gateway killed and restarted, a preflighted long-poll and REST broadcast, and the
//! refusals a page on an origin not on `cors.allowed_origins` meets.

use serde_json::{json, Value};

use super::clients::{clients_dir, Peer};
use crate::support::{self, exec, fresh_db, pool, GatewayProcess};

/// A static server for the test page, on its own origin (`http://127.0.0.1:<port>`).
async fn page_server() -> u16 {
    let page = std::fs::read_to_string(clients_dir().join("browser/page.html")).expect("the test page");
    let app =
        axum::Router::new().route("/", axum::routing::get(move || async move { axum::response::Html(page) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// Evaluates `js` in the page (awaited there): its value.
async fn eval(page: &mut Peer, id: &str, js: &str) -> Value {
    act(page, id, json!({"op": "eval", "js": js})).await
}

/// Opens the test page from `origin`, talking to the gateway at `walcast`.
async fn open(page: &mut Peer, origin: &str, walcast: &str) {
    let key = support::anon_key();
    page.cmd(json!({"op": "goto", "url": format!("{origin}/?walcast={walcast}&key={key}")})).await;
    page.until("the page", |v| v["kind"] == "loaded").await;
}

/// The row ids the page's stream delivers until `last` (each as often as it came).
async fn rows_until(page: &mut Peer, last: i64) -> Vec<(i64, String)> {
    let mut seen = Vec::new();
    while seen.last().map(|(id, _)| *id) != Some(last) {
        let v = page.until(&format!("row {last}"), |v| v["kind"] == "row").await;
        seen.push((
            v["data"]["record"]["id"].as_i64().expect("an id"),
            v["id"].as_str().unwrap_or("").to_owned(),
        ));
    }
    seen
}

#[tokio::test]
async fn a_page_on_an_allowed_origin_streams_across_a_restart_and_others_are_refused() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE notes (id bigint PRIMARY KEY, body text)").await;
    let (allowed, other) = (page_server().await, page_server().await);
    let allowed = format!("http://127.0.0.1:{allowed}");
    let other = format!("http://127.0.0.1:{other}");
    let db = crate::support::db_name(&url);
    let port = crate::support::free_port();
    let log_dir = support::log_dir(&format!("{db}-browser"));
    let log = log_dir.with_extension("log");
    let _ = std::fs::create_dir_all(log_dir.parent().expect("a parent"));
    let log_file = || std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log");
    let env = [("WALCAST_CORS__ALLOWED_ORIGINS", allowed.clone())];
    let slot = format!("slot_{db}");
    let gateway = GatewayProcess { url: &url, slot: &slot, port, log_dir: &log_dir, env: &env };
    let mut child = gateway.start(log_file(), "walcast=info", "browser").await;
    let walcast = format!("http://127.0.0.1:{port}");

    let mut page = Peer::browser("chromium");
    open(&mut page, &allowed, &walcast).await;
    assert_eq!(eval(&mut page, "s", "stream('public.notes')").await, "streaming");
    page.until("the stream open", |v| v["kind"] == "open").await;
    for n in 1..=5 {
        exec(&p, &format!("INSERT INTO notes VALUES ({n}, 'before {n}')")).await;
    }
    let mut ledger = rows_until(&mut page, 5).await;

    // The gateway is killed; rows commit while it is down; it comes back on the same port and
    // the browser's EventSource reconnects by itself, with the last id it saw.
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;
    page.until("the stream's error", |v| v["kind"] == "stream-error").await;
    for n in 6..=10 {
        exec(&p, &format!("INSERT INTO notes VALUES ({n}, 'while down {n}')")).await;
    }
    let child = gateway.start(log_file(), "walcast=info", "browser").await;
    page.until("the stream open again", |v| v["kind"] == "open").await;
    exec(&p, "INSERT INTO notes VALUES (11, 'after')").await;
    ledger.extend(rows_until(&mut page, 11).await);
    let ids: Vec<i64> = ledger.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=11).collect::<Vec<_>>(), "no gap, no repeat");

    // A long-poll with the token in a header, from the last-but-one cursor: the last row.
    let since = &ledger[9].1;
    let r = eval(&mut page, "p", &format!("longPoll('public.notes', {})", json!(since))).await;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["changes"][0]["record"]["id"], 11, "{r}");
    // A REST broadcast with a JSON body, heard on the channel's event stream.
    assert_eq!(eval(&mut page, "l", "listen('lobby', 'hello')").await, "listening");
    page.until("the channel open", |v| v["kind"] == "channel-open").await;
    let r = eval(&mut page, "b", "broadcast('lobby', 'hello', {n: 1})").await;
    assert_eq!(r["status"], 202, "{r}");
    let heard = page.until("the broadcast", |v| v["kind"] == "broadcast").await;
    assert_eq!(heard["data"]["data"], json!({"n": 1}), "{heard}");
    assert_eq!(eval(&mut page, "w", "socket()").await, "open");

    // From an origin not on the list: the browser refuses each answer, the upgrade gets 403.
    let metrics_url = format!("{walcast}/metrics");
    let refused =
        |m: &str| m.lines().find(|l| l.starts_with("walcast_origin_refused_total ")).map(str::to_owned);
    let before = refused(&support::http_get(&metrics_url).await.expect("metrics"));
    assert_eq!(before.as_deref(), Some("walcast_origin_refused_total 0"));
    open(&mut page, &other, &walcast).await;
    assert_eq!(eval(&mut page, "s2", "stream('public.notes')").await, "streaming");
    let failed =
        page.until("the stream refused", |v| v["kind"] == "stream-error" || v["kind"] == "open").await;
    assert_eq!(failed, json!({"kind": "stream-error", "readyState": 2}), "refused, and not retried");
    let r = eval(&mut page, "p2", "longPoll('public.notes')").await;
    assert!(r["refused"].as_str().is_some_and(|e| e.contains("Failed to fetch")), "{r}");
    let r = eval(&mut page, "b2", "broadcast('lobby', 'hello', {n: 2})").await;
    assert!(r["refused"].as_str().is_some_and(|e| e.contains("Failed to fetch")), "{r}");
    assert_eq!(eval(&mut page, "w2", "socket()").await, "error");
    let after = refused(&support::http_get(&metrics_url).await.expect("metrics"));
    assert_eq!(after.as_deref(), Some("walcast_origin_refused_total 1"));

    page.exit().await;
    drop(child);
}

/// A browser command (`click`, `fill`, `wait`, …) and its answer.
async fn act(page: &mut Peer, id: &str, mut command: Value) -> Value {
    command["id"] = json!(id);
    page.cmd(command).await;
    let r = page.until(id, |v| v["kind"] == "result" && v["id"] == id).await;
    assert!(r.get("error").is_none(), "{id}: {r}");
    r["value"].clone()
}

/// Waits until `js` is truthy in the page; its value.
async fn wait(page: &mut Peer, id: &str, js: &str) -> Value {
    act(page, id, json!({"op": "wait", "js": js})).await
}

/// Where the inspector's screenshots go.
fn screenshots() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("inspector");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

#[tokio::test]
async fn the_inspector_shows_rows_diffs_live_results_broadcasts_and_presence_in_chromium() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE notes (id bigint PRIMARY KEY, body text, done boolean DEFAULT false)").await;
    exec(&p, "GRANT SELECT ON notes TO anon").await;
    let app = crate::support::TestApp::spawn(&url).await;
    let key = support::anon_key();
    let base = format!("http://{}", app.addr);
    let mut a = Peer::browser("inspector a");
    a.cmd(json!({"op": "goto", "url": format!("{base}/?key={key}&table=public.notes")})).await;
    a.until("the page", |v| v["kind"] == "loaded").await;
    wait(&mut a, "connected", "document.querySelector('#status').textContent === 'connected'").await;
    let tables = wait(
        &mut a,
        "tables",
        "document.querySelector('#tables li[data-table=\"public.notes\"]')?.textContent",
    )
    .await;
    assert!(
        tables.as_str().is_some_and(|t| t.contains("id (key) bigint") && t.contains("body text")),
        "{tables}"
    );
    wait(&mut a, "subscribed", "document.querySelector('.sub .sub-status')?.textContent === 'subscribed'")
        .await;

    // A committed row appears with its values; an update shows what changed, old → new.
    exec(&p, "INSERT INTO notes (id, body) VALUES (1, 'first note')").await;
    let cells = "[...document.querySelectorAll('.sub tr.INSERT td')].map(td => td.textContent).slice(1)";
    let row = wait(&mut a, "insert", &format!("(r => r.length && r)({cells})")).await;
    assert_eq!(row, json!(["INSERT", "1", "first note", "false"]));
    exec(&p, "UPDATE notes SET body = 'edited', done = true WHERE id = 1").await;
    let diff = "[...document.querySelectorAll('.sub tr.UPDATE td.changed')].map(td => [td.querySelector('del').textContent, td.lastChild.textContent])";
    let changed = wait(&mut a, "update", &format!("(d => d.length && d)({diff})")).await;
    assert_eq!(changed, json!([["first note", "edited"], ["false", "true"]]));
    wait(&mut a, "latency", "document.querySelector('#p50').textContent !== '–'").await;
    act(
        &mut a,
        "shot changes",
        json!({"op": "screenshot", "selector": "#changes-panel", "path": screenshots().join("changes.png")}),
    )
    .await;

    // A live query: its result, kept exact as rows enter and leave.
    act(&mut a, "filter", json!({"op": "fill", "selector": "#sub-filter", "value": "done=eq.false"})).await;
    act(&mut a, "live", json!({"op": "check", "selector": "#sub-live", "value": true})).await;
    act(&mut a, "subscribe", json!({"op": "click", "selector": "#subscribe"})).await;
    wait(
        &mut a,
        "live end",
        "document.querySelector('.sub .sub-status')?.textContent === '0 rows, then changes'",
    )
    .await;
    exec(&p, "INSERT INTO notes (id, body) VALUES (2, 'open'), (3, 'also open')").await;
    exec(&p, "UPDATE notes SET done = true WHERE id = 3").await;
    let ids = "[...document.querySelectorAll('.sub tbody tr')].map(tr => tr.cells[1].textContent)";
    let result = wait(&mut a, "live result", &format!("(ids => ids.length === 1 && ids)({ids})")).await;
    assert_eq!(result, json!(["2"]), "row 3 left the result");

    // Broadcast between two pages, and presence on both.
    let mut b = Peer::browser("inspector b");
    b.cmd(json!({"op": "goto", "url": format!("{base}/?key={key}")})).await;
    b.until("the page", |v| v["kind"] == "loaded").await;
    wait(&mut b, "b connected", "document.querySelector('#status').textContent === 'connected'").await;
    for (page, me) in [(&mut a, "ada"), (&mut b, "bob")] {
        act(page, "me", json!({"op": "fill", "selector": "#me", "value": me})).await;
        act(page, "join", json!({"op": "click", "selector": "#join"})).await;
    }
    let here = "[...document.querySelectorAll('#presence li')].map(li => li.textContent).sort().join(',')";
    for page in [&mut a, &mut b] {
        wait(page, "presence", &format!("{here} === 'ada (1),bob (1)'")).await;
    }
    act(
        &mut a,
        "payload",
        json!({"op": "fill", "selector": "#bc-payload", "value": "{\"text\":\"hi bob\"}"}),
    )
    .await;
    act(&mut a, "send", json!({"op": "click", "selector": "#send"})).await;
    for page in [&mut b, &mut a] {
        let heard = wait(page, "heard", "document.querySelector('#messages li')?.textContent").await;
        assert_eq!(heard, "hello: {\"text\":\"hi bob\"}");
    }
    act(&mut a, "shot broadcast", json!({"op": "screenshot", "selector": "#broadcast-panel", "path": screenshots().join("broadcast.png")})).await;
    act(
        &mut a,
        "shot chart",
        json!({"op": "screenshot", "selector": "#chart-panel", "path": screenshots().join("chart.png")}),
    )
    .await;
    act(&mut a, "shot page", json!({"op": "screenshot", "path": screenshots().join("inspector.png")})).await;

    // Nothing went wrong in either page.
    for mut page in [a, b] {
        // A round trip first: every message the page logged before it has been read.
        act(&mut page, "last", json!({"op": "eval", "js": "1"})).await;
        let errors = page
            .pending_where(|v| v["kind"] == "pageerror" || (v["kind"] == "console" && v["type"] == "error"));
        assert!(errors.is_empty(), "{errors:?}");
        page.exit().await;
    }
    app.stop().await;
}

#[tokio::test]
async fn the_tables_endpoint_lists_only_what_the_tokens_role_may_read() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE open_notes (id bigint PRIMARY KEY, body text)").await;
    exec(&p, "CREATE TABLE people (id bigint PRIMARY KEY, name text, salary int)").await;
    exec(&p, "GRANT SELECT ON open_notes TO anon, authenticated").await;
    exec(&p, "REVOKE ALL ON people FROM anon, authenticated").await;
    exec(&p, "GRANT SELECT (id, name) ON people TO authenticated").await;
    let app = crate::support::TestApp::spawn(&url).await;
    let get = async |token: &str| {
        let r = reqwest::Client::new()
            .get(format!("http://{}/v1/tables", app.addr))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /v1/tables");
        let status = r.status().as_u16();
        (status, serde_json::from_str::<Value>(&r.text().await.expect("a body")).expect("json"))
    };
    let names = |v: &Value| -> Vec<String> {
        v["tables"]
            .as_array()
            .expect("tables")
            .iter()
            .map(|t| {
                let cols: Vec<&str> =
                    t["columns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
                format!(
                    "{}.{}({})",
                    t["schema"].as_str().unwrap(),
                    t["table"].as_str().unwrap(),
                    cols.join(",")
                )
            })
            .collect()
    };
    let (status, anon) = get(&support::anon_key()).await;
    assert_eq!((status, names(&anon)), (200, vec!["public.open_notes(id,body)".to_owned()]));
    let (status, user) = get(&support::user("u1")).await;
    assert_eq!(status, 200);
    assert_eq!(names(&user), ["public.open_notes(id,body)", "public.people(id,name)"], "no salary");
    // A role the database does not know reads nothing; a bad token is refused.
    let (status, body) = get(&support::token("no_such_role", None)).await;
    assert!(status == 401 || status == 403, "{status} {body}");
    let (status, _) = get("not a token").await;
    assert_eq!(status, 401);
    app.stop().await;
}

#[tokio::test]
async fn a_newcomer_opens_the_inspector_walcast_dev_prints_and_sees_the_psql_hints_row() {
    use tokio::io::AsyncBufReadExt;
    let dir = std::env::temp_dir().join(format!("walcast-dev-inspector-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = crate::support::free_port();
    let mut dev = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
        .args(["dev", "--port", &port.to_string(), "--data-dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("walcast dev");
    let mut lines = tokio::io::BufReader::new(dev.stdout.take().expect("stdout")).lines();
    // What it prints: the inspector's URL first, then the rest, the psql line last but one.
    let (mut inspector, mut psql) = (None, None);
    while psql.is_none() {
        let line = tokio::time::timeout(std::time::Duration::from_secs(120), lines.next_line())
            .await
            .expect("walcast dev prints within 120 s")
            .expect("read")
            .expect("walcast dev exited early");
        let line = line.trim().to_owned();
        if let Some(rest) = line.strip_prefix("Inspector : ") {
            assert!(psql.is_none(), "the inspector comes first");
            inspector = rest.split_whitespace().next().map(str::to_owned);
        } else if line.starts_with("psql '") {
            psql = Some(line);
        }
    }
    let inspector = inspector.expect("the inspector's URL");
    assert_eq!(inspector, format!("http://127.0.0.1:{port}/?table=public.posts"));
    let mut page = Peer::browser("newcomer");
    page.cmd(json!({"op": "goto", "url": inspector})).await;
    page.until("the page", |v| v["kind"] == "loaded").await;
    let offered = wait(
        &mut page,
        "offered",
        "[...document.querySelectorAll('#offered button')].map(b => b.textContent).join()",
    )
    .await;
    assert_eq!(offered, "anon key,service_role key");
    wait(&mut page, "subscribed", "document.querySelector('.sub .sub-status')?.textContent === 'subscribed'")
        .await;
    let status =
        tokio::process::Command::new("sh").arg("-c").arg(psql.expect("psql")).output().await.expect("psql");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let title = "[...document.querySelectorAll('.sub tr.INSERT td')].map(td => td.textContent)[3]";
    assert_eq!(wait(&mut page, "the row", &format!("{title} === 'hello' && {title}")).await, "hello");
    page.exit().await;
    let pid = rustix::process::Pid::from_raw(dev.id().expect("running") as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let exited = tokio::time::timeout(std::time::Duration::from_secs(30), dev.wait()).await;
    assert!(exited.is_ok_and(|s| s.is_ok_and(|s| s.success())), "walcast dev stops cleanly");
    let _ = std::fs::remove_dir_all(&dir);
}
