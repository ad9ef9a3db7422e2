//! `pushcluster comet | logic | job`: the roles as separate processes,
//! joined by NATS (bus and registry), gRPC (comet → logic, job → comet) and
//! discovery (a static list or Kubernetes EndpointSlices).

use std::sync::Arc;

use crate::grpc_tls::GrpcTls;
use anyhow::Context;
use futures_util::TryFutureExt;
use pushcluster_api::config::{Config, DiscoveryKind, Role};
use pushcluster_api::health::Readiness;
use pushcluster_backplane::bus::BusMetrics;
use pushcluster_backplane::discovery::{CometEndpoint, Discovery, StaticDiscovery};
use pushcluster_backplane::nats::{Nats, NatsBus, NatsMetrics, NatsRegistry, NatsUpstream};
use pushcluster_comet::logic_client::GrpcLogic;
use pushcluster_comet::metrics::CometMetrics;
use pushcluster_comet::server::bind;
use pushcluster_comet::{Comet, CometServer};
use pushcluster_job::Job;
use pushcluster_job::grpc::GrpcConnector;
use pushcluster_job::metrics::JobMetrics;
use pushcluster_logic::Logic;
use pushcluster_logic::metrics::LogicMetrics;
use tokio_util::sync::CancellationToken;

use crate::process::{
    Supervisor, comet_addrs, comet_id, follow_readiness, job_id, log_listening, metrics_registry,
};

/// The configured discovery; `stop` ends its watches.
async fn discovery(
    config: &Config,
    stop: &CancellationToken,
) -> anyhow::Result<Arc<dyn Discovery>> {
    let discovery = &config.discovery;
    match discovery.kind {
        DiscoveryKind::Static => {
            let comets = discovery
                .comets
                .iter()
                .map(|c| CometEndpoint {
                    id: c.id.clone(),
                    addr: c.addr.clone(),
                })
                .collect();
            Ok(Arc::new(StaticDiscovery::new(
                comets,
                discovery.logics.clone(),
            )))
        }
        DiscoveryKind::Kubernetes => {
            let found = pushcluster_backplane::kubernetes::KubernetesDiscovery::start(
                discovery,
                stop.clone(),
            )
            .await
            .context("cannot watch Kubernetes EndpointSlices")?;
            Ok(Arc::new(found))
        }
    }
}

pub(crate) async fn connect_nats(
    config: &Config,
    name: &str,
    registry: &prometheus::Registry,
) -> anyhow::Result<Nats> {
    let nats = Nats::connect(&config.nats, name, NatsMetrics::new(registry)?)
        .await
        .context("cannot set up the NATS connection")?;
    if !nats.is_connected() {
        tracing::warn!(url = %config.nats.url, "NATS not reachable yet; retrying in the background");
    }
    Ok(nats)
}

pub async fn run_comet(config: Config) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let registry = metrics_registry("comet", &readiness)?;
    let supervisor = Supervisor::new()?;
    let stop_background = CancellationToken::new();
    let discovery = discovery(&config, &stop_background).await?;
    if config.discovery.kind == DiscoveryKind::Static && config.discovery.logics.is_empty() {
        anyhow::bail!("discovery.logics lists no logic gRPC address; comets need one");
    }
    let tls = GrpcTls::from_config(config.grpc_tls.as_ref())?;
    let logic = Arc::new(GrpcLogic::new(
        discovery.logics(),
        config.comet.logic_timeout,
        tls.as_ref().map(GrpcTls::client),
    ));
    let id = comet_id(&config);
    let mut comet_config = config.comet.clone();
    comet_config.addrs = comet_addrs(&config);
    let comet = Comet::new(
        id.clone(),
        comet_config,
        logic,
        CometMetrics::new(&registry)?,
    );
    comet.set_upstream(config.upstream.clone());
    let server = CometServer::bind(comet)
        .await?
        .with_grpc_tls(tls.as_ref().map(GrpcTls::server));
    let admin = bind("admin.bind", &config.admin.bind_for(Role::Comet)).await?;
    for (name, addr) in server.local_addrs() {
        log_listening(name, addr);
    }
    log_listening("admin", admin.local_addr()?);
    tracing::info!(comet = %id, version = env!("CARGO_PKG_VERSION"), "pushcluster comet started");

    let stop_admin = CancellationToken::new();
    let admin_task = supervisor.spawn_admin(admin, registry, readiness.clone(), stop_admin.clone());
    let comet_task = tokio::spawn(server.run(
        supervisor.shutdown.clone(),
        supervisor.force.clone(),
        readiness,
    ));
    if let Err(error) = comet_task.await {
        tracing::error!(%error, "comet task failed");
    }
    stop_background.cancel();
    let finished = supervisor.finish(Vec::new()).await;
    stop_admin.cancel();
    let _ = admin_task.await;
    finished
}

