//! Metrics through the `metrics` crate: one Prometheus recorder per gateway (none is installed
//! globally, so gateways sharing a process — tests, `walcast dev --nodes` — count apart), and
//! [`CATALOGUE`], every metric it records with its kind, help text and labels. Adding one is a
//! line here and a line where it happens (`telemetry.counter(REFUSED, &[("reason", "origin")])`).
//!
//! Owns: the recorder, its histogram buckets, the catalogue. Must not: record row values, tokens or
//! other unbounded label values (a label is an enumeration or a table name).

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Connected clients (sockets and streams with a session).
pub const CLIENTS: &str = "walcast_connected_clients";
pub const SUBSCRIPTIONS: &str = "walcast_subscriptions";
pub const CHANGES_DISPATCHED: &str = "walcast_changes_dispatched_total";
pub const FRAMES_DELIVERED: &str = "walcast_frames_delivered_total";
pub const SLOW_DISCONNECTS: &str = "walcast_slow_client_disconnects_total";
pub const SLOW_CATCHUPS: &str = "walcast_slow_client_catchups_total";
pub const CHANNELS: &str = "walcast_joined_channels";
pub const BROADCASTS: &str = "walcast_broadcasts_received_total";
pub const BROADCASTS_UNDELIVERABLE: &str = "walcast_broadcasts_undeliverable_total";
pub const PRESENCE_EVENTS: &str = "walcast_presence_events_total";
pub const RATE_LIMITED: &str = "walcast_rate_limited_total";
pub const AUTH_REFUSED: &str = "walcast_auth_refused_total";
pub const RLS_CHECKS: &str = "walcast_rls_checks_total";
pub const RLS_WITHHELD: &str = "walcast_rls_withheld_total";
/// Commit (its timestamp in Postgres) to the change being matched and queued for subscribers.
pub const COMMIT_TO_DISPATCH: &str = "walcast_commit_to_dispatch_seconds";
/// A batch of row-level security checks (one query per table and role).
pub const RLS_CHECK: &str = "walcast_rls_check_seconds";
/// An initial snapshot, from its start to its last row queued.
pub const SNAPSHOT: &str = "walcast_snapshot_seconds";
/// A replay from the change log, from its start to the hand-over to live changes.
pub const REPLAY: &str = "walcast_replay_seconds";
/// A frame's wait in its session's queue, from the core queueing it to its transport writing it.
pub const QUEUED: &str = "walcast_dispatch_to_write_seconds";
/// Sessions open, by protocol.
pub const SESSIONS: &str = "walcast_sessions";
/// The protocols of [`SESSIONS`].
pub const PROTOCOLS: &[&str] = &["phoenix", "plain", "sse", "socketio", "graphql", "other"];
/// Changes matched against subscriptions, by table.
pub const TABLE_CHANGES: &str = "walcast_table_changes_total";
/// Row-level security checks that failed (the changes they covered were withheld).
pub const RLS_ERRORS: &str = "walcast_rls_errors_total";
/// Requests, connections and messages refused, by reason.
pub const REFUSED: &str = "walcast_refused_total";

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A catalogue entry.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Label names, and for an enumeration its values (rendered at 0 from the start).
    pub labels: &'static [(&'static str, &'static [&'static str])],
}

/// Why something was refused: the values of [`REFUSED`]'s `reason`.
pub const REFUSAL_REASONS: &[&str] = &[
    "token",
    "origin",
    "max_connections",
    "max_connections_per_ip",
    "rate_limit",
    "slow_client",
    "frame_too_large",
    "malformed",
];

