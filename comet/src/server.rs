//! Binds a comet's listeners and runs them until shutdown, then drains.

use std::net::SocketAddr;
use std::sync::Arc;

use pushcluster_api::health::Readiness;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Comet;
use crate::tcp::Serve;

/// Why a comet could not set up its listeners.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {key} = {addr}: {source}")]
    Listen {
        key: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("comet.websocket.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

pub async fn bind(key: &'static str, addr: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError::Listen {
            key,
            addr: addr.to_string(),
            source,
        })
}

/// A comet with its sockets bound.
pub struct CometServer {
    comet: Arc<Comet>,
    tcp: Vec<TcpListener>,
    websocket: Vec<TcpListener>,
    wss: Vec<(TcpListener, tokio_rustls::TlsAcceptor)>,
    grpc: TcpListener,
    grpc_tls: Option<tonic::transport::ServerTlsConfig>,
    accepting: tokio::sync::watch::Sender<bool>,
}

impl CometServer {
    /// Binds `comet.tcp.bind`, `comet.websocket.bind` and `comet.grpc.bind`.
    pub async fn bind(comet: Arc<Comet>) -> Result<CometServer, BindError> {
        let config = comet.config().clone();
        let mut tcp = Vec::new();
        for addr in &config.tcp.bind {
            tcp.push(bind("comet.tcp.bind", addr).await?);
        }
        let mut websocket = Vec::new();
        for addr in &config.websocket.bind {
            websocket.push(bind("comet.websocket.bind", addr).await?);
        }
        let mut wss = Vec::new();
        if let Some(tls) = &config.websocket.tls {
            let acceptor = crate::tls::acceptor(tls)?;
            for addr in &tls.bind {
                wss.push((
                    bind("comet.websocket.tls.bind", addr).await?,
                    acceptor.clone(),
                ));
            }
        }
        let grpc = bind("comet.grpc.bind", &config.grpc.bind).await?;
        if let Ok(local) = grpc.local_addr() {
            let _ = comet.grpc_addr.set(advertised(local));
        }
        Ok(CometServer {
            comet,
            tcp,
            websocket,
            wss,
            grpc,
            grpc_tls: None,
            accepting: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Serves the gRPC service with mutual TLS (`grpc_tls`).
    pub fn with_grpc_tls(mut self, tls: Option<tonic::transport::ServerTlsConfig>) -> Self {
        self.grpc_tls = tls;
        self
    }

    /// Bound addresses by config key, for logs and tests.
    pub fn local_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut addrs = Vec::new();
        for listener in &self.tcp {
            if let Ok(addr) = listener.local_addr() {
                addrs.push(("comet.tcp", addr));
            }
        }
        for listener in &self.websocket {
            if let Ok(addr) = listener.local_addr() {
                addrs.push(("comet.websocket", addr));
            }
        }
        for (listener, _) in &self.wss {
            if let Ok(addr) = listener.local_addr() {
                addrs.push(("comet.wss", addr));
            }
        }
        if let Ok(addr) = self.grpc.local_addr() {
            addrs.push(("comet.grpc", addr));
        }
        addrs
    }

    pub fn comet(&self) -> &Arc<Comet> {
        &self.comet
    }

    /// Turns true once clients are accepted.
    pub fn accepting(&self) -> tokio::sync::watch::Receiver<bool> {
        self.accepting.subscribe()
    }

    /// Serves clients and job until `shutdown`; then stops accepting, drains
    /// the connections over `comet.drain` (at once if `force` is cancelled),
    /// and stops the gRPC service last so job can push during the drain.
    ///
    /// Clients are accepted once logic has taken this comet's first report;
    /// `ready` is set then, and cleared when the drain starts.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        force: CancellationToken,
        ready: Readiness,
    ) {
        let comet = self.comet;
        let stop_accepting = CancellationToken::new();
        let stop_grpc = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let grpc = tokio::spawn(crate::grpc::serve(
            self.grpc,
            comet.clone(),
            stop_grpc.clone(),
            self.grpc_tls,
        ));
        let (reported, first_report) = tokio::sync::oneshot::channel();
        tasks.spawn(crate::report::run(
            comet.clone(),
            stop_grpc.clone(),
            reported,
        ));
        tasks.spawn(sweep(comet.clone(), stop_grpc.clone()));
        let started = tokio::select! {
            result = first_report => result.is_ok(),
            _ = shutdown.cancelled() => false,
        };
        if started {
            ready.set_ready(true);
            self.accepting.send_replace(true);
            tracing::info!(comet = %comet.id(), "accepting clients");
        }
        let listeners = self
            .tcp
            .into_iter()
            .map(|l| (l, Serve::Tcp))
            .chain(self.websocket.into_iter().map(|l| (l, Serve::WebSocket)))
            .chain(
                self.wss
                    .into_iter()
                    .map(|(l, acceptor)| (l, Serve::WebSocketTls(acceptor))),
            );
        for (listener, serve) in listeners {
            tasks.spawn(crate::tcp::accept_loop(
                listener,
                comet.clone(),
                serve,
                stop_accepting.clone(),
            ));
        }
        shutdown.cancelled().await;
        ready.set_ready(false);
        stop_accepting.cancel();
        comet.drain(comet.config().drain, &force).await;
        stop_grpc.cancel();
        while tasks.join_next().await.is_some() {}
        match grpc.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "comet gRPC server failed"),
            Err(error) => tracing::error!(%error, "comet gRPC task failed"),
        }
    }
}

/// Closes connections whose heartbeat or pending write is overdue, until
/// `stop`.
async fn sweep(comet: Arc<Comet>, stop: CancellationToken) {
    let mut every = tokio::time::interval(crate::SWEEP_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return,
        }
        comet.sweep();
    }
}

/// The gRPC address other processes use: the bound one, with an
/// unspecified IP replaced by `POD_IP` (Kubernetes) or the loopback address.
fn advertised(local: SocketAddr) -> String {
    if local.ip().is_unspecified() {
        let host = std::env::var("POD_IP").unwrap_or_else(|_| "127.0.0.1".to_string());
        format!("{host}:{}", local.port())
    } else {
        local.to_string()
    }
}
