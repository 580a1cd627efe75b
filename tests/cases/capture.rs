//! Change capture against a real server: values equal to `to_jsonb`, replica identity, unchanged
//! TOAST, TRUNCATE, DDL mid-stream, resume after a crash, authentication.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use walcast::change::{Change, ChangeEvent, ChangeKind};
use walcast::replication::ack::Acknowledgement;
use walcast::replication::slot;
use walcast::replication::wire::ConnectParams;
use walcast::source::walsender::{ReplicationStatus, ReplicationTask};

use crate::support::{self, exec, fresh_db, pool};

/// A replication task on its own slot, with changes delivered to the test.
pub struct Capture {
    rx: mpsc::Receiver<ChangeEvent>,
    pub ack: Acknowledgement,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Capture {
    pub async fn start(url: &str, slot_name: &str) -> Capture {
        slot::migrate(url).await.expect("migrations");
        let p = pool(url).await;
        slot::ensure_publication(&p, "walcast", &["public.*".into()]).await.expect("publication");
        let params = ConnectParams::from_url(url).expect("url");
        slot::ensure_slot(&p, &params, slot_name).await.expect("slot");
        let (tx, rx) = mpsc::channel(64);
        let ack = Acknowledgement::new();
        let status = Arc::new(ReplicationStatus::default());
        let shutdown = CancellationToken::new();
        let task = ReplicationTask {
            resume_after: walcast::replication::lsn::Lsn::ZERO,
            params,
            slot: slot_name.into(),
            publication: "walcast".into(),
            pool: p,
            tx,
            ack: ack.clone(),
            status,
        };
        let handle = tokio::spawn(task.run(shutdown.clone()));
        Capture { rx, ack, shutdown, handle }
    }

    /// The next change; commits in between are acknowledged as dispatched.
    pub async fn next(&mut self) -> Change {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
                .await
                .expect("a change within 30 s")
                .expect("stream open");
            match ev {
                ChangeEvent::Change(c) => return c,
                ChangeEvent::Broadcast(_) => {}
                ChangeEvent::Commit { end_lsn, .. } => self.ack.advance(end_lsn),
            }
        }
    }

    pub async fn next_n(&mut self, n: usize) -> Vec<Change> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.next().await);
        }
        v
    }

    /// Waits for the next commit, acknowledges it, and returns its end LSN.
    pub async fn ack_commit(&mut self) -> walcast::replication::lsn::Lsn {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
                .await
                .expect("commit")
                .expect("open");
            if let ChangeEvent::Commit { end_lsn, .. } = ev {
                self.ack.advance(end_lsn);
                return end_lsn;
            }
        }
    }

    /// Stops cleanly (final status update).
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }

    /// Kills the task without a final status update, as a crash would.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

fn record(c: &Change) -> String {
    let mut out = Vec::new();
    assert!(c.write_record(&mut out, None));
    String::from_utf8(out).expect("utf8")
}

fn old_record(c: &Change) -> String {
    let mut out = Vec::new();
    assert!(c.write_old_record(&mut out, None));
    String::from_utf8(out).expect("utf8")
}

const TYPES_DDL: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'happy', 'so "so"');
CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
CREATE TYPE pair AS (n int4, s text, at timestamptz);
CREATE TABLE types (
  id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, o oid, f4 float4, f8 float8, num numeric,
  t text, vc varchar(10), ch char(5), nm name, j json, jb jsonb, u uuid, d date, tm time, ttz timetz,
  ts timestamp, tstz timestamptz, iv interval, by bytea, ip inet, cidr_ cidr, mac macaddr, mon money,
  bt bit(4), vb varbit, pt point, ln line, ls lseg, bx box, pth path, pg polygon, cr circle,
  tsv tsvector, x xml, md mood, dom posint, comp pair, r int4range, mr int4multirange, tsr tstzrange,
  a_i int4[], a_t text[], a_2d int4[], a_ts timestamptz[], a_jb jsonb[], a_comp pair[], a_bool bool[],
  a_num numeric[], a_md mood[], a_f8 float8[], a_box box[], a_date date[], a_u uuid[]
);
"#;

