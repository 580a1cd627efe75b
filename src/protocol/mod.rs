//! Client wire formats, one module each. A protocol module decodes client frames into session
//! calls and implements `realtime::outbox::Encoder` for the core's events; it never touches
//! sockets or the database.

pub mod graphql;
pub mod phoenix;
pub mod plain;
pub mod socketio;
pub mod sse;

use std::future::Future;

use bytes::Bytes;

use base64::Engine as _;

use crate::change::broadcast::{BroadcastMessage, BroadcastPayload};
use crate::realtime::outbox::{EncodingId, Frame};
use crate::realtime::session::Session;

/// Every wire encoding's id, allocated here and nowhere else: members whose encoders share an id
/// share frames, so two protocols with one id would receive each other's bytes.
pub mod encoding {
    use super::EncodingId;

    pub const PHOENIX_V1: EncodingId = EncodingId(1);
    pub const PHOENIX_V2: EncodingId = EncodingId(2);
    pub const SSE: EncodingId = EncodingId(10);
    pub const PLAIN: EncodingId = EncodingId(11);
    pub const GRAPHQL: EncodingId = EncodingId(12);
    pub const SOCKETIO: EncodingId = EncodingId(13);

    /// Every id above (a new encoding is added here too).
    pub const ALL: [EncodingId; 6] = [PHOENIX_V1, PHOENIX_V2, SSE, PLAIN, GRAPHQL, SOCKETIO];
}

/// A WebSocket protocol's side of one connection, driven by the transport's IO loop: client
/// frames in, the frames to write at once out (before anything queued in the outbox).
pub trait Connection: Send {
    /// The protocol's name in logs (`phoenix`, `plain`, `socketio`).
    const PROTOCOL: &'static str;

    fn session(&mut self) -> &mut Session;
    /// Handles a text frame.
    fn text(&mut self, text: &str) -> impl Future<Output = Vec<Frame>> + Send;
    /// Handles a binary frame.
    fn binary(&mut self, bytes: &Bytes) -> impl Future<Output = Vec<Frame>> + Send;

    /// When the transport must call [`Connection::on_deadline`] (a channel token expires).
    fn next_deadline(&mut self) -> Option<std::time::Instant> {
        self.session().next_expiry()
    }

    /// Closes the channels whose token has expired (an error, then a close, in the protocol's
    /// words). `Some`: the connection itself is to be closed (after writing the frame given).
    fn on_deadline(&mut self) -> Option<Closing> {
        self.session().expire(std::time::Instant::now());
        None
    }

    /// Frames the connection has to send of its own accord, asked after
    /// [`Connection::on_deadline`] (a protocol's heartbeat, or its last words before a close).
    fn due(&mut self) -> Vec<Frame> {
        Vec::new()
    }

    /// Asked after every frame read has been handled and its replies written: `Some` closes the
    /// connection with the protocol's own code (after writing the frame given), e.g. a protocol
    /// that answers a malformed message by closing.
    fn take_closing(&mut self) -> Option<Closing> {
        None
    }
}

/// A connection the protocol closes: the last frame to write, then the close code and reason.
#[derive(Debug)]
pub struct Closing {
    pub frame: Option<Frame>,
    pub code: u16,
    pub reason: &'static str,
}

/// Writes a broadcast as the JSON fields the SSE and plain protocols share: `"event"`, then
/// `"data"` (the JSON payload as sent) or `"binary"` (base64), then `"meta"` when it has one.
pub(crate) fn write_broadcast(out: &mut Vec<u8>, m: &BroadcastMessage) {
    use crate::replication::values::write_json_str;
    out.extend_from_slice(b"\"event\":");
    write_json_str(out, &m.event);
    match &m.payload {
        BroadcastPayload::Json(b) => {
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(b);
        }
        BroadcastPayload::Binary(b) => {
            out.extend_from_slice(b",\"binary\":");
            write_json_str(out, &base64::engine::general_purpose::STANDARD.encode(b));
        }
    }
    if let Some(meta) = &m.meta {
        out.extend_from_slice(b",\"meta\":");
        out.extend_from_slice(meta);
    }
}

#[cfg(test)]
mod encoding_tests {
    #[test]
    fn encoding_ids_are_distinct() {
        let mut ids = super::encoding::ALL.to_vec();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), super::encoding::ALL.len());
    }
}
