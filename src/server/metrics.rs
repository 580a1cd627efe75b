//! `/metrics` in the Prometheus text format. Metric names are constants here.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::replication::stream::lag_seconds;
use crate::server::AppState;

pub const CLIENTS: &str = "walcast_connected_clients";
pub const SUBSCRIPTIONS: &str = "walcast_subscriptions";
pub const CHANGES_RECEIVED: &str = "walcast_changes_received_total";
pub const CHANGES_DISPATCHED: &str = "walcast_changes_dispatched_total";
pub const FRAMES_DELIVERED: &str = "walcast_frames_delivered_total";
pub const SLOW_DISCONNECTS: &str = "walcast_slow_client_disconnects_total";
pub const LAG_BYTES: &str = "walcast_replication_lag_bytes";
pub const LAG_SECONDS: &str = "walcast_replication_lag_seconds";
pub const CONNECTED: &str = "walcast_replication_connected";
pub const CONNECTIONS: &str = "walcast_replication_connections_total";

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let m = &state.fanout.metrics;
    let s = &state.status;
    let relaxed = Ordering::Relaxed;
    let rows: [(&str, &str, &str, String); 10] = [
        (CLIENTS, "gauge", "Connected WebSocket clients.", m.clients.load(relaxed).to_string()),
        (
            SUBSCRIPTIONS,
            "gauge",
            "Active postgres_changes bindings.",
            m.subscriptions.load(relaxed).to_string(),
        ),
        (
            CHANGES_RECEIVED,
            "counter",
            "Row changes decoded from the replication stream.",
            s.changes_received.load(relaxed).to_string(),
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
            "Change frames queued to client sockets.",
            m.frames_delivered.load(relaxed).to_string(),
        ),
        (
            SLOW_DISCONNECTS,
            "counter",
            "Clients disconnected because their queue was full.",
            m.slow_client_disconnects.load(relaxed).to_string(),
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
    ];
    let mut out = String::with_capacity(1536);
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
