//! Server-Sent Events: core events as `text/event-stream` messages, one change JSON shape for
//! every transport (`schema`, `table`, `type`, `commit_timestamp`, `cursor`, `columns`,
//! `record`, `old_record`, `errors`).
//!
//! A change is `id: <cursor>` (so `Last-Event-ID` resumes), `event: insert|update|delete|
//! truncate`, `data: <the change JSON>`. An initial snapshot is `event: snapshot` rows (no id:
//! they cannot be resumed into) and then `event: snapshot-end` with the hand-off cursor as id.
//! A broadcast is an event named as the broadcast (`data: {"event","data"|"binary","meta"}`);
//! a database broadcast has its cursor as id, a client's has none (it is not kept). A gap is
//! `event: gap` with `{"code","message"}`; an error or a closed stream `event: error`.
//! The encoder makes [`Frame::Named`] messages; the event stream writes them with
//! [`write_message`], and long-poll takes their parts as they are. Owns: the format. Must not:
//! touch sockets or the database.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use crate::change::ChangeKind;
use crate::realtime::outbox::{Direct, Encoder, EncodingId, Event, Frame, Named};

/// The SSE encoder (stateless: every member shares its frames).
#[derive(Debug, Clone, Copy, Default)]
pub struct SseEncoder;

impl SseEncoder {
    pub fn shared() -> Arc<dyn Encoder> {
        Arc::new(SseEncoder)
    }
}

/// How long a browser waits before reconnecting, sent first.
pub const RETRY: &str = "retry: 2000\n\n";
/// The block that opens a stream with the cursor it starts after: an `id:` and no data, which
/// sets a browser's last event id without dispatching an event, so a client disconnected before
/// its first change reconnects from where it began instead of from the moment it reconnects.
pub fn start_id(cursor: &str) -> String {
    format!("id: {cursor}\n\n")
}

/// A comment sent when a stream that fell behind goes on from the change log.
pub const CATCHING_UP: &str = ": fell behind; catching up from the change log\n\n";
/// A comment that keeps proxies from closing an idle stream.
pub const KEEP_ALIVE: &str = ": keep-alive\n\n";

fn event_name(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Insert => "insert",
        ChangeKind::Update => "update",
        ChangeKind::Delete => "delete",
        ChangeKind::Truncate => "truncate",
    }
}

/// The `id:` of a message this encoder made, if it has one.
pub fn message_id(frame: &Frame) -> Option<&str> {
    let Frame::Named(m) = frame else { return None };
    m.id.as_deref()
}

/// One message.
pub fn message(id: Option<&str>, event: &'static str, data: &str) -> Frame {
    Named::frame(id, event, Utf8Bytes::from(data.to_owned()))
}

/// Writes `frame` as the event stream carries it: a named message as `id:`/`event:`/`data:`
/// lines, anything else (a comment) as it is. A line break in `data` (JSON whitespace in a
/// client's payload) starts another `data:` line, which the reader joins back with a newline;
/// `id` and `event` have none.
pub fn write_message(frame: &Frame, out: &mut Vec<u8>) {
    let Frame::Named(m) = frame else { return frame.write_to(out) };
    if let Some(id) = &m.id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(m.name.as_bytes());
    let data = m.data.as_bytes();
    if data.contains(&b'\n') || data.contains(&b'\r') {
        for line in data.split(|&b| b == b'\n' || b == b'\r') {
            out.extend_from_slice(b"\ndata: ");
            out.extend_from_slice(line);
        }
    } else {
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(data);
    }
    out.extend_from_slice(b"\n\n");
}

/// The events a channel stream sends of its own: a broadcast by one of these names arrives as
/// `broadcast`.
const RESERVED: [&str; 3] = ["gap", "error", "system"];

/// The SSE event name of a broadcast: its own name, unless that is empty, has a line break or
/// is one of the stream's own events (then `broadcast`; the data still has the name).
fn broadcast_event(name: &str) -> Cow<'static, str> {
    let plain = !name.is_empty() && !name.contains(['\n', '\r']) && !RESERVED.contains(&name);
    if plain {
        Cow::Owned(name.to_owned())
    } else {
        Cow::Borrowed("broadcast")
    }
}

