//! Sessions and comet reports in NATS KV (goim kept them in Redis).
//!
//! Bucket `nats.buckets.sessions`, entries expiring `logic.session_expire`
//! after their last write:
//! - `k.<key>` → `{"mid":..,"server":..}` (goim `key_<key>`);
//! - `m.<mid>` → `{"keys":{"<key>":{"server":..,"expires_ms":..}}}` (goim
//!   `mid_<mid>`), changed only by compare-and-set on its revision.
//!
//! Bucket `nats.buckets.online`, entries expiring `logic.online_expire`
//! after their last write: `c.<server>` → the comet's last report. Every
//! logic process keeps a local copy through a KV watch, so reading the
//! reports costs nothing; a comet that stops reporting drops out.
//!
//! Keys and server ids are base64url-encoded in KV keys, since clients
//! choose keys freely and KV keys allow few characters.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use pushcluster_api::config::Storage;
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, watch};
use tokio_util::sync::CancellationToken;

use super::{Nats, NatsError};
use crate::registry::{CometReport, Registry, RegistryError, Session};

/// Compare-and-set attempts before a mid update gives up.
const CAS_ATTEMPTS: usize = 16;
/// Concurrent KV reads of one lookup.
const READ_CONCURRENCY: usize = 32;

fn unavailable(error: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(error.to_string())
}

fn encode(text: &str) -> String {
    if text.is_empty() {
        // KV keys cannot end with a dot.
        return "_".to_string();
    }
    URL_SAFE_NO_PAD.encode(text.as_bytes())
}

fn key_entry(key: &str) -> String {
    format!("k.{}", encode(key))
}

fn mid_entry(mid: i64) -> String {
    format!("m.{mid}")
}

fn report_entry(server: &str) -> String {
    format!("c.{}", encode(server))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Serialize, Deserialize)]
