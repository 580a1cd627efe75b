//! Configuration: defaults < `walcast.toml` (or `--config`) < `WALCAST_*` environment variables
//! (nested keys with `__`), with `DATABASE_URL` accepted when `WALCAST_DATABASE_URL` is absent.
//!
//! Owns: every setting, its default, and validation with messages that name the key.
//! Must not: be read from anywhere but here; no other module reads the environment for settings.

use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::auth::AuthMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Postgres connection URL (required for serve and check).
    pub database_url: Option<String>,
    /// HTTP and WebSocket listen address.
    pub listen: SocketAddr,
    /// Publication to stream; created if missing.
    pub publication: String,
    /// Logical replication slot; created if missing.
    pub slot: String,
    /// `schema.table` or `schema.*` entries for a publication walcast creates and owns.
    #[serde(deserialize_with = "comma_list")]
    pub tables: Vec<String>,
    /// `pretty` or `json`; unset means pretty on a terminal, json otherwise.
    pub log_format: Option<LogFormat>,
    /// Largest client frame accepted, in bytes; larger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// A record larger than this is sent with only its small fields and a 413 error.
    pub max_record_bytes: usize,
    /// Seconds a socket may stay silent before it is closed.
    pub idle_timeout_secs: u64,
    /// The path Socket.IO clients connect to (their `path` option); empty: no Socket.IO.
    pub socketio_path: String,
    /// An address of its own for `/metrics` (with `/readyz` and `/healthz`); `/metrics` is then
    /// not served on `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// Open client connections in all; more are answered 503 and closed.
    pub max_connections: usize,
    /// Open client connections from one IP address; 0: no limit.
    pub max_connections_per_ip: usize,
    /// Seconds a client has to send a request's headers (and a new connection its first byte).
    pub header_read_timeout_secs: u64,
    /// Seconds a write may wait for the client to read before the connection is closed.
    pub write_timeout_secs: u64,
    /// Seconds, in all, an initial snapshot waits for its client to read while it holds its
    /// database transaction; then it gives up (the client is told, and changes follow).
    pub snapshot_hold_secs: u64,
    /// Frames queued per socket before the client counts as too slow and is disconnected.
    pub client_queue: usize,
    /// Channels one socket may join.
    pub max_channels_per_socket: usize,
    /// `postgres_changes` bindings one join may carry; a join with more is refused.
    pub max_bindings_per_join: usize,
    /// Rows one live query's result may hold (a binding's `limit` may ask for fewer); a live
    /// query whose result grows past it ends with an error.
    pub max_live_rows: usize,
    /// Channel joins one socket may make per second.
    pub max_joins_per_second: u32,
    /// Broadcasts one socket may send per second; more closes that channel.
    pub max_events_per_second: u32,
    /// Presence events (track/untrack) one socket may send per `presence_window_secs`.
    pub max_presence_events: u32,
    pub presence_window_secs: u64,
    /// Largest presence payload, in bytes (JSON).
    pub max_presence_payload_bytes: usize,
    /// Largest broadcast payload, in bytes; larger ones are refused and not delivered.
    pub max_broadcast_payload_bytes: usize,
    /// REST broadcast messages one sender (token role and `sub`) may post per second; more are
    /// refused with 429.
    pub max_rest_messages_per_second: usize,
    /// Distinct private topics one REST broadcast request may name (each is a policy check).
    pub max_rest_private_topics: usize,
    /// Rows of `realtime.messages` older than this many seconds are deleted.
    pub message_retention_secs: u64,
    /// Who may connect: tokens, key sources, claim checks.
    pub auth: AuthConfig,
    /// The durable change log clients resume from.
    pub changelog: ChangelogConfig,
    /// Several gateway nodes over NATS JetStream (off unless `cluster.nats_url` is set).
    pub cluster: ClusterConfig,
    /// Browser pages on other origins: CORS and the WebSocket `Origin` check.
    pub cors: CorsConfig,
    /// Spans exported to an OpenTelemetry collector (a build with the `otlp` feature).
    pub otlp: OtlpConfig,
}

