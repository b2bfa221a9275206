//! Counts of what each key holds now (connections of a source, requests in
//! flight of a client), each given back when its guard drops. Only keys that
//! hold something have an entry, so a tally never outgrows what it counts.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex, PoisonError},
};

/// Holdings by key.
#[derive(Debug)]
pub struct Tally<K> {
    /// Hashed with a process-random seed: the keys are clients'. `foldhash`
    /// resists a flood of colliding keys less than `SipHash` does, but only
    /// keys that hold something have an entry, so the map is as large as
    /// the connection and in-flight caps at most.
    held: Mutex<HashMap<K, usize, foldhash::fast::RandomState>>,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Self {
            held: Mutex::new(HashMap::default()),
        }
    }
}

impl<K: Hash + Eq + Copy> Tally<K> {
    /// One more for `key`, or `None` when it already holds `limit`.
    pub fn acquire(self: &Arc<Self>, key: K, limit: usize) -> Option<Held<K>> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(key).or_insert(0);
        if *count >= limit {
            if *count == 0 {
                held.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(Held {
            tally: self.clone(),
            key,
        })
    }

    /// What `key` holds now.
    #[must_use]
    pub fn held(&self, key: K) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Keys holding something now.
    #[cfg(test)]
    #[must_use]
    pub fn keys(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One thing a key holds; given back when dropped.
#[derive(Debug)]
pub struct Held<K: Hash + Eq + Copy> {
    tally: Arc<Tally<K>>,
    key: K,
}

impl<K: Hash + Eq + Copy> Drop for Held<K> {
    fn drop(&mut self) {
        let mut held = self
            .tally
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_limit_and_what_it_held_comes_back() {
        let tally = Arc::new(Tally::<u8>::default());
        let first = tally.acquire(1, 2).expect("first");
        let second = tally.acquire(1, 2).expect("second");
        assert!(tally.acquire(1, 2).is_none(), "over the limit");
        let other = tally.acquire(2, 2).expect("another key is not affected");
        assert_eq!(tally.held(1), 2);
        drop(first);
        assert_eq!(tally.held(1), 1);
        let third = tally.acquire(1, 2).expect("given back");
        drop((second, third, other));
        assert_eq!(tally.held(1), 0);
        assert_eq!(tally.keys(), 0, "no entry kept for keys holding nothing");
        assert!(tally.acquire(3, 0).is_none());
        assert_eq!(tally.keys(), 0, "a refusal leaves no entry");
    }
}
