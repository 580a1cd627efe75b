//! Holding the slot lease over time: a task that takes the lease when it can, renews it every
//! third of its length, and says through a watch whether this node may act as the slot's owner
//! right now.
//!
//! The watch turns false before the lease's validity ends (`Held::valid`), whatever a renewal
//! is doing: a renewal is given only the time the lease has left. On shutdown the watch turns
//! false first, then the lease is released so another node takes it at once.
//!
//! `serve_slot` is the owner's work, one term per stretch of ownership: end a previous owner's
//! walsender session, stream the slot, publish, trim. Must not: run a term while the watch is
//! false, or confirm to Postgres what the stream has not stored.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cluster::lease::{Held, Lease, RenewError};
use crate::cluster::publish::publish;
use crate::cluster::stream::{ChangeStream, StreamError};
use crate::locks;
use crate::replication::ack::Acknowledgement;
use crate::replication::lsn::Lsn;
use crate::replication::wire::ConnectParams;
use crate::source::walsender::{ReplicationStatus, ReplicationTask};

/// Whether this node owns the slot: a watch of changes, and the instant (monotonic, so it runs
/// on while the process is paused) until which the last successful write lets it act.
#[derive(Clone)]
pub struct Ownership {
    changes: watch::Receiver<bool>,
    until: Arc<Mutex<Option<Instant>>>,
}

impl Ownership {
    /// Whether this node may act as the owner at this instant. A watch may be stale after the
    /// process was paused; this is not.
    pub fn now(&self) -> bool {
        locks::lock(&self.until).is_some_and(|until| Instant::now() < until)
    }

    /// What the watch says (for display; act on `now`).
    pub fn seen(&self) -> bool {
        *self.changes.borrow()
    }

    /// Waits until the watch says `owner`; an error once the holding task has ended.
    pub async fn wait_for(&mut self, owner: bool) -> Result<(), watch::error::RecvError> {
        self.changes.wait_for(|o| *o == owner).await.map(|_| ())
    }
}

/// Starts holding `lease` until `shutdown`.
pub fn hold(lease: Lease, shutdown: CancellationToken) -> (Ownership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let until = Arc::new(Mutex::new(None));
    let ownership = Ownership { changes: rx, until: Arc::clone(&until) };
    let task = tokio::spawn(async move { run(lease, (tx, until), shutdown).await });
    (ownership, task)
}

async fn run(
    lease: Lease,
    (owner, until): (watch::Sender<bool>, Arc<Mutex<Option<Instant>>>),
    shutdown: CancellationToken,
) {
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
        *locks::lock(&until) = held.map(|h| Instant::now() + h.time_left(ttl));
        owner.send_if_modified(|o| std::mem::replace(o, held.is_some()) != held.is_some());
    }
    *locks::lock(&until) = None;
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

/// What the owner needs to stream the slot into the stream, term after term.
pub struct SlotWork {
    pub stream: ChangeStream,
    pub params: ConnectParams,
    pub slot: String,
    pub publication: String,
    pub pool: PgPool,
    /// What may be confirmed to Postgres (kept at the lower of `published` and this node's
    /// log by the caller).
    pub confirm: Acknowledgement,
    /// Advanced past each chunk JetStream stored.
    pub published: Acknowledgement,
    /// The walsender's own status, while this node owns the slot.
    pub status: Arc<ReplicationStatus>,
    /// How long the stream keeps chunks (the owner trims it).
    pub retention: Duration,
}

/// Why an owner's term ended early.
#[derive(Debug, thiserror::Error)]
pub enum TermError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("ending the slot's previous walsender session")]
    Takeover(#[source] sqlx::Error),
}

/// Streams the slot into the stream during every term of ownership, until `shutdown`. A term
/// starts when `ownership` turns true (the previous owner's walsender session, if still
/// attached, is ended first) and ends when it turns false or an append fails (fenced by a newer
/// owner, or NATS away): the walsender stops, nothing more is confirmed, and a term starts again
/// while this node still owns the slot.
pub async fn serve_slot(mut ownership: Ownership, work: SlotWork, shutdown: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            owner = ownership.wait_for(true) => if owner.is_err() { return },
        }
        tracing::info!(slot = %work.slot, "this node owns the slot: streaming it into the cluster");
        let term = shutdown.child_token();
        match work.term(&mut ownership, &term).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %crate::errors::chain(&e), "slot owner: the term ended");
            }
        }
        term.cancel();
        if failures > 0 {
            let pause = Duration::from_millis(200).saturating_mul(1 << failures.min(5));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

impl SlotWork {
    async fn term(&self, ownership: &mut Ownership, term: &CancellationToken) -> Result<(), TermError> {
        // Acting on a stale watch (this process was paused past its lease) would end the
        // real owner's session: only with time left on the lease, by the monotonic clock.
        if !ownership.now() {
            return Ok(());
        }
        end_other_sessions(&self.pool, &self.slot).await.map_err(TermError::Takeover)?;
        let start = self.stream.tail().await?;
        let (tx, rx) = mpsc::channel(8192);
        let walsender = tokio::spawn(
            ReplicationTask {
                params: self.params.clone(),
                slot: self.slot.clone(),
                publication: self.publication.clone(),
                pool: self.pool.clone(),
                tx,
                ack: self.confirm.clone(),
                status: Arc::clone(&self.status),
                // The publishing loop skips what the stream holds; the slot replays from its
                // confirmed position, which is never past it.
                resume_after: Lsn::ZERO,
            }
            .run(term.clone()),
        );
        // Every append asks the clock again: a watch may be stale after a pause.
        let guard = ownership.clone();
        let may_append = move || guard.now();
        let result = tokio::select! {
            r = publish(&self.stream, start, rx, &self.published, &may_append) => r.map_err(TermError::from),
            _ = ownership.wait_for(false) => {
                tracing::warn!(slot = %self.slot, "this node no longer owns the slot: stopping its walsender");
                Ok(())
            }
            _ = self.trim_while(term) => Ok(()),
        };
        term.cancel();
        let _ = walsender.await;
        result
    }

    /// Trims the stream by age every minute until `term` ends.
    async fn trim_while(&self, term: &CancellationToken) {
        loop {
            match self.stream.trim(self.retention).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(chunks = n, "trimmed the cluster stream"),
                Err(e) => tracing::warn!(error = %crate::errors::chain(&e), "trimming the cluster stream"),
            }
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        }
    }
}

/// Ends any walsender session still attached to `slot` (a previous owner that lost its lease
/// but not its connection) and waits up to 10 s for the slot to be free.
async fn end_other_sessions(pool: &PgPool, slot: &str) -> Result<(), sqlx::Error> {
    let ended: Vec<(Option<bool>,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
         WHERE slot_name = $1 AND active_pid IS NOT NULL",
    )
    .bind(slot)
    .fetch_all(pool)
    .await?;
    if ended.is_empty() {
        return Ok(());
    }
    tracing::warn!(slot, "ended the previous owner's walsender session");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let active: Option<(bool,)> =
            sqlx::query_as("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(pool)
                .await?;
        if !active.is_some_and(|(a,)| a) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
