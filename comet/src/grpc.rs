//! `goim.comet.Comet` over gRPC: the same calls as the in-process
//! [`CometLink`] of standalone mode, for job processes (goim's included).

use std::sync::Arc;
use std::time::Duration;

use pushcluster_api::link::CometLink;
use pushcluster_api::pb::comet::comet_server::{Comet as CometService, CometServer};
use pushcluster_api::pb::comet::{
    BroadcastReply, BroadcastReq, BroadcastRoomReply, BroadcastRoomReq, PushMsgReply, PushMsgReq,
    RoomsReply, RoomsReq,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::Comet;

/// Room batches can be large; goim's job allows 16 MiB messages.
const MAX_MESSAGE: usize = 32 << 20;

#[derive(Clone)]
pub struct CometGrpc {
    comet: Arc<Comet>,
}

impl CometGrpc {
    pub fn new(comet: Arc<Comet>) -> Self {
        CometGrpc { comet }
    }

    pub fn into_server(self) -> CometServer<CometGrpc> {
        CometServer::new(self)
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_MESSAGE)
    }
}

#[tonic::async_trait]
impl CometService for CometGrpc {
    async fn push_msg(&self, req: Request<PushMsgReq>) -> Result<Response<PushMsgReply>, Status> {
        Ok(Response::new(self.comet.push_msg(req.into_inner()).await?))
    }

    async fn broadcast(
        &self,
        req: Request<BroadcastReq>,
    ) -> Result<Response<BroadcastReply>, Status> {
        Ok(Response::new(self.comet.broadcast(req.into_inner()).await?))
    }

    async fn broadcast_room(
        &self,
        req: Request<BroadcastRoomReq>,
    ) -> Result<Response<BroadcastRoomReply>, Status> {
        Ok(Response::new(
            self.comet.broadcast_room(req.into_inner()).await?,
        ))
    }

    async fn rooms(&self, _req: Request<RoomsReq>) -> Result<Response<RoomsReply>, Status> {
        Ok(Response::new(CometLink::rooms(&*self.comet).await?))
    }
}

/// Serves `goim.comet.Comet` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    comet: Arc<Comet>,
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
        .add_service(CometGrpc::new(comet).into_server())
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
            shutdown.cancelled().await
        })
        .await
}
