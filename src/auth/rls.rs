//! Row-level security for `postgres_changes`: asks Postgres which row versions each subscriber
//! may SELECT, as its role with its claims (`walcast.rls_check`, migrations 0003, 0005 and
//! 0006), and keeps what does not depend on the row (may the role read the table at all, does
//! row-level security apply to it, which columns are hidden) in a cache per (table, role).
//!
//! A cached answer is valid only for the `Relation` it was computed under: Postgres sends a new
//! Relation message after any change to the table's catalog entry (policies, `ENABLE ROW LEVEL
//! SECURITY`, grants), so such a change is seen in commit order before the next row change. Role
//! attributes and memberships are not part of it; answers are recomputed after `ACCESS_TTL`.
//!
//! Owns: the SQL call, the cache, logging each policy error once. Must not: touch sockets or the
//! index, or log row values.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::auth::Claims;
use crate::change::Relation;
use crate::locks;

/// How long a cached access answer is trusted when the table itself has not changed.
pub const ACCESS_TTL: Duration = Duration::from_secs(30);

/// Connections of the check pool: the dispatcher runs one check at a time, subscribe-time and
/// replay checks run beside it.
const CHECK_CONNECTIONS: u32 = 4;

/// What a subscriber is told when its policies raised on a row (the error text may quote the row).
pub const POLICY_FAILED: &str = "a row-level security policy raised an error for this subscriber";

/// How long one check may run (`statement_timeout` of the check pool's sessions): a policy
/// that takes longer denies (the call fails and is retried a bounded number of times) instead
/// of holding delivery.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a subscriber acts as: the token's role and its whole claims object. Subscribers with
/// equal subjects are checked once per batch.
#[derive(Debug, Clone)]
pub struct Subject {
    pub role: Arc<str>,
    /// The claims as JSON (`request.jwt.claims`).
    pub claims: Arc<str>,
    hash: u64,
}

impl Subject {
    pub fn new(role: Arc<str>, claims: Arc<str>) -> Subject {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        role.hash(&mut h);
        claims.hash(&mut h);
        Subject { role, claims, hash: h.finish() }
    }

    pub fn of(claims: &Claims) -> Subject {
        Subject::new(Arc::clone(&claims.role), Arc::clone(&claims.json))
    }
}

impl PartialEq for Subject {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.role == other.role && self.claims == other.claims
    }
}

impl Eq for Subject {}

impl Hash for Subject {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Columns a role may not SELECT; `None` when it may read them all.
pub type Hidden = Option<Arc<[Arc<str>]>>;

/// What a role may read of a table, independent of the row.
#[derive(Debug, Clone, PartialEq)]
pub enum Access {
    /// No column of the table.
    Denied,
    /// Every row: row-level security does not apply to this role.
    Open(Hidden),
    /// The rows its policies let it see.
    Rows(Hidden),
    /// The check failed (an unknown role, a policy that raised): nothing.
    Failed(Arc<str>),
}

impl Access {
    pub fn hidden(&self) -> Option<&[Arc<str>]> {
        match self {
            Access::Open(h) | Access::Rows(h) => h.as_deref(),
            _ => None,
        }
    }
}

/// The answer for one subject: its access, and for `Rows` which wanted rows it may see.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub access: Access,
    /// 1-based positions in the row list, ascending.
    pub visible: Vec<u32>,
}

impl Verdict {
    pub fn sees(&self, row: u32) -> bool {
        match &self.access {
            Access::Open(_) => true,
            Access::Rows(_) => self.visible.binary_search(&row).is_ok(),
            _ => false,
        }
    }
}

/// One subject and the rows to check for it.
#[derive(Debug)]
pub struct Request<'a> {
    pub subject: &'a Subject,
    /// 1-based positions in the row list, ascending; `None` for every row.
    pub wanted: Option<&'a [u32]>,
}

/// Who asks for a check: the dispatcher's checks of live changes always find a connection;
/// subscribe-time and replay checks share the others, so that a burst of joins or resumes never
/// holds up live delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Live,
    Side,
}

/// The table a check is about.
#[derive(Debug, Clone, Copy)]
pub enum Table<'a> {
    /// The table the rows were decoded under: its OID and its columns' names and types. When no
    /// table has that OID any more, or one of these columns was dropped, renamed or retyped
    /// since, every subject is denied (`Access::Failed`, "gone").
    Relation(&'a Relation),
    /// A table by name (at subscribe time); one that does not exist is "gone".
    Name { schema: &'a str, table: &'a str },
}