/// Every metric recorded through the `metrics` crate.
pub const CATALOGUE: &[Spec] = &[
    Spec {
        name: CLIENTS,
        kind: Kind::Gauge,
        help: "Connected clients (WebSockets, event streams and long-polls with a session; a GraphQL connection once).",
        labels: &[],
    },
    Spec { name: SUBSCRIPTIONS, kind: Kind::Gauge, help: "Active postgres_changes bindings.", labels: &[] },
    Spec {
        name: CHANGES_DISPATCHED,
        kind: Kind::Counter,
        help: "Row changes matched against subscriptions.",
        labels: &[],
    },
    Spec {
        name: FRAMES_DELIVERED,
        kind: Kind::Counter,
        help: "Frames queued to clients by the core (changes, broadcasts, presence).",
        labels: &[],
    },
    Spec {
        name: SLOW_DISCONNECTS,
        kind: Kind::Counter,
        help: "Clients disconnected because their queue was full.",
        labels: &[],
    },
    Spec { name: CHANNELS, kind: Kind::Gauge, help: "Channels joined, over all clients.", labels: &[] },
    Spec {
        name: BROADCASTS,
        kind: Kind::Counter,
        help: "Broadcasts accepted from clients, REST and the database.",
        labels: &[],
    },
    Spec {
        name: BROADCASTS_UNDELIVERABLE,
        kind: Kind::Counter,
        help: "Binary broadcasts not sent to members whose serializer (1.0.0) cannot carry them.",
        labels: &[],
    },
    Spec {
        name: PRESENCE_EVENTS,
        kind: Kind::Counter,
        help: "Presence track and untrack events applied.",
        labels: &[],
    },
    Spec {
        name: RATE_LIMITED,
        kind: Kind::Counter,
        help: "Client requests refused by a per-socket limit.",
        labels: &[],
    },
    Spec {
        name: AUTH_REFUSED,
        kind: Kind::Counter,
        help: "Tokens refused: at connect, join, refresh or REST broadcast, and channels closed on expiry.",
        labels: &[],
    },
    Spec {
        name: RLS_CHECKS,
        kind: Kind::Counter,
        help: "Row-level security queries (one per table per batch of changes).",
        labels: &[],
    },
    Spec {
        name: RLS_WITHHELD,
        kind: Kind::Counter,
        help: "Change deliveries withheld by row-level security (per subscriber and change).",
        labels: &[],
    },
    Spec {
        name: SLOW_CATCHUPS,
        kind: Kind::Counter,
        help: "Event streams that fell behind and went on from the change log instead of being dropped.",
        labels: &[],
    },
    Spec {
        name: COMMIT_TO_DISPATCH,
        kind: Kind::Histogram,
        help: "Seconds from a transaction's commit in Postgres to its changes queued for subscribers.",
        labels: &[],
    },
    Spec {
        name: RLS_CHECK,
        kind: Kind::Histogram,
        help: "Seconds one row-level security check (a table, a role, a batch of rows) takes.",
        labels: &[],
    },
    Spec {
        name: SNAPSHOT,
        kind: Kind::Histogram,
        help: "Seconds an initial snapshot takes, from its start to its last row queued.",
        labels: &[],
    },
    Spec {
        name: REPLAY,
        kind: Kind::Histogram,
        help: "Seconds a replay from the change log takes, until live changes take over.",
        labels: &[],
    },
    Spec {
        name: QUEUED,
        kind: Kind::Histogram,
        help: "Seconds a frame waits in its session's queue, from the core queueing it to its transport writing it (the oldest of each write).",
        labels: &[("protocol", PROTOCOLS)],
    },
    Spec {
        name: SESSIONS,
        kind: Kind::Gauge,
        help: "Client connections open (sockets, event streams, long-polls with a session; a GraphQL connection once, whatever it runs), by protocol.",
        labels: &[("protocol", PROTOCOLS)],
    },
    Spec {
        name: TABLE_CHANGES,
        kind: Kind::Counter,
        help: "Row changes matched against subscriptions, by table (schema.table; exported once a table has one).",
        labels: &[("table", &[])],
    },
    Spec {
        name: RLS_ERRORS,
        kind: Kind::Counter,
        help: "Row-level security checks that failed; the changes they covered were withheld (fail closed).",
        labels: &[],
    },
    Spec {
        name: REFUSED,
        kind: Kind::Counter,
        help: "Requests, connections and messages refused, by reason.",
        labels: &[("reason", REFUSAL_REASONS)],
    },
];

