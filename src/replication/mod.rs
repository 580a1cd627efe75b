//! Change capture: the walsender client, the pgoutput decoder, value rendering and the slot
//! lifecycle. The task that streams a slot into `Change`s is `source::walsender`, a floor up.

pub mod ack;
pub mod lsn;
pub mod pgoutput;
pub mod slot;
pub mod values;
pub mod wire;
