//! Engine.IO v4 and Socket.IO v5 packets as text: reading a client's (never panicking on any
//! input) and writing the server's.
//!
//! An Engine.IO packet is its type digit and its data (`4` a message, `2`/`3` ping and pong, `1`
//! close, `5` upgrade, `6` noop); a message carries a Socket.IO packet: its type digit, for a
//! binary one the count of attachments and `-`, then `/namespace,` unless it is `/`, the ack id,
//! and the JSON. Owns: this grammar and its limits. Must not: know what an event means (that is
//! `protocol/socketio`) or touch sockets.

use bytes::Bytes;

use crate::replication::values::write_json_str;

/// Attachments a client's binary event may carry (each is one binary message that follows).
pub const MAX_ATTACHMENTS: usize = 16;

/// What an Engine.IO packet from a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePacket<'a> {
    Open,
    Close,
    /// Its data is echoed in the pong (`2probe` → `3probe`).
    Ping(&'a str),
    Pong(&'a str),
    /// A Socket.IO packet.
    Message(&'a str),
    Upgrade,
    Noop,
}

/// Why a client's packet was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("an empty Engine.IO packet")]
    Empty,
    #[error("unknown Engine.IO packet type {0:?}")]
    EngineType(char),
    #[error("unknown Socket.IO packet type {0:?}")]
    SocketType(char),
    #[error("a binary Socket.IO packet without its attachment count")]
    Attachments,
    #[error("a binary Socket.IO packet announcing more than {MAX_ATTACHMENTS} attachments")]
    TooManyAttachments,
    #[error("a Socket.IO namespace without its closing comma")]
    Namespace,
    #[error("an acknowledgement id out of range")]
    AckId,
}

pub fn engine(text: &str) -> Result<EnginePacket<'_>, PacketError> {
    let mut chars = text.chars();
    let kind = chars.next().ok_or(PacketError::Empty)?;
    let data = chars.as_str();
    Ok(match kind {
        '0' => EnginePacket::Open,
        '1' => EnginePacket::Close,
        '2' => EnginePacket::Ping(data),
        '3' => EnginePacket::Pong(data),
        '4' => EnginePacket::Message(data),
        '5' => EnginePacket::Upgrade,
        '6' => EnginePacket::Noop,
        other => return Err(PacketError::EngineType(other)),
    })
}

/// The type of a Socket.IO packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

/// A Socket.IO packet, borrowed from the text it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPacket<'a> {
    pub kind: Kind,
    /// Binary messages that follow (binary packets only).
    pub attachments: usize,
    /// `/` unless given.
    pub namespace: &'a str,
    pub ack: Option<u64>,
    /// The JSON (empty when there is none).
    pub data: &'a str,
}

/// Ack ids a client may use: exact in every client's number type.
const MAX_ACK: u64 = (1 << 53) - 1;

pub fn socket(text: &str) -> Result<SocketPacket<'_>, PacketError> {
    let mut chars = text.chars();
    let kind = match chars.next().ok_or(PacketError::Empty)? {
        '0' => Kind::Connect,
        '1' => Kind::Disconnect,
        '2' => Kind::Event,
        '3' => Kind::Ack,
        '4' => Kind::ConnectError,
        '5' => Kind::BinaryEvent,
        '6' => Kind::BinaryAck,
        other => return Err(PacketError::SocketType(other)),
    };
    let mut rest = chars.as_str();
    let mut attachments = 0;
    if matches!(kind, Kind::BinaryEvent | Kind::BinaryAck) {
        let (count, after) = rest.split_once('-').ok_or(PacketError::Attachments)?;
        if count.is_empty() || count.len() > 4 || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PacketError::Attachments);
        }
        attachments = count.parse().map_err(|_| PacketError::Attachments)?;
        if attachments > MAX_ATTACHMENTS {
            return Err(PacketError::TooManyAttachments);
        }
        rest = after;
    }
    let mut namespace = "/";
    if rest.starts_with('/') {
        let (ns, after) = rest.split_once(',').ok_or(PacketError::Namespace)?;
        namespace = ns;
        rest = after;
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack = match digits {
        0 => None,
        1..=16 => {
            Some(rest[..digits].parse::<u64>().ok().filter(|n| *n <= MAX_ACK).ok_or(PacketError::AckId)?)
        }
        _ => return Err(PacketError::AckId),
    };
    Ok(SocketPacket { kind, attachments, namespace, ack, data: &rest[digits..] })
}

/// `4` and a Socket.IO packet of `kind` for the namespace `/`.
fn message(kind: u8, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity + 8);
    out.push(b'4');
    out.push(kind);
    out
}

/// An event: `42["<name>",<args>]`, `args` the JSON arguments without their brackets.
pub fn event(name: &str, args: &[u8]) -> String {
    let mut out = message(b'2', name.len() + args.len() + 4);
    out.push(b'[');
    write_json_str(&mut out, name);
    if !args.is_empty() {
        out.push(b',');
        out.extend_from_slice(args);
    }
    out.push(b']');
    String::from_utf8(out).unwrap_or_default()
}

