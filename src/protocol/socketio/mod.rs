//! Socket.IO events on the core: what a client's events (`subscribe`, `unsubscribe`, `join`,
//! `leave`, `broadcast`, `track`, `untrack`, `token`) do to its session, the acknowledgement each
//! gets (`{"ok":true,…}` or `{"ok":false,"error":…}`), and the events the session's messages
//! become (`change`, `snapshot`, `snapshot-end`, `live`, `gap`, `error`, `unsubscribed`,
//! `presence`, and broadcasts under their own name).
//!
//! A subscription is a join of the topic `socketio:<id>`, `id` a stable hash of what it asks for,
//! so every socket with the same subscription shares its frames. A room `name` is the topic
//! `realtime:name`, shared with Phoenix and `/v1/ws` clients. Owns: this mapping, the event
//! names and the messages. Must not: touch sockets (the transport in `server/socketio.rs` does),
//! or hold channel state (that is the session's).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::change::broadcast::{BroadcastMessage, BroadcastPayload};
use crate::protocol::{Closing, Connection};
use crate::realtime::outbox::{Direct, Encoder, EncodingId, Event, Frame, OutboxReceiver};
use crate::realtime::session::{JoinError, JoinRequest, Session};
use crate::realtime::Hub;
use crate::replication::values::write_json_str;

pub mod packet;

use packet::{EnginePacket, Kind};

/// The topic prefix of subscriptions.
const SUBSCRIPTION: &str = "socketio:";
/// The topic prefix of rooms (shared with Phoenix clients).
const ROOM: &str = "realtime:";

/// Event names a server may not send: the client library's own (Socket.IO's reserved names),
/// and this protocol's. A broadcast with one of them arrives as `broadcast`, its name inside.
const RESERVED: [&str; 16] = [
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
    "change",
    "snapshot",
    "snapshot-end",
    "live",
    "gap",
    "error",
    "info",
    "unsubscribed",
    "presence",
    "broadcast",
];

/// Names a client's broadcast may not have: those its receivers' libraries keep for themselves.
const CLIENT_RESERVED: [&str; 6] =
    ["connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"];

/// `"id":<n>` for a subscription's topic, `"room":"<name>"` for a room's.
fn write_target(out: &mut Vec<u8>, topic: &str) {
    match topic.strip_prefix(SUBSCRIPTION) {
        Some(id) => {
            out.extend_from_slice(b"\"id\":");
            out.extend_from_slice(id.as_bytes());
        }
        None => {
            out.extend_from_slice(b"\"room\":");
            write_json_str(out, topic.strip_prefix(ROOM).unwrap_or(topic));
        }
    }
}

/// `[{<target>,"cursor":…,<the fields of data>}]`: one argument, `data` (a JSON object) with the
/// target and cursor in front.
fn spliced(topic: &str, cursor: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 48);
    out.extend_from_slice(b"[{");
    write_target(&mut out, topic);
    if let Some(c) = cursor {
        out.extend_from_slice(b",\"cursor\":");
        write_json_str(&mut out, c);
    }
    let fields = data.strip_prefix(b"{").unwrap_or(b"}");
    if fields.first().is_some_and(|b| *b != b'}') {
        out.push(b',');
    }
    out.extend_from_slice(fields);
    out.push(b']');
    out
}

fn named(name: &'static str, args: Vec<u8>) -> Frame {
    frame(name, &args, None)
}

/// The packet of event `name` whose arguments are `args` (a JSON array), shared by every socket
/// that receives it; with a binary payload, that is the first argument (an attachment).
fn frame(name: &str, args: &[u8], binary: Option<Bytes>) -> Frame {
    let inner = args.strip_prefix(b"[").and_then(|a| a.strip_suffix(b"]")).unwrap_or(args);
    match binary {
        None => Frame::Text(packet::event(name, inner).into()),
        Some(binary) => Frame::Attached { text: packet::binary_event(name, inner).into(), binary },
    }
}

/// A message of `name` with one argument: `{<target>, …fields}`.
fn direct(name: &'static str, topic: &str, fields: Value) -> Frame {
    let data = fields.to_string();
    named(name, spliced(topic, None, data.as_bytes()))
}

