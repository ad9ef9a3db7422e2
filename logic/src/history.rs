//! History reads for resuming clients: at most `history.replay.concurrency`
//! at once, and shared between identical requests.
//!
//! After a comet is lost, its clients come back at about the same time,
//! most of them from the same position in the same room. A request that
//! arrives while an identical read still waits for its slot joins that
//! read instead of queueing its own. Joining is only allowed before the
//! read starts, so the read always begins after the joiner asked — after
//! its client joined the room — and returns everything that client must
//! get (the seam between replay and live, `comet/src/resume.rs`, depends
//! on it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use pushcluster_backplane::bus::{Bus, BusError, RoomHistory, Since};
use tokio::sync::{Semaphore, oneshot};

/// A read's outcome, shared by everyone who asked for it.
pub type Read = Result<Arc<RoomHistory>, BusError>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ReadKey {
    room: String,
    since: Option<(u64, u64)>,
}

type Waiters = Vec<oneshot::Sender<Read>>;

pub struct HistoryReads {
    slots: Semaphore,
    /// Reads waiting for a slot, with who else waits for them.
    waiting: Mutex<HashMap<ReadKey, Waiters>>,
}

impl HistoryReads {
    pub fn new(concurrency: usize) -> Self {
        HistoryReads {
            slots: Semaphore::new(concurrency.max(1)),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<ReadKey, Waiters>> {
        // Every change is one insert, push or remove: never half-done.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `room`'s history after `since`; `true` when another request's read
    /// was shared.
    pub async fn read(
        &self,
        bus: &dyn Bus,
        room: &str,
        since: Option<Since>,
        max_bytes: usize,
    ) -> (Read, bool) {
        let key = ReadKey {
            room: room.to_string(),
            since: since.map(|s| (s.epoch, s.offset)),
        };
        let joined = {
            let mut waiting = self.waiting();
            match waiting.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    waiting.insert(key.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = joined {
            let read = rx.await.unwrap_or_else(|_| {
                Err(BusError::Unavailable(
                    "the shared history read was abandoned".into(),
                ))
            });
            return (read, true);
        }
        let mut leader = Leader {
            reads: self,
            key: Some(key),
        };
        let Ok(_slot) = self.slots.acquire().await else {
            return (Err(BusError::Closed), false);
        };
        // From here on nobody joins: the read starts after every waiter asked.
        let waiters = leader.start();
        let read = bus.room_history(room, since, max_bytes).await.map(Arc::new);
        for waiter in waiters {
            let _ = waiter.send(read.clone());
        }
        (read, false)
    }
}

/// The request that reads for a key. Dropped before its read started (its
/// caller gave up), it takes the key away, so its waiters are told and
/// later requests read for themselves.
struct Leader<'a> {
    reads: &'a HistoryReads,
    key: Option<ReadKey>,
}

impl Leader<'_> {
    fn start(&mut self) -> Waiters {
        self.key
            .take()
            .and_then(|key| self.reads.waiting().remove(&key))
            .unwrap_or_default()
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.reads.waiting().remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushcluster_backplane::bus::MemoryBus;
    use std::time::Duration;

    /// Requests that arrive while an identical read waits for its slot
    /// share it; one that arrives after the read started reads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_waiting_reads_are_shared_and_started_ones_are_not() {
        let bus = MemoryBus::default();
        let reads = Arc::new(HistoryReads::new(1));
        // Hold the only slot, so the next reads wait.
        let slot = reads.slots.acquire().await.expect("slot");
        let since = Some(Since {
            epoch: 1,
            offset: 0,
        });
        let spawn = |room: &'static str| {
            let (reads, bus) = (reads.clone(), bus.clone());
            tokio::spawn(async move { reads.read(&bus, room, since, 1 << 20).await.1 })
        };
        let waiting_for = |room: &str| {
            reads
                .waiting()
                .get(&ReadKey {
                    room: room.into(),
                    since: Some((1, 0)),
                })
                .map(Vec::len)
        };
        let until = |check: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !check() {
                assert!(std::time::Instant::now() < deadline, "timed out");
                std::thread::yield_now();
            }
        };
        let leader = spawn("live://1");
        let other_room = spawn("live://2");
        until(&|| waiting_for("live://1").is_some() && waiting_for("live://2").is_some());
        let joiners: Vec<_> = (0..3).map(|_| spawn("live://1")).collect();
        until(&|| waiting_for("live://1") == Some(3));
        drop(slot);
        assert!(!leader.await.expect("leader"), "the first reads");
        assert!(!other_room.await.expect("other"), "another room reads");
        for joiner in joiners {
            assert!(joiner.await.expect("joiner"), "shared");
        }
        // Nothing waits now: the next identical request reads itself.
        assert!(!spawn("live://1").await.expect("later"));
        assert!(reads.waiting().is_empty());
    }
}
