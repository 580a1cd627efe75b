//! A gateway child process for the socket scenarios, so its CPU and memory are measured apart
//! from the load generator's.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// The secret the bench's gateway child verifies tokens with. A gateway given with
/// `--gateway-url` must use it too (`WALCAST_AUTH__JWT_SECRET`), or run with `auth.mode = "off"`.
pub const BENCH_SECRET: &str = "walcast-bench-secret-not-for-production-use";

/// The key bench sockets connect with: a `service_role` token signed with [`BENCH_SECRET`].
pub fn apikey() -> String {
    crate::auth::mint(BENCH_SECRET, "service_role", None, Duration::from_secs(24 * 3600), Default::default())
        .unwrap_or_default()
}

pub struct GatewayProcess {
    pub child: Child,
    pub addr: String,
    pub pid: u32,
}

impl GatewayProcess {
    pub async fn spawn(
        bin: &Path,
        database_url: &str,
        slot: &str,
        client_queue: usize,
    ) -> anyhow::Result<GatewayProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        // A change log of its own, started afresh each run.
        let log_dir = std::env::temp_dir().join(format!("walcast-bench-changelog-{slot}"));
        let _ = std::fs::remove_dir_all(&log_dir);
        let child = Command::new(bin)
            .arg("serve")
            .env("WALCAST_DATABASE_URL", database_url)
            .env("WALCAST_LISTEN", &addr)
            .env("WALCAST_SLOT", slot)
            .env("WALCAST_CHANGELOG__DIR", &log_dir)
            .env("WALCAST_CLIENT_QUEUE", client_queue.to_string())
            .env("WALCAST_LOG_FORMAT", "json")
            .env("WALCAST_AUTH__JWT_SECRET", BENCH_SECRET)
            // Bench clients do not heartbeat.
            .env("WALCAST_IDLE_TIMEOUT_SECS", "3600")
            // Throughput is measured, not the per-socket rate limits.
            .env("WALCAST_MAX_EVENTS_PER_SECOND", "1000000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or_else(|| anyhow::anyhow!("gateway exited at once"))?;
        let g = GatewayProcess { child, addr, pid };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(body) = http_get(&g.addr, "/readyz").await {
                if body.contains("\"ready\":true") {
                    return Ok(g);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "gateway not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// (CPU seconds, current RSS bytes, peak RSS bytes) of the gateway process.
    pub fn usage(&self) -> (f64, u64, u64) {
        proc_usage(self.pid)
    }

    pub async fn stop(mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await;
    }
}

/// The gateway under test: a child process, or one already running at `--gateway-url`.
pub enum BenchGateway {
    Child(GatewayProcess),
    External(String),
}

impl BenchGateway {
    pub async fn start(
        external: Option<&str>,
        bin: &Path,
        database_url: &str,
        slot: &str,
        client_queue: usize,
    ) -> anyhow::Result<BenchGateway> {
        match external {
            Some(url) => {
                let addr = url
                    .trim_start_matches("ws://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_owned();
                let ready = http_get(&addr, "/readyz").await?;
                anyhow::ensure!(ready.contains("\"ready\":true"), "gateway at {addr} is not ready: {ready}");
                Ok(BenchGateway::External(addr))
            }
            None => {
                Ok(BenchGateway::Child(GatewayProcess::spawn(bin, database_url, slot, client_queue).await?))
            }
        }
    }

    pub fn addr(&self) -> &str {
        match self {
            BenchGateway::Child(g) => &g.addr,
            BenchGateway::External(a) => a,
        }
    }

    /// (CPU seconds, RSS, peak RSS) of a child gateway; unknown for an external one.
    pub fn usage(&self) -> Option<(f64, u64, u64)> {
        match self {
            BenchGateway::Child(g) => Some(g.usage()),
            BenchGateway::External(_) => None,
        }
    }

    pub async fn stop(self) {
        if let BenchGateway::Child(g) = self {
            g.stop().await;
        }
    }
}

/// (CPU seconds, RSS bytes, peak RSS bytes) of a process, from /proc.
pub fn proc_usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (ticks / 100.0, kb("VmRSS:") * 1024, kb("VmHWM:") * 1024)
}

/// A minimal HTTP/1.1 GET of `path` on `addr`, returning the whole response.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Raises the open-file limit to its hard maximum so thousands of sockets fit.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let target = Rlimit { current: lim.maximum, maximum: lim.maximum };
    let _ = setrlimit(Resource::Nofile, target);
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}
