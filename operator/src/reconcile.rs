//! The reconciler: idempotent, it never asks why it runs. Each run renders
//! the whole fleet, applies every child with server-side apply under one
//! field manager, and writes the status through the status subresource.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use pushcluster_api::backoff::Backoff;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::autoscale::Direction;
use crate::crd::{ComponentStatus, PushCluster, PushClusterStatus};
use crate::metrics::OperatorMetrics;
use crate::render::{self, Fleet, MANAGER, RenderError, selector_string};
use crate::scaling::{self, Autoscaler, Component};

/// Requeue while a rollout is under way.
const PROGRESSING_REQUEUE: Duration = Duration::from_secs(10);
/// Requeue when all is well (watches bring changes sooner).
const STEADY_REQUEUE: Duration = Duration::from_secs(300);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const PAUSED: &str = "ReconciliationPaused";
pub const SERVICE_MONITOR_READY: &str = "ServiceMonitorReady";
pub const AUTOSCALING_CONFLICT: &str = "AutoscalingConflict";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot serialize: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("{0}")]
    Render(#[from] RenderError),
}

impl Error {
    /// A bounded label for the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Serialize(_) => "serialize",
            Error::Render(_) => "render",
        }
    }
}

/// What reconciliations share.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: OperatorMetrics,
    /// Consecutive failures per object, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    autoscaler: Autoscaler,
}

impl Context {
    pub fn new(client: Client, recorder: Recorder, metrics: OperatorMetrics) -> Self {
        Context {
            client,
            recorder,
            metrics,
            failures: Mutex::new(HashMap::new()),
            autoscaler: Autoscaler::new(DEFAULT_AUTOSCALE_INTERVAL),
        }
    }

    /// How often autoscaled components are measured and decided.
    pub fn with_autoscale_interval(mut self, interval: Duration) -> Self {
        self.autoscaler = Autoscaler::new(interval.max(Duration::from_secs(1)));
        self
    }
}

/// As Kubernetes' HPA: every 15 s.
pub const DEFAULT_AUTOSCALE_INTERVAL: Duration = Duration::from_secs(15);

fn object_key(pc: &PushCluster) -> String {
    format!("{}/{}", pc.namespace().unwrap_or_default(), pc.name_any())
}

async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &object.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(response) if response.code == 404)
}

/// Creates the push API's token Secret when the spec names none. Never
/// applied again: a new token on every reconcile would lock callers out.
/// An existing Secret answers 409, so the operator never reads Secrets.
async fn ensure_api_token(client: &Client, namespace: &str, pc: &PushCluster) -> Result<(), Error> {
    if pc.spec.auth.api_token_secret.is_some() {
        return Ok(());
    }
    let secret = render::api_token_secret(pc, &generate_token())?;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(pushcluster = %object_key(pc), "push API token Secret created");
            Ok(())
        }
        Err(kube::Error::Api(response)) if response.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// 32 random bytes, hex: 256 bits, safe in a header and a file.
fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Applies every child; returns the applied Deployments (comet, logic, job)
/// and the ServiceMonitor condition.
async fn apply_fleet(
    client: &Client,
    namespace: &str,
    pc: &PushCluster,
    fleet: &Fleet,
    generation: Option<i64>,
) -> Result<([Deployment; 3], Condition), Error> {
    ensure_api_token(client, namespace, pc).await?;
    apply(client, namespace, &fleet.service_account).await?;
    apply(client, namespace, &fleet.role).await?;
    apply(client, namespace, &fleet.role_binding).await?;
    apply(client, namespace, &fleet.config_map).await?;
    for service in [
        &fleet.comet_headless,
        &fleet.comet_client,
        &fleet.logic_service,
        &fleet.metrics_service,
    ] {
        apply(client, namespace, service).await?;
    }
    apply(client, namespace, &fleet.comet_pdb).await?;
    apply(client, namespace, &fleet.logic_pdb).await?;
    let comet = apply(client, namespace, &fleet.comet).await?;
    let logic = apply(client, namespace, &fleet.logic).await?;
    let job = apply(client, namespace, &fleet.job).await?;

    let monitors: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &render::service_monitor_resource(),
    );
    let monitor_condition = match &fleet.service_monitor {
        Some(monitor) => {
            let applied = monitors
                .patch(
                    &monitor.name_any(),
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(monitor),
                )
                .await;
            match applied {
                Ok(_) => condition(
                    SERVICE_MONITOR_READY,
                    true,
                    "Applied",
                    "ServiceMonitor applied",
                    generation,
                ),
                Err(error) if is_not_found(&error) => condition(
                    SERVICE_MONITOR_READY,
                    false,
                    "CRDNotInstalled",
                    "spec.monitoring.serviceMonitor is on but the monitoring.coreos.com/v1 ServiceMonitor CRD is not installed (install the Prometheus Operator)",
                    generation,
                ),
                Err(error) => return Err(error.into()),
            }
        }
        None => {
            // Turned off (or never on): remove one we created before.
            let name = fleet.metrics_service.name_any();
            match monitors.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error.into()),
            }
            condition(
                SERVICE_MONITOR_READY,
                false,
                "Disabled",
                "spec.monitoring.serviceMonitor is off",
                generation,
            )
        }
    };
    Ok(([comet, logic, job], monitor_condition))
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: now(),
    }
}

