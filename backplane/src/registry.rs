//! Sessions (which comet holds a key, which keys a user has) and the comets'
//! own reports (room counts, connection counts, node metadata).
//!
//! goim kept these in Redis (`key_<key>`, `mid_<mid>`, `ol_<server>`). Two goim
//! defects are fixed at this seam: a Disconnect only removes a mapping that
//! still names the disconnecting comet, and a comet that stops reporting
//! leaves the counts after the freshness window (no ghost counts).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

/// One authenticated connection: user `mid` (0 = anonymous) on device `key`,
/// held by comet `server`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Session {
    pub mid: i64,
    pub key: String,
    pub server: String,
}

/// What a comet reports about itself every few seconds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CometReport {
    pub server: String,
    /// Members per room on this comet (rooms with at least one).
    pub room_counts: HashMap<String, i32>,
    pub conn_count: i32,
    pub ip_count: i32,
    pub weight: i32,
    pub offline: bool,
    /// Public addresses handed to clients.
    pub addrs: Vec<String>,
    pub region: String,
    pub zone: String,
    /// gRPC address, for `/goim/nodes/instances`.
    pub grpc_addr: String,
    /// When the registry stored the report (set by the registry).
    pub updated: Option<SystemTime>,
}

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Maps key → server (and mid → key when mid > 0).
    async fn add_session(&self, session: &Session) -> Result<(), RegistryError>;
    /// Extends the session's lifetime; re-adds it if it expired.
    async fn refresh_session(&self, session: &Session) -> Result<(), RegistryError>;
    /// Removes the mappings if they still name `session.server`; returns
    /// whether anything was removed.
    async fn remove_session(&self, session: &Session) -> Result<bool, RegistryError>;
    /// key → server for the keys that have a live session.
    async fn servers_by_keys(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, String>, RegistryError>;
    /// key → server for every live session of these users.
    async fn servers_by_mids(&self, mids: &[i64])
    -> Result<HashMap<String, String>, RegistryError>;
    /// Stores a comet's report, replacing its previous one.
    async fn report_comet(&self, report: CometReport) -> Result<(), RegistryError>;
    /// Reports newer than the freshness window, one per comet.
    async fn comet_reports(&self) -> Result<Vec<CometReport>, RegistryError>;
}

/// The in-process registry of standalone mode.
pub struct MemoryRegistry {
    session_ttl: Duration,
    report_ttl: Duration,
    state: Mutex<MemoryState>,
}

/// Compact on purpose: standalone holds a session per connection, so this
/// is part of every connection's memory. A key's string is shared by both
/// maps, and comet names are shared by all their sessions.
#[derive(Default)]
struct MemoryState {
    keys: HashMap<Arc<str>, KeyEntry>,
    /// mid → its keys (usually one); `keys` says where and until when.
    mids: HashMap<i64, Vec<Arc<str>>>,
    servers: HashSet<Arc<str>>,
    reports: HashMap<String, (CometReport, Instant)>,
    operations: u64,
}

struct KeyEntry {
    server: Arc<str>,
    mid: i64,
    expires: Instant,
}

impl MemoryState {
    fn server(&mut self, name: &str) -> Arc<str> {
        if let Some(server) = self.servers.get(name) {
            return server.clone();
        }
        let server: Arc<str> = Arc::from(name);
        self.servers.insert(server.clone());
        server
    }

