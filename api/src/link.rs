//! The calls components make to each other: job → comet (`goim.comet.Comet`)
//! and comet → logic (`goim.logic.Logic`). In standalone mode they are direct
//! calls into the other component; between processes they are gRPC. Both
//! sides of a link use the goim request and reply messages, so the in-process
//! and the gRPC paths run the same code.

use async_trait::async_trait;

use crate::pb::comet::{
    BroadcastReply, BroadcastReq, BroadcastRoomReply, BroadcastRoomReq, PushMsgReply, PushMsgReq,
    RoomsReply,
};
use crate::pb::logic::{
    ConnectReply, ConnectReq, DisconnectReply, DisconnectReq, HeartbeatReply, HeartbeatReq,
    HistoryReply, HistoryReq, OnlineReply, OnlineReq, ReceiveReply, ReceiveReq,
};

/// Why a call over a link failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The request itself is wrong; retrying it cannot help.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The caller is not allowed (for Connect: the auth body was refused).
    #[error("rejected: {0}")]
    Rejected(String),
    /// The peer could not be reached or did not answer in time; a retry may work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The peer failed while handling the request.
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller lost its right to deliver: a newer owner of the stream
    /// partition has delivered since (fencing). Drop the message; its new
    /// owner delivers it.
    #[error("stale partition owner: {0}")]
    Stale(String),
}

impl LinkError {
    /// Whether retrying the same request may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LinkError::Unavailable(_) | LinkError::Internal(_))
    }

    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            LinkError::InvalidArgument(_) => "invalid_argument",
            LinkError::Rejected(_) => "rejected",
            LinkError::Unavailable(_) => "unavailable",
            LinkError::Internal(_) => "internal",
            LinkError::Stale(_) => "stale_owner",
        }
    }
}

impl From<LinkError> for tonic::Status {
    fn from(error: LinkError) -> Self {
        match error {
            LinkError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            LinkError::Rejected(m) => tonic::Status::unauthenticated(m),
            LinkError::Unavailable(m) => tonic::Status::unavailable(m),
            LinkError::Internal(m) => tonic::Status::internal(m),
            LinkError::Stale(m) => tonic::Status::failed_precondition(m),
        }
    }
}

impl From<tonic::Status> for LinkError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let message = format!("{}: {}", status.code(), status.message());
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::Unimplemented => {
                LinkError::InvalidArgument(message)
            }
            Code::Unauthenticated | Code::PermissionDenied => LinkError::Rejected(message),
            Code::FailedPrecondition => LinkError::Stale(message),
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted => LinkError::Unavailable(message),
            _ => LinkError::Internal(message),
        }
    }
}

/// What job needs from one comet (`goim.comet.Comet`).
#[async_trait]
pub trait CometLink: Send + Sync + 'static {
    async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, LinkError>;
    async fn broadcast(&self, req: BroadcastReq) -> Result<BroadcastReply, LinkError>;
    async fn broadcast_room(&self, req: BroadcastRoomReq) -> Result<BroadcastRoomReply, LinkError>;
    async fn rooms(&self) -> Result<RoomsReply, LinkError>;
}

/// What a comet needs from logic (`goim.logic.Logic`).
#[async_trait]
pub trait LogicLink: Send + Sync + 'static {
    async fn connect(&self, req: ConnectReq) -> Result<ConnectReply, LinkError>;
    async fn disconnect(&self, req: DisconnectReq) -> Result<DisconnectReply, LinkError>;
    async fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatReply, LinkError>;
    async fn renew_online(&self, req: OnlineReq) -> Result<OnlineReply, LinkError>;
    async fn receive(&self, req: ReceiveReq) -> Result<ReceiveReply, LinkError>;
    /// A room's history after a position (pushcluster extension).
    async fn history(&self, req: HistoryReq) -> Result<HistoryReply, LinkError>;
}
