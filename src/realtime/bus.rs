//! The pub-sub bus: how broadcasts and presence changes reach channel members, on this node and,
//! through [`Peers`], on other gateway nodes.
//!
//! Owns: [`BusMessage`] (the unit that crosses nodes) and [`Hub::publish`] (deliver here, then
//! forward). A cluster transport implements [`Peers`] and calls [`Hub::deliver`] with what it
//! receives. Must not: encode wire formats or know about sessions.

use std::sync::Arc;

use crate::change::broadcast::BroadcastMessage;
use crate::realtime::presence::PresenceDiff;
use crate::realtime::{Hub, MemberId, TopicKey};

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

impl Hub {
    /// Delivers on this node, then forwards to the other nodes.
    pub fn publish(&self, message: BusMessage) {
        self.deliver(&message);
        if let Some(peers) = &self.inner.peers {
            peers.forward(&message);
        }
    }

    /// Delivers a message to this node's members (the entry point for messages from peers).
    pub fn deliver(&self, message: &BusMessage) {
        match message {
            BusMessage::Broadcast { key, origin, message } => self.deliver_broadcast(key, *origin, message),
            BusMessage::Presence { key, diff } => self.apply_presence(key, diff),
        }
    }
}
