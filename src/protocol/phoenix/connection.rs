//! One Phoenix connection: decodes client frames, turns them into calls on the transport-neutral
//! [`Session`], and answers with Supabase Realtime's replies and error shapes.
//!
//! Owns: the Phoenix channel life cycle (join config, replies, `system` pushes, leave/close,
//! heartbeats, unmatched topics) and the mapping of core errors to the strings clients match on.
//! Must not: touch sockets (the transport writes the returned frames and the outbox) or hold
//! state the session should own.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::auth::Credentials;
use crate::change::broadcast::{BroadcastMessage, BroadcastPayload};
use crate::protocol::phoenix::codec::{self, ClientFrame, Vsn};
use crate::protocol::phoenix::encoder::{channel_name, PhoenixEncoder};
use crate::realtime::broadcast::BroadcastError;
use crate::realtime::outbox::{Frame, OutboxReceiver};
use crate::realtime::session::{JoinError, JoinRequest, PresenceError, Session};
use crate::realtime::Hub;

/// A Phoenix client's session.
pub struct PhoenixConnection {
    session: Session,
    vsn: Vsn,
}

/// A JSON boolean, also accepted as the strings `"true"`/`"false"`.
fn flag(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

impl PhoenixConnection {
    /// A connection whose client connected with `credentials` (none when authentication is off).
    pub fn new(hub: Hub, vsn: Vsn, credentials: Option<Credentials>) -> (PhoenixConnection, OutboxReceiver) {
        let (session, rx) = Session::new(hub, PhoenixEncoder::shared(vsn), credentials);
        (PhoenixConnection { session, vsn }, rx)
    }

    fn frame(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: &Value,
    ) -> Frame {
        Frame::Text(codec::encode(self.vsn, join_ref, msg_ref, topic, event, payload).into())
    }

    fn reply(&self, f: &ClientFrame, status: &str, response: Value) -> Frame {
        self.frame(
            f.join_ref.as_deref(),
            f.msg_ref.as_deref(),
            &f.topic,
            "phx_reply",
            &json!({"status": status, "response": response}),
        )
    }

    fn broadcast_json(&mut self, frame: &ClientFrame, out: &mut Vec<Frame>) {
        let Some(event) = frame.payload.get("event").and_then(Value::as_str) else {
            out.push(self.reply(frame, "error", json!({"reason": BroadcastError::MissingEvent.to_string()})));
            return;
        };
        let payload = frame.payload.get("payload").unwrap_or(&Value::Null);
        let payload = Bytes::from(serde_json::to_vec(payload).unwrap_or_else(|_| b"null".to_vec()));
        let message = BroadcastMessage {
            event: event.to_owned(),
            payload: BroadcastPayload::Json(payload),
            meta: None,
            logged: None,
        };
        self.send_broadcast(frame, message, out);
    }

    fn send_broadcast(&mut self, frame: &ClientFrame, message: BroadcastMessage, out: &mut Vec<Frame>) {
        let ack = self.session.membership(&frame.topic).is_some_and(|m| m.ack());
        match self.session.broadcast(&frame.topic, message) {
            Ok(()) => {
                if ack && frame.msg_ref.is_some() {
                    out.push(self.reply(frame, "ok", json!({})));
                }
            }
            Err(BroadcastError::PayloadTooLarge { .. }) => {
                out.push(self.reply(frame, "error", json!({"error": "payload_size_exceeded"})));
            }
            Err(BroadcastError::RateLimited) => {
                self.session.close_channel(&frame.topic, "system", "Too many messages per second");
            }
            Err(e @ BroadcastError::Unauthorized(_)) => {
                out.push(self.reply(frame, "error", json!({"reason": format!("Unauthorized: {e}")})));
            }
            Err(e) => out.push(self.reply(frame, "error", json!({"reason": e.to_string()}))),
        }
    }

    fn presence(&mut self, frame: &ClientFrame, out: &mut Vec<Frame>) {
        let event = frame.payload.get("event").and_then(Value::as_str).unwrap_or("").to_ascii_lowercase();
        let result = match event.as_str() {
            "track" => {
                let payload = frame.payload.get("payload").cloned().unwrap_or_else(|| json!({}));
                self.session.track(&frame.topic, payload)
            }
            "untrack" => self.session.untrack(&frame.topic),
            other => {
                let reason = format!("unknown presence event {other:?}: expected track or untrack");
                out.push(self.reply(frame, "error", json!({"reason": reason})));
                return;
            }
        };
        match result {
            Ok(()) => out.push(self.reply(frame, "ok", json!({}))),
            Err(e @ (PresenceError::RateLimited | PresenceError::PayloadTooLarge)) => {
                self.session.close_channel(&frame.topic, "system", &e.to_string());
            }
            Err(e @ PresenceError::Unauthorized(_)) => {
                out.push(self.reply(frame, "error", json!({"reason": format!("Unauthorized: {e}")})));
            }
            Err(e) => out.push(self.reply(frame, "error", json!({"reason": e.to_string()}))),
        }
    }

    async fn join(&mut self, frame: ClientFrame, out: &mut Vec<Frame>) {
        if channel_name(&frame.topic).is_empty() || !frame.topic.starts_with("realtime:") {
            out.push(self.reply(
                &frame,
                "error",
                json!({"reason": "Topic must be of the form realtime:<name>"}),
            ));
            return;
        }
        let req = join_request(&frame);
        let echoed: Vec<Value> = req
            .bindings
            .iter()
            .map(|b| {
                let mut e = b.clone();
                if let Value::Object(map) = &mut e {
                    map.insert("id".into(), json!(crate::subscribe::binding_id(b)));
                }
                e
            })
            .collect();
        match self.session.join(req).await {
            Ok(joined) => {
                out.push(self.reply(&frame, "ok", json!({"postgres_changes": echoed})));
                if let Some(changes) = &joined.changes {
                    let payload = self.subscribed(changes, &joined.notices, joined.matched, &frame.topic);
                    out.push(self.frame(frame.join_ref.as_deref(), None, &frame.topic, "system", &payload));
                }
                // After the replies above: the replayed changes (or the snapshot) follow them.
                if let Some(handoff) = joined.handoff {
                    handoff.start();
                }
            }
            Err(e) => out.push(self.reply(&frame, "error", json!({"reason": join_refusal(e)}))),
        }
    }

    /// The `system` message that says whether a join's bindings are live (and where they went
    /// live, with a change log).
    fn subscribed(
        &self,
        changes: &Result<(), Vec<crate::subscribe::BindingError>>,
        notices: &[String],
        matched: crate::change::Position,
        topic: &str,
    ) -> Value {
        let name = channel_name(topic);
        match changes {
            Ok(()) => {
                let mut message = String::from("Subscribed to PostgreSQL");
                for notice in notices {
                    message.push_str("; ");
                    message.push_str(notice);
                }
                let mut ok = json!({"extension": "postgres_changes", "status": "ok",
                                    "message": message, "channel": name});
                // Where the bindings went live: resuming from it misses nothing even when no
                // change has arrived yet.
                if let Some(log) = self.session.hub().log() {
                    ok["cursor"] = json!(log.cursor(matched).to_string());
                }
                ok
            }
            Err(errors) => {
                let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                json!({"extension": "postgres_changes", "status": "error", "message": message, "channel": name})
            }
        }
    }
}

/// A refused join's `reason`, prefixed with the code Supabase's clients match on.
fn join_refusal(e: JoinError) -> String {
    match e {
        JoinError::TooManyChannels => format!("ChannelRateLimitReached: {e}"),
        JoinError::TooManyJoins => format!("ClientJoinRateLimitReached: {e}"),
        JoinError::EmptyTopic => e.to_string(),
        JoinError::Auth(a) => format!("{}: {a}", a.code()),
        JoinError::Unauthorized(_) => format!("Unauthorized: {e}"),
        JoinError::Replay(_) => format!("UnableToReplayMessages: {e}"),
        JoinError::Unavailable => format!("UnableToConnectToProject: {e}"),
        JoinError::Cursor(_) => format!("InvalidCursor: {e}"),
        JoinError::Snapshot(_) | JoinError::TooManyBindings(_) => e.to_string(),
    }
}

/// The session's join request for a `phx_join` frame.
fn join_request(frame: &ClientFrame) -> JoinRequest {
    let config = frame.payload.get("config").unwrap_or(&Value::Null);
    let bindings = bindings_of(config);
    let since = bindings_since(&bindings);
    let snapshot = bindings.iter().any(|b| flag(b.get("snapshot")).unwrap_or(false));
    let broadcast = config.get("broadcast");
    let presence = config.get("presence");
    JoinRequest {
        topic: frame.topic.clone(),
        address: frame.join_ref.as_deref().map(Arc::from),
        private: flag(config.get("private")).unwrap_or(false),
        bindings,
        broadcast_self: flag(broadcast.and_then(|b| b.get("self"))).unwrap_or(false),
        broadcast_ack: flag(broadcast.and_then(|b| b.get("ack"))).unwrap_or(false),
        presence_enabled: flag(presence.and_then(|p| p.get("enabled"))).unwrap_or(false),
        presence_key: presence.and_then(|p| p.get("key")).and_then(Value::as_str).unwrap_or("").to_owned(),
        replication_ready: flag(broadcast.and_then(|b| b.get("replication_ready"))).unwrap_or(false),
        access_token: ["access_token", "user_token"]
            .iter()
            .find_map(|k| frame.payload.get(*k).and_then(Value::as_str))
            .map(str::to_owned),
        replay: broadcast.and_then(|b| b.get("replay")).cloned(),
        // A cursor on any binding resumes the channel's bindings after it; `snapshot` on any
        // binding sends the rows of all of them first.
        since,
        snapshot,
        snapshot_page: None,
    }
}

impl crate::protocol::Connection for PhoenixConnection {
    const PROTOCOL: &'static str = "phoenix";

    fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Handles a text frame; returns the frames to write now, in order (replies and the pushes
    /// that must follow them), before anything queued in the outbox.
    async fn text(&mut self, text: &str) -> Vec<Frame> {
        let frame = match codec::decode_text(self.vsn, text) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "malformed client frame");
                // Answer on the phoenix topic so the client can see what went wrong.
                let err = json!({"status": "error", "response": {"reason": e.to_string()}});
                return vec![self.frame(None, None, "phoenix", "phx_reply", &err)];
            }
        };
        let mut out = Vec::new();
        let joined = self.session.is_joined(&frame.topic);
        match (frame.topic.as_str(), frame.event.as_str()) {
            ("phoenix", "heartbeat") => out.push(self.reply(&frame, "ok", json!({}))),
            (_, "phx_join") => self.join(frame, &mut out).await,
            (_, "phx_leave") if joined => {
                let join_ref = self.session.membership(&frame.topic).and_then(|m| m.member().address.clone());
                self.session.leave(&frame.topic);
                out.push(self.reply(&frame, "ok", json!({})));
                out.push(self.frame(
                    join_ref.as_deref(),
                    join_ref.as_deref(),
                    &frame.topic,
                    "phx_close",
                    &json!({}),
                ));
            }
            (_, "broadcast") if joined => self.broadcast_json(&frame, &mut out),
            (_, "presence") if joined => self.presence(&frame, &mut out),
            // A refresh has no reply; a bad token closes the channel.
            (_, "access_token") if joined => {
                if let Some(token) = frame.payload.get("access_token").and_then(Value::as_str) {
                    if let Err(e) = self.session.refresh_token(&frame.topic, token).await {
                        self.session.close_channel(&frame.topic, "system", &e.to_string());
                    }
                }
            }
            (_, _) if joined => out.push(self.reply(&frame, "ok", json!({}))),
            _ => out.push(self.reply(&frame, "error", json!({"reason": "unmatched topic"}))),
        }
        out
    }

    /// Handles a binary frame (a 2.0.0 kind-3 broadcast push).
    async fn binary(&mut self, bytes: &Bytes) -> Vec<Frame> {
        let push = match codec::decode_binary(bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "malformed binary frame");
                let err = json!({"status": "error", "response": {"reason": e.to_string()}});
                return vec![self.frame(None, None, "phoenix", "phx_reply", &err)];
            }
        };
        let frame = ClientFrame {
            join_ref: push.join_ref,
            msg_ref: push.msg_ref,
            topic: push.topic,
            event: "broadcast".into(),
            payload: Value::Null,
        };
        if !self.session.is_joined(&frame.topic) {
            return vec![self.reply(&frame, "error", json!({"reason": "unmatched topic"}))];
        }
        let payload = match push.encoding {
            0 => BroadcastPayload::Binary(push.payload),
            1 => {
                if serde_json::from_slice::<serde::de::IgnoredAny>(&push.payload).is_err() {
                    return vec![self.reply(
                        &frame,
                        "error",
                        json!({"reason": "broadcast payload is not valid JSON"}),
                    )];
                }
                BroadcastPayload::Json(push.payload)
            }
            other => {
                let reason = format!("unknown payload encoding {other} (0 = binary, 1 = JSON)");
                return vec![self.reply(&frame, "error", json!({"reason": reason}))];
            }
        };
        let mut out = Vec::new();
        // The client's metadata (`persist`) asks for storage, which needs a private channel.
        self.send_broadcast(
            &frame,
            BroadcastMessage { event: push.event, payload, meta: None, logged: None },
            &mut out,
        );
        out
    }
}

fn bindings_of(config: &Value) -> Vec<Value> {
    match config.get("postgres_changes") {
        Some(Value::Array(b)) => b.clone(),
        _ => Vec::new(),
    }
}

/// The `since` cursor of the first binding that carries one.
fn bindings_since(bindings: &[Value]) -> Option<String> {
    bindings.iter().find_map(|b| b.get("since").and_then(Value::as_str)).map(str::to_owned)
}
