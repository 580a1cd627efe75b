//! Initial snapshots with a consistent hand-off to live changes: a join with `snapshot` first
//! receives the current rows its bindings match (filters and row-level security applied as for
//! live changes), then an end marker, then exactly the changes the snapshot does not reflect.
//!
//! The hand-off: the member joins with a held [`ResumeGate`](crate::realtime::gate::ResumeGate), and
//! its bindings go live at the dispatcher's last matched change (`through`). Only then is the
//! snapshot taken, in a `REPEATABLE READ` transaction whose MVCC snapshot (`xmin`, `xmax`, the
//! running xids) and WAL insert position (`boundary`) are read with it. A transaction is in the
//! snapshot exactly when its xid is visible to it, and every transaction visible to it committed
//! before `boundary`. So: changes up to `through` are in the snapshot (checked against the hub's
//! recent transactions; the snapshot is taken again in the rare case one is not yet visible), and
//! of the later ones the gate drops those whose transaction the snapshot already shows, until the
//! stream passes `boundary`. A row committed during the snapshot appears once, in its final
//! state.
//!
//! Owns: the snapshot transaction (its own small connection pool, so long snapshots never starve
//! row-level security checks), reading a table's rows as `Change`s (INSERT-shaped, marked
//! `snapshot`), and the xid visibility rule. Must not: hold more than one batch of rows in memory,
//! or block the dispatcher.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::Row;

use crate::change::{Change, ChangeKind, Column, Position, Relation, ReplicaIdentity};
use crate::realtime::dispatch::render::Scratch;
use crate::realtime::dispatch::replay::replay_batch;
use crate::realtime::gate::XidSnapshot;
use crate::realtime::hub::Hub;
use crate::realtime::index::Subscription;
use crate::realtime::member::Member;
use crate::realtime::outbox::{Direct, Queued};
use crate::realtime::snapshot_source::{SnapshotSource, ACQUIRE_TIMEOUT};
use crate::replication::lsn::Lsn;
use crate::replication::pgoutput::{Tuple, Value};
use crate::replication::values::CatalogError;

/// Rows read, checked and sent per step (the memory a snapshot holds).
const ROWS_PER_BATCH: usize = 256;
/// Attempts at a snapshot that shows every transaction already matched.
const ATTEMPTS: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapshotError {
    #[error("snapshots are not available (no database)")]
    NoSource,
    #[error("reading the snapshot")]
    Query(#[from] sqlx::Error),
    #[error(transparent)]
    Types(#[from] CatalogError),
    #[error("table {0} not found")]
    NoTable(String),
    #[error(
        "the gateway's database role is subject to row-level security on {0}; grant it BYPASSRLS \
         (subscribers' row-level security is applied by the gateway)"
    )]
    GatewayRls(String),
    #[error("the database did not give a usable snapshot ({0:?})")]
    BadSnapshot(String),
    #[error("no snapshot showed every transaction already delivered")]
    NotSettled,
    #[error("the client went away")]
    Gone,
    #[error(
        "the client did not read the snapshot within {0} s (snapshot_hold_secs): a snapshot's \
         transaction is not held open for a client"
    )]
    ClientTooSlow(u64),
    #[error("no snapshot connection was free within {0} s: too many snapshots at once")]
    Busy(u64),
}

/// One page of a snapshot read in pages (a long-poll's): at most `rows` rows of one table, in
/// primary-key order, after the key `after` (the first page when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPage {
    pub rows: usize,
    /// The last key of the previous page, as the JSON object `{"<column>": "<value as text>"}`
    /// that [`Direct::SnapshotEnd`]'s `more` carried.
    pub after: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A snapshot prepared by a join, started by the transport once it has answered the join.
pub struct Snapshot {
    pub(crate) hub: Hub,
    pub(crate) member: Arc<Member>,
    pub(crate) subs: Vec<Arc<Subscription>>,
    /// The tables to read, in binding order, each once.
    pub(crate) tables: Vec<(Arc<str>, Arc<str>)>,
    /// The last change matched before the bindings were added.
    pub(crate) through: Position,
    /// The session's turn: one of its snapshots reads at a time.
    pub(crate) turn: Arc<tokio::sync::Semaphore>,
    /// Read one page of the (single) table rather than all of it.
    pub(crate) page: Option<SnapshotPage>,
}

/// Where a paged read stands after a page: the key its last row had, if more rows follow.
type More = Option<String>;

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("tables", &self.tables).field("through", &self.through).finish()
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The query that reads a table's rows (as text, in the relation's column order) for a
/// snapshot, or for one page of it.
struct TableRead {
    /// `SELECT … FROM table`.
    select: String,
    /// The primary key's columns (indexes into the relation's), for reading in key order.
    key: Vec<usize>,
    key_names: Vec<Arc<str>>,
}

