//! Preflight: the facts a gateway needs from its database, each reported as ok / warn / FAIL
//! with the fix. `walcast check` prints them; `serve` refuses to start on a FAIL.
//! Must not: change anything in the database.

use std::fmt;

use sqlx::PgPool;

use crate::config::Config;
use crate::replication::slot::{self, TableSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct CheckResult {
    pub level: Level,
    pub name: &'static str,
    pub message: String,
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag} {:<22} {}", self.name, self.message)
    }
}

fn r(level: Level, name: &'static str, message: impl Into<String>) -> CheckResult {
    CheckResult { level, name, message: message.into() }
}

/// Runs every check. A query that fails becomes a FAIL of its own check, never a panic.
pub async fn run(pool: &PgPool, config: &Config) -> Vec<CheckResult> {
    let spec = TableSpec::parse(&config.tables);
    let mut out = Vec::new();
    out.extend(server_version(pool).await);
    out.extend(wal_level(pool).await);
    out.extend(capacity(pool, config).await);
    out.extend(replication_role(pool).await);
    out.extend(publication(pool, config).await);
    out.extend(tables(pool, config, &spec).await);
    out.extend(replica_identity(pool, &spec).await);
    out.extend(row_security(pool, config, &spec).await);
    if config.changelog.enabled {
        out.push(changelog_permissions(&config.changelog.dir));
    }
    out.extend(slot(pool, config).await);
    out
}

/// The one text column of a one-row query.
async fn one(pool: &PgPool, q: &'static str) -> Result<String, sqlx::Error> {
    sqlx::query_scalar::<_, String>(q).fetch_one(pool).await
}

/// PostgreSQL 14 or newer.
async fn server_version(pool: &PgPool) -> Vec<CheckResult> {
    let mut out = Vec::new();
    match one(pool, "SHOW server_version_num").await {
        Ok(v) => {
            let n: u32 = v.parse().unwrap_or(0);
            out.push(if n >= 140_000 {
                r(Level::Ok, "server_version", format!("{}.{}", n / 10_000, n % 10_000))
            } else {
                r(
                    Level::Fail,
                    "server_version",
                    format!("{n}: PostgreSQL 14 or newer is required; upgrade the server"),
                )
            });
        }
        Err(e) => out.push(r(Level::Fail, "server_version", format!("cannot query the server: {e}"))),
    }
    out
}

/// `wal_level = logical`.
async fn wal_level(pool: &PgPool) -> Vec<CheckResult> {
    let mut out = Vec::new();
    match one(pool, "SHOW wal_level").await {
        Ok(v) if v == "logical" => out.push(r(Level::Ok, "wal_level", "logical")),
        Ok(v) => out.push(r(
            Level::Fail,
            "wal_level",
            format!(
                "is {v:?}, must be \"logical\": run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL \
                 (or start it with -c wal_level=logical)"
            ),
        )),
        Err(e) => out.push(r(Level::Fail, "wal_level", e.to_string())),
    }
    out
}

/// A replication slot (unless ours exists) and a WAL sender free.
async fn capacity(pool: &PgPool, config: &Config) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let free: Result<(i64, i64, i64, i64), _> = sqlx::query_as(
        "SELECT current_setting('max_replication_slots')::int8, \
                (SELECT count(*) FROM pg_replication_slots)::int8, \
                current_setting('max_wal_senders')::int8, \
                (SELECT count(*) FROM pg_stat_replication)::int8",
    )
    .fetch_one(pool)
    .await;
    match free {
        Ok((max_slots, used_slots, max_senders, used_senders)) => {
            let slot_exists = slot::slot_info(pool, &config.slot).await.ok().flatten().is_some();
            let need_slot = i64::from(!slot_exists);
            out.push(if max_slots - used_slots >= need_slot {
                r(Level::Ok, "max_replication_slots", format!("{used_slots} of {max_slots} used"))
            } else {
                r(Level::Fail, "max_replication_slots", format!(
                    "all {max_slots} slots are used: raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = {}; restart) or drop unused slots",
                    max_slots + 4
                ))
            });
            out.push(if max_senders - used_senders >= 1 {
                r(Level::Ok, "max_wal_senders", format!("{used_senders} of {max_senders} used"))
            } else {
                r(Level::Fail, "max_wal_senders", format!(
                    "all {max_senders} WAL senders are busy: raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = {}; restart)",
                    max_senders + 4
                ))
            });
        }
        Err(e) => out.push(r(Level::Fail, "max_replication_slots", e.to_string())),
    }
    out
}

