//! The walsender client: a `replication=database` connection on a raw socket, speaking the
//! frontend/backend protocol through `postgres-protocol`'s codec.
//!
//! Owns: the connection URL, startup with pinned session settings, authentication (trust,
//! cleartext, MD5, SCRAM-SHA-256), TLS per `sslmode`, simple queries (`IDENTIFY_SYSTEM`,
//! `CREATE_REPLICATION_SLOT`, ...), and the CopyBoth stream with standby status updates.
//! Must not: know about pgoutput or changes; every payload it yields is opaque bytes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::replication::lsn::Lsn;

/// Session settings that make every value's text output match what `to_jsonb` produces in a
/// UTC session (dates in ISO order, full float precision, hex bytea).
pub const SESSION_OPTIONS: &str =
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex";

/// Microseconds between 1970-01-01 and 2000-01-01, the Postgres epoch.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("invalid database_url: {0}")]
    Url(String),
    #[error("connecting to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o error on the replication connection")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("server error {code}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server { code: String, message: String, detail: Option<String> },
    #[error("protocol violation: {0}")]
    Protocol(#[from] Violation),
    #[error("the server closed the replication connection")]
    Closed,
}

/// How the server broke the protocol: what arrived, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A backend message that does not belong in this phase (`tag`: its type byte).
    #[error("unexpected message {tag:?} during {phase}")]
    Unexpected { phase: Phase, tag: char },
    /// A CopyData message shorter than its type requires.
    #[error("CopyData message {tag:?} of {len} bytes after its type, at least {need} expected")]
    Truncated { tag: char, len: usize, need: usize },
    #[error("empty CopyData message")]
    Empty,
    #[error("unknown CopyData message {0:?}")]
    UnknownCopyData(char),
    /// A text column (0-based) of a row answering a simple query was not UTF-8.
    #[error("non-UTF-8 text in column {column} of a result row")]
    NotUtf8 { column: usize },
    #[error("{command} returned no {field}")]
    Missing { command: &'static str, field: &'static str },
    /// A row change arrived outside BEGIN … COMMIT (after the commit that ended at `after`).
    #[error("a row change outside a transaction (after the commit that ended at {after})")]
    OutsideTransaction { after: Lsn },
}

/// Where on the connection a message arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Startup,
    SaslContinue,
    SaslFinal,
    Query,
    StartReplication,
    CopyBoth,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Startup => "startup",
            Phase::SaslContinue => "SASL (expected continue)",
            Phase::SaslFinal => "SASL (expected final)",
            Phase::Query => "a query",
            Phase::StartReplication => "START_REPLICATION (expected CopyBothResponse)",
            Phase::CopyBoth => "the replication stream",
        })
    }
}

/// The type byte of a backend message (as the server sent it).
fn tag_of(m: &backend::Message) -> char {
    use backend::Message as M;
    match m {
        M::AuthenticationCleartextPassword
        | M::AuthenticationGss
        | M::AuthenticationKerberosV5
        | M::AuthenticationMd5Password(_)
        | M::AuthenticationOk
        | M::AuthenticationScmCredential
        | M::AuthenticationSspi
        | M::AuthenticationGssContinue(_)
        | M::AuthenticationSasl(_)
        | M::AuthenticationSaslContinue(_)
        | M::AuthenticationSaslFinal(_) => 'R',
        M::BackendKeyData(_) => 'K',
        M::BindComplete => '2',
        M::CloseComplete => '3',
        M::CommandComplete(_) => 'C',
        M::CopyData(_) => 'd',
        M::CopyDone => 'c',
        M::CopyInResponse(_) => 'G',
        M::CopyOutResponse(_) => 'H',
        M::DataRow(_) => 'D',
        M::EmptyQueryResponse => 'I',
        M::ErrorResponse(_) => 'E',
        M::NoData => 'n',
        M::NoticeResponse(_) => 'N',
        M::NotificationResponse(_) => 'A',
        M::ParameterDescription(_) => 't',
        M::ParameterStatus(_) => 'S',
        M::ParseComplete => '1',
        M::PortalSuspended => 's',
        M::ReadyForQuery(_) => 'Z',
        M::RowDescription(_) => 'T',
        _ => '?',
    }
}

impl WireError {
    /// The SQLSTATE of a server error, if this is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            WireError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

/// Where and as whom to connect, parsed from a `postgres://` URL.
#[derive(Clone)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub sslmode: SslMode,
    pub application_name: String,
}

impl std::fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .field("sslmode", &self.sslmode)
            .finish()
    }
}

