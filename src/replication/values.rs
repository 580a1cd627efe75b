//! Column values: the type catalog and the conversion of a value's text output into the JSON that
//! Postgres' `to_jsonb` produces for it (in a session with `TimeZone=UTC`, `DateStyle=ISO`,
//! `IntervalStyle=postgres`).
//!
//! Owns: which JSON shape each type gets (numbers, booleans, embedded json, ISO timestamps,
//! nested arrays, composite objects, strings for everything else) and the catalog lookups that
//! tell a type's shape. Must not: guess a shape it does not know, or invent values (unchanged
//! TOAST is the change model's business).

use std::collections::HashMap;
use std::sync::Arc;

/// How `to_jsonb` renders a type.
#[derive(Debug, Clone, PartialEq)]
pub enum TypeKind {
    Bool,
    /// int2/4/8, float4/8, numeric: a JSON number, or a string for NaN and infinities.
    Number,
    /// json and jsonb: embedded as JSON.
    Json,
    /// `timestamp`: ISO 8601 with `T`.
    Timestamp,
    /// `timestamptz`: ISO 8601 with `T` and a `+HH:MM` offset.
    TimestampTz,
    /// Everything rendered as its text output in a JSON string.
    Text,
    /// A true array type: nested JSON arrays of the element's rendering.
    Array {
        element: Arc<TypeInfo>,
        delimiter: u8,
    },
    /// A composite type: an object of its live attributes.
    Composite {
        fields: Vec<(String, Arc<TypeInfo>)>,
    },
}

/// A Postgres type as walcast renders it.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeInfo {
    pub oid: u32,
    /// The catalog name (`int4`, `_text`, `timestamptz`), as clients see it in `columns[].type`.
    pub name: Arc<str>,
    pub kind: TypeKind,
}

/// Built-in scalar types whose shape is known without asking the catalog: (oid, name, array oid).
const BUILTIN: &[(u32, &str, u32)] = &[
    (16, "bool", 1000),
    (17, "bytea", 1001),
    (18, "char", 1002),
    (19, "name", 1003),
    (20, "int8", 1016),
    (21, "int2", 1005),
    (23, "int4", 1007),
    (25, "text", 1009),
    (26, "oid", 1028),
    (114, "json", 199),
    (142, "xml", 143),
    (600, "point", 1017),
    (650, "cidr", 651),
    (700, "float4", 1021),
    (701, "float8", 1022),
    (774, "macaddr8", 775),
    (790, "money", 791),
    (829, "macaddr", 1040),
    (869, "inet", 1041),
    (1042, "bpchar", 1014),
    (1043, "varchar", 1015),
    (1082, "date", 1182),
    (1083, "time", 1183),
    (1114, "timestamp", 1115),
    (1184, "timestamptz", 1185),
    (1186, "interval", 1187),
    (1266, "timetz", 1270),
    (1560, "bit", 1561),
    (1562, "varbit", 1563),
    (1700, "numeric", 1231),
    (2950, "uuid", 2951),
    (3614, "tsvector", 3643),
    (3802, "jsonb", 3807),
];

fn builtin_kind(oid: u32) -> TypeKind {
    match oid {
        16 => TypeKind::Bool,
        20 | 21 | 23 | 700 | 701 | 1700 => TypeKind::Number,
        114 | 3802 => TypeKind::Json,
        1114 => TypeKind::Timestamp,
        1184 => TypeKind::TimestampTz,
        _ => TypeKind::Text,
    }
}

/// Known types by OID. Built-ins are present from the start; others are added from the catalog.
#[derive(Debug, Clone)]
pub struct TypeCatalog {
    types: HashMap<u32, Arc<TypeInfo>>,
}

impl Default for TypeCatalog {
    fn default() -> Self {
        let mut types = HashMap::new();
        for &(oid, name, array_oid) in BUILTIN {
            let scalar = Arc::new(TypeInfo { oid, name: name.into(), kind: builtin_kind(oid) });
            let array = TypeInfo {
                oid: array_oid,
                name: format!("_{name}").into(),
                kind: TypeKind::Array { element: Arc::clone(&scalar), delimiter: b',' },
            };
            types.insert(oid, scalar);
            types.insert(array_oid, Arc::new(array));
        }
        TypeCatalog { types }
    }
}

