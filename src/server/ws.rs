//! The WebSocket transports, IO only: Phoenix (`/realtime/v1/websocket`) and the plain JSON
//! protocol (`/v1/ws`). Each socket task reads frames, hands them to its connection
//! ([`PhoenixConnection`], [`PlainConnection`]), writes the replies, and writes what the
//! session's outbox yields.
//!
//! Owns: the upgrade (serializer version, size limits, small buffers), batched writes, the idle
//! timeout, and close codes (1001 shutdown, 1008 too slow, 1009 frame too large, 1000 idle).
//! Must not: hold channel state or block other sockets; cleanup is the session's drop.

use std::future::{poll_fn, Future};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{AuthError, Credentials};
use crate::protocol::phoenix::{PhoenixConnection, Vsn};
use crate::protocol::plain::PlainConnection;
use crate::protocol::Connection;
use crate::realtime::outbox::{Frame, OutboxReceiver};
use crate::server::gate::Gate;
use crate::server::AppState;

/// Initial read buffer per socket, and the most read at once; it grows for larger frames. Client
/// frames are small (joins, heartbeats, pushes) and most sockets are idle most of the time.
const READ_BUFFER_BYTES: usize = 512;
/// Bytes gathered before a write reaches the socket; every batch is flushed anyway.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Queued frames written in one batch before a flush.
const WRITE_BATCH: usize = 64;

#[derive(Debug, Deserialize)]
pub struct ConnectParams {
    pub apikey: Option<String>,
    pub vsn: Option<String>,
    pub log_level: Option<String>,
}

pub async fn upgrade(
    State(state): State<AppState>,
    Query(params): Query<ConnectParams>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(vsn) = Vsn::parse(params.vsn.as_deref()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("unsupported vsn {:?}: expected 1.0.0 or 2.0.0", params.vsn.unwrap_or_default())})),
        )
            .into_response();
    };
    let apikey =
        params.apikey.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_owned));
    let credentials = match authenticate(&state, apikey.as_deref()).await {
        Ok(c) => c,
        Err(e) => return crate::server::unauthorized(&state, &e),
    };
    sized(ws, &state).on_upgrade(move |socket| {
        let (conn, outbox) = PhoenixConnection::new(state.hub.clone(), vsn, credentials);
        serve(state, conn, outbox, socket)
    })
}

/// The upgrade with the frame limit and small buffers: most sockets are idle most of the time,
/// and each holds its buffers.
fn sized(ws: WebSocketUpgrade, state: &AppState) -> WebSocketUpgrade {
    let max = state.max_frame_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
}

/// The connect key, verified; `None` when authentication is off.
async fn authenticate(state: &AppState, apikey: Option<&str>) -> Result<Option<Credentials>, AuthError> {
    let verifier = state.hub.verifier();
    if !verifier.required() {
        return Ok(None);
    }
    let key = apikey.filter(|k| !k.trim().is_empty()).ok_or(AuthError::Missing)?;
    verifier.verify(key).await.map(Some)
}

/// A timer position far enough away to mean "never".
fn never() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

fn message(frame: Frame) -> Message {
    match frame {
        Frame::Text(t) => Message::Text(t),
        Frame::Binary(b) => Message::Binary(b),
        joined @ Frame::Joined { .. } => Message::Text(joined.joined_text().unwrap_or_default()),
    }
}

