//! Change log records read back from disk must never panic, whatever the bytes (a torn write,
//! a flipped bit, a foreign file): framing, checksum and body decoding all return errors. The
//! cluster stream's chunks (a header, then records) are read the same way, and so are the
//! messages nodes exchange on the cluster bus (a JSON header line, then a payload).
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walcast::log::record::{decode, frame_len};

fuzz_target!(|data: &[u8]| {
    let buf = Bytes::copy_from_slice(data);
    let _ = walcast::cluster::chunk::decode(&buf);
    let _ = walcast::cluster::bus::decode(&buf);
    let mut chunk = b"WCS1".to_vec();
    chunk.extend_from_slice(data);
    let _ = walcast::cluster::chunk::decode(&Bytes::from(chunk));
    let mut at = 0;
    while at < buf.len() {
        match frame_len(&buf[at..], at) {
            Ok(Some(len)) => {
                let _ = decode(&buf.slice(at..at + len), at);
                at += len;
            }
            _ => break,
        }
    }
    // Bodies behind a valid checksum too: frame the input as one record of each tag.
    for tag in 0..6u8 {
        let mut framed = Vec::with_capacity(data.len() + 9);
        framed.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let mut body = vec![tag];
        body.extend_from_slice(data);
        framed.extend_from_slice(&crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&body).to_le_bytes());
        framed.extend_from_slice(&body);
        if let Ok(Some(len)) = frame_len(&framed, 0) {
            let _ = decode(&Bytes::from(framed).slice(..len), 0);
        }
    }
});
