//! `LocalNats`: a private `nats-server` with JetStream, from the binary on PATH, for
//! `walcast dev --nodes`, the tests and the cluster benchmark.
//!
//! Owns: starting the server on a free port with its store in a directory of its own, waiting
//! until it answers, stopping and restarting it on the same port and store. The server runs under
//! a small shell watchdog that stops it when this process goes away, as `local_postgres` does.
//! Must not: touch the gateway.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::local_postgres::{shell_quote, unused_port};

#[derive(Debug, thiserror::Error)]
pub enum LocalNatsError {
    #[error(
        "no `nats-server` on PATH; install it (Debian: `apt-get install -y nats-server`) or point \
         `cluster.nats_url` at a running server with JetStream"
    )]
    NoBinary,
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nats-server stopped while starting (see {log})")]
    Exited { log: String },
    #[error("nats-server did not answer within {seconds} s; see {log}")]
    NotReady { seconds: u64, log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalNatsError {
    let what = what.into();
    move |source| LocalNatsError::Io { what, source }
}

/// The `nats-server` binary on PATH.
pub fn find_binary() -> Result<PathBuf, LocalNatsError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    // Debian installs it in /usr/sbin, which is not on every user's PATH.
    dirs.push("/usr/sbin".into());
    dirs.into_iter().map(|d| d.join("nats-server")).find(|p| p.is_file()).ok_or(LocalNatsError::NoBinary)
}

/// A running private `nats-server`.
#[derive(Debug)]
pub struct LocalNats {
    pub port: u16,
    root: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl LocalNats {
    /// Starts a server with JetStream, its store and log under `root`, on a free port.
    pub async fn start(root: impl Into<PathBuf>) -> Result<LocalNats, LocalNatsError> {
        let bin = find_binary()?;
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
        let root = std::fs::canonicalize(&root).map_err(io(format!("resolving {}", root.display())))?;
        let mut last = None;
        for _ in 0..5 {
            let port = unused_port().map_err(io("finding a free port"))?;
            match launch(&bin, &root, port).await {
                Ok(child) => return Ok(LocalNats { port, root, bin, child: Some(child) }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(LocalNatsError::NoBinary))
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (its clients see the connection drop) and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
        }
    }

    /// Stops the server and starts it again on the same port and store.
    pub async fn restart(&mut self) -> Result<(), LocalNatsError> {
        self.stop().await;
        self.child = Some(launch(&self.bin, &self.root, self.port).await?);
        Ok(())
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        // Closing stdin makes the watchdog stop the server.
        if let Some(child) = self.child.as_mut() {
            drop(child.stdin.take());
        }
    }
}

async fn launch(bin: &Path, root: &Path, port: u16) -> Result<Child, LocalNatsError> {
    let log = root.join("nats-server.log");
    // The watchdog: stops the server when our end of its stdin closes; ends when it does.
    let script = format!(
        "exec 3<&0\n\
         {bin} -a 127.0.0.1 -p {port} -js -sd {store} >>{log} 2>&1 &\n\
         pid=$!\n\
         trap 'kill -TERM $pid 2>/dev/null' TERM INT\n\
         (read cmd <&3; kill -TERM $pid 2>/dev/null) &\n\
         reader=$!\n\
         wait $pid\n\
         kill $reader 2>/dev/null\n",
        bin = shell_quote(&bin.display().to_string()),
        store = shell_quote(&root.join("store").display().to_string()),
        log = shell_quote(&log.display().to_string()),
    );
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(false)
        .spawn()
        .map_err(io("starting nats-server"))?;
    let log = log.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Err(LocalNatsError::Exited { log });
        }
        if answers(port).await {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(LocalNatsError::NotReady { seconds: 20, log });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a NATS server answers on `port` (it greets every connection with `INFO`).
async fn answers(port: u16) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(("127.0.0.1", port)))
            .await
    else {
        return false;
    };
    let mut buf = [0u8; 4];
    matches!(tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await, Ok(Ok(_)))
        && &buf == b"INFO"
}