/// The encoder of Socket.IO sessions: each message one event packet for the namespace `/`
/// (`42["change",{…}]`), with a binary payload as its attachment ([`Frame::Attached`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketIoEncoder;

impl Encoder for SocketIoEncoder {
    fn protocol(&self) -> &'static str {
        "socketio"
    }

    fn id(&self) -> EncodingId {
        crate::protocol::encoding::SOCKETIO
    }

    fn encode(&self, topic: &str, event: &Event<'_>) -> Option<Frame> {
        Some(match event {
            Event::Change { data, cursor, snapshot, .. } => {
                let name = if *snapshot { "snapshot" } else { "change" };
                named(name, spliced(topic, *cursor, data.as_bytes()))
            }
            Event::Live { data, cursor, .. } => named("live", spliced(topic, *cursor, data.as_bytes())),
            Event::PresenceDiff(d) => {
                // `{"joins":…,"leaves":…}` with `"type":"diff"` in front of its fields.
                let mut fields = b"{\"type\":\"diff\",".to_vec();
                fields.extend_from_slice(d.strip_prefix(b"{").unwrap_or(b"}"));
                named("presence", spliced(topic, None, &fields))
            }
            Event::Broadcast(m) => broadcast_frame(topic, m),
        })
    }

    fn encode_direct(&self, topic: &str, _address: Option<&str>, message: &Direct<'_>) -> Frame {
        match message {
            Direct::PresenceState(state) => {
                let mut fields = b"{\"type\":\"sync\",\"state\":".to_vec();
                fields.extend_from_slice(state);
                fields.push(b'}');
                named("presence", spliced(topic, None, &fields))
            }
            Direct::System { status: "error", message, .. } => {
                direct("error", topic, json!({"message": message}))
            }
            Direct::System { extension, status, message } => {
                direct("info", topic, json!({"extension": extension, "status": status, "message": message}))
            }
            Direct::Closed => direct("unsubscribed", topic, json!({"reason": "closed by the server"})),
            Direct::Gap { code, message } => direct("gap", topic, json!({"code": code, "message": message})),
            Direct::SnapshotEnd { cursor, rows, .. } => {
                direct("snapshot-end", topic, json!({"cursor": cursor, "rows": rows}))
            }
        }
    }

    fn carries_live(&self) -> bool {
        true
    }
}

