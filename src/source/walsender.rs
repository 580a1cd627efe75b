//! The replication task: streams the slot, decodes pgoutput, keeps the relation cache, turns rows
//! into `Change`s and hands them to the fan-out in commit order, and reports the flush position.
//!
//! Owns: reconnection with capped, jittered backoff; deduplication of transactions re-sent after
//! a reconnect; acknowledgement. The flush position sent to Postgres is the end LSN of the last
//! commit the next stage acknowledged (or, when nothing is pending, the server's keepalive
//! position); never a position merely received. Must not: await a client socket (it awaits only
//! the bounded channel to the fan-out, which is the backpressure that bounds memory).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::change::{
    Change, ChangeEvent, ChangeKind, Column, DbBroadcast, Position, Relation, ReplicaIdentity,
};
use crate::locks;
use crate::replication::ack::Acknowledgement;
use crate::replication::lsn::Lsn;
use crate::replication::pgoutput::{self, Message, OldTuple, RelationBody};
use crate::replication::values::{CatalogError, TypeCatalog};
use crate::replication::wire::{
    now_pg_micros, ConnectParams, ReplicationConnection, ReplicationMessage, ReplicationStream, WireError,
};

/// Live facts about the stream, read by health, readiness and metrics.
#[derive(Debug, Default)]
pub struct ReplicationStatus {
    pub connected: AtomicBool,
    /// `connected`, observable: true from the start of a stream until it ends.
    pub live: tokio::sync::watch::Sender<bool>,
    /// Set once the walsender has sent a keepalive on this connection: it sends them when it has
    /// nothing more to send (or, under load, at least every half `wal_sender_timeout`).
    pub caught_up: AtomicBool,
    /// End of the last XLogData received.
    pub received_lsn: AtomicU64,
    /// The server's WAL end from the last keepalive.
    pub server_wal_end: AtomicU64,
    /// The flush position last sent to Postgres.
    pub flushed_lsn: AtomicU64,
    /// Commit time (Postgres micros) of the last transaction handed on.
    pub last_commit_ts: AtomicI64,
    pub changes_received: AtomicU64,
    /// Times a stream was started (1 + reconnects).
    pub connections: AtomicU64,
    /// In a cluster: the stream's count of changes through the last chunk this node read, and
    /// through the stream's end (polled); the difference is the node's lag in changes.
    pub stream_changes_read: AtomicU64,
    pub stream_changes_end: AtomicU64,
    /// Why the stream is not connected, for `/readyz`.
    pub last_error: Mutex<Option<String>>,
}

