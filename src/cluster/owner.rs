//! Holding the slot lease over time: a task that takes the lease when it can, renews it every
//! third of its length, and says through a watch whether this node may act as the slot's owner
//! right now.
//!
//! The watch turns false before the lease's validity ends (`Held::valid`), whatever a renewal
//! is doing: a renewal is given only the time the lease has left. On shutdown the watch turns
//! false first, then the lease is released so another node takes it at once.
//! Must not: stream the slot or append (the owner's tasks do, only while the watch is true).

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::lease::{Held, Lease, RenewError};

/// Whether this node owns the slot now. Dropped (the task ended): it does not.
pub type Ownership = watch::Receiver<bool>;

/// Starts holding `lease` until `shutdown`.
pub fn hold(lease: Lease, shutdown: CancellationToken) -> (Ownership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move { run(lease, tx, shutdown).await });
    (rx, task)
}

async fn run(lease: Lease, owner: watch::Sender<bool>, shutdown: CancellationToken) {
    let ttl = lease.ttl();
    let mut held: Option<Held> = None;
    let mut seen = None;
    loop {
        let pause = if held.is_some() { ttl / 3 } else { ttl / 5 };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
        held = match held {
            None => match lease.try_take(&mut seen).await {
                Ok(taken) => taken,
                Err(e) => {
                    tracing::warn!(error = %crate::errors::chain(&e), "slot lease: could not ask; trying again");
                    None
                }
            },
            Some(h) => renew(&lease, h, ttl).await,
        };
        owner.send_if_modified(|o| std::mem::replace(o, held.is_some()) != held.is_some());
    }
    owner.send_replace(false);
    if let Some(h) = held {
        if let Err(e) = lease.release(h).await {
            tracing::warn!(error = %crate::errors::chain(&e), "slot lease: not released; it lapses instead");
        }
    }
}

/// One renewal, given only the time the lease has left; `None` once the lease is gone or has
/// run out.
async fn renew(lease: &Lease, mut held: Held, ttl: Duration) -> Option<Held> {
    let left = held.time_left(ttl);
    match tokio::time::timeout(left, lease.renew(&mut held)).await {
        Ok(Ok(())) => Some(held),
        Ok(Err(RenewError::Lost)) => {
            tracing::warn!("slot lease: taken by another node; this node no longer owns the slot");
            None
        }
        Ok(Err(RenewError::Unreachable(e))) => {
            tracing::warn!(error = %crate::errors::chain(&e), "slot lease: renewal failed");
            held.valid(ttl).then_some(held)
        }
        Err(_) => {
            tracing::warn!("slot lease: no renewal before it ran out; this node no longer owns the slot");
            None
        }
    }
}