/// A broadcast as the event it names: arguments `[payload, {"room":…,"meta"?:…}]` (a binary
/// payload as the attachment). A name the receiver's library or this protocol keeps arrives as
/// `broadcast` with `{"room","event","payload"}`.
fn broadcast_frame(topic: &str, m: &BroadcastMessage) -> Frame {
    let room = topic.strip_prefix(ROOM).unwrap_or(topic);
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(b"{\"room\":");
    write_json_str(&mut info, room);
    if let Some(meta) = &m.meta {
        info.extend_from_slice(b",\"meta\":");
        info.extend_from_slice(meta);
    }
    let reserved = RESERVED.contains(&m.event.as_str()) || m.event.is_empty();
    let (name, attachment, mut args): (std::borrow::Cow<'static, str>, _, Vec<u8>) =
        match (&m.payload, reserved) {
            (BroadcastPayload::Json(p), false) => {
                let mut args = Vec::with_capacity(p.len() + info.len() + 4);
                args.push(b'[');
                args.extend_from_slice(p);
                args.push(b',');
                (m.event.clone().into(), None, args)
            }
            (BroadcastPayload::Binary(b), false) => (m.event.clone().into(), Some(b.clone()), b"[".to_vec()),
            (payload, true) => {
                info.extend_from_slice(b",\"event\":");
                write_json_str(&mut info, &m.event);
                match payload {
                    BroadcastPayload::Json(p) => {
                        info.extend_from_slice(b",\"payload\":");
                        info.extend_from_slice(p);
                        ("broadcast".into(), None, b"[".to_vec())
                    }
                    BroadcastPayload::Binary(b) => ("broadcast".into(), Some(b.clone()), b"[".to_vec()),
                }
            }
        };
    info.push(b'}');
    args.extend_from_slice(&info);
    args.push(b']');
    frame(&name, &args, attachment)
}

/// One client event, as the transport read it.
#[derive(Debug)]
pub struct Incoming {
    pub event: String,
    /// The event's first argument (`null` when it has none).
    pub data: Value,
    /// The first binary attachment, when the event carried one (a broadcast's binary payload).
    pub binary: Option<Bytes>,
}

/// Reads a client event: its JSON `["name", data, …]` and its binary attachments; a `payload`
/// in `data` that is an attachment's placeholder (`{"_placeholder":true,"num":n}`) is that
/// attachment. The error says what is wrong, for the acknowledgement.
pub fn parse_event(text: &str, attachments: &std::collections::VecDeque<Bytes>) -> Result<Incoming, String> {
    let mut args: Vec<Value> = serde_json::from_str(text).map_err(|e| format!("invalid event JSON: {e}"))?;
    if args.is_empty() {
        return Err("an event needs a name".into());
    }
    let data = if args.len() > 1 { args.swap_remove(1) } else { Value::Null };
    let Some(event) = args.first().and_then(Value::as_str).map(str::to_owned) else {
        return Err("an event's name is a string".into());
    };
    let placeholder = data.get("payload").filter(|p| p.get("_placeholder") == Some(&Value::Bool(true)));
    let binary = match placeholder.map(|p| p.get("num").and_then(Value::as_u64)) {
        None => None,
        Some(n) => {
            let found = n.and_then(|n| usize::try_from(n).ok()).and_then(|n| attachments.get(n));
            Some(found.cloned().ok_or("a binary payload's attachment is missing")?)
        }
    };
    Ok(Incoming { event, data, binary })
}

/// An event's acknowledgement: `{"ok": true, …fields}`.
fn ok(mut fields: Value) -> Value {
    if let Value::Object(map) = &mut fields {
        map.insert("ok".into(), Value::Bool(true));
    }
    fields
}

/// An event's acknowledgement: `{"ok": false, "error": …}`.
fn refused(error: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": error.to_string()})
}

/// A subscription's id: the same request always gives the same id (FNV-1a over its fields),
/// within 2^53 so every client reads it as an exact number.
fn subscription_id(fields: &[Option<&str>]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in fields {
        for byte in f.unwrap_or("\u{1}").bytes().chain([0xff]) {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h & ((1 << 53) - 1)
}

/// A string field, or (for lists) an array of strings joined with commas.
fn list(v: Option<&Value>) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().ok_or(()))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| Some(v.join(",")))
            .map_err(|_| "events and select are strings or arrays of strings".to_owned()),
        Some(_) => Err("events and select are strings or arrays of strings".to_owned()),
    }
}

/// How often the server pings, and how long a pong may take before the connection is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Heartbeat {
    /// Engine.IO's defaults (25 s, 20 s), shortened to fit within `idle`: a client that answers
    /// every ping is never idle.
    pub fn within(idle: Duration) -> Heartbeat {
        let third = idle / 3;
        Heartbeat {
            interval: third.min(Duration::from_secs(25)),
            timeout: third.min(Duration::from_secs(20)),
        }
    }
}

/// A binary event (or acknowledgement) whose attachments are still to come.
struct Awaiting {
    ack: Option<u64>,
    data: String,
    want: usize,
    got: VecDeque<Bytes>,
    /// An acknowledgement's (the server asks for none): read, then dropped.
    discard: bool,
}

/// One Socket.IO client's connection: its Engine.IO packets (heartbeat, close) and its
/// namespace `/` (connect with a token, events, acknowledgements), over either transport.
pub struct SocketIoConnection {
    session: Session,
    /// The token of the request that opened the connection, for a connect that brings none.
    request_token: Option<String>,
    /// The socket's id, once it has connected.
    sid: Option<Box<str>>,
    awaiting: Option<Awaiting>,
    heartbeat: Heartbeat,
    ping_at: Instant,
    /// Set while a ping waits for its pong.
    pong_by: Option<Instant>,
    due: Vec<Frame>,
    closing: Option<Closing>,
}

