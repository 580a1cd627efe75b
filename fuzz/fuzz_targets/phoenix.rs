//! Phoenix text and binary frames must never panic: neither the decoders nor a connection (session,
//! channels, broadcast, presence) fed the same bytes; nor the database broadcast decoder, nor token verification.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use walcast::change::DbBroadcast;
use walcast::protocol::phoenix::{decode_binary, decode_text, PhoenixConnection, Vsn};
use walcast::protocol::Connection;
use walcast::realtime::{Hub, Limits};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

/// One hub and verifier for every input (connections come and go on it, as on a gateway).
fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| Hub::with_limits(Limits::default()))
}

fn verifier() -> &'static walcast::auth::Verifier {
    static V: OnceLock<walcast::auth::Verifier> = OnceLock::new();
    V.get_or_init(|| walcast::auth::Verifier::with_secret("fuzz-secret-fuzz-secret-fuzz-secret"))
}

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    let _ = decode_binary(&bytes);
    let _ = DbBroadcast::decode(data);
    // Tokens are wire input too: any text verifies or is refused, never panics.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = runtime().block_on(verifier().verify(s));
    }
    for vsn in [Vsn::V1, Vsn::V2] {
        let (mut conn, _outbox) = PhoenixConnection::new(hub().clone(), vsn, None);
        if let Ok(s) = std::str::from_utf8(data) {
            let _ = decode_text(vsn, s);
            // Each line is a frame: a join, then pushes on it, exercise the session paths.
            for line in s.lines() {
                let _ = runtime().block_on(conn.text(line));
            }
        }
        let _ = conn.binary(&bytes);
    }
});
