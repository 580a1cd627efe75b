//! One task per WebSocket: reads client frames, answers them, and writes the frames the fan-out
//! queued for it. Joins are resolved through `subscribe` and registered in the fan-out index
//! before the `system` ok is sent, so a change committed after the client saw it is delivered.
//!
//! Owns: the Phoenix channel life cycle of one socket (join, leave, heartbeat, unmatched topics,
//! idle timeout, frame size limit, slow-consumer close). Must not: block other sockets or the
//! replication stream.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fanout::{ChannelSink, SubId};
use crate::protocol::phoenix::{self, ClientFrame, Vsn};
use crate::server::AppState;

/// Initial read buffer per socket; it grows for larger frames.
const READ_BUFFER_BYTES: usize = 2 * 1024;
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
    // Keys are accepted without verification until token checks exist.
    let _apikey =
        params.apikey.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_owned));
    let limits = state.limits;
    // Small buffers: most sockets are idle most of the time, and each holds its buffers.
    ws.max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| Connection::new(state, vsn).run(socket))
}

struct JoinedChannel {
    join_ref: Option<String>,
    subs: Vec<SubId>,
}

struct Connection {
    state: AppState,
    vsn: Vsn,
    channels: HashMap<String, JoinedChannel>,
    tx: mpsc::Sender<Utf8Bytes>,
    rx: mpsc::Receiver<Utf8Bytes>,
    kill: CancellationToken,
}

enum Close {
    Code(u16, &'static str),
    Gone,
}

impl Connection {
    fn new(state: AppState, vsn: Vsn) -> Self {
        let (tx, rx) = mpsc::channel(state.limits.client_queue);
        Connection { state, vsn, channels: HashMap::new(), tx, rx, kill: CancellationToken::new() }
    }

