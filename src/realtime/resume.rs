//! Resuming a subscription from a cursor: the changes after it are replayed from the change log,
//! then live delivery continues, with no gap and no duplicate.
//!
//! The hand-off: the member joins with a [`ResumeGate`](crate::realtime::gate::ResumeGate) that
//! holds its live changes. While its
//! bindings are added to the index, the session reads the last change the dispatcher matched
//! (`through`): every later change is matched against the new bindings and held; every change
//! up to `through` is in the log. The replay sends the log's changes after the cursor up to
//! `through` (filters and row-level security applied as live), then the gate sends what it held
//! after `through` and lets live changes pass, skipping any at or before the cursor.
//!
//! Owns: the replay task and where a resume starts (`Since`). Must not: deliver anything it
//! cannot place in order (the gate, `gate.rs`, places live changes).

use std::sync::Arc;
use std::time::Duration;

use crate::change::broadcast::Logged;
use crate::change::DbBroadcast;
use crate::change::Position;
use crate::log::{Cursor, Entry, Gap, LogReader};
use crate::realtime::dispatch::render::Scratch;
use crate::realtime::dispatch::replay::replay_batch;
use crate::realtime::hub::Hub;
use crate::realtime::index::Subscription;
use crate::realtime::member::Member;
use crate::realtime::outbox::{Direct, Event, Frame, Queued};

/// Events read from the log per step.
const READ_BATCH: usize = 1024;
/// Batches read ahead of the one being sent.
const READ_AHEAD: usize = 2;
/// How long a replay waits for the log writer to catch up with the dispatcher.
const WRITTEN_WAIT: Duration = Duration::from_secs(30);

/// Where a resume starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// After this change.
    Cursor(Cursor),
    /// From the first change committed at or after this time (microseconds since the Unix
    /// epoch): the changes of that millisecond may repeat, none is missed.
    Time(i64),
}

impl std::str::FromStr for Since {
    type Err = crate::log::ParseCursorError;

    fn from_str(s: &str) -> Result<Since, Self::Err> {
        if s.contains(['-', ':']) {
            return crate::change::parse_timestamp(s)
                .map(Since::Time)
                .ok_or_else(|| crate::log::ParseCursorError(s.chars().take(64).collect()));
        }
        s.parse().map(Since::Cursor)
    }
}

/// A replay prepared by a join, started by the transport once it has answered the join (so the
/// answer comes before the replayed changes).
pub struct Resume {
    pub(crate) hub: Hub,
    pub(crate) member: Arc<Member>,
    pub(crate) subs: Vec<Arc<Subscription>>,
    /// Resume after this change, or from this commit time.
    pub(crate) after: Since,
    /// The last change matched before the bindings were added.
    pub(crate) through: Position,
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resume").field("after", &self.after).field("through", &self.through).finish()
    }
}

#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Gap(#[from] Gap),
    #[error(transparent)]
    Read(#[from] crate::log::reader::LogReadError),
    #[error("the change log writer did not reach the resume point")]
    Stalled,
    #[error("the client went away")]
    Gone,
}

impl Resume {
    /// Runs the replay in its own task, then opens the gate.
    pub fn start(self) {
        tokio::spawn(self.run());
    }

    async fn run(self) {
        let started = std::time::Instant::now();
        let replayed = self.replay().await;
        self.hub.metrics().replay.record(started.elapsed());
        let after = match (&replayed, self.after) {
            (Ok(after), _) => *after,
            (Err(_), Since::Cursor(c)) => c.position,
            (Err(_), Since::Time(_)) => self.through,
        };
        let through = self.through.max(after);
        match replayed {
            Ok(_) => {}
            Err(ReplayError::Gone) => return,
            Err(e) => {
                let (code, message) = match &e {
                    ReplayError::Gap(g) => {
                        (g.code(), format!("changes were missed: {g}; load the current state again"))
                    }
                    other => {
                        tracing::warn!(error = %crate::errors::chain(other), "resume from the change log failed");
                        (
                            "unavailable",
                            format!("changes could not be replayed: {other}; load the current state again"),
                        )
                    }
                };
                let frame = self.member.encoder.encode_direct(
                    &self.member.key.topic,
                    self.member.address.as_deref(),
                    &Direct::Gap { code, message: &message },
                );
                let _ = self.member.outbox.send_wait(frame, self.hub.metrics()).await;
            }
        }
        self.member.release(through, self.hub.metrics()).await;
    }