impl SocketIoConnection {
    /// A connection opened by a request whose token (if any) is `request_token`.
    pub fn new(
        hub: Hub,
        request_token: Option<String>,
        heartbeat: Heartbeat,
    ) -> (SocketIoConnection, OutboxReceiver) {
        let (session, rx) = Session::new(hub, Arc::new(SocketIoEncoder), None);
        let conn = SocketIoConnection {
            session,
            request_token,
            sid: None,
            awaiting: None,
            heartbeat,
            ping_at: Instant::now() + heartbeat.interval,
            pong_by: None,
            due: Vec::new(),
            closing: None,
        };
        (conn, rx)
    }

    /// The Engine.IO open packet for session `sid`: `upgrade` when a long-polling client may
    /// move to a WebSocket.
    pub fn open(&self, sid: &str, upgrade: bool, max_payload: usize) -> String {
        let upgrades: &[&str] = if upgrade { &["websocket"] } else { &[] };
        let open = json!({
            "sid": sid,
            "upgrades": upgrades,
            "pingInterval": self.heartbeat.interval.as_millis() as u64,
            "pingTimeout": self.heartbeat.timeout.as_millis() as u64,
            "maxPayload": max_payload,
        });
        format!("0{open}")
    }

    /// A malformed packet: the client is told why, and the connection closes.
    fn malformed(&mut self, why: impl std::fmt::Display) -> Vec<Frame> {
        self.session.hub().metrics().telemetry.refused("malformed");
        let frame =
            named("error", json!([{"message": format!("malformed packet: {why}")}]).to_string().into_bytes());
        self.closing = Some(Closing { frame: Some(frame), code: 1002, reason: "malformed Socket.IO packet" });
        Vec::new()
    }

    /// A Socket.IO packet, read.
    async fn message(&mut self, text: &str) -> Vec<Frame> {
        let p = match packet::socket(text) {
            Ok(p) => p,
            Err(e) => return self.malformed(e),
        };
        if p.namespace != "/" {
            // Only `/` is served; a packet for another namespace is not this connection's.
            return match p.kind {
                Kind::Connect => {
                    vec![Frame::Text(packet::connect_error(p.namespace, "Invalid namespace").into())]
                }
                _ => Vec::new(),
            };
        }
        match p.kind {
            Kind::Connect => self.connect(p.data).await,
            Kind::Disconnect => {
                self.closing =
                    Some(Closing { frame: None, code: 1000, reason: "disconnected by the client" });
                Vec::new()
            }
            Kind::Event => self.event(p.ack, p.data, &VecDeque::new()).await,
            Kind::BinaryEvent | Kind::BinaryAck if p.attachments > 0 => {
                let discard = p.kind == Kind::BinaryAck;
                let want = p.attachments;
                self.awaiting = Some(Awaiting {
                    ack: p.ack,
                    data: p.data.to_owned(),
                    want,
                    got: VecDeque::new(),
                    discard,
                });
                Vec::new()
            }
            Kind::BinaryEvent => self.event(p.ack, p.data, &VecDeque::new()).await,
            Kind::Ack | Kind::BinaryAck => Vec::new(),
            Kind::ConnectError => self.malformed("a client does not send connect errors"),
        }
    }

    /// A connect to `/`: its token verified (the connect's `auth` payload, else the request's).
    async fn connect(&mut self, data: &str) -> Vec<Frame> {
        let auth: Option<Value> = match data {
            "" => None,
            d => match serde_json::from_str(d) {
                Ok(v) => Some(v),
                Err(_) => {
                    return vec![Frame::Text(packet::connect_error("/", "invalid connect payload").into())]
                }
            },
        };
        let given = auth.as_ref().and_then(|a| {
            ["token", "access_token", "apikey"].iter().find_map(|k| a.get(*k).and_then(Value::as_str))
        });
        let token = given.map(str::to_owned).or_else(|| self.request_token.clone());
        let verifier = self.session.hub().verifier();
        if verifier.required() {
            let verified = match token.as_deref() {
                None => Err(crate::auth::AuthError::Missing),
                Some(t) => verifier.verify(t).await,
            };
            match verified {
                Ok(c) => self.session.set_connect(c),
                Err(e) => {
                    tracing::debug!(error = %e, "socket.io connection refused");
                    self.session.hub().metrics().token_refused();
                    return vec![Frame::Text(packet::connect_error("/", &e.connect_message()).into())];
                }
            }
        }
        if self.sid.is_none() {
            let Some(id) = packet::random_id() else {
                return vec![Frame::Text(
                    packet::connect_error("/", "no id could be made: try again").into(),
                )];
            };
            self.sid = Some(id.into());
        }
        vec![Frame::Text(packet::connected(self.sid.as_deref().unwrap_or_default()).into())]
    }

