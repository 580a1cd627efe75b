//! Publication and slot lifecycle, migrations, and the catalog facts preflight needs.
//!
//! Owns: the SQL that creates, follows, inspects and drops the publication and the slot, and the
//! gateway's migrations (run with `search_path = walcast`, so even sqlx's bookkeeping table stays
//! in schema `walcast`). Must not: stream changes (that is `stream.rs`).

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Connection, PgConnection, PgPool};

use crate::replication::lsn::Lsn;
use crate::replication::wire::{ConnectParams, ReplicationConnection, SnapshotAction, WireError};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("running migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("replication connection")]
    Wire(#[from] WireError),
    #[error(
        "replication slot {slot:?} has lost required WAL (wal_status = lost): changes since {confirmed} are gone; \
         run `walcast slot reset` to start over from now"
    )]
    Lost { slot: String, confirmed: String },
    #[error("replication slot {slot:?} exists but uses plugin {plugin:?}, not pgoutput; drop it or configure another slot")]
    WrongPlugin { slot: String, plugin: String },
    #[error("replication slot {slot:?} belongs to database {database:?}, not this one")]
    WrongDatabase { slot: String, database: String },
}

fn sql(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> SlotError {
    let context = context.into();
    move |source| SlotError::Sql { context, source }
}

/// The gateway's migrations, embedded in the binary: version, description, SQL.
const MIGRATIONS: [(i64, &str, &str); 7] = [
    (1, "walcast schema", include_str!("../../migrations/0001_walcast_schema.sql")),
    (2, "realtime broadcast", include_str!("../../migrations/0002_realtime_broadcast.sql")),
    (3, "row level security", include_str!("../../migrations/0003_row_level_security.sql")),
    (4, "private channels", include_str!("../../migrations/0004_private_channels.sql")),
    (5, "row level security per role", include_str!("../../migrations/0005_row_level_security_per_role.sql")),
    (
        6,
        "row level security planned once",
        include_str!("../../migrations/0006_row_level_security_planned_once.sql"),
    ),
    (
        7,
        "row level security fails closed",
        include_str!("../../migrations/0007_row_level_security_fails_closed.sql"),
    ),
];

/// The gateway's migrations as sqlx runs them.
pub fn migrator() -> Migrator {
    Migrator {
        migrations: Cow::Owned(
            MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect(),
        ),
        ..Migrator::DEFAULT
    }
}

/// Applies migrations idempotently on a dedicated connection whose search path is `walcast`.
pub async fn migrate(database_url: &str) -> Result<(), SlotError> {
    let mut conn = PgConnection::connect(database_url).await.map_err(sql("connecting to run migrations"))?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS walcast")
        .execute(&mut conn)
        .await
        .map_err(sql("creating schema walcast"))?;
    sqlx::query("SET search_path TO walcast").execute(&mut conn).await.map_err(sql("setting search_path"))?;
    migrator().run_direct(&mut conn).await?;
    let _ = conn.close().await;
    Ok(())
}

/// Deletes `realtime.messages` rows older than `retention`, now and then every
/// `retention / 10` (at least a minute, at most an hour), while walcast owns the `realtime`
/// schema; a Supabase-managed schema is left to Supabase.
pub async fn prune_messages(
    pool: PgPool,
    retention: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let every =
        (retention / 10).clamp(std::time::Duration::from_secs(60), std::time::Duration::from_secs(3600));
    loop {
        match delete_old_messages(&pool, retention).await {
            Ok(Some(n)) if n > 0 => tracing::info!(rows = n, "pruned old realtime.messages"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning realtime.messages failed"),
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One pruning pass; `None` when the `realtime` schema is not walcast's.
pub async fn delete_old_messages(
    pool: &PgPool,
    retention: std::time::Duration,
) -> Result<Option<u64>, sqlx::Error> {
    let owner: Option<String> =
        sqlx::query_scalar("SELECT value FROM walcast.settings WHERE name = 'realtime_schema'")
            .fetch_optional(pool)
            .await?;
    if owner.as_deref() != Some("walcast") {
        return Ok(None);
    }
    let done =
        sqlx::query("DELETE FROM realtime.messages WHERE inserted_at < now() - make_interval(secs => $1)")
            .bind(retention.as_secs_f64())
            .execute(pool)
            .await?;
    Ok(Some(done.rows_affected()))
}

/// Quotes an identifier for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// What `tables` asks for: whole schemas and single tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub schemas: Vec<String>,
    pub tables: Vec<(String, String)>,
}

impl TableSpec {
    pub fn parse(entries: &[String]) -> TableSpec {
        let mut spec = TableSpec { schemas: Vec::new(), tables: Vec::new() };
        for e in entries {
            if let Some((s, t)) = e.split_once('.') {
                if t == "*" {
                    spec.schemas.push(s.to_owned());
                } else {
                    spec.tables.push((s.to_owned(), t.to_owned()));
                }
            }
        }
        spec
    }

    /// The publication object list: `TABLES IN SCHEMA …, TABLE …` on PG ≥ 15, otherwise the
    /// tables enumerated now (`existing`).
    fn objects(&self, server_version: u32, existing: &[(String, String)]) -> Option<String> {
        let table_list = |tables: &[(String, String)]| {
            tables
                .iter()
                .map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if server_version >= 150_000 {
            let mut parts = Vec::new();
            if !self.schemas.is_empty() {
                parts.push(format!(
                    "TABLES IN SCHEMA {}",
                    self.schemas.iter().map(|s| quote_ident(s)).collect::<Vec<_>>().join(", ")
                ));
            }
            if !self.tables.is_empty() {
                parts.push(format!("TABLE {}", table_list(&self.tables)));
            }
            (!parts.is_empty()).then(|| parts.join(", "))
        } else {
            let mut all: Vec<(String, String)> =
                existing.iter().filter(|(s, _)| self.schemas.contains(s)).cloned().collect();
            all.extend(self.tables.iter().cloned());
            all.sort();
            all.dedup();
            (!all.is_empty()).then(|| format!("TABLE {}", table_list(&all)))
        }
    }
}

pub async fn server_version(pool: &PgPool) -> Result<u32, SlotError> {
    let v: String =
        sqlx::query_scalar("SHOW server_version_num").fetch_one(pool).await.map_err(sql("server version"))?;
    Ok(v.trim().parse().unwrap_or(0))
}

/// Ordinary tables in the given schemas, for PG 14 where a publication cannot name a schema.
async fn tables_in_schemas(pool: &PgPool, schemas: &[String]) -> Result<Vec<(String, String)>, SlotError> {
    sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r','p') AND n.nspname = ANY($1) ORDER BY 1, 2",
    )
    .bind(schemas)
    .fetch_all(pool)
    .await
    .map_err(sql("listing tables"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationState {
    Created,
    /// walcast owns it and set its tables to the configured ones.
    Followed,
    /// It existed before walcast and is used as it is.
    External,
}

/// Makes sure the publication exists; a walcast-owned one follows the `tables` setting.
pub async fn ensure_publication(
    pool: &PgPool,
    name: &str,
    tables: &[String],
) -> Result<PublicationState, SlotError> {
    let spec = TableSpec::parse(tables);
    let version = server_version(pool).await?;
    let existing = if version < 150_000 { tables_in_schemas(pool, &spec.schemas).await? } else { Vec::new() };
    let objects = spec.objects(version, &existing);
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
        .bind(name)
        .fetch_one(pool)
        .await
        .map_err(sql("looking up the publication"))?;
    let owned: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM walcast.owned_publications WHERE name = $1)")
            .bind(name)
            .fetch_one(pool)
            .await
            .map_err(sql("looking up publication ownership"))?;
    let mut tx = pool.begin().await.map_err(sql("starting a transaction"))?;
    let state = if !exists {
        let stmt = match &objects {
            Some(o) => format!("CREATE PUBLICATION {} FOR {o}", quote_ident(name)),
            None => format!("CREATE PUBLICATION {}", quote_ident(name)),
        };
        sqlx::query(&stmt).execute(&mut *tx).await.map_err(sql(format!("creating publication {name:?}")))?;
        PublicationState::Created
    } else if owned {
        if let Some(o) = &objects {
            let stmt = format!("ALTER PUBLICATION {} SET {o}", quote_ident(name));
            sqlx::query(&stmt)
                .execute(&mut *tx)
                .await
                .map_err(sql(format!("updating publication {name:?}")))?;
        }
        PublicationState::Followed
    } else {
        PublicationState::External
    };
    if state != PublicationState::External {
        sqlx::query(
            "INSERT INTO walcast.owned_publications (name, tables) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET tables = EXCLUDED.tables, updated_at = now()",
        )
        .bind(name)
        .bind(tables)
        .execute(&mut *tx)
        .await
        .map_err(sql("recording publication ownership"))?;
    }
    tx.commit().await.map_err(sql("committing publication changes"))?;
    Ok(state)
}

/// plugin, database, active, confirmed_flush_lsn, wal_status, lag_bytes.
type SlotRow = (Option<String>, Option<String>, bool, Option<String>, Option<String>, Option<i64>);

#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub confirmed_flush_lsn: Option<String>,
    pub wal_status: Option<String>,
    /// Bytes of WAL between the confirmed position and the server's current position.
    pub lag_bytes: Option<i64>,
}

pub async fn slot_info(pool: &PgPool, slot: &str) -> Result<Option<SlotInfo>, SlotError> {
    let row: Option<SlotRow> = sqlx::query_as(
        "SELECT plugin::text, database::text, active, confirmed_flush_lsn::text, wal_status, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 AS lag_bytes \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await
    .map_err(sql("looking up the replication slot"))?;
    Ok(row.map(|(plugin, database, active, confirmed_flush_lsn, wal_status, lag_bytes)| SlotInfo {
        plugin,
        database,
        active,
        confirmed_flush_lsn,
        wal_status,
        lag_bytes,
    }))
}

/// Makes sure the persistent slot exists and is usable; returns the position streaming resumes at.
pub async fn ensure_slot(pool: &PgPool, params: &ConnectParams, slot: &str) -> Result<Lsn, SlotError> {
    Ok(prepare_slot(pool, params, slot).await?.start)
}

/// The slot a gateway streams from, as it found it.
#[derive(Debug, Clone)]
pub struct SlotReady {
    /// Where streaming resumes (the slot's confirmed position).
    pub start: Lsn,
    /// The slot was made just now: nothing before `start` can be streamed from it.
    pub created: bool,
    /// The cluster's system identifier (`IDENTIFY_SYSTEM`).
    pub system_id: String,
}

/// Makes sure the slot exists (creating it when missing) and identifies the cluster.
pub async fn prepare_slot(pool: &PgPool, params: &ConnectParams, slot: &str) -> Result<SlotReady, SlotError> {
    let mut conn = ReplicationConnection::connect(params).await?;
    let system_id = conn.identify_system().await?.system_id;
    if let Some(info) = slot_info(pool, slot).await? {
        conn.close().await?;
        check_slot(slot, &info, &params.database)?;
        let start = info.confirmed_flush_lsn.and_then(|l| l.parse().ok()).unwrap_or_default();
        return Ok(SlotReady { start, created: false, system_id });
    }
    let created = conn.create_slot(slot, false, SnapshotAction::NoExport).await?;
    conn.close().await?;
    tracing::info!(slot, lsn = %created.consistent_point, "created replication slot");
    Ok(SlotReady { start: created.consistent_point, created: true, system_id })
}

pub fn check_slot(slot: &str, info: &SlotInfo, database: &str) -> Result<(), SlotError> {
    if info.wal_status.as_deref() == Some("lost") {
        return Err(SlotError::Lost {
            slot: slot.to_owned(),
            confirmed: info.confirmed_flush_lsn.clone().unwrap_or_else(|| "?".into()),
        });
    }
    if let Some(plugin) = &info.plugin {
        if plugin != "pgoutput" {
            return Err(SlotError::WrongPlugin { slot: slot.to_owned(), plugin: plugin.clone() });
        }
    }
    if let Some(db) = &info.database {
        if db != database {
            return Err(SlotError::WrongDatabase { slot: slot.to_owned(), database: db.clone() });
        }
    }
    Ok(())
}

/// Drops the slot; `Ok(false)` when there was none.
pub async fn drop_slot(pool: &PgPool, slot: &str) -> Result<bool, SlotError> {
    if slot_info(pool, slot).await?.is_none() {
        return Ok(false);
    }
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(slot)
        .execute(pool)
        .await
        .map_err(sql(format!("dropping slot {slot:?} (is a gateway still streaming from it?)")))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_objects() {
        let spec = TableSpec::parse(&["public.*".into(), "app.items".into()]);
        assert_eq!(
            spec.objects(150_000, &[]).unwrap(),
            "TABLES IN SCHEMA \"public\", TABLE \"app\".\"items\""
        );
        let existing = vec![("public".to_owned(), "a".to_owned()), ("other".to_owned(), "b".to_owned())];
        assert_eq!(spec.objects(140_000, &existing).unwrap(), "TABLE \"app\".\"items\", \"public\".\"a\"");
        assert_eq!(TableSpec::parse(&["x.*".into()]).objects(140_000, &[]), None);
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
