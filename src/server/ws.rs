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

use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::protocol::phoenix::{PhoenixConnection, Vsn};
use crate::protocol::plain::PlainConnection;
use crate::protocol::Connection;
use crate::realtime::outbox::{Frame, OutboxReceiver};
use crate::server::credentials::{token, verify};
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
    let token = token(&headers, None, params.apikey.as_deref());
    let credentials = match verify(&state, token.as_deref()).await {
        Ok(c) => c,
        Err(e) => return crate::server::unauthorized(&state, &e),
    };
    sized(ws, &state).on_upgrade(move |socket| {
        let (conn, outbox) = PhoenixConnection::new(state.hub.clone(), vsn, credentials);
        serve(conn, outbox, socket, state.idle_timeout, state.shutdown)
    })
}

/// The upgrade with the frame limit and small buffers: most sockets are idle most of the time,
/// and each holds its buffers.
pub(crate) fn sized(ws: WebSocketUpgrade, state: &AppState) -> WebSocketUpgrade {
    let max = state.max_frame_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
}

/// A timer position far enough away to mean "never".
fn never() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// The WebSocket message of a frame, and the binary one that follows it when it has one.
fn message(frame: Frame) -> (Message, Option<Message>) {
    let one = match frame {
        Frame::Text(t) => Message::Text(t),
        Frame::Binary(b) => Message::Binary(b),
        joined @ Frame::Joined { .. } => Message::Text(joined.joined_text().unwrap_or_default()),
        // No WebSocket protocol names its messages this way; were one to, its data is the text.
        Frame::Named(m) => Message::Text(m.data.clone()),
        Frame::Attached { text, binary } => return (Message::Text(text), Some(Message::Binary(binary))),
    };
    (one, None)
}

/// Feeds a frame's messages to the socket (not flushed).
async fn feed<S: Sink<Message> + Unpin>(socket: &mut S, frame: Frame) -> Result<(), S::Error> {
    let (first, then) = message(frame);
    socket.feed(first).await?;
    match then {
        Some(m) => socket.feed(m).await,
        None => Ok(()),
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
    let token = token(&headers, params.access_token.as_deref(), params.apikey.as_deref());
    let credentials = match token {
        None => None,
        Some(t) => match verify(&state, Some(&t)).await {
            Ok(c) => c,
            Err(e) => return crate::server::unauthorized(&state, &e),
        },
    };
    sized(ws, &state).on_upgrade(move |socket| {
        let (conn, outbox) = PlainConnection::new(state.hub.clone(), credentials);
        serve(conn, outbox, socket, state.idle_timeout, state.shutdown)
    })
}

/// Serves one WebSocket connection until it closes: frames read are handed to `conn`, its
/// replies and what the session's outbox yields are written, and the connection is closed with
/// a close frame on shutdown, when the core gives up on the client (too slow), when nothing is
/// read within `idle`, or when `conn` asks to. Generic over the socket so that protocols can be
/// driven in memory.
pub(crate) async fn serve<C, S, RE, WE>(
    mut conn: C,
    outbox: OutboxReceiver,
    socket: S,
    idle: Duration,
    shutdown: CancellationToken,
) where
    C: Connection,
    S: Stream<Item = Result<Message, RE>> + Sink<Message, Error = WE> + Unpin,
    RE: std::error::Error + 'static,
{
    use tracing::Instrument as _;
    let span = super::session_span(conn.session().id(), C::PROTOCOL);
    async {
        tracing::debug!("connected");
        let close = serve_in_span(conn, outbox, socket, idle, shutdown).await;
        tracing::debug!(close, "disconnected");
    }
    .instrument(span)
    .await
}

async fn serve_in_span<C, S, RE, WE>(
    mut conn: C,
    mut outbox: OutboxReceiver,
    mut socket: S,
    idle: Duration,
    shutdown: CancellationToken,
) -> &'static str
where
    C: Connection,
    S: Stream<Item = Result<Message, RE>> + Sink<Message, Error = WE> + Unpin,
    RE: std::error::Error + 'static,
{
    // These futures live for the whole connection: building them per loop turn would register
    // and drop a waiter on the shutdown token and a timer entry for every frame written. Polling
    // a token locks it (the server's is shared by every socket): a gate keeps it from being
    // polled again until it fires.
    let shutdown = shutdown.cancelled_owned();
    let killed = outbox.killed.clone().cancelled_owned();
    let idle_timer = tokio::time::sleep(idle);
    // A deadline of the connection's (a token expiring, a heartbeat); re-armed only when the
    // earliest one changes. A connection handed over from another transport may have one already.
    let mut armed = conn.next_deadline();
    let expiry = tokio::time::sleep_until(armed.map(tokio::time::Instant::from_std).unwrap_or_else(never));
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
            Some(frame) = outbox.recv() => {
                if !write_queued(&mut socket, frame, &mut outbox).await {
                    break Close::Gone;
                }
                continue;
            }
            msg = poll_fn(|cx| read_gate.poll(cx, |cx| socket.poll_next_unpin(cx))) => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                match read(&mut conn, msg).await {
                    Ok(Some(replies)) => replies,
                    Ok(None) => continue,
                    Err(close) => break close,
                }
            }
            _ = &mut idle_timer => break Close::Code(1000, "idle timeout"),
            _ = &mut expiry => {
                match conn.on_deadline() {
                    None => conn.due(),
                    Some(closing) => break close_with(&mut socket, closing).await,
                }
            }
        };
        let next = conn.next_deadline();
        if next != armed {
            armed = next;
            expiry.as_mut().reset(next.map(tokio::time::Instant::from_std).unwrap_or_else(never));
        }
        if !write_all(&mut socket, replies).await {
            break Close::Gone;
        }
        if let Some(closing) = conn.take_closing() {
            break close_with(&mut socket, closing).await;
        }
    };
    // Leave every channel (presences leave, subscriptions go) before the close frame is sent.
    drop(conn);
    finish(&mut socket, close).await
}

