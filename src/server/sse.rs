//! Changes over plain HTTP: `GET /v1/tables/{schema}.{table}/changes` as Server-Sent Events
//! (`Accept: text/event-stream`) or as a long-poll (`Accept: application/json`), and a
//! broadcast channel as Server-Sent Events (`GET /v1/channels/{name}/events`). Each is one
//! session with one channel; a cursor (`since`, or `Last-Event-ID`) resumes from the change log.
//!
//! Owns: HTTP concerns — the token (header, query or cookie, since `EventSource` cannot set
//! headers), query parameters, the event stream with its keep-alives, the long-poll's wait and
//! limit, status codes. Must not: hold channel state (that is the session's) or match changes.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::Instrument as _;

use crate::auth::Credentials;
use crate::protocol::sse::{self, SseEncoder};
use crate::realtime::outbox::{Frame, OutboxReceiver};
use crate::realtime::resume::Since;
use crate::realtime::session::{JoinError, JoinRequest, Session};
use crate::server::credentials::{token, verify};
use crate::server::AppState;

/// Queued messages are gathered into one body chunk up to about this size.
const CHUNK_BYTES: usize = 64 * 1024;
/// Keep-alive comments this often on an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A long-poll waits this long for a change unless `wait` says otherwise.
const DEFAULT_WAIT: u64 = 25;
const MAX_WAIT: u64 = 120;
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;
/// How long a long-poll waits for its snapshot to be read.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);
/// The largest long-poll answer with a snapshot (its rows' JSON).
const MAX_SNAPSHOT_BYTES: usize = 32 << 20;

#[derive(Debug, Default, Deserialize)]
pub struct ChangesParams {
    pub filter: Option<String>,
    /// `*` (default) or a comma list of `insert`, `update`, `delete`.
    pub events: Option<String>,
    /// A comma list of columns (the primary key is always kept).
    pub select: Option<String>,
    /// Resume after this cursor (`Last-Event-ID` wins).
    pub since: Option<String>,
    pub snapshot: Option<String>,
    pub access_token: Option<String>,
    pub apikey: Option<String>,
    /// Long-poll: seconds to hold the request when no change is waiting.
    pub wait: Option<u64>,
    /// Long-poll: most changes per response (with `snapshot`, most rows per page).
    pub limit: Option<usize>,
    /// Long-poll: the next page of a snapshot (`snapshot_next` of the previous answer).
    pub snapshot_after: Option<String>,
    /// A live query (event streams only): the rows that match now, then each row that enters,
    /// changes in or leaves the result; `limit` bounds the result.
    pub live: Option<String>,
    /// A live query's initial order: `col.desc,other.asc.nullslast`.
    pub order: Option<String>,
}

/// Where a long-poll's snapshot goes on: the hand-off cursor of its first page and the last key
/// read. Sent to the client as `snapshot_next` (base64url JSON, opaque to it).
#[derive(Debug, serde::Serialize, Deserialize)]
struct PageToken {
    cursor: Option<String>,
    after: serde_json::Map<String, Value>,
}

