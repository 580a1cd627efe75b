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
use crate::realtime::outbox::{Direct, Encoder, EncodingId, Event, Frame, Named, OutboxReceiver};
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
    /// A live query's initial order, in the order grammar (`col.desc,other.asc`).
    pub order: Option<String>,
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
    fn protocol(&self) -> &'static str {
        "graphql"
    }

    fn is_connection(&self) -> bool {
        false
    }

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

impl CoreFeeds {
    /// Joins a session for `request`; its messages as they come.
    pub async fn open_raw(&self, request: FeedRequest) -> async_graphql::Result<RawFeed> {
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
            crate::subscribe::make_live(
                &mut bindings,
                r.limit.map(|l| json!(l)),
                r.order.clone().map(Json::String),
            );
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
        Ok(raw_feed(session, outbox, r.kind))
    }
}

impl Feeds for CoreFeeds {
    fn open(&self, request: FeedRequest) -> BoxFuture<'_, async_graphql::Result<Feed>> {
        Box::pin(async move {
            use futures_util::StreamExt;
            let kind = request.kind;
            let raw = self.open_raw(request).await?;
            Ok(Box::pin(raw.map(move |m| m.map(|m| message_json(kind, &m)))) as Feed)
        })
    }
}

/// A subscription's messages as the core queued them (shared by every subscriber that received
/// the same one, so that what is made of one can be reused), in order; an error ends it.
pub type RawFeed = BoxStream<'static, async_graphql::Result<Arc<Named>>>;

/// The JSON a subscription's resolvers read for `message` (a message of a feed of `kind`).
pub fn message_json(kind: FeedKind, message: &Named) -> Json {
    let mut data: Json = serde_json::from_str(message.data.as_str()).unwrap_or(Json::Null);
    if kind == FeedKind::Live {
        let upper = data["kind"].as_str().unwrap_or("").to_ascii_uppercase();
        data["kind"] = json!(upper);
    }
    data
}

/// The stream of a joined session's messages for a subscription of `kind`: changes (or a live
/// query's rows, `READY` and its enter / update / leave); a gap, an error, or a client too slow
/// ends it with an error.
fn raw_feed(session: Session, outbox: OutboxReceiver, kind: FeedKind) -> RawFeed {
    let killed = Box::pin(outbox.killed.clone().cancelled_owned());
    let state = Some(Box::new(Following {
        session,
        outbox,
        killed,
        expiry: Box::pin(tokio::time::sleep_until(far())),
        armed: None,
    }));
    Box::pin(futures_util::stream::unfold(state, move |state| async move {
        let mut f = state?;
        loop {
            // The token's expiry, re-armed only when it changes (not a timer per message).
            let expiry = f.session.next_expiry().map(tokio::time::Instant::from_std);
            if expiry != f.armed {
                f.armed = expiry;
                f.expiry.as_mut().reset(expiry.unwrap_or_else(far));
            }
            let frame = tokio::select! {
                biased;
                _ = &mut f.killed => {
                    let e = async_graphql::Error::new("client too slow: the subscription fell behind");
                    return Some((Err(e), None));
                }
                frame = f.outbox.recv() => {
                    f.outbox.written();
                    frame?
                }
                _ = &mut f.expiry, if f.armed.is_some() => {
                    f.session.expire(std::time::Instant::now());
                    continue;
                }
            };
            let Frame::Named(m) = frame else { continue };
            match (kind, &*m.name) {
                (_, "error" | "gap") => {
                    let data: Json = serde_json::from_str(m.data.as_str()).unwrap_or(Json::Null);
                    let message = data["message"].as_str().unwrap_or("the subscription ended").to_owned();
                    return Some((Err(async_graphql::Error::new(message)), None));
                }
                (FeedKind::Live, "snapshot-end") => {
                    let data: Json = serde_json::from_str(m.data.as_str()).unwrap_or(Json::Null);
                    let ready = json!({"kind": "ready", "cursor": data["cursor"]}).to_string();
                    let ready = Arc::new(Named { id: None, name: "ready".into(), data: ready.into() });
                    return Some((Ok(ready), Some(f)));
                }
                (FeedKind::Live, "snapshot" | "enter" | "update" | "leave")
                | (FeedKind::Changes, "insert" | "update" | "delete") => {
                    return Some((Ok(m), Some(f)));
                }
                _ => continue,
            }
        }
    }))
}

/// A subscription's session as its feed follows it.
struct Following {
    session: Session,
    outbox: OutboxReceiver,
    /// The core gave up on this subscriber (too slow).
    killed: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    expiry: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: Option<tokio::time::Instant>,
}

/// Feeds that open the core's session and keep its raw messages in `slot` (the connection
/// renders them), handing the resolver nothing.
pub struct Capture {
    pub core: CoreFeeds,
    pub slot: Arc<std::sync::Mutex<Option<(RawFeed, FeedKind)>>>,
}

impl Feeds for Capture {
    fn open(&self, request: FeedRequest) -> BoxFuture<'_, async_graphql::Result<Feed>> {
        Box::pin(async move {
            let kind = request.kind;
            let raw = self.core.open_raw(request).await?;
            *crate::locks::lock(&self.slot) = Some((raw, kind));
            Ok(Box::pin(futures_util::stream::empty()) as Feed)
        })
    }
}

/// Feeds that hand the resolver one message's JSON (rendering one message of a subscription).
pub struct OneMessage(pub Json);

impl Feeds for OneMessage {
    fn open(&self, _request: FeedRequest) -> BoxFuture<'_, async_graphql::Result<Feed>> {
        let item = self.0.clone();
        Box::pin(async move { Ok(Box::pin(futures_util::stream::once(async move { Ok(item) })) as Feed) })
    }
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600)
}
