//! The realtime core, independent of any wire format or transport.
//!
//! - [`Hub`] — the shared state: the `postgres_changes` subscription index, the channel
//!   registry (topic → broadcast members + presence), limits and metrics.
//! - [`session::Session`] — one connected client as a plain state machine: its joined channels,
//!   its limits, its outbox. Transports (WebSocket today; SSE, plain WebSocket later) decode
//!   their input into session calls and write what the outbox yields.
//! - [`index`] / [`dispatch`] — matching committed changes to bindings and delivering them.
//! - [`presence`], [`broadcast`] — the two pub-sub features; [`bus`] is the seam through which
//!   they reach other gateway nodes.
//! - [`outbox`] — encoded frames, the [`outbox::Encoder`] seam that protocol modules implement,
//!   and the slow-client policy.
//!
//! Must not: touch sockets, know a wire format, or await a client.

pub mod broadcast;
pub mod bus;
pub mod dispatch;
pub mod gate;
pub mod index;
pub mod outbox;
pub mod presence;
mod registry;
pub mod resume;
pub mod session;
pub mod snapshot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::rls::{RowSecurity, Subject};
use crate::auth::topics::{TopicAccess, TopicPolicies};
use crate::auth::Verifier;
use crate::change::Position;
use crate::locks;
use crate::log::ChangeLog;
use crate::realtime::broadcast::ReplayGate;
use crate::realtime::bus::Peers;
use crate::realtime::index::SubscriptionIndex;
use crate::realtime::outbox::{Encoder, EncodingId, Envelope, Outbox};
use crate::realtime::registry::Channel;
use crate::subscribe::PublishedCatalog;

/// Identifies one channel membership (one join of one session) in this process.
pub type MemberId = u64;
/// Identifies one session in this process.
pub type SessionId = u64;

/// A channel: public and private channels of one topic are distinct.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicKey {
    /// The full topic, e.g. `realtime:room`.
    pub topic: Arc<str>,
    pub private: bool,
}

/// The channel name of a topic: `room` for `realtime:room` (what policies and database
/// broadcasts name).
pub fn channel_name(topic: &str) -> &str {
    topic.strip_prefix("realtime:").unwrap_or(topic)
}

/// One joined channel of one session, as the registry and the index hold it.
pub struct Member {
    pub id: MemberId,
    pub session: SessionId,
    pub key: TopicKey,
    /// The Phoenix join reference (for messages addressed to this member alone).
    pub join_ref: Option<Arc<str>>,
    pub outbox: Outbox,
    pub encoder: Arc<dyn Encoder>,
    /// Receives the broadcasts its own session sends (`config.broadcast.self`).
    pub echo_own: bool,
    /// Who it reads changes as (row-level security); `None` when authentication is off. A
    /// token refresh replaces it.
    pub subject: RwLock<Option<Arc<Subject>>>,
    /// What it may read on a private channel ([`READS_BROADCAST`], [`READS_PRESENCE`]); both on
    /// public channels. A token refresh may change it.
    pub reads: AtomicU8,
    /// Set while a broadcast replay is being sent, and afterwards to skip what it replayed.
    pub replay: Option<std::sync::Mutex<ReplayGate>>,
    /// Set when it resumes from a cursor: holds live changes while the log is replayed.
    pub resume: Option<std::sync::Mutex<gate::ResumeGate>>,
    /// The dispatcher's mark of the last change that matched this member (grouping without a
    /// sort); start at 0.
    pub seen: AtomicU64,
    /// Its encoder's id and [`Encoder::change_envelope`] for its topic, made on first use
    /// (kept here so that the delivery path need not reach the encoder); start empty.
    pub change_envelope: OnceLock<Option<(EncodingId, Arc<Envelope>)>>,
    /// Set once the member has been told that changes are withheld from it because an
    /// authorization answer was not a plain yes or no (a check that failed, a table dropped or
    /// altered since the change): told once per membership; start false.
    pub told_withheld: std::sync::atomic::AtomicBool,
}