impl PageToken {
    fn encode(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(text: &str) -> Option<PageToken> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// The request's verified credentials, or the 401 to answer.
async fn credentials(
    state: &AppState,
    headers: &HeaderMap,
    access_token: Option<&str>,
    apikey: Option<&str>,
) -> Result<Option<Credentials>, Box<Response>> {
    verify(state, token(headers, access_token, apikey).as_deref())
        .await
        .map_err(|e| Box::new(crate::server::unauthorized(state, &e)))
}

/// A `true`/`false` query parameter (absent is false).
fn flag(name: &str, value: Option<&str>) -> Result<bool, Box<Response>> {
    match value {
        None | Some("" | "false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => {
            Err(Box::new(error(StatusCode::BAD_REQUEST, format!("{name}: {other:?} is not true or false"))))
        }
    }
}

/// `Last-Event-ID`, else the `since` parameter.
fn resume_from(headers: &HeaderMap, since: Option<&str>) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(since)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn join_error(e: JoinError) -> Response {
    match e {
        JoinError::Auth(e) => error(StatusCode::UNAUTHORIZED, e.connect_message()),
        e @ JoinError::Unauthorized(_) => error(StatusCode::FORBIDDEN, e.to_string()),
        e @ JoinError::Unavailable => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        e => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `snapshot` and, for a long-poll, the page token `snapshot_after` (which implies it).
fn snapshot_params(params: &ChangesParams, stream: bool) -> Result<(bool, Option<PageToken>), Box<Response>> {
    let snapshot = flag("snapshot", params.snapshot.as_deref())?;
    // A long-poll reads a snapshot in pages of `limit` rows; a later page goes on from a token.
    match params.snapshot_after.as_deref().filter(|_| !stream) {
        None => Ok((snapshot, None)),
        Some(text) => match PageToken::decode(text) {
            Some(t) => Ok((true, Some(t))),
            None => Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "snapshot_after: not a snapshot_next of an earlier answer",
            ))),
        },
    }
}

/// The bindings a table request could not subscribe: 403 when the token may not read a column
/// asked for, 400 otherwise.
fn binding_errors(errors: &[crate::subscribe::BindingError]) -> Response {
    let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    let status = if errors.iter().any(|e| matches!(e, crate::subscribe::BindingError::NoSelect { .. })) {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::BAD_REQUEST
    };
    error(status, message)
}

/// The bindings a table request asks for, and whether it is a live query (event streams only).
fn table_request(
    params: &ChangesParams,
    schema: &str,
    name: &str,
    stream: bool,
) -> Result<(Vec<Value>, bool), Box<Response>> {
    let live = flag("live", params.live.as_deref())?;
    if live && !stream {
        let why = "live: a live query needs an event stream (Accept: text/event-stream)";
        return Err(Box::new(error(StatusCode::BAD_REQUEST, why)));
    }
    if params.order.is_some() && !live {
        let why = "order: order applies to a live query (live=true)";
        return Err(Box::new(error(StatusCode::BAD_REQUEST, why)));
    }
    let mut bindings = crate::subscribe::table_bindings(
        schema,
        name,
        params.filter.as_deref(),
        params.events.as_deref(),
        params.select.as_deref(),
    )
    .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e)))?;
    if live {
        crate::subscribe::make_live(
            &mut bindings,
            params.limit.map(|l| json!(l)),
            params.order.clone().map(Value::String),
        );
    }
    Ok((bindings, live))
}

