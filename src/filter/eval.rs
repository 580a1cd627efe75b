//! Typed filter evaluation. A `Filter` is compiled against a table's columns once (values cast to
//! the column's type, patterns turned into regexes); evaluating it against a change then parses
//! each row value in place, without allocating.
//!
//! Values compare by type: numbers as numbers, timestamps as instants, dates as days, booleans,
//! uuids, and text by code point. SQL NULL semantics: a comparison with NULL never matches; `is`
//! and `isdistinct` treat NULL as a value. Must not: know about subscriptions or sockets.

use std::cmp::Ordering;

use regex::bytes::{Regex, RegexBuilder};

use crate::change::{days_from_civil, Change};
use crate::filter::parse::{Condition, Filter, Group, Member, Op, Operand};

/// How values of a column compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Int,
    Float,
    Bool,
    Uuid,
    /// timestamp and timestamptz, as microseconds since 1970 UTC.
    Instant,
    Date,
    Text,
}

impl Class {
    pub fn of(type_name: &str) -> Class {
        match type_name {
            "int2" | "int4" | "int8" | "oid" => Class::Int,
            "float4" | "float8" | "numeric" => Class::Float,
            "bool" => Class::Bool,
            "uuid" => Class::Uuid,
            "timestamp" | "timestamptz" => Class::Instant,
            "date" => Class::Date,
            _ => Class::Text,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Int(i64),
    Float(f64),
    Bytes(Box<[u8]>),
}

/// The key an `eq` condition is indexed under; rows are looked up with the same normalization.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IndexKey {
    Int(i64),
    Bytes(Box<[u8]>),
}

#[derive(Debug)]
enum Test {
    Cmp(Op, Scalar),
    In(Vec<Scalar>),
    Pattern(Regex),
    IsNull,
    IsBool(bool),
    IsDistinct(Option<Scalar>),
}

#[derive(Debug)]
pub struct CompiledCondition {
    pub column: std::sync::Arc<str>,
    pub class: Class,
    negated: bool,
    test: Test,
}

/// A compiled `or` / `and` group.
#[derive(Debug)]
struct CompiledGroup {
    negated: bool,
    any: bool,
    members: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    Condition(CompiledCondition),
    Group(CompiledGroup),
}

/// A filter ready to evaluate against changes of one table.
#[derive(Debug, Default)]
pub struct CompiledFilter {
    /// Top-level conditions (all must hold); the index looks up the first plain `eq`.
    pub conditions: Vec<CompiledCondition>,
    /// Top-level groups (all must hold too).
    groups: Vec<CompiledGroup>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("invalid column for filter {0}")]
    UnknownColumn(String),
    #[error("invalid input syntax for type {type_name} in filter on {column}: {value:?}")]
    BadValue { column: String, type_name: String, value: String },
    #[error("invalid pattern in filter on {column}: {message}")]
    BadPattern { column: String, message: String },
}

impl CompiledFilter {
    /// Compiles `filter` for a table whose columns are given as (name, type name) pairs.
    pub fn compile<'a>(
        filter: &Filter,
        mut column_type: impl FnMut(&str) -> Option<(std::sync::Arc<str>, &'a str)>,
    ) -> Result<CompiledFilter, CompileError> {
        let conditions = filter
            .conditions
            .iter()
            .map(|c| compile_condition(c, &mut column_type))
            .collect::<Result<_, _>>()?;
        let groups =
            filter.groups.iter().map(|g| compile_group(g, &mut column_type)).collect::<Result<_, _>>()?;
        Ok(CompiledFilter { conditions, groups })
    }

    /// The first plain `eq` condition, which the subscription index can look up by hash.
    pub fn index_key(&self) -> Option<(usize, IndexKey)> {
        self.conditions.iter().enumerate().find_map(|(i, c)| match (&c.test, c.negated) {
            (Test::Cmp(Op::Eq, s), false) => Some((i, scalar_key(s))),
            _ => None,
        })
    }

    /// Whether the change's filter row satisfies every condition except `skip` (already
    /// satisfied by an index lookup) and every group. Unknown (a comparison with NULL, a column
    /// the change does not carry) is no match, as in SQL's `WHERE`.
    pub fn matches(&self, change: &Change, skip: Option<usize>) -> bool {
        self.conditions.iter().enumerate().all(|(i, c)| Some(i) == skip || c.eval(change) == Some(true))
            && self.groups.iter().all(|g| g.eval(change) == Some(true))
    }

