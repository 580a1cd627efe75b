//! The slot owner's publishing loop: the walsender task's events, in commit order, gathered
//! into chunks (what is waiting, ending on a commit, or `CHUNK_BYTES` of a large transaction)
//! and appended to the change stream; the acknowledgement advanced to a chunk's last
//! commit only once JetStream has stored it.
//!
//! Events at or before the stream's last position are skipped: a new owner replays the slot
//! from its confirmed position, which may be before what the old owner had already appended.
//! Must not: append after being fenced (it returns, and the owner steps down), or acknowledge
//! anything JetStream has not acknowledged.

use tokio::sync::mpsc;

use crate::change::{ChangeEvent, Position};
use crate::cluster::chunk::ChunkBuilder;
use crate::cluster::stream::{Appender, ChangeStream, StreamError};
use crate::replication::ack::Acknowledgement;

/// A chunk is appended once it holds this many bytes of records (at a commit), or when nothing
/// more is waiting.
const CHUNK_BYTES: usize = 256 * 1024;

/// Where a publishing loop starts: the stream's last sequence and position.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    pub sequence: u64,
    pub through: Option<Position>,
}

impl Start {
    /// The stream's end, read when the lease was taken.
    pub async fn of(stream: &ChangeStream) -> Result<Start, StreamError> {
        let (sequence, through) = stream.end().await?;
        Ok(Start { sequence, through })
    }
}

/// Appends `events` to `stream` from `start` until the channel closes (`Ok`), or an append
/// fails (fenced by another owner, or NATS unreachable past the client's timeout): then it
/// returns the error and nothing more is acknowledged.
pub async fn publish(
    stream: &ChangeStream,
    start: Start,
    mut events: mpsc::Receiver<ChangeEvent>,
    ack: &Acknowledgement,
) -> Result<(), StreamError> {
    let mut appender: Appender = stream.appender(start.sequence, start.through);
    let mut builder = ChunkBuilder::default();
    while let Some(first) = events.recv().await {
        let mut next = Some(first);
        while let Some(event) = next {
            if start.through.is_none_or(|through| event.position() > through) {
                builder.push(&event);
            } else if let (ChangeEvent::Commit { end_lsn, .. }, true) = (&event, builder.is_empty()) {
                // Already in the stream (appended by the owner before): safe to confirm.
                ack.advance(*end_lsn);
            }
            // A large transaction spans chunks; a reader sees its commit in the last of them.
            if builder.bytes() >= CHUNK_BYTES {
                append(stream, &mut appender, &mut builder, ack).await?;
            }
            next = events.try_recv().ok();
        }
        // Nothing more waiting: what ends on a commit goes now; a transaction still arriving
        // waits for the rest of itself.
        if builder.ends_on_commit() {
            append(stream, &mut appender, &mut builder, ack).await?;
        }
    }
    Ok(())
}

async fn append(
    stream: &ChangeStream,
    appender: &mut Appender,
    builder: &mut ChunkBuilder,
    ack: &Acknowledgement,
) -> Result<(), StreamError> {
    if builder.is_empty() {
        return Ok(());
    }
    let chunk = builder.finish();
    stream.append(appender, &chunk).await?;
    if let Some(end) = chunk.commit_end {
        ack.advance(end);
    }
    Ok(())
}
