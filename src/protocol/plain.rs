//! The plain JSON WebSocket protocol (`/v1/ws`): the pub-sub shape generic clients speak, one
//! JSON object per text frame, with a `type`.
//!
//! Client: `auth {token}`, `subscribe {channel, …}` (a broadcast channel, or
//! `table:<schema>.<table>` with `filter`, `events`, `select`, `since`, `snapshot`),
//! `unsubscribe {channel}`, `publish {channel, event, data}`, `track {channel, data}`,
//! `untrack {channel}`, `ping`. An `id` on a client message is echoed on its answer.
//! Server: `pong`, `authenticated`, `subscribed {channel, cursor}`, `unsubscribed`, `error
//! {message}`, `change {channel, cursor, data}` (the change JSON every transport shares; snapshot
//! rows carry `"snapshot": true` and no cursor), `snapshot-end {channel, cursor, rows}`, `gap
//! {channel, code, message}`, `message {channel, event, data, cursor}` (broadcasts; a binary
//! payload as `binary`, base64; a database broadcast has a cursor), `presence_state` / `presence_diff {channel, data}`.
//!
//! A broadcast channel `name` is the topic `realtime:name`, so these clients and Phoenix clients
//! share rooms. Owns: this mapping and its error messages. Must not: touch sockets or hold
//! channel state (that is the session's).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::auth::Credentials;
use crate::change::broadcast::{BroadcastMessage, BroadcastPayload};
use crate::realtime::outbox::{Direct, Encoder, EncodingId, Event, Frame, OutboxReceiver};
use crate::realtime::resume::Since;
use crate::realtime::session::{JoinError, JoinRequest, Session};
use crate::realtime::Hub;

/// The prefix of table channels.
const TABLE: &str = "table:";
/// The topic prefix of broadcast channels (shared with Phoenix clients).
const ROOM: &str = "realtime:";

/// The channel name a client knows a topic by.
fn channel_of(topic: &str) -> &str {
    topic.strip_prefix(ROOM).unwrap_or(topic)
}

fn topic_of(channel: &str) -> String {
    if channel.starts_with(TABLE) {
        channel.to_owned()
    } else {
        format!("{ROOM}{channel}")
    }
}

fn text(v: Vec<u8>) -> Frame {
    Frame::Text(String::from_utf8(v).unwrap_or_default().into())
}

/// Writes `{"type":<kind>,"channel":<channel>` (the caller closes the object).
fn open(out: &mut Vec<u8>, kind: &str, topic: &str) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"channel\":");
    crate::replication::values::write_json_str(out, channel_of(topic));
}

/// A message of `kind` with the change's `cursor` (when kept) and its `data` JSON.
fn with_data(out: &mut Vec<u8>, kind: &str, topic: &str, cursor: Option<&str>, data: &str) {
    out.reserve(data.len());
    open(out, kind, topic);
    if let Some(c) = cursor {
        out.extend_from_slice(b",\"cursor\":");
        crate::replication::values::write_json_str(out, c);
    }
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data.as_bytes());
}

/// The encoder of the plain protocol (stateless: every member shares its frames).
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainEncoder;

