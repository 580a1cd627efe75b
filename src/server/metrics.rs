//! `/metrics` in the Prometheus text format. Metric names are constants here.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::server::AppState;
use crate::source::walsender::lag_seconds;

pub const CLIENTS: &str = "walcast_connected_clients";
pub const SUBSCRIPTIONS: &str = "walcast_subscriptions";
pub const CHANGES_RECEIVED: &str = "walcast_changes_received_total";
pub const CHANGES_DISPATCHED: &str = "walcast_changes_dispatched_total";
pub const FRAMES_DELIVERED: &str = "walcast_frames_delivered_total";
pub const SLOW_DISCONNECTS: &str = "walcast_slow_client_disconnects_total";
pub const SLOW_CATCHUPS: &str = "walcast_slow_client_catchups_total";
pub const LAG_BYTES: &str = "walcast_replication_lag_bytes";
pub const LAG_SECONDS: &str = "walcast_replication_lag_seconds";
pub const CONNECTED: &str = "walcast_replication_connected";
pub const CONNECTIONS: &str = "walcast_replication_connections_total";
pub const CHANNELS: &str = "walcast_joined_channels";
pub const BROADCASTS: &str = "walcast_broadcasts_received_total";
pub const BROADCASTS_UNDELIVERABLE: &str = "walcast_broadcasts_undeliverable_total";
pub const PRESENCE_EVENTS: &str = "walcast_presence_events_total";
pub const RATE_LIMITED: &str = "walcast_rate_limited_total";
pub const AUTH_REFUSED: &str = "walcast_auth_refused_total";
pub const RLS_CHECKS: &str = "walcast_rls_checks_total";
pub const RLS_WITHHELD: &str = "walcast_rls_withheld_total";
pub const HTTP_CONNECTIONS: &str = "walcast_http_connections";
pub const CONNECTIONS_REFUSED: &str = "walcast_connections_refused_total";
pub const CONNECTIONS_REFUSED_PER_IP: &str = "walcast_connections_refused_per_ip_total";
pub const WRITE_TIMEOUTS: &str = "walcast_write_timeouts_total";
pub const SILENT_CLOSED: &str = "walcast_silent_connections_closed_total";
pub const ORIGIN_REFUSED: &str = "walcast_origin_refused_total";
pub const CLUSTER_SLOT_OWNER: &str = "walcast_cluster_slot_owner";
pub const CLUSTER_NODES: &str = "walcast_cluster_nodes";
pub const CLUSTER_LAG_BYTES: &str = "walcast_cluster_consumer_lag_bytes";
pub const CLUSTER_LAG_SECONDS: &str = "walcast_cluster_consumer_lag_seconds";
pub const CLUSTER_LAG_CHANGES: &str = "walcast_cluster_consumer_lag_changes";
pub const CLUSTER_SLOT_LAG_BYTES: &str = "walcast_cluster_slot_lag_bytes";

