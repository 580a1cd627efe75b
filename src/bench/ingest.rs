//! `ingest`: N small-row inserts; the rate at which walcast decodes, renders and matches them
//! (no subscriber), against `pg_recvlogical` receiving the same pgoutput stream from an
//! identical slot created at the same position — the walsender's own limit.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bench::BenchOptions;
use crate::change::ChangeEvent;
use crate::local_postgres::{LocalPostgres, LocalPostgresOptions};
use crate::realtime::dispatch::live::dispatch;
use crate::realtime::dispatch::render::Scratch;
use crate::realtime::{Hub, Limits};
use crate::replication::ack::Acknowledgement;
use crate::replication::lsn::Lsn;
use crate::replication::wire::{ConnectParams, ReplicationConnection, SnapshotAction};
use crate::source::walsender::{ReplicationStatus, ReplicationTask};

pub async fn run(opts: &BenchOptions, rows: u64) -> anyhow::Result<serde_json::Value> {
    let root = std::env::temp_dir().join(format!("walcast-bench-{}", std::process::id()));
    // Slots are cluster-wide: name them for this run.
    let gw_slot = format!("walcast_bench_gw_{}", std::process::id());
    let recv_slot = format!("walcast_bench_recv_{}", std::process::id());
    // A second pg_recvlogical run after walcast's, so neither reader is favoured by going second.
    let recv2_slot = format!("walcast_bench_recv2_{}", std::process::id());
    // walcast again, appending every change to a change log (the cost of durability).
    let log_slot = format!("walcast_bench_log_{}", std::process::id());
    let cluster = match &opts.database_url {
        Some(_) => None,
        None => {
            eprintln!("ingest: starting a throwaway PostgreSQL in {}", root.display());
            Some(LocalPostgres::start(LocalPostgresOptions::throwaway(&root)).await?)
        }
    };
    let url = match (&opts.database_url, &cluster) {
        (Some(u), _) => u.clone(),
        (None, Some(c)) => c.url("postgres"),
        _ => unreachable!(),
    };
    let pool = crate::connect_pool(&url).await?;
    for stmt in [
        "DROP PUBLICATION IF EXISTS walcast_bench",
        "DROP TABLE IF EXISTS walcast_bench_rows",
        "CREATE TABLE walcast_bench_rows (id bigint PRIMARY KEY, body text NOT NULL, n int4 NOT NULL)",
        "CREATE PUBLICATION walcast_bench FOR TABLE walcast_bench_rows",
    ] {
        sqlx::query(stmt).execute(&pool).await?;
    }
    for slot in [&gw_slot, &recv_slot, &recv2_slot, &log_slot] {
        let _ = sqlx::query("SELECT pg_drop_replication_slot($1)").bind(slot).execute(&pool).await;
    }
    let params = ConnectParams::from_url(&url)?;
    for slot in [&gw_slot, &recv_slot, &recv2_slot, &log_slot] {
        let mut c = ReplicationConnection::connect(&params).await?;
        c.create_slot(slot, false, SnapshotAction::NoExport).await?;
        c.close().await?;
    }

    eprintln!("ingest: inserting {rows} rows from 4 connections");
    let t = Instant::now();
    let batch = 5_000u64;
    let writers = 4u64;
    let mut handles = Vec::new();
    for w in 0..writers {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            let mut start = w * batch;
            while start < rows {
                let end = (start + batch).min(rows);
                sqlx::query(
                    "INSERT INTO walcast_bench_rows SELECT g, 'row ' || g, (g % 1000)::int4 FROM generate_series($1::int8, $2::int8 - 1) g",
                )
                .bind(start as i64)
                .bind(end as i64)
                .execute(&pool)
                .await?;
                start += batch * writers;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&pool).await?;
    let end_lsn: Lsn = end.parse()?;
    eprintln!("ingest: inserted in {:.1} s; WAL end {end_lsn}", t.elapsed().as_secs_f64());

    // The walsender's own limit: pg_recvlogical on a twin slot, output discarded.
    eprintln!("ingest: pg_recvlogical…");
    let recv_first = recvlogical(&url, &recv_slot, &end).await?;

    eprintln!("ingest: walcast…");
    let (changes, gw_secs, bytes) = walcast_pass(&params, &pool, &gw_slot, rows, None).await?;
    eprintln!("ingest: walcast with the change log…");
    let log_dir = root.join("changelog");
    let _ = std::fs::remove_dir_all(&log_dir);
    let (log_changes, log_secs, _) = walcast_pass(&params, &pool, &log_slot, rows, Some(&log_dir)).await?;
    let _ = std::fs::remove_dir_all(&log_dir);
    eprintln!("ingest: pg_recvlogical again…");
    let recv_second = recvlogical(&url, &recv2_slot, &end).await?;
    let recv_secs = recv_first.min(recv_second);

    for slot in [&gw_slot, &recv_slot, &recv2_slot, &log_slot] {
        let _ = sqlx::query("SELECT pg_drop_replication_slot($1)").bind(slot).execute(&pool).await;
    }
    pool.close().await;
    if let Some(c) = cluster {
        c.stop().await;
    }

    let rate = changes as f64 / gw_secs;
    let recv_rate = rows as f64 / recv_secs;
    let (cpu, rss) = super::process_usage();
    println!("{:<28} {:>14} {:>10} {:>16}", "reader", "changes", "seconds", "changes/s");
    println!("{:<28} {:>14} {:>10.2} {:>16.0}", "walcast (decode+render+match)", changes, gw_secs, rate);
    println!("{:<28} {:>14} {:>10.2} {:>16.0}", "pg_recvlogical", rows, recv_secs, recv_rate);
    let log_rate = log_changes as f64 / log_secs;
    println!("{:<28} {:>14} {:>10.2} {:>16.0}", "walcast + change log", log_changes, log_secs, log_rate);
    println!("ratio {:.2}; rendered {} MB of JSON", rate / recv_rate, bytes / 1_000_000);
    println!("change log append cost: {:.2} of the rate without it", log_rate / rate);
    let v = serde_json::json!({
        "scenario": "ingest",
        "changes": changes,
        "changes_per_sec": rate.round(),
        "recvlogical_changes_per_sec": recv_rate.round(),
        "ratio": (rate / recv_rate * 100.0).round() / 100.0,
        "with_log_changes_per_sec": log_rate.round(),
        "log_ratio": (log_rate / rate * 100.0).round() / 100.0,
        "cpu_seconds": cpu,
        "peak_rss_bytes": rss,
    });
    super::write_json(opts, &v)?;
    Ok(v)
}

/// Seconds `pg_recvlogical` takes to receive the stream of `slot` up to `end`.
async fn recvlogical(url: &str, slot: &str, end: &str) -> anyhow::Result<f64> {
    let bin = crate::local_postgres::find_binaries().ok().map(|b| b.join("pg_recvlogical"));
    let recv = bin.filter(|b| b.exists()).unwrap_or_else(|| "pg_recvlogical".into());
    let t = Instant::now();
    let status = tokio::process::Command::new(&recv)
        .args(["-d", url, "--slot", slot, "--start", "--no-loop", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=walcast_bench", "-E", end])
        .stdout(Stdio::null())
        .status()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    Ok(secs)
}

/// One pass of walcast over the slot: decode, render and match every change, as the gateway
/// does; with `log`, also append it to a change log and confirm only what the log synced.
/// Returns (changes, seconds, rendered bytes).
async fn walcast_pass(
    params: &ConnectParams,
    pool: &sqlx::PgPool,
    slot: &str,
    rows: u64,
    log: Option<&std::path::Path>,
) -> anyhow::Result<(u64, f64, usize)> {
    let (tx, mut rx) = mpsc::channel(8192);
    let ack = Acknowledgement::new();
    let mut appender = match log {
        Some(dir) => {
            let settings = crate::log::LogSettings {
                dir: dir.to_owned(),
                max_age: std::time::Duration::from_secs(3600),
                max_bytes: 1 << 40,
                segment_bytes: 64 << 20,
            };
            let identity = crate::log::Identity {
                system_id: "bench".into(),
                database: "bench".into(),
                slot: slot.into(),
            };
            let (_, appender, writer, _) = crate::log::ChangeLog::open(
                &settings,
                &identity,
                crate::log::Origin::Slot { fresh: true },
                ack.clone(),
            )?;
            Some((appender, writer))
        }
        None => None,
    };
    let task = ReplicationTask {
        resume_after: Lsn::ZERO,
        params: params.clone(),
        slot: slot.to_owned(),
        publication: "walcast_bench".into(),
        pool: pool.clone(),
        tx,
        ack: ack.clone(),
        status: Arc::new(ReplicationStatus::default()),
    };
    let shutdown = CancellationToken::new();
    let t = Instant::now();
    let handle = tokio::spawn(task.run(shutdown.clone()));
    let hub = Hub::with_limits(Limits { max_record_bytes: 1 << 20, ..Limits::default() });
    let mut scratch = Scratch::default();
    let mut changes = 0u64;
    let mut bytes = 0usize;
    while let Some(ev) = rx.recv().await {
        if let Some((a, _)) = appender.as_mut() {
            a.append(&ev);
            if rx.is_empty() {
                a.flush();
            }
        }
        match ev {
            ChangeEvent::Change(c) => {
                // Convert (render the data object) and match, as the gateway does per change.
                bytes += c.render_data(crate::change::View::default(), 1 << 20).len();
                dispatch(&hub, &c, &mut scratch);
                changes += 1;
            }
            ChangeEvent::Broadcast(_) => {}
            ChangeEvent::Commit { end_lsn, .. } => {
                if appender.is_none() {
                    ack.advance(end_lsn);
                }
                if changes >= rows {
                    break;
                }
            }
        }
    }
    // With the log, the pass ends when the last change is durable.
    if let Some((a, writer)) = appender.take() {
        drop(a);
        tokio::task::spawn_blocking(move || writer.join()).await?;
    }
    let secs = t.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = handle.await;
    Ok((changes, secs, bytes))
}
