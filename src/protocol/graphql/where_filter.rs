//! A subscription's `where` argument (`{col: {_eq, _neq, _gt, _gte, _lt, _lte, _in, _like,
//! _ilike, _is_null}, _and, _or, _not}`) as the filter grammar every transport shares, so that a
//! GraphQL subscription is matched, indexed and authorized exactly as any other binding.
//!
//! Owns: the translation. Must not: evaluate anything (the core compiles the filter it makes).

use serde_json::Value as Json;

/// The filter for `where`; `fields` maps a GraphQL field to its column. `Ok(None)`: no condition.
pub fn to_filter(where_: &Json, fields: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>, String> {
    let mut top = Vec::new();
    let mut members = Vec::new();
    collect(where_, fields, &mut top, &mut members, 0)?;
    if !members.is_empty() {
        top.push(format!("and=({})", members.join(",")));
    }
    Ok((!top.is_empty()).then(|| top.join(",")))
}

/// Groups nest at most this deep (as the filter grammar allows).
const MAX_DEPTH: usize = 8;

/// Plain top-level conditions go to `top` (`col=op.value`, which the index can use); everything
/// else to `members` of one top-level `and` group.
fn collect(
    w: &Json,
    fields: &dyn Fn(&str) -> Option<String>,
    top: &mut Vec<String>,
    members: &mut Vec<String>,
    depth: usize,
) -> Result<(), String> {
    let map = w.as_object().ok_or("where: expected an object")?;
    for (key, value) in map {
        match key.as_str() {
            "_and" | "_or" => {
                let list = value.as_array().ok_or_else(|| format!("where: {key} takes a list"))?;
                let inner =
                    list.iter().map(|w| group(w, fields, depth + 1)).collect::<Result<Vec<_>, _>>()?;
                let inner: Vec<String> = inner.into_iter().flatten().collect();
                // An empty list, or members without conditions, add nothing.
                if !inner.is_empty() {
                    let word = if key == "_or" { "or" } else { "and" };
                    members.push(format!("{word}({})", inner.join(",")));
                }
            }
            "_not" => {
                if let Some(inner) = group(value, fields, depth + 1)? {
                    // `not.` applies to a group: a lone condition is wrapped in one.
                    let negated = match inner.strip_prefix("not.") {
                        // Not not: the group itself.
                        Some(group) => group.to_owned(),
                        None if inner.starts_with("and(") || inner.starts_with("or(") => {
                            format!("not.{inner}")
                        }
                        None => format!("not.and({inner})"),
                    };
                    members.push(negated);
                }
            }
            field => {
                let column = fields(field).ok_or_else(|| format!("where: unknown field {field}"))?;
                let ops = value
                    .as_object()
                    .ok_or_else(|| format!("where: {field} takes an object of operators"))?;
                for (op, operand) in ops {
                    let plain = column.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    let condition =
                        predicate(op, operand).map_err(|e| format!("where: {field}.{op}: {e}"))?;
                    if plain && depth == 0 {
                        top.push(format!("{column}={condition}"));
                    } else {
                        members.push(format!("{}.{condition}", quote(&column)));
                    }
                }
            }
        }
    }
    Ok(())
}

/// `w` as one group member (`and(…)`), `None` when it has no condition.
fn group(w: &Json, fields: &dyn Fn(&str) -> Option<String>, depth: usize) -> Result<Option<String>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("where: nests deeper than {MAX_DEPTH}"));
    }
    let (mut top, mut members) = (Vec::new(), Vec::new());
    collect(w, fields, &mut top, &mut members, depth)?;
    debug_assert!(top.is_empty(), "conditions below the top are members");
    Ok(match members.len() {
        0 => None,
        1 => members.pop(),
        _ => Some(format!("and({})", members.join(","))),
    })
}

