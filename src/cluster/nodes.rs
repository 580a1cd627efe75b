//! Which nodes are alive: each node keeps a key of its own (`<node_id>`, its listen address and
//! when it last wrote) in bucket `<prefix>_nodes`, rewritten every third of the lease; a value
//! older than three leases vanishes, and a node that stops cleanly deletes its key.
//!
//! Read by `/v1/cluster` and the node count in `/metrics`, and by whoever must act when a node
//! dies (its presences leave). Must not: decide slot ownership (the lease does).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::TryStreamExt;
use tokio_util::sync::CancellationToken;

use crate::cluster::{ClusterError, Nats};

/// One node as the registry last heard of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    pub listen: String,
    /// Unix milliseconds of its last heartbeat.
    pub last_seen: u64,
}

/// The registry, as one node uses it.
#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
    bucket: String,
    me: NodeInfo,
    every: Duration,
    /// How many nodes the last heartbeat saw alive (this one included).
    alive: Arc<AtomicUsize>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Registry {
    /// The registry, for node `node_id` serving at `listen`, heartbeats a third of `lease` apart.
    pub async fn open(
        nats: &Nats,
        node_id: &str,
        listen: String,
        lease: Duration,
    ) -> Result<Registry, ClusterError> {
        let bucket = format!("{}_nodes", nats.prefix);
        let kv = nats.bucket_with_age(&bucket, "walcast: the nodes that are alive", lease * 3).await?;
        let me = NodeInfo { node_id: node_id.to_owned(), listen, last_seen: 0 };
        Ok(Registry { kv, bucket, me, every: lease / 3, alive: Arc::new(AtomicUsize::new(0)) })
    }

    fn write_error(&self, source: async_nats::Error) -> ClusterError {
        ClusterError::Write { bucket: self.bucket.clone(), key: self.me.node_id.clone(), source }
    }

    /// Writes this node's heartbeat.
    pub async fn beat(&self) -> Result<(), ClusterError> {
        let info = NodeInfo { last_seen: now_ms(), ..self.me.clone() };
        let value = Bytes::from(serde_json::to_vec(&info).unwrap_or_default());
        self.kv.put(self.me.node_id.as_str(), value).await.map_err(|e| self.write_error(e.into()))?;
        Ok(())
    }

    /// Heartbeats until `shutdown`, then removes this node's key.
    pub async fn keep_alive(self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.beat().await {
                tracing::warn!(error = %crate::errors::chain(&e), "cluster: heartbeat not written");
            }
            if let Ok(nodes) = self.list().await {
                self.alive.store(nodes.len(), Ordering::Relaxed);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.every) => {}
            }
        }
        if let Err(e) = self.kv.delete(self.me.node_id.as_str()).await {
            tracing::debug!(error = %e, "cluster: this node's key not removed; it expires instead");
        }
    }

    /// How many nodes the last heartbeat saw alive.
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::Relaxed)
    }

    /// The nodes alive now, by name.
    pub async fn list(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        let read = |source: async_nats::Error| ClusterError::Bucket { bucket: self.bucket.clone(), source };
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(keys) => keys.try_collect().await.map_err(|e| read(e.into()))?,
            Err(e) => return Err(read(e.into())),
        };
        let mut nodes = Vec::with_capacity(keys.len());
        for key in keys {
            let entry = self.kv.entry(key.as_str()).await.map_err(|e| read(e.into()))?;
            if let Some(e) = entry.filter(|e| e.operation == Operation::Put) {
                if let Ok(info) = serde_json::from_slice::<NodeInfo>(&e.value) {
                    nodes.push(info);
                }
            }
        }
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(nodes)
    }
}