/// One `pg_type` row: oid, typname, typtype, typdelim, is_array, typelem, typbasetype, typrelid.
type PgTypeRow = (i64, String, String, String, bool, i64, i64, i64);

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("type {0} is not in pg_type")]
    UnknownType(u32),
    #[error("loading type {oid} from the catalog")]
    Query {
        oid: u32,
        #[source]
        source: sqlx::Error,
    },
}

impl TypeCatalog {
    pub fn get(&self, oid: u32) -> Option<&Arc<TypeInfo>> {
        self.types.get(&oid)
    }

    /// Returns the type, loading it (and the types it is made of) from the catalog if unknown.
    pub async fn resolve(&mut self, pool: &sqlx::PgPool, oid: u32) -> Result<Arc<TypeInfo>, CatalogError> {
        if let Some(t) = self.types.get(&oid) {
            return Ok(Arc::clone(t));
        }
        Box::pin(self.load(pool, oid)).await
    }

    async fn load(&mut self, pool: &sqlx::PgPool, oid: u32) -> Result<Arc<TypeInfo>, CatalogError> {
        let query_err = |source| CatalogError::Query { oid, source };
        let row: Option<PgTypeRow> = sqlx::query_as(
            "SELECT t.oid::int8 AS oid, t.typname::text AS typname, t.typtype::text AS typtype, \
                    t.typdelim::text AS typdelim, \
                    (t.typsubscript = 'pg_catalog.array_subscript_handler'::regproc) AS is_array, \
                    t.typelem::int8 AS typelem, t.typbasetype::int8 AS typbasetype, t.typrelid::int8 AS typrelid \
             FROM pg_catalog.pg_type t WHERE t.oid = $1::int8::oid",
        )
        .bind(i64::from(oid))
        .fetch_optional(pool)
        .await
        .map_err(query_err)?;
        let (_, typname, typtype, typdelim, is_array, typelem, typbasetype, typrelid) =
            row.ok_or(CatalogError::UnknownType(oid))?;
        let kind = if is_array {
            let element = self.resolve(pool, typelem as u32).await?;
            TypeKind::Array { element, delimiter: typdelim.bytes().next().unwrap_or(b',') }
        } else if typtype == "d" {
            // A domain renders as its base type does, under its own name.
            self.resolve(pool, typbasetype as u32).await?.kind.clone()
        } else if typtype == "c" {
            let attrs: Vec<(String, i64)> = sqlx::query_as(
                "SELECT attname::text, atttypid::int8 FROM pg_catalog.pg_attribute \
                 WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            )
            .bind(typrelid)
            .fetch_all(pool)
            .await
            .map_err(query_err)?;
            let mut fields = Vec::with_capacity(attrs.len());
            for (name, type_oid) in attrs {
                fields.push((name, self.resolve(pool, type_oid as u32).await?));
            }
            TypeKind::Composite { fields }
        } else {
            builtin_kind(oid)
        };
        let info = Arc::new(TypeInfo { oid, name: typname.into(), kind });
        self.types.insert(oid, Arc::clone(&info));
        Ok(info)
    }

    /// Forgets non-built-in types so the next use reloads them (after DDL changed them).
    pub fn forget(&mut self, oid: u32) {
        if !BUILTIN.iter().any(|&(o, _, a)| o == oid || a == oid) {
            self.types.remove(&oid);
        }
    }
}

/// Appends `text` (a value's text output) to `out` as the JSON `to_jsonb` gives for type `ty`.
pub fn write_json(out: &mut Vec<u8>, ty: &TypeInfo, text: &[u8]) {
    match &ty.kind {
        TypeKind::Bool => out.extend_from_slice(if text == b"t" { b"true" } else { b"false" }),
        TypeKind::Number => {
            if is_json_number(text) {
                out.extend_from_slice(text)
            } else {
                write_json_string(out, text)
            }
        }
        TypeKind::Json => {
            if text.is_empty() {
                out.extend_from_slice(b"null")
            } else {
                out.extend_from_slice(text)
            }
        }
        TypeKind::Timestamp => write_timestamp(out, text, false),
        TypeKind::TimestampTz => write_timestamp(out, text, true),
        TypeKind::Text => write_json_string(out, text),
        TypeKind::Array { element, delimiter } => write_array(out, element, *delimiter, text),
        TypeKind::Composite { fields } => write_composite(out, fields, text),
    }
}

/// True for text that is a JSON number as written (`-12`, `1.50`, `1e+30`), false for `NaN`,
/// `Infinity` and anything else.
pub fn is_json_number(s: &[u8]) -> bool {
    let mut i = 0;
    let n = s.len();
    if i < n && s[i] == b'-' {
        i += 1;
    }
    let int_start = i;
    while i < n && s[i].is_ascii_digit() {
        i += 1;
    }
    let int_len = i - int_start;
    if int_len == 0 || (int_len > 1 && s[int_start] == b'0') {
        return false;
    }
    if i < n && s[i] == b'.' {
        i += 1;
        let f = i;
        while i < n && s[i].is_ascii_digit() {
            i += 1;
        }
        if i == f {
            return false;
        }
    }
    if i < n && (s[i] == b'e' || s[i] == b'E') {
        i += 1;
        if i < n && (s[i] == b'+' || s[i] == b'-') {
            i += 1;
        }
        let e = i;
        while i < n && s[i].is_ascii_digit() {
            i += 1;
        }
        if i == e {
            return false;
        }
    }
    i == n
}

/// Appends `s` as a JSON string. Invalid UTF-8 is replaced, never passed through.
pub fn write_json_string(out: &mut Vec<u8>, s: &[u8]) {
    match std::str::from_utf8(s) {
        Ok(s) => write_json_str(out, s),
        Err(_) => write_json_str(out, &String::from_utf8_lossy(s)),
    }
}

pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    json_escaped(s, |piece| out.extend_from_slice(piece.as_bytes()));
    out.push(b'"');
}

