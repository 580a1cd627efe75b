//! Broadcast messages as the core carries them: an event name, a JSON or binary payload kept as
//! the bytes it arrived in, and optional metadata. Encoded once per wire format by `protocol/`.
//!
//! Owns: the message type and its size rule. Must not: parse or re-serialize payloads on the
//! delivery path.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

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
    pub position: crate::change::Position,
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

/// A member that asked for a replay of a private topic: live broadcasts are held while the
/// replay is sent, then the replayed ones are not sent again.
#[derive(Debug)]
pub enum ReplayGate {
    /// Live broadcasts that arrived while the replay was loading, in order.
    Holding(Vec<Arc<BroadcastMessage>>),
    /// The ids that were replayed.
    Replayed(HashSet<Arc<str>>),
}

/// Why a broadcast was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BroadcastError {
    #[error("the socket has not joined topic {0}")]
    NotJoined(String),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("too many messages per second")]
    RateLimited,
    #[error("a broadcast needs an `event` name")]
    MissingEvent,
    /// A private channel whose policies do not let the sender write.
    #[error("You do not have permissions to write to this Channel topic: {0}")]
    Unauthorized(String),
}
