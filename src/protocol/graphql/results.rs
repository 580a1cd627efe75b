//! A subscription message's GraphQL result, made once per (message, operation) and shared: every
//! subscriber that received the same message from the core (the core shares one message among
//! subscribers with the same view) for the same operation (document, operation name, variables)
//! on the same build of the schema gets the same result, so only the first executes the
//! selection; the others copy its bytes.
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

/// What a subscription's results depend on besides the message: the schema it runs on (which
/// build of it) and the operation (document, operation name, variables).
#[derive(Debug, Clone)]
pub struct Operation {
    pub query: String,
    pub operation_name: Option<String>,
    pub variables: async_graphql::Variables,
    /// All of the above in one text: two operations share results only when theirs are equal
    /// (the hash in `key` only finds the entry).
    identity: Arc<str>,
    key: u64,
}

impl Operation {
    /// `request` on the schema's `generation`-th build.
    pub fn of(request: &async_graphql::Request, generation: u64) -> Operation {
        let variables = serde_json::to_string(&request.variables).unwrap_or_default();
        let identity =
            serde_json::json!([generation, request.query, request.operation_name, variables]).to_string();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        identity.hash(&mut h);
        Operation {
            query: request.query.clone(),
            operation_name: request.operation_name.clone(),
            variables: request.variables.clone(),
            identity: Arc::from(identity),
            key: h.finish(),
        }
    }

    fn request(&self) -> async_graphql::Request {
        let mut r = async_graphql::Request::new(self.query.clone()).variables(self.variables.clone());
        r.operation_name.clone_from(&self.operation_name);
        r
    }
}

/// A result, with the message and the operation it was made of.
struct Made {
    message: Arc<Named>,
    identity: Arc<str>,
    result: Arc<str>,
}

/// Results by (message, operation); each entry keeps its message alive, so that its address is
/// not reused by another while the entry lasts.
#[derive(Default)]
pub struct Results {
    map: Mutex<HashMap<(usize, u64), Made>>,
}

impl Results {
    /// The result of `message` for `op`, made now unless another subscriber of an equal
    /// operation made it. Two operations whose hashes collide each make their own.
    pub async fn get(
        &self,
        schema: &async_graphql::dynamic::Schema,
        op: &Operation,
        kind: FeedKind,
        message: &Arc<Named>,
    ) -> Arc<str> {
        let key = (Arc::as_ptr(message) as usize, op.key);
        if let Some(made) = crate::locks::lock(&self.map).get(&key) {
            if made.identity == op.identity && Arc::ptr_eq(&made.message, message) {
                return Arc::clone(&made.result);
            }
        }
        let result = render(schema, op, kind, message).await;
        let mut map = crate::locks::lock(&self.map);
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        // On a collision the entry that was there first stays.
        if map.get(&key).is_none_or(|made| made.identity == op.identity) {
            let made = Made {
                message: Arc::clone(message),
                identity: Arc::clone(&op.identity),
                result: Arc::clone(&result),
            };
            map.insert(key, made);
        }
        result
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::graphql::schema::Schemas;
    use crate::subscribe::{PublishedColumn, PublishedTable, Tables};

    fn todos(columns: &[&str]) -> Arc<Tables> {
        let columns = columns
            .iter()
            .map(|name| PublishedColumn {
                name: (*name).into(),
                compare_type: if *name == "id" { "int8" } else { "text" }.into(),
                in_identity: *name == "id",
                in_primary_key: *name == "id",
            })
            .collect();
        let mut tables = Tables::new();
        tables.insert(("public".into(), "todos".into()), PublishedTable { columns, full_identity: false });
        Arc::new(tables)
    }

    fn insert() -> Arc<Named> {
        let data = r#"{"type":"INSERT","schema":"public","table":"todos","commit_timestamp":"2026-12-06T00:00:00Z","record":{"id":1,"title":"a","note":"n"},"old_record":null}"#;
        Arc::new(Named { id: None, name: "postgres_changes".into(), data: data.into() })
    }

    fn op(query: &str, generation: u64) -> Operation {
        Operation::of(&async_graphql::Request::new(query), generation)
    }

    #[tokio::test]
    async fn equal_operations_on_one_build_share_a_result_and_no_other_operation_gets_it() {
        let schemas = Schemas::default();
        let results = Results::default();
        let first = schemas.get(&todos(&["id", "title"])).expect("schema");
        let same = schemas.get(&todos(&["id", "title"])).expect("schema");
        let changed = schemas.get(&todos(&["id", "title", "note"])).expect("schema");
        assert_eq!(first.generation, same.generation, "the same catalog is the same build");
        assert_ne!(first.generation, changed.generation, "a new catalog is a new build");

        let message = insert();
        let query = "subscription { todos_changes { record { id title } } }";
        let a = results.get(&first.schema, &op(query, first.generation), FeedKind::Changes, &message).await;
        assert_eq!(&*a, r#"{"data":{"todos_changes":{"record":{"id":1,"title":"a"}}}}"#);
        let b = results.get(&same.schema, &op(query, same.generation), FeedKind::Changes, &message).await;
        assert!(Arc::ptr_eq(&a, &b), "an equal operation takes the result made first");

        let c =
            results.get(&changed.schema, &op(query, changed.generation), FeedKind::Changes, &message).await;
        assert!(!Arc::ptr_eq(&a, &c), "another build of the schema makes its own");

        // An operation whose hash collides with the first's: its own selection, not the first's.
        let narrow = "subscription { todos_changes { record { id } } }";
        let mut colliding = op(narrow, first.generation);
        colliding.key = op(query, first.generation).key;
        let d = results.get(&first.schema, &colliding, FeedKind::Changes, &message).await;
        assert!(!d.contains("title"), "{d}");
        assert_eq!(
            *d,
            *render(&first.schema, &op(narrow, first.generation), FeedKind::Changes, &message).await
        );
        let e = results.get(&first.schema, &op(query, first.generation), FeedKind::Changes, &message).await;
        assert!(Arc::ptr_eq(&a, &e), "the entry made first stays");
    }
}
