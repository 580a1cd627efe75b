//! Turning the `postgres_changes` bindings of a channel join into index entries: checks each
//! binding against the published tables and their columns, compiles its filter, and computes
//! its stable id. Error messages are the ones clients show to users.
//!
//! Owns: the cached view of published tables (refreshed when stale or when a lookup misses),
//! with each table's primary key.
//! Must not: touch sockets or the index.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;

use crate::change::ChangeKind;
use crate::filter::{self, CompileError, CompiledFilter, ParseError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFilter {
    All,
    Insert,
    Update,
    Delete,
}

impl EventFilter {
    pub fn parse(s: &str) -> Option<EventFilter> {
        Some(match s.to_ascii_uppercase().as_str() {
            "*" => EventFilter::All,
            "INSERT" => EventFilter::Insert,
            "UPDATE" => EventFilter::Update,
            "DELETE" => EventFilter::Delete,
            _ => return None,
        })
    }

    pub fn accepts(self, kind: ChangeKind) -> bool {
        match (self, kind) {
            (_, ChangeKind::Truncate) => false,
            (EventFilter::All, _) => true,
            (EventFilter::Insert, ChangeKind::Insert)
            | (EventFilter::Update, ChangeKind::Update)
            | (EventFilter::Delete, ChangeKind::Delete) => true,
            _ => false,
        }
    }
}

/// A binding ready to be indexed.
#[derive(Debug)]
pub struct BindingSpec {
    /// The id echoed to the client and sent in `ids`.
    pub id: u32,
    pub event: EventFilter,
    pub schema: Arc<str>,
    /// `None` for every published table of the schema.
    pub table: Option<Arc<str>>,
    pub filter: CompiledFilter,
    /// Columns `record`/`old_record` are limited to (plus the key), when the binding asked.
    pub select: Option<Arc<[Arc<str>]>>,
    /// The table has REPLICA IDENTITY FULL (false for schema-wide bindings).
    pub full_identity: bool,
    /// A live query (`"live": true`): the index routes it every change of its table (its
    /// `filter` is then empty and its event `*`); the query's own filter is here.
    pub live: Option<Arc<LiveSpec>>,
}

/// What a live binding asks for: its filter, the order of its initial result and the most rows
/// its result may hold.
#[derive(Debug, Default)]
pub struct LiveSpec {
    pub filter: CompiledFilter,
    /// The binding's `limit`, when it set one (the gateway's `max_live_rows` bounds it).
    pub limit: Option<usize>,
    /// The order its snapshot sends rows in (the primary key's after these; key order when
    /// empty).
    pub order: Vec<OrderKey>,
}

/// One column of a live query's `order`: `column[.asc|.desc][.nullsfirst|.nullslast]`, the
/// grammar PostgREST uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderKey {
    pub column: Arc<str>,
    pub descending: bool,
    /// `None`: Postgres' default (nulls sort as if larger than every value).
    pub nulls_first: Option<bool>,
}

impl OrderKey {
    /// `ORDER BY` text for the column as `qualified` names it.
    pub fn sql(&self, qualified: &str) -> String {
        let dir = if self.descending { " DESC" } else { " ASC" };
        let nulls = match self.nulls_first {
            Some(true) => " NULLS FIRST",
            Some(false) => " NULLS LAST",
            None => "",
        };
        format!("{qualified}{dir}{nulls}")
    }
}

/// Parses an `order` list (`a.desc,b.asc.nullslast`); each column must be one of `columns`.
pub fn parse_order(text: &str, columns: &[PublishedColumn]) -> Result<Vec<OrderKey>, String> {
    let mut keys: Vec<OrderKey> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let mut rest = item;
        let (mut descending, mut nulls_first) = (None, None);
        // Read from the end: `.nullsfirst`/`.nullslast` last, the direction before it.
        while let Some((head, modifier)) = rest.rsplit_once('.') {
            match modifier {
                "asc" | "desc" if descending.is_none() => descending = Some(modifier == "desc"),
                "nullsfirst" | "nullslast" if descending.is_none() && nulls_first.is_none() => {
                    nulls_first = Some(modifier == "nullsfirst")
                }
                _ => break,
            }
            rest = head;
        }
        let Some(column) = columns.iter().find(|c| &*c.name == rest) else {
            return Err(format!("order: {rest:?} is not a column of the table"));
        };
        if keys.iter().any(|k| k.column == column.name) {
            return Err(format!("order: {rest:?} is named twice"));
        }
        keys.push(OrderKey {
            column: Arc::clone(&column.name),
            descending: descending.unwrap_or(false),
            nulls_first,
        });
    }
    Ok(keys)
}

