//! The cluster's stream of committed events: JetStream stream `<prefix>_changes`, one subject
//! `<prefix>.changes`, one message per chunk (`chunk.rs`), each with the position of its last
//! event in a `Walcast-Through` header and as its message id.
//!
//! Owns: creating the stream, appending under fencing (`Appender::append` passes only while
//! the stream's last sequence is the one this owner last wrote or read), the stream's last
//! position (where a new owner starts), and reading chunks in order from a sequence.
//! Must not: decide who appends (the lease does) or acknowledge the slot.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::change::{ChangeEvent, Position};
use crate::cluster::chunk::{self, Chunk, ChunkError};
use crate::cluster::Nats;
use crate::replication::lsn::Lsn;

/// The header that names a chunk's last position.
pub const THROUGH: &str = "Walcast-Through";
/// The header that names the position before a chunk's first event (the previous chunk's last):
/// a reader that starts at a chunk knows whether anything between its cursor and the chunk is
/// gone from the stream.
pub const AFTER: &str = "Walcast-After";

/// The header of a chunk too large for one message: `<i>/<n>`, the part's place. Parts are
/// appended one after another; only the last carries the chunk's own position (the others
/// carry the previous chunk's), so a chunk whose owner died between parts is appended again
/// whole by the next owner, and a reader drops parts it cannot complete.
pub const PART: &str = "Walcast-Part";

/// The header of a chunk's last message that counts the changes in the stream through it (since
/// the stream began, across owners): a node's lag in changes is the last message's count less
/// the count of the last chunk it read.
pub const CHANGES: &str = "Walcast-Changes";

/// Room left in a message for its headers.
const HEADER_ROOM: usize = 4096;

/// Why the stream could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("JetStream stream {stream}: {action}")]
    Nats {
        stream: String,
        action: &'static str,
        #[source]
        source: async_nats::Error,
    },
    /// Another owner appended since: this one must stop.
    #[error("JetStream stream {stream}: another owner appended since sequence {expected}")]
    Fenced { stream: String, expected: u64 },
    /// This node's lease ran out (by its own monotonic clock) before an append: it appends no
    /// more until it owns the slot again.
    #[error("JetStream stream {stream}: this node's slot lease ran out; not appending")]
    LeaseEnded { stream: String },
    #[error("JetStream stream {stream}: message {sequence} has no readable {THROUGH} header")]
    NoPosition { stream: String, sequence: u64 },
    /// The stream no longer holds everything after the reader's position (its retention passed
    /// it): the node must start afresh, and its clients get a gap.
    #[error("JetStream stream {stream} no longer holds what follows {after:?} (it starts after {first:?})")]
    Behind { stream: String, after: Position, first: Position },
    #[error("JetStream stream {stream}: message {sequence}")]
    Chunk {
        stream: String,
        sequence: u64,
        #[source]
        source: ChunkError,
    },
}

/// Where the stream ends (`ChangeStream::tail`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tail {
    pub sequence: u64,
    pub through: Option<Position>,
    pub last_id: Option<String>,
    /// Changes in the stream through its last message (0 for a stream written before counts).
    pub changes: u64,
}

/// A chunk as a reader gets it.
#[derive(Debug)]
pub struct ReadChunk {
    /// The sequence of its last message.
    pub sequence: u64,
    pub events: Vec<ChangeEvent>,
    /// Changes in the stream through it, if the chunk says.
    pub changes: Option<u64>,
}

/// The stream, opened by one node.
#[derive(Clone)]
pub struct ChangeStream {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    stream: jetstream::stream::Stream,
    name: String,
    subject: String,
    /// The most bytes of a chunk one message carries (the server's `max_payload` less room for
    /// headers); larger chunks go in parts.
    part_bytes: usize,
}

/// An owner's right to append: the sequence it expects to be the stream's last (counting what
/// it has sent and not yet seen acknowledged), and the last position sent.
#[derive(Debug)]
pub struct Appender {
    /// The last sequence JetStream acknowledged to this appender.
    last: u64,
    /// The last sequence sent: the next message expects the stream to end here.
    sent: u64,
    /// The message id of the last message sent (or of the stream's last, at the start): the
    /// next message expects it too, so a message of another writer between two of this one's
    /// stops every later one, even one whose expected sequence happens to match again.
    last_id: Option<String>,
    /// This appender's message ids: a random prefix and a counter.
    nonce: u64,
    count: u64,
    through: Position,
    /// Changes in the stream through the last chunk sent.
    changes: u64,
}

