//! NATS, the fleet's one stateful dependency: JetStream carries the push
//! stream ([`NatsBus`]), KV buckets hold sessions and comet reports
//! ([`NatsRegistry`]) and job partition leases ([`lease`]).
//!
//! Processes start even when NATS is unreachable: the client connects in
//! the background and reconnects forever; [`Nats::is_connected`] and the
//! `pushcluster_nats_connected` gauge say whether it is up.

pub mod bus;
pub mod lease;
pub mod registry;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use pushcluster_api::backoff::Backoff;
use pushcluster_api::config::{NatsConfig, Storage};

pub use bus::NatsBus;
pub use registry::NatsRegistry;
pub use upstream::NatsUpstream;

/// Why talking to NATS failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot read NATS credentials {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("NATS request failed: {0}")]
    Request(String),
}

impl NatsError {
    pub(crate) fn request(error: impl std::fmt::Display) -> Self {
        NatsError::Request(error.to_string())
    }
}

/// Connection-level metrics.
#[derive(Clone)]
pub struct NatsMetrics {
    pub connected: prometheus::IntGauge,
    pub events: prometheus::IntCounterVec,
}

impl NatsMetrics {
    pub fn new(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::build()?;
        registry.register(Box::new(metrics.connected.clone()))?;
        registry.register(Box::new(metrics.events.clone()))?;
        Ok(metrics)
    }

    pub fn unregistered() -> Self {
        Self::build().unwrap_or_else(|_| unreachable!("static metric definitions are valid"))
    }

    fn build() -> Result<Self, prometheus::Error> {
        let events = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "pushcluster_nats_events_total",
                "NATS connection events (connected, disconnected, slow_consumer, error, other).",
            ),
            &["event"],
        )?;
        for event in [
            "connected",
            "disconnected",
            "slow_consumer",
            "error",
            "other",
        ] {
            events.with_label_values(&[event]);
        }
        Ok(NatsMetrics {
            connected: prometheus::IntGauge::new(
                "pushcluster_nats_connected",
                "1 while the connection to NATS is up.",
            )?,
            events,
        })
    }
}

/// A NATS connection and its JetStream context.
#[derive(Clone)]
pub struct Nats {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    config: Arc<NatsConfig>,
}

impl Nats {
    /// Connects in the background: returns at once even if NATS is down.
    pub async fn connect(
        config: &NatsConfig,
        client_name: &str,
        metrics: NatsMetrics,
    ) -> Result<Nats, NatsError> {
        let mut options = match &config.credentials_file {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| NatsError::Credentials {
                    path: path.clone(),
                    source,
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        let events = metrics.clone();
        let options = options
            .name(client_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(config.request_timeout)
            .request_timeout(Some(config.request_timeout))
            // Bounded, jittered backoff: a restarted NATS is found again
            // within seconds, without every process reconnecting at once.
            .reconnect_delay_callback(|attempts| {
                Backoff::delay_for(
                    Duration::from_millis(100),
                    Duration::from_secs(2),
                    u32::try_from(attempts).unwrap_or(u32::MAX),
                )
            })
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    let label = match &event {
                        async_nats::Event::Connected => {
                            events.connected.set(1);
                            tracing::info!("connected to NATS");
                            "connected"
                        }
                        async_nats::Event::Disconnected => {
                            events.connected.set(0);
                            tracing::warn!("disconnected from NATS; reconnecting");
                            "disconnected"
                        }
                        async_nats::Event::SlowConsumer(_) => "slow_consumer",
                        async_nats::Event::ServerError(error) => {
                            tracing::warn!(%error, "NATS server error");
                            "error"
                        }
                        async_nats::Event::ClientError(error) => {
                            tracing::warn!(%error, "NATS client error");
                            "error"
                        }
                        _ => "other",
                    };
                    events.events.with_label_values(&[label]).inc();
                }
            });
        let client = options
            .connect(config.url.as_str())
            .await
            .map_err(|error| NatsError::Connect(error.to_string()))?;
        if client.connection_state() == async_nats::connection::State::Connected {
            metrics.connected.set(1);
        }
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        Ok(Nats {
            client,
            jetstream,
            config: Arc::new(config.clone()),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    /// Creates or updates a KV bucket whose entries expire `max_age` after
    /// their last write.
    pub(crate) async fn bucket(
        &self,
        name: &str,
        max_age: Duration,
        storage: Storage,
    ) -> Result<jetstream::kv::Store, NatsError> {
        let config = jetstream::kv::Config {
            bucket: name.to_string(),
            history: 1,
            max_age,
            storage: storage_type(storage),
            num_replicas: self.config.kv_replicas.max(1) as usize,
            ..Default::default()
        };
        self.jetstream
            .create_or_update_key_value(config)
            .await
            .map_err(NatsError::request)
    }
}

pub(crate) fn storage_type(storage: Storage) -> jetstream::stream::StorageType {
    match storage {
        Storage::File => jetstream::stream::StorageType::File,
        Storage::Memory => jetstream::stream::StorageType::Memory,
    }
}

/// Retries `attempt` with backoff until it succeeds or `stop` is cancelled.
pub(crate) async fn retry<T, F, Fut>(
    what: &str,
    stop: &tokio_util::sync::CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, NatsError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut logged = false;
    loop {
        match attempt().await {
            Ok(value) => {
                if logged {
                    tracing::info!(what, "NATS request works again");
                }
                return Some(value);
            }
            Err(error) => {
                if !logged {
                    tracing::warn!(what, %error, "NATS request failed; retrying");
                    logged = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// FNV-1a: a stable hash (the same in every process and version) for
/// partitioning and rendezvous ownership.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // MurmurHash3's finalizer: FNV alone maps similar inputs (job-a, job-b)
    // to correlated values, which would skew rendezvous ownership.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests;
