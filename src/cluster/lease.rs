//! The slot owner's lease: one key in a JetStream key-value bucket (`<prefix>_lease`, key
//! `slot-<slot>`) whose value names the node that holds it.
//!
//! Taking and renewing are compare-and-set writes on the key's revision, so of any number of
//! nodes that try at once exactly one succeeds, and the revision it got is its fencing token.
//! Expiry is judged without clocks: a contender takes the lease only once it has seen the same
//! revision, unrenewed, for a whole `ttl` of its own time; the holder counts its lease as valid
//! only until `ttl` (less a margin) after it *sent* its last successful renewal, which is before
//! any contender can have seen that revision. So the holder stops acting as owner before anyone
//! else may start (clock rates aside, which the margin covers).
//!
//! Must not: act on the slot; the owner task does, only while `Held::valid`.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};

use bytes::Bytes;

use crate::cluster::{ClusterError, Nats};

/// The share of `ttl` the holder gives up early: clock rates differ, a little.
const MARGIN: f64 = 0.2;

/// The lease of one slot, as one node sees it.
#[derive(Clone)]
pub struct Lease {
    kv: kv::Store,
    bucket: String,
    key: String,
    node: String,
    ttl: Duration,
}

/// The lease, held by this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The revision of the key this node wrote last: the fencing token.
    pub revision: u64,
    /// When the write that produced `revision` was sent.
    sent: Instant,
}

/// What a contender has seen: the key's revision, since when (its own time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub revision: u64,
    since: Instant,
}

/// Who holds the lease, as far as one read tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Nobody,
    Node { node: String, revision: u64 },
}

/// Why a renewal did not extend the lease.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// Another node wrote the key since: the lease is gone for good.
    #[error("the lease was taken by another node")]
    Lost,
    /// The write did not get through (NATS away, a timeout): the lease stays valid until its
    /// time runs out, and the next renewal may still succeed.
    #[error(transparent)]
    Unreachable(ClusterError),
}

impl Held {
    /// Whether this node may still act as the owner: less than `ttl` (less the margin) since the
    /// last successful write was sent.
    pub fn valid(&self, ttl: Duration) -> bool {
        !self.time_left(ttl).is_zero()
    }

    /// How long this node may still act as the owner without another successful write.
    pub fn time_left(&self, ttl: Duration) -> Duration {
        ttl.mul_f64(1.0 - MARGIN).saturating_sub(self.sent.elapsed())
    }
}

impl Lease {
    /// The lease of `slot` in this cluster (the bucket is created if missing).
    pub async fn open(nats: &Nats, slot: &str, node: &str, ttl: Duration) -> Result<Lease, ClusterError> {
        let bucket = format!("{}_lease", nats.prefix);
        let kv = nats.bucket(&bucket, "walcast: which node streams each replication slot").await?;
        Ok(Lease { kv, bucket, key: format!("slot-{slot}"), node: node.to_owned(), ttl })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Who holds the lease now (a deleted key: nobody).
    pub async fn holder(&self) -> Result<Holder, ClusterError> {
        let entry = self.kv.entry(self.key.as_str()).await.map_err(|source| ClusterError::Read {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            source,
        })?;
        Ok(match entry {
            Some(e) if e.operation == Operation::Put => Holder::Node {
                node: serde_json::from_slice::<serde_json::Value>(&e.value)
                    .ok()
                    .and_then(|v| v["node"].as_str().map(str::to_owned))
                    .unwrap_or_default(),
                revision: e.revision,
            },
            _ => Holder::Nobody,
        })
    }

    /// One try at taking the lease: when nobody holds it, or its holder has not renewed it for a
    /// whole `ttl` since this node first saw its current revision (`seen` keeps that between
    /// tries). `Ok(None)`: not taken (held by a live node, or another contender won the write).
    pub async fn try_take(&self, seen: &mut Option<Seen>) -> Result<Option<Held>, ClusterError> {
        let sent = Instant::now();
        let result = match self.holder().await? {
            Holder::Nobody => self.kv.create(self.key.as_str(), self.value()).await.map_err(|e| {
                let lost = e.kind() == kv::CreateErrorKind::AlreadyExists;
                (lost, async_nats::Error::from(e))
            }),
            Holder::Node { revision, .. } => {
                let expired = match seen {
                    Some(s) if s.revision == revision => s.since.elapsed() >= self.ttl,
                    _ => {
                        *seen = Some(Seen { revision, since: Instant::now() });
                        false
                    }
                };
                if !expired {
                    return Ok(None);
                }
                self.kv.update(self.key.as_str(), self.value(), revision).await.map_err(|e| {
                    let lost = e.kind() == UpdateErrorKind::WrongLastRevision;
                    (lost, async_nats::Error::from(e))
                })
            }
        };
        match result {
            Ok(revision) => {
                *seen = None;
                Ok(Some(Held { revision, sent }))
            }
            Err((true, _)) => Ok(None),
            Err((false, source)) => Err(self.write_error(source)),
        }
    }

    /// Extends the lease: a write at the held revision, which fails if anyone wrote since.
    pub async fn renew(&self, held: &mut Held) -> Result<(), RenewError> {
        let sent = Instant::now();
        match self.kv.update(self.key.as_str(), self.value(), held.revision).await {
            Ok(revision) => {
                *held = Held { revision, sent };
                Ok(())
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Err(RenewError::Lost),
            Err(e) => Err(RenewError::Unreachable(self.write_error(e.into()))),
        }
    }

    /// Gives the lease up (a clean stop), so that another node takes it at once rather than
    /// after `ttl`. Does nothing if another node holds it by now.
    pub async fn release(&self, held: Held) -> Result<(), ClusterError> {
        match self.kv.delete_expect_revision(self.key.as_str(), Some(held.revision)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(()),
            Err(e) => Err(self.write_error(e.into())),
        }
    }

    fn value(&self) -> Bytes {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Bytes::from(serde_json::json!({"node": self.node, "renewed_at_ms": at}).to_string())
    }

    fn write_error(&self, source: async_nats::Error) -> ClusterError {
        ClusterError::Write { bucket: self.bucket.clone(), key: self.key.clone(), source }
    }
}
