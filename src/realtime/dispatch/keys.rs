//! The dispatcher's cache keys: binding ids kept inline for the common case of a few, a
//! `select` list compared by content, and a one-multiplication hasher for maps keyed by
//! interned pointers (on the per-member path).
//!
//! Must not: know about members, changes or frames.

use std::sync::Arc;

/// A `select` column list, compared by content.
pub(super) type Select = Option<Arc<[Arc<str>]>>;

/// Binding ids as a cache key, inline for the common case of a few.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Ids {
    Inline([u32; 4], u8),
    Heap(Vec<u32>),
}

impl Ids {
    pub(super) fn of(ids: &[u32]) -> Ids {
        if ids.len() <= 4 {
            let mut a = [0; 4];
            a[..ids.len()].copy_from_slice(ids);
            Ids::Inline(a, ids.len() as u8)
        } else {
            Ids::Heap(ids.to_vec())
        }
    }

    pub(super) fn push(&mut self, id: u32) {
        match self {
            Ids::Inline(a, n) if (*n as usize) < a.len() => {
                a[*n as usize] = id;
                *n += 1;
            }
            Ids::Inline(a, n) => {
                let mut v = a[..*n as usize].to_vec();
                v.push(id);
                *self = Ids::Heap(v);
            }
            Ids::Heap(v) => v.push(id),
        }
    }

    pub(super) fn as_slice(&self) -> &[u32] {
        match self {
            Ids::Inline(a, n) => &a[..*n as usize],
            Ids::Heap(v) => v,
        }
    }
}

/// Hashes addresses (`usize` keys) with one multiplication: the maps keyed by interned
/// pointers are on the per-member path.
#[derive(Default, Clone, Copy)]
pub(super) struct PtrHasher(u64);

impl std::hash::Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}

pub(super) type PtrHash = std::hash::BuildHasherDefault<PtrHasher>;

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn ids_built_by_pushing_equal_ids_built_at_once() {
        for n in 1..=9u32 {
            let all: Vec<u32> = (1..=n).collect();
            let mut pushed = Ids::of(&all[..1]);
            for id in &all[1..] {
                pushed.push(*id);
            }
            assert_eq!(pushed, Ids::of(&all), "{n} ids");
            assert_eq!(pushed.as_slice(), &all[..]);
            assert_eq!(matches!(pushed, Ids::Inline(..)), n <= 4, "{n} ids kept inline only up to 4");
        }
        assert_ne!(Ids::of(&[1, 2]), Ids::of(&[2, 1]));
        assert_ne!(Ids::of(&[1]), Ids::of(&[1, 0]));
    }

    #[test]
    fn pointer_hashes_spread_neighbouring_addresses() {
        let hash = |n: usize| PtrHash::default().hash_one(n);
        let base = 0x7f00_1234_5670usize;
        let hashes: std::collections::HashSet<u64> = (0..1024).map(|i| hash(base + i * 64) >> 54).collect();
        // Addresses 64 bytes apart land in many of the top-bits buckets, not a handful.
        assert!(hashes.len() > 500, "{} buckets of 1024", hashes.len());
        assert_ne!(hash(base), hash(base + 8));
    }
}