enum Close {
    Code(u16, &'static str),
    Gone,
}

#[derive(Debug, Deserialize)]
pub struct PlainParams {
    pub access_token: Option<String>,
    pub apikey: Option<String>,
}

/// `/v1/ws`: the plain JSON protocol. A token given at connect (query, header or cookie) must
/// verify; without one the client authenticates with an `auth` message.
pub async fn upgrade_plain(
    State(state): State<AppState>,
    Query(params): Query<PlainParams>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let token = crate::server::sse::token(&headers, params.access_token.as_deref(), params.apikey.as_deref());
    let credentials = match token {
        None => None,
        Some(t) => match crate::server::sse::authenticate(&state, Some(&t)).await {
            Ok(c) => c,
            Err(e) => return crate::server::unauthorized(&state, &e),
        },
    };
    sized(ws, &state).on_upgrade(move |socket| {
        let (conn, outbox) = PlainConnection::new(state.hub.clone(), credentials);
        serve(state, conn, outbox, socket)
    })
}

async fn serve<C: Connection>(
    state: AppState,
    mut conn: C,
    mut outbox: OutboxReceiver,
    mut socket: WebSocket,
) {
    let idle = state.idle_timeout;
    // These futures live for the whole connection: building them per loop turn would register
    // and drop a waiter on the shutdown token and a timer entry for every frame written. Polling
    // a token locks it (the server's is shared by every socket): a gate keeps it from being
    // polled again until it fires.
    let shutdown = state.shutdown.clone();
    let shutdown = shutdown.cancelled();
    let killed = outbox.killed.clone();
    let killed = killed.cancelled();
    let idle_timer = tokio::time::sleep(idle);
    // A channel's token expiring; re-armed only when the earliest expiry changes.
    let mut armed = None;
    let expiry = tokio::time::sleep_until(never());
    tokio::pin!(shutdown, killed, idle_timer, expiry);
    // Most wake-ups are for queued frames: the gates keep them from also polling the tokens and
    // the socket's read side, which have nothing new unless they woke the task themselves.
    let (shutdown_gate, killed_gate, read_gate) = (Gate::new(), Gate::new(), Gate::new());
    let close = loop {
        let replies = tokio::select! {
            biased;
            // Shutdown first: every socket gets a proper close frame.
            _ = poll_fn(|cx| shutdown_gate.poll(cx, |cx| shutdown.as_mut().poll(cx))) => {
                break Close::Code(1001, "server shutting down")
            }
            // A client the core gave up on must not receive anything more.
            _ = poll_fn(|cx| killed_gate.poll(cx, |cx| killed.as_mut().poll(cx))) => {
                break Close::Code(1008, "client too slow: outbound queue full")
            }
            // Queued frames before reading more input: write them in one batch, flush once.
            Some(frame) = outbox.rx.recv() => {
                let mut ok = socket.feed(message(frame)).await.is_ok();
                let mut n = 1;
                while ok && n < WRITE_BATCH {
                    let Ok(more) = outbox.rx.try_recv() else { break };
                    ok = socket.feed(message(more)).await.is_ok();
                    n += 1;
                }
                if !ok || socket.flush().await.is_err() {
                    break Close::Gone;
                }
                continue;
            }
            msg = poll_fn(|cx| read_gate.poll(cx, |cx| socket.poll_next_unpin(cx))) => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                match msg {
                    None => break Close::Gone,
                    Some(Err(e)) => {
                        let too_big = matches!(e.into_inner().downcast_ref::<tungstenite_error::Error>(),
                            Some(tungstenite_error::Error::Capacity(_)));
                        if too_big {
                            break Close::Code(1009, "frame too large");
                        }
                        break Close::Gone;
                    }
                    // Boxed while it runs: handling a frame (a join) is a large future, and
                    // inline every idle socket's task would keep room for it.
                    Some(Ok(Message::Text(text))) => Box::pin(conn.text(&text)).await,
                    Some(Ok(Message::Binary(bytes))) => conn.binary(&bytes),
                    Some(Ok(Message::Close(_))) => break Close::Gone,
                    Some(Ok(_)) => continue,
                }
            }
            _ = &mut idle_timer => break Close::Code(1000, "idle timeout"),
            _ = &mut expiry => {
                match conn.on_deadline() {
                    None => Vec::new(),
                    Some(closing) => {
                        if let Some(frame) = closing.frame {
                            let _ = socket.send(message(frame)).await;
                        }
                        break Close::Code(closing.code, closing.reason);
                    }
                }
            }
        };
        let next = conn.next_deadline();
        if next != armed {
            armed = next;
            expiry.as_mut().reset(next.map(tokio::time::Instant::from_std).unwrap_or_else(never));
        }
        let mut ok = true;
        for r in replies {
            ok = ok && socket.feed(message(r)).await.is_ok();
        }
        if !ok || socket.flush().await.is_err() {
            break Close::Gone;
        }
    };
    // Leave every channel (presences leave, subscriptions go) before the close frame is sent.
    drop(conn);
    if let Close::Code(code, reason) = close {
        let _ = socket.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
        let _ = socket.close().await;
    }
}

/// The WebSocket library's error type, reached through axum's boxed error.
mod tungstenite_error {
    pub use tokio_tungstenite::tungstenite::Error;
}
