//! The GraphQL schema, built from the publication's catalog: for each published table a typed
//! object (columns → GraphQL scalars), and the subscriptions `<table>_changes` (typed) and
//! `<table>_live` (a live query), a generic `changes`, and the query `_health`.
//!
//! Names: a table in `public` is `<table>`, in another schema `<schema>_<table>`; a character
//! that GraphQL does not allow in a name becomes `_`, a name that starts with a digit or `__`
//! gets a `_` in front, and names that then clash are numbered (`_2`, `_3`, …) in the order of
//! (schema, table) — the same catalog always gives the same schema.
//!
//! Owns: names, the type mapping and the resolvers that read a message's JSON. Must not: reach
//! the core (subscriptions ask a [`Feeds`] for their messages).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_graphql::dynamic::{
    Enum, Field, FieldFuture, FieldValue, InputObject, InputValue, Object, ResolverContext, Scalar, Schema,
    SchemaError, Subscription, SubscriptionField, SubscriptionFieldFuture, TypeRef,
};
use futures_util::StreamExt;
use serde_json::Value as Json;

use crate::protocol::graphql::feed::{FeedKind, FeedRequest, Feeds};
use crate::protocol::graphql::where_filter;
use crate::subscribe::{PublishedTable, Tables};

/// A JSON value as it is (json, jsonb, and anything without a closer GraphQL type).
const JSON: &str = "JSON";
/// A 64-bit integer, sent as a JSON number (GraphQL's `Int` has 32 bits).
const BIG_INT: &str = "BigInt";
/// An arbitrary-precision number, sent as a JSON number as Postgres prints it.
const NUMERIC: &str = "Numeric";

/// One published table as the schema names it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableName {
    pub schema: String,
    pub table: String,
    /// Its object type and the base of its fields' names.
    pub name: String,
    /// (GraphQL field, column) in column order.
    pub fields: Vec<(String, String, String)>,
}

/// A GraphQL name for `raw`: invalid characters become `_`; a leading digit or `__` gets `_`.
pub fn graphql_name(raw: &str) -> String {
    let mut out: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) || out.starts_with("__") {
        out.insert(0, '_');
    }
    out
}

/// Names every published table (and its columns), deterministically.
pub fn name_tables(tables: &Tables) -> Vec<TableName> {
    let sorted: BTreeMap<&(String, String), &PublishedTable> = tables.iter().collect();
    // Names the schema uses itself.
    let mut taken: HashSet<String> =
        ["Query", "Subscription", "Change", "LiveEvent", "LiveKind", "ChangeEvent"]
            .into_iter()
            .chain([JSON, BIG_INT, NUMERIC, "changes", "_health"])
            .map(str::to_owned)
            .collect();
    let mut out = Vec::new();
    for ((schema, table), published) in sorted {
        let base =
            if schema == "public" { graphql_name(table) } else { graphql_name(&format!("{schema}_{table}")) };
        let name = unique(&mut taken, &base, &["", "_changes", "_live", "_Change", "_Live"]);
        let mut columns: HashSet<String> = HashSet::new();
        let fields = published
            .columns
            .iter()
            .map(|c| {
                let field = unique(&mut columns, &graphql_name(&c.name), &[""]);
                (field, c.name.to_string(), c.compare_type.to_string())
            })
            .collect();
        out.push(TableName { schema: schema.clone(), table: table.clone(), name, fields });
    }
    out
}

/// `base`, or `base_2`, `base_3`, … : the first whose names with every suffix are free; takes them.
fn unique(taken: &mut HashSet<String>, base: &str, suffixes: &[&str]) -> String {
    let mut n = 1;
    loop {
        let candidate = if n == 1 { base.to_owned() } else { format!("{base}_{n}") };
        if suffixes.iter().all(|s| !taken.contains(&format!("{candidate}{s}"))) {
            for s in suffixes {
                taken.insert(format!("{candidate}{s}"));
            }
            return candidate;
        }
        n += 1;
    }
}

/// The GraphQL type of a column of Postgres type `ty` (a domain's base type; `_x` is an array).
fn scalar_of(ty: &str) -> TypeRef {
    if let Some(element) = ty.strip_prefix('_') {
        return TypeRef::named_list(scalar_name(element));
    }
    TypeRef::named(scalar_name(ty))
}

fn scalar_name(ty: &str) -> &'static str {
    match ty {
        "bool" => TypeRef::BOOLEAN,
        "int2" | "int4" => TypeRef::INT,
        "int8" => BIG_INT,
        "float4" | "float8" => TypeRef::FLOAT,
        "numeric" => NUMERIC,
        "json" | "jsonb" => JSON,
        _ => TypeRef::STRING,
    }
}

