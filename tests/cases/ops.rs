//! Operations: preflight, `walcast dev`, server restarts, keepalives, slot invalidation. Tests
//! that restart or misconfigure a server start a dedicated cluster of their own.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use walcast::check;
use walcast::config::Config;
use walcast::local_postgres::{LocalPostgres, LocalPostgresOptions};

use crate::support::{self, exec, fresh_db, http_get, pool, wait_for, TestApp};

async fn dedicated(name: &str, settings: &[(&str, &str)]) -> LocalPostgres {
    let root = std::env::temp_dir().join(format!("walcast-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut opts = LocalPostgresOptions::throwaway(&root);
    opts.settings = settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let cluster = LocalPostgres::start(opts).await.expect("dedicated cluster");
    let p = pool(&cluster.url("postgres")).await;
    exec(&p, walcast::local_postgres::API_ROLES_SQL).await;
    p.close().await;
    cluster
}

fn walcast_bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
}

#[tokio::test]
async fn check_fails_on_wal_level_replica_and_passes_on_logical() {
    let cluster = dedicated("replica", &[("wal_level", "replica")]).await;
    let url = cluster.url("postgres");
    let mut config = Config { database_url: Some(url.clone()), ..Config::default() };
    config.auth.jwt_secret = Some(support::TEST_SECRET.into());
    let p = pool(&url).await;
    let results = check::run(&p, &config).await;
    let wal = results.iter().find(|r| r.name == "wal_level").expect("wal_level check");
    assert_eq!(wal.level, check::Level::Fail);
    assert!(wal.message.contains("ALTER SYSTEM SET wal_level = logical"), "{}", wal.message);
    let out = walcast_bin().arg("check").env("WALCAST_DATABASE_URL", &url).output().expect("walcast check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.lines().any(|l| l.starts_with("FAIL") && l.contains("wal_level")), "{stdout}");
    // serve refuses to start with the same message.
    let e = walcast::Gateway::prepare(config, true).await.err().expect("refuses to start");
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
    assert!(stdout.contains("wal_level") && stdout.contains("logical"), "{stdout}");
}

#[tokio::test]
async fn check_warns_about_tables_without_identity() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE nokey (v int); CREATE TABLE nothing (id int PRIMARY KEY); ALTER TABLE nothing REPLICA IDENTITY NOTHING;").await;
    let config = Config { database_url: Some(url.clone()), slot: "warn_slot".into(), ..Config::default() };
    let results = check::run(&p, &config).await;
    let ri = results.iter().find(|r| r.name == "replica_identity").expect("check");
    assert_eq!(ri.level, check::Level::Warn);
    assert!(ri.message.contains("public.nokey") && ri.message.contains("public.nothing"), "{}", ri.message);
    let rls = |results: &[check::CheckResult]| -> Vec<(check::Level, String)> {
        results.iter().filter(|r| r.name == "rls_deletes").map(|r| (r.level, r.message.clone())).collect()
    };
    assert_eq!(rls(&results).first().map(|r| r.0), Some(check::Level::Ok));
    // A table with row-level security whose DELETEs carry only the key: one warning, naming it.
    exec(&p, "CREATE TABLE guarded (id int PRIMARY KEY); ALTER TABLE guarded ENABLE ROW LEVEL SECURITY;")
        .await;
    let warned = rls(&check::run(&p, &config).await);
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].0 == check::Level::Warn
            && warned[0].1.contains("public.guarded")
            && warned[0].1.contains("withheld"),
        "{warned:?}"
    );
    exec(&p, "ALTER TABLE guarded REPLICA IDENTITY FULL").await;
    assert_eq!(rls(&check::run(&p, &config).await).first().map(|r| r.0), Some(check::Level::Ok));
    let config = Config { tables: vec!["public.missing".into()], ..config };
    let results = check::run(&p, &config).await;
    assert!(results.iter().any(|r| r.level == check::Level::Fail && r.message.contains("public.missing")));
}