/// Why a binding could not be subscribed; `Display` is the message clients show.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BindingError {
    #[error(
        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {params} ({reason})"
    )]
    Unavailable { params: String, reason: String },
    #[error("Error parsing `filter` params: {0}")]
    Filter(#[source] ParseError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(
        "invalid column for filter {column}: DELETE events carry only the replica identity \
         (set REPLICA IDENTITY FULL on {table} to filter deletes on it)"
    )]
    DeleteOutsideIdentity { column: String, table: String },
    #[error("invalid column for select {0}")]
    SelectColumn(String),
    #[error("Unable to read the published tables; try again")]
    Catalog(#[source] Arc<sqlx::Error>),
    #[error("change capture is not available on this gateway")]
    NoCatalog,
    #[error("permission denied for table {table}: role {role} may not SELECT it")]
    NoSelect { table: String, role: String },
    #[error("permission denied for column {column} of table {table}: role {role} may not SELECT it")]
    HiddenColumn { column: String, table: String, role: String },
    #[error("Unable to check row-level security on {table} for role {role}: {message}")]
    Authorization { table: String, role: String, message: String },
    #[error("Unable to check row-level security; try again")]
    RlsUnavailable(#[source] Arc<crate::auth::rls::RlsError>),
    #[error("invalid snapshot: a snapshot needs a binding on one table, not a whole schema")]
    SnapshotNeedsTable,
    /// A live binding that cannot be a live query; the reason says why.
    #[error("invalid live query: {0}")]
    Live(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PublishedColumn {
    pub name: Arc<str>,
    /// The type name filters compare by (a domain's base type).
    pub compare_type: Arc<str>,
    /// Carried by the old row of UPDATE/DELETE.
    pub in_identity: bool,
    /// Part of the table's primary key.
    pub in_primary_key: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PublishedTable {
    pub columns: Vec<PublishedColumn>,
    /// REPLICA IDENTITY FULL: old rows carry every column.
    pub full_identity: bool,
}

/// The published tables by (schema, table).
pub type Tables = HashMap<(String, String), PublishedTable>;

/// A published table as a role may read it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReadableTable {
    pub schema: String,
    pub table: String,
    pub columns: Vec<ReadableColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReadableColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub primary_key: bool,
}

/// SQL: whether column `a` of table `c` is in its primary key.
macro_rules! primary_key_column {
    () => {
        "a.attnum = ANY(COALESCE((SELECT i.indkey::int2[] FROM pg_index i \
            WHERE i.indrelid = c.oid AND i.indisprimary LIMIT 1), '{}')) "
    };
}

/// SQL: every column `a` of every table `c` in publication `pt`.
macro_rules! published_columns {
    () => {
        "FROM pg_publication_tables pt \
         JOIN pg_namespace n ON n.nspname = pt.schemaname \
         JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
    };
}

/// The published tables, cached briefly.
pub struct PublishedCatalog {
    pool: PgPool,
    publication: String,
    cache: tokio::sync::Mutex<Option<(Instant, Arc<Tables>)>>,
}

const CATALOG_TTL: Duration = Duration::from_secs(5);
/// A binding that does not resolve loads the catalog again (its table may be new), but not more
/// often than this: joins full of unknown tables cost one catalog query a second at most.
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(1);

impl PublishedCatalog {
    pub fn new(pool: PgPool, publication: String) -> Self {
        PublishedCatalog { pool, publication, cache: tokio::sync::Mutex::new(None) }
    }

    async fn tables(&self, force: bool) -> Result<Arc<Tables>, sqlx::Error> {
        let mut guard = self.cache.lock().await;
        if let Some((at, t)) = guard.as_ref() {
            let fresh_enough = if force { RELOAD_AT_MOST_EVERY } else { CATALOG_TTL };
            if at.elapsed() < fresh_enough {
                return Ok(Arc::clone(t));
            }
        }
        let rows: Vec<(String, String, String, String, bool, bool, bool)> = sqlx::query_as(concat!(
            "SELECT pt.schemaname::text, pt.tablename::text, a.attname::text, \
                    COALESCE(bt.typname, t.typname)::text, \
                    (c.relreplident = 'f' OR a.attnum = ANY(COALESCE((SELECT i.indkey::int2[] FROM pg_index i \
                        WHERE i.indrelid = c.oid AND CASE c.relreplident WHEN 'i' THEN i.indisreplident ELSE i.indisprimary END \
                        LIMIT 1), '{}'))), \
                    c.relreplident = 'f', ",
            primary_key_column!(),
            published_columns!(),
            "JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype \
             WHERE pt.pubname = $1 ORDER BY pt.schemaname, pt.tablename, a.attnum",
        ),
        )
        .bind(&self.publication)
        .fetch_all(&self.pool)
        .await?;
        let mut tables: Tables = HashMap::new();
        for (schema, table, column, type_name, in_identity, full_identity, in_primary_key) in rows {
            tables
                .entry((schema, table))
                .or_insert_with(|| PublishedTable { columns: Vec::new(), full_identity })
                .columns
                .push(PublishedColumn {
                    name: column.into(),
                    compare_type: type_name.into(),
                    in_identity,
                    in_primary_key,
                });
        }
        let tables = Arc::new(tables);
        *guard = Some((Instant::now(), Arc::clone(&tables)));
        Ok(tables)
    }

    /// The published tables and columns `role` may read (its grants), in order; every one
    /// without a role (authentication off). A role the database does not know is an error.
    pub async fn readable_by(&self, role: Option<&str>) -> Result<Vec<ReadableTable>, sqlx::Error> {
        let rows: Vec<(String, String, String, String, bool)> = sqlx::query_as(concat!(
            "SELECT pt.schemaname::text, pt.tablename::text, a.attname::text, format_type(a.atttypid, a.atttypmod), ",
            primary_key_column!(),
            published_columns!(),
            "WHERE pt.pubname = $1 \
               AND ($2::text IS NULL OR has_column_privilege($2::text, c.oid, a.attnum, 'SELECT')) \
             ORDER BY pt.schemaname, pt.tablename, a.attnum",
        ),
        )
        .bind(&self.publication)
        .bind(role)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<ReadableTable> = Vec::new();
        for (schema, table, name, type_name, primary_key) in rows {
            if out.last().is_none_or(|t| t.schema != schema || t.table != table) {
                out.push(ReadableTable { schema, table, columns: Vec::new() });
            }
            if let Some(t) = out.last_mut() {
                t.columns.push(ReadableColumn { name, type_name, primary_key });
            }
        }
        Ok(out)
    }

    /// The published tables as last read (read again once `CATALOG_TTL` passed): the same `Arc`
    /// while they did not change.
    pub async fn published(&self) -> Result<Arc<Tables>, sqlx::Error> {
        self.tables(false).await
    }

    /// Resolves a join's bindings, in order. Each is either ready to index or an error message
    /// for the client.
    pub async fn resolve(&self, bindings: &[Value]) -> Vec<Result<BindingSpec, BindingError>> {
        let mut tables = match self.tables(false).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "loading published tables failed");
                let e = Arc::new(e);
                return bindings.iter().map(|_| Err(BindingError::Catalog(Arc::clone(&e)))).collect();
            }
        };
        let mut out = Vec::with_capacity(bindings.len());
        let mut reloaded = false;
        for b in bindings {
            let mut r = resolve_one(&tables, b);
            if r.is_err() && !reloaded {
                // The table may have been created or published moments ago: loaded again once
                // per join at most.
                reloaded = true;
                if let Ok(fresh) = self.tables(true).await {
                    tables = fresh;
                    r = resolve_one(&tables, b);
                }
            }
            out.push(r);
        }
        out
    }
}

