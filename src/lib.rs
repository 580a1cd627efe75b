//! walcast: a Postgres change-data-capture realtime gateway.
//!
//! A change flows left to right through the modules:
//!
//! 1. [`replication`] — the walsender client (`wire`), the pgoutput decoder (`pgoutput`), value
//!    rendering equal to `to_jsonb` (`values`), slot and publication lifecycle (`slot`), and the
//!    replication task (`stream`) that turns the stream into [`change::Change`]s.
//! 2. [`change`] — the change model shared by every later stage.
//! 3. [`realtime`] — the transport-neutral core: sessions (one per client), channels
//!    (`postgres_changes` bindings, broadcast members, presence), the subscription index and the
//!    dispatcher that delivers each change, rendered once, to the matching members' outboxes;
//!    [`filter`] is the row-filter language and [`subscribe`] resolves bindings.
//! 4. [`protocol`] — wire formats: the Phoenix channel protocol of the Supabase Realtime
//!    clients, as a session driver and an encoder of core events.
//! 5. [`server`] — the axum router: IO only — WebSocket endpoints, REST broadcast, health,
//!    readiness, metrics.
//!
//! [`auth`] verifies the JWTs clients present (connect, join, refresh, REST) before the core acts
//! on them.
//!
//! [`Gateway::prepare`] checks and prepares the database; [`Gateway::run`] serves until the
//! shutdown token fires, then drains within a bounded time.

