//! Client wire formats, one module each. A protocol module decodes client frames into session
//! calls and implements `realtime::outbox::Encoder` for the core's events; it never touches
//! sockets or the database.

pub mod phoenix;
pub mod plain;
pub mod sse;
