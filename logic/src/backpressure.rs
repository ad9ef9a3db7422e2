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
//!
//! A burst onto an empty partition is where a drain rate is not known yet,
//! and a fast publisher could fill seconds of delivery in one interval. So
//! its drain is measured from when it started (not over the idle time
//! before, which would read as a stall), and once it holds more than
//! [`MIN_BACKLOG`] messages logic reads the lag [`FIRST_READING`] later
//! instead of waiting for the next interval.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pushcluster_api::config::BackpressureConfig;
use pushcluster_backplane::bus::{Bus, PartitionLag};
use tokio_util::sync::CancellationToken;

use crate::metrics::LogicMetrics;

/// A backlog this small is never refused for its delay: a drain rate
/// measured over a few messages says little.
const MIN_BACKLOG: u64 = 16;

/// Until a partition's drain rate was first measured, it may hold this
/// many messages: plenty for a burst the fleet delivers at once, a second
/// or so of delivery into a room of 10,000 on one comet. A fast publisher
/// fills more than that before the first reading (a closed loop into
/// standalone: 1,474 pushes, six seconds of delivery).
const UNMEASURED_BACKLOG: u64 = 256;

/// How soon after a burst passes [`MIN_BACKLOG`] its drain is first read.
const FIRST_READING: Duration = Duration::from_millis(50);

/// What logic knows of one partition.
#[derive(Debug, Clone, Copy)]
struct Partition {
    /// At the last reading, plus what this logic published since.
    pending: u64,
    settled: u64,
    at: Instant,
    /// When this logic first published onto the partition after a reading
    /// found it empty: its drain is measured from then.
    burst_at: Option<Instant>,
    /// Messages drained per second while there was a backlog, and the time
    /// that estimate covers; `None` until one was measured.
    rate: Option<(f64, Duration)>,
}

/// The last lag read from the bus, and the bounds.
pub struct Backpressure {
    config: BackpressureConfig,
    partitions: Mutex<Vec<Option<Partition>>>,
    /// A burst passed [`MIN_BACKLOG`]: read the lag soon.
    burst: tokio::sync::Notify,
}