/// The scalars a `where` compares, each with its `<scalar>_comparison_exp` input.
const COMPARABLE: [&str; 7] =
    [TypeRef::STRING, TypeRef::INT, BIG_INT, TypeRef::FLOAT, TypeRef::BOOLEAN, NUMERIC, JSON];

/// `{_eq, _neq, _gt, _gte, _lt, _lte, _in, _like, _ilike, _is_null}` for one scalar.
fn comparison(scalar: &str) -> InputObject {
    let mut input = InputObject::new(format!("{scalar}_comparison_exp"))
        .description(format!("Conditions on a {scalar} column (the filter grammar's operators)"));
    for op in ["_eq", "_neq", "_gt", "_gte", "_lt", "_lte"] {
        input = input.field(InputValue::new(op, TypeRef::named(scalar)));
    }
    input
        .field(InputValue::new("_in", TypeRef::named_nn_list(scalar)))
        .field(InputValue::new("_like", TypeRef::named(TypeRef::STRING)))
        .field(InputValue::new("_ilike", TypeRef::named(TypeRef::STRING)))
        .field(InputValue::new("_is_null", TypeRef::named(TypeRef::BOOLEAN)))
}

/// `<table>_bool_exp`: a condition on each (non-array) column, `_and`, `_or`, `_not`.
fn bool_exp(t: &TableName) -> InputObject {
    let name = format!("{}_bool_exp", t.name);
    let mut input = InputObject::new(&name)
        .description(format!("A condition on rows of {}.{}", t.schema, t.table))
        .field(InputValue::new("_and", TypeRef::named_nn_list(&name)))
        .field(InputValue::new("_or", TypeRef::named_nn_list(&name)))
        .field(InputValue::new("_not", TypeRef::named(&name)));
    for (field, _, ty) in &t.fields {
        if !ty.starts_with('_') {
            input = input
                .field(InputValue::new(field, TypeRef::named(format!("{}_comparison_exp", scalar_name(ty)))));
        }
    }
    input
}

/// How a live query orders its initial result by one column, as Hasura's `order_by` spells it.
const ORDER_BY: [(&str, &str); 6] = [
    ("asc", "asc"),
    ("asc_nulls_first", "asc.nullsfirst"),
    ("asc_nulls_last", "asc.nullslast"),
    ("desc", "desc"),
    ("desc_nulls_first", "desc.nullsfirst"),
    ("desc_nulls_last", "desc.nullslast"),
];

/// `<table>_order_by`: a column to order by, and how (`json` columns have no order).
fn order_by(t: &TableName) -> InputObject {
    let mut input = InputObject::new(format!("{}_order_by", t.name))
        .description(format!("An order of rows of {}.{}: one column per object", t.schema, t.table));
    for (field, _, ty) in &t.fields {
        if ty != "json" {
            input = input.field(InputValue::new(field, TypeRef::named("order_by")));
        }
    }
    input
}

/// A live query's `orderBy` as the order grammar of every transport (`col.desc,other.asc`).
fn order_of(ctx: &ResolverContext<'_>, fields: &[(String, String)]) -> async_graphql::Result<Option<String>> {
    let Some(list) = ctx.args.get("orderBy").filter(|v| !v.is_null()) else { return Ok(None) };
    let mut keys = Vec::new();
    for item in list.list()?.iter() {
        for (field, how) in item.object()?.iter() {
            let Some((_, column)) = fields.iter().find(|(f, _)| f == field.as_str()) else { continue };
            if column.contains(',') {
                return Err(async_graphql::Error::new(format!("orderBy: cannot order by {field}")));
            }
            let how = how.enum_name()?;
            let (_, grammar) = ORDER_BY.iter().find(|(name, _)| *name == how).copied().unwrap_or(("", "asc"));
            keys.push(format!("{column}.{grammar}"));
        }
    }
    Ok((!keys.is_empty()).then(|| keys.join(",")))
}

/// A JSON value as a GraphQL value.
fn value_of(v: &Json) -> async_graphql::Value {
    async_graphql::Value::from_json(v.clone()).unwrap_or(async_graphql::Value::Null)
}

/// A field of an object whose parent is a JSON object: its `key`, as a plain value.
fn json_field(name: &str, key: &'static str, ty: TypeRef) -> Field {
    Field::new(name, ty, move |ctx: ResolverContext<'_>| {
        FieldFuture::new(async move {
            let parent = ctx.parent_value.try_downcast_ref::<Json>()?;
            Ok(parent.get(key).filter(|v| !v.is_null()).map(|v| FieldValue::value(value_of(v))))
        })
    })
}