/// Histogram buckets, in seconds: 100 µs to 30 s.
const BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0];

static METADATA: Metadata<'static> = Metadata::new("walcast", metrics::Level::INFO, Some("walcast"));

/// A gateway's recorder. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<(PrometheusRecorder, PrometheusHandle)>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Telemetry {
    /// A recorder with every catalogue entry described and registered (so each is exported from
    /// the start, an enumerated label with each of its values).
    pub fn new() -> Telemetry {
        let builder = PrometheusBuilder::new();
        // The buckets are constant and valid: the error case cannot arise.
        let builder = match builder.set_buckets(&BUCKETS) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let t = Telemetry { inner: Arc::new((recorder, handle)) };
        for spec in CATALOGUE {
            t.describe(spec);
        }
        t
    }

    fn recorder(&self) -> &PrometheusRecorder {
        &self.inner.0
    }

    fn describe(&self, spec: &Spec) {
        let (name, help) = (KeyName::from_const_str(spec.name), SharedString::const_str(spec.help));
        match spec.kind {
            Kind::Counter => self.recorder().describe_counter(name, None, help),
            Kind::Gauge => self.recorder().describe_gauge(name, None, help),
            Kind::Histogram => self.recorder().describe_histogram(name, None, help),
        }
        match spec.labels {
            [] => self.register(spec.name, spec.kind, &[]),
            [(label, values), ..] => {
                for value in values.iter() {
                    self.register(spec.name, spec.kind, &[(label, value)]);
                }
            }
        }
    }

    fn register(&self, name: &'static str, kind: Kind, labels: &[(&'static str, &str)]) {
        match kind {
            Kind::Counter => drop(self.counter(name, labels)),
            Kind::Gauge => drop(self.gauge(name, labels)),
            Kind::Histogram => drop(self.histogram(name, labels)),
        }
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect();
        Key::from_parts(name, labels)
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder().register_counter(&Self::key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder().register_gauge(&Self::key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder().register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// Counts one refusal for `reason` (one of [`REFUSAL_REASONS`]).
    pub fn refused(&self, reason: &'static str) {
        self.counter(REFUSED, &[("reason", reason)]).increment(1);
    }

    /// Folds the histograms' recorded samples into their buckets every few seconds until
    /// `shutdown`, so that they hold no more than a few seconds of samples whether or not
    /// `/metrics` is scraped.
    pub async fn upkeep(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => self.inner.1.run_upkeep(),
            }
        }
    }

    /// The Prometheus text of everything recorded.
    pub fn render(&self) -> String {
        self.inner.1.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalogue_entry_is_exported_from_the_start_and_counts() {
        let t = Telemetry::new();
        let text = t.render();
        // Each one, but those whose label values come with use (a table's name).
        for spec in CATALOGUE.iter().filter(|s| s.labels.iter().all(|(_, values)| !values.is_empty())) {
            assert!(text.contains(&format!("# TYPE {} ", spec.name)), "{}: {text}", spec.name);
        }
        assert!(text.contains("walcast_refused_total{reason=\"origin\"} 0"), "{text}");
        t.refused("origin");
        t.histogram(RLS_CHECK, &[]).record(0.003);
        let text = t.render();
        assert!(text.contains("walcast_refused_total{reason=\"origin\"} 1"), "{text}");
        assert!(text.contains("walcast_rls_check_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("walcast_rls_check_seconds_count 1"), "{text}");
        // Another gateway's recorder counts apart.
        assert!(Telemetry::new().render().contains("walcast_refused_total{reason=\"origin\"} 0"));
    }
}