impl Encoder for SseEncoder {
    fn protocol(&self) -> &'static str {
        "sse"
    }

    fn id(&self) -> EncodingId {
        crate::protocol::encoding::SSE
    }

    fn encode(&self, _topic: &str, event: &Event<'_>) -> Option<Frame> {
        match event {
            Event::Change { data, snapshot: true, .. } => Some(message(None, "snapshot", data)),
            Event::Change { data, cursor, kind, .. } => Some(message(*cursor, event_name(*kind), data)),
            Event::Broadcast(m) => {
                let mut data = Vec::with_capacity(m.payload.len() + 64);
                data.push(b'{');
                super::write_broadcast(&mut data, m);
                data.push(b'}');
                let data = Utf8Bytes::from(String::from_utf8_lossy(&data).into_owned());
                Some(Named::frame(m.logged.as_ref().map(|l| &*l.cursor), broadcast_event(&m.event), data))
            }
            // Presence is not carried over SSE.
            Event::PresenceDiff(_) => None,
            Event::Live { kind, data, cursor, .. } => Some(message(*cursor, kind.as_str(), data)),
        }
    }

    fn carries_live(&self) -> bool {
        true
    }

    fn encode_direct(&self, _topic: &str, _address: Option<&str>, message_: &Direct<'_>) -> Frame {
        match message_ {
            Direct::Gap { code, message: text } => {
                let body = serde_json::json!({"code": code, "message": text});
                message(None, "gap", &body.to_string())
            }
            Direct::System { extension, status, message: text } => {
                let body = serde_json::json!({"extension": extension, "status": status, "message": text});
                message(None, if *status == "error" { "error" } else { "system" }, &body.to_string())
            }
            Direct::Closed => message(None, "error", r#"{"message":"the stream was closed by the server"}"#),
            Direct::SnapshotEnd { cursor, rows, more } => {
                let mut body = serde_json::json!({"cursor": cursor, "rows": rows});
                if let Some(key) = more.and_then(|k| serde_json::from_str::<serde_json::Value>(k).ok()) {
                    body["more"] = key;
                }
                message(*cursor, "snapshot-end", &body.to_string())
            }
            Direct::PresenceState(_) => Frame::Text(Utf8Bytes::from_static(":\n\n")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame as the event stream writes it.
    fn wire(f: &Frame) -> String {
        let mut out = Vec::new();
        write_message(f, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// A named frame's (id, name, data), as long-poll takes them.
    fn parts(f: &Frame) -> (Option<&str>, &str, &str) {
        let Frame::Named(m) = f else { panic!("not a named message: {f:?}") };
        (m.id.as_deref(), &m.name, m.data.as_str())
    }

    #[test]
    fn changes_gaps_and_errors() {
        let e = SseEncoder;
        let f = e
            .encode(
                "t",
                &Event::Change {
                    ids: &[1],
                    data: r#"{"type":"UPDATE"}"#,
                    cursor: Some("C1"),
                    kind: ChangeKind::Update,
                    snapshot: false,
                },
            )
            .unwrap();
        assert_eq!(wire(&f), "id: C1\nevent: update\ndata: {\"type\":\"UPDATE\"}\n\n");
        assert_eq!(parts(&f), (Some("C1"), "update", r#"{"type":"UPDATE"}"#));
        assert_eq!(message_id(&f), Some("C1"));
        let g = e.encode_direct("t", None, &Direct::Gap { code: "expired", message: "m" });
        assert_eq!(parts(&g), (None, "gap", r#"{"code":"expired","message":"m"}"#));
        assert_eq!(wire(&g), "event: gap\ndata: {\"code\":\"expired\",\"message\":\"m\"}\n\n");
        let s =
            e.encode_direct("t", None, &Direct::System { extension: "x", status: "error", message: "no" });
        assert_eq!(parts(&s).1, "error");
        let comment = Frame::Text(KEEP_ALIVE.into());
        assert_eq!(wire(&comment), KEEP_ALIVE);
        assert_eq!(message_id(&comment), None);
    }

    #[test]
    fn broadcasts_are_named_events_and_keep_the_stream_framed() {
        use crate::change::broadcast::{BroadcastMessage, BroadcastPayload, Logged};
        let m = |event: &str, payload: &'static [u8], cursor: Option<&str>| BroadcastMessage {
            event: event.into(),
            payload: BroadcastPayload::Json(bytes::Bytes::from_static(payload)),
            meta: None,
            logged: cursor.map(|c| Logged { position: crate::change::Position::ZERO, cursor: c.into() }),
        };
        let text = |m: &BroadcastMessage| SseEncoder.encode("realtime:r", &Event::Broadcast(m)).unwrap();
        let f = text(&m("typing", br#"{"a":1}"#, Some("C9")));
        assert_eq!(wire(&f), "id: C9\nevent: typing\ndata: {\"event\":\"typing\",\"data\":{\"a\":1}}\n\n");
        // The stream's own names, empty names and line breaks are not event names.
        for name in ["gap", "error", "", "a\nid: x"] {
            let f = text(&m(name, b"1", None));
            let body = wire(&f);
            assert!(body.starts_with("event: broadcast\ndata: "), "{body:?}");
            assert_eq!(body.matches("\n\n").count(), 1, "one message: {body:?}");
        }
        // Line breaks in a payload continue the data on further lines; nothing else changes.
        let f = text(&m("e", b"{\"a\":\n1,\r\n\"id: x\":2}", None));
        let body = wire(&f);
        assert!(!body.contains("\nid:"), "{body:?}");
        let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        let joined: serde_json::Value = serde_json::from_str(&data.join("\n")).unwrap();
        assert_eq!(joined["data"], serde_json::json!({"a": 1, "id: x": 2}));
    }
}