/// The login may stream: SUPERUSER or REPLICATION.
async fn replication_role(pool: &PgPool) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let role: Result<(String, bool, bool), _> = sqlx::query_as(
        "SELECT rolname::text, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(pool)
    .await;
    match role {
        Ok((name, sup, repl)) if sup || repl => out.push(r(
            Level::Ok,
            "replication_role",
            format!("{name} has {}", if sup { "SUPERUSER" } else { "REPLICATION" }),
        )),
        Ok((name, _, _)) => out.push(r(
            Level::Fail,
            "replication_role",
            format!("role {name} lacks REPLICATION: run ALTER ROLE {name} WITH REPLICATION;"),
        )),
        Err(e) => out.push(r(Level::Fail, "replication_role", e.to_string())),
    }
    out
}

/// The publication exists, or the login may create it.
async fn publication(pool: &PgPool, config: &Config) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let pub_exists: Result<bool, _> =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(&config.publication)
            .fetch_one(pool)
            .await;
    match pub_exists {
        Ok(true) => out.push(r(Level::Ok, "publication", format!("{} exists", config.publication))),
        Ok(false) => {
            let can: Result<bool, _> = sqlx::query_scalar(
                "SELECT rolsuper OR has_database_privilege(current_user, current_database(), 'CREATE') FROM pg_roles WHERE rolname = current_user",
            )
            .fetch_one(pool)
            .await;
            out.push(match can {
                Ok(true) => r(Level::Ok, "publication", format!("{} will be created", config.publication)),
                _ => r(Level::Fail, "publication", format!(
                    "{} does not exist and this role cannot create it: GRANT CREATE ON DATABASE to the role, or create the publication as its owner",
                    config.publication
                )),
            });
        }
        Err(e) => out.push(r(Level::Fail, "publication", e.to_string())),
    }
    out
}

/// Every configured table and schema exists.
async fn tables(pool: &PgPool, config: &Config, spec: &TableSpec) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for (schema, table) in &spec.tables {
        let exists: Result<bool, _> = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r','p'))",
        )
        .bind(schema)
        .bind(table)
        .fetch_one(pool)
        .await;
        if !matches!(exists, Ok(true)) {
            out.push(r(
                Level::Fail,
                "tables",
                format!("{schema}.{table} does not exist: create it or remove it from `tables`"),
            ));
        }
    }
    for schema in &spec.schemas {
        let exists: Result<bool, _> =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(pool)
                .await;
        if !matches!(exists, Ok(true)) {
            out.push(r(
                Level::Fail,
                "tables",
                format!("schema {schema} does not exist: create it or remove {schema}.* from `tables`"),
            ));
        }
    }
    if !out.iter().any(|c| c.name == "tables") {
        out.push(r(Level::Ok, "tables", config.tables.join(", ")));
    }
    out
}