/// One metric: name, type, help text, value.
type Row = (&'static str, &'static str, &'static str, String);

/// The core's counters and gauges.
fn hub_rows(m: &crate::realtime::Metrics) -> Vec<Row> {
    let relaxed = Ordering::Relaxed;
    vec![
        (CLIENTS, "gauge", "Connected WebSocket clients.", m.clients.load(relaxed).to_string()),
        (
            SUBSCRIPTIONS,
            "gauge",
            "Active postgres_changes bindings.",
            m.subscriptions.load(relaxed).to_string(),
        ),
        (
            CHANGES_DISPATCHED,
            "counter",
            "Row changes matched against subscriptions.",
            m.changes_dispatched.load(relaxed).to_string(),
        ),
        (
            FRAMES_DELIVERED,
            "counter",
            "Frames queued to clients by the core (changes, broadcasts, presence).",
            m.frames_delivered.load(relaxed).to_string(),
        ),
        (
            SLOW_DISCONNECTS,
            "counter",
            "Clients disconnected because their queue was full.",
            m.slow_client_disconnects.load(relaxed).to_string(),
        ),
        (CHANNELS, "gauge", "Channels joined, over all clients.", m.channels.load(relaxed).to_string()),
        (
            BROADCASTS,
            "counter",
            "Broadcasts accepted from clients, REST and the database.",
            m.broadcasts_received.load(relaxed).to_string(),
        ),
        (
            BROADCASTS_UNDELIVERABLE,
            "counter",
            "Binary broadcasts not sent to members whose serializer (1.0.0) cannot carry them.",
            m.broadcasts_undeliverable.load(relaxed).to_string(),
        ),
        (
            PRESENCE_EVENTS,
            "counter",
            "Presence track and untrack events applied.",
            m.presence_events.load(relaxed).to_string(),
        ),
        (
            RATE_LIMITED,
            "counter",
            "Client requests refused by a per-socket limit.",
            m.rate_limited.load(relaxed).to_string(),
        ),
        (
            AUTH_REFUSED,
            "counter",
            "Tokens refused: at connect, join, refresh or REST broadcast, and channels closed on expiry.",
            m.auth_refused.load(relaxed).to_string(),
        ),
        (
            RLS_CHECKS,
            "counter",
            "Row-level security queries (one per table per batch of changes).",
            m.rls_checks.load(relaxed).to_string(),
        ),
        (
            RLS_WITHHELD,
            "counter",
            "Change deliveries withheld by row-level security (per subscriber and change).",
            m.rls_withheld.load(relaxed).to_string(),
        ),
        (
            SLOW_CATCHUPS,
            "counter",
            "Event streams that fell behind and went on from the change log instead of being dropped.",
            m.slow_client_catchups.load(relaxed).to_string(),
        ),
    ]
}

/// The replication stream's.
fn stream_rows(s: &crate::source::walsender::ReplicationStatus) -> Vec<Row> {
    let relaxed = Ordering::Relaxed;
    vec![
        (
            CHANGES_RECEIVED,
            "counter",
            "Row changes decoded from the replication stream.",
            s.changes_received.load(relaxed).to_string(),
        ),
        (
            LAG_BYTES,
            "gauge",
            "WAL bytes between the server's position and the confirmed flush position.",
            s.lag_bytes().to_string(),
        ),
        (
            LAG_SECONDS,
            "gauge",
            "Seconds since the last commit handed on, while not caught up.",
            format!("{:.3}", lag_seconds(s)),
        ),
        (
            CONNECTED,
            "gauge",
            "1 while the replication stream is connected.",
            u8::from(s.connected.load(relaxed)).to_string(),
        ),
        (
            CONNECTIONS,
            "counter",
            "Replication streams started (the first plus reconnects).",
            s.connections.load(relaxed).to_string(),
        ),
    ]
}

/// The listener's.
fn connection_rows(c: &crate::server::listener::ConnectionMetrics) -> Vec<Row> {
    let relaxed = Ordering::Relaxed;
    vec![
        (
            HTTP_CONNECTIONS,
            "gauge",
            "Open client connections (HTTP, event streams, WebSockets).",
            c.open.load(relaxed).to_string(),
        ),
        (
            CONNECTIONS_REFUSED,
            "counter",
            "Connections refused at the max_connections limit.",
            c.refused_total.load(relaxed).to_string(),
        ),
        (
            CONNECTIONS_REFUSED_PER_IP,
            "counter",
            "Connections refused at the max_connections_per_ip limit.",
            c.refused_per_ip.load(relaxed).to_string(),
        ),
        (
            WRITE_TIMEOUTS,
            "counter",
            "Connections closed because the client did not read within write_timeout_secs.",
            c.write_timeouts.load(relaxed).to_string(),
        ),
        (
            SILENT_CLOSED,
            "counter",
            "Connections closed because nothing arrived within header_read_timeout_secs.",
            c.silent_closed.load(relaxed).to_string(),
        ),
        (
            ORIGIN_REFUSED,
            "counter",
            "WebSocket upgrades refused because their Origin is not in cors.allowed_origins.",
            c.origin_refused.load(relaxed).to_string(),
        ),
    ]
}

/// A cluster node's: whether it owns the slot, the nodes alive, how far its reading of the
/// stream is behind the stream's end, and (on the owner) the slot's lag.
fn cluster_rows(
    view: &crate::cluster::view::View,
    s: &crate::source::walsender::ReplicationStatus,
) -> Vec<Row> {
    let owner = view.owner();
    vec![
        (
            CLUSTER_SLOT_OWNER,
            "gauge",
            "1 while this node owns the replication slot.",
            u8::from(owner).to_string(),
        ),
        (
            CLUSTER_NODES,
            "gauge",
            "Nodes alive in the cluster, this one included (as of its last heartbeat).",
            view.registry.alive().to_string(),
        ),
        (
            CLUSTER_LAG_BYTES,
            "gauge",
            "WAL bytes between the stream's last position and this node's log.",
            s.lag_bytes().to_string(),
        ),
        (
            CLUSTER_LAG_CHANGES,
            "gauge",
            "Changes in the stream after the last chunk this node read (as of the last poll of its end).",
            s.stream_changes_end
                .load(Ordering::Relaxed)
                .saturating_sub(s.stream_changes_read.load(Ordering::Relaxed))
                .to_string(),
        ),
        (
            CLUSTER_LAG_SECONDS,
            "gauge",
            "Seconds since the commit of the last change this node read, while behind the stream.",
            format!("{:.3}", lag_seconds(s)),
        ),
        (
            CLUSTER_SLOT_LAG_BYTES,
            "gauge",
            "On the slot owner: WAL bytes between the server's position and the confirmed flush position.",
            if owner { view.slot_status.lag_bytes() } else { 0 }.to_string(),
        ),
    ]
}

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let rows = hub_rows(state.hub.metrics())
        .into_iter()
        .chain(stream_rows(&state.status))
        .chain(connection_rows(&state.connections))
        .chain(state.cluster.as_deref().map(|v| cluster_rows(v, &state.status)).unwrap_or_default());
    let mut out = String::with_capacity(2048);
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