impl ReplicationStatus {
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        self.live.send_replace(connected);
    }

    pub fn set_error(&self, e: Option<String>) {
        *locks::lock(&self.last_error) = e;
    }

    pub fn error(&self) -> Option<String> {
        locks::lock(&self.last_error).clone()
    }

    pub fn lag_bytes(&self) -> u64 {
        self.server_wal_end.load(Ordering::Relaxed).saturating_sub(self.flushed_lsn.load(Ordering::Relaxed))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    #[error("resolving a column type")]
    Catalog(#[from] CatalogError),
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("the fan-out stage has stopped")]
    FanoutGone,
    #[error("reading the primary key of a relation")]
    PrimaryKey(#[source] sqlx::Error),
}

/// Everything the replication task needs.
pub struct ReplicationTask {
    pub params: ConnectParams,
    pub slot: String,
    pub publication: String,
    /// Ordinary SQL connection for catalog lookups.
    pub pool: PgPool,
    pub tx: mpsc::Sender<ChangeEvent>,
    /// End LSN of the last commit the next stage has finished with: what may be confirmed.
    pub ack: Acknowledgement,
    pub status: Arc<ReplicationStatus>,
    /// Commit LSN of the last transaction already kept (in the change log): transactions at or
    /// before it are not handed on again after a restart.
    pub resume_after: Lsn,
}

/// State that survives reconnects.
struct Progress {
    catalog: TypeCatalog,
    relations: HashMap<u32, Arc<Relation>>,
    /// Commit LSN of the last transaction handed on: transactions at or before it are skipped
    /// when the server sends them again after a reconnect.
    last_commit_lsn: Lsn,
    /// End LSN of the last commit handed on.
    last_commit_end: Lsn,
    /// A position known to hold nothing undelivered (from keepalives while idle).
    idle_flush: Lsn,
}

impl Progress {
    fn new(resume_after: Lsn) -> Self {
        Progress {
            catalog: TypeCatalog::default(),
            relations: HashMap::new(),
            last_commit_lsn: resume_after,
            last_commit_end: Lsn::ZERO,
            idle_flush: Lsn::ZERO,
        }
    }
}

const STATUS_INTERVAL: Duration = Duration::from_secs(10);
const STATUS_MIN_GAP: Duration = Duration::from_millis(200);

impl ReplicationTask {
    /// Streams until `shutdown`, reconnecting on errors.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut progress = Progress::new(self.resume_after);
        let mut attempt: u32 = 0;
        loop {
            let started = Instant::now();
            let result = self.stream_once(&mut progress, &shutdown).await;
            self.status.set_connected(false);
            self.status.caught_up.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => return,
                Err(StreamError::FanoutGone) => return,
                Err(e) => {
                    let msg = crate::errors::chain(&e);
                    tracing::warn!(error = %msg, "replication stream failed; reconnecting");
                    self.status.set_error(Some(msg));
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                attempt = 0;
            }
            attempt = attempt.saturating_add(1);
            let base =
                Duration::from_millis(100).saturating_mul(1 << attempt.min(9)).min(Duration::from_secs(30));
            let delay = base.mul_f64(0.5 + fastrand::f64() * 0.5);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn flush_position(&self, p: &Progress) -> Lsn {
        self.ack.get().max(p.idle_flush)
    }

    /// Streams once on a connection that already exists (one that created a temporary slot),
    /// without reconnecting: a temporary slot does not outlive its connection.
    pub async fn run_on(
        self,
        conn: ReplicationConnection,
        shutdown: CancellationToken,
    ) -> Result<(), StreamError> {
        let mut progress = Progress::new(self.resume_after);
        let r = self.stream_conn(&mut progress, conn, &shutdown).await;
        self.status.set_connected(false);
        r
    }

    async fn stream_once(&self, p: &mut Progress, shutdown: &CancellationToken) -> Result<(), StreamError> {
        let conn = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            c = ReplicationConnection::connect(&self.params) => c?,
        };
        self.stream_conn(p, conn, shutdown).await
    }

    async fn stream_conn(
        &self,
        p: &mut Progress,
        conn: ReplicationConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), StreamError> {
        let mut stream = conn.start_replication(&self.slot, Lsn::ZERO, &self.publication).await?;
        self.status.set_connected(true);
        self.status.connections.fetch_add(1, Ordering::Relaxed);
        self.status.set_error(None);
        tracing::info!(slot = %self.slot, publication = %self.publication, "replication stream started");

        let mut last_sent = Lsn(self.status.flushed_lsn.load(Ordering::Relaxed));
        let mut last_sent_at = Instant::now();
        let mut tick = tokio::time::interval(STATUS_MIN_GAP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut txn: Option<Txn> = None;
        loop {
            let msg = tokio::select! {
                biased;
                // Shutdown first: send the final status update and leave.
                _ = shutdown.cancelled() => {
                    let flush = self.flush_position(p);
                    self.status.flushed_lsn.store(flush.0, Ordering::Relaxed);
                    let _ = stream.finish(flush).await;
                    return Ok(());
                }
                // Then the stream itself: the server is waiting on us.
                m = stream.next() => m?,
                // Then periodic status updates.
                _ = tick.tick() => {
                    let flush = self.flush_position(p);
                    if (flush != last_sent && last_sent_at.elapsed() >= STATUS_MIN_GAP)
                        || last_sent_at.elapsed() >= STATUS_INTERVAL
                    {
                        self.send_status(&mut stream, flush, false).await?;
                        last_sent = flush;
                        last_sent_at = Instant::now();
                    }
                    continue;
                }
            };
            match msg {
                ReplicationMessage::XLogData { wal_end, data, .. } => {
                    self.status.received_lsn.fetch_max(wal_end.0, Ordering::Relaxed);
                    self.handle(p, &mut txn, pgoutput::decode(data)?).await?;
                }
                ReplicationMessage::Keepalive { wal_end, reply_requested, .. } => {
                    self.status.server_wal_end.store(wal_end.0, Ordering::Relaxed);
                    self.status.caught_up.store(true, Ordering::Relaxed);
                    // Nothing open and everything handed on has been dispatched: all WAL up to
                    // the server's position is either delivered or not ours, so it may be confirmed.
                    let idle = txn.is_none() && self.ack.get() >= p.last_commit_end;
                    if idle {
                        p.idle_flush = p.idle_flush.max(wal_end);
                    }
                    if reply_requested {
                        let flush = self.flush_position(p);
                        self.send_status(&mut stream, flush, false).await?;
                        last_sent = flush;
                        last_sent_at = Instant::now();
                    }
                }
            }
        }
    }

    async fn send_status(
        &self,
        stream: &mut ReplicationStream,
        flush: Lsn,
        reply: bool,
    ) -> Result<(), WireError> {
        let received = Lsn(self.status.received_lsn.load(Ordering::Relaxed)).max(flush);
        stream.send_status(received, flush, flush, reply).await?;
        self.status.flushed_lsn.store(flush.0, Ordering::Relaxed);
        Ok(())
    }

    async fn send(&self, event: ChangeEvent) -> Result<(), StreamError> {
        self.tx.send(event).await.map_err(|_| StreamError::FanoutGone)
    }

    async fn handle(&self, p: &mut Progress, txn: &mut Option<Txn>, msg: Message) -> Result<(), StreamError> {
        match msg {
            Message::Begin(b) => {
                *txn = Some(Txn {
                    commit_lsn: b.final_lsn,
                    commit_ts: b.commit_ts,
                    seq: 0,
                    xid: b.xid,
                    skip: b.final_lsn <= p.last_commit_lsn,
                });
            }
            Message::Commit(c) => {
                let skip = txn.take().is_some_and(|t| t.skip);
                if !skip {
                    self.send(ChangeEvent::Commit { commit_lsn: c.commit_lsn, end_lsn: c.end_lsn }).await?;
                    p.last_commit_lsn = c.commit_lsn;
                    p.last_commit_end = c.end_lsn;
                    self.status.last_commit_ts.store(c.commit_ts, Ordering::Relaxed);
                }
            }
            Message::Relation(body) => {
                let rel = self.relation(p, body).await?;
                p.relations.insert(rel.id, rel);
            }
            Message::Type { oid, .. } => p.catalog.forget(oid),
            Message::Insert { relation_id, new } => {
                self.change(p, txn, relation_id, ChangeKind::Insert, Some(new), None).await?
            }
            Message::Update { relation_id, old, new } => {
                self.change(p, txn, relation_id, ChangeKind::Update, Some(new), old).await?
            }
            Message::Delete { relation_id, old } => {
                self.change(p, txn, relation_id, ChangeKind::Delete, None, Some(old)).await?
            }
            Message::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    self.change(p, txn, id, ChangeKind::Truncate, None, None).await?;
                }
            }
            Message::Message(m) if m.transactional && m.prefix == DbBroadcast::PREFIX => {
                let Some(t) = txn.as_mut() else { return Ok(()) };
                if t.skip {
                    return Ok(());
                }
                let position = Position { lsn: t.commit_lsn, seq: t.seq };
                t.seq += 1;
                match DbBroadcast::decode(&m.content) {
                    Ok(mut b) => {
                        b.position = position;
                        self.send(ChangeEvent::Broadcast(b)).await?
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, lsn = %m.lsn, "skipping a malformed database broadcast")
                    }
                }
            }
            Message::Origin { .. } | Message::Message(_) => {}
        }
        Ok(())
    }

    async fn change(
        &self,
        p: &mut Progress,
        txn: &mut Option<Txn>,
        relation_id: u32,
        kind: ChangeKind,
        new: Option<pgoutput::Tuple>,
        old: Option<OldTuple>,
    ) -> Result<(), StreamError> {
        let Some(t) = txn.as_mut() else {
            return Err(WireError::from(crate::replication::wire::Violation::OutsideTransaction {
                after: p.last_commit_end,
            })
            .into());
        };
        if t.skip {
            return Ok(());
        }
        let relation = p.relations.get(&relation_id).ok_or(StreamError::UnknownRelation(relation_id))?;
        let change = Change {
            relation: Arc::clone(relation),
            kind,
            new,
            old: old.map(|o| match o {
                OldTuple::Key(t) | OldTuple::Full(t) => t,
            }),
            commit_lsn: t.commit_lsn,
            commit_ts: t.commit_ts,
            seq: t.seq,
            xid: t.xid,
            snapshot: false,
        };
        t.seq += 1;
        self.status.changes_received.fetch_add(1, Ordering::Relaxed);
        self.send(ChangeEvent::Change(change)).await
    }

    async fn relation(&self, p: &mut Progress, body: RelationBody) -> Result<Arc<Relation>, StreamError> {
        let primary_key: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::oid AND i.indisprimary",
        )
        .bind(body.id as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(StreamError::PrimaryKey)?;
        let mut columns = Vec::with_capacity(body.columns.len());
        for c in &body.columns {
            let ty = p.catalog.resolve(&self.pool, c.type_oid).await?;
            columns.push(Column {
                name: c.name.as_str().into(),
                ty,
                is_key: c.is_key,
                in_primary_key: primary_key.contains(&c.name),
            });
        }
        Ok(Arc::new(Relation::new(
            body.id,
            &body.namespace,
            &body.name,
            ReplicaIdentity::from_byte(body.replica_identity),
            columns,
        )))
    }
}

struct Txn {
    commit_lsn: Lsn,
    commit_ts: i64,
    seq: u32,
    xid: u32,
    /// Already handed on before a reconnect.
    skip: bool,
}

/// Seconds between now and the last commit handed on, or 0 when caught up.
pub fn lag_seconds(status: &ReplicationStatus) -> f64 {
    if status.caught_up.load(Ordering::Relaxed) && status.lag_bytes() == 0 {
        return 0.0;
    }
    let ts = status.last_commit_ts.load(Ordering::Relaxed);
    if ts == 0 {
        return 0.0;
    }
    ((now_pg_micros() - ts).max(0) as f64) / 1e6
}
