//! What the core hands a transport: encoded [`Frame`]s in a bounded per-session queue, and the
//! [`Encoder`] seam through which a protocol module turns core events into its wire format.
//!
//! Owns: the outbox (bounded queue + kill switch, and how long frames wait in it, recorded when
//! the transport says it wrote them) and the slow-client policy — a full queue
//! disconnects that client, never blocks the sender. Must not: know any wire format; encoders
//! live in `protocol/`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use metrics::Histogram;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use crate::change::broadcast::BroadcastMessage;
use crate::realtime::limits::Metrics;

/// One encoded server message. Cloning shares the bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// UTF-8 text (JSON for the Phoenix serializers).
    Text(Utf8Bytes),
    /// Binary (Phoenix 2.0.0 broadcast frames).
    Binary(Bytes),
    /// UTF-8 text in parts the transport joins: a member's envelope around a body shared by every
    /// member that receives the same content. Handing a member its frame then costs two
    /// reference counts; the copy is made by its own transport task.
    Joined { envelope: Arc<Envelope>, body: Utf8Bytes },
    /// A message with a name and an optional id, as an event stream carries them: its transport
    /// renders it (an SSE message, a long-poll answer's entry) without reading text back. One
    /// allocation, shared by every member that receives it.
    Named(Arc<Named>),
    /// A text message followed by a binary one that belongs to it (an event with a binary
    /// attachment, as Socket.IO sends them). Both shared.
    Attached { text: Utf8Bytes, binary: Bytes },
}

/// The parts of a [`Frame::Named`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// Where a client resumes after this message (a cursor), if it can.
    pub id: Option<Box<str>>,
    pub name: Cow<'static, str>,
    /// The message's JSON.
    pub data: Utf8Bytes,
}

impl Named {
    pub fn frame(id: Option<&str>, name: impl Into<Cow<'static, str>>, data: Utf8Bytes) -> Frame {
        Frame::Named(Arc::new(Named { id: id.map(Box::from), name: name.into(), data }))
    }
}

/// What surrounds a shared body in a [`Frame::Joined`]: `head` depends on the member (its topic),
/// `tail` on the encoding only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub head: Utf8Bytes,
    pub tail: &'static str,
}

impl Frame {
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
            Frame::Joined { envelope, body } => envelope.head.len() + body.len() + envelope.tail.len(),
            Frame::Named(m) => m.id.as_ref().map_or(0, |id| id.len()) + m.name.len() + m.data.len(),
            Frame::Attached { text, binary } => text.len() + binary.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text of a text frame (joined when in parts; a named message's data).
    pub fn text(&self) -> Option<Cow<'_, str>> {
        match self {
            Frame::Text(t) => Some(Cow::Borrowed(t.as_str())),
            Frame::Binary(_) => None,
            Frame::Joined { .. } => self.joined().map(Cow::Owned),
            Frame::Named(m) => Some(Cow::Borrowed(m.data.as_str())),
            Frame::Attached { text, .. } => Some(Cow::Borrowed(text.as_str())),
        }
    }

    /// The whole text of a [`Frame::Joined`] in one allocation (`None` for other frames).
    pub fn joined_text(&self) -> Option<Utf8Bytes> {
        self.joined().map(Utf8Bytes::from)
    }

    fn joined(&self) -> Option<String> {
        let Frame::Joined { envelope, body } = self else { return None };
        let mut out = String::with_capacity(self.len());
        out.push_str(envelope.head.as_str());
        out.push_str(body.as_str());
        out.push_str(envelope.tail);
        Some(out)
    }

    /// Appends the frame's bytes (a named message's data: its transport renders the rest).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Text(t) => out.extend_from_slice(t.as_bytes()),
            Frame::Named(m) => out.extend_from_slice(m.data.as_bytes()),
            Frame::Binary(b) => out.extend_from_slice(b),
            Frame::Attached { text, binary } => {
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(binary);
            }
            Frame::Joined { envelope, body } => {
                out.extend_from_slice(envelope.head.as_bytes());
                out.extend_from_slice(body.as_bytes());
                out.extend_from_slice(envelope.tail.as_bytes());
            }
        }
    }
}

