//! The channel registry: topic → members (who receives broadcasts and presence diffs) and the
//! topic's presence table.
//!
//! Owns: membership and presence state, and delivery of broadcasts and presence diffs — each
//! frame encoded once per encoding and shared by every member. Must not: await anything; the
//! lock is a std `RwLock` held only while queueing frames.

use std::sync::Arc;

use crate::auth::topics::Replayed;
use crate::change::broadcast::BroadcastMessage;
use crate::locks;
use crate::realtime::broadcast::{BroadcastError, ReplayGate};
use crate::realtime::bus::BusMessage;
use crate::realtime::gate::Place;
use crate::realtime::hub::Hub;
use crate::realtime::member::{Member, MemberId, TopicKey};
use crate::realtime::outbox::{Direct, EncodingId, Event, Frame};
use crate::realtime::presence::PresenceDiff;

/// Frames of one event, by encoding: members share them.
struct FrameCache<'a> {
    topic: &'a str,
    event: Event<'a>,
    frames: Vec<(EncodingId, Option<Frame>)>,
}

impl<'a> FrameCache<'a> {
    fn new(topic: &'a str, event: Event<'a>) -> Self {
        FrameCache { topic, event, frames: Vec::with_capacity(2) }
    }

    fn frame(&mut self, member: &Member) -> Option<Frame> {
        let id = member.encoder.id();
        if let Some((_, f)) = self.frames.iter().find(|(e, _)| *e == id) {
            return f.clone();
        }
        let f = member.encoder.encode(self.topic, &self.event);
        self.frames.push((id, f.clone()));
        f
    }
}

impl Hub {
    /// Adds a member; with `presence_state`, queues the topic's presence state to it first,
    /// under the same lock, so every later diff follows the state it applies to.
    pub(crate) fn add_member(&self, member: Arc<Member>, presence_state: bool) {
        let mut channels = locks::write(self.channels());
        let channel = channels.entry(member.key.clone()).or_default();
        if presence_state && member.reads_presence() {
            let state = channel.presence.to_json();
            self.send_direct(&member, &Direct::PresenceState(&state));
        }
        channel.members.push(member);
        self.metrics().channels.increment(1.0);
    }

    /// Queues the presence state of the member's topic to it (presence enabled after join).
    pub(crate) fn send_presence_state(&self, member: &Member) {
        if !member.reads_presence() {
            return;
        }
        let channels = locks::read(self.channels());
        let state = channels.get(&member.key).map(|c| c.presence.to_json()).unwrap_or_else(|| b"{}".to_vec());
        self.send_direct(member, &Direct::PresenceState(&state));
    }

    /// Removes a member; its presences leave (the diff reaches every node).
    pub(crate) fn remove_member(&self, member: &Member) {
        let leaves = {
            let mut channels = locks::write(self.channels());
            let Some(channel) = channels.get_mut(&member.key) else { return };
            let before = channel.members.len();
            channel.members.retain(|m| m.id != member.id);
            if channel.members.len() < before {
                self.metrics().channels.decrement(1.0);
            }
            let leaves = channel.presence.of_member(member.id);
            if channel.members.is_empty() && channel.presence.is_empty() {
                channels.remove(&member.key);
            }
            leaves
        };
        if !leaves.is_empty() {
            self.publish(crate::realtime::bus::BusMessage::Presence {
                key: member.key.clone(),
                diff: PresenceDiff { joins: Vec::new(), leaves },
            });
        }
    }

    /// Queues a message for one member.
    pub(crate) fn send_direct(&self, member: &Member, message: &Direct<'_>) {
        let frame = member.encoder.encode_direct(&member.key.topic, member.address.as_deref(), message);
        member.outbox.send(frame, self.metrics());
    }

    pub(crate) fn deliver_broadcast(
        &self,
        key: &TopicKey,
        origin: Option<MemberId>,
        message: &Arc<BroadcastMessage>,
    ) {
        let channels = locks::read(self.channels());
        let Some(channel) = channels.get(key) else { return };
        let mut cache = FrameCache::new(&key.topic, Event::Broadcast(message));
        let mut id: Option<Option<String>> = None;
        let place = message.logged.as_ref().map_or(Place::Unlogged, |l| Place::Broadcast(l.position));
        for m in &channel.members {
            if (origin == Some(m.id) && !m.echo_own) || !m.reads_broadcast() {
                continue;
            }
            if let Some(gate) = &m.replay {
                let mut gate = locks::lock(gate);
                match &mut *gate {
                    ReplayGate::Holding(held) => {
                        held.push(Arc::clone(message));
                        continue;
                    }
                    ReplayGate::Replayed(ids) => {
                        let id = id.get_or_insert_with(|| message.meta_id());
                        if id.as_deref().is_some_and(|id| ids.contains(id)) {
                            continue;
                        }
                    }
                }
            }
            match cache.frame(m) {
                Some(f) => {
                    m.deliver_live(place, f, self.metrics());
                }
                None => {
                    self.metrics().broadcasts_undeliverable.increment(1);
                }
            }
        }
    }

