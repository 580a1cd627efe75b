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
    page.cmd(json!({"op": "eval", "id": id, "js": js})).await;
    let r = page.until(id, |v| v["kind"] == "result" && v["id"] == id).await;
    assert!(r.get("error").is_none(), "{js}: {r}");
    r["value"].clone()
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
    let db = url.rsplit('/').next().unwrap_or("").split('?').next().unwrap_or("").to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
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
