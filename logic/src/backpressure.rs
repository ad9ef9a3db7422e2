//! Bounded lag (`logic.backpressure`). When pushes arrive faster than
//! comets can deliver them, the bus's backlog would grow without bound and
//! every message would get later. Instead logic reads each partition's
//! backlog and drain rate from the bus every `interval`, and refuses a push
//! (HTTP 429 with `Retry-After`) whose partition's backlog would take
//! longer than `max_delay` to deliver, or holds more than `max_lag`
//! messages: publishers slow down, the delay stays bounded.
//!
//! Between readings, what this logic published is added to the last one,
//! so a burst cannot overshoot the bound by a whole interval's worth. The
//! lag is per partition, so rooms that share a partition with an
//! overloaded one are refused too: their messages would wait behind its
//! backlog anyway.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pushcluster_api::config::BackpressureConfig;
use pushcluster_backplane::bus::{Bus, PartitionLag};
use tokio_util::sync::CancellationToken;

use crate::metrics::LogicMetrics;

/// A backlog this small is never refused for its delay: a drain rate
/// measured over a few messages says little.
const MIN_BACKLOG: u64 = 16;

/// What logic knows of one partition.
#[derive(Debug, Clone, Copy)]
struct Partition {
    /// At the last reading, plus what this logic published since.
    pending: u64,
    settled: u64,
    at: Instant,
    /// Messages drained per second while there was a backlog (smoothed);
    /// `None` until one was measured.
    rate: Option<f64>,
}

/// The last lag read from the bus, and the bounds.
pub struct Backpressure {
    config: BackpressureConfig,
    partitions: Mutex<Vec<Option<Partition>>>,
}

impl Backpressure {
    pub fn new(config: BackpressureConfig) -> Self {
        Backpressure {
            config,
            partitions: Mutex::new(Vec::new()),
        }
    }

    fn enabled(&self) -> bool {
        self.config.max_lag > 0 || !self.config.max_delay.is_zero()
    }

