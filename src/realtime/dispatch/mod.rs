//! The dispatcher task: takes replication events in commit order, matches each change against
//! the index, applies row-level security, renders `data` once per distinct view (select, hidden
//! columns, withheld old record), encodes it once per (encoding, topic, ids, view) — or, for an
//! encoding with a change envelope, its body once per (encoding, ids, view) whatever the topic —
//! and queues the shared bytes to each member without waiting; relays database broadcasts to
//! their channels; and advances the acknowledgement after each commit.
//!
//! A change whose subscribers need no row check (authentication off, tables without row-level
//! security, cached answers) is delivered at once. Otherwise it starts a batch: the events that
//! are already waiting join it (in order), rows are checked with one query per table for every
//! distinct subject among the matching subscribers, and then the batch is delivered in order.
//! A check runs as a task of its own: while it waits for the database, the events that arrive
//! are matched into the next batch, and the batch checked before it is delivered.
//! The acknowledgement passes a commit only after all its changes are delivered or withheld.

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::rls::Lane;
use crate::change::ChangeEvent;
use crate::log::Appender;
use crate::realtime::dispatch::batch::Batch;
use crate::realtime::dispatch::live::{dispatch, publish};
use crate::realtime::dispatch::render::Scratch;
use crate::realtime::hub::Hub;
use crate::replication::ack::Acknowledgement;

pub mod batch;
pub mod decision;
pub mod group;
pub mod keys;
pub mod live;
pub mod render;
pub mod replay;

/// Events gathered into one batch at most.
const MAX_BATCH: usize = 4096;

/// Batches whose rows are being checked at once, each on its own connection. More than one
/// made batches smaller and the database's work per change larger, for no lower latency
/// (measured with `walcast bench rls` on two cores).
const CHECKS_IN_FLIGHT: usize = 1;

/// Runs until the replication side closes the channel or `shutdown` fires.
///
/// A batch's rows are checked while the events that arrive meanwhile are matched into the next
/// batch, whose check starts as soon as fewer than `CHECKS_IN_FLIGHT` run; batches are
/// delivered in order, each once its own check and every earlier batch are done.
pub async fn run_dispatcher(
    hub: Hub,
    mut rx: mpsc::Receiver<ChangeEvent>,
    ack: Acknowledgement,
    mut log: Option<Appender>,
    shutdown: CancellationToken,
) {
    let hub = &hub;
    let mut scratch = Scratch::default();
    let mut batch = Batch::default();
    let mut checking = FuturesOrdered::new();
    let mut closed = false;
    let mut checked: Option<Batch> = None;
    loop {
        // The next batch's check starts before the batch just checked is delivered, so that
        // delivering overlaps checking.
        if !batch.items.is_empty() && checking.len() < CHECKS_IN_FLIGHT {
            let (mut b, hub) = (std::mem::take(&mut batch), hub.clone());
            checking.push_back(tokio::spawn(async move {
                b.authorize(&hub, Lane::Live).await;
                b
            }));
        }
        if let Some(mut done) = checked.take() {
            done.deliver(hub, &ack, &mut scratch);
            continue;
        }
        if closed && checking.is_empty() && batch.items.is_empty() {
            return;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            Some(done) = checking.next(), if !checking.is_empty() => match done {
                Ok(done) => checked = Some(done),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return,
            },
            e = rx.recv(), if !closed && batch.items.len() < MAX_BATCH => {
                let Some(first) = e else {
                    closed = true;
                    continue;
                };
                let mut next = Some(first);
                while let Some(event) = next {
                    if let Some(log) = log.as_mut() {
                        log.append(&event);
                    }
                    if checking.is_empty() && batch.items.is_empty() {
                        handle_now(hub, event, &ack, &mut scratch, &mut batch);
                    } else {
                        batch.push(hub, event, &mut scratch.groups);
                    }
                    next = if batch.items.len() < MAX_BATCH { rx.try_recv().ok() } else { None };
                }
                if let Some(log) = log.as_mut() {
                    log.flush();
                }
            }
        }
    }
}

fn handle_now(
    hub: &Hub,
    event: ChangeEvent,
    ack: &Acknowledgement,
    scratch: &mut Scratch,
    batch: &mut Batch,
) {
    match event {
        ChangeEvent::Change(change) => match dispatch(hub, &change, scratch) {
            Some(_) => hub.metrics().dispatched(change.commit_ts, &change.relation),
            None => batch.push(hub, ChangeEvent::Change(change), &mut scratch.groups),
        },
        ChangeEvent::Broadcast(b) => publish(hub, b),
        ChangeEvent::Commit { end_lsn, .. } => ack.advance(end_lsn),
    }
}