/// Keeps a condition's transition time while its status does not change.
fn settle_conditions(previous: &[Condition], mut next: Vec<Condition>) -> Vec<Condition> {
    for condition in &mut next {
        if let Some(old) = previous.iter().find(|c| c.type_ == condition.type_)
            && old.status == condition.status
        {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
    next
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn component(deployment: &Deployment, instance: &str, name: &str) -> (ComponentStatus, bool) {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let stale = match (deployment.metadata.generation, status.observed_generation) {
        (Some(generation), Some(observed)) => observed < generation,
        (Some(_), None) => true,
        _ => false,
    };
    let progressing = stale || updated < desired || ready < desired;
    (
        ComponentStatus {
            replicas: status.replicas.unwrap_or(0),
            ready_replicas: ready,
            desired_replicas: desired,
            ready: format!("{ready}/{desired}"),
            selector: selector_string(instance, name),
            autoscaling: None,
        },
        progressing,
    )
}

async fn patch_status(
    client: &Client,
    pc: &PushCluster,
    status: &PushClusterStatus,
) -> Result<(), Error> {
    let api: Api<PushCluster> =
        Api::namespaced(client.clone(), &pc.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "pushcluster.io/v1alpha1",
        "kind": "PushCluster",
        "status": status
    });
    api.patch_status(
        &pc.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn event(ctx: &Context, pc: &PushCluster, type_: EventType, reason: &str, note: String) {
    let reference = pc.object_ref(&());
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &reference).await {
        tracing::warn!(%error, "cannot publish an event");
    }
}

/// Brings one PushCluster's children to the state its spec describes.
pub async fn reconcile(pc: Arc<PushCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&pc, &ctx).await;
    let label = match &result {
        Ok((_, label)) => *label,
        Err(_) => "error",
    };
    ctx.metrics
        .reconciliations
        .with_label_values(&[label])
        .inc();
    ctx.metrics
        .duration
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok()
        && let Ok(mut failures) = ctx.failures.lock()
    {
        failures.remove(&object_key(&pc));
    }
    result.map(|(action, _)| action)
}

async fn reconcile_inner(pc: &PushCluster, ctx: &Context) -> Result<(Action, &'static str), Error> {
    let namespace = pc.namespace().ok_or(RenderError::Missing("namespace"))?;
    let generation = pc.metadata.generation;
    let previous = pc.status.clone().unwrap_or_default();
    let was_paused = find(&previous.conditions, PAUSED).is_some_and(|c| c.status == "True");

    if pc.spec.paused {
        let mut status = previous.clone();
        let mut conditions: Vec<Condition> = previous
            .conditions
            .iter()
            .filter(|c| c.type_ != PAUSED)
            .cloned()
            .collect();
        conditions.push(condition(
            PAUSED,
            true,
            "Paused",
            "spec.paused is true: children are left as they are",
            generation,
        ));
        status.conditions = settle_conditions(&previous.conditions, conditions);
        patch_status(&ctx.client, pc, &status).await?;
        if !was_paused {
            event(
                ctx,
                pc,
                EventType::Normal,
                "Paused",
                "Reconciliation paused".into(),
            )
            .await;
        }
        return Ok((Action::requeue(STEADY_REQUEUE), "paused"));
    }
    if was_paused {
        event(
            ctx,
            pc,
            EventType::Normal,
            "Resumed",
            "Reconciliation resumed".into(),
        )
        .await;
    }

    let mut fleet = match render::render(pc) {
        Ok(fleet) => fleet,
        Err(RenderError::InvalidConfig(message)) => {
            // Retrying cannot help until the spec changes (which requeues).
            let mut status = previous.clone();
            let mut conditions: Vec<Condition> = previous
                .conditions
                .iter()
                .filter(|c| c.type_ != DEGRADED && c.type_ != PAUSED)
                .cloned()
                .collect();
            conditions.push(condition(
                DEGRADED,
                true,
                "InvalidConfig",
                &message,
                generation,
            ));
            conditions.push(condition(PAUSED, false, "Reconciling", "", generation));
            status.conditions = settle_conditions(&previous.conditions, conditions);
            patch_status(&ctx.client, pc, &status).await?;
            event(ctx, pc, EventType::Warning, "InvalidConfig", message).await;
            return Ok((Action::requeue(STEADY_REQUEUE), "invalid"));
        }
        Err(error) => return Err(error.into()),
    };

    // Autoscaled components: the operator's replicas replace the spec's.
    let mut scaled = Vec::new();
    for (which, previous) in [
        (Component::Comet, &previous.comet),
        (Component::Logic, &previous.logic),
        (Component::Job, &previous.job),
    ] {
        scaled.push(
            scaling::scale(
                &ctx.client,
                &ctx.autoscaler,
                pc,
                &namespace,
                which,
                previous,
            )
            .await?,
        );
    }
    for (deployment, scaled) in [&mut fleet.comet, &mut fleet.logic, &mut fleet.job]
        .into_iter()
        .zip(&scaled)
    {
        if let (Some(scaled), Some(spec)) = (scaled, deployment.spec.as_mut()) {
            spec.replicas = Some(scaled.replicas);
        }
    }
    let hpas = if scaled[0].is_some() {
        scaling::conflicting_hpas(&ctx.client, pc, &namespace).await?
    } else {
        Vec::new()
    };

    let ([comet, logic, job], monitor) =
        apply_fleet(&ctx.client, &namespace, pc, &fleet, generation).await?;
    let instance = pc.name_any();
    let (mut comet_status, comet_progressing) = component(&comet, &instance, "comet");
    let (mut logic_status, logic_progressing) = component(&logic, &instance, "logic");
    let (mut job_status, job_progressing) = component(&job, &instance, "job");
    for ((status, scaled), which) in [&mut comet_status, &mut logic_status, &mut job_status]
        .into_iter()
        .zip(&scaled)
        .zip([Component::Comet, Component::Logic, Component::Job])
    {
        let Some(scaled) = scaled else { continue };
        status.autoscaling = Some(scaled.status.clone());
        if !scaled.fresh {
            continue;
        }
        let direction = scaled.decision.direction;
        ctx.metrics
            .autoscaler_decisions
            .with_label_values(&[which.name(), direction.label()])
            .inc();
        if direction != Direction::Hold {
            let reason = if direction == Direction::Up {
                "ScaledUp"
            } else {
                "ScaledDown"
            };
            let note = format!(
                "{} replicas → {}: {}",
                which.name(),
                scaled.replicas,
                scaled.decision.reason
            );
            tracing::info!(pushcluster = %object_key(pc), "{note}");
            event(ctx, pc, EventType::Normal, reason, note).await;
        }
    }
    let progressing = comet_progressing || logic_progressing || job_progressing;
    let available = [&comet_status, &logic_status, &job_status]
        .iter()
        .all(|c| c.desired_replicas == 0 || c.ready_replicas > 0)
        && comet_status.ready_replicas > 0;
    let not_ready: Vec<&str> = [
        ("comet", &comet_status),
        ("logic", &logic_status),
        ("job", &job_status),
    ]
    .iter()
    .filter(|(_, c)| c.ready_replicas < c.desired_replicas)
    .map(|(name, _)| *name)
    .collect();
    let conditions = vec![
        if available {
            condition(
                AVAILABLE,
                true,
                "ComponentsReady",
                "every component has ready pods",
                generation,
            )
        } else {
            condition(
                AVAILABLE,
                false,
                "ComponentsNotReady",
                "a component has no ready pod yet",
                generation,
            )
        },
        if progressing {
            condition(
                PROGRESSING,
                true,
                "RollingOut",
                &format!("waiting for: {}", not_ready.join(", ")),
                generation,
            )
        } else {
            condition(
                PROGRESSING,
                false,
                "RolloutComplete",
                "every pod is updated and ready",
                generation,
            )
        },
        condition(DEGRADED, false, "AsExpected", "", generation),
        condition(PAUSED, false, "Reconciling", "", generation),
        monitor,
        if hpas.is_empty() {
            condition(AUTOSCALING_CONFLICT, false, "NoConflict", "", generation)
        } else {
            condition(
                AUTOSCALING_CONFLICT,
                true,
                "HorizontalPodAutoscaler",
                &format!(
                    "HorizontalPodAutoscaler {} targets this PushCluster, but spec.comet.autoscaling is on: the operator sets the comet replicas and ignores spec.comet.replicas. Delete the HPA, or turn autoscaling off to let it scale.",
                    hpas.join(", ")
                ),
                generation,
            )
        },
    ];
    let conflict_before =
        find(&previous.conditions, AUTOSCALING_CONFLICT).is_some_and(|c| c.status == "True");
    let status = PushClusterStatus {
        observed_generation: generation,
        conditions: settle_conditions(&previous.conditions, conditions),
        comet: comet_status,
        logic: logic_status,
        job: job_status,
    };
    patch_status(&ctx.client, pc, &status).await?;

    let was_available = find(&previous.conditions, AVAILABLE).is_some_and(|c| c.status == "True");
    if available && !was_available {
        event(
            ctx,
            pc,
            EventType::Normal,
            "Available",
            "every component has ready pods".into(),
        )
        .await;
    } else if !available && was_available {
        event(
            ctx,
            pc,
            EventType::Warning,
            "Unavailable",
            "a component lost its ready pods".into(),
        )
        .await;
    }
    if !hpas.is_empty() && !conflict_before {
        event(
            ctx,
            pc,
            EventType::Warning,
            "AutoscalingConflict",
            format!(
                "HorizontalPodAutoscaler {} is ignored: spec.comet.autoscaling owns the comet replicas",
                hpas.join(", ")
            ),
        )
        .await;
    }
    let mut requeue = if progressing {
        PROGRESSING_REQUEUE
    } else {
        STEADY_REQUEUE
    };
    if scaled.iter().any(Option::is_some) {
        requeue = requeue.min(ctx.autoscaler.interval);
    }
    Ok((Action::requeue(requeue), "applied"))
}

/// Counts the failure and retries with jittered exponential backoff (about
/// 1 s, 2 s, ... up to 5 min) per object.
pub fn error_policy(pc: Arc<PushCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .with_label_values(&[error.metric_label()])
        .inc();
    let attempts = match ctx.failures.lock() {
        Ok(mut failures) => {
            let count = failures.entry(object_key(&pc)).or_insert(0);
            *count = count.saturating_add(1);
            *count
        }
        Err(_) => 1,
    };
    let delay = Backoff::delay_for(Duration::from_secs(1), MAX_BACKOFF, attempts);
    tracing::warn!(
        pushcluster = %object_key(&pc),
        %error,
        attempts,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}