    /// An event, handled; its acknowledgement when it asked for one, else an `error` event
    /// when it was refused (a refusal is never silent).
    async fn event(&mut self, ack: Option<u64>, data: &str, attachments: &VecDeque<Bytes>) -> Vec<Frame> {
        let answer = if self.sid.is_none() {
            refused("not connected: connect to the namespace first")
        } else {
            match parse_event(data, attachments) {
                Ok(incoming) => Box::pin(self.handle(incoming)).await,
                Err(why) => refused(why),
            }
        };
        match ack {
            Some(id) => vec![Frame::Text(packet::ack(id, &answer).into())],
            None if answer["ok"] == false => {
                vec![named("error", json!([{"message": answer["error"]}]).to_string().into_bytes())]
            }
            None => Vec::new(),
        }
    }

    /// The connection's own token, expired: why, for the client.
    fn connection_expired(&mut self) -> Option<String> {
        let claims = &self.session.connect_credentials()?.claims;
        if !claims.time_left().is_zero() {
            return None;
        }
        self.session.hub().metrics().token_refused();
        let ago = crate::auth::unix_now().saturating_sub(claims.exp).max(0);
        Some(crate::auth::AuthError::Expired(ago).to_string())
    }

    /// Handles one client event; returns its acknowledgement.
    pub async fn handle(&mut self, incoming: Incoming) -> Value {
        let Incoming { event, data, binary } = incoming;
        let text = |k: &str| data.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        match event.as_str() {
            "subscribe" => self.subscribe(&data).await,
            "unsubscribe" => {
                let id = data.get("id").and_then(Value::as_u64);
                match id {
                    Some(id) if self.session.leave(&format!("{SUBSCRIPTION}{id}")) => ok(json!({"id": id})),
                    Some(_) => refused("not subscribed"),
                    None => refused("unsubscribe needs the \"id\" subscribe answered"),
                }
            }
            "join" => match text("room") {
                Some(room) => self.join(room, &data).await,
                None => refused("join needs a \"room\""),
            },
            "leave" => match text("room") {
                Some(room) if self.session.leave(&format!("{ROOM}{room}")) => ok(json!({"room": room})),
                Some(_) => refused("not in that room"),
                None => refused("leave needs a \"room\""),
            },
            "broadcast" => self.broadcast(&data, binary),
            "track" => match text("room") {
                Some(room) => {
                    let state = data.get("state").cloned().unwrap_or_else(|| json!({}));
                    match self.session.track(&format!("{ROOM}{room}"), state) {
                        Ok(()) => ok(json!({"room": room})),
                        Err(e) => refused(e),
                    }
                }
                None => refused("track needs a \"room\""),
            },
            "untrack" => match text("room") {
                Some(room) => match self.session.untrack(&format!("{ROOM}{room}")) {
                    Ok(()) => ok(json!({"room": room})),
                    Err(e) => refused(e),
                },
                None => refused("untrack needs a \"room\""),
            },
            "token" => self.token(text("token")).await,
            other => refused(format!("unknown event {other:?}")),
        }
    }

