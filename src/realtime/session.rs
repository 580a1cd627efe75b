//! A session: one connected client, whatever its transport. A plain state machine: the
//! transport decodes input into calls here and writes the frames the outbox yields.
//!
//! Owns: the client's joined channels (each a [`Membership`] guard whose drop removes its
//! subscriptions, its broadcast membership and its presences — so leave, close, idle timeout,
//! slow-client kill and shutdown all clean up through one path), and the per-session limits.
//! Must not: know a wire format, touch a socket, or block the dispatcher.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::auth::rls::{Access, KeyOnlyDeletes, Lane, Request, RowSecurity, Subject, Table};
use crate::auth::topics::{TopicAccess, MAX_REPLAY};
use crate::auth::{AuthError, Credentials};
use crate::change::broadcast::BroadcastMessage;
use crate::change::Position;
use crate::locks;
use crate::realtime::broadcast::{BroadcastError, ReplayGate};
use crate::realtime::bus::BusMessage;
use crate::realtime::hub::Hub;
use crate::realtime::index::{SubId, Subscription};
use crate::realtime::live_query::LiveQuery;
use crate::realtime::member::{channel_name, Member, SessionId, TopicKey};
use crate::realtime::outbox::{Direct, Encoder, Outbox, OutboxReceiver};
use crate::realtime::presence::{new_ref, random_uuid, PresenceDiff, PresenceMeta};
use crate::realtime::resume::{Handoff, Resume};
use crate::realtime::snapshot::Snapshot;
use crate::subscribe::BindingError;
use crate::subscribe::{BindingSpec, LiveSpec};

/// What a client asks for when it joins a channel.
#[derive(Debug, Clone, Default)]
pub struct JoinRequest {
    pub topic: String,
    /// How the protocol addresses this join's own messages (Phoenix: the `join_ref`); handed
    /// back to its encoder with every message for this member alone.
    pub address: Option<Arc<str>>,
    pub private: bool,
    /// `postgres_changes` bindings as sent.
    pub bindings: Vec<Value>,
    /// Receive this session's own broadcasts.
    pub broadcast_self: bool,
    /// Acknowledge each broadcast this session sends.
    pub broadcast_ack: bool,
    /// Send the presence state now (otherwise on the first track).
    pub presence_enabled: bool,
    /// The presence key; empty → a random UUID.
    pub presence_key: String,
    /// Tell the client (a `System` ok) once database broadcasts reach the channel.
    pub replication_ready: bool,
    /// A token for this channel; otherwise the one the session connected with.
    pub access_token: Option<String>,
    /// Replay a private topic's recent database broadcasts first: `{"since": <Unix ms>,
    /// "limit": 1..=25}` as sent.
    pub replay: Option<Value>,
    /// Resume the `postgres_changes` bindings after this cursor (from the change log).
    pub since: Option<String>,
    /// Send the rows the bindings match now, then the changes after them.
    pub snapshot: bool,
    /// With `snapshot`: only this page of the rows (of a table with a primary key).
    pub snapshot_page: Option<crate::realtime::snapshot::SnapshotPage>,
}

/// The result of a join that was accepted.
#[derive(Debug)]
pub struct Joined {
    /// For joins with bindings: `Ok` once every binding is live (a change committed from now on
    /// is delivered), or the errors of those that could not be subscribed (the others are live).
    pub changes: Option<Result<(), Vec<BindingError>>>,
    /// Things the client should know about its live bindings (e.g. DELETEs that row-level
    /// security withholds).
    pub notices: Vec<String>,
    /// The replay of a join with `since`, or the snapshot of a join with `snapshot`: the
    /// transport starts it once it has answered the join.
    pub handoff: Option<Handoff>,
    /// The last change matched before the bindings went live (for a channel without bindings,
    /// the last database broadcast before it joined): every later one is delivered (a resume
    /// point for clients that join without a cursor).
    pub matched: Position,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("topic must not be empty")]
    EmptyTopic,
    #[error("Too many channels")]
    TooManyChannels,
    #[error("Too many joins per second")]
    TooManyJoins,
    /// More `postgres_changes` bindings than `max_bindings_per_join`.
    #[error("TooManyBindings: a join may carry at most {0} postgres_changes bindings")]
    TooManyBindings(usize),
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A private channel whose policies let the subject read neither broadcasts nor presence.
    #[error("You do not have permissions to read from this Channel topic: {0}")]
    Unauthorized(String),
    #[error("{0}")]
    Replay(ReplayRefusal),
    /// The private channel's policies could not be checked (the database is unreachable).
    #[error("Realtime was unable to connect to the project database")]
    Unavailable,
    #[error(transparent)]
    Cursor(#[from] crate::log::ParseCursorError),
    #[error("{0}")]
    Snapshot(SnapshotRefusal),
}

/// Why a join with `snapshot` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotRefusal {
    #[error("InvalidSnapshot: snapshot and since exclude each other (a snapshot is the current state)")]
    WithCursor,
    #[error("InvalidSnapshot: snapshots need the gateway's database")]
    Unavailable,
}

/// Why a replay was refused; Supabase's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayRefusal {
    #[error("Replay is not allowed for public channels")]
    PublicChannel,
    #[error("Replay params are not valid")]
    InvalidParams,
    #[error("Realtime was unable to replay messages")]
    Failed,
}

/// Why a token refresh closes the channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("You no longer have permission to read from this Channel topic: {0}")]
    Revoked(String),
    #[error("Realtime was unable to connect to the project database")]
    Unavailable,
    /// A binding of the channel that the new token's role may not hold (a table or a filtered
    /// or selected column it may not read).
    #[error("{0}")]
    Binding(String),
}

/// Why a presence event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    #[error("the socket has not joined topic {0}")]
    NotJoined(String),
    #[error("Presence track payload must be a map")]
    NotAMap,
    #[error("Track message size exceeded")]
    PayloadTooLarge,
    #[error("Client presence rate limit exceeded")]
    RateLimited,
    /// A private channel whose policies do not let the subject track presence.
    #[error("You do not have permissions to track presence on this Channel topic: {0}")]
    Unauthorized(String),
}

/// A fixed-window counter: at most `limit` events per `period`.
#[derive(Debug)]
struct Window {
    limit: u32,
    period: Duration,
    started: Option<Instant>,
    count: u32,
}

impl Window {
    fn new(limit: u32, period: Duration) -> Self {
        Window { limit, period, started: None, count: 0 }
    }

    fn allow(&mut self, now: Instant) -> bool {
        match self.started {
            Some(s) if now.duration_since(s) < self.period => {
                if self.count >= self.limit {
                    return false;
                }
                self.count += 1;
                true
            }
            _ => {
                self.started = Some(now);
                self.count = 1;
                self.limit > 0
            }
        }
    }
}

/// What this session tracks on a channel.
#[derive(Debug)]
struct Tracked {
    key: Arc<str>,
    meta: PresenceMeta,
}

