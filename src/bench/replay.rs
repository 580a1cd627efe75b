//! `replay`: changes replayed from the change log over Server-Sent Events — to one client, then
//! to many at once — against a raw sequential read of the same segment files in the same run
//! (the disk's and page cache's limit).
//!
//! Rows are committed while a gateway child process logs them; the clients then resume with
//! `Last-Event-ID` at the cursor from before the first row, so everything they receive is
//! replayed, none of it live.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bench::gateway::{apikey, http_get, GatewayProcess};
use crate::bench::sockets::{database, ensure_open_files, teardown};
use crate::bench::BenchOptions;

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub rows: u64,
    /// Clients replaying at once in the second pass.
    pub clients: usize,
    pub gateway_bin: PathBuf,
}

/// Rows per inserting transaction.
const ROWS_PER_TXN: u64 = 10_000;

/// Counts `event:` lines (one per change) across chunk boundaries; the stream's opening `id:`
/// block has none.
#[derive(Default)]
struct Counter {
    changes: u64,
    bytes: u64,
    /// The bytes since the last newline, up to three.
    line: Vec<u8>,
}

impl Counter {
    fn feed(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        for &b in chunk {
            if b == b'\n' {
                self.line.clear();
            } else if self.line.len() < 3 {
                self.line.push(b);
                if self.line == b"eve" {
                    self.changes += 1;
                }
            }
        }
    }
}

/// One client reading the replay of `rows` changes after `cursor`: (seconds, bytes).
async fn replay_one(addr: &str, key: &str, cursor: &str, rows: u64) -> anyhow::Result<(f64, u64)> {
    let url = format!("http://{addr}/v1/tables/public.walcast_bench_items/changes?access_token={key}");
    let started = Instant::now();
    let mut resp = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream")
        .header("last-event-id", cursor)
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "replay refused: {}", resp.status());
    let mut counter = Counter::default();
    while counter.changes < rows {
        let chunk = tokio::time::timeout(Duration::from_secs(60), resp.chunk())
            .await
            .map_err(|_| anyhow::anyhow!("no data for 60 s after {} changes", counter.changes))??
            .ok_or_else(|| anyhow::anyhow!("the stream ended after {} changes", counter.changes))?;
        counter.feed(&chunk);
    }
    Ok((started.elapsed().as_secs_f64(), counter.bytes))
}

