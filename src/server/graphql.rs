//! `/graphql`: queries over HTTP POST, and GraphQL over WebSocket (`graphql-transport-ws`
//! or the legacy `graphql-ws`, by `Sec-WebSocket-Protocol`). Each subscription runs as a task
//! of its own that writes its results to the connection's queue; the connection's loop reads
//! client messages, writes that queue, and closes with the protocol's codes.
//!
//! Owns: the socket, the connection's state (acknowledged or not, its operations), its
//! deadlines (`connection_init` within `auth.timeout_secs`, the token's expiry, idle). Must not:
//! build the schema or run a subscription's session (that is `protocol::graphql`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use crate::auth::Credentials;
use crate::protocol::graphql::feed::{Capture, CoreFeeds, Feeds};
use crate::protocol::graphql::results::Operation;
use crate::protocol::graphql::schema::Built;
use crate::protocol::graphql::wire::{self, Incoming, Protocol};
use crate::realtime::session::Connected;
use crate::server::credentials::{token, verify};
use crate::server::AppState;

/// Results queued per connection before its subscriptions wait for the socket.
const QUEUE: usize = 256;
/// Queued messages written at once at most, before one flush.
const BATCH: usize = 64;
/// The server's keep-alive (`ping`, or the legacy `ka`) this often.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The schema of the current catalog; `None` (with why) when there is none to build.
async fn schema(state: &AppState) -> Result<Built, String> {
    let catalog = state.hub.catalog().ok_or("change capture is not available on this gateway")?;
    let tables = catalog.published().await.map_err(|e| format!("reading the published tables: {e}"))?;
    state.graphql.get(&tables)
}

/// `POST /graphql` (`{"query","variables","operationName"}`): queries (subscriptions need a
/// WebSocket). The token as for every HTTP endpoint.
pub async fn query(State(state): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let credentials = match verify(&state, token(&headers, None, None).as_deref()).await {
        Ok(c) => c,
        Err(e) => return crate::server::unauthorized(&state, &e),
    };
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, axum::Json(json!({"errors": [{"message": e.to_string()}]})))
                .into_response()
        }
    };
    let schema = match schema(&state).await {
        Ok(built) => built.schema,
        Err(e) => {
            return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"errors": [{"message": e}]})))
                .into_response()
        }
    };
    let feeds: Arc<dyn Feeds> = Arc::new(CoreFeeds { hub: state.hub.clone(), credentials });
    let response = schema.execute(request.data(feeds)).await;
    axum::Json(response).into_response()
}

/// `GET /graphql` with an upgrade: GraphQL over WebSocket.
pub async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return (StatusCode::BAD_REQUEST, "GraphQL: POST a query, or open a WebSocket for subscriptions")
            .into_response();
    };
    let offered = headers.get(header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(protocol) = Protocol::choose(offered) else {
        return (
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Protocol: graphql-transport-ws or graphql-ws is required",
        )
            .into_response();
    };
    // A token at the upgrade (header or cookie) serves until `connection_init` brings one.
    let early = token(&headers, None, None);
    let max = state.max_frame_bytes;
    ws.protocols([protocol.name()]).max_message_size(max).max_frame_size(max).on_upgrade(
        move |socket| async move {
            let conn = GraphqlConnection { state, protocol, early, ops: HashMap::new(), acked: None };
            // A connection's operations are sessions of their own: it takes an id for its span.
            let span = super::session_span(conn.state.hub.next_id(), "graphql");
            tracing::Instrument::instrument(conn.serve(socket), span).await;
        },
    )
}

/// What an operation task hands the connection.
enum Out {
    Text(String),
    /// The operation ended (after its last message).
    Done(String, u64),
}

struct GraphqlConnection {
    state: AppState,
    protocol: Protocol,
    early: Option<String>,
    /// Running operations: id → (serial, task).
    ops: HashMap<String, (u64, tokio::task::JoinHandle<()>)>,
    /// Set once `connection_init` was accepted: the credentials (none: authentication off) and
    /// when the token expires.
    acked: Option<(Option<Credentials>, Option<tokio::time::Instant>)>,
}

/// Why the connection closes.
struct Close(u16, String);

impl GraphqlConnection {
    async fn serve(self, socket: WebSocket) {
        let _connected = Connected::count(&self.state.hub, "graphql");
        tracing::debug!("connected");
        let close = self.serve_until_closed(socket).await;
        tracing::debug!(close, "disconnected");
    }

