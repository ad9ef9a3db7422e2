//! Prometheus metrics of job. Labels are bounded: kinds, results, reasons.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct JobMetrics {
    pub consumed: IntCounterVec,
    pub redelivered: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub delivered: IntCounterVec,
    pub dropped: IntCounterVec,
    pub comet_calls: IntCounterVec,
    pub retries: IntCounterVec,
    pub failures: IntCounterVec,
    pub room_batch: Histogram,
    pub latency: HistogramVec,
    pub comets: IntGauge,
    pub comets_down: IntGauge,
    pub lanes: IntGauge,
}

impl JobMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let metrics = JobMetrics {
            consumed: counter(
                "pushcluster_job_messages_consumed_total",
                "PushMsg taken from the bus, by kind (push, room, broadcast).",
                &["kind"],
            )?,
            redelivered: counter(
                "pushcluster_job_messages_redelivered_total",
                "PushMsg the bus delivered again after a failed or unfinished attempt, by kind.",
                &["kind"],
            )?,
            duplicates: counter(
                "pushcluster_job_duplicates_dropped_total",
                "Redelivered PushMsg older than one comets already took (a partition's consumer restarted from its ack floor, or the ack wait ran out, while the originals were still queued), acked without a second delivery, by kind.",
                &["kind"],
            )?,
            delivered: counter(
                "pushcluster_job_messages_delivered_total",
                "PushMsg accepted by every target comet and acked, by kind.",
                &["kind"],
            )?,
            dropped: counter(
                "pushcluster_job_messages_dropped_total",
                "PushMsg acked without delivery to some comet, by kind and reason (unknown_comet: the target comet is gone, its clients reconnect elsewhere; no_comets; invalid; offline: a direct push's user or key has no connection now, its stream's history keeps it; no_registry; comet_unavailable: one count per message and unreachable comet while others took it).",
                &["kind", "reason"],
            )?,
            comet_calls: counter(
                "pushcluster_job_comet_calls_total",
                "Calls to comets by kind and result (ok, error, timeout).",
                &["kind", "result"],
            )?,
            retries: counter(
                "pushcluster_job_delivery_retries_total",
                "Calls to comets retried after a failure, by kind.",
                &["kind"],
            )?,
            failures: counter(
                "pushcluster_job_delivery_failures_total",
                "PushMsg returned to the bus (gave_up: a comet kept failing), rejected by a comet (rejected), or left to the partition's newer owner (stale_owner), or returned because sessions could not be read (registry), by kind and reason.",
                &["kind", "reason"],
            )?,
            room_batch: Histogram::with_opts(
                HistogramOpts::new(
                    "pushcluster_job_room_batch_messages",
                    "Room messages sent to comets in one op-9 batch.",
                )
                .buckets(vec![1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0, 20.0, 32.0, 64.0]),
            )?,
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "pushcluster_job_delivery_latency_seconds",
                    "From publish (logic) to accepted by every target comet, by kind.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
                &["kind"],
            )?,
            comets: IntGauge::new("pushcluster_job_comets", "Comets job delivers to.")?,
            comets_down: IntGauge::new(
                "pushcluster_job_comets_unavailable",
                "Comets skipped for now because their calls kept failing.",
            )?,
            lanes: IntGauge::new(
                "pushcluster_job_lanes",
                "Active ordered delivery lanes (one per room, per target comet, and for broadcasts).",
            )?,
        };
        metrics.init_series();
        registry.register(Box::new(metrics.consumed.clone()))?;
        registry.register(Box::new(metrics.redelivered.clone()))?;
        registry.register(Box::new(metrics.duplicates.clone()))?;
        registry.register(Box::new(metrics.delivered.clone()))?;
        registry.register(Box::new(metrics.dropped.clone()))?;
        registry.register(Box::new(metrics.comet_calls.clone()))?;
        registry.register(Box::new(metrics.retries.clone()))?;
        registry.register(Box::new(metrics.failures.clone()))?;
        registry.register(Box::new(metrics.room_batch.clone()))?;
        registry.register(Box::new(metrics.latency.clone()))?;
        registry.register(Box::new(metrics.comets.clone()))?;
        registry.register(Box::new(metrics.comets_down.clone()))?;
        registry.register(Box::new(metrics.lanes.clone()))?;
        Ok(metrics)
    }

    /// Creates every known series at 0.
    fn init_series(&self) {
        for kind in ["push", "room", "broadcast"] {
            self.consumed.with_label_values(&[kind]);
            self.redelivered.with_label_values(&[kind]);
            self.duplicates.with_label_values(&[kind]);
            self.delivered.with_label_values(&[kind]);
            self.retries.with_label_values(&[kind]);
            for reason in ["unknown_comet", "no_comets", "invalid", "comet_unavailable"] {
                self.dropped.with_label_values(&[kind, reason]);
            }
            for result in ["ok", "error", "timeout"] {
                self.comet_calls.with_label_values(&[kind, result]);
            }
            for reason in ["gave_up", "rejected", "stale_owner"] {
                self.failures.with_label_values(&[kind, reason]);
            }
        }
    }
}