    /// Queues one broadcast to one member (replays), unless its encoding cannot carry it.
    pub(crate) fn send_broadcast_to(&self, member: &Member, message: &BroadcastMessage) {
        match member.encoder.encode(&member.key.topic, &Event::Broadcast(message)) {
            Some(f) => {
                member.outbox.send(f, self.metrics());
            }
            None => {
                self.metrics().broadcasts_undeliverable.increment(1);
            }
        }
    }

    /// Queues the replayed broadcasts, then the live ones held meanwhile (except those the
    /// replay already had); from then on live broadcasts flow, replayed ids skipped.
    pub(crate) fn release_replay(&self, member: &Member, replayed: &[Replayed]) {
        for r in replayed {
            self.send_broadcast_to(member, &r.message);
        }
        let ids: std::collections::HashSet<Arc<str>> = replayed.iter().map(|r| Arc::clone(&r.id)).collect();
        let Some(mut gate) = member.replay.as_ref().map(|g| locks::lock(g)) else { return };
        if let ReplayGate::Holding(held) = &mut *gate {
            for message in held.drain(..) {
                if message.meta_id().is_none_or(|id| !ids.contains(id.as_str())) {
                    self.send_broadcast_to(member, &message);
                }
            }
        }
        *gate = ReplayGate::Replayed(ids);
    }

    /// Applies a presence diff to the topic's table and delivers it to every member.
    pub(crate) fn apply_presence(&self, key: &TopicKey, diff: &PresenceDiff) {
        let mut channels = locks::write(self.channels());
        let channel = channels.entry(key.clone()).or_default();
        channel.presence.apply(diff);
        let json = diff.to_json();
        let mut cache = FrameCache::new(&key.topic, Event::PresenceDiff(&json));
        for m in channel.members.iter().filter(|m| m.reads_presence()) {
            if let Some(f) = cache.frame(m) {
                m.outbox.send(f, self.metrics());
            }
        }
        if channel.members.is_empty() && channel.presence.is_empty() {
            channels.remove(key);
        }
    }

    /// The presences of this node's members, per topic, as joins: what another node needs
    /// when it appears (or comes back after it counted this one gone).
    pub fn own_presences(&self) -> Vec<(TopicKey, PresenceDiff)> {
        let seed = self.member_seed();
        let channels = locks::read(self.channels());
        channels
            .iter()
            .filter_map(|(key, c)| {
                let joins = c.presence.metas_where(|m| crate::realtime::hub::member_seed(m.member) == seed);
                (!joins.is_empty()).then(|| (key.clone(), PresenceDiff { joins, leaves: Vec::new() }))
            })
            .collect()
    }

    /// Removes the presences of the members of the node with `seed` (it is gone); this node's
    /// members get the leaves. Not forwarded: every node does this itself.
    pub fn drop_presences_of(&self, seed: u64) {
        let gone: Vec<(TopicKey, PresenceDiff)> = {
            let channels = locks::read(self.channels());
            channels
                .iter()
                .filter_map(|(key, c)| {
                    let leaves =
                        c.presence.metas_where(|m| crate::realtime::hub::member_seed(m.member) == seed);
                    (!leaves.is_empty()).then(|| (key.clone(), PresenceDiff { joins: Vec::new(), leaves }))
                })
                .collect()
        };
        for (key, diff) in gone {
            self.apply_presence(&key, &diff);
        }
    }

    /// The presence state of a channel as JSON (for tests and the REST API).
    pub fn presence_state(&self, key: &TopicKey) -> Vec<u8> {
        let channels = locks::read(self.channels());
        channels.get(key).map(|c| c.presence.to_json()).unwrap_or_else(|| b"{}".to_vec())
    }
}

impl Hub {
    /// Whether a broadcast payload of `size` bytes may be sent (`max_broadcast_payload_bytes`).
    pub fn broadcast_fits(&self, size: usize) -> Result<(), BroadcastError> {
        let limit = self.limits().max_broadcast_payload_bytes;
        if size > limit {
            return Err(BroadcastError::PayloadTooLarge { size, limit });
        }
        Ok(())
    }

    /// Publishes a broadcast a client or REST sent (checked already: its size, and the sender's
    /// right to write to the topic): counted, delivered here, forwarded to peers.
    pub fn publish_broadcast(&self, key: TopicKey, origin: Option<MemberId>, message: BroadcastMessage) {
        self.metrics().broadcasts_received.increment(1);
        self.publish(BusMessage::Broadcast { key, origin, message: Arc::new(message) });
    }

    /// Delivers on this node, then forwards to the other nodes.
    pub fn publish(&self, message: BusMessage) {
        self.deliver(&message);
        if let Some(peers) = self.peers() {
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