impl Table<'_> {
    fn names(&self) -> (&str, &str) {
        match self {
            Table::Relation(r) => (&r.schema, &r.table),
            Table::Name { schema, table } => (schema, table),
        }
    }

    fn oid(&self) -> u32 {
        match self {
            Table::Relation(r) => r.id,
            Table::Name { .. } => 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RlsError {
    #[error("row-level security check failed")]
    Query(#[source] sqlx::Error),
    /// The check function answered a word this gateway does not know (a newer or altered
    /// `walcast.rls_check`); at most 64 characters of it are kept.
    #[error("row-level security check returned an unknown access {0:?}")]
    UnknownAccess(String),
}

impl RlsError {
    /// Whether the database could not be asked at all (no connection, a broken one, the pool
    /// closed), as opposed to having answered with an error. Delivery waits out the first kind
    /// (nothing can be checked for anyone); the second is retried a bounded number of times and
    /// then denies.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            RlsError::Query(
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            )
        )
    }
}

/// What happens to a DELETE on a table with row-level security whose old row carries only the
/// key (REPLICA IDENTITY is not FULL), so the policy cannot be evaluated on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyOnlyDeletes {
    /// Not delivered (nothing leaks).
    #[default]
    Withhold,
    /// Delivered to subscribers whose role may SELECT the table.
    Deliver,
}

struct Cached {
    relation: Arc<Relation>,
    at: Instant,
    access: Access,
}

/// Row-level security checks against one database.
pub struct RowSecurity {
    pool: PgPool,
    key_only_deletes: KeyOnlyDeletes,
    cache: Mutex<HashMap<(u32, Arc<str>), Cached>>,
    /// Connections side checks may use at once (all but one).
    side: tokio::sync::Semaphore,
    /// (table, message) pairs already logged.
    logged: Mutex<HashSet<(u32, Arc<str>)>>,
}

impl std::fmt::Debug for RowSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowSecurity")
            .field("key_only_deletes", &self.key_only_deletes)
            .finish_non_exhaustive()
    }
}

