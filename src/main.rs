//! The `walcast` command line: parses arguments, loads configuration, sets up logging, then hands
//! over to the library. Holds no logic of its own.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use walcast::change::ChangeKind;
use walcast::config::{Config, LogFormat};
use walcast::local_postgres::{LocalPostgres, LocalPostgresOptions};
use walcast::{bench, check, replication, tail, Gateway};

/// The allocator: frames are allocated by the dispatcher and freed by socket tasks on other
/// threads, a pattern under which the system allocator kept growing and trimming its heap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Postgres change-data-capture realtime gateway, compatible with Supabase Realtime clients.
#[derive(Debug, Parser)]
#[command(name = "walcast", version, about)]
struct Cli {
    /// Read this TOML file instead of ./walcast.toml.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve {
        /// Print the effective configuration as TOML (secrets redacted) and exit.
        #[arg(long)]
        print_config: bool,
        /// Do not apply the gateway's migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Run a private PostgreSQL cluster with a demo schema and the gateway in front of it.
    Dev {
        /// Where the cluster's files live; reused on the next run.
        #[arg(long, default_value = ".walcast/dev")]
        data_dir: PathBuf,
        /// HTTP/WebSocket port of the gateway (the first node's, with --nodes).
        #[arg(long, default_value_t = 4000)]
        port: u16,
        /// Run this many gateway nodes as a cluster, on consecutive ports, over a private
        /// nats-server (Debian: nats-server).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        nodes: u16,
    },
    /// Check the configured database and print one line per check; exit 1 on any FAIL.
    Check,
    /// Print an HS256 token signed with auth.jwt_secret (or --secret-file), for tests and tools.
    Token {
        /// The `role` claim (the database role the client acts as).
        #[arg(long, default_value = "authenticated")]
        role: String,
        /// The `sub` claim (the user id `auth.uid()` returns).
        #[arg(long)]
        sub: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// More claims, as a JSON object.
        #[arg(long, value_name = "JSON")]
        claims: Option<String>,
        /// Read the secret from this file (`walcast dev` keeps one in its data directory).
        #[arg(long, value_name = "PATH")]
        secret_file: Option<PathBuf>,
    },
    /// Stream decoded changes as JSON lines on stdout through a temporary slot.
    Tail {
        /// Only these tables (comma list of schema.table).
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
        /// Only these kinds of change.
        #[arg(long, value_delimiter = ',', value_enum)]
        events: Vec<EventArg>,
    },
    /// Operate on the gateway's replication slot.
    Slot {
        #[command(subcommand)]
        action: SlotAction,
    },
    /// Measure the gateway: see BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        scenario: Scenario,
        /// Use this database instead of a throwaway cluster.
        #[arg(long, global = true)]
        database_url: Option<String>,
        /// fanout: measure this running gateway (ws://host:port) instead of starting one.
        #[arg(long, global = true)]
        gateway_url: Option<String>,
        /// Also write the figures as JSON here.
        #[arg(long, global = true, value_name = "PATH")]
        json: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EventArg {
    Insert,
    Update,
    Delete,
    Truncate,
}

#[derive(Debug, Subcommand)]
enum SlotAction {
    /// Drop the slot (the gateway must be stopped). Changes not yet delivered are lost.
    Drop,
    /// Drop and create the slot again: streaming restarts from now.
    Reset,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Several nodes over NATS JetStream against a single gateway: ingest, latency, failover.
    Cluster {
        /// Rows in the ingest backlog.
        #[arg(long, default_value_t = 200_000)]
        rows: u64,
        /// Times the slot owner is killed.
        #[arg(long, default_value_t = 5)]
        kills: u32,
    },
    /// Small-row inserts: walcast's decode rate against pg_recvlogical's.
    Ingest {
        /// Rows to insert.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
    },
    /// Subscription-index cost per change at 10, 1k and 100k subscriptions.
    Match {
        /// Changes dispatched per measurement.
        #[arg(long, default_value_t = 100_000)]
        changes: usize,
    },
    /// WebSocket clients with eq filters and a steady writer: commit-to-receipt latency, losses.
    Fanout {
        #[command(flatten)]
        load: FanoutArgs,
    },
    /// The same with Server-Sent Events streams (`/v1/tables/…/changes`) instead of WebSockets.
    Sse {
        #[command(flatten)]
        load: FanoutArgs,
    },
    /// Idle WebSocket clients joined to one channel each: gateway memory per socket.
    Idle {
        /// Sockets to open.
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
    },
    /// Every client on its own topic subscribed to every INSERT of one table, against the
    /// raw-WebSocket relay: latency at a fixed rate, then the highest rate within the p99 bound.
    SameTable {
        #[arg(long, default_value_t = 2_000)]
        clients: usize,
        /// Changes committed per second in the fixed-rate run.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[command(flatten)]
        search: SearchArgs,
    },
    /// Sockets in topics, one sender per topic, against the raw-WebSocket relay.
    Broadcast {
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
        #[arg(long, default_value_t = 100)]
        topics: usize,
        /// Messages per second per topic in the fixed-rate run.
        #[arg(long, default_value_t = 10)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[command(flatten)]
        search: SearchArgs,
    },
    /// Sockets in topics each tracking once: time until every presence state is complete.
    Presence {
        #[arg(long, default_value_t = 2_000)]
        sockets: usize,
        #[arg(long, default_value_t = 20)]
        topics: usize,
    },
    /// Row-level security: subscribers over users, each with its user's token, on a table with an
    /// `owner = auth.uid()` policy; against the same deliveries without row-level security.
    Rls {
        #[arg(long, default_value_t = 1_000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Changes committed per second in the fixed-rate run.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[command(flatten)]
        search: SearchArgs,
    },
    /// Live queries over one table with a share of changes moving rows between them (latency,
    /// losses, memory per live query); then GraphQL's fan-out against Phoenix's, same deliveries.
    Live {
        #[arg(long, default_value_t = 1_000)]
        queries: usize,
        /// Changes committed per second to the live queries' table.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Sockets of the GraphQL / Phoenix fan-out comparison.
        #[arg(long, default_value_t = 1_000)]
        clients: usize,
        /// Changes per second of the comparison's fixed run.
        #[arg(long, default_value_t = 100)]
        fanout_rate: u64,
        #[command(flatten)]
        search: SearchArgs,
    },
    /// Socket.IO's fan-out against Phoenix's, same deliveries: every socket on one table, then
    /// each on its own key; and memory per idle Socket.IO socket.
    Socketio {
        #[arg(long, default_value_t = 1_000)]
        clients: usize,
        /// Changes per second of the same-table fixed run.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Changes per second of the own-key fixed run.
        #[arg(long, default_value_t = 1_000)]
        own_rate: u64,
        /// Rates the own-key search tries, ascending (`--steps` is the same-table search's).
        #[arg(long, value_delimiter = ',')]
        own_steps: Vec<u64>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Idle sockets per side.
        #[arg(long, default_value_t = 2_000)]
        idle: usize,
        #[command(flatten)]
        search: SearchArgs,
    },
    /// Changes replayed from the change log over SSE, to one client and to many at once, against
    /// a raw sequential read of the segment files.
    Replay {
        /// Rows committed (and then replayed).
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Clients replaying at once in the second pass.
        #[arg(long, default_value_t = 100)]
        clients: usize,
    },
    /// Many clients for a long time with steady changes, a share reconnecting each minute from
    /// their last cursor: the gateway's RSS and open files at the start and the end, and losses.
    Soak {
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Clients per filter key (each change reaches this many).
        #[arg(long, default_value_t = 10)]
        per_key: usize,
        /// Changes committed per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Percent of the clients that reconnect each minute.
        #[arg(long, default_value_t = 5.0)]
        reconnect_percent: f64,
    },
    /// Normal subscribers' latency alone and then beside slow readers on every transport (each
    /// reading one message per interval, connecting again when closed).
    SlowReaders {
        /// Slow readers on each transport (Phoenix, /v1/ws, SSE, long-poll).
        #[arg(long, default_value_t = 1_000)]
        per_transport: usize,
        /// Normal subscribers whose latency is measured.
        #[arg(long, default_value_t = 10)]
        normal: usize,
        /// Changes committed per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Seconds of writing in each phase.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Milliseconds a slow reader waits between two reads.
        #[arg(long, default_value_t = 200)]
        read_every_ms: u64,
    },
    /// The raw-WebSocket relay the realtime scenarios compare against (run by them).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: String,
    },
}