/// The string fields of a binding, treating null and missing alike.
fn field<'a>(b: &'a Value, key: &str) -> Option<&'a str> {
    b.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The stable id of a binding: the same parameters always give the same id (FNV-1a, 31 bits so
/// every client parses it as a plain integer).
pub fn binding_id(b: &Value) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for key in ["event", "schema", "table", "filter"] {
        for byte in field(b, key).unwrap_or("").bytes().chain([0xff]) {
            h ^= u32::from(byte);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h & 0x7fff_ffff
}

fn describe(b: &Value) -> String {
    format!(
        "[event: {}, schema: {}, table: {}, filters: [{}], select: nil]",
        field(b, "event").unwrap_or("*"),
        field(b, "schema").unwrap_or("public"),
        field(b, "table").unwrap_or("*"),
        field(b, "filter").unwrap_or("")
    )
}

fn resolve_one(tables: &Tables, b: &Value) -> Result<BindingSpec, BindingError> {
    let unable = |why: &str| BindingError::Unavailable { params: describe(b), reason: why.to_owned() };
    let event_text = field(b, "event").unwrap_or("*");
    let event = EventFilter::parse(event_text)
        .ok_or_else(|| unable(&format!("event must be *, INSERT, UPDATE or DELETE, not {event_text:?}")))?;
    let schema = field(b, "schema").unwrap_or("public");
    let table = field(b, "table").filter(|t| *t != "*");
    let filter_text = field(b, "filter").unwrap_or("");
    let parsed = filter::parse(filter_text).map_err(BindingError::Filter)?;
    let select: Option<Arc<[Arc<str>]>> = match b.get("select") {
        Some(Value::Array(cols)) => Some(cols.iter().filter_map(Value::as_str).map(Arc::from).collect()),
        _ => None,
    };
    let id = binding_id(b);
    let live = match b.get("live") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(BindingError::Live("live must be true or false".into())),
    };
    let Some(table) = table else {
        if live {
            return Err(BindingError::Live("a live query needs one table, not a whole schema".into()));
        }
        if schema != "*" && !tables.keys().any(|(s, _)| s == schema) {
            return Err(unable(&format!("no table of schema {schema:?} is in the publication")));
        }
        if !parsed.is_empty() {
            return Err(unable("a filter needs a single table"));
        }
        return Ok(BindingSpec {
            id,
            event,
            schema: schema.into(),
            table: None,
            filter: CompiledFilter::default(),
            select,
            full_identity: false,
            live: None,
        });
    };
    let Some(published) = tables.get(&(schema.to_owned(), table.to_owned())) else {
        return Err(unable(&format!("table {schema}.{table} does not exist or is not in the publication")));
    };
    let compiled = compile_for(published, &parsed, event, select.as_deref(), &format!("{schema}.{table}"))?;
    let mut spec = BindingSpec {
        id,
        event,
        schema: schema.into(),
        table: Some(table.into()),
        filter: compiled,
        select,
        full_identity: published.full_identity,
        live: None,
    };
    if live {
        // The index routes a live query every change of its table; its filter is its own.
        let filter = std::mem::take(&mut spec.filter);
        spec.live = Some(Arc::new(LiveSpec { filter, ..LiveSpec::default() }));
        return live_binding(b, published, spec);
    }
    if b.get("order").is_some_and(|o| !o.is_null()) {
        return Err(unable("order applies to a live query (live: true)"));
    }
    Ok(spec)
}

/// The binding's filter compiled against the table's columns, with the checks that depend on
/// them: DELETE filters on the replica identity only, `select` naming columns that exist.
fn compile_for(
    published: &PublishedTable,
    parsed: &filter::Filter,
    event: EventFilter,
    select: Option<&[Arc<str>]>,
    table: &str,
) -> Result<CompiledFilter, BindingError> {
    let compiled = CompiledFilter::compile(parsed, |name| {
        published.columns.iter().find(|c| &*c.name == name).map(|c| (Arc::clone(&c.name), &*c.compare_type))
    })?;
    if event == EventFilter::Delete {
        for col in compiled.columns() {
            if !published.columns.iter().any(|c| &*c.name == col && c.in_identity) {
                return Err(BindingError::DeleteOutsideIdentity {
                    column: col.to_owned(),
                    table: table.to_owned(),
                });
            }
        }
    }
    if let Some(cols) = select {
        if let Some(bad) = cols.iter().find(|c| !published.columns.iter().any(|p| p.name == **c)) {
            return Err(BindingError::SelectColumn(bad.to_string()));
        }
    }
    Ok(compiled)
}

/// A live binding's own checks: every event (a live query follows rows in and out of its
/// filter), a table with a primary key (how it follows rows), and its `limit`.
fn live_binding(
    b: &Value,
    published: &PublishedTable,
    mut spec: BindingSpec,
) -> Result<BindingSpec, BindingError> {
    if spec.event != EventFilter::All {
        return Err(BindingError::Live("a live query follows every event: event must be *".into()));
    }
    if !published.columns.iter().any(|c| c.in_primary_key) {
        let table = format!("{}.{}", spec.schema, spec.table.as_deref().unwrap_or(""));
        return Err(BindingError::Live(format!(
            "table {table} has no primary key: a live query needs one to follow rows"
        )));
    }
    let limit = match b.get("limit") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().filter(|n| *n > 0) {
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => return Err(BindingError::Live("limit must be a positive integer".into())),
        },
    };
    let order = match b.get("order") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) => parse_order(text, &published.columns).map_err(BindingError::Live)?,
        Some(_) => return Err(BindingError::Live("order must be a string such as \"col.desc\"".into())),
    };
    if let Some(live) = spec.live.as_mut().and_then(Arc::get_mut) {
        live.limit = limit;
        live.order = order;
    }
    Ok(spec)
}

