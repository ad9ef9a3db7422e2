//! Partition ownership among job replicas, with leases in a NATS KV bucket
//! whose entries expire `ttl` after their last write.
//!
//! - Every member writes `member.<id>` each tick (ttl/3); a member that stops
//!   disappears from the bucket after `ttl`.
//! - Partition `p` is owned by whoever created `partition.<p>`. The owner
//!   renews it each tick with a compare-and-set on its revision; a failed
//!   renewal means someone else owns it now. An owner that cannot renew for
//!   most of `ttl` gives the partition up by itself, before the lease can
//!   expire on the server.
//! - Each partition has a preferred owner among the live members
//!   (rendezvous hashing), so partitions spread evenly and only the
//!   partitions that must move do move when members come and go. A free
//!   partition is claimed by its preferred member, or by anyone once it has
//!   stayed free for two ticks; an owner that is not preferred hands the
//!   partition over.
//! - The revision of the claim is the owner's generation: it only grows, so
//!   comets use it as a fencing token.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::TryStreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Nats, stable_hash};

const MEMBER_PREFIX: &str = "member.";
const PARTITION_PREFIX: &str = "partition.";
/// Free ticks after which any member may claim a partition.
const FREE_TICKS: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    Acquired { partition: u32, generation: u64 },
    Lost { partition: u32 },
}

struct Owned {
    revision: u64,
    renewed: Instant,
}

/// The member that should own `partition` among `members`.
pub fn preferred(partition: u32, members: &[String]) -> Option<&str> {
    members
        .iter()
        .max_by_key(|member| stable_hash(&[member.as_bytes(), &partition.to_be_bytes()]))
        .map(String::as_str)
}

fn partition_key(partition: u32) -> String {
    format!("{PARTITION_PREFIX}{partition}")
}

/// Runs the lease manager until `stop`; then releases every lease.
pub fn spawn(
    nats: Nats,
    member: String,
    partitions: u32,
    ttl: Duration,
    stop: CancellationToken,
) -> (mpsc::Receiver<LeaseEvent>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(usize::try_from(partitions).unwrap_or(1024).max(1) * 2);
    let manager = Manager {
        nats,
        store: None,
        failed_ticks: 0,
        member,
        partitions,
        ttl,
        tx,
        owned: HashMap::new(),
        free_ticks: HashMap::new(),
    };
    (rx, tokio::spawn(manager.run(stop)))
}

struct Manager {
    nats: Nats,
    /// The lease bucket; opened again (and created if it vanished, as a
    /// memory-backed bucket does when NATS restarts) after failed ticks.
    store: Option<kv::Store>,
    failed_ticks: u32,
    member: String,
    partitions: u32,
    ttl: Duration,
    tx: mpsc::Sender<LeaseEvent>,
    owned: HashMap<u32, Owned>,
    free_ticks: HashMap<u32, u32>,
}

