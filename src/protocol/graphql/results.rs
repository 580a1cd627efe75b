//! A subscription message's GraphQL result, made once per (message, operation) and shared: every
//! subscriber that received the same message from the core (the core shares one message among
//! subscribers with the same view) for the same operation (document, operation name, variables)
//! gets the same result, so only the first executes the selection; the others copy its bytes.
//!
//! Owns: `Operation` (what makes two subscriptions' results equal), `Results` (the shared cache,
//! bounded), `render` (one message through the schema). Must not: touch the socket.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;

use crate::protocol::graphql::feed::{message_json, FeedKind, Feeds, OneMessage};
use crate::realtime::outbox::Named;

/// Entries kept at most; past it the cache starts again (a message's subscribers take their
/// results within moments of each other).
const MAX_ENTRIES: usize = 8192;

/// What a subscription's results depend on besides the message.
#[derive(Debug, Clone)]
pub struct Operation {
    pub query: String,
    pub operation_name: Option<String>,
    pub variables: async_graphql::Variables,
    key: u64,
}

impl Operation {
    pub fn of(request: &async_graphql::Request) -> Operation {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        request.query.hash(&mut h);
        request.operation_name.hash(&mut h);
        serde_json::to_string(&request.variables).unwrap_or_default().hash(&mut h);
        Operation {
            query: request.query.clone(),
            operation_name: request.operation_name.clone(),
            variables: request.variables.clone(),
            key: h.finish(),
        }
    }

    fn request(&self) -> async_graphql::Request {
        let mut r = async_graphql::Request::new(self.query.clone()).variables(self.variables.clone());
        r.operation_name.clone_from(&self.operation_name);
        r
    }
}

/// A result, with the message it was made of.
type Made = (Arc<Named>, Arc<str>);

/// Results by (message, operation); each entry keeps its message alive, so that its address is
/// not reused by another while the entry lasts.
#[derive(Default)]
pub struct Results {
    map: Mutex<HashMap<(usize, u64), Made>>,
}

impl Results {
    /// The result of `message` for `op`, made now unless another subscriber made it.
    pub async fn get(
        &self,
        schema: &async_graphql::dynamic::Schema,
        op: &Operation,
        kind: FeedKind,
        message: &Arc<Named>,
    ) -> Arc<str> {
        let key = (Arc::as_ptr(message) as usize, op.key);
        if let Some((_, made)) = crate::locks::lock(&self.map).get(&key) {
            return Arc::clone(made);
        }
        let made = render(schema, op, kind, message).await;
        let mut map = crate::locks::lock(&self.map);
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(key, (Arc::clone(message), Arc::clone(&made)));
        made
    }
}

/// One message through the schema: the operation executed with a feed of that message alone.
pub async fn render(
    schema: &async_graphql::dynamic::Schema,
    op: &Operation,
    kind: FeedKind,
    message: &Named,
) -> Arc<str> {
    let feeds: Arc<dyn Feeds> = Arc::new(OneMessage(message_json(kind, message)));
    let mut results = schema.execute_stream(op.request().data(feeds));
    let response = results.next().await.unwrap_or_default();
    Arc::from(serde_json::to_string(&response).unwrap_or_else(|_| "{}".into()))
}