/// Marks table bindings as a live query's, with the `limit` and `order` the client asked for
/// (as sent: bad ones are refused when the bindings are resolved).
pub fn make_live(bindings: &mut [Value], limit: Option<Value>, order: Option<Value>) {
    for b in bindings {
        b["live"] = Value::Bool(true);
        if let Some(limit) = &limit {
            b["limit"] = limit.clone();
        }
        if let Some(order) = &order {
            b["order"] = order.clone();
        }
    }
}

/// A message's `live`, `limit` and `order` onto its table bindings (`live` true or false; an
/// `order` without `live` goes on the bindings, which refuse it).
pub fn live_fields(
    bindings: &mut [Value],
    live: Option<&Value>,
    limit: Option<&Value>,
    order: Option<&Value>,
) -> Result<(), &'static str> {
    match live {
        None | Some(Value::Null | Value::Bool(false)) => {
            if let Some(order) = order {
                bindings.iter_mut().for_each(|b| b["order"] = order.clone());
            }
        }
        Some(Value::Bool(true)) => make_live(bindings, limit.cloned(), order.cloned()),
        Some(_) => return Err("live must be true or false"),
    }
    Ok(())
}

/// The `postgres_changes` bindings of the plain transports (SSE, long-poll, JSON WebSocket) for
/// one table: one per event of `events` (`*` or a comma list of `insert`, `update`, `delete`),
/// each with the filter and `select` (a comma list of columns).
pub fn table_bindings(
    schema: &str,
    table: &str,
    filter: Option<&str>,
    events: Option<&str>,
    select: Option<&str>,
) -> Result<Vec<Value>, String> {
    let events: Vec<String> = match events.map(str::trim) {
        None | Some("") | Some("*") => vec!["*".into()],
        Some(list) => list
            .split(',')
            .map(|e| match e.trim().to_ascii_lowercase().as_str() {
                e @ ("insert" | "update" | "delete") => Ok(e.to_ascii_uppercase()),
                "*" => Ok("*".into()),
                other => Err(format!("events: {other:?} is not one of insert, update, delete, *")),
            })
            .collect::<Result<_, _>>()?,
    };
    let select: Option<Vec<&str>> =
        select.map(|s| s.split(',').map(str::trim).filter(|c| !c.is_empty()).collect());
    Ok(events
        .into_iter()
        .map(|event| {
            let mut b = serde_json::json!({"event": event, "schema": schema, "table": table});
            if let Some(f) = filter.filter(|f| !f.is_empty()) {
                b["filter"] = serde_json::json!(f);
            }
            if let Some(cols) = &select {
                b["select"] = serde_json::json!(cols);
            }
            b
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tables() -> Tables {
        let col = |n: &str, t: &str, k: bool| PublishedColumn {
            name: n.into(),
            compare_type: t.into(),
            in_identity: k,
            in_primary_key: k,
        };
        HashMap::from([(
            ("public".to_owned(), "todos".to_owned()),
            PublishedTable {
                columns: vec![col("id", "int8", true), col("task", "text", false)],
                full_identity: false,
            },
        )])
    }

    #[test]
    fn order_lists_parse_as_postgrest_spells_them() {
        let columns = &tables()[&("public".to_owned(), "todos".to_owned())].columns;
        let key = |c: &str, descending, nulls_first| OrderKey { column: c.into(), descending, nulls_first };
        assert_eq!(
            parse_order("task.desc,id", columns),
            Ok(vec![key("task", true, None), key("id", false, None)])
        );
        assert_eq!(parse_order("id.asc.nullslast", columns), Ok(vec![key("id", false, Some(false))]));
        assert_eq!(parse_order("id.nullsfirst", columns), Ok(vec![key("id", false, Some(true))]));
        assert_eq!(parse_order("", columns), Ok(vec![]));
        assert!(parse_order("nope.desc", columns).unwrap_err().contains("\"nope\" is not a column"));
        assert!(parse_order("id.desc.asc", columns).is_err(), "two directions");
        assert!(parse_order("id.nullsfirst.desc", columns).is_err(), "direction after nulls");
        assert!(parse_order("id,id.desc", columns).unwrap_err().contains("twice"));
        assert_eq!(key("id", true, Some(false)).sql("t.\"id\""), "t.\"id\" DESC NULLS LAST");
        // `order` is a live query's.
        let b = json!({"event":"*","schema":"public","table":"todos","order":"id"});
        assert!(resolve_one(&tables(), &b)
            .unwrap_err()
            .to_string()
            .contains("order applies to a live query"));
        let b = json!({"event":"*","schema":"public","table":"todos","order":"task.desc","live":true});
        let spec = resolve_one(&tables(), &b).unwrap();
        assert_eq!(spec.live.unwrap().order, [key("task", true, None)]);
    }

    #[test]
    fn ids_are_stable_and_positive() {
        let a = json!({"event":"*","schema":"public","table":"todos","filter":"id=eq.1"});
        let b = json!({"event":"*","schema":"public","table":"todos","filter":"id=eq.1","extra":true});
        assert_eq!(binding_id(&a), binding_id(&b));
        assert_ne!(binding_id(&a), binding_id(&json!({"event":"*","schema":"public","table":"todos"})));
        assert!(binding_id(&a) <= i32::MAX as u32);
        // null, missing and "" are alike.
        assert_eq!(
            binding_id(&json!({"event":"*","filter":null})),
            binding_id(&json!({"event":"*","filter":""}))
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let t = tables();
        let e =
            resolve_one(&t, &json!({"event":"*","schema":"public","table":"nope"})).unwrap_err().to_string();
        assert!(
            e.starts_with("Unable to subscribe to changes with given parameters")
                && e.contains("table: nope"),
            "{e}"
        );
        let e =
            resolve_one(&t, &json!({"event":"*","table":"todos","filter":"id=eq"})).unwrap_err().to_string();
        assert!(e.starts_with("Error parsing `filter` params"), "{e}");
        let e =
            resolve_one(&t, &json!({"event":"*","table":"todos","filter":"x=eq.1"})).unwrap_err().to_string();
        assert_eq!(e, "invalid column for filter x");
        let e = resolve_one(&t, &json!({"event":"*","table":"todos","filter":"id=eq.abc"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("int8"), "{e}");
        let e = resolve_one(&t, &json!({"event":"DELETE","table":"todos","filter":"task=eq.a"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("REPLICA IDENTITY FULL"), "{e}");
        let e = resolve_one(&t, &json!({"event":"upsert","table":"todos"})).unwrap_err().to_string();
        assert!(e.contains("event must be"), "{e}");
        assert!(resolve_one(&t, &json!({"event":"insert","table":"todos","filter":"task=eq.a"})).is_ok());
        assert!(resolve_one(&t, &json!({"event":"*","schema":"public"})).is_ok());
    }
}
