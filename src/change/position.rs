//! Where an event stands in the commit order. Must not: know what the event is.

use crate::replication::lsn::Lsn;

/// Where an event stands in the total commit order: its transaction's commit LSN, then its place
/// in the transaction (changes and database broadcasts share one count, from 0). A position is
/// stable across gateway restarts: decoding the same WAL numbers it the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub lsn: Lsn,
    pub seq: u32,
}

impl Position {
    pub const ZERO: Position = Position { lsn: Lsn::ZERO, seq: 0 };

    /// After every event of the transaction committed at `lsn` (a commit's own position).
    pub fn end_of(lsn: Lsn) -> Position {
        Position { lsn, seq: u32::MAX }
    }
}
