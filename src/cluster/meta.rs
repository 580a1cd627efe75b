//! What every node of a cluster must agree on before it reads the stream: the stream's epoch,
//! and which database and slot the stream carries. Key `stream` of bucket `<prefix>_meta`,
//! written once by the first node (a create, so of nodes starting together one wins) and read
//! by every later one.
//!
//! Every node's change log takes this epoch, so a cursor made on one node is valid on all.
//! Must not: be rewritten while nodes run (a new epoch would strand every cursor).

use async_nats::jetstream::kv::{CreateErrorKind, Operation};
use bytes::Bytes;

use crate::cluster::{ClusterError, Nats};
use crate::log::Identity;

const KEY: &str = "stream";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Meta {
    epoch: u32,
    #[serde(flatten)]
    identity: Identity,
}

/// The cluster's stream epoch for `identity`: the one recorded, or a new one recorded now.
/// Refuses a cluster whose stream carries another database or slot (two deployments sharing
/// one prefix).
pub async fn stream_epoch(nats: &Nats, identity: &Identity) -> Result<u32, ClusterError> {
    let bucket = format!("{}_meta", nats.prefix);
    let kv = nats.bucket(&bucket, "walcast: the stream's epoch and the stream it carries").await?;
    let read = |source| ClusterError::Read { bucket: bucket.clone(), key: KEY.into(), source };
    loop {
        if let Some(entry) = kv.entry(KEY).await.map_err(read)? {
            if entry.operation == Operation::Put {
                let meta: Meta = serde_json::from_slice(&entry.value).map_err(|e| ClusterError::Write {
                    bucket: bucket.clone(),
                    key: KEY.into(),
                    source: format!("unreadable value: {e}").into(),
                })?;
                if meta.identity != *identity {
                    return Err(ClusterError::OtherStream {
                        prefix: nats.prefix.clone(),
                        theirs: format!(
                            "system {}, database {}, slot {}",
                            meta.identity.system_id, meta.identity.database, meta.identity.slot
                        ),
                    });
                }
                return Ok(meta.epoch);
            }
        }
        let epoch = loop {
            let e = fastrand::u32(..);
            if e != 0 {
                break e;
            }
        };
        let value =
            Bytes::from(serde_json::to_vec(&Meta { epoch, identity: identity.clone() }).unwrap_or_default());
        match kv.create(KEY, value).await {
            Ok(_) => {
                tracing::info!(epoch = format_args!("{epoch:08X}"), "cluster: a new stream epoch");
                return Ok(epoch);
            }
            // Another node was first: read its epoch.
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(ClusterError::Write { bucket: bucket.clone(), key: KEY.into(), source: e.into() })
            }
        }
    }
}
