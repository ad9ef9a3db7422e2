//! `pushcluster operator`: runs the PushCluster reconciler, with leader
//! election so several replicas are safe.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pushcluster_api::health::Readiness;
use pushcluster_comet::server::bind;
use pushcluster_operator::controller::{self, Scope};
use pushcluster_operator::leader::LeaderElector;
use pushcluster_operator::metrics::OperatorMetrics;
use tokio_util::sync::CancellationToken;

use crate::process::{Supervisor, log_listening, metrics_registry};

#[derive(clap::Args)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "PUSHCLUSTER_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// host:port of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:3190")]
    pub admin_bind: String,
    /// Turn leader election off (only when exactly one replica runs).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Namespace of the leader Lease (default: env POD_NAMESPACE, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    #[arg(long, default_value = "pushcluster-operator")]
    pub lease_name: String,
    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
    /// Seconds between autoscaling decisions (components with
    /// `autoscaling.enabled`): their pods' metrics are read this often.
    #[arg(long, default_value_t = 15)]
    pub autoscale_seconds: u64,
}

fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());
    format!("{base}-{:06x}", rand::random_range(0..0x100_0000u32))
}

pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let registry = metrics_registry("operator", &readiness)?;
    let metrics = OperatorMetrics::new(&registry)?;
    let supervisor = Supervisor::new()?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let scope = match args.namespace {
        Some(namespace) => Scope::Namespace(namespace),
        None => Scope::All,
    };
    controller::check_crd(&client, &scope).await?;
    let admin = bind("--admin-bind", &args.admin_bind).await?;
    log_listening("admin", admin.local_addr()?);
    let stop_admin = CancellationToken::new();
    let admin_task = supervisor.spawn_admin(admin, registry, readiness.clone(), stop_admin.clone());
    readiness.set_ready(true);
    let identity = identity();
    tracing::info!(%identity, version = env!("CARGO_PKG_VERSION"), "pushcluster operator started");

    let lost = CancellationToken::new();
    let elector = if args.no_leader_election {
        None
    } else {
        let namespace = args
            .lease_namespace
            .unwrap_or_else(|| "default".to_string());
        let elector = Arc::new(LeaderElector::new(
            client.clone(),
            &namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(args.lease_seconds.max(3)),
        ));
        if !elector.acquire(&supervisor.shutdown).await {
            stop_admin.cancel();
            let _ = admin_task.await;
            return Ok(());
        }
        let (keeper, shutdown, lost) = (elector.clone(), supervisor.shutdown.clone(), lost.clone());
        tokio::spawn(async move { keeper.keep(shutdown, lost).await });
        Some(elector)
    };
    metrics.leader.set(1);
    let stop = CancellationToken::new();
    {
        let (stop, shutdown, lost) = (stop.clone(), supervisor.shutdown.clone(), lost.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = lost.cancelled() => {}
            }
            stop.cancel();
        });
    }
    controller::run(
        client,
        scope,
        metrics.clone(),
        identity,
        Duration::from_secs(args.autoscale_seconds.max(1)),
        stop,
    )
    .await;
    metrics.leader.set(0);
    // Reconciling has stopped: a standby may take over now, not after the
    // lease expires.
    if let Some(elector) = elector
        && !lost.is_cancelled()
        && let Err(error) = elector.release().await
    {
        tracing::warn!(%error, "could not release the leader lease; it expires by itself");
    }
    let finished = supervisor.finish(Vec::new()).await;
    stop_admin.cancel();
    let _ = admin_task.await;
    if lost.is_cancelled() {
        anyhow::bail!("lost the leader lease; exiting so a fresh start can contend again");
    }
    finished
}