fn percent_decode(s: &str) -> Result<String, WireError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| WireError::Url("truncated %-escape".into()))?;
            let v =
                u8::from_str_radix(hex, 16).map_err(|_| WireError::Url(format!("bad %-escape %{hex}")))?;
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| WireError::Url("%-escapes are not UTF-8".into()))
}

impl ConnectParams {
    /// Parses `postgres://user:password@host:port/database?sslmode=…`.
    pub fn from_url(url: &str) -> Result<Self, WireError> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| WireError::Url("must start with postgres:// or postgresql://".into()))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((u, p)) => (percent_decode(u)?, Some(percent_decode(p)?)),
                None => (percent_decode(u)?, None),
            },
            None => (String::new(), None),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or_else(|| WireError::Url("unterminated [ in host".into()))?;
            (h.to_owned(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p),
                None => (hostport.to_owned(), ""),
            }
        };
        let port = if port.is_empty() {
            5432
        } else {
            port.parse().map_err(|_| WireError::Url(format!("bad port {port:?}")))?
        };
        let mut params = ConnectParams {
            host: if host.is_empty() { "localhost".into() } else { percent_decode(&host)? },
            port,
            user: if user.is_empty() { "postgres".into() } else { user },
            password,
            database: percent_decode(database)?,
            sslmode: SslMode::Prefer,
            application_name: "walcast".into(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)?;
            match k {
                "sslmode" => {
                    params.sslmode = match v.as_str() {
                        "disable" | "allow" => SslMode::Disable,
                        "prefer" => SslMode::Prefer,
                        "require" | "verify-ca" => SslMode::Require,
                        "verify-full" => SslMode::VerifyFull,
                        other => return Err(WireError::Url(format!("unknown sslmode {other:?}"))),
                    }
                }
                "user" => params.user = v,
                "password" => params.password = Some(v),
                "host" => params.host = v,
                "port" => params.port = v.parse().map_err(|_| WireError::Url(format!("bad port {v:?}")))?,
                "dbname" => params.database = v,
                "application_name" => params.application_name = v,
                _ => {}
            }
        }
        if params.database.is_empty() {
            params.database = params.user.clone();
        }
        Ok(params)
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A walsender connection before `START_REPLICATION`: it answers simple queries.
pub struct ReplicationConnection {
    io: Box<dyn Io>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// Server `server_version_num`, from the startup parameters.
    pub server_version_num: u32,
}

/// One row of a simple query result; `None` is SQL NULL.
pub type Row = Vec<Option<String>>;

#[derive(Debug, Clone)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
    pub database: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub slot_name: String,
    pub consistent_point: Lsn,
    /// The exported snapshot, usable with `SET TRANSACTION SNAPSHOT` while this connection is idle.
    pub snapshot_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export a snapshot for a consistent initial read (the connection must stay open and idle).
    Export,
    NoExport,
}

impl ReplicationConnection {
    pub async fn connect(params: &ConnectParams) -> Result<Self, WireError> {
        let addr = format!("{}:{}", params.host, params.port);
        let tcp = TcpStream::connect(&addr).await.map_err(|source| WireError::Connect { addr, source })?;
        tcp.set_nodelay(true)?;
        let io = negotiate_tls(tcp, params).await?;
        let mut conn = ReplicationConnection {
            io,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            server_version_num: 0,
        };
        conn.startup(params).await?;
        Ok(conn)
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        self.io.write_all(&self.write_buf).await?;
        self.io.flush().await?;
        self.write_buf.clear();
        Ok(())
    }

    /// Reads one backend message. Cancel-safe: partial input stays in the buffer.
    async fn read(&mut self) -> Result<backend::Message, WireError> {
        match self.read_or_copy_both().await? {
            Some(m) => Ok(m),
            None => Err(Violation::Unexpected { phase: Phase::Query, tag: 'W' }.into()),
        }
    }

    /// Like `read`, but returns `None` for CopyBothResponse ('W'), which the codec does not know.
    async fn read_or_copy_both(&mut self) -> Result<Option<backend::Message>, WireError> {
        loop {
            if let Some(header) = backend::Header::parse(&self.read_buf)? {
                if header.tag() == b'W' {
                    let total = 1 + usize::try_from(header.len()).unwrap_or(0);
                    if self.read_buf.len() >= total {
                        self.read_buf.advance(total);
                        return Ok(None);
                    }
                } else if let Some(msg) = backend::Message::parse(&mut self.read_buf)? {
                    return Ok(Some(msg));
                }
            }
            if self.io.read_buf(&mut self.read_buf).await? == 0 {
                return Err(WireError::Closed);
            }
        }
    }

