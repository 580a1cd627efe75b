//! The dispatcher task: takes replication events in commit order, matches each change against
//! the index, renders its `data` once per distinct `select`, encodes it once per (encoding,
//! topic, ids) and queues the shared bytes to each member without waiting; relays database
//! broadcasts to their channels; and advances the acknowledgement after each commit.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::change::{Change, ChangeEvent};
use crate::realtime::bus::BusMessage;
use crate::realtime::index::Subscription;
use crate::realtime::outbox::{EncodingId, Event, Frame};
use crate::realtime::{Hub, TopicKey};
use crate::replication::ack::Acknowledgement;

/// Runs until the replication side closes the channel or `shutdown` fires.
pub async fn run_dispatcher(
    hub: Hub,
    mut rx: mpsc::Receiver<ChangeEvent>,
    ack: Acknowledgement,
    shutdown: CancellationToken,
) {
    let mut scratch = Scratch::default();
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            e = rx.recv() => match e {
                Some(e) => e,
                None => return,
            },
        };
        match event {
            ChangeEvent::Change(change) => {
                dispatch(&hub, &change, &mut scratch);
                hub.metrics().changes_dispatched.fetch_add(1, Ordering::Relaxed);
            }
            ChangeEvent::Broadcast(b) => {
                hub.metrics().broadcasts_received.fetch_add(1, Ordering::Relaxed);
                hub.publish(BusMessage::Broadcast {
                    key: TopicKey { topic: b.topic, private: b.private },
                    origin: None,
                    message: Arc::new(b.message),
                });
            }
            ChangeEvent::Commit { end_lsn, .. } => ack.advance(end_lsn),
        }
    }
}

/// A `select` column list, compared by content.
type Select = Option<Arc<[Arc<str>]>>;
/// What makes two change frames identical: encoding, topic, binding ids and which `data`.
type FrameKey = (EncodingId, Arc<str>, Ids, usize);

/// Binding ids as a cache key, inline for the common case of a few.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Ids {
    Inline([u32; 4], u8),
    Heap(Vec<u32>),
}

impl Ids {
    fn of(ids: &[u32]) -> Ids {
        if ids.len() <= 4 {
            let mut a = [0; 4];
            a[..ids.len()].copy_from_slice(ids);
            Ids::Inline(a, ids.len() as u8)
        } else {
            Ids::Heap(ids.to_vec())
        }
    }
}

/// Buffers reused across changes so matching allocates little in the steady state.
#[derive(Default)]
pub struct Scratch {
    /// Rendered `data` objects of the current change, by `select` column list (content).
    data: Vec<(Select, Vec<u8>)>,
    /// Frames of the current change.
    frames: HashMap<FrameKey, Option<Frame>>,
    ids: Vec<u32>,
}

/// Matches and delivers one change. Returns the number of frames queued.
pub fn dispatch(hub: &Hub, change: &Change, scratch: &mut Scratch) -> usize {
    let Ok(index) = hub.index().read() else {
        return 0;
    };
    if index.is_empty() {
        return 0;
    }
    let mut matched: Vec<&Arc<Subscription>> = Vec::new();
    index.matching(change, |sub| matched.push(sub));
    if matched.is_empty() {
        return 0;
    }
    // One push per member, with all of its matching binding ids.
    if matched.len() > 1 {
        matched.sort_unstable_by_key(|s| (Arc::as_ptr(&s.member) as usize, s.binding.id));
        matched.dedup_by_key(|s| (Arc::as_ptr(&s.member) as usize, s.binding.id));
    }
    scratch.data.clear();
    scratch.frames.clear();
    let max_record_bytes = hub.limits().max_record_bytes;
    let mut delivered = 0;
    let mut i = 0;
    while i < matched.len() {
        let sub = matched[i];
        let member = &sub.member;
        scratch.ids.clear();
        while i < matched.len() && Arc::ptr_eq(&matched[i].member, member) {
            scratch.ids.push(matched[i].binding.id);
            i += 1;
        }
        let select = &sub.binding.select;
        let data_at = match scratch.data.iter().position(|(k, _)| k.as_deref() == select.as_deref()) {
            Some(at) => at,
            None => {
                scratch.data.push((select.clone(), change.render_data(select.as_deref(), max_record_bytes)));
                scratch.data.len() - 1
            }
        };
        let data = &scratch.data[data_at].1;
        let event = Event::Change { ids: &scratch.ids, data };
        // Most changes reach one member: encode directly, cache only when it can repeat.
        let frame = if matched.len() == 1 {
            member.encoder.encode(&member.key.topic, &event)
        } else {
            let key = (member.encoder.id(), Arc::clone(&member.key.topic), Ids::of(&scratch.ids), data_at);
            scratch
                .frames
                .entry(key)
                .or_insert_with(|| member.encoder.encode(&member.key.topic, &event))
                .clone()
        };
        if let Some(frame) = frame {
            if member.outbox.send(frame, hub.metrics()) == crate::realtime::outbox::Queued::Yes {
                delivered += 1;
            }
        }
    }
    delivered
}
