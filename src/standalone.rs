//! `pushcluster standalone`: comet, logic and job in one process, joined by
//! the in-memory bus, registry and discovery, and by direct in-process links
//! in place of gRPC. The comet and logic gRPC services still listen, so
//! goim's own processes and tools can talk to them.

use std::sync::Arc;

use crate::grpc_tls::GrpcTls;
use futures_util::TryFutureExt;
use pushcluster_api::config::{Config, Role};
use pushcluster_api::health::Readiness;
use pushcluster_backplane::bus::{BusMetrics, MemoryBus, MemoryBusConfig};
use pushcluster_backplane::discovery::{CometEndpoint, StaticDiscovery};
use pushcluster_backplane::nats::NatsUpstream;
use pushcluster_backplane::registry::MemoryRegistry;
use pushcluster_comet::metrics::CometMetrics;
use pushcluster_comet::server::bind;
use pushcluster_comet::{Comet, CometServer};
use pushcluster_job::metrics::JobMetrics;
use pushcluster_job::{InProcessConnector, Job};
use pushcluster_logic::Logic;
use pushcluster_logic::metrics::LogicMetrics;
use tokio_util::sync::CancellationToken;

use crate::process::{Supervisor, comet_id, log_listening, metrics_registry};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let registry = metrics_registry("standalone", &readiness)?;

    let bus = MemoryBus::with_metrics(
        MemoryBusConfig {
            history: config.history.clone(),
            ..MemoryBusConfig::default()
        },
        BusMetrics::new(&registry)?,
    );
    let sessions = Arc::new(MemoryRegistry::new(
        config.logic.session_expire,
        config.logic.online_expire,
    ));
    let mut logic = Logic::new(
        config.logic.clone(),
        sessions.clone(),
        Arc::new(bus.clone()),
        LogicMetrics::new(&registry)?,
    )?
    .with_history(&config.history);
    // Client messages for the backend need a place the backend reads:
    // NATS, even here (everything else stays in memory).
    if config.upstream.enabled {
        let nats = crate::fleet::connect_nats(&config, "pushcluster-standalone", &registry).await?;
        let upstream = NatsUpstream::new(nats, config.upstream.clone());
        logic = logic.with_upstream(Arc::new(upstream), &config.upstream);
    }
    let logic = Arc::new(logic);

    let id = comet_id(&config);
    let comet = Comet::new(
        id.clone(),
        config.comet.clone(),
        logic.clone(),
        CometMetrics::new(&registry)?,
    );
    comet.set_upstream(config.upstream.clone());
    // Standalone's links are in process; its gRPC ports (for goim tools)
    // take grpc_tls like a fleet's.
    let tls = GrpcTls::from_config(config.grpc_tls.as_ref())?;
    let comet_server = CometServer::bind(comet.clone())
        .await?
        .with_grpc_tls(tls.as_ref().map(GrpcTls::server));
    let comet_grpc = comet_server
        .local_addrs()
        .into_iter()
        .find(|(name, _)| *name == "comet.grpc")
        .map(|(_, addr)| addr.to_string())
        .unwrap_or_default();
    let discovery = Arc::new(StaticDiscovery::new(
        vec![CometEndpoint {
            id: id.clone(),
            addr: comet_grpc,
        }],
        Vec::new(),
    ));
    let connector = InProcessConnector::new().with(id.clone(), comet.clone());
    let job = Arc::new(
        Job::new(
            config.job.clone(),
            Arc::new(connector),
            JobMetrics::new(&registry)?,
        )
        .with_registry(sessions),
    );

    let http = bind("logic.http.bind", &config.logic.http.bind).await?;
    let logic_grpc = bind("logic.grpc.bind", &config.logic.grpc.bind).await?;
    let admin = bind("admin.bind", &config.admin.bind_for(Role::Standalone)).await?;
    for (name, addr) in comet_server.local_addrs() {
        log_listening(name, addr);
    }
    log_listening("logic.http", http.local_addr()?);
    log_listening("logic.grpc", logic_grpc.local_addr()?);
    log_listening("admin", admin.local_addr()?);

    let supervisor = Supervisor::new()?;
    let stop_admin = CancellationToken::new();
    let admin_task = supervisor.spawn_admin(
        admin,
        registry.clone(),
        readiness.clone(),
        stop_admin.clone(),
    );
    let stop_http = CancellationToken::new();
    tokio::spawn(logic.clone().watch_backpressure(stop_http.clone()));
    tokio::spawn(logic.clone().watch_upstream(stop_http.clone()));
    let http_task = supervisor.spawn(
        "logic HTTP server",
        Box::pin(
            pushcluster_logic::http::serve(http, logic.clone(), stop_http.clone())
                .map_err(|e| e.to_string()),
        ),
    );
    let stop_logic_grpc = CancellationToken::new();
    let logic_grpc_task = supervisor.spawn(
        "logic gRPC server",
        Box::pin(
            pushcluster_logic::grpc::serve(
                logic_grpc,
                logic.clone(),
                stop_logic_grpc.clone(),
                tls.as_ref().map(GrpcTls::server),
            )
            .map_err(|e| e.to_string()),
        ),
    );
    let stop_job = CancellationToken::new();
    let job_task = supervisor.spawn("job", {
        let (job, stop) = (job.clone(), stop_job.clone());
        Box::pin(async move {
            job.run(Arc::new(bus), discovery, stop)
                .await
                .map_err(|e| e.to_string())
        })
    });
    let shutdown = supervisor.shutdown.clone();
    let mut accepting = comet_server.accepting();
    let comet_task = tokio::spawn(comet_server.run(
        shutdown.clone(),
        supervisor.force.clone(),
        readiness.clone(),
    ));
    // Ready once the comet accepts clients (after logic took its first report).
    tokio::select! {
        _ = accepting.wait_for(|accepting| *accepting) => {
            tracing::info!(comet = %id, version = env!("CARGO_PKG_VERSION"), "pushcluster standalone ready");
        }
        _ = shutdown.cancelled() => {}
    }

    shutdown.cancelled().await;
    // No new pushes; what is queued still reaches the connections that stay
    // until the comet has drained them.
    stop_http.cancel();
    if let Err(error) = comet_task.await {
        tracing::error!(%error, "comet task failed");
    }
    stop_job.cancel();
    stop_logic_grpc.cancel();
    let tasks = vec![
        ("logic HTTP", http_task),
        ("job", job_task),
        ("logic gRPC", logic_grpc_task),
    ];
    let finished = supervisor.finish(tasks).await;
    stop_admin.cancel();
    let _ = admin_task.await;
    finished
}