    async fn startup(&mut self, params: &ConnectParams) -> Result<(), WireError> {
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.database.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("options", SESSION_OPTIONS),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(startup.iter().copied(), &mut self.write_buf)?;
        self.flush().await?;
        let password = || {
            params
                .password
                .as_deref()
                .ok_or_else(|| WireError::Auth("the server asks for a password but the URL has none".into()))
        };
        loop {
            match self.read().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram = false;
                    while let Some(m) = fallible_next(&mut mechanisms)? {
                        scram |= m == "SCRAM-SHA-256";
                    }
                    if !scram {
                        return Err(WireError::Auth(
                            "the server offers no SASL mechanism walcast supports".into(),
                        ));
                    }
                    self.scram(password()?).await?;
                }
                backend::Message::ParameterStatus(body) => {
                    if body.name()? == "server_version" {
                        self.server_version_num = parse_server_version(body.value()?);
                    }
                }
                backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(body) => {
                    let err = server_error(&body);
                    return Err(match err.code() {
                        Some("28P01") | Some("28000") => WireError::Auth(err.to_string()),
                        _ => err,
                    });
                }
                other => {
                    return Err(Violation::Unexpected { phase: Phase::Startup, tag: tag_of(&other) }.into())
                }
            }
        }
    }

    async fn scram(&mut self, password: &str) -> Result<(), WireError> {
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.read().await? {
            backend::Message::AuthenticationSaslContinue(body) => {
                scram.update(body.data()).map_err(|e| WireError::Auth(e.to_string()))?
            }
            backend::Message::ErrorResponse(body) => {
                return Err(WireError::Auth(server_error(&body).to_string()))
            }
            other => {
                return Err(Violation::Unexpected { phase: Phase::SaslContinue, tag: tag_of(&other) }.into())
            }
        }
        frontend::sasl_response(scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.read().await? {
            backend::Message::AuthenticationSaslFinal(body) => {
                scram.finish(body.data()).map_err(|e| WireError::Auth(e.to_string()))
            }
            backend::Message::ErrorResponse(body) => Err(WireError::Auth(server_error(&body).to_string())),
            other => Err(Violation::Unexpected { phase: Phase::SaslFinal, tag: tag_of(&other) }.into()),
        }
    }

    /// Runs one simple-protocol command and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, WireError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read().await? {
                backend::Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(range) = fallible_next(&mut ranges)? {
                        let column = row.len();
                        row.push(match range {
                            Some(r) => Some(
                                std::str::from_utf8(buf.get(r).unwrap_or_default())
                                    .map_err(|_| Violation::NotUtf8 { column })?
                                    .to_owned(),
                            ),
                            None => None,
                        });
                    }
                    rows.push(row);
                }
                backend::Message::ErrorResponse(body) => error = Some(server_error(&body)),
                backend::Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, WireError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().ok_or(Violation::Missing { command: "IDENTIFY_SYSTEM", field: "row" })?;
        let col = |i: usize| row.get(i).cloned().flatten();
        Ok(SystemIdentity {
            system_id: col(0).unwrap_or_default(),
            timeline: col(1).and_then(|t| t.parse().ok()).unwrap_or(0),
            xlog_pos: col(2)
                .and_then(|l| l.parse().ok())
                .ok_or(Violation::Missing { command: "IDENTIFY_SYSTEM", field: "xlogpos" })?,
            database: col(3),
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput`. `name` must be a valid slot
    /// name (lower-case letters, digits and underscores), which the caller checks.
    pub async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, WireError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {name}{} LOGICAL pgoutput {}",
            if temporary { " TEMPORARY" } else { "" },
            match snapshot {
                SnapshotAction::Export => "EXPORT_SNAPSHOT",
                SnapshotAction::NoExport => "NOEXPORT_SNAPSHOT",
            }
        );
        let rows = self.simple_query(&sql).await?;
        let row =
            rows.first().ok_or(Violation::Missing { command: "CREATE_REPLICATION_SLOT", field: "row" })?;
        let col = |i: usize| row.get(i).cloned().flatten();
        Ok(CreatedSlot {
            slot_name: col(0).unwrap_or_else(|| name.to_owned()),
            consistent_point: col(1).and_then(|l| l.parse().ok()).ok_or(Violation::Missing {
                command: "CREATE_REPLICATION_SLOT",
                field: "consistent point",
            })?,
            snapshot_name: col(2),
        })
    }

    /// `START_REPLICATION SLOT … LOGICAL …` with pgoutput v1 on `publication`, then the CopyBoth stream.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream, WireError> {
        let publication = publication.replace('"', "\"\"").replace('\'', "''");
        let sql = format!(
            "START_REPLICATION SLOT {slot} LOGICAL {start} (proto_version '1', publication_names '\"{publication}\"', messages 'true')"
        );
        frontend::query(&sql, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            match self.read_or_copy_both().await? {
                None => break,
                Some(backend::Message::ErrorResponse(body)) => return Err(server_error(&body)),
                Some(backend::Message::NoticeResponse(_)) | Some(backend::Message::ParameterStatus(_)) => {}
                Some(other) => {
                    return Err(
                        Violation::Unexpected { phase: Phase::StartReplication, tag: tag_of(&other) }.into()
                    )
                }
            }
        }
        Ok(ReplicationStream { conn: self })
    }

    /// Sends Terminate and closes the socket.
    pub async fn close(mut self) -> Result<(), WireError> {
        frontend::terminate(&mut self.write_buf);
        self.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }
}

/// A message of the CopyBoth stream.
#[derive(Debug)]
pub enum ReplicationMessage {
    XLogData { wal_start: Lsn, wal_end: Lsn, server_time: i64, data: Bytes },
    Keepalive { wal_end: Lsn, server_time: i64, reply_requested: bool },
}

/// How long `finish` waits for the server to end the copy before closing anyway.
const FINISH_WAIT: Duration = Duration::from_secs(10);

/// The CopyBoth phase of a walsender connection.
pub struct ReplicationStream {
    conn: ReplicationConnection,
}

impl ReplicationStream {
    /// Waits for the next XLogData or keepalive. Cancel-safe.
    pub async fn next(&mut self) -> Result<ReplicationMessage, WireError> {
        loop {
            match self.conn.read().await? {
                backend::Message::CopyData(body) => return parse_copy_data(body.into_bytes()),
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                backend::Message::CopyDone => return Err(WireError::Closed),
                backend::Message::NoticeResponse(_) | backend::Message::ParameterStatus(_) => {}
                other => {
                    return Err(Violation::Unexpected { phase: Phase::CopyBoth, tag: tag_of(&other) }.into())
                }
            }
        }
    }

    /// Sends a standby status update: written, flushed (safe to discard) and applied positions.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply: bool,
    ) -> Result<(), WireError> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(write.0);
        body.put_u64(flush.0);
        body.put_u64(apply.0);
        body.put_i64(now_pg_micros());
        body.put_u8(u8::from(reply));
        frontend::CopyData::new(body.freeze())?.write(&mut self.conn.write_buf);
        self.conn.flush().await
    }

    /// Ends the stream after a final status update: CopyDone, then waits (up to `FINISH_WAIT`) for
    /// the server to end its side of the copy, which it does only after it has read the status
    /// update, so the slot's confirmed position is up to date when this returns; then Terminate.
    pub async fn finish(mut self, flush: Lsn) -> Result<(), WireError> {
        self.send_status(flush, flush, flush, false).await?;
        frontend::copy_done(&mut self.conn.write_buf);
        self.conn.flush().await?;
        let drained = tokio::time::timeout(FINISH_WAIT, async {
            loop {
                match self.conn.read().await? {
                    backend::Message::ReadyForQuery(_) => return Ok(()),
                    backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                    // Changes still in flight, the server's CopyDone, CommandComplete, notices.
                    _ => {}
                }
            }
        })
        .await;
        let closed = self.conn.close().await;
        match drained {
            Ok(r) => r.and(closed),
            Err(_) => closed,
        }
    }
}

fn parse_copy_data(mut b: Bytes) -> Result<ReplicationMessage, WireError> {
    if b.is_empty() {
        return Err(Violation::Empty.into());
    }
    let tag = b.get_u8();
    let need = match tag {
        b'w' => 24,
        b'k' => 17,
        other => return Err(Violation::UnknownCopyData(char::from(other)).into()),
    };
    if b.len() < need {
        return Err(Violation::Truncated { tag: char::from(tag), len: b.len(), need }.into());
    }
    if tag == b'w' {
        let wal_start = Lsn(b.get_u64());
        let wal_end = Lsn(b.get_u64());
        let server_time = b.get_i64();
        return Ok(ReplicationMessage::XLogData { wal_start, wal_end, server_time, data: b });
    }
    Ok(ReplicationMessage::Keepalive {
        wal_end: Lsn(b.get_u64()),
        server_time: b.get_i64(),
        reply_requested: b.get_u8() == 1,
    })
}

/// Current time in microseconds since the Postgres epoch.
pub fn now_pg_micros() -> i64 {
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    i64::try_from(unix.as_micros()).unwrap_or(i64::MAX) - PG_EPOCH_OFFSET_MICROS
}

fn parse_server_version(v: &str) -> u32 {
    // "15.18 (Debian 15.18-0+deb12u1)" -> 150018
    let mut parts = v.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    major * 10_000 + minor
}

fn fallible_next<I: fallible_iterator::FallibleIterator<Error = std::io::Error>>(
    it: &mut I,
) -> Result<Option<I::Item>, WireError> {
    Ok(it.next()?)
}

fn server_error(body: &backend::ErrorResponseBody) -> WireError {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    let mut fields = body.fields();
    while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'D' => detail = Some(String::from_utf8_lossy(f.value_bytes()).into_owned()),
            _ => {}
        }
    }
    WireError::Server { code, message, detail }
}

async fn negotiate_tls(mut tcp: TcpStream, params: &ConnectParams) -> Result<Box<dyn Io>, WireError> {
    if params.sslmode == SslMode::Disable {
        return Ok(Box::new(tcp));
    }
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    let answer = tcp.read_u8().await?;
    if answer != b'S' {
        return match params.sslmode {
            SslMode::Prefer => Ok(Box::new(tcp)),
            _ => {
                Err(WireError::Tls(format!("sslmode={:?} but the server does not offer TLS", params.sslmode)))
            }
        };
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| WireError::Tls(e.to_string()))?;
    let config = if params.sslmode == SslMode::VerifyFull {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        // libpq semantics: prefer/require encrypt without verifying the certificate.
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    };
    let name = rustls::pki_types::ServerName::try_from(params.host.clone())
        .map_err(|e| WireError::Tls(format!("bad server name {:?}: {e}", params.host)))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| WireError::Tls(e.to_string()))?;
    Ok(Box::new(tls))
}

/// Accepts any certificate: `sslmode=require` encrypts but, like libpq, does not authenticate.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let p = ConnectParams::from_url("postgres://al%40ice:p%3Ass@db.example:6543/app?sslmode=require")
            .unwrap();
        assert_eq!((p.user.as_str(), p.password.as_deref()), ("al@ice", Some("p:ss")));
        assert_eq!((p.host.as_str(), p.port, p.database.as_str()), ("db.example", 6543, "app"));
        assert_eq!(p.sslmode, SslMode::Require);

        let p = ConnectParams::from_url("postgresql://u@[::1]/d").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 5432));
        let p = ConnectParams::from_url("postgres://localhost").unwrap();
        assert_eq!((p.user.as_str(), p.database.as_str()), ("postgres", "postgres"));
        assert!(
            !format!("{:?}", ConnectParams::from_url("postgres://u:secret@h/d").unwrap()).contains("secret")
        );
    }

    #[test]
    fn rejects_bad_urls() {
        for url in
            ["mysql://x", "postgres://h:notaport/d", "postgres://h/d?sslmode=sometimes", "postgres://%zz@h/d"]
        {
            assert!(ConnectParams::from_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn copy_data_messages() {
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(1);
        w.put_u64(2);
        w.put_i64(3);
        w.put_slice(b"Bpayload");
        let ReplicationMessage::XLogData { wal_start, wal_end, server_time, data } =
            parse_copy_data(w.freeze()).unwrap()
        else {
            panic!("not xlogdata")
        };
        assert_eq!((wal_start, wal_end, server_time, &data[..]), (Lsn(1), Lsn(2), 3, &b"Bpayload"[..]));

        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(9);
        k.put_i64(8);
        k.put_u8(1);
        assert!(matches!(
            parse_copy_data(k.freeze()).unwrap(),
            ReplicationMessage::Keepalive { wal_end: Lsn(9), server_time: 8, reply_requested: true }
        ));

        // Each malformed message says what it was and where it fell short.
        for (bad, want) in [
            (&b""[..], Violation::Empty),
            (b"w123", Violation::Truncated { tag: 'w', len: 3, need: 24 }),
            (b"k12345678", Violation::Truncated { tag: 'k', len: 8, need: 17 }),
            (b"x", Violation::UnknownCopyData('x')),
        ] {
            match parse_copy_data(Bytes::copy_from_slice(bad)) {
                Err(WireError::Protocol(v)) => assert_eq!(v, want, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn server_versions() {
        assert_eq!(parse_server_version("15.18 (Debian 15.18-0+deb12u1)"), 150018);
        assert_eq!(parse_server_version("16devel"), 160000);
    }
}
