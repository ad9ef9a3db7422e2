//! Exactly-once from the stream to clients, on top of at-least-once from
//! the stream to comets.
//!
//! Job tells comets where each message sits in the push stream (epoch,
//! partition, owner generation, sequence — goim.comet extension fields).
//! A comet then
//! - refuses deliveries from a partition owner older than one it has seen
//!   (the generation is a fencing token), so a job that lost its partition
//!   cannot deliver out of order behind the new owner's back; and
//! - drops a message whose sequence is not above the last one it delivered
//!   for the same ordering key (room, key pushes to this comet, broadcast
//!   op): a message redelivered after a job died reaches no client twice.
//!
//! Requests without an epoch (goim's job) skip both checks.

use std::collections::HashMap;
use std::sync::Mutex;

/// Broadcast ops remembered; past this the table starts over.
const MAX_BROADCAST_OPS: usize = 4096;

/// Direct streams remembered; past this the table starts over. A stream's
/// duplicates come within a redelivery or two of the original, and a
/// connection with positions also drops them by its own floor.
const MAX_STREAMS: usize = 65_536;

/// Where a request's messages sit in the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamMark {
    pub epoch: u64,
    pub partition: u32,
    pub generation: u64,
    /// One per message, increasing.
    pub seqs: Vec<u64>,
}

impl StreamMark {
    /// `None` when the request carries no stream position (goim's job).
    pub fn from_fields(
        epoch: u64,
        partition: u32,
        generation: u64,
        seqs: Vec<u64>,
    ) -> Option<Self> {
        (epoch != 0 && !seqs.is_empty()).then_some(StreamMark {
            epoch,
            partition,
            generation,
            seqs,
        })
    }
}

/// The last sequence delivered for one ordering key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HighWater {
    epoch: u64,
    seq: u64,
}

impl HighWater {
    /// The last sequence delivered, within `epoch` (None: another epoch or
    /// nothing yet).
    pub fn last_in(&self, epoch: u64) -> Option<u64> {
        (self.epoch == epoch && self.seq > 0).then_some(self.seq)
    }

    /// How many of `mark`'s messages were already delivered; records the
    /// rest as delivered.
    pub fn admit(&mut self, mark: &StreamMark) -> usize {
        match self.admit_each(mark) {
            Admitted::All => 0,
            Admitted::Only(fresh) => mark.seqs.len() - fresh.len(),
        }
    }

    /// Which of `mark`'s messages are new: each one above the last
    /// delivered, in the order given. Not only a leading run: a batch may
    /// carry a redelivered copy after newer messages (the bus delivered it
    /// again while job still held the original). Records the new ones as
    /// delivered. A new epoch
    /// (a new stream) starts over.
    pub fn admit_each(&mut self, mark: &StreamMark) -> Admitted {
        if mark.epoch != self.epoch {
            *self = HighWater {
                epoch: mark.epoch,
                seq: 0,
            };
        }
        let mut high = self.seq;
        // Allocated only when some message is not new.
        let mut fresh: Option<Vec<usize>> = None;
        for (at, seq) in mark.seqs.iter().enumerate() {
            if *seq > high {
                high = *seq;
                if let Some(fresh) = &mut fresh {
                    fresh.push(at);
                }
            } else if fresh.is_none() {
                fresh = Some((0..at).collect());
            }
        }
        self.seq = high;
        fresh.map_or(Admitted::All, Admitted::Only)
    }
}

/// Which messages of a request are new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    All,
    /// Only these, by index, ascending (maybe none).
    Only(Vec<usize>),
}

/// Fencing tokens and the comet-wide high-water marks.
#[derive(Default)]
pub struct StreamGuard {
    owners: Mutex<HashMap<(u64, u32), u64>>,
    key_pushes: Mutex<HighWater>,
    streams: Mutex<HashMap<String, HighWater>>,
    broadcasts: Mutex<HashMap<i32, HighWater>>,
}

impl StreamGuard {
    /// Accepts the delivering owner unless a newer owner of the partition
    /// has been seen.
    pub fn check_owner(&self, mark: &StreamMark) -> Result<(), u64> {
        let Ok(mut owners) = self.owners.lock() else {
            return Ok(());
        };
        let known = owners.entry((mark.epoch, mark.partition)).or_insert(0);
        if mark.generation < *known {
            return Err(*known);
        }
        *known = mark.generation;
        Ok(())
    }

