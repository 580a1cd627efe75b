//! The Socket.IO transports (Engine.IO v4 at `socketio_path`), IO only: a WebSocket opened
//! directly, and HTTP long-polling with its upgrade to a WebSocket. A WebSocket is served by the
//! loop every WebSocket protocol shares (`server/ws.rs`), so a change's packet is encoded once
//! and its bytes shared by every socket that receives it; what a packet means is the
//! connection's (`protocol/socketio`).
//!
//! Owns: the long-polling sessions (found by their id: a GET waits for packets, a POST brings
//! them, one task per session owns its connection), the upgrade (probe, noop, hand-over of the
//! connection to the WebSocket), and Engine.IO's request errors. Must not: hold channel state,
//! or wait on a client without a deadline.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::protocol::socketio::packet::{self, Payload};
use crate::protocol::socketio::{Heartbeat, SocketIoConnection};
use crate::protocol::Connection;
use crate::realtime::outbox::{Frame, OutboxReceiver};
use crate::server::credentials::token;
use crate::server::AppState;

/// Frames answered to one long-polling request at most.
const POLL_BATCH: usize = 64;
/// Replies (acknowledgements) a long-polling client may leave unread before it is closed.
const MAX_REPLIES: usize = 1024;
/// POSTed payloads waiting for their session's task.
const INBOX: usize = 16;

#[derive(Debug, Default, Deserialize)]
struct Params {
    #[serde(rename = "EIO")]
    eio: Option<String>,
    transport: Option<String>,
    sid: Option<String>,
    access_token: Option<String>,
    apikey: Option<String>,
}

/// What a request hands a long-polling session's task.
enum ToSession {
    /// A POST's packets, in order.
    Packets(Vec<Payload>),
    /// A GET, waiting for the next payload.
    Poll(oneshot::Sender<Vec<u8>>),
    /// A WebSocket probed: polling requests are answered with a noop from now on.
    Probe,
    /// The WebSocket, upgraded: the session moves to it.
    Upgraded(Box<WebSocket>),
}

type Sessions = Arc<Mutex<HashMap<Box<str>, mpsc::Sender<ToSession>>>>;

#[derive(Clone)]
struct Sio {
    app: AppState,
    sessions: Sessions,
    heartbeat: Heartbeat,
}

/// The Socket.IO routes: `socketio_path` with and without its trailing slash.
pub fn routes(state: &AppState) -> Router {
    let sio = Sio {
        app: state.clone(),
        sessions: Sessions::default(),
        heartbeat: Heartbeat::within(state.idle_timeout),
    };
    let path = state.socketio_path.to_string();
    Router::new().route(&format!("{path}/"), any(engine)).route(&path, any(engine)).with_state(sio)
}

/// Engine.IO's request error: 400 `{"code","message"}` as its clients read it.
fn refused(code: u8, message: &str) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({"code": code, "message": message}))).into_response()
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    (status, [(header::CONTENT_TYPE, content_type)], body.into()).into_response()
}

async fn engine(State(sio): State<Sio>, req: Request) -> Response {
    let params = Query::<Params>::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default();
    if params.eio.as_deref() != Some("4") {
        return refused(5, "Unsupported protocol version");
    }
    let token = token(req.headers(), params.access_token.as_deref(), params.apikey.as_deref());
    match (params.transport.as_deref(), params.sid) {
        (Some("websocket"), sid) => websocket(sio, sid, token, req).await,
        (Some("polling"), None) if req.method() == Method::GET => handshake(&sio, token),
        (Some("polling"), None) => refused(2, "Bad handshake method"),
        (Some("polling"), Some(sid)) => match *req.method() {
            Method::GET => poll(&sio, &sid).await,
            Method::POST => post(&sio, &sid, req).await,
            _ => refused(3, "Bad request"),
        },
        _ => refused(0, "Transport unknown"),
    }
}

fn session(sio: &Sio, sid: &str) -> Option<mpsc::Sender<ToSession>> {
    crate::locks::lock(&sio.sessions).get(sid).cloned()
}

/// A long-polling session opened: its task started, the open packet answered.
fn handshake(sio: &Sio, token: Option<String>) -> Response {
    let Some(sid) = packet::random_id() else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "no session id could be made");
    };
    let (conn, outbox) = SocketIoConnection::new(sio.app.hub.clone(), token, sio.heartbeat);
    let open = conn.open(&sid, true, sio.app.max_frame_bytes);
    let (tx, rx) = mpsc::channel(INBOX);
    {
        let mut sessions = crate::locks::lock(&sio.sessions);
        if sessions.len() >= sio.app.max_connections {
            return text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "too many long-polling sessions");
        }
        sessions.insert(sid.clone().into(), tx);
    }
    let mut conn = conn;
    let span = super::session_span(conn.session().id(), "socketio-polling");
    tokio::spawn(tracing::Instrument::instrument(
        Polling::new(conn, outbox).run(sio.clone(), sid.into(), rx),
        span,
    ));
    text(StatusCode::OK, "text/plain; charset=UTF-8", open)
}

