//! The subscription index: per table, an equality index on the first plain `eq` condition of
//! each binding (hash lookups) plus a residual list for everything else, so that the cost of a
//! change is proportional to the bindings that can match it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::change::Change;
use crate::filter::eval::{row_key_int, Class};
use crate::filter::IndexKey;
use crate::realtime::member::Member;
use crate::subscribe::BindingSpec;

pub type SubId = u64;

#[derive(Debug)]
pub(crate) struct Subscription {
    pub id: SubId,
    pub member: Arc<Member>,
    pub binding: BindingSpec,
    /// Condition already satisfied when found through the equality index.
    pub indexed: Option<usize>,
    /// Whether conditions remain to evaluate after an index hit (saves touching the filter).
    pub residual_conditions: bool,
}

impl Subscription {
    /// Whether this subscription matches `change` (table, event and filter), outside the index.
    pub(crate) fn matches(&self, change: &Change) -> bool {
        let b = &self.binding;
        let rel = &change.relation;
        let schema_ok = &*b.schema == "*" || b.schema == rel.schema;
        let table_ok = b.table.as_ref().is_none_or(|t| *t == rel.table);
        // A snapshot row stands for the row's current state: every binding of its table whose
        // filter it passes receives it, whatever the event.
        schema_ok
            && table_ok
            && if change.snapshot {
                self.binding.filter.matches(change, None)
            } else {
                self.accepts(change, false)
            }
    }

    /// Event and filter check; an index hit with nothing else to evaluate skips the filter.
    fn accepts(&self, change: &Change, via_index: bool) -> bool {
        // A live query follows every change of its table (its filter is applied as its steps
        // pass its member's gate): a row may leave it through any of them.
        if self.binding.live.is_some() {
            return true;
        }
        if !self.binding.event.accepts(change.kind) {
            return false;
        }
        if via_index && !self.residual_conditions {
            return true;
        }
        self.binding.filter.matches(change, if via_index { self.indexed } else { None })
    }
}

/// The subscriptions under one index key: nearly always one, kept inline.
#[derive(Debug)]
pub(crate) enum SubList {
    One(Arc<Subscription>),
    Many(Vec<Arc<Subscription>>),
}

impl SubList {
    fn push(&mut self, s: Arc<Subscription>) {
        match self {
            SubList::One(first) => *self = SubList::Many(vec![Arc::clone(first), s]),
            SubList::Many(v) => v.push(s),
        }
    }

    fn as_slice(&self) -> &[Arc<Subscription>] {
        match self {
            SubList::One(s) => std::slice::from_ref(s),
            SubList::Many(v) => v,
        }
    }