/// An event whose first argument is one binary attachment (which follows as its own message):
/// `451-["<name>",{"_placeholder":true,"num":0},<args>]`.
pub fn binary_event(name: &str, args: &[u8]) -> String {
    let mut out = message(b'5', name.len() + args.len() + 40);
    out.extend_from_slice(b"1-[");
    write_json_str(&mut out, name);
    out.extend_from_slice(br#",{"_placeholder":true,"num":0}"#);
    if !args.is_empty() {
        out.push(b',');
        out.extend_from_slice(args);
    }
    out.push(b']');
    String::from_utf8(out).unwrap_or_default()
}

/// The acknowledgement of event `id`: `43<id>[<answer>]`.
pub fn ack(id: u64, answer: &serde_json::Value) -> String {
    format!("43{id}[{answer}]")
}

/// The answer to a connect: `40{"sid":…}`.
pub fn connected(sid: &str) -> String {
    format!("40{}", serde_json::json!({ "sid": sid }))
}

/// A refused connect: `44<ns>{"message":…}`.
pub fn connect_error(namespace: &str, message: &str) -> String {
    let ns = if namespace == "/" { String::new() } else { format!("{namespace},") };
    format!("44{ns}{}", serde_json::json!({ "message": message }))
}

/// The server ends the namespace's connection: the client does not reconnect on its own.
pub const DISCONNECT: &str = "41";
pub const PING: &str = "2";
/// Answers a polling request held while the transport upgrades.
pub const NOOP: &str = "6";
/// Ends an Engine.IO session (on long-polling; a WebSocket closes instead).
pub const CLOSE: &str = "1";

/// The record separator between packets of a long-polling payload.
pub const SEPARATOR: u8 = 0x1e;

/// A long-polling payload's packets: text as it is, binary as `b<base64>`. `None` when a binary
/// one is not base64.
pub fn split_payload(body: &[u8]) -> Option<Vec<Payload>> {
    use base64::Engine as _;
    body.split(|b| *b == SEPARATOR)
        .map(|p| match p.strip_prefix(b"b") {
            Some(b64) => {
                base64::engine::general_purpose::STANDARD.decode(b64).ok().map(|b| Payload::Binary(b.into()))
            }
            None => std::str::from_utf8(p).ok().map(|t| Payload::Text(t.to_owned())),
        })
        .collect()
}

/// One packet of a long-polling payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Text(String),
    Binary(Bytes),
}

/// Appends a binary packet to a long-polling payload.
pub fn write_binary(out: &mut Vec<u8>, binary: &[u8]) {
    use base64::Engine as _;
    out.push(b'b');
    let at = out.len();
    out.resize(at + base64::encoded_len(binary.len(), true).unwrap_or(0), 0);
    let n = base64::engine::general_purpose::STANDARD.encode_slice(binary, &mut out[at..]).unwrap_or(0);
    out.truncate(at + n);
}

/// A new session or socket id: 120 random bits, URL-safe (it is the key to a long-polling
/// session, so it must not be guessable). `None` if the system's generator fails.
pub fn random_id() -> Option<String> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 15];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_packets_read_by_type() {
        assert_eq!(engine("2probe"), Ok(EnginePacket::Ping("probe")));
        assert_eq!(engine("3"), Ok(EnginePacket::Pong("")));
        assert_eq!(engine("42[\"a\"]"), Ok(EnginePacket::Message("2[\"a\"]")));
        assert_eq!(engine(""), Err(PacketError::Empty));
        assert_eq!(engine("9"), Err(PacketError::EngineType('9')));
        assert_eq!(engine("é"), Err(PacketError::EngineType('é')));
    }

    #[test]
    fn socket_packets_read_namespace_ack_and_attachments() {
        let p = socket("212[\"x\",1]").unwrap();
        assert_eq!((p.kind, p.namespace, p.ack, p.data), (Kind::Event, "/", Some(12), "[\"x\",1]"));
        let p = socket("51-/admin,7[\"b\",{}]").unwrap();
        assert_eq!((p.kind, p.attachments, p.namespace, p.ack), (Kind::BinaryEvent, 1, "/admin", Some(7)));
        let p = socket("0{\"token\":\"t\"}").unwrap();
        assert_eq!((p.kind, p.ack, p.data), (Kind::Connect, None, "{\"token\":\"t\"}"));
        assert_eq!(socket("0").unwrap().data, "");
        for (bad, err) in [
            ("", PacketError::Empty),
            ("7", PacketError::SocketType('7')),
            ("5[]", PacketError::Attachments),
            ("5-[]", PacketError::Attachments),
            ("5x-[]", PacketError::Attachments),
            ("599999999-[]", PacketError::Attachments),
            ("517-[]", PacketError::TooManyAttachments),
            ("2/admin[]", PacketError::Namespace),
            ("299999999999999999[]", PacketError::AckId),
            ("29007199254740992[]", PacketError::AckId),
        ] {
            assert_eq!(socket(bad), Err(err), "{bad}");
        }
    }

    #[test]
    fn server_packets_are_written_as_clients_read_them() {
        assert_eq!(event("change", br#"{"id":1}"#), r#"42["change",{"id":1}]"#);
        assert_eq!(event("ping", b""), r#"42["ping"]"#);
        assert_eq!(
            binary_event("blob", br#"{"room":"r"}"#),
            r#"451-["blob",{"_placeholder":true,"num":0},{"room":"r"}]"#
        );
        assert_eq!(ack(3, &serde_json::json!({"ok": true})), r#"433[{"ok":true}]"#);
        assert_eq!(connect_error("/", "no"), r#"44{"message":"no"}"#);
        assert_eq!(connect_error("/x", "no"), r#"44/x,{"message":"no"}"#);
        let mut out = b"42[]\x1e".to_vec();
        write_binary(&mut out, b"\x00\xff");
        assert_eq!(out, b"42[]\x1ebAP8=");
        let parsed = split_payload(&out).unwrap();
        assert_eq!(parsed, [Payload::Text("42[]".into()), Payload::Binary(Bytes::from_static(b"\x00\xff"))]);
        assert_eq!(split_payload(b"b!!"), None);
        assert_eq!(split_payload(b"\xff"), None);
    }
}
