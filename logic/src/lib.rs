//! logic: goim's HTTP push API and the `goim.logic.Logic` service comets call.
//!
//! - Connect/Disconnect/Heartbeat keep sessions in the [`Registry`];
//! - pushes become goim `PushMsg`s published on the [`Bus`] (one per target
//!   comet for key and mid pushes, one per room, one per broadcast);
//! - comets' RenewOnline reports feed the online counts and node weighting.
//!
//! Invariant: logic knows the backplane only through its traits.
#![forbid(unsafe_code)]

pub mod api_tokens;
pub mod auth;
pub mod backpressure;
pub mod balancer;
pub mod grpc;
pub mod history;
pub mod http;
pub mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pushcluster_api::config::{HistoryConfig, LogicConfig, ReplayConfig, UpstreamConfig};
use pushcluster_api::link::{LinkError, LogicLink};
use pushcluster_api::pb::logic::push_msg::Type as PushType;
use pushcluster_api::pb::logic::{
    Backoff, ConnectReply, ConnectReq, DisconnectReply, DisconnectReq, HeartbeatReply,
    HeartbeatReq, HistoryMessage, HistoryReply, HistoryReq, NodesReply, OnlineReply, OnlineReq,
    PushMsg, ReceiveReply, ReceiveReq, StreamPosition,
};
use pushcluster_api::streams::DirectStream;
use pushcluster_backplane::bus::{Bus, BusError, Since, Unrecovered};
use pushcluster_backplane::registry::{CometReport, Registry, RegistryError, Session};
use pushcluster_backplane::upstream::{Upstream, UpstreamMessage};
use tokio_util::sync::CancellationToken;

use crate::api_tokens::ApiTokens;
use crate::auth::{AuthSetupError, Authenticator, ResumeFields};
use crate::backpressure::Backpressure;
use crate::balancer::{LoadBalancer, NodeInfo};
use crate::history::HistoryReads;
use crate::metrics::LogicMetrics;

/// How often the backend's upstream backlog is read.
const UPSTREAM_WATCH: Duration = Duration::from_secs(5);

/// Direct-stream publishes in flight at once for one push to many users.
const DIRECT_PUBLISH_CONCURRENCY: usize = 64;

/// How long an aggregate of the comets' reports is reused. Comets report
/// every few seconds, so this adds little staleness and keeps RenewOnline
/// from re-reading every report on every call.
const ONLINE_CACHE: Duration = Duration::from_secs(1);
/// goim's `platform=web`: node answers are domains instead of addresses.
const PLATFORM_WEB: &str = "web";
/// Weight of a comet that does not report one (goim comets).
const DEFAULT_WEIGHT: i32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum LogicError {
    /// The caller's request is wrong (goim code -400).
    #[error("{0}")]
    InvalidArgument(String),
    /// A backend failed (goim code -500).
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The target's partition is over a `logic.backpressure` bound
    /// (`max_delay`, `max_lag`): retry after the duration (HTTP 429).
    #[error("too many undelivered messages for this target (logic.backpressure); retry in {}s", .0.as_secs_f64())]
    Throttled(Duration),
}

/// One `/goim/online/top` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Top {
    pub room_id: String,
    pub count: i32,
}

/// One `/goim/nodes/instances` entry, in the shape of goim's discovery
/// instances (metadata values are strings there too).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Instance {
    pub region: String,
    pub zone: String,
    pub env: String,
    pub appid: String,
    pub hostname: String,
    pub addrs: Vec<String>,
    pub version: String,
    pub latest_timestamp: i64,
    pub metadata: BTreeMap<String, String>,
}

/// The comets' reports summed up.
#[derive(Debug, Default)]
pub struct OnlineSnapshot {
    pub room_counts: HashMap<String, i32>,
    pub conn_count: i64,
    pub ip_count: i64,
    pub reports: Vec<CometReport>,
}

pub struct Logic {
    config: LogicConfig,
    registry: Arc<dyn Registry>,
    bus: Arc<dyn Bus>,
    metrics: LogicMetrics,
    online: Mutex<Option<(Instant, Arc<OnlineSnapshot>)>>,
    balancer: Mutex<LoadBalancer>,
    deploy_env: String,
    auth: Authenticator,
    api_tokens: ApiTokens,
    backpressure: Arc<Backpressure>,
    replay: ReplayConfig,
    history_reads: HistoryReads,
    /// Mid and key pushes go to direct streams (`history.direct`).
    direct_streams: bool,
    /// Where client messages go (`upstream`), and their largest body.
    upstream: Option<(Arc<dyn Upstream>, usize)>,
}