struct KeyValue {
    mid: i64,
    server: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MidSession {
    server: String,
    expires_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct MidValue {
    keys: BTreeMap<String, MidSession>,
}

impl MidValue {
    fn prune(&mut self, now: u64) {
        self.keys.retain(|_, session| session.expires_ms > now);
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ReportValue {
    server: String,
    room_counts: HashMap<String, i32>,
    conn_count: i32,
    ip_count: i32,
    weight: i32,
    offline: bool,
    addrs: Vec<String>,
    region: String,
    zone: String,
    grpc_addr: String,
    updated_ms: u64,
}

impl ReportValue {
    fn into_report(self) -> CometReport {
        CometReport {
            server: self.server,
            room_counts: self.room_counts,
            conn_count: self.conn_count,
            ip_count: self.ip_count,
            weight: self.weight,
            offline: self.offline,
            addrs: self.addrs,
            region: self.region,
            zone: self.zone,
            grpc_addr: self.grpc_addr,
            updated: Some(UNIX_EPOCH + Duration::from_millis(self.updated_ms)),
        }
    }
}

struct Inner {
    nats: Nats,
    session_ttl: Duration,
    report_ttl: Duration,
    sessions: OnceCell<kv::Store>,
    /// Reopened when watching fails: NATS may have lost the bucket.
    online: tokio::sync::Mutex<Option<kv::Store>>,
    /// server → its last report, kept current by a KV watch.
    reports: Mutex<HashMap<String, CometReport>>,
    reports_loaded: watch::Sender<bool>,
}

/// [`Registry`] on NATS KV. Cheap to clone.
#[derive(Clone)]
pub struct NatsRegistry {
    inner: Arc<Inner>,
}

impl NatsRegistry {
    /// `session_ttl`: lifetime of a session without refresh; `report_ttl`:
    /// how long a comet report counts. Watches reports until `stop`.
    pub fn new(
        nats: Nats,
        session_ttl: Duration,
        report_ttl: Duration,
        stop: CancellationToken,
    ) -> NatsRegistry {
        let registry = NatsRegistry {
            inner: Arc::new(Inner {
                nats,
                session_ttl,
                report_ttl,
                sessions: OnceCell::new(),
                online: tokio::sync::Mutex::new(None),
                reports: Mutex::new(HashMap::new()),
                reports_loaded: watch::Sender::new(false),
            }),
        };
        tokio::spawn(registry.clone().watch_reports(stop));
        registry
    }

    async fn sessions(&self) -> Result<&kv::Store, RegistryError> {
        let config = self.inner.nats.config();
        self.inner
            .sessions
            .get_or_try_init(|| {
                self.inner.nats.bucket(
                    &config.buckets.sessions,
                    self.inner.session_ttl,
                    Storage::File,
                )
            })
            .await
            .map_err(unavailable)
    }

    async fn online(&self) -> Result<kv::Store, NatsError> {
        let mut online = self.inner.online.lock().await;
        if let Some(store) = online.as_ref() {
            return Ok(store.clone());
        }
        let config = self.inner.nats.config();
        let store = self
            .inner
            .nats
            .bucket(&config.buckets.online, self.inner.report_ttl, Storage::File)
            .await?;
        *online = Some(store.clone());
        Ok(store)
    }

    async fn forget_online(&self) {
        *self.inner.online.lock().await = None;
    }

    /// Keeps the local copy of every report current.
    async fn watch_reports(self, stop: CancellationToken) {
        loop {
            if let Err(error) = self.follow_reports(&stop).await {
                tracing::warn!(%error, "watching comet reports failed; retrying");
                self.forget_online().await;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn follow_reports(&self, stop: &CancellationToken) -> Result<(), NatsError> {
        let store = self.online().await?;
        let mut entries = store
            .watch_with_history(">")
            .await
            .map_err(NatsError::request)?;
        let status = store.status().await.map_err(NatsError::request)?;
        if status.values() == 0 {
            self.inner.reports_loaded.send_replace(true);
        }
        loop {
            let entry = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                entry = entries.next() => entry,
            };
            let entry = match entry {
                Some(Ok(entry)) => entry,
                Some(Err(error)) => return Err(NatsError::request(error)),
                None => return Err(NatsError::Request("report watch ended".into())),
            };
            let loaded = entry.delta == 0 || entry.seen_current;
            if let Ok(mut reports) = self.inner.reports.lock() {
                match entry.operation {
                    kv::Operation::Put => match serde_json::from_slice::<ReportValue>(&entry.value)
                    {
                        Ok(value) => {
                            reports.insert(value.server.clone(), value.into_report());
                        }
                        Err(error) => {
                            tracing::warn!(key = %entry.key, %error, "unreadable comet report")
                        }
                    },
                    kv::Operation::Delete | kv::Operation::Purge => {
                        reports.retain(|server, _| report_entry(server) != entry.key);
                    }
                }
            }
            if loaded {
                self.inner.reports_loaded.send_replace(true);
            }
        }
    }

    /// Changes `m.<mid>` by compare-and-set, retrying on conflicts.
    async fn update_mid(
        &self,
        mid: i64,
        change: impl Fn(&mut MidValue) -> bool,
    ) -> Result<bool, RegistryError> {
        let store = self.sessions().await?;
        let key = mid_entry(mid);
        for _ in 0..CAS_ATTEMPTS {
            let entry = store.entry(&key).await.map_err(unavailable)?;
            let (mut value, revision) = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => (
                    serde_json::from_slice::<MidValue>(&entry.value).unwrap_or_default(),
                    Some(entry.revision),
                ),
                _ => (MidValue::default(), None),
            };
            value.prune(now_ms());
            let changed = change(&mut value);
            if !changed {
                return Ok(false);
            }
            let result = if value.keys.is_empty() {
                match revision {
                    Some(revision) => store
                        .delete_expect_revision(&key, Some(revision))
                        .await
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                }
            } else {
                let bytes = Bytes::from(
                    serde_json::to_vec(&value).map_err(|e| RegistryError::Other(e.to_string()))?,
                );
                match revision {
                    Some(revision) => store
                        .update(&key, bytes, revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    None => store
                        .create(&key, bytes)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                }
            };
            match result {
                Ok(()) => return Ok(true),
                // Someone changed it meanwhile: read again.
                Err(error) => tracing::debug!(mid, %error, "mid update conflict; retrying"),
            }
        }
        Err(RegistryError::Unavailable(format!(
            "mid {mid}: too many concurrent updates"
        )))
    }

    async fn put_session(&self, session: &Session) -> Result<(), RegistryError> {
        let store = self.sessions().await?;
        let value = serde_json::to_vec(&KeyValue {
            mid: session.mid,
            server: session.server.clone(),
        })
        .map_err(|e| RegistryError::Other(e.to_string()))?;
        store
            .put(key_entry(&session.key), value.into())
            .await
            .map_err(unavailable)?;
        if session.mid > 0 {
            let expires_ms = now_ms() + self.inner.session_ttl.as_millis() as u64;
            self.update_mid(session.mid, |value| {
                value.keys.insert(
                    session.key.clone(),
                    MidSession {
                        server: session.server.clone(),
                        expires_ms,
                    },
                );
                true
            })
            .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Registry for NatsRegistry {
    async fn add_session(&self, session: &Session) -> Result<(), RegistryError> {
        self.put_session(session).await
    }

    async fn refresh_session(&self, session: &Session) -> Result<(), RegistryError> {
        self.put_session(session).await
    }

    async fn remove_session(&self, session: &Session) -> Result<bool, RegistryError> {
        let store = self.sessions().await?;
        let key = key_entry(&session.key);
        let mut removed = false;
        if let Some(entry) = store.entry(&key).await.map_err(unavailable)?
            && entry.operation == kv::Operation::Put
            && serde_json::from_slice::<KeyValue>(&entry.value)
                .is_ok_and(|value| value.server == session.server)
        {
            // Only if nobody re-mapped the key since we read it.
            removed = store
                .delete_expect_revision(&key, Some(entry.revision))
                .await
                .is_ok();
        }
        if session.mid > 0 {
            let mid_removed = self
                .update_mid(session.mid, |value| {
                    let ours = value
                        .keys
                        .get(&session.key)
                        .is_some_and(|s| s.server == session.server);
                    if ours {
                        value.keys.remove(&session.key);
                    }
                    ours
                })
                .await?;
            removed |= mid_removed;
        }
        Ok(removed)
    }

    async fn servers_by_keys(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, String>, RegistryError> {
        let store = self.sessions().await?;
        let found: Vec<Option<(String, String)>> = futures_util::stream::iter(keys.iter().cloned())
            .map(|key| async move {
                let value = store.get(key_entry(&key)).await.map_err(unavailable)?;
                Ok::<_, RegistryError>(value.and_then(|bytes| {
                    serde_json::from_slice::<KeyValue>(&bytes)
                        .ok()
                        .map(|v| (key, v.server))
                }))
            })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    async fn servers_by_mids(
        &self,
        mids: &[i64],
    ) -> Result<HashMap<String, String>, RegistryError> {
        let store = self.sessions().await?;
        let now = now_ms();
        let values: Vec<Option<Bytes>> = futures_util::stream::iter(mids.iter().copied())
            .map(|mid| async move { store.get(mid_entry(mid)).await.map_err(unavailable) })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let mut found = HashMap::new();
        for bytes in values.into_iter().flatten() {
            if let Ok(mut value) = serde_json::from_slice::<MidValue>(&bytes) {
                value.prune(now);
                found.extend(value.keys.into_iter().map(|(key, s)| (key, s.server)));
            }
        }
        Ok(found)
    }

    async fn report_comet(&self, report: CometReport) -> Result<(), RegistryError> {
        let store = self.online().await.map_err(unavailable)?;
        let value = ReportValue {
            server: report.server.clone(),
            room_counts: report.room_counts,
            conn_count: report.conn_count,
            ip_count: report.ip_count,
            weight: report.weight,
            offline: report.offline,
            addrs: report.addrs,
            region: report.region,
            zone: report.zone,
            grpc_addr: report.grpc_addr,
            updated_ms: now_ms(),
        };
        let bytes = serde_json::to_vec(&value).map_err(|e| RegistryError::Other(e.to_string()))?;
        if let Err(error) = store.put(report_entry(&report.server), bytes.into()).await {
            self.forget_online().await;
            return Err(unavailable(error));
        }
        // Visible at once here; other logic processes see it through the watch.
        if let Ok(mut reports) = self.inner.reports.lock() {
            reports.insert(value.server.clone(), value.into_report());
        }
        Ok(())
    }

    async fn comet_reports(&self) -> Result<Vec<CometReport>, RegistryError> {
        let mut loaded = self.inner.reports_loaded.subscribe();
        let timeout = self.inner.nats.config().request_timeout;
        if tokio::time::timeout(timeout, loaded.wait_for(|done| *done))
            .await
            .is_err()
        {
            return Err(RegistryError::Unavailable(
                "comet reports not loaded from NATS yet".into(),
            ));
        }
        let oldest = SystemTime::now() - self.inner.report_ttl;
        let mut reports = self
            .inner
            .reports
            .lock()
            .map_err(|_| RegistryError::Other("report cache poisoned".into()))?;
        reports.retain(|_, report| report.updated.is_some_and(|at| at > oldest));
        Ok(reports.values().cloned().collect())
    }
}
