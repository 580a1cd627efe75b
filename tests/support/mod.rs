//! Test harness: one throwaway PostgreSQL cluster per test binary (or `WALCAST_TEST_DATABASE_URL`),
//! a fresh database per test, an in-process gateway on port 0, a raw Phoenix WebSocket client,
//! and `wait_for` to wait on conditions with a deadline.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sqlx::PgPool;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use walcast::config::Config;
use walcast::local_postgres::{LocalPostgres, LocalPostgresOptions};
use walcast::Gateway;

pub const SCRAM_USER: &str = "walcast_scram";
pub const MD5_USER: &str = "walcast_md5";
pub const PASSWORD: &str = "s3cret pass";
/// The secret every test gateway verifies HS tokens with.
pub const TEST_SECRET: &str = "walcast-test-secret-0123456789-abcdefghijklmnop";

/// A token signed with [`TEST_SECRET`] for `role`, valid for an hour.
pub fn token(role: &str, sub: Option<&str>) -> String {
    walcast::auth::mint(TEST_SECRET, role, sub, Duration::from_secs(3600), Default::default()).expect("token")
}

/// Waits until `want` temporary slots of `walcast tail` exist in this database (`active`: only
/// those streaming). A slot being created is already active while it waits for the cluster's
/// running transactions (other tests') to end; a change committed before it is consistent is
/// never decoded, so "streaming" also needs its `confirmed_flush_lsn`.
pub async fn wait_for_tail_slots(p: &PgPool, what: &str, active: bool, want: i64) {
    let sql = if active {
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'walcast_tail_%' \
         AND database = current_database() AND active AND confirmed_flush_lsn IS NOT NULL"
    } else {
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'walcast_tail_%' \
         AND database = current_database()"
    };
    wait_for(what, Duration::from_secs(30), || {
        let p = p.clone();
        async move {
            let n: i64 = sqlx::query_scalar(sql).fetch_one(&p).await.ok()?;
            (n == want).then_some(())
        }
    })
    .await;
}

/// An error and its causes, as one line.
pub fn error_text(e: &dyn std::error::Error) -> String {
    walcast::errors::chain(e)
}

/// `claims` signed (HS256) with `secret`.
pub fn signed(claims: &Value, secret: &str) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).expect("token")
}

/// A token for `role` that expires `exp_in` seconds from now (negative: already expired).
pub fn token_expiring(role: &str, sub: Option<&str>, exp_in: i64) -> String {
    let mut claims = serde_json::json!({"role": role, "exp": walcast::auth::unix_now() + exp_in});
    if let Some(sub) = sub {
        claims["sub"] = sub.into();
    }
    signed(&claims, TEST_SECRET)
}

/// The key ordinary test clients connect with (role `anon`).
pub fn anon_key() -> String {
    token("anon", None)
}

struct Shared {
    admin_url: String,
    port: Option<u16>,
}

/// The shared cluster. It lives on its own thread and runtime for the whole test binary; when
/// the process exits, its watchdog stops the server.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        if let Ok(url) = std::env::var("WALCAST_TEST_DATABASE_URL") {
            return Shared { admin_url: url, port: None };
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let root = std::env::temp_dir().join(format!("walcast-test-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&root);
                let mut opts = LocalPostgresOptions::throwaway(&root);
                opts.hba = vec![
                    format!("host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256"),
                    format!("host replication {SCRAM_USER} 127.0.0.1/32 scram-sha-256"),
                    format!("host all {MD5_USER} 127.0.0.1/32 md5"),
                    format!("host replication {MD5_USER} 127.0.0.1/32 md5"),
                ];
                let cluster = LocalPostgres::start(opts).await;
                match cluster {
                    Ok(c) => {
                        // Every test database is made from template1: roles and default
                        // privileges set there apply to all of them.
                        let template = c.url("template1");
                        let roles = async {
                            let pool = PgPool::connect(&template).await?;
                            sqlx::raw_sql(walcast::local_postgres::API_ROLES_SQL).execute(&pool).await?;
                            pool.close().await;
                            Ok::<_, sqlx::Error>(())
                        };
                        if let Err(e) = roles.await {
                            let _ = tx.send(Err(format!("creating the API roles: {e}")));
                            return;
                        }
                        let _ = tx.send(Ok((c.url("postgres"), c.port)));
                        // Keep the cluster alive for the life of the process.
                        std::future::pending::<()>().await;
                        drop(c);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        });
        match rx.recv().expect("cluster thread") {
            Ok((admin_url, port)) => Shared { admin_url, port: Some(port) },
            Err(e) => panic!("starting the test cluster: {e}"),
        }
    })
}