    /// Removes `id`; returns true when the list became empty.
    fn remove(&mut self, id: SubId) -> bool {
        match self {
            SubList::One(s) => s.id == id,
            SubList::Many(v) => {
                v.retain(|s| s.id != id);
                let single = if v.len() == 1 { v.pop() } else { None };
                let empty = v.is_empty() && single.is_none();
                if let Some(only) = single {
                    *self = SubList::One(only);
                }
                empty
            }
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct EqIndex {
    pub class: Option<Class>,
    pub ints: HashMap<i64, SubList>,
    pub bytes: HashMap<Box<[u8]>, SubList>,
}

#[derive(Debug, Default)]
pub(crate) struct TableSubs {
    /// Column name → equality index.
    pub eq: HashMap<Arc<str>, EqIndex>,
    pub residual: Vec<Arc<Subscription>>,
    /// Residual subscriptions with a filter (the others match on table and event alone).
    pub filtered: usize,
}

impl TableSubs {
    fn is_empty(&self) -> bool {
        self.residual.is_empty() && self.eq.is_empty()
    }

    /// Whether which of these subscriptions match depends only on the change's table and kind.
    fn row_independent(&self) -> bool {
        self.eq.is_empty() && self.filtered == 0
    }

    /// Calls `f` with every subscription that may match the change, and the condition an index
    /// lookup already satisfied.
    pub fn candidates<'a>(&'a self, change: &Change, mut f: impl FnMut(&'a Arc<Subscription>, bool)) {
        for s in &self.residual {
            f(s, false);
        }
        for (column, eq) in &self.eq {
            let Some(i) = change.relation.column_index(column) else {
                continue;
            };
            let Some(value) = change.filter_value(i) else {
                continue;
            };
            let ids = match eq.class {
                Some(Class::Text) | Some(Class::Uuid) => eq.bytes.get(value),
                Some(class) => row_key_int(class, value).and_then(|k| eq.ints.get(&k)),
                None => None,
            };
            for s in ids.map(SubList::as_slice).unwrap_or_default() {
                f(s, true);
            }
        }
    }
}

/// All subscriptions, by table.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    next_id: SubId,
    /// Changes on every insert and remove, and when a member's subject changes (see
    /// [`SubscriptionIndex::touch`]): a grouping of matches computed under one generation is
    /// valid while it lasts.
    generation: u64,
    pub(crate) subs: HashMap<SubId, Arc<Subscription>>,
    /// (schema, table) → subscriptions on that table.
    pub(crate) tables: HashMap<(Arc<str>, Arc<str>), TableSubs>,
    /// schema → subscriptions on every table of it; `"*"` → on every published table.
    pub(crate) schemas: HashMap<Arc<str>, TableSubs>,
}

impl SubscriptionIndex {
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Marks a change that matching alone does not see (a member's subject was replaced).
    pub fn touch(&mut self) {
        self.generation += 1;
    }

    /// Whether the subscriptions a change matches depend only on its table and kind (no
    /// binding that could match it has a filter), so one grouping serves every such change.
    pub(crate) fn row_independent(&self, change: &Change) -> bool {
        let rel = &change.relation;
        let exact = self.tables.get(&(Arc::clone(&rel.schema), Arc::clone(&rel.table)));
        let any = if &*rel.schema == "*" { None } else { self.schemas.get("*") };
        [exact, self.schemas.get(&rel.schema), any].into_iter().flatten().all(TableSubs::row_independent)
    }

    /// Adds a binding for a channel; from the moment this returns, every change dispatched is
    /// matched against it.
    pub fn insert(&mut self, member: Arc<Member>, binding: BindingSpec) -> SubId {
        self.next_id += 1;
        self.generation += 1;
        let id = self.next_id;
        let key = binding.filter.index_key();
        let table = match &binding.table {
            Some(t) => self.tables.entry((Arc::clone(&binding.schema), Arc::clone(t))).or_default(),
            None => self.schemas.entry(Arc::clone(&binding.schema)).or_default(),
        };
        let indexed = key.as_ref().map(|(cond, _)| *cond);
        let residual_conditions = binding.filter.has_residual(indexed);
        let sub = Arc::new(Subscription { id, member, binding, indexed, residual_conditions });
        match key {
            Some((cond, key)) => {
                let c = &sub.binding.filter.conditions[cond];
                let eq = table.eq.entry(Arc::clone(&c.column)).or_default();
                eq.class = Some(c.class);
                match key {
                    IndexKey::Int(k) => push(&mut eq.ints, k, Arc::clone(&sub)),
                    IndexKey::Bytes(k) => push(&mut eq.bytes, k, Arc::clone(&sub)),
                }
            }
            None => {
                table.filtered += usize::from(!sub.binding.filter.is_empty());
                table.residual.push(Arc::clone(&sub));
            }
        }
        self.subs.insert(id, sub);
        id
    }

    /// The subscription added as `id`.
    pub(crate) fn get(&self, id: SubId) -> Option<&Arc<Subscription>> {
        self.subs.get(&id)
    }

    /// Calls `f` with every subscription whose table, event and filter match the change.
    pub(crate) fn matching<'a>(&'a self, change: &Change, mut f: impl FnMut(&'a Arc<Subscription>)) {
        let rel = &change.relation;
        let exact = self.tables.get(&(Arc::clone(&rel.schema), Arc::clone(&rel.table)));
        // Bindings on every table of the schema, and on every published table (`schema: "*"`).
        let any = if &*rel.schema == "*" { None } else { self.schemas.get("*") };
        for table in [exact, self.schemas.get(&rel.schema), any].into_iter().flatten() {
            table.candidates(change, |sub, via_index| {
                if sub.accepts(change, via_index) {
                    f(sub);
                }
            });
        }
    }

    /// How many subscriptions match the change (the index alone, without delivery).
    pub fn count_matching(&self, change: &Change) -> usize {
        let mut n = 0;
        self.matching(change, |_| n += 1);
        n
    }

    pub fn remove(&mut self, id: SubId) -> bool {
        let Some(sub) = self.subs.remove(&id) else {
            return false;
        };
        self.generation += 1;
        let b = &sub.binding;
        let (map_key_table, schema) =
            (b.table.as_ref().map(|t| (Arc::clone(&b.schema), Arc::clone(t))), &b.schema);
        let table = match &map_key_table {
            Some(k) => self.tables.get_mut(k),
            None => self.schemas.get_mut(schema),
        };
        let Some(table) = table else { return true };
        match (sub.indexed, b.filter.index_key()) {
            (Some(cond), Some((_, key))) => {
                let column = &b.filter.conditions[cond].column;
                if let Some(eq) = table.eq.get_mut(column) {
                    match key {
                        IndexKey::Int(k) => remove_from(&mut eq.ints, &k, id),
                        IndexKey::Bytes(k) => remove_from(&mut eq.bytes, &k, id),
                    }
                    if eq.ints.is_empty() && eq.bytes.is_empty() {
                        table.eq.remove(column);
                    }
                }
            }
            _ => {
                table.residual.retain(|s| s.id != id);
                table.filtered = table.filtered.saturating_sub(usize::from(!b.filter.is_empty()));
            }
        }
        if table.is_empty() {
            match map_key_table {
                Some(k) => {
                    self.tables.remove(&k);
                }
                None => {
                    self.schemas.remove(schema);
                }
            }
        }
        true
    }
}

fn push<K: std::hash::Hash + Eq>(map: &mut HashMap<K, SubList>, key: K, s: Arc<Subscription>) {
    match map.entry(key) {
        std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().push(s),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(SubList::One(s));
        }
    }
}

fn remove_from<K: std::hash::Hash + Eq>(map: &mut HashMap<K, SubList>, key: &K, id: SubId) {
    if map.get_mut(key).is_some_and(|v| v.remove(id)) {
        map.remove(key);
    }
}