/// The `[otlp]` table: where spans go over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP address, e.g. `http://otel-collector:4318`; spans go to
    /// `{endpoint}/v1/traces`. Env `WALCAST_OTLP__ENDPOINT`. Unset: the standard
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` when either is set,
    /// else nothing is exported.
    pub endpoint: Option<String>,
}

impl OtlpConfig {
    /// The traces URL spans are exported to: `otlp.endpoint`'s, else the standard variables'
    /// (`None`: no export).
    pub fn traces_url(&self) -> Option<String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if let Some(base) = self.endpoint.as_deref() {
            return Some(with_traces_path(base));
        }
        if let Some(url) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Some(url);
        }
        env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|base| with_traces_path(&base))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let Some(endpoint) = &self.endpoint else { return Ok(()) };
        if !cfg!(feature = "otlp") {
            return invalid(
                "otlp.endpoint",
                "this walcast was built without OpenTelemetry export; build it with \
                 `cargo build --release --features otlp`, or unset the key",
            );
        }
        let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !scheme_ok || endpoint.parse::<axum::http::Uri>().is_err() {
            return invalid(
                "otlp.endpoint",
                "expected an http:// or https:// URL such as http://collector:4318",
            );
        }
        Ok(())
    }
}

/// A base OTLP/HTTP address with the traces path appended (as the OTLP specification says).
fn with_traces_path(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// The `[cors]` table: which browser origins may use the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed (env `WALCAST_CORS__ALLOWED_ORIGINS`, a comma list): `https://app.example.com`,
    /// `http://localhost:*` (any port), `https://*.example.com` (any subdomain), or `*` (any
    /// origin, only when named). Empty: no other origin; WebSocket upgrades are then not checked.
    #[serde(deserialize_with = "comma_list")]
    pub allowed_origins: Vec<String>,
    /// Whether pages may send cookies (an `access_token` cookie) along; not with `*`.
    pub allow_credentials: bool,
    /// Seconds a browser may keep a preflight's answer.
    pub max_age_secs: u64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig { allowed_origins: Vec::new(), allow_credentials: false, max_age_secs: 600 }
    }
}

impl CorsConfig {
    /// The allow-list, read.
    pub fn origins(&self) -> Result<crate::origins::Origins, ConfigError> {
        let max_age = std::time::Duration::from_secs(self.max_age_secs);
        crate::origins::Origins::parse(&self.allowed_origins, self.allow_credentials, max_age)
            .map_err(|message| ConfigError::Invalid { key: "cors.allowed_origins", message })
    }
}

/// The `[cluster]` table. With `nats_url` set, nodes with the same database, slot, publication
/// and `prefix` form one cluster: one of them streams the slot into JetStream, every one serves
/// clients from the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The NATS server(s), e.g. `nats://127.0.0.1:4222` (a comma list for several); env
    /// `WALCAST_CLUSTER__NATS_URL`. Unset: a single node, as without a cluster.
    pub nats_url: Option<String>,
    /// This node's name in the cluster (letters, digits, `-`, `_`). Default: derived from the
    /// change log directory, so it stays the same across restarts of the same node.
    pub node_id: Option<String>,
    /// The prefix of the JetStream stream and key-value buckets' names.
    pub prefix: String,
    /// JetStream replicas of the stream and buckets: 1 for a single nats-server, 3 in
    /// production.
    pub replicas: usize,
    /// Seconds the slot owner's lease lasts without a renewal; a node that stops renewing loses
    /// the slot to another after this long.
    pub lease_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { nats_url: None, node_id: None, prefix: "walcast".into(), replicas: 1, lease_secs: 5 }
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        self.nats_url.as_deref().is_some_and(|u| !u.trim().is_empty())
    }

    fn validate(&self, changelog: &ChangelogConfig) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let name_ok = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !name_ok(&self.prefix, 32) {
            return invalid("cluster.prefix", "expected 1 to 32 letters, digits, `-` or `_`");
        }
        if let Some(id) = &self.node_id {
            if !name_ok(id, 64) {
                return invalid("cluster.node_id", "expected 1 to 64 letters, digits, `-` or `_`");
            }
        }
        if !(1..=5).contains(&self.replicas) {
            return invalid("cluster.replicas", "expected 1 to 5 (JetStream's limit)");
        }
        if !(2..=300).contains(&self.lease_secs) {
            return invalid("cluster.lease_secs", "expected 2 to 300 seconds");
        }
        if !changelog.enabled {
            return invalid(
                "changelog.enabled",
                "a cluster needs the change log (cursors are positions in it on every node)",
            );
        }
        Ok(())
    }
}

