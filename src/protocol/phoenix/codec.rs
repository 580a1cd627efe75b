//! Phoenix channel serializers as the Supabase Realtime clients speak them.
//!
//! `vsn=1.0.0` (also when absent): JSON objects `{topic, event, payload, ref, join_ref}`; server
//! frames leave out `join_ref`. `vsn=2.0.0`: JSON arrays `[join_ref, ref, topic, event, payload]`,
//! plus binary broadcast frames (kind 3 from clients, kind 4 to them). Owns: decoding client
//! frames into [`ClientFrame`] / [`BinaryPush`] and the JSON envelopes of server frames. Must
//! not: touch sockets or sessions; never panic on input.

use bytes::Bytes;
use serde_json::Value;

use crate::replication::values::push_json_str;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    V1,
    V2,
}

impl Vsn {
    /// `None`, `1.0.0` → V1; `2.0.0` → V2; anything else is refused.
    pub fn parse(v: Option<&str>) -> Option<Vsn> {
        match v {
            None | Some("1.0.0") | Some("1") | Some("") => Some(Vsn::V1),
            Some("2.0.0") | Some("2") => Some(Vsn::V2),
            _ => None,
        }
    }
}

/// One decoded client message.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Where the JSON broke (1-based line and column) and how (`serde_json`'s category).
    #[error("frame is not valid JSON: {kind} at line {line} column {column}")]
    Json { kind: JsonFault, line: usize, column: usize },
    #[error("frame is not a Phoenix message: {0}")]
    Shape(&'static str),
    #[error("binary frame: {0}")]
    Binary(&'static str),
}

/// How a frame's JSON broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonFault {
    /// It ended early.
    Eof,
    /// A character that cannot be there.
    Syntax,
    /// Well formed, but not a value this reader takes (e.g. a number out of range).
    Data,
}

impl std::fmt::Display for JsonFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JsonFault::Eof => "unexpected end",
            JsonFault::Syntax => "syntax error",
            JsonFault::Data => "unreadable value",
        })
    }
}

fn ref_string(v: Option<&Value>) -> Result<Option<String>, FrameError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(FrameError::Shape("ref and join_ref must be strings or null")),
    }
}

/// Decodes a text frame in the given serializer version.
pub fn decode_text(vsn: Vsn, text: &str) -> Result<ClientFrame, FrameError> {
    let v: Value = serde_json::from_str(text).map_err(|e| FrameError::Json {
        kind: match e.classify() {
            serde_json::error::Category::Eof => JsonFault::Eof,
            serde_json::error::Category::Syntax => JsonFault::Syntax,
            serde_json::error::Category::Data | serde_json::error::Category::Io => JsonFault::Data,
        },
        line: e.line(),
        column: e.column(),
    })?;
    match (vsn, v) {
        (Vsn::V2, Value::Array(mut a)) => {
            if a.len() != 5 {
                return Err(FrameError::Shape("expected [join_ref, ref, topic, event, payload]"));
            }
            let payload = a.pop().unwrap_or(Value::Null);
            let event = match a.pop() {
                Some(Value::String(s)) => s,
                _ => return Err(FrameError::Shape("event must be a string")),
            };
            let topic = match a.pop() {
                Some(Value::String(s)) => s,
                _ => return Err(FrameError::Shape("topic must be a string")),
            };
            let msg_ref = ref_string(a.get(1))?;
            let join_ref = ref_string(a.first())?;
            Ok(ClientFrame { join_ref, msg_ref, topic, event, payload })
        }
        // A v1 object is accepted on either version, as some clients mix them.
        (_, Value::Object(mut o)) => {
            let topic = match o.remove("topic") {
                Some(Value::String(s)) => s,
                _ => return Err(FrameError::Shape("topic must be a string")),
            };
            let event = match o.remove("event") {
                Some(Value::String(s)) => s,
                _ => return Err(FrameError::Shape("event must be a string")),
            };
            Ok(ClientFrame {
                join_ref: ref_string(o.get("join_ref"))?,
                msg_ref: ref_string(o.get("ref"))?,
                topic,
                event,
                payload: o.remove("payload").unwrap_or(Value::Null),
            })
        }
        (Vsn::V1, Value::Array(_)) => Err(FrameError::Shape("arrays need vsn=2.0.0")),
        _ => Err(FrameError::Shape("expected a JSON object or array")),
    }
}

