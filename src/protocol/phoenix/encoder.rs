//! Core events as Phoenix frames, for the 1.0.0 (JSON objects) and 2.0.0 (JSON arrays, binary
//! broadcasts) serializers. Frames shared between members carry no per-member data: changes,
//! broadcasts and presence diffs have `join_ref` and `ref` null.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;

use crate::change::broadcast::{BroadcastMessage, BroadcastPayload};
use crate::protocol::phoenix::codec::{
    encode_binary_broadcast, envelope, shared_envelope_head, write_str, Vsn,
};
use crate::realtime::outbox::{Direct, Encoder, EncodingId, Envelope, Event, Frame};

/// The encoder of one serializer version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhoenixEncoder {
    pub vsn: Vsn,
}

impl PhoenixEncoder {
    pub fn shared(vsn: Vsn) -> Arc<dyn Encoder> {
        Arc::new(PhoenixEncoder { vsn })
    }
}

/// Text frames are built from JSON fragments, all valid UTF-8. Shrunk to their length before they
/// become `Bytes`, so that a frame is one allocation (spare capacity would cost a second one for
/// the reference count; the allocator shrinks the block in place).
fn text(bytes: Vec<u8>) -> Frame {
    text_of(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

fn text_of(mut text: String) -> Frame {
    text.shrink_to_fit();
    Frame::Text(Utf8Bytes::from(text))
}

/// `{"ids":[…],"data":…}`.
fn change_payload(out: &mut String, ids: &[u32], data: &str) {
    out.push_str("{\"ids\":[");
    for (n, id) in ids.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(itoa::Buffer::new().format(*id));
    }
    out.push_str("],\"data\":");
    out.push_str(data);
    out.push('}');
}

pub use crate::realtime::channel_name;

/// `{"type":"broadcast","event":…,"payload":…[,"meta":…]}`: what a 1.0.0 client receives.
fn broadcast_json(m: &BroadcastMessage, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + m.event.len() + 64);
    out.extend_from_slice(b"{\"type\":\"broadcast\",\"event\":");
    write_str(&mut out, &m.event);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload);
    if let Some(meta) = &m.meta {
        out.extend_from_slice(b",\"meta\":");
        out.extend_from_slice(meta);
    }
    out.push(b'}');
    out
}

impl PhoenixEncoder {
    /// Writes what precedes a change payload on `topic` and returns what follows it (`ref` and
    /// `join_ref` are null, so nothing else depends on the member).
    fn change_head(&self, out: &mut String, topic: &str) -> &'static str {
        shared_envelope_head(self.vsn, out, topic, "\"postgres_changes\"")
    }
}

