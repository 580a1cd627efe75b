//! The realtime core, independent of any wire format or transport.
//!
//! Inside `realtime/`, files import each other's items from the file that defines them (the
//! re-exports below are for the rest of the crate), so no file imports one that imports it.
//!
//! - [`Hub`] — the shared state: the `postgres_changes` subscription index, the channel
//!   registry (topic → broadcast members + presence), limits and metrics.
//! - [`session::Session`] — one connected client as a plain state machine: its joined channels,
//!   its limits, its outbox. Transports (WebSocket today; SSE, plain WebSocket later) decode
//!   their input into session calls and write what the outbox yields.
//! - [`index`] / [`dispatch`] — matching committed changes to bindings and delivering them.
//! - [`presence`], [`broadcast`] — the two pub-sub features; [`bus`] is the seam through which
//!   they reach other gateway nodes.
//! - [`live_set`] — what a live query holds (the keys of its result) and the enter / update /
//!   leave a change makes of it; [`live_query`] — a member's live query, whose steps become
//!   messages as they pass the member's gate.
//! - [`outbox`] — encoded frames, the [`outbox::Encoder`] seam that protocol modules implement,
//!   and the slow-client policy.
//!
//! Must not: touch sockets, know a wire format, or await a client.

pub mod broadcast;
pub mod bus;
mod channel;
pub mod dispatch;
pub mod gate;
pub mod hub;
pub mod index;
pub mod limits;
pub mod live_query;
pub mod live_set;
pub mod member;
pub mod outbox;
pub mod presence;
mod registry;
pub mod resume;
pub mod session;
pub mod snapshot;
pub mod snapshot_source;

pub use hub::{Hub, HubParts};
pub use limits::{Limits, Metrics};
pub use member::{channel_name, Member, MemberId, SessionId, TopicKey, READS_BROADCAST, READS_PRESENCE};
