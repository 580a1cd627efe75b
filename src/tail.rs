//! `walcast tail`: streams decoded changes as JSON lines on stdout through a temporary slot of its
//! own (never the gateway's), on the configured publication.
//! Must not: confirm anything on, or otherwise touch, the gateway's slot.

use std::io::Write;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::change::{ChangeEvent, ChangeKind};
use crate::config::Config;
use crate::replication::ack::Acknowledgement;
use crate::replication::slot;
use crate::replication::wire::{ConnectParams, ReplicationConnection, SnapshotAction};
use crate::source::walsender::{ReplicationStatus, ReplicationTask};

#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    /// `schema.table` names to show; empty shows all.
    pub tables: Vec<String>,
    /// Change kinds to show; empty shows all.
    pub events: Vec<ChangeKind>,
}

/// Runs until `shutdown`, writing one JSON line per change to `out`.
pub async fn run(
    config: &Config,
    opts: TailOptions,
    mut out: impl Write + Send,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let url = config.database_url()?.to_owned();
    let pool = crate::connect_pool(&url).await?;
    slot::migrate(&url).await?;
    slot::ensure_publication(&pool, &config.publication, &config.tables).await?;
    let mut params = ConnectParams::from_url(&url)?;
    params.application_name = "walcast tail".into();
    // A temporary slot lives as long as the connection that created it, so the stream must use
    // that same connection: create it, then start streaming on it.
    let slot_name = format!("walcast_tail_{}", std::process::id());
    let mut conn = ReplicationConnection::connect(&params).await?;
    conn.create_slot(&slot_name, true, SnapshotAction::NoExport).await?;
    let (tx, mut rx) = mpsc::channel(1024);
    let ack = Acknowledgement::new();
    let task = ReplicationTask {
        resume_after: crate::replication::lsn::Lsn::ZERO,
        params,
        slot: slot_name,
        publication: config.publication.clone(),
        pool,
        tx,
        ack: ack.clone(),
        status: Arc::new(ReplicationStatus::default()),
    };
    let stream_shutdown = shutdown.clone();
    let handle = tokio::spawn(async move { task.run_on(conn, stream_shutdown).await });
    loop {
        let ev = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            ev = rx.recv() => match ev { Some(ev) => ev, None => break },
        };
        match ev {
            ChangeEvent::Change(c) => {
                let name = format!("{}.{}", c.relation.schema, c.relation.table);
                if (!opts.tables.is_empty() && !opts.tables.contains(&name))
                    || (!opts.events.is_empty() && !opts.events.contains(&c.kind))
                {
                    continue;
                }
                let mut line = c.to_tail_json();
                line.push(b'\n');
                out.write_all(&line)?;
                out.flush()?;
            }
            // Written out: safe to forget.
            ChangeEvent::Commit { end_lsn, .. } => ack.advance(end_lsn),
            ChangeEvent::Broadcast(_) => {}
        }
    }
    shutdown.cancel();
    handle.await??;
    Ok(())
}
