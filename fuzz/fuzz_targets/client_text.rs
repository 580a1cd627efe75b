//! Every parser of text a client sends, outside the Phoenix frames: resume points (`since`,
//! SSE `Last-Event-ID`: cursors and timestamps), the changes endpoint's query string and the
//! bindings it builds, plain WebSocket (`/v1/ws`) messages driven through a connection, GraphQL
//! WebSocket messages of both subprotocols and `where` arguments, and tokens (JWT headers and
//! claims). None may panic, whatever the text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use walcast::protocol::plain::PlainConnection;
use walcast::protocol::Connection;
use walcast::realtime::resume::Since;
use walcast::server::sse::ChangesParams;

#[path = "../shared.rs"]
mod shared;
use shared::{hub, runtime, verifier};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = s.parse::<Since>();
    let _ = s.parse::<walcast::log::Cursor>();
    let _ = walcast::change::parse_timestamp(s);
    if let Ok(params) = serde_urlencoded::from_str::<ChangesParams>(s) {
        let table = params.filter.as_deref().unwrap_or("public.t");
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let _ = walcast::subscribe::table_bindings(
            schema,
            name,
            params.filter.as_deref(),
            params.events.as_deref(),
            params.select.as_deref(),
        );
        let _ = params.since.as_deref().map(str::parse::<Since>);
    }
    use walcast::protocol::graphql::wire::{init_token, parse, Protocol};
    for protocol in [Protocol::TransportWs, Protocol::Legacy] {
        let _ = parse(protocol, s);
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(s) {
        let _ = init_token(&v);
        let _ = walcast::protocol::graphql::where_filter::to_filter(&v, &|f| Some(f.to_owned()))
            .map(|f| f.map(|f| walcast::filter::parse(&f)));
    }
    let _ = runtime().block_on(verifier().verify(s));
    // Each line is a message on one connection: subscribe, publish, auth, then more.
    let (mut conn, _outbox) = PlainConnection::new(hub().clone(), None);
    for line in s.lines() {
        let _ = runtime().block_on(conn.text(line));
    }
    let _ = conn.on_deadline();
    // Socket.IO: each line an event (with one attachment beside it), on one connection; then
    // each line an Engine.IO packet, a binary message after it, on another (connected first).
    use walcast::protocol::socketio::{packet, Heartbeat, SocketIoConnection};
    let heartbeat = Heartbeat::within(std::time::Duration::from_secs(60));
    let attachment = bytes::Bytes::from_static(b"\x00");
    let attachments = std::collections::VecDeque::from([attachment.clone()]);
    let (mut sio, _outbox) = SocketIoConnection::new(hub().clone(), None, heartbeat);
    for line in s.lines() {
        if let Ok(event) = walcast::protocol::socketio::parse_event(line, &attachments) {
            let _ = runtime().block_on(sio.handle(event));
        }
    }
    let (mut sio, _outbox) = SocketIoConnection::new(hub().clone(), None, heartbeat);
    let _ = runtime().block_on(sio.text("40"));
    for line in s.lines() {
        let _ = (packet::engine(line), packet::socket(line));
        let _ = runtime().block_on(sio.text(line));
        let _ = runtime().block_on(sio.binary(&attachment));
        let _ = (sio.take_closing(), sio.on_deadline(), sio.due());
    }
    let _ = packet::split_payload(s.as_bytes());
    let columns = [walcast::subscribe::PublishedColumn {
        name: "a.b".into(),
        compare_type: "text".into(),
        in_identity: true,
        in_primary_key: true,
    }];
    let _ = walcast::subscribe::parse_order(s, &columns);
});
