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

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::auth::Credentials;
use crate::change::broadcast::{BroadcastMessage, BroadcastPayload};
use crate::realtime::outbox::{Direct, Encoder, EncodingId, Event, Frame, Named, OutboxReceiver};
use crate::realtime::session::{JoinError, JoinRequest, Session};
use crate::realtime::Hub;
use crate::replication::values::write_json_str;

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
    prepared(name.into(), args, None)
}

/// An event's arguments as socketioxide takes them: the binary attachment first when there is
/// one, then the JSON ones, each checked once here and then copied as they are into every
/// socket's packet.
#[derive(Debug)]
pub struct Args {
    pub binary: Option<Bytes>,
    pub json: Vec<Box<serde_json::value::RawValue>>,
}

impl serde::Serialize for Args {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tuple = serializer.serialize_tuple(usize::from(self.binary.is_some()) + self.json.len())?;
        if let Some(b) = &self.binary {
            tuple.serialize_element(b)?;
        }
        for arg in &self.json {
            tuple.serialize_element(arg)?;
        }
        tuple.end()
    }
}

/// A named frame whose data is `args` (a JSON array), with its [`Args`] prepared.
fn prepared(name: std::borrow::Cow<'static, str>, args: Vec<u8>, binary: Option<Bytes>) -> Frame {
    let data = String::from_utf8(args).unwrap_or_default();
    let json: Vec<Box<serde_json::value::RawValue>> = serde_json::from_str(&data).unwrap_or_default();
    let prepared: Arc<dyn std::any::Any + Send + Sync> = Arc::new(Args { binary, json });
    Frame::Named(Arc::new(Named { id: None, name, data: data.into(), prepared: Some(prepared) }))
}

/// A message of `name` with one argument: `{<target>, …fields}`.
fn direct(name: &'static str, topic: &str, fields: Value) -> Frame {
    let data = fields.to_string();
    named(name, spliced(topic, None, data.as_bytes()))
}

/// The encoder of Socket.IO sessions: [`Frame::Named`] messages, the name the event's and the
/// data its arguments as a JSON array (a binary payload as the attachment, the first argument).
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketIoEncoder;

impl Encoder for SocketIoEncoder {
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
    prepared(name, args, attachment)
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

/// One Socket.IO client's session.
pub struct SocketIoConnection {
    session: Session,
}

impl SocketIoConnection {
    /// A connection whose client connected with `credentials` (none: authentication is off).
    pub fn new(hub: Hub, credentials: Option<Credentials>) -> (SocketIoConnection, OutboxReceiver) {
        let (session, rx) = Session::new(hub, Arc::new(SocketIoEncoder), credentials);
        (SocketIoConnection { session }, rx)
    }

    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// When the transport must call [`SocketIoConnection::on_deadline`]: a channel's token or
    /// the connection's expires.
    pub fn next_deadline(&self) -> Option<std::time::Instant> {
        let connect =
            self.session.connect_credentials().map(|c| std::time::Instant::now() + c.claims.time_left());
        match (self.session.next_expiry(), connect) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Closes the channels whose token expired; `Some(reason)` when the connection's own token
    /// has: the transport disconnects after telling the client why.
    pub fn on_deadline(&mut self) -> Option<String> {
        self.session.expire(std::time::Instant::now());
        let claims = &self.session.connect_credentials()?.claims;
        if !claims.time_left().is_zero() {
            return None;
        }
        self.session.hub().metrics().auth_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
                self.session.hub().metrics().auth_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(f: &Frame) -> (String, Value, Option<Bytes>) {
        let Frame::Named(m) = f else { panic!("a named frame") };
        let args = m.prepared.as_ref().and_then(|p| p.downcast_ref::<Args>()).expect("prepared arguments");
        let data: Value = serde_json::from_str(m.data.as_str()).expect("json");
        let prepared: Vec<Value> =
            args.json.iter().map(|a| serde_json::from_str(a.get()).expect("json")).collect();
        assert_eq!(Value::Array(prepared), data, "the prepared arguments are the data's");
        (m.name.to_string(), data, args.binary.clone())
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