    /// Whether anything beyond the top-level condition `indexed` is to be checked.
    pub fn has_residual(&self, indexed: Option<usize>) -> bool {
        !self.groups.is_empty() || self.conditions.len() > usize::from(indexed.is_some())
    }

    /// No condition at all.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty() && self.groups.is_empty()
    }

    /// Columns the filter reads.
    pub fn columns(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.conditions.iter().map(|c| &*c.column).collect();
        for g in &self.groups {
            g.columns(&mut out);
        }
        out
    }
}

fn compile_group<'a>(
    g: &Group,
    column_type: &mut impl FnMut(&str) -> Option<(std::sync::Arc<str>, &'a str)>,
) -> Result<CompiledGroup, CompileError> {
    let members = g
        .members
        .iter()
        .map(|m| match m {
            Member::Condition(c) => compile_condition(c, column_type).map(Node::Condition),
            Member::Group(inner) => compile_group(inner, column_type).map(Node::Group),
        })
        .collect::<Result<_, _>>()?;
    Ok(CompiledGroup { negated: g.negated, any: g.any, members })
}

impl CompiledGroup {
    /// SQL's three-valued `OR` / `AND` (and `NOT`): `None` is unknown.
    fn eval(&self, change: &Change) -> Option<bool> {
        let mut unknown = false;
        for m in &self.members {
            let v = match m {
                Node::Condition(c) => c.eval(change),
                Node::Group(g) => g.eval(change),
            };
            match v {
                Some(v) if v == self.any => return Some(self.any != self.negated),
                Some(_) => {}
                None => unknown = true,
            }
        }
        if unknown {
            None
        } else {
            // Every member was false (or) / true (and): the group is `!any`, then negated.
            Some(self.any == self.negated)
        }
    }

    fn columns<'a>(&'a self, out: &mut Vec<&'a str>) {
        for m in &self.members {
            match m {
                Node::Condition(c) => out.push(&c.column),
                Node::Group(g) => g.columns(out),
            }
        }
    }
}

fn compile_condition<'a>(
    c: &Condition,
    column_type: &mut impl FnMut(&str) -> Option<(std::sync::Arc<str>, &'a str)>,
) -> Result<CompiledCondition, CompileError> {
    let (column, type_name) =
        column_type(&c.column).ok_or_else(|| CompileError::UnknownColumn(c.column.clone()))?;
    let class = Class::of(type_name);
    let cast = |v: &str| {
        cast(class, v.as_bytes()).ok_or_else(|| CompileError::BadValue {
            column: c.column.clone(),
            type_name: type_name.to_owned(),
            value: v.to_owned(),
        })
    };
    let value = |o: &Operand| match o {
        Operand::Value(v) => Ok(v.clone()),
        Operand::List(items) => Ok(format!("({})", items.join(","))),
    };
    let test = match c.op {
        Op::Eq | Op::Neq | Op::Lt | Op::Lte | Op::Gt | Op::Gte => Test::Cmp(c.op, cast(&value(&c.operand)?)?),
        Op::In => match &c.operand {
            Operand::List(items) => Test::In(items.iter().map(|i| cast(i)).collect::<Result<_, _>>()?),
            Operand::Value(v) => Test::In(vec![cast(v)?]),
        },
        Op::Like | Op::Ilike | Op::Match | Op::Imatch => {
            let v = value(&c.operand)?;
            let (pattern, ci) = match c.op {
                Op::Like => (like_to_regex(&v), false),
                Op::Ilike => (like_to_regex(&v), true),
                Op::Match => (v, false),
                _ => (v, true),
            };
            let re =
                RegexBuilder::new(&pattern).case_insensitive(ci).size_limit(1 << 20).build().map_err(
                    |e| CompileError::BadPattern { column: c.column.clone(), message: e.to_string() },
                )?;
            Test::Pattern(re)
        }
        Op::Is => match value(&c.operand)?.as_str() {
            "null" | "unknown" => Test::IsNull,
            "true" => Test::IsBool(true),
            _ => Test::IsBool(false),
        },
        Op::IsDistinct => {
            let v = value(&c.operand)?;
            if v.eq_ignore_ascii_case("null") {
                Test::IsDistinct(None)
            } else {
                Test::IsDistinct(Some(cast(&v)?))
            }
        }
    };
    Ok(CompiledCondition { column, class, negated: c.negated, test })
}

