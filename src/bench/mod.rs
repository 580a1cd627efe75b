//! `walcast bench`: load generators that measure the gateway against the physical limit in the
//! same run. Prints a table on stdout, progress on stderr, and JSON with `--json`.
//! Must not: assert timings; it reports them.

pub mod gateway;
pub mod ingest;
pub mod matching;
pub mod sockets;

use std::path::PathBuf;

/// Options shared by every scenario.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Use this database instead of starting a throwaway cluster.
    pub database_url: Option<String>,
    pub json: Option<PathBuf>,
}

/// Gateway process figures: CPU seconds and peak RSS of this process (the gateway runs in it).
pub fn process_usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks / 100.0, hwm_kb * 1024)
}

/// Writes `value` to the `--json` path, if given.
pub fn write_json(opts: &BenchOptions, value: &serde_json::Value) -> std::io::Result<()> {
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_vec_pretty(value).unwrap_or_default())?;
    }
    Ok(())
}
