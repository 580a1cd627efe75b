//! End-to-end with the official clients from their registries: `@supabase/realtime-js` under
//! node (both serializers) and the Python `realtime` client. `.ci/run` installs them; locally,
//! run `npm ci` in tests/clients/node and create tests/clients/python/.venv from requirements.txt.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::support::{exec, fresh_db, pool, TestApp};

const SCHEMA: &str = "
CREATE TABLE todos (id bigint PRIMARY KEY, task text, tags text[], meta jsonb, due timestamptz);
CREATE TABLE notes (id int PRIMARY KEY, body text);
ALTER TABLE notes REPLICA IDENTITY FULL;
";

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

struct ClientProcess {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ClientProcess {
    fn spawn(mut cmd: Command) -> ClientProcess {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("client starts");
        let stdout = child.stdout.take().expect("stdout");
        ClientProcess { child, lines: BufReader::new(stdout).lines() }
    }

    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(40), self.lines.next_line())
            .await
            .expect("client output within 40 s")
            .expect("read")
            .expect("client exited early");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("client printed {line}"))
    }

    /// Waits for SUBSCRIBED; panics on an error status.
    async fn subscribed(&mut self) {
        loop {
            let ev = self.next().await;
            if ev["kind"] == "status" {
                let status = ev["status"].as_str().unwrap_or("");
                assert!(status.ends_with("SUBSCRIBED"), "client status {ev}");
                return;
            }
        }
    }

    async fn changes(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let ev = self.next().await;
            match ev["kind"].as_str() {
                Some("change") => out.push(ev),
                Some("timeout") => panic!("client timed out after {} changes: {out:?}", out.len()),
                _ => {}
            }
        }
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(status.success(), "client exit {status}");
        out
    }
}

fn node_client(endpoint: &str, vsn: &str, bindings: &Value, expected: usize) -> ClientProcess {
    let dir = clients_dir().join("node");
    assert!(
        dir.join("node_modules/@supabase/realtime-js").exists(),
        "@supabase/realtime-js is not installed: run `npm ci` in {} (or .ci/run)",
        dir.display()
    );
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg("subscribe.mjs")
        .arg(endpoint)
        .arg(vsn)
        .arg(bindings.to_string())
        .arg(expected.to_string());
    ClientProcess::spawn(cmd)
}

fn python_client(endpoint: &str, bindings: &Value, expected: usize) -> ClientProcess {
    let dir = clients_dir().join("python");
    let python = dir.join(".venv/bin/python");
    assert!(
        python.exists(),
        "the Python realtime client is not installed: create {}/.venv and pip install -r requirements.txt (or .ci/run)",
        dir.display()
    );
    let mut cmd = Command::new(python);
    cmd.current_dir(&dir)
        .arg("subscribe.py")
        .arg(endpoint)
        .arg(bindings.to_string())
        .arg(expected.to_string());
    ClientProcess::spawn(cmd)
}

fn bindings() -> Value {
    json!([
        {"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=eq.1"},
        {"event": "*", "schema": "public", "table": "notes"}
    ])
}

async fn commit_workload(p: &sqlx::PgPool) {
    exec(p, "INSERT INTO todos VALUES (2, 'not mine', '{}', null, null)").await;
    exec(
        p,
        r#"INSERT INTO todos VALUES (1, 'mine', '{a,"b c"}', '{"k": [1, 2]}', '2025-11-19 00:22:40.877+00')"#,
    )
    .await;
    exec(p, "INSERT INTO notes VALUES (7, 'hello'); UPDATE notes SET body = 'bye' WHERE id = 7; DELETE FROM notes WHERE id = 7;").await;
}

fn check_js_payloads(changes: &[Value]) {
    let p: Vec<&Value> = changes.iter().map(|c| &c["payload"]).collect();
    assert_eq!(changes[0]["binding"], 0);
    assert_eq!(p[0]["eventType"], "INSERT");
    assert_eq!(
        p[0]["new"],
        json!({"id": 1, "task": "mine", "tags": ["a", "b c"], "meta": {"k": [1, 2]}, "due": "2025-11-19T00:22:40.877+00:00"})
    );
    assert_eq!(p[0]["old"], json!({}));
    assert!(p[0]["commit_timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", p[0]);
    assert_eq!((p[0]["schema"].as_str(), p[0]["table"].as_str()), (Some("public"), Some("todos")));
    let kinds: Vec<&str> = p[1..].iter().map(|x| x["eventType"].as_str().unwrap_or("")).collect();
    assert_eq!(kinds, ["INSERT", "UPDATE", "DELETE"]);
    assert_eq!(p[2]["new"], json!({"id": 7, "body": "bye"}));
    assert_eq!(p[2]["old"], json!({"id": 7, "body": "hello"}));
    assert_eq!(p[3]["old"], json!({"id": 7, "body": "bye"}));
    assert_eq!(p[3]["new"], json!({}));
}

async fn realtime_js(vsn: &str) {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn(&url).await;
    let mut client = node_client(&format!("ws://{}/realtime/v1", app.addr), vsn, &bindings(), 4);
    client.subscribed().await;
    commit_workload(&p).await;
    let changes = client.changes(4).await;
    check_js_payloads(&changes);
    app.stop().await;
}

#[tokio::test]
async fn realtime_js_vsn_2() {
    realtime_js("2.0.0").await;
}

#[tokio::test]
async fn realtime_js_vsn_1() {
    realtime_js("1.0.0").await;
}

#[tokio::test]
async fn python_realtime_client() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let app = TestApp::spawn(&url).await;
    let mut client = python_client(&format!("ws://{}/realtime/v1", app.addr), &bindings(), 4);
    client.subscribed().await;
    commit_workload(&p).await;
    let changes = client.changes(4).await;
    let data: Vec<&Value> = changes.iter().map(|c| &c["payload"]["data"]).collect();
    assert_eq!(changes[0]["binding"], 0);
    assert_eq!(data[0]["type"], "INSERT");
    assert_eq!(data[0]["record"]["tags"], json!(["a", "b c"]));
    assert_eq!(data[0]["record"]["id"], 1);
    let kinds: Vec<&str> = data[1..].iter().map(|d| d["type"].as_str().unwrap_or("")).collect();
    assert_eq!(kinds, ["INSERT", "UPDATE", "DELETE"]);
    assert_eq!(data[3]["old_record"], json!({"id": 7, "body": "bye"}));
    app.stop().await;
}