    async fn subscribe(&mut self, data: &Value) -> Value {
        let text = |k: &str| data.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let Some(table) = text("table") else { return refused("subscribe needs a \"table\"") };
        let schema = text("schema").unwrap_or_else(|| "public".to_owned());
        let (events, select) = match (list(data.get("events")), list(data.get("select"))) {
            (Ok(e), Ok(s)) => (e, s),
            (Err(e), _) | (_, Err(e)) => return refused(e),
        };
        let filter = text("filter");
        let live = data.get("live").cloned().unwrap_or(Value::Null);
        let (limit, order) = (data.get("limit").cloned(), data.get("order").cloned());
        let (limit_text, order_text) =
            (limit.as_ref().map(Value::to_string), order.as_ref().map(Value::to_string));
        let shape = [
            Some(schema.as_str()),
            Some(table.as_str()),
            events.as_deref(),
            filter.as_deref(),
            select.as_deref(),
            Some(&*live.to_string()),
            limit_text.as_deref(),
            order_text.as_deref(),
        ];
        let id = subscription_id(&shape);
        let topic = format!("{SUBSCRIPTION}{id}");
        if self.session.is_joined(&topic) {
            return refused(format!("already subscribed with these parameters (id {id})"));
        }
        let mut bindings = match crate::subscribe::table_bindings(
            &schema,
            &table,
            filter.as_deref(),
            events.as_deref(),
            select.as_deref(),
        ) {
            Ok(b) => b,
            Err(e) => return refused(e),
        };
        if let Err(why) =
            crate::subscribe::live_fields(&mut bindings, Some(&live), limit.as_ref(), order.as_ref())
        {
            return refused(why);
        }
        let req = JoinRequest {
            topic: topic.clone(),
            bindings,
            since: text("since"),
            snapshot: data.get("snapshot").and_then(Value::as_bool).unwrap_or(false),
            ..JoinRequest::default()
        };
        let joined = match self.session.join(req).await {
            Ok(j) => j,
            Err(e) => return refused(e),
        };
        if let Some(Err(errors)) = &joined.changes {
            let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            self.session.leave(&topic);
            return refused(message);
        }
        let cursor = self.session.hub().log().map(|log| log.cursor(joined.matched).to_string());
        let mut answer = json!({"id": id, "cursor": cursor});
        if !joined.notices.is_empty() {
            answer["notices"] = json!(joined.notices);
        }
        if let Some(handoff) = joined.handoff {
            handoff.start();
        }
        ok(answer)
    }

    async fn join(&mut self, room: &str, data: &Value) -> Value {
        let topic = format!("{ROOM}{room}");
        if self.session.is_joined(&topic) {
            return refused("already in that room: leave it first");
        }
        let flag = |k: &str| data.get(k).and_then(Value::as_bool);
        let req = JoinRequest {
            topic,
            private: flag("private").unwrap_or(false),
            broadcast_self: flag("self").unwrap_or(false),
            presence_enabled: true,
            presence_key: data.get("key").and_then(Value::as_str).unwrap_or_default().to_owned(),
            ..JoinRequest::default()
        };
        match self.session.join(req).await {
            Ok(_) => ok(json!({"room": room})),
            Err(e @ JoinError::Auth(_)) => refused(format!("unauthorized: {e}")),
            Err(e) => refused(e),
        }
    }

    fn broadcast(&mut self, data: &Value, binary: Option<Bytes>) -> Value {
        let text = |k: &str| data.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        let (Some(room), Some(event)) = (text("room"), text("event")) else {
            return refused("broadcast needs a \"room\" and an \"event\"");
        };
        if CLIENT_RESERVED.contains(&event) {
            return refused(format!("{event:?} is a reserved Socket.IO event name"));
        }
        let payload = match binary {
            Some(b) => BroadcastPayload::Binary(b),
            None => {
                let p = data.get("payload").unwrap_or(&Value::Null);
                BroadcastPayload::Json(Bytes::from(serde_json::to_vec(p).unwrap_or_default()))
            }
        };
        let message = BroadcastMessage { event: event.to_owned(), payload, meta: None, logged: None };
        match self.session.broadcast(&format!("{ROOM}{room}"), message) {
            Ok(()) => ok(json!({"room": room})),
            Err(e) => refused(e),
        }
    }

    /// A new token for the connection and every channel it holds (a channel whose token no
    /// longer verifies is closed).
    async fn token(&mut self, token: Option<&str>) -> Value {
        let Some(token) = token else { return refused("token needs a \"token\"") };
        let verifier = self.session.hub().verifier();
        if !verifier.required() {
            return ok(json!({}));
        }
        match verifier.verify(token).await {
            Ok(c) => self.session.set_connect(c),
            Err(e) => {
                self.session.hub().metrics().token_refused();
                return refused(e.connect_message());
            }
        }
        let topics: Vec<String> = self.session.joined_topics().map(str::to_owned).collect();
        for topic in topics {
            if let Err(e) = self.session.refresh_token(&topic, token).await {
                self.session.close_channel(&topic, "system", &e.to_string());
            }
        }
        ok(json!({}))
    }
}