/// The `[changelog]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChangelogConfig {
    /// Keep a durable log of every change (default). Without it nothing can be resumed and the
    /// slot is confirmed once changes are dispatched.
    pub enabled: bool,
    /// Where the log's segments live (created if missing; one gateway per directory).
    pub dir: std::path::PathBuf,
    /// Changes older than this many seconds may be removed.
    pub max_age_secs: u64,
    /// The log is kept under this many bytes, oldest segments removed first.
    pub max_bytes: u64,
    /// A segment is closed once it is this large.
    pub segment_bytes: u64,
}

impl Default for ChangelogConfig {
    fn default() -> Self {
        ChangelogConfig {
            enabled: true,
            dir: "walcast-data/changelog".into(),
            max_age_secs: 24 * 3600,
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
        }
    }
}

impl ChangelogConfig {
    pub fn settings(&self) -> crate::log::LogSettings {
        crate::log::LogSettings {
            dir: self.dir.clone(),
            max_age: std::time::Duration::from_secs(self.max_age_secs),
            max_bytes: self.max_bytes,
            segment_bytes: self.segment_bytes,
        }
    }
}

/// The `[auth]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `required` (default): every connection and join needs a valid JWT. `off`: none is checked.
    pub mode: AuthMode,
    /// Shared secret for HS256/384/512 tokens (env `WALCAST_AUTH__JWT_SECRET`).
    pub jwt_secret: Option<String>,
    /// A JWK set for RS*/PS*/ES*/EdDSA tokens: an `https://` URL, a file path, or inline JSON.
    pub jwks: Option<String>,
    /// Seconds between fetches of a JWKS URL (an unknown `kid` fetches sooner).
    pub jwks_refresh_secs: u64,
    /// Accept an `http://` JWKS URL (keys fetched without TLS can be replaced in transit): only
    /// for a trusted network.
    pub jwks_allow_http: bool,
    /// Claims that must have exactly these values, e.g. `{ iss = "https://…/auth/v1" }`.
    pub claims: std::collections::BTreeMap<String, String>,
    /// DELETEs on tables with row-level security whose old row has only the key (REPLICA
    /// IDENTITY not FULL): `withhold` (default; nothing leaks) or `deliver` to subscribers whose
    /// role may SELECT the table.
    pub key_only_deletes: crate::auth::rls::KeyOnlyDeletes,
    /// The roles a token may name (its `role` claim); a token with any other role is refused
    /// when it is verified. Default `anon`, `authenticated`, `service_role`.
    #[serde(deserialize_with = "comma_list")]
    pub roles: Vec<String>,
    /// Roles of `roles` that may be privileged: a superuser, a role with BYPASSRLS or
    /// REPLICATION, or the gateway's own login. `serve` and `check` refuse any other privileged
    /// role in `roles`. Default `service_role` (Supabase's, which has BYPASSRLS).
    #[serde(deserialize_with = "comma_list")]
    pub privileged_roles: Vec<String>,
    /// Seconds a `/v1/ws` client that connected without a token has to send a valid `auth`
    /// message; then its socket is closed (1008).
    pub timeout_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Required,
            jwt_secret: None,
            jwks: None,
            jwks_refresh_secs: 600,
            jwks_allow_http: false,
            claims: Default::default(),
            key_only_deletes: Default::default(),
            roles: crate::auth::DEFAULT_ROLES.iter().map(|r| (*r).to_owned()).collect(),
            privileged_roles: vec!["service_role".into()],
            timeout_secs: 30,
        }
    }
}