impl Encoder for PlainEncoder {
    fn protocol(&self) -> &'static str {
        "plain"
    }

    fn id(&self) -> EncodingId {
        crate::protocol::encoding::PLAIN
    }

    fn encode(&self, topic: &str, event: &Event<'_>) -> Option<Frame> {
        let mut out = Vec::with_capacity(128);
        match event {
            Event::Change { data, cursor, .. } => with_data(&mut out, "change", topic, *cursor, data),
            Event::Broadcast(m) => {
                open(&mut out, "message", topic);
                if let Some(l) = &m.logged {
                    out.extend_from_slice(b",\"cursor\":");
                    crate::replication::values::write_json_str(&mut out, &l.cursor);
                }
                out.push(b',');
                super::write_broadcast(&mut out, m);
            }
            Event::PresenceDiff(d) => {
                open(&mut out, "presence_diff", topic);
                out.extend_from_slice(b",\"data\":");
                out.extend_from_slice(d);
            }
            Event::Live { data, cursor, .. } => with_data(&mut out, "live", topic, *cursor, data),
        }
        out.push(b'}');
        Some(text(out))
    }

    fn carries_live(&self) -> bool {
        true
    }

    fn encode_direct(&self, topic: &str, _address: Option<&str>, message: &Direct<'_>) -> Frame {
        let channel = channel_of(topic);
        let v = match message {
            Direct::PresenceState(s) => {
                let mut out = Vec::with_capacity(s.len() + 64);
                open(&mut out, "presence_state", topic);
                out.extend_from_slice(b",\"data\":");
                out.extend_from_slice(s);
                out.push(b'}');
                return text(out);
            }
            Direct::System { status: "error", message, .. } => {
                json!({"type": "error", "channel": channel, "message": message})
            }
            Direct::System { extension, status, message } => {
                json!({"type": "info", "channel": channel, "extension": extension, "status": status, "message": message})
            }
            Direct::Closed => {
                json!({"type": "unsubscribed", "channel": channel, "reason": "closed by the server"})
            }
            Direct::Gap { code, message } => {
                json!({"type": "gap", "channel": channel, "code": code, "message": message})
            }
            Direct::SnapshotEnd { cursor, rows, .. } => {
                json!({"type": "snapshot-end", "channel": channel, "cursor": cursor, "rows": rows})
            }
        };
        Frame::Text(v.to_string().into())
    }
}

/// What a client that did not authenticate in time is told before its socket is closed.
const AUTH_TIMEOUT: &str =
    "authentication timeout: no valid auth message within auth.timeout_secs of connecting";

/// One plain-protocol client.
pub struct PlainConnection {
    session: Session,
    /// When authentication is required and the client connected without a token: the time by
    /// which an `auth` message must have verified, or the socket is closed.
    auth_by: Option<std::time::Instant>,
}

fn reply(id: &Option<Value>, mut v: Value) -> Frame {
    if let (Some(id), Value::Object(map)) = (id, &mut v) {
        map.insert("id".into(), id.clone());
    }
    Frame::Text(v.to_string().into())
}

fn error(id: &Option<Value>, channel: Option<&str>, message: impl std::fmt::Display) -> Frame {
    let mut v = json!({"type": "error", "message": message.to_string()});
    if let Some(c) = channel {
        v["channel"] = json!(c);
    }
    reply(id, v)
}

/// A string field, or (for lists) an array of strings joined with commas.
fn list(v: Option<&Value>) -> Result<Option<String>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().ok_or(()))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| Some(v.join(","))),
        Some(_) => Err(()),
    }
}

/// A `table:<schema>.<table>` subscription's bindings, from the message's `filter`, `events`,
/// `select`, and `live` with its `limit` and `order` as the client sent them (an `order` without
/// `live` is refused with the binding).
fn table_bindings(req: &mut JoinRequest, table: &str, msg: &Value) -> Result<(), String> {
    let Some((schema, name)) = table.split_once('.').filter(|(s, t)| !s.is_empty() && !t.is_empty()) else {
        return Err("expected table:<schema>.<table>".into());
    };
    let (Ok(events), Ok(select)) = (list(msg.get("events")), list(msg.get("select"))) else {
        return Err("events and select are strings or arrays of strings".into());
    };
    let filter = msg.get("filter").and_then(Value::as_str);
    req.bindings =
        crate::subscribe::table_bindings(schema, name, filter, events.as_deref(), select.as_deref())?;
    crate::subscribe::live_fields(&mut req.bindings, msg.get("live"), msg.get("limit"), msg.get("order"))
        .map_err(str::to_owned)
}

impl PlainConnection {
    /// A connection whose client connected with `credentials` (none: authentication is off, or
    /// the client sends an `auth` message before subscribing).
    pub fn new(hub: Hub, credentials: Option<Credentials>) -> (PlainConnection, OutboxReceiver) {
        let auth_by = (hub.verifier().required() && credentials.is_none())
            .then(|| std::time::Instant::now() + hub.limits().auth_timeout);
        let (session, rx) = Session::new(hub, Arc::new(PlainEncoder), credentials);
        (PlainConnection { session, auth_by }, rx)
    }