/// Replaces the database name of a URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map(|(b, q)| (b, Some(q))).unwrap_or((url, None));
    let (prefix, _) = base.rsplit_once('/').unwrap_or((base, ""));
    match query {
        Some(q) => format!("{prefix}/{db}?{q}"),
        None => format!("{prefix}/{db}"),
    }
}

/// A fresh, empty database for one test.
/// The database a URL names.
pub fn db_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or("").split('?').next().unwrap_or("").to_owned()
}

/// A port free on the loopback interface now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port()
}

pub async fn fresh_db() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let admin = &shared().admin_url;
    let name = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let pool = PgPool::connect(admin).await.expect("connect admin");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&pool).await.expect("create database");
    pool.close().await;
    with_database(admin, &name)
}

pub fn cluster_port() -> Option<u16> {
    shared().port
}

pub async fn pool(url: &str) -> PgPool {
    PgPool::connect(url).await.expect("connect")
}

pub async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Polls `cond` until it returns `Some` or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Supabase's `auth.uid()`: the `sub` claim of the subscriber's token, for policies.
pub const AUTH_UID: &str = "
CREATE SCHEMA auth;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid
$$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated;
";

/// The change log directory of a test database's gateway, under a directory of this process
/// (those of earlier processes are removed on first use).
pub fn log_dir(db: &str) -> std::path::PathBuf {
    static BASE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.strip_prefix("walcast-test-logs-") else { continue };
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        tmp.join(format!("walcast-test-logs-{}", std::process::id()))
    });
    base.join(db)
}

/// A gateway running in this process on a free port.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The gateway's slot (slots are cluster-wide, so each test has its own).
    pub slot: String,
    pub db_url: String,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestApp {
    pub async fn spawn(db_url: &str) -> TestApp {
        Self::spawn_with(db_url, |_| {}).await
    }

    pub async fn spawn_with(db_url: &str, tweak: impl FnOnce(&mut Config)) -> TestApp {
        // `WALCAST_TEST_LOG=walcast=debug` shows the gateway's log beside a test's output.
        if let Ok(filter) = std::env::var("WALCAST_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        // Slots are cluster-wide: name each after its test's database.
        let db = db_name(db_url);
        let mut config = Config {
            database_url: Some(db_url.to_owned()),
            listen: "127.0.0.1:0".parse().expect("addr"),
            slot: format!("slot_{db}"),
            ..Config::default()
        };
        config.auth.jwt_secret = Some(TEST_SECRET.into());
        // One change log per test database, kept across restarts within this test process.
        config.changelog.dir = log_dir(&db);
        tweak(&mut config);
        let slot = config.slot.clone();
        let gateway = Gateway::prepare(config, true).await.expect("gateway starts");
        let addr = gateway.local_addr();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(gateway.run(shutdown.clone()));
        let app = TestApp { addr, slot, db_url: db_url.to_owned(), shutdown, handle };
        app.wait_ready().await;
        app
    }

    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.addr);
        wait_for("gateway ready", Duration::from_secs(20), || async {
            let body = http_get(&url).await.ok()?;
            body.contains("\"ready\":true").then_some(())
        })
        .await;
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.handle).await;
    }

    pub async fn ws(&self, vsn: Option<&str>) -> Ws {
        Ws::connect(self.addr, "/realtime/v1/websocket", vsn).await
    }
}

/// A minimal HTTP/1.1 GET of a `http://host:port/path` URL, returning the whole response.
pub async fn http_get(url: &str) -> std::io::Result<String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    walcast::bench::gateway::http_get(host, &path).await
}

/// A kind-4 binary broadcast as JSON:
/// `{"binary":{"topic","event","meta","json":bool,"payload": JSON value or byte array}}`.
pub fn decode_kind4(b: &[u8]) -> Value {
    assert!(b.len() >= 5 && b[0] == 4, "server binary frames are kind 4: {b:?}");
    let (t, e, m) = (b[1] as usize, b[2] as usize, b[3] as usize);
    let json = b[4] == 1;
    let at = 5;
    let text = |r: std::ops::Range<usize>| String::from_utf8(b[r].to_vec()).expect("utf-8");
    let topic = text(at..at + t);
    let event = text(at + t..at + t + e);
    let meta = text(at + t + e..at + t + e + m);
    let payload = &b[at + t + e + m..];
    serde_json::json!({"binary": {
        "topic": topic, "event": event,
        "meta": if meta.is_empty() { Value::Null } else { serde_json::from_str(&meta).expect("meta is JSON") },
        "json": json,
        "payload": if json { serde_json::from_slice(payload).expect("payload is JSON") } else { serde_json::json!(payload) },
    }})
}

/// A raw Phoenix client over WebSocket.
pub struct Ws {
    pub inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub v2: bool,
    next_ref: u32,
}