/// [`Member::reads`]: receives broadcasts.
pub const READS_BROADCAST: u8 = 1;
/// [`Member::reads`]: receives presence state and diffs.
pub const READS_PRESENCE: u8 = 2;

impl Member {
    /// The read bits for `access`.
    pub fn reads_of(access: &TopicAccess) -> u8 {
        u8::from(access.broadcast_read) * READS_BROADCAST + u8::from(access.presence_read) * READS_PRESENCE
    }

    pub fn reads_broadcast(&self) -> bool {
        self.reads.load(Ordering::Relaxed) & READS_BROADCAST != 0
    }

    pub fn reads_presence(&self) -> bool {
        self.reads.load(Ordering::Relaxed) & READS_PRESENCE != 0
    }

    /// Its encoding and the envelope of its change frames, when its encoding has one.
    pub fn change_envelope(&self) -> Option<(EncodingId, &Arc<Envelope>)> {
        let made = self.change_envelope.get_or_init(|| {
            self.encoder.change_envelope(&self.key.topic).map(|e| (self.encoder.id(), Arc::new(e)))
        });
        made.as_ref().map(|(id, e)| (*id, e))
    }

    pub fn subject(&self) -> Option<Arc<Subject>> {
        locks::read(&self.subject).clone()
    }

    pub fn set_subject(&self, subject: Option<Arc<Subject>>) {
        *locks::write(&self.subject) = subject;
    }
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("id", &self.id).field("topic", &self.key.topic).finish_non_exhaustive()
    }
}

/// Per-session limits, with Supabase's defaults (see `config.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Frames queued per session before it counts as too slow.
    pub client_queue: usize,
    pub max_channels: usize,
    /// `postgres_changes` bindings per join.
    pub max_bindings: usize,
    pub max_joins_per_second: u32,
    pub max_events_per_second: u32,
    /// Presence events (track/untrack) per `presence_window`.
    pub max_presence_events: u32,
    pub presence_window: Duration,
    pub max_presence_payload_bytes: usize,
    pub max_broadcast_payload_bytes: usize,
    /// `postgres_changes` records larger than this are sent with only their small values.
    pub max_record_bytes: usize,
    /// How long a connection that must authenticate by message (`/v1/ws`) has to do so.
    pub auth_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let c = crate::config::Config::default();
        Limits::from_config(&c)
    }
}

impl Limits {
    pub fn from_config(c: &crate::config::Config) -> Limits {
        Limits {
            client_queue: c.client_queue,
            max_channels: c.max_channels_per_socket,
            max_bindings: c.max_bindings_per_join,
            max_joins_per_second: c.max_joins_per_second,
            max_events_per_second: c.max_events_per_second,
            max_presence_events: c.max_presence_events,
            presence_window: Duration::from_secs(c.presence_window_secs),
            max_presence_payload_bytes: c.max_presence_payload_bytes,
            max_broadcast_payload_bytes: c.max_broadcast_payload_bytes,
            max_record_bytes: c.max_record_bytes,
            auth_timeout: Duration::from_secs(c.auth.timeout_secs),
        }
    }
}

/// Counters shared by the core, the transports and `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub clients: AtomicI64,
    pub channels: AtomicI64,
    pub subscriptions: AtomicI64,
    pub changes_dispatched: AtomicU64,
    pub frames_delivered: AtomicU64,
    pub slow_client_disconnects: AtomicU64,
    /// Event streams that fell behind and went on from the change log instead of being dropped.
    pub slow_client_catchups: AtomicU64,
    pub broadcasts_received: AtomicU64,
    /// Binary broadcasts a member's encoding could not carry (Phoenix 1.0.0).
    pub broadcasts_undeliverable: AtomicU64,
    pub presence_events: AtomicU64,
    pub rate_limited: AtomicU64,
    /// `walcast.rls_check` calls (one per table per batch of changes).
    pub rls_checks: AtomicU64,
    /// Change deliveries withheld by row-level security (per subscriber and change).
    pub rls_withheld: AtomicU64,
    /// Tokens refused (connect, join, refresh, REST) and channels closed when their token expired.
    pub auth_refused: AtomicU64,
}

