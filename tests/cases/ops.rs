//! Operations: preflight, `walcast dev`, server restarts, keepalives, slot invalidation. Tests
//! that restart or misconfigure a server start a dedicated cluster of their own.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use walcast::check;
use walcast::cluster::{Cluster, ClusterOptions};
use walcast::config::Config;

use crate::support::{exec, fresh_db, http_get, pool, wait_for, TestApp};

async fn dedicated(name: &str, settings: &[(&str, &str)]) -> Cluster {
    let root = std::env::temp_dir().join(format!("walcast-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut opts = ClusterOptions::new(&root);
    opts.settings = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Cluster::start(opts).await.expect("dedicated cluster")
}

fn walcast_bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
}

#[tokio::test]
async fn check_fails_on_wal_level_replica_and_passes_on_logical() {
    let cluster = dedicated("replica", &[("wal_level", "replica")]).await;
    let url = cluster.url("postgres");
    let config = Config {
        database_url: Some(url.clone()),
        ..Config::default()
    };
    let p = pool(&url).await;
    let results = check::run(&p, &config).await;
    let wal = results
        .iter()
        .find(|r| r.name == "wal_level")
        .expect("wal_level check");
    assert_eq!(wal.level, check::Level::Fail);
    assert!(
        wal.message.contains("ALTER SYSTEM SET wal_level = logical"),
        "{}",
        wal.message
    );
    let out = walcast_bin()
        .arg("check")
        .env("WALCAST_DATABASE_URL", &url)
        .output()
        .expect("walcast check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("wal_level")),
        "{stdout}"
    );
    // serve refuses to start with the same message.
    let e = walcast::Gateway::prepare(config, true)
        .await
        .err()
        .expect("refuses to start");
    assert!(e.to_string().contains("wal_level"), "{e}");
    p.close().await;
    cluster.stop().await;

    let url = fresh_db().await;
    let out = walcast_bin()
        .arg("check")
        .env("WALCAST_DATABASE_URL", &url)
        .env("WALCAST_SLOT", "check_ok")
        .output()
        .expect("walcast check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.lines().all(|l| !l.starts_with("FAIL")), "{stdout}");
    assert!(
        stdout.contains("wal_level") && stdout.contains("logical"),
        "{stdout}"
    );
}

#[tokio::test]
async fn check_warns_about_tables_without_identity() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE nokey (v int); CREATE TABLE nothing (id int PRIMARY KEY); ALTER TABLE nothing REPLICA IDENTITY NOTHING;").await;
    let config = Config {
        database_url: Some(url.clone()),
        slot: "warn_slot".into(),
        ..Config::default()
    };
    let results = check::run(&p, &config).await;
    let ri = results
        .iter()
        .find(|r| r.name == "replica_identity")
        .expect("check");
    assert_eq!(ri.level, check::Level::Warn);
    assert!(
        ri.message.contains("public.nokey") && ri.message.contains("public.nothing"),
        "{}",
        ri.message
    );
    let config = Config {
        tables: vec!["public.missing".into()],
        ..config
    };
    let results = check::run(&p, &config).await;
    assert!(results
        .iter()
        .any(|r| r.level == check::Level::Fail && r.message.contains("public.missing")));
}

#[tokio::test]
async fn dev_mode_starts_stops_and_reuses_its_data() {
    let dir = std::env::temp_dir().join(format!("walcast-devmode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    for round in 0..2 {
        let mut child = walcast_bin()
            .args(["dev", "--port", &port.to_string(), "--data-dir"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("walcast dev");
        let ready = format!("http://127.0.0.1:{port}/readyz");
        wait_for("dev gateway ready", Duration::from_secs(60), || async {
            http_get(&ready)
                .await
                .ok()
                .filter(|b| b.contains("\"ready\":true"))
                .map(|_| ())
        })
        .await;
        let conf =
            std::fs::read_to_string(dir.join("data/postgresql.conf")).expect("cluster files");
        assert!(!conf.is_empty());
        let pg_port: u16 = {
            let pid =
                std::fs::read_to_string(dir.join("data/postmaster.pid")).expect("postmaster.pid");
            pid.lines()
                .nth(3)
                .and_then(|l| l.trim().parse().ok())
                .expect("port line")
        };
        let p = pool(&format!(
            "postgres://postgres@127.0.0.1:{pg_port}/postgres?sslmode=disable"
        ))
        .await;
        let posts: i64 = sqlx::query_scalar("SELECT count(*) FROM posts")
            .fetch_one(&p)
            .await
            .expect("demo schema");
        assert_eq!(posts, round, "data from the previous run is kept");
        exec(&p, "INSERT INTO posts (title) VALUES ('x')").await;
        p.close().await;
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32).expect("pid"),
            rustix::process::Signal::INT,
        )
        .expect("signal");
        let status = wait_for("dev exits", Duration::from_secs(20), || {
            let r = child.try_wait().ok().flatten();
            async move { r }
        })
        .await;
        assert!(status.success(), "dev exits cleanly: {status}");
        let mut stdout = String::new();
        use std::io::Read;
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout)
            .expect("read");
        assert!(
            stdout.contains("/realtime/v1/websocket") && stdout.contains("psql '"),
            "{stdout}"
        );
        assert!(
            !dir.join("data/postmaster.pid").exists(),
            "the cluster was stopped"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn survives_postgres_restart_and_idle_keepalives() {
    let mut cluster = dedicated("restart", &[("wal_sender_timeout", "2s")]).await;
    let url = cluster.url("postgres");
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE ev (id int PRIMARY KEY)").await;
    p.close().await;
    let app = TestApp::spawn(&url).await;
    let mut ws = app.ws(Some("2.0.0")).await;
    let (_, s) = ws
        .join(
            "r",
            json!([{"event": "INSERT", "schema": "public", "table": "ev"}]),
        )
        .await;
    assert_eq!(s["status"], "ok");

    // Longer than wal_sender_timeout with nothing to send: keepalives must keep the stream up.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let p = pool(&url).await;
    exec(&p, "INSERT INTO ev VALUES (1)").await;
    assert_eq!(
        ws.recv_event("postgres_changes").await["data"]["record"],
        json!({"id": 1})
    );
    let metrics = http_get(&format!("http://{}/metrics", app.addr))
        .await
        .expect("metrics");
    assert!(
        metrics.contains("walcast_replication_connections_total 1\n"),
        "no reconnect while idle:\n{metrics}"
    );
    p.close().await;

    cluster.restart().await.expect("restart");
    let p = pool(&url).await;
    exec(&p, "INSERT INTO ev VALUES (2); INSERT INTO ev VALUES (3);").await;
    assert_eq!(
        ws.recv_event("postgres_changes").await["data"]["record"],
        json!({"id": 2})
    );
    assert_eq!(
        ws.recv_event("postgres_changes").await["data"]["record"],
        json!({"id": 3})
    );
    let metrics = http_get(&format!("http://{}/metrics", app.addr))
        .await
        .expect("metrics");
    assert!(
        !metrics.contains("walcast_replication_connections_total 1\n"),
        "reconnected:\n{metrics}"
    );
    p.close().await;
    app.stop().await;
    cluster.stop().await;
}

#[tokio::test]
async fn lost_slot_is_reported_clearly() {
    let cluster = dedicated(
        "lost",
        &[("max_slot_wal_keep_size", "1MB"), ("wal_keep_size", "0")],
    )
    .await;
    let url = cluster.url("postgres");
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE filler (v text)").await;
    let config = Config {
        database_url: Some(url.clone()),
        slot: "doomed".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    };
    let params = walcast::replication::wire::ConnectParams::from_url(&url).expect("url");
    walcast::replication::slot::ensure_slot(&p, &params, "doomed")
        .await
        .expect("slot");
    for _ in 0..4 {
        exec(&p, "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000); SELECT pg_switch_wal();").await;
    }
    exec(&p, "CHECKPOINT").await;
    let status: Option<String> = sqlx::query_scalar(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'doomed'",
    )
    .fetch_one(&p)
    .await
    .expect("slot row");
    assert_eq!(status.as_deref(), Some("lost"));
    let e = walcast::Gateway::prepare(config, true)
        .await
        .err()
        .expect("refuses a lost slot");
    let msg = e.to_string();
    assert!(
        msg.contains("lost") && msg.contains("walcast slot reset"),
        "{msg}"
    );
    let out = walcast_bin()
        .args(["slot", "reset"])
        .env("WALCAST_DATABASE_URL", &url)
        .env("WALCAST_SLOT", "doomed")
        .output()
        .expect("slot reset");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Option<String> = sqlx::query_scalar(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'doomed'",
    )
    .fetch_one(&p)
    .await
    .expect("slot row");
    assert_eq!(status.as_deref(), Some("reserved"));
    p.close().await;
    cluster.stop().await;
}