/// A field whose value is the parent's `key`, as an object of type `ty` (a row).
fn row_field(name: &str, key: &'static str, ty: &str) -> Field {
    Field::new(name, TypeRef::named(ty), move |ctx: ResolverContext<'_>| {
        FieldFuture::new(async move {
            let parent = ctx.parent_value.try_downcast_ref::<Json>()?;
            Ok(parent.get(key).filter(|v| v.is_object()).map(|v| FieldValue::owned_any(v.clone())))
        })
    })
}

/// The object type of a table's rows: one field per column, read from the record's JSON.
fn row_object(t: &TableName) -> Object {
    let mut object = Object::new(&t.name).description(format!("A row of {}.{}", t.schema, t.table));
    for (field, column, ty) in &t.fields {
        let column = column.clone();
        object = object.field(Field::new(field, scalar_of(ty), move |ctx: ResolverContext<'_>| {
            let column = column.clone();
            FieldFuture::new(async move {
                let row = ctx.parent_value.try_downcast_ref::<Json>()?;
                Ok(row.get(&column).filter(|v| !v.is_null()).map(|v| FieldValue::value(value_of(v))))
            })
        }));
    }
    object
}

/// A change's fields shared by the typed and the generic change types.
fn change_fields(object: Object) -> Object {
    object
        .field(json_field("type", "type", TypeRef::named_nn(TypeRef::STRING)))
        .field(json_field("schema", "schema", TypeRef::named_nn(TypeRef::STRING)))
        .field(json_field("table", "table", TypeRef::named_nn(TypeRef::STRING)))
        .field(json_field("cursor", "cursor", TypeRef::named(TypeRef::STRING)))
        .field(json_field("commitTimestamp", "commit_timestamp", TypeRef::named_nn(TypeRef::STRING)))
}

/// The arguments every change subscription takes.
fn change_args(field: SubscriptionField) -> SubscriptionField {
    field
        .argument(InputValue::new("filter", TypeRef::named(TypeRef::STRING)))
        .argument(InputValue::new("events", TypeRef::named_nn_list("ChangeEvent")))
        .argument(InputValue::new("since", TypeRef::named(TypeRef::STRING)))
}

/// A typed subscription's table: (schema, table) and its (field, column) pairs.
type Target = (String, String, Arc<Vec<(String, String)>>);

/// The filter of a subscription: its `filter` (the grammar) and its `where`, both holding.
fn filter_of(
    ctx: &ResolverContext<'_>,
    fields: &[(String, String)],
) -> async_graphql::Result<Option<String>> {
    let text = match ctx.args.get("filter") {
        Some(v) if !v.is_null() => Some(v.string()?.to_owned()),
        _ => None,
    };
    let where_ = match ctx.args.get("where") {
        Some(v) if !v.is_null() => {
            let json = v.as_value().clone().into_json()?;
            let column = |field: &str| fields.iter().find(|(f, _)| f == field).map(|(_, c)| c.clone());
            where_filter::to_filter(&json, &column).map_err(async_graphql::Error::new)?
        }
        _ => None,
    };
    Ok(match (text, where_) {
        (Some(a), Some(b)) => Some(format!("{a},{b}")),
        (a, b) => a.or(b),
    })
}

/// The columns a typed subscription's selection reads under `record` and `oldRecord`: only
/// those are rendered and sent (with the primary key). `None` for the generic subscription, or
/// when a column's name cannot be listed.
fn selected_columns(ctx: &ResolverContext<'_>, fields: &[(String, String)]) -> Option<String> {
    if fields.is_empty() {
        return None;
    }
    let mut columns: Vec<&str> = Vec::new();
    for child in ctx.ctx.field().selection_set() {
        if !matches!(child.name(), "record" | "oldRecord") {
            continue;
        }
        for f in child.selection_set() {
            if let Some((_, column)) = fields.iter().find(|(field, _)| field == f.name()) {
                if !columns.contains(&column.as_str()) {
                    columns.push(column);
                }
            }
        }
    }
    if columns.iter().any(|c| c.contains(',')) {
        return None;
    }
    Some(columns.join(","))
}

