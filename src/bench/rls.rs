//! `rls`: row-level security under load. C subscribers spread over U users each join with their
//! user's token to every INSERT of one table whose policy is `owner = auth.uid()`; a writer
//! commits R changes/s spread evenly over the users. Each change must reach exactly its owner's
//! C/U subscribers: a frame about another user's row is a leak, a missing one is lost.
//!
//! The limit it is compared with, in the same run: the same sockets and deliveries without
//! row-level security (service_role, each binding filtered by `owner=eq.<its user>`), i.e. what
//! the gateway does for these clients when no check is needed.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::bench::client::{connect_all, phoenix_join_as, Socket};
use crate::bench::gateway::{http_get, BenchGateway, BENCH_SECRET};
use crate::bench::realtime::{print_header, search_rates, spawn_reader, step, Receiver, Source, Step};
use crate::bench::sockets::{database, drop_objects, ensure_open_files, teardown};
use crate::bench::BenchOptions;

#[derive(Debug, Clone)]
pub struct RlsOptions {
    pub clients: usize,
    pub users: usize,
    /// Changes committed per second in the fixed-rate run.
    pub rate: u64,
    pub seconds: u64,
    /// Rates tried after the fixed run, ascending, until one loses, leaks or exceeds the bound
    /// in every try.
    pub steps: Vec<u64>,
    pub step_seconds: u64,
    /// Tries a rate gets to hold the latency bound (a loss or a leak stops the search at once).
    pub step_tries: u32,
    pub p99_bound_ms: f64,
    pub gateway_bin: PathBuf,
    pub gateway_url: Option<String>,
}

const SETUP: &str = "
CREATE SCHEMA IF NOT EXISTS auth;
-- As Supabase defines it.
CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid
$$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated;
DROP TABLE IF EXISTS walcast_bench_owned;
CREATE TABLE walcast_bench_owned (id bigint PRIMARY KEY, owner uuid NOT NULL, body text NOT NULL);
ALTER TABLE walcast_bench_owned ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON walcast_bench_owned FOR SELECT TO authenticated USING (owner = auth.uid());
GRANT SELECT ON walcast_bench_owned TO authenticated;
";

const INSERT: &str =
    "INSERT INTO walcast_bench_owned (id, owner, body) VALUES ($1, walcast_bench_owner($1), $2)";

fn user_id(u: usize) -> String {
    format!("00000000-0000-0000-0000-{u:012}")
}

/// One side of the comparison: its fixed-rate step, its search steps, leaks and checks.
struct Side {
    fixed: Step,
    steps: Vec<Step>,
    best: Option<Step>,
    leaked: u64,
    checks: Option<u64>,
    withheld: Option<u64>,
    cpu: Option<f64>,
}

