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

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::rls::{Access, Hidden, KeyOnlyDeletes, Lane, Request, Subject, Table, Verdict};
use crate::change::Position;
use crate::change::{Change, ChangeEvent, ChangeKind, DbBroadcast, ReplicaIdentity, View};
use crate::locks;
use crate::log::Appender;
use crate::realtime::bus::BusMessage;
use crate::realtime::gate::Place;
use crate::realtime::hub::Hub;
use crate::realtime::index::Subscription;
use crate::realtime::member::{Member, TopicKey};
use crate::realtime::outbox::{Direct, EncodingId, Event, Frame};
use crate::replication::ack::Acknowledgement;
use crate::replication::lsn::Lsn;

/// Events gathered into one batch at most.
const MAX_BATCH: usize = 4096;

/// Tries of a row check that the database answers with an error (a policy or the check itself
/// raising, a statement timeout) before the rows it was about are withheld.
const CHECK_TRIES: usize = 3;

/// What a subscriber is told when a check failed as a whole.
const CHECK_FAILED: &str = "the row-level security check failed";

/// What a subscriber is told when its check gave no answer for it.
const NO_ANSWER: &str = "the row-level security check gave no answer";

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
            Some(_) => {
                hub.metrics().changes_dispatched.fetch_add(1, Ordering::Relaxed);
            }
            None => batch.push(hub, ChangeEvent::Change(change), &mut scratch.groups),
        },
        ChangeEvent::Broadcast(b) => publish(hub, b),
        ChangeEvent::Commit { end_lsn, .. } => ack.advance(end_lsn),
    }
}

fn publish(hub: &Hub, mut b: DbBroadcast) {
    hub.metrics().broadcasts_received.fetch_add(1, Ordering::Relaxed);
    if let Some(log) = hub.log() {
        let cursor = log.cursor(b.position).to_string().into();
        b.message.logged = Some(crate::change::broadcast::Logged { position: b.position, cursor });
        hub.set_broadcast_logged(b.position);
    }
    hub.publish(BusMessage::Broadcast {
        key: TopicKey { topic: b.topic, private: b.private },
        origin: None,
        message: Arc::new(b.message),
    });
}

/// A `select` column list, compared by content.
type Select = Option<Arc<[Arc<str>]>>;
/// What makes two change frames identical: encoding, topic, binding ids and which `data`.
type FrameKey = (EncodingId, Arc<str>, Ids, usize);

/// Binding ids as a cache key, inline for the common case of a few.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Ids {
    Inline([u32; 4], u8),
    Heap(Vec<u32>),
}

impl Ids {
    fn of(ids: &[u32]) -> Ids {
        if ids.len() <= 4 {
            let mut a = [0; 4];
            a[..ids.len()].copy_from_slice(ids);
            Ids::Inline(a, ids.len() as u8)
        } else {
            Ids::Heap(ids.to_vec())
        }
    }

    fn push(&mut self, id: u32) {
        match self {
            Ids::Inline(a, n) if (*n as usize) < a.len() => {
                a[*n as usize] = id;
                *n += 1;
            }
            Ids::Inline(a, n) => {
                let mut v = a[..*n as usize].to_vec();
                v.push(id);
                *self = Ids::Heap(v);
            }
            Ids::Heap(v) => v.push(id),
        }
    }

    fn as_slice(&self) -> &[u32] {
        match self {
            Ids::Inline(a, n) => &a[..*n as usize],
            Ids::Heap(v) => v,
        }
    }
}

/// How one member receives one change.
#[derive(Debug, Clone, PartialEq)]
enum Decision {
    Deliver {
        hidden: Hidden,
        strip_old: bool,
    },
    /// Not visible to it (a plain no).
    Withhold,
    /// Withheld because the answer was not a yes or a no (a check that failed, a table dropped
    /// or altered since the change): the member is told why, once.
    Fail(Arc<str>),
    /// Needs a row check first.
    Check,
}

const DELIVER_ALL: Decision = Decision::Deliver { hidden: None, strip_old: false };