struct HubInner {
    /// `postgres_changes` bindings.
    index: RwLock<SubscriptionIndex>,
    /// Broadcast members and presence, by channel.
    channels: RwLock<HashMap<TopicKey, Channel>>,
    limits: Limits,
    metrics: Metrics,
    /// Published tables, for resolving bindings; `None` where change capture is not wired
    /// (unit tests of broadcast and presence).
    catalog: Option<Arc<PublishedCatalog>>,
    /// Other gateway nodes; `None` runs a single node.
    peers: Option<Arc<dyn Peers>>,
    /// True while database broadcasts flow (the replication stream is connected).
    replication_live: Option<watch::Receiver<bool>>,
    verifier: Verifier,
    rls: Option<Arc<RowSecurity>>,
    topics: Option<Arc<TopicPolicies>>,
    log: Option<ChangeLog>,
    snapshots: Option<Arc<snapshot::SnapshotSource>>,
    /// The last change matched against the index (written by the dispatcher under the index's
    /// read lock, so a reader holding the write lock sees a consistent cut: later changes will
    /// be matched against what it adds).
    matched_lsn: AtomicU64,
    matched_seq: std::sync::atomic::AtomicU32,
    /// The transactions matched last, (commit LSN, xid), oldest first: a snapshot checks that
    /// those it should contain are visible to it.
    recent: std::sync::Mutex<std::collections::VecDeque<(crate::replication::lsn::Lsn, u32)>>,
    /// The last database broadcast published with its place in the change log (set before it
    /// is delivered, so a member added before reading it receives every later one).
    broadcast_logged: std::sync::Mutex<Position>,
    /// Equal subjects share one `Arc`, so the dispatcher groups subscribers by pointer.
    subjects: std::sync::Mutex<HashMap<Subject, std::sync::Weak<Subject>>>,
    next_id: AtomicU64,
    /// Random per process: makes presence refs unique across nodes.
    node: u64,
}

/// How many recently matched transactions the hub remembers (see [`Hub::recent_txns`]).
pub(crate) const RECENT_TXNS: usize = 1024;

/// The core's shared state. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("node", &self.inner.node).finish_non_exhaustive()
    }
}

/// What a [`Hub`] is built from; everything but the limits is optional.
#[derive(Default)]
pub struct HubParts {
    pub limits: Limits,
    /// Resolves `postgres_changes` bindings; without it they are refused.
    pub catalog: Option<Arc<PublishedCatalog>>,
    pub peers: Option<Arc<dyn Peers>>,
    /// Whether the replication stream is live (for `replication_ready`).
    pub replication_live: Option<watch::Receiver<bool>>,
    /// Verifies tokens at join and refresh; the default accepts every client.
    pub verifier: Verifier,
    /// Row-level security for `postgres_changes`; `None` delivers every change to every
    /// matching subscriber (authentication off, or no database).
    pub rls: Option<Arc<RowSecurity>>,
    /// Private channel policies and broadcast replay (`realtime.messages`); `None` without a
    /// database: private channels of authenticated clients are then refused.
    pub topics: Option<Arc<TopicPolicies>>,
    /// The durable change log (cursors and resume); `None` keeps no history.
    pub log: Option<ChangeLog>,
    /// Where initial snapshots are read; `None` refuses them.
    pub snapshots: Option<Arc<snapshot::SnapshotSource>>,
}

impl Hub {
    pub fn new(parts: HubParts) -> Hub {
        Hub {
            inner: Arc::new(HubInner {
                index: RwLock::new(SubscriptionIndex::default()),
                channels: RwLock::new(HashMap::new()),
                limits: parts.limits,
                metrics: Metrics::default(),
                catalog: parts.catalog,
                peers: parts.peers,
                replication_live: parts.replication_live,
                verifier: parts.verifier,
                rls: parts.rls,
                topics: parts.topics,
                log: parts.log,
                snapshots: parts.snapshots,
                matched_lsn: AtomicU64::new(0),
                matched_seq: Default::default(),
                recent: Default::default(),
                broadcast_logged: std::sync::Mutex::new(Position::ZERO),
                subjects: std::sync::Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                node: fastrand::u64(..),
            }),
        }
    }