impl TableRead {
    fn new(relation: &Relation) -> TableRead {
        let columns: Vec<String> = relation
            .columns
            .iter()
            .map(|c| {
                let q = quote_ident(&c.name);
                format!("CASE WHEN num_nulls({q}) = 1 THEN NULL ELSE format('%s', {q}) END")
            })
            .collect();
        let select = format!(
            "SELECT {} FROM {}.{}",
            if columns.is_empty() { "1".to_owned() } else { columns.join(", ") },
            quote_ident(&relation.schema),
            quote_ident(&relation.table)
        );
        let key: Vec<usize> =
            (0..relation.columns.len()).filter(|&i| relation.columns[i].in_primary_key).collect();
        let key_names = key.iter().map(|&i| Arc::clone(&relation.columns[i].name)).collect();
        TableRead { select, key, key_names }
    }

    /// At most `n` rows in key order, after the key bound as `$1` (JSON, see
    /// [`TableRead::key_of`]) when `after`.
    fn batch_sql(&self, relation: &Relation, after: bool, n: usize) -> String {
        let table = format!("{}.{}", quote_ident(&relation.schema), quote_ident(&relation.table));
        let quoted: Vec<String> = self.key_names.iter().map(|n| quote_ident(n)).collect();
        let mut sql = self.select.clone();
        if after {
            // The last key read, typed by the table's own row type.
            let theirs = quoted.iter().map(|q| format!("a.{q}")).collect::<Vec<_>>().join(", ");
            let ours = quoted.iter().map(|q| format!("{table}.{q}")).collect::<Vec<_>>().join(", ");
            sql.push_str(&format!(
                " WHERE ({ours}) > (SELECT {theirs} FROM json_populate_record(NULL::{table}, $1::json) a)"
            ));
        }
        sql.push_str(&format!(" ORDER BY {} LIMIT {n}", quoted.join(", ")));
        sql
    }

    /// Every row, in a live query's `order` and then key order (names qualified by the table's:
    /// an output column's name never stands in for one of the table's).
    fn ordered_sql(&self, relation: &Relation, order: &[crate::subscribe::OrderKey]) -> String {
        let table = format!("{}.{}", quote_ident(&relation.schema), quote_ident(&relation.table));
        let by: Vec<String> = order
            .iter()
            .map(|k| k.sql(&format!("{table}.{}", quote_ident(&k.column))))
            .chain(self.key_names.iter().map(|n| format!("{table}.{}", quote_ident(n))))
            .collect();
        format!("{} ORDER BY {}", self.select, by.join(", "))
    }

    /// A row's key as `{"<column>": "<value>"}` (the text the next page's query parses back).
    fn key_of(&self, values: &[Value]) -> String {
        let mut key = serde_json::Map::new();
        for (name, &i) in self.key_names.iter().zip(&self.key) {
            let v = match values.get(i) {
                Some(Value::Text(t)) => serde_json::Value::String(String::from_utf8_lossy(t).into_owned()),
                _ => serde_json::Value::Null,
            };
            key.insert(name.to_string(), v);
        }
        serde_json::Value::Object(key).to_string()
    }
}

/// A snapshot's progress in sending: what it sent and how much longer its client may keep the
/// transaction open by not reading.
struct Sending {
    scratch: Scratch,
    patience: Duration,
    client_wait: Duration,
    rows: u64,
}

impl Snapshot {
    /// Reads and sends the snapshot in its own task, then opens the gate.
    pub fn start(self) {
        tokio::spawn(self.run());
    }

    async fn run(self) {
        let metrics = self.hub.metrics();
        // Closed never: the session holds the semaphore for as long as snapshots may be made.
        let Ok(_turn) = Arc::clone(&self.turn).acquire_owned().await else { return };
        let started = std::time::Instant::now();
        let sent = self.send().await;
        metrics.snapshot.record(started.elapsed());
        match sent {
            Ok((rows, shown, more)) => {
                let cursor = self.hub.log().map(|log| log.cursor(self.through).to_string());
                let frame = self.member.encoder.encode_direct(
                    &self.member.key.topic,
                    self.member.address.as_deref(),
                    &Direct::SnapshotEnd { cursor: cursor.as_deref(), rows, more: more.as_deref() },
                );
                if self.member.outbox.send_wait(frame, metrics).await != Queued::Yes {
                    return;
                }
                self.member.release_after_snapshot(self.through, Arc::new(shown), self.hub.metrics()).await;
            }
            Err(SnapshotError::Gone) => {}
            Err(e) => {
                tracing::warn!(error = %crate::errors::chain(&e), "snapshot failed");
                let message = format!(
                    "the snapshot failed: {}; changes follow, but subscribe again for the current rows",
                    crate::errors::chain(&e)
                );
                let frame = self.member.encoder.encode_direct(
                    &self.member.key.topic,
                    self.member.address.as_deref(),
                    &Direct::Gap { code: "snapshot_failed", message: &message },
                );
                let _ = self.member.outbox.send_wait(frame, metrics).await;
                self.member
                    .release_after_snapshot(self.through, Arc::new(XidSnapshot::none()), self.hub.metrics())
                    .await;
            }
        }
    }