    /// Already-delivered leading messages of a key push.
    pub fn admit_key_push(&self, mark: &StreamMark) -> usize {
        self.key_pushes
            .lock()
            .map(|mut hw| hw.admit(mark))
            .unwrap_or(0)
    }

    /// Already-delivered leading messages of a push to a direct stream
    /// (each stream is its own ordering key, in order across partitions'
    /// owners but not with other streams).
    pub fn admit_stream(&self, stream: &str, mark: &StreamMark) -> usize {
        let Ok(mut streams) = self.streams.lock() else {
            return 0;
        };
        if let Some(known) = streams.get_mut(stream) {
            return known.admit(mark);
        }
        if streams.len() >= MAX_STREAMS {
            streams.clear();
        }
        streams.entry(stream.to_string()).or_default().admit(mark)
    }

    /// Already-delivered leading messages of a broadcast of `op`.
    pub fn admit_broadcast(&self, op: i32, mark: &StreamMark) -> usize {
        let Ok(mut ops) = self.broadcasts.lock() else {
            return 0;
        };
        if ops.len() >= MAX_BROADCAST_OPS && !ops.contains_key(&op) {
            ops.clear();
        }
        ops.entry(op).or_default().admit(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(epoch: u64, generation: u64, seqs: &[u64]) -> StreamMark {
        StreamMark {
            epoch,
            partition: 3,
            generation,
            seqs: seqs.to_vec(),
        }
    }

    #[test]
    fn high_water_drops_every_message_not_above_it() {
        let mut hw = HighWater::default();
        assert_eq!(hw.admit(&mark(1, 1, &[1, 2, 3])), 0);
        assert_eq!(hw.admit(&mark(1, 1, &[2, 3])), 2, "all seen");
        assert_eq!(hw.admit(&mark(1, 1, &[3, 4, 5])), 1, "3 seen, 4 and 5 new");
        assert_eq!(hw.admit(&mark(1, 1, &[6])), 0);
        assert_eq!(
            hw.admit(&mark(1, 1, &[8, 6, 7, 9])),
            2,
            "6 seen, 7 behind 8"
        );
        assert_eq!(
            hw.admit_each(&mark(1, 1, &[10, 9, 11])),
            Admitted::Only(vec![0, 2])
        );
        assert_eq!(hw.admit_each(&mark(1, 1, &[12, 13])), Admitted::All);
        assert_eq!(hw.admit_each(&mark(1, 1, &[13])), Admitted::Only(vec![]));
        assert_eq!(hw.admit(&mark(2, 1, &[1])), 0, "a new stream starts over");
    }

    #[test]
    fn each_direct_stream_has_its_own_high_water() {
        let guard = StreamGuard::default();
        assert_eq!(guard.admit_stream("@mid:1", &mark(1, 1, &[10])), 0);
        assert_eq!(
            guard.admit_stream("@mid:2", &mark(1, 1, &[5])),
            0,
            "an older sequence of another stream is not a duplicate"
        );
        assert_eq!(guard.admit_stream("@mid:1", &mark(1, 1, &[10])), 1);
        assert_eq!(guard.admit_stream("@mid:1", &mark(1, 1, &[11])), 0);
    }

    #[test]
    fn older_owners_are_fenced_off() {
        let guard = StreamGuard::default();
        assert!(guard.check_owner(&mark(1, 5, &[1])).is_ok());
        assert!(guard.check_owner(&mark(1, 5, &[2])).is_ok());
        assert!(guard.check_owner(&mark(1, 7, &[3])).is_ok());
        assert_eq!(guard.check_owner(&mark(1, 5, &[4])), Err(7));
        // Other partitions and epochs are independent.
        let other = StreamMark {
            partition: 4,
            ..mark(1, 1, &[1])
        };
        assert!(guard.check_owner(&other).is_ok());
        assert!(guard.check_owner(&mark(2, 1, &[1])).is_ok());
    }

    #[test]
    fn requests_without_a_position_are_not_checked() {
        assert_eq!(StreamMark::from_fields(0, 1, 1, vec![1]), None);
        assert_eq!(StreamMark::from_fields(1, 1, 1, vec![]), None);
    }
}
