//! A node's view of its cluster for operators: `/v1/cluster` (who owns the slot, which nodes are
//! alive, what the stream holds) and the cluster gauges of `/metrics`.
//!
//! Must not: change anything it reports on.

use std::sync::Arc;

use crate::cluster::lease::{Holder, Lease};
use crate::cluster::nodes::Registry;
use crate::cluster::owner::Ownership;
use crate::cluster::stream::ChangeStream;
use crate::source::walsender::ReplicationStatus;

/// What one node knows of its cluster.
pub struct View {
    pub node_id: String,
    pub epoch: u32,
    pub lease: Lease,
    pub registry: Registry,
    pub stream: ChangeStream,
    pub ownership: Ownership,
    /// The walsender's status while this node owns the slot.
    pub slot_status: Arc<ReplicationStatus>,
}

/// A cursor's text for a position of the stream.
fn cursor(epoch: u32, p: crate::change::Position) -> String {
    crate::log::Cursor { epoch, position: p }.to_string()
}

impl View {
    /// Whether this node owns the slot now.
    pub fn owner(&self) -> bool {
        self.ownership.now()
    }

    /// `/v1/cluster`'s body. What cannot be read (NATS away) is `null`, with an `error`.
    pub async fn describe(&self) -> serde_json::Value {
        let mut errors = Vec::new();
        let owner = match self.lease.holder().await {
            Ok(Holder::Node { node, .. }) => Some(node),
            Ok(Holder::Nobody) => None,
            Err(e) => {
                errors.push(crate::errors::chain(&e));
                None
            }
        };
        let nodes = self.registry.list().await.unwrap_or_else(|e| {
            errors.push(crate::errors::chain(&e));
            Vec::new()
        });
        let stream = match (self.stream.tail().await, self.stream.begins_after().await) {
            (Ok(tail), Ok(begins)) => serde_json::json!({
                "first": begins.map(|p| cursor(self.epoch, p)),
                "last": tail.through.map(|p| cursor(self.epoch, p)),
                "last_sequence": tail.sequence,
                "changes": tail.changes,
            }),
            (Err(e), _) | (_, Err(e)) => {
                errors.push(crate::errors::chain(&e));
                serde_json::Value::Null
            }
        };
        let mut body = serde_json::json!({
            "node_id": self.node_id,
            "owner": owner,
            "this_node_owns_the_slot": self.owner(),
            "nodes": nodes,
            "stream": stream,
        });
        if !errors.is_empty() {
            body["error"] = serde_json::Value::from(errors.join("; "));
        }
        body
    }
}