pub async fn changes(
    State(state): State<AppState>,
    Path(table): Path<String>,
    Query(params): Query<ChangesParams>,
    headers: HeaderMap,
) -> Response {
    let stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let credentials =
        match credentials(&state, &headers, params.access_token.as_deref(), params.apikey.as_deref()).await {
            Ok(c) => c,
            Err(refused) => return *refused,
        };
    let Some((schema, name)) = table.split_once('.').filter(|(s, t)| !s.is_empty() && !t.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, format!("table {table:?}: expected schema.table"));
    };
    let (snapshot, page_token) = match snapshot_params(&params, stream) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let (bindings, live) = match table_request(&params, schema, name, stream) {
        Ok(b) => b,
        Err(refused) => return *refused,
    };
    // A live query starts from its current result every time (a browser's `Last-Event-ID`
    // included): its client replaces what it held with the new snapshot.
    let since = if live { None } else { resume_from(&headers, params.since.as_deref()) };
    // A stream that falls behind catches up from the change log (from the last id it was sent)
    // instead of being dropped: kept to join again. A live query cannot: it starts again.
    let catch_up = (stream && !live && state.hub.log().is_some()).then(|| CatchUp {
        bindings: bindings.clone(),
        credentials: credentials.clone(),
        last_id: since.clone(),
    });
    let (mut session, outbox) = Session::new(state.hub.clone(), SseEncoder::shared(), credentials);
    let span = super::session_span(session.id(), if stream { "sse" } else { "long-poll" });
    let topic = format!("changes:{schema}.{name}");
    let snapshot_page = (snapshot && !stream).then(|| crate::realtime::snapshot::SnapshotPage {
        rows: params.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
        after: page_token.as_ref().map(|t| t.after.clone()),
    });
    let req = JoinRequest {
        topic: topic.clone(),
        bindings,
        since: since.clone(),
        snapshot,
        snapshot_page,
        ..JoinRequest::default()
    };
    let joined = match session.join(req).instrument(span.clone()).await {
        Ok(j) => j,
        Err(e) => return join_error(e),
    };
    if let Some(Err(errors)) = &joined.changes {
        return binding_errors(errors);
    }
    let start = state.hub.log().map(|log| log.cursor(joined.matched).to_string());
    if let Some(handoff) = joined.handoff {
        handoff.start();
    }
    if stream {
        // Until a snapshot has ended (its end marker carries an id), there is no place to catch
        // up from.
        let catch_up = catch_up
            .map(|c| CatchUp { last_id: if snapshot || live { None } else { c.last_id.or(start) }, ..c });
        let opened = Opened { session, outbox, topic, notices: joined.notices, span };
        event_stream(state, opened, catch_up)
    } else {
        let snapshot = match (snapshot, page_token) {
            (false, _) => SnapshotPoll::No,
            (true, None) => SnapshotPoll::First,
            (true, Some(t)) => SnapshotPoll::Later { handoff: t.cursor },
        };
        long_poll(state, session, outbox, &params, since.or(start), snapshot).instrument(span).await
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ChannelParams {
    /// Resume after this event id (`Last-Event-ID` wins): the database broadcasts missed are
    /// replayed from the change log.
    pub since: Option<String>,
    /// A private channel (`realtime.messages` policies decide who may read).
    pub private: Option<String>,
    pub access_token: Option<String>,
    pub apikey: Option<String>,
}

/// `GET /v1/channels/{name}/events`: a broadcast channel (the topic `realtime:<name>`, shared
/// with Phoenix and `/v1/ws` clients) as an event stream, one event per broadcast, named as
/// the broadcast.
pub async fn channel_events(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<ChannelParams>,
    headers: HeaderMap,
) -> Response {
    let credentials =
        match credentials(&state, &headers, params.access_token.as_deref(), params.apikey.as_deref()).await {
            Ok(c) => c,
            Err(refused) => return *refused,
        };
    let private = match flag("private", params.private.as_deref()) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    if name.is_empty() {
        return error(StatusCode::BAD_REQUEST, "a channel name is required");
    }
    let since = resume_from(&headers, params.since.as_deref());
    if since.as_deref().and_then(|s| s.parse::<Since>().ok()).is_some_and(|s| matches!(s, Since::Time(_))) {
        return error(
            StatusCode::BAD_REQUEST,
            "since: a channel stream resumes from an event id (a cursor), not from a time",
        );
    }
    let (mut session, outbox) = Session::new(state.hub.clone(), SseEncoder::shared(), credentials);
    let span = super::session_span(session.id(), "sse");
    let topic = format!("realtime:{name}");
    let req = JoinRequest { topic: topic.clone(), private, since, ..JoinRequest::default() };
    let joined = match session.join(req).instrument(span.clone()).await {
        Ok(j) => j,
        Err(e) => return join_error(e),
    };
    if let Some(handoff) = joined.handoff {
        handoff.start();
    }
    event_stream(state, Opened { session, outbox, topic, notices: joined.notices, span }, None)
}

/// An event stream's session, joined to its one channel.
struct Opened {
    session: Session,
    outbox: OutboxReceiver,
    topic: String,
    /// Notices for the stream's first lines.
    notices: Vec<String>,
    /// The session's span: each chunk is made in it.
    span: tracing::Span,
}

/// How a table's event stream that fell behind joins again from the change log.
struct CatchUp {
    bindings: Vec<Value>,
    credentials: Option<Credentials>,
    /// The last message id sent (a cursor); `None` while there is none to resume from.
    last_id: Option<String>,
}

/// What the event stream holds between chunks.
struct Streaming {
    state: AppState,
    session: Session,
    outbox: OutboxReceiver,
    topic: String,
    shutdown: tokio_util::sync::CancellationToken,
    keep_alive: tokio::time::Interval,
    /// Sent before anything else.
    first: Option<String>,
    done: bool,
    /// Set for table streams with a change log.
    catch_up: Option<CatchUp>,
    span: tracing::Span,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // The response body is dropped when the client goes (or the stream has ended).
        tracing::debug!(parent: &self.span, "disconnected");
    }
}

