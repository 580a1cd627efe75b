//! The pub-sub bus: how broadcasts and presence changes reach channel members, on this node and,
//! through [`Peers`], on other gateway nodes.
//!
//! Owns: [`BusMessage`] (the unit that crosses nodes) and [`Peers`]. `Hub::publish` (deliver
//! here, then forward; in `registry.rs`) sends; a cluster transport implements [`Peers`] and
//! calls `Hub::deliver` with what it receives. Must not: encode wire formats or know about sessions.

use std::sync::Arc;

use crate::change::broadcast::BroadcastMessage;
use crate::realtime::member::{MemberId, TopicKey};
use crate::realtime::presence::PresenceDiff;

/// A message for every member of one channel, on every node.
#[derive(Debug, Clone)]
pub enum BusMessage {
    Broadcast {
        key: TopicKey,
        /// The sending member on this node: it does not receive its own message unless it
        /// asked to (`self`). `None` for messages from the database, REST or another node.
        origin: Option<MemberId>,
        message: Arc<BroadcastMessage>,
    },
    Presence {
        key: TopicKey,
        diff: PresenceDiff,
    },
}

/// Other gateway nodes. The in-process gateway has none.
pub trait Peers: Send + Sync {
    /// Sends a message that was just delivered locally to the other nodes.
    fn forward(&self, message: &BusMessage);
}
