//! The gate of a member whose subscription starts with a replay or a snapshot: its live
//! changes are held, in order with their places in the change log, until the hand-off point is
//! known; then the held ones the replay or the snapshot did not already send go out and live
//! delivery continues. Also the visibility rule of a snapshot (which transactions an MVCC
//! snapshot shows), which decides what the gate drops after a snapshot.
//!
//! A live query's steps wait in the same gate, and become messages (its result updated) as they
//! pass it: in the member's final order, after the snapshot's rows.
//!
//! Owns: `ResumeGate`, `Place`, `Held`, `XidSnapshot`. Must not: block the dispatcher (the gate
//! is a short lock), or deliver anything it cannot place in order.

use std::sync::{Arc, Mutex};

use crate::change::Position;
use crate::locks;
use crate::realtime::limits::Metrics;
use crate::realtime::live_query::{LiveQuery, LiveStep};
use crate::realtime::outbox::{Frame, Outbox, Queued};
use crate::replication::lsn::Lsn;

/// Live changes a resuming member may hold before it counts as too slow.
const MAX_HELD: usize = 65_536;

/// A member's live changes during a resume or a snapshot.
#[derive(Debug)]
pub enum ResumeGate {
    /// Replaying (or reading the snapshot): live frames are kept, in order, with their places.
    Holding(Vec<(Place, Held)>),
    /// Live: changes at or before `through` were replayed (or were before the cursor, or are in
    /// the snapshot); so are those that `shown` shows.
    Live { through: Position, shown: Option<Arc<XidSnapshot>> },
}

/// What the gate holds for a member: a frame, or a live query's step (its messages depend on
/// what the query holds when it passes).
#[derive(Debug)]
pub enum Held {
    Frame(Frame),
    Step(LiveStep),
}

/// Where a live frame sits in the change log, which decides whether a replay or a snapshot
/// already sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A change: its position and transaction (a snapshot may show it).
    Change(Position, u32),
    /// A database broadcast: a replay sends those up to `through`; a snapshot has none.
    Broadcast(Position),
    /// Not in the log (a client's or REST broadcast): always sent, in order.
    Unlogged,
}

impl Place {
    /// Whether a hand-off up to `through` (with the snapshot `shown`) already sent this.
    fn sent(self, through: Position, shown: Option<&XidSnapshot>) -> bool {
        match self {
            Place::Change(p, xid) => p <= through || shown.is_some_and(|s| s.shows(p.lsn, xid)),
            Place::Broadcast(p) => shown.is_none() && p <= through,
            Place::Unlogged => false,
        }
    }
}

/// A member's gate and the outbox it lets frames through to (`Member::gate`).
pub(crate) struct GateOf<'a> {
    pub(crate) resume: &'a Option<Mutex<ResumeGate>>,
    pub(crate) outbox: &'a Outbox,
    pub(crate) live: Option<&'a LiveQuery>,
}

impl GateOf<'_> {
    /// Queues one live frame or step, through the resume gate when there is one. Returns
    /// whether it was queued (or held).
    pub(crate) fn deliver_live(&self, place: Place, item: Held, metrics: &Metrics) -> bool {
        let Some(gate) = self.resume else {
            return self.pass(item, metrics);
        };
        let mut gate = locks::lock(gate);
        match &mut *gate {
            ResumeGate::Holding(held) => {
                if held.len() >= MAX_HELD {
                    self.outbox.kill(metrics);
                    return false;
                }
                held.push((place, item));
                true
            }
            ResumeGate::Live { through, shown } => {
                if place.sent(*through, shown.as_deref()) {
                    return false;
                }
                if let (Place::Change(p, _), Some(s)) = (place, &shown) {
                    if p.lsn >= s.boundary {
                        // Past every transaction the snapshot can show.
                        *shown = None;
                    }
                }
                self.pass(item, metrics)
            }
        }
    }

    /// The frames of what passes the gate (a step's, with its live query updated).
    fn frames(&self, item: Held) -> Vec<Frame> {
        match (item, self.live) {
            (Held::Frame(f), _) => vec![f],
            (Held::Step(step), Some(live)) => live.frames(step),
            (Held::Step(_), None) => Vec::new(),
        }
    }

    /// Queues what passes the gate, without waiting.
    fn pass(&self, item: Held, metrics: &Metrics) -> bool {
        self.frames(item).into_iter().all(|f| self.outbox.send(f, metrics) == Queued::Yes)
    }

    /// Ends the replay: sends what was held after `through`, then lets live changes pass.
    pub(crate) async fn release(&self, through: Position, metrics: &Metrics) {
        self.open_gate(through, None, metrics).await;
    }

    /// Ends a snapshot: sends what was held after `through` that the snapshot does not show, then
    /// lets live changes pass (those it shows still skipped).
    pub(crate) async fn release_after_snapshot(
        &self,
        through: Position,
        shown: Arc<XidSnapshot>,
        metrics: &Metrics,
    ) {
        self.open_gate(through, Some(shown), metrics).await;
    }

    /// Sends the held frames with backpressure, taking them in turns (the dispatcher keeps
    /// holding new ones meanwhile), and goes live once nothing is held.
    async fn open_gate(&self, through: Position, shown: Option<Arc<XidSnapshot>>, metrics: &Metrics) {
        let Some(gate) = self.resume else { return };
        loop {
            let held = {
                let mut gate = locks::lock(gate);
                match &mut *gate {
                    ResumeGate::Holding(held) if held.is_empty() => {
                        *gate = ResumeGate::Live { through, shown };
                        return;
                    }
                    ResumeGate::Holding(held) => std::mem::take(held),
                    ResumeGate::Live { .. } => return,
                }
            };
            for (place, item) in held {
                if place.sent(through, shown.as_deref()) {
                    continue;
                }
                for frame in self.frames(item) {
                    if self.outbox.send_wait(frame, metrics).await != Queued::Yes {
                        return;
                    }
                }
            }
        }
    }
}

