//! Where initial snapshots are read: a connection pool of their own (so long snapshots never
//! starve row-level security checks) and the type catalog their rows are rendered with.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::replication::values::TypeCatalog;

/// Connections the snapshots of one gateway share (more snapshots wait for one).
pub const SNAPSHOT_CONNECTIONS: u32 = 4;

/// How long a snapshot waits for a connection of the pool before it is refused as busy.
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where snapshots are read: a pool of its own and the type catalog.
pub struct SnapshotSource {
    pub(crate) pool: PgPool,
    pub(crate) types: tokio::sync::Mutex<TypeCatalog>,
    /// How long, in all, a snapshot waits for its client to read (holding its transaction)
    /// before it gives up.
    pub(crate) client_wait: Duration,
}

impl std::fmt::Debug for SnapshotSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSource").finish_non_exhaustive()
    }
}

impl SnapshotSource {
    /// A source with its own pool, connecting as `pool` does (lazily); a snapshot gives up once
    /// it has waited `client_wait` in all for its client to read.
    pub fn new(pool: &PgPool, client_wait: Duration) -> SnapshotSource {
        let options = (*pool.connect_options()).clone();
        let pool = PgPoolOptions::new()
            .max_connections(SNAPSHOT_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        SnapshotSource { pool, types: tokio::sync::Mutex::new(TypeCatalog::default()), client_wait }
    }
}