impl Connection for SocketIoConnection {
    const PROTOCOL: &'static str = "socketio";

    fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    async fn text(&mut self, text: &str) -> Vec<Frame> {
        if self.awaiting.is_some() {
            return self.malformed("a text packet where a binary attachment was due");
        }
        match packet::engine(text) {
            Ok(EnginePacket::Message(m)) => self.message(m).await,
            Ok(EnginePacket::Ping(data)) => vec![Frame::Text(format!("3{data}").into())],
            Ok(EnginePacket::Pong(_)) => {
                self.pong_by = None;
                self.ping_at = Instant::now() + self.heartbeat.interval;
                Vec::new()
            }
            Ok(EnginePacket::Close) => {
                self.closing = Some(Closing { frame: None, code: 1000, reason: "closed by the client" });
                Vec::new()
            }
            Ok(EnginePacket::Open | EnginePacket::Upgrade | EnginePacket::Noop) => Vec::new(),
            Err(e) => self.malformed(e),
        }
    }

    async fn binary(&mut self, bytes: &Bytes) -> Vec<Frame> {
        let Some(awaiting) = self.awaiting.as_mut() else {
            return self.malformed("a binary message that no packet announced");
        };
        awaiting.got.push_back(bytes.clone());
        if awaiting.got.len() < awaiting.want {
            return Vec::new();
        }
        let Some(Awaiting { ack, data, got, discard, .. }) = self.awaiting.take() else { return Vec::new() };
        if discard {
            return Vec::new();
        }
        self.event(ack, &data, &got).await
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        let connect = self.session.connect_credentials().map(|c| Instant::now() + c.claims.time_left());
        let heartbeat = self.pong_by.unwrap_or(self.ping_at);
        [self.session.next_expiry(), connect].into_iter().flatten().chain([heartbeat]).min()
    }

    /// Channels whose token expired close; the connection's own token expired: an `error` event
    /// saying why and a disconnect (the client does not reconnect with it); a ping due; a pong
    /// overdue: the connection is dead.
    fn on_deadline(&mut self) -> Option<Closing> {
        let now = Instant::now();
        self.session.expire(now);
        if let Some(why) = self.connection_expired() {
            self.due.push(named("error", json!([{"message": why}]).to_string().into_bytes()));
            self.due.push(Frame::Text(packet::DISCONNECT.into()));
            self.closing = Some(Closing { frame: None, code: 1000, reason: "token expired" });
            return None;
        }
        match self.pong_by {
            Some(by) if now >= by => {
                return Some(Closing { frame: None, code: 1000, reason: "ping timeout" });
            }
            None if now >= self.ping_at => {
                self.due.push(Frame::Text(packet::PING.into()));
                self.pong_by = Some(now + self.heartbeat.timeout);
            }
            _ => {}
        }
        None
    }

    fn due(&mut self) -> Vec<Frame> {
        std::mem::take(&mut self.due)
    }

    fn take_closing(&mut self) -> Option<Closing> {
        self.closing.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event packet's name, its arguments (a binary one's placeholder left out) and
    /// attachment.
    fn parts(f: &Frame) -> (String, Value, Option<Bytes>) {
        let (text, binary, prefix) = match f {
            Frame::Text(t) => (t.as_str(), None, "42"),
            Frame::Attached { text, binary } => (text.as_str(), Some(binary.clone()), "451-"),
            other => panic!("an event packet: {other:?}"),
        };
        let json = text.strip_prefix(prefix).unwrap_or_else(|| panic!("{prefix}…: {text}"));
        let Value::Array(mut all) = serde_json::from_str(json).expect("json") else { panic!("{text}") };
        let name = all.remove(0).as_str().expect("a name").to_owned();
        if binary.is_some() {
            assert_eq!(all.remove(0), json!({"_placeholder": true, "num": 0}));
        }
        (name, Value::Array(all), binary)
    }

