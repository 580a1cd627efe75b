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
//! Long-poll reads the same messages back ([`parse`]). Owns: the format. Must not: touch
//! sockets or the database.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use crate::change::ChangeKind;
use crate::realtime::outbox::{Direct, Encoder, EncodingId, Event, Frame};

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

/// The `id:` of a message this encoder made (its first line), if it has one.
pub fn message_id(frame: &Frame) -> Option<&str> {
    let Frame::Text(t) = frame else { return None };
    let rest = t.as_str().strip_prefix("id: ")?;
    rest.split_once('\n').map(|(id, _)| id)
}

/// One message. A line break in `data` (JSON whitespace in a client's payload) starts another
/// `data:` line, which the reader joins back with a newline; `id` and `event` have none.
pub fn message(id: Option<&str>, event: &str, data: &[u8]) -> Frame {
    let mut s = Vec::with_capacity(data.len() + event.len() + 64);
    if let Some(id) = id {
        s.extend_from_slice(b"id: ");
        s.extend_from_slice(id.as_bytes());
        s.push(b'\n');
    }
    s.extend_from_slice(b"event: ");
    s.extend_from_slice(event.as_bytes());
    if data.contains(&b'\n') || data.contains(&b'\r') {
        for line in data.split(|&b| b == b'\n' || b == b'\r') {
            s.extend_from_slice(b"\ndata: ");
            s.extend_from_slice(line);
        }
    } else {
        s.extend_from_slice(b"\ndata: ");
        s.extend_from_slice(data);
    }
    s.extend_from_slice(b"\n\n");
    let text = String::from_utf8(s).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    Frame::Text(Utf8Bytes::from(text))
}

/// The events a channel stream sends of its own: a broadcast by one of these names arrives as
/// `broadcast`.
const RESERVED: [&str; 3] = ["gap", "error", "system"];

/// The SSE event name of a broadcast: its own name, unless that is empty, has a line break or
/// is one of the stream's own events (then `broadcast`; the data still has the name).
fn broadcast_event(name: &str) -> &str {
    let plain = !name.is_empty() && !name.contains(['\n', '\r']) && !RESERVED.contains(&name);
    if plain {
        name
    } else {
        "broadcast"
    }
}

impl Encoder for SseEncoder {
    fn id(&self) -> EncodingId {
        crate::protocol::encoding::SSE
    }

    fn encode(&self, _topic: &str, event: &Event<'_>) -> Option<Frame> {
        match event {
            Event::Change { data, snapshot: true, .. } => Some(message(None, "snapshot", data.as_bytes())),
            Event::Change { data, cursor, kind, .. } => {
                Some(message(*cursor, event_name(*kind), data.as_bytes()))
            }
            Event::Broadcast(m) => {
                let mut data = Vec::with_capacity(m.payload.len() + 64);
                data.push(b'{');
                super::write_broadcast(&mut data, m);
                data.push(b'}');
                Some(message(m.logged.as_ref().map(|l| &*l.cursor), broadcast_event(&m.event), &data))
            }
            // Presence is not carried over SSE.
            Event::PresenceDiff(_) => None,
        }
    }

    fn encode_direct(&self, _topic: &str, _address: Option<&str>, message_: &Direct<'_>) -> Frame {
        match message_ {
            Direct::Gap { code, message: text } => {
                let body = serde_json::json!({"code": code, "message": text});
                message(None, "gap", body.to_string().as_bytes())
            }
            Direct::System { extension, status, message: text } => {
                let body = serde_json::json!({"extension": extension, "status": status, "message": text});
                message(
                    None,
                    if *status == "error" { "error" } else { "system" },
                    body.to_string().as_bytes(),
                )
            }
            Direct::Closed => message(None, "error", br#"{"message":"the stream was closed by the server"}"#),
            Direct::SnapshotEnd { cursor, rows, more } => {
                let mut body = serde_json::json!({"cursor": cursor, "rows": rows});
                if let Some(key) = more.and_then(|k| serde_json::from_str::<serde_json::Value>(k).ok()) {
                    body["more"] = key;
                }
                message(*cursor, "snapshot-end", body.to_string().as_bytes())
            }
            Direct::PresenceState(_) => Frame::Text(Utf8Bytes::from_static(":\n\n")),
        }
    }
}

/// One message read back: (id, event, data).
pub fn parse(frame: &str) -> Option<(Option<&str>, &str, &str)> {
    let mut id = None;
    let mut event = None;
    let mut data = None;
    for line in frame.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v);
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v);
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(v);
        }
    }
    Some((id, event?, data?))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(f.text().as_deref(), Some("id: C1\nevent: update\ndata: {\"type\":\"UPDATE\"}\n\n"));
        assert_eq!(parse(f.text().as_deref().unwrap()), Some((Some("C1"), "update", r#"{"type":"UPDATE"}"#)));
        let g = e.encode_direct("t", None, &Direct::Gap { code: "expired", message: "m" });
        assert_eq!(
            parse(g.text().as_deref().unwrap()),
            Some((None, "gap", r#"{"code":"expired","message":"m"}"#))
        );
        let s =
            e.encode_direct("t", None, &Direct::System { extension: "x", status: "error", message: "no" });
        assert_eq!(parse(s.text().as_deref().unwrap()).map(|p| p.1), Some("error"));
        assert_eq!(parse(": keep-alive\n\n"), None);
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
        assert_eq!(
            f.text().as_deref(),
            Some("id: C9\nevent: typing\ndata: {\"event\":\"typing\",\"data\":{\"a\":1}}\n\n")
        );
        // The stream's own names, empty names and line breaks are not event names.
        for name in ["gap", "error", "", "a\nid: x"] {
            let f = text(&m(name, b"1", None));
            let body = f.text().unwrap();
            assert!(body.starts_with("event: broadcast\ndata: "), "{body:?}");
            assert_eq!(body.matches("\n\n").count(), 1, "one message: {body:?}");
        }
        // Line breaks in a payload continue the data on further lines; nothing else changes.
        let f = text(&m("e", b"{\"a\":\n1,\r\n\"id: x\":2}", None));
        let body = f.text().unwrap();
        assert!(!body.contains("\nid:"), "{body:?}");
        let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        let joined: serde_json::Value = serde_json::from_str(&data.join("\n")).unwrap();
        assert_eq!(joined["data"], serde_json::json!({"a": 1, "id: x": 2}));
    }
}
