//! Bounded lag (`logic.backpressure`). When pushes arrive faster than
//! comets can deliver them, the bus's backlog would grow without bound and
//! every message would get later. Instead logic reads each partition's lag
//! from the bus every `interval`, and a push whose partition holds more
//! than `max_lag` undelivered messages is refused (HTTP 429 with
//! `Retry-After`): publishers slow down, the lag stays bounded.
//!
//! The lag is per partition, so rooms that share a partition with an
//! overloaded one are refused too: their messages would wait behind its
//! backlog anyway.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use pushcluster_api::config::BackpressureConfig;
use pushcluster_backplane::bus::Bus;
use tokio_util::sync::CancellationToken;

use crate::metrics::LogicMetrics;

/// The last lag read from the bus, and the bound.
pub struct Backpressure {
    config: BackpressureConfig,
    /// Lag per partition (`None`: not known).
    lag: RwLock<Vec<Option<u64>>>,
}

impl Backpressure {
    pub fn new(config: BackpressureConfig) -> Self {
        Backpressure {
            config,
            lag: RwLock::new(Vec::new()),
        }
    }

    /// `Err(retry after)` when `partition` is over the bound.
    pub fn admit(&self, partition: u32) -> Result<(), Duration> {
        if self.config.max_lag == 0 {
            return Ok(());
        }
        let over = self
            .lag
            .read()
            .map(|lag| {
                lag.get(partition as usize)
                    .copied()
                    .flatten()
                    .is_some_and(|messages| messages > self.config.max_lag)
            })
            .unwrap_or(false);
        if over {
            Err(self.config.retry_after)
        } else {
            Ok(())
        }
    }

    /// Stores a lag reading; returns the largest partition's.
    pub fn record(&self, lag: Vec<Option<u64>>) -> u64 {
        let largest = lag.iter().flatten().copied().max().unwrap_or(0);
        if let Ok(mut current) = self.lag.write() {
            *current = lag;
        }
        largest
    }

    /// Reads the bus's lag every `interval` until `stop`. A failed read
    /// keeps the last one (the bus refuses publishes itself then).
    pub async fn watch(
        self: Arc<Self>,
        bus: Arc<dyn Bus>,
        metrics: LogicMetrics,
        stop: CancellationToken,
    ) {
        if self.config.max_lag == 0 {
            return;
        }
        let mut every = tokio::time::interval(self.config.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            match tokio::time::timeout(self.config.interval.max(Duration::from_secs(1)), bus.lag())
                .await
            {
                Ok(Ok(lag)) => {
                    let largest = self.record(lag);
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

    fn backpressure(max_lag: u64) -> Backpressure {
        Backpressure::new(BackpressureConfig {
            max_lag,
            ..BackpressureConfig::default()
        })
    }

    #[test]
    fn only_a_partition_over_the_bound_is_refused() {
        let bp = backpressure(100);
        assert_eq!(bp.record(vec![Some(101), Some(100), None]), 101);
        assert_eq!(bp.admit(0), Err(Duration::from_secs(1)));
        assert_eq!(bp.admit(1), Ok(()), "at the bound is fine");
        assert_eq!(bp.admit(2), Ok(()), "unknown lag is not refused");
        assert_eq!(bp.admit(7), Ok(()), "no reading for it");
        bp.record(vec![Some(3)]);
        assert_eq!(bp.admit(0), Ok(()), "the backlog drained");
    }

    #[test]
    fn max_lag_zero_turns_it_off() {
        let bp = backpressure(0);
        bp.record(vec![Some(u64::MAX)]);
        assert_eq!(bp.admit(0), Ok(()));
    }
}
