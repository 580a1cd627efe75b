//! The Socket.IO transport (Engine.IO v4 / Socket.IO v5, WebSocket and HTTP long-polling with
//! upgrade, at `socketio_path`), IO only: socketioxide speaks the protocol; each socket's task
//! hands its events, in the order they arrived, to its [`SocketIoConnection`], acknowledges each,
//! and emits what the session's outbox yields.
//!
//! Owns: the handshake's token (its `auth` payload `{token}`, or the request's as for every
//! transport; a refusal is `connect_error` with the token's error), the order of a socket's
//! events, and disconnecting (shutdown, a client too slow, a token that expired).
//! Must not: hold channel state or decide what an event means (that is `protocol/socketio.rs`).

use std::future::{poll_fn, Future};
use std::sync::Arc;

use serde_json::{json, Value};
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::{ConnectHandler, FromMessage, FromMessageParts};
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::Socket;
use socketioxide::SocketIo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::protocol::socketio::{Args, Incoming, SocketIoConnection};
use crate::realtime::outbox::{Frame, OutboxReceiver};
use crate::server::credentials::{token, verify};
use crate::server::gate::Gate;
use crate::server::ws::PlainParams;
use crate::server::AppState;

/// Events of one socket read and not yet handled; one more disconnects it.
const INBOX: usize = 256;
/// Queued frames emitted in one turn of a socket's task.
const EMIT_BATCH: usize = 64;

/// The Socket.IO layer: requests under `socketio_path` are Socket.IO's, others pass through.
pub fn layer(state: &AppState) -> SocketIoLayer {
    let limits = *state.hub.limits();
    let (layer, io) = SocketIo::builder()
        .req_path(state.socketio_path.to_string())
        .max_buffer_size(limits.client_queue.max(16))
        .max_payload(state.max_frame_bytes as u64)
        // Client events are small, and most sockets are idle most of the time.
        .ws_read_buffer_size(512)
        .build_layer();
    let (on_connect, on_auth) = (state.clone(), state.clone());
    let connect = move |s: SocketRef| connected(on_connect.clone(), s);
    let auth = move |s: SocketRef, TryData(auth): TryData<Value>| authenticate(on_auth.clone(), s, auth.ok());
    io.ns("/", connect.with(auth));
    layer
}

/// The handshake's token, verified: the `auth` payload's `token` (or `access_token`, `apikey`),
/// else the request's (header, query, cookie). A refusal reaches the client as `connect_error`.
async fn authenticate(state: AppState, s: SocketRef, auth: Option<Value>) -> Result<(), String> {
    let given = auth.as_ref().and_then(|a| {
        ["token", "access_token", "apikey"].iter().find_map(|k| a.get(*k).and_then(Value::as_str))
    });
    let parts = s.req_parts();
    let query = axum::extract::Query::<PlainParams>::try_from_uri(&parts.uri).ok();
    let token = given.map(str::to_owned).or_else(|| {
        let q = query.as_ref();
        token(&parts.headers, q.and_then(|q| q.access_token.as_deref()), q.and_then(|q| q.apikey.as_deref()))
    });
    match verify(&state, token.as_deref()).await {
        Ok(credentials) => {
            prepare(&s, credentials);
            Ok(())
        }
        Err(e) => {
            tracing::debug!(error = %e, "socket.io connection refused");
            state.hub.metrics().auth_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(e.connect_message())
        }
    }
}

/// What a socket's handlers share with its task: where its events go, and its end.
#[derive(Clone)]
struct Inbox {
    tx: mpsc::Sender<(Incoming, AckSender)>,
    gone: CancellationToken,
}

/// What the connect handler takes over from the handshake: the token, and the events read
/// since.
struct Pending {
    credentials: Option<Credentials>,
    rx: mpsc::Receiver<(Incoming, AckSender)>,
    gone: CancellationToken,
}

type PendingSlot = Arc<std::sync::Mutex<Option<Pending>>>;

/// Before the client is told it is connected: its events have somewhere to go (socketioxide
/// calls the connect handler after it has answered the handshake, by which time the client may
/// have sent its first event).
fn prepare(s: &SocketRef, credentials: Option<Credentials>) {
    let (tx, rx) = mpsc::channel(INBOX);
    let gone = CancellationToken::new();
    s.extensions.insert(Inbox { tx, gone: gone.clone() });
    let slot: PendingSlot = Arc::new(std::sync::Mutex::new(Some(Pending { credentials, rx, gone })));
    s.extensions.insert(slot);
    s.on_fallback(async |_: Enqueued| {});
    s.on_disconnect(async |s: SocketRef| {
        if let Some(inbox) = s.extensions.get::<Inbox>() {
            inbox.gone.cancel();
        }
    });
}

async fn connected(state: AppState, s: SocketRef) {
    let pending = s.extensions.remove::<PendingSlot>().and_then(|slot| crate::locks::lock(&slot).take());
    let Some(Pending { credentials, rx, gone }) = pending else { return };
    let (conn, outbox) = SocketIoConnection::new(state.hub.clone(), credentials);
    tokio::spawn(drive(conn, outbox, rx, s, gone, state.shutdown));
}

/// An event handed to its socket's task as it is read: socketioxide runs each handler in a task
/// of its own, so only what the extractor does keeps a socket's events in order.
struct Enqueued;

#[derive(Debug, thiserror::Error)]
#[error("this socket has no task to take its events")]
struct NoInbox;

impl FromMessage<socketioxide::adapter::LocalAdapter> for Enqueued {
    type Error = NoInbox;