fn scalar_key(s: &Scalar) -> IndexKey {
    match s {
        Scalar::Int(i) => IndexKey::Int(*i),
        Scalar::Float(f) => IndexKey::Int(float_key(*f)),
        Scalar::Bytes(b) => IndexKey::Bytes(b.clone()),
    }
}

fn float_key(f: f64) -> i64 {
    // -0.0 and 0.0 are equal; all NaNs are equal (as in numeric).
    let f = if f == 0.0 {
        0.0
    } else if f.is_nan() {
        f64::NAN
    } else {
        f
    };
    f.to_bits() as i64
}

/// The index key of a row value of class `class`, normalized as `scalar_key` does.
pub fn row_key_int(class: Class, text: &[u8]) -> Option<i64> {
    match cast(class, text)? {
        Scalar::Int(i) => Some(i),
        Scalar::Float(f) => Some(float_key(f)),
        Scalar::Bytes(_) => None,
    }
}

impl CompiledCondition {
    /// True, false, or unknown (`None`: a comparison with NULL, a value that does not cast, a
    /// column the change does not carry).
    fn eval(&self, change: &Change) -> Option<bool> {
        let idx = change.relation.column_index(&self.column)?;
        if !change.filter_carries(idx) {
            return None;
        }
        let value = change.filter_value(idx);
        let result = match (&self.test, value) {
            (Test::IsNull, v) => v.is_none(),
            (Test::IsBool(b), Some(v)) => cast(Class::Bool, v) == Some(Scalar::Int(i64::from(*b))),
            (Test::IsBool(_), None) => false,
            (Test::IsDistinct(None), v) => v.is_some(),
            (Test::IsDistinct(Some(_)), None) => true,
            (Test::IsDistinct(Some(s)), Some(v)) => compare(self.class, v, s) != Some(Ordering::Equal),
            // Comparisons with NULL are NULL: unknown, negated or not.
            (_, None) => return None,
            (Test::Cmp(op, s), Some(v)) => match compare(self.class, v, s) {
                None => return None,
                Some(o) => match op {
                    Op::Eq => o == Ordering::Equal,
                    Op::Neq => o != Ordering::Equal,
                    Op::Lt => o == Ordering::Less,
                    Op::Lte => o != Ordering::Greater,
                    Op::Gt => o == Ordering::Greater,
                    _ => o != Ordering::Less,
                },
            },
            (Test::In(items), Some(v)) => {
                items.iter().any(|s| compare(self.class, v, s) == Some(Ordering::Equal))
            }
            (Test::Pattern(re), Some(v)) => re.is_match(v),
        };
        Some(result != self.negated)
    }
}

fn compare(class: Class, row: &[u8], s: &Scalar) -> Option<Ordering> {
    match (cast_borrowed(class, row)?, s) {
        (Borrowed::Int(a), Scalar::Int(b)) => Some(a.cmp(b)),
        (Borrowed::Float(a), Scalar::Float(b)) => Some(a.total_cmp(b)),
        (Borrowed::Bytes(a), Scalar::Bytes(b)) => Some(a.cmp(&**b)),
        _ => None,
    }
}

enum Borrowed<'a> {
    Int(i64),
    Float(f64),
    Bytes(&'a [u8]),
}

fn cast_borrowed(class: Class, v: &[u8]) -> Option<Borrowed<'_>> {
    Some(match class {
        Class::Text => Borrowed::Bytes(v),
        // Row uuids come in canonical lower-case form already.
        Class::Uuid if v.len() == 36 => Borrowed::Bytes(v),
        _ => match cast(class, v)? {
            Scalar::Int(i) => Borrowed::Int(i),
            Scalar::Float(f) => Borrowed::Float(f),
            Scalar::Bytes(_) => return None,
        },
    })
}

fn cast(class: Class, v: &[u8]) -> Option<Scalar> {
    let s = std::str::from_utf8(v).ok()?;
    Some(match class {
        Class::Text => Scalar::Bytes(v.into()),
        Class::Int => Scalar::Int(s.trim().parse().ok()?),
        Class::Float => Scalar::Float(match s.trim() {
            "NaN" => f64::NAN,
            "Infinity" | "infinity" => f64::INFINITY,
            "-Infinity" | "-infinity" => f64::NEG_INFINITY,
            t => t.parse().ok()?,
        }),
        Class::Bool => Scalar::Int(match s.trim().to_ascii_lowercase().as_str() {
            "t" | "true" | "yes" | "on" | "1" | "y" => 1,
            "f" | "false" | "no" | "off" | "0" | "n" => 0,
            _ => return None,
        }),
        Class::Uuid => {
            let hex: String = s.chars().filter(|c| *c != '-' && *c != '{' && *c != '}').collect();
            if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let h = hex.to_ascii_lowercase();
            Scalar::Bytes(
                format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
                    .into_bytes()
                    .into(),
            )
        }
        Class::Instant => Scalar::Int(parse_instant(s)?),
        Class::Date => Scalar::Int(parse_date(s.trim())?.0),
    })
}