impl Appender {
    /// Also expects the stream's last message to have id `id` (what `ChangeStream::tail`
    /// said), so that not even the first append lands after another writer's.
    pub fn after_id(mut self, id: Option<String>) -> Appender {
        self.last_id = id;
        self
    }
}

/// A chunk sent and not yet acknowledged: its messages' acknowledgements, in order.
pub struct Sent {
    acks: Vec<(jetstream::context::PublishAckFuture, u64)>,
}

/// The position as the header carries it: 24 hexadecimal digits (LSN, then place).
pub fn position_text(p: Position) -> String {
    format!("{:016X}{:08X}", p.lsn.0, p.seq)
}

fn parse_position(s: &str) -> Option<Position> {
    if s.len() != 24 {
        return None;
    }
    Some(Position {
        lsn: Lsn(u64::from_str_radix(s.get(..16)?, 16).ok()?),
        seq: u32::from_str_radix(s.get(16..)?, 16).ok()?,
    })
}

impl ChangeStream {
    /// Opens the stream, creating it if missing. Nothing expires by itself: the owner trims it
    /// (`trim`), always keeping the last chunk, whose position a new owner and a new node start
    /// from.
    pub async fn open(nats: &Nats) -> Result<ChangeStream, StreamError> {
        let name = format!("{}_changes", nats.prefix);
        let subject = format!("{}.changes", nats.prefix);
        let config = jetstream::stream::Config {
            name: name.clone(),
            description: Some("walcast: committed changes, in commit order".into()),
            subjects: vec![subject.clone()],
            storage: jetstream::stream::StorageType::File,
            num_replicas: nats.replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let stream = nats.jetstream.get_or_create_stream(config).await.map_err(|e| StreamError::Nats {
            stream: name.clone(),
            action: "creating or opening it",
            source: e.into(),
        })?;
        let max_payload = match nats.client.server_info().max_payload {
            0 => 1 << 20,
            n => n,
        };
        Ok(ChangeStream {
            client: nats.client.clone(),
            jetstream: nats.jetstream.clone(),
            stream,
            name,
            subject,
            part_bytes: max_payload.saturating_sub(HEADER_ROOM).max(HEADER_ROOM),
        })
    }

    /// The same stream, with chunks split into parts of at most `bytes` (tests use it to make
    /// ordinary transactions span parts).
    pub fn with_part_bytes(mut self, bytes: usize) -> ChangeStream {
        self.part_bytes = bytes.max(1);
        self
    }

    fn failed(&self, action: &'static str) -> impl FnOnce(async_nats::Error) -> StreamError + '_ {
        move |source| StreamError::Nats { stream: self.name.clone(), action, source }
    }

    /// The stream's last message: its sequence and the position of its last event; `None` while
    /// the stream is empty.
    pub async fn last(&self) -> Result<Option<(u64, Position)>, StreamError> {
        Ok(match self.end().await? {
            (sequence, Some(position)) => Some((sequence, position)),
            (_, None) => None,
        })
    }

    /// The stream's last sequence (0 when nothing was ever appended) and, while it holds
    /// messages, the position of its last event.
    pub async fn end(&self) -> Result<(u64, Option<Position>), StreamError> {
        let tail = self.tail().await?;
        Ok((tail.sequence, tail.through))
    }

    /// The position before the stream's oldest event (`None` while it is empty): a node whose
    /// log ends before it cannot continue that log.
    pub async fn begins_after(&self) -> Result<Option<Position>, StreamError> {
        let info = self.stream.get_info().await.map_err(|e| self.failed("reading its state")(e.into()))?;
        if info.state.messages == 0 {
            return Ok(None);
        }
        Ok(Some(self.header_position(info.state.first_sequence, AFTER).await?))
    }

    /// Removes the chunks appended more than `retention` ago, except the last one. Returns how
    /// many were removed.
    pub async fn trim(&self, retention: Duration) -> Result<u64, StreamError> {
        let info = self.stream.get_info().await.map_err(|e| self.failed("reading its state")(e.into()))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if info.state.messages < 2 {
            return Ok(0);
        }
        let cutoff = i128::try_from(
            std::time::SystemTime::now()
                .checked_sub(retention)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .unwrap_or_default()
                .as_nanos(),
        )
        .unwrap_or(i128::MAX);
        // Binary search: the first message in [first, last] appended at or after the cutoff.
        let (mut lo, mut hi) = (first, last);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let message = self
                .stream
                .get_raw_message(mid)
                .await
                .map_err(|e| self.failed("reading a message")(e.into()))?;
            if message.time.unix_timestamp_nanos() >= cutoff {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        // Never between the parts of one chunk.
        let lo = self.chunk_start(lo, first).await?;
        if lo <= first {
            return Ok(0);
        }
        self.purge_before(lo).await?;
        Ok(lo - first)
    }

    /// The stream's name in JetStream.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The right to append after sequence `last`, whose last position is `through` (what
    /// `ChangeStream::last` said; 0 and `None` for an empty stream). See `Appender::after_id`.
    pub fn appender(&self, last: u64, through: Option<Position>) -> Appender {
        Appender {
            last,
            sent: last,
            last_id: None,
            nonce: fastrand::u64(..),
            count: 0,
            through: through.unwrap_or(Position::ZERO),
            changes: 0,
        }
    }

    /// The right to append after `tail` (what `tail` said when the lease was taken): its
    /// sequence and last message id expected, its count of changes continued.
    pub fn appender_at(&self, tail: &Tail) -> Appender {
        let mut a = self.appender(tail.sequence, tail.through).after_id(tail.last_id.clone());
        a.changes = tail.changes;
        a
    }

    /// The stream's end: its last sequence, the position of its last event, its last message's
    /// id and the changes counted through it (each `None`/0 while it is empty).
    pub async fn tail(&self) -> Result<Tail, StreamError> {
        let info = self.stream.get_info().await.map_err(|e| self.failed("reading its state")(e.into()))?;
        let sequence = info.state.last_sequence;
        if info.state.messages == 0 || sequence == 0 {
            return Ok(Tail { sequence, ..Tail::default() });
        }
        let message = self
            .stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| self.failed("reading its last message")(e.into()))?;
        let position = message
            .headers
            .get(THROUGH)
            .and_then(|v| parse_position(v.as_str()))
            .ok_or(StreamError::NoPosition { stream: self.name.clone(), sequence })?;
        let last_id = message.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned());
        let changes = message.headers.get(CHANGES).and_then(|v| v.as_str().parse().ok()).unwrap_or(0);
        Ok(Tail { sequence, through: Some(position), last_id, changes })
    }

    /// Appends `chunk` if the stream still ends at the appender's sequence and last message (in
    /// parts when it is larger than a message may be); returns the new last sequence.
    pub async fn append(&self, appender: &mut Appender, chunk: &Chunk) -> Result<u64, StreamError> {
        let sent = self.send(appender, chunk).await?;
        self.confirm(appender, sent).await
    }

    /// Sends `chunk` without waiting for JetStream: each message expects the stream to end at
    /// the one sent before it (its sequence and its id), so the chunks an owner has in flight
    /// are stored in order, or not at all after the first that is not, whatever another writer
    /// does meanwhile. `confirm` waits for the acknowledgements.
    pub async fn send(&self, appender: &mut Appender, chunk: &Chunk) -> Result<Sent, StreamError> {
        let through = chunk.through.map(position_text).unwrap_or_default();
        let after = position_text(appender.through);
        // Like the position, the count: the chunk's on its last part, the previous one's before.
        let (before, total) = (appender.changes.to_string(), (appender.changes + chunk.changes).to_string());
        let bytes = &chunk.bytes;
        let parts = bytes.len().div_ceil(self.part_bytes).max(1);
        let mut acks = Vec::with_capacity(parts);
        for i in 0..parts {
            let range = (i * self.part_bytes).min(bytes.len())..((i + 1) * self.part_bytes).min(bytes.len());
            let last = i + 1 == parts;
            appender.count += 1;
            let id = format!("{:016x}-{}", appender.nonce, appender.count);
            let mut message = PublishMessage::build()
                .payload(bytes.slice(range))
                .header(AFTER, after.as_str())
                .header(THROUGH, if last { through.as_str() } else { after.as_str() })
                .header(CHANGES, if last { total.as_str() } else { before.as_str() })
                .message_id(&id)
                .expected_last_sequence(appender.sent);
            if let Some(previous) = &appender.last_id {
                message = message.expected_last_message_id(previous);
            }
            appender.last_id = Some(id);
            if parts > 1 {
                message = message.header(PART, format!("{}/{parts}", i + 1).as_str());
            }
            let pending = self
                .jetstream
                .send_publish(self.subject.clone(), message)
                .await
                .map_err(|e| self.publish_error(e, appender.sent))?;
            acks.push((pending, appender.sent));
            appender.sent += 1;
        }
        appender.through = chunk.through.unwrap_or(appender.through);
        appender.changes += chunk.changes;
        Ok(Sent { acks })
    }

    /// Waits until JetStream stored what `sent` holds; returns the last sequence.
    pub async fn confirm(&self, appender: &mut Appender, sent: Sent) -> Result<u64, StreamError> {
        for (pending, expected) in sent.acks {
            let ack = pending.await.map_err(|e| self.publish_error(e, expected))?;
            appender.last = ack.sequence;
        }
        Ok(appender.last)
    }

    fn publish_error(&self, e: async_nats::jetstream::context::PublishError, expected: u64) -> StreamError {
        if matches!(e.kind(), PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId) {
            return StreamError::Fenced { stream: self.name.clone(), expected };
        }
        self.failed("appending a chunk")(e.into())
    }

    /// The place of message `sequence` among its chunk's parts: (i, n); `None` for a whole chunk.
    async fn part_of(&self, sequence: u64) -> Result<Option<(u64, u64)>, StreamError> {
        let message = self
            .stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| self.failed("reading a message")(e.into()))?;
        Ok(message.headers.get(PART).and_then(|v| parse_part(v.as_str())))
    }

