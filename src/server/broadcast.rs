//! REST broadcast, as Supabase serves it under `/api/…` and `/realtime/v1/api/…`:
//! `POST /broadcast` (a batch of JSON messages) and `POST /broadcast/{topic}/events/{event}`
//! (one message; JSON or `application/octet-stream` body). Both answer 202 with an empty body.
//! Sends to private topics need the bearer's policies on `realtime.messages` to allow them.
//!
//! Owns: HTTP parsing and status codes. Must not: deliver anything itself (it publishes on the
//! core's bus like a socket does).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::rls::Subject;
use crate::auth::topics::TopicError;
use crate::auth::Credentials;
use crate::change::broadcast::{BroadcastMessage, BroadcastPayload};
use crate::realtime::TopicKey;
use crate::server::AppState;

#[derive(Debug, Deserialize)]
pub struct Batch {
    messages: Vec<BatchMessage>,
}

#[derive(Debug, Deserialize)]
struct BatchMessage {
    topic: String,
    event: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    private: bool,
    /// Sent to clients as `meta.id`.
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct SingleParams {
    #[serde(default)]
    private: Option<String>,
}

fn error(status: StatusCode, key: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({ key: message.into() }))).into_response()
}

/// The request's token (read as every transport reads it), verified. Any failure is Supabase's
/// 401 `{"message":"Unauthorized"}`.
async fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Option<Credentials>, Response> {
    crate::server::credentials::verify(
        state,
        crate::server::credentials::token(headers, None, None).as_deref(),
    )
    .await
    .map_err(|e| {
        tracing::debug!(error = %e, "REST broadcast refused");
        state.hub.metrics().token_refused();
        error(StatusCode::UNAUTHORIZED, "message", "Unauthorized")
    })
}

/// Whether the bearer may send to private `topic` (its policies on `realtime.messages` allow
/// a broadcast INSERT): 403 `{"message":"Unauthorized"}` if not. Without authentication every
/// sender may.
async fn may_write(state: &AppState, credentials: Option<&Credentials>, topic: &str) -> Result<(), Response> {
    let Some(c) = credentials else { return Ok(()) };
    let forbidden = || {
        state.hub.metrics().token_refused();
        error(StatusCode::FORBIDDEN, "message", "Unauthorized")
    };
    // The same answer a joining socket gets (`Hub::topic_access`): a policy that raises, or no
    // database to ask, denies.
    match state.hub.topic_access(true, Some(&Subject::of(&c.claims)), topic).await {
        Ok(access) if access.broadcast_write => Ok(()),
        Ok(_) | Err(TopicError::Policy(_)) => Err(forbidden()),
        Err(e) => {
            tracing::warn!(error = %crate::errors::chain(&e), "REST broadcast check failed");
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "message",
                "Realtime was unable to connect to the project database",
            ))
        }
    }
}

/// Messages each subject (role and `sub`, or everyone when authentication is off) has sent in
/// the current second, so that no sender can flood every channel through REST.
#[derive(Debug, Default)]
pub struct SenderWindows {
    windows: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, usize)>>,
}

impl SenderWindows {
    /// Counts `n` messages from `sender`; false when that passes `limit` this second.
    fn allow(&self, sender: String, n: usize, limit: usize) -> bool {
        let now = std::time::Instant::now();
        let second = std::time::Duration::from_secs(1);
        let mut windows = crate::locks::lock(&self.windows);
        if windows.len() >= 10_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start) < second);
        }
        let (start, count) = windows.entry(sender).or_insert((now, 0));
        if now.duration_since(*start) >= second {
            *start = now;
            *count = 0;
        }
        if *count + n > limit {
            return false;
        }
        *count += n;
        true
    }
}

/// The rate-limit key of a sender.
fn sender(credentials: Option<&Credentials>) -> String {
    match credentials {
        Some(c) => format!("{}\u{0}{}", c.claims.role, c.claims.sub.as_deref().unwrap_or("")),
        None => String::new(),
    }
}

/// The 429 to answer when `sender` would pass its messages per second.
fn rate_limited(state: &AppState, credentials: Option<&Credentials>, n: usize) -> Option<Response> {
    let limit = state.rest.max_messages_per_second;
    if state.rest.senders.allow(sender(credentials), n, limit) {
        return None;
    }
    state.hub.metrics().limited();
    Some(error(StatusCode::TOO_MANY_REQUESTS, "message", "Too many messages per second"))
}