impl Streaming {
    /// Appends a frame to the chunk, remembering its id (where a catch-up would resume).
    fn write(&mut self, frame: &Frame, buf: &mut Vec<u8>) {
        if let (Some(c), Some(id)) = (self.catch_up.as_mut(), sse::message_id(frame)) {
            c.last_id = Some(id.to_owned());
        }
        sse::write_message(frame, buf);
    }

    /// The next chunk of the stream: the first lines, or what is queued (gathered up to
    /// `CHUNK_BYTES`), a keep-alive, or the error that ends it. `None` once it has ended.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            // The first tick of an interval is immediate: use it up with the first chunk.
            self.keep_alive.tick().await;
            return Some(Bytes::from(first));
        }
        if self.done {
            return None;
        }
        let expiry = self.session.next_expiry().map(tokio::time::Instant::from_std);
        let killed = self.outbox.killed.clone();
        let chunk = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => {
                self.done = true;
                sse::message(None, "error", r#"{"message":"server shutting down"}"#)
            }
            _ = killed.cancelled() => {
                if self.join_again().await.is_some() {
                    Frame::Text(sse::CATCHING_UP.into())
                } else {
                    self.done = true;
                    sse::message(None, "error", r#"{"message":"client too slow: resume from the last event id"}"#)
                }
            }
            frame = self.outbox.recv() => match frame {
                Some(f) => f,
                None => return None,
            },
            _ = async { tokio::time::sleep_until(expiry.unwrap_or_else(far)).await }, if expiry.is_some() => {
                // A closed channel queues why; that is sent next, then the stream ends (below).
                self.session.expire(std::time::Instant::now());
                Frame::Text(sse::KEEP_ALIVE.into())
            }
            _ = self.keep_alive.tick() => Frame::Text(sse::KEEP_ALIVE.into()),
        };
        // Whatever else is already queued goes out in the same chunk (one write, not one each).
        let mut buf = Vec::with_capacity(chunk.len());
        self.write(&chunk, &mut buf);
        if !self.outbox.is_empty() {
            buf.reserve(CHUNK_BYTES + 4096);
        }
        while buf.len() < CHUNK_BYTES && !self.done {
            match self.outbox.try_recv() {
                Some(f) => self.write(&f, &mut buf),
                None => break,
            }
        }
        if !self.session.is_joined(&self.topic) && self.outbox.is_empty() {
            self.done = true;
        }
        // Handed to the response body: as close to the socket as an event stream sees.
        self.outbox.written();
        Some(Bytes::from(buf))
    }

    /// The client fell behind: a new session replays from the last id sent, at the client's
    /// pace, and then goes live (the old one's queue and memberships go). `None` when there is
    /// nothing to resume from, or the join fails.
    async fn join_again(&mut self) -> Option<()> {
        let c = self.catch_up.as_ref()?;
        let since = c.last_id.clone()?;
        let (mut session, outbox) =
            Session::new(self.state.hub.clone(), SseEncoder::shared(), c.credentials.clone());
        let req = JoinRequest {
            topic: self.topic.clone(),
            bindings: c.bindings.clone(),
            since: Some(since),
            ..JoinRequest::default()
        };
        let joined = session.join(req).await.ok()?;
        if let Some(Err(_)) = joined.changes {
            return None;
        }
        self.session = session;
        self.outbox = outbox;
        self.state.hub.metrics().slow_client_catchups.increment(1);
        if let Some(handoff) = joined.handoff {
            handoff.start();
        }
        Some(())
    }
}

