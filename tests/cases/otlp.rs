//! OpenTelemetry export (the `otlp` feature): a gateway process sends its spans over OTLP/HTTP to
//! a collector the test runs, which decodes them with the OpenTelemetry protobuf types. A session's
//! span and its join's span arrive in one trace, flushed at exit too, with no token, filter or row
//! value in them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;

use crate::support::{exec, fresh_db, pool, user, wait_for, GatewayProcess, Ws};

const PATH: &str = "/realtime/v1/websocket";

/// What the collector was sent: each request's body, as it arrived.
#[derive(Clone, Default)]
struct Collector {
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl Collector {
    /// Serves `POST /v1/traces` on a port of its own; its address.
    async fn start(&self) -> std::net::SocketAddr {
        let bodies = Arc::clone(&self.bodies);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let bodies = Arc::clone(&bodies);
                async move {
                    if headers.get(header::CONTENT_TYPE).is_none_or(|t| t != "application/x-protobuf") {
                        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Bytes::new());
                    }
                    bodies.lock().expect("bodies").push(body);
                    // An empty ExportTraceServiceResponse: everything accepted.
                    (StatusCode::OK, Bytes::new())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// Every span received, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let bodies = self.bodies.lock().expect("bodies").clone();
        let mut out = Vec::new();
        for body in bodies {
            let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
            for rs in request.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| text(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    out.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                }
            }
        }
        out
    }

    fn raw(&self) -> Vec<u8> {
        self.bodies.lock().expect("bodies").iter().flat_map(|b| b.to_vec()).collect()
    }
}

/// An attribute's value as text (strings and integers).
fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    match value {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The join span of `topic` and the session span it belongs to (same trace, its parent).
fn join_in_session(spans: &[(String, Span)], topic: &str) -> Option<(Span, Span)> {
    let (_, join) = spans
        .iter()
        .find(|(_, s)| s.name == "join" && text(&s.attributes, "topic").as_deref() == Some(topic))?;
    let (_, session) = spans.iter().find(|(_, s)| {
        s.name == "session" && s.span_id == join.parent_span_id && s.trace_id == join.trace_id
    })?;
    Some((join.clone(), session.clone()))
}

#[tokio::test]
async fn sessions_and_joins_are_exported_over_otlp_and_flushed_at_exit() {
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, "CREATE TABLE notes (id int PRIMARY KEY, body text)").await;
    let collector = Collector::default();
    let collector_addr = collector.start().await;
    let db = crate::support::db_name(&url);
    let port = crate::support::free_port();
    let log_dir = crate::support::log_dir(&format!("{db}-otlp"));
    let _ = std::fs::create_dir_all(log_dir.parent().expect("a parent"));
    let log_path = log_dir.with_extension("log");
    let env = [
        ("WALCAST_OTLP__ENDPOINT", format!("http://{collector_addr}")),
        // Batches every 200 ms, so that a session's span arrives soon after it ends.
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
    ];
    let slot = format!("slot_{db}");
    let gateway = GatewayProcess { url: &url, slot: &slot, port, log_dir: &log_dir, env: &env };
    let mut child = gateway.start(std::fs::File::create(&log_path).expect("log"), "info", "otlp").await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    // A session that joins, receives a change and goes.
    let token = user("00000000-0000-0000-0000-00000000000a");
    let mut ws = Ws::connect_with(addr, PATH, None, Some(&token)).await.expect("connects");
    let filter = "body=eq.filter-value-0c4e";
    let binding = json!([{"event": "*", "schema": "public", "table": "notes", "filter": filter}]);
    let (_, status) = ws.join("traced-room", binding).await;
    assert_eq!(status["status"], "ok", "{status}");
    exec(&p, "INSERT INTO notes VALUES (1, 'filter-value-0c4e')").await;
    ws.recv_event("postgres_changes").await;
    drop(ws);
    let (join, session) =
        wait_for("the ended session's spans at the collector", Duration::from_secs(30), || {
            let found = join_in_session(&collector.spans(), "realtime:traced-room");
            async move { found }
        })
        .await;
    assert_eq!(text(&session.attributes, "protocol").as_deref(), Some("phoenix"), "{session:?}");
    let id = text(&session.attributes, "id").expect("the session's id");
    assert_eq!(text(&join.attributes, "session"), Some(id), "the join names its session");
    assert!(session.end_time_unix_nano >= join.end_time_unix_nano, "the session outlasts its join");
    assert!(
        collector.spans().iter().all(|(service, _)| service == "walcast"),
        "every span is walcast's own (not its HTTP client's)"
    );

    // A session still open when the gateway stops: its spans go with the last batch.
    let mut open = Ws::connect_with(addr, PATH, None, Some(&token)).await.expect("connects");
    let (reply, _) = open.join("open-at-exit", json!([])).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert!(join_in_session(&collector.spans(), "realtime:open-at-exit").is_none(), "not before it ends");
    let pid = rustix::process::Pid::from_raw(child.id().expect("a pid") as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits within 30 s");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(exit.expect("status").success(), "a clean exit: {log}");
    assert!(join_in_session(&collector.spans(), "realtime:open-at-exit").is_some(), "flushed at exit: {log}");
    assert!(log.contains("exporting spans over OTLP"), "the log says where spans go: {log}");

    let raw = collector.raw();
    for secret in ["filter-value-0c4e", token.as_str()] {
        let found = raw.windows(secret.len()).any(|w| w == secret.as_bytes());
        assert!(!found, "{secret} was exported");
    }
    let _ = std::fs::remove_file(&log_path);
}
