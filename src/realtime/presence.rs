//! Presence: per topic, who is tracked under which key, with one meta per tracking member.
//!
//! Owns: the presence table of a topic, applying diffs to it, and rendering the state and diffs
//! as the JSON the Phoenix presence clients expect (`{"<key>":{"metas":[{"phx_ref":…,…}]}}`,
//! `{"joins":{…},"leaves":{…}}`). Must not: deliver anything (the registry does) or decide who
//! may track (the session does).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::realtime::member::MemberId;

/// One tracked presence: a member's payload under a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceMeta {
    /// Unique per track; clients tell metas apart by it.
    pub phx_ref: Arc<str>,
    /// The member that tracked it (its leave removes it).
    pub member: MemberId,
    /// The user's payload as a JSON object, without `phx_ref` keys: compared to detect no-op
    /// re-tracks.
    pub payload: Bytes,
    /// The meta object clients see: `{"phx_ref":…,["phx_ref_prev":…,]…payload}`.
    pub json: Bytes,
}

impl PresenceMeta {
    /// Builds a meta from a payload object.
    pub fn new(
        phx_ref: Arc<str>,
        prev: Option<&str>,
        member: MemberId,
        mut payload: Map<String, Value>,
    ) -> Self {
        payload.remove("phx_ref");
        payload.remove("phx_ref_prev");
        let body = serde_json::to_vec(&payload).unwrap_or_else(|_| b"{}".to_vec());
        let mut json = Vec::with_capacity(body.len() + 64);
        json.extend_from_slice(b"{\"phx_ref\":");
        push_json_str(&mut json, &phx_ref);
        if let Some(prev) = prev {
            json.extend_from_slice(b",\"phx_ref_prev\":");
            push_json_str(&mut json, prev);
        }
        if body.len() > 2 {
            json.push(b',');
            json.extend_from_slice(&body[1..]);
        } else {
            json.push(b'}');
        }
        PresenceMeta { phx_ref, member, payload: Bytes::from(body), json: Bytes::from(json) }
    }
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly as JSON requires.
    out.extend_from_slice(serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()).as_bytes());
}

/// Joins and leaves to apply to a topic's presence table, in one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceDiff {
    pub joins: Vec<(Arc<str>, PresenceMeta)>,
    pub leaves: Vec<(Arc<str>, PresenceMeta)>,
}

impl PresenceDiff {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// `{"joins":{key:{"metas":[…]}},"leaves":{…}}`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(b"{\"joins\":");
        write_grouped(&mut out, self.joins.iter().map(|(k, m)| (k, m)));
        out.extend_from_slice(b",\"leaves\":");
        write_grouped(&mut out, self.leaves.iter().map(|(k, m)| (k, m)));
        out.push(b'}');
        out
    }
}

/// Writes `{key:{"metas":[…]},…}`, grouping consecutive or scattered metas of one key.
fn write_grouped<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = (&'a Arc<str>, &'a PresenceMeta)>) {
    let mut grouped: BTreeMap<&Arc<str>, Vec<&PresenceMeta>> = BTreeMap::new();
    for (k, m) in items {
        grouped.entry(k).or_default().push(m);
    }
    out.push(b'{');
    for (i, (key, metas)) in grouped.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_key(out, key, metas.iter().copied());
    }
    out.push(b'}');
}

fn write_key<'a>(out: &mut Vec<u8>, key: &str, metas: impl Iterator<Item = &'a PresenceMeta>) {
    push_json_str(out, key);
    out.extend_from_slice(b":{\"metas\":[");
    for (j, m) in metas.enumerate() {
        if j > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&m.json);
    }
    out.extend_from_slice(b"]}");
}

/// The presence state of one topic.
#[derive(Debug, Default)]
pub struct PresenceTable {
    keys: BTreeMap<Arc<str>, Vec<PresenceMeta>>,
}

impl PresenceTable {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of metas.
    pub fn len(&self) -> usize {
        self.keys.values().map(Vec::len).sum()
    }

