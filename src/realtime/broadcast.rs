//! What the core does with broadcasts beyond the message itself (that is
//! [`crate::change::broadcast`]): the replay gate of a private topic and why a broadcast was
//! refused. Must not: parse or re-serialize payloads on the delivery path.

use std::collections::HashSet;
use std::sync::Arc;

use crate::change::broadcast::BroadcastMessage;

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
