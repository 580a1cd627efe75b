//! The subscription index: per table, an equality index on the first plain `eq` condition of
//! each binding (hash lookups) plus a residual list for everything else, so that the cost of a
//! change is proportional to the bindings that can match it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::change::{Change, ChangeKind};
use crate::fanout::ChannelSink;
use crate::filter::eval::{row_key_int, Class};
use crate::filter::{CompiledFilter, IndexKey};

pub type SubId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFilter {
    All,
    Insert,
    Update,
    Delete,
}

impl EventFilter {
    pub fn parse(s: &str) -> Option<EventFilter> {
        Some(match s.to_ascii_uppercase().as_str() {
            "*" => EventFilter::All,
            "INSERT" => EventFilter::Insert,
            "UPDATE" => EventFilter::Update,
            "DELETE" => EventFilter::Delete,
            _ => return None,
        })
    }

    pub fn accepts(self, kind: ChangeKind) -> bool {
        match (self, kind) {
            (_, ChangeKind::Truncate) => false,
            (EventFilter::All, _) => true,
            (EventFilter::Insert, ChangeKind::Insert)
            | (EventFilter::Update, ChangeKind::Update)
            | (EventFilter::Delete, ChangeKind::Delete) => true,
            _ => false,
        }
    }
}

/// A binding ready to be indexed.
#[derive(Debug)]
pub struct BindingSpec {
    /// The id echoed to the client and sent in `ids`.
    pub id: u32,
    pub event: EventFilter,
    pub schema: Arc<str>,
    /// `None` for every published table of the schema.
    pub table: Option<Arc<str>>,
    pub filter: CompiledFilter,
    /// Columns `record`/`old_record` are limited to (plus the key), when the binding asked.
    pub select: Option<Arc<[Arc<str>]>>,
}

#[derive(Debug)]
pub(crate) struct Subscription {
    pub channel: Arc<ChannelSink>,
    pub binding: BindingSpec,
    /// Condition already satisfied when found through the equality index.
    pub indexed: Option<usize>,
}

#[derive(Debug, Default)]
pub(crate) struct EqIndex {
    pub class: Option<Class>,
    pub ints: HashMap<i64, Vec<SubId>>,
    pub bytes: HashMap<Box<[u8]>, Vec<SubId>>,
}

#[derive(Debug, Default)]
pub(crate) struct TableSubs {
    /// Column name → equality index.
    pub eq: HashMap<Arc<str>, EqIndex>,
    pub residual: Vec<SubId>,
}

impl TableSubs {
    fn is_empty(&self) -> bool {
        self.residual.is_empty() && self.eq.is_empty()
    }

    /// Calls `f` with every subscription that may match the change, and the condition an index
    /// lookup already satisfied.
    pub fn candidates(&self, change: &Change, mut f: impl FnMut(SubId)) {
        for id in &self.residual {
            f(*id);
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
            for id in ids.into_iter().flatten() {
                f(*id);
            }
        }
    }
}

/// All subscriptions, by table.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    next_id: SubId,
    pub(crate) subs: HashMap<SubId, Subscription>,
    /// (schema, table) → subscriptions on that table.
    pub(crate) tables: HashMap<(Arc<str>, Arc<str>), TableSubs>,
    /// schema → subscriptions on every table of it.
    pub(crate) schemas: HashMap<Arc<str>, TableSubs>,
}

impl SubscriptionIndex {
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Adds a binding for a channel; from the moment this returns, every change dispatched is
    /// matched against it.
    pub fn insert(&mut self, channel: Arc<ChannelSink>, binding: BindingSpec) -> SubId {
        self.next_id += 1;
        let id = self.next_id;
        let key = binding.filter.index_key();
        let table = match &binding.table {
            Some(t) => self
                .tables
                .entry((Arc::clone(&binding.schema), Arc::clone(t)))
                .or_default(),
            None => self.schemas.entry(Arc::clone(&binding.schema)).or_default(),
        };
        let indexed = match key {
            Some((cond, key)) => {
                let c = &binding.filter.conditions[cond];
                let eq = table.eq.entry(Arc::clone(&c.column)).or_default();
                eq.class = Some(c.class);
                match key {
                    IndexKey::Int(k) => eq.ints.entry(k).or_default().push(id),
                    IndexKey::Bytes(k) => eq.bytes.entry(k).or_default().push(id),
                }
                Some(cond)
            }
            None => {
                table.residual.push(id);
                None
            }
        };
        self.subs.insert(
            id,
            Subscription {
                channel,
                binding,
                indexed,
            },
        );
        id
    }

    pub fn remove(&mut self, id: SubId) -> bool {
        let Some(sub) = self.subs.remove(&id) else {
            return false;
        };
        let b = &sub.binding;
        let (map_key_table, schema) = (
            b.table
                .as_ref()
                .map(|t| (Arc::clone(&b.schema), Arc::clone(t))),
            &b.schema,
        );
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
            _ => table.residual.retain(|s| *s != id),
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

fn remove_from<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<SubId>>, key: &K, id: SubId) {
    if let Some(v) = map.get_mut(key) {
        v.retain(|s| *s != id);
        if v.is_empty() {
            map.remove(key);
        }
    }
}
