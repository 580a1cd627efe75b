//! A private PostgreSQL cluster started from the local server binaries: used by `walcast dev`, by
//! the integration tests and by `walcast bench`.
//!
//! Owns: finding the binaries, initdb (as an unprivileged user when running as root), starting the
//! server with `wal_level=logical` on a free port, waiting for readiness with a deadline, and
//! stopping it. The server runs under a small shell watchdog that stops it when this process
//! goes away, so no cluster outlives a crashed test run. Must not: touch the gateway.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum LocalPostgresError {
    #[error(
        "no PostgreSQL server binaries found (looked at $PG_BIN, /usr/lib/postgresql/*/bin and PATH); \
         install them, e.g. `apt-get install -y postgresql`"
    )]
    NoBinaries,
    #[error("running as root, but there is no `postgres` user to run the cluster as; create one (`useradd postgres`)")]
    NoUnprivilegedUser,
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initdb failed: {0}")]
    Initdb(String),
    #[error("the server stopped while starting: {reason} (see {log})")]
    Exited { reason: String, log: String },
    #[error("the server did not become ready within {seconds} s; see {log}")]
    NotReady { seconds: u64, log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalPostgresError {
    let what = what.into();
    move |source| LocalPostgresError::Io { what, source }
}

/// Finds `initdb` and `postgres`: `$PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else PATH.
pub fn find_binaries() -> Result<PathBuf, LocalPostgresError> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        let dir = PathBuf::from(dir);
        if dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("postgres").exists() && dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    Err(LocalPostgresError::NoBinaries)
}

/// (uid, gid) of the `postgres` user, read from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres")).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

#[derive(Debug, Clone)]
pub struct LocalPostgresOptions {
    /// Directory holding `data/` and `postgres.log`; reused when it already holds a cluster.
    pub root: PathBuf,
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
    /// Extra pg_hba.conf lines placed before the trust rules.
    pub hba: Vec<String>,
    pub port: Option<u16>,
    /// Delete `root` once the server has stopped (throwaway clusters of tests and benchmarks).
    pub remove_on_exit: bool,
}

impl LocalPostgresOptions {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalPostgresOptions {
            root: root.into(),
            settings: Vec::new(),
            hba: Vec::new(),
            port: None,
            remove_on_exit: false,
        }
    }

    /// A throwaway cluster: its directory is deleted when the server stops.
    pub fn throwaway(root: impl Into<PathBuf>) -> Self {
        LocalPostgresOptions { remove_on_exit: true, ..LocalPostgresOptions::new(root) }
    }
}

/// A running cluster. Dropping it stops the server.
pub struct LocalPostgres {
    pub port: u16,
    pub root: PathBuf,
    pub bin: PathBuf,
    owner: Option<(u32, u32)>,
    remove_on_exit: bool,
    child: Option<Child>,
}

impl LocalPostgres {
    pub async fn start(opts: LocalPostgresOptions) -> Result<LocalPostgres, LocalPostgresError> {
        let bin = find_binaries()?;
        let owner = if rustix::process::geteuid().is_root() {
            Some(postgres_user().ok_or(LocalPostgresError::NoUnprivilegedUser)?)
        } else {
            None
        };
        std::fs::create_dir_all(&opts.root).map_err(io(format!("creating {}", opts.root.display())))?;
        // The server changes into its data directory: every path it is given must be absolute.
        let root =
            std::fs::canonicalize(&opts.root).map_err(io(format!("resolving {}", opts.root.display())))?;
        let opts = LocalPostgresOptions { root, ..opts };
        let data = opts.root.join("data");
        chown(&opts.root, owner)?;
        if !data.join("PG_VERSION").exists() {
            let out = command(&bin.join("initdb"), owner)
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"])
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(io("running initdb"))?;
            if !out.status.success() {
                return Err(LocalPostgresError::Initdb(String::from_utf8_lossy(&out.stderr).into_owned()));
            }
        }
        let mut hba = String::from("local all all trust\n");
        for line in &opts.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str("host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n");
        std::fs::write(data.join("pg_hba.conf"), hba).map_err(io("writing pg_hba.conf"))?;
        chown(&data.join("pg_hba.conf"), owner)?;

        let mut last_err = None;
        for _ in 0..5 {
            let port = match opts.port {
                Some(p) => p,
                None => free_port()?,
            };
            match Self::launch(&bin, owner, &opts, port).await {
                Ok(child) => {
                    return Ok(LocalPostgres {
                        port,
                        root: opts.root.clone(),
                        bin,
                        owner,
                        remove_on_exit: opts.remove_on_exit,
                        child: Some(child),
                    });
                }
                Err(e) => last_err = Some(e),
            }
            if opts.port.is_some() {
                break;
            }
        }
        Err(last_err.unwrap_or(LocalPostgresError::NoBinaries))
    }

