//! Fan-out: the subscription index and the dispatcher task that delivers each change to the
//! channels whose bindings match it.
//!
//! Owns: the index (table → equality index on one filter column + residual list), rendering each
//! change's `data` object once and framing it per channel (frames with the same topic and ids are
//! built once and shared by every socket), the dispatched-LSN watermark, and the slow-client
//! policy (a full outbound queue disconnects that client). Must not: await a client socket — it
//! only ever `try_send`s.

mod dispatch;
mod index;

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use dispatch::{dispatch, render_data, run_dispatcher, Scratch};
pub use index::{BindingSpec, EventFilter, SubId, SubscriptionIndex};

/// Counters shared by the fan-out, the sockets and `/metrics`.
#[derive(Debug, Default)]
pub struct FanoutMetrics {
    pub clients: AtomicI64,
    pub subscriptions: AtomicI64,
    pub changes_dispatched: AtomicU64,
    pub frames_delivered: AtomicU64,
    pub slow_client_disconnects: AtomicU64,
}

/// Where one joined channel's frames go.
#[derive(Debug)]
pub struct ChannelSink {
    /// Frame text up to and including `"ids":[`; differs per serializer version and topic.
    pub prefix: Bytes,
    /// Frame text after the `data` object.
    pub suffix: &'static [u8],
    /// The socket's bounded outbound queue.
    pub tx: mpsc::Sender<Utf8Bytes>,
    /// Cancelled to disconnect the socket (slow consumer).
    pub kill: CancellationToken,
}

/// The fan-out's shared state: cheap to clone.
#[derive(Clone)]
pub struct Fanout {
    pub index: Arc<std::sync::RwLock<SubscriptionIndex>>,
    pub metrics: Arc<FanoutMetrics>,
    /// End LSN of the last commit dispatched: what the replication task may confirm.
    pub dispatched: Arc<AtomicU64>,
}

impl Fanout {
    pub fn new() -> Fanout {
        Fanout {
            index: Arc::new(std::sync::RwLock::new(SubscriptionIndex::default())),
            metrics: Arc::new(FanoutMetrics::default()),
            dispatched: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Default for Fanout {
    fn default() -> Self {
        Fanout::new()
    }
}