    /// Replays; returns the position it resumed after.
    async fn replay(&self) -> Result<Position, ReplayError> {
        let log = self.hub.log().ok_or(Gap::NoLog)?;
        let through = self.through;
        if let Since::Cursor(after) = self.after {
            if after.position >= through {
                // Nothing to replay (the cursor is at or after everything matched so far).
                return log.check(&after).map(|()| after.position).map_err(ReplayError::Gap);
            }
        }
        let mut written = log.written();
        match tokio::time::timeout(WRITTEN_WAIT, written.wait_for(|p| *p >= through)).await {
            Ok(Ok(_)) => {}
            _ => return Err(ReplayError::Stalled),
        }
        let after = match self.after {
            Since::Cursor(c) => c,
            Since::Time(t) => {
                let l = log.clone();
                let at = tokio::task::spawn_blocking(move || l.position_at(t, through))
                    .await
                    .map_err(|_| ReplayError::Stalled)?
                    .map_err(|e| match e {
                        crate::log::LogReadError::Gap(g) => ReplayError::Gap(g),
                        other => ReplayError::Read(other),
                    })?;
                log.cursor(at)
            }
        };
        let done = after.position;
        if done >= through {
            return Ok(done);
        }
        // The log is read ahead on a blocking thread while the batch before is sent; it stops
        // at the end, or when this task drops the receiver.
        let mut reader: LogReader = log.read(&after, through)?;
        let (tx, mut batches) = tokio::sync::mpsc::channel(READ_AHEAD);
        tokio::task::spawn_blocking(move || loop {
            let batch = reader.next_batch(READ_BATCH);
            let more = matches!(&batch, Ok(b) if !b.is_empty());
            if tx.blocking_send(batch).is_err() || !more {
                return;
            }
        });
        let mut scratch = Scratch::default();
        loop {
            let Some(entries) = batches.recv().await else { return Err(ReplayError::Stalled) };
            let entries = entries?;
            if entries.is_empty() {
                return Ok(done);
            }
            // Changes go through the member's bindings in runs; its channel's database
            // broadcasts go in between, in log order.
            let mut changes = Vec::new();
            for entry in entries {
                match entry {
                    Entry::Change(c) => changes.push(c),
                    Entry::Broadcast(b) => {
                        if !changes.is_empty() {
                            let frames = replay_batch(
                                &self.hub,
                                &self.member,
                                &self.subs,
                                changes.drain(..),
                                &mut scratch,
                            )
                            .await;
                            self.send_all(frames).await?;
                        }
                        if let Some(frame) = self.broadcast_frame(log, b) {
                            self.send_all([frame]).await?;
                        }
                    }
                }
            }
            let frames =
                replay_batch(&self.hub, &self.member, &self.subs, changes.into_iter(), &mut scratch).await;
            self.send_all(frames).await?;
        }
    }

    async fn send_all(&self, frames: impl IntoIterator<Item = Frame>) -> Result<(), ReplayError> {
        for frame in frames {
            if self.member.outbox.send_wait(frame, self.hub.metrics()).await != Queued::Yes {
                return Err(ReplayError::Gone);
            }
        }
        Ok(())
    }

    /// A logged database broadcast as this member receives it, if it is for its channel and
    /// it may read broadcasts.
    fn broadcast_frame(&self, log: &crate::log::ChangeLog, mut b: DbBroadcast) -> Option<Frame> {
        let key = &self.member.key;
        if *b.topic != *key.topic || b.private != key.private || !self.member.reads_broadcast() {
            return None;
        }
        b.message.logged =
            Some(Logged { position: b.position, cursor: log.cursor(b.position).to_string().into() });
        self.member.encoder.encode(&key.topic, &Event::Broadcast(&b.message))
    }
}

/// What a join with `since` or `snapshot` sends before live changes; the transport starts it
/// once it has answered the join.
#[derive(Debug)]
pub enum Handoff {
    Resume(Resume),
    Snapshot(crate::realtime::snapshot::Snapshot),
}

impl Handoff {
    pub fn start(self) {
        match self {
            Handoff::Resume(r) => r.start(),
            Handoff::Snapshot(s) => s.start(),
        }
    }
}