    /// `Err(retry after)` when `partition` is over a bound.
    pub fn admit(&self, partition: u32) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let Some(state) = self
            .partitions
            .lock()
            .ok()
            .and_then(|p| p.get(partition as usize).copied().flatten())
        else {
            return Ok(());
        };
        let refuse = Err(self.config.retry_after);
        if self.config.max_lag > 0 && state.pending > self.config.max_lag {
            return refuse;
        }
        if !self.config.max_delay.is_zero() && state.pending > MIN_BACKLOG {
            match state.rate {
                // Nothing drained although there was a backlog: stalled.
                Some(rate) if rate <= 0.0 => return refuse,
                Some(rate) if state.pending as f64 / rate > self.config.max_delay.as_secs_f64() => {
                    return refuse;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Counts a message this logic published to `partition`.
    pub fn published(&self, partition: u32) {
        if let Ok(mut partitions) = self.partitions.lock()
            && let Some(Some(state)) = partitions.get_mut(partition as usize)
        {
            state.pending += 1;
        }
    }

    /// Stores a reading taken at `now`; returns the largest partition's
    /// backlog.
    pub fn record(&self, readings: Vec<Option<PartitionLag>>, now: Instant) -> u64 {
        let largest = readings
            .iter()
            .flatten()
            .map(|l| l.pending)
            .max()
            .unwrap_or(0);
        let Ok(mut partitions) = self.partitions.lock() else {
            return largest;
        };
        let updated = readings
            .iter()
            .enumerate()
            .map(|(index, reading)| {
                let reading = (*reading)?;
                let before = partitions.get(index).copied().flatten();
                let rate = match before {
                    // The drain rate means something only while there was
                    // a backlog to drain.
                    Some(before) if before.pending > 0 => {
                        let seconds = now.saturating_duration_since(before.at).as_secs_f64();
                        if seconds > 0.0 {
                            let drained = reading.settled.saturating_sub(before.settled) as f64;
                            let measured = drained / seconds;
                            Some(before.rate.map_or(measured, |r| (r + measured) / 2.0))
                        } else {
                            before.rate
                        }
                    }
                    Some(before) => before.rate,
                    None => None,
                };
                Some(Partition {
                    pending: reading.pending,
                    settled: reading.settled,
                    at: now,
                    rate,
                })
            })
            .collect();
        *partitions = updated;
        largest
    }

    /// Reads the bus's lag every `interval` until `stop` (also with the
    /// bounds off: the lag gauge shows it). A failed read keeps the last
    /// one (the bus refuses publishes itself then).
    pub async fn watch(
        self: Arc<Self>,
        bus: Arc<dyn Bus>,
        metrics: LogicMetrics,
        stop: CancellationToken,
    ) {
        let mut every = tokio::time::interval(self.config.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            let bound = self.config.interval.max(Duration::from_secs(1));
            match tokio::time::timeout(bound, bus.lag()).await {
                Ok(Ok(lag)) => {
                    let largest = self.record(lag, Instant::now());
                    metrics
                        .bus_lag_max
                        .set(i64::try_from(largest).unwrap_or(i64::MAX));
                }
                Ok(Err(error)) => tracing::debug!(%error, "reading the bus lag failed"),
                Err(_) => tracing::debug!("reading the bus lag timed out"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backpressure(max_lag: u64, max_delay: Duration) -> Backpressure {
        Backpressure::new(BackpressureConfig {
            max_lag,
            max_delay,
            ..BackpressureConfig::default()
        })
    }

    fn lag(pending: u64, settled: u64) -> Option<PartitionLag> {
        Some(PartitionLag { pending, settled })
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn only_a_partition_over_the_lag_bound_is_refused() {
        let bp = backpressure(100, Duration::ZERO);
        let now = Instant::now();
        assert_eq!(bp.record(vec![lag(101, 0), lag(100, 0), None], now), 101);
        assert_eq!(bp.admit(0), Err(SECOND));
        assert_eq!(bp.admit(1), Ok(()), "at the bound is fine");
        assert_eq!(bp.admit(2), Ok(()), "unknown lag is not refused");
        assert_eq!(bp.admit(7), Ok(()), "no reading for it");
        // What this logic publishes counts before the next reading.
        bp.published(1);
        assert_eq!(bp.admit(1), Err(SECOND));
        bp.record(vec![lag(3, 98)], now + SECOND);
        assert_eq!(bp.admit(0), Ok(()), "the backlog drained");
    }

    #[test]
    fn a_backlog_that_takes_longer_than_max_delay_to_drain_is_refused() {
        let bp = backpressure(0, Duration::from_secs(2));
        let t0 = Instant::now();
        bp.record(vec![lag(100, 0)], t0);
        assert_eq!(bp.admit(0), Ok(()), "no drain rate measured yet");
        // 100 drained in a second, 300 left: 3 s > 2 s.
        bp.record(vec![lag(300, 100)], t0 + SECOND);
        assert_eq!(bp.admit(0), Err(SECOND));
        // Draining faster (smoothed: (100 + 500) / 2 = 300/s), 300 left: 1 s.
        bp.record(vec![lag(300, 600)], t0 + 2 * SECOND);
        assert_eq!(bp.admit(0), Ok(()));
    }

    #[test]
    fn a_stalled_consumer_is_refused_but_an_idle_partition_is_not() {
        let bp = backpressure(0, Duration::from_secs(2));
        let t0 = Instant::now();
        // Idle: nothing pending, nothing drained; a burst is accepted.
        bp.record(vec![lag(0, 50)], t0);
        bp.record(vec![lag(0, 50)], t0 + SECOND);
        for _ in 0..100 {
            bp.published(0);
        }
        assert_eq!(bp.admit(0), Ok(()), "no drain rate: an idle room's burst");
        // A backlog that does not move: the consumer is gone.
        bp.record(vec![lag(40, 50)], t0 + 2 * SECOND);
        bp.record(vec![lag(40, 50)], t0 + 3 * SECOND);
        assert_eq!(bp.admit(0), Err(SECOND));
    }

    #[test]
    fn both_bounds_zero_turn_it_off() {
        let bp = backpressure(0, Duration::ZERO);
        let t0 = Instant::now();
        bp.record(vec![lag(u64::MAX / 2, 0)], t0);
        bp.record(vec![lag(u64::MAX / 2, 0)], t0 + SECOND);
        assert_eq!(bp.admit(0), Ok(()));
    }
}