/// What a join was admitted with.
struct Admitted {
    credentials: Option<Credentials>,
    subject: Option<Arc<Subject>>,
    /// The channel's name (the topic without `realtime:`).
    name: String,
    access: TopicAccess,
    /// A private topic's broadcast replay: (since, limit).
    replay: Option<(i64, i64)>,
    since: Option<crate::realtime::resume::Since>,
}

/// A join's bindings once in the index.
struct Live {
    subs: Vec<Arc<Subscription>>,
    errors: Vec<BindingError>,
    /// The last change matched before they went live.
    through: Position,
}

/// One joined channel. Dropping it leaves the channel everywhere.
#[derive(Debug)]
pub struct Membership {
    hub: Hub,
    member: Arc<Member>,
    subs: Vec<SubId>,
    ack: bool,
    presence_key: Arc<str>,
    presence_enabled: bool,
    tracked: Option<Tracked>,
    /// The token this channel was authorized with (none when authentication is off).
    credentials: Option<Credentials>,
    /// When that token expires; the channel is closed then.
    expires_at: Option<Instant>,
    /// What the private channel's policies allow (everything on public channels).
    access: TopicAccess,
}

impl Membership {
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub fn member(&self) -> &Arc<Member> {
        &self.member
    }

    /// Whether the client asked for broadcast acknowledgements.
    pub fn ack(&self) -> bool {
        self.ack
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if !self.subs.is_empty() {
            let mut index = locks::write(self.hub.index());
            for id in &self.subs {
                if index.remove(*id) {
                    self.hub.metrics().subscriptions.decrement(1.0);
                }
            }
        }
        // Presences leave with the member (the registry sends the diff).
        self.hub.remove_member(&self.member);
    }
}

/// A client connection in `walcast_connected_clients` and `walcast_sessions{protocol}` while it
/// lasts.
pub struct Connected {
    clients: metrics::Gauge,
    open: metrics::Gauge,
}

impl Connected {
    /// Counts a connection of `protocol` (one of [`crate::telemetry::PROTOCOLS`]) until dropped.
    pub fn count(hub: &Hub, protocol: &'static str) -> Connected {
        let clients = hub.metrics().clients.clone();
        let open = hub.metrics().telemetry.gauge(crate::telemetry::SESSIONS, &[("protocol", protocol)]);
        clients.increment(1.0);
        open.increment(1.0);
        Connected { clients, open }
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.clients.decrement(1.0);
        self.open.decrement(1.0);
    }
}

/// One connected client.
pub struct Session {
    hub: Hub,
    id: SessionId,
    /// This session as a connection, unless it is one of a connection that counts itself.
    _connected: Option<Connected>,
    outbox: Outbox,
    encoder: Arc<dyn Encoder>,
    /// Joined channels by topic (a topic is joined at most once; rejoining replaces).
    /// Boxed: a client joins one channel or a few, and the table keeps spare slots — inline, each
    /// idle socket would hold several empty memberships.
    channels: HashMap<Arc<str>, Box<Membership>>,
    joins: Window,
    events: Window,
    presence_events: Window,
    /// The token the client connected with (none when authentication is off).
    connect: Option<Credentials>,
    /// One snapshot of this session reads at a time: a client cannot take every snapshot
    /// connection by joining several channels with `snapshot` at once.
    /// Made on the first snapshot (most sessions take none).
    snapshot_turn: Option<Arc<tokio::sync::Semaphore>>,
}

/// Whether `subject` may subscribe to a single-table binding: its role must be able to SELECT
/// the table and every column the filter or `select` names. Returns a notice when row-level
/// security will withhold the table's DELETEs (key-only old rows). Schema-wide bindings are
/// checked per table as changes arrive.
async fn authorize_binding(
    rls: &RowSecurity,
    subject: &Subject,
    spec: &BindingSpec,
) -> Result<Option<String>, BindingError> {
    let Some(table) = spec.table.as_deref() else { return Ok(None) };
    let name = format!("{}.{}", spec.schema, table);
    let request = Request { subject, wanted: Some(&[]) };
    let verdict = rls
        .check(Lane::Side, Table::Name { schema: &spec.schema, table }, std::slice::from_ref(&request), "[]")
        .await
        .map_err(|e| BindingError::RlsUnavailable(Arc::new(e)))?
        .pop();
    let role = subject.role.to_string();
    let (hidden, rows) = match verdict.map(|v| v.access) {
        Some(Access::Open(h)) => (h, false),
        Some(Access::Rows(h)) => (h, true),
        Some(Access::Denied) => return Err(BindingError::NoSelect { table: name, role }),
        Some(Access::Failed(message)) => {
            return Err(BindingError::Authorization { table: name, role, message: message.to_string() })
        }
        None => return Err(BindingError::Authorization { table: name, role, message: "no answer".into() }),
    };
    if let Some(hidden) = hidden {
        // A live query's filter is its own (the index's is empty): it may not name them either,
        // or its enters and leaves would tell what the column holds.
        // Nor order by them: the initial result's order would tell how their values compare.
        let live = spec
            .live
            .iter()
            .flat_map(|l| l.filter.columns().into_iter().chain(l.order.iter().map(|k| &*k.column)));
        let named = spec
            .filter
            .columns()
            .into_iter()
            .chain(live)
            .chain(spec.select.iter().flat_map(|s| s.iter().map(|c| &**c)));
        for column in named {
            if hidden.iter().any(|h| &**h == column) {
                return Err(BindingError::HiddenColumn { column: column.to_owned(), table: name, role });
            }
        }
    }
    let deletes = spec.event.accepts(crate::change::ChangeKind::Delete);
    if rows && deletes && !spec.full_identity && rls.key_only_deletes() == KeyOnlyDeletes::Withhold {
        return Ok(Some(format!(
            "DELETE events on {name} are not delivered: row-level security cannot be checked on \
             their key-only old rows (set REPLICA IDENTITY FULL on {name})"
        )));
    }
    Ok(None)
}

/// `{"since": <Unix ms>, "limit": 1..=25}` (limit optional, clamped like Supabase's).
fn replay_params(v: &Value) -> Option<(i64, i64)> {
    let since = v.get("since")?.as_i64()?;
    let limit = match v.get("limit") {
        None | Some(Value::Null) => MAX_REPLAY,
        Some(l) => l.as_i64()?,
    };
    Some((since, limit))
}

/// Whether a token names Supabase's opaque API keys (`sb_…`), which stand for "no user token".
fn is_api_key(token: &str) -> bool {
    token.starts_with("sb_")
}