impl Ws {
    pub async fn connect(addr: SocketAddr, path: &str, vsn: Option<&str>) -> Ws {
        match Ws::connect_with(addr, path, vsn, Some(&anon_key())).await {
            Ok(ws) => ws,
            Err((status, body)) => panic!("websocket refused: {status} {body}"),
        }
    }

    /// Connects with `apikey` (none: no key at all); a refused upgrade is `Err((status, body))`.
    pub async fn connect_with(
        addr: SocketAddr,
        path: &str,
        vsn: Option<&str>,
        apikey: Option<&str>,
    ) -> Result<Ws, (u16, String)> {
        let mut params = Vec::new();
        if let Some(k) = apikey {
            params.push(format!("apikey={k}"));
        }
        if let Some(v) = vsn {
            params.push(format!("vsn={v}"));
        }
        let url = format!("ws://{addr}{path}?{}", params.join("&"));
        match tokio_tungstenite::connect_async(&url).await {
            Ok((inner, _)) => Ok(Ws { inner, v2: vsn == Some("2.0.0"), next_ref: 0 }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp.body().as_deref().map(|b| String::from_utf8_lossy(b).into_owned());
                Err((resp.status().as_u16(), body.unwrap_or_default()))
            }
            Err(e) => panic!("websocket connect: {e}"),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.inner.send(Message::Text(text.into())).await.expect("send");
    }

    /// Sends a text frame; false when the socket is gone.
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        self.inner.send(Message::Text(text.into())).await.is_ok()
    }

    /// Sends a binary frame; false when the socket is gone.
    pub async fn try_send_binary(&mut self, bytes: Vec<u8>) -> bool {
        self.inner.send(Message::Binary(bytes.into())).await.is_ok()
    }

    /// Sends a message and returns its ref.
    pub async fn push(&mut self, join_ref: Option<&str>, topic: &str, event: &str, payload: Value) -> String {
        self.next_ref += 1;
        let r = self.next_ref.to_string();
        let frame = if self.v2 {
            serde_json::json!([join_ref, r, topic, event, payload])
        } else {
            serde_json::json!({"topic": topic, "event": event, "payload": payload, "ref": r, "join_ref": join_ref})
        };
        self.send_text(&frame.to_string()).await;
        r
    }

    /// The next text frame as JSON (raw, in the socket's serializer).
    pub async fn recv(&mut self) -> Value {
        self.try_recv(Duration::from_secs(10)).await.expect("a frame within 10 s")
    }

    pub async fn try_recv(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.inner.next()).await.ok()??.ok()?;
            match msg {
                Message::Text(t) => return Some(serde_json::from_str(&t).expect("server frames are JSON")),
                Message::Binary(b) => return Some(decode_kind4(&b)),
                Message::Close(c) => {
                    return Some(
                        serde_json::json!({"close": c.map(|c| (u16::from(c.code), c.reason.to_string()))}),
                    )
                }
                _ => continue,
            }
        }
    }

    /// (topic, event, payload, ref, join_ref) of a frame in either serializer.
    pub fn parts(&self, v: &Value) -> (String, String, Value, Value, Value) {
        if self.v2 {
            (
                v[2].as_str().unwrap_or("").into(),
                v[3].as_str().unwrap_or("").into(),
                v[4].clone(),
                v[1].clone(),
                v[0].clone(),
            )
        } else {
            (
                v["topic"].as_str().unwrap_or("").into(),
                v["event"].as_str().unwrap_or("").into(),
                v["payload"].clone(),
                v["ref"].clone(),
                v.get("join_ref").cloned().unwrap_or(Value::Null),
            )
        }
    }

    /// Receives frames until one has `event`, returning its payload.
    pub async fn recv_event(&mut self, event: &str) -> Value {
        loop {
            let f = self.recv().await;
            let (_, e, payload, _, _) = self.parts(&f);
            if e == event {
                return payload;
            }
        }
    }

    /// Sends a kind-3 binary broadcast push; returns its ref.
    pub async fn push_binary(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        json: bool,
        payload: &[u8],
    ) -> String {
        self.next_ref += 1;
        let r = self.next_ref.to_string();
        let mut f = vec![
            3u8,
            join_ref.len() as u8,
            r.len() as u8,
            topic.len() as u8,
            event.len() as u8,
            0,
            u8::from(json),
        ];
        for part in [join_ref.as_bytes(), r.as_bytes(), topic.as_bytes(), event.as_bytes(), payload] {
            f.extend_from_slice(part);
        }
        self.inner.send(Message::Binary(f.into())).await.expect("send");
        r
    }

    /// Joins `realtime:<name>` with a config (no bindings); returns the reply payload.
    pub async fn join_config(&mut self, name: &str, config: Value) -> Value {
        let topic = format!("realtime:{name}");
        let r = self.push(Some("j1"), &topic, "phx_join", serde_json::json!({"config": config})).await;
        loop {
            let f = self.recv().await;
            let (_, e, p, fr, _) = self.parts(&f);
            if e == "phx_reply" && fr.as_str() == Some(r.as_str()) {
                return p;
            }
        }
    }

    /// Frames until `pred` holds for one, which is returned; the others are dropped.
    pub async fn recv_until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let f = self
                .try_recv(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("timed out waiting for {what}"));
            if pred(&f) {
                return f;
            }
        }
    }

    /// Asserts nothing but the reply to a heartbeat arrives (a fence for "nothing was sent").
    pub async fn expect_quiet(&mut self, why: &str) {
        let hb = self.push(None, "phoenix", "heartbeat", serde_json::json!({})).await;
        let f = self.recv().await;
        let (_, e, _, r, _) = self.parts(&f);
        assert!(e == "phx_reply" && r.as_str() == Some(hb.as_str()), "{why}: got {f}");
    }

    /// Joins `realtime:<name>` with the given bindings; returns (reply payload, system payload).
    pub async fn join(&mut self, name: &str, bindings: Value) -> (Value, Value) {
        let topic = format!("realtime:{name}");
        let payload = serde_json::json!({"config": {"broadcast": {"ack": false, "self": false},
            "presence": {"key": ""}, "postgres_changes": bindings, "private": false}});
        let r = self.push(Some("j1"), &topic, "phx_join", payload).await;
        let mut reply = Value::Null;
        loop {
            let f = self.recv().await;
            let (t, e, p, fr, _) = self.parts(&f);
            if e == "phx_reply" && fr.as_str() == Some(r.as_str()) {
                reply = p;
                if bindings.as_array().is_none_or(|b| b.is_empty()) {
                    return (reply, Value::Null);
                }
            } else if e == "system" && t == topic {
                return (reply, p);
            }
        }
    }
}