/// Identifies a wire encoding: members whose encoders share an id receive identical bytes for
/// identical content on the same topic, so a frame is encoded once per (content, encoding, topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EncodingId(pub u8);

/// A content event the core delivers to channel members.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A `postgres_changes` delivery: the matching binding ids, the rendered `data` object and
    /// the change's resume cursor (also inside `data`) when a change log keeps it.
    Change {
        ids: &'a [u32],
        data: &'a str,
        cursor: Option<&'a str>,
        kind: crate::change::ChangeKind,
        /// A row of an initial snapshot rather than a change.
        snapshot: bool,
    },
    /// A broadcast message.
    Broadcast(&'a BroadcastMessage),
    /// Presence changes: `{"joins":{…},"leaves":{…}}`.
    PresenceDiff(&'a [u8]),
    /// A live query's message: a row of its initial result, or a row that entered, changed in
    /// or left its result (`data`: the message's JSON, `cursor`: the change's resume cursor).
    /// Only encodings that say [`Encoder::carries_live`] receive these.
    Live { ids: &'a [u32], kind: crate::change::LiveKind, data: &'a str, cursor: Option<&'a str> },
}

/// A message for one member only (it may carry that member's join reference).
#[derive(Debug, Clone, Copy)]
pub enum Direct<'a> {
    /// The whole presence state of the topic: `{"<key>":{"metas":[…]}}`.
    PresenceState(&'a [u8]),
    /// A status message about the channel (`system` in Phoenix).
    System { extension: &'a str, status: &'a str, message: &'a str },
    /// The channel was closed by the server (after a `System` error saying why).
    Closed,
    /// A resume could not continue without missing changes: the client must load its state
    /// again. `code` is machine-readable (`expired`, `other_log`, …).
    Gap { code: &'a str, message: &'a str },
    /// The initial snapshot is complete (`rows` rows were sent); changes follow. `cursor` is
    /// where a client that saw nothing after this resumes (with a change log).
    /// `more`: a snapshot read in pages (a long-poll's `SnapshotPage`) has
    /// more rows after this page's, after this key.
    SnapshotEnd { cursor: Option<&'a str>, rows: u64, more: Option<&'a str> },
}

/// Turns core events into one wire format. Implemented once per protocol module.
pub trait Encoder: Send + Sync + 'static {
    /// Members with equal ids share the frames of [`Encoder::encode`].
    fn id(&self) -> EncodingId;
    /// The protocol's name in metrics (one of [`crate::telemetry::PROTOCOLS`]).
    fn protocol(&self) -> &'static str {
        "other"
    }
    /// Whether a session of this encoding is a client connection, counted in
    /// `walcast_connected_clients` and `walcast_sessions`. A GraphQL operation's is not: its
    /// connection counts itself once, whatever it runs.
    fn is_connection(&self) -> bool {
        true
    }
    /// The frame for `event` on `topic`; it must depend on nothing else, since it is shared by
    /// every member with the same encoding on the topic. `None`: this encoding cannot carry it.
    fn encode(&self, topic: &str, event: &Event<'_>) -> Option<Frame>;
    /// A frame for one member.
    fn encode_direct(&self, topic: &str, address: Option<&str>, message: &Direct<'_>) -> Frame;
    /// For an encoding whose change frames are `head + body + tail`, where only `head` depends
    /// on the topic and the body only on the binding ids and `data`: the envelope for `topic`.
    /// A member's change frames are then [`Frame::Joined`] of that envelope and a body encoded
    /// once per content ([`Encoder::change_body`]), whatever the topic.
    fn change_envelope(&self, _topic: &str) -> Option<Envelope> {
        None
    }
    /// Whether it encodes [`Event::Live`] (a live query may be subscribed over it).
    fn carries_live(&self) -> bool {
        false
    }
    /// The body of a change frame, for encodings with a [`Encoder::change_envelope`].
    fn change_body(&self, _ids: &[u32], _data: &str) -> Option<Utf8Bytes> {
        None
    }
}

/// A session's writes timed for `walcast_dispatch_to_write_seconds`: one in this many.
const SAMPLE_EVERY: u32 = 16;

/// The sending half of a session's queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<(Frame, Instant)>,
    /// Cancelled when the client is too slow; the transport then closes the connection.
    kill: CancellationToken,
}

/// The receiving half, owned by the transport.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: mpsc::Receiver<(Frame, Instant)>,
    /// Cancelled when the core gave up on this client (queue full).
    pub killed: CancellationToken,
    /// When the oldest frame taken since the last write was queued.
    oldest: Option<Instant>,
    /// Writes so far: one in [`SAMPLE_EVERY`] is timed.
    writes: u32,
    /// Queue to socket: recorded once per write, for the oldest frame it carried.
    waited: Histogram,
}

impl OutboxReceiver {
    /// The next frame, when one is queued (`None` once every sender is gone).
    pub async fn recv(&mut self) -> Option<Frame> {
        let (frame, at) = self.rx.recv().await?;
        self.oldest.get_or_insert(at);
        Some(frame)
    }

    /// A frame already queued, if any.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let (frame, at) = self.rx.try_recv().ok()?;
        self.oldest.get_or_insert(at);
        Some(frame)
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The frames taken so far reached the client's socket (or its answer): the oldest one's
    /// wait is recorded, for the first write and one in [`SAMPLE_EVERY`] after (recording
    /// each write of every socket into one shared histogram costs more than the write).
    pub fn written(&mut self) {
        if let Some(at) = self.oldest.take() {
            if self.writes.is_multiple_of(SAMPLE_EVERY) {
                self.waited.record(at.elapsed());
            }
            self.writes = self.writes.wrapping_add(1);
        }
    }
}

/// What became of one queued frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Yes,
    /// The queue was full: the client has been told to disconnect.
    TooSlow,
    /// The client is gone.
    Gone,
}