/// REST broadcast limits and their state.
#[derive(Debug)]
pub struct RestLimits {
    /// Messages one sender may post per second.
    pub max_messages_per_second: usize,
    /// Distinct private topics one request may name (each is a policy check in the database).
    pub max_private_topics: usize,
    pub senders: SenderWindows,
}

fn too_large() -> Response {
    error(StatusCode::UNPROCESSABLE_ENTITY, "message", "Payload size exceeds tenant limit")
}

fn publish(state: &AppState, topic: &str, private: bool, message: BroadcastMessage) {
    let key = TopicKey { topic: format!("realtime:{topic}").into(), private };
    state.hub.publish_broadcast(key, None, message);
}

/// `POST /api/broadcast` `{"messages":[{topic, event, payload, private?, id?}]}`. Every message is
/// checked before any is delivered: one private topic the bearer may not write to refuses the
/// whole batch (403).
pub async fn batch(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let credentials = match authorize(&state, &headers).await {
        Ok(c) => c,
        Err(denied) => return denied,
    };
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "error",
                format!("expected {{\"messages\":[{{\"topic\",\"event\",\"payload\"}}]}}: {e}"),
            )
        }
    };
    let mut ready = Vec::with_capacity(batch.messages.len());
    for m in batch.messages {
        if m.topic.is_empty() {
            return error(StatusCode::BAD_REQUEST, "error", "a message has an empty topic");
        }
        let payload = serde_json::to_vec(&m.payload).unwrap_or_else(|_| b"null".to_vec());
        if state.hub.broadcast_fits(payload.len()).is_err() {
            return too_large();
        }
        let meta = m.id.as_ref().map(|id| axum::body::Bytes::from(json!({"id": id}).to_string()));
        ready.push((
            m.topic,
            m.private,
            BroadcastMessage {
                event: m.event,
                payload: BroadcastPayload::Json(payload.into()),
                meta,
                logged: None,
            },
        ));
    }
    let mut private: Vec<&str> = ready.iter().filter(|(_, p, _)| *p).map(|(t, _, _)| t.as_str()).collect();
    private.sort_unstable();
    private.dedup();
    if private.len() > state.rest.max_private_topics {
        return error(
            StatusCode::BAD_REQUEST,
            "error",
            format!("a request may name at most {} private topics", state.rest.max_private_topics),
        );
    }
    if let Some(limited) = rate_limited(&state, credentials.as_ref(), ready.len()) {
        return limited;
    }
    let mut checked: Vec<&str> = Vec::new();
    for (topic, _, _) in ready.iter().filter(|(_, private, _)| *private) {
        if !checked.contains(&topic.as_str()) {
            if let Err(denied) = may_write(&state, credentials.as_ref(), topic).await {
                return denied;
            }
            checked.push(topic);
        }
    }
    for (topic, private, message) in ready {
        publish(&state, &topic, private, message);
    }
    StatusCode::ACCEPTED.into_response()
}

/// `POST /api/broadcast/{topic}/events/{event}[?private=true]` with a JSON or binary body.
pub async fn single(
    State(state): State<AppState>,
    Path((topic, event)): Path<(String, String)>,
    Query(params): Query<SingleParams>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let credentials = match authorize(&state, &headers).await {
        Ok(c) => c,
        Err(denied) => return denied,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let payload = match content_type.as_str() {
        "application/json" => {
            if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
                return error(StatusCode::BAD_REQUEST, "error", "the body is not valid JSON");
            }
            BroadcastPayload::Json(body)
        }
        "application/octet-stream" => BroadcastPayload::Binary(body),
        _ => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "error",
                "Unsupported Media Type. Use application/json or application/octet-stream",
            )
        }
    };
    if state.hub.broadcast_fits(payload.len()).is_err() {
        return too_large();
    }
    let private = params.private.as_deref().is_some_and(|p| p.eq_ignore_ascii_case("true"));
    if let Some(limited) = rate_limited(&state, credentials.as_ref(), 1) {
        return limited;
    }
    if private {
        if let Err(denied) = may_write(&state, credentials.as_ref(), &topic).await {
            return denied;
        }
    }
    publish(&state, &topic, private, BroadcastMessage { event, payload, meta: None, logged: None });
    StatusCode::ACCEPTED.into_response()
}
