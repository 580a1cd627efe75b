//! Accepting and serving HTTP connections with limits on what a client may hold: a global cap on
//! open connections and an optional one per IP address (refusals answered 503 and counted), a
//! deadline for a request's headers (slowloris), a deadline for a connection that sends nothing
//! at all, and a deadline on every write (a client that stops reading is disconnected, on every
//! transport: HTTP bodies, event streams, long-polls and upgraded WebSockets).
//!
//! Owns: the accept loop, the connection counts, the IO wrapper that enforces the deadlines, and
//! the HTTP/1 connection settings. Must not: know routes or protocols (that is the router's).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What one client may hold and how long it may make the server wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections in all (HTTP, event streams, WebSockets).
    pub max_connections: usize,
    /// Open connections from one IP address; 0: no limit.
    pub max_per_ip: usize,
    /// A request's headers must arrive within this; a connection that sends nothing at all is
    /// closed after it too.
    pub header_read_timeout: Duration,
    /// A write that cannot complete for this long (the client stopped reading) closes the
    /// connection.
    pub write_timeout: Duration,
}

impl ConnectionLimits {
    /// The listener's limits from the configuration.
    pub fn from_config(c: &crate::config::Config) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: c.max_connections,
            max_per_ip: c.max_connections_per_ip,
            header_read_timeout: Duration::from_secs(c.header_read_timeout_secs),
            write_timeout: Duration::from_secs(c.write_timeout_secs),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: AtomicU64,
    /// Refused: `max_connections` reached.
    pub refused_total: AtomicU64,
    /// Refused: `max_per_ip` reached.
    pub refused_per_ip: AtomicU64,
    /// Closed because a write could not complete within `write_timeout`.
    pub write_timeouts: AtomicU64,
    /// Closed because nothing arrived within `header_read_timeout` of accepting them.
    pub silent_closed: AtomicU64,
    /// WebSocket upgrades refused for their `Origin`.
    pub origin_refused: AtomicU64,
    /// The gateway's recorder, for refusals by reason.
    pub telemetry: crate::telemetry::Telemetry,
}

/// Open connections, in all and by address.
#[derive(Debug)]
struct Counts {
    limits: ConnectionLimits,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<ConnectionMetrics>,
}

/// One admitted connection's place in the counts; given back when dropped.
#[derive(Debug)]
struct Admitted {
    counts: Arc<Counts>,
    ip: IpAddr,
}

impl Counts {
    /// Admits a connection from `ip`, or says which limit refuses it.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, &'static str> {
        let m = &self.metrics;
        if m.open.load(Ordering::Relaxed) >= self.limits.max_connections as u64 {
            m.refused_total.fetch_add(1, Ordering::Relaxed);
            m.telemetry.refused("max_connections");
            return Err("too many connections");
        }
        if self.limits.max_per_ip > 0 {
            let mut by_ip = crate::locks::lock(&self.by_ip);
            let n = by_ip.entry(ip).or_insert(0);
            if *n >= self.limits.max_per_ip {
                m.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                m.telemetry.refused("max_connections_per_ip");
                return Err("too many connections from this address");
            }
            *n += 1;
        }
        m.open.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted { counts: Arc::clone(self), ip })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.counts.metrics.open.fetch_sub(1, Ordering::Relaxed);
        if self.counts.limits.max_per_ip > 0 {
            let mut by_ip = crate::locks::lock(&self.counts.by_ip);
            if let Some(n) = by_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    by_ip.remove(&self.ip);
                }
            }
        }
    }
}

/// A connection with deadlines: on its writes, and on its first byte.
struct Guarded {
    tcp: TcpStream,
    limits: ConnectionLimits,
    metrics: Arc<ConnectionMetrics>,
    /// Armed while a write waits for the client to read.
    write_stall: Option<Pin<Box<Sleep>>>,
    /// Armed until the first byte arrives.
    first_byte: Option<Pin<Box<Sleep>>>,
    _admitted: Admitted,
}

impl Guarded {
    /// A pending write: arms the deadline, and fails once it has passed.
    fn stalled(&mut self, cx: &mut Context<'_>) -> io::Error {
        let timeout = self.limits.write_timeout;
        let stall = self.write_stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.metrics.write_timeouts.fetch_add(1, Ordering::Relaxed);
                io::Error::new(io::ErrorKind::TimedOut, "the client did not read within the write timeout")
            }
            Poll::Pending => io::Error::from(io::ErrorKind::WouldBlock),
        }
    }

    fn guard_write<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => {
                let e = self.stalled(cx);
                if e.kind() == io::ErrorKind::TimedOut {
                    Poll::Ready(Err(e))
                } else {
                    Poll::Pending
                }
            }
            ready => {
                self.write_stall = None;
                ready
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if this.first_byte.is_some() {
            match &r {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_byte = None,
                Poll::Pending => {
                    if let Some(deadline) = this.first_byte.as_mut() {
                        if deadline.as_mut().poll(cx).is_ready() {
                            this.metrics.silent_closed.fetch_add(1, Ordering::Relaxed);
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "nothing arrived within the header read timeout",
                            )));
                        }
                    }
                }
                _ => {}
            }
        }
        r
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.guard_write(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.guard_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.tcp).poll_flush(cx);
        self.guard_write(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.tcp).poll_shutdown(cx);
        self.guard_write(cx, r)
    }
}

/// The answer to a connection over a limit, written without waiting (best effort) before it is
/// closed.
fn refusal(reason: &str) -> Vec<u8> {
    let body = format!("{{\"error\":\"{reason}\"}}");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nretry-after: 5\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting, lets each connection
/// finish its request in progress (upgraded WebSockets and event streams end on the same
/// token), and returns once they are done.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: Arc<ConnectionMetrics>,
    shutdown: CancellationToken,
) {
    let counts =
        Arc::new(Counts { limits, by_ip: Mutex::new(HashMap::new()), metrics: Arc::clone(&metrics) });
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admitted = match counts.admit(peer.ip()) {
            Ok(a) => a,
            Err(reason) => {
                let _ = tcp.try_write(&refusal(reason));
                tracing::debug!(reason, "connection refused");
                continue;
            }
        };
        // Frames are small and written as soon as they are queued: without TCP_NODELAY the
        // kernel holds a frame back until the previous one is acknowledged, and a client that
        // delays its acknowledgements (it has nothing to send) adds up to 40 ms to a delivery.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        let io = Guarded {
            tcp,
            limits,
            metrics: Arc::clone(&metrics),
            write_stall: None,
            first_byte: Some(Box::pin(tokio::time::sleep(limits.header_read_timeout))),
            _admitted: admitted,
        };
        connections.spawn(serve_connection(io, app.clone(), limits, peer, shutdown.clone()));
    }
    connections.close();
    connections.wait().await;
}

async fn serve_connection(
    io: Guarded,
    app: Router,
    limits: ConnectionLimits,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let service = TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        }
    }
}
