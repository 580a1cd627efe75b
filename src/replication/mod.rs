//! Change capture: the walsender client, the pgoutput decoder, value rendering, slot lifecycle
//! and the replication task that ties them together.

pub mod ack;
pub mod lsn;
pub mod pgoutput;
pub mod slot;
pub mod stream;
pub mod values;
pub mod wire;