/// Sends the close frame, if the client is still there: why the connection ended.
async fn finish<S: Sink<Message> + Unpin>(socket: &mut S, close: Close) -> &'static str {
    match close {
        Close::Code(code, reason) => {
            let _ = socket.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
            let _ = socket.close().await;
            reason
        }
        Close::Gone => "the client went away",
    }
}

/// A close the protocol asked for: its last frame written, then its code.
async fn close_with<S: Sink<Message> + Unpin>(socket: &mut S, closing: crate::protocol::Closing) -> Close {
    if let Some(frame) = closing.frame {
        let _ = feed(socket, frame).await;
        let _ = socket.flush().await;
    }
    Close::Code(closing.code, closing.reason)
}

/// Writes `first` and what else is queued, up to a batch, then flushes; `false` once the socket
/// is gone.
async fn write_queued<S: Sink<Message> + Unpin>(
    socket: &mut S,
    first: Frame,
    outbox: &mut OutboxReceiver,
) -> bool {
    let mut ok = feed(socket, first).await.is_ok();
    let mut n = 1;
    while ok && n < WRITE_BATCH {
        let Some(more) = outbox.try_recv() else { break };
        ok = feed(socket, more).await.is_ok();
        n += 1;
    }
    ok = ok && socket.flush().await.is_ok();
    outbox.written();
    ok
}

/// Writes a connection's replies and flushes; `false` once the socket is gone.
pub(crate) async fn write_all<S: Sink<Message> + Unpin>(socket: &mut S, frames: Vec<Frame>) -> bool {
    for frame in frames {
        if feed(socket, frame).await.is_err() {
            return false;
        }
    }
    socket.flush().await.is_ok()
}