#[tokio::test]
async fn dev_mode_starts_stops_and_reuses_its_data() {
    let dir = std::env::temp_dir().join(format!("walcast-devmode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut first_secret = None;
    for round in 0..2 {
        // Relative, like the default `.walcast/dev`: run from the directory's parent.
        let mut child = walcast_bin()
            .current_dir(dir.parent().expect("parent"))
            .args(["dev", "--port", &port.to_string(), "--data-dir"])
            .arg(dir.file_name().expect("name"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("walcast dev");
        let ready = format!("http://127.0.0.1:{port}/readyz");
        wait_for("dev gateway ready", Duration::from_secs(60), || async {
            http_get(&ready).await.ok().filter(|b| b.contains("\"ready\":true")).map(|_| ())
        })
        .await;
        let conf = std::fs::read_to_string(dir.join("data/postgresql.conf")).expect("cluster files");
        assert!(!conf.is_empty());
        // Tokens are required; the secret is made on the first run and kept.
        let secret = std::fs::read_to_string(dir.join("jwt_secret")).expect("the dev secret");
        match &first_secret {
            None => first_secret = Some(secret.clone()),
            Some(first) => assert_eq!(first, &secret, "the secret is kept across runs"),
        }
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let path = "/realtime/v1/websocket";
        let refused =
            support::Ws::connect_with(addr, path, Some("2.0.0"), None).await.err().expect("refused");
        assert_eq!(refused.0, 401);
        let key = walcast::auth::mint(&secret, "anon", None, Duration::from_secs(60), Default::default())
            .expect("token");
        assert!(support::Ws::connect_with(addr, path, Some("2.0.0"), Some(&key)).await.is_ok());
        let pg_port: u16 = {
            let pid = std::fs::read_to_string(dir.join("data/postmaster.pid")).expect("postmaster.pid");
            pid.lines().nth(3).and_then(|l| l.trim().parse().ok()).expect("port line")
        };
        let p = pool(&format!("postgres://postgres@127.0.0.1:{pg_port}/postgres?sslmode=disable")).await;
        let posts: i64 =
            sqlx::query_scalar("SELECT count(*) FROM posts").fetch_one(&p).await.expect("demo schema");
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
        child.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read");
        assert!(stdout.contains("/realtime/v1/websocket") && stdout.contains("psql '"), "{stdout}");
        assert!(stdout.contains("anon key") && stdout.contains("service_role key"), "{stdout}");
        assert!(stdout.contains("walcast token --secret-file"), "{stdout}");
        assert!(!dir.join("data/postmaster.pid").exists(), "the cluster was stopped");
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
    let (_, s) = ws.join("r", json!([{"event": "INSERT", "schema": "public", "table": "ev"}])).await;
    assert_eq!(s["status"], "ok");

    // Longer than wal_sender_timeout with nothing to send: keepalives must keep the stream up.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let p = pool(&url).await;
    exec(&p, "INSERT INTO ev VALUES (1)").await;
    assert_eq!(ws.recv_event("postgres_changes").await["data"]["record"], json!({"id": 1}));
    let metrics = http_get(&format!("http://{}/metrics", app.addr)).await.expect("metrics");
    assert!(
        metrics.contains("walcast_replication_connections_total 1\n"),
        "no reconnect while idle:\n{metrics}"
    );
    p.close().await;

    cluster.restart().await.expect("restart");
    let p = pool(&url).await;
    exec(&p, "INSERT INTO ev VALUES (2); INSERT INTO ev VALUES (3);").await;
    assert_eq!(ws.recv_event("postgres_changes").await["data"]["record"], json!({"id": 2}));
    assert_eq!(ws.recv_event("postgres_changes").await["data"]["record"], json!({"id": 3}));
    let metrics = http_get(&format!("http://{}/metrics", app.addr)).await.expect("metrics");
    assert!(!metrics.contains("walcast_replication_connections_total 1\n"), "reconnected:\n{metrics}");
    p.close().await;
    app.stop().await;
    cluster.stop().await;
}

/// A Postgres restart (fast shutdown, transactions aborted) under concurrent writers: an SSE
/// client that stays connected to the gateway ends with exactly the committed set, in commit
/// order. Writers retry what failed; a retry of a transaction that did commit changes nothing.
#[tokio::test]
async fn an_event_stream_loses_nothing_across_a_postgres_restart_under_load() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;

    use super::sse::{at_least, check_against_ledger, key_query, Sse, WRITERS};
    let mut cluster = dedicated("restart-load", &[]).await;
    let url = cluster.url("postgres");
    let p = pool(&url).await;
    exec(
        &p,
        "CREATE TABLE items (id bigint PRIMARY KEY, v text); CREATE TABLE ledger (item bigint PRIMARY KEY)",
    )
    .await;
    let app = TestApp::spawn(&url).await;
    let base = format!("http://{}", app.addr);
    let mut sse = Sse::open(&base, &key_query(), None).await.expect("stream");

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(0));
    let failures = Arc::new(AtomicI64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (url, stop, committed, failures) =
                (url.clone(), Arc::clone(&stop), Arc::clone(&committed), Arc::clone(&failures));
            tokio::spawn(async move {
                let p = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(2))
                    .connect_lazy(&url)
                    .expect("pool");
                let mut id = w;
                while !stop.load(Ordering::Relaxed) {
                    let sql = format!(
                        "INSERT INTO items VALUES ({id}, 'v') ON CONFLICT DO NOTHING; \
                         INSERT INTO ledger VALUES ({id}) ON CONFLICT DO NOTHING"
                    );
                    // Retried until it is known to have committed: an error may hide a commit.
                    if sqlx::raw_sql(&sql).execute(&p).await.is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    committed.fetch_add(1, Ordering::Relaxed);
                    id += WRITERS;
                }
            })
        })
        .collect();
    wait_for("writes before the restart", Duration::from_secs(30), at_least(&committed, 300)).await;
    let started_before: String = sqlx::query_scalar("SELECT pg_postmaster_start_time()::text")
        .fetch_one(&p)
        .await
        .expect("start time");
    cluster.restart().await.expect("restart");
    let after = committed.load(Ordering::Relaxed);
    wait_for("writes after the restart", Duration::from_secs(60), at_least(&committed, after + 300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    // Whether a writer's statement was cut by the restart depends on timing; that the server
    // restarted under the writers does not.
    let started_after: String = sqlx::query_scalar("SELECT pg_postmaster_start_time()::text")
        .fetch_one(&p)
        .await
        .expect("start time");
    assert_ne!(started_before, started_after, "the server restarted while the writers ran");
    eprintln!(
        "postgres restart test: {} writer statements failed and were retried",
        failures.load(Ordering::Relaxed)
    );
    let ledger: Vec<i64> = sqlx::query_scalar("SELECT item FROM ledger").fetch_all(&p).await.expect("ledger");
    let mut got = Vec::new();
    while got.len() < ledger.len() {
        let Some((id, event, data)) = sse.next().await else {
            panic!("{} of {} received within 20 s of each other", got.len(), ledger.len())
        };
        assert_eq!(event, "insert", "{data}");
        got.push((id.expect("id"), data["record"]["id"].as_i64().expect("id")));
    }
    check_against_ledger("client across a Postgres restart", &got, &ledger);
    p.close().await;
    app.stop().await;
    cluster.stop().await;
}

#[tokio::test]
async fn lost_slot_is_reported_clearly() {
    let cluster = dedicated("lost", &[("max_slot_wal_keep_size", "1MB"), ("wal_keep_size", "0")]).await;
    let url = cluster.url("postgres");
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE filler (v text)").await;
    let mut config = Config {
        database_url: Some(url.clone()),
        slot: "doomed".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    };
    config.auth.jwt_secret = Some(support::TEST_SECRET.into());
    let params = walcast::replication::wire::ConnectParams::from_url(&url).expect("url");
    walcast::replication::slot::ensure_slot(&p, &params, "doomed").await.expect("slot");
    for _ in 0..4 {
        exec(&p, "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000); SELECT pg_switch_wal();").await;
    }
    exec(&p, "CHECKPOINT").await;
    let status: Option<String> =
        sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'doomed'")
            .fetch_one(&p)
            .await
            .expect("slot row");
    assert_eq!(status.as_deref(), Some("lost"));
    let e = walcast::Gateway::prepare(config, true).await.err().expect("refuses a lost slot");
    let msg = e.to_string();
    assert!(msg.contains("lost") && msg.contains("walcast slot reset"), "{msg}");
    let out = walcast_bin()
        .args(["slot", "reset"])
        .env("WALCAST_DATABASE_URL", &url)
        .env("WALCAST_SLOT", "doomed")
        .output()
        .expect("slot reset");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Option<String> =
        sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'doomed'")
            .fetch_one(&p)
            .await
            .expect("slot row");
    assert_eq!(status.as_deref(), Some("reserved"));
    p.close().await;
    cluster.stop().await;
}

#[tokio::test]
async fn print_config_redacts_secrets() {
    let out = walcast_bin()
        .args(["serve", "--print-config"])
        .env("WALCAST_DATABASE_URL", "postgres://app:hunter2@db.internal:5432/app")
        .env("WALCAST_TABLES", "public.posts,app.*")
        .env("WALCAST_AUTH__JWT_SECRET", "correct-horse-battery-staple-0123456789")
        .output()
        .expect("print-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("postgres://app:***@db.internal:5432/app") && !stdout.contains("hunter2"),
        "{stdout}"
    );
    assert!(stdout.contains("\"public.posts\"") && stdout.contains("\"app.*\""), "{stdout}");
    assert!(stdout.contains("jwt_secret = \"***\"") && !stdout.contains("correct-horse"), "{stdout}");
    let short = walcast_bin()
        .args(["serve", "--print-config"])
        .env("WALCAST_AUTH__JWT_SECRET", "short")
        .output()
        .expect("run");
    assert_eq!(short.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short.stderr).contains("auth.jwt_secret"), "the error names the key");
    let out =
        walcast_bin().args(["serve", "--print-config"]).env("WALCAST_LISTEN", "nope").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"), "the error names the key");
}

#[tokio::test]
async fn tail_streams_json_lines_on_its_own_slot() {
    use tokio::io::AsyncBufReadExt;
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY)").await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
        .args(["tail", "--tables", "public.a", "--events", "insert,delete"])
        .env("WALCAST_DATABASE_URL", &url)
        .env("WALCAST_SLOT", "gateway_slot_untouched")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("tail starts");
    // The tail's temporary slot appears once it streams.
    support::wait_for_tail_slots(&p, "the tail's slot", true, 1).await;
    exec(&p, "INSERT INTO b VALUES (1); INSERT INTO a VALUES (1, 'x'); UPDATE a SET v = 'y'; DELETE FROM a;")
        .await;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut got = Vec::new();
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("line")
            .expect("read")
            .expect("open");
        got.push(serde_json::from_str::<serde_json::Value>(&line).expect("json line"));
    }
    assert_eq!((got[0]["type"].as_str(), got[0]["table"].as_str()), (Some("INSERT"), Some("a")));
    assert_eq!(got[0]["record"], json!({"id": 1, "v": "x"}));
    assert!(got[0].get("old_record").is_none());
    assert!(got[0]["cursor"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(got[0]["commit_timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(got[0]["columns"], json!([{"name": "id", "type": "int4"}, {"name": "v", "type": "text"}]));
    assert_eq!(got[1]["type"], "DELETE", "the UPDATE was filtered out");
    assert_eq!(got[1]["old_record"], json!({"id": 1}));
    assert!(got[1].get("record").is_none());
    assert!(got[0]["cursor"].as_str() < got[1]["cursor"].as_str());
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id().expect("pid") as i32).expect("pid"),
        rustix::process::Signal::INT,
    )
    .expect("signal");
    let status =
        tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("exits").expect("status");
    assert!(status.success(), "{status}");
    // The server drops a temporary slot once its walsender has exited, which can lag the
    // client's exit: wait for it with a deadline.
    support::wait_for_tail_slots(&p, "the tail's temporary slot to go", false, 0).await;
    let gateway: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'gateway_slot_untouched'",
    )
    .fetch_one(&p)
    .await
    .expect("slots");
    assert_eq!(gateway, 0, "tail never creates or touches the gateway's slot");
}

#[tokio::test]
async fn quiet_publication_does_not_pin_wal() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE quiet (id int PRIMARY KEY); CREATE TABLE busy (id int, v text)").await;
    let app = TestApp::spawn_with(&url, |c| c.tables = vec!["public.quiet".into()]).await;
    let slot = app.slot.clone();
    exec(&p, "INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g").await;
    let target: String =
        sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&p).await.expect("lsn");
    let target: walcast::replication::lsn::Lsn = target.parse().expect("lsn");
    wait_for("the slot to move past WAL it has no changes in", Duration::from_secs(30), || {
        let p = p.clone();
        let slot = slot.clone();
        async move {
            let info = walcast::replication::slot::slot_info(&p, &slot).await.ok()??;
            let confirmed: walcast::replication::lsn::Lsn = info.confirmed_flush_lsn?.parse().ok()?;
            (confirmed >= target).then_some(())
        }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn replication_over_tls() {
    let Ok(openssl) = which("openssl") else {
        panic!("openssl is needed for the TLS test (apt-get install openssl)")
    };
    let root = std::env::temp_dir().join(format!("walcast-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("dir");
    let cert = root.join("server.crt");
    let key = root.join("server.key");
    let status = std::process::Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    if rustix::process::geteuid().is_root() {
        let pw = std::fs::read_to_string("/etc/passwd").expect("passwd");
        let ids = pw.lines().find(|l| l.starts_with("postgres:")).expect("postgres user");
        let f: Vec<&str> = ids.split(':').collect();
        for path in [&root, &cert, &key] {
            std::os::unix::fs::chown(path, f[2].parse().ok(), f[3].parse().ok()).expect("chown");
        }
    }
    let mut opts = LocalPostgresOptions::throwaway(root.join("cluster"));
    opts.settings = vec![
        ("ssl".into(), "on".into()),
        ("ssl_cert_file".into(), cert.display().to_string()),
        ("ssl_key_file".into(), key.display().to_string()),
    ];
    let cluster = LocalPostgres::start(opts).await.expect("cluster with TLS");
    for mode in ["require", "prefer"] {
        let url = format!("postgres://postgres@localhost:{}/postgres?sslmode={mode}", cluster.port);
        let params = walcast::replication::wire::ConnectParams::from_url(&url).expect("url");
        let mut c = walcast::replication::wire::ReplicationConnection::connect(&params)
            .await
            .expect("TLS connection");
        c.identify_system().await.expect("identify over TLS");
        let rows = c.simple_query("SHOW ssl").await.expect("show");
        assert_eq!(rows[0][0].as_deref(), Some("on"));
    }
    cluster.stop().await;
    let _ = std::fs::remove_dir_all(&root);
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .ok_or(())
}

#[tokio::test]
async fn owned_publication_follows_config_and_external_one_is_left_alone() {
    use walcast::replication::slot::{ensure_publication, migrate, PublicationState};
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE SCHEMA app; CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY); CREATE TABLE app.c (id int PRIMARY KEY); CREATE PUBLICATION theirs FOR TABLE a;").await;
    migrate(&url).await.expect("migrate");
    migrate(&url).await.expect("migrations are idempotent");
    let published = |name: &'static str| {
        let p = p.clone();
        async move {
            let mut v: Vec<String> = sqlx::query_scalar(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            )
            .bind(name)
            .fetch_all(&p)
            .await
            .expect("query");
            v.sort();
            v
        }
    };
    assert_eq!(
        ensure_publication(&p, "mine", &["public.a".into()]).await.expect("create"),
        PublicationState::Created
    );
    assert_eq!(published("mine").await, ["public.a"]);
    assert_eq!(
        ensure_publication(&p, "mine", &["public.b".into(), "app.*".into()]).await.expect("follow"),
        PublicationState::Followed
    );
    assert_eq!(published("mine").await, ["app.c", "public.b"]);
    assert_eq!(
        ensure_publication(&p, "theirs", &["public.b".into()]).await.expect("use"),
        PublicationState::External
    );
    assert_eq!(published("theirs").await, ["public.a"], "a publication walcast did not create is used as is");
    // The gateway's bookkeeping stays in schema walcast, none of it in public.
    let in_public: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE '%migrations%'",
    )
    .fetch_one(&p)
    .await
    .expect("query");
    assert_eq!(in_public, 0);
}

#[tokio::test]
async fn dev_mode_runs_a_cluster_of_nodes_on_consecutive_ports() {
    let dir = std::env::temp_dir().join(format!("walcast-devnodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Three consecutive free ports. Another test may take one of them (an outgoing connection's
    // port, say) before the nodes bind it: then `walcast dev` exits saying so, and the test tries
    // other ports.
    let log = dir.with_extension("log");
    let (mut child, port) = 'attempt: loop {
        let port = (0..50)
            .find_map(|_| {
                let first = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
                let p = first.local_addr().ok()?.port();
                let rest: Option<Vec<_>> = (1..3)
                    .map(|i| std::net::TcpListener::bind(("127.0.0.1", p.checked_add(i)?)).ok())
                    .collect();
                rest.map(|_| p)
            })
            .expect("three consecutive free ports");
        let _ = std::fs::remove_dir_all(&dir);
        let mut child = walcast_bin()
            .args(["dev", "--nodes", "3", "--port", &port.to_string(), "--data-dir"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("dev log"))
            .spawn()
            .expect("walcast dev");
        for p in port..port + 3 {
            let ready = format!("http://127.0.0.1:{p}/readyz");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.to_lowercase().contains("address already in use") {
                        continue 'attempt;
                    }
                    panic!("walcast dev exited ({status}) before node {p} was ready: {text}");
                }
                if http_get(&ready).await.is_ok_and(|b| b.contains("\"ready\":true")) {
                    break;
                }
                let text = || std::fs::read_to_string(&log).unwrap_or_default();
                assert!(tokio::time::Instant::now() < deadline, "node {p} not ready within 60 s: {}", text());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        break (child, port);
    };
    let cluster = format!("http://127.0.0.1:{}/v1/cluster", port + 2);
    let view = wait_for("three nodes and an owner", Duration::from_secs(30), || async {
        let body = http_get(&cluster).await.ok()?;
        let json: serde_json::Value = serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()?;
        (json["nodes"].as_array()?.len() == 3 && json["owner"].is_string()).then_some(json)
    })
    .await;
    assert_eq!(view["node_id"], "node-3", "{view}");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).expect("pid"),
        rustix::process::Signal::INT,
    )
    .expect("signal");
    let status = wait_for("dev exits", Duration::from_secs(30), || {
        let r = child.try_wait().ok().flatten();
        async move { r }
    })
    .await;
    assert!(status.success(), "dev exits cleanly: {status}");
    let mut stdout = String::new();
    use std::io::Read;
    child.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read");
    assert!(stdout.contains("node-3") && stdout.contains("/v1/cluster"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log);
}

/// Metric names a text mentions: `walcast_…`, a histogram's series (`_bucket`, `_sum`, `_count`)
/// as the histogram.
fn metric_names(
    text: &str,
    histograms: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("walcast_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| histograms.contains(*b)))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn the_dashboard_alerts_and_readme_name_exactly_the_metrics_walcast_exports() {
    let url = crate::support::fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE t (id int PRIMARY KEY)").await;
    let app = crate::support::TestApp::spawn(&url).await;
    // One Phoenix session with one change delivered: the labelled series and the histogram count.
    let mut ws = app.ws(Some("1.0.0")).await;
    let (_, s) = ws.join("r", json!([{"event": "*", "schema": "public", "table": "t"}])).await;
    assert_eq!(s["status"], "ok", "{s}");
    exec(&p, "INSERT INTO t VALUES (1)").await;
    ws.recv_event("postgres_changes").await;
    let text = crate::support::http_get(&format!("http://{}/metrics", app.addr)).await.expect("metrics");
    for line in [
        "walcast_sessions{protocol=\"phoenix\"} 1",
        "walcast_sessions{protocol=\"sse\"} 0",
        "walcast_table_changes_total{table=\"public.t\"} 1",
        "walcast_commit_to_dispatch_seconds_count 1",
        "walcast_refused_total{reason=\"origin\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in {text}");
    }
    let written = text
        .lines()
        .find_map(|l| l.strip_prefix("walcast_dispatch_to_write_seconds_count{protocol=\"phoenix\"} "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(written.is_some_and(|n| n >= 1), "the change's frame was written: {text}");
    drop(ws);
    let typed: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_owned(), k.to_owned()))
        .collect();
    let exported: std::collections::BTreeSet<String> = typed.iter().map(|(n, _)| n.clone()).collect();
    let histograms = typed.iter().filter(|(_, k)| k == "histogram").map(|(n, _)| n.clone()).collect();
    assert!(exported.contains("walcast_commit_to_dispatch_seconds"), "{text}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["deploy/grafana/walcast.json", "deploy/prometheus/alerts.yml"] {
        let named = metric_names(&std::fs::read_to_string(root.join(file)).expect(file), &histograms);
        assert!(!named.is_empty(), "{file} names no metric");
        let missing: Vec<_> = named.difference(&exported).collect();
        assert!(missing.is_empty(), "{file} names metrics walcast does not export: {missing:?}");
    }
    // The README documents every metric on a single node (a cluster node's are in its section).
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let documented = metric_names(&readme, &histograms);
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    assert!(undocumented.is_empty(), "README does not mention {undocumented:?}");

    // A GraphQL connection is one session, however many operations it runs.
    let mut g = super::graphql::open(&app, "graphql-transport-ws").await;
    super::graphql::init(&mut g, json!({"apikey": support::anon_key()})).await;
    for id in ["a", "b"] {
        let query = "subscription { t_changes { type } }";
        super::graphql::send(&mut g, json!({"type": "subscribe", "id": id, "payload": {"query": query}}))
            .await;
    }
    super::graphql::delivering(&mut g, &p, &["a", "b"], |n| format!("INSERT INTO t VALUES ({})", 100 + n))
        .await;
    let text = crate::support::http_get(&format!("http://{}/metrics", app.addr)).await.expect("metrics");
    let line = "walcast_sessions{protocol=\"graphql\"} 1";
    assert!(text.lines().any(|l| l == line), "{line} in {text}");
    app.stop().await;
}
