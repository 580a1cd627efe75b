//! The members a change reaches, grouped by subject (`Grouped`), and the groupings kept across
//! changes of one table and kind while the index generation and the relation last.
//!
//! Must not: decide or deliver.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::auth::rls::Subject;
use crate::change::{Change, ChangeKind, Relation};
use crate::locks;
use crate::realtime::dispatch::keys::{Ids, PtrHash, Select};
use crate::realtime::hub::Hub;
use crate::realtime::index::{Subscription, SubscriptionIndex};
use crate::realtime::member::Member;

/// One member's match of a batched change.
pub(super) struct Target {
    pub(super) member: Arc<Member>,
    pub(super) ids: Ids,
    pub(super) select: Select,
}

/// The members a change reaches, grouped by subject. Changes of one table and kind share one
/// grouping while the index's generation lasts, when no binding that could match them has a
/// filter (then matching does not depend on the row).
pub(super) struct Grouped {
    /// The distinct subjects (`None`: authentication off).
    pub(super) subjects: Vec<Option<Arc<Subject>>>,
    /// Ordered by subject: `ranges[i]` are the targets of `subjects[i]`.
    pub(super) targets: Vec<Target>,
    pub(super) ranges: Vec<std::ops::Range<usize>>,
    /// Some target is a live query (it takes every change, delivered or not).
    pub(super) live: bool,
}

impl Grouped {
    /// Matches `change` and groups the members by subject.
    pub(super) fn build(hub: &Hub, index: &SubscriptionIndex, change: &Change) -> Grouped {
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
        let live = targets.iter().any(|(_, t)| t.member.live.is_some());
        Grouped { subjects, targets: targets.into_iter().map(|(_, t)| t).collect(), ranges, live }
    }
}

/// A cached grouping: the index generation and relation it was computed under.
pub(super) type GroupEntry = (u64, Arc<Relation>, Arc<Grouped>);

/// The grouping kept for `change`'s table and kind, if computed under the current index
/// generation and the change's relation. Only for changes whose matches do not depend on the
/// row (`SubscriptionIndex::row_independent`, which the caller checks).
pub(super) fn cached_group<'a>(
    groups: &'a Groups,
    index: &SubscriptionIndex,
    change: &Change,
) -> Option<&'a Arc<Grouped>> {
    let (generation, relation, g) = groups.get(&(change.relation.id, change.kind))?;
    (*generation == index.generation() && Arc::ptr_eq(relation, &change.relation)).then_some(g)
}

/// Puts each member's matching subscriptions next to each other (ids ascending) without exact
/// repeats. Usually every member matched once: one pass that stamps each member says so, and
/// the sort is skipped.
pub(super) fn group_by_member(hub: &Hub, matched: &mut Vec<&Arc<Subscription>>) {
    if matched.len() < 2 {
        return;
    }
    let stamp = hub.next_id();
    if matched.iter().any(|s| s.member.seen.swap(stamp, Ordering::Relaxed) == stamp) {
        matched.sort_unstable_by_key(|s| (Arc::as_ptr(&s.member) as usize, s.binding.id));
        matched.dedup_by_key(|s| (Arc::as_ptr(&s.member) as usize, s.binding.id));
    }
}

/// Groupings of row-independent matches by (table, kind), with the index generation and
/// relation they were computed under; shared by every batch.
pub(super) type Groups = HashMap<(u32, ChangeKind), GroupEntry>;