/// A GET: the session's next payload, once it has one.
async fn poll(sio: &Sio, sid: &str) -> Response {
    let Some(tx) = session(sio, sid) else { return refused(1, "Session ID unknown") };
    let (answer, payload) = oneshot::channel();
    if tx.send(ToSession::Poll(answer)).await.is_err() {
        return refused(1, "Session ID unknown");
    }
    match payload.await {
        Ok(body) => text(StatusCode::OK, "text/plain; charset=UTF-8", body),
        Err(_) => refused(3, "Bad request"),
    }
}

/// A POST: its packets handed to the session, in order.
async fn post(sio: &Sio, sid: &str, req: Request) -> Response {
    let Some(tx) = session(sio, sid) else { return refused(1, "Session ID unknown") };
    let body = match axum::body::to_bytes(req.into_body(), sio.app.max_frame_bytes).await {
        Ok(b) => b,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", "payload over maxPayload"),
    };
    let Some(packets) = packet::split_payload(&body) else { return refused(3, "Bad request") };
    if tx.send(ToSession::Packets(packets)).await.is_err() {
        return refused(1, "Session ID unknown");
    }
    text(StatusCode::OK, "text/html", "ok")
}

/// A WebSocket: a new session's, or a long-polling session's upgrade.
async fn websocket(sio: Sio, sid: Option<String>, token: Option<String>, req: Request) -> Response {
    let (mut parts, _) = req.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => crate::server::ws::sized(ws, &sio.app),
        Err(rejection) => return rejection.into_response(),
    };
    let Some(sid) = sid else {
        return ws.on_upgrade(move |mut socket| async move {
            let Some(sid) = packet::random_id() else { return };
            let (conn, outbox) = SocketIoConnection::new(sio.app.hub.clone(), token, sio.heartbeat);
            let open = conn.open(&sid, false, sio.app.max_frame_bytes);
            if socket.send(Message::Text(open.into())).await.is_ok() {
                crate::server::ws::serve(conn, outbox, socket, sio.app.idle_timeout, sio.app.shutdown).await;
            }
        });
    };
    let Some(tx) = session(&sio, &sid) else { return refused(1, "Session ID unknown") };
    let within = sio.heartbeat.timeout;
    ws.on_upgrade(move |socket| async move {
        let _ = tokio::time::timeout(within, upgrade(socket, tx)).await;
    })
}

/// The upgrade of a long-polling session: `2probe` answered `3probe` (the session's pending
/// GET answered with a noop meanwhile), then `5` moves the session to this socket.
async fn upgrade(mut socket: WebSocket, tx: mpsc::Sender<ToSession>) {
    let next = async |socket: &mut WebSocket| match socket.next().await {
        Some(Ok(Message::Text(t))) => Some(t),
        _ => None,
    };
    if next(&mut socket).await.as_deref() != Some("2probe") || tx.send(ToSession::Probe).await.is_err() {
        return;
    }
    if socket.send(Message::Text("3probe".into())).await.is_err() {
        return;
    }
    if next(&mut socket).await.as_deref() == Some("5") {
        let _ = tx.send(ToSession::Upgraded(Box::new(socket))).await;
    }
}

/// How a long-polling session ends.
enum End {
    /// Its connection closed (its last frames are answered to the next GET, if one comes).
    Closed,
    /// Moved to a WebSocket.
    Upgraded(Box<WebSocket>),
}

/// A long-polling session's task: it owns the connection.
struct Polling {
    conn: SocketIoConnection,
    outbox: OutboxReceiver,
    /// Frames of the connection's own (acknowledgements, pings), sent before the outbox's.
    replies: VecDeque<Frame>,
    waiter: Option<oneshot::Sender<Vec<u8>>>,
    upgrading: bool,
}

impl Polling {
    fn new(conn: SocketIoConnection, outbox: OutboxReceiver) -> Polling {
        Polling { conn, outbox, replies: VecDeque::new(), waiter: None, upgrading: false }
    }

