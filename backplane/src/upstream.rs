//! Upstream: what clients send (op 4), on its way to the business backend
//! with the identity the server authenticated (`docs/upstream.md`).

use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use crate::bus::BusError;

/// One client message, as logic hands it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamMessage {
    /// Who sent it: the session's mid and key, its comet, and its rooms.
    pub mid: i64,
    pub key: String,
    pub comet: String,
    pub rooms: Vec<String>,
    /// The frame's op (4, or an application op) and body.
    pub op: i32,
    pub body: Bytes,
}

#[async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// Stores the message durably for the backend; its id (the stream
    /// sequence) once stored.
    async fn send(&self, message: UpstreamMessage) -> Result<u64, BusError>;

    /// Messages the backend's consumer has not taken or not acked yet
    /// (`None`: no consumer is watched, or it does not exist yet).
    async fn pending(&self) -> Result<Option<u64>, BusError>;
}

/// Keeps what it is sent, in order (tests, and a standalone run without a
/// backend to watch what would go out).
#[derive(Default)]
pub struct MemoryUpstream {
    sent: Mutex<Vec<UpstreamMessage>>,
}

impl MemoryUpstream {
    pub fn sent(&self) -> Vec<UpstreamMessage> {
        self.sent
            .lock()
            .map(|sent| sent.clone())
            .unwrap_or_default()
    }
}

#[async_trait]
impl Upstream for MemoryUpstream {
    async fn send(&self, message: UpstreamMessage) -> Result<u64, BusError> {
        let mut sent = self
            .sent
            .lock()
            .map_err(|_| BusError::Other("upstream record poisoned".into()))?;
        sent.push(message);
        Ok(sent.len() as u64)
    }

    async fn pending(&self) -> Result<Option<u64>, BusError> {
        Ok(None)
    }
}