/// [`write_json_str`] into a `String`: frames built from text need no UTF-8 check afterwards.
pub fn push_json_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    json_escaped(s, |piece| out.push_str(piece));
    out.push('"');
}

/// `s` as the inside of a JSON string, in pieces: runs of `s` and escapes.
fn json_escaped(s: &str, mut piece: impl FnMut(&str)) {
    const CONTROL: [&str; 32] = [
        "\\u0000", "\\u0001", "\\u0002", "\\u0003", "\\u0004", "\\u0005", "\\u0006", "\\u0007", "\\b", "\\t",
        "\\n", "\\u000b", "\\f", "\\r", "\\u000e", "\\u000f", "\\u0010", "\\u0011", "\\u0012", "\\u0013",
        "\\u0014", "\\u0015", "\\u0016", "\\u0017", "\\u0018", "\\u0019", "\\u001a", "\\u001b", "\\u001c",
        "\\u001d", "\\u001e", "\\u001f",
    ];
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0..=0x1f => CONTROL[usize::from(b)],
            _ => continue,
        };
        // `i` is at an ASCII byte, so both ends are character boundaries.
        piece(s.get(start..i).unwrap_or_default());
        piece(escape);
        start = i + 1;
    }
    piece(s.get(start..).unwrap_or_default());
}

/// `2024-01-02 03:04:05.6+00 BC` → `"2024-01-02T03:04:05.6+00:00 BC"`; `infinity` unchanged.
fn write_timestamp(out: &mut Vec<u8>, text: &[u8], with_zone: bool) {
    let Some(space) = text.iter().position(|&b| b == b' ') else {
        return write_json_string(out, text);
    };
    let mut s = Vec::with_capacity(text.len() + 3);
    s.extend_from_slice(&text[..space]);
    s.push(b'T');
    let rest = &text[space + 1..];
    // The time part ends at the zone (if any) or at " BC".
    let time_end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let (time, tail) = rest.split_at(time_end);
    if with_zone {
        if let Some(z) = time.iter().position(|&b| b == b'+' || b == b'-') {
            let (clock, zone) = time.split_at(z);
            s.extend_from_slice(clock);
            s.extend_from_slice(zone);
            if zone.len() == 3 {
                s.extend_from_slice(b":00");
            }
        } else {
            s.extend_from_slice(time);
        }
    } else {
        s.extend_from_slice(time);
    }
    s.extend_from_slice(tail);
    write_json_string(out, &s);
}

