//! The slot owner's publishing loop: the walsender task's events, in commit order, gathered
//! into chunks (what is waiting, ending on a commit, or `CHUNK_BYTES` of a large transaction)
//! and appended to the change stream; the acknowledgement advanced to a chunk's last
//! commit only once JetStream has stored it.
//!
//! Events at or before the stream's last position are skipped: a new owner replays the slot
//! from its confirmed position, which may be before what the old owner had already appended.
//! Must not: append after being fenced (it returns, and the owner steps down), or acknowledge
//! anything JetStream has not acknowledged.

use std::collections::VecDeque;

use tokio::sync::mpsc;

use crate::change::ChangeEvent;
use crate::cluster::chunk::ChunkBuilder;
use crate::cluster::stream::{Appender, ChangeStream, Sent, StreamError, Tail};
use crate::replication::ack::Acknowledgement;
use crate::replication::lsn::Lsn;

/// A chunk is appended once it holds this many bytes of records (at a commit), or when nothing
/// more is waiting.
const CHUNK_BYTES: usize = 256 * 1024;

/// Chunks sent ahead of JetStream's acknowledgements.
const IN_FLIGHT: usize = 8;

/// Appends `events` to `stream` from `start` until the channel closes (`Ok`), or an append
/// fails (fenced by another owner, or NATS unreachable past the client's timeout), or
/// `may_append` says no before one (the lease ran out): then it returns the error and nothing
/// more is acknowledged. Up to `IN_FLIGHT` chunks are sent ahead
/// of JetStream's acknowledgements; all are confirmed before it waits for more events.
pub async fn publish(
    stream: &ChangeStream,
    start: Tail,
    mut events: mpsc::Receiver<ChangeEvent>,
    ack: &Acknowledgement,
    may_append: &(dyn Fn() -> bool + Sync),
) -> Result<(), StreamError> {
    let mut out = Outgoing {
        stream,
        may_append,
        appender: stream.appender_at(&start),
        in_flight: VecDeque::new(),
        ack,
    };
    let mut builder = ChunkBuilder::default();
    tracing::info!(
        sequence = start.sequence,
        through = %start.through.map(|p| p.lsn).unwrap_or(Lsn::ZERO),
        "slot owner: appending after the stream's end"
    );
    loop {
        let first = match events.try_recv() {
            Ok(e) => e,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Nothing waiting: confirm what is in flight, then wait.
                out.confirm_all().await?;
                match events.recv().await {
                    Some(e) => e,
                    None => break,
                }
            }
        };
        let mut next = Some(first);
        while let Some(event) = next {
            if start.through.is_none_or(|through| event.position() > through) {
                builder.push(&event);
            } else if let (ChangeEvent::Commit { end_lsn, .. }, true) =
                (&event, builder.is_empty() && out.in_flight.is_empty())
            {
                // Already in the stream (appended by the owner before): safe to confirm.
                ack.advance(*end_lsn);
            }
            // A large transaction spans chunks; a reader sees its commit in the last of them.
            if builder.bytes() >= CHUNK_BYTES {
                out.send(&mut builder).await?;
            }
            next = events.try_recv().ok();
        }
        // Nothing more waiting: what ends on a commit goes now; a transaction still arriving
        // waits for the rest of itself.
        if builder.ends_on_commit() {
            out.send(&mut builder).await?;
        }
    }
    out.confirm_all().await
}

/// Chunks on their way to JetStream.
struct Outgoing<'a> {
    stream: &'a ChangeStream,
    /// Asked before every append.
    may_append: &'a (dyn Fn() -> bool + Sync),
    appender: Appender,
    /// Sent, not yet confirmed, in order, with the end of the last commit each holds.
    in_flight: VecDeque<(Sent, Option<Lsn>)>,
    ack: &'a Acknowledgement,
}

impl Outgoing<'_> {
    /// Sends the chunk built so far; confirms the oldest in flight when too many are.
    async fn send(&mut self, builder: &mut ChunkBuilder) -> Result<(), StreamError> {
        if builder.is_empty() {
            return Ok(());
        }
        if !(self.may_append)() {
            return Err(StreamError::LeaseEnded { stream: self.stream.name().to_owned() });
        }
        let chunk = builder.finish();
        let sent = self.stream.send(&mut self.appender, &chunk).await?;
        tracing::debug!(bytes = chunk.bytes.len(), through = ?chunk.through, "slot owner: chunk sent");
        self.in_flight.push_back((sent, chunk.commit_end));
        while self.in_flight.len() > IN_FLIGHT {
            self.confirm_oldest().await?;
        }
        Ok(())
    }

    async fn confirm_oldest(&mut self) -> Result<(), StreamError> {
        if let Some((sent, commit_end)) = self.in_flight.pop_front() {
            self.stream.confirm(&mut self.appender, sent).await?;
            if let Some(end) = commit_end {
                self.ack.advance(end);
            }
        }
        Ok(())
    }

    async fn confirm_all(&mut self) -> Result<(), StreamError> {
        while !self.in_flight.is_empty() {
            self.confirm_oldest().await?;
        }
        Ok(())
    }
}