const TYPES_ROWS: &str = r#"
INSERT INTO types VALUES (
  1, true, -32768, 2147483647, -9223372036854775808, 4294967295, 1.1, 3.141592653589793, 12345678901234567890.123456789000,
  E'quote " backslash \\ newline \n tab \t unicode é 🎉 ctl \x01', 'varchar', 'ab', 'a_name',
  '{"b": 1, "a": [1, 2.50, null], "a": "dup"}', '{"z": {"y": [true, false]}, "n": 1.50}',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '23:59:59.999999', '12:34:56+05:30',
  '2024-01-02 03:04:05.678901', '2024-01-02 03:04:05.678901+05:30', '1 year 2 mons 3 days 04:05:06.7',
  '\x00ff10', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', 1234.56,
  B'1010', B'101', '(1.5,-2)', '{1,2,3}', '[(0,0),(1,1)]', '((0,0),(1,1))', '[(0,0),(1,1),(2,0)]',
  '((0,0),(1,1),(2,0))', '<(1,1),5>', 'a fat cat:1 sat', '<a href="x">t &amp; u</a>', 'so "so"', 7,
  ROW(1, 'a "b", c', '2024-01-01 00:00:00+00'), '[1,10)', '{[1,3),[5,7)}', '[2024-01-01 00:00+00,infinity)',
  '{1,NULL,3}', '{"a,b","c\"d",NULL,"NULL","",e}', '[0:1][1:2]={{1,2},{3,4}}',
  '{"2024-01-01 00:00:00+00",NULL}', ARRAY['{"a": 1}'::jsonb, '[]'::jsonb], ARRAY[ROW(2, 'x', NULL)::pair, NULL],
  '{t,f,NULL}', '{1.50,NaN,-0.001}', '{happy,"so \"so\""}', '{NaN,Infinity,-Infinity,1e+300,-0}',
  '{(1,1),(0,0);(2,2),(1,1)}', '{2024-01-01,infinity}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'
);
INSERT INTO types (id, f4, f8, num, d, ts, tstz, a_i, a_t, jb, j)
  VALUES (2, 'NaN', '-Infinity', 'NaN', '-infinity', 'infinity', '-infinity', '{}', '{}', 'null', '"s"');
INSERT INTO types (id, f8, num, d, ts, tstz, i8, f4)
  VALUES (3, 1e-310, 'Infinity', '0044-03-15 BC', '0044-03-15 12:00:00 BC', '0044-03-15 12:00:00+00 BC', 0, '-0');
INSERT INTO types (id) VALUES (4);
INSERT INTO types (id, ts, tstz, f8, num) VALUES (5, '12345-01-01 00:00:00', '2024-06-01 00:00:00.5+00', 1e21, 0.000000001);
"#;

#[tokio::test]
async fn values_equal_to_jsonb() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, TYPES_DDL).await;
    let mut cap = Capture::start(&url, "oracle").await;
    exec(&p, TYPES_ROWS).await;
    let changes = cap.next_n(5).await;

    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    exec_conn(&mut conn, "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'")
        .await;
    let mut failures = Vec::new();
    for c in &changes {
        assert_eq!(c.kind, ChangeKind::Insert);
        let ours = record(c);
        let id = c.filter_value(0).map(|v| String::from_utf8_lossy(v).into_owned()).expect("id");
        let (same, theirs): (bool, String) = sqlx::query_as(
            "SELECT $1::jsonb::text = to_jsonb(row_)::text, to_jsonb(row_)::text FROM types row_ WHERE id = $2::int",
        )
        .bind(&ours)
        .bind(&id)
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("row {id}: our JSON is not valid jsonb ({e}): {ours}"));
        if !same {
            // Name the columns that differ.
            let ours_v: serde_json::Value = serde_json::from_str(&ours).unwrap_or_default();
            let theirs_v: serde_json::Value = serde_json::from_str(&theirs).unwrap_or_default();
            for (k, v) in theirs_v.as_object().into_iter().flatten() {
                if ours_v.get(k) != Some(v) {
                    failures.push(format!("row {id} column {k}: ours {:?} postgres {v}", ours_v.get(k)));
                }
            }
            if failures.is_empty() {
                failures.push(format!("row {id}: ours {ours}\n postgres {theirs}"));
            }
        }
    }
    assert!(failures.is_empty(), "values differ from to_jsonb:\n{}", failures.join("\n"));
    // Column type names are the catalog's.
    let cols = String::from_utf8(changes[0].relation.columns_json.to_vec()).expect("utf8");
    for t in [
        r#""type":"int4""#,
        r#""type":"_text""#,
        r#""type":"timestamptz""#,
        r#""type":"mood""#,
        r#""type":"posint""#,
    ] {
        assert!(cols.contains(t), "{t} missing in {cols}");
    }
    cap.stop().await;
}

