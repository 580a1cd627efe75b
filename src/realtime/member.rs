//! A channel membership: one joined channel of one session, as the registry, the index and
//! the dispatcher hold it, with the ids and the topic key that name it.
//!
//! Owns: `Member` (its outbox, encoder, subject, read rights and the gates of a replay or a
//! hand-off) and `TopicKey`. Must not: reach the hub; what it needs (metrics) is passed in.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use crate::auth::rls::Subject;
use crate::auth::topics::TopicAccess;
use crate::change::Position;
use crate::locks;
use crate::realtime::broadcast::ReplayGate;
use crate::realtime::gate::{GateOf, Held, Place, ResumeGate, XidSnapshot};
use crate::realtime::limits::Metrics;
use crate::realtime::live_query::{LiveQuery, LiveStep};
use crate::realtime::outbox::{Encoder, EncodingId, Envelope, Frame, Outbox};

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
    /// How its protocol addresses messages for this member alone (Phoenix: the `join_ref`),
    /// opaque to the core.
    pub address: Option<Arc<str>>,
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
    pub resume: Option<std::sync::Mutex<ResumeGate>>,
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
    /// Its live query, when it joined with a live binding (then its only binding).
    pub live: Option<LiveQuery>,
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

    /// Its hand-off gate with its outbox (`gate.rs`).
    fn gate(&self) -> GateOf<'_> {
        GateOf { resume: &self.resume, outbox: &self.outbox, live: self.live.as_ref() }
    }

    /// Queues one live frame, through the hand-off gate when there is one. Returns whether it
    /// was queued (or held).
    pub(crate) fn deliver_live(&self, place: Place, frame: Frame, metrics: &Metrics) -> bool {
        self.gate().deliver_live(place, Held::Frame(frame), metrics)
    }

    /// Hands one change's step to its live query, through the hand-off gate. Returns whether
    /// its messages were queued (or it was held).
    pub(crate) fn deliver_step(&self, place: Place, step: LiveStep, metrics: &Metrics) -> bool {
        self.gate().deliver_live(place, Held::Step(step), metrics)
    }

    /// Ends a replay: sends what was held after `through`, then lets live changes pass.
    pub(crate) async fn release(&self, through: Position, metrics: &Metrics) {
        self.gate().release(through, metrics).await;
    }

    /// Ends a snapshot: sends what was held after `through` that the snapshot does not show, then
    /// lets live changes pass.
    pub(crate) async fn release_after_snapshot(
        &self,
        through: Position,
        shown: Arc<XidSnapshot>,
        metrics: &Metrics,
    ) {
        self.gate().release_after_snapshot(through, shown, metrics).await;
    }
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("id", &self.id).field("topic", &self.key.topic).finish_non_exhaustive()
    }
}
