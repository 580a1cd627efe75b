//! `/metrics` in the Prometheus text format: the gateway's recorder (`telemetry.rs`: the core's
//! counters, histograms, refusals by reason), then the values read from the replication stream,
//! the listener and the cluster when asked. Their names are constants here.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::server::AppState;
use crate::source::walsender::lag_seconds;

pub use crate::telemetry::{
    AUTH_REFUSED, BROADCASTS, BROADCASTS_UNDELIVERABLE, CHANGES_DISPATCHED, CHANNELS, CLIENTS,
    FRAMES_DELIVERED, PRESENCE_EVENTS, RATE_LIMITED, RLS_CHECKS, RLS_WITHHELD, SLOW_CATCHUPS,
    SLOW_DISCONNECTS, SUBSCRIPTIONS,
};
pub const CHANGES_RECEIVED: &str = "walcast_changes_received_total";
pub const LAG_BYTES: &str = "walcast_replication_lag_bytes";
pub const LAG_SECONDS: &str = "walcast_replication_lag_seconds";
pub const CONNECTED: &str = "walcast_replication_connected";
pub const READY: &str = "walcast_ready";
pub const CONNECTIONS: &str = "walcast_replication_connections_total";
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
            READY,
            "gauge",
            "1 while /readyz answers 200: the replication stream is connected and caught up.",
            u8::from(s.connected.load(relaxed) && s.caught_up.load(relaxed)).to_string(),
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
    let rows = stream_rows(&state.status)
        .into_iter()
        .chain(connection_rows(&state.connections))
        .chain(state.cluster.as_deref().map(|v| cluster_rows(v, &state.status)).unwrap_or_default());
    // What the recorder holds (the core's counters, the histograms, refusals by reason), then
    // the values read from the replication stream, the listener and the cluster as they are now.
    let mut out = state.hub.metrics().telemetry.render();
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