impl Session {
    /// A new session whose frames are encoded by `encoder`; the receiver goes to the transport.
    /// `connect` is the verified token the client connected with.
    pub fn new(
        hub: Hub,
        encoder: Arc<dyn Encoder>,
        connect: Option<Credentials>,
    ) -> (Session, OutboxReceiver) {
        let limits = *hub.limits();
        let telemetry = &hub.metrics().telemetry;
        let labels = [("protocol", encoder.protocol())];
        let (outbox, rx) =
            Outbox::new(limits.client_queue, telemetry.histogram(crate::telemetry::QUEUED, &labels));
        let connected = encoder.is_connection().then(|| Connected::count(&hub, encoder.protocol()));
        let session = Session {
            _connected: connected,
            id: hub.next_id(),
            outbox,
            encoder,
            channels: HashMap::new(),
            joins: Window::new(limits.max_joins_per_second, Duration::from_secs(1)),
            events: Window::new(limits.max_events_per_second, Duration::from_secs(1)),
            presence_events: Window::new(limits.max_presence_events, limits.presence_window),
            connect,
            hub,
            snapshot_turn: None,
        };
        (session, rx)
    }

    /// Replaces the connection's token (a transport that authenticates after connecting).
    /// Whether the client has a verified connect token.
    pub fn has_connect(&self) -> bool {
        self.connect.is_some()
    }

    /// The token the connection holds (none when authentication is off).
    pub fn connect_credentials(&self) -> Option<&Credentials> {
        self.connect.as_ref()
    }