/// Clients each following one filter key, and a steady writer.
#[derive(Debug, clap::Args)]
struct FanoutArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// Distinct filter keys: client i follows key i mod keys, so each change reaches
    /// clients / keys of them (0: one key per client).
    #[arg(long, default_value_t = 0)]
    keys: usize,
    /// Changes committed per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seconds the writer runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// The search for the highest rate within a latency bound.
#[derive(Debug, clap::Args)]
struct SearchArgs {
    /// Rates to try, ascending (changes/s, or messages/s per topic); empty skips the search.
    #[arg(long, value_delimiter = ',')]
    steps: Vec<u64>,
    /// Seconds per step.
    #[arg(long, default_value_t = 5)]
    step_seconds: u64,
    /// Tries a rate gets to hold the p99 bound before the search stops (a loss stops it at once).
    #[arg(long, default_value_t = 1)]
    step_tries: u32,
    /// The p99 bound, in ms.
    #[arg(long, default_value_t = 50.0)]
    p99_ms: f64,
}

/// What keeps the span export running until the process exits (nothing without the `otlp`
/// feature).
#[cfg(feature = "otlp")]
type Telemetry = Option<walcast::otlp::Export>;
#[cfg(not(feature = "otlp"))]
struct Telemetry;

/// Logs to stderr, filtered by `RUST_LOG`; with the `otlp` feature and an endpoint, spans to a
/// collector too.
fn init_tracing(format: Option<LogFormat>, otlp: &walcast::config::OtlpConfig) -> Result<Telemetry, String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Pretty) => false,
        None => !std::io::stderr().is_terminal(),
    };
    // Colours only for a terminal: a log file or collector gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };
    let logs = tracing_subscriber::registry().with(fmt.with_filter(filter));
    let traces_url = otlp.traces_url();
    #[cfg(feature = "otlp")]
    {
        let (export, guard) = match traces_url.as_deref().map(walcast::otlp::layer) {
            Some(Ok((layer, guard))) => (Some(layer), Some(guard)),
            Some(Err(e)) => return Err(e.to_string()),
            None => (None, None),
        };
        logs.with(export).init();
        if let Some(url) = &traces_url {
            tracing::info!(%url, "exporting spans over OTLP");
        }
        Ok(guard)
    }
    #[cfg(not(feature = "otlp"))]
    {
        logs.init();
        if traces_url.is_some() {
            tracing::warn!(
                "an OTEL_EXPORTER_OTLP_* endpoint is set, but this walcast was built without the \
                 `otlp` feature: no spans are exported"
            );
        }
        Ok(Telemetry)
    }
}

