//! [`Hub`]: the core's shared state — the subscription index, the channel registry, limits,
//! metrics, and the database-backed parts (catalog, row-level security, topic policies, change
//! log, snapshots) a gateway wires in. Its channel methods are in `registry.rs`, its delivery of
//! changes in `dispatch/`.
//!
//! Must not: touch sockets or know a wire format.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::auth::rls::{RowSecurity, Subject};
use crate::auth::topics::{TopicAccess, TopicError, TopicPolicies};
use crate::auth::Verifier;
use crate::change::Position;
use crate::locks;
use crate::log::ChangeLog;
use crate::realtime::bus::Peers;
use crate::realtime::channel::Channel;
use crate::realtime::index::SubscriptionIndex;
use crate::realtime::limits::{Limits, Metrics};
use crate::realtime::member::TopicKey;
use crate::realtime::snapshot_source::SnapshotSource;
use crate::subscribe::PublishedCatalog;

pub(crate) struct HubInner {
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
    snapshots: Option<Arc<SnapshotSource>>,
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

/// Where a member id's node seed starts.
const MEMBER_SEED_SHIFT: u32 = 40;

/// The seed of the node that made member id `member`.
pub fn member_seed(member: crate::realtime::member::MemberId) -> u64 {
    member >> MEMBER_SEED_SHIFT
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
    pub snapshots: Option<Arc<SnapshotSource>>,
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
                // Member ids carry this node's seed in their high bits, so that ids made on
                // different nodes differ and a node's presences can be told apart by id.
                next_id: AtomicU64::new((fastrand::u64(1..1 << 23) << MEMBER_SEED_SHIFT) | 1),
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

    /// What `subject` may do on private channel `name` (everything on public channels, and when
    /// authentication is off). A policy that raises denies everything.
    pub async fn topic_access(
        &self,
        private: bool,
        subject: Option<&Subject>,
        name: &str,
    ) -> Result<TopicAccess, TopicError> {
        let (true, Some(subject)) = (private, subject) else { return Ok(TopicAccess::ALL) };
        let Some(topics) = self.topics() else {
            return Err(TopicError::Policy("private channels need a database".into()));
        };
        match topics.access(subject, name).await {
            Err(TopicError::Policy(_)) => Ok(TopicAccess::default()),
            other => other,
        }
    }

    pub fn topics(&self) -> Option<&Arc<TopicPolicies>> {
        self.inner.topics.as_ref()
    }

    pub fn log(&self) -> Option<&ChangeLog> {
        self.inner.log.as_ref()
    }

    pub fn snapshots(&self) -> Option<&Arc<SnapshotSource>> {
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

    /// The high bits of every member id this node makes (see [`member_seed`]).
    pub fn member_seed(&self) -> u64 {
        self.inner.next_id.load(Ordering::Relaxed) >> MEMBER_SEED_SHIFT
    }

    pub(crate) fn node(&self) -> u64 {
        self.inner.node
    }

    /// Broadcast members and presence, by channel (the registry's).
    pub(crate) fn channels(&self) -> &RwLock<HashMap<TopicKey, Channel>> {
        &self.inner.channels
    }

    /// Other gateway nodes, when there are any.
    pub(crate) fn peers(&self) -> Option<&Arc<dyn Peers>> {
        self.inner.peers.as_ref()
    }

    /// Number of channels with members or presence (for tests and metrics).
    pub fn channel_count(&self) -> usize {
        locks::read(&self.inner.channels).len()
    }
}
