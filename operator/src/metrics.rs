//! The operator's own metrics (served on its admin port).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct OperatorMetrics {
    pub reconciliations: IntCounterVec,
    pub failures: IntCounterVec,
    pub duration: HistogramVec,
    pub leader: IntGauge,
    pub autoscaler_decisions: IntCounterVec,
}

impl OperatorMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::build()?;
        registry.register(Box::new(metrics.reconciliations.clone()))?;
        registry.register(Box::new(metrics.failures.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.leader.clone()))?;
        registry.register(Box::new(metrics.autoscaler_decisions.clone()))?;
        Ok(metrics)
    }

    pub fn unregistered() -> Self {
        Self::build().unwrap_or_else(|_| unreachable!("static metric definitions are valid"))
    }

    fn build() -> Result<Self, prometheus::Error> {
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "pushcluster_operator_reconciliations_total",
                "Reconciliations of PushCluster objects, by result (applied, paused, invalid, error).",
            ),
            &["result"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "pushcluster_operator_reconcile_failures_total",
                "Failed reconciliations, by error kind.",
            ),
            &["error"],
        )?;
        for result in ["applied", "paused", "invalid", "error"] {
            reconciliations.with_label_values(&[result]);
        }
        for error in ["kube_api", "render", "serialize"] {
            failures.with_label_values(&[error]);
        }
        let autoscaler_decisions = IntCounterVec::new(
            Opts::new(
                "pushcluster_operator_autoscaler_decisions_total",
                "Autoscaling decisions, by component (comet, logic, job) and direction (up, down, hold).",
            ),
            &["component", "direction"],
        )?;
        for component in ["comet", "logic", "job"] {
            for direction in ["up", "down", "hold"] {
                autoscaler_decisions.with_label_values(&[component, direction]);
            }
        }
        Ok(OperatorMetrics {
            reconciliations,
            failures,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "pushcluster_operator_reconcile_duration_seconds",
                    "Time to reconcile one PushCluster.",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["result"],
            )?,
            leader: IntGauge::new(
                "pushcluster_operator_leader",
                "1 while this operator replica holds the leader lease.",
            )?,
            autoscaler_decisions,
        })
    }
}
