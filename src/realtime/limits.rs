//! The core's limits (from the configuration) and counters (read by `/metrics`).
//! Must not: hold anything but plain values and atomics.

use metrics::{Counter, Gauge, Histogram};

use crate::telemetry::Telemetry;
use std::sync::Arc;
use std::time::Duration;

/// Per-session limits, with Supabase's defaults (see `config.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Frames queued per session before it counts as too slow.
    pub client_queue: usize,
    pub max_channels: usize,
    /// `postgres_changes` bindings per join.
    pub max_bindings: usize,
    /// Rows one live query's result may hold.
    pub max_live_rows: usize,
    pub max_joins_per_second: u32,
    pub max_events_per_second: u32,
    /// Presence events (track/untrack) per `presence_window`.
    pub max_presence_events: u32,
    pub presence_window: Duration,
    pub max_presence_payload_bytes: usize,
    pub max_broadcast_payload_bytes: usize,
    /// `postgres_changes` records larger than this are sent with only their small values.
    pub max_record_bytes: usize,
    /// How long a connection that must authenticate by message (`/v1/ws`) has to do so.
    pub auth_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let c = crate::config::Config::default();
        Limits::from_config(&c)
    }
}

impl Limits {
    pub fn from_config(c: &crate::config::Config) -> Limits {
        Limits {
            client_queue: c.client_queue,
            max_channels: c.max_channels_per_socket,
            max_bindings: c.max_bindings_per_join,
            max_live_rows: c.max_live_rows,
            max_joins_per_second: c.max_joins_per_second,
            max_events_per_second: c.max_events_per_second,
            max_presence_events: c.max_presence_events,
            presence_window: Duration::from_secs(c.presence_window_secs),
            max_presence_payload_bytes: c.max_presence_payload_bytes,
            max_broadcast_payload_bytes: c.max_broadcast_payload_bytes,
            max_record_bytes: c.max_record_bytes,
            auth_timeout: Duration::from_secs(c.auth.timeout_secs),
        }
    }
}

/// A table's schema and name as its counter's label says them, and the counter.
type TableCounter = (Arc<str>, Arc<str>, Counter);

/// Counters shared by the core, the transports and `/metrics`: handles on the gateway's
/// [`Telemetry`] recorder.
#[derive(Debug)]
pub struct Metrics {
    pub telemetry: Telemetry,
    pub clients: Gauge,
    pub channels: Gauge,
    pub subscriptions: Gauge,
    pub changes_dispatched: Counter,
    pub frames_delivered: Counter,
    pub slow_client_disconnects: Counter,
    /// Event streams that fell behind and went on from the change log instead of being dropped.
    pub slow_client_catchups: Counter,
    pub broadcasts_received: Counter,
    /// Binary broadcasts a member's encoding could not carry (Phoenix 1.0.0).
    pub broadcasts_undeliverable: Counter,
    pub presence_events: Counter,
    pub rate_limited: Counter,
    /// `walcast.rls_check` calls (one per table per batch of changes).
    pub rls_checks: Counter,
    /// Change deliveries withheld by row-level security (per subscriber and change).
    pub rls_withheld: Counter,
    /// Tokens refused (connect, join, refresh, REST) and channels closed when their token expired.
    pub auth_refused: Counter,
    pub commit_to_dispatch: Histogram,
    pub rls_check: Histogram,
    pub snapshot: Histogram,
    pub replay: Histogram,
    /// `walcast_table_changes_total`'s counter of each table (by relation id) and its label.
    tables: std::sync::Mutex<std::collections::HashMap<u32, TableCounter>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Telemetry::new())
    }
}

impl Metrics {
    pub fn new(telemetry: Telemetry) -> Metrics {
        use crate::telemetry as t;
        let counter = |name| telemetry.counter(name, &[]);
        let gauge = |name| telemetry.gauge(name, &[]);
        let histogram = |name| telemetry.histogram(name, &[]);
        Metrics {
            clients: gauge(t::CLIENTS),
            channels: gauge(t::CHANNELS),
            subscriptions: gauge(t::SUBSCRIPTIONS),
            changes_dispatched: counter(t::CHANGES_DISPATCHED),
            frames_delivered: counter(t::FRAMES_DELIVERED),
            slow_client_disconnects: counter(t::SLOW_DISCONNECTS),
            slow_client_catchups: counter(t::SLOW_CATCHUPS),
            broadcasts_received: counter(t::BROADCASTS),
            broadcasts_undeliverable: counter(t::BROADCASTS_UNDELIVERABLE),
            presence_events: counter(t::PRESENCE_EVENTS),
            rate_limited: counter(t::RATE_LIMITED),
            rls_checks: counter(t::RLS_CHECKS),
            rls_withheld: counter(t::RLS_WITHHELD),
            auth_refused: counter(t::AUTH_REFUSED),
            commit_to_dispatch: histogram(t::COMMIT_TO_DISPATCH),
            rls_check: histogram(t::RLS_CHECK),
            snapshot: histogram(t::SNAPSHOT),
            replay: histogram(t::REPLAY),
            tables: Default::default(),
            telemetry,
        }
    }

    /// A change matched and queued for its subscribers: counted, with the time since its commit.
    pub fn dispatched(&self, commit_ts: i64, relation: &crate::change::Relation) {
        self.changes_dispatched.increment(1);
        self.table_changes(relation).increment(1);
        let micros = crate::replication::wire::now_pg_micros().saturating_sub(commit_ts).max(0);
        self.commit_to_dispatch.record(micros as f64 / 1e6);
    }

    /// The table's counter, registered on its first change (and again if it was renamed).
    fn table_changes(&self, relation: &crate::change::Relation) -> Counter {
        let mut tables = crate::locks::lock(&self.tables);
        match tables.get(&relation.id) {
            Some((schema, table, counter)) if *schema == relation.schema && *table == relation.table => {
                counter.clone()
            }
            _ => {
                let name = format!("{}.{}", relation.schema, relation.table);
                let counter = self.telemetry.counter(crate::telemetry::TABLE_CHANGES, &[("table", &name)]);
                let names = (Arc::clone(&relation.schema), Arc::clone(&relation.table));
                tables.insert(relation.id, (names.0, names.1, counter.clone()));
                counter
            }
        }
    }

    /// A token refused: counted, and as a refusal for its token.
    pub fn token_refused(&self) {
        self.auth_refused.increment(1);
        self.telemetry.refused("token");
    }

    /// A request over a per-socket limit.
    pub fn limited(&self) {
        self.rate_limited.increment(1);
        self.telemetry.refused("rate_limit");
    }

    /// A client disconnected as too slow.
    pub fn too_slow(&self) {
        self.slow_client_disconnects.increment(1);
        self.telemetry.refused("slow_client");
    }

    /// The value `name` (no labels) has now, as exported (for tests and benchmarks).
    pub fn value(&self, name: &str) -> Option<f64> {
        let text = self.telemetry.render();
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}