    /// Takes the snapshot and sends its rows; returns how many, the snapshot's visibility and,
    /// for a page with more rows after it, its last key.
    async fn send(&self) -> Result<(u64, XidSnapshot, More), SnapshotError> {
        let source = self.hub.snapshots().ok_or(SnapshotError::NoSource)?;
        let mut attempt = 0;
        let (mut tx, shown, now) = loop {
            let begin = source.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY");
            let mut tx = match begin.await {
                Err(sqlx::Error::PoolTimedOut) => return Err(SnapshotError::Busy(ACQUIRE_TIMEOUT.as_secs())),
                other => other?,
            };
            // The first statement takes the transaction's snapshot; the rest is read after it.
            let (text, boundary, now): (String, String, i64) = sqlx::query_as(
                "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text, \
                        (extract(epoch FROM now()) * 1000000)::int8 - 946684800000000, \
                        set_config('TimeZone', 'UTC', true), set_config('DateStyle', 'ISO', true), \
                        set_config('IntervalStyle', 'postgres', true), \
                        set_config('extra_float_digits', '3', true), set_config('bytea_output', 'hex', true)",
            )
            .fetch_one(&mut *tx)
            .await
            .map(|r: (String, String, i64, String, String, String, String, String)| (r.0, r.1, r.2))?;
            let boundary: Lsn = boundary.parse().map_err(|_| SnapshotError::BadSnapshot(boundary.clone()))?;
            let shown = XidSnapshot::parse(&text, boundary).ok_or(SnapshotError::BadSnapshot(text))?;
            // Transactions matched up to `through` are not delivered live: the snapshot must show
            // them. One committed (and decoded) just before may not be visible yet.
            let settled = self
                .hub
                .recent_txns()
                .into_iter()
                .filter(|(lsn, _)| *lsn <= self.through.lsn)
                .all(|(_, xid)| xid == 0 || shown.visible(xid));
            if settled {
                break (tx, shown, now);
            }
            drop(tx);
            attempt += 1;
            if attempt >= ATTEMPTS {
                return Err(SnapshotError::NotSettled);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut sending = Sending {
            scratch: Scratch::default(),
            patience: source.client_wait,
            client_wait: source.client_wait,
            rows: 0,
        };
        let mut more = None;
        for (schema, table) in &self.tables {
            let relation = self.relation(source, &mut tx, schema, table).await?;
            let read = TableRead::new(&relation);
            match &self.page {
                // Without a primary key there is no order to page in: the whole table is one page.
                Some(page) if !read.key.is_empty() => {
                    more = self.send_page(&mut tx, &relation, &read, page, now, &mut sending).await?;
                }
                _ => self.send_all(&mut tx, &relation, &read, now, &mut sending).await?,
            }
        }
        let _ = tx.rollback().await;
        Ok((sending.rows, shown, more))
    }

    /// Sends every row of the table.
    async fn send_all(
        &self,
        tx: &mut sqlx::PgConnection,
        relation: &Arc<Relation>,
        read: &TableRead,
        now: i64,
        sending: &mut Sending,
    ) -> Result<(), SnapshotError> {
        let sql = match self.member.live.as_ref().map(|l| &l.spec.order) {
            Some(order) if !order.is_empty() => read.ordered_sql(relation, order),
            _ => read.select.clone(),
        };
        let mut stream = sqlx::query(&sql).fetch(&mut *tx);
        let mut batch = Vec::with_capacity(ROWS_PER_BATCH);
        while let Some(row) = stream.try_next().await? {
            batch.push(self.row_change(relation, &row, now)?);
            if batch.len() >= ROWS_PER_BATCH {
                self.deliver(&mut batch, sending).await?;
            }
        }
        self.deliver(&mut batch, sending).await
    }

    /// Sends up to `page.rows` rows the member may see, in key order after `page.after`, read in
    /// batches of the same transaction; returns the last key read when more rows follow.
    async fn send_page(
        &self,
        tx: &mut sqlx::PgConnection,
        relation: &Arc<Relation>,
        read: &TableRead,
        page: &SnapshotPage,
        now: i64,
        sending: &mut Sending,
    ) -> Result<More, SnapshotError> {
        let mut after = page.after.as_ref().map(|a| serde_json::Value::Object(a.clone()).to_string());
        let target = sending.rows + page.rows as u64;
        loop {
            let n = ROWS_PER_BATCH.min((target - sending.rows) as usize);
            // One row more than is taken: whether any follow.
            let sql = read.batch_sql(relation, after.is_some(), n + 1);
            let mut query = sqlx::query(&sql);
            if let Some(a) = &after {
                query = query.bind(a.clone());
            }
            let fetched = query.fetch_all(&mut *tx).await?;
            let exhausted = fetched.len() <= n;
            let mut batch = Vec::with_capacity(n);
            for row in fetched.iter().take(n) {
                let change = self.row_change(relation, row, now)?;
                after = change.new.as_ref().map(|t| read.key_of(&t.0));
                batch.push(change);
            }
            self.deliver(&mut batch, sending).await?;
            if exhausted {
                return Ok(None);
            }
            if sending.rows >= target {
                return Ok(after);
            }
        }
    }

    /// A row read as text, as an INSERT-shaped snapshot change.
    fn row_change(
        &self,
        relation: &Arc<Relation>,
        row: &sqlx::postgres::PgRow,
        now: i64,
    ) -> Result<Change, SnapshotError> {
        let values = (0..relation.columns.len())
            .map(|i| {
                row.try_get::<Option<String>, _>(i).map(|v| match v {
                    Some(t) => Value::Text(t.into()),
                    None => Value::Null,
                })
            })
            .collect::<Result<Vec<Value>, sqlx::Error>>()?;
        Ok(Change {
            relation: Arc::clone(relation),
            kind: ChangeKind::Insert,
            new: Some(Tuple(values)),
            old: None,
            commit_lsn: self.through.lsn,
            commit_ts: now,
            seq: 0,
            xid: 0,
            snapshot: true,
        })
    }

    /// Filters and checks a batch of rows and sends those the member may see, within the
    /// client's patience.
    async fn deliver(&self, batch: &mut Vec<Change>, sending: &mut Sending) -> Result<(), SnapshotError> {
        if batch.is_empty() {
            return Ok(());
        }
        let frames =
            replay_batch(&self.hub, &self.member, &self.subs, batch.drain(..), &mut sending.scratch).await;
        for frame in frames {
            let started = tokio::time::Instant::now();
            let sent = self.member.outbox.send_wait(frame, self.hub.metrics());
            match tokio::time::timeout(sending.patience, sent).await {
                Ok(Queued::Yes) => {}
                Ok(_) => return Err(SnapshotError::Gone),
                Err(_) => return Err(SnapshotError::ClientTooSlow(sending.client_wait.as_secs())),
            }
            sending.patience = sending.patience.saturating_sub(started.elapsed());
            sending.rows += 1;
        }
        Ok(())
    }

    /// The table's shape as pgoutput describes it (generated columns are not replicated).
    async fn relation(
        &self,
        source: &SnapshotSource,
        tx: &mut sqlx::PgConnection,
        schema: &str,
        table: &str,
    ) -> Result<Arc<Relation>, SnapshotError> {
        let rows = sqlx::query(
            "SELECT c.oid::int8, c.relreplident::text, row_security_active(c.oid), a.attname::text, \
                    a.atttypid::int8, \
                    (c.relreplident = 'f' OR a.attnum = ANY(COALESCE((SELECT i.indkey::int2[] FROM pg_index i \
                        WHERE i.indrelid = c.oid AND CASE c.relreplident WHEN 'i' THEN i.indisreplident ELSE i.indisprimary END \
                        LIMIT 1), '{}'))), \
                    a.attnum = ANY(COALESCE((SELECT i.indkey::int2[] FROM pg_index i \
                        WHERE i.indrelid = c.oid AND i.indisprimary LIMIT 1), '{}')) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                  AND a.attgenerated = '' \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
        )
        .bind(schema)
        .bind(table)
        .fetch_all(&mut *tx)
        .await?;
        let name = format!("{schema}.{table}");
        let first = rows.first().ok_or_else(|| SnapshotError::NoTable(name.clone()))?;
        let oid: i64 = first.try_get(0)?;
        let identity: String = first.try_get(1)?;
        if first.try_get::<bool, _>(2)? {
            return Err(SnapshotError::GatewayRls(name));
        }
        let mut columns = Vec::with_capacity(rows.len());
        let mut types = source.types.lock().await;
        for row in &rows {
            let name: String = row.try_get(3)?;
            let ty: i64 = row.try_get(4)?;
            columns.push(Column {
                name: name.into(),
                ty: types.resolve(&source.pool, ty as u32).await?,
                is_key: row.try_get(5)?,
                in_primary_key: row.try_get(6)?,
            });
        }
        Ok(Arc::new(Relation::new(
            oid as u32,
            schema,
            table,
            ReplicaIdentity::from_byte(identity.bytes().next().unwrap_or(b'd')),
            columns,
        )))
    }
}