impl Backpressure {
    pub fn new(config: BackpressureConfig) -> Self {
        Backpressure {
            config,
            partitions: Mutex::new(Vec::new()),
            burst: tokio::sync::Notify::new(),
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
                None if state.pending > UNMEASURED_BACKLOG => return refuse,
                // Nothing drained although there was a backlog: stalled.
                Some((rate, _)) if rate <= 0.0 => return refuse,
                Some((rate, _))
                    if state.pending as f64 / rate > self.config.max_delay.as_secs_f64() =>
                {
                    return refuse;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Counts a message this logic published to `partition`.
    pub fn published(&self, partition: u32) {
        self.published_at(partition, Instant::now());
    }

    fn published_at(&self, partition: u32, now: Instant) {
        let Ok(mut partitions) = self.partitions.lock() else {
            return;
        };
        let Some(Some(state)) = partitions.get_mut(partition as usize) else {
            return;
        };
        if state.pending == 0 {
            state.burst_at = Some(now);
        }
        state.pending += 1;
        if state.pending == MIN_BACKLOG + 1 && state.burst_at.is_some() {
            drop(partitions);
            self.burst.notify_one();
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
                    // a backlog to drain: since the last reading, or since
                    // a burst onto an empty partition began.
                    Some(before) if before.pending > 0 => {
                        let since = before.burst_at.unwrap_or(before.at);
                        let covered = now.saturating_duration_since(since);
                        if covered.is_zero() {
                            before.rate
                        } else {
                            let drained = reading.settled.saturating_sub(before.settled) as f64;
                            let measured = drained / covered.as_secs_f64();
                            Some(blend(before.rate, measured, covered, self.config.interval))
                        }
                    }
                    Some(before) => before.rate,
                    None => None,
                };
                if reading.pending > 0 {
                    tracing::trace!(
                        partition = index,
                        pending = reading.pending,
                        settled = reading.settled,
                        rate = rate.map(|(rate, _)| rate),
                        "partition lag read"
                    );
                }
                Some(Partition {
                    pending: reading.pending,
                    settled: reading.settled,
                    at: now,
                    burst_at: None,
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
                _ = self.burst.notified() => {
                    // Long enough for a drain to show, short of a whole
                    // interval of a fast publisher's pushes.
                    let first = FIRST_READING.min(self.config.interval);
                    tokio::select! {
                        _ = tokio::time::sleep(first) => {}
                        _ = stop.cancelled() => return,
                    }
                }
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

/// A drain rate `measured` over `covered`, blended with the estimate
/// before it by the time each covers, the past counting for at most
/// `memory` (one interval: two full readings weigh the same, so a rate
/// that falls shows within a few readings), while a short reading moves
/// the estimate only by its share.
fn blend(
    before: Option<(f64, Duration)>,
    measured: f64,
    covered: Duration,
    memory: Duration,
) -> (f64, Duration) {
    match before {
        None => (measured, covered),
        Some((rate, remembered)) => {
            let memory = remembered.min(memory);
            let (old, new) = (memory.as_secs_f64(), covered.as_secs_f64());
            (
                (rate * old + measured * new) / (old + new),
                memory + covered,
            )
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
        // Draining faster (500/s over a second, against the 100/s before
        // counted for one 250 ms interval: 420/s), 300 left: 0.7 s.
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

    /// A burst onto an idle partition: its drain is measured from when it
    /// began, not over the idle time before (which read as a stall).
    #[test]
    fn a_bursts_drain_is_measured_from_when_it_began() {
        let bp = backpressure(0, Duration::from_secs(2));
        let t0 = Instant::now();
        bp.record(vec![lag(0, 50)], t0);
        let burst = t0 + Duration::from_millis(900);
        for _ in 0..100 {
            bp.published_at(0, burst);
        }
        // 20 drained in the 100 ms since: 200/s, 80 left take 0.4 s.
        bp.record(vec![lag(80, 70)], t0 + SECOND);
        assert_eq!(bp.admit(0), Ok(()));
        // The same over the whole second would be 20/s: 4 s, refused.
        let whole = backpressure(0, Duration::from_secs(2));
        whole.record(vec![lag(0, 50)], t0);
        whole.published_at(0, t0);
        whole.record(vec![lag(80, 70)], t0 + SECOND);
        assert_eq!(whole.admit(0), Err(SECOND));
    }

    /// A short reading moves the rate by the time it covers: nothing
    /// drained in a first 50 ms is a stall for now, not for long.
    #[test]
    fn readings_weigh_by_the_time_they_cover() {
        let bp = backpressure(0, Duration::from_secs(2));
        let t0 = Instant::now();
        bp.record(vec![lag(0, 0)], t0);
        for _ in 0..100 {
            bp.published_at(0, t0);
        }
        bp.record(vec![lag(100, 0)], t0 + Duration::from_millis(50));
        assert_eq!(bp.admit(0), Err(SECOND), "nothing drained yet");
        // 250 ms at 400/s: (0 × 0.05 + 400 × 0.25) / 0.3 ≈ 333/s, 100 left.
        bp.record(vec![lag(100, 100)], t0 + Duration::from_millis(300));
        assert_eq!(bp.admit(0), Ok(()));
    }

    /// A partition that drained fast and now drains slowly (a large room
    /// after small ones) is refused within a few readings: the past counts
    /// for one interval, like each new reading.
    #[test]
    fn a_falling_drain_rate_shows_within_a_few_readings() {
        let bp = backpressure(0, Duration::from_secs(2));
        let quarter = Duration::from_millis(250);
        let t0 = Instant::now();
        bp.record(vec![lag(1_000, 0)], t0);
        bp.record(vec![lag(1_000, 2_500)], t0 + quarter);
        assert_eq!(bp.admit(0), Ok(()), "10,000/s: 0.1 s");
        let mut settled = 2_500;
        let mut refused_after = None;
        for reading in 2..=8u32 {
            settled += 25; // 100/s
            bp.record(vec![lag(1_000, settled)], t0 + quarter * reading);
            if bp.admit(0).is_err() {
                refused_after = Some(reading - 1);
                break;
            }
        }
        assert_eq!(refused_after, Some(5), "readings at the new rate");
    }

    /// Before a partition's drain rate was ever measured, its backlog is
    /// bounded by [`UNMEASURED_BACKLOG`]; after, by the rate.
    #[test]
    fn an_unmeasured_partition_holds_a_bounded_burst() {
        let bp = backpressure(0, Duration::from_secs(2));
        let t0 = Instant::now();
        bp.record(vec![lag(0, 0)], t0);
        for _ in 0..UNMEASURED_BACKLOG {
            bp.published_at(0, t0);
        }
        assert_eq!(bp.admit(0), Ok(()));
        bp.published_at(0, t0);
        assert_eq!(bp.admit(0), Err(SECOND), "no drain rate yet");
        // 1,000/s measured: the 257 take a quarter of a second.
        bp.record(vec![lag(257, 50)], t0 + Duration::from_millis(50));
        assert_eq!(bp.admit(0), Ok(()));
    }

    /// Once a burst onto an empty partition holds more than
    /// [`MIN_BACKLOG`] messages, logic reads the lag [`FIRST_READING`]
    /// later, not at the next interval.
    #[tokio::test(start_paused = true)]
    async fn a_burst_is_read_soon_not_at_the_next_interval() {
        use pushcluster_api::pb::logic::PushMsg;
        use pushcluster_backplane::bus::{MemoryBus, MemoryBusConfig};
        let bus = Arc::new(MemoryBus::new(MemoryBusConfig::default()));
        let bp = Arc::new(Backpressure::new(BackpressureConfig {
            interval: Duration::from_secs(10),
            ..BackpressureConfig::default()
        }));
        let metrics = LogicMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let stop = CancellationToken::new();
        let watcher = tokio::spawn(bp.clone().watch(bus.clone(), metrics.clone(), stop.clone()));
        // The first reading, at once: empty.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let read = || metrics.bus_lag_max.get();
        assert_eq!(read(), 0);
        for _ in 0..MIN_BACKLOG {
            bus.publish(PushMsg::default(), None)
                .await
                .expect("published");
            bp.published(0);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(read(), 0, "a backlog this small waits for the interval");
        bus.publish(PushMsg::default(), None)
            .await
            .expect("published");
        bp.published(0);
        tokio::time::sleep(FIRST_READING - Duration::from_millis(5)).await;
        assert_eq!(read(), 0);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(read(), MIN_BACKLOG as i64 + 1, "read soon after the burst");
        stop.cancel();
        watcher.await.expect("watcher");
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