/// A decoded binary (vsn 2.0.0) frame: a broadcast push.
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryPush {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub metadata: Bytes,
    /// 0 = binary payload, 1 = JSON.
    pub encoding: u8,
    pub payload: Bytes,
}

/// Decodes a kind-3 binary frame: `3, join_ref_len, ref_len, topic_len, event_len, meta_len,
/// encoding`, then the fields, then the payload.
pub fn decode_binary(frame: &Bytes) -> Result<BinaryPush, FrameError> {
    let header = frame.get(..7).ok_or(FrameError::Binary("shorter than its 7-byte header"))?;
    if header[0] != 3 {
        return Err(FrameError::Binary("unknown kind (clients send kind 3)"));
    }
    let lens = [header[1], header[2], header[3], header[4], header[5]].map(usize::from);
    let encoding = header[6];
    let mut pos = 7;
    let mut field = |n: usize| -> Result<Bytes, FrameError> {
        let end = pos + n;
        if end > frame.len() {
            return Err(FrameError::Binary("a field runs past the end of the frame"));
        }
        let b = frame.slice(pos..end);
        pos = end;
        Ok(b)
    };
    let text =
        |b: Bytes| String::from_utf8(b.to_vec()).map_err(|_| FrameError::Binary("a field is not UTF-8"));
    let join_ref = text(field(lens[0])?)?;
    let msg_ref = text(field(lens[1])?)?;
    let topic = text(field(lens[2])?)?;
    let event = text(field(lens[3])?)?;
    let metadata = field(lens[4])?;
    let payload = frame.slice(pos.min(frame.len())..);
    Ok(BinaryPush {
        join_ref: (!join_ref.is_empty()).then_some(join_ref),
        msg_ref: (!msg_ref.is_empty()).then_some(msg_ref),
        topic,
        event,
        metadata,
        encoding,
        payload,
    })
}

/// Writes a server frame around an already-serialized JSON payload: v1
/// `{"topic":…,"event":…,"payload":…,"ref":…}`, v2 `[join_ref,ref,topic,event,payload]`.
pub fn envelope(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + topic.len() + event.len() + 48);
    let opt = |out: &mut Vec<u8>, v: Option<&str>| match v {
        Some(s) => write_str(out, s),
        None => out.extend_from_slice(b"null"),
    };
    match vsn {
        Vsn::V1 => {
            out.extend_from_slice(b"{\"topic\":");
            write_str(&mut out, topic);
            out.extend_from_slice(b",\"event\":");
            write_str(&mut out, event);
            out.extend_from_slice(b",\"payload\":");
            out.extend_from_slice(payload);
            out.extend_from_slice(b",\"ref\":");
            opt(&mut out, msg_ref);
            out.push(b'}');
        }
        Vsn::V2 => {
            out.push(b'[');
            opt(&mut out, join_ref);
            out.push(b',');
            opt(&mut out, msg_ref);
            out.push(b',');
            write_str(&mut out, topic);
            out.push(b',');
            write_str(&mut out, event);
            out.push(b',');
            out.extend_from_slice(payload);
            out.push(b']');
        }
    }
    out
}

/// What [`envelope`] writes before the payload when `join_ref` and `ref` are null (frames shared
/// by members), as text; returns what follows the payload. `event` is written as given: a JSON
/// string literal.
pub fn shared_envelope_head(vsn: Vsn, out: &mut String, topic: &str, event: &str) -> &'static str {
    match vsn {
        Vsn::V1 => {
            out.push_str("{\"topic\":");
            push_json_str(out, topic);
            out.push_str(",\"event\":");
            out.push_str(event);
            out.push_str(",\"payload\":");
            ",\"ref\":null}"
        }
        Vsn::V2 => {
            out.push_str("[null,null,");
            push_json_str(out, topic);
            out.push(',');
            out.push_str(event);
            out.push(',');
            "]"
        }
    }
}

/// Writes a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    crate::replication::values::write_json_str(out, s);
}

/// Encodes a kind-4 binary broadcast frame: `4, topic_len, event_len, meta_len, encoding`, then
/// topic, event, metadata and payload. `None` when a field is longer than its one-byte length.
pub fn encode_binary_broadcast(
    topic: &str,
    event: &str,
    meta: &[u8],
    json: bool,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let lens = [topic.len(), event.len(), meta.len()];
    if lens.iter().any(|l| *l > 255) {
        return None;
    }
    let mut out = Vec::with_capacity(5 + lens.iter().sum::<usize>() + payload.len());
    out.extend_from_slice(&[4, lens[0] as u8, lens[1] as u8, lens[2] as u8, u8::from(json)]);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(payload);
    Some(out)
}