    /// `sequence`, or the first part of the chunk it is a later part of.
    async fn chunk_start(&self, sequence: u64, first: u64) -> Result<u64, StreamError> {
        Ok(match self.part_of(sequence).await? {
            Some((i, _)) if i > 1 => sequence.saturating_sub(i - 1).max(first),
            _ => sequence,
        })
    }

    /// A header position of message `sequence`.
    async fn header_position(&self, sequence: u64, header: &'static str) -> Result<Position, StreamError> {
        let message = self
            .stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| self.failed("reading a message")(e.into()))?;
        message
            .headers
            .get(header)
            .and_then(|v| parse_position(v.as_str()))
            .ok_or(StreamError::NoPosition { stream: self.name.clone(), sequence })
    }

    /// The sequence to read from to get every event after `after`: the first message whose
    /// last position is past it (one more than the last sequence when none is). `Behind` when
    /// the stream's oldest message starts after `after`: what came between is gone.
    pub async fn sequence_after(&self, after: Position) -> Result<u64, StreamError> {
        let info = self.stream.get_info().await.map_err(|e| self.failed("reading its state")(e.into()))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if info.state.messages == 0 {
            return Ok(last + 1);
        }
        // Binary search: the first message in [first, last] whose position is past `after`.
        let (mut lo, mut hi) = (first, last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.header_position(mid, THROUGH).await? > after {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        if lo <= last {
            lo = self.chunk_start(lo, first).await?;
        }
        if lo == first {
            let before = self.header_position(first, AFTER).await?;
            if before > after {
                return Err(StreamError::Behind { stream: self.name.clone(), after, first: before });
            }
        }
        Ok(lo)
    }

    /// Removes the messages before `sequence` (what retention does by age; for operators and
    /// tests).
    pub async fn purge_before(&self, sequence: u64) -> Result<(), StreamError> {
        self.stream.purge().sequence(sequence).await.map_err(|e| self.failed("purging")(e.into()))?;
        Ok(())
    }

    /// The chunks from sequence `start` on, in order, decoded. The stream of them ends only on an
    /// error (the consumer recreates itself across reconnects).
    pub async fn read_from(
        &self,
        start: u64,
    ) -> Result<impl futures_util::Stream<Item = Result<ReadChunk, StreamError>> + '_, StreamError> {
        let consumer = self
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start.max(1) },
                ..Default::default()
            })
            .await
            .map_err(|e| self.failed("creating a consumer")(e.into()))?;
        let messages = consumer.messages().await.map_err(|e| self.failed("reading")(e.into()))?;
        let mut parts = Parts::default();
        Ok(messages
            .map(move |m| {
                let m = m.map_err(|e| self.failed("reading")(e.into()))?;
                let sequence = m.info().map(|i| i.stream_sequence).map_err(|e| self.failed("reading")(e))?;
                let header =
                    |name: &str| m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
                let part = header(PART).and_then(|v| parse_part(&v));
                let changes = header(CHANGES).and_then(|v| v.parse().ok());
                let Some(payload) = parts.take(part, m.payload.clone()) else {
                    return Ok(None);
                };
                let events = chunk::decode(&payload).map_err(|source| StreamError::Chunk {
                    stream: self.name.clone(),
                    sequence,
                    source,
                })?;
                Ok(Some(ReadChunk { sequence, events, changes }))
            })
            .filter_map(|r: Result<Option<ReadChunk>, StreamError>| std::future::ready(r.transpose())))
    }
}