/// `YYYY-MM-DD` → (days since 1970, rest).
fn parse_date(s: &str) -> Option<(i64, &str)> {
    let (y, rest) = s.split_once('-')?;
    let y: i64 = y.parse().ok()?;
    // Postgres' own range; also keeps the arithmetic below from overflowing.
    if !(-4713..=294_276).contains(&y) {
        return None;
    }
    let m: u32 = rest.get(0..2)?.parse().ok()?;
    let d: u32 = rest.get(3..5)?.parse().ok()?;
    if rest.get(2..3) != Some("-") || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some((days_from_civil(y, m, d), rest.get(5..)?))
}

/// Parses `YYYY-MM-DD[ T]HH:MM[:SS[.ffffff]][Z|±HH[:MM]]` (or a bare date) to microseconds since
/// 1970 UTC. Values without an offset are taken as UTC, as the stream's session runs in UTC.
pub fn parse_instant(s: &str) -> Option<i64> {
    match s.trim() {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (days, rest) = parse_date(s.trim())?;
    let mut micros = days.checked_mul(86_400_000_000)?;
    let rest = match rest.chars().next() {
        None => return Some(micros),
        Some(' ') | Some('T') | Some('t') => &rest[1..],
        _ => return None,
    };
    let hh: i64 = rest.get(0..2)?.parse().ok()?;
    let mm: i64 = rest.get(3..5)?.parse().ok()?;
    if rest.get(2..3) != Some(":") {
        return None;
    }
    micros = micros.checked_add((hh * 3600 + mm * 60) * 1_000_000)?;
    let mut rest = rest.get(5..)?;
    if let Some(r) = rest.strip_prefix(':') {
        let ss: i64 = r.get(0..2)?.parse().ok()?;
        micros = micros.checked_add(ss * 1_000_000)?;
        rest = r.get(2..)?;
        if let Some(frac) = rest.strip_prefix('.') {
            let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
            let f = &frac[..digits];
            let mut us: i64 = 0;
            for (i, b) in f.bytes().take(6).enumerate() {
                us += i64::from(b - b'0') * 10i64.pow(5 - i as u32);
            }
            micros = micros.checked_add(us)?;
            rest = &frac[digits..];
        }
    }
    let rest = rest.trim();
    let offset = match rest.chars().next() {
        None => 0,
        Some('Z') | Some('z') if rest.len() == 1 => 0,
        Some(sign @ ('+' | '-')) => {
            let z = &rest[1..];
            let (h, m) = match z.split_once(':') {
                Some((h, m)) => (h, m),
                None if z.len() == 4 => (z.get(..2)?, z.get(2..)?),
                None => (z, "0"),
            };
            let secs = h
                .parse::<i64>()
                .ok()?
                .checked_mul(3600)?
                .checked_add(m.get(..2).unwrap_or(m).parse::<i64>().ok()?.checked_mul(60)?)?;
            if sign == '+' {
                secs
            } else {
                -secs
            }
        }
        _ => return None,
    };
    micros.checked_sub(offset.checked_mul(1_000_000)?)
}

/// LIKE pattern → anchored regex: `%` any run, `_` one character, `\` escapes.
fn like_to_regex(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 8);
    out.push_str("(?s)^");
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        match c {
            '%' => out.push_str(".*"),
            '_' => out.push('.'),
            '\\' => {
                if let Some(e) = chars.next() {
                    out.push_str(&regex::escape(&e.to_string()));
                }
            }
            c => out.push_str(&regex::escape(&c.to_string())),
        }
    }
    out.push('$');
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::change::{ChangeKind, Column, Relation, ReplicaIdentity};
    use crate::filter::parse;
    use crate::replication::pgoutput::{Tuple, Value};
    use crate::replication::values::TypeCatalog;

    const COLS: &[(&str, u32)] = &[
        ("id", 20),
        ("title", 25),
        ("score", 701),
        ("done", 16),
        ("at", 1184),
        ("day", 1082),
        ("uid", 2950),
        ("note", 25),
    ];

    fn relation() -> Arc<Relation> {
        let cat = TypeCatalog::default();
        Arc::new(Relation::new(
            1,
            "public",
            "t",
            ReplicaIdentity::Default,
            COLS.iter()
                .map(|(n, oid)| Column {
                    name: (*n).into(),
                    ty: Arc::clone(cat.get(*oid).unwrap()),
                    is_key: *n == "id",
                    in_primary_key: *n == "id",
                })
                .collect(),
        ))
    }

    fn change(kind: ChangeKind, values: &[Option<&str>]) -> Change {
        let tuple = Tuple(
            values
                .iter()
                .map(|v| match v {
                    Some(s) => Value::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => Value::Null,
                })
                .collect(),
        );
        let (new, old) = match kind {
            ChangeKind::Delete => (None, Some(tuple)),
            _ => (Some(tuple), None),
        };
        Change::for_test(&relation(), kind, new, old)
    }

    fn row() -> Change {
        change(
            ChangeKind::Insert,
            &[
                Some("42"),
                Some("Hello World"),
                Some("2.5"),
                Some("t"),
                Some("2024-05-01 10:00:00+00"),
                Some("2024-05-01"),
                Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
                None,
            ],
        )
    }

    fn compile(f: &str) -> Result<CompiledFilter, CompileError> {
        let rel = relation();
        CompiledFilter::compile(&parse(f).unwrap(), |name| {
            rel.column_index(name).map(|i| {
                let c = &rel.columns[i];
                // The test relation lives for the test; leak the name for the 'a lifetime.
                let leaked: &'static str = Box::leak(c.ty.name.to_string().into_boxed_str());
                (Arc::clone(&c.name), leaked)
            })
        })
    }

    fn matches(f: &str) -> bool {
        compile(f).unwrap().matches(&row(), None)
    }

    #[test]
    fn typed_comparisons() {
        assert!(matches("id=eq.42") && !matches("id=eq.43") && matches("id=neq.43"));
        assert!(matches("id=gt.9"), "numbers compare as numbers, not strings");
        assert!(matches("id=lte.42") && !matches("id=lt.42") && matches("id=gte.42"));
        assert!(matches("score=gt.2.25") && matches("score=eq.2.50"));
        assert!(matches("done=eq.true") && matches("done=is.true") && !matches("done=is.false"));
        assert!(matches("at=eq.2024-05-01T12:00:00+02:00"), "timestamps compare as instants");
        assert!(matches("at=lt.2024-05-01T10:00:01Z") && matches("at=gt.2024-05-01"));
        assert!(matches("day=gte.2024-04-30") && !matches("day=gt.2024-05-01"));
        assert!(matches("uid=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"));
        assert!(matches("title=gt.Hello") && matches("title=lt.Hello%20") == ("Hello World" < "Hello%20"));
    }

    #[test]
    fn or_and_groups_follow_sql_three_valued_logic() {
        // id = 42, note IS NULL.
        assert!(matches("or=(id.eq.1,id.eq.42)") && !matches("or=(id.eq.1,id.eq.2)"));
        assert!(matches("and=(id.eq.42,done.is.true)") && !matches("and=(id.eq.42,done.is.false)"));
        assert!(matches("id=gt.1,or=(title.like.Hello%,title.like.Bye%)"));
        assert!(matches("or=(id.eq.1,and(id.eq.42,score.gt.2))"));
        assert!(matches("not.or=(id.eq.1,id.eq.2)") && !matches("not.and=(id.eq.42,done.is.true)"));
        assert!(matches("or=(id.eq.1,not.and(id.eq.42,done.is.false))"));
        // A comparison with NULL is unknown: true OR unknown holds, false OR unknown does not,
        // and NOT unknown does not either.
        assert!(matches("or=(note.eq.x,id.eq.42)"));
        assert!(!matches("or=(note.eq.x,id.eq.1)"));
        assert!(!matches("not.or=(note.eq.x,id.eq.1)"));
        assert!(matches("not.and=(note.eq.x,id.eq.1)"), "unknown AND false is false");
        assert!(!matches("not.and=(note.eq.x,id.eq.42)"), "unknown AND true is unknown");
        assert!(matches("or=(note.is.null,id.eq.1)"), "IS NULL is never unknown");
        // The columns a group reads count as the filter's (for identity and grant checks).
        assert_eq!(
            compile("id=eq.1,or=(title.eq.x,and(score.gt.1,note.is.null))").unwrap().columns(),
            ["id", "title", "score", "note"]
        );
        assert!(
            matches!(compile("or=(nope.eq.1,id.eq.2)"), Err(CompileError::UnknownColumn(c)) if c == "nope")
        );
    }

    #[test]
    fn operators() {
        assert!(matches("id=in.(1,42,7)") && !matches("id=in.(1,2)") && matches("id=not.in.(1,2)"));
        assert!(
            matches("title=like.Hello%") && !matches("title=like.hello%") && matches("title=ilike.hello%")
        );
        assert!(matches("title=like.Hell__World") && !matches("title=like.Hello"));
        assert!(
            matches("title=match.^H.*d$") && matches("title=imatch.WORLD") && !matches("title=match.WORLD")
        );
        assert!(matches("note=is.null") && !matches("note=not.is.null") && matches("title=not.is.null"));
        assert!(
            matches("note=isdistinct.x") && !matches("note=isdistinct.null") && matches("id=isdistinct.1")
        );
        assert!(!matches("id=eq.42,done=is.true,title=ilike.*world*"));
        assert!(matches("id=eq.42,done=is.true,title=ilike.%world%"));
    }

    #[test]
    fn null_never_compares() {
        assert!(!matches("note=eq.x") && !matches("note=not.eq.x") && !matches("note=neq.x"));
        assert!(!matches("note=in.(x)") && !matches("note=not.in.(x)") && !matches("note=like.%"));
    }

    #[test]
    fn delete_sees_only_key_columns() {
        let del = change(ChangeKind::Delete, &[Some("42"), None, None, None, None, None, None, None]);
        assert!(compile("id=eq.42").unwrap().matches(&del, None));
        // title is not carried by a key-only old row: never matches, not even `is.null`.
        assert!(!compile("title=is.null").unwrap().matches(&del, None));
    }

    #[test]
    fn compile_errors() {
        assert_eq!(compile("nope=eq.1").unwrap_err().to_string(), "invalid column for filter nope");
        let e = compile("id=eq.abc").unwrap_err().to_string();
        assert!(e.contains("int8") && e.contains("abc"), "{e}");
        assert!(compile("at=eq.yesterday").is_err());
        assert!(compile("uid=eq.123").is_err());
        assert!(compile("title=match.[").is_err());
    }

    #[test]
    fn index_keys() {
        let f = compile("title=like.x%,id=eq.42").unwrap();
        assert_eq!(f.index_key(), Some((1, IndexKey::Int(42))));
        assert_eq!(row_key_int(Class::Int, b"42"), Some(42));
        assert_eq!(compile("id=not.eq.1").unwrap().index_key(), None);
        assert_eq!(
            compile("title=eq.a").unwrap().index_key(),
            Some((0, IndexKey::Bytes(b"a".to_vec().into_boxed_slice())))
        );
        assert_eq!(
            row_key_int(Class::Float, b"2.50"),
            compile("score=eq.2.5").unwrap().index_key().map(|(_, k)| match k {
                IndexKey::Int(i) => i,
                _ => 0,
            })
        );
    }

    #[test]
    fn instants() {
        assert_eq!(parse_instant("1970-01-01 00:00:00+00"), Some(0));
        assert_eq!(parse_instant("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_instant("1970-01-01 00:00:00.5"), Some(500_000));
        assert_eq!(parse_instant("1970-01-02"), Some(86_400_000_000));
        assert_eq!(parse_instant("1970-01-01 00:00:00-0130"), Some(5_400_000_000));
        for bad in ["", "1970", "1970-13-01", "1970-01-01X", "1970-01-01 1:00", "1970-01-01 00:00:00 nope"] {
            assert_eq!(parse_instant(bad), None, "{bad}");
        }
    }

    #[test]
    fn property_int_order_matches_numbers() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..2_000 {
            let a = rng.i64(-1_000_000..1_000_000);
            let b = rng.i64(-1_000_000..1_000_000);
            let c =
                change(ChangeKind::Insert, &[Some(&a.to_string()), None, None, None, None, None, None, None]);
            let f = compile(&format!("id=lt.{b}")).unwrap();
            assert_eq!(f.matches(&c, None), a < b, "{a} < {b}");
        }
    }
}
