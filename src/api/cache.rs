//! A small time-bounded cache for what the API reads on every request (API keys by digest,
//! kinds by name). An entry is trusted for `ttl`, then read again; this process drops an
//! entry at once when it changes it (a revoked key, an edited kind), other processes within
//! `ttl`. Only found entries are kept: an unknown key or kind is looked up every time, so a
//! key or kind created a moment ago works at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most entries kept; past it the cache starts over (keys and kinds are few in practice).
const ENTRIES_MAX: usize = 10_000;

#[derive(Debug)]
pub struct TtlCache<V> {
    ttl: Duration,
    entries: Mutex<HashMap<String, (V, Instant)>>,
}

impl<V: Clone> TtlCache<V> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The entry, if it was stored less than `ttl` ago.
    pub fn get(&self, key: &str) -> Option<V> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.lock().expect("cache lock");
        entries
            .get(key)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(v, _)| v.clone())
    }

    pub fn put(&self, key: &str, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= ENTRIES_MAX {
            entries.clear();
        }
        entries.insert(key.to_owned(), (value, Instant::now()));
    }

    /// Drops every entry `pred` matches.
    pub fn forget(&self, pred: impl Fn(&V) -> bool) {
        self.entries
            .lock()
            .expect("cache lock")
            .retain(|_, (v, _)| !pred(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_can_be_forgotten() {
        let c = TtlCache::new(Duration::from_millis(50));
        c.put("a", 1);
        c.put("b", 2);
        assert_eq!(c.get("a"), Some(1));
        c.forget(|v| *v == 1);
        assert_eq!((c.get("a"), c.get("b")), (None, Some(2)));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.get("b"), None);
        let off = TtlCache::new(Duration::ZERO);
        off.put("a", 1);
        assert_eq!(off.get("a"), None);
    }
}