    pub fn set_connect(&mut self, credentials: Credentials) {
        self.connect = Some(credentials);
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn is_joined(&self, topic: &str) -> bool {
        self.channels.contains_key(topic)
    }

    pub fn membership(&self, topic: &str) -> Option<&Membership> {
        self.channels.get(topic).map(|m| &**m)
    }

    pub fn joined_topics(&self) -> impl Iterator<Item = &str> {
        self.channels.keys().map(|t| &**t)
    }

    /// Joins a channel (replacing an earlier join of the same topic). When this returns, the
    /// channel receives broadcasts and presence diffs, and every binding reported live receives
    /// each change committed from now on.
    pub async fn join(&mut self, req: JoinRequest) -> Result<Joined, JoinError> {
        use tracing::Instrument as _;
        // The topic names the channel; a binding's filter (it may hold a row's value) is not logged.
        let span = tracing::info_span!("join", session = self.id(), topic = %req.topic);
        async {
            let joined = self.join_in_span(req).await;
            match &joined {
                Ok(_) => tracing::debug!("joined"),
                // Its message may quote the binding's filter: not logged.
                Err(_) => tracing::debug!("join refused"),
            }
            joined
        }
        .instrument(span)
        .await
    }

    async fn join_in_span(&mut self, mut req: JoinRequest) -> Result<Joined, JoinError> {
        let admitted = self.admit(&req).await?;
        let topic: Arc<str> = req.topic.as_str().into();
        // Rejoining replaces the old channel.
        self.channels.remove(&topic);
        if self.channels.len() >= self.hub.limits().max_channels {
            return Err(JoinError::TooManyChannels);
        }
        let (mut resolved, notices) = self.resolve_bindings(&req.bindings, admitted.subject.as_ref()).await;
        let live = self.live_query(&req, &admitted, &mut resolved)?;
        // A live query starts from its current result.
        req.snapshot |= live.is_some();
        let member = self.new_member(&req, &topic, &admitted, live);
        self.hub.add_member(Arc::clone(&member), req.presence_enabled);
        let mut membership = Membership {
            hub: self.hub.clone(),
            member: Arc::clone(&member),
            subs: Vec::new(),
            ack: req.broadcast_ack,
            presence_key: if req.presence_key.is_empty() {
                random_uuid().into()
            } else {
                req.presence_key.clone().into()
            },
            presence_enabled: req.presence_enabled,
            tracked: None,
            expires_at: admitted
                .credentials
                .as_ref()
                .and_then(|c| Instant::now().checked_add(c.claims.time_left())),
            credentials: admitted.credentials,
            access: admitted.access,
        };
        let live = self.go_live(&member, resolved, req.snapshot, &mut membership.subs);
        // The member was added above: every database broadcast after this one reaches it.
        let broadcasts_through = self.hub.broadcast_logged();
        // Where this join starts: a client that resumes from here misses nothing of it.
        let matched = if req.bindings.is_empty() { broadcasts_through } else { live.through };
        let mut through = live.through;
        if admitted.since.is_some() {
            through = through.max(broadcasts_through);
        }
        let handoff = self.handoff(&req, &member, live.subs, admitted.since, through);
        if let Some((since, limit)) = admitted.replay {
            // On failure the membership drops here, leaving nothing behind.
            let replayed = match self.hub.topics() {
                Some(topics) => topics.replay(&admitted.name, since, limit).await.map_err(|e| {
                    tracing::warn!(error = %crate::errors::chain(&e), "broadcast replay failed");
                }),
                None => Err(()),
            };
            let replayed = replayed.map_err(|()| JoinError::Replay(ReplayRefusal::Failed))?;
            self.hub.release_replay(&member, &replayed);
        }
        self.channels.insert(topic, Box::new(membership));
        if req.replication_ready {
            self.notify_replication_ready(&member);
        }
        let errors = live.errors;
        let changes =
            (!req.bindings.is_empty()).then(|| if errors.is_empty() { Ok(()) } else { Err(errors) });
        Ok(Joined { changes, notices, handoff, matched })
    }

    /// Whether this session may join as asked: the join rate, the bindings' number, the token,
    /// the topic's policies, and the replay, cursor and snapshot asked for.
    async fn admit(&mut self, req: &JoinRequest) -> Result<Admitted, JoinError> {
        if req.topic.is_empty() {
            return Err(JoinError::EmptyTopic);
        }
        if !self.joins.allow(Instant::now()) {
            self.hub.metrics().limited();
            return Err(JoinError::TooManyJoins);
        }
        if req.bindings.len() > self.hub.limits().max_bindings {
            return Err(JoinError::TooManyBindings(self.hub.limits().max_bindings));
        }
        let credentials = self.authenticate(req.access_token.as_deref()).await?;
        let subject = credentials.as_ref().map(|c| self.hub.intern_subject(Subject::of(&c.claims)));
        let name = channel_name(&req.topic).to_owned();
        let access = self.hub.topic_access(req.private, subject.as_deref(), &name).await.map_err(|e| {
            tracing::warn!(error = %crate::errors::chain(&e), "private channel check failed");
            JoinError::Unavailable
        })?;
        if !access.may_join(req.presence_enabled) {
            self.hub.metrics().token_refused();
            return Err(JoinError::Unauthorized(name));
        }
        let replay = match &req.replay {
            None | Some(Value::Null) => None,
            Some(_) if !req.private => return Err(JoinError::Replay(ReplayRefusal::PublicChannel)),
            Some(_) if !access.broadcast_read => return Err(JoinError::Unauthorized(name)),
            Some(v) => Some(replay_params(v).ok_or(JoinError::Replay(ReplayRefusal::InvalidParams))?),
        };
        let since: Option<crate::realtime::resume::Since> =
            req.since.as_deref().map(str::parse).transpose()?;
        if req.snapshot {
            if since.is_some() {
                return Err(JoinError::Snapshot(SnapshotRefusal::WithCursor));
            }
            if self.hub.snapshots().is_none() {
                return Err(JoinError::Snapshot(SnapshotRefusal::Unavailable));
            }
        }
        Ok(Admitted { credentials, subject, name, access, replay, since })
    }

    /// The bindings against the publication's catalog, each authorized for `subject` (what
    /// row-level security will withhold becomes a notice).
    async fn resolve_bindings(
        &self,
        bindings: &[Value],
        subject: Option<&Arc<Subject>>,
    ) -> (Vec<Result<BindingSpec, BindingError>>, Vec<String>) {
        let mut resolved = if bindings.is_empty() {
            Vec::new()
        } else {
            match self.hub.catalog() {
                Some(catalog) => catalog.resolve(bindings).await,
                None => bindings.iter().map(|_| Err(BindingError::NoCatalog)).collect(),
            }
        };
        let mut notices = Vec::new();
        if let (Some(rls), Some(subject)) = (self.hub.rls(), subject) {
            for r in resolved.iter_mut() {
                let Ok(spec) = r else { continue };
                match authorize_binding(rls, subject, spec).await {
                    Ok(Some(notice)) => notices.push(notice),
                    Ok(None) => {}
                    Err(e) => *r = Err(e),
                }
            }
        }
        (resolved, notices)
    }

    /// The live query of a join whose binding asks for one: it must be the join's only binding,
    /// over a transport that carries live queries, as a stream that starts from a snapshot.
    fn live_query(
        &self,
        req: &JoinRequest,
        admitted: &Admitted,
        resolved: &mut [Result<BindingSpec, BindingError>],
    ) -> Result<Option<(u32, Arc<LiveSpec>)>, JoinError> {
        let found = resolved.iter().find_map(|r| r.as_ref().ok().and_then(|s| Some((s.id, s.live.clone()?))));
        let Some(spec) = found else {
            return Ok(None);
        };
        let refusal = if resolved.len() > 1 {
            Some("a live query must be its join's only binding")
        } else if !self.encoder.carries_live() {
            Some("this transport does not carry live queries")
        } else if req.snapshot_page.is_some() {
            Some("a live query needs a stream, not pages of a snapshot")
        } else {
            None
        };
        if let Some(why) = refusal {
            for r in resolved.iter_mut() {
                *r = Err(BindingError::Live(why.into()));
            }
            return Ok(None);
        }
        if admitted.since.is_some() {
            return Err(JoinError::Snapshot(SnapshotRefusal::WithCursor));
        }
        if self.hub.snapshots().is_none() {
            return Err(JoinError::Snapshot(SnapshotRefusal::Unavailable));
        }
        Ok(Some(spec))
    }

    fn new_member(
        &self,
        req: &JoinRequest,
        topic: &Arc<str>,
        admitted: &Admitted,
        live: Option<(u32, Arc<LiveSpec>)>,
    ) -> Arc<Member> {
        let live = live.map(|spec| {
            let max = self.hub.limits().max_live_rows;
            LiveQuery::new(spec, max, Arc::clone(&self.encoder), Arc::clone(topic), req.address.clone())
        });
        Arc::new(Member {
            id: self.hub.next_id(),
            session: self.id,
            key: TopicKey { topic: Arc::clone(topic), private: req.private },
            address: req.address.clone(),
            outbox: self.outbox.clone(),
            encoder: Arc::clone(&self.encoder),
            echo_own: req.broadcast_self,
            subject: std::sync::RwLock::new(admitted.subject.clone()),
            reads: Member::reads_of(&admitted.access).into(),
            replay: admitted.replay.is_some().then(|| std::sync::Mutex::new(ReplayGate::Holding(Vec::new()))),
            resume: (admitted.since.is_some() || req.snapshot).then(crate::realtime::gate::holding_gate),
            seen: Default::default(),
            change_envelope: Default::default(),
            told_withheld: Default::default(),
            live,
        })
    }

    /// Adds the member's bindings to the index (their ids to `ids`); returns them, the errors of
    /// those that could not be, and the last change matched before they went live.
    fn go_live(
        &self,
        member: &Arc<Member>,
        resolved: Vec<Result<BindingSpec, BindingError>>,
        snapshot: bool,
        ids: &mut Vec<SubId>,
    ) -> Live {
        let mut live = Live { subs: Vec::new(), errors: Vec::new(), through: Position::ZERO };
        if resolved.is_empty() {
            return live;
        }
        let mut index = locks::write(self.hub.index());
        for r in resolved {
            let r = r.and_then(|spec| {
                let one_table = spec.table.is_some() && &*spec.schema != "*";
                if snapshot && !one_table {
                    Err(BindingError::SnapshotNeedsTable)
                } else {
                    Ok(spec)
                }
            });
            match r {
                Ok(spec) => {
                    let id = index.insert(Arc::clone(member), spec);
                    live.subs.extend(index.get(id).cloned());
                    ids.push(id);
                    self.hub.metrics().subscriptions.increment(1.0);
                }
                Err(e) => live.errors.push(e),
            }
        }
        // Under the write lock: every change after this one is matched against `subs`.
        live.through = self.hub.matched();
        live
    }

    /// What the transport starts once it has answered the join: the replay after `since`, or
    /// the snapshot, each handing off to live delivery at `through`.
    fn handoff(
        &mut self,
        req: &JoinRequest,
        member: &Arc<Member>,
        subs: Vec<Arc<Subscription>>,
        since: Option<crate::realtime::resume::Since>,
        through: Position,
    ) -> Option<Handoff> {
        if let Some(cursor) = since {
            return Some(Handoff::Resume(Resume {
                hub: self.hub.clone(),
                member: Arc::clone(member),
                subs,
                after: cursor,
                through,
            }));
        }
        if !req.snapshot {
            return None;
        }
        let mut tables: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        for sub in &subs {
            if let Some(table) = &sub.binding.table {
                let t = (Arc::clone(&sub.binding.schema), Arc::clone(table));
                if !tables.contains(&t) {
                    tables.push(t);
                }
            }
        }
        Some(Handoff::Snapshot(Snapshot {
            hub: self.hub.clone(),
            member: Arc::clone(member),
            subs,
            tables,
            through,
            turn: Arc::clone(
                self.snapshot_turn.get_or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1))),
            ),
            page: req.snapshot_page.clone(),
        }))
    }

    /// The credentials a join acts with: its own token when it brings one, else the connect
    /// token (verified again: it may have expired since). `None` when authentication is off.
    async fn authenticate(&self, access_token: Option<&str>) -> Result<Option<Credentials>, AuthError> {
        let verifier = self.hub.verifier();
        if !verifier.required() {
            return Ok(None);
        }
        let token = match access_token.filter(|t| !t.is_empty() && !is_api_key(t)) {
            Some(t) => t,
            None => match &self.connect {
                Some(c) => &*c.token,
                None => return Err(AuthError::Missing),
            },
        };
        let verified = verifier.verify(token).await;
        if verified.is_err() {
            self.hub.metrics().token_refused();
        }
        verified.map(Some)
    }

    /// A new token for a joined channel (`access_token` event). The same token, an API key or
    /// an unknown topic changes nothing; an invalid token is an error (the caller closes the
    /// channel).
    pub async fn refresh_token(&mut self, topic: &str, token: &str) -> Result<(), RefreshError> {
        let verifier = self.hub.verifier().clone();
        if !verifier.required() || is_api_key(token) {
            return Ok(());
        }
        let Some(current) = self.channels.get(topic) else { return Ok(()) };
        if current.credentials.as_ref().is_some_and(|c| &*c.token == token) {
            return Ok(());
        }
        let private = current.member.key.private;
        let credentials = verifier.verify(token).await.inspect_err(|_| {
            self.hub.metrics().token_refused();
        })?;
        let subject = self.hub.intern_subject(Subject::of(&credentials.claims));
        let name = channel_name(topic);
        // Private channels are authorized again with the new claims.
        let access = self.hub.topic_access(private, Some(&subject), name).await.map_err(|e| {
            tracing::warn!(error = %crate::errors::chain(&e), "private channel check failed");
            RefreshError::Unavailable
        })?;
        self.recheck_bindings(topic, &subject).await?;
        if let Some(m) = self.channels.get_mut(topic) {
            if access.revokes_read(&m.access) {
                self.hub.metrics().token_refused();
                return Err(RefreshError::Revoked(name.to_owned()));
            }
            m.access = access;
            m.member.reads.store(Member::reads_of(&access), Ordering::Relaxed);
            m.member.set_subject(Some(subject));
            // Groupings of matches by subject are stale now.
            locks::write(self.hub.index()).touch();
            m.expires_at = Instant::now().checked_add(credentials.claims.time_left());
            m.credentials = Some(credentials);
        }
        Ok(())
    }

    /// Checks the channel's `postgres_changes` bindings again for a new subject, as a join
    /// does: a filter or `select` on a column the new role may not read would otherwise keep
    /// answering as an oracle.
    async fn recheck_bindings(&self, topic: &str, subject: &Arc<Subject>) -> Result<(), RefreshError> {
        let (Some(rls), Some(m)) = (self.hub.rls(), self.channels.get(topic)) else { return Ok(()) };
        if m.member.subject().is_some_and(|s| Arc::ptr_eq(&s, subject)) || m.subs.is_empty() {
            return Ok(());
        }
        let subs: Vec<Arc<crate::realtime::index::Subscription>> = {
            let index = locks::read(self.hub.index());
            m.subs.iter().filter_map(|id| index.get(*id).cloned()).collect()
        };
        for sub in subs {
            authorize_binding(rls, subject, &sub.binding)
                .await
                .map_err(|e| RefreshError::Binding(e.to_string()))?;
        }
        Ok(())
    }

    /// When the first channel token expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.channels.values().filter_map(|m| m.expires_at).min()
    }

    /// Closes every channel whose token has expired by `now`, telling the client why.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<(Arc<str>, i64)> = self
            .channels
            .iter()
            .filter(|(_, m)| m.expires_at.is_some_and(|at| at <= now))
            .map(|(t, m)| {
                let ago = m
                    .credentials
                    .as_ref()
                    .map(|c| crate::auth::unix_now().saturating_sub(c.claims.exp))
                    .unwrap_or(0);
                (Arc::clone(t), ago.max(0))
            })
            .collect();
        for (topic, ago) in expired {
            self.hub.metrics().token_refused();
            self.close_channel(&topic, "system", &AuthError::Expired(ago).to_string());
        }
    }

    /// Queues `Replication connection established` to the member once the replication stream is
    /// live (at once if it is), unless the member has left by then.
    fn notify_replication_ready(&self, member: &Arc<Member>) {
        let Some(mut live) = self.hub.replication_live() else { return };
        let ready = Direct::System {
            extension: "system",
            status: "ok",
            message: "Replication connection established",
        };
        if *live.borrow_and_update() {
            self.hub.send_direct(member, &ready);
            return;
        }
        let hub = self.hub.clone();
        let member = Arc::downgrade(member);
        tokio::spawn(async move {
            if live.wait_for(|l| *l).await.is_ok() {
                if let Some(member) = member.upgrade() {
                    hub.send_direct(&member, &ready);
                }
            }
        });
    }

    /// Leaves a channel; returns false if it was not joined.
    pub fn leave(&mut self, topic: &str) -> bool {
        self.channels.remove(topic).is_some()
    }

    /// Leaves a channel after telling the client why (a `System` error, then `Closed`).
    pub fn close_channel(&mut self, topic: &str, extension: &str, message: &str) {
        if let Some(m) = self.channels.remove(topic) {
            let member = m.member();
            self.hub.send_direct(member, &Direct::System { extension, status: "error", message });
            self.hub.send_direct(member, &Direct::Closed);
        }
    }

    /// Sends a broadcast to every member of the channel (not back to this session unless it
    /// joined with `broadcast_self`). Nothing is delivered when an error is returned.
    pub fn broadcast(&mut self, topic: &str, message: BroadcastMessage) -> Result<(), BroadcastError> {
        let Some(m) = self.channels.get(topic) else {
            return Err(BroadcastError::NotJoined(topic.to_owned()));
        };
        if !m.access.broadcast_write {
            return Err(BroadcastError::Unauthorized(channel_name(topic).to_owned()));
        }
        if !self.events.allow(Instant::now()) {
            self.hub.metrics().limited();
            return Err(BroadcastError::RateLimited);
        }
        self.hub.broadcast_fits(message.payload.len())?;
        self.hub.publish_broadcast(m.member.key.clone(), Some(m.member.id), message);
        Ok(())
    }

    /// Tracks `payload` (a JSON object) under the channel's presence key. Re-tracking an
    /// identical payload changes nothing; a changed one is a leave of the old meta and a join of
    /// the new one, in one diff.
    pub fn track(&mut self, topic: &str, payload: Value) -> Result<(), PresenceError> {
        let Some(m) = self.channels.get_mut(topic) else {
            return Err(PresenceError::NotJoined(topic.to_owned()));
        };
        if !self.presence_events.allow(Instant::now()) {
            self.hub.metrics().limited();
            return Err(PresenceError::RateLimited);
        }
        if !m.access.presence_write {
            return Err(PresenceError::Unauthorized(channel_name(topic).to_owned()));
        }
        let Value::Object(payload) = payload else {
            return Err(PresenceError::NotAMap);
        };
        let size = serde_json::to_vec(&payload).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > self.hub.limits().max_presence_payload_bytes {
            return Err(PresenceError::PayloadTooLarge);
        }
        self.hub.metrics().presence_events.increment(1);
        let phx_ref = new_ref(self.hub.next_id(), self.hub.node());
        let prev = m.tracked.as_ref().map(|t| Arc::clone(&t.meta.phx_ref));
        let meta = PresenceMeta::new(phx_ref, prev.as_deref(), m.member.id, payload);
        if m.tracked.as_ref().is_some_and(|t| t.meta.payload == meta.payload) {
            return Ok(());
        }
        if !m.presence_enabled {
            // The client's presence state is pending until it receives one.
            m.presence_enabled = true;
            self.hub.send_presence_state(&m.member);
        }
        let mut diff = PresenceDiff::default();
        if let Some(old) = m.tracked.take() {
            diff.leaves.push((old.key, old.meta));
        }
        let key = Arc::clone(&m.presence_key);
        diff.joins.push((Arc::clone(&key), meta.clone()));
        m.tracked = Some(Tracked { key, meta });
        self.hub.publish(BusMessage::Presence { key: m.member.key.clone(), diff });
        Ok(())
    }

    /// Stops tracking on the channel (a no-op when nothing is tracked).
    pub fn untrack(&mut self, topic: &str) -> Result<(), PresenceError> {
        let Some(m) = self.channels.get_mut(topic) else {
            return Err(PresenceError::NotJoined(topic.to_owned()));
        };
        if !self.presence_events.allow(Instant::now()) {
            self.hub.metrics().limited();
            return Err(PresenceError::RateLimited);
        }
        if let Some(old) = m.tracked.take() {
            self.hub.metrics().presence_events.increment(1);
            let diff = PresenceDiff { joins: Vec::new(), leaves: vec![(old.key, old.meta)] };
            self.hub.publish(BusMessage::Presence { key: m.member.key.clone(), diff });
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Memberships clean up as they drop.
        self.channels.clear();
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::change::broadcast::BroadcastPayload;
    use crate::realtime::limits::Limits;
    use crate::realtime::outbox::{EncodingId, Event, Frame};

    /// Renders events as short readable lines: `topic kind detail`.
    struct Lines(u8);

    impl Encoder for Lines {
        fn id(&self) -> EncodingId {
            EncodingId(self.0)
        }

        fn encode(&self, topic: &str, event: &Event<'_>) -> Option<Frame> {
            let line = match event {
                Event::Change { ids, .. } => format!("{topic} change {ids:?}"),
                Event::Broadcast(m) => match &m.payload {
                    BroadcastPayload::Json(p) => {
                        format!("{topic} broadcast {} {}", m.event, String::from_utf8_lossy(p))
                    }
                    // Encoding 1 cannot carry bytes (like Phoenix 1.0.0).
                    BroadcastPayload::Binary(_) if self.0 == 1 => return None,
                    BroadcastPayload::Binary(p) => format!("{topic} broadcast {} {:?}", m.event, &p[..]),
                },
                Event::PresenceDiff(d) => format!("{topic} diff {}", String::from_utf8_lossy(d)),
                Event::Live { kind, data, .. } => format!("{topic} live {} {data}", kind.as_str()),
            };
            Some(Frame::Text(line.into()))
        }

        fn encode_direct(&self, topic: &str, address: Option<&str>, message: &Direct<'_>) -> Frame {
            let line = match message {
                Direct::PresenceState(s) => format!("{topic} state {}", String::from_utf8_lossy(s)),
                Direct::System { message, .. } => format!("{topic} system {message}"),
                Direct::Closed => format!("{topic} closed {address:?}"),
                Direct::Gap { code, .. } => format!("{topic} gap {code}"),
                Direct::SnapshotEnd { rows, .. } => format!("{topic} snapshot-end {rows}"),
            };
            Frame::Text(line.into())
        }
    }

    fn hub(limits: Limits) -> Hub {
        Hub::with_limits(limits)
    }

    fn session(hub: &Hub, encoding: u8) -> (Session, OutboxReceiver) {
        Session::new(hub.clone(), Arc::new(Lines(encoding)), None)
    }

    fn drain(rx: &mut OutboxReceiver) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(f) = rx.try_recv() {
            out.push(f.text().as_deref().unwrap_or("<binary>").to_owned());
        }
        out
    }

    fn req(topic: &str) -> JoinRequest {
        JoinRequest { topic: topic.into(), ..JoinRequest::default() }
    }

    fn json_msg(event: &str, payload: &str) -> BroadcastMessage {
        BroadcastMessage {
            event: event.into(),
            payload: BroadcastPayload::Json(Bytes::copy_from_slice(payload.as_bytes())),
            meta: None,
            logged: None,
        }
    }

    fn state_of(line: &str) -> serde_json::Value {
        serde_json::from_str(line.split_once(" state ").map(|(_, s)| s).unwrap_or("null")).unwrap()
    }

    fn diff_of(line: &str) -> serde_json::Value {
        serde_json::from_str(line.split_once(" diff ").map(|(_, s)| s).unwrap_or("null")).unwrap()
    }

    #[tokio::test]
    async fn broadcast_reaches_other_members_and_self_only_when_asked() {
        let hub = hub(Limits::default());
        let (mut a, mut arx) = session(&hub, 2);
        let (mut b, mut brx) = session(&hub, 2);
        let (mut c, mut crx) = session(&hub, 1);
        a.join(req("room")).await.unwrap();
        b.join(JoinRequest { broadcast_self: true, ..req("room") }).await.unwrap();
        c.join(req("other")).await.unwrap();
        a.broadcast("room", json_msg("cursor", r#"{"x":1}"#)).unwrap();
        assert!(drain(&mut arx).is_empty(), "no echo without self");
        assert_eq!(drain(&mut brx), [r#"room broadcast cursor {"x":1}"#]);
        assert!(drain(&mut crx).is_empty(), "other topics see nothing");
        b.broadcast("room", json_msg("typing", "true")).unwrap();
        assert_eq!(drain(&mut arx), ["room broadcast typing true"]);
        assert_eq!(drain(&mut brx), ["room broadcast typing true"], "self: true echoes");
        assert_eq!(
            c.broadcast("room", json_msg("x", "1")),
            Err(BroadcastError::NotJoined("room".into())),
            "only members may send"
        );
        // A private channel of the same name is another channel.
        c.join(JoinRequest { private: true, ..req("room") }).await.unwrap();
        a.broadcast("room", json_msg("x", "1")).unwrap();
        assert!(drain(&mut crx).is_empty());
    }

    #[tokio::test]
    async fn binary_broadcasts_skip_encodings_that_cannot_carry_them() {
        let hub = hub(Limits::default());
        let (mut a, _arx) = session(&hub, 2);
        let (mut v1, mut v1rx) = session(&hub, 1);
        let (mut v2, mut v2rx) = session(&hub, 2);
        for s in [&mut a, &mut v1, &mut v2] {
            s.join(req("room")).await.unwrap();
        }
        let bin = BroadcastMessage {
            event: "blob".into(),
            payload: BroadcastPayload::Binary(Bytes::from_static(&[0, 1, 2])),
            meta: None,
            logged: None,
        };
        a.broadcast("room", bin).unwrap();
        assert_eq!(drain(&mut v2rx), ["room broadcast blob [0, 1, 2]"]);
        assert!(drain(&mut v1rx).is_empty());
        assert_eq!(hub.metrics().value(crate::telemetry::BROADCASTS_UNDELIVERABLE), Some(1.0));
    }

    #[tokio::test]
    async fn payload_and_rate_limits() {
        let limits = Limits {
            max_broadcast_payload_bytes: 8,
            max_events_per_second: 3,
            max_joins_per_second: 4,
            max_channels: 3,
            ..Limits::default()
        };
        let hub = hub(limits);
        let (mut a, _arx) = session(&hub, 2);
        let (mut b, mut brx) = session(&hub, 2);
        a.join(req("room")).await.unwrap();
        b.join(req("room")).await.unwrap();
        assert_eq!(
            a.broadcast("room", json_msg("e", r#""123456789""#)),
            Err(BroadcastError::PayloadTooLarge { size: 11, limit: 8 })
        );
        assert!(drain(&mut brx).is_empty(), "nothing delivered over the limit");
        // The refused attempt counted towards the rate too.
        for _ in 0..2 {
            a.broadcast("room", json_msg("e", "1")).unwrap();
        }
        assert_eq!(a.broadcast("room", json_msg("e", "1")), Err(BroadcastError::RateLimited));
        assert_eq!(drain(&mut brx).len(), 2);
        // Three more joins fit the rate, but only three channels per session.
        a.join(req("r2")).await.unwrap();
        a.join(req("r3")).await.unwrap();
        assert_eq!(a.join(req("r4")).await.unwrap_err(), JoinError::TooManyChannels);
        assert_eq!(a.join(req("r5")).await.unwrap_err(), JoinError::TooManyJoins);
        // Rejoining a joined topic replaces it rather than counting twice.
        let (mut c, _crx) = session(&hub, 2);
        for _ in 0..4 {
            c.join(req("same")).await.unwrap();
        }
        assert_eq!(c.joined_topics().count(), 1);
    }

    #[tokio::test]
    async fn presence_state_diffs_and_cleanup() {
        let hub = hub(Limits { max_presence_events: 100, ..Limits::default() });
        let (mut a, mut arx) = session(&hub, 2);
        let (mut b, mut brx) = session(&hub, 1);
        a.join(JoinRequest { presence_enabled: true, presence_key: "alice".into(), ..req("room") })
            .await
            .unwrap();
        assert_eq!(drain(&mut arx), ["room state {}"], "the state follows a presence-enabled join");
        a.track("room", json!({"status": "online"})).unwrap();
        let lines = drain(&mut arx);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let d = diff_of(&lines[0]);
        assert_eq!(d["joins"]["alice"]["metas"][0]["status"], "online");
        let first_ref = d["joins"]["alice"]["metas"][0]["phx_ref"].clone();

        // A member without presence enabled at join gets the state on its first track.
        b.join(JoinRequest { presence_key: "bob".into(), ..req("room") }).await.unwrap();
        assert!(drain(&mut brx).is_empty());
        b.track("room", json!({})).unwrap();
        let lines = drain(&mut brx);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(state_of(&lines[0])["alice"]["metas"][0]["phx_ref"], first_ref);
        assert!(diff_of(&lines[1])["joins"]["bob"].is_object());
        assert_eq!(drain(&mut arx).len(), 1, "alice sees bob join");

        // Identical re-track: nothing. Changed: one diff with the leave and the join.
        a.track("room", json!({"status": "online"})).unwrap();
        assert!(drain(&mut brx).is_empty());
        a.track("room", json!({"status": "away"})).unwrap();
        let d = diff_of(&drain(&mut brx)[0]);
        assert_eq!(d["leaves"]["alice"]["metas"][0]["phx_ref"], first_ref);
        assert_eq!(d["joins"]["alice"]["metas"][0]["phx_ref_prev"], first_ref);
        assert_eq!(d["joins"]["alice"]["metas"][0]["status"], "away");

        // Several sessions under one key: several metas.
        let (mut a2, _a2rx) = session(&hub, 2);
        a2.join(JoinRequest { presence_key: "alice".into(), ..req("room") }).await.unwrap();
        a2.track("room", json!({"device": "phone"})).unwrap();
        drain(&mut brx);
        let state: serde_json::Value =
            serde_json::from_slice(&hub.presence_state(&TopicKey { topic: "room".into(), private: false }))
                .unwrap();
        assert_eq!(state["alice"]["metas"].as_array().map(Vec::len), Some(2));

        // Untrack, leave and session drop all produce the leave.
        a2.untrack("room").unwrap();
        assert!(diff_of(&drain(&mut brx)[0])["leaves"]["alice"].is_object());
        a.leave("room");
        assert!(diff_of(&drain(&mut brx)[0])["leaves"]["alice"].is_object());
        drop(a2);
        assert!(drain(&mut brx).is_empty(), "a2 had untracked already");
        let (mut watcher, mut wrx) = session(&hub, 2);
        watcher.join(req("room")).await.unwrap();
        drop(b);
        assert!(diff_of(&drain(&mut wrx)[0])["leaves"]["bob"].is_object());
        drop(watcher);
        drop(a);
        assert_eq!(hub.channel_count(), 0, "nothing left behind");
        assert_eq!(hub.metrics().value(crate::telemetry::CLIENTS), Some(0.0));
        assert_eq!(hub.metrics().value(crate::telemetry::CHANNELS), Some(0.0));
    }

    #[tokio::test]
    async fn presence_limits_and_bad_payloads() {
        let limits = Limits { max_presence_events: 2, max_presence_payload_bytes: 16, ..Limits::default() };
        let hub = hub(limits);
        let (mut a, _arx) = session(&hub, 2);
        a.join(req("room")).await.unwrap();
        assert_eq!(a.track("room", json!("not a map")), Err(PresenceError::NotAMap));
        assert_eq!(a.track("room", json!({"long": "xxxxxxxxxxxxxxxx"})), Err(PresenceError::PayloadTooLarge));
        assert_eq!(a.track("room", json!({})), Err(PresenceError::RateLimited));
        assert_eq!(a.track("nope", json!({})), Err(PresenceError::NotJoined("nope".into())));
    }

    #[tokio::test]
    async fn close_channel_tells_the_client_then_leaves() {
        let hub = hub(Limits::default());
        let (mut a, mut arx) = session(&hub, 2);
        a.join(JoinRequest { address: Some("7".into()), ..req("room") }).await.unwrap();
        a.close_channel("room", "system", "Too many messages per second");
        assert_eq!(drain(&mut arx), ["room system Too many messages per second", "room closed Some(\"7\")"]);
        assert!(!a.is_joined("room"));
        assert_eq!(hub.channel_count(), 0);
    }

    #[tokio::test]
    async fn a_full_outbox_disconnects_that_client_only() {
        let hub = hub(Limits { client_queue: 2, ..Limits::default() });
        let (mut a, _arx) = session(&hub, 2);
        let (mut slow, slow_rx) = session(&hub, 2);
        let (mut fast, mut fast_rx) = session(&hub, 2);
        for s in [&mut a, &mut slow, &mut fast] {
            s.join(req("room")).await.unwrap();
        }
        for i in 0..3 {
            a.broadcast("room", json_msg("n", &i.to_string())).unwrap();
            assert_eq!(drain(&mut fast_rx).len(), 1);
        }
        assert!(slow_rx.killed.is_cancelled());
        assert!(!fast_rx.killed.is_cancelled());
        assert_eq!(hub.metrics().value(crate::telemetry::SLOW_DISCONNECTS), Some(1.0));
        drop(slow);
    }

    fn member(hub: &Hub, topic: &str, reads: u8, replay: bool) -> (Arc<Member>, OutboxReceiver) {
        member_with(hub, topic, |m| {
            m.reads = reads.into();
            m.replay = replay.then(|| std::sync::Mutex::new(ReplayGate::Holding(Vec::new())));
        })
    }

    /// A broadcast reader of `topic`, as `tweak` makes it.
    fn member_with(hub: &Hub, topic: &str, tweak: impl FnOnce(&mut Member)) -> (Arc<Member>, OutboxReceiver) {
        let (outbox, rx) = Outbox::new(64, metrics::Histogram::noop());
        let mut m = Member {
            id: hub.next_id(),
            session: hub.next_id(),
            key: TopicKey { topic: topic.into(), private: false },
            address: None,
            outbox,
            encoder: Arc::new(Lines(2)),
            echo_own: false,
            subject: std::sync::RwLock::new(None),
            reads: crate::realtime::member::READS_BROADCAST.into(),
            replay: None,
            resume: None,
            seen: Default::default(),
            change_envelope: Default::default(),
            told_withheld: Default::default(),
            live: None,
        };
        tweak(&mut m);
        let m = Arc::new(m);
        hub.add_member(Arc::clone(&m), true);
        (m, rx)
    }

    fn with_id(event: &str) -> BroadcastMessage {
        BroadcastMessage {
            event: event.into(),
            payload: BroadcastPayload::Json(Bytes::from_static(b"1")),
            meta: Some(Bytes::from(format!(r#"{{"id":"{event}"}}"#))),
            logged: None,
        }
    }

    #[tokio::test]
    async fn a_replay_comes_first_and_is_not_repeated_live() {
        let hub = hub(Limits::default());
        let (mut a, _arx) = session(&hub, 2);
        a.join(req("room")).await.unwrap();
        let (m, mut rx) = member(&hub, "room", crate::realtime::member::READS_BROADCAST, true);
        // Live broadcasts while the replay loads are held.
        a.broadcast("room", with_id("m2")).unwrap();
        a.broadcast("room", with_id("m3")).unwrap();
        assert!(drain(&mut rx).is_empty());
        let replayed: Vec<_> = ["m1", "m2"]
            .iter()
            .map(|id| crate::auth::topics::Replayed { id: (*id).into(), message: Arc::new(with_id(id)) })
            .collect();
        hub.release_replay(&m, &replayed);
        assert_eq!(drain(&mut rx), ["room broadcast m1 1", "room broadcast m2 1", "room broadcast m3 1"]);
        // A replayed id arriving late from the stream is skipped; others flow.
        a.broadcast("room", with_id("m1")).unwrap();
        a.broadcast("room", with_id("m4")).unwrap();
        assert_eq!(drain(&mut rx), ["room broadcast m4 1"]);
    }

    /// A database broadcast at `lsn` (its place in the log), else a client's.
    fn logged(event: &str, lsn: Option<u64>) -> BroadcastMessage {
        let position = lsn.map(|l| Position { lsn: crate::replication::lsn::Lsn(l), seq: 0 });
        BroadcastMessage {
            logged: position
                .map(|position| crate::change::broadcast::Logged { position, cursor: "c".into() }),
            ..json_msg(event, "1")
        }
    }

    #[tokio::test]
    async fn a_resume_gate_skips_the_database_broadcasts_replayed_and_keeps_the_rest_in_order() {
        let hub = hub(Limits::default());
        let (mut a, _arx) = session(&hub, 2);
        a.join(req("room")).await.unwrap();
        let gated = |m: &mut Member| m.resume = Some(crate::realtime::gate::holding_gate());
        let (resuming, mut rx) = member_with(&hub, "room", gated);
        let (snapshotting, mut snap_rx) = member_with(&hub, "room", gated);
        // Held while the replay runs: those at or before `through` (10) are in the replay.
        for (event, lsn) in [("r5", Some(5)), ("live", None), ("r10", Some(10)), ("r15", Some(15))] {
            a.broadcast("room", logged(event, lsn)).unwrap();
        }
        assert!(drain(&mut rx).is_empty() && drain(&mut snap_rx).is_empty(), "held");
        let through = Position { lsn: crate::replication::lsn::Lsn(10), seq: 0 };
        resuming.release(through, hub.metrics()).await;
        assert_eq!(drain(&mut rx), ["room broadcast live 1", "room broadcast r15 1"]);
        // A snapshot has no broadcasts: every one held is sent.
        let shown = Arc::new(crate::realtime::gate::XidSnapshot::parse("1:1:", through.lsn).unwrap());
        snapshotting.release_after_snapshot(through, shown, hub.metrics()).await;
        assert_eq!(drain(&mut snap_rx).len(), 4);
        // Live: one at or before `through` arriving late is skipped.
        a.broadcast("room", logged("late", Some(9))).unwrap();
        a.broadcast("room", logged("r20", Some(20))).unwrap();
        assert_eq!(drain(&mut rx), ["room broadcast r20 1"]);
        assert_eq!(drain(&mut snap_rx).len(), 2);
    }

    #[tokio::test]
    async fn members_receive_only_what_they_may_read() {
        let hub = hub(Limits { max_presence_events: 100, ..Limits::default() });
        let (mut a, _arx) = session(&hub, 2);
        a.join(req("room")).await.unwrap();
        let (_none, mut none_rx) = member(&hub, "room", 0, false);
        let (_presence, mut presence_rx) =
            member(&hub, "room", crate::realtime::member::READS_PRESENCE, false);
        let (_broadcast, mut broadcast_rx) =
            member(&hub, "room", crate::realtime::member::READS_BROADCAST, false);
        a.broadcast("room", json_msg("e", "1")).unwrap();
        a.track("room", json!({"k": 1})).unwrap();
        assert!(drain(&mut none_rx).is_empty());
        let p = drain(&mut presence_rx);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("room state") && p[1].starts_with("room diff"), "{p:?}");
        assert_eq!(drain(&mut broadcast_rx), ["room broadcast e 1"]);
    }

    #[test]
    fn windows() {
        let mut w = Window::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(w.allow(t0) && w.allow(t0) && !w.allow(t0));
        assert!(w.allow(t0 + Duration::from_secs(1)));
        assert!(!Window::new(0, Duration::from_secs(1)).allow(t0));
    }
}
