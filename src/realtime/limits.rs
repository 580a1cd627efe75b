//! The core's limits (from the configuration) and counters (read by `/metrics`).
//! Must not: hold anything but plain values and atomics.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

/// Per-session limits, with Supabase's defaults (see `config.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Frames queued per session before it counts as too slow.
    pub client_queue: usize,
    pub max_channels: usize,
    /// `postgres_changes` bindings per join.
    pub max_bindings: usize,
    /// Rows one live query's result may hold.
    pub max_live_rows: usize,
    pub max_joins_per_second: u32,
    pub max_events_per_second: u32,
    /// Presence events (track/untrack) per `presence_window`.
    pub max_presence_events: u32,
    pub presence_window: Duration,
    pub max_presence_payload_bytes: usize,
    pub max_broadcast_payload_bytes: usize,
    /// `postgres_changes` records larger than this are sent with only their small values.
    pub max_record_bytes: usize,
    /// How long a connection that must authenticate by message (`/v1/ws`) has to do so.
    pub auth_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let c = crate::config::Config::default();
        Limits::from_config(&c)
    }
}

impl Limits {
    pub fn from_config(c: &crate::config::Config) -> Limits {
        Limits {
            client_queue: c.client_queue,
            max_channels: c.max_channels_per_socket,
            max_bindings: c.max_bindings_per_join,
            max_live_rows: c.max_live_rows,
            max_joins_per_second: c.max_joins_per_second,
            max_events_per_second: c.max_events_per_second,
            max_presence_events: c.max_presence_events,
            presence_window: Duration::from_secs(c.presence_window_secs),
            max_presence_payload_bytes: c.max_presence_payload_bytes,
            max_broadcast_payload_bytes: c.max_broadcast_payload_bytes,
            max_record_bytes: c.max_record_bytes,
            auth_timeout: Duration::from_secs(c.auth.timeout_secs),
        }
    }
}

/// Counters shared by the core, the transports and `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub clients: AtomicI64,
    pub channels: AtomicI64,
    pub subscriptions: AtomicI64,
    pub changes_dispatched: AtomicU64,
    pub frames_delivered: AtomicU64,
    pub slow_client_disconnects: AtomicU64,
    /// Event streams that fell behind and went on from the change log instead of being dropped.
    pub slow_client_catchups: AtomicU64,
    pub broadcasts_received: AtomicU64,
    /// Binary broadcasts a member's encoding could not carry (Phoenix 1.0.0).
    pub broadcasts_undeliverable: AtomicU64,
    pub presence_events: AtomicU64,
    pub rate_limited: AtomicU64,
    /// `walcast.rls_check` calls (one per table per batch of changes).
    pub rls_checks: AtomicU64,
    /// Change deliveries withheld by row-level security (per subscriber and change).
    pub rls_withheld: AtomicU64,
    /// Tokens refused (connect, join, refresh, REST) and channels closed when their token expired.
    pub auth_refused: AtomicU64,
}
