//! GraphQL: a schema built from the publication's catalog (`schema.rs`), its subscriptions fed
//! by sessions of the core (`feed.rs`), and the two GraphQL-over-WebSocket protocols
//! (`wire.rs`: `graphql-transport-ws`, and the legacy `graphql-ws`).
//!
//! Queries (`_health`, introspection) and subscriptions are parsed, validated and executed by
//! `async-graphql`; its own WebSocket driver is not used, since the protocol's close codes (4400
//! bad message, 4401 unauthorized, 4403 forbidden, 4408 init timeout, 4409 duplicate id, 4429
//! too many init requests) are part of what clients rely on.
//!
//! Must not: touch sockets (the server's GraphQL handler does) or reach into the core beyond a
//! session.

pub mod feed;
pub mod results;
pub mod schema;
pub mod where_filter;
pub mod wire;