pub async fn run_logic(config: Config) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let registry = metrics_registry("logic", &readiness)?;
    let supervisor = Supervisor::new()?;
    let nats = connect_nats(&config, "pushcluster-logic", &registry).await?;
    let stop_background = CancellationToken::new();
    let bus = NatsBus::publisher(
        nats.clone(),
        BusMetrics::new(&registry)?,
        config.history.clone(),
        stop_background.clone(),
    );
    let upstream = config
        .upstream
        .enabled
        .then(|| NatsUpstream::new(nats.clone(), config.upstream.clone()));
    let sessions = NatsRegistry::new(
        nats,
        config.logic.session_expire,
        config.logic.online_expire,
        stop_background.clone(),
    );
    let mut logic = Logic::new(
        config.logic.clone(),
        Arc::new(sessions),
        Arc::new(bus.clone()),
        LogicMetrics::new(&registry)?,
    )?
    .with_history(&config.history);
    if let Some(upstream) = upstream {
        logic = logic.with_upstream(Arc::new(upstream), &config.upstream);
    }
    let logic = Arc::new(logic);
    tokio::spawn(logic.clone().watch_backpressure(stop_background.clone()));
    tokio::spawn(logic.clone().watch_upstream(stop_background.clone()));
    let grpc_tls = GrpcTls::from_config(config.grpc_tls.as_ref())?.map(|tls| tls.server());
    let http = bind("logic.http.bind", &config.logic.http.bind).await?;
    let grpc = bind("logic.grpc.bind", &config.logic.grpc.bind).await?;
    let admin = bind("admin.bind", &config.admin.bind_for(Role::Logic)).await?;
    log_listening("logic.http", http.local_addr()?);
    log_listening("logic.grpc", grpc.local_addr()?);
    log_listening("admin", admin.local_addr()?);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "pushcluster logic started"
    );

    // Ready while pushes can be published.
    follow_readiness(
        readiness.clone(),
        supervisor.shutdown.clone(),
        "logic",
        move || bus.is_ready(),
    );
    let stop_admin = CancellationToken::new();
    let admin_task = supervisor.spawn_admin(admin, registry, readiness, stop_admin.clone());
    let stop_servers = CancellationToken::new();
    let http_task = supervisor.spawn(
        "logic HTTP server",
        Box::pin(
            pushcluster_logic::http::serve(http, logic.clone(), stop_servers.clone())
                .map_err(|e| e.to_string()),
        ),
    );
    let grpc_task = supervisor.spawn(
        "logic gRPC server",
        Box::pin(
            pushcluster_logic::grpc::serve(grpc, logic, stop_servers.clone(), grpc_tls)
                .map_err(|e| e.to_string()),
        ),
    );
    supervisor.shutdown.cancelled().await;
    stop_servers.cancel();
    let finished = supervisor
        .finish(vec![("logic HTTP", http_task), ("logic gRPC", grpc_task)])
        .await;
    stop_background.cancel();
    stop_admin.cancel();
    let _ = admin_task.await;
    finished
}

pub async fn run_job(config: Config) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let registry = metrics_registry("job", &readiness)?;
    let supervisor = Supervisor::new()?;
    let nats = connect_nats(&config, "pushcluster-job", &registry).await?;
    let stop_background = CancellationToken::new();
    let member = job_id(&config);
    let bus = NatsBus::consumer(
        nats.clone(),
        BusMetrics::new(&registry)?,
        config.history.clone(),
        member.clone(),
        stop_background.clone(),
    );
    let discovery = discovery(&config, &stop_background).await?;
    if config.discovery.kind == DiscoveryKind::Static && config.discovery.comets.is_empty() {
        tracing::warn!(
            "discovery.comets lists no comet: pushes will be counted as dropped (no_comets)"
        );
    }
    // Direct pushes find their user's connections when delivered.
    let sessions = NatsRegistry::new(
        nats,
        config.logic.session_expire,
        config.logic.online_expire,
        stop_background.clone(),
    );
    let job = Arc::new(
        Job::new(
            config.job.clone(),
            Arc::new(GrpcConnector::new(
                config.job.delivery.timeout,
                GrpcTls::from_config(config.grpc_tls.as_ref())?
                    .as_ref()
                    .map(GrpcTls::client),
            )),
            JobMetrics::new(&registry)?,
        )
        .with_registry(Arc::new(sessions)),
    );
    let admin = bind("admin.bind", &config.admin.bind_for(Role::Job)).await?;
    log_listening("admin", admin.local_addr()?);
    tracing::info!(member = %member, version = env!("CARGO_PKG_VERSION"), "pushcluster job started");

    // Ready while the stream can be consumed.
    let consuming = bus.clone();
    follow_readiness(
        readiness.clone(),
        supervisor.shutdown.clone(),
        "job",
        move || consuming.is_ready(),
    );
    let stop_admin = CancellationToken::new();
    let admin_task = supervisor.spawn_admin(admin, registry, readiness, stop_admin.clone());
    let job_task = supervisor.spawn("job", {
        let (job, stop) = (job.clone(), supervisor.shutdown.clone());
        Box::pin(async move {
            job.run(Arc::new(bus), discovery, stop)
                .await
                .map_err(|e| e.to_string())
        })
    });
    supervisor.shutdown.cancelled().await;
    let finished = supervisor.finish(vec![("job", job_task)]).await;
    stop_background.cancel();
    stop_admin.cancel();
    let _ = admin_task.await;
    finished
}
