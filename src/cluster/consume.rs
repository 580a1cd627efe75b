//! Every node's side of the stream: the events after the node's own position, in order, handed
//! to its dispatcher exactly as the walsender task hands them on a single node.
//!
//! A reader starts at the chunk that holds the first event after its position and skips the
//! chunk's earlier events, so nothing is handed on twice and nothing is missed; if the stream
//! no longer holds what follows the position, it says so (`StreamError::Behind`) rather than
//! skip. Must not: match, decide or deliver (the dispatcher does).

use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::change::{ChangeEvent, Position};
use crate::cluster::stream::{ChangeStream, StreamError};
use crate::source::walsender::ReplicationStatus;

/// Hands every event after `after` to `events`, in order, until the receiver is dropped (`Ok`)
/// or reading fails; counts changes and notes commit times in `status`. Returns the position of
/// the last event handed on with the result.
pub async fn consume(
    stream: &ChangeStream,
    after: Position,
    events: &mpsc::Sender<ChangeEvent>,
    status: &ReplicationStatus,
) -> (Position, Result<(), StreamError>) {
    let mut last = after;
    let start = match stream.sequence_after(after).await {
        Ok(s) => s,
        Err(e) => return (last, Err(e)),
    };
    let chunks = match stream.read_from(start).await {
        Ok(c) => c,
        Err(e) => return (last, Err(e)),
    };
    let mut chunks = std::pin::pin!(chunks);
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return (last, Err(e)),
        };
        for event in chunk.events {
            // Positions only grow: anything not past the last one handed on (the chunk's part
            // before `after`, or a chunk stored twice) is already handed on.
            let position = event.position();
            if position <= last {
                continue;
            }
            if let ChangeEvent::Change(c) = &event {
                status.changes_received.fetch_add(1, Ordering::Relaxed);
                status.last_commit_ts.store(c.commit_ts, Ordering::Relaxed);
            }
            if events.send(event).await.is_err() {
                return (last, Ok(()));
            }
            last = position;
        }
        if let Some(n) = chunk.changes {
            status.stream_changes_read.store(n, Ordering::Relaxed);
        }
    }
    (last, Ok(()))
}
