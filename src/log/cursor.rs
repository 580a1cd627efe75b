//! Cursors (an epoch and a position, printed as 32 hexadecimal digits) and the gap rule's
//! answers: why a cursor cannot be resumed from.
//!
//! Must not: read files; the log decides whether a cursor is still covered.

use crate::change::Position;
use crate::replication::lsn::Lsn;

/// An opaque, ordered resume token: the log's epoch and a position. Printed as 32 upper-case
/// hexadecimal digits; within one epoch, cursors order as their strings do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub epoch: u32,
    pub position: Position,
}

impl Cursor {
    /// The 32 hexadecimal digits (epoch, LSN, place in the transaction), without the
    /// formatting machinery: this runs once per change delivered.
    pub fn to_hex(&self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = [0u8; 32];
        let mut put = |at: usize, width: usize, v: u64| {
            for i in 0..width {
                out[at + i] = DIGITS[((v >> (4 * (width - 1 - i))) & 0xF) as usize];
            }
        };
        put(0, 8, u64::from(self.epoch));
        put(8, 16, self.position.lsn.0);
        put(24, 8, u64::from(self.position.seq));
        out
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hexadecimal digits are ASCII.
        f.write_str(std::str::from_utf8(&self.to_hex()).unwrap_or_default())
    }
}

/// The text is not a cursor walcast issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid cursor {0:?}: expected the 32 hexadecimal digits of a delivered change's cursor, or an \
     ISO 8601 commit timestamp with a zone"
)]
pub struct ParseCursorError(pub String);

impl std::str::FromStr for Cursor {
    type Err = ParseCursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseCursorError(s.chars().take(64).collect());
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let epoch = u32::from_str_radix(&s[..8], 16).map_err(|_| err())?;
        let lsn = u64::from_str_radix(&s[8..24], 16).map_err(|_| err())?;
        let seq = u32::from_str_radix(&s[24..], 16).map_err(|_| err())?;
        Ok(Cursor { epoch, position: Position { lsn: Lsn(lsn), seq } })
    }
}

/// Why a resume cannot continue without a gap: the client must load its state again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Gap {
    #[error("the cursor is older than the retained change log")]
    Expired,
    #[error("the cursor belongs to another change log (another database, slot, or a log that was reset)")]
    OtherLog,
    #[error("this gateway keeps no change log")]
    NoLog,
}

impl Gap {
    /// A short machine-readable reason.
    pub fn code(self) -> &'static str {
        match self {
            Gap::Expired => "expired",
            Gap::OtherLog => "other_log",
            Gap::NoLog => "no_log",
        }
    }
}