/// `<i>/<n>` with 1 ≤ i ≤ n.
fn parse_part(s: &str) -> Option<(u64, u64)> {
    let (i, n) = s.split_once('/')?;
    let (i, n) = (i.parse().ok()?, n.parse().ok()?);
    (1..=n).contains(&i).then_some((i, n))
}

/// A reader's parts of one chunk, in order.
#[derive(Default)]
struct Parts {
    /// (parts so far, how many the chunk has).
    held: Vec<Bytes>,
    of: u64,
}

impl Parts {
    /// The whole chunk once `payload` completes it; `None` while parts are missing. A part that
    /// does not follow on (a chunk whose owner died between parts, then appended again) drops
    /// what was held.
    fn take(&mut self, part: Option<(u64, u64)>, payload: Bytes) -> Option<Bytes> {
        let Some((i, n)) = part else {
            self.held.clear();
            return Some(payload);
        };
        if i == 1 || self.of != n || self.held.len() as u64 + 1 != i {
            self.held.clear();
            if i != 1 {
                return None;
            }
        }
        self.of = n;
        self.held.push(payload);
        if i < n {
            return None;
        }
        let mut whole = bytes::BytesMut::with_capacity(self.held.iter().map(Bytes::len).sum());
        for p in self.held.drain(..) {
            whole.extend_from_slice(&p);
        }
        Some(whole.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_make_a_chunk_only_when_all_follow_on() {
        let mut p = Parts::default();
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert_eq!(p.take(None, b("whole")), Some(b("whole")));
        assert_eq!(p.take(Some((1, 3)), b("a")), None);
        assert_eq!(p.take(Some((2, 3)), b("b")), None);
        assert_eq!(p.take(Some((3, 3)), b("c")), Some(b("abc")));
        // An owner died after two parts; the next owner appends the chunk again.
        assert_eq!(p.take(Some((1, 3)), b("x")), None);
        assert_eq!(p.take(Some((2, 3)), b("y")), None);
        assert_eq!(p.take(Some((1, 2)), b("xy")), None);
        assert_eq!(p.take(Some((2, 2)), b("z")), Some(b("xyz")));
        // A reader that starts in the middle of a chunk drops its tail.
        assert_eq!(p.take(Some((2, 2)), b("tail")), None);
        assert_eq!(p.take(Some((3, 3)), b("tail")), None);
        assert_eq!(p.take(None, b("next")), Some(b("next")));
        assert_eq!(parse_part("0/2"), None);
        assert_eq!(parse_part("3/2"), None);
        assert_eq!(parse_part("2/x"), None);
        assert_eq!(parse_part("2/2"), Some((2, 2)));
    }
}