    async fn run(mut self, socket: WebSocket) {
        self.state.fanout.metrics.clients.fetch_add(1, Ordering::Relaxed);
        let (mut sink, mut stream) = socket.split();
        let idle = self.state.limits.idle_timeout;
        let mut deadline = tokio::time::Instant::now() + idle;
        let shutdown = self.state.shutdown.clone();
        let kill = self.kill.clone();
        let close = loop {
            let mut replies = Vec::new();
            tokio::select! {
                biased;
                // Shutdown first: every socket gets a proper close frame.
                _ = shutdown.cancelled() => break Close::Code(1001, "server shutting down"),
                // A client the fan-out gave up on must not receive anything more.
                _ = kill.cancelled() => break Close::Code(1008, "client too slow: outbound queue full"),
                // Queued change frames before reading more input.
                Some(frame) = self.rx.recv() => {
                    // Write what is queued in one batch, then flush once.
                    let mut ok = sink.feed(Message::Text(frame)).await.is_ok();
                    let mut n = 1;
                    while ok && n < WRITE_BATCH {
                        let Ok(more) = self.rx.try_recv() else { break };
                        ok = sink.feed(Message::Text(more)).await.is_ok();
                        n += 1;
                    }
                    if !ok || sink.flush().await.is_err() {
                        break Close::Gone;
                    }
                    continue;
                }
                msg = stream.next() => {
                    deadline = tokio::time::Instant::now() + idle;
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
                        Some(Ok(Message::Text(text))) => self.on_text(&text, &mut replies).await,
                        Some(Ok(Message::Binary(bytes))) => self.on_binary(&bytes, &mut replies),
                        Some(Ok(Message::Close(_))) => break Close::Gone,
                        Some(Ok(_)) => {}
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break Close::Code(1000, "idle timeout"),
            }
            for r in replies {
                if sink.send(Message::Text(r.into())).await.is_err() {
                    break;
                }
            }
        };
        if let Close::Code(code, reason) = close {
            let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
            let _ = sink.close().await;
        }
        let topics: Vec<String> = self.channels.keys().cloned().collect();
        for t in topics {
            self.leave(&t);
        }
        self.state.fanout.metrics.clients.fetch_sub(1, Ordering::Relaxed);
    }

    fn reply(&self, f: &ClientFrame, status: &str, response: Value) -> String {
        phoenix::encode(
            self.vsn,
            f.join_ref.as_deref(),
            f.msg_ref.as_deref(),
            &f.topic,
            "phx_reply",
            &json!({"status": status, "response": response}),
        )
    }

    fn push(&self, join_ref: Option<&str>, topic: &str, event: &str, payload: Value) -> String {
        phoenix::encode(self.vsn, join_ref, None, topic, event, &payload)
    }

    async fn on_text(&mut self, text: &str, out: &mut Vec<String>) {
        let frame = match phoenix::decode_text(self.vsn, text) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "malformed client frame");
                // Answer on the phoenix topic so the client can see what went wrong.
                out.push(phoenix::encode(
                    self.vsn,
                    None,
                    None,
                    "phoenix",
                    "phx_reply",
                    &json!({"status": "error", "response": {"reason": e.to_string()}}),
                ));
                return;
            }
        };
        match (frame.topic.as_str(), frame.event.as_str()) {
            ("phoenix", "heartbeat") => out.push(self.reply(&frame, "ok", json!({}))),
            (_, "phx_join") => self.join(frame, out).await,
            (topic, "phx_leave") if self.channels.contains_key(topic) => {
                let topic = topic.to_owned();
                let join_ref = self.channels.get(&topic).and_then(|c| c.join_ref.clone());
                self.leave(&topic);
                out.push(self.reply(&frame, "ok", json!({})));
                out.push(phoenix::encode(
                    self.vsn,
                    join_ref.as_deref(),
                    join_ref.as_deref(),
                    &topic,
                    "phx_close",
                    &json!({}),
                ));
            }
            (topic, event) if self.channels.contains_key(topic) => match event {
                "access_token" => {}
                "broadcast" | "presence" => {
                    let ack = frame.payload.pointer("/ack").and_then(Value::as_bool).unwrap_or(true);
                    if ack && frame.msg_ref.is_some() {
                        out.push(self.reply(&frame, "ok", json!({})));
                    }
                }
                _ => out.push(self.reply(&frame, "ok", json!({}))),
            },
            _ => out.push(self.reply(&frame, "error", json!({"reason": "unmatched topic"}))),
        }
    }

    fn on_binary(&mut self, bytes: &bytes::Bytes, out: &mut Vec<String>) {
        match phoenix::decode_binary(bytes) {
            Ok(push) if self.channels.contains_key(&push.topic) => {
                // Broadcast is not delivered yet; the push is accepted and acknowledged.
                if push.msg_ref.is_some() {
                    let f = ClientFrame {
                        join_ref: push.join_ref,
                        msg_ref: push.msg_ref,
                        topic: push.topic,
                        event: "broadcast".into(),
                        payload: Value::Null,
                    };
                    out.push(self.reply(&f, "ok", json!({})));
                }
            }
            Ok(push) => {
                let f = ClientFrame {
                    join_ref: push.join_ref,
                    msg_ref: push.msg_ref,
                    topic: push.topic,
                    event: push.event,
                    payload: Value::Null,
                };
                out.push(self.reply(&f, "error", json!({"reason": "unmatched topic"})));
            }
            Err(e) => tracing::debug!(error = %e, "malformed binary frame"),
        }
    }

    fn leave(&mut self, topic: &str) {
        if let Some(ch) = self.channels.remove(topic) {
            if let Ok(mut index) = self.state.fanout.index.write() {
                for id in &ch.subs {
                    if index.remove(*id) {
                        self.state.fanout.metrics.subscriptions.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    async fn join(&mut self, frame: ClientFrame, out: &mut Vec<String>) {
        let topic = frame.topic.clone();
        let Some(name) = topic.strip_prefix("realtime:").filter(|n| !n.is_empty()) else {
            out.push(self.reply(
                &frame,
                "error",
                json!({"reason": "Topic must be of the form realtime:<name>"}),
            ));
            return;
        };
        let name = name.to_owned();
        // Rejoining replaces the old channel.
        self.leave(&topic);
        if self.channels.len() >= self.state.limits.max_channels {
            out.push(self.reply(
                &frame,
                "error",
                json!({"reason": "ChannelRateLimitReached: Too many channels"}),
            ));
            return;
        }
        let bindings: Vec<Value> = match frame.payload.pointer("/config/postgres_changes") {
            Some(Value::Array(b)) => b.clone(),
            _ => Vec::new(),
        };
        let resolved =
            if bindings.is_empty() { Vec::new() } else { self.state.catalog.resolve(&bindings).await };
        let (prefix, suffix) = phoenix::change_frame_parts(self.vsn, &topic);
        let sink = Arc::new(ChannelSink { prefix, suffix, tx: self.tx.clone(), kill: self.kill.clone() });
        let mut subs = Vec::new();
        let mut errors = Vec::new();
        let mut echoed = Vec::with_capacity(bindings.len());
        for (b, r) in bindings.iter().zip(resolved) {
            let mut e = b.clone();
            let id = crate::subscribe::binding_id(b);
            if let Value::Object(map) = &mut e {
                map.insert("id".into(), json!(id));
            }
            echoed.push(e);
            match r {
                Ok(spec) => {
                    if let Ok(mut index) = self.state.fanout.index.write() {
                        subs.push(index.insert(Arc::clone(&sink), spec));
                        self.state.fanout.metrics.subscriptions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(msg) => errors.push(msg),
            }
        }
        self.channels.insert(topic.clone(), JoinedChannel { join_ref: frame.join_ref.clone(), subs });
        out.push(self.reply(&frame, "ok", json!({"postgres_changes": echoed})));
        if !bindings.is_empty() {
            let payload = if errors.is_empty() {
                json!({"extension": "postgres_changes", "status": "ok", "message": "Subscribed to PostgreSQL", "channel": name})
            } else {
                json!({"extension": "postgres_changes", "status": "error", "message": errors.join("; "), "channel": name})
            };
            out.push(self.push(frame.join_ref.as_deref(), &topic, "system", payload));
        }
    }
}

/// The WebSocket library's error type, reached through axum's boxed error.
mod tungstenite_error {
    pub use tokio_tungstenite::tungstenite::Error;
}
