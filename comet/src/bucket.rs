//! Buckets: key → connection, sharded by a hash of the key (goim: 32
//! buckets). A key lives on at most one connection per comet: a newer
//! connection with the same key replaces the older one.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use crate::channel::Channel;

pub struct Buckets {
    shards: Vec<Mutex<HashMap<String, Arc<Channel>>>>,
    hasher: RandomState,
}

impl Buckets {
    pub fn new(size: usize) -> Self {
        Buckets {
            shards: (0..size.max(1))
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Arc<Channel>>> {
        let index = self.hasher.hash_one(key) as usize % self.shards.len();
        &self.shards[index]
    }

    /// Stores the channel under its key; returns the channel it replaced.
    pub fn put(&self, channel: Arc<Channel>) -> Option<Arc<Channel>> {
        self.shard(&channel.key)
            .lock()
            .ok()?
            .insert(channel.key.clone(), channel)
    }

    /// Removes the channel if its key still maps to it (not to a newer one).
    pub fn remove(&self, channel: &Channel) -> bool {
        let Ok(mut shard) = self.shard(&channel.key).lock() else {
            return false;
        };
        if shard.get(&channel.key).is_some_and(|c| c.id == channel.id) {
            shard.remove(&channel.key);
            true
        } else {
            false
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Channel>> {
        self.shard(key).lock().ok()?.get(key).cloned()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The channels of one shard, copied so no lock is held while using them.
    pub fn shard_channels(&self, index: usize) -> Vec<Arc<Channel>> {
        self.shards
            .get(index)
            .and_then(|s| s.lock().ok())
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn all_channels(&self) -> Vec<Arc<Channel>> {
        (0..self.shards.len())
            .flat_map(|i| self.shard_channels(i))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::TransportKind;
    use std::net::IpAddr;

    fn channel(id: u64, key: &str) -> Arc<Channel> {
        Arc::new(Channel::new(
            id,
            key.into(),
            0,
            IpAddr::from([127, 0, 0, 1]),
            TransportKind::Tcp,
            8,
            &[],
        ))
    }

    #[test]
    fn newer_connection_replaces_and_old_removal_keeps_it() {
        let buckets = Buckets::new(32);
        let old = channel(1, "k");
        let new = channel(2, "k");
        assert!(buckets.put(old.clone()).is_none());
        let replaced = buckets.put(new.clone()).expect("replaced");
        assert_eq!(replaced.id, 1);
        assert!(!buckets.remove(&old), "old must not remove the new one");
        assert_eq!(buckets.get("k").map(|c| c.id), Some(2));
        assert!(buckets.remove(&new));
        assert!(buckets.is_empty());
    }
}