    /// Verifies a token: it becomes the connection's, and replaces the token of every channel
    /// already subscribed (one that no longer verifies is closed).
    async fn auth(&mut self, id: &Option<Value>, token: Option<&str>) -> Frame {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return error(id, None, "auth needs a \"token\"");
        };
        let verifier = self.session.hub().verifier();
        if verifier.required() {
            match verifier.verify(token).await {
                Ok(c) => {
                    self.session.set_connect(c);
                    self.auth_by = None;
                }
                Err(e) => {
                    self.session.hub().metrics().token_refused();
                    return error(id, None, e.connect_message());
                }
            }
            let topics: Vec<String> = self.session.joined_topics().map(str::to_owned).collect();
            for topic in topics {
                if let Err(e) = self.session.refresh_token(&topic, token).await {
                    self.session.close_channel(&topic, "system", &e.to_string());
                }
            }
        }
        reply(id, json!({"type": "authenticated"}))
    }

    async fn subscribe(&mut self, id: &Option<Value>, channel: &str, msg: &Value) -> Vec<Frame> {
        let flag = |k: &str| msg.get(k).and_then(Value::as_bool);
        let text = |k: &str| msg.get(k).and_then(Value::as_str).map(str::to_owned);
        if self.session.is_joined(&topic_of(channel)) {
            return vec![error(id, Some(channel), "already subscribed: unsubscribe first")];
        }
        let mut req = JoinRequest {
            topic: topic_of(channel),
            private: flag("private").unwrap_or(false),
            broadcast_self: flag("self").unwrap_or(false),
            presence_enabled: flag("presence").unwrap_or(false),
            presence_key: text("presence_key").unwrap_or_default(),
            since: text("since"),
            snapshot: flag("snapshot").unwrap_or(false),
            ..JoinRequest::default()
        };
        if let Some(table) = channel.strip_prefix(TABLE) {
            if let Err(why) = table_bindings(&mut req, table, msg) {
                return vec![error(id, Some(channel), why)];
            }
        } else if req.snapshot {
            return vec![error(id, Some(channel), "snapshot applies to table channels")];
        } else if req.since.as_deref().is_some_and(|s| matches!(s.parse(), Ok(Since::Time(_)))) {
            return vec![error(
                id,
                Some(channel),
                "a broadcast channel resumes from a cursor, not from a time",
            )];
        }
        let joined = match self.session.join(req).await {
            Ok(j) => j,
            Err(e @ JoinError::Auth(_)) if self.session.hub().verifier().required() => {
                return vec![error(
                    id,
                    Some(channel),
                    format!("unauthorized: {e} (send an auth message first)"),
                )]
            }
            Err(e) => return vec![error(id, Some(channel), e)],
        };
        if let Some(Err(errors)) = &joined.changes {
            let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            self.session.leave(&topic_of(channel));
            return vec![error(id, Some(channel), message)];
        }
        let cursor = self.session.hub().log().map(|log| log.cursor(joined.matched).to_string());
        let mut answer = json!({"type": "subscribed", "channel": channel, "cursor": cursor});
        if !joined.notices.is_empty() {
            answer["notices"] = json!(joined.notices);
        }
        if let Some(handoff) = joined.handoff {
            handoff.start();
        }
        vec![reply(id, answer)]
    }
}

impl crate::protocol::Connection for PlainConnection {
    const PROTOCOL: &'static str = "plain";

    fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    fn next_deadline(&mut self) -> Option<std::time::Instant> {
        match (self.session.next_expiry(), self.auth_by) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Closes expired channels; closes the socket of a client that has not authenticated in time.
    fn on_deadline(&mut self) -> Option<crate::protocol::Closing> {
        let now = std::time::Instant::now();
        self.session.expire(now);
        let late = self.auth_by.is_some_and(|by| by <= now);
        late.then(|| {
            self.session.hub().metrics().token_refused();
            crate::protocol::Closing {
                frame: Some(error(&None, None, AUTH_TIMEOUT)),
                code: 1008,
                reason: "authentication timeout",
            }
        })
    }

    /// Handles a text frame; returns the frames to write now, before anything queued.
    async fn text(&mut self, text: &str) -> Vec<Frame> {
        let msg: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return vec![error(&None, None, "a message must be a JSON object with a \"type\"")],
            Err(e) => return vec![error(&None, None, format!("invalid JSON: {e}"))],
        };
        let id = msg.get("id").cloned();
        let channel = msg.get("channel").and_then(Value::as_str).filter(|c| !c.is_empty());
        let kind = msg.get("type").and_then(Value::as_str).unwrap_or("");
        match (kind, channel) {
            ("ping", _) => vec![reply(&id, json!({"type": "pong"}))],
            ("auth", _) => vec![self.auth(&id, msg.get("token").and_then(Value::as_str)).await],
            ("subscribe", Some(channel)) => self.subscribe(&id, channel, &msg).await,
            ("unsubscribe", Some(channel)) => {
                if self.session.leave(&topic_of(channel)) {
                    vec![reply(&id, json!({"type": "unsubscribed", "channel": channel}))]
                } else {
                    vec![error(&id, Some(channel), "not subscribed")]
                }
            }
            ("publish", Some(channel)) => {
                let Some(event) = msg.get("event").and_then(Value::as_str).filter(|e| !e.is_empty()) else {
                    return vec![error(&id, Some(channel), "publish needs an \"event\"")];
                };
                let data = msg.get("data").unwrap_or(&Value::Null);
                let payload =
                    BroadcastPayload::Json(Bytes::from(serde_json::to_vec(data).unwrap_or_default()));
                let message = BroadcastMessage { event: event.to_owned(), payload, meta: None, logged: None };
                match self.session.broadcast(&topic_of(channel), message) {
                    Ok(()) if id.is_some() => {
                        vec![reply(&id, json!({"type": "published", "channel": channel}))]
                    }
                    Ok(()) => Vec::new(),
                    Err(e) => vec![error(&id, Some(channel), e)],
                }
            }
            ("track", Some(channel)) => {
                let data = msg.get("data").cloned().unwrap_or_else(|| json!({}));
                match self.session.track(&topic_of(channel), data) {
                    Ok(()) => Vec::new(),
                    Err(e) => vec![error(&id, Some(channel), e)],
                }
            }
            ("untrack", Some(channel)) => match self.session.untrack(&topic_of(channel)) {
                Ok(()) => Vec::new(),
                Err(e) => vec![error(&id, Some(channel), e)],
            },
            ("subscribe" | "unsubscribe" | "publish" | "track" | "untrack", None) => {
                vec![error(&id, None, format!("{kind} needs a \"channel\""))]
            }
            ("", _) => vec![error(&id, channel, "a message needs a \"type\"")],
            (other, _) => vec![error(&id, channel, format!("unknown message type {other:?}"))],
        }
    }

    /// Binary frames are not part of this protocol.
    async fn binary(&mut self, _bytes: &Bytes) -> Vec<Frame> {
        vec![error(&None, None, "binary frames are not supported: send JSON text")]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(f: &Frame) -> Value {
        serde_json::from_str(f.text().as_deref().expect("text")).expect("json")
    }

    #[test]
    fn frames() {
        let e = PlainEncoder;
        let change = Event::Change {
            ids: &[1],
            data: r#"{"type":"INSERT","record":{"id":1}}"#,
            cursor: Some("c1"),
            kind: crate::change::ChangeKind::Insert,
            snapshot: false,
        };
        assert_eq!(
            json_of(&e.encode("table:public.t", &change).unwrap()),
            json!({"type": "change", "channel": "table:public.t", "cursor": "c1",
                   "data": {"type": "INSERT", "record": {"id": 1}}})
        );
        let m = BroadcastMessage {
            event: "typing".into(),
            payload: BroadcastPayload::Binary(Bytes::from_static(b"\x00\xff")),
            meta: None,
            logged: None,
        };
        assert_eq!(
            json_of(&e.encode("realtime:room", &Event::Broadcast(&m)).unwrap()),
            json!({"type": "message", "channel": "room", "event": "typing", "binary": "AP8="})
        );
        let gap = e.encode_direct("table:public.t", None, &Direct::Gap { code: "expired", message: "m" });
        assert_eq!(
            json_of(&gap),
            json!({"type": "gap", "channel": "table:public.t", "code": "expired", "message": "m"})
        );
        assert_eq!(topic_of("room"), "realtime:room");
        assert_eq!(topic_of("table:public.t"), "table:public.t");
        assert_eq!(list(Some(&json!(["insert", "update"]))), Ok(Some("insert,update".into())));
        assert_eq!(list(Some(&json!(5))), Err(()));
    }
}
