//! Several gateway nodes over NATS JetStream: the connection, the slot owner's lease, and (as
//! they land) the stream of committed events every node consumes and the bus that carries
//! broadcasts and presence between nodes.
//!
//! Owns: the NATS connection and the JetStream names (`<prefix>_lease`, …). Must not: match,
//! authorize or deliver (the core does, on every node alike), or touch client sockets.

pub mod bus;
pub mod chunk;
pub mod consume;
pub mod follow;
pub mod lease;
pub mod meta;
pub mod nodes;
pub mod owner;
pub mod publish;
pub mod stream;
pub mod view;

use std::time::Duration;

use async_nats::jetstream;

use crate::config::ClusterConfig;

/// Why the cluster could not be joined or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("connecting to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("JetStream bucket {bucket}: creating or opening it failed")]
    Bucket {
        bucket: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("JetStream bucket {bucket}: reading {key}")]
    Read {
        bucket: String,
        key: String,
        #[source]
        source: jetstream::kv::EntryError,
    },
    #[error("the cluster's stream (prefix {prefix:?}) carries another stream ({theirs}); give this deployment its own cluster.prefix")]
    OtherStream { prefix: String, theirs: String },
    #[error("JetStream bucket {bucket}: writing {key}")]
    Write {
        bucket: String,
        key: String,
        #[source]
        source: async_nats::Error,
    },
}

/// This node's name: `cluster.node_id`, or the one kept in the change log directory's
/// `node-id` file (made on first start: `node-` and 8 random hexadecimal digits), so that a node
/// restarted on the same data keeps its name.
pub fn node_id(cluster: &ClusterConfig, log_dir: &std::path::Path) -> std::io::Result<String> {
    if let Some(id) = &cluster.node_id {
        return Ok(id.clone());
    }
    let path = log_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(log_dir)?;
    let id = format!("node-{:08x}", fastrand::u32(..));
    let tmp = log_dir.join("node-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// A node's connection to the cluster.
#[derive(Clone, Debug)]
pub struct Nats {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub prefix: String,
    pub replicas: usize,
}

impl Nats {
    /// Connects to `config.nats_url` (it retries while the server is away, as every later
    /// reconnect does); the node's name goes with the connection, for the server's monitoring.
    pub async fn connect(config: &ClusterConfig, node_id: &str) -> Result<Nats, ClusterError> {
        let url = config.nats_url.clone().unwrap_or_default();
        let client = async_nats::ConnectOptions::new()
            .name(format!("walcast {node_id}"))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(5)))
            .max_reconnects(None)
            .connect(url.as_str())
            .await
            .map_err(|source| ClusterError::Connect { url: crate::config::redact_nats_urls(&url), source })?;
        let jetstream = jetstream::new(client.clone());
        Ok(Nats { client, jetstream, prefix: config.prefix.clone(), replicas: config.replicas })
    }

    /// A key-value bucket of the cluster (one value per key), created if missing. Its stream is
    /// made here, as the key-value convention lays it out (`KV_<bucket>`, subjects
    /// `$KV.<bucket>.>`), because the client's own bucket creation first asks for account
    /// details in a shape the 2.9 servers Debian ships do not answer in.
    pub async fn bucket(
        &self,
        bucket: &str,
        description: &str,
    ) -> Result<jetstream::kv::Store, ClusterError> {
        self.bucket_with_age(bucket, description, Duration::ZERO).await
    }

    /// A bucket whose values vanish `max_age` after their last write (zero: never).
    pub async fn bucket_with_age(
        &self,
        bucket: &str,
        description: &str,
        max_age: Duration,
    ) -> Result<jetstream::kv::Store, ClusterError> {
        let failed = |source: async_nats::Error| ClusterError::Bucket { bucket: bucket.to_owned(), source };
        let config = jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(description.to_owned()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: self.replicas,
            discard: jetstream::stream::DiscardPolicy::New,
            max_age,
            ..Default::default()
        };
        self.jetstream.get_or_create_stream(config).await.map_err(|e| failed(e.into()))?;
        self.jetstream.get_key_value(bucket).await.map_err(|e| failed(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_its_derived_name_across_restarts() {
        let dir = std::env::temp_dir().join(format!(
            "walcast-node-id-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let config = ClusterConfig::default();
        let first = node_id(&config, &dir).unwrap();
        assert!(first.starts_with("node-") && first.len() == 13, "{first}");
        assert_eq!(node_id(&config, &dir).unwrap(), first);
        let named = ClusterConfig { node_id: Some("edge-1".into()), ..ClusterConfig::default() };
        assert_eq!(node_id(&named, &dir).unwrap(), "edge-1");
        let other = dir.join("other");
        assert_ne!(node_id(&config, &other).unwrap(), first);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