impl Logic {
    pub fn new(
        config: LogicConfig,
        registry: Arc<dyn Registry>,
        bus: Arc<dyn Bus>,
        metrics: LogicMetrics,
    ) -> Result<Self, AuthSetupError> {
        let auth = Authenticator::from_config(&config.auth)?;
        let api_tokens = ApiTokens::new(&config.api)?;
        Ok(Logic {
            backpressure: Arc::new(Backpressure::new(config.backpressure.clone())),
            config,
            registry,
            bus,
            metrics,
            online: Mutex::new(None),
            balancer: Mutex::new(LoadBalancer::default()),
            deploy_env: std::env::var("DEPLOY_ENV").unwrap_or_default(),
            auth,
            api_tokens,
            replay: ReplayConfig::default(),
            history_reads: HistoryReads::new(ReplayConfig::default().concurrency),
            direct_streams: false,
            upstream: None,
        })
    }

    /// Bounds on resumes (`history.replay`), and whether mid and key
    /// pushes go to direct streams (`history.direct`; without this call
    /// they go per comet, as in goim).
    pub fn with_history(mut self, history: &HistoryConfig) -> Self {
        self.history_reads = HistoryReads::new(history.replay.concurrency);
        self.replay = history.replay;
        self.direct_streams = history.direct_streams();
        self
    }

    /// Client messages (op 4) go to `upstream` (`upstream.enabled`).
    pub fn with_upstream(mut self, upstream: Arc<dyn Upstream>, config: &UpstreamConfig) -> Self {
        self.upstream = Some((upstream, config.max_bytes));
        self
    }