/// A refusal of `key`'s value.
fn invalid(key: &'static str, message: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key, message: message.to_owned() })
}

impl AuthConfig {
    pub fn settings(&self) -> crate::auth::VerifierSettings {
        crate::auth::VerifierSettings {
            mode: Some(self.mode),
            jwt_secret: self.jwt_secret.clone(),
            jwks: self.jwks.clone(),
            jwks_refresh: std::time::Duration::from_secs(self.jwks_refresh_secs),
            claims: self.claims.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            roles: Some(self.roles.clone()),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 4000)),
            publication: "walcast".into(),
            slot: "walcast".into(),
            tables: vec!["public.*".into()],
            log_format: None,
            max_frame_bytes: 4 * 1024 * 1024,
            max_record_bytes: 1024 * 1024,
            idle_timeout_secs: 60,
            socketio_path: "/socket.io".into(),
            admin_listen: None,
            max_connections: 50_000,
            max_connections_per_ip: 0,
            header_read_timeout_secs: 10,
            write_timeout_secs: 20,
            snapshot_hold_secs: 30,
            client_queue: 1024,
            max_channels_per_socket: 100,
            max_bindings_per_join: 100,
            max_live_rows: 10_000,
            max_joins_per_second: 100,
            max_events_per_second: 100,
            max_presence_events: 5,
            presence_window_secs: 30,
            max_presence_payload_bytes: 3_000 * 1024,
            max_broadcast_payload_bytes: 3_000 * 1024,
            max_rest_messages_per_second: 1000,
            max_rest_private_topics: 10,
            message_retention_secs: 72 * 3600,
            auth: AuthConfig::default(),
            changelog: ChangelogConfig::default(),
            cluster: ClusterConfig::default(),
            cors: CorsConfig::default(),
            otlp: OtlpConfig::default(),
        }
    }
}