/// What can be decided without a query: no subject (authentication off) → everything; a cached
/// answer for the role that does not depend on the row.
fn decide_cached(hub: &Hub, change: &Change, subject: Option<&Arc<Subject>>) -> Decision {
    let Some(rls) = hub.rls() else { return DELIVER_ALL };
    let Some(subject) = subject else { return DELIVER_ALL };
    match rls.cached(&change.relation, &subject.role) {
        Some(Access::Open(hidden)) => Decision::Deliver { hidden, strip_old: false },
        Some(Access::Denied) => Decision::Withhold,
        Some(Access::Failed(reason)) => Decision::Fail(reason),
        Some(Access::Rows(_)) | None => Decision::Check,
    }
}

/// Buffers reused across changes so matching allocates little in the steady state.
#[derive(Default)]
pub struct Scratch {
    /// Rendered `data` objects of the current change, by view (content).
    data: Vec<(Select, Hidden, bool, String)>,
    /// Frames of the current change. Keys hold topics, so a fast seeded hash: one lookup per
    /// member on the delivery path.
    frames: HashMap<FrameKey, Option<Frame>, foldhash::fast::RandomState>,
    /// Bodies of the current change's frames for encodings with an envelope (any topic).
    bodies: HashMap<(EncodingId, Ids, usize), Option<Utf8Bytes>, foldhash::fast::RandomState>,
    ids: Vec<u32>,
    decisions: Vec<Decision>,
    /// Decisions of the current change by subject (interned, so by pointer).
    memo: HashMap<usize, Decision, PtrHash>,
    /// Groupings of matches kept across changes and batches.
    groups: Groups,
    /// The current change's position and cursor (with a change log).
    position: Position,
    xid: u32,
    cursor: Option<String>,
    /// Replays collect their frames here instead of queueing them (they wait for room).
    pub(crate) collect: Option<Vec<Frame>>,
}

impl Scratch {
    fn start(&mut self, hub: &Hub, change: &Change) {
        self.data.clear();
        self.frames.clear();
        self.bodies.clear();
        self.position = change.position();
        self.xid = change.xid;
        self.cursor =
            if change.snapshot { None } else { hub.log().map(|log| log.cursor(self.position).to_string()) };
    }

    /// Renders (once per view) and queues one change to one member. Returns whether queued.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        hub: &Hub,
        change: &Change,
        member: &Member,
        ids: &[u32],
        select: &Select,
        hidden: &Hidden,
        strip_old: bool,
        shared: bool,
    ) -> bool {
        let at = self.data.iter().position(|(s, h, o, _)| {
            s.as_deref() == select.as_deref() && h.as_deref() == hidden.as_deref() && *o == strip_old
        });
        let data_at = match at {
            Some(at) => at,
            None => {
                let view = View {
                    select: select.as_deref(),
                    hidden: hidden.as_deref(),
                    strip_old,
                    cursor: self.cursor.as_deref(),
                };
                // Checked as UTF-8 once here, so that no member's frame needs checking again.
                let data = change.render_data(view, hub.limits().max_record_bytes);
                let data = String::from_utf8(data)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                self.data.push((select.clone(), hidden.clone(), strip_old, data));
                self.data.len() - 1
            }
        };
        let data = &self.data[data_at].3;
        let event = Event::Change {
            ids,
            data,
            cursor: self.cursor.as_deref(),
            kind: change.kind,
            snapshot: change.snapshot,
        };
        // Most changes reach one member: encode the whole frame directly (one allocation), and
        // share only what can repeat.
        let frame = if !shared {
            member.encoder.encode(&member.key.topic, &event)
        } else if let Some((encoding, envelope)) = member.change_envelope() {
            // The member's envelope around a body shared whatever the topic; joined by its
            // transport, so that the per-member copy is not made here.
            let key = (encoding, Ids::of(ids), data_at);
            let body = self.bodies.entry(key).or_insert_with(|| member.encoder.change_body(ids, data));
            body.clone().map(|body| Frame::Joined { envelope: Arc::clone(envelope), body })
        } else {
            let key = (member.encoder.id(), Arc::clone(&member.key.topic), Ids::of(ids), data_at);
            self.frames.entry(key).or_insert_with(|| member.encoder.encode(&member.key.topic, &event)).clone()
        };
        match (frame, self.collect.as_mut()) {
            (Some(frame), Some(collected)) => {
                collected.push(frame);
                true
            }
            (Some(frame), None) => {
                member.deliver_live(Place::Change(self.position, self.xid), frame, hub.metrics())
            }
            (None, _) => false,
        }
    }
}

