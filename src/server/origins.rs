//! Browser origins on the wire: CORS on every HTTP route (tower-http's layer answers preflights
//! and adds the headers for an origin on `cors.allowed_origins`), and the `Origin` of every
//! WebSocket upgrade checked (a refused one is 403, counted).
//!
//! Owns: what a preflight allows, and the upgrade check. Must not: decide who a request is
//! (tokens are the transports'), or log a request's query (it may carry a token).

use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::origins::Origins;
use crate::server::AppState;

/// Request headers a page may send: the token's (`Authorization`, `apikey`), a JSON body's, and
/// an event stream's resume position; those the Supabase clients add.
const ALLOWED_HEADERS: [&str; 7] =
    ["authorization", "apikey", "x-api-key", "content-type", "last-event-id", "x-client-info", "prefer"];

/// CORS for the HTTP routes: preflights answered, and the response headers for an allowed
/// origin. Nothing is added for an origin not on the list (the browser then refuses).
pub fn cors(origins: &Origins) -> CorsLayer {
    let allow = if origins.any() {
        AllowOrigin::any()
    } else {
        let me = origins.clone();
        AllowOrigin::predicate(move |origin: &HeaderValue, _| origin.to_str().is_ok_and(|o| me.allows(o)))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
        .expose_headers([header::CONTENT_TYPE, header::RETRY_AFTER])
        .allow_credentials(origins.credentials())
        .max_age(origins.max_age())
}

/// Refuses a WebSocket upgrade whose `Origin` is not on the list (when one is configured): a
/// browser page from another site must not open sockets with the user's cookies. Clients that
/// are not browsers send no `Origin` and pass.
pub async fn check_upgrade(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let origin = req.headers().get(header::ORIGIN).map(|o| o.to_str().unwrap_or("(not text)").to_owned());
    match origin {
        Some(origin) if upgrade && state.origins.configured() && !state.origins.allows(&origin) => {
            state.connections.origin_refused.fetch_add(1, Ordering::Relaxed);
            state.connections.telemetry.refused("origin");
            tracing::debug!(%origin, "WebSocket upgrade refused for its origin");
            let body = serde_json::json!({"error": format!("origin not allowed: {origin}")});
            (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
        }
        _ => next.run(req).await,
    }
}
