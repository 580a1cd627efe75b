//! The axum router: WebSocket endpoints, REST broadcast, health, readiness and metrics.
//! Owns: HTTP concerns only. Must not: hold domain logic (that is `realtime`, `protocol`).

pub mod broadcast;
pub mod credentials;
pub mod gate;
pub mod graphql;
pub mod inspector;
pub mod listener;
pub mod metrics;
pub mod origins;
pub mod socketio;
pub mod sse;
pub mod ws;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::realtime::Hub;
use crate::source::walsender::ReplicationStatus;

/// Everything a request handler may use.
#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    pub status: Arc<ReplicationStatus>,
    /// This node's view of its cluster (`None`: a single node).
    pub cluster: Option<Arc<crate::cluster::view::View>>,
    /// Largest client frame (and REST body) accepted.
    pub max_frame_bytes: usize,
    pub idle_timeout: Duration,
    /// Cancelled at shutdown: sockets close with 1001.
    pub shutdown: CancellationToken,
    /// Open and refused connections, write timeouts (the listener counts them).
    pub connections: Arc<listener::ConnectionMetrics>,
    /// REST broadcast limits and the senders' counts.
    pub rest: Arc<broadcast::RestLimits>,
    /// The GraphQL schema of the current catalog.
    pub graphql: Arc<crate::protocol::graphql::schema::Schemas>,
    /// Where Socket.IO clients connect; empty: not served.
    pub socketio_path: Arc<str>,
    /// Open client connections at most (long-polling sessions count as connections).
    pub max_connections: usize,
    /// Browser origins allowed (CORS, WebSocket upgrades).
    pub origins: Arc<crate::origins::Origins>,
    /// Keys the inspector offers (`walcast dev` only).
    pub offered_keys: Option<Arc<inspector::OfferedKeys>>,
}

/// The span a client's session runs in: its id and protocol. Never its token, filters or rows.
pub(crate) fn session_span(id: crate::realtime::SessionId, protocol: &'static str) -> tracing::Span {
    tracing::info_span!("session", id, protocol)
}

/// The client-facing routes; `/metrics` too unless it has an admin address of its own.
pub fn router(state: AppState, with_metrics: bool) -> Router {
    let body_limit = DefaultBodyLimit::max(state.max_frame_bytes);
    let mut router = Router::new()
        .route("/realtime/v1/websocket", get(ws::upgrade))
        .route("/socket/websocket", get(ws::upgrade))
        .route("/v1/tables/{table}/changes", get(sse::changes))
        .route("/v1/channels/{name}/events", get(sse::channel_events))
        .route("/v1/ws", get(ws::upgrade_plain))
        .route("/graphql", get(graphql::upgrade).post(graphql::query))
        .route("/v1/cluster", get(cluster))
        .route("/v1/tables", get(inspector::tables))
        .route("/", get(inspector::page))
        .route("/inspector", get(inspector::page))
        .route("/inspector/app.js", get(inspector::script))
        .route("/inspector/app.css", get(inspector::style));
    for prefix in ["/api", "/realtime/v1/api"] {
        router = router
            .route(&format!("{prefix}/broadcast"), post(broadcast::batch))
            .route(&format!("{prefix}/broadcast/{{topic}}/events/{{event}}"), post(broadcast::single));
    }
    router = router.route("/healthz", get(|| async { "ok" })).route("/readyz", get(readyz));
    if with_metrics {
        router = router.route("/metrics", get(metrics::render));
    }
    let socketio = (!state.socketio_path.is_empty()).then(|| socketio::routes(&state));
    let cors = origins::cors(&state.origins);
    let check = axum::middleware::from_fn_with_state(state.clone(), origins::check_upgrade);
    let router = router.layer(body_limit).with_state(state);
    let router = match socketio {
        Some(routes) => router.merge(routes),
        None => router,
    };
    router.layer(check).layer(cors)
}

/// The operators' routes, for `admin_listen`: `/metrics`, `/readyz`, `/healthz`.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::render))
        .with_state(state)
}

/// A request or upgrade refused for its token: 401 `{"error": …}`, counted.
pub(crate) fn unauthorized(state: &AppState, e: &crate::auth::AuthError) -> axum::response::Response {
    tracing::debug!(error = %e, "request refused");
    state.hub.metrics().token_refused();
    (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"error": e.connect_message()}))).into_response()
}

/// `/v1/cluster`: this node's view of its cluster; 404 on a single node.
async fn cluster(axum::extract::State(state): axum::extract::State<AppState>) -> axum::response::Response {
    match &state.cluster {
        Some(view) => Json(view.describe().await).into_response(),
        None => {
            (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": "this gateway is not a cluster node"})))
                .into_response()
        }
    }
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
        let reason = s.error().unwrap_or_else(|| "replication stream is catching up".into());
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": reason, "lag_bytes": s.lag_bytes()})),
        );
    }
    (StatusCode::OK, Json(serde_json::json!({"ready": true, "lag_bytes": s.lag_bytes()})))
}
