//! Autoscaling in the reconciler: for each component with
//! `autoscaling.enabled`, read its load from its ready pods, decide with
//! [`crate::autoscale`], and hand back the replicas to apply. Comets to be
//! removed are chosen by the Kubernetes pod deletion cost: before a
//! scale-down every comet pod is annotated with its connection count, so
//! the ReplicaSet removes the emptiest, which then drains.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::time::Instant;

use crate::autoscale::{Decision, Direction, History, Load, Policy, decide};
use crate::crd::{AutoscalingSpec, AutoscalingStatus, ComponentStatus, PushCluster};
use crate::load::{self, COMET_CONNECTIONS, JOB_PENDING, LOGIC_PUSH_REQUESTS, Measure};
use crate::render::selector_string;

/// Annotation the ReplicaSet controller reads when it removes pods: the
/// lowest cost goes first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// The autoscaler's memory between reconciliations (only the leader's).
pub struct Autoscaler {
    pub interval: Duration,
    http: reqwest::Client,
    /// Recent recommendations per PushCluster and component.
    histories: Mutex<HashMap<String, History>>,
    /// The last counter reading per pod, for rates.
    counters: Mutex<HashMap<String, (Instant, f64)>>,
    /// The last decision per PushCluster and component, and when: a
    /// reconcile within the interval (a spec edit, a child changing) reuses
    /// it instead of measuring again, so the autoscaler's own status
    /// updates never make it spin.
    last: Mutex<HashMap<String, (Instant, Scaled)>>,
}

impl Autoscaler {
    pub fn new(interval: Duration) -> Autoscaler {
        Autoscaler {
            interval,
            http: reqwest::Client::new(),
            histories: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            last: Mutex::new(HashMap::new()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Comet,
    Logic,
    Job,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::Comet => "comet",
            Component::Logic => "logic",
            Component::Job => "job",
        }
    }

    fn spec(self, pc: &PushCluster) -> Option<&AutoscalingSpec> {
        let spec = &pc.spec;
        match self {
            Component::Comet => spec.comet.autoscaling.as_ref(),
            Component::Logic => spec.logic.autoscaling.as_ref(),
            Component::Job => spec.job.autoscaling.as_ref(),
        }
        .filter(|a| a.enabled)
    }

    fn replicas(self, pc: &PushCluster) -> i32 {
        let spec = &pc.spec;
        match self {
            Component::Comet => spec.comet.replicas,
            Component::Logic => spec.logic.replicas,
            Component::Job => spec.job.replicas,
        }
    }

    fn measure(self) -> &'static Measure {
        match self {
            Component::Comet => &COMET_CONNECTIONS,
            Component::Logic => &LOGIC_PUSH_REQUESTS,
            Component::Job => &JOB_PENDING,
        }
    }

    fn policy(self, pc: &PushCluster, spec: &AutoscalingSpec) -> Policy {
        match self {
            // One comet at a time, each after the previous one drained.
            Component::Comet => Policy::from_spec(spec, None, 1),
            Component::Logic => Policy::from_spec(spec, None, spec.max_step),
            // A job beyond the partition count would own nothing.
            Component::Job => Policy::from_spec(
                spec,
                Some(i32::try_from(pc.spec.nats.partitions).unwrap_or(i32::MAX)),
                spec.max_step,
            ),
        }
    }
}

/// What the autoscaler decided for one component.
#[derive(Clone)]
pub struct Scaled {
    pub replicas: i32,
    pub status: AutoscalingStatus,
    pub decision: Decision,
    /// False when the last decision was reused (within the interval).
    pub fresh: bool,
}

