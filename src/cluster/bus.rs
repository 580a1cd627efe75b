//! Broadcast and presence between nodes: plain NATS publish/subscribe on `<prefix>.bus`
//! (ephemeral, as broadcasts are on a single node; database broadcasts are not sent here, every
//! node reads them from the stream).
//!
//! Each message names its sender by its member-id seed (`Hub::member_seed`). A node says hello
//! every third of the lease; one not heard from for a whole lease is gone, and every other node
//! removes its presences (its members' leaves reach theirs). A node that hears a seed it does
//! not know (a new node, or one back from an outage) sends its own presences, so presence state
//! is the same everywhere. Private-channel checks stay where the member is (they ran at join).
//!
//! Wire: a JSON header line, then (broadcasts only) the payload bytes as they came. Decoding
//! never panics; anything malformed is dropped and counted in the log.
//! Must not: touch the change stream, or deliver a message back to the node that sent it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::change::broadcast::{BroadcastMessage, BroadcastPayload};
use crate::cluster::Nats;
use crate::realtime::bus::{BusMessage, Peers};
use crate::realtime::member::TopicKey;
use crate::realtime::presence::{PresenceDiff, PresenceMeta};
use crate::realtime::Hub;

/// Messages waiting to go out; more are dropped (and logged) rather than block a session.
const QUEUE: usize = 4096;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Header {
    Hello { seed: u64 },
    Broadcast { seed: u64, topic: String, private: bool, event: String, binary: bool, meta: Option<String> },
    Presence { seed: u64, topic: String, private: bool, joins: Vec<WireMeta>, leaves: Vec<WireMeta> },
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct WireMeta {
    key: String,
    phx_ref: String,
    member: u64,
    payload: String,
    json: String,
}

/// Why a bus message was dropped.
#[derive(Debug, thiserror::Error)]
pub enum BusDecodeError {
    #[error("no header line")]
    NoHeader,
    #[error("unreadable header: {0}")]
    Header(#[from] serde_json::Error),
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn to_wire(items: &[(Arc<str>, PresenceMeta)]) -> Vec<WireMeta> {
    items
        .iter()
        .map(|(key, m)| WireMeta {
            key: key.to_string(),
            phx_ref: m.phx_ref.to_string(),
            member: m.member,
            payload: text(&m.payload),
            json: text(&m.json),
        })
        .collect()
}

fn from_wire(items: Vec<WireMeta>) -> Vec<(Arc<str>, PresenceMeta)> {
    items
        .into_iter()
        .map(|w| {
            let meta = PresenceMeta {
                phx_ref: w.phx_ref.into(),
                member: w.member,
                payload: Bytes::from(w.payload),
                json: Bytes::from(w.json),
            };
            (Arc::from(w.key), meta)
        })
        .collect()
}

/// A message for the other nodes, from the node with `seed`.
pub fn encode(seed: u64, message: &BusMessage) -> Bytes {
    let (header, payload) = match message {
        BusMessage::Broadcast { key, message, .. } => {
            let (binary, payload) = match &message.payload {
                BroadcastPayload::Json(b) => (false, b.clone()),
                BroadcastPayload::Binary(b) => (true, b.clone()),
            };
            let header = Header::Broadcast {
                seed,
                topic: key.topic.to_string(),
                private: key.private,
                event: message.event.clone(),
                binary,
                meta: message.meta.as_ref().map(text),
            };
            (header, payload)
        }
        BusMessage::Presence { key, diff } => {
            let header = Header::Presence {
                seed,
                topic: key.topic.to_string(),
                private: key.private,
                joins: to_wire(&diff.joins),
                leaves: to_wire(&diff.leaves),
            };
            (header, Bytes::new())
        }
    };
    frame(&header, &payload)
}

fn frame(header: &Header, payload: &[u8]) -> Bytes {
    let head = serde_json::to_vec(header).unwrap_or_default();
    let mut out = BytesMut::with_capacity(head.len() + 1 + payload.len());
    out.put_slice(&head);
    out.put_u8(b'\n');
    out.put_slice(payload);
    out.freeze()
}

/// What a received message says: its sender's seed and, unless it is a hello, the message.
pub fn decode(bytes: &Bytes) -> Result<(u64, Option<BusMessage>), BusDecodeError> {
    let end = bytes.iter().position(|b| *b == b'\n').ok_or(BusDecodeError::NoHeader)?;
    let header: Header = serde_json::from_slice(&bytes[..end])?;
    let payload = bytes.slice(end + 1..);
    Ok(match header {
        Header::Hello { seed } => (seed, None),
        Header::Broadcast { seed, topic, private, event, binary, meta } => {
            let payload =
                if binary { BroadcastPayload::Binary(payload) } else { BroadcastPayload::Json(payload) };
            let message = BroadcastMessage { event, payload, meta: meta.map(Bytes::from), logged: None };
            let key = TopicKey { topic: topic.into(), private };
            (seed, Some(BusMessage::Broadcast { key, origin: None, message: Arc::new(message) }))
        }
        Header::Presence { seed, topic, private, joins, leaves } => {
            let diff = PresenceDiff { joins: from_wire(joins), leaves: from_wire(leaves) };
            (seed, Some(BusMessage::Presence { key: TopicKey { topic: topic.into(), private }, diff }))
        }
    })
}

/// This node's side of the bus, as the core's `Peers`.
pub struct NatsPeers {
    out: mpsc::Sender<BusMessage>,
}

impl Peers for NatsPeers {
    fn forward(&self, message: &BusMessage) {
        if self.out.try_send(message.clone()).is_err() {
            tracing::warn!("cluster bus: the queue to NATS is full; a broadcast or presence change did not reach other nodes");
        }
    }
}

/// The peers handle for the core and the queue the bus task sends from.
pub fn peers() -> (Arc<NatsPeers>, mpsc::Receiver<BusMessage>) {
    let (out, rx) = mpsc::channel(QUEUE);
    (Arc::new(NatsPeers { out }), rx)
}

/// Sends this node's messages and hellos, delivers the other nodes' messages to `hub`, and
/// drops the presences of nodes not heard from for `lease`, until `shutdown`.
pub async fn run(
    nats: Nats,
    hub: Hub,
    mut outgoing: mpsc::Receiver<BusMessage>,
    lease: Duration,
    shutdown: CancellationToken,
) {
    let subject = format!("{}.bus", nats.prefix);
    let seed = hub.member_seed();
    let mut incoming = loop {
        match nats.client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "cluster bus: subscribing failed; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut seen: HashMap<u64, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(lease / 3);
    let send = |bytes: Bytes| {
        let (client, subject) = (nats.client.clone(), subject.clone());
        async move {
            if let Err(e) = client.publish(subject, bytes).await {
                tracing::warn!(error = %e, "cluster bus: not sent");
            }
        }
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            Some(message) = outgoing.recv() => send(encode(seed, &message)).await,
            message = incoming.next() => {
                let Some(message) = message else { return };
                let (from, message) = match decode(&message.payload) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster bus: a malformed message was dropped");
                        continue;
                    }
                };
                if from == seed {
                    continue;
                }
                if seen.insert(from, Instant::now()).is_none() {
                    tracing::info!(node_seed = from, "cluster bus: a node appeared; sending it this node's presences");
                    for (key, diff) in hub.own_presences() {
                        send(encode(seed, &BusMessage::Presence { key, diff })).await;
                    }
                }
                if let Some(message) = message {
                    hub.deliver(&message);
                }
            }
            _ = tick.tick() => {
                send(frame(&Header::Hello { seed }, &[])).await;
                let gone: Vec<u64> =
                    seen.iter().filter(|(_, at)| at.elapsed() >= lease).map(|(s, _)| *s).collect();
                for s in gone {
                    seen.remove(&s);
                    tracing::warn!(node_seed = s, "cluster bus: a node went silent; its presences leave");
                    hub.drop_presences_of(s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(member: u64) -> PresenceMeta {
        PresenceMeta {
            phx_ref: "ref1".into(),
            member,
            payload: Bytes::from_static(b"{\"name\":\"a\"}"),
            json: Bytes::from_static(b"{\"phx_ref\":\"ref1\",\"name\":\"a\"}"),
        }
    }

    #[test]
    fn messages_cross_as_they_were_sent() {
        let key = TopicKey { topic: "realtime:room".into(), private: true };
        for payload in [
            BroadcastPayload::Json(Bytes::from_static(b"{\"x\":\n1}")),
            BroadcastPayload::Binary(Bytes::from_static(b"\x00\n\xff")),
        ] {
            let message = BroadcastMessage {
                event: "cursor".into(),
                payload: payload.clone(),
                meta: Some(Bytes::from_static(b"{\"id\":\"1\"}")),
                logged: None,
            };
            let sent =
                BusMessage::Broadcast { key: key.clone(), origin: Some(7), message: Arc::new(message) };
            let (seed, got) = decode(&encode(42, &sent)).unwrap();
            let Some(BusMessage::Broadcast { key: k, origin, message }) = got else { panic!("{got:?}") };
            assert_eq!((seed, k, origin), (42, key.clone(), None), "a sender's member is not a member here");
            assert_eq!((message.event.as_str(), &message.payload), ("cursor", &payload));
            assert_eq!(message.meta.as_deref(), Some(&b"{\"id\":\"1\"}"[..]));
        }
        let diff =
            PresenceDiff { joins: vec![("k".into(), meta(5 << 40))], leaves: vec![("j".into(), meta(6))] };
        let (_, got) =
            decode(&encode(3, &BusMessage::Presence { key: key.clone(), diff: diff.clone() })).unwrap();
        let Some(BusMessage::Presence { key: k, diff: d }) = got else { panic!("{got:?}") };
        assert_eq!((k, d), (key, diff));
        assert_eq!(decode(&frame(&Header::Hello { seed: 9 }, &[])).unwrap().0, 9);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"no newline",
            b"{}\n",
            b"{\"kind\":\"broadcast\"}\n",
            b"\xff\xfe\n",
            b"[1,2]\nxx",
            b"{\"kind\":\"hello\",\"seed\":-1}\n",
        ] {
            assert!(decode(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
        for _ in 0..2000 {
            let len = fastrand::usize(..64);
            let bytes: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
            let _ = decode(&Bytes::from(bytes));
        }
    }
}