    /// Applies leaves then joins (a changed payload is a leave of the old meta and a join of the
    /// new one in one diff). Leaves of metas not present and joins of metas already present are
    /// ignored, so applying a diff twice changes nothing.
    pub fn apply(&mut self, diff: &PresenceDiff) {
        for (key, meta) in &diff.leaves {
            if let Some(metas) = self.keys.get_mut(key) {
                metas.retain(|m| m.phx_ref != meta.phx_ref);
                if metas.is_empty() {
                    self.keys.remove(key);
                }
            }
        }
        for (key, meta) in &diff.joins {
            let metas = self.keys.entry(Arc::clone(key)).or_default();
            if !metas.iter().any(|m| m.phx_ref == meta.phx_ref) {
                metas.push(meta.clone());
            }
        }
    }

    /// The metas a member holds (a member tracks at most one key).
    pub fn of_member(&self, member: MemberId) -> Vec<(Arc<str>, PresenceMeta)> {
        self.metas_where(|m| m.member == member)
    }

    /// The metas that satisfy `pred`, with their keys.
    pub fn metas_where(&self, pred: impl Fn(&PresenceMeta) -> bool) -> Vec<(Arc<str>, PresenceMeta)> {
        self.keys
            .iter()
            .flat_map(|(k, metas)| metas.iter().filter(|m| pred(m)).map(|m| (Arc::clone(k), m.clone())))
            .collect()
    }

    /// `{"<key>":{"metas":[…]},…}`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.len() * 64);
        out.push(b'{');
        for (i, (key, metas)) in self.keys.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_key(&mut out, key, metas.iter());
        }
        out.push(b'}');
        out
    }
}

/// A presence reference: unique within this process and unlikely to collide across nodes.
pub fn new_ref(counter: u64, node: u64) -> Arc<str> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut n = (u128::from(node) << 64) | u128::from(counter);
    let mut s = String::with_capacity(22);
    for _ in 0..16 {
        s.push(ALPHABET[(n & 63) as usize] as char);
        n >>= 6;
    }
    s.into()
}

/// A random (version 4) UUID, used as the presence key when the client gives none.
pub fn random_uuid() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn meta(r: &str, member: MemberId, payload: Value) -> PresenceMeta {
        let Value::Object(map) = payload else { panic!("object") };
        PresenceMeta::new(r.into(), None, member, map)
    }

    #[test]
    fn state_and_diffs_render_as_phoenix_presence() {
        let mut t = PresenceTable::default();
        let a1 = meta("r1", 1, json!({"user": "a", "phx_ref": "spoofed"}));
        let a2 = meta("r2", 2, json!({}));
        let b = meta("r3", 3, json!({"user": "b"}));
        let diff = PresenceDiff {
            joins: vec![("a".into(), a1.clone()), ("a".into(), a2), ("b".into(), b.clone())],
            leaves: vec![],
        };
        t.apply(&diff);
        t.apply(&diff);
        let state: Value = serde_json::from_slice(&t.to_json()).unwrap();
        assert_eq!(
            state,
            json!({"a": {"metas": [{"phx_ref": "r1", "user": "a"}, {"phx_ref": "r2"}]},
                   "b": {"metas": [{"phx_ref": "r3", "user": "b"}]}})
        );
        let d: Value = serde_json::from_slice(&diff.to_json()).unwrap();
        assert_eq!(d["joins"]["a"]["metas"].as_array().map(Vec::len), Some(2));
        assert_eq!(d["leaves"], json!({}));

        let leave = PresenceDiff { joins: vec![], leaves: vec![("a".into(), a1)] };
        t.apply(&leave);
        t.apply(&leave);
        assert_eq!(t.len(), 2);
        assert_eq!(t.of_member(2).len(), 1);
        let changed = PresenceMeta::new("r4".into(), Some("r3"), 3, Map::new());
        t.apply(&PresenceDiff { joins: vec![("b".into(), changed)], leaves: vec![("b".into(), b)] });
        let state: Value = serde_json::from_slice(&t.to_json()).unwrap();
        assert_eq!(state["b"], json!({"metas": [{"phx_ref": "r4", "phx_ref_prev": "r3"}]}));
    }

    #[test]
    fn refs_and_uuids() {
        assert_ne!(new_ref(1, 7), new_ref(2, 7));
        assert_ne!(new_ref(1, 7), new_ref(1, 8));
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
    }
}