pub mod auth;
pub mod bench;
pub mod change;
pub mod check;
pub mod cluster;
pub mod config;
pub mod errors;
pub mod filter;
pub mod local_nats;
pub mod local_postgres;
pub mod locks;
pub mod log;
pub mod origins;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod protocol;
pub mod realtime;
pub mod replication;
pub mod server;
pub mod source;
pub mod subscribe;
pub mod tail;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::auth::rls::RowSecurity;
use crate::auth::topics::TopicPolicies;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::config::Config;
use crate::log::{Appender, ChangeLog, Recovered, WriterHandle};
use crate::realtime::snapshot_source::SnapshotSource;
use crate::realtime::{Hub, HubParts, Limits};
use crate::replication::ack::Acknowledgement;
use crate::replication::slot;
use crate::replication::wire::ConnectParams;
use crate::server::AppState;
use crate::source::walsender::{ReplicationStatus, ReplicationTask};
use crate::subscribe::PublishedCatalog;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("connecting to the database")]
    Connect(#[source] sqlx::Error),
    #[error("preflight failed:\n{0}")]
    Preflight(String),
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error(transparent)]
    Auth(#[from] auth::SetupError),
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Stream(#[from] cluster::stream::StreamError),
    #[error("listening on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Opens the ordinary SQL pool.
pub async fn connect_pool(url: &str) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new().max_connections(8).acquire_timeout(Duration::from_secs(10)).connect(url).await
}

/// A gateway whose database is prepared and whose listener is bound, ready to run.
pub struct Gateway {
    config: Config,
    verifier: Verifier,
    pool: PgPool,
    params: ConnectParams,
    listener: TcpListener,
    /// `admin_listen`: where `/metrics` is served instead of on `listener`.
    admin: Option<TcpListener>,
    /// The flush position confirmed to Postgres.
    ack: Acknowledgement,
    log: Option<OpenLog>,
    cluster: Option<ClusterParts>,
    /// Keys the inspector page offers (`walcast dev` only).
    offered_keys: Option<Arc<server::inspector::OfferedKeys>>,
}

/// A cluster node's connection, as `prepare` made it.
struct ClusterParts {
    node_id: String,
    nats: cluster::Nats,
    epoch: u32,
    stream: cluster::stream::ChangeStream,
    lease: cluster::lease::Lease,
    /// Advanced by this node's log writer: what its log holds durably.
    log_ack: Acknowledgement,
}

/// Joins the cluster: this node's name, NATS, the stream, its epoch and where it begins (so
/// this node's log starts or continues in step with it), and the slot's lease.
async fn join_cluster(
    config: &Config,
    identity: &log::Identity,
) -> Result<(ClusterParts, log::Origin), StartError> {
    let dir = &config.changelog.dir;
    let node_id = cluster::node_id(&config.cluster, dir).map_err(|source| log::LogError::Io {
        path: dir.clone(),
        action: "keeping this node's name",
        source,
    })?;
    let nats = cluster::Nats::connect(&config.cluster, &node_id).await?;
    let stream = cluster::stream::ChangeStream::open(&nats).await?;
    let epoch = cluster::meta::stream_epoch(&nats, identity).await?;
    let begin = stream.begins_after().await?.unwrap_or(change::Position::ZERO);
    let ttl = Duration::from_secs(config.cluster.lease_secs);
    let lease = cluster::lease::Lease::open(&nats, &config.slot, &node_id, ttl).await?;
    tracing::info!(node = %node_id, epoch = format_args!("{epoch:08X}"), "joined the cluster");
    let parts = ClusterParts { node_id, nats, epoch, stream, lease, log_ack: Acknowledgement::new() };
    Ok((parts, log::Origin::Stream { epoch, begin }))
}

/// What a cluster node's tasks start from.
struct NodeStart {
    cluster: ClusterParts,
    slot: cluster::owner::SlotWork,
    hub: Hub,
    /// What the core forwards to other nodes.
    bus: tokio::sync::mpsc::Receiver<realtime::bus::BusMessage>,
    /// Where the stream's events go: this node's dispatcher.
    events: tokio::sync::mpsc::Sender<change::ChangeEvent>,
    /// This node's log's last position.
    written: tokio::sync::watch::Receiver<change::Position>,
    status: Arc<ReplicationStatus>,
    listen: SocketAddr,
}

/// A cluster node's tasks: its heartbeat, the bus, holding the lease, the owner's terms
/// (confirming to Postgres only what both the stream and this node's log hold), and every
/// node's reading of the stream into its dispatcher, with its readiness in `status`. Returns
/// the node's view of the cluster, for operators.
async fn start_node(
    start: NodeStart,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Arc<cluster::view::View>, cluster::ClusterError> {
    let NodeStart { cluster, slot, hub, bus, events, written, status, listen } = start;
    tracing::info!(node = %cluster.node_id, "serving as a cluster node");
    let ttl = cluster.lease.ttl();
    let registry =
        cluster::nodes::Registry::open(&cluster.nats, &cluster.node_id, listen.to_string(), ttl).await?;
    tracker.spawn(registry.clone().keep_alive(shutdown.clone()));
    tracker.spawn(cluster::bus::run(cluster.nats.clone(), hub, bus, ttl, shutdown.clone()));
    let (ownership, holder) = cluster::owner::hold(cluster.lease.clone(), shutdown.clone());
    // Shutdown waits for the lease's release, so another node takes the slot at once.
    tracker.spawn(async move {
        let _ = holder.await;
    });
    tracker.spawn(replication::ack::follow_lower(
        slot.confirm.clone(),
        slot.published.clone(),
        cluster.log_ack,
        shutdown.clone(),
    ));
    let view = Arc::new(cluster::view::View {
        node_id: cluster.node_id,
        epoch: cluster.epoch,
        lease: cluster.lease,
        registry,
        stream: cluster.stream.clone(),
        ownership: ownership.clone(),
        slot_status: Arc::clone(&slot.status),
    });
    tracker.spawn(cluster::owner::serve_slot(ownership, slot, shutdown.clone()));
    let after = *written.borrow();
    tracker.spawn(cluster::follow::follow(
        cluster.stream.clone(),
        after,
        events,
        Arc::clone(&status),
        shutdown.clone(),
    ));
    tracker.spawn(cluster::follow::watch_lag(cluster.stream, written, status, shutdown.clone()));
    Ok(view)
}

/// Opens the change log (blocking IO, off the runtime's threads).
async fn open_log(
    config: &Config,
    identity: log::Identity,
    origin: log::Origin,
    ack: Acknowledgement,
) -> Result<OpenLog, StartError> {
    let settings = config.changelog.settings();
    let dir = config.changelog.dir.clone();
    let opened = tokio::task::spawn_blocking(move || ChangeLog::open(&settings, &identity, origin, ack))
        .await
        .map_err(|e| log::LogError::Io {
            path: dir.clone(),
            action: "opening",
            source: std::io::Error::other(e.to_string()),
        })??;
    let (log, appender, writer, recovered) = opened;
    tracing::info!(dir = %dir.display(), epoch = format_args!("{:08X}", log.epoch()),
        last_commit = %recovered.last_commit, reset = recovered.reset, "change log ready");
    Ok(OpenLog { log, appender, writer, recovered })
}

/// The change log as opened by `prepare`.
struct OpenLog {
    log: ChangeLog,
    appender: Appender,
    writer: WriterHandle,
    recovered: Recovered,
}

impl Gateway {
    /// Connects, applies migrations (unless `migrate` is false), runs preflight (refusing on a
    /// FAIL), makes sure the publication and slot exist, and binds the listener.
    pub async fn prepare(config: Config, migrate: bool) -> Result<Gateway, StartError> {
        // Loaded configurations are validated already; one built in code is checked here.
        config.validate()?;
        let url = config.database_url()?.to_owned();
        let verifier = Verifier::new(config.auth.settings()).await?;
        if !verifier.required() {
            tracing::warn!(
                "auth.mode = \"off\": no token is checked; every client may read every published row"
            );
        }
        let params = ConnectParams::from_url(&url)
            .map_err(|e| config::ConfigError::Invalid { key: "database_url", message: e.to_string() })?;
        let pool = connect_pool(&url).await.map_err(StartError::Connect)?;
        let results = check::run(&pool, &config).await;
        if check::any_fail(&results) {
            let lines: Vec<String> =
                results.iter().filter(|r| r.level == check::Level::Fail).map(|r| r.to_string()).collect();
            return Err(StartError::Preflight(lines.join("\n")));
        }
        for r in results.iter().filter(|r| r.level == check::Level::Warn) {
            tracing::warn!(check = r.name, "{}", r.message);
        }
        if migrate {
            slot::migrate(&url).await?;
        }
        let state = slot::ensure_publication(&pool, &config.publication, &config.tables).await?;
        tracing::info!(publication = %config.publication, ?state, "publication ready");
        let ready = slot::prepare_slot(&pool, &params, &config.slot).await?;
        tracing::info!(slot = %config.slot, resume_at = %ready.start, "slot ready");
        let ack = Acknowledgement::new();
        let identity = log::Identity {
            system_id: ready.system_id.clone(),
            database: params.database.clone(),
            slot: config.slot.clone(),
        };
        let (log, cluster) = if config.cluster.enabled() {
            let (cluster, origin) = join_cluster(&config, &identity).await?;
            // The log follows the stream, not the slot: its writer's confirmations are its own.
            let log = open_log(&config, identity, origin, cluster.log_ack.clone()).await?;
            (Some(log), Some(cluster))
        } else if config.changelog.enabled {
            let origin = log::Origin::Slot { fresh: ready.created };
            (Some(open_log(&config, identity, origin, ack.clone()).await?), None)
        } else {
            tracing::warn!(
                "changelog.enabled = false: clients cannot resume, and changes are confirmed once dispatched"
            );
            (None, None)
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let admin = match config.admin_listen {
            Some(addr) => {
                Some(TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?)
            }
            None => None,
        };
        Ok(Gateway { config, verifier, pool, params, listener, admin, ack, log, cluster, offered_keys: None })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// The admin address (`/metrics`, `/readyz`, `/healthz`), when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The core, wired to this gateway's database, log and configuration.
    fn hub(
        &self,
        catalog: Arc<PublishedCatalog>,
        status: &ReplicationStatus,
        peers: Option<Arc<dyn realtime::bus::Peers>>,
    ) -> Hub {
        Hub::new(HubParts {
            limits: Limits::from_config(&self.config),
            catalog: Some(catalog),
            peers,
            replication_live: Some(status.live.subscribe()),
            verifier: self.verifier.clone(),
            rls: self
                .verifier
                .required()
                .then(|| Arc::new(RowSecurity::new(&self.pool, self.config.auth.key_only_deletes))),
            topics: Some(Arc::new(TopicPolicies::new(self.pool.clone()))),
            log: self.log.as_ref().map(|l| l.log.clone()),
            snapshots: Some(Arc::new(SnapshotSource::new(
                &self.pool,
                Duration::from_secs(self.config.snapshot_hold_secs),
            ))),
        })
    }

    /// Has the inspector page offer these keys to whoever opens it: for `walcast dev`, whose
    /// keys are throwaway, never for `serve`.
    pub fn offer_keys(&mut self, keys: server::inspector::OfferedKeys) {
        self.offered_keys = Some(Arc::new(keys));
    }

    /// What every HTTP handler shares.
    fn app_state(
        config: &Config,
        hub: Hub,
        (status, cluster): (Arc<ReplicationStatus>, Option<Arc<cluster::view::View>>),
        shutdown: &CancellationToken,
    ) -> AppState {
        let telemetry = hub.metrics().telemetry.clone();
        AppState {
            hub,
            status,
            cluster,
            max_frame_bytes: config.max_frame_bytes,
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
            shutdown: shutdown.clone(),
            connections: Arc::new(server::listener::ConnectionMetrics { telemetry, ..Default::default() }),
            rest: Arc::new(server::broadcast::RestLimits {
                max_messages_per_second: config.max_rest_messages_per_second,
                max_private_topics: config.max_rest_private_topics,
                senders: Default::default(),
            }),
            graphql: Default::default(),
            socketio_path: config.socketio_path.trim_end_matches('/').into(),
            max_connections: config.max_connections,
            origins: Arc::new(config.cors.origins().unwrap_or_default()),
            offered_keys: None,
        }
    }

    /// Serves until `shutdown` fires: stops accepting, closes sockets with a close frame, sends
    /// the final standby status update, and returns within 10 s.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let tracker = TaskTracker::new();
        let catalog = Arc::new(PublishedCatalog::new(self.pool.clone(), self.config.publication.clone()));
        let status = Arc::new(ReplicationStatus::default());
        // A cluster node forwards broadcasts and presence to the others over NATS.
        let (peers, bus_queue) = self.cluster.as_ref().map(|_| cluster::bus::peers()).unzip();
        let hub = self.hub(catalog, &status, peers.map(|p| p as Arc<dyn realtime::bus::Peers>));
        tracker.spawn(hub.metrics().telemetry.clone().upkeep(shutdown.clone()));
        let ack = self.ack;
        let (tx, rx) = tokio::sync::mpsc::channel(8192);
        let (appender, writer, resume_after, written) = match self.log {
            Some(l) => {
                // Everything kept counts as matched: a resume replays it from the log.
                hub.set_matched(*l.log.written().borrow(), 0);
                (Some(l.appender), Some(l.writer), l.recovered.last_commit, Some(l.log.written()))
            }
            None => (None, None, crate::replication::lsn::Lsn::ZERO, None),
        };
        // With a log, the log's writer confirms (durable); without, the dispatcher (delivered).
        let dispatched = if appender.is_some() { Acknowledgement::new() } else { ack.clone() };

        let view = match (self.cluster, written, bus_queue) {
            (Some(cluster), Some(written), Some(bus)) => {
                let slot = cluster::owner::SlotWork {
                    stream: cluster.stream.clone(),
                    params: self.params,
                    slot: self.config.slot.clone(),
                    publication: self.config.publication.clone(),
                    pool: self.pool.clone(),
                    confirm: ack.clone(),
                    published: Acknowledgement::new(),
                    status: Arc::new(ReplicationStatus::default()),
                    retention: Duration::from_secs(self.config.changelog.max_age_secs),
                };
                let listen = self.listener.local_addr().unwrap_or(self.config.listen);
                let (hub, status) = (hub.clone(), Arc::clone(&status));
                let start = NodeStart { cluster, slot, hub, bus, events: tx, written, status, listen };
                let view = start_node(start, &tracker, &shutdown).await;
                Some(view.map_err(|e| std::io::Error::other(crate::errors::chain(&e)))?)
            }
            _ => {
                tracker.spawn(
                    ReplicationTask {
                        params: self.params,
                        slot: self.config.slot.clone(),
                        publication: self.config.publication.clone(),
                        pool: self.pool.clone(),
                        tx,
                        ack: ack.clone(),
                        status: Arc::clone(&status),
                        resume_after,
                    }
                    .run(shutdown.clone()),
                );
                None
            }
        };
        tracker.spawn(realtime::dispatch::run_dispatcher(
            hub.clone(),
            rx,
            dispatched,
            appender,
            shutdown.clone(),
        ));
        tracker.spawn(slot::prune_messages(
            self.pool.clone(),
            Duration::from_secs(self.config.message_retention_secs),
            shutdown.clone(),
        ));

        let mut state = Self::app_state(&self.config, hub, (status, view), &shutdown);
        state.offered_keys = self.offered_keys.clone();
        let listeners = (self.listener, self.admin);
        let server = serve_http(&self.config, state, listeners, &tracker, &shutdown);
        tracker.close();
        shutdown.cancelled().await;
        wind_down(tracker, server, writer).await;
        self.pool.close().await;
        Ok(())
    }
}

/// The HTTP listeners (the admin one too, when configured); the main one's task.
fn serve_http(
    config: &Config,
    state: AppState,
    (listener, admin): (TcpListener, Option<TcpListener>),
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let connections = Arc::clone(&state.connections);
    let limits = server::listener::ConnectionLimits::from_config(config);
    if let Some(admin) = admin {
        let app = server::admin_router(state.clone());
        let metrics = Arc::new(server::listener::ConnectionMetrics::default());
        tracker.spawn(server::listener::serve(admin, app, limits, metrics, shutdown.clone()));
    }
    let app = server::router(state, config.admin_listen.is_none());
    tracker.spawn(server::listener::serve(listener, app, limits, connections, shutdown.clone()))
}

/// After shutdown: waits up to 9 s for every task, then for the log writer to sync and end.
async fn wind_down(tracker: TaskTracker, server: tokio::task::JoinHandle<()>, writer: Option<WriterHandle>) {
    if tokio::time::timeout(Duration::from_secs(9), tracker.wait()).await.is_err() {
        tracing::warn!("tasks still running 9 s after shutdown; leaving them");
        server.abort();
    }
    if let Some(writer) = writer {
        // The dispatcher has stopped (its appender is dropped): the writer syncs and ends.
        let _ =
            tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(move || writer.join()))
                .await;
    }
}