/// Hashes addresses (`usize` keys) with one multiplication: the maps keyed by interned
/// pointers are on the per-member path.
#[derive(Default, Clone, Copy)]
struct PtrHasher(u64);

impl std::hash::Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}

type PtrHash = std::hash::BuildHasherDefault<PtrHasher>;

/// Puts each member's matching subscriptions next to each other (ids ascending) without exact
/// repeats. Usually every member matched once: one pass that stamps each member says so, and
/// the sort is skipped.
fn group_by_member(hub: &Hub, matched: &mut Vec<&Arc<Subscription>>) {
    if matched.len() < 2 {
        return;
    }
    let stamp = hub.next_id();
    if matched.iter().any(|s| s.member.seen.swap(stamp, Ordering::Relaxed) == stamp) {
        matched.sort_unstable_by_key(|s| (Arc::as_ptr(&s.member) as usize, s.binding.id));
        matched.dedup_by_key(|s| (Arc::as_ptr(&s.member) as usize, s.binding.id));
    }
}

/// Matches and delivers one change unless a row check is needed first (`None`: nothing was
/// delivered; the caller checks and delivers it). Returns the number of frames queued.
pub fn dispatch(hub: &Hub, change: &Change, scratch: &mut Scratch) -> Option<usize> {
    let index = locks::read(hub.index());
    hub.set_matched(change.position(), change.xid);
    if index.is_empty() {
        return Some(0);
    }
    // A grouping kept from earlier changes says, per subject, whether a check is needed, without
    // visiting every member.
    let cacheable = hub.rls().is_some() && index.row_independent(change);
    if let Some(g) = cacheable.then(|| cached_group(&scratch.groups, &index, change)).flatten() {
        if g.subjects.iter().any(|s| decide_cached(hub, change, s.as_ref()) == Decision::Check) {
            return None;
        }
    }
    let mut matched: Vec<&Arc<Subscription>> = Vec::new();
    index.matching(change, |sub| matched.push(sub));
    if matched.is_empty() {
        return Some(0);
    }
    // One push per member, with all of its matching binding ids.
    group_by_member(hub, &mut matched);
    scratch.decisions.clear();
    if hub.rls().is_some() {
        scratch.memo.clear();
        let mut i = 0;
        while i < matched.len() {
            let member = &matched[i].member;
            let decision = match member.subject() {
                None => DELIVER_ALL,
                Some(s) => scratch
                    .memo
                    .entry(Arc::as_ptr(&s) as usize)
                    .or_insert_with(|| decide_cached(hub, change, Some(&s)))
                    .clone(),
            };
            if decision == Decision::Check {
                return None;
            }
            scratch.decisions.push(decision);
            while i < matched.len() && Arc::ptr_eq(&matched[i].member, member) {
                i += 1;
            }
        }
    }
    scratch.start(hub, change);
    let shared = matched.len() > 1;
    let mut delivered = 0;
    let mut ids = std::mem::take(&mut scratch.ids);
    let mut i = 0;
    let mut group = 0;
    while i < matched.len() {
        let sub = matched[i];
        let member = &sub.member;
        ids.clear();
        while i < matched.len() && Arc::ptr_eq(&matched[i].member, member) {
            ids.push(matched[i].binding.id);
            i += 1;
        }
        let decision = scratch.decisions.get(group).cloned().unwrap_or(DELIVER_ALL);
        group += 1;
        match decision {
            Decision::Deliver { hidden, strip_old } => {
                if scratch.deliver(hub, change, member, &ids, &sub.binding.select, &hidden, strip_old, shared)
                {
                    delivered += 1;
                }
            }
            Decision::Fail(reason) => {
                hub.metrics().rls_withheld.fetch_add(1, Ordering::Relaxed);
                tell_withheld(hub, scratch, member, change, &reason);
            }
            Decision::Withhold | Decision::Check => {
                hub.metrics().rls_withheld.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    scratch.ids = ids;
    Some(delivered)
}

/// One member's match of a batched change.
struct Target {
    member: Arc<Member>,
    ids: Ids,
    select: Select,
}

/// The members a change reaches, grouped by subject. Changes of one table and kind share one
/// grouping while the index's generation lasts, when no binding that could match them has a
/// filter (then matching does not depend on the row).
struct Grouped {
    /// The distinct subjects (`None`: authentication off).
    subjects: Vec<Option<Arc<Subject>>>,
    /// Ordered by subject: `ranges[i]` are the targets of `subjects[i]`.
    targets: Vec<Target>,
    ranges: Vec<std::ops::Range<usize>>,
}

impl Grouped {
    /// Matches `change` and groups the members by subject.
    fn build(hub: &Hub, index: &crate::realtime::index::SubscriptionIndex, change: &Change) -> Grouped {
        let mut matched: Vec<&Arc<Subscription>> = Vec::new();
        index.matching(change, |sub| matched.push(sub));
        group_by_member(hub, &mut matched);
        let mut subjects: Vec<Option<Arc<Subject>>> = Vec::new();
        let mut by_subject: HashMap<usize, u32, PtrHash> = HashMap::default();
        let mut targets: Vec<(u32, Target)> = Vec::with_capacity(matched.len());
        for sub in matched {
            if let Some((_, t)) = targets.last_mut().filter(|(_, t)| Arc::ptr_eq(&t.member, &sub.member)) {
                t.ids.push(sub.binding.id);
                continue;
            }
            // Most members share a subject seen already: look it up without cloning it.
            let seen = locks::read(&sub.member.subject).as_ref().map_or(0, |s| Arc::as_ptr(s) as usize);
            let at = match by_subject.get(&seen) {
                Some(at) => *at,
                None => {
                    let subject = sub.member.subject();
                    let key = subject.as_ref().map_or(0, |s| Arc::as_ptr(s) as usize);
                    subjects.push(subject);
                    let at = (subjects.len() - 1) as u32;
                    by_subject.insert(key, at);
                    at
                }
            };
            targets.push((
                at,
                Target {
                    member: Arc::clone(&sub.member),
                    ids: Ids::of(&[sub.binding.id]),
                    select: sub.binding.select.clone(),
                },
            ));
        }
        targets.sort_by_key(|(at, _)| *at);
        let mut ranges = Vec::with_capacity(subjects.len());
        let mut start = 0;
        for at in 0..subjects.len() {
            let n = targets[start..].iter().take_while(|(a, _)| *a as usize == at).count();
            ranges.push(start..start + n);
            start += n;
        }
        Grouped { subjects, targets: targets.into_iter().map(|(_, t)| t).collect(), ranges }
    }
}

/// A cached grouping: the index generation and relation it was computed under.
type GroupEntry = (u64, Arc<crate::change::Relation>, Arc<Grouped>);

/// The grouping kept for `change`'s table and kind, if computed under the current index
/// generation and the change's relation. Only for changes whose matches do not depend on the
/// row (`SubscriptionIndex::row_independent`, which the caller checks).
fn cached_group<'a>(
    groups: &'a Groups,
    index: &crate::realtime::index::SubscriptionIndex,
    change: &Change,
) -> Option<&'a Arc<Grouped>> {
    let (generation, relation, g) = groups.get(&(change.relation.id, change.kind))?;
    (*generation == index.generation() && Arc::ptr_eq(relation, &change.relation)).then_some(g)
}

struct Pending {
    change: Change,
    group: Arc<Grouped>,
    /// What is known for each subject of the group before the check.
    decisions: Vec<Decision>,
    /// Positions (1-based) of the new and old row versions in their table's row list; 0 = not
    /// checked.
    new_row: u32,
    old_row: u32,
}

enum Item {
    Change(Pending),
    Broadcast(DbBroadcast),
    Commit(Lsn),
}

/// The rows of one table in a batch and the subjects to check them for.
struct TableCheck {
    /// A JSON array under construction.
    rows: Vec<u8>,
    row_count: u32,
    subjects: HashMap<Arc<Subject>, u32>,
    requests: Vec<(Arc<Subject>, Vec<u32>)>,
    /// For each group of the batch (by address: the batch holds it), the request of each of its
    /// subjects (`NO_REQUEST` while it needs none), so that a group shared by many changes looks
    /// its subjects up once per batch rather than once per change.
    slots: HashMap<usize, Vec<u32>, PtrHash>,
    verdicts: Vec<Verdict>,
}

const NO_REQUEST: u32 = u32::MAX;

impl TableCheck {
    fn new() -> TableCheck {
        TableCheck {
            rows: b"[".to_vec(),
            row_count: 0,
            subjects: HashMap::new(),
            requests: Vec::new(),
            slots: HashMap::default(),
            verdicts: Vec::new(),
        }
    }

    fn add_row(&mut self, change: &Change, old: bool) -> u32 {
        if self.row_count > 0 {
            self.rows.push(b',');
        }
        change.write_row_text(&mut self.rows, old);
        self.row_count += 1;
        self.row_count
    }

    /// Asks for `rows` (0 = none) to be checked for the subjects of `group` whose decision is
    /// `Check`.
    fn want(&mut self, group: &Arc<Grouped>, decisions: &[Decision], rows: [u32; 2]) {
        let slots = self
            .slots
            .entry(Arc::as_ptr(group) as usize)
            .or_insert_with(|| vec![NO_REQUEST; group.subjects.len()]);
        for ((slot, subject), decision) in slots.iter_mut().zip(&group.subjects).zip(decisions) {
            let (Decision::Check, Some(subject)) = (decision, subject) else { continue };
            if *slot == NO_REQUEST {
                *slot = *self.subjects.entry(Arc::clone(subject)).or_insert_with(|| {
                    self.requests.push((Arc::clone(subject), Vec::new()));
                    (self.requests.len() - 1) as u32
                });
            }
            let wanted = &mut self.requests[*slot as usize].1;
            for r in rows.into_iter().filter(|r| *r > 0) {
                if wanted.last() != Some(&r) {
                    wanted.push(r);
                }
            }
        }
    }

    /// The verdict for the subject at `at` in `group`, once checked.
    fn verdict(&self, group: &Arc<Grouped>, at: usize) -> Option<&Verdict> {
        let slot = *self.slots.get(&(Arc::as_ptr(group) as usize))?.get(at)?;
        self.verdicts.get(slot as usize)
    }
}

#[derive(Default)]
struct Batch {
    items: Vec<Item>,
    /// By table oid; each keeps the relation the rows were decoded with.
    tables: HashMap<u32, (Arc<crate::change::Relation>, TableCheck)>,
}

/// Groupings of row-independent matches by (table, kind), with the index generation and
/// relation they were computed under; shared by every batch.
type Groups = HashMap<(u32, ChangeKind), GroupEntry>;

impl Batch {
    fn push(&mut self, hub: &Hub, event: ChangeEvent, groups: &mut Groups) {
        match event {
            ChangeEvent::Change(change) => {
                let pending = self.match_change(hub, change, groups);
                self.items.push(Item::Change(pending));
            }
            ChangeEvent::Broadcast(b) => self.items.push(Item::Broadcast(b)),
            ChangeEvent::Commit { end_lsn, .. } => self.items.push(Item::Commit(end_lsn)),
        }
    }

    fn match_change(&mut self, hub: &Hub, change: Change, groups: &mut Groups) -> Pending {
        let index = locks::read(hub.index());
        hub.set_matched(change.position(), change.xid);
        let group = if index.row_independent(&change) {
            match cached_group(groups, &index, &change) {
                Some(g) => Arc::clone(g),
                None => {
                    // Groupings of an older generation hold members that may have left.
                    groups.retain(|_, (generation, _, _)| *generation == index.generation());
                    let g = Arc::new(Grouped::build(hub, &index, &change));
                    let entry = (index.generation(), Arc::clone(&change.relation), Arc::clone(&g));
                    groups.insert((change.relation.id, change.kind), entry);
                    g
                }
            }
        } else {
            Arc::new(Grouped::build(hub, &index, &change))
        };
        self.pending(hub, change, group)
    }

    /// The pending delivery of `change` to `group`, its rows queued for checking where needed.
    fn pending(&mut self, hub: &Hub, change: Change, group: Arc<Grouped>) -> Pending {
        // The cached answer depends on the role only: looked up once per run of equal roles.
        let mut last: Option<(&Arc<str>, Decision)> = None;
        let decisions = group
            .subjects
            .iter()
            .map(|s| match (s, &last) {
                (Some(s), Some((role, d))) if *role == &s.role => d.clone(),
                _ => {
                    let d = decide_cached(hub, &change, s.as_ref());
                    last = s.as_ref().map(|s| (&s.role, d.clone()));
                    d
                }
            })
            .collect();
        let mut pending = Pending { change, group, decisions, new_row: 0, old_row: 0 };
        if pending.decisions.contains(&Decision::Check) {
            let change = &pending.change;
            let (_, table) = self
                .tables
                .entry(change.relation.id)
                .or_insert_with(|| (Arc::clone(&change.relation), TableCheck::new()));
            if change.new.is_some() {
                pending.new_row = table.add_row(change, false);
            }
            if has_full_old_row(change) {
                pending.old_row = table.add_row(change, true);
            }
            table.want(&pending.group, &pending.decisions, [pending.new_row, pending.old_row]);
        }
        pending
    }

    /// Runs the row checks of this batch, one query per table. While the database cannot be
    /// reached, it retries (nothing can be checked for anyone, and nothing is delivered or
    /// acknowledged meanwhile); a check the database answered with an error is tried
    /// `CHECK_TRIES` times, then denies every subject of that table's rows (fail closed).
    async fn authorize(&mut self, hub: &Hub, lane: Lane) {
        let Some(rls) = hub.rls() else { return };
        for (relation, table) in self.tables.values_mut() {
            table.rows.push(b']');
            let rows = String::from_utf8_lossy(&table.rows);
            let all = table.row_count as usize;
            let requests: Vec<Request<'_>> = table
                .requests
                .iter()
                .map(|(s, w)| Request { subject: s, wanted: (w.len() < all).then_some(&w[..]) })
                .collect();
            let mut backoff = Duration::from_millis(50);
            let mut answered_errors = 0;
            let verdicts = loop {
                hub.metrics().rls_checks.fetch_add(1, Ordering::Relaxed);
                match rls.check(lane, Table::Relation(relation), &requests, &rows).await {
                    Ok(v) => break v,
                    Err(e) => {
                        let unreachable = e.is_unreachable();
                        answered_errors += usize::from(!unreachable);
                        let cause = std::error::Error::source(&e).map(ToString::to_string);
                        let table = format!("{}.{}", relation.schema, relation.table);
                        if answered_errors >= CHECK_TRIES {
                            tracing::warn!(error = %e, cause = ?cause, %table,
                                "row-level security check failed; the batch's changes of this table are withheld");
                            let failed =
                                Verdict { access: Access::Failed(CHECK_FAILED.into()), visible: Vec::new() };
                            break vec![failed; requests.len()];
                        }
                        tracing::warn!(error = %e, cause = ?cause, %table, unreachable,
                            "row-level security check failed; retrying (delivery waits)");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            for ((subject, _), v) in table.requests.iter().zip(&verdicts) {
                rls.remember(relation, &subject.role, &v.access);
            }
            table.verdicts = verdicts;
        }
    }

    /// Delivers every item in order, then forgets the batch.
    fn deliver(&mut self, hub: &Hub, ack: &Acknowledgement, scratch: &mut Scratch) {
        let key_only_deletes = hub.rls().map(|r| r.key_only_deletes()).unwrap_or_default();
        for item in self.items.drain(..) {
            match item {
                Item::Change(p) => {
                    scratch.start(hub, &p.change);
                    let table = self.tables.get(&p.change.relation.id).map(|(_, t)| t);
                    let decisions: Vec<Decision> = p
                        .decisions
                        .iter()
                        .enumerate()
                        .map(|(at, decision)| match (decision, table) {
                            (Decision::Check, Some(table)) => match table.verdict(&p.group, at) {
                                Some(v) => resolve(&p, v, key_only_deletes),
                                None => Decision::Fail(NO_ANSWER.into()),
                            },
                            (Decision::Check, None) => Decision::Fail(NO_ANSWER.into()),
                            (d, _) => d.clone(),
                        })
                        .collect();
                    let shared = p.group.targets.len() > 1;
                    let mut withheld = 0;
                    for (decision, range) in decisions.iter().zip(&p.group.ranges) {
                        let Decision::Deliver { hidden, strip_old } = decision else {
                            withheld += range.len() as u64;
                            if let Decision::Fail(reason) = decision {
                                for t in &p.group.targets[range.clone()] {
                                    tell_withheld(hub, scratch, &t.member, &p.change, reason);
                                }
                            }
                            continue;
                        };
                        for t in &p.group.targets[range.clone()] {
                            let ids = t.ids.as_slice();
                            scratch.deliver(
                                hub, &p.change, &t.member, ids, &t.select, hidden, *strip_old, shared,
                            );
                        }
                    }
                    hub.metrics().rls_withheld.fetch_add(withheld, Ordering::Relaxed);
                    hub.metrics().changes_dispatched.fetch_add(1, Ordering::Relaxed);
                }
                Item::Broadcast(b) => publish(hub, b),
                Item::Commit(end_lsn) => ack.advance(end_lsn),
            }
        }
        self.tables.clear();
    }
}

/// Tells `member`, once per membership, that changes of `change`'s table are withheld from it
/// and why. In a replay the notice goes with the replayed frames, in order.
fn tell_withheld(hub: &Hub, scratch: &mut Scratch, member: &Member, change: &Change, reason: &str) {
    if member.told_withheld.swap(true, Ordering::Relaxed) {
        return;
    }
    let relation = &change.relation;
    let message = format!(
        "changes of {}.{} are withheld from this subscription: {reason}",
        relation.schema, relation.table
    );
    let notice = Direct::System { extension: "postgres_changes", status: "error", message: &message };
    let frame = member.encoder.encode_direct(&member.key.topic, member.address.as_deref(), &notice);
    match scratch.collect.as_mut() {
        Some(collected) => collected.push(frame),
        None => {
            member.outbox.send(frame, hub.metrics());
        }
    }
}

/// The old row carries every column (REPLICA IDENTITY FULL), so a policy can be evaluated on it.
fn has_full_old_row(change: &Change) -> bool {
    change.old.is_some() && change.relation.replica_identity == ReplicaIdentity::Full
}

/// The decision for one subscriber once its verdict is known. The version a subscriber must be
/// able to see is the one the change carries: the new row of INSERT and UPDATE, the old row of
/// DELETE. An UPDATE's `old_record` is withheld unless the old version was visible too.
fn resolve(p: &Pending, v: &Verdict, key_only_deletes: KeyOnlyDeletes) -> Decision {
    let hidden = match &v.access {
        Access::Open(h) => return Decision::Deliver { hidden: h.clone(), strip_old: false },
        Access::Rows(h) => h.clone(),
        Access::Denied => return Decision::Withhold,
        Access::Failed(reason) => return Decision::Fail(Arc::clone(reason)),
    };
    let change = &p.change;
    match change.kind {
        ChangeKind::Insert | ChangeKind::Update => {
            if p.new_row == 0 || !v.sees(p.new_row) {
                return Decision::Withhold;
            }
            let strip_old = change.old.is_some() && (p.old_row == 0 || !v.sees(p.old_row));
            Decision::Deliver { hidden, strip_old }
        }
        ChangeKind::Delete => {
            if p.old_row > 0 {
                if v.sees(p.old_row) {
                    Decision::Deliver { hidden, strip_old: false }
                } else {
                    Decision::Withhold
                }
            } else if key_only_deletes == KeyOnlyDeletes::Deliver {
                Decision::Deliver { hidden, strip_old: false }
            } else {
                Decision::Withhold
            }
        }
        ChangeKind::Truncate => Decision::Withhold,
    }
}

/// The frames of one member's replay of `changes` from the change log: matched against its own
/// subscriptions and decided by row-level security exactly as live changes are, in order.
pub(crate) async fn replay_batch(
    hub: &Hub,
    member: &Arc<Member>,
    subs: &[Arc<Subscription>],
    changes: impl Iterator<Item = Change>,
    scratch: &mut Scratch,
) -> Vec<Frame> {
    let subject = member.subject();
    let mut batch = Batch::default();
    for change in changes {
        let mut ids: Option<Ids> = None;
        let mut select = None;
        for s in subs.iter().filter(|s| s.matches(&change)) {
            match ids.as_mut() {
                Some(ids) => ids.push(s.binding.id),
                None => {
                    ids = Some(Ids::of(&[s.binding.id]));
                    select = s.binding.select.clone();
                }
            }
        }
        let Some(ids) = ids else { continue };
        let group = Arc::new(Grouped {
            subjects: vec![subject.clone()],
            targets: vec![Target { member: Arc::clone(member), ids, select }],
            ranges: std::iter::once(0..1).collect(),
        });
        let pending = batch.pending(hub, change, group);
        batch.items.push(Item::Change(pending));
    }
    if batch.items.is_empty() {
        return Vec::new();
    }
    batch.authorize(hub, Lane::Side).await;
    scratch.collect = Some(Vec::new());
    // Replays acknowledge nothing: the items are all changes.
    batch.deliver(hub, &Acknowledgement::new(), scratch);
    scratch.collect.take().unwrap_or_default()
}
