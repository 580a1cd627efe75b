//! Every node's source of events in a cluster: the stream, read after the last position of the
//! node's own log and handed to its dispatcher, exactly as the walsender task does on a single
//! node; across NATS outages it waits and reads on from where it stopped.
//!
//! Also the node's readiness: consuming, and caught up with the stream's end (polled each
//! second), reported through the same `ReplicationStatus` a single node's `/readyz` reads.
//! Must not: append, acknowledge the slot, or decide anything about clients.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::{ChangeEvent, Position};
use crate::cluster::consume::consume;
use crate::cluster::stream::{ChangeStream, StreamError};
use crate::source::walsender::ReplicationStatus;

/// Hands the stream's events after `after` to `events` until `shutdown` or until the receiver
/// is gone; `status` tells whether the node is consuming.
pub async fn follow(
    stream: ChangeStream,
    mut after: Position,
    events: mpsc::Sender<ChangeEvent>,
    status: Arc<ReplicationStatus>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        status.set_connected(true);
        status.connections.fetch_add(1, Ordering::Relaxed);
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            (last, result) = consume(&stream, after, &events, &status) => {
                if last > after {
                    failures = 0;
                }
                after = last;
                result
            }
        };
        status.set_connected(false);
        status.caught_up.store(false, Ordering::Relaxed);
        let e = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        let message = crate::errors::chain(&e);
        if matches!(e, StreamError::Behind { .. }) {
            tracing::error!(error = %message, "cluster stream: this node fell behind its retention; restart it to start its log afresh");
        } else {
            tracing::warn!(error = %message, "cluster stream: reading stopped; reading on");
        }
        status.set_error(Some(message));
        failures = failures.saturating_add(1);
        let pause = Duration::from_millis(100).saturating_mul(1 << failures.min(5));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Once a second until `shutdown`: the stream's end against what this node's log has written,
/// into `status` (`caught_up`, and the LSNs lag is computed from).
pub async fn watch_lag(
    stream: ChangeStream,
    written: watch::Receiver<Position>,
    status: Arc<ReplicationStatus>,
    shutdown: CancellationToken,
) {
    loop {
        match stream.tail().await {
            Ok(tail) => {
                let mine = *written.borrow();
                let end = tail.through.unwrap_or(Position::ZERO);
                status.stream_changes_end.store(tail.changes, Ordering::Relaxed);
                status.server_wal_end.store(end.lsn.0.max(mine.lsn.0), Ordering::Relaxed);
                status.received_lsn.store(mine.lsn.0, Ordering::Relaxed);
                status.flushed_lsn.store(mine.lsn.0, Ordering::Relaxed);
                let caught_up = status.connected.load(Ordering::Relaxed) && mine >= end;
                status.caught_up.store(caught_up, Ordering::Relaxed);
                if caught_up {
                    status.set_error(None);
                }
            }
            Err(e) => {
                status.caught_up.store(false, Ordering::Relaxed);
                status.set_error(Some(crate::errors::chain(&e)));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
