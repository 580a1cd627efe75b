//! A member's replay from the change log: its own subscriptions matched against logged changes,
//! decided by row-level security exactly as live changes are, in order, as frames for the
//! caller to send.
//!
//! Must not: queue to the member's outbox (the resume or snapshot task sends what it returns).

use std::sync::Arc;

use crate::auth::rls::Lane;
use crate::change::Change;
use crate::realtime::dispatch::batch::{Batch, Item};
use crate::realtime::dispatch::group::{Grouped, Target};
use crate::realtime::dispatch::keys::Ids;
use crate::realtime::dispatch::render::Scratch;
use crate::realtime::hub::Hub;
use crate::realtime::index::Subscription;
use crate::realtime::member::Member;
use crate::realtime::outbox::Frame;
use crate::replication::ack::Acknowledgement;

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
            live: member.live.is_some(),
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
