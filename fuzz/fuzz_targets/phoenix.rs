//! Phoenix text and binary frame decoding must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use walcast::protocol::phoenix::{decode_binary, decode_text, Vsn};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = decode_text(Vsn::V1, s);
        let _ = decode_text(Vsn::V2, s);
    }
    let _ = decode_binary(&bytes::Bytes::copy_from_slice(data));
});
