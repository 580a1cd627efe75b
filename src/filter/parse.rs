//! Filter grammar → AST. `column=[not.]op.value` conditions joined by top-level commas (AND);
//! `in.(a,"b,c")` lists; PostgREST `"…"` quoting with `\` escapes.
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

/// Conditions that must all hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    pub conditions: Vec<Condition>,
}

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
    let mut conditions = Vec::new();
    for part in split_top(input, ',')? {
        conditions.push(parse_condition(part.trim())?);
    }
    Ok(Filter { conditions })
}

fn parse_condition(s: &str) -> Result<Condition, ParseError> {
    let (column, rest) = s
        .split_once('=')
        .ok_or_else(|| ParseError(format!("{s:?} is not of the form column=operator.value")))?;
    let column = column.trim();
    if column.is_empty() {
        return Err(ParseError(format!("{s:?} names no column")));
    }
    let column = unquote(column)?;
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
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let e = parse("id=foo.1").unwrap_err().to_string();
        assert!(e.contains("unknown operator \"foo\""), "{e}");
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(3);
        let alphabet: Vec<char> = "ab=.,()\"\\ notineqlk%_é".chars().collect();
        for _ in 0..50_000 {
            let s: String = (0..rng.usize(0..24)).map(|_| alphabet[rng.usize(..alphabet.len())]).collect();
            let _ = parse(&s);
        }
    }
}
