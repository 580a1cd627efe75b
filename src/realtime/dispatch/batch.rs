//! Batches of events whose rows need a check: each change matched into a `Pending` with what is
//! known per subject, its rows gathered per table (`TableCheck`), checked with one query per
//! table, then every item delivered in order and commits acknowledged.
//!
//! Must not: deliver an item before every earlier one; acknowledge a commit before its changes
//! are delivered or withheld.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::rls::{Access, Lane, Request, Subject, Table, Verdict};
use crate::change::{Change, ChangeEvent, DbBroadcast, Relation};
use crate::locks;
use crate::realtime::dispatch::decision::{decide_cached, has_full_old_row, resolve, Decision};
use crate::realtime::dispatch::group::{cached_group, Grouped, Groups};
use crate::realtime::dispatch::keys::PtrHash;
use crate::realtime::dispatch::live::publish;
use crate::realtime::dispatch::render::{tell_withheld, Recipient, Scratch};
use crate::realtime::hub::Hub;
use crate::replication::ack::Acknowledgement;
use crate::replication::lsn::Lsn;

/// Tries of a row check that the database answers with an error (a policy or the check itself
/// raising, a statement timeout) before the rows it was about are withheld.
const CHECK_TRIES: usize = 3;

/// What a subscriber is told when a check failed as a whole.
const CHECK_FAILED: &str = "the row-level security check failed";

/// What a subscriber is told when its check gave no answer for it.
const NO_ANSWER: &str = "the row-level security check gave no answer";

pub(super) struct Pending {
    pub(super) change: Change,
    pub(super) group: Arc<Grouped>,
    /// What is known for each subject of the group before the check.
    pub(super) decisions: Vec<Decision>,
    /// Positions (1-based) of the new and old row versions in their table's row list; 0 = not
    /// checked.
    pub(super) new_row: u32,
    pub(super) old_row: u32,
}

pub(super) enum Item {
    Change(Pending),
    Broadcast(DbBroadcast),
    Commit(Lsn),
}

/// The rows of one table in a batch and the subjects to check them for.
pub(super) struct TableCheck {
    /// A JSON array under construction.
    pub(super) rows: Vec<u8>,
    pub(super) row_count: u32,
    pub(super) subjects: HashMap<Arc<Subject>, u32>,
    pub(super) requests: Vec<(Arc<Subject>, Vec<u32>)>,
    /// For each group of the batch (by address: the batch holds it), the request of each of its
    /// subjects (`NO_REQUEST` while it needs none), so that a group shared by many changes looks
    /// its subjects up once per batch rather than once per change.
    pub(super) slots: HashMap<usize, Vec<u32>, PtrHash>,
    pub(super) verdicts: Vec<Verdict>,
}

pub(super) const NO_REQUEST: u32 = u32::MAX;

impl TableCheck {
    pub(super) fn new() -> TableCheck {
        TableCheck {
            rows: b"[".to_vec(),
            row_count: 0,
            subjects: HashMap::new(),
            requests: Vec::new(),
            slots: HashMap::default(),
            verdicts: Vec::new(),
        }
    }

    pub(super) fn add_row(&mut self, change: &Change, old: bool) -> u32 {
        if self.row_count > 0 {
            self.rows.push(b',');
        }
        change.write_row_text(&mut self.rows, old);
        self.row_count += 1;
        self.row_count
    }