    async fn run(mut self, sio: Sio, sid: Box<str>, mut rx: mpsc::Receiver<ToSession>) {
        let end = self.serve(&sio, &mut rx).await;
        if let End::Upgraded(mut socket) = end {
            crate::locks::lock(&sio.sessions).remove(&sid);
            if crate::server::ws::write_all(&mut socket, self.replies.drain(..).collect()).await {
                let Polling { conn, outbox, .. } = self;
                crate::server::ws::serve(conn, outbox, *socket, sio.app.idle_timeout, sio.app.shutdown).await;
            }
            return;
        }
        // Leave every channel now; the last frames wait a little for the client's next GET.
        let last: Vec<u8> = self.payload();
        drop(self.conn);
        if let Some(waiter) = self.waiter.take() {
            let _ = waiter.send(last);
        } else {
            let linger = tokio::time::sleep(sio.heartbeat.timeout);
            tokio::pin!(linger);
            loop {
                tokio::select! {
                    _ = &mut linger => break,
                    msg = rx.recv() => match msg {
                        Some(ToSession::Poll(waiter)) => {
                            let _ = waiter.send(last);
                            break;
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
            }
        }
        crate::locks::lock(&sio.sessions).remove(&sid);
    }

    /// Serves the session until its connection closes or it upgrades.
    async fn serve(&mut self, sio: &Sio, rx: &mut mpsc::Receiver<ToSession>) -> End {
        let shutdown = sio.app.shutdown.clone().cancelled_owned();
        let killed = self.outbox.killed.clone().cancelled_owned();
        let expiry = tokio::time::sleep_until(deadline(&mut self.conn));
        tokio::pin!(shutdown, killed, expiry);
        loop {
            let taking = self.waiter.is_some() && !self.upgrading;
            tokio::select! {
                biased;
                _ = &mut shutdown => return self.close(),
                _ = &mut killed => return self.close(),
                Some(frame) = self.outbox.recv(), if taking => {
                    self.replies.push_back(frame);
                    self.answer();
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { return self.close() };
                    match self.take(msg).await {
                        Ok(Some(socket)) => return End::Upgraded(socket),
                        Ok(None) => {}
                        Err(()) => return self.close(),
                    }
                }
                _ = &mut expiry => {
                    match self.conn.on_deadline() {
                        Some(closing) => {
                            self.replies.extend(closing.frame);
                            return self.close();
                        }
                        None => self.replies.extend(self.conn.due()),
                    }
                }
            }
            if let Some(closing) = self.conn.take_closing() {
                self.replies.extend(closing.frame);
                return self.close();
            }
            if self.replies.len() > MAX_REPLIES {
                return self.close();
            }
            if !self.replies.is_empty() {
                self.answer();
            }
            expiry.as_mut().reset(deadline(&mut self.conn));
        }
    }

    /// A request's message handled; `Ok(Some)`: the session moves to that socket; `Err`: the
    /// client broke the protocol.
    async fn take(&mut self, msg: ToSession) -> Result<Option<Box<WebSocket>>, ()> {
        match msg {
            ToSession::Packets(packets) => {
                for p in packets {
                    let replies = match p {
                        Payload::Text(t) => Box::pin(self.conn.text(&t)).await,
                        Payload::Binary(b) => Box::pin(self.conn.binary(&b)).await,
                    };
                    self.replies.extend(replies);
                }
            }
            ToSession::Poll(waiter) if self.waiter.as_ref().is_some_and(|w| !w.is_closed()) => {
                // Two GETs at once: Engine.IO closes the session.
                drop(waiter);
                return Err(());
            }
            ToSession::Poll(waiter) if self.upgrading => {
                let _ = waiter.send(packet::NOOP.into());
            }
            ToSession::Poll(waiter) => self.waiter = Some(waiter),
            ToSession::Probe => {
                self.upgrading = true;
                if let Some(waiter) = self.waiter.take() {
                    let _ = waiter.send(packet::NOOP.into());
                }
            }
            ToSession::Upgraded(socket) => return Ok(Some(socket)),
        }
        Ok(None)
    }

    /// The waiting GET answered with the replies and what else is queued, up to a batch.
    fn answer(&mut self) {
        let Some(waiter) = self.waiter.take_if(|w| !w.is_closed()) else { return };
        if !self.upgrading {
            while self.replies.len() < POLL_BATCH {
                let Some(more) = self.outbox.try_recv() else { break };
                self.replies.push_back(more);
            }
        }
        let body = self.payload();
        let _ = waiter.send(body);
        self.outbox.written();
    }

    /// The replies as a long-polling payload (they are taken).
    fn payload(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for frame in self.replies.drain(..) {
            if !out.is_empty() {
                out.push(packet::SEPARATOR);
            }
            match frame {
                Frame::Binary(b) => packet::write_binary(&mut out, &b),
                Frame::Attached { text, binary } => {
                    out.extend_from_slice(text.as_bytes());
                    out.push(packet::SEPARATOR);
                    packet::write_binary(&mut out, &binary);
                }
                other => other.write_to(&mut out),
            }
        }
        out
    }

    /// Ends the session: the client reads a close after whatever is left.
    fn close(&mut self) -> End {
        self.replies.push_back(Frame::Text(packet::CLOSE.into()));
        End::Closed
    }
}

/// When the connection next needs its deadline handled.
fn deadline(conn: &mut SocketIoConnection) -> tokio::time::Instant {
    conn.next_deadline()
        .map(tokio::time::Instant::from_std)
        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600))
}
