//! One channel's state in the registry: its members and its presence table.

use std::sync::Arc;

use crate::realtime::member::Member;
use crate::realtime::presence::PresenceTable;

/// A channel's members (who receive broadcasts and presence diffs) and presence.
#[derive(Debug, Default)]
pub(crate) struct Channel {
    pub(crate) members: Vec<Arc<Member>>,
    pub(crate) presence: PresenceTable,
}