/// Every published table can identify its rows (UPDATE/DELETE carry an old row).
async fn replica_identity(pool: &PgPool, spec: &TableSpec) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let unidentified: Result<Vec<(String, String, String)>, _> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, c.relreplident::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r','p') AND n.nspname NOT IN ('pg_catalog','information_schema','walcast') \
           AND (n.nspname = ANY($1) OR (n.nspname || '.' || c.relname) = ANY($2)) \
           AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS \
                (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) ORDER BY 1, 2",
    )
    .bind(&spec.schemas)
    .bind(spec.tables.iter().map(|(s, t)| format!("{s}.{t}")).collect::<Vec<_>>())
    .fetch_all(pool)
    .await;
    match unidentified {
        Ok(rows) if rows.is_empty() => {
            out.push(r(Level::Ok, "replica_identity", "every table can identify its rows"))
        }
        Ok(rows) => {
            let names: Vec<String> = rows.iter().map(|(s, t, _)| format!("{s}.{t}")).collect();
            out.push(r(Level::Warn, "replica_identity", format!(
                "{} cannot identify rows (no primary key or REPLICA IDENTITY NOTHING): UPDATE/DELETE there fail or carry no old row; \
                 add a primary key or run ALTER TABLE … REPLICA IDENTITY FULL",
                names.join(", ")
            )));
        }
        Err(e) => out.push(r(Level::Warn, "replica_identity", e.to_string())),
    }
    out
}

/// With authentication: the token roles, and tables whose DELETEs row-level security cannot check.
async fn row_security(pool: &PgPool, config: &Config, spec: &TableSpec) -> Vec<CheckResult> {
    let mut out = Vec::new();
    if config.auth.mode == crate::auth::AuthMode::Required {
        out.extend(token_roles(pool, config).await);
        let keyless: Result<Vec<(String, String)>, _> = sqlx::query_as(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r','p') AND c.relrowsecurity AND c.relreplident <> 'f' \
               AND n.nspname NOT IN ('pg_catalog','information_schema','walcast') \
               AND (n.nspname = ANY($1) OR (n.nspname || '.' || c.relname) = ANY($2)) ORDER BY 1, 2",
        )
        .bind(&spec.schemas)
        .bind(spec.tables.iter().map(|(s, t)| format!("{s}.{t}")).collect::<Vec<_>>())
        .fetch_all(pool)
        .await;
        let withheld = match config.auth.key_only_deletes {
            crate::auth::rls::KeyOnlyDeletes::Withhold => "are withheld from every subscriber",
            crate::auth::rls::KeyOnlyDeletes::Deliver => {
                "are delivered (key only) to every role that may SELECT the table"
            }
        };
        match keyless {
            Ok(rows) if rows.is_empty() => out.push(r(
                Level::Ok,
                "rls_deletes",
                "every table with row-level security has REPLICA IDENTITY FULL",
            )),
            Ok(rows) => {
                for (schema, table) in rows {
                    out.push(r(Level::Warn, "rls_deletes", format!(
                        "{schema}.{table} has row-level security but not REPLICA IDENTITY FULL: its DELETEs carry only the key, \
                         so row-level security cannot be checked on them and they {withheld}; \
                         run ALTER TABLE {schema}.{table} REPLICA IDENTITY FULL"
                    )));
                }
            }
            Err(e) => out.push(r(Level::Warn, "rls_deletes", e.to_string())),
        }
    }
    out
}

/// The slot: usable by this database, and its WAL not about to be removed.
async fn slot(pool: &PgPool, config: &Config) -> Vec<CheckResult> {
    let mut out = Vec::new();
    match slot::slot_info(pool, &config.slot).await {
        Ok(None) => out.push(r(Level::Ok, "slot", format!("{} will be created", config.slot))),
        Ok(Some(info)) => {
            let lag = info.lag_bytes.unwrap_or(0);
            let wal = info.wal_status.clone().unwrap_or_else(|| "unknown".into());
            let db = config
                .database_url
                .as_deref()
                .and_then(|u| crate::replication::wire::ConnectParams::from_url(u).ok())
                .map(|p| p.database)
                .unwrap_or_default();
            match slot::check_slot(&config.slot, &info, &db) {
                Err(e) => out.push(r(Level::Fail, "slot", e.to_string())),
                Ok(()) if wal == "unreserved" => out.push(r(Level::Warn, "slot", format!(
                    "{}: wal_status unreserved, lag {lag} bytes: WAL is about to be removed; start the gateway or raise max_slot_wal_keep_size",
                    config.slot
                ))),
                Ok(()) => out.push(r(Level::Ok, "slot", format!(
                    "{}: wal_status {wal}, lag {lag} bytes{}",
                    config.slot,
                    if info.active { ", in use by a running stream" } else { "" }
                ))),
            }
        }
        Err(e) => out.push(r(Level::Fail, "slot", e.to_string())),
    }
    out
}