/// What a subscription field's arguments ask for.
fn request_of(
    ctx: &ResolverContext<'_>,
    (schema, table, fields): &Target,
    kind: FeedKind,
) -> async_graphql::Result<FeedRequest> {
    let text = |name: &str| -> async_graphql::Result<Option<String>> {
        match ctx.args.get(name) {
            Some(v) if !v.is_null() => Ok(Some(v.string()?.to_owned())),
            _ => Ok(None),
        }
    };
    let events = match ctx.args.get("events") {
        Some(v) if !v.is_null() => {
            let list = v.list()?;
            let names: Vec<String> =
                list.iter().map(|e| e.enum_name().map(str::to_ascii_lowercase)).collect::<Result<_, _>>()?;
            Some(names.join(","))
        }
        _ => None,
    };
    let limit = match ctx.args.get("limit") {
        Some(v) if !v.is_null() => Some(v.u64()?),
        _ => None,
    };
    Ok(FeedRequest {
        schema: schema.to_owned(),
        table: table.to_owned(),
        order: order_of(ctx, fields)?,
        filter: filter_of(ctx, fields)?,
        select: selected_columns(ctx, fields),
        events,
        since: text("since")?,
        limit,
        kind,
    })
}

/// A subscription field that asks the connection's [`Feeds`] for its messages.
fn feed_field(name: &str, ty: TypeRef, target: Option<Target>, kind: FeedKind) -> SubscriptionField {
    SubscriptionField::new(name, ty, move |ctx| {
        let target = target.clone();
        SubscriptionFieldFuture::new(async move {
            let target = match target {
                Some(t) => t,
                None => {
                    let arg = ctx.args.try_get("table")?.string()?.to_owned();
                    let (schema, table) = match arg.split_once('.') {
                        Some((s, t)) if !s.is_empty() && !t.is_empty() => (s.to_owned(), t.to_owned()),
                        _ => (String::from("public"), arg),
                    };
                    (schema, table, Arc::default())
                }
            };
            let request = request_of(&ctx, &target, kind)?;
            let feeds = ctx.data::<Arc<dyn Feeds>>()?;
            let feed = feeds.open(request).await?;
            Ok(feed.map(|message| message.map(FieldValue::owned_any)))
        })
    })
}

/// The schema of `tables`, its subscriptions served by the [`Feeds`] in each request's data.
pub fn build(tables: &Tables) -> Result<Schema, SchemaError> {
    let named = name_tables(tables);
    let mut query =
        Object::new("Query").field(Field::new("_health", TypeRef::named_nn(TypeRef::STRING), |_| {
            FieldFuture::new(async { Ok(Some(FieldValue::value("ok"))) })
        }));
    query = query.description("Queries: `_health`, and the schema itself (introspection)");
    let mut subscription = Subscription::new("Subscription");
    let mut builder = Schema::build("Query", None, Some("Subscription"))
        .register(Scalar::new(JSON).description("A JSON value"))
        .register(Scalar::new(BIG_INT).description("A 64-bit integer"))
        .register(Scalar::new(NUMERIC).description("An arbitrary-precision number"))
        .register(Enum::new("ChangeEvent").items(["INSERT", "UPDATE", "DELETE"]))
        .register(Enum::new("LiveKind").items(["SNAPSHOT", "READY", "ENTER", "UPDATE", "LEAVE"]))
        .register(Enum::new("order_by").items(ORDER_BY.map(|(name, _)| name)));
    for scalar in COMPARABLE {
        builder = builder.register(comparison(scalar));
    }
    builder = builder.register(
        change_fields(Object::new("Change"))
            .field(json_field("record", "record", TypeRef::named(JSON)))
            .field(json_field("oldRecord", "old_record", TypeRef::named(JSON))),
    );
    subscription = subscription.field(
        change_args(feed_field("changes", TypeRef::named_nn("Change"), None, FeedKind::Changes))
            .argument(InputValue::new("table", TypeRef::named_nn(TypeRef::STRING))),
    );
    for t in &named {
        let change = format!("{}_Change", t.name);
        let live = format!("{}_Live", t.name);
        builder = builder.register(row_object(t)).register(
            change_fields(Object::new(&change))
                .field(row_field("record", "record", &t.name))
                .field(row_field("oldRecord", "old_record", &t.name)),
        );
        builder = builder.register(
            Object::new(&live)
                .field(json_field("kind", "kind", TypeRef::named_nn("LiveKind")))
                .field(json_field("cursor", "cursor", TypeRef::named(TypeRef::STRING)))
                .field(json_field("key", "key", TypeRef::named(JSON)))
                .field(row_field("record", "record", &t.name)),
        );
        builder = builder.register(bool_exp(t)).register(order_by(t));
        let fields = t.fields.iter().map(|(f, c, _)| (f.clone(), c.clone())).collect();
        let target = Some((t.schema.clone(), t.table.clone(), Arc::new(fields)));
        let where_ = || InputValue::new("where", TypeRef::named(format!("{}_bool_exp", t.name)));
        subscription = subscription
            .field(
                change_args(feed_field(
                    &format!("{}_changes", t.name),
                    TypeRef::named_nn(&change),
                    target.clone(),
                    FeedKind::Changes,
                ))
                .argument(where_()),
            )
            .field(
                feed_field(&format!("{}_live", t.name), TypeRef::named_nn(&live), target, FeedKind::Live)
                    .argument(InputValue::new("filter", TypeRef::named(TypeRef::STRING)))
                    .argument(where_())
                    .argument(InputValue::new(
                        "orderBy",
                        TypeRef::named_nn_list(format!("{}_order_by", t.name)),
                    ))
                    .argument(InputValue::new("limit", TypeRef::named(TypeRef::INT))),
            );
    }
    builder.register(query).register(subscription).finish()
}

