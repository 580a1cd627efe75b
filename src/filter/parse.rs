//! Filter grammar → AST. `column=[not.]op.value` conditions joined by top-level commas (AND);
//! `in.(a,"b,c")` lists; PostgREST `"…"` quoting with `\` escapes; PostgREST's logical groups
//! `or=(a.eq.1,b.gt.2)`, `and=(…)` and their `not.` forms, whose members are `column.op.value`
//! or nested `or(…)` / `and(…)`.
//! Must not: know column types (that is `eval.rs`).

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    Like,
    Ilike,
    Is,
    Match,
    Imatch,
    IsDistinct,
}

impl Op {
    fn from_name(s: &str) -> Option<Op> {
        Some(match s {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "in" => Op::In,
            "like" => Op::Like,
            "ilike" => Op::Ilike,
            "is" => Op::Is,
            "match" => Op::Match,
            "imatch" => Op::Imatch,
            "isdistinct" => Op::IsDistinct,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    Value(String),
    List(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub column: String,
    pub negated: bool,
    pub op: Op,
    pub operand: Operand,
}

/// Members joined by `or` (any holds) or `and` (all hold), the result negated with `not.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub negated: bool,
    pub any: bool,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    Condition(Condition),
    Group(Group),
}

/// Conditions and groups that must all hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    pub conditions: Vec<Condition>,
    pub groups: Vec<Group>,
}

impl Filter {
    /// No condition at all.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty() && self.groups.is_empty()
    }
}

/// How deep groups may nest.
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Splits at `sep` outside parentheses and double quotes.
fn split_top(s: &str, sep: char) -> Result<Vec<&str>, ParseError> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth < 0 {
                    return Err(ParseError(format!("unbalanced ')' in {s:?}")));
                }
            }
            c if c == sep && !quoted && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if quoted {
        return Err(ParseError(format!("unterminated '\"' in {s:?}")));
    }
    if depth != 0 {
        return Err(ParseError(format!("unbalanced '(' in {s:?}")));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// `"a \"b\""` → `a "b"`; unquoted text is returned as is.
fn unquote(s: &str) -> Result<String, ParseError> {
    let Some(inner) = s.strip_prefix('"') else {
        return Ok(s.to_owned());
    };
    let inner = inner.strip_suffix('"').ok_or_else(|| ParseError(format!("unterminated '\"' in {s:?}")))?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e) => out.push(e),
                None => return Err(ParseError(format!("dangling '\\' in {s:?}"))),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Parses a filter string; an empty (or blank) string is no filter.
pub fn parse(input: &str) -> Result<Filter, ParseError> {
    let input = input.trim();
    if input.is_empty() {
        return Ok(Filter::default());
    }
    let mut filter = Filter::default();
    for part in split_top(input, ',')? {
        let part = part.trim();
        match group_head(part, '=') {
            Some((negated, any, inner)) => filter.groups.push(parse_group(negated, any, inner, 1)?),
            None => filter.conditions.push(parse_condition(part)?),
        }
    }
    Ok(filter)
}

/// A group: `[not.]or=(…)` / `[not.]and=(…)` at the top (`sep` '='), `[not.]or(…)` /
/// `[not.]and(…)` inside another (`sep` '(') → (negated, any, what is inside the parentheses).
fn group_head(s: &str, sep: char) -> Option<(bool, bool, &str)> {
    let (negated, rest) = match s.strip_prefix("not.") {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (any, rest) = match (rest.strip_prefix("or"), rest.strip_prefix("and")) {
        (Some(r), _) => (true, r),
        (_, Some(r)) => (false, r),
        _ => return None,
    };
    let rest = if sep == '=' { rest.strip_prefix('=')? } else { rest };
    let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
    Some((negated, any, inner))
}

fn parse_group(negated: bool, any: bool, inner: &str, depth: usize) -> Result<Group, ParseError> {
    if depth > MAX_DEPTH {
        return Err(ParseError(format!("groups nest deeper than {MAX_DEPTH}")));
    }
    let word = if any { "or" } else { "and" };
    if inner.trim().is_empty() {
        return Err(ParseError(format!("an empty {word}=() group")));
    }
    let mut members = Vec::new();
    for part in split_top(inner, ',')? {
        let part = part.trim();
        if part.is_empty() {
            return Err(ParseError(format!("an empty member in {word}=({inner})")));
        }
        members.push(match group_head(part, '(') {
            Some((n, a, i)) => Member::Group(parse_group(n, a, i, depth + 1)?),
            None => Member::Condition(parse_member(part)?),
        });
    }
    Ok(Group { negated, any, members })
}

/// A group's member condition: `column.[not.]op.value` (the column quoted if it has a dot).
fn parse_member(s: &str) -> Result<Condition, ParseError> {
    let (column, rest) = if s.starts_with('"') {
        let end = quoted_end(s).ok_or_else(|| ParseError(format!("unterminated '\"' in {s:?}")))?;
        let rest = s[end..]
            .strip_prefix('.')
            .ok_or_else(|| ParseError(format!("{s:?} is not of the form column.operator.value")))?;
        (unquote(&s[..end])?, rest)
    } else {
        let (c, rest) = s
            .split_once('.')
            .ok_or_else(|| ParseError(format!("{s:?} is not of the form column.operator.value")))?;
        (c.trim().to_owned(), rest)
    };
    if column.is_empty() {
        return Err(ParseError(format!("{s:?} names no column")));
    }
    predicate(s, column, rest)
}

/// The byte just past the closing quote of the quoted text `s` starts with.
fn quoted_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

fn parse_condition(s: &str) -> Result<Condition, ParseError> {
    let (column, rest) = s
        .split_once('=')
        .ok_or_else(|| ParseError(format!("{s:?} is not of the form column=operator.value")))?;
    let column = column.trim();
    if column.is_empty() {
        return Err(ParseError(format!("{s:?} names no column")));
    }
    predicate(s, unquote(column)?, rest)
}

/// `[not.]op.value` on `column` (`s` is the whole condition, for errors).
fn predicate(s: &str, column: String, rest: &str) -> Result<Condition, ParseError> {
    let (negated, rest) = match rest.strip_prefix("not.") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let (op_name, value) = rest
        .split_once('.')
        .ok_or_else(|| ParseError(format!("{s:?} has no operator: expected column=operator.value")))?;
    let op = Op::from_name(op_name).ok_or_else(|| {
        ParseError(format!(
            "unknown operator {op_name:?} (expected eq, neq, lt, lte, gt, gte, in, like, ilike, is, match, imatch or isdistinct)"
        ))
    })?;
    let operand = match op {
        Op::In => {
            let inner = value.strip_prefix('(').and_then(|v| v.strip_suffix(')')).ok_or_else(|| {
                ParseError(format!("`in` takes a list in parentheses, e.g. in.(1,2,3), got {value:?}"))
            })?;
            let items = if inner.trim().is_empty() {
                Vec::new()
            } else {
                split_top(inner, ',')?.into_iter().map(|i| unquote(i.trim())).collect::<Result<_, _>>()?
            };
            Operand::List(items)
        }
        Op::Is => {
            let v = value.to_ascii_lowercase();
            if !matches!(v.as_str(), "null" | "true" | "false" | "unknown") {
                return Err(ParseError(format!("`is` takes null, true, false or unknown, got {value:?}")));
            }
            Operand::Value(v)
        }
        _ => Operand::Value(unquote(value)?),
    };
    Ok(Condition { column, negated, op, operand })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(column: &str, negated: bool, op: Op, operand: Operand) -> Condition {
        Condition { column: column.into(), negated, op, operand }
    }

    #[test]
    fn single_and_multiple() {
        assert_eq!(parse("").unwrap(), Filter::default());
        assert_eq!(parse("  ").unwrap(), Filter::default());
        assert_eq!(
            parse("id=eq.1").unwrap().conditions,
            vec![cond("id", false, Op::Eq, Operand::Value("1".into()))]
        );
        let f = parse("a=gt.5,b=not.like.%x%,c=in.(1,\"2,3\",\"q\\\"\"),d=is.NULL").unwrap();
        assert_eq!(
            f.conditions,
            vec![
                cond("a", false, Op::Gt, Operand::Value("5".into())),
                cond("b", true, Op::Like, Operand::Value("%x%".into())),
                cond("c", false, Op::In, Operand::List(vec!["1".into(), "2,3".into(), "q\"".into()])),
                cond("d", false, Op::Is, Operand::Value("null".into())),
            ]
        );
        // Values may contain dots and equals signs.
        assert_eq!(
            parse("email=eq.a.b=c@x.io").unwrap().conditions[0].operand,
            Operand::Value("a.b=c@x.io".into())
        );
        assert_eq!(parse("t=eq.\"a,b\"").unwrap().conditions[0].operand, Operand::Value("a,b".into()));
    }

    #[test]
    fn groups() {
        let f =
            parse(r#"a=eq.1,or=(b.gt.2,"c.d".in.(1,2),and(e.eq."x,y",not.or(f.is.null,g.neq.3)))"#).unwrap();
        assert_eq!(f.conditions, vec![cond("a", false, Op::Eq, Operand::Value("1".into()))]);
        let inner = Group {
            negated: true,
            any: true,
            members: vec![
                Member::Condition(cond("f", false, Op::Is, Operand::Value("null".into()))),
                Member::Condition(cond("g", false, Op::Neq, Operand::Value("3".into()))),
            ],
        };
        assert_eq!(
            f.groups,
            vec![Group {
                negated: false,
                any: true,
                members: vec![
                    Member::Condition(cond("b", false, Op::Gt, Operand::Value("2".into()))),
                    Member::Condition(cond(
                        "c.d",
                        false,
                        Op::In,
                        Operand::List(vec!["1".into(), "2".into()])
                    )),
                    Member::Group(Group {
                        negated: false,
                        any: false,
                        members: vec![
                            Member::Condition(cond("e", false, Op::Eq, Operand::Value("x,y".into()))),
                            Member::Group(inner),
                        ],
                    }),
                ],
            }]
        );
        let f = parse("not.and=(a.not.eq.1,b.eq.2)").unwrap();
        assert!(f.conditions.is_empty() && f.groups[0].negated && !f.groups[0].any);
        assert_eq!(
            f.groups[0].members[0],
            Member::Condition(cond("a", true, Op::Eq, Operand::Value("1".into())))
        );
        // Columns named like the groups are still columns.
        assert_eq!(parse("or=eq.1").unwrap().conditions[0].column, "or");
        assert_eq!(
            parse("or=(order.eq.1)").unwrap().groups[0].members[0],
            Member::Condition(cond("order", false, Op::Eq, Operand::Value("1".into())))
        );
    }

    #[test]
    fn errors() {
        for bad in [
            "id",
            "id=1",
            "id=foo.1",
            "=eq.1",
            "id=in.1,2",
            "id=is.maybe",
            "a=eq.\"x",
            "a=in.(1",
            "a=in.(1))",
            "or=()",
            "or=(a.eq.1,)",
            "or=(a=eq.1)",
            "or=(a.eq.1",
            "or=(\"a.eq.1)",
            "or=(a)",
            "or=(or(or(or(or(or(or(or(or(a.eq.1)))))))))",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let e = parse("id=foo.1").unwrap_err().to_string();
        assert!(e.contains("unknown operator \"foo\""), "{e}");
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(3);
        let alphabet: Vec<char> = "ab=.,()\"\\ notineqlk%_éord".chars().collect();
        for _ in 0..50_000 {
            let s: String = (0..rng.usize(0..24)).map(|_| alphabet[rng.usize(..alphabet.len())]).collect();
            let _ = parse(&s);
        }
    }
}
