//! `goim.logic.Logic` over gRPC: the same calls as the in-process
//! [`LogicLink`] of standalone mode, for comets in other processes
//! (goim's own comets included). Accepts and sends gzip like goim.

use std::sync::Arc;
use std::time::Duration;

use pushcluster_api::link::LogicLink;
use pushcluster_api::pb::logic::logic_server::{Logic as LogicService, LogicServer};
use pushcluster_api::pb::logic::{
    ConnectReply, ConnectReq, DisconnectReply, DisconnectReq, HeartbeatReply, HeartbeatReq,
    HistoryReply, HistoryReq, NodesReply, NodesReq, OnlineReply, OnlineReq, ReceiveReply,
    ReceiveReq,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::{Logic, LogicError};

/// The tonic service around [`Logic`].
#[derive(Clone)]
pub struct LogicGrpc {
    logic: Arc<Logic>,
}

impl LogicGrpc {
    pub fn new(logic: Arc<Logic>) -> Self {
        LogicGrpc { logic }
    }

    pub fn into_server(self) -> LogicServer<LogicGrpc> {
        LogicServer::new(self)
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
    }
}

fn status(error: LogicError) -> Status {
    match error {
        LogicError::InvalidArgument(m) => Status::invalid_argument(m),
        other => Status::unavailable(other.to_string()),
    }
}

#[tonic::async_trait]
impl LogicService for LogicGrpc {
    async fn connect(&self, req: Request<ConnectReq>) -> Result<Response<ConnectReply>, Status> {
        Ok(Response::new(self.logic.connect(req.into_inner()).await?))
    }

    async fn disconnect(
        &self,
        req: Request<DisconnectReq>,
    ) -> Result<Response<DisconnectReply>, Status> {
        Ok(Response::new(
            self.logic.disconnect(req.into_inner()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatReq>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        Ok(Response::new(self.logic.heartbeat(req.into_inner()).await?))
    }

    async fn renew_online(&self, req: Request<OnlineReq>) -> Result<Response<OnlineReply>, Status> {
        Ok(Response::new(
            self.logic.renew_online(req.into_inner()).await?,
        ))
    }

    async fn receive(&self, req: Request<ReceiveReq>) -> Result<Response<ReceiveReply>, Status> {
        Ok(Response::new(self.logic.receive(req.into_inner()).await?))
    }

    async fn history(&self, req: Request<HistoryReq>) -> Result<Response<HistoryReply>, Status> {
        Ok(Response::new(self.logic.history(req.into_inner()).await?))
    }

    async fn nodes(&self, req: Request<NodesReq>) -> Result<Response<NodesReply>, Status> {
        let req = req.into_inner();
        let client_ip = req.client_ip.parse().ok();
        let reply = self
            .logic
            .nodes_weighted(&req.platform, client_ip)
            .await
            .map_err(status)?;
        Ok(Response::new(reply))
    }
}

/// Serves `goim.logic.Logic` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    logic: Arc<Logic>,
    shutdown: CancellationToken,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    // goim's rpcServer defaults: keepalive 60 s, timeout 20 s.
    builder
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(LogicGrpc::new(logic).into_server())
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
            shutdown.cancelled().await
        })
        .await
}