    /// Reports the backend's upstream backlog every few seconds until
    /// `stop` (`pushcluster_logic_upstream_pending`).
    pub async fn watch_upstream(self: Arc<Self>, stop: CancellationToken) {
        let Some((upstream, _)) = self.upstream.clone() else {
            return;
        };
        loop {
            match upstream.pending().await {
                Ok(Some(pending)) => self
                    .metrics
                    .upstream_pending
                    .set(i64::try_from(pending).unwrap_or(i64::MAX)),
                Ok(None) => {}
                Err(error) => tracing::debug!(%error, "upstream backlog not read"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(UPSTREAM_WATCH) => {}
            }
        }
    }

    /// Reads the bus's lag for `logic.backpressure` until `stop`.
    pub async fn watch_backpressure(self: Arc<Self>, stop: CancellationToken) {
        self.backpressure
            .clone()
            .watch(self.bus.clone(), self.metrics.clone(), stop)
            .await
    }

    /// Refuses pushes whose partition is over a `logic.backpressure` bound
    /// (all or nothing: checked before any of them is published).
    fn admit(&self, msgs: &[PushMsg]) -> Result<(), LogicError> {
        for msg in msgs {
            if let Err(retry_after) = self.backpressure.admit(self.bus.partition_of(msg)) {
                self.metrics
                    .throttled
                    .with_label_values(&[kind_label(msg.r#type())])
                    .inc();
                return Err(LogicError::Throttled(retry_after));
            }
        }
        Ok(())
    }

    pub fn api_tokens(&self) -> &ApiTokens {
        &self.api_tokens
    }

    pub fn config(&self) -> &LogicConfig {
        &self.config
    }

    pub fn metrics(&self) -> &LogicMetrics {
        &self.metrics
    }

    /// Heartbeat timeout handed to comets in ConnectReply: heartbeat ×
    /// heartbeat_max, in nanoseconds (a Go Duration).
    fn heartbeat_nanos(&self) -> i64 {
        let timeout = self
            .config
            .node
            .heartbeat
            .saturating_mul(self.config.node.heartbeat_max);
        i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX)
    }

    async fn publish(&self, msg: PushMsg, msg_id: Option<String>) -> Result<(), LogicError> {
        let kind = kind_label(msg.r#type());
        let partition = self.bus.partition_of(&msg);
        match self.bus.publish(msg, msg_id).await {
            Ok(published) if published.duplicate => {
                self.metrics.duplicates.with_label_values(&[kind]).inc();
                Ok(())
            }
            Ok(_) => {
                self.metrics.published.with_label_values(&[kind]).inc();
                self.backpressure.published(partition);
                Ok(())
            }
            Err(error) => {
                self.metrics
                    .publish_failures
                    .with_label_values(&[kind])
                    .inc();
                tracing::warn!(%error, kind, "publish failed");
                Err(error.into())
            }
        }
    }

    /// Publishes one PUSH message per live comet holding some of the keys.
    /// Sessions on a comet that stopped reporting count as offline: that
    /// comet is gone and its clients reconnect elsewhere.
    async fn publish_to_servers(
        &self,
        op: i32,
        target: &'static str,
        key_servers: HashMap<String, String>,
        msg: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<(), LogicError> {
        let live = self.online().await?;
        let mut by_server: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut dead = 0u64;
        for (key, server) in key_servers {
            if live.reports.iter().any(|report| report.server == server) {
                by_server.entry(server).or_default().push(key);
            } else {
                dead += 1;
            }
        }
        if dead > 0 {
            self.metrics
                .unknown_targets
                .with_label_values(&[target])
                .inc_by(dead);
        }
        let pushes: Vec<PushMsg> = by_server
            .into_iter()
            .map(|(server, mut keys)| {
                keys.sort();
                PushMsg {
                    r#type: PushType::Push as i32,
                    operation: op,
                    server,
                    keys,
                    msg: msg.clone(),
                    ..Default::default()
                }
            })
            .collect();
        self.admit(&pushes)?;
        for push in pushes {
            let msg_id = idempotency_key.map(|id| format!("{id}/push/{}", push.server));
            self.publish(push, msg_id).await?;
        }
        Ok(())
    }

    /// One PUSH per direct stream, whoever is online: job finds the
    /// stream's connections when it delivers, and the stream's history
    /// keeps it for clients that resume (`history.direct`).
    async fn publish_direct(
        &self,
        op: i32,
        streams: impl Iterator<Item = DirectStream>,
        msg: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<(), LogicError> {
        let mut names: Vec<String> = streams.map(|stream| stream.name()).collect();
        names.sort();
        names.dedup();
        let pushes: Vec<PushMsg> = names
            .into_iter()
            .map(|stream| PushMsg {
                r#type: PushType::Push as i32,
                operation: op,
                stream,
                msg: msg.clone(),
                ..Default::default()
            })
            .collect();
        self.admit(&pushes)?;
        // Streams are independent: publish them concurrently, in bounded
        // chunks, so a push to many users costs round trips per chunk.
        for chunk in pushes.chunks(DIRECT_PUBLISH_CONCURRENCY) {
            let published = chunk.iter().map(|push| {
                let msg_id = idempotency_key.map(|id| format!("{id}/{}", push.stream));
                self.publish(push.clone(), msg_id)
            });
            for result in futures_util::future::join_all(published).await {
                result?;
            }
        }
        Ok(())
    }

    /// POST /goim/push/keys
    pub async fn push_keys(
        &self,
        op: i32,
        keys: Vec<String>,
        msg: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<(), LogicError> {
        if keys.is_empty() {
            return Err(LogicError::InvalidArgument("keys is required".into()));
        }
        if self.direct_streams {
            let streams = keys.into_iter().map(DirectStream::Key);
            return self.publish_direct(op, streams, msg, idempotency_key).await;
        }
        let found = self.registry.servers_by_keys(&keys).await?;
        let offline = keys.len().saturating_sub(found.len());
        if offline > 0 {
            self.metrics
                .unknown_targets
                .with_label_values(&["key"])
                .inc_by(offline as u64);
        }
        self.publish_to_servers(op, "key", found, msg, idempotency_key)
            .await
    }

    /// POST /goim/push/mids
    pub async fn push_mids(
        &self,
        op: i32,
        mids: Vec<i64>,
        msg: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<(), LogicError> {
        if mids.is_empty() {
            return Err(LogicError::InvalidArgument("mids is required".into()));
        }
        if self.direct_streams {
            let streams = mids.into_iter().map(DirectStream::Mid);
            return self.publish_direct(op, streams, msg, idempotency_key).await;
        }
        let found = self.registry.servers_by_mids(&mids).await?;
        if found.is_empty() {
            self.metrics
                .unknown_targets
                .with_label_values(&["mid"])
                .inc_by(mids.len() as u64);
        }
        self.publish_to_servers(op, "mid", found, msg, idempotency_key)
            .await
    }

    /// POST /goim/push/room
    pub async fn push_room(
        &self,
        op: i32,
        room_type: &str,
        room: &str,
        msg: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<(), LogicError> {
        let push = PushMsg {
            r#type: PushType::Room as i32,
            operation: op,
            room: room_key(room_type, room),
            msg,
            ..Default::default()
        };
        let msg_id = idempotency_key.map(|id| format!("{id}/room"));
        self.admit(std::slice::from_ref(&push))?;
        self.publish(push, msg_id).await
    }

    /// POST /goim/push/all
    pub async fn push_all(
        &self,
        op: i32,
        speed: i32,
        msg: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<(), LogicError> {
        if speed < 0 {
            return Err(LogicError::InvalidArgument("speed must be >= 0".into()));
        }
        let push = PushMsg {
            r#type: PushType::Broadcast as i32,
            operation: op,
            speed,
            msg,
            ..Default::default()
        };
        let msg_id = idempotency_key.map(|id| format!("{id}/all"));
        self.admit(std::slice::from_ref(&push))?;
        self.publish(push, msg_id).await
    }

    /// The comets' reports summed up, at most [`ONLINE_CACHE`] old.
    pub async fn online(&self) -> Result<Arc<OnlineSnapshot>, LogicError> {
        if let Ok(cache) = self.online.lock()
            && let Some((at, snapshot)) = cache.as_ref()
            && at.elapsed() < ONLINE_CACHE
        {
            return Ok(snapshot.clone());
        }
        let reports = self.registry.comet_reports().await?;
        let snapshot = Arc::new(aggregate(reports));
        self.update_balancer(&snapshot.reports);
        if let Ok(mut cache) = self.online.lock() {
            *cache = Some((Instant::now(), snapshot.clone()));
        }
        Ok(snapshot)
    }

    fn invalidate_online(&self) {
        if let Ok(mut cache) = self.online.lock() {
            *cache = None;
        }
    }

    fn update_balancer(&self, reports: &[CometReport]) {
        let nodes = reports
            .iter()
            .filter(|report| !report.offline)
            .map(|report| NodeInfo {
                hostname: report.server.clone(),
                region: report.region.clone(),
                addrs: report.addrs.clone(),
                weight: i64::from(report.weight),
                conns: i64::from(report.conn_count),
                updated: report.updated,
            })
            .collect();
        if let Ok(mut balancer) = self.balancer.lock() {
            balancer.update(nodes);
        }
    }

    /// GET /goim/online/top: rooms of `room_type` by count, descending.
    pub async fn online_top(&self, room_type: &str, limit: usize) -> Result<Vec<Top>, LogicError> {
        let snapshot = self.online().await?;
        let prefix = format!("{room_type}://");
        let mut tops: Vec<Top> = snapshot
            .room_counts
            .iter()
            .filter_map(|(key, count)| {
                let room_id = key.strip_prefix(&prefix)?;
                Some(Top {
                    room_id: room_id.to_string(),
                    count: *count,
                })
            })
            .collect();
        tops.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.room_id.cmp(&b.room_id))
        });
        tops.truncate(limit);
        Ok(tops)
    }

    /// GET /goim/online/room: count per room id of `room_type` (0 if unknown).
    pub async fn online_room(
        &self,
        room_type: &str,
        rooms: &[String],
    ) -> Result<BTreeMap<String, i32>, LogicError> {
        let snapshot = self.online().await?;
        Ok(rooms
            .iter()
            .map(|room| {
                let count = snapshot
                    .room_counts
                    .get(&room_key(room_type, room))
                    .copied()
                    .unwrap_or(0);
                (room.clone(), count)
            })
            .collect())
    }

    /// GET /goim/online/total: (ip_count, conn_count) over all comets.
    pub async fn online_total(&self) -> Result<(i64, i64), LogicError> {
        let snapshot = self.online().await?;
        Ok((snapshot.ip_count, snapshot.conn_count))
    }

    /// The region of a client address, from `logic.regions`.
    fn region_of(&self, client_ip: Option<IpAddr>) -> Option<&str> {
        let ip = client_ip?;
        self.config
            .regions
            .iter()
            .find(|(_, nets)| nets.iter().any(|net| net.contains(&ip)))
            .map(|(name, _)| name.as_str())
    }

    /// GET /goim/nodes/weighted and the Nodes RPC.
    pub async fn nodes_weighted(
        &self,
        platform: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<NodesReply, LogicError> {
        // Refreshes the balancer from current reports when the cache is old.
        self.online().await?;
        let node = &self.config.node;
        let region = self.region_of(client_ip);
        let (domains, addrs) = match self.balancer.lock() {
            Ok(mut balancer) => balancer.node_addrs(region, &node.host_domain, node.region_weight),
            Err(_) => (Vec::new(), Vec::new()),
        };
        let mut nodes = if platform == PLATFORM_WEB {
            domains
        } else {
            addrs
        };
        if nodes.is_empty() {
            nodes = vec![node.default_domain.clone()];
        }
        let backoff = &self.config.backoff;
        Ok(NodesReply {
            domain: node.default_domain.clone(),
            tcp_port: i32::from(node.tcp_port),
            ws_port: i32::from(node.ws_port),
            wss_port: i32::from(node.wss_port),
            heartbeat: i32::try_from(node.heartbeat.as_secs()).unwrap_or(i32::MAX),
            nodes,
            backoff: Some(Backoff {
                max_delay: backoff.max_delay,
                base_delay: backoff.base_delay,
                factor: backoff.factor,
                jitter: backoff.jitter,
            }),
            heartbeat_max: i32::try_from(node.heartbeat_max).unwrap_or(i32::MAX),
        })
    }

    /// GET /goim/nodes/instances: every comet that reported recently.
    pub async fn nodes_instances(&self) -> Result<Vec<Instance>, LogicError> {
        let snapshot = self.online().await?;
        let mut instances: Vec<Instance> = snapshot
            .reports
            .iter()
            .map(|report| {
                let latest_timestamp = report
                    .updated
                    .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                    .unwrap_or(0);
                let metadata = BTreeMap::from([
                    ("weight".to_string(), report.weight.to_string()),
                    ("offline".to_string(), report.offline.to_string()),
                    ("addrs".to_string(), report.addrs.join(",")),
                    ("conn_count".to_string(), report.conn_count.to_string()),
                    ("ip_count".to_string(), report.ip_count.to_string()),
                ]);
                let addrs = if report.grpc_addr.is_empty() {
                    Vec::new()
                } else {
                    vec![format!("grpc://{}", report.grpc_addr)]
                };
                Instance {
                    region: report.region.clone(),
                    zone: report.zone.clone(),
                    env: self.deploy_env.clone(),
                    appid: "goim.comet".into(),
                    hostname: report.server.clone(),
                    addrs,
                    version: env!("CARGO_PKG_VERSION").into(),
                    latest_timestamp,
                    metadata,
                }
            })
            .collect();
        instances.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        Ok(instances)
    }
}

fn kind_label(kind: PushType) -> &'static str {
    match kind {
        PushType::Push => "push",
        PushType::Room => "room",
        PushType::Broadcast => "broadcast",
    }
}

/// goim's room key: `type://id`.
pub fn room_key(room_type: &str, room: &str) -> String {
    format!("{room_type}://{room}")
}

fn aggregate(reports: Vec<CometReport>) -> OnlineSnapshot {
    let mut snapshot = OnlineSnapshot::default();
    for report in &reports {
        for (room, count) in &report.room_counts {
            *snapshot.room_counts.entry(room.clone()).or_insert(0) += *count;
        }
        snapshot.conn_count += i64::from(report.conn_count);
        snapshot.ip_count += i64::from(report.ip_count);
    }
    snapshot.reports = reports;
    snapshot
}

/// Where the client says it left off in each of `names` (rooms or direct
/// streams), for a client with positions.
fn positions_named(
    resume: &ResumeFields,
    names: impl Iterator<Item = String>,
) -> HashMap<String, StreamPosition> {
    if !resume.positions {
        return HashMap::new();
    }
    names
        .filter_map(|name| {
            let since = resume.since.get(&name)?;
            let position = StreamPosition {
                epoch: since.epoch,
                offset: since.offset,
            };
            Some((name, position))
        })
        .collect()
}

fn registry_unavailable(error: RegistryError) -> LinkError {
    LinkError::Unavailable(error.to_string())
}

/// The calls comets make, in process (standalone) or through [`grpc`].
#[async_trait]
impl LogicLink for Logic {
    async fn connect(&self, req: ConnectReq) -> Result<ConnectReply, LinkError> {
        let identity = match self
            .auth
            .authenticate(&req.token, &req.cookie, &req.server)
            .await
        {
            Ok(identity) => identity,
            Err(error) => {
                self.metrics
                    .connects
                    .with_label_values(&[error.reason()])
                    .inc();
                return Err(if error.is_refusal() {
                    LinkError::Rejected(error.to_string())
                } else {
                    LinkError::Unavailable(error.to_string())
                });
            }
        };
        let key = identity
            .key
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let session = Session {
            mid: identity.mid,
            key,
            server: req.server,
        };
        if let Err(error) = self.registry.add_session(&session).await {
            self.metrics
                .connects
                .with_label_values(&["registry_error"])
                .inc();
            return Err(registry_unavailable(error));
        }
        self.metrics.connects.with_label_values(&["ok"]).inc();
        tracing::debug!(mid = session.mid, server = %session.server, "session added");
        // The body was valid JSON for the authenticator; resume fields of
        // the wrong shape only turn resuming off.
        let resume = ResumeFields::parse(&req.token).unwrap_or_default();
        let since = resume
            .since
            .get(&identity.room_id)
            .map(|since| StreamPosition {
                epoch: since.epoch,
                offset: since.offset,
            });
        // Only the connection's own direct streams: a client cannot name
        // another user's.
        let direct_since = if self.direct_streams {
            let own = [
                (session.mid != 0).then_some(DirectStream::Mid(session.mid)),
                Some(DirectStream::Key(session.key.clone())),
            ];
            positions_named(&resume, own.into_iter().flatten().map(|s| s.name()))
        } else {
            HashMap::new()
        };
        let rooms_since = positions_named(&resume, identity.rooms.iter().cloned());
        Ok(ConnectReply {
            mid: session.mid,
            key: session.key,
            room_id: identity.room_id,
            accepts: identity.accepts,
            heartbeat: self.heartbeat_nanos(),
            positions: resume.positions,
            since: since.filter(|_| resume.positions),
            direct_streams: self.direct_streams,
            direct_since,
            rooms: identity.rooms,
            rooms_restricted: identity.allowed_rooms.is_some(),
            allowed_rooms: identity.allowed_rooms.unwrap_or_default(),
            rooms_since,
        })
    }

    async fn disconnect(&self, req: DisconnectReq) -> Result<DisconnectReply, LinkError> {
        let session = Session {
            mid: req.mid,
            key: req.key,
            server: req.server,
        };
        let has = self
            .registry
            .remove_session(&session)
            .await
            .map_err(registry_unavailable)?;
        let result = if has { "removed" } else { "kept" };
        self.metrics.disconnects.with_label_values(&[result]).inc();
        Ok(DisconnectReply { has })
    }

    async fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatReply, LinkError> {
        let session = Session {
            mid: req.mid,
            key: req.key,
            server: req.server,
        };
        self.registry
            .refresh_session(&session)
            .await
            .map_err(registry_unavailable)?;
        Ok(HeartbeatReply {})
    }

    async fn renew_online(&self, req: OnlineReq) -> Result<OnlineReply, LinkError> {
        if req.server.is_empty() {
            return Err(LinkError::InvalidArgument("server is required".into()));
        }
        self.metrics.online_reports.inc();
        let first_report = match self.online.lock() {
            Ok(cache) => cache.as_ref().is_none_or(|(_, snapshot)| {
                !snapshot.reports.iter().any(|r| r.server == req.server)
            }),
            Err(_) => true,
        };
        let report = CometReport {
            server: req.server,
            room_counts: req.room_count,
            conn_count: req.conn_count,
            ip_count: req.ip_count,
            weight: if req.has_metadata {
                req.weight
            } else {
                DEFAULT_WEIGHT
            },
            offline: req.offline,
            addrs: req.addrs,
            region: req.region,
            zone: req.zone,
            grpc_addr: req.grpc_addr,
            updated: None,
        };
        self.registry
            .report_comet(report)
            .await
            .map_err(registry_unavailable)?;
        if first_report {
            // A comet that just joined should see itself in the counts at once.
            self.invalidate_online();
        }
        let snapshot = self
            .online()
            .await
            .map_err(|error| LinkError::Unavailable(error.to_string()))?;
        Ok(OnlineReply {
            all_room_count: snapshot.room_counts.clone(),
        })
    }

    /// A client's frame (op 4 or an application op). With `upstream` on it
    /// goes to the upstream stream, its sender as the comet authenticated
    /// it; its id (the stream sequence) is the answer. Off: logged, as goim.
    async fn receive(&self, req: ReceiveReq) -> Result<ReceiveReply, LinkError> {
        self.metrics.upstream_frames.inc();
        let (op, body) = req
            .proto
            .map(|proto| (proto.op, proto.body))
            .unwrap_or_default();
        let upstream = self
            .upstream
            .as_ref()
            .filter(|_| op == pushcluster_api::protocol::op::SEND_MSG);
        let Some((upstream, max_bytes)) = upstream else {
            tracing::debug!(mid = req.mid, op, "client frame received");
            return Ok(ReceiveReply::default());
        };
        let result = |label: &str| {
            self.metrics
                .upstream_messages
                .with_label_values(&[label])
                .inc();
        };
        if body.len() > *max_bytes {
            result("too_large");
            return Err(LinkError::InvalidArgument(format!(
                "too_large: {} bytes, upstream.max_bytes is {max_bytes}",
                body.len()
            )));
        }
        let message = UpstreamMessage {
            mid: req.mid,
            key: req.key,
            comet: req.server,
            rooms: req.rooms,
            op,
            body,
        };
        match upstream.send(message).await {
            Ok(id) => {
                result("accepted");
                Ok(ReceiveReply { id: id.to_string() })
            }
            Err(error) => {
                result("unavailable");
                tracing::warn!(%error, "upstream message not stored");
                Err(LinkError::Unavailable(error.to_string()))
            }
        }
    }

    /// A room's history for a client joining it with positions. Reads wait
    /// for one of `history.replay.concurrency` slots, so a reconnect storm
    /// queues here instead of flooding the bus; past
    /// `history.replay.timeout` the client is told it was not recovered.
    async fn history(&self, req: HistoryReq) -> Result<HistoryReply, LinkError> {
        if req.room.is_empty() {
            return Err(LinkError::InvalidArgument("room is empty".into()));
        }
        let started = Instant::now();
        let since = req.since.map(|since| Since {
            epoch: since.epoch,
            offset: since.offset,
        });
        let read = tokio::time::timeout(self.replay.timeout, async {
            let (read, shared) = self
                .history_reads
                .read(&*self.bus, &req.room, since, self.replay.max_bytes)
                .await;
            if shared {
                self.metrics.history_reads_shared.inc();
            }
            read
        })
        .await;
        self.metrics
            .history_reads
            .observe(started.elapsed().as_secs_f64());
        let history = match read {
            Ok(Ok(history)) => history,
            failed => {
                let why = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_string(),
                };
                tracing::warn!(room = %req.room, error = %why, "room history unavailable");
                self.metrics
                    .resumes
                    .with_label_values(&[Unrecovered::Unavailable.label()])
                    .inc();
                let since = since.unwrap_or_default();
                return Ok(HistoryReply {
                    epoch: since.epoch,
                    messages: Vec::new(),
                    recovered: false,
                    offset: since.offset,
                    reason: Unrecovered::Unavailable.label().into(),
                });
            }
        };
        let result = history.gap.map_or("recovered", Unrecovered::label);
        self.metrics.resumes.with_label_values(&[result]).inc();
        self.metrics.replayed.inc_by(history.messages.len() as u64);
        Ok(HistoryReply {
            epoch: history.epoch,
            recovered: history.gap.is_none(),
            offset: history.offset,
            reason: history
                .gap
                .map(Unrecovered::label)
                .unwrap_or_default()
                .into(),
            messages: history
                .messages
                .iter()
                .map(|entry| HistoryMessage {
                    offset: entry.offset,
                    op: entry.msg.operation,
                    body: entry.msg.msg.clone(),
                    publish_unix_micros: entry
                        .published_at
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
                        .unwrap_or(0),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushcluster_backplane::bus::MemoryBus;
    use pushcluster_backplane::registry::MemoryRegistry;

    fn logic() -> (Logic, MemoryBus) {
        let bus = MemoryBus::default();
        let registry = MemoryRegistry::new(Duration::from_secs(60), Duration::from_secs(60));
        let metrics = LogicMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let logic = Logic::new(
            LogicConfig::default(),
            Arc::new(registry),
            Arc::new(bus.clone()),
            metrics,
        )
        .expect("open auth");
        (logic, bus)
    }

    fn connect_req(server: &str, body: &str) -> ConnectReq {
        ConnectReq {
            server: server.into(),
            cookie: String::new(),
            token: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[tokio::test]
    async fn connect_parses_the_body_and_generates_a_key() {
        let (logic, _) = logic();
        let reply = logic
            .connect(connect_req(
                "c1",
                r#"{"mid":5,"room_id":"live://1","accepts":[1000]}"#,
            ))
            .await
            .expect("connect");
        assert_eq!(reply.mid, 5);
        assert_eq!(reply.room_id, "live://1");
        assert_eq!(reply.accepts, vec![1000]);
        assert_eq!(
            uuid::Uuid::parse_str(&reply.key).map(|u| u.get_version_num()),
            Ok(4)
        );
        // 4 minutes × 2 in nanoseconds, like goim's example config.
        assert_eq!(reply.heartbeat, 480_000_000_000);
        let error = logic
            .connect(connect_req("c1", "{"))
            .await
            .expect_err("bad json");
        assert!(matches!(error, LinkError::Rejected(_)));
    }

    async fn report(logic: &Logic, server: &str) {
        logic
            .renew_online(OnlineReq {
                server: server.into(),
                ..Default::default()
            })
            .await
            .expect("renew");
    }

    #[tokio::test]
    async fn key_push_is_split_per_live_comet() {
        let (logic, bus) = logic();
        let mut sub = bus.subscribe().await.expect("subscribe");
        report(&logic, "c1").await;
        report(&logic, "c2").await;
        logic.invalidate_online();
        for (key, server) in [("a", "c1"), ("b", "c2"), ("c", "c1"), ("d", "dead")] {
            logic
                .connect(connect_req(server, &format!(r#"{{"key":"{key}"}}"#)))
                .await
                .expect("connect");
        }
        logic
            .push_keys(
                7,
                vec![
                    "a".into(),
                    "b".into(),
                    "c".into(),
                    "d".into(),
                    "gone".into(),
                ],
                Bytes::from_static(b"hi"),
                None,
            )
            .await
            .expect("push");
        let wait = Duration::from_secs(5);
        let mut next = async || {
            let delivery = tokio::time::timeout(wait, sub.next())
                .await
                .expect("in time")
                .expect("a delivery");
            let msg = delivery.msg.clone();
            delivery.ack().await;
            msg
        };
        let first = next().await;
        let second = next().await;
        assert_eq!(
            (first.server.as_str(), first.keys.clone()),
            ("c1", vec!["a".into(), "c".into()])
        );
        assert_eq!(
            (second.server.as_str(), second.keys.clone()),
            ("c2", vec!["b".into()])
        );
        assert_eq!(first.operation, 7);
        assert_eq!(&first.msg[..], b"hi");
        // "d" is on a comet that never reported, "gone" has no session.
        assert_eq!(
            logic
                .metrics
                .unknown_targets
                .with_label_values(&["key"])
                .get(),
            2
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(100), sub.next())
                .await
                .is_err(),
            "nothing for the dead comet"
        );
    }

    #[tokio::test]
    async fn online_counts_sum_over_comets() {
        let (logic, _) = logic();
        for (server, count) in [("c1", 2), ("c2", 3)] {
            logic
                .renew_online(OnlineReq {
                    server: server.into(),
                    room_count: HashMap::from([("live://1".into(), count)]),
                    has_metadata: true,
                    conn_count: count,
                    ip_count: 1,
                    weight: 10,
                    ..Default::default()
                })
                .await
                .expect("renew");
        }
        logic.invalidate_online();
        let reply = logic
            .renew_online(OnlineReq {
                server: "c1".into(),
                room_count: HashMap::from([("live://1".into(), 2), ("chat://9".into(), 1)]),
                ..Default::default()
            })
            .await
            .expect("renew");
        assert_eq!(reply.all_room_count["live://1"], 5);
        logic.invalidate_online();
        let top = logic.online_top("live", 10).await.expect("top");
        assert_eq!(
            top,
            vec![Top {
                room_id: "1".into(),
                count: 5
            }]
        );
        let rooms = logic
            .online_room("live", &["1".into(), "2".into()])
            .await
            .expect("rooms");
        assert_eq!(rooms, BTreeMap::from([("1".into(), 5), ("2".into(), 0)]));
        // c1's last report carried no metadata (a goim comet): 0 + 3.
        assert_eq!(logic.online_total().await.expect("total").1, 3);
    }
}