fn comma_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect(),
        OneOrMany::Many(v) => v,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Config {
    /// Loads from `path` (when given, it must exist), else `./walcast.toml` if present, then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) => {
                if !p.exists() {
                    return Err(ConfigError::Invalid {
                        key: "--config",
                        message: format!("file {} does not exist", p.display()),
                    });
                }
                fig = fig.merge(Toml::file_exact(p));
            }
            None => fig = fig.merge(Toml::file("walcast.toml")),
        }
        if std::env::var_os("WALCAST_DATABASE_URL").is_none() {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                fig = fig.merge(Serialized::default("database_url", url));
            }
        }
        fig = fig.merge(Env::prefixed("WALCAST_").split("__"));
        let config: Config = fig.extract().map_err(describe)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_names()?;
        self.validate_minimums()?;
        self.validate_auth()?;
        let reserved =
            ["/realtime", "/v1", "/graphql", "/api", "/socket/", "/metrics", "/healthz", "/readyz"];
        let path = self.socketio_path.trim_end_matches('/');
        if !self.socketio_path.is_empty()
            && (!path.starts_with('/') || path.len() < 2 || reserved.iter().any(|r| path.starts_with(r)))
        {
            return invalid(
                "socketio_path",
                "expected a path such as /socket.io, apart from walcast's own routes",
            );
        }
        if self.changelog.max_bytes < self.changelog.segment_bytes {
            return invalid("changelog.max_bytes", "expected at least changelog.segment_bytes");
        }
        if self.changelog.enabled && self.changelog.dir.as_os_str().is_empty() {
            return invalid("changelog.dir", "expected a directory");
        }
        self.cors.origins()?;
        self.otlp.validate()?;
        self.cluster.validate(&self.changelog)
    }

    /// The slot, the publication, `tables` and the database URL.
    fn validate_names(&self) -> Result<(), ConfigError> {
        if !is_identifier(&self.slot) {
            return invalid("slot", "expected lower-case letters, digits and underscores (at most 63)");
        }
        if self.publication.is_empty() || self.publication.len() > 63 {
            return invalid("publication", "expected a name of 1 to 63 characters");
        }
        if self.tables.is_empty() {
            return invalid("tables", "expected at least one `schema.table` or `schema.*`");
        }
        for t in &self.tables {
            match t.split_once('.') {
                Some((s, n)) if !s.is_empty() && !n.is_empty() && !n.contains('.') => {}
                _ => {
                    return invalid("tables", &format!("entry {t:?}: expected `schema.table` or `schema.*`"))
                }
            }
        }
        if let Some(url) = &self.database_url {
            crate::replication::wire::ConnectParams::from_url(url)
                .map_err(|e| ConfigError::Invalid { key: "database_url", message: e.to_string() })?;
        }
        Ok(())
    }

    /// Limits and durations that have a least sensible value.
    fn validate_minimums(&self) -> Result<(), ConfigError> {
        let counts: [(&'static str, u64, u64); 8] = [
            ("max_frame_bytes", self.max_frame_bytes as u64, 1024),
            ("max_rest_messages_per_second", self.max_rest_messages_per_second as u64, 1),
            ("max_rest_private_topics", self.max_rest_private_topics as u64, 1),
            ("max_bindings_per_join", self.max_bindings_per_join as u64, 1),
            ("max_live_rows", self.max_live_rows as u64, 1),
            ("client_queue", self.client_queue as u64, 1),
            ("max_connections", self.max_connections as u64, 1),
            ("changelog.segment_bytes", self.changelog.segment_bytes, 4096),
        ];
        for (key, value, least) in counts {
            if value < least {
                return invalid(key, &format!("expected at least {least}"));
            }
        }
        let seconds: [(&'static str, u64); 9] = [
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("snapshot_hold_secs", self.snapshot_hold_secs),
            ("write_timeout_secs", self.write_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("presence_window_secs", self.presence_window_secs),
            ("message_retention_secs", self.message_retention_secs),
            ("auth.timeout_secs", self.auth.timeout_secs),
            ("auth.jwks_refresh_secs", self.auth.jwks_refresh_secs),
            ("changelog.max_age_secs", self.changelog.max_age_secs),
        ];
        for (key, value) in seconds {
            if value == 0 {
                return invalid(key, "expected at least 1 second");
            }
        }
        Ok(())
    }

    /// The token secret, the roles tokens may act as, and where keys are fetched from.
    fn validate_auth(&self) -> Result<(), ConfigError> {
        if self.auth.jwt_secret.as_deref().is_some_and(|s| !s.is_empty() && s.len() < 32) {
            return invalid("auth.jwt_secret", "expected at least 32 characters");
        }
        if self.auth.roles.is_empty() {
            return invalid("auth.roles", "expected at least one role");
        }
        for (key, roles) in
            [("auth.roles", &self.auth.roles), ("auth.privileged_roles", &self.auth.privileged_roles)]
        {
            if let Some(bad) = roles.iter().find(|r| r.is_empty() || r.eq_ignore_ascii_case("none")) {
                return invalid(key, &format!("{bad:?} is not a role a token may act as"));
            }
        }
        let jwks = self.auth.jwks.as_deref().unwrap_or("").trim();
        if jwks.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")) && !self.auth.jwks_allow_http {
            return invalid(
                "auth.jwks",
                "an http:// URL lets anyone on the path replace the keys: use https://, or set \
                 auth.jwks_allow_http = true on a trusted network",
            );
        }
        Ok(())
    }

    pub fn database_url(&self) -> Result<&str, ConfigError> {
        self.database_url.as_deref().ok_or(ConfigError::Invalid {
            key: "database_url",
            message: "required: set it in walcast.toml, WALCAST_DATABASE_URL or DATABASE_URL".into(),
        })
    }

    /// The effective configuration as TOML with the password in `database_url` redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = shown.database_url.map(|u| redact_url(&u));
        shown.cluster.nats_url = shown.cluster.nats_url.map(|u| redact_nats_urls(&u));
        if shown.auth.jwt_secret.is_some() {
            shown.auth.jwt_secret = Some("***".into());
        }
        toml::to_string_pretty(&shown).unwrap_or_default()
    }
}

