//! Plumbing every process shares: identities, signals, the admin port, and
//! supervising the servers a process runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use futures_util::future::BoxFuture;
use pushcluster_api::config::Config;
use pushcluster_api::health::Readiness;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn pod_or_host() -> Option<String> {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.trim().is_empty()
    {
        return Some(pod);
    }
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    (!host.is_empty()).then_some(host)
}

/// The comet's server id: `comet.id`, else env `POD_NAME`, else the hostname.
pub fn comet_id(config: &Config) -> String {
    config
        .comet
        .id
        .clone()
        .or_else(pod_or_host)
        .unwrap_or_else(|| "comet".to_string())
}

/// The addresses a comet hands to clients through `/goim/nodes/weighted`:
/// `comet.addrs`, else env `POD_IP` (set by the operator), so each comet pod
/// is listed by its own address.
pub fn comet_addrs(config: &Config) -> Vec<String> {
    if !config.comet.addrs.is_empty() {
        return config.comet.addrs.clone();
    }
    std::env::var("POD_IP")
        .ok()
        .map(|ip| ip.trim().to_string())
        .filter(|ip| !ip.is_empty())
        .into_iter()
        .collect()
}

/// A job's lease member id: `job.id`, else `POD_NAME` or the hostname plus
/// a random suffix, so two processes never share one.
pub fn job_id(config: &Config) -> String {
    if let Some(id) = &config.job.id {
        return id.clone();
    }
    let base = pod_or_host().unwrap_or_else(|| "job".to_string());
    format!("{base}-{:06x}", rand::random_range(0..0x100_0000u32))
}

pub fn log_listening(name: &str, addr: SocketAddr) {
    tracing::info!(name, %addr, "listening");
}

/// A metrics registry with the standard process metrics.
/// A process's metrics registry, with what every process reports: the
/// `process_*` metrics, `pushcluster_build_info{version, role}` and
/// `pushcluster_ready{role}` (read from `readiness` at each scrape, so alerts
/// see the same answer as `/readyz`).
pub fn metrics_registry(
    role: &'static str,
    readiness: &Readiness,
) -> anyhow::Result<prometheus::Registry> {
    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .context("cannot register process metrics")?;
    let build_info = prometheus::IntGauge::with_opts(
        prometheus::Opts::new(
            "pushcluster_build_info",
            "Always 1; labels carry the version and the role of this process.",
        )
        .const_label("version", env!("CARGO_PKG_VERSION"))
        .const_label("role", role),
    )?;
    build_info.set(1);
    registry.register(Box::new(build_info))?;
    registry.register(Box::new(ReadyCollector::new(role, readiness.clone())?))?;
    Ok(registry)
}

/// `pushcluster_ready{role}`: 1 while `/readyz` answers 200.
struct ReadyCollector {
    gauge: prometheus::IntGauge,
    readiness: Readiness,
}

impl ReadyCollector {
    fn new(role: &'static str, readiness: Readiness) -> prometheus::Result<Self> {
        let gauge = prometheus::IntGauge::with_opts(
            prometheus::Opts::new(
                "pushcluster_ready",
                "1 while this process wants traffic (/readyz answers 200), else 0.",
            )
            .const_label("role", role),
        )?;
        Ok(ReadyCollector { gauge, readiness })
    }
}

impl prometheus::core::Collector for ReadyCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.gauge.set(i64::from(self.readiness.is_ready()));
        self.gauge.collect()
    }
}

/// Tracks a process's servers: the first SIGTERM/SIGINT cancels `shutdown`,
/// the second `force`; a server that fails stops the process with an error.
pub struct Supervisor {
    pub shutdown: CancellationToken,
    pub force: CancellationToken,
    failed: Arc<AtomicBool>,
}

impl Supervisor {
    pub fn new() -> anyhow::Result<Supervisor> {
        let supervisor = Supervisor {
            shutdown: CancellationToken::new(),
            force: CancellationToken::new(),
            failed: Arc::new(AtomicBool::new(false)),
        };
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let (shutdown, force) = (supervisor.shutdown.clone(), supervisor.force.clone());
        tokio::spawn(async move {
            for round in 0.. {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                if round == 0 {
                    tracing::info!(
                        signal = name,
                        "shutting down; send it again to stop at once"
                    );
                    shutdown.cancel();
                } else {
                    tracing::warn!(signal = name, "stopping at once");
                    force.cancel();
                    return;
                }
            }
        });
        Ok(supervisor)
    }

    /// Runs a server; if it fails, the process shuts down and exits 1.
    pub fn spawn(
        &self,
        what: &'static str,
        server: BoxFuture<'static, Result<(), String>>,
    ) -> JoinHandle<()> {
        let (failed, shutdown) = (self.failed.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            if let Err(error) = server.await {
                tracing::error!(%error, "{what} failed");
                failed.store(true, Ordering::SeqCst);
                shutdown.cancel();
            }
        })
    }

    /// Serves the admin port until `stop`.
    pub fn spawn_admin(
        &self,
        listener: TcpListener,
        registry: prometheus::Registry,
        readiness: Readiness,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        self.spawn(
            "admin server",
            Box::pin(async move {
                crate::admin::serve(listener, registry, readiness, stop)
                    .await
                    .map_err(|e| e.to_string())
            }),
        )
    }

    /// Waits for the tasks, then reports whether any server failed.
    pub async fn finish(self, tasks: Vec<(&'static str, JoinHandle<()>)>) -> anyhow::Result<()> {
        for (name, task) in tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "{name} task failed");
            }
        }
        tracing::info!("stopped");
        if self.failed.load(Ordering::SeqCst) {
            anyhow::bail!("a server failed; see the log above");
        }
        Ok(())
    }
}

/// Keeps `readiness` equal to `check()` until `stop`, logging changes.
pub fn follow_readiness(
    readiness: Readiness,
    stop: CancellationToken,
    what: &'static str,
    check: impl Fn() -> bool + Send + 'static,
) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(std::time::Duration::from_millis(250));
        let mut last = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    readiness.set_ready(false);
                    return;
                }
                _ = ticks.tick() => {}
            }
            let ready = check();
            readiness.set_ready(ready);
            if last != Some(ready) {
                if ready {
                    tracing::info!("{what} ready");
                } else {
                    tracing::warn!("{what} not ready");
                }
                last = Some(ready);
            }
        }
    });
}
