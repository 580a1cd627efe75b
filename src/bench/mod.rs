//! `walcast bench`: load generators that measure the gateway against the physical limit in the
//! same run. Prints a table on stdout, progress on stderr, and JSON with `--json`.
//! Must not: assert timings; it reports them.

pub mod client;
pub mod cluster;
pub mod gateway;
pub mod ingest;
pub mod live;
pub mod matching;
pub mod realtime;
pub mod relay;
pub mod replay;
pub mod rls;
pub mod slow;
pub mod soak;
pub mod socketio;
pub mod sockets;

use std::path::PathBuf;

/// Options shared by every scenario.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Use this database instead of starting a throwaway cluster.
    pub database_url: Option<String>,
    pub json: Option<PathBuf>,
}

/// CPU seconds and peak RSS of this process.
pub fn process_usage() -> (f64, u64) {
    let (cpu, _, peak) = gateway::proc_usage(std::process::id());
    (cpu, peak)
}

/// Writes `value` to the `--json` path, if given.
pub fn write_json(opts: &BenchOptions, value: &serde_json::Value) -> std::io::Result<()> {
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_vec_pretty(value).unwrap_or_default())?;
    }
    Ok(())
}