    async fn serve_until_closed(mut self, socket: WebSocket) -> u16 {
        let (mut sink, mut stream) = socket.split();
        let (tx, mut rx) = mpsc::channel::<Out>(QUEUE);
        let idle = self.state.idle_timeout;
        // Timers and the shutdown wait live for the whole connection (not one per message).
        let shutdown = self.state.shutdown.clone().cancelled_owned();
        let init_timer = tokio::time::sleep(self.state.hub.limits().auth_timeout);
        let idle_timer = tokio::time::sleep(idle);
        let expiry_timer = tokio::time::sleep_until(far());
        tokio::pin!(shutdown, init_timer, idle_timer, expiry_timer);
        let mut armed: Option<tokio::time::Instant> = None;
        let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        let mut serial = 0u64;
        let close = loop {
            let expiry = self.acked.as_ref().and_then(|(_, e)| *e);
            if expiry != armed {
                armed = expiry;
                expiry_timer.as_mut().reset(expiry.unwrap_or_else(far));
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => break Close(1001, "server shutting down".into()),
                message = stream.next() => {
                    idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                    let text = match message {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Close(1000, String::new()),
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Binary(_))) => {
                            break Close(wire::BAD_REQUEST, "binary messages are not GraphQL".into())
                        }
                        Some(Ok(_)) => continue,
                    };
                    serial += 1;
                    match self.handle(text.as_str(), &tx, serial).await {
                        Ok(replies) => {
                            for r in replies {
                                if sink.feed(Message::Text(r.into())).await.is_err() {
                                    return self.gone();
                                }
                            }
                            if sink.flush().await.is_err() {
                                return self.gone();
                            }
                        }
                        Err(close) => break close,
                    }
                }
                Some(out) = rx.recv() => {
                    if self.write_queued(&mut sink, out, &mut rx).await.is_err() {
                        return self.gone();
                    }
                }
                _ = &mut init_timer, if self.acked.is_none() => {
                    break Close(wire::INIT_TIMEOUT, "Connection initialisation timeout".into());
                }
                _ = &mut expiry_timer, if armed.is_some() => {
                    break Close(wire::FORBIDDEN, "Forbidden: the token has expired".into());
                }
                // A graphql-transport-ws client answers the server's pings: silence is a dead
                // peer. The legacy protocol's keep-alive has no answer.
                _ = &mut idle_timer, if self.protocol == Protocol::TransportWs => break Close(1000, "idle".into()),
                _ = keep_alive.tick(), if self.acked.is_some() => {
                    let ping = match self.protocol {
                        Protocol::TransportWs => wire::PING,
                        Protocol::Legacy => wire::KEEP_ALIVE,
                    };
                    if sink.send(Message::Text(ping.into())).await.is_err() {
                        return self.gone();
                    }
                }
            }
        };
        self.stop();
        let code = close.0;
        let frame = CloseFrame { code, reason: close.1.into() };
        let _ = sink.send(Message::Close(Some(frame))).await;
        code
    }

    /// The socket went away: the operations stop; 1006 (no close frame) for the log.
    fn gone(&mut self) -> u16 {
        self.stop();
        1006
    }

    /// Writes `first` and what else is queued (up to `BATCH` messages) with one flush, and
    /// forgets the operations that ended.
    async fn write_queued(
        &mut self,
        sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
        first: Out,
        rx: &mut mpsc::Receiver<Out>,
    ) -> Result<(), axum::Error> {
        let mut next = Some(first);
        let mut batched = 0;
        while let Some(out) = next.take() {
            match out {
                Out::Text(t) => {
                    sink.feed(Message::Text(t.into())).await?;
                    batched += 1;
                }
                Out::Done(id, n) => {
                    if self.ops.get(&id).is_some_and(|(serial, _)| *serial == n) {
                        self.ops.remove(&id);
                    }
                }
            }
            if batched < BATCH {
                next = rx.try_recv().ok();
            }
        }
        sink.flush().await
    }

    fn stop(&mut self) {
        for (_, (_, task)) in self.ops.drain() {
            task.abort();
        }
    }

    /// One client message: the replies to write now, or why the connection closes.
    async fn handle(
        &mut self,
        text: &str,
        tx: &mpsc::Sender<Out>,
        serial: u64,
    ) -> Result<Vec<String>, Close> {
        let message = wire::parse(self.protocol, text).map_err(|why| Close(wire::BAD_REQUEST, why))?;
        match message {
            Incoming::Init(payload) => self.init(&payload).await,
            Incoming::Ping(payload) => Ok(vec![wire::pong(payload)]),
            Incoming::Pong => Ok(Vec::new()),
            Incoming::Terminate => Err(Close(1000, String::new())),
            Incoming::Complete(id) => {
                if let Some((_, task)) = self.ops.remove(&id) {
                    task.abort();
                    if self.protocol == Protocol::Legacy {
                        return Ok(vec![wire::complete(&id)]);
                    }
                }
                Ok(Vec::new())
            }
            Incoming::Subscribe { id, request } => {
                let Some((credentials, _)) = &self.acked else {
                    return Err(Close(wire::UNAUTHORIZED, "Unauthorized".into()));
                };
                if self.ops.contains_key(&id) {
                    return Err(Close(wire::DUPLICATE_ID, format!("Subscriber for {id} already exists")));
                }
                // Each operation is a session with a channel: as many as a socket may join.
                let most = self.state.hub.limits().max_channels;
                if self.ops.len() >= most {
                    let message = format!("Too many operations: a connection may run at most {most} at once");
                    let error = async_graphql::ServerError::new(message, None);
                    return Ok(vec![wire::error(self.protocol, &id, &[error])]);
                }
                let built = match schema(&self.state).await {
                    Ok(built) => built,
                    Err(e) => {
                        let error = async_graphql::ServerError::new(e, None);
                        return Ok(vec![wire::error(self.protocol, &id, &[error])]);
                    }
                };
                let core = CoreFeeds { hub: self.state.hub.clone(), credentials: credentials.clone() };
                let run = Run { protocol: self.protocol, id: id.clone(), tx: tx.clone(), serial, core };
                let op = Operation::of(&request, built.generation);
                // A child of the connection's span (the current one), with the client's id.
                let span = tracing::info_span!("operation", id = %id);
                let task = tokio::spawn(tracing::Instrument::instrument(
                    run_operation(self.state.clone(), built.schema, op, run),
                    span,
                ));
                self.ops.insert(id, (serial, task));
                Ok(Vec::new())
            }
        }
    }

    /// `connection_init`: the token it carries (or the one of the upgrade) verified.
    async fn init(&mut self, payload: &serde_json::Value) -> Result<Vec<String>, Close> {
        if self.acked.is_some() {
            return Err(Close(wire::TOO_MANY_INITS, "Too many initialisation requests".into()));
        }
        let token = wire::init_token(payload).or_else(|| self.early.clone());
        match verify(&self.state, token.as_deref()).await {
            Ok(credentials) => {
                let expiry = credentials.as_ref().and_then(|c| {
                    std::time::Instant::now()
                        .checked_add(c.claims.time_left())
                        .map(tokio::time::Instant::from_std)
                });
                self.acked = Some((credentials, expiry));
                Ok(vec![wire::ack()])
            }
            Err(e) => {
                let message = format!("Forbidden: {}", e.connect_message());
                if self.protocol == Protocol::Legacy {
                    // The legacy protocol says so in a message; the client then closes.
                    return Ok(vec![wire::connection_error(&message)]);
                }
                Err(Close(wire::FORBIDDEN, message))
            }
        }
    }
}

