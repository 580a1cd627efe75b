//! The axum router: WebSocket endpoints, health, readiness and metrics.
//! Owns: HTTP concerns only. Must not: hold domain logic (that is `subscribe`, `fanout`, `protocol`).

pub mod metrics;
pub mod ws;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::fanout::Fanout;
use crate::replication::stream::ReplicationStatus;
use crate::subscribe::PublishedCatalog;

/// Everything a request handler may use.
#[derive(Clone)]
pub struct AppState {
    pub fanout: Fanout,
    pub catalog: Arc<PublishedCatalog>,
    pub status: Arc<ReplicationStatus>,
    pub limits: Limits,
    /// Cancelled at shutdown: sockets close with 1001.
    pub shutdown: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub idle_timeout: Duration,
    pub client_queue: usize,
    pub max_channels: usize,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/realtime/v1/websocket", get(ws::upgrade))
        .route("/socket/websocket", get(ws::upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::render))
        .with_state(state)
}

async fn readyz(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    let s = &state.status;
    if !s.connected.load(Ordering::Relaxed) {
        let reason = s.error().unwrap_or_else(|| "replication stream is not connected".into());
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": reason})),
        );
    }
    if !s.caught_up.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": "replication stream is catching up",
                                    "lag_bytes": s.lag_bytes()})),
        );
    }
    (StatusCode::OK, Json(serde_json::json!({"ready": true, "lag_bytes": s.lag_bytes()})))
}
