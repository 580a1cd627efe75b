//! Where the dispatcher's events come from: today the walsender of the replication slot
//! (`walsender`), turned into `ChangeEvent`s in commit order.
//!
//! Must not: match, authorize or deliver; that is the core's work.

pub mod walsender;