/// `op.value` for one operator of a column.
fn predicate(op: &str, operand: &Json) -> Result<String, String> {
    let name = match op {
        "_eq" => "eq",
        "_neq" => "neq",
        "_gt" => "gt",
        "_gte" => "gte",
        "_lt" => "lt",
        "_lte" => "lte",
        "_like" => "like",
        "_ilike" => "ilike",
        "_in" => {
            let items = operand.as_array().ok_or("takes a list")?;
            let items = items.iter().map(|v| text(v).map(|t| quote(&t))).collect::<Result<Vec<_>, _>>()?;
            return Ok(format!("in.({})", items.join(",")));
        }
        "_is_null" => {
            return match operand.as_bool() {
                Some(true) => Ok("is.null".into()),
                Some(false) => Ok("not.is.null".into()),
                None => Err("takes true or false".into()),
            }
        }
        other => return Err(format!("unknown operator {other}")),
    };
    Ok(format!("{name}.{}", quote(&text(operand)?)))
}

/// A value as the text Postgres would compare.
fn text(v: &Json) -> Result<String, String> {
    match v {
        Json::String(s) => Ok(s.clone()),
        Json::Number(n) => Ok(n.to_string()),
        Json::Bool(b) => Ok(b.to_string()),
        Json::Null => Err("null is not a value to compare with (use _is_null)".into()),
        other => Ok(other.to_string()),
    }
}

/// `"…"` with `\` and `"` escaped.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::filter;

    fn f(w: Json) -> Result<Option<String>, String> {
        to_filter(&w, &|field| {
            (field != "nope").then(|| if field == "odd_name" { "odd name".into() } else { field.into() })
        })
    }

    #[test]
    fn where_becomes_the_filter_grammar() {
        assert_eq!(f(json!({})).unwrap(), None);
        assert_eq!(f(json!({"n": {"_gt": 5}})).unwrap().as_deref(), Some("n=gt.\"5\""));
        let text = f(
            json!({"n": {"_gte": 1, "_lt": 9}, "_or": [{"tag": {"_eq": "a,b"}}, {"tag": {"_is_null": true}}],
                           "_not": {"id": {"_in": [1, 2]}}, "odd_name": {"_like": "x\"%"}}),
        )
        .unwrap()
        .unwrap();
        let parsed = filter::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(parsed.conditions.len(), 2, "{text}");
        assert_eq!(parsed.groups.len(), 1, "{text}");
        assert!(text.contains("or(\"tag\".eq.\"a,b\",\"tag\".is.null)"), "{text}");
        assert!(text.contains("not.and(\"id\".in.(\"1\",\"2\"))"), "{text}");
        assert!(text.contains("\"odd name\".like.\"x\\\"%\""), "{text}");
        for nested in [
            json!({"_not": {"_not": {"n": {"_eq": 1}}}}),
            json!({"_not": {"n": {"_eq": 1}}}),
            json!({"_or": [{"_not": {"_or": [{"n": {"_eq": 1}}, {"n": {"_eq": 2}}]}}]}),
        ] {
            let text = f(nested.clone()).unwrap().unwrap();
            filter::parse(&text).unwrap_or_else(|e| panic!("{nested} → {text}: {e}"));
        }
        // Empty groups say nothing.
        assert_eq!(f(json!({"_and": [], "_not": {}})).unwrap(), None);
    }

    #[test]
    fn bad_where_is_an_error_naming_what() {
        assert!(f(json!({"nope": {"_eq": 1}})).unwrap_err().contains("nope"));
        assert!(f(json!({"n": {"_between": 1}})).unwrap_err().contains("_between"));
        assert!(f(json!({"n": {"_eq": null}})).unwrap_err().contains("_is_null"));
        assert!(f(json!({"n": 1})).unwrap_err().contains("object of operators"));
        let mut deep = json!({"n": {"_eq": 1}});
        for _ in 0..10 {
            deep = json!({"_not": deep});
        }
        assert!(f(deep).unwrap_err().contains("deeper"));
    }
}