impl Side {
    fn json(&self) -> serde_json::Value {
        json!({
            "fixed": self.fixed.json(),
            "steps": self.steps.iter().map(Step::json).collect::<Vec<_>>(),
            "max_rate": self.best.map(|s| s.rate),
            "leaked": self.leaked,
            "rls_checks": self.checks, "rls_withheld": self.withheld,
            "gateway_cpu_seconds_fixed": self.cpu.map(|c| (c * 100.0).round() / 100.0),
        })
    }
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub async fn run(opts: &BenchOptions, o: &RlsOptions) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        o.users > 0 && o.clients >= o.users && o.clients.is_multiple_of(o.users),
        "clients must be a multiple of users"
    );
    ensure_open_files(o.clients + 10)?;
    let start = Instant::now();
    let env = database(opts, "rls").await?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&env.url).await?;
    sqlx::raw_sql(SETUP).execute(&pool).await?;
    sqlx::raw_sql(&format!(
        "CREATE OR REPLACE FUNCTION walcast_bench_owner(id bigint) RETURNS uuid LANGUAGE sql IMMUTABLE AS \
         $$ SELECT ('00000000-0000-0000-0000-' || lpad((id % {})::text, 12, '0'))::uuid $$",
        o.users
    ))
    .execute(&pool)
    .await?;
    let gw = BenchGateway::start(o.gateway_url.as_deref(), &o.gateway_bin, &env.url, &env.slot, 4096).await?;
    let addr = gw.addr().to_owned();
    let fanout = (o.clients / o.users) as u64;
    let mut seq = 0i64;
    print_header();

    let mut sides = Vec::new();
    for checked in [true, false] {
        let who = if checked { "rls" } else { "filter" };
        eprintln!(
            "rls: {} subscribers over {} users, {}…",
            o.clients,
            o.users,
            if checked { "each with its user's token" } else { "service_role, filtered by owner" }
        );
        let users = o.users;
        // One token per user, shared by its sockets (as a browser's tabs share one session):
        // the check's cost follows distinct (role, claims), and tokens minted a second apart
        // differ in `iat`/`exp`.
        let tokens: Vec<Option<String>> = (0..users)
            .map(|u| {
                let ttl = Duration::from_secs(24 * 3600);
                crate::auth::mint(BENCH_SECRET, "authenticated", Some(&user_id(u)), ttl, Default::default())
                    .ok()
            })
            .collect();
        let sockets = connect_all(o.clients, |i| {
            let u = i % users;
            let mut binding = json!({"event": "INSERT", "schema": "public", "table": "walcast_bench_owned"});
            let token = if checked {
                tokens[u].clone()
            } else {
                binding["filter"] = format!("owner=eq.{}", user_id(u)).into();
                None
            };
            phoenix_join_as(
                &addr,
                format!("realtime:{who}{i}"),
                json!({"postgres_changes": [binding]}),
                true,
                token,
            )
        })
        .await?;
        let mut receivers = Vec::new();
        let mut tasks = Vec::new();
        let mut sinks = Vec::new();
        for (i, ws) in sockets.into_iter().enumerate() {
            let (sink, stream): (_, futures_util::stream::SplitStream<Socket>) = ws.split();
            let r = Receiver::expecting(Some(format!("\"owner\":\"{}\"", user_id(i % users)).into_bytes()));
            tasks.push(spawn_reader(stream, start, Arc::clone(&r)));
            receivers.push(r);
            sinks.push(sink);
        }
        let mut source = Source::Db(pool.clone(), INSERT, None);
        let before = http_get(&addr, "/metrics").await.unwrap_or_default();
        let cpu0 = gw.usage().map(|u| u.0);
        let fixed = step(&mut source, &receivers, start, o.rate, o.seconds, fanout, &mut seq).await?;
        let cpu = gw.usage().map(|u| u.0).zip(cpu0).map(|(a, b)| a - b);
        fixed.print(who);
        let after = http_get(&addr, "/metrics").await.unwrap_or_default();
        let delta = |name| metric(&after, name).zip(metric(&before, name)).map(|(a, b)| a - b);
        let (checks, withheld) = (delta("walcast_rls_checks_total"), delta("walcast_rls_withheld_total"));
        let leaks = |rs: &[Arc<Receiver>]| rs.iter().map(|r| r.leaked.load(Ordering::Relaxed)).sum::<u64>();
        let run = async |rate| {
            let s = step(&mut source, &receivers, start, rate, o.step_seconds, fanout, &mut seq).await?;
            s.print(who);
            Ok(s)
        };
        let (steps, best) = search_rates(&o.steps, o.step_tries, o.p99_bound_ms, run, |s| {
            s.lost() > 0 || leaks(&receivers) > 0
        })
        .await?;
        let leaked = leaks(&receivers);
        for t in tasks {
            t.abort();
        }
        drop(sinks);
        sides.push(Side { fixed, steps, best, leaked, checks, withheld, cpu });
    }
    pool.close().await;
    gw.stop().await;
    drop_objects(
        &env,
        "DROP TABLE IF EXISTS walcast_bench_owned; DROP FUNCTION IF EXISTS walcast_bench_owner",
    )
    .await;
    teardown(env).await;
    let (rls, filter) = (&sides[0], &sides[1]);
    println!(
        "fixed {} changes/s: rls delivered {:.0} changes/s, p99 {:.2} ms, {} lost, {} leaked, {} checks; \
         without rls (filter) p99 {:.2} ms, {} lost",
        o.rate,
        rls.fixed.delivered as f64 / fanout as f64 / o.seconds as f64,
        rls.fixed.p99,
        rls.fixed.lost(),
        rls.leaked,
        rls.checks.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
        filter.fixed.p99,
        filter.fixed.lost(),
    );
    if !o.steps.is_empty() {
        println!(
            "highest rate with 0 lost, 0 leaked and p99 <= {} ms: rls {:?}, filter {:?}",
            o.p99_bound_ms,
            rls.best.map(|s| s.rate),
            filter.best.map(|s| s.rate)
        );
    }
    let v = json!({
        "scenario": "rls", "clients": o.clients, "users": o.users, "rate": o.rate, "seconds": o.seconds,
        "rls": rls.json(), "filter": filter.json(),
    });
    super::write_json(opts, &v)?;
    Ok(v)
}