/// Names the key of every figment error and where its value came from.
fn describe(e: figment::Error) -> ConfigError {
    let lines: Vec<String> = e
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let from = e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default();
            if key.is_empty() {
                format!("{}{from}", e.kind)
            } else {
                format!("key `{key}`: {}{from}", e.kind)
            }
        })
        .collect();
    ConfigError::Load(lines.join("; "))
}

/// `postgres://u:secret@h/d` → `postgres://u:***@h/d`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let redacted_tail = tail
        .split('&')
        .map(|p| {
            if p.starts_with("password=") || p.contains("?password=") {
                p.split_once("password=").map(|(a, _)| format!("{a}password=***")).unwrap_or_default()
            } else {
                p.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{redacted_tail}"),
            None => format!("{scheme}://{authority}{redacted_tail}"),
        },
        None => format!("{scheme}://{authority}{redacted_tail}"),
    }
}

/// NATS server URLs (a comma list) with passwords and tokens (`nats://TOKEN@host`) redacted.
pub fn redact_nats_urls(urls: &str) -> String {
    let one = |u: &str| {
        let u = u.trim();
        match u.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?))) {
            Some((scheme, (userinfo, host))) if !userinfo.contains(':') => format!("{scheme}://***@{host}"),
            _ => redact_url(u),
        }
    };
    urls.split(',').map(one).collect::<Vec<_>>().join(",")
}