impl Manager {
    async fn run(mut self, stop: CancellationToken) {
        let tick = self.ttl / 3;
        loop {
            self.tick().await;
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
            }
        }
        self.release_all().await;
    }

    async fn emit(&self, event: LeaseEvent) {
        let _ = self.tx.send(event).await;
    }

    async fn members(&self, store: &kv::Store) -> Option<Vec<String>> {
        let keys = store.keys().await.ok()?;
        let mut members: Vec<String> = keys
            .try_filter_map(
                |key| async move { Ok(key.strip_prefix(MEMBER_PREFIX).map(str::to_string)) },
            )
            .try_collect()
            .await
            .ok()?;
        if !members.contains(&self.member) {
            members.push(self.member.clone());
        }
        members.sort();
        Some(members)
    }

    async fn open_store(&mut self) -> Option<kv::Store> {
        if self.store.is_none() || self.failed_ticks >= 2 {
            let config = self.nats.config();
            match self
                .nats
                .bucket(
                    &config.buckets.leases,
                    self.ttl,
                    pushcluster_api::config::Storage::File,
                )
                .await
            {
                Ok(store) => {
                    self.store = Some(store);
                    self.failed_ticks = 0;
                }
                Err(error) => tracing::debug!(%error, "cannot open the lease bucket"),
            }
        }
        self.store.clone()
    }

    async fn tick(&mut self) {
        let store = self.open_store().await;
        let member_key = format!("{MEMBER_PREFIX}{}", self.member);
        if let Some(store) = &store
            && let Err(error) = store.put(&member_key, Bytes::new()).await
        {
            tracing::debug!(%error, "lease heartbeat failed");
        }
        // Give up what could not be renewed in time, before it can expire
        // on the server and be claimed by another member.
        let deadline = self.ttl.mul_f64(0.8);
        let expired: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, owned)| owned.renewed.elapsed() > deadline)
            .map(|(p, _)| *p)
            .collect();
        for partition in expired {
            tracing::warn!(
                partition,
                "partition lease not renewed in time; giving it up"
            );
            self.owned.remove(&partition);
            self.emit(LeaseEvent::Lost { partition }).await;
        }
        let members = match &store {
            Some(store) => self.members(store).await,
            None => None,
        };
        let Some(members) = members else {
            self.failed_ticks += 1;
            return;
        };
        self.failed_ticks = 0;
        let live: HashSet<&str> = members.iter().map(String::as_str).collect();
        for partition in 0..self.partitions {
            let preferred = preferred(partition, &members);
            if self.owned.contains_key(&partition) {
                let hand_over = preferred.is_some_and(|p| p != self.member && live.contains(p));
                if hand_over {
                    self.release(partition).await;
                } else {
                    self.renew(partition).await;
                }
            } else {
                self.maybe_claim(partition, preferred == Some(self.member.as_str()))
                    .await;
            }
        }
    }

    async fn renew(&mut self, partition: u32) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let Some(owned) = self.owned.get_mut(&partition) else {
            return;
        };
        let key = partition_key(partition);
        match store
            .update(&key, Bytes::from(self.member.clone()), owned.revision)
            .await
        {
            Ok(revision) => {
                owned.revision = revision;
                owned.renewed = Instant::now();
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                tracing::warn!(partition, "partition lease taken over");
                self.owned.remove(&partition);
                self.emit(LeaseEvent::Lost { partition }).await;
            }
            // A timeout: try again next tick until the lease would expire.
            Err(error) => tracing::debug!(partition, %error, "lease renewal failed"),
        }
    }

    async fn maybe_claim(&mut self, partition: u32, preferred: bool) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let key = partition_key(partition);
        let free = match store.entry(&key).await {
            Ok(None) => true,
            Ok(Some(entry)) => entry.operation != kv::Operation::Put,
            Err(_) => return,
        };
        if !free {
            self.free_ticks.remove(&partition);
            return;
        }
        let ticks = self.free_ticks.entry(partition).or_insert(0);
        *ticks += 1;
        if !preferred && *ticks <= FREE_TICKS {
            return;
        }
        match store.create(&key, Bytes::from(self.member.clone())).await {
            Ok(revision) => {
                self.free_ticks.remove(&partition);
                self.owned.insert(
                    partition,
                    Owned {
                        revision,
                        renewed: Instant::now(),
                    },
                );
                tracing::info!(partition, generation = revision, "partition lease acquired");
                self.emit(LeaseEvent::Acquired {
                    partition,
                    generation: revision,
                })
                .await;
            }
            Err(error) => tracing::debug!(partition, %error, "partition claimed by another member"),
        }
    }

    /// Stops consuming, then frees the lease for its preferred owner.
    async fn release(&mut self, partition: u32) {
        let Some(owned) = self.owned.remove(&partition) else {
            return;
        };
        self.emit(LeaseEvent::Lost { partition }).await;
        tracing::info!(partition, "handing partition over");
        let key = partition_key(partition);
        let Some(store) = self.store.clone() else {
            return;
        };
        if let Err(error) = store
            .delete_expect_revision(&key, Some(owned.revision))
            .await
        {
            tracing::debug!(partition, %error, "lease release failed; it expires instead");
        }
    }

    async fn release_all(&mut self) {
        let partitions: Vec<u32> = self.owned.keys().copied().collect();
        for partition in partitions {
            self.release(partition).await;
        }
        let member_key = format!("{MEMBER_PREFIX}{}", self.member);
        if let Some(store) = &self.store {
            let _ = store.delete(&member_key).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn partitions_spread_over_members() {
        let members = members(&["job-a", "job-b", "job-c"]);
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for partition in 0..300 {
            *counts
                .entry(preferred(partition, &members).expect("member"))
                .or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(
            counts.values().all(|c| (60..=140).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn only_the_leavers_partitions_move() {
        let three = members(&["job-a", "job-b", "job-c"]);
        let two = members(&["job-a", "job-b"]);
        for partition in 0..200 {
            let before = preferred(partition, &three).expect("member");
            let after = preferred(partition, &two).expect("member");
            if before != "job-c" {
                assert_eq!(before, after, "partition {partition} moved needlessly");
            }
        }
        assert_eq!(preferred(0, &[]), None);
    }
}
