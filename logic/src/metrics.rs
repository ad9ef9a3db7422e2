//! Prometheus metrics of logic. Labels are bounded: routes, codes, kinds and
//! reasons, never a key, mid or room.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub struct LogicMetrics {
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub published: IntCounterVec,
    pub publish_failures: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub unknown_targets: IntCounterVec,
    pub connects: IntCounterVec,
    pub disconnects: IntCounterVec,
    pub upstream_frames: IntCounter,
    pub upstream_messages: IntCounterVec,
    pub upstream_pending: IntGauge,
    pub online_reports: IntCounter,
    pub throttled: IntCounterVec,
    pub bus_lag_max: IntGauge,
    pub resumes: IntCounterVec,
    pub replayed: IntCounter,
    pub history_reads: prometheus::Histogram,
    pub history_reads_shared: IntCounter,
}

impl LogicMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = LogicMetrics {
            http_requests: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_http_requests_total",
                    "HTTP API requests by route, HTTP status and goim code.",
                ),
                &["route", "status", "code"],
            )?,
            http_duration: HistogramVec::new(
                HistogramOpts::new(
                    "pushcluster_logic_http_request_duration_seconds",
                    "HTTP API request latency by route.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["route"],
            )?,
            published: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_messages_published_total",
                    "PushMsg published to the bus, by kind (push, room, broadcast).",
                ),
                &["kind"],
            )?,
            publish_failures: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_publish_failures_total",
                    "PushMsg the bus refused, by kind; the API answered -500.",
                ),
                &["kind"],
            )?,
            duplicates: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_duplicate_publishes_total",
                    "Publishes skipped because their Idempotency-Key was seen, by kind.",
                ),
                &["kind"],
            )?,
            unknown_targets: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_push_targets_offline_total",
                    "Keys or mids named in a push that had no live session, by target (key, mid).",
                ),
                &["target"],
            )?,
            connects: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_connects_total",
                    "Connect calls from comets by result (ok, or the refusal reason).",
                ),
                &["result"],
            )?,
            disconnects: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_disconnects_total",
                    "Disconnect calls by whether a session mapping was removed (removed, kept).",
                ),
                &["result"],
            )?,
            upstream_messages: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_upstream_messages_total",
                    "Client messages for the backend (upstream.enabled), by result: accepted (stored in the upstream stream), too_large, unavailable (NATS refused or failed).",
                ),
                &["result"],
            )?,
            upstream_pending: IntGauge::new(
                "pushcluster_logic_upstream_pending",
                "Client messages the backend's consumer (upstream.consumer) has not taken or acked yet.",
            )?,
            upstream_frames: IntCounter::new(
                "pushcluster_logic_upstream_frames_total",
                "Client frames handed to Receive.",
            )?,
            online_reports: IntCounter::new(
                "pushcluster_logic_online_reports_total",
                "RenewOnline reports received from comets.",
            )?,
            throttled: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_pushes_throttled_total",
                    "Pushes refused with 429 because their partition's lag passed logic.backpressure.max_lag, by kind.",
                ),
                &["kind"],
            )?,
            bus_lag_max: IntGauge::new(
                "pushcluster_logic_bus_lag_max_messages",
                "The largest partition lag (messages published and not yet delivered) as logic last read it.",
            )?,
            resumes: IntCounterVec::new(
                Opts::new(
                    "pushcluster_logic_resumes_total",
                    "Room joins of clients with positions, by result: recovered, fresh (nothing to resume), or why not (epoch_changed, expired, too_many, too_large, disabled, unavailable).",
                ),
                &["result"],
            )?,
            replayed: IntCounter::new(
                "pushcluster_logic_replayed_messages_total",
                "History messages handed to comets for resuming clients.",
            )?,
            history_reads_shared: IntCounter::new(
                "pushcluster_logic_history_reads_shared_total",
                "History calls answered by an identical read that was waiting for its slot (a reconnect storm from one room and position).",
            )?,
            history_reads: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "pushcluster_logic_history_read_seconds",
                    "Time to answer a History call, waiting for a replay slot included.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
        };
        metrics.init_series();
        registry.register(Box::new(metrics.http_requests.clone()))?;
        registry.register(Box::new(metrics.http_duration.clone()))?;
        registry.register(Box::new(metrics.published.clone()))?;
        registry.register(Box::new(metrics.publish_failures.clone()))?;
        registry.register(Box::new(metrics.duplicates.clone()))?;
        registry.register(Box::new(metrics.unknown_targets.clone()))?;
        registry.register(Box::new(metrics.connects.clone()))?;
        registry.register(Box::new(metrics.disconnects.clone()))?;
        registry.register(Box::new(metrics.upstream_frames.clone()))?;
        registry.register(Box::new(metrics.upstream_messages.clone()))?;
        registry.register(Box::new(metrics.upstream_pending.clone()))?;
        registry.register(Box::new(metrics.online_reports.clone()))?;
        registry.register(Box::new(metrics.throttled.clone()))?;
        registry.register(Box::new(metrics.bus_lag_max.clone()))?;
        registry.register(Box::new(metrics.resumes.clone()))?;
        registry.register(Box::new(metrics.replayed.clone()))?;
        registry.register(Box::new(metrics.history_reads.clone()))?;
        registry.register(Box::new(metrics.history_reads_shared.clone()))?;
        Ok(metrics)
    }

    /// Creates every known series at 0.
    fn init_series(&self) {
        for kind in ["push", "room", "broadcast"] {
            self.published.with_label_values(&[kind]);
            self.publish_failures.with_label_values(&[kind]);
            self.duplicates.with_label_values(&[kind]);
            self.throttled.with_label_values(&[kind]);
        }
        for target in ["key", "mid"] {
            self.unknown_targets.with_label_values(&[target]);
        }
        for result in [
            "ok",
            "invalid_body",
            "registry_error",
            "missing_token",
            "invalid_token",
            "expired_token",
            "mid_mismatch",
            "key_mismatch",
            "room_forbidden",
            "accept_forbidden",
            "webhook_denied",
            "webhook_error",
        ] {
            self.connects.with_label_values(&[result]);
        }
        for result in ["removed", "kept"] {
            self.disconnects.with_label_values(&[result]);
        }
        for result in [
            "recovered",
            "fresh",
            "epoch_changed",
            "expired",
            "too_many",
            "too_large",
            "disabled",
            "unavailable",
        ] {
            self.resumes.with_label_values(&[result]);
        }
    }
}