    /// Takes `key` out of `mid`'s list.
    fn unlink(&mut self, mid: i64, key: &str) {
        if let Some(keys) = self.mids.get_mut(&mid) {
            keys.retain(|k| &**k != key);
            if keys.is_empty() {
                self.mids.remove(&mid);
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.keys.retain(|_, entry| entry.expires > now);
        let keys = &self.keys;
        self.mids.retain(|mid, list| {
            list.retain(|key| keys.get(key).is_some_and(|entry| entry.mid == *mid));
            !list.is_empty()
        });
        self.servers = self.keys.values().map(|e| e.server.clone()).collect();
    }
}

impl MemoryRegistry {
    /// `session_ttl`: lifetime of a session without refresh;
    /// `report_ttl`: how long a comet report counts.
    pub fn new(session_ttl: Duration, report_ttl: Duration) -> Self {
        MemoryRegistry {
            session_ttl,
            report_ttl,
            state: Mutex::new(MemoryState::default()),
        }
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, MemoryState>, RegistryError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| RegistryError::Other("registry state poisoned".into()))?;
        // Sweep expired entries now and then so abandoned sessions do not pile up.
        state.operations += 1;
        if state.operations.is_multiple_of(4096) {
            state.sweep(Instant::now());
        }
        Ok(state)
    }

    fn insert(&self, state: &mut MemoryState, session: &Session) {
        let expires = Instant::now() + self.session_ttl;
        let server = state.server(&session.server);
        let entry = KeyEntry {
            server,
            mid: session.mid,
            expires,
        };
        let key = match state.keys.get_key_value(session.key.as_str()) {
            Some((key, old)) => {
                let (key, old_mid) = (key.clone(), old.mid);
                state.keys.insert(key.clone(), entry);
                if old_mid == session.mid {
                    return;
                }
                state.unlink(old_mid, &session.key);
                key
            }
            None => {
                let key: Arc<str> = Arc::from(session.key.as_str());
                state.keys.insert(key.clone(), entry);
                key
            }
        };
        if session.mid > 0 {
            state.mids.entry(session.mid).or_default().push(key);
        }
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn add_session(&self, session: &Session) -> Result<(), RegistryError> {
        let mut state = self.state()?;
        self.insert(&mut state, session);
        Ok(())
    }

    async fn refresh_session(&self, session: &Session) -> Result<(), RegistryError> {
        let mut state = self.state()?;
        self.insert(&mut state, session);
        Ok(())
    }

    async fn remove_session(&self, session: &Session) -> Result<bool, RegistryError> {
        let mut state = self.state()?;
        let Some(entry) = state.keys.get(session.key.as_str()) else {
            return Ok(false);
        };
        // A late Disconnect from a comet the key has since moved away from
        // leaves the newer mapping alone.
        if *entry.server != *session.server {
            return Ok(false);
        }
        let mid = entry.mid;
        state.keys.remove(session.key.as_str());
        state.unlink(mid, &session.key);
        Ok(true)
    }

    async fn servers_by_keys(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, String>, RegistryError> {
        let state = self.state()?;
        let now = Instant::now();
        Ok(keys
            .iter()
            .filter_map(|key| {
                let entry = state.keys.get(key.as_str())?;
                (entry.expires > now).then(|| (key.clone(), entry.server.to_string()))
            })
            .collect())
    }

    async fn servers_by_mids(
        &self,
        mids: &[i64],
    ) -> Result<HashMap<String, String>, RegistryError> {
        let state = self.state()?;
        let now = Instant::now();
        let mut found = HashMap::new();
        for mid in mids {
            for key in state.mids.get(mid).into_iter().flatten() {
                if let Some(entry) = state.keys.get(key)
                    && entry.mid == *mid
                    && entry.expires > now
                {
                    found.insert(key.to_string(), entry.server.to_string());
                }
            }
        }
        Ok(found)
    }

    async fn report_comet(&self, mut report: CometReport) -> Result<(), RegistryError> {
        report.updated = Some(SystemTime::now());
        let mut state = self.state()?;
        state
            .reports
            .insert(report.server.clone(), (report, Instant::now()));
        Ok(())
    }

    async fn comet_reports(&self) -> Result<Vec<CometReport>, RegistryError> {
        let mut state = self.state()?;
        let ttl = self.report_ttl;
        state.reports.retain(|_, (_, at)| at.elapsed() < ttl);
        Ok(state
            .reports
            .values()
            .map(|(report, _)| report.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, SHORT_TTL};

    fn registry() -> MemoryRegistry {
        MemoryRegistry::new(Duration::from_secs(60), Duration::from_secs(60))
    }

    #[tokio::test]
    async fn sessions_are_found_by_key_and_mid() {
        conformance::sessions_are_found_by_key_and_mid(&registry()).await;
    }

    #[tokio::test]
    async fn a_late_disconnect_keeps_the_newer_mapping() {
        conformance::a_late_disconnect_keeps_the_newer_mapping(&registry()).await;
    }

    #[tokio::test]
    async fn sessions_expire_unless_refreshed() {
        let registry = MemoryRegistry::new(SHORT_TTL, Duration::from_secs(60));
        conformance::sessions_expire_unless_refreshed(&registry).await;
    }

    #[tokio::test]
    async fn a_key_that_changes_user_is_found_only_under_the_new_one() {
        let registry = registry();
        let session = |mid| Session {
            mid,
            key: "k".into(),
            server: "comet-a".into(),
        };
        registry.add_session(&session(1)).await.expect("add");
        registry.add_session(&session(2)).await.expect("add");
        assert!(
            registry
                .servers_by_mids(&[1])
                .await
                .expect("mids")
                .is_empty()
        );
        let found = registry.servers_by_mids(&[2]).await.expect("mids");
        assert_eq!(found.get("k").map(String::as_str), Some("comet-a"));
        assert!(registry.remove_session(&session(2)).await.expect("remove"));
        assert!(
            registry
                .servers_by_mids(&[2])
                .await
                .expect("mids")
                .is_empty()
        );
        let state = registry.state.lock().expect("state");
        assert!(state.keys.is_empty() && state.mids.is_empty());
    }

    #[tokio::test]
    async fn reports_are_shared_and_expire() {
        let registry = MemoryRegistry::new(Duration::from_secs(60), SHORT_TTL);
        conformance::reports_are_shared_and_expire(&registry, &registry).await;
    }
}