    #[test]
    fn events_carry_their_subscription_or_room() {
        let e = SocketIoEncoder;
        let change = Event::Change {
            ids: &[1],
            data: r#"{"type":"INSERT","record":{"id":1}}"#,
            cursor: Some("c1"),
            kind: crate::change::ChangeKind::Insert,
            snapshot: false,
        };
        assert_eq!(
            parts(&e.encode("socketio:42", &change).unwrap()),
            (
                "change".into(),
                json!([{"id": 42, "cursor": "c1", "type": "INSERT", "record": {"id": 1}}]),
                None
            )
        );
        let diff = Event::PresenceDiff(br#"{"joins":{},"leaves":{"k":{"metas":[]}}}"#);
        assert_eq!(
            parts(&e.encode("realtime:lobby", &diff).unwrap()).1,
            json!([{"room": "lobby", "type": "diff", "joins": {}, "leaves": {"k": {"metas": []}}}])
        );
        let state = e.encode_direct("realtime:lobby", None, &Direct::PresenceState(b"{}"));
        assert_eq!(parts(&state).1, json!([{"room": "lobby", "type": "sync", "state": {}}]));
        let end =
            e.encode_direct("socketio:7", None, &Direct::SnapshotEnd { cursor: None, rows: 3, more: None });
        assert_eq!(parts(&end), ("snapshot-end".into(), json!([{"id": 7, "cursor": null, "rows": 3}]), None));
        assert_eq!(spliced("socketio:1", None, b"{}"), br#"[{"id":1}]"#.to_vec());
    }

    #[test]
    fn broadcasts_keep_their_name_unless_it_is_reserved() {
        let m = |event: &str, payload| BroadcastMessage {
            event: event.into(),
            payload,
            meta: None,
            logged: None,
        };
        let json_payload = || BroadcastPayload::Json(Bytes::from_static(br#"{"x":1}"#));
        assert_eq!(
            parts(&broadcast_frame("realtime:r", &m("typing", json_payload()))),
            ("typing".into(), json!([{"x": 1}, {"room": "r"}]), None)
        );
        let bin = Bytes::from_static(b"\x00\xff");
        assert_eq!(
            parts(&broadcast_frame("realtime:r", &m("blob", BroadcastPayload::Binary(bin.clone())))),
            ("blob".into(), json!([{"room": "r"}]), Some(bin))
        );
        assert_eq!(
            parts(&broadcast_frame("realtime:r", &m("connect", json_payload()))),
            ("broadcast".into(), json!([{"room": "r", "event": "connect", "payload": {"x": 1}}]), None)
        );
    }

    #[test]
    fn events_parse_and_malformed_ones_say_why() {
        let none = std::collections::VecDeque::new();
        let e = parse_event(r#"["join",{"room":"r"}]"#, &none).unwrap();
        assert_eq!((e.event.as_str(), e.data, e.binary), ("join", json!({"room": "r"}), None));
        assert_eq!(parse_event(r#"["ping"]"#, &none).unwrap().data, Value::Null);
        let bins = std::collections::VecDeque::from([Bytes::from_static(b"\x01")]);
        let e = parse_event(r#"["broadcast",{"payload":{"_placeholder":true,"num":0}}]"#, &bins).unwrap();
        assert_eq!(e.binary, Some(Bytes::from_static(b"\x01")));
        for (bad, says) in [
            ("{", "invalid event JSON"),
            ("{}", "invalid event JSON"),
            ("[]", "needs a name"),
            ("[1, {}]", "is a string"),
            (r#"["b",{"payload":{"_placeholder":true,"num":3}}]"#, "attachment is missing"),
            (r#"["b",{"payload":{"_placeholder":true,"num":-1}}]"#, "attachment is missing"),
            (r#"["b",{"payload":{"_placeholder":true}}]"#, "attachment is missing"),
        ] {
            let err = parse_event(bad, &bins).err().unwrap_or_default();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn subscription_ids_are_stable_exact_numbers() {
        let a = subscription_id(&[Some("public"), Some("t"), None]);
        assert_eq!(a, subscription_id(&[Some("public"), Some("t"), None]));
        assert_ne!(a, subscription_id(&[Some("public"), Some("t"), Some("")]));
        assert!(a < 1 << 53);
    }
}
