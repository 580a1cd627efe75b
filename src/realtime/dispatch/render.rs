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
use crate::change::{Change, Position, View};
use crate::realtime::dispatch::decision::Decision;
use crate::realtime::dispatch::group::Groups;
use crate::realtime::dispatch::keys::{Ids, PtrHash, Select};
use crate::realtime::gate::Place;
use crate::realtime::hub::Hub;
use crate::realtime::member::Member;
use crate::realtime::outbox::{Direct, EncodingId, Event, Frame};

/// What makes two change frames identical: encoding, topic, binding ids and which `data`.
type FrameKey = (EncodingId, Arc<str>, Ids, usize);

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
}

impl Scratch {
    /// Begins `change`; `shared`: it may reach more than one member, so frames are cached.
    pub(super) fn start(&mut self, hub: &Hub, change: &Change, shared: bool) {
        self.shared = shared;
        self.data.clear();
        self.frames.clear();
        self.bodies.clear();
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
