//! The GraphQL-over-WebSocket messages: `graphql-transport-ws` (the `graphql-ws` library's
//! protocol) and the legacy `graphql-ws` subprotocol (Apollo's `subscriptions-transport-ws`),
//! chosen by `Sec-WebSocket-Protocol`. Parsing never panics; every malformed message is an
//! error the connection answers with the protocol's close code.
//!
//! Owns: message shapes and close codes. Must not: execute anything or touch the socket.

use serde::Deserialize;
use serde_json::{json, Value as Json};

/// Invalid message (malformed, unknown type, missing fields).
pub const BAD_REQUEST: u16 = 4400;
/// A subscribe before the connection was acknowledged.
pub const UNAUTHORIZED: u16 = 4401;
/// `connection_init` refused (a token that does not verify, or none where one is required).
pub const FORBIDDEN: u16 = 4403;
/// No `connection_init` in time.
pub const INIT_TIMEOUT: u16 = 4408;
/// A subscribe with the id of one still running.
pub const DUPLICATE_ID: u16 = 4409;
/// A second `connection_init`.
pub const TOO_MANY_INITS: u16 = 4429;

/// The subprotocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `graphql-transport-ws`.
    TransportWs,
    /// `graphql-ws` (legacy).
    Legacy,
}

impl Protocol {
    /// The first subprotocol of the `Sec-WebSocket-Protocol` list this server speaks.
    pub fn choose(offered: &str) -> Option<Protocol> {
        offered.split(',').map(str::trim).find_map(|p| match p {
            "graphql-transport-ws" => Some(Protocol::TransportWs),
            "graphql-ws" => Some(Protocol::Legacy),
            _ => None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::TransportWs => "graphql-transport-ws",
            Protocol::Legacy => "graphql-ws",
        }
    }
}

/// A client message.
#[derive(Debug)]
pub enum Incoming {
    /// `connection_init` with its payload (`{}` when none).
    Init(Json),
    /// `subscribe` (legacy: `start`): an operation with its id.
    Subscribe {
        id: String,
        request: Box<async_graphql::Request>,
    },
    /// `complete` (legacy: `stop`).
    Complete(String),
    Ping(Option<Json>),
    Pong,
    /// Legacy `connection_terminate`.
    Terminate,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    payload: Option<Json>,
}

/// Parses one text frame; `Err` says what is wrong with it.
pub fn parse(protocol: Protocol, text: &str) -> Result<Incoming, String> {
    let raw: Raw = serde_json::from_str(text).map_err(|e| format!("invalid message: {e}"))?;
    let id = |raw: &Raw| -> Result<String, String> {
        match raw.id.as_deref() {
            Some(id) if !id.is_empty() => Ok(id.to_owned()),
            _ => Err(format!("{} needs an id", raw.kind)),
        }
    };
    let legacy = protocol == Protocol::Legacy;
    match raw.kind.as_str() {
        "connection_init" => match raw.payload {
            None | Some(Json::Null) => Ok(Incoming::Init(json!({}))),
            Some(p @ Json::Object(_)) => Ok(Incoming::Init(p)),
            Some(_) => Err("connection_init: the payload must be an object".into()),
        },
        "subscribe" if !legacy => subscribe(id(&raw)?, raw.payload),
        "start" if legacy => subscribe(id(&raw)?, raw.payload),
        "complete" if !legacy => Ok(Incoming::Complete(id(&raw)?)),
        "stop" if legacy => Ok(Incoming::Complete(id(&raw)?)),
        "ping" if !legacy => Ok(Incoming::Ping(raw.payload)),
        "pong" if !legacy => Ok(Incoming::Pong),
        "connection_terminate" if legacy => Ok(Incoming::Terminate),
        other => Err(format!("unknown message type {other:?}")),
    }
}

fn subscribe(id: String, payload: Option<Json>) -> Result<Incoming, String> {
    let payload = payload.ok_or("subscribe needs a payload")?;
    let request: async_graphql::Request =
        serde_json::from_value(payload).map_err(|e| format!("subscribe: invalid payload: {e}"))?;
    Ok(Incoming::Subscribe { id, request: Box::new(request) })
}

pub fn ack() -> String {
    json!({"type": "connection_ack"}).to_string()
}

/// Legacy: a refused `connection_init` (the transport protocol closes with 4403 instead).
pub fn connection_error(message: &str) -> String {
    json!({"type": "connection_error", "payload": {"message": message}}).to_string()
}

/// Legacy keep-alive.
pub const KEEP_ALIVE: &str = r#"{"type":"ka"}"#;
/// The server's ping (`graphql-transport-ws`); the client answers `pong`.
pub const PING: &str = r#"{"type":"ping"}"#;

pub fn pong(payload: Option<Json>) -> String {
    match payload {
        Some(p) => json!({"type": "pong", "payload": p}).to_string(),
        None => json!({"type": "pong"}).to_string(),
    }
}

/// One result of an operation.
pub fn next(protocol: Protocol, id: &str, response: &async_graphql::Response) -> String {
    let kind = if protocol == Protocol::Legacy { "data" } else { "next" };
    let payload = serde_json::to_value(response).unwrap_or(Json::Null);
    json!({"type": kind, "id": id, "payload": payload}).to_string()
}

/// One result of an operation whose payload is already JSON text.
pub fn next_payload(protocol: Protocol, id: &str, payload: &str) -> String {
    let kind = if protocol == Protocol::Legacy { "data" } else { "next" };
    let mut out = String::with_capacity(payload.len() + id.len() + 40);
    out.push_str("{\"type\":\"");
    out.push_str(kind);
    out.push_str("\",\"id\":");
    out.push_str(&Json::from(id).to_string());
    out.push_str(",\"payload\":");
    out.push_str(payload);
    out.push('}');
    out
}

/// An operation that failed before it could run (it does not complete after this).
pub fn error(protocol: Protocol, id: &str, errors: &[async_graphql::ServerError]) -> String {
    let errors = serde_json::to_value(errors).unwrap_or(Json::Null);
    let payload = if protocol == Protocol::Legacy { json!({"errors": errors}) } else { errors };
    json!({"type": "error", "id": id, "payload": payload}).to_string()
}

pub fn complete(id: &str) -> String {
    json!({"type": "complete", "id": id}).to_string()
}

/// The token a `connection_init` payload carries: `Authorization: Bearer …` (any case of the
/// key, also under `headers`), `apikey`, or `access_token`.
pub fn init_token(payload: &Json) -> Option<String> {
    let find = |map: &serde_json::Map<String, Json>| -> Option<String> {
        for (k, v) in map {
            let Some(v) = v.as_str() else { continue };
            match k.to_ascii_lowercase().as_str() {
                "authorization" => {
                    let token = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v);
                    return Some(token.trim().to_owned());
                }
                "apikey" | "access_token" | "accesstoken" => return Some(v.trim().to_owned()),
                _ => {}
            }
        }
        None
    };
    let map = payload.as_object()?;
    find(map).or_else(|| map.get("headers").and_then(Json::as_object).and_then(find))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_both_protocols() {
        let t = Protocol::TransportWs;
        assert!(matches!(parse(t, r#"{"type":"connection_init"}"#), Ok(Incoming::Init(_))));
        let sub = r#"{"type":"subscribe","id":"1","payload":{"query":"subscription { x }"}}"#;
        assert!(matches!(parse(t, sub), Ok(Incoming::Subscribe { id, .. }) if id == "1"));
        assert!(
            matches!(parse(t, r#"{"type":"complete","id":"1"}"#), Ok(Incoming::Complete(id)) if id == "1")
        );
        // Legacy names are not the transport protocol's, and the other way round.
        assert!(parse(t, r#"{"type":"start","id":"1","payload":{"query":"{x}"}}"#).is_err());
        let l = Protocol::Legacy;
        assert!(matches!(
            parse(l, r#"{"type":"start","id":"1","payload":{"query":"{x}"}}"#),
            Ok(Incoming::Subscribe { .. })
        ));
        assert!(matches!(parse(l, r#"{"type":"stop","id":"1"}"#), Ok(Incoming::Complete(_))));
        assert!(parse(l, r#"{"type":"ping"}"#).is_err());
        assert_eq!(Protocol::choose("foo, graphql-ws"), Some(Protocol::Legacy));
        assert_eq!(Protocol::choose("graphql-transport-ws"), Some(Protocol::TransportWs));
        assert_eq!(Protocol::choose("soap"), None);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [
            "",
            "null",
            "[]",
            "{",
            r#"{"type":1}"#,
            r#"{"type":"subscribe"}"#,
            r#"{"type":"subscribe","id":"1"}"#,
            r#"{"type":"subscribe","id":"","payload":{"query":"{x}"}}"#,
            r#"{"type":"subscribe","id":"1","payload":{"query":7}}"#,
            r#"{"type":"connection_init","payload":"token"}"#,
            r#"{"type":"complete"}"#,
            "\u{0}\u{ffff}",
        ] {
            for p in [Protocol::TransportWs, Protocol::Legacy] {
                assert!(parse(p, bad).is_err(), "{bad:?}");
            }
        }
    }

    #[test]
    fn tokens_from_init_payloads() {
        assert_eq!(init_token(&json!({"Authorization": "Bearer abc"})).as_deref(), Some("abc"));
        assert_eq!(init_token(&json!({"authorization": "abc"})).as_deref(), Some("abc"));
        assert_eq!(init_token(&json!({"apikey": "k"})).as_deref(), Some("k"));
        assert_eq!(init_token(&json!({"headers": {"Authorization": "Bearer h"}})).as_deref(), Some("h"));
        assert_eq!(init_token(&json!({})), None);
        assert_eq!(init_token(&json!({"Authorization": 5})), None);
    }
}