/// Renders an array literal (`{1,2}`, `[0:1]={{"a b",NULL}}`) as nested JSON arrays.
fn write_array(out: &mut Vec<u8>, element: &TypeInfo, delimiter: u8, text: &[u8]) {
    // Skip explicit bounds: to_jsonb ignores them.
    let body = match text.first() {
        Some(b'[') => match text.iter().position(|&b| b == b'=') {
            Some(eq) => &text[eq + 1..],
            None => text,
        },
        _ => text,
    };
    let start = out.len();
    let mut p = ArrayParser { s: body, i: 0, scratch: Vec::new() };
    if !p.value(out, element, delimiter) || p.i != body.len() {
        // Not an array literal after all: keep the text rather than emit broken JSON.
        out.truncate(start);
        write_json_string(out, text);
    }
}

struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
    scratch: Vec<u8>,
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// Parses one `{…}` level, writing it to `out`. Returns false on malformed input.
    fn value(&mut self, out: &mut Vec<u8>, element: &TypeInfo, delim: u8) -> bool {
        if self.peek() != Some(b'{') {
            return false;
        }
        self.i += 1;
        out.push(b'[');
        if self.peek() == Some(b'}') {
            self.i += 1;
            out.push(b']');
            return true;
        }
        let mut first = true;
        loop {
            if !first {
                out.push(b',');
            }
            first = false;
            match self.peek() {
                Some(b'{') => {
                    if !self.value(out, element, delim) {
                        return false;
                    }
                }
                Some(b'"') => {
                    self.i += 1;
                    self.scratch.clear();
                    loop {
                        match self.peek() {
                            Some(b'\\') => {
                                self.i += 1;
                                if let Some(c) = self.peek() {
                                    self.scratch.push(c);
                                    self.i += 1;
                                }
                            }
                            Some(b'"') => {
                                self.i += 1;
                                break;
                            }
                            Some(c) => {
                                self.scratch.push(c);
                                self.i += 1;
                            }
                            None => return false,
                        }
                    }
                    let scratch = std::mem::take(&mut self.scratch);
                    write_json(out, element, &scratch);
                    self.scratch = scratch;
                }
                Some(_) => {
                    let start = self.i;
                    while let Some(c) = self.peek() {
                        if c == delim || c == b'}' {
                            break;
                        }
                        self.i += 1;
                    }
                    let raw = &self.s[start..self.i];
                    if raw.eq_ignore_ascii_case(b"NULL") {
                        out.extend_from_slice(b"null");
                    } else {
                        write_json(out, element, raw);
                    }
                }
                None => return false,
            }
            match self.peek() {
                Some(c) if c == delim => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    out.push(b']');
                    return true;
                }
                _ => return false,
            }
        }
    }
}

