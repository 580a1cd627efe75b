//! The one way every transport reads and verifies a request's token (WebSocket upgrades, event
//! streams and long-polls, REST broadcast), so they accept the same places and refuse alike.
//!
//! Owns: where a token may be (header, query, cookie) and in what order. Must not: log a token.

use axum::http::HeaderMap;

use crate::auth::{AuthError, Credentials};
use crate::server::AppState;

/// The request's token: `Authorization: Bearer`, then `apikey` / `x-api-key` headers, then the
/// `access_token` / `apikey` query parameters, then an `access_token` cookie.
pub(crate) fn token(headers: &HeaderMap, access_token: Option<&str>, apikey: Option<&str>) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let bearer = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let cookie = header("cookie").and_then(|c| {
        c.split(';')
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| *k == "access_token")
            .map(|(_, v)| v)
    });
    bearer
        .or_else(|| header("apikey"))
        .or_else(|| header("x-api-key"))
        .or(access_token)
        .or(apikey)
        .or(cookie)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// The token verified; `None` when authentication is off.
pub(crate) async fn verify(state: &AppState, token: Option<&str>) -> Result<Option<Credentials>, AuthError> {
    let verifier = state.hub.verifier();
    if !verifier.required() {
        return Ok(None);
    }
    verifier.verify(token.ok_or(AuthError::Missing)?).await.map(Some)
}