/// Hands a frame read to the connection: its replies, `None` for frames that need none (pings,
/// pongs), or how the socket closes.
async fn read<C: Connection, E: std::error::Error + 'static>(
    conn: &mut C,
    msg: Option<Result<Message, E>>,
) -> Result<Option<Vec<Frame>>, Close> {
    match msg {
        None | Some(Ok(Message::Close(_))) => Err(Close::Gone),
        Some(Err(e)) if too_large(&e) => {
            conn.session().hub().metrics().telemetry.refused("frame_too_large");
            Err(Close::Code(1009, "frame too large"))
        }
        Some(Err(_)) => Err(Close::Gone),
        // Boxed while it runs: handling a frame (a join) is a large future, and inline every
        // idle socket's task would keep room for it.
        Some(Ok(Message::Text(text))) => Ok(Some(Box::pin(conn.text(&text)).await)),
        Some(Ok(Message::Binary(bytes))) => Ok(Some(Box::pin(conn.binary(&bytes)).await)),
        Some(Ok(_)) => Ok(None),
    }
}

/// Whether a read failed on a frame over the size limit (the WebSocket library's capacity
/// error, anywhere in the error's chain).
fn too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(e);
    while let Some(e) = at {
        if matches!(e.downcast_ref::<tungstenite_error::Error>(), Some(tungstenite_error::Error::Capacity(_)))
        {
            return true;
        }
        at = e.source();
    }
    false
}

/// The WebSocket library's error type, reached through axum's boxed error.
mod tungstenite_error {
    pub use tokio_tungstenite::tungstenite::Error;
}

#[cfg(test)]
mod tests {
    //! The socket loop driven in memory: a client's side is two channels, so a protocol can be
    //! exercised without a network, a server or a database.

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;

    use super::*;
    use crate::realtime::{Hub, HubParts};

    /// The server's end of an in-memory socket.
    struct Duplex {
        incoming: mpsc::UnboundedReceiver<Result<Message, std::io::Error>>,
        outgoing: mpsc::UnboundedSender<Message>,
    }