    async fn launch(
        bin: &Path,
        owner: Option<(u32, u32)>,
        opts: &LocalPostgresOptions,
        port: u16,
    ) -> Result<Child, LocalPostgresError> {
        let data = opts.root.join("data");
        let log = opts.root.join("postgres.log");
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("port".into(), port.to_string()),
            ("unix_socket_directories".into(), opts.root.display().to_string()),
            ("wal_level".into(), "logical".into()),
            ("max_replication_slots".into(), "160".into()),
            ("max_wal_senders".into(), "160".into()),
            ("max_connections".into(), "300".into()),
            ("fsync".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
            ("logging_collector".into(), "off".into()),
        ];
        settings.extend(opts.settings.iter().cloned());
        let mut args = String::new();
        for (k, v) in &settings {
            args.push_str(&format!(" -c {}", shell_quote(&format!("{k}={v}"))));
        }
        // The watchdog: stops the server when our end of its stdin closes (we exited or stopped it).
        // The watchdog: a reader stops the server when our end of its stdin closes (we exited or
        // stopped it; a restart first says "keep"). The script itself ends when the server does,
        // however that happens, so a server that fails at start is noticed at once. (A background
        // job's stdin is /dev/null unless redirected, hence fd 3.)
        let keep = opts.root.join(".keep");
        let script = format!(
            "exec 3<&0\n\
             {postgres} -D {data}{args} >>{log} 2>&1 &\n\
             pid=$!\n\
             trap 'kill -INT $pid 2>/dev/null' TERM INT\n\
             (read cmd <&3; [ \"$cmd\" = keep ] && touch {keep}; kill -INT $pid 2>/dev/null) &\n\
             reader=$!\n\
             wait $pid\n\
             kill $reader 2>/dev/null\n\
             if [ -e {keep} ]; then rm -f {keep}; else {cleanup}:; fi\n",
            postgres = shell_quote(&bin.join("postgres").display().to_string()),
            data = shell_quote(&data.display().to_string()),
            log = shell_quote(&log.display().to_string()),
            keep = shell_quote(&keep.display().to_string()),
            cleanup = if opts.remove_on_exit {
                format!("rm -rf {}; ", shell_quote(&opts.root.display().to_string()))
            } else {
                String::new()
            },
        );
        let mut child = command(Path::new("/bin/sh"), owner)
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(false)
            .spawn()
            .map_err(io("starting postgres"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return Err(LocalPostgresError::Exited {
                    reason: last_fatal(&log),
                    log: log.display().to_string(),
                });
            }
            if let Ok(c) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await {
                let _ = sqlx::Connection::close(c).await;
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(LocalPostgresError::NotReady { seconds: 30, log: log.display().to_string() });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable", self.port)
    }

    /// Stops the server (fast shutdown) and waits for it.
    pub async fn stop(mut self) {
        self.stop_inner().await;
    }

    async fn stop_inner(&mut self) {
        self.stop_watchdog(false).await;
    }

    /// Ends the watchdog (which stops the server); `keep` spares a throwaway directory.
    async fn stop_watchdog(&mut self, keep: bool) {
        if let Some(mut child) = self.child.take() {
            if let Some(mut stdin) = child.stdin.take() {
                if keep {
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut stdin, b"keep\n").await;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
        }
    }

    /// Stops the server (fast shutdown, which ends every connection) and starts it again on the
    /// same port and data.
    pub async fn restart(&mut self) -> Result<(), LocalPostgresError> {
        self.stop_watchdog(true).await;
        // Keep the directory across the restart: it is removed only when the cluster is dropped
        // or stopped for good.
        let opts = LocalPostgresOptions {
            port: Some(self.port),
            remove_on_exit: self.remove_on_exit,
            ..LocalPostgresOptions::new(self.root.clone())
        };
        let child = Self::launch(&self.bin, self.owner, &opts, self.port).await?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        // Closing stdin makes the watchdog stop the server.
        if let Some(child) = self.child.as_mut() {
            drop(child.stdin.take());
        }
    }
}

fn command(program: &Path, owner: Option<(u32, u32)>) -> Command {
    let mut c = Command::new(program);
    if let Some((uid, gid)) = owner {
        c.uid(uid).gid(gid);
        c.env("HOME", "/tmp");
    }
    c
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), LocalPostgresError> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(io(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// The last FATAL line of the server log, for the error message.
fn last_fatal(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|l| l.lines().rev().find(|l| l.contains("FATAL")).map(str::to_owned))
        .unwrap_or_else(|| "no FATAL line in the log".into())
}

fn free_port() -> Result<u16, LocalPostgresError> {
    unused_port().map_err(io("finding a free port"))
}

/// A TCP port on 127.0.0.1 that nothing listens on now (for a private server).
pub(crate) fn unused_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `s` quoted for `/bin/sh`.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The roles tokens name in a Supabase project — `anon`, `authenticated` and `service_role`
/// (which bypasses row-level security) — made if missing, with SELECT on the tables of schema
/// `public`, now and (for tables the current user creates later) by default. Used by private
/// clusters (`walcast dev`, tests, bench) so that tokens for these roles can read changes.
pub const API_ROLES_SQL: &str = "
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    END IF;
END
$roles$;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO anon, authenticated, service_role;
";
