//! Broadcast messages as the core carries them: an event name, a JSON or binary payload kept as
//! the bytes it arrived in, and optional metadata, encoded once per wire format by `protocol/`;
//! and the database broadcasts the change stream carries (`realtime.send`), read from the
//! logical decoding message the `realtime.messages` trigger emits.
//!
//! Owns: the message types and the database message's decoding. Must not: parse or
//! re-serialize payloads on the delivery path.

use std::sync::Arc;

use bytes::Bytes;

use super::position::Position;

/// A broadcast payload, kept as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BroadcastPayload {
    /// JSON text (any JSON value).
    Json(Bytes),
    /// Opaque bytes (Phoenix 2.0.0 binary frames, REST `application/octet-stream`,
    /// `realtime.send_binary`).
    Binary(Bytes),
}

impl BroadcastPayload {
    pub fn len(&self) -> usize {
        match self {
            BroadcastPayload::Json(b) | BroadcastPayload::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One broadcast, shared by reference count between every member it reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastMessage {
    /// The user's event name (`cursor`, `typing`, …).
    pub event: String,
    pub payload: BroadcastPayload,
    /// A JSON object sent to clients as `meta` (e.g. `{"id":"…"}` for database broadcasts).
    pub meta: Option<Bytes>,
    /// Where a database broadcast sits in this node's change log; `None` for the broadcasts
    /// of clients and REST, which are not kept.
    pub logged: Option<Logged>,
}

/// A database broadcast's place in the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub position: Position,
    /// The position as a client cursor (SSE `id:`).
    pub cursor: Arc<str>,
}

impl BroadcastMessage {
    /// The `id` in `meta` (database broadcasts carry one).
    pub fn meta_id(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Meta {
            id: Option<String>,
        }
        let meta: Meta = serde_json::from_slice(self.meta.as_deref()?).ok()?;
        meta.id
    }
}

/// A broadcast sent from the database (`realtime.send`), delivered when its transaction commits.
#[derive(Debug)]
pub struct DbBroadcast {
    /// Where it was committed (set by the replication task).
    pub position: Position,
    /// The message as the trigger emitted it (what the change log keeps).
    pub raw: Bytes,
    /// The channel topic (`realtime:<topic>`).
    pub topic: Arc<str>,
    pub private: bool,
    pub message: BroadcastMessage,
}

/// Why a database broadcast message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DbBroadcastError {
    #[error("not the expected JSON object")]
    Json(#[source] serde_json::Error),
    #[error("binary_payload is not hex")]
    Hex,
}

impl DbBroadcast {
    /// The logical decoding message prefix the `realtime.messages` trigger emits under.
    pub const PREFIX: &'static str = "walcast.broadcast";

    /// Reads the message the trigger emits:
    /// `{"id","topic","event","private","payload"|null,"binary_payload": hex|null}`. Every message
    /// carries `meta: {"id": …}` (`realtime.send` also puts the id into the payload).
    pub fn decode(content: &[u8]) -> Result<DbBroadcast, DbBroadcastError> {
        #[derive(serde::Deserialize)]
        struct Row {
            id: String,
            topic: String,
            event: Option<String>,
            #[serde(default)]
            private: bool,
            payload: Option<serde_json::Value>,
            binary_payload: Option<String>,
        }
        let row: Row = serde_json::from_slice(content).map_err(DbBroadcastError::Json)?;
        let payload = match (row.binary_payload, row.payload) {
            (Some(hex), _) => {
                BroadcastPayload::Binary(Bytes::from(decode_hex(&hex).ok_or(DbBroadcastError::Hex)?))
            }
            (None, payload) => {
                let payload = payload.unwrap_or(serde_json::Value::Null);
                BroadcastPayload::Json(Bytes::from(
                    serde_json::to_vec(&payload).map_err(DbBroadcastError::Json)?,
                ))
            }
        };
        let meta = serde_json::to_vec(&serde_json::json!({"id": row.id})).map_err(DbBroadcastError::Json)?;
        Ok(DbBroadcast {
            position: Position::ZERO,
            raw: Bytes::copy_from_slice(content),
            topic: format!("realtime:{}", row.topic).into(),
            private: row.private,
            message: BroadcastMessage {
                event: row.event.unwrap_or_default(),
                payload,
                meta: Some(Bytes::from(meta)),
                logged: None,
            },
        })
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("\\x").unwrap_or(s).as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_broadcasts_decode() {
        let b = DbBroadcast::decode(
            br#"{"id":"u1","topic":"room","event":"e","private":true,"payload":{"x":1},"binary_payload":null}"#,
        )
        .unwrap();
        assert_eq!((&*b.topic, b.private, b.message.event.as_str()), ("realtime:room", true, "e"));
        let BroadcastPayload::Json(p) = &b.message.payload else { panic!() };
        assert_eq!(serde_json::from_slice::<serde_json::Value>(p).unwrap(), serde_json::json!({"x": 1}));
        assert_eq!(b.message.meta.as_deref(), Some(&br#"{"id":"u1"}"#[..]));
        let b = DbBroadcast::decode(
            br#"{"id":"u2","topic":"t","event":"e","payload":null,"binary_payload":"00ff10"}"#,
        )
        .unwrap();
        assert_eq!(b.message.payload, BroadcastPayload::Binary(Bytes::from_static(&[0, 255, 16])));
        assert!(!b.private);
        for bad in [&b"nope"[..], br#"{"id":"u","topic":"t","binary_payload":"0"}"#, br#"{"topic":"t"}"#] {
            assert!(DbBroadcast::decode(bad).is_err());
        }
    }
}