pub async fn run(opts: &BenchOptions, o: &ReplayOptions) -> anyhow::Result<()> {
    ensure_open_files(o.clients)?;
    let env = database(opts, "replay").await?;
    let gateway = GatewayProcess::spawn(&o.gateway_bin, &env.url, &env.slot, 65_536).await?;
    let addr = gateway.addr.clone();
    let key = apikey();
    // The cursor before the first row: a long-poll that returns at once.
    let start = http_get(
        &addr,
        &format!("/v1/tables/public.walcast_bench_items/changes?access_token={key}&wait=0&limit=1"),
    )
    .await?;
    let body = start.split("\r\n\r\n").nth(1).unwrap_or("");
    let cursor: String = serde_json::from_str::<serde_json::Value>(body)?["cursor"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no cursor in {body}"))?
        .to_owned();

    eprintln!("replay: committing {} rows", o.rows);
    let pool = crate::connect_pool(&env.url).await?;
    let mut next = 0;
    while next < o.rows {
        let n = ROWS_PER_TXN.min(o.rows - next);
        sqlx::query(
            "INSERT INTO walcast_bench_items (id, k, body) \
             SELECT g, g % 1000, 'replayed change ' || g FROM generate_series($1::int8, $2::int8) g",
        )
        .bind(next as i64)
        .bind((next + n - 1) as i64)
        .execute(&pool)
        .await?;
        next += n;
    }
    pool.close().await;
    // Replay only: wait until the gateway has taken in every row (the replay then waits for
    // the log writer by itself).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let metrics = http_get(&addr, "/metrics").await?;
        let dispatched = metrics
            .lines()
            .find_map(|l| l.strip_prefix(crate::server::metrics::CHANGES_DISPATCHED))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if dispatched >= o.rows {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the gateway took in {dispatched} of {} rows", o.rows);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The first replay also waits for the log writer to have everything.
    eprintln!("replay: one client");
    let (one_secs, one_bytes) = replay_one(&addr, &key, &cursor, o.rows).await?;
    let (one_secs, one_bytes) = {
        // Measured again, warm.
        let warm = replay_one(&addr, &key, &cursor, o.rows).await?;
        if warm.0 < one_secs {
            warm
        } else {
            (one_secs, one_bytes)
        }
    };
    eprintln!("replay: {} clients at once", o.clients);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(o.clients);
    for _ in 0..o.clients {
        let (addr, key, cursor, rows) = (addr.clone(), key.clone(), cursor.clone(), o.rows);
        tasks.push(tokio::spawn(async move { replay_one(&addr, &key, &cursor, rows).await }));
    }
    let mut many_bytes = 0;
    for t in tasks {
        many_bytes += t.await??.1;
    }
    let many_secs = started.elapsed().as_secs_f64();
    let (cpu, _, peak) = gateway.usage();

    // The physical limit: reading the segment files front to back, as fast as the disk and the
    // page cache allow (warm, like the replays).
    let dir = std::env::temp_dir().join(format!("walcast-bench-changelog-{}", env.slot));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    let raw = tokio::task::spawn_blocking(move || -> std::io::Result<(f64, u64)> {
        let started = Instant::now();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        for f in &files {
            let mut file = std::fs::File::open(f)?;
            loop {
                let n = std::io::Read::read(&mut file, &mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
        }
        Ok((started.elapsed().as_secs_f64(), total))
    })
    .await??;
    gateway.stop().await;
    teardown(env).await;

    let rows = o.rows as f64;
    let mb = |bytes: u64, secs: f64| bytes as f64 / secs / 1e6;
    println!("replay of {} changes from the change log (SSE)", o.rows);
    println!("{:<28} {:>14} {:>10} {:>10}", "", "changes/s", "MB/s", "seconds");
    println!(
        "{:<28} {:>14.0} {:>10.1} {:>10.2}",
        "one client",
        rows / one_secs,
        mb(one_bytes, one_secs),
        one_secs
    );
    println!(
        "{:<28} {:>14.0} {:>10.1} {:>10.2}",
        format!("{} clients (total)", o.clients),
        rows * o.clients as f64 / many_secs,
        mb(many_bytes, many_secs),
        many_secs
    );
    println!(
        "{:<28} {:>14.0} {:>10.1} {:>10.2}",
        "raw read of the segments",
        rows / raw.0,
        mb(raw.1, raw.0),
        raw.0
    );
    println!(
        "log size {:.1} MB; gateway CPU {cpu:.1} s, peak RSS {:.0} MB",
        raw.1 as f64 / 1e6,
        peak as f64 / 1e6
    );
    crate::bench::write_json(
        opts,
        &json!({
            "scenario": "replay", "rows": o.rows, "clients": o.clients,
            "one": {"changes_per_sec": rows / one_secs, "mb_per_sec": mb(one_bytes, one_secs)},
            "many": {"changes_per_sec": rows * o.clients as f64 / many_secs, "mb_per_sec": mb(many_bytes, many_secs)},
            "raw_read": {"changes_per_sec": rows / raw.0, "mb_per_sec": mb(raw.1, raw.0), "log_bytes": raw.1},
            "gateway_cpu_secs": cpu, "gateway_peak_rss": peak,
        }),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_events_across_chunks() {
        let mut c = super::Counter::default();
        let text =
            b"retry: 2000\n\nid: 0\n\nid: 1\nevent: insert\ndata: {\"id:\":1}\n\nid: 2\nevent: insert\ndata: {}\n\n";
        for chunk in text.chunks(3) {
            c.feed(chunk);
        }
        assert_eq!((c.changes, c.bytes), (2, text.len() as u64));
    }
}
