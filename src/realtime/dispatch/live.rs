//! The path of a change delivered on arrival: matched, decided from cached answers and
//! rendered at once, or handed back (`None`) when a row check is needed first; and database
//! broadcasts published to their channels.
//!
//! Must not: wait for the database.

use std::sync::Arc;

use crate::change::{Change, DbBroadcast};
use crate::locks;
use crate::realtime::bus::BusMessage;
use crate::realtime::dispatch::decision::{decide_cached, Decision, DELIVER_ALL};
use crate::realtime::dispatch::group::{cached_group, group_by_member};
use crate::realtime::dispatch::render::{tell_withheld, Recipient, Scratch};
use crate::realtime::hub::Hub;
use crate::realtime::index::Subscription;
use crate::realtime::member::TopicKey;

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
    scratch.start(hub, change, matched.len() > 1);
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
        let to = Recipient { member, ids: &ids, select: &sub.binding.select };
        match decision {
            Decision::Deliver { hidden, strip_old } => {
                if scratch.deliver(hub, change, to, &hidden, strip_old) {
                    delivered += 1;
                }
            }
            Decision::Fail(reason) => {
                hub.metrics().rls_withheld.increment(1);
                tell_withheld(hub, scratch, member, change, &reason);
                scratch.withheld(hub, change, to);
            }
            Decision::Withhold | Decision::Check => {
                hub.metrics().rls_withheld.increment(1);
                scratch.withheld(hub, change, to);
            }
        }
    }
    scratch.ids = ids;
    Some(delivered)
}

pub(super) fn publish(hub: &Hub, mut b: DbBroadcast) {
    hub.metrics().broadcasts_received.increment(1);
    if let Some(log) = hub.log() {
        let cursor = log.cursor(b.position).to_string().into();
        b.message.logged = Some(crate::change::broadcast::Logged { position: b.position, cursor });
        hub.set_broadcast_logged(b.position);
    }
    // Every node reads database broadcasts from its own source: delivered here only.
    hub.deliver(&BusMessage::Broadcast {
        key: TopicKey { topic: b.topic, private: b.private },
        origin: None,
        message: Arc::new(b.message),
    });
}
