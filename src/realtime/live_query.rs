//! A live query as its member holds it: the query's filter and bound, the keys of its result
//! (a [`LiveSet`]), and the turning of each change's [`LiveStep`] into the messages its client
//! receives — a row of the initial result, then `enter`, `update` and `leave`.
//!
//! A step is turned into messages where the member's order is final: as it passes the member's
//! hand-off gate (live, or when the gate releases what it held after the snapshot), or as the
//! snapshot sends its rows. Never when the change is matched: the set must have taken in the
//! snapshot and every earlier change first.
//!
//! Owns: `LiveQuery`, `LiveStep`, `Arrival`. Must not: decide row-level security (a step says
//! whether its row belongs: it passes the filter and the subscriber may read it), render a
//! row's record (the dispatcher renders it once per view), or wait.

use std::sync::{Arc, Mutex};

use crate::change::{render_live_leave, Change, LiveKind};
use crate::locks;
use crate::realtime::live_set::{LiveError, LiveSet, RowKey, Transition};
use crate::realtime::outbox::{Direct, Encoder, Event, Frame};
use crate::subscribe::LiveSpec;

/// One member's live query.
pub struct LiveQuery {
    pub spec: Arc<LiveSpec>,
    /// Its binding's id (messages carry it, as changes carry theirs).
    ids: [u32; 1],
    /// The most rows its result may hold.
    max: usize,
    encoder: Arc<dyn Encoder>,
    topic: Arc<str>,
    address: Option<Arc<str>>,
    state: Mutex<State>,
}

enum State {
    /// Following its result; the set is made at the first step (from its relation).
    Open(Option<LiveSet>),
    /// Ended by an error the client was told; later steps are dropped.
    Ended,
}

/// What one change means to one live query, before its order among the member's messages is
/// final.
pub struct LiveStep {
    /// Shared by every live query the change reaches.
    pub change: Arc<Change>,
    /// The change's new row is in the result: it passes the filter and the subscriber may
    /// read it (an explicit yes). Ignored for DELETE and TRUNCATE.
    pub belongs: bool,
    pub cursor: Option<Arc<str>>,
    /// The messages for the row arriving, rendered for this member's view; set when `belongs`.
    pub arrival: Option<Arc<Arrival>>,
}

/// The messages of a row that is in the result after a change, shared by every member with
/// the same encoding, topic and view: `enter` (for a snapshot row: its `snapshot` message) and
/// `update`.
pub struct Arrival {
    pub enter: Frame,
    pub update: Frame,
}

impl LiveQuery {
    /// A live query with the bound its binding asked for, at most `max_rows`.
    pub fn new(
        (id, spec): (u32, Arc<LiveSpec>),
        max_rows: usize,
        encoder: Arc<dyn Encoder>,
        topic: Arc<str>,
        address: Option<Arc<str>>,
    ) -> LiveQuery {
        let max = spec.limit.map_or(max_rows, |l| l.min(max_rows));
        LiveQuery { spec, ids: [id], max, encoder, topic, address, state: Mutex::new(State::Open(None)) }
    }

    /// Whether `change`'s new row passes the query's filter.
    pub fn passes(&self, change: &Change) -> bool {
        self.spec.filter.matches(change, None)
    }

    /// How many rows the result holds now.
    pub fn len(&self) -> usize {
        match &*locks::lock(&self.state) {
            State::Open(Some(set)) => set.len(),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The messages `step` makes, in order, with the result updated. The first error ends the
    /// query: the client is told why, and nothing follows.
    pub fn frames(&self, step: LiveStep) -> Vec<Frame> {
        let mut state = locks::lock(&self.state);
        let State::Open(set) = &mut *state else { return Vec::new() };
        let made = match set {
            Some(set) => self.apply(set, &step),
            None => LiveSet::new(&step.change.relation, self.max)
                .and_then(|fresh| self.apply(set.insert(fresh), &step)),
        };
        match made {
            Ok(frames) => frames,
            Err(e) => {
                *state = State::Ended;
                let message = format!("the live query ended: {e}");
                let error =
                    Direct::System { extension: "postgres_changes", status: "error", message: &message };
                let address = self.address.as_deref();
                vec![
                    self.encoder.encode_direct(&self.topic, address, &error),
                    self.encoder.encode_direct(&self.topic, address, &Direct::Closed),
                ]
            }
        }
    }

    fn apply(&self, set: &mut LiveSet, step: &LiveStep) -> Result<Vec<Frame>, LiveError> {
        if step.change.snapshot {
            let Some(arrival) = step.arrival.as_ref().filter(|_| step.belongs) else { return Ok(Vec::new()) };
            set.load(&step.change)?;
            return Ok(vec![arrival.enter.clone()]);
        }
        let transitions = set.apply(&step.change, step.belongs && step.arrival.is_some())?;
        Ok(transitions
            .into_iter()
            .filter_map(|t| match (t, &step.arrival) {
                (Transition::Enter(_), Some(a)) => Some(a.enter.clone()),
                (Transition::Update(_), Some(a)) => Some(a.update.clone()),
                (Transition::Leave(key), _) => self.leave(step, &key),
                (_, None) => None,
            })
            .collect())
    }

    fn leave(&self, step: &LiveStep, key: &RowKey) -> Option<Frame> {
        let change = &step.change;
        let cursor = step.cursor.as_deref();
        let data = render_live_leave(&change.relation, &key.0, &change.commit_timestamp(), cursor);
        let data = String::from_utf8(data).ok()?;
        let leave = Event::Live { ids: &self.ids, kind: LiveKind::Leave, data: &data, cursor };
        self.encoder.encode(&self.topic, &leave)
    }
}

impl std::fmt::Debug for LiveStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStep").field("belongs", &self.belongs).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LiveQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveQuery").field("max", &self.max).finish_non_exhaustive()
    }
}