/// Encodes a server frame with a JSON payload.
pub fn encode(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &Value,
) -> String {
    match vsn {
        Vsn::V1 => serde_json::json!({"topic": topic, "event": event, "payload": payload, "ref": msg_ref})
            .to_string(),
        Vsn::V2 => serde_json::json!([join_ref, msg_ref, topic, event, payload]).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn decodes_v1_and_v2() {
        let f = decode_text(
            Vsn::V1,
            r#"{"topic":"realtime:a","event":"phx_join","payload":{},"ref":"1","join_ref":"1"}"#,
        )
        .unwrap();
        assert_eq!(
            (f.topic.as_str(), f.event.as_str(), f.msg_ref.as_deref()),
            ("realtime:a", "phx_join", Some("1"))
        );
        let f = decode_text(Vsn::V2, r#"["3","4","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(
            (f.join_ref.as_deref(), f.msg_ref.as_deref(), f.event.as_str()),
            (Some("3"), Some("4"), "heartbeat")
        );
        let f = decode_text(Vsn::V2, r#"[null,5,"phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!((f.join_ref, f.msg_ref.as_deref()), (None, Some("5")));
    }

    #[test]
    fn rejects_malformed() {
        for (vsn, bad) in [
            (Vsn::V1, "nope"),
            (Vsn::V1, "[]"),
            (Vsn::V1, r#"{"event":"x"}"#),
            (Vsn::V2, r#"["1","2","t","e"]"#),
            (Vsn::V2, r#"["1","2",3,"e",{}]"#),
            (Vsn::V2, r#"[{},"2","t","e",{}]"#),
            (Vsn::V2, "42"),
        ] {
            assert!(decode_text(vsn, bad).is_err(), "{bad}");
        }
        // Broken JSON says how and where.
        assert_eq!(
            decode_text(Vsn::V2, "[\"1\",\n \"2\","),
            Err(FrameError::Json { kind: JsonFault::Eof, line: 2, column: 5 })
        );
        assert_eq!(
            decode_text(Vsn::V2, "[1, ?]").map(|_| ()),
            Err(FrameError::Json { kind: JsonFault::Syntax, line: 1, column: 5 })
        );
    }

    #[test]
    fn encodes() {
        let v1 = encode(Vsn::V1, Some("1"), Some("2"), "t", "phx_reply", &json!({"status":"ok"}));
        let v: Value = serde_json::from_str(&v1).unwrap();
        assert_eq!(v, json!({"topic":"t","event":"phx_reply","payload":{"status":"ok"},"ref":"2"}));
        let v2 = encode(Vsn::V2, Some("1"), None, "t", "system", &json!({}));
        assert_eq!(v2, r#"["1",null,"t","system",{}]"#);
        // The shared head and tail are the envelope with null refs, byte for byte.
        for vsn in [Vsn::V1, Vsn::V2] {
            let mut text = String::new();
            let tail = shared_envelope_head(vsn, &mut text, "realtime:\"é", "\"postgres_changes\"");
            text.push_str("{\"a\":1}");
            text.push_str(tail);
            let whole = envelope(vsn, None, None, "realtime:\"é", "postgres_changes", br#"{"a":1}"#);
            assert_eq!(text.as_bytes(), &whole[..], "{vsn:?}");
        }
    }

    #[test]
    fn binary_frames() {
        let mut f = vec![3u8, 1, 1, 10, 6, 2, 1];
        f.extend_from_slice(b"12realtime:acursor{}");
        f.extend_from_slice(br#"{"x":1}"#);
        let p = decode_binary(&Bytes::from(f.clone())).unwrap();
        assert_eq!(
            (p.topic.as_str(), p.event.as_str(), &p.payload[..]),
            ("realtime:a", "cursor", &br#"{"x":1}"#[..])
        );
        for cut in 0..f.len() - 7 {
            let _ = decode_binary(&Bytes::from(f[..cut].to_vec()));
        }
        assert!(decode_binary(&Bytes::from_static(&[4, 0, 0, 0, 0, 0, 0])).is_err());
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..20_000 {
            let v: Vec<u8> = (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect();
            let _ = decode_binary(&Bytes::from(v));
        }
    }
}