/// A name usable unquoted in replication commands.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults() {
        Jail::expect_with(|_jail| {
            let c = Config::load(None).unwrap();
            assert_eq!(c.listen.to_string(), "0.0.0.0:4000");
            assert_eq!((c.publication.as_str(), c.slot.as_str()), ("walcast", "walcast"));
            assert_eq!(c.tables, vec!["public.*"]);
            assert!(c.database_url.is_none());
            Ok(())
        });
    }

    #[test]
    fn precedence_file_then_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "walcast.toml",
                "listen = \"127.0.0.1:5000\"\nslot = \"from_file\"\ntables = [\"app.*\", \"public.todos\"]\n",
            )?;
            let c = Config::load(None).unwrap();
            assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
            assert_eq!(c.slot, "from_file");
            assert_eq!(c.tables, vec!["app.*", "public.todos"]);

            jail.set_env("WALCAST_SLOT", "from_env");
            jail.set_env("WALCAST_TABLES", "a.b, c.*");
            let c = Config::load(None).unwrap();
            assert_eq!(c.slot, "from_env");
            assert_eq!(c.tables, vec!["a.b", "c.*"]);
            assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
            Ok(())
        });
    }

    #[test]
    fn the_otlp_traces_url_comes_from_the_key_then_the_standard_variables() {
        Jail::expect_with(|jail| {
            assert_eq!(Config::load(None).unwrap().otlp.traces_url(), None, "no export unless asked");
            jail.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://base:4318/");
            assert_eq!(
                Config::load(None).unwrap().otlp.traces_url().as_deref(),
                Some("http://base:4318/v1/traces")
            );
            jail.set_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318/custom");
            assert_eq!(
                Config::load(None).unwrap().otlp.traces_url().as_deref(),
                Some("http://traces:4318/custom")
            );
            jail.set_env("WALCAST_OTLP__ENDPOINT", "http://collector:4318");
            let loaded = Config::load(None);
            if cfg!(feature = "otlp") {
                let url = loaded.unwrap().otlp.traces_url();
                assert_eq!(url.as_deref(), Some("http://collector:4318/v1/traces"));
                jail.set_env("WALCAST_OTLP__ENDPOINT", "collector:4318");
                let e = Config::load(None).unwrap_err().to_string();
                assert!(e.contains("otlp.endpoint") && e.contains("http://"), "{e}");
            } else {
                // A build without the export says so rather than dropping the spans.
                let e = loaded.unwrap_err().to_string();
                assert!(e.contains("otlp.endpoint") && e.contains("--features otlp"), "{e}");
            }
            Ok(())
        });
    }

    #[test]
    fn database_url_fallback() {
        Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "postgres://a@h/one");
            assert_eq!(Config::load(None).unwrap().database_url.as_deref(), Some("postgres://a@h/one"));
            jail.set_env("WALCAST_DATABASE_URL", "postgres://a@h/two");
            assert_eq!(Config::load(None).unwrap().database_url.as_deref(), Some("postgres://a@h/two"));
            Ok(())
        });
    }

    #[test]
    fn explicit_config_path() {
        Jail::expect_with(|jail| {
            jail.create_file("other.toml", "publication = \"pub_x\"\n")?;
            let c = Config::load(Some(Path::new("other.toml"))).unwrap();
            assert_eq!(c.publication, "pub_x");
            let e = Config::load(Some(Path::new("missing.toml"))).unwrap_err();
            assert!(e.to_string().contains("missing.toml"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("walcast.toml", "listne = \"1.2.3.4:1\"\n")?;
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("listne"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("WALCAST_LISTEN", "not an address");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("listen"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("WALCAST_SLOT", "Bad-Slot");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("`slot`") && e.contains("lower-case"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("WALCAST_TABLES", "nodot");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("`tables`") && e.contains("nodot"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("WALCAST_DATABASE_URL", "mysql://x");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("database_url"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn cluster_table_from_env_validated_and_redacted() {
        Jail::expect_with(|jail| {
            let c = Config::load(None).unwrap();
            assert!(!c.cluster.enabled(), "no cluster without nats_url");
            jail.set_env(
                "WALCAST_CLUSTER__NATS_URL",
                "nats://s3cret@10.0.0.1:4222,nats://u:pw@10.0.0.2:4222",
            );
            jail.set_env("WALCAST_CLUSTER__NODE_ID", "node-a");
            jail.set_env("WALCAST_CLUSTER__LEASE_SECS", "7");
            let c = Config::load(None).unwrap();
            assert!(c.cluster.enabled());
            assert_eq!((c.cluster.node_id.as_deref(), c.cluster.lease_secs), (Some("node-a"), 7));
            assert_eq!((c.cluster.prefix.as_str(), c.cluster.replicas), ("walcast", 1));
            let shown = c.to_redacted_toml();
            assert!(!shown.contains("s3cret") && !shown.contains("pw@"), "{shown}");
            assert!(shown.contains("nats://***@10.0.0.1:4222,nats://u:***@10.0.0.2:4222"), "{shown}");
            for (key, value, named) in [
                ("WALCAST_CLUSTER__NODE_ID", "a b", "cluster.node_id"),
                ("WALCAST_CLUSTER__LEASE_SECS", "1", "cluster.lease_secs"),
                ("WALCAST_CLUSTER__REPLICAS", "7", "cluster.replicas"),
                ("WALCAST_CLUSTER__PREFIX", "a.b", "cluster.prefix"),
                ("WALCAST_CHANGELOG__ENABLED", "false", "changelog.enabled"),
            ] {
                jail.set_env(key, value);
                let e = Config::load(None).unwrap_err().to_string();
                assert!(e.contains(named), "{key}={value}: {e}");
                jail.clear_env();
                jail.set_env("WALCAST_CLUSTER__NATS_URL", "nats://127.0.0.1:4222");
            }
            Ok(())
        });
    }

    #[test]
    fn redacts_secrets() {
        let c = Config { database_url: Some("postgres://u:hunter2@h:5/d".into()), ..Config::default() };
        let t = c.to_redacted_toml();
        assert!(t.contains("postgres://u:***@h:5/d") && !t.contains("hunter2"), "{t}");
        assert_eq!(redact_url("postgres://h/d?user=u&password=x"), "postgres://h/d?user=u&password=***");
    }
}