/// Decides `component`'s replicas if it is autoscaled.
pub async fn scale(
    client: &Client,
    autoscaler: &Autoscaler,
    pc: &PushCluster,
    namespace: &str,
    component: Component,
    previous: &ComponentStatus,
) -> Result<Option<Scaled>, kube::Error> {
    let Some(spec) = component.spec(pc) else {
        return Ok(None);
    };
    let key = format!("{namespace}/{}/{}", pc.name_any(), component.name());
    if let Some((at, scaled)) = autoscaler
        .last
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&key)
        && at.elapsed() < autoscaler.interval.mul_f64(0.9)
    {
        return Ok(Some(Scaled {
            fresh: false,
            ..scaled.clone()
        }));
    }
    let policy = component.policy(pc, spec);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = selector_string(&pc.name_any(), component.name());
    let listed = pods.list(&ListParams::default().labels(&selector)).await?;
    let draining = listed
        .items
        .iter()
        .any(|p| p.metadata.deletion_timestamp.is_some());
    let ready: Vec<&Pod> = listed
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
        .collect();
    let measure = component.measure();
    let samples = load::read(&autoscaler.http, &ready, measure).await;
    let values = if measure.counter {
        rates(autoscaler, namespace, samples)
    } else {
        samples
    };
    let measured: Vec<(String, f64)> = values
        .into_iter()
        .filter_map(|(pod, value)| value.map(|v| (pod, v)))
        .collect();
    let load = Load {
        total: measured.iter().map(|(_, v)| v).sum(),
        measured: measured.len(),
        pods: ready.len(),
    };
    // The live Deployment's replicas, not the status of the (possibly
    // stale) cached object: deciding from a stale count would undo the
    // previous step.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let live = deployments
        .get_opt(&format!("{}-{}", pc.name_any(), component.name()))
        .await?
        .and_then(|d| d.spec?.replicas);
    let current = live.unwrap_or_else(|| component.replicas(pc));
    let decision = {
        let mut histories = autoscaler
            .histories
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let history = histories.entry(key.clone()).or_default();
        decide(
            &policy,
            current,
            Some(&load),
            draining,
            history,
            Instant::now(),
            measure.unit,
        )
    };
    if component == Component::Comet && decision.direction == Direction::Down {
        mark_deletion_costs(&pods, &measured).await?;
    }
    let changed = decision.replicas != current;
    let status = AutoscalingStatus {
        desired_replicas: decision.replicas,
        load: (load.measured > 0).then_some(load.total),
        pods_measured: format!("{}/{}", load.measured, load.pods),
        reason: decision.reason.clone(),
        last_scale_time: if changed {
            Some(Time(Timestamp::now()))
        } else {
            previous
                .autoscaling
                .as_ref()
                .and_then(|a| a.last_scale_time.clone())
        },
    };
    let scaled = Scaled {
        replicas: decision.replicas,
        status,
        decision,
        fresh: true,
    };
    autoscaler
        .last
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(key, (Instant::now(), scaled.clone()));
    Ok(Some(scaled))
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Counter readings to rates per second since each pod's previous reading;
/// a pod read for the first time (or whose counter restarted) has none yet.
fn rates(
    autoscaler: &Autoscaler,
    namespace: &str,
    samples: Vec<(String, Option<f64>)>,
) -> Vec<(String, Option<f64>)> {
    let now = Instant::now();
    let mut counters = autoscaler
        .counters
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    samples
        .into_iter()
        .map(|(pod, value)| {
            let key = format!("{namespace}/{pod}");
            let rate = value.and_then(|value| {
                let previous = counters.insert(key, (now, value));
                let (at, before) = previous?;
                let seconds = now.duration_since(at).as_secs_f64();
                (value >= before && seconds > 0.0).then(|| (value - before) / seconds)
            });
            (pod, rate)
        })
        .collect()
}

/// Annotates each comet pod with its connections, so the ReplicaSet
/// removes the emptiest first.
async fn mark_deletion_costs(
    pods: &Api<Pod>,
    connections: &[(String, f64)],
) -> Result<(), kube::Error> {
    for (pod, count) in connections {
        let cost = count.clamp(0.0, f64::from(i32::MAX)) as i32;
        pods.patch(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {DELETION_COST: cost.to_string()}}})),
        )
        .await?;
    }
    Ok(())
}

/// HorizontalPodAutoscalers that target this PushCluster's scale
/// subresource: they fight the operator while it autoscales comets.
pub async fn conflicting_hpas(
    client: &Client,
    pc: &PushCluster,
    namespace: &str,
) -> Result<Vec<String>, kube::Error> {
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), namespace);
    let name = pc.name_any();
    Ok(hpas
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|hpa| {
            hpa.spec.as_ref().is_some_and(|spec| {
                spec.scale_target_ref.kind == "PushCluster" && spec.scale_target_ref.name == name
            })
        })
        .map(|hpa| hpa.name_any())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counters_become_rates_from_the_second_reading_on() {
        let autoscaler = Autoscaler::new(Duration::from_secs(15));
        let read =
            |a: Option<f64>, b: Option<f64>| vec![("a".to_string(), a), ("b".to_string(), b)];
        let first = rates(&autoscaler, "ns", read(Some(100.0), Some(50.0)));
        assert_eq!(first, read(None, None), "no rate from one reading");
        tokio::time::advance(Duration::from_secs(10)).await;
        let second = rates(&autoscaler, "ns", read(Some(300.0), Some(40.0)));
        // b's counter went back: its process restarted, no rate this time.
        assert_eq!(second, read(Some(20.0), None));
        tokio::time::advance(Duration::from_secs(5)).await;
        let third = rates(&autoscaler, "ns", read(Some(300.0), Some(90.0)));
        assert_eq!(third, read(Some(0.0), Some(10.0)));
    }
}