async fn exec_conn(conn: &mut sqlx::PgConnection, sql: &str) {
    sqlx::raw_sql(sql).execute(&mut *conn).await.expect("exec");
}

#[tokio::test]
async fn replica_identity_default_and_full() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE d (id int PRIMARY KEY, v text); CREATE TABLE f (id int PRIMARY KEY, v text); ALTER TABLE f REPLICA IDENTITY FULL;").await;
    let mut cap = Capture::start(&url, "ident").await;
    exec(&p, "INSERT INTO d VALUES (1, 'a'); INSERT INTO f VALUES (1, 'a');").await;
    exec(
        &p,
        "UPDATE d SET v = 'b'; UPDATE f SET v = 'b'; UPDATE d SET id = 2; DELETE FROM d; DELETE FROM f;",
    )
    .await;
    let c = cap.next_n(7).await;
    assert_eq!(c[2].kind, ChangeKind::Update);
    assert_eq!(record(&c[2]), r#"{"id":1,"v":"b"}"#);
    assert!(c[2].old.is_none(), "default identity sends no old row when the key is unchanged");
    assert_eq!(old_record(&c[2]), r#"{"id":1}"#, "old_record still carries the (unchanged) key");
    assert_eq!(old_record(&c[3]), r#"{"id":1,"v":"a"}"#, "full identity sends the whole old row");
    assert_eq!(old_record(&c[4]), r#"{"id":1}"#, "a key change sends the old key");
    assert_eq!(record(&c[4]), r#"{"id":2,"v":"b"}"#);
    assert_eq!((c[5].kind, old_record(&c[5])), (ChangeKind::Delete, r#"{"id":2}"#.to_owned()));
    assert_eq!(old_record(&c[6]), r#"{"id":1,"v":"b"}"#);
    // Changes of one transaction share the commit and are numbered in order.
    assert_eq!((c[2].commit_lsn, c[2].commit_ts), (c[6].commit_lsn, c[6].commit_ts));
    assert!(c[2].cursor() < c[3].cursor() && c[3].cursor() < c[6].cursor() && c[0].cursor() < c[2].cursor());
    cap.stop().await;
}

#[tokio::test]
async fn unchanged_toast_is_never_invented() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE big (id int PRIMARY KEY, n int, blob text); CREATE TABLE bigf (id int PRIMARY KEY, n int, blob text); ALTER TABLE bigf REPLICA IDENTITY FULL; ALTER TABLE big ALTER blob SET STORAGE EXTERNAL; ALTER TABLE bigf ALTER blob SET STORAGE EXTERNAL;").await;
    let mut cap = Capture::start(&url, "toast").await;
    exec(&p, "INSERT INTO big SELECT 1, 0, string_agg(md5(g::text), '') FROM generate_series(1, 400) g; INSERT INTO bigf SELECT * FROM big;").await;
    exec(&p, "UPDATE big SET n = 1; UPDATE bigf SET n = 1;").await;
    let c = cap.next_n(4).await;
    let r = record(&c[2]);
    assert_eq!(r, r#"{"id":1,"n":1}"#, "the unsent TOAST value is left out");
    assert_eq!(c[2].unchanged_toast().iter().map(|s| s.to_string()).collect::<Vec<_>>(), vec!["blob"]);
    let tail = String::from_utf8(c[2].to_tail_json()).expect("utf8");
    assert!(tail.contains(r#""unchanged_toast":["blob"]"#), "{tail}");
    let r = record(&c[3]);
    assert!(
        r.starts_with(r#"{"id":1,"n":1,"blob":""#) && r.len() > 12_000,
        "full identity supplies the value"
    );
    assert!(c[3].unchanged_toast().is_empty());
    cap.stop().await;
}

#[tokio::test]
async fn truncate_and_ddl_mid_stream() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let mut cap = Capture::start(&url, "ddl").await;
    exec(&p, "INSERT INTO t VALUES (1, 1)").await;
    exec(&p, "ALTER TABLE t ADD COLUMN note text DEFAULT 'x'; INSERT INTO t VALUES (2, 2, 'y')").await;
    exec(&p, "ALTER TABLE t DROP COLUMN v; ALTER TABLE t ALTER COLUMN note DROP DEFAULT, ALTER COLUMN note TYPE int USING 5; INSERT INTO t VALUES (3, 6)").await;
    exec(&p, "TRUNCATE t").await;
    let c = cap.next_n(4).await;
    assert_eq!(record(&c[0]), r#"{"id":1,"v":1}"#);
    assert_eq!(record(&c[1]), r#"{"id":2,"v":2,"note":"y"}"#);
    assert_eq!(record(&c[2]), r#"{"id":3,"note":6}"#);
    assert_eq!(c[3].kind, ChangeKind::Truncate);
    assert_eq!(&*c[3].relation.table, "t");
    cap.stop().await;
}

#[tokio::test]
async fn resumes_after_a_crash_without_skipping() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE r (id int PRIMARY KEY)").await;
    let mut cap = Capture::start(&url, "resume").await;
    exec(&p, "INSERT INTO r SELECT generate_series(1, 50)").await;
    for i in 1..=20 {
        let c = cap.next().await;
        assert_eq!(record(&c), format!(r#"{{"id":{i}}}"#));
    }
    // Nothing of that transaction was acknowledged: the commit was not dispatched. Crash now.
    cap.kill().await;
    exec(&p, "INSERT INTO r SELECT generate_series(51, 60)").await;
    let mut cap = Capture::start(&url, "resume").await;
    let ids: Vec<String> = cap.next_n(60).await.iter().map(record).collect();
    let want: Vec<String> = (1..=60).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    assert_eq!(ids, want, "every change after the acknowledged position is decoded again, in order");
    // Once acknowledged, a restart does not repeat it.
    exec(&p, "INSERT INTO r VALUES (61)").await;
    assert_eq!(record(&cap.next().await), r#"{"id":61}"#);
    let flushed = cap.ack_commit().await;
    cap.stop().await;
    let info = slot::slot_info(&p, "resume").await.expect("query").expect("slot");
    let confirmed: walcast::replication::lsn::Lsn =
        info.confirmed_flush_lsn.expect("lsn").parse().expect("lsn");
    assert!(confirmed >= flushed);
    exec(&p, "INSERT INTO r VALUES (62)").await;
    let mut cap = Capture::start(&url, "resume").await;
    assert_eq!(record(&cap.next().await), r#"{"id":62}"#, "acknowledged changes are not sent again");
    cap.stop().await;
}

/// The resident-set figures of a process, in kB: (current, peak).
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .expect("field in /proc status")
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Measured on a `walcast tail` process of its own, so the figure is not shared with the tests
/// that run beside this one; the kernel's peak (VmHWM) catches what sampling would miss.
#[tokio::test]
async fn big_transaction_streams_with_bounded_memory() {
    use tokio::io::AsyncBufReadExt;
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE m (id int PRIMARY KEY, v text)").await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
        .args(["tail", "--tables", "public.m", "--events", "insert"])
        .env("WALCAST_DATABASE_URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("tail starts");
    let pid = child.id().expect("pid");
    support::wait_for_tail_slots(&p, "the tail's slot", true, 1).await;
    let (start_rss, _) = rss_kb(pid);
    exec(&p, "INSERT INTO m SELECT g, 'value ' || g FROM generate_series(1, 1000000) g").await;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut last = 0u64;
    for i in 1..=1_000_000u64 {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("a line within 60 s")
            .expect("read")
            .expect("open");
        if i % 50_000 == 0 {
            let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
            let id = v["record"]["id"].as_u64().expect("id");
            assert!(id > last, "in order");
            last = id;
        }
    }
    assert_eq!(last, 1_000_000);
    let (_, peak) = rss_kb(pid);
    let growth_mb = peak.saturating_sub(start_rss) / 1024;
    // A million decoded changes held at once would take several hundred MB.
    eprintln!("1M-row transaction: the tail's peak RSS grew by {growth_mb} MB");
    assert!(growth_mb < 100, "memory grew by {growth_mb} MB while streaming");
    child.kill().await.expect("kill");
}

#[tokio::test]
async fn scram_and_md5_authentication() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(
        &p,
        &format!(
            "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{s}') THEN
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE {s} LOGIN REPLICATION PASSWORD '{pw}';
             SET password_encryption = 'md5';
             CREATE ROLE {m} LOGIN REPLICATION PASSWORD '{pw}';
           END IF;
         END $$;",
            s = support::SCRAM_USER,
            m = support::MD5_USER,
            pw = support::PASSWORD
        ),
    )
    .await;
    let Some(port) = support::cluster_port() else {
        return;
    };
    let db = url.rsplit_once('/').map(|(_, d)| d.split('?').next().unwrap_or("")).unwrap_or("").to_owned();
    for user in [support::SCRAM_USER, support::MD5_USER] {
        let good = format!("postgres://{user}:s3cret%20pass@127.0.0.1:{port}/{db}?sslmode=disable");
        let mut c = walcast::replication::wire::ReplicationConnection::connect(
            &ConnectParams::from_url(&good).unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}"));
        let id = c.identify_system().await.expect("identify");
        assert_eq!(id.database.as_deref(), Some(db.as_str()));
        let bad = format!("postgres://{user}:wrong@127.0.0.1:{port}/{db}?sslmode=disable");
        let e = walcast::replication::wire::ReplicationConnection::connect(
            &ConnectParams::from_url(&bad).unwrap(),
        )
        .await
        .err()
        .expect("wrong password is refused");
        assert!(e.to_string().contains("authentication failed"), "{e}");
    }
}

#[tokio::test]
async fn exported_snapshot_hands_off_to_the_stream() {
    use walcast::replication::wire::{ReplicationConnection, SnapshotAction};
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE s (id int PRIMARY KEY); INSERT INTO s VALUES (1);").await;
    slot::migrate(&url).await.expect("migrations");
    slot::ensure_publication(&p, "walcast", &["public.*".into()]).await.expect("publication");
    let params = ConnectParams::from_url(&url).expect("url");
    let name = format!("snap_{}", url.rsplit('/').next().unwrap_or("x").split('?').next().unwrap_or("x"));
    let mut conn = ReplicationConnection::connect(&params).await.expect("connect");
    let created = conn.create_slot(&name, true, SnapshotAction::Export).await.expect("slot with snapshot");
    let snapshot = created.snapshot_name.expect("an exported snapshot");
    exec(&p, "INSERT INTO s VALUES (2)").await;
    // The snapshot sees exactly what was committed before the slot's consistent point…
    let mut tx = p.begin().await.expect("begin");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .expect("isolation");
    sqlx::query(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
        .execute(&mut *tx)
        .await
        .expect("import snapshot");
    let ids: Vec<i32> =
        sqlx::query_scalar("SELECT id FROM s ORDER BY id").fetch_all(&mut *tx).await.expect("read");
    tx.commit().await.expect("commit");
    assert_eq!(ids, [1]);
    // …and the stream carries everything after it, with nothing missed or repeated.
    let (tx, mut rx) = mpsc::channel(16);
    let task = ReplicationTask {
        resume_after: walcast::replication::lsn::Lsn::ZERO,
        params,
        slot: name,
        publication: "walcast".into(),
        pool: p.clone(),
        tx,
        ack: Acknowledgement::new(),
        status: Arc::new(ReplicationStatus::default()),
    };
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(task.run_on(conn, shutdown.clone()));
    let first = loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("change").expect("open") {
            ChangeEvent::Change(c) => break c,
            ChangeEvent::Commit { .. } | ChangeEvent::Broadcast(_) => {}
        }
    };
    assert_eq!(record(&first), r#"{"id":2}"#);
    shutdown.cancel();
    handle.await.expect("join").expect("clean end");
}
