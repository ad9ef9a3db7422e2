//! Links to comets over gRPC (`goim.comet.Comet`): one HTTP/2 channel per
//! comet, connected lazily and reconnected by tonic, with goim's keepalive
//! (10 s / 3 s) and a deadline on every call (`job.delivery.timeout`).

use std::time::Duration;

use async_trait::async_trait;
use pushcluster_api::link::{CometLink, LinkError};
use pushcluster_api::pb::comet::comet_client::CometClient;
use pushcluster_api::pb::comet::{
    BroadcastReply, BroadcastReq, BroadcastRoomReply, BroadcastRoomReq, PushMsgReply, PushMsgReq,
    RoomsReply, RoomsReq,
};
use pushcluster_backplane::discovery::CometEndpoint;
use std::sync::Arc;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::CometConnector;

/// Room batches can be large; goim allows 16 MiB, comets accept 32 MiB.
const MAX_MESSAGE: usize = 32 << 20;

pub struct GrpcComet {
    client: CometClient<Channel>,
    timeout: Duration,
}

impl GrpcComet {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }
}

fn status(status: tonic::Status) -> LinkError {
    LinkError::from(status)
}

#[async_trait]
impl CometLink for GrpcComet {
    async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, LinkError> {
        let mut client = self.client.clone();
        Ok(client
            .push_msg(self.request(req))
            .await
            .map_err(status)?
            .into_inner())
    }

    async fn broadcast(&self, req: BroadcastReq) -> Result<BroadcastReply, LinkError> {
        let mut client = self.client.clone();
        Ok(client
            .broadcast(self.request(req))
            .await
            .map_err(status)?
            .into_inner())
    }

    async fn broadcast_room(&self, req: BroadcastRoomReq) -> Result<BroadcastRoomReply, LinkError> {
        let mut client = self.client.clone();
        Ok(client
            .broadcast_room(self.request(req))
            .await
            .map_err(status)?
            .into_inner())
    }

    async fn rooms(&self) -> Result<RoomsReply, LinkError> {
        let mut client = self.client.clone();
        Ok(client
            .rooms(self.request(RoomsReq {}))
            .await
            .map_err(status)?
            .into_inner())
    }
}

/// Opens a [`GrpcComet`] for each comet discovery reports.
pub struct GrpcConnector {
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
}

impl GrpcConnector {
    /// `tls`: dial comets with mutual TLS (`grpc_tls`).
    pub fn new(timeout: Duration, tls: Option<ClientTlsConfig>) -> Self {
        GrpcConnector { timeout, tls }
    }
}

impl CometConnector for GrpcConnector {
    fn connect(&self, endpoint: &CometEndpoint) -> Result<Arc<dyn CometLink>, LinkError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = format!("{scheme}://{}", endpoint.addr);
        let mut channel = Endpoint::from_shared(uri).map_err(|e| {
            LinkError::InvalidArgument(format!("bad comet address {}: {e}", endpoint.addr))
        })?;
        if let Some(tls) = &self.tls {
            channel = channel.tls_config(tls.clone()).map_err(|e| {
                LinkError::InvalidArgument(format!("grpc_tls for {}: {e}", endpoint.addr))
            })?;
        }
        let channel = channel
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_lazy();
        let client = CometClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Arc::new(GrpcComet {
            client,
            timeout: self.timeout,
        }))
    }
}