fn event_stream(state: AppState, opened: Opened, catch_up: Option<CatchUp>) -> Response {
    let Opened { session, outbox, topic, notices, span } = opened;
    tracing::debug!(parent: &span, "connected");
    let mut first = String::from(sse::RETRY);
    if let Some(id) = catch_up.as_ref().and_then(|c| c.last_id.as_deref()) {
        first.push_str(&sse::start_id(id));
    }
    for n in notices {
        first.push_str(&format!(": {}\n\n", n.replace('\n', " ")));
    }
    let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let s = Streaming {
        shutdown: state.shutdown.child_token(),
        state,
        session,
        outbox,
        topic,
        keep_alive,
        first: Some(first),
        done: false,
        catch_up,
        span,
    };
    let body = futures_util::stream::unfold(s, |mut s| async move {
        let span = s.span.clone();
        let chunk = s.next_chunk().instrument(span).await?;
        Some((Ok::<Bytes, Infallible>(chunk), s))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// A long-poll's snapshot: none, its first page, or a later one (with the first's hand-off).
enum SnapshotPoll {
    No,
    First,
    Later { handoff: Option<String> },
}

/// Collects the changes waiting (or the first to arrive within `wait`), up to `limit`.
///
/// With a snapshot, its rows come first: a page of at most `limit`, answered with
/// `snapshot_next` when more follow. The last page answers the first page's cursor (the changes
/// after it follow), and the only page also the changes waiting. A table without a primary key
/// is one page, refused (413) past 10,000 rows or 32 MiB rather than gathered in memory.
async fn long_poll(
    state: AppState,
    session: Session,
    mut outbox: OutboxReceiver,
    params: &ChangesParams,
    since: Option<String>,
    paging: SnapshotPoll,
) -> Response {
    let wait = Duration::from_secs(params.wait.unwrap_or(DEFAULT_WAIT).min(MAX_WAIT));
    let deadline = tokio::time::Instant::now() + wait;
    let snapshot_deadline = tokio::time::Instant::now() + SNAPSHOT_WAIT;
    let mut poll = Poll {
        changes: b"[".to_vec(),
        count: 0,
        cursor: since,
        limit: params.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
        snapshot: !matches!(paging, SnapshotPoll::No),
        paging,
    };
    loop {
        let frame = if poll.count == 0 || poll.snapshot {
            tokio::select! {
                biased;
                _ = state.shutdown.cancelled() => break,
                f = outbox.recv() => f,
                _ = tokio::time::sleep_until(deadline), if !poll.snapshot => break,
                _ = tokio::time::sleep_until(snapshot_deadline), if poll.snapshot => {
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("snapshot: not read within {} s; try again", SNAPSHOT_WAIT.as_secs()),
                    );
                }
            }
        } else {
            // Something arrived: take what is already waiting, without holding the request.
            match outbox.try_recv() {
                Some(f) => Some(f),
                None => break,
            }
        };
        let Some(frame) = frame else { break };
        // The SSE encoder's messages, taken as they are (its comments carry nothing).
        let Frame::Named(m) = &frame else { continue };
        match poll.take(m.id.as_deref(), &m.name, &m.data) {
            Taken::More => {}
            Taken::Done => break,
            Taken::Answer(response) => {
                outbox.written();
                return response;
            }
        }
    }
    outbox.written();
    drop(session);
    answer(&poll.changes, poll.cursor.as_deref(), None)
}

/// A long-poll's answer as it is gathered.
struct Poll {
    /// The JSON list so far, without its closing bracket.
    changes: Vec<u8>,
    count: usize,
    cursor: Option<String>,
    limit: usize,
    /// Still reading a snapshot's rows.
    snapshot: bool,
    paging: SnapshotPoll,
}

/// What a message did to a long-poll.
enum Taken {
    More,
    Done,
    Answer(Response),
}

impl Poll {
    fn push(&mut self, data: &str) {
        if self.count > 0 {
            self.changes.push(b',');
        }
        self.changes.extend_from_slice(data.as_bytes());
        self.count += 1;
    }

    /// Takes one message of the stream (`id`, `event`, `data` as the SSE encoder wrote it).
    fn take(&mut self, id: Option<&str>, event: &str, data: &str) -> Taken {
        match event {
            "gap" => {
                let body: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                let gap = json!({"error": "gap", "code": body["code"], "message": body["message"]});
                Taken::Answer((StatusCode::CONFLICT, Json(gap)).into_response())
            }
            "error" => {
                let body: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                let message = body["message"].as_str().unwrap_or("error");
                Taken::Answer(error(StatusCode::SERVICE_UNAVAILABLE, message))
            }
            "snapshot-end" => self.snapshot_end(id, data),
            "snapshot" => {
                if self.count >= MAX_LIMIT || self.changes.len() + data.len() > MAX_SNAPSHOT_BYTES {
                    // One page is one answer: bounded, rather than gathered in memory however
                    // large the table.
                    return Taken::Answer(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "snapshot: more than {MAX_LIMIT} matching rows or {} MiB in one long-poll \
                             answer (a table without a primary key is not paged; otherwise lower \
                             limit); read the snapshot as an event stream (Accept: \
                             text/event-stream), which streams it",
                            MAX_SNAPSHOT_BYTES >> 20
                        ),
                    ));
                }
                self.push(data);
                Taken::More
            }
            _ => {
                self.push(data);
                if let Some(id) = id {
                    self.cursor = Some(id.to_owned());
                }
                if self.count >= self.limit {
                    Taken::Done
                } else {
                    Taken::More
                }
            }
        }
    }

    /// The end of a snapshot page: the next page's token when more follow, else the hand-off.
    fn snapshot_end(&mut self, id: Option<&str>, data: &str) -> Taken {
        self.snapshot = false;
        let end: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        let handoff = match &self.paging {
            SnapshotPoll::Later { handoff } => handoff.clone(),
            _ => id.map(str::to_owned),
        };
        if let Value::Object(after) = &end["more"] {
            let next = PageToken { cursor: handoff, after: after.clone() }.encode();
            return Taken::Answer(answer(&self.changes, None, Some(&next)));
        }
        self.cursor = handoff;
        if matches!(self.paging, SnapshotPoll::Later { .. }) {
            // The last of several pages: the changes follow from the first one's cursor.
            return Taken::Done;
        }
        Taken::More
    }
}

/// A long-poll's answer: `{"changes":[…],"cursor":…}` (and `snapshot_next` for a snapshot page
/// with more after it). `changes` is the list's JSON without its closing bracket.
fn answer(changes: &[u8], cursor: Option<&str>, snapshot_next: Option<&str>) -> Response {
    let mut body = b"{\"changes\":".to_vec();
    body.extend_from_slice(changes);
    body.extend_from_slice(b"],\"cursor\":");
    body.extend_from_slice(serde_json::to_string(&cursor).unwrap_or_else(|_| "null".into()).as_bytes());
    if let Some(next) = snapshot_next {
        body.extend_from_slice(b",\"snapshot_next\":");
        body.extend_from_slice(serde_json::to_string(next).unwrap_or_else(|_| "null".into()).as_bytes());
    }
    body.push(b'}');
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
