//! The benchmark harness itself, at tiny sizes: every scenario runs and reports complete figures
//! with nothing lost. Correctness of the harness, not timing.

use std::path::PathBuf;

use walcast::bench::{self, BenchOptions};

use crate::support::fresh_db;

async fn opts(name: &str) -> (BenchOptions, PathBuf) {
    let json = std::env::temp_dir().join(format!("walcast-bench-{name}-{}.json", std::process::id()));
    (BenchOptions { database_url: Some(fresh_db().await), json: Some(json.clone()) }, json)
}

fn read(path: &PathBuf) -> serde_json::Value {
    let v = serde_json::from_slice(&std::fs::read(path).expect("json written")).expect("valid json");
    let _ = std::fs::remove_file(path);
    v
}

fn socket_opts(clients: usize, rate: u64, seconds: u64) -> bench::sockets::SocketOptions {
    bench::sockets::SocketOptions {
        clients,
        keys: 0,
        transport: bench::sockets::Transport::Phoenix,
        rate,
        seconds,
        gateway_bin: PathBuf::from(env!("CARGO_BIN_EXE_walcast")),
        gateway_url: None,
    }
}

#[tokio::test]
async fn ingest_scenario() {
    let (o, path) = opts("ingest").await;
    bench::ingest::run(&o, 300).await.expect("ingest runs");
    let v = read(&path);
    assert_eq!(v["scenario"], "ingest");
    assert_eq!(v["changes"], 300);
    for k in ["changes_per_sec", "recvlogical_changes_per_sec", "ratio", "cpu_seconds", "peak_rss_bytes"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
}

#[tokio::test]
async fn match_scenario() {
    let (o, path) = opts("match").await;
    tokio::task::spawn_blocking(move || bench::matching::run(&o, 200))
        .await
        .expect("join")
        .expect("match runs");
    let v = read(&path);
    assert_eq!(v["scenario"], "match");
    for k in ["10", "1000", "100000"] {
        assert!(v["ns_per_change"][k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
}

#[tokio::test]
async fn fanout_scenario() {
    let (o, path) = opts("fanout").await;
    bench::sockets::fanout(&o, &socket_opts(5, 100, 2)).await.expect("fanout runs");
    let v = read(&path);
    assert_eq!((v["scenario"].as_str(), v["clients"].as_u64()), (Some("fanout"), Some(5)));
    assert_eq!(v["delivered"], 200);
    assert_eq!(v["lost"], 0);
    for q in ["p50", "p95", "p99", "max"] {
        assert!(v["latency_ms"][q].as_f64().is_some_and(|x| x > 0.0), "{q} in {v}");
    }
    assert!(v["latency_ms"]["p50"].as_f64() <= v["latency_ms"]["max"].as_f64());
}

#[tokio::test]
async fn sse_scenario() {
    let (o, path) = opts("sse").await;
    let s = bench::sockets::SocketOptions {
        keys: 2,
        transport: bench::sockets::Transport::Sse,
        ..socket_opts(5, 100, 2)
    };
    bench::sockets::fanout(&o, &s).await.expect("sse runs");
    let v = read(&path);
    assert_eq!(
        (v["scenario"].as_str(), v["clients"].as_u64(), v["keys"].as_u64()),
        (Some("sse"), Some(5), Some(2))
    );
    // Key 0 has three clients, key 1 two: 3 or 2 deliveries per change.
    let expected = v["expected"].as_u64().unwrap();
    assert!((400..=600).contains(&expected), "{v}");
    assert_eq!(
        (v["delivered"].as_u64(), v["lost"].as_u64(), v["repeated"].as_u64()),
        (Some(expected), Some(0), Some(0))
    );
    assert!(v["latency_ms"]["p99"].as_f64().is_some_and(|x| x > 0.0), "{v}");
}

#[tokio::test]
async fn idle_scenario() {
    let (o, path) = opts("idle").await;
    bench::sockets::idle(&o, &socket_opts(20, 0, 0)).await.expect("idle runs");
    let v = read(&path);
    assert_eq!((v["scenario"].as_str(), v["sockets"].as_u64()), (Some("idle"), Some(20)));
    assert!(v["rss_bytes_per_socket"].as_f64().is_some(), "{v}");
    assert!(v["rss_bytes_after"].as_u64() > Some(0));
}

fn realtime_opts(
    clients: usize,
    topics: usize,
    rate: u64,
    steps: Vec<u64>,
) -> bench::realtime::RealtimeOptions {
    bench::realtime::RealtimeOptions {
        clients,
        topics,
        rate,
        seconds: 1,
        step_seconds: 1,
        steps,
        step_tries: 1,
        // Generous: this checks the harness, not the speed of a loaded test machine.
        p99_bound_ms: 10_000.0,
        gateway_bin: PathBuf::from(env!("CARGO_BIN_EXE_walcast")),
        gateway_url: None,
    }
}

#[tokio::test]
async fn same_table_scenario() {
    let (o, path) = opts("same_table").await;
    bench::realtime::same_table(&o, &realtime_opts(4, 1, 20, vec![10, 20])).await.expect("same-table runs");
    let v = read(&path);
    assert_eq!(v["scenario"], "same-table");
    assert_eq!((v["fixed"]["sent"].as_u64(), v["fixed"]["delivered"].as_u64()), (Some(20), Some(80)));
    assert_eq!(v["fixed"]["lost"], 0);
    assert_eq!(v["walcast_steps"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["relay_steps"][1]["delivered"], 80, "the relay reaches every client too: {v}");
    assert_eq!((v["walcast_max_rate"].as_u64(), v["relay_max_rate"].as_u64()), (Some(20), Some(20)));
    assert_eq!(v["ratio"], 1.0);
    assert!(v["fixed"]["latency_ms"]["p99"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    // The database's share is measured where INSERTs are the source, and only there.
    assert!(v["fixed"]["commit_ms"]["p99"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert!(v["relay_fixed"]["commit_ms"].is_null(), "{v}");
    // Per message: the first receipt (after the commit returned, where INSERTs are the source)
    // and the spread to the last, and both servers' CPU.
    let fixed = &v["fixed"];
    assert!(fixed["first_receipt_ms"]["p99"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert!(fixed["first_receipt_after_commit_ms"]["p99"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert!(fixed["last_after_first_receipt_ms"]["p50"].as_f64().is_some(), "{v}");
    assert!(v["relay_fixed"]["first_receipt_after_commit_ms"].is_null(), "{v}");
    assert!(v["relay_committed_fixed"]["first_receipt_after_commit_ms"]["p50"].as_f64().is_some(), "{v}");
    assert!(v["relay_cpu_seconds_fixed"].as_f64().is_some(), "{v}");
}

#[tokio::test]
async fn broadcast_scenario() {
    let (o, path) = opts("broadcast").await;
    bench::realtime::broadcast(&o, &realtime_opts(12, 3, 5, vec![5])).await.expect("broadcast runs");
    let v = read(&path);
    assert_eq!((v["scenario"].as_str(), v["sockets"].as_u64()), (Some("broadcast"), Some(12)));
    // 3 senders × 5 messages, each to the 3 other members of its topic.
    assert_eq!((v["fixed"]["sent"].as_u64(), v["fixed"]["delivered"].as_u64()), (Some(15), Some(45)));
    assert_eq!(v["relay_steps"][0]["delivered"], 45);
    assert!(v["ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
}

#[tokio::test]
async fn presence_scenario() {
    let (o, path) = opts("presence").await;
    bench::realtime::presence(&o, &realtime_opts(12, 3, 0, vec![])).await.expect("presence runs");
    let v = read(&path);
    assert_eq!((v["sockets"].as_u64(), v["complete"].as_u64()), (Some(12), Some(12)));
    assert!(v["ms_until_every_state_complete"].as_f64().is_some_and(|x| x > 0.0), "{v}");
}

#[tokio::test]
async fn soak_scenario() {
    let (o, path) = opts("soak").await;
    let s = bench::soak::SoakOptions {
        clients: 40,
        per_key: 4,
        rate: 50,
        seconds: 4,
        // Every client reconnects about once in the run: 40 * 1500 % / 60 per second.
        reconnect_percent: 1500.0,
        gateway_bin: PathBuf::from(env!("CARGO_BIN_EXE_walcast")),
    };
    bench::soak::run(&o, &s).await.expect("soak runs");
    let v = read(&path);
    assert_eq!(v["scenario"], "soak");
    assert_eq!((v["lost"].as_u64(), v["repeated"].as_u64()), (Some(0), Some(0)), "{v}");
    assert!(v["reconnects"].as_u64().is_some_and(|n| n >= 20), "{v}");
    assert!(v["changes"].as_u64().is_some_and(|n| n >= 100), "{v}");
    for k in ["rss_bytes_start", "rss_bytes_end", "open_fds_start", "open_fds_end"] {
        assert!(v[k].as_u64().is_some_and(|x| x > 0), "{k} in {v}");
    }
}

#[tokio::test]
async fn slow_readers_scenario() {
    const KINDS: [&str; 4] = ["phoenix", "plain", "sse", "long-poll"];
    let (o, path) = opts("slow-readers").await;
    let s = bench::slow::SlowOptions {
        per_transport: 5,
        normal: 3,
        rate: 50,
        seconds: 2,
        read_every: std::time::Duration::from_millis(100),
        gateway_bin: PathBuf::from(env!("CARGO_BIN_EXE_walcast")),
    };
    bench::slow::run(&o, &s).await.expect("slow-readers runs");
    let v = read(&path);
    assert_eq!(v["scenario"], "slow-readers");
    for phase in ["alone", "fast", "slow"] {
        assert_eq!(v[phase]["lost"].as_u64(), Some(0), "{phase} in {v}");
        assert!(v[phase]["p99_ms"].as_f64().is_some_and(|x| x > 0.0), "{phase} in {v}");
    }
    for (phase, kind) in ["fast", "slow"].into_iter().flat_map(|p| KINDS.map(|k| (p, k))) {
        assert!(v[phase]["connections"][kind].as_u64().is_some_and(|n| n >= 5), "{phase} {kind} in {v}");
    }
}

#[tokio::test]
async fn live_scenario() {
    let (o, path) = opts("live").await;
    let l = bench::live::LiveOptions {
        queries: 5,
        rate: 20,
        seconds: 1,
        clients: 3,
        fanout_rate: 10,
        steps: vec![10],
        step_seconds: 1,
        step_tries: 1,
        p99_bound_ms: 10_000.0,
        gateway_bin: PathBuf::from(env!("CARGO_BIN_EXE_walcast")),
        gateway_url: None,
    };
    bench::live::run(&o, &l).await.expect("live runs");
    let v = read(&path);
    assert_eq!(v["scenario"], "live");
    // Every change reaches exactly one live query with its stamp (an update, or the enter of a row
    // that moved), nothing lost.
    assert_eq!((v["live"]["sent"].as_u64(), v["live"]["delivered"].as_u64()), (Some(20), Some(20)), "{v}");
    assert!(v["gateway_bytes_per_live_query"].as_u64().is_some(), "{v}");
    for side in ["phoenix", "graphql"] {
        let fixed = &v["fanout"][side]["fixed"];
        assert_eq!(
            (fixed["sent"].as_u64(), fixed["delivered"].as_u64()),
            (Some(10), Some(30)),
            "{side}: {v}"
        );
        assert_eq!(v["fanout"][side]["max_rate"], 10, "{side}: {v}");
    }
    assert_eq!(v["fanout"]["graphql_over_phoenix"], 1.0, "{v}");
}