impl Encoder for PhoenixEncoder {
    fn protocol(&self) -> &'static str {
        "phoenix"
    }

    fn id(&self) -> EncodingId {
        match self.vsn {
            Vsn::V1 => crate::protocol::encoding::PHOENIX_V1,
            Vsn::V2 => crate::protocol::encoding::PHOENIX_V2,
        }
    }

    fn encode(&self, topic: &str, event: &Event<'_>) -> Option<Frame> {
        match event {
            Event::Change { ids, data, .. } => {
                // Built as text from text: nothing to check per member.
                let mut out = String::with_capacity(data.len() + topic.len() + 72 + ids.len() * 11);
                let close = self.change_head(&mut out, topic);
                change_payload(&mut out, ids, data);
                out.push_str(close);
                Some(text_of(out))
            }
            Event::Broadcast(m) => match (self.vsn, &m.payload) {
                (Vsn::V2, p) => {
                    let (json, bytes) = match p {
                        BroadcastPayload::Json(b) => (true, b),
                        BroadcastPayload::Binary(b) => (false, b),
                    };
                    let meta = m.meta.as_deref().unwrap_or_default();
                    match encode_binary_broadcast(topic, &m.event, meta, json, bytes) {
                        Some(frame) => Some(Frame::Binary(Bytes::from(frame.into_boxed_slice()))),
                        // Too long for the binary header: JSON text, as 1.0.0 receives it.
                        None if json => Some(text(envelope(
                            self.vsn,
                            None,
                            None,
                            topic,
                            "broadcast",
                            &broadcast_json(m, bytes),
                        ))),
                        None => None,
                    }
                }
                (Vsn::V1, BroadcastPayload::Json(b)) => {
                    Some(text(envelope(self.vsn, None, None, topic, "broadcast", &broadcast_json(m, b))))
                }
                // JSON text cannot carry bytes; Supabase skips 1.0.0 members too.
                (Vsn::V1, BroadcastPayload::Binary(_)) => None,
            },
            Event::PresenceDiff(json) => {
                Some(text(envelope(self.vsn, None, None, topic, "presence_diff", json)))
            }
            // A live query's message as a change a `postgres_changes` client applies: INSERT
            // (a row of the result, or one that entered), UPDATE, DELETE (it left; its key in
            // `old_record`), with `kind` and `key` for clients that read them.
            Event::Live { ids, data, .. } => {
                let mut out = String::with_capacity(data.len() + topic.len() + 72 + ids.len() * 11);
                let close = self.change_head(&mut out, topic);
                change_payload(&mut out, ids, data);
                out.push_str(close);
                Some(text_of(out))
            }
        }
    }

    fn change_envelope(&self, topic: &str) -> Option<Envelope> {
        let mut head = String::with_capacity(topic.len() + 40);
        let tail = self.change_head(&mut head, topic);
        Some(Envelope { head: Utf8Bytes::from(head), tail })
    }

    fn carries_live(&self) -> bool {
        true
    }

    fn change_body(&self, ids: &[u32], data: &str) -> Option<Utf8Bytes> {
        let mut out = String::with_capacity(data.len() + 20 + ids.len() * 11);
        change_payload(&mut out, ids, data);
        Some(Utf8Bytes::from(out))
    }

    fn encode_direct(&self, topic: &str, join_ref: Option<&str>, message: &Direct<'_>) -> Frame {
        match message {
            Direct::PresenceState(json) => {
                text(envelope(self.vsn, join_ref, None, topic, "presence_state", json))
            }
            Direct::System { extension, status, message } => {
                let payload = serde_json::json!({
                    "extension": extension, "status": status, "message": message, "channel": channel_name(topic)
                });
                let payload = serde_json::to_vec(&payload).unwrap_or_default();
                text(envelope(self.vsn, join_ref, None, topic, "system", &payload))
            }
            Direct::Closed => text(envelope(self.vsn, join_ref, join_ref, topic, "phx_close", b"{}")),
            Direct::Gap { code, message } => {
                let payload = serde_json::json!({
                    "extension": "postgres_changes", "status": "error", "message": message,
                    "gap": code, "channel": channel_name(topic)
                });
                let payload = serde_json::to_vec(&payload).unwrap_or_default();
                text(envelope(self.vsn, join_ref, None, topic, "system", &payload))
            }
            Direct::SnapshotEnd { cursor, rows, .. } => {
                let payload = serde_json::json!({
                    "extension": "postgres_changes", "status": "ok", "message": "Snapshot complete",
                    "snapshot": "end", "rows": rows, "cursor": cursor, "channel": channel_name(topic)
                });
                let payload = serde_json::to_vec(&payload).unwrap_or_default();
                text(envelope(self.vsn, join_ref, None, topic, "system", &payload))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn json_of(f: &Frame) -> Value {
        serde_json::from_str(&f.text().expect("text")).expect("json")
    }

    #[test]
    fn changes_and_diffs() {
        let v1 = PhoenixEncoder { vsn: Vsn::V1 };
        let v2 = PhoenixEncoder { vsn: Vsn::V2 };
        let ev = Event::Change {
            ids: &[1, 2],
            data: r#"{"type":"INSERT"}"#,
            cursor: None,
            kind: crate::change::ChangeKind::Insert,
            snapshot: false,
        };
        assert_eq!(
            json_of(&v2.encode("realtime:a\"b", &ev).unwrap()),
            json!([null, null, "realtime:a\"b", "postgres_changes", {"ids": [1, 2], "data": {"type": "INSERT"}}])
        );
        assert_eq!(
            json_of(
                &v1.encode(
                    "realtime:x",
                    &Event::Change {
                        ids: &[],
                        data: "{}",
                        cursor: None,
                        kind: crate::change::ChangeKind::Insert,
                        snapshot: false
                    }
                )
                .unwrap()
            ),
            json!({"topic": "realtime:x", "event": "postgres_changes", "payload": {"ids": [], "data": {}}, "ref": null})
        );
        let d = v2.encode("realtime:x", &Event::PresenceDiff(br#"{"joins":{},"leaves":{}}"#)).unwrap();
        assert_eq!(
            json_of(&d),
            json!([null, null, "realtime:x", "presence_diff", {"joins": {}, "leaves": {}}])
        );
        let s = v2.encode_direct("realtime:x", Some("4"), &Direct::PresenceState(b"{}"));
        assert_eq!(json_of(&s), json!(["4", null, "realtime:x", "presence_state", {}]));
        let c = v1.encode_direct("realtime:x", Some("4"), &Direct::Closed);
        assert_eq!(
            json_of(&c),
            json!({"topic": "realtime:x", "event": "phx_close", "payload": {}, "ref": "4"})
        );
        let sys = v2.encode_direct(
            "realtime:x",
            Some("4"),
            &Direct::System { extension: "system", status: "error", message: "m" },
        );
        assert_eq!(
            json_of(&sys)[4],
            json!({"extension": "system", "status": "error", "message": "m", "channel": "x"})
        );
    }

    #[test]
    fn joined_change_frames_equal_whole_ones() {
        let data = r#"{"type":"UPDATE","record":{"t":"é\"x"}}"#;
        let ev = Event::Change {
            ids: &[7, 2147483647],
            data,
            cursor: None,
            kind: crate::change::ChangeKind::Update,
            snapshot: false,
        };
        for vsn in [Vsn::V1, Vsn::V2] {
            let e = PhoenixEncoder { vsn };
            for topic in ["realtime:c1", "realtime:\"ü\\"] {
                let whole = e.encode(topic, &ev).unwrap();
                let envelope = Arc::new(e.change_envelope(topic).unwrap());
                let joined = Frame::Joined { envelope, body: e.change_body(&[7, 2147483647], data).unwrap() };
                assert_eq!(joined.text(), whole.text(), "{vsn:?} {topic}");
                assert_eq!(joined.len(), whole.len());
                let (mut a, mut b) = (Vec::new(), Vec::new());
                joined.write_to(&mut a);
                whole.write_to(&mut b);
                assert_eq!(a, b);
                assert_eq!(joined.joined_text().as_deref(), whole.text().as_deref());
            }
        }
    }

    #[test]
    fn broadcasts_per_serializer() {
        let v1 = PhoenixEncoder { vsn: Vsn::V1 };
        let v2 = PhoenixEncoder { vsn: Vsn::V2 };
        let m = BroadcastMessage {
            event: "cursor".into(),
            payload: BroadcastPayload::Json(Bytes::from_static(br#"{"x":1}"#)),
            meta: Some(Bytes::from_static(br#"{"id":"u"}"#)),
            logged: None,
        };
        assert_eq!(
            json_of(&v1.encode("realtime:r", &Event::Broadcast(&m)).unwrap()),
            json!({"topic": "realtime:r", "event": "broadcast", "ref": null,
                   "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 1}, "meta": {"id": "u"}}})
        );
        let Some(Frame::Binary(b)) = v2.encode("realtime:r", &Event::Broadcast(&m)) else { panic!("binary") };
        let mut want = vec![4u8, 10, 6, 10, 1];
        want.extend_from_slice(br#"realtime:rcursor{"id":"u"}{"x":1}"#);
        assert_eq!(&b[..], &want[..]);
        let bin = BroadcastMessage {
            payload: BroadcastPayload::Binary(Bytes::from_static(&[0, 1])),
            meta: None,
            ..m
        };
        assert!(v1.encode("realtime:r", &Event::Broadcast(&bin)).is_none());
        let Some(Frame::Binary(b)) = v2.encode("realtime:r", &Event::Broadcast(&bin)) else {
            panic!("binary")
        };
        assert_eq!(&b[..5], &[4, 10, 6, 0, 0]);
        assert_eq!(&b[b.len() - 2..], &[0, 1]);
        // A topic too long for the binary header falls back to JSON text for JSON payloads.
        let long = format!("realtime:{}", "t".repeat(300));
        let json =
            BroadcastMessage { payload: BroadcastPayload::Json(Bytes::from_static(b"1")), ..bin.clone() };
        assert!(matches!(v2.encode(&long, &Event::Broadcast(&json)), Some(Frame::Text(_))));
        assert!(v2.encode(&long, &Event::Broadcast(&bin)).is_none());
    }
}