/// Renders a record literal (`(1,"a b",)`) as an object of the composite's fields.
fn write_composite(out: &mut Vec<u8>, fields: &[(String, Arc<TypeInfo>)], text: &[u8]) {
    let inner = text.strip_prefix(b"(").and_then(|t| t.strip_suffix(b")")).unwrap_or(text);
    out.push(b'{');
    let mut i = 0;
    let mut scratch = Vec::new();
    for (n, (name, ty)) in fields.iter().enumerate() {
        if n > 0 {
            out.push(b',');
            // Skip the separator left by the previous field.
            if inner.get(i) == Some(&b',') {
                i += 1;
            }
        }
        write_json_str(out, name);
        out.push(b':');
        scratch.clear();
        let mut quoted = false;
        while let Some(&c) = inner.get(i) {
            match c {
                b',' if !quoted => break,
                b'"' if quoted && inner.get(i + 1) == Some(&b'"') => {
                    scratch.push(b'"');
                    i += 2;
                    continue;
                }
                b'"' => quoted = !quoted,
                b'\\' => {
                    i += 1;
                    if let Some(&e) = inner.get(i) {
                        scratch.push(e);
                    }
                }
                _ => scratch.push(c),
            }
            i += 1;
        }
        // An empty, never-quoted field is NULL; `""` is an empty string.
        let was_quoted_empty = scratch.is_empty() && inner.get(i.wrapping_sub(1)) == Some(&b'"');
        if scratch.is_empty() && !was_quoted_empty {
            out.extend_from_slice(b"null");
        } else {
            write_json(out, ty, &scratch);
        }
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape_what_json_requires_in_both_writers() {
        for s in ["", "plain", "a\"b\\c", "tab\tnl\ncr\r\u{8}\u{c}", "\u{0}\u{1f}\u{7f}", "é€😀\"", "\"\""]
        {
            let mut bytes = Vec::new();
            write_json_str(&mut bytes, s);
            let mut text = String::new();
            push_json_str(&mut text, s);
            assert_eq!(text.as_bytes(), bytes, "{s:?}");
            assert_eq!(serde_json::from_str::<String>(&text).unwrap(), s, "{text}");
        }
    }

    fn render(oid: u32, text: &str) -> String {
        let cat = TypeCatalog::default();
        let mut out = Vec::new();
        write_json(&mut out, cat.get(oid).unwrap(), text.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn scalars() {
        assert_eq!(render(16, "t"), "true");
        assert_eq!(render(16, "f"), "false");
        assert_eq!(render(23, "-42"), "-42");
        assert_eq!(render(1700, "1.50"), "1.50");
        assert_eq!(render(1700, "NaN"), "\"NaN\"");
        assert_eq!(render(701, "-Infinity"), "\"-Infinity\"");
        assert_eq!(render(701, "1e+30"), "1e+30");
        assert_eq!(render(26, "123"), "\"123\"");
        assert_eq!(render(25, "a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
        assert_eq!(render(3802, r#"{"a": [1, 2]}"#), r#"{"a": [1, 2]}"#);
    }

    #[test]
    fn timestamps() {
        assert_eq!(render(1114, "2024-01-02 03:04:05.5"), "\"2024-01-02T03:04:05.5\"");
        assert_eq!(render(1184, "2024-01-02 03:04:05+00"), "\"2024-01-02T03:04:05+00:00\"");
        assert_eq!(render(1184, "0044-03-15 12:00:00+00 BC"), "\"0044-03-15T12:00:00+00:00 BC\"");
        assert_eq!(render(1184, "2024-01-02 03:04:05+05:30"), "\"2024-01-02T03:04:05+05:30\"");
        assert_eq!(render(1184, "infinity"), "\"infinity\"");
        assert_eq!(render(1082, "2024-01-02"), "\"2024-01-02\"");
    }

    #[test]
    fn arrays() {
        assert_eq!(render(1007, "{1,2,NULL}"), "[1,2,null]");
        assert_eq!(render(1007, "{}"), "[]");
        assert_eq!(render(1007, "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(render(1007, "[0:1]={7,8}"), "[7,8]");
        assert_eq!(render(1009, r#"{"a,b","c\"d",NULL,"NULL",e}"#), r#"["a,b","c\"d",null,"NULL","e"]"#);
        assert_eq!(render(1185, r#"{"2024-01-02 03:04:05+00"}"#), r#"["2024-01-02T03:04:05+00:00"]"#);
        assert_eq!(render(3807, r#"{"{\"a\": 1}"}"#), r#"[{"a": 1}]"#);
    }

    #[test]
    fn composites() {
        let cat = TypeCatalog::default();
        let ty = TypeInfo {
            oid: 99999,
            name: "pair".into(),
            kind: TypeKind::Composite {
                fields: vec![
                    ("n".into(), Arc::clone(cat.get(23).unwrap())),
                    ("s".into(), Arc::clone(cat.get(25).unwrap())),
                    ("z".into(), Arc::clone(cat.get(25).unwrap())),
                ],
            },
        };
        let mut out = Vec::new();
        write_json(&mut out, &ty, br#"(1,"a ""b"", c",)"#);
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"n":1,"s":"a \"b\", c","z":null}"#);
        let mut out = Vec::new();
        write_json(&mut out, &ty, br#"(,"",x)"#);
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"n":null,"s":"","z":"x"}"#);
    }

    #[test]
    fn json_numbers() {
        for ok in ["0", "-0", "12", "1.5", "1e5", "1E-05", "-0.001"] {
            assert!(is_json_number(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "-", "01", "1.", ".5", "NaN", "Infinity", "1e", "1x", "+1"] {
            assert!(!is_json_number(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn malformed_arrays_never_panic() {
        for s in ["{", "{\"a", "{1,", "{{1}", "[1:2", "}", "{\\", "{\"\\"] {
            let _ = render(1009, s);
        }
    }
}