/// An MVCC snapshot as `pg_current_snapshot()` gives it, with 32-bit xids as pgoutput sends them,
/// and the WAL insert position read after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidSnapshot {
    xmin: u32,
    xmax: u32,
    /// Running when the snapshot was taken (sorted).
    xip: Vec<u32>,
    /// Every transaction visible to the snapshot committed before this position.
    pub boundary: Lsn,
}

/// `a` comes before `b` in xid order (modulo 2³², as Postgres compares normal xids).
fn precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl XidSnapshot {
    /// Parses `xmin:xmax:xip,…` (64-bit xids, as `pg_snapshot` prints them).
    pub fn parse(text: &str, boundary: Lsn) -> Option<XidSnapshot> {
        let mut parts = text.trim().split(':');
        let xid = |s: &str| s.trim().parse::<u64>().ok().map(|x| x as u32);
        let xmin = xid(parts.next()?)?;
        let xmax = xid(parts.next()?)?;
        let mut xip = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list.split(',').map(xid).collect::<Option<Vec<u32>>>()?,
        };
        if parts.next().is_some() {
            return None;
        }
        xip.sort_unstable();
        Some(XidSnapshot { xmin, xmax, xip, boundary })
    }

    /// Whether the committed transaction `xid` is visible to the snapshot (its changes are in
    /// the snapshot's rows). 0 (unknown) is never visible.
    pub fn visible(&self, xid: u32) -> bool {
        if xid == 0 {
            return false;
        }
        if precedes(xid, self.xmin) {
            return true;
        }
        precedes(xid, self.xmax) && self.xip.binary_search(&xid).is_err()
    }

    /// Shows nothing: every later change is delivered (after a failed snapshot).
    pub(crate) fn none() -> XidSnapshot {
        XidSnapshot { xmin: 0, xmax: 0, xip: Vec::new(), boundary: Lsn::ZERO }
    }

    /// Whether a live change of transaction `xid` committed at `lsn` is already in the snapshot.
    pub fn shows(&self, lsn: Lsn, xid: u32) -> bool {
        lsn < self.boundary && self.visible(xid)
    }
}

/// The gate a resuming member starts with.
pub(crate) fn holding_gate() -> Mutex<ResumeGate> {
    Mutex::new(ResumeGate::Holding(Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility() {
        let s = XidSnapshot::parse("100:110:102,105", Lsn(50)).unwrap();
        assert!(s.visible(99) && s.visible(100) && s.visible(101) && s.visible(109));
        assert!(!s.visible(102) && !s.visible(105) && !s.visible(110) && !s.visible(200));
        assert!(!s.visible(0));
        assert!(s.shows(Lsn(49), 101) && !s.shows(Lsn(50), 101) && !s.shows(Lsn(10), 105));
        // 64-bit xids with an epoch compare by their low 32 bits, modulo 2^32.
        let wrapped =
            XidSnapshot::parse(&format!("{}:{}:", (1u64 << 32) - 5, (1u64 << 32) + 5), Lsn(1)).unwrap();
        assert!(wrapped.visible(u32::MAX - 10) && wrapped.visible(u32::MAX - 2) && wrapped.visible(3));
        assert!(!wrapped.visible(5) && !wrapped.visible(6));
        for bad in ["", "1", "a:2:", "1:2:x", "1:2:3:4"] {
            assert_eq!(XidSnapshot::parse(bad, Lsn(1)), None, "{bad:?}");
        }
        assert!(!XidSnapshot::none().shows(Lsn(0), 1));
    }
}