    impl Stream for Duplex {
        type Item = Result<Message, std::io::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.incoming.poll_recv(cx)
        }
    }

    impl Sink<Message> for Duplex {
        type Error = std::io::Error;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.outgoing.send(item).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A `/v1/ws` connection served in memory: (what the client sends, what it receives, the
    /// core's handle on the connection's queue, the server's shutdown, the serving task).
    struct Client {
        send: mpsc::UnboundedSender<Result<Message, std::io::Error>>,
        recv: mpsc::UnboundedReceiver<Message>,
        killed: CancellationToken,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn plain(idle: Duration) -> Client {
        let (send, incoming) = mpsc::unbounded_channel();
        let (outgoing, recv) = mpsc::unbounded_channel();
        let (conn, outbox) = PlainConnection::new(Hub::new(HubParts::default()), None);
        let killed = outbox.killed.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(conn, outbox, Duplex { incoming, outgoing }, idle, shutdown.clone()));
        Client { send, recv, killed, shutdown, task }
    }

    impl Client {
        fn text(&self, t: &str) {
            self.send.send(Ok(Message::Text(t.into()))).expect("the loop reads");
        }

        async fn next(&mut self) -> Message {
            tokio::time::timeout(Duration::from_secs(10), self.recv.recv())
                .await
                .expect("a frame within 10 s")
                .expect("the socket is open")
        }

        async fn json(&mut self) -> serde_json::Value {
            match self.next().await {
                Message::Text(t) => serde_json::from_str(&t).expect("JSON"),
                other => panic!("expected text, got {other:?}"),
            }
        }

        /// The close frame the loop ends with, after which it stops.
        async fn closed(mut self) -> (u16, String) {
            let frame = loop {
                if let Message::Close(frame) = self.next().await {
                    break frame.expect("a close frame with a code");
                }
            };
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the loop ends")
                .expect("no panic");
            (frame.code, frame.reason.to_string())
        }
    }

    #[tokio::test]
    async fn replies_in_order_and_closes_with_the_reason() {
        let mut c = plain(Duration::from_secs(3600));
        c.text(r#"{"type":"ping","id":1}"#);
        assert_eq!(c.json().await, json!({"type": "pong", "id": 1}));
        c.text("not json");
        let e = c.json().await;
        assert_eq!(e["type"], "error");
        assert!(e["message"].as_str().unwrap_or("").starts_with("invalid JSON"), "{e}");
        // A broadcast channel: subscribed, and its own message comes back (self).
        c.text(r#"{"type":"subscribe","channel":"room","self":true,"id":2}"#);
        assert_eq!(c.json().await["type"], "subscribed");
        c.text(r#"{"type":"publish","channel":"room","event":"e","data":{"x":1}}"#);
        let m = c.json().await;
        assert_eq!(
            (m["type"].as_str(), m["event"].as_str(), &m["data"]),
            (Some("message"), Some("e"), &json!({"x": 1}))
        );
        c.shutdown.cancel();
        assert_eq!(c.closed().await, (1001, "server shutting down".to_owned()));
    }

    /// A protocol that closes with a code of its own when told `bye`.
    struct Closer {
        session: crate::realtime::session::Session,
        bye: bool,
    }

    impl Connection for Closer {
        const PROTOCOL: &'static str = "test";

        fn session(&mut self) -> &mut crate::realtime::session::Session {
            &mut self.session
        }

        async fn text(&mut self, text: &str) -> Vec<Frame> {
            self.bye = text == "bye";
            vec![Frame::Text(format!("got {text}").into())]
        }

        async fn binary(&mut self, _: &bytes::Bytes) -> Vec<Frame> {
            Vec::new()
        }

        fn take_closing(&mut self) -> Option<crate::protocol::Closing> {
            std::mem::take(&mut self.bye).then(|| crate::protocol::Closing {
                frame: Some(Frame::Text("farewell".into())),
                code: 4400,
                reason: "bad message",
            })
        }
    }

    #[tokio::test]
    async fn a_protocol_closes_with_its_own_code_after_its_replies() {
        let (send, incoming) = mpsc::unbounded_channel();
        let (outgoing, recv) = mpsc::unbounded_channel();
        let (session, outbox) = crate::realtime::session::Session::new(
            Hub::new(HubParts::default()),
            std::sync::Arc::new(crate::protocol::plain::PlainEncoder),
            None,
        );
        let shutdown = CancellationToken::new();
        let conn = Closer { session, bye: false };
        let task = tokio::spawn(serve(
            conn,
            outbox,
            Duplex { incoming, outgoing },
            Duration::from_secs(3600),
            shutdown.clone(),
        ));
        let mut c = Client { send, recv, killed: CancellationToken::new(), shutdown, task };
        c.text("hi");
        assert_eq!(c.next().await, Message::Text("got hi".into()));
        c.text("bye");
        assert_eq!(c.next().await, Message::Text("got bye".into()));
        assert_eq!(c.next().await, Message::Text("farewell".into()));
        assert_eq!(c.closed().await, (4400, "bad message".to_owned()));
    }

    #[tokio::test]
    async fn a_client_given_up_on_is_closed_as_too_slow() {
        let c = plain(Duration::from_secs(3600));
        c.killed.cancel();
        assert_eq!(c.closed().await, (1008, "client too slow: outbound queue full".to_owned()));
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_when_idle_and_a_gone_one_ends_the_loop() {
        let c = plain(Duration::from_millis(50));
        assert_eq!(c.closed().await, (1000, "idle timeout".to_owned()));
        let c = plain(Duration::from_secs(3600));
        drop(c.send);
        tokio::time::timeout(Duration::from_secs(10), c.task)
            .await
            .expect("the loop ends")
            .expect("no panic");
    }
}
