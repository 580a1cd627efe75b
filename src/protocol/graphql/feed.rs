//! Where a GraphQL subscription's messages come from: each subscription is one session of the
//! core with one channel (its table's changes, or a live query), authorized with the
//! connection's credentials exactly as every other transport's; its queued messages become the
//! JSON values the schema's resolvers read.
//!
//! Owns: `Feeds` (the seam the schema's resolvers call), `CoreFeeds`, the GraphQL encoder.
//! Must not: touch the socket (the connection writes what the subscriptions yield).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use serde_json::{json, Value as Json};

use crate::auth::Credentials;
use crate::protocol::sse::SseEncoder;
use crate::realtime::hub::Hub;
use crate::realtime::outbox::{Direct, Encoder, EncodingId, Event, Frame, OutboxReceiver};
use crate::realtime::session::{JoinRequest, Session};

/// Which messages a subscription wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedKind {
    /// Each change.
    Changes,
    /// A live query: its rows, `READY`, then enter / update / leave.
    Live,
}

/// What a subscription field asked for.
#[derive(Debug, Clone)]
pub struct FeedRequest {
    pub schema: String,
    pub table: String,
    /// The filter grammar of every transport.
    pub filter: Option<String>,
    /// A comma list of insert, update, delete.
    pub events: Option<String>,
    /// A comma list of the columns to render (the primary key is always kept).
    pub select: Option<String>,
    /// Resume after this cursor (or from this commit time).
    pub since: Option<String>,
    /// A live query's most rows.
    pub limit: Option<u64>,
    pub kind: FeedKind,
}

/// A subscription's messages, each the JSON its resolvers read; an error ends it.
pub type Feed = BoxStream<'static, async_graphql::Result<Json>>;

/// Opens subscriptions for one connection.
pub trait Feeds: Send + Sync {
    fn open(&self, request: FeedRequest) -> BoxFuture<'_, async_graphql::Result<Feed>>;
}

/// The core's sessions as feeds, with one connection's credentials.
pub struct CoreFeeds {
    pub hub: Hub,
    pub credentials: Option<Credentials>,
}

/// The encoder of GraphQL subscriptions' sessions: named messages, as event streams have them
/// (the resolvers read their JSON).
#[derive(Debug, Clone, Copy, Default)]
pub struct GraphqlEncoder;

impl Encoder for GraphqlEncoder {
    fn id(&self) -> EncodingId {
        crate::protocol::encoding::GRAPHQL
    }

    fn encode(&self, topic: &str, event: &Event<'_>) -> Option<Frame> {
        SseEncoder.encode(topic, event)
    }

    fn encode_direct(&self, topic: &str, address: Option<&str>, message: &Direct<'_>) -> Frame {
        SseEncoder.encode_direct(topic, address, message)
    }

    fn carries_live(&self) -> bool {
        true
    }
}

impl Feeds for CoreFeeds {
    fn open(&self, request: FeedRequest) -> BoxFuture<'_, async_graphql::Result<Feed>> {
        Box::pin(async move {
            let r = &request;
            let mut bindings = crate::subscribe::table_bindings(
                &r.schema,
                &r.table,
                r.filter.as_deref(),
                r.events.as_deref(),
                r.select.as_deref(),
            )
            .map_err(async_graphql::Error::new)?;
            if r.kind == FeedKind::Live {
                for b in &mut bindings {
                    b["live"] = json!(true);
                    if let Some(limit) = r.limit {
                        b["limit"] = json!(limit);
                    }
                }
            }
            let (mut session, outbox) =
                Session::new(self.hub.clone(), Arc::new(GraphqlEncoder), self.credentials.clone());
            let topic = format!("graphql:{}.{}", r.schema, r.table);
            let join = JoinRequest { topic, bindings, since: r.since.clone(), ..JoinRequest::default() };
            let joined = session.join(join).await.map_err(|e| async_graphql::Error::new(e.to_string()))?;
            if let Some(Err(errors)) = &joined.changes {
                let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                return Err(async_graphql::Error::new(message));
            }
            if let Some(handoff) = joined.handoff {
                handoff.start();
            }
            Ok(feed(session, outbox, r.kind))
        })
    }
}

/// The stream of a joined session's messages.
fn feed(session: Session, outbox: OutboxReceiver, kind: FeedKind) -> Feed {
    let state = Some((session, outbox));
    Box::pin(futures_util::stream::unfold(state, move |state| async move {
        let (mut session, mut outbox) = state?;
        loop {
            let expiry = session.next_expiry().map(tokio::time::Instant::from_std);
            let frame = tokio::select! {
                biased;
                _ = outbox.killed.cancelled() => {
                    let e = async_graphql::Error::new("client too slow: the subscription fell behind");
                    return Some((Err(e), None));
                }
                frame = outbox.rx.recv() => frame?,
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(far)), if expiry.is_some() => {
                    session.expire(std::time::Instant::now());
                    continue;
                }
            };
            let Frame::Named(m) = frame else { continue };
            let data: Json = serde_json::from_str(m.data.as_str()).unwrap_or(Json::Null);
            match (kind, &*m.name) {
                (_, "error" | "gap") => {
                    let message = data["message"].as_str().unwrap_or("the subscription ended").to_owned();
                    return Some((Err(async_graphql::Error::new(message)), None));
                }
                (FeedKind::Live, "snapshot-end") => {
                    let ready = json!({"kind": "READY", "cursor": data["cursor"]});
                    return Some((Ok(ready), Some((session, outbox))));
                }
                (FeedKind::Live, "snapshot" | "enter" | "update" | "leave") => {
                    let mut data = data;
                    let kind = data["kind"].as_str().unwrap_or("").to_ascii_uppercase();
                    data["kind"] = json!(kind);
                    return Some((Ok(data), Some((session, outbox))));
                }
                (FeedKind::Changes, "insert" | "update" | "delete") => {
                    return Some((Ok(data), Some((session, outbox))));
                }
                _ => continue,
            }
        }
    }))
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600)
}
