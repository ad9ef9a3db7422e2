//! Runs the reconciler: watches PushCluster objects and every kind of child
//! (`.owns()`), so a changed or deleted child brings its owner back.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use crate::crd::PushCluster;
use crate::metrics::OperatorMetrics;
use crate::reconcile::{Context, error_policy, reconcile};
use crate::render::MANAGER;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "the PushCluster CRD (pushclusters.pushcluster.io) is not installed; install it with `pushcluster crd | kubectl apply -f -` or the Helm chart"
    )]
    CrdMissing,
    #[error("cannot list PushCluster objects: {0}")]
    Kube(#[from] kube::Error),
}

/// Where to watch.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    Namespace(String),
}

fn api<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match scope {
        Scope::All => Api::all(client.clone()),
        Scope::Namespace(namespace) => Api::namespaced(client.clone(), namespace),
    }
}

/// Fails clearly when the CRD is missing (or access is denied).
pub async fn check_crd(client: &Client, scope: &Scope) -> Result<(), RunError> {
    let pushclusters: Api<PushCluster> = api(client, scope);
    match pushclusters.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(response)) if response.code == 404 => Err(RunError::CrdMissing),
        Err(error) => Err(error.into()),
    }
}

/// Reconciles until `stop`.
pub async fn run(
    client: Client,
    scope: Scope,
    metrics: OperatorMetrics,
    identity: String,
    autoscale_interval: std::time::Duration,
    stop: CancellationToken,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.to_string(),
            instance: Some(identity),
        },
    );
    let context = Arc::new(
        Context::new(client.clone(), recorder, metrics).with_autoscale_interval(autoscale_interval),
    );
    // Only children this operator manages.
    let children =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=pushcluster-operator");
    let pushclusters: Api<PushCluster> = api(&client, &scope);
    tracing::info!(?scope, "watching PushCluster objects");
    Controller::new(pushclusters, watcher::Config::default().any_semantic())
        .owns(api::<Deployment>(&client, &scope), children.clone())
        .owns(api::<Service>(&client, &scope), children.clone())
        .owns(api::<ConfigMap>(&client, &scope), children.clone())
        .owns(api::<ServiceAccount>(&client, &scope), children.clone())
        .owns(api::<Role>(&client, &scope), children.clone())
        .owns(api::<RoleBinding>(&client, &scope), children.clone())
        .owns(api::<PodDisruptionBudget>(&client, &scope), children)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(pushcluster = %object.name, "reconciled"),
                // Reconcile errors are logged by the error policy.
                Err(error) => tracing::debug!(%error, "controller event"),
            }
        })
        .await;
}