/// A token cancelled on SIGINT or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("walcast: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Serve { print_config: true, .. }) = &cli.command {
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    // Dropped last (after the runtime): the span export flushes what is left.
    let _telemetry = match init_tracing(config.log_format, &config.otlp) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("walcast: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("walcast: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("walcast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Option<Command>, config: Config) -> anyhow::Result<ExitCode> {
    match command.unwrap_or(Command::Serve { print_config: false, no_migrate: false }) {
        Command::Serve { no_migrate, .. } => {
            let gateway = Gateway::prepare(config, !no_migrate).await?;
            tracing::info!(addr = %gateway.local_addr(), "listening");
            gateway.run(shutdown_on_signals()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev { data_dir, port, nodes } => dev(config, data_dir, port, nodes).await,
        Command::Token { role, sub, ttl_secs, claims, secret_file } => {
            println!("{}", token(&config, &role, sub.as_deref(), ttl_secs, claims, secret_file)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let url = config.database_url()?;
            let pool = walcast::connect_pool(url).await.context("connecting to the database")?;
            let results = check::run(&pool, &config).await;
            for r in &results {
                println!("{r}");
            }
            Ok(if check::any_fail(&results) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Tail { tables, events } => {
            let events = events
                .into_iter()
                .map(|e| match e {
                    EventArg::Insert => ChangeKind::Insert,
                    EventArg::Update => ChangeKind::Update,
                    EventArg::Delete => ChangeKind::Delete,
                    EventArg::Truncate => ChangeKind::Truncate,
                })
                .collect();
            tail::run(
                &config,
                tail::TailOptions { tables, events },
                std::io::stdout(),
                shutdown_on_signals(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Slot { action } => {
            slot(&config, action).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { scenario, database_url, gateway_url, json } => {
            bench(scenario, bench::BenchOptions { database_url, json }, gateway_url).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `walcast token`: a token signed with the configured secret (or the one in `secret_file`).
fn token(
    config: &Config,
    role: &str,
    sub: Option<&str>,
    ttl_secs: u64,
    claims: Option<String>,
    secret_file: Option<std::path::PathBuf>,
) -> anyhow::Result<String> {
    let secret = match secret_file {
        Some(path) => std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned(),
        None => config
            .auth
            .jwt_secret
            .clone()
            .context("no secret: set auth.jwt_secret (WALCAST_AUTH__JWT_SECRET) or pass --secret-file")?,
    };
    let extra = match claims {
        Some(json) => match serde_json::from_str(&json).context("--claims")? {
            serde_json::Value::Object(m) => m,
            _ => anyhow::bail!("--claims: expected a JSON object"),
        },
        None => Default::default(),
    };
    Ok(walcast::auth::mint(&secret, role, sub, Duration::from_secs(ttl_secs), extra)?)
}

/// `walcast slot drop|reset`.
async fn slot(config: &Config, action: SlotAction) -> anyhow::Result<()> {
    let url = config.database_url()?;
    let pool = walcast::connect_pool(url).await?;
    let dropped = replication::slot::drop_slot(&pool, &config.slot).await?;
    println!(
        "{}",
        if dropped { format!("dropped slot {}", config.slot) } else { format!("no slot {}", config.slot) }
    );
    if let SlotAction::Reset = action {
        let params = replication::wire::ConnectParams::from_url(url)?;
        let lsn = replication::slot::ensure_slot(&pool, &params, &config.slot).await?;
        println!("created slot {} at {lsn}", config.slot);
    }
    Ok(())
}

/// `walcast bench <scenario>`.
async fn bench(
    scenario: Scenario,
    opts: bench::BenchOptions,
    gateway_url: Option<String>,
) -> anyhow::Result<()> {
    let scenario_is_sse = matches!(scenario, Scenario::Sse { .. });
    let gateway_bin = std::env::current_exe()?;
    match scenario {
        Scenario::Cluster { rows, kills } => {
            let bin = std::env::current_exe().context("the walcast binary")?;
            bench::cluster::run(&opts, &bin, rows, kills).await?;
        }
        Scenario::Ingest { rows } => {
            bench::ingest::run(&opts, rows).await?;
        }
        Scenario::Match { changes } => {
            bench::matching::run(&opts, changes)?;
        }
        Scenario::Fanout { load } | Scenario::Sse { load } => {
            let transport = if scenario_is_sse {
                bench::sockets::Transport::Sse
            } else {
                bench::sockets::Transport::Phoenix
            };
            let s = bench::sockets::SocketOptions {
                clients: load.clients,
                keys: load.keys,
                transport,
                rate: load.rate,
                seconds: load.seconds,
                gateway_bin: gateway_bin.clone(),
                gateway_url: gateway_url.clone(),
            };
            bench::sockets::fanout(&opts, &s).await?;
        }
        Scenario::Idle { sockets } => {
            let s = bench::sockets::SocketOptions {
                clients: sockets,
                keys: 0,
                transport: bench::sockets::Transport::Phoenix,
                rate: 0,
                seconds: 0,
                gateway_bin: gateway_bin.clone(),
                gateway_url: gateway_url.clone(),
            };
            bench::sockets::idle(&opts, &s).await?;
        }
        Scenario::SameTable { clients, rate, seconds, search } => {
            let o = realtime_options(clients, 1, rate, seconds, search, gateway_url.clone())?;
            bench::realtime::same_table(&opts, &o).await?;
        }
        Scenario::Broadcast { sockets, topics, rate, seconds, search } => {
            let o = realtime_options(sockets, topics, rate, seconds, search, gateway_url.clone())?;
            bench::realtime::broadcast(&opts, &o).await?;
        }
        Scenario::Presence { sockets, topics } => {
            let search = SearchArgs { steps: Vec::new(), step_seconds: 0, step_tries: 1, p99_ms: 0.0 };
            let o = realtime_options(sockets, topics, 0, 0, search, gateway_url.clone())?;
            bench::realtime::presence(&opts, &o).await?;
        }
        long @ (Scenario::Rls { .. }
        | Scenario::Live { .. }
        | Scenario::Socketio { .. }
        | Scenario::Replay { .. }
        | Scenario::Soak { .. }
        | Scenario::SlowReaders { .. }) => {
            bench_against_a_child(long, &opts, gateway_bin, gateway_url).await?;
        }
        Scenario::Relay { listen } => bench::relay::serve(&listen).await?,
    }
    Ok(())
}

/// The scenarios with their own options that run (or can run) the gateway as a child.
async fn bench_against_a_child(
    scenario: Scenario,
    opts: &bench::BenchOptions,
    gateway_bin: std::path::PathBuf,
    gateway_url: Option<String>,
) -> anyhow::Result<()> {
    match scenario {
        Scenario::Rls { clients, users, rate, seconds, search } => {
            let o = bench::rls::RlsOptions {
                clients,
                users,
                rate,
                seconds,
                steps: search.steps,
                step_seconds: search.step_seconds,
                step_tries: search.step_tries,
                p99_bound_ms: search.p99_ms,
                gateway_bin: gateway_bin.clone(),
                gateway_url: gateway_url.clone(),
            };
            bench::rls::run(opts, &o).await?;
        }
        Scenario::Live { queries, rate, seconds, clients, fanout_rate, search } => {
            let o = bench::live::LiveOptions {
                queries,
                rate,
                seconds,
                clients,
                fanout_rate,
                steps: search.steps,
                step_seconds: search.step_seconds,
                step_tries: search.step_tries,
                p99_bound_ms: search.p99_ms,
                gateway_bin: gateway_bin.clone(),
                gateway_url: gateway_url.clone(),
            };
            bench::live::run(opts, &o).await?;
        }
        s @ Scenario::Socketio { .. } => bench_socketio(s, opts, gateway_bin, gateway_url).await?,
        Scenario::Replay { rows, clients } => {
            let o = bench::replay::ReplayOptions { rows, clients, gateway_bin: gateway_bin.clone() };
            bench::replay::run(opts, &o).await?;
        }
        Scenario::Soak { clients, per_key, rate, seconds, reconnect_percent } => {
            let o = bench::soak::SoakOptions {
                clients,
                per_key,
                rate,
                seconds,
                reconnect_percent,
                gateway_bin: gateway_bin.clone(),
            };
            bench::soak::run(opts, &o).await?;
        }
        Scenario::SlowReaders { per_transport, normal, rate, seconds, read_every_ms } => {
            let o = bench::slow::SlowOptions {
                per_transport,
                normal,
                rate,
                seconds,
                read_every: std::time::Duration::from_millis(read_every_ms),
                gateway_bin: gateway_bin.clone(),
            };
            bench::slow::run(opts, &o).await?;
        }
        other => anyhow::bail!("{other:?} does not run against a child gateway"),
    }
    Ok(())
}

async fn bench_socketio(
    scenario: Scenario,
    opts: &bench::BenchOptions,
    gateway_bin: std::path::PathBuf,
    gateway_url: Option<String>,
) -> anyhow::Result<()> {
    let Scenario::Socketio { clients, rate, own_rate, own_steps, seconds, idle, search } = scenario else {
        anyhow::bail!("not the socketio scenario");
    };
    let o = bench::socketio::SocketIoOptions {
        clients,
        rate,
        own_rate,
        own_steps,
        seconds,
        idle,
        steps: search.steps,
        step_seconds: search.step_seconds,
        step_tries: search.step_tries,
        p99_bound_ms: search.p99_ms,
        gateway_bin,
        gateway_url,
    };
    bench::socketio::run(opts, &o).await?;
    Ok(())
}

fn realtime_options(
    clients: usize,
    topics: usize,
    rate: u64,
    seconds: u64,
    search: SearchArgs,
    gateway_url: Option<String>,
) -> anyhow::Result<bench::realtime::RealtimeOptions> {
    Ok(bench::realtime::RealtimeOptions {
        clients,
        topics,
        rate,
        seconds,
        step_seconds: search.step_seconds,
        step_tries: search.step_tries,
        steps: search.steps,
        p99_bound_ms: search.p99_ms,
        gateway_bin: std::env::current_exe()?,
        gateway_url,
    })
}

const DEMO_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS public.posts (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    title text NOT NULL,
    body text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS public.comments (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    post_id bigint NOT NULL REFERENCES public.posts(id) ON DELETE CASCADE,
    author text NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.comments REPLICA IDENTITY FULL;
";

/// The dev secret: `auth.jwt_secret` when set, else the one kept in the data directory (made on
/// the first run).
fn dev_secret(config: &Config, data_dir: &std::path::Path) -> anyhow::Result<(String, PathBuf)> {
    let path = std::path::absolute(data_dir.join("jwt_secret"))?;
    if let Some(s) = config.auth.jwt_secret.clone().filter(|s| !s.is_empty()) {
        return Ok((s, path));
    }
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok((s.trim().to_owned(), path));
    }
    std::fs::create_dir_all(data_dir)?;
    let secret = walcast::auth::random_secret()?;
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)
    }
    .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, secret.as_bytes())?;
    Ok((secret, path))
}

async fn dev(mut config: Config, data_dir: PathBuf, port: u16, nodes: u16) -> anyhow::Result<ExitCode> {
    let (secret, secret_path) = dev_secret(&config, &data_dir)?;
    config.auth.jwt_secret = Some(secret.clone());
    if config.cors.allowed_origins.is_empty() {
        // A page served by a development server on this machine, whatever its port.
        config.cors.allowed_origins = vec!["http://localhost:*".into(), "http://127.0.0.1:*".into()];
    }
    let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);
    let anon = walcast::auth::mint(&secret, "anon", None, ten_years, Default::default())?;
    let service = walcast::auth::mint(&secret, "service_role", None, ten_years, Default::default())?;
    let mut nats = match nodes {
        1 => None,
        _ => Some(walcast::local_nats::LocalNats::start(data_dir.join("nats")).await?),
    };
    let cluster = LocalPostgres::start(LocalPostgresOptions::new(&data_dir)).await?;
    let url = cluster.url("postgres");
    let started = start_dev_nodes(&mut config, &data_dir, &url, (port, nodes), nats.as_ref()).await;
    let mut gateways = match started {
        Ok(g) => g,
        Err(e) => {
            cluster.stop().await;
            return Err(e);
        }
    };
    for g in &mut gateways {
        g.offer_keys(walcast::server::inspector::OfferedKeys {
            anon: anon.clone(),
            service_role: service.clone(),
        });
    }
    let first = gateways.first().map(|g| g.local_addr()).unwrap_or(config.listen);
    println!();
    println!("walcast dev is running");
    println!("  Inspector : http://{first}/?table=public.posts  (open it, then run the psql line below)");
    for (i, g) in gateways.iter().enumerate() {
        let addr = g.local_addr();
        let name = if gateways.len() > 1 { format!("node-{}", i + 1) } else { "WebSocket".into() };
        println!("  {name:<10}: ws://{addr}/realtime/v1/websocket?apikey=<anon key>&vsn=2.0.0");
    }
    let addr = gateways.first().map(|g| g.local_addr()).unwrap_or(config.listen);
    if let Some(n) = &nats {
        println!("  Cluster   : http://{addr}/v1/cluster  (NATS at {})", n.url());
    }
    println!("  anon key         : {anon}");
    println!("  service_role key : {service}");
    println!("  a user's token   : walcast token --secret-file {} --sub <user id>", secret_path.display());
    println!("  Health    : http://{addr}/healthz  (ready: http://{addr}/readyz)");
    println!("  Make changes:");
    println!("    psql '{url}' -c \"INSERT INTO posts (title) VALUES ('hello') RETURNING id\"");
    println!("  Ctrl-C stops the gateway and the database; data stays in {}", data_dir.display());
    println!();
    let shutdown = shutdown_on_signals();
    let runs: Vec<_> = gateways.into_iter().map(|g| tokio::spawn(g.run(shutdown.clone()))).collect();
    let mut result = Ok(());
    for run in runs {
        if let Ok(Err(e)) = run.await {
            result = Err(e);
        }
    }
    cluster.stop().await;
    if let Some(n) = nats.as_mut() {
        n.stop().await;
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

/// The demo schema, then `count` gateways on ports from `port` (a cluster over `nats` when more
/// than one), each with its own change log under `data_dir`.
async fn start_dev_nodes(
    config: &mut Config,
    data_dir: &std::path::Path,
    url: &str,
    (port, count): (u16, u16),
    nats: Option<&walcast::local_nats::LocalNats>,
) -> anyhow::Result<Vec<Gateway>> {
    let pool = walcast::connect_pool(url).await?;
    sqlx::raw_sql(DEMO_SCHEMA).execute(&pool).await.context("creating the demo schema")?;
    sqlx::raw_sql(walcast::local_postgres::API_ROLES_SQL)
        .execute(&pool)
        .await
        .context("creating the API roles")?;
    pool.close().await;
    config.database_url = Some(url.to_owned());
    let default_log = config.changelog.dir == walcast::config::ChangelogConfig::default().dir;
    let mut gateways = Vec::new();
    for i in 0..count {
        let mut node = config.clone();
        node.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port.saturating_add(i)));
        if let Some(nats) = nats {
            node.cluster.nats_url = Some(nats.url());
            node.cluster.node_id = Some(format!("node-{}", i + 1));
            if default_log {
                node.changelog.dir = data_dir.join(format!("changelog-{}", i + 1));
            }
        } else if default_log {
            node.changelog.dir = data_dir.join("changelog");
        }
        gateways.push(Gateway::prepare(node, true).await?);
    }
    if let Some(first) = gateways.first() {
        config.listen = first.local_addr();
    }
    Ok(gateways)
}
