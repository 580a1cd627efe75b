//! The inspector: a page embedded in the binary (`assets/inspector/`), served at `/` and
//! `/inspector` with its script and style, that talks to walcast only through the public
//! protocols (`/v1/ws`, `/v1/tables`), so it is also their living documentation. And
//! `/v1/tables`: the published tables and the columns the request's token may read.
//!
//! Owns: serving the page (with the keys `walcast dev` offers, never `serve`'s) and the tables
//! endpoint. Must not: reach the core any other way than a client would.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::server::credentials::{token, verify};
use crate::server::ws::PlainParams;
use crate::server::AppState;

const PAGE: &str = include_str!("../../assets/inspector/index.html");
const SCRIPT: &str = include_str!("../../assets/inspector/app.js");
const STYLE: &str = include_str!("../../assets/inspector/app.css");
/// Where the page takes the keys it offers.
const KEYS_SLOT: &str = "<!--offered-keys-->";

/// Keys the page offers, to try things at once (`walcast dev`'s throwaway keys).
#[derive(Debug, Clone, serde::Serialize)]
pub struct OfferedKeys {
    pub anon: String,
    pub service_role: String,
}

pub async fn page(State(state): State<AppState>) -> Response {
    let keys = match &state.offered_keys {
        // Inside a <script>: `<` escaped so no value can close it.
        Some(k) => format!(
            "<script>window.WALCAST_KEYS = {};</script>",
            serde_json::to_string(k.as_ref()).unwrap_or_default().replace('<', "\\u003c")
        ),
        None => String::new(),
    };
    let html = PAGE.replacen(KEYS_SLOT, &keys, 1);
    ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

pub async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT)
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

/// `GET /v1/tables`: `{"tables":[{"schema","table","columns":[{"name","type","primary_key"}]}]}`,
/// only what the token's role may read (its column grants).
pub async fn tables(
    State(state): State<AppState>,
    Query(params): Query<PlainParams>,
    headers: HeaderMap,
) -> Response {
    let token = token(&headers, params.access_token.as_deref(), params.apikey.as_deref());
    let credentials = match verify(&state, token.as_deref()).await {
        Ok(c) => c,
        Err(e) => return crate::server::unauthorized(&state, &e),
    };
    let Some(catalog) = state.hub.catalog() else {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "the catalog is not loaded yet"})))
            .into_response();
    };
    let role = credentials.as_ref().map(|c| c.claims.role.as_ref());
    match catalog.readable_by(role).await {
        Ok(tables) => Json(json!({ "tables": tables })).into_response(),
        Err(e) => {
            // Fail closed: a role the database does not know reads nothing.
            tracing::warn!(error = %e, "reading the published tables for a role failed");
            let message = format!("the published tables could not be read for this token's role: {e}");
            (StatusCode::FORBIDDEN, Json(json!({ "error": message }))).into_response()
        }
    }
}