    fn from_message(
        s: Arc<Socket>,
        mut v: socketioxide::handler::Value,
        ack_id: Option<i64>,
    ) -> Result<Self, NoInbox> {
        let Ok(ack) = AckSender::from_message_parts(&s, &mut v, &ack_id);
        let inbox = s.extensions.get::<Inbox>().ok_or(NoInbox)?;
        let incoming = match read(&v) {
            Ok(incoming) => incoming,
            Err(why) => {
                let _ = ack.send(&json!({"ok": false, "error": why}));
                return Ok(Enqueued);
            }
        };
        if let Err(mpsc::error::TrySendError::Full((_, ack))) = inbox.tx.try_send((incoming, ack)) {
            // Dropping the event would lose it silently (not every event asks for an ack): the
            // client is told, and disconnected.
            let why = format!(
                "too many events waiting to be handled (more than {INBOX}): wait for acknowledgements"
            );
            let _ = ack.send(&json!({"ok": false, "error": why}));
            let _ = s.emit("error", &json!({"message": why}));
            let _ = s.disconnect();
        }
        Ok(Enqueued)
    }
}

/// The event as the protocol reads it (socketioxide hands over its JSON and attachments).
fn read(v: &socketioxide::handler::Value) -> Result<Incoming, String> {
    match v {
        socketioxide::handler::Value::Str(text, attachments) => {
            let none = std::collections::VecDeque::new();
            crate::protocol::socketio::parse_event(text.as_str(), attachments.as_ref().unwrap_or(&none))
        }
        socketioxide::handler::Value::Bytes(_) => Err("expected a JSON event".into()),
    }
}

/// Why a frame was not emitted.
enum Unsent {
    /// The client is too far behind: its socket's buffer is full.
    Full,
    Gone,
}

/// Emits a frame of the session's.
fn emit(s: &SocketRef, frame: &Frame) -> Result<(), Unsent> {
    use socketioxide::{SendError, SocketError};
    let Frame::Named(m) = frame else { return Ok(()) };
    let Some(args) = m.prepared.as_ref().and_then(|p| p.downcast_ref::<Args>()) else { return Ok(()) };
    match s.emit(&*m.name, args) {
        Ok(()) | Err(SendError::Serialize(_)) => Ok(()),
        Err(SendError::Socket(SocketError::InternalChannelFull)) => Err(Unsent::Full),
        Err(SendError::Socket(_)) => Err(Unsent::Gone),
    }
}

/// Disconnects after telling the client why, in an `error` event.
fn disconnect(s: SocketRef, why: &str) {
    let _ = s.emit("error", &json!({"message": why}));
    let _ = s.disconnect();
}

/// A timer position far enough away to mean "never".
fn never() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600)
}

/// Serves one socket until it disconnects: its events handled in order and acknowledged, its
/// session's frames emitted.
async fn drive(
    mut conn: SocketIoConnection,
    mut outbox: OutboxReceiver,
    mut inbox: mpsc::Receiver<(Incoming, AckSender)>,
    s: SocketRef,
    gone: CancellationToken,
    shutdown: CancellationToken,
) {
    // As in the WebSocket loop: these futures live for the whole connection, and the tokens
    // (the shutdown one is shared by every socket) are polled only after they woke the task, so
    // the wake-up for a queued frame costs only the emit.
    let shutdown = shutdown.cancelled_owned();
    let gone = gone.cancelled_owned();
    let killed = outbox.killed.clone().cancelled_owned();
    let expiry = tokio::time::sleep_until(never());
    tokio::pin!(shutdown, gone, killed, expiry);
    let (shutdown_gate, gone_gate, killed_gate) = (Gate::new(), Gate::new(), Gate::new());
    let mut armed = None;
    let mut rearm = true;
    loop {
        // Only an event or a deadline moves the next deadline; frames do not.
        if std::mem::take(&mut rearm) {
            let next = conn.next_deadline();
            if next != armed {
                armed = next;
                expiry.as_mut().reset(next.map(tokio::time::Instant::from_std).unwrap_or_else(never));
            }
        }
        tokio::select! {
            biased;
            _ = poll_fn(|cx| shutdown_gate.poll(cx, |cx| shutdown.as_mut().poll(cx))) => {
                disconnect(s, "server shutting down");
                break;
            }
            _ = poll_fn(|cx| gone_gate.poll(cx, |cx| gone.as_mut().poll(cx))) => break,
            _ = poll_fn(|cx| killed_gate.poll(cx, |cx| killed.as_mut().poll(cx))) => {
                let _ = s.disconnect();
                break;
            }
            Some(frame) = outbox.rx.recv() => {
                if let Err(unsent) = emit_queued(&s, frame, &mut outbox) {
                    if let Unsent::Full = unsent {
                        let metrics = conn.session().hub().metrics();
                        metrics.slow_client_disconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let _ = s.disconnect();
                    }
                    break;
                }
            }
            Some((incoming, ack)) = inbox.recv() => {
                let answer = Box::pin(conn.handle(incoming)).await;
                let _ = ack.send(&answer);
                rearm = true;
            }
            _ = &mut expiry => {
                if let Some(why) = conn.on_deadline() {
                    disconnect(s, &why);
                    break;
                }
                rearm = true;
            }
        }
    }
}

/// Emits `first` and what else is queued, up to a batch (socketioxide's writer flushes once it
/// has drained them).
fn emit_queued(s: &SocketRef, first: Frame, outbox: &mut OutboxReceiver) -> Result<(), Unsent> {
    emit(s, &first)?;
    for _ in 1..EMIT_BATCH {
        let Ok(more) = outbox.rx.try_recv() else { break };
        emit(s, &more)?;
    }
    Ok(())
}