/// Runs one operation: a query's result, or a subscription's results (each message's result
/// made once for every subscriber of the same operation that received it), then `complete`; an
/// operation refused before it ran gets `error` instead.
async fn run_operation(state: AppState, schema: async_graphql::dynamic::Schema, op: Operation, run: Run) {
    let Run { protocol, id, tx, serial, core } = run;
    let slot = Arc::new(std::sync::Mutex::new(None));
    let capture: Arc<dyn Feeds> = Arc::new(Capture { core, slot: Arc::clone(&slot) });
    let mut request = async_graphql::Request::new(op.query.clone()).variables(op.variables.clone());
    request.operation_name.clone_from(&op.operation_name);
    // A query's results, or a subscription's refusal; a subscription that started leaves its
    // messages in `slot`.
    let mut results = schema.execute_stream(request.data(capture));
    let mut first = true;
    while let Some(response) = results.next().await {
        // A request that failed validation (or a field refused at once) yields one response
        // with errors and no data: that is the protocol's `error`.
        let refused = first && response.data == async_graphql::Value::Null && !response.errors.is_empty();
        first = false;
        if refused {
            let _ = tx.send(Out::Text(wire::error(protocol, &id, &response.errors))).await;
            let _ = tx.send(Out::Done(id, serial)).await;
            return;
        }
        if tx.send(Out::Text(wire::next(protocol, &id, &response))).await.is_err() {
            return;
        }
    }
    drop(results);
    let captured = crate::locks::lock(&slot).take();
    if let Some((mut feed, kind)) = captured {
        let shared = &state.graphql.results;
        while let Some(message) = feed.next().await {
            let text = match message {
                Ok(m) => wire::next_payload(protocol, &id, &shared.get(&schema, &op, kind, &m).await),
                Err(e) => {
                    let payload = json!({"data": null, "errors": [{"message": e.message}]}).to_string();
                    wire::next_payload(protocol, &id, &payload)
                }
            };
            if tx.send(Out::Text(text)).await.is_err() {
                return;
            }
        }
    }
    let _ = tx.send(Out::Text(wire::complete(&id))).await;
    let _ = tx.send(Out::Done(id, serial)).await;
}

/// Who an operation answers and how.
struct Run {
    protocol: Protocol,
    id: String,
    tx: mpsc::Sender<Out>,
    serial: u64,
    core: CoreFeeds,
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}
