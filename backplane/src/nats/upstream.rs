//! The upstream stream on JetStream: one message per client message, its
//! sender in headers (`docs/upstream.md`).

use std::sync::Arc;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use pushcluster_api::config::UpstreamConfig;
use tokio::sync::OnceCell;

use super::{Nats, NatsError, storage_type};
use crate::bus::BusError;
use crate::upstream::{Upstream, UpstreamMessage};

/// Headers of an upstream message.
pub const HEADER_MID: &str = "Pushcluster-Mid";
pub const HEADER_KEY: &str = "Pushcluster-Key";
pub const HEADER_COMET: &str = "Pushcluster-Comet";
/// The rooms the sender is in, a JSON array of strings (goim's room
/// first). One header, not one per room: some clients keep only the last
/// value of a repeated header (async-nats' direct get does).
pub const HEADER_ROOMS: &str = "Pushcluster-Rooms";
pub const HEADER_OP: &str = "Pushcluster-Op";

#[derive(Clone)]
pub struct NatsUpstream {
    inner: Arc<Inner>,
}

struct Inner {
    nats: Nats,
    config: UpstreamConfig,
    /// The stream was created or updated (once per process).
    ready: OnceCell<()>,
}

impl NatsUpstream {
    pub fn new(nats: Nats, config: UpstreamConfig) -> NatsUpstream {
        NatsUpstream {
            inner: Arc::new(Inner {
                nats,
                config,
                ready: OnceCell::new(),
            }),
        }
    }

    async fn ensure_stream(&self) -> Result<(), BusError> {
        self.inner
            .ready
            .get_or_try_init(|| async {
                let config = &self.inner.config;
                let nats_config = self.inner.nats.config();
                let stream = stream::Config {
                    name: config.stream.clone(),
                    subjects: vec![config.subject.clone()],
                    retention: stream::RetentionPolicy::Limits,
                    storage: storage_type(nats_config.stream.storage),
                    num_replicas: nats_config.stream.replicas.max(1) as usize,
                    max_age: config.max_age,
                    ..Default::default()
                };
                self.inner
                    .nats
                    .jetstream()
                    .create_or_update_stream(stream)
                    .await
                    .map(|_| ())
                    .map_err(NatsError::request)
            })
            .await
            .map(|_| ())
            .map_err(|error| BusError::Unavailable(error.to_string()))
    }
}

#[async_trait]
impl Upstream for NatsUpstream {
    async fn send(&self, message: UpstreamMessage) -> Result<u64, BusError> {
        if !self.inner.nats.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        self.ensure_stream().await?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(HEADER_MID, message.mid.to_string().as_str());
        headers.insert(HEADER_KEY, message.key.as_str());
        headers.insert(HEADER_COMET, message.comet.as_str());
        headers.insert(HEADER_OP, message.op.to_string().as_str());
        let rooms = serde_json::to_string(&message.rooms)
            .map_err(|e| BusError::Other(format!("rooms as JSON: {e}")))?;
        headers.insert(HEADER_ROOMS, rooms.as_str());
        let ack = self
            .inner
            .nats
            .jetstream()
            .publish_with_headers(self.inner.config.subject.clone(), headers, message.body)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(ack.sequence)
    }

    /// Also creates the stream (logic calls this at start), so a backend
    /// can make its consumer before the first client message.
    async fn pending(&self) -> Result<Option<u64>, BusError> {
        self.ensure_stream().await?;
        let consumer = &self.inner.config.consumer;
        if consumer.is_empty() {
            return Ok(None);
        }
        let stream = self
            .inner
            .nats
            .jetstream()
            .get_stream(&self.inner.config.stream)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let mut consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> =
            match stream.get_consumer(consumer).await {
                Ok(consumer) => consumer,
                // Not created by the backend yet.
                Err(_) => return Ok(None),
            };
        let info = consumer
            .info()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(Some(info.num_pending + info.num_ack_pending as u64))
    }
}
