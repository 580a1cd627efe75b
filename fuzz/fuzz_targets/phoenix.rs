//! Phoenix text and binary frames must never panic: neither the decoders nor a connection (session,
//! channels, broadcast, presence) fed the same bytes; nor the database broadcast decoder, nor token verification.
#![no_main]
use libfuzzer_sys::fuzz_target;
use walcast::change::DbBroadcast;
use walcast::protocol::phoenix::{decode_binary, decode_text, PhoenixConnection, Vsn};
use walcast::protocol::Connection;

#[path = "../shared.rs"]
mod shared;
use shared::{hub, runtime, verifier};

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