    /// Asks for `rows` (0 = none) to be checked for the subjects of `group` whose decision is
    /// `Check`.
    pub(super) fn want(&mut self, group: &Arc<Grouped>, decisions: &[Decision], rows: [u32; 2]) {
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
    pub(super) fn verdict(&self, group: &Arc<Grouped>, at: usize) -> Option<&Verdict> {
        let slot = *self.slots.get(&(Arc::as_ptr(group) as usize))?.get(at)?;
        self.verdicts.get(slot as usize)
    }
}

#[derive(Default)]
pub(super) struct Batch {
    pub(super) items: Vec<Item>,
    /// By table oid; each keeps the relation the rows were decoded with.
    pub(super) tables: HashMap<u32, (Arc<Relation>, TableCheck)>,
}

impl Batch {
    pub(super) fn push(&mut self, hub: &Hub, event: ChangeEvent, groups: &mut Groups) {
        match event {
            ChangeEvent::Change(change) => {
                let pending = self.match_change(hub, change, groups);
                self.items.push(Item::Change(pending));
            }
            ChangeEvent::Broadcast(b) => self.items.push(Item::Broadcast(b)),
            ChangeEvent::Commit { end_lsn, .. } => self.items.push(Item::Commit(end_lsn)),
        }
    }

    pub(super) fn match_change(&mut self, hub: &Hub, change: Change, groups: &mut Groups) -> Pending {
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
    pub(super) fn pending(&mut self, hub: &Hub, change: Change, group: Arc<Grouped>) -> Pending {
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
    pub(super) async fn authorize(&mut self, hub: &Hub, lane: Lane) {
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
                hub.metrics().rls_checks.increment(1);
                let started = std::time::Instant::now();
                let checked = rls.check(lane, Table::Relation(relation), &requests, &rows).await;
                hub.metrics().rls_check.record(started.elapsed());
                match checked {
                    Ok(v) => break v,
                    Err(e) => {
                        hub.metrics().telemetry.counter(crate::telemetry::RLS_ERRORS, &[]).increment(1);
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
    pub(super) fn deliver(&mut self, hub: &Hub, ack: &Acknowledgement, scratch: &mut Scratch) {
        let key_only_deletes = hub.rls().map(|r| r.key_only_deletes()).unwrap_or_default();
        for item in self.items.drain(..) {
            match item {
                Item::Change(p) => {
                    scratch.start(hub, &p.change, p.group.targets.len() > 1);
                    let table = self.tables.get(&p.change.relation.id).map(|(_, t)| t);
                    let decisions: Vec<Decision> = p
                        .decisions
                        .iter()
                        .enumerate()
                        .map(|(at, decision)| match (decision, table) {
                            (Decision::Check, Some(table)) => match table.verdict(&p.group, at) {
                                Some(v) => resolve(&p.change, [p.new_row, p.old_row], v, key_only_deletes),
                                None => Decision::Fail(NO_ANSWER.into()),
                            },
                            (Decision::Check, None) => Decision::Fail(NO_ANSWER.into()),
                            (d, _) => d.clone(),
                        })
                        .collect();
                    let mut withheld = 0;
                    for (decision, range) in decisions.iter().zip(&p.group.ranges) {
                        let Decision::Deliver { hidden, strip_old } = decision else {
                            withheld += range.len() as u64;
                            if let Decision::Fail(reason) = decision {
                                for t in &p.group.targets[range.clone()] {
                                    tell_withheld(hub, scratch, &t.member, &p.change, reason);
                                }
                            }
                            if p.group.live {
                                for t in &p.group.targets[range.clone()] {
                                    let to = Recipient {
                                        member: &t.member,
                                        ids: t.ids.as_slice(),
                                        select: &t.select,
                                    };
                                    scratch.withheld(hub, &p.change, to);
                                }
                            }
                            continue;
                        };
                        for t in &p.group.targets[range.clone()] {
                            let to =
                                Recipient { member: &t.member, ids: t.ids.as_slice(), select: &t.select };
                            scratch.deliver(hub, &p.change, to, hidden, *strip_old);
                        }
                    }
                    hub.metrics().rls_withheld.increment(withheld);
                    hub.metrics().dispatched(p.change.commit_ts, &p.change.relation);
                }
                Item::Broadcast(b) => publish(hub, b),
                Item::Commit(end_lsn) => ack.advance(end_lsn),
            }
        }
        self.tables.clear();
    }
}
