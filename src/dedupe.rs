//! The idempotency window: the last `dedupe_window` drawn requests, keyed by `message_id`.
//!
//! A `message_id` is remembered as a 128-bit XXH3 hash (`MessageKey`), not as the string: the
//! window is persisted in every snapshot, and 16 bytes per entry keep a 100,000-entry window
//! small. The keys are already uniformly distributed, so maps use an identity hasher instead of
//! SipHash.
//!
//! Two windows of the same size are kept in step: the engine's (key → outcome, durable) and
//! ingest's (key → request ID, including requests still in flight). Both evict in request-ID
//! order, and request IDs are drawn in the order ingest hands them out, so when a repeat that
//! ingest recognised reaches the engine, the engine still holds the first request's outcome.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

pub type MessageKey = u128;

pub fn message_key(message_id: &str) -> MessageKey {
    xxhash_rust::xxh3::xxh3_128(message_id.as_bytes())
}

pub fn key_to_hex(key: MessageKey) -> String {
    format!("{key:032x}")
}

pub fn key_from_hex(hex: &str) -> Option<MessageKey> {
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(hex, 16).ok()
}

/// Identity hasher for keys that are already hashes.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, key: u128) {
        self.0 = (key as u64) ^ ((key >> 64) as u64);
    }
}

pub type KeyMap<V> = HashMap<MessageKey, V, BuildHasherDefault<KeyHasher>>;

/// A bounded FIFO map: inserting beyond `capacity` evicts the oldest entry.
#[derive(Clone, Debug)]
pub struct Window<V> {
    capacity: usize,
    map: KeyMap<V>,
    /// Insertion order, with a copy of each value so iterating needs no hash lookups (a
    /// snapshot copies the window while the engine waits).
    order: VecDeque<(MessageKey, V)>,
}

impl<V: Clone> Window<V> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0);
        Window {
            capacity,
            // Twice the entries: FIFO eviction leaves tombstones; room keeps probes short.
            map: KeyMap::with_capacity_and_hasher(
                (capacity + 1).min(1 << 21) * 2,
                Default::default(),
            ),
            order: VecDeque::with_capacity(capacity.min(1 << 20)),
        }
    }

    /// A window of the same bound that allocates as it fills, for keys that are rare (admin
    /// commands): no up-front memory for a capacity it will likely never reach.
    pub fn sparse(capacity: usize) -> Self {
        assert!(capacity > 0);
        Window {
            capacity,
            map: KeyMap::default(),
            order: VecDeque::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn get(&self, key: &MessageKey) -> Option<&V> {
        self.map.get(key)
    }

    pub fn contains(&self, key: &MessageKey) -> bool {
        self.map.contains_key(key)
    }

    /// Inserts a key that is not present; returns the evicted oldest entry, if any.
    pub fn insert(&mut self, key: MessageKey, value: V) -> Option<(MessageKey, V)> {
        let mut evicted = None;
        if self.order.len() == self.capacity {
            let (old, _) = self.order.pop_front().expect("window is full");
            let v = self.map.remove(&old).expect("window map and order agree");
            evicted = Some((old, v));
        }
        let previous = self.map.insert(key, value.clone());
        assert!(previous.is_none(), "key inserted twice into the window");
        self.order.push_back((key, value));
        debug_assert_eq!(self.map.len(), self.order.len());
        evicted
    }

    /// Inserts `key` unless present (one hash lookup); evicts the oldest entry when full.
    /// Returns false, changing nothing, when the key is already there.
    pub fn try_insert(&mut self, key: MessageKey, value: V) -> bool {
        match self.map.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => return false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(value.clone());
            }
        }
        self.order.push_back((key, value));
        if self.order.len() > self.capacity {
            let (old, _) = self.order.pop_front().expect("window is over capacity");
            self.map.remove(&old).expect("window map and order agree");
        }
        debug_assert_eq!(self.map.len(), self.order.len());
        true
    }

    /// Entries oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (MessageKey, &V)> {
        self.order.iter().map(|(k, v)| (*k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_first() {
        let mut w = Window::new(3);
        for k in 1..=3u128 {
            assert!(w.insert(k, k as u64).is_none());
        }
        assert_eq!(w.insert(4, 4), Some((1, 1)));
        assert!(!w.contains(&1));
        assert_eq!(w.iter().map(|(k, _)| k).collect::<Vec<_>>(), vec![2, 3, 4]);
    }

    proptest::proptest! {
        /// The window behaves exactly like "the last `capacity` distinct inserts".
        #[test]
        fn matches_a_naive_model(cap in 1usize..8, keys in proptest::collection::vec(0u128..12, 0..200)) {
            let mut w = Window::new(cap);
            let mut model: VecDeque<(u128, u64)> = VecDeque::new();
            for (i, k) in keys.into_iter().enumerate() {
                let in_model = model.iter().any(|(mk, _)| *mk == k);
                proptest::prop_assert_eq!(w.try_insert(k, i as u64), !in_model);
                if !in_model {
                    model.push_back((k, i as u64));
                    if model.len() > cap {
                        model.pop_front();
                    }
                }
                for key in 0u128..12 {
                    let want = model.iter().find(|(mk, _)| *mk == key).map(|(_, v)| v);
                    proptest::prop_assert_eq!(w.get(&key), want);
                }
                let order: Vec<(u128, u64)> = w.iter().map(|(k, v)| (k, *v)).collect();
                proptest::prop_assert_eq!(order, model.iter().copied().collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn hex_roundtrip() {
        let k = message_key("m-17");
        assert_eq!(key_from_hex(&key_to_hex(k)), Some(k));
        assert_eq!(key_from_hex("zz"), None);
    }
}
