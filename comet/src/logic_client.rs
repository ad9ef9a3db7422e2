//! The comet's calls to logic over gRPC (`goim.logic.Logic`), balanced over
//! every logic endpoint discovery reports, with a deadline on each call and
//! HTTP/2 keepalive so dead peers are noticed (goim: 10 s / 3 s).

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use pushcluster_api::link::{LinkError, LogicLink};
use pushcluster_api::pb::logic::logic_client::LogicClient;
use pushcluster_api::pb::logic::{
    ConnectReply, ConnectReq, DisconnectReply, DisconnectReq, HeartbeatReply, HeartbeatReq,
    HistoryReply, HistoryReq, OnlineReply, OnlineReq, ReceiveReply, ReceiveReq,
};
use tokio::sync::watch;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Pending endpoint changes the balancer may buffer.
const CHANGES: usize = 64;

/// A gRPC endpoint with goim's client settings, over mutual TLS when
/// `tls` is set.
pub fn endpoint(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, LinkError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| LinkError::InvalidArgument(format!("bad address {addr}: {e}")))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| LinkError::InvalidArgument(format!("grpc_tls for {addr}: {e}")))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

#[derive(Clone)]
pub struct GrpcLogic {
    client: LogicClient<Channel>,
    timeout: Duration,
}

impl GrpcLogic {
    /// Balances over `addrs` and follows its changes.
    pub fn new(
        mut addrs: watch::Receiver<Vec<String>>,
        timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> GrpcLogic {
        let (channel, changes) = Channel::balance_channel::<String>(CHANGES);
        tokio::spawn(async move {
            let mut current: HashSet<String> = HashSet::new();
            loop {
                let wanted: HashSet<String> = addrs.borrow_and_update().iter().cloned().collect();
                for gone in current.difference(&wanted) {
                    if changes.send(Change::Remove(gone.clone())).await.is_err() {
                        return;
                    }
                    tracing::info!(addr = %gone, "logic endpoint removed");
                }
                for added in wanted.difference(&current) {
                    match endpoint(added, tls.as_ref()) {
                        Ok(endpoint) => {
                            if changes
                                .send(Change::Insert(added.clone(), endpoint))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            tracing::info!(addr = %added, "logic endpoint added");
                        }
                        Err(error) => tracing::warn!(%error, "ignoring logic endpoint"),
                    }
                }
                if wanted.is_empty() {
                    tracing::warn!("no logic endpoints known");
                }
                current = wanted;
                if addrs.changed().await.is_err() {
                    // Discovery is gone; keep the last set.
                    std::future::pending::<()>().await;
                }
            }
        });
        GrpcLogic {
            client: LogicClient::new(channel),
            timeout,
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Runs a call under the deadline (the balancer may wait for an endpoint).
    async fn call<T, F>(&self, call: F) -> Result<T, LinkError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result
                .map(tonic::Response::into_inner)
                .map_err(LinkError::from),
            Err(_) => Err(LinkError::Unavailable(
                "logic did not answer in time".into(),
            )),
        }
    }
}

#[async_trait]
impl LogicLink for GrpcLogic {
    async fn connect(&self, req: ConnectReq) -> Result<ConnectReply, LinkError> {
        let mut client = self.client.clone();
        self.call(client.connect(self.request(req))).await
    }

    async fn disconnect(&self, req: DisconnectReq) -> Result<DisconnectReply, LinkError> {
        let mut client = self.client.clone();
        self.call(client.disconnect(self.request(req))).await
    }

    async fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatReply, LinkError> {
        let mut client = self.client.clone();
        self.call(client.heartbeat(self.request(req))).await
    }

    async fn renew_online(&self, req: OnlineReq) -> Result<OnlineReply, LinkError> {
        let mut client = self.client.clone();
        self.call(client.renew_online(self.request(req))).await
    }

    async fn receive(&self, req: ReceiveReq) -> Result<ReceiveReply, LinkError> {
        let mut client = self.client.clone();
        self.call(client.receive(self.request(req))).await
    }

    async fn history(&self, req: HistoryReq) -> Result<HistoryReply, LinkError> {
        let mut client = self.client.clone();
        // Logic answers within its own `history.replay.timeout`, queueing
        // included; this bound is only against a logic that never answers.
        let timeout = self.timeout + HISTORY_GRACE;
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.history(request)).await {
            Ok(result) => result
                .map(tonic::Response::into_inner)
                .map_err(LinkError::from),
            Err(_) => Err(LinkError::Unavailable(
                "logic did not answer History in time".into(),
            )),
        }
    }
}

/// How much longer than other calls a History call may take.
const HISTORY_GRACE: Duration = Duration::from_secs(10);