/// The roles tokens may act as (`auth.roles`): one that does not exist is refused by Postgres
/// when used (warn); a privileged one — a superuser, BYPASSRLS, REPLICATION, or the gateway's own
/// login — would let a token read every row, so it fails unless `auth.privileged_roles` names it.
async fn token_roles(pool: &PgPool, config: &Config) -> Vec<CheckResult> {
    /// (name, superuser, BYPASSRLS, REPLICATION, the gateway's login)
    type RoleFacts = (String, bool, bool, bool, bool);
    let found: Result<Vec<RoleFacts>, _> = sqlx::query_as(
        "SELECT r.rolname::text, r.rolsuper, r.rolbypassrls, r.rolreplication, r.rolname = current_user \
           FROM pg_roles r WHERE r.rolname = ANY($1)",
    )
    .bind(&config.auth.roles)
    .fetch_all(pool)
    .await;
    let found = match found {
        Ok(found) => found,
        Err(e) => return vec![r(Level::Fail, "token_roles", e.to_string())],
    };
    let mut out = Vec::new();
    let mut allowed = Vec::new();
    for role in &config.auth.roles {
        let Some((_, sup, bypass, repl, login)) = found.iter().find(|f| &f.0 == role) else {
            out.push(r(Level::Warn, "token_roles", format!(
                "role {role} (auth.roles) does not exist: tokens with this role are refused at subscribe; create it or remove it from auth.roles"
            )));
            continue;
        };
        let what: Vec<&str> = [
            (*sup, "SUPERUSER"),
            (*bypass, "BYPASSRLS"),
            (*repl, "REPLICATION"),
            (*login, "the gateway's login"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if what.is_empty() {
            continue;
        }
        let what = what.join(", ");
        if config.auth.privileged_roles.contains(role) {
            allowed.push(format!("{role}: {what}"));
        } else {
            out.push(r(Level::Fail, "token_roles", format!(
                "role {role} is privileged ({what}): a token with this role would read every row; remove it from auth.roles, \
                 or allow it explicitly in auth.privileged_roles"
            )));
        }
    }
    if !out.iter().any(|c| c.level == Level::Fail) {
        let mut message = config.auth.roles.join(", ");
        if !allowed.is_empty() {
            message += &format!(" (privileged, allowed by auth.privileged_roles: {})", allowed.join("; "));
        }
        out.push(r(Level::Ok, "token_roles", message));
    }
    out
}

/// The change log holds every row before row-level security: its directory and files should be
/// the gateway user's alone (new ones are created 0700 / 0600; older ones are left as they are).
pub fn changelog_permissions(dir: &std::path::Path) -> CheckResult {
    use std::os::unix::fs::PermissionsExt;
    let name = "changelog_permissions";
    let Ok(meta) = std::fs::metadata(dir) else {
        return r(Level::Ok, name, format!("{} will be created (mode 0700)", dir.display()));
    };
    let mut loose = Vec::new();
    if meta.permissions().mode() & 0o077 != 0 {
        loose.push(format!("{} ({:o})", dir.display(), meta.permissions().mode() & 0o777));
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(m) = entry.metadata() {
            if m.permissions().mode() & 0o077 != 0 {
                loose.push(format!("{} ({:o})", entry.path().display(), m.permissions().mode() & 0o777));
            }
        }
    }
    if loose.is_empty() {
        return r(Level::Ok, name, format!("{} is readable by its owner only", dir.display()));
    }
    let shown = loose.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    r(Level::Warn, name, format!(
        "the change log holds rows before row-level security, and other users may read {shown}{}: run chmod -R go-rwx {}",
        if loose.len() > 5 { format!(" and {} more", loose.len() - 5) } else { String::new() },
        dir.display()
    ))
}

pub fn any_fail(results: &[CheckResult]) -> bool {
    results.iter().any(|c| c.level == Level::Fail)
}