/// The schema of the current catalog, built again only when the published tables change, and
/// the subscription results shared among subscribers.
#[derive(Default)]
pub struct Schemas {
    current: std::sync::Mutex<Option<(Arc<Tables>, Built)>>,
    /// Schemas built so far.
    builds: std::sync::atomic::AtomicU64,
    pub results: crate::protocol::graphql::results::Results,
}

/// A schema and which build it is (an operation's results on one build are not another's).
#[derive(Clone)]
pub struct Built {
    pub schema: Schema,
    pub generation: u64,
}

impl Schemas {
    /// The schema of `tables` (their columns and types, not the `Arc`, decide whether it is new).
    pub fn get(&self, tables: &Arc<Tables>) -> Result<Built, String> {
        let mut current = crate::locks::lock(&self.current);
        if let Some((built_for, built)) = current.as_ref() {
            if Arc::ptr_eq(built_for, tables) || **built_for == **tables {
                return Ok(built.clone());
            }
        }
        let schema = build(tables).map_err(|e| format!("building the GraphQL schema: {}", e.0))?;
        let generation = self.builds.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let built = Built { schema, generation };
        *current = Some((Arc::clone(tables), built.clone()));
        Ok(built)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscribe::PublishedColumn;

    fn table(columns: &[(&str, &str)]) -> PublishedTable {
        PublishedTable {
            columns: columns
                .iter()
                .map(|(n, t)| PublishedColumn {
                    name: (*n).into(),
                    compare_type: (*t).into(),
                    in_identity: *n == "id",
                    in_primary_key: *n == "id",
                })
                .collect(),
            full_identity: false,
        }
    }

    #[test]
    fn names_are_valid_unique_and_stable() {
        assert_eq!(graphql_name("my-table"), "my_table");
        assert_eq!(graphql_name("2fa"), "_2fa");
        assert_eq!(graphql_name("__x"), "___x");
        assert_eq!(graphql_name("é"), "_");
        let mut tables = Tables::new();
        tables.insert(("public".into(), "a_b".into()), table(&[("id", "int8")]));
        tables.insert(("a".into(), "b".into()), table(&[("id", "int8"), ("x-y", "text"), ("x_y", "text")]));
        tables.insert(("public".into(), "changes".into()), table(&[("id", "int4")]));
        let named = name_tables(&tables);
        let names: Vec<&str> = named.iter().map(|t| t.name.as_str()).collect();
        // (a, b) sorts first and takes `a_b`; public.a_b is numbered; `changes` is the schema's.
        assert_eq!(names, ["a_b", "a_b_2", "changes_2"]);
        let fields: Vec<&str> = named[0].fields.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(fields, ["id", "x_y", "x_y_2"]);
        assert_eq!(name_tables(&tables), named, "the same catalog, the same names");
    }

    #[test]
    fn the_schema_has_typed_tables_and_their_subscriptions() {
        let mut tables = Tables::new();
        tables.insert(
            ("public".into(), "todos".into()),
            table(&[("id", "int8"), ("done", "bool"), ("n", "int4"), ("meta", "jsonb"), ("tags", "_text")]),
        );
        let sdl = build(&tables).expect("schema").sdl();
        for want in [
            "type todos {",
            "id: BigInt",
            "done: Boolean",
            "n: Int",
            "meta: JSON",
            "tags: [String]",
            "todos_changes(filter: String, events: [ChangeEvent!], since: String, where: todos_bool_exp): todos_Change!",
            "todos_live(filter: String, where: todos_bool_exp, orderBy: [todos_order_by!], limit: Int): todos_Live!",
            "input todos_bool_exp {",
            "n: Int_comparison_exp",
            "_in: [BigInt!]",
            "changes(filter: String, events: [ChangeEvent!], since: String, table: String!): Change!",
            "_health: String!",
        ] {
            assert!(sdl.contains(want), "{want:?} not in\n{sdl}");
        }
    }
}
