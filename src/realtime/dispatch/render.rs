//! Rendering and queueing: `Scratch` holds one change's rendered `data` (once per view) and
//! its frames (once per encoding, topic, ids and view) and queues them to members, or collects
//! them for a replay; `tell_withheld` is the one notice a member gets when changes are withheld.
//!
//! Must not: match or decide; it delivers what it is told to.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use crate::auth::rls::Hidden;
use crate::change::{Change, ChangeKind, LiveKind, Position, View};
use crate::realtime::dispatch::decision::Decision;
use crate::realtime::dispatch::group::Groups;
use crate::realtime::dispatch::keys::{Ids, PtrHash, Select};
use crate::realtime::gate::Place;
use crate::realtime::hub::Hub;
use crate::realtime::live_query::{Arrival, LiveStep};
use crate::realtime::member::Member;
use crate::realtime::outbox::{Direct, EncodingId, Event, Frame};

/// What makes two change frames identical: encoding, topic, binding ids and which `data`.
type FrameKey = (EncodingId, Arc<str>, Ids, usize);

/// What makes two live queries' messages about a row identical: encoding, topic and view.
type ArrivalKey = (EncodingId, Arc<str>, Ids, Select, Hidden);

/// One member's match of a change: the member, its matching binding ids (ascending) and the
/// binding's `select`.
#[derive(Clone, Copy)]
pub(super) struct Recipient<'a> {
    pub(super) member: &'a Member,
    pub(super) ids: &'a [u32],
    pub(super) select: &'a Select,
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
    pub(super) ids: Vec<u32>,
    pub(super) decisions: Vec<Decision>,
    /// Decisions of the current change by subject (interned, so by pointer).
    pub(super) memo: HashMap<usize, Decision, PtrHash>,
    /// Groupings of matches kept across changes and batches.
    pub(super) groups: Groups,
    /// The current change's position and cursor (with a change log).
    position: Position,
    xid: u32,
    cursor: Option<String>,
    /// The current change may reach more than one member.
    shared: bool,
    /// Replays collect their frames here instead of queueing them (they wait for room).
    pub(crate) collect: Option<Vec<Frame>>,
    /// The current change as live queries' steps share it, with its cursor; made for the first.
    live_change: Option<(Arc<Change>, Option<Arc<str>>)>,
    /// Live queries' messages for the current change's new row, by encoding, topic and view.
    arrivals: Vec<(ArrivalKey, Option<Arc<Arrival>>)>,
}

impl Scratch {
    /// Begins `change`; `shared`: it may reach more than one member, so frames are cached.
    pub(super) fn start(&mut self, hub: &Hub, change: &Change, shared: bool) {
        self.shared = shared;
        self.data.clear();
        self.frames.clear();
        self.bodies.clear();
        self.live_change = None;
        self.arrivals.clear();
        self.position = change.position();
        self.xid = change.xid;
        self.cursor =
            if change.snapshot { None } else { hub.log().map(|log| log.cursor(self.position).to_string()) };
    }

    /// Renders (once per view) and queues one change to one member. Returns whether queued.
    pub(super) fn deliver(
        &mut self,
        hub: &Hub,
        change: &Change,
        to: Recipient<'_>,
        hidden: &Hidden,
        strip_old: bool,
    ) -> bool {
        if to.member.live.is_some() {
            return self.step(hub, change, to, Some(hidden));
        }
        let Recipient { member, ids, select } = to;
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
        let frame = if !self.shared {
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

impl Scratch {
    /// A change withheld from `to` (row-level security): nothing for a subscription, but a live
    /// query learns that the row is not in its result (it may leave).
    pub(super) fn withheld(&mut self, hub: &Hub, change: &Change, to: Recipient<'_>) {
        if to.member.live.is_some() {
            self.step(hub, change, to, None);
        }
    }

    /// Hands `change` to `to`'s live query (`seen`: the columns hidden from it when it may read
    /// the row, `None` when it may not). Returns whether anything was queued or held.
    fn step(&mut self, hub: &Hub, change: &Change, to: Recipient<'_>, seen: Option<&Hidden>) -> bool {
        let Some(live) = to.member.live.as_ref() else { return false };
        let belongs = seen.is_some() && live.passes(change);
        // An inserted row outside the result changes nothing (it cannot be in the set).
        if !belongs && change.kind == ChangeKind::Insert {
            return false;
        }
        let arrival = match seen.filter(|_| belongs) {
            Some(hidden) => self.arrival(hub, change, to, hidden),
            None => None,
        };
        let cursor = self.cursor.as_deref();
        let (shared, cursor) =
            self.live_change.get_or_insert_with(|| (Arc::new(change.clone()), cursor.map(Arc::from)));
        let step = LiveStep { change: Arc::clone(shared), belongs, cursor: cursor.clone(), arrival };
        match self.collect.as_mut() {
            Some(collected) => {
                collected.extend(live.frames(step));
                true
            }
            None => to.member.deliver_step(Place::Change(self.position, self.xid), step, hub.metrics()),
        }
    }

    /// The messages of `change`'s new row for `to`'s encoding, topic and view, rendered once.
    fn arrival(
        &mut self,
        hub: &Hub,
        change: &Change,
        to: Recipient<'_>,
        hidden: &Hidden,
    ) -> Option<Arc<Arrival>> {
        let encoder = &to.member.encoder;
        let topic = &to.member.key.topic;
        let found = self.arrivals.iter().find(|((e, t, i, s, h), _)| {
            *e == encoder.id()
                && t == topic
                && i.as_slice() == to.ids
                && s.as_deref() == to.select.as_deref()
                && h.as_deref() == hidden.as_deref()
        });
        if let Some((_, made)) = found {
            return made.clone();
        }
        let view = View {
            select: to.select.as_deref(),
            hidden: hidden.as_deref(),
            strip_old: false,
            cursor: self.cursor.as_deref(),
        };
        let max = hub.limits().max_record_bytes;
        let cursor = self.cursor.as_deref();
        let frame = |kind: LiveKind| {
            let data = String::from_utf8(change.render_live(kind, view, max)).ok()?;
            encoder.encode(topic, &Event::Live { ids: to.ids, kind, data: &data, cursor })
        };
        let made = if change.snapshot {
            frame(LiveKind::Snapshot).map(|f| Arrival { enter: f.clone(), update: f })
        } else {
            frame(LiveKind::Enter)
                .zip(frame(LiveKind::Update))
                .map(|(enter, update)| Arrival { enter, update })
        }
        .map(Arc::new);
        let key = (encoder.id(), Arc::clone(topic), Ids::of(to.ids), to.select.clone(), hidden.clone());
        self.arrivals.push((key, made.clone()));
        made
    }
}

/// Tells `member`, once per membership, that changes of `change`'s table are withheld from it
/// and why. In a replay the notice goes with the replayed frames, in order.
pub(super) fn tell_withheld(
    hub: &Hub,
    scratch: &mut Scratch,
    member: &Member,
    change: &Change,
    reason: &str,
) {
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