    /// With these limits and nothing else (broadcast and presence only).
    pub fn with_limits(limits: Limits) -> Hub {
        Hub::new(HubParts { limits, ..HubParts::default() })
    }

    /// Whether the replication stream is live; `None` when this hub has none.
    pub fn replication_live(&self) -> Option<watch::Receiver<bool>> {
        self.inner.replication_live.clone()
    }

    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    pub fn rls(&self) -> Option<&Arc<RowSecurity>> {
        self.inner.rls.as_ref()
    }

    pub fn topics(&self) -> Option<&Arc<TopicPolicies>> {
        self.inner.topics.as_ref()
    }

    pub fn log(&self) -> Option<&ChangeLog> {
        self.inner.log.as_ref()
    }

    pub fn snapshots(&self) -> Option<&Arc<snapshot::SnapshotSource>> {
        self.inner.snapshots.as_ref()
    }

    /// Records that the dispatcher matched the change at `p`; call with the index read lock held.
    pub(crate) fn set_matched(&self, p: Position, xid: u32) {
        if self.inner.matched_lsn.swap(p.lsn.0, Ordering::Relaxed) != p.lsn.0 {
            let mut recent = locks::lock(&self.inner.recent);
            if recent.len() == RECENT_TXNS {
                recent.pop_front();
            }
            recent.push_back((p.lsn, xid));
        }
        self.inner.matched_seq.store(p.seq, Ordering::Relaxed);
    }

    /// Records the database broadcast at `p` as published; call before delivering it.
    pub(crate) fn set_broadcast_logged(&self, p: Position) {
        let mut last = locks::lock(&self.inner.broadcast_logged);
        *last = (*last).max(p);
    }

    /// The last database broadcast published; read after adding a member: every later one
    /// reaches it.
    pub(crate) fn broadcast_logged(&self) -> Position {
        *locks::lock(&self.inner.broadcast_logged)
    }

    /// The transactions matched last, (commit LSN, xid), oldest first.
    pub(crate) fn recent_txns(&self) -> Vec<(crate::replication::lsn::Lsn, u32)> {
        locks::lock(&self.inner.recent).iter().copied().collect()
    }

    /// The last change matched; read with the index write lock held for a consistent cut.
    pub(crate) fn matched(&self) -> Position {
        Position {
            lsn: crate::replication::lsn::Lsn(self.inner.matched_lsn.load(Ordering::Relaxed)),
            seq: self.inner.matched_seq.load(Ordering::Relaxed),
        }
    }

    /// The shared `Arc` for a subject equal to `subject`.
    pub fn intern_subject(&self, subject: Subject) -> Arc<Subject> {
        let mut subjects = locks::lock(&self.inner.subjects);
        if let Some(s) = subjects.get(&subject).and_then(std::sync::Weak::upgrade) {
            return s;
        }
        // Forget subjects nobody holds once they could be half the map.
        if subjects.len() >= 1024 && subjects.len().is_power_of_two() {
            subjects.retain(|_, w| w.strong_count() > 0);
        }
        let s = Arc::new(subject.clone());
        subjects.insert(subject, Arc::downgrade(&s));
        s
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn catalog(&self) -> Option<&Arc<PublishedCatalog>> {
        self.inner.catalog.as_ref()
    }

    /// The subscription index (the dispatcher reads it; sessions add and remove bindings).
    pub fn index(&self) -> &RwLock<SubscriptionIndex> {
        &self.inner.index
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn node(&self) -> u64 {
        self.inner.node
    }

    /// Number of channels with members or presence (for tests and metrics).
    pub fn channel_count(&self) -> usize {
        locks::read(&self.inner.channels).len()
    }
}