impl RowSecurity {
    /// Checks with a pool of their own, connecting as `pool` does (lazily). Its connections are
    /// not pinged before each use: a check is on the path of every change, and a ping is one
    /// more round trip; a connection that broke fails its check, which is retried.
    pub fn new(pool: &PgPool, key_only_deletes: KeyOnlyDeletes) -> RowSecurity {
        let timeout = format!("{}ms", CHECK_TIMEOUT.as_millis());
        let options = (*pool.connect_options()).clone().options([("statement_timeout", timeout.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(CHECK_CONNECTIONS)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        RowSecurity {
            pool,
            key_only_deletes,
            cache: Mutex::new(HashMap::new()),
            side: tokio::sync::Semaphore::new(CHECK_CONNECTIONS as usize - 1),
            logged: Mutex::new(HashSet::new()),
        }
    }

    pub fn key_only_deletes(&self) -> KeyOnlyDeletes {
        self.key_only_deletes
    }

    /// The cached access of `role` to `relation`, if still valid for this relation.
    pub fn cached(&self, relation: &Arc<Relation>, role: &Arc<str>) -> Option<Access> {
        let cache = locks::lock(&self.cache);
        let c = cache.get(&(relation.id, Arc::clone(role)))?;
        (Arc::ptr_eq(&c.relation, relation) && c.at.elapsed() < ACCESS_TTL).then(|| c.access.clone())
    }

    /// Remembers an access answer computed under `relation`. Failures are not cached: they are
    /// retried with the next change.
    pub fn remember(&self, relation: &Arc<Relation>, role: &Arc<str>, access: &Access) {
        if matches!(access, Access::Failed(_)) {
            return;
        }
        locks::lock(&self.cache).insert(
            (relation.id, Arc::clone(role)),
            Cached { relation: Arc::clone(relation), at: Instant::now(), access: access.clone() },
        );
    }

    /// Checks `rows` (a JSON array of `{"column": text}` objects) for each request, in one
    /// round trip. Verdicts come back in request order. A policy error denies that request
    /// only (logged once per table and message); an error of the call itself is returned.
    pub async fn check(
        &self,
        lane: Lane,
        table: Table<'_>,
        requests: &[Request<'_>],
        rows: &str,
    ) -> Result<Vec<Verdict>, RlsError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        // Never closed: the semaphore lives as long as `self`.
        let _side = match lane {
            Lane::Side => self.side.acquire().await.ok(),
            Lane::Live => None,
        };
        // Sorted by role: the function looks policies up once per role.
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by(|a, b| requests[*a].subject.role.cmp(&requests[*b].subject.role));
        let roles: Vec<&str> = order.iter().map(|i| &*requests[*i].subject.role).collect();
        let claims: Vec<&str> = order.iter().map(|i| &*requests[*i].subject.claims).collect();
        let wanted: Vec<Option<String>> = order.iter().map(|i| requests[*i].wanted.map(int_array)).collect();
        let (schema, name) = table.names();
        // The rows' description: the check denies when the table no longer matches it.
        let (columns, types): (Option<Vec<&str>>, Option<Vec<i64>>) = match table {
            Table::Relation(r) => (
                Some(r.columns.iter().map(|c| &*c.name).collect()),
                Some(r.columns.iter().map(|c| i64::from(c.ty.oid)).collect()),
            ),
            Table::Name { .. } => (None, None),
        };
        type Row = (i32, String, Option<Vec<String>>, Option<Vec<i32>>, Option<String>);
        let result: Vec<Row> = sqlx::query_as(CHECK_SQL)
            .bind(i64::from(table.oid()))
            .bind(&roles)
            .bind(&claims)
            .bind(&wanted)
            .bind(rows)
            .bind(schema)
            .bind(name)
            .bind(columns)
            .bind(types)
            .fetch_all(&self.pool)
            .await
            .map_err(RlsError::Query)?;
        let mut verdicts: Vec<Option<Verdict>> = vec![None; requests.len()];
        for (k, access, hidden, visible, error) in result {
            let Some(&at) = usize::try_from(k - 1).ok().and_then(|i| order.get(i)) else { continue };
            let hidden: Hidden =
                hidden.filter(|h| !h.is_empty()).map(|h| h.into_iter().map(Arc::from).collect());
            let access = match access.as_str() {
                "none" => Access::Denied,
                "open" => Access::Open(hidden),
                "rls" => Access::Rows(hidden),
                "error" => {
                    let message: Arc<str> = error.unwrap_or_default().into();
                    self.log_once(table, &requests[at].subject.role, &message);
                    match table {
                        // Checked on rows: the error's text may quote them, so the subscriber
                        // is told only that its policy failed.
                        Table::Relation(_) => Access::Failed(POLICY_FAILED.into()),
                        Table::Name { .. } => Access::Failed(message),
                    }
                }
                "gone" => Access::Failed(error.unwrap_or_else(|| "the table no longer exists".into()).into()),
                other => return Err(RlsError::UnknownAccess(other.chars().take(64).collect())),
            };
            let mut visible: Vec<u32> =
                visible.unwrap_or_default().into_iter().filter_map(|v| u32::try_from(v).ok()).collect();
            visible.sort_unstable();
            verdicts[at] = Some(Verdict { access, visible });
        }
        Ok(verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict { access: Access::Failed("no answer".into()), visible: Vec::new() }))
            .collect())
    }

    fn log_once(&self, table: Table<'_>, role: &str, message: &Arc<str>) {
        let first = {
            let mut logged = locks::lock(&self.logged);
            logged.len() < 10_000 && logged.insert((table.oid(), Arc::clone(message)))
        };
        if first {
            let (schema, table) = table.names();
            tracing::warn!(%schema, %table, role, error = %message, "row-level security check failed; denied");
        }
    }
}

/// The check: by OID (`$1`), or by name at subscribe time (`$6`.`$7`; 0, "gone", when there is
/// no such table), with the rows' column names and types (`$8`, `$9`) when they come from a
/// Relation message.
const CHECK_SQL: &str = "SELECT k, access, hidden, visible, error FROM walcast.rls_check(\
    CASE WHEN $1 <> 0 THEN $1::oid \
         ELSE coalesce(pg_catalog.to_regclass(pg_catalog.format('%I.%I', $6::text, $7::text))::oid, 0::oid) END, \
    $2::text[], $3::text[]::jsonb[], $4::text[], $5::text::jsonb, $8::text[], $9::int8[]::oid[])";

/// `{1,2,3}`.
fn int_array(v: &[u32]) -> String {
    let mut s = String::with_capacity(2 + v.len() * 4);
    s.push('{');
    for (i, n) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&n.to_string());
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_compare_by_content() {
        let a = Subject::new("authenticated".into(), r#"{"sub":"a"}"#.into());
        let b = Subject::new("authenticated".into(), r#"{"sub":"a"}"#.into());
        let c = Subject::new("authenticated".into(), r#"{"sub":"b"}"#.into());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let set: HashSet<Subject> = [a, b, c].into_iter().collect();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn verdicts() {
        let rows = Verdict { access: Access::Rows(None), visible: vec![2, 5] };
        assert!(rows.sees(2) && rows.sees(5) && !rows.sees(3));
        assert!(Verdict { access: Access::Open(None), visible: vec![] }.sees(9));
        assert!(!Verdict { access: Access::Denied, visible: vec![1] }.sees(1));
        assert!(!Verdict { access: Access::Failed("x".into()), visible: vec![1] }.sees(1));
        assert_eq!(int_array(&[]), "{}");
        assert_eq!(int_array(&[1, 20]), "{1,20}");
    }
}