/// A minimal HTTP/1.1 POST; returns (status, body).
pub async fn http_post(addr: SocketAddr, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let auth = format!("apikey: {}", anon_key());
    http_post_with(addr, path, &[&auth, &format!("Content-Type: {content_type}")], body).await
}

/// A minimal HTTP/1.1 POST with these header lines; returns (status, body).
pub async fn http_post_with(addr: SocketAddr, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A gateway on a fresh database with `auth.uid()` and `schema` (a row-level security test's
/// tables and policies), and a pool to it.
pub async fn rls_app(
    schema: &str,
    tweak: impl FnOnce(&mut walcast::config::Config),
) -> (TestApp, sqlx::PgPool) {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, AUTH_UID).await;
    exec(&p, schema).await;
    (TestApp::spawn_with(&url, tweak).await, p)
}

/// A Phoenix socket on `app` with `key`; panics when refused.
pub async fn connect(app: &TestApp, key: &str) -> Ws {
    match Ws::connect_with(app.addr, "/realtime/v1/websocket", None, Some(key)).await {
        Ok(ws) => ws,
        Err((status, body)) => panic!("refused: {status} {body}"),
    }
}

/// A signed-in user's token.
pub fn user(sub: &str) -> String {
    token("authenticated", Some(sub))
}

/// A gateway as a child process (`walcast serve`), for tests that kill and restart it.
pub struct GatewayProcess<'a> {
    pub url: &'a str,
    pub slot: &'a str,
    pub port: u16,
    pub log_dir: &'a std::path::Path,
    /// More `WALCAST_*` settings.
    pub env: &'a [(&'a str, String)],
}

impl GatewayProcess<'_> {
    /// Starts it, its log to `stderr` at `log` level, and waits until `/readyz` says ready.
    pub async fn start(&self, stderr: std::fs::File, log: &str, name: &str) -> tokio::process::Child {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
            .arg("serve")
            .env("WALCAST_DATABASE_URL", self.url)
            .env("WALCAST_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("WALCAST_SLOT", self.slot)
            .env("WALCAST_CHANGELOG__DIR", self.log_dir)
            .env("WALCAST_AUTH__JWT_SECRET", TEST_SECRET)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", log)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("gateway process");
        let ready = format!("http://127.0.0.1:{}/readyz", self.port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(exit) = child.try_wait().ok().flatten() {
                panic!("gateway {name} exited before it was ready: {exit}");
            }
            let ok = async { reqwest::get(&ready).await.ok()?.text().await.ok() }.await;
            if ok.is_some_and(|body| body.contains("\"ready\":true")) {
                return child;
            }
            assert!(tokio::time::Instant::now() < deadline, "gateway {name} not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