impl Outbox {
    /// A queue of `capacity` frames; `waited` records how long frames wait in it.
    pub fn new(capacity: usize, waited: Histogram) -> (Outbox, OutboxReceiver) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let kill = CancellationToken::new();
        let receiver = OutboxReceiver { rx, killed: kill.clone(), oldest: None, writes: 0, waited };
        (Outbox { tx, kill }, receiver)
    }

    /// Queues without waiting. A full queue disconnects the client (slow-client policy).
    pub fn send(&self, frame: Frame, metrics: &Metrics) -> Queued {
        match self.tx.try_send((frame, Instant::now())) {
            Ok(()) => {
                metrics.frames_delivered.increment(1);
                Queued::Yes
            }
            Err(TrySendError::Full(_)) => {
                if !self.kill.is_cancelled() {
                    metrics.too_slow();
                    tracing::warn!("client outbound queue full; disconnecting slow client");
                    self.kill.cancel();
                }
                Queued::TooSlow
            }
            Err(TrySendError::Closed(_)) => Queued::Gone,
        }
    }

    /// Queues, waiting for room (replays: the client reads at its own pace).
    pub async fn send_wait(&self, frame: Frame, metrics: &Metrics) -> Queued {
        if self.kill.is_cancelled() {
            return Queued::TooSlow;
        }
        match self.tx.send((frame, Instant::now())).await {
            Ok(()) => {
                metrics.frames_delivered.increment(1);
                Queued::Yes
            }
            Err(_) => Queued::Gone,
        }
    }

    /// Gives up on this client as too slow (the transport closes it).
    pub fn kill(&self, metrics: &Metrics) {
        if !self.kill.is_cancelled() {
            metrics.too_slow();
            tracing::warn!("client fell too far behind while resuming; disconnecting slow client");
            self.kill.cancel();
        }
    }

    /// Whether the client is gone (its receiver dropped).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn is_killed(&self) -> bool {
        self.kill.is_cancelled()
    }
}
