//! The one configuration schema (YAML) read by every mode: `standalone`, the
//! separate `comet` / `logic` / `job` processes, and the ConfigMap the
//! operator renders. Every key has a default; defaults equal goim's where
//! goim has one. Unknown keys are errors, so a typo never goes unnoticed.
//!
//! `docs/configuration.md` documents every key.

use std::collections::BTreeMap;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("invalid value for {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub comet: CometConfig,
    pub logic: LogicConfig,
    pub job: JobConfig,
    pub nats: NatsConfig,
    pub discovery: DiscoveryConfig,
    /// Mutual TLS on the gRPC links between comet, logic and job; off when
    /// absent.
    pub grpc_tls: Option<GrpcTlsConfig>,
    /// Room history: what a reconnecting client can get back.
    pub history: HistoryConfig,
    /// What clients send (op 4), to the business backend.
    pub upstream: UpstreamConfig,
    /// The async runtime the process runs on.
    pub runtime: RuntimeConfig,
}

impl Config {
    /// Parses and validates a YAML document. An empty document is all defaults.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text)?
        };
        config.validate()?;
        Ok(config)
    }

    /// The configuration as YAML, every key included.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        Ok(serde_yaml_ng::to_string(self)?)
    }

    /// The runtime a process of `role` runs on: `runtime`, with the role's
    /// own `runtime` section over it (standalone: `runtime` alone).
    pub fn runtime_for(&self, role: Role) -> RuntimeConfig {
        let overrides = match role {
            Role::Standalone => return self.runtime.clone(),
            Role::Comet => &self.comet.runtime,
            Role::Logic => &self.logic.runtime,
            Role::Job => &self.job.runtime,
        };
        self.runtime.overridden_by(overrides)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.runtime
            .validate("runtime.event_interval", "runtime.scheduler_slice")?;
        for (role, event_interval_key, scheduler_slice_key) in [
            (
                Role::Comet,
                "comet.runtime.event_interval",
                "comet.runtime.scheduler_slice",
            ),
            (
                Role::Logic,
                "logic.runtime.event_interval",
                "logic.runtime.scheduler_slice",
            ),
            (
                Role::Job,
                "job.runtime.event_interval",
                "job.runtime.scheduler_slice",
            ),
        ] {
            self.runtime_for(role)
                .validate(event_interval_key, scheduler_slice_key)?;
        }
        let comet = &self.comet;
        if comet.tcp.bind.is_empty() && comet.websocket.bind.is_empty() {
            return Err(invalid(
                "comet.tcp.bind / comet.websocket.bind",
                "at least one client listener is needed",
            ));
        }
        if comet.protocol.handshake_timeout.is_zero() {
            return Err(invalid("comet.protocol.handshake_timeout", "must be > 0"));
        }
        if comet.protocol.write_timeout.is_zero() {
            return Err(invalid("comet.protocol.write_timeout", "must be > 0"));
        }
        if comet.protocol.send_queue == 0 {
            return Err(invalid("comet.protocol.send_queue", "must be > 0"));
        }
        if comet.bucket.size == 0 {
            return Err(invalid("comet.bucket.size", "must be > 0"));
        }
        if comet.online_report_interval.is_zero() {
            return Err(invalid("comet.online_report_interval", "must be > 0"));
        }
        if comet.broadcast_queue == 0 {
            return Err(invalid("comet.broadcast_queue", "must be > 0"));
        }
        if comet.limits.rooms_per_connection == 0 {
            return Err(invalid("comet.limits.rooms_per_connection", "must be > 0"));
        }
        if self.upstream.enabled {
            if self.upstream.stream.is_empty() || self.upstream.subject.is_empty() {
                return Err(invalid("upstream", "stream and subject must not be empty"));
            }
            if self.upstream.max_bytes == 0 || self.upstream.per_second_per_connection == 0 {
                return Err(invalid(
                    "upstream",
                    "max_bytes and per_second_per_connection must be > 0",
                ));
            }
        }
        if comet.logic_timeout.is_zero() {
            return Err(invalid("comet.logic_timeout", "must be > 0"));
        }
        if let Some(id) = &comet.id
            && id.trim().is_empty()
        {
            return Err(invalid("comet.id", "must not be empty"));
        }
        let logic = &self.logic;
        if logic.node.heartbeat.is_zero() || logic.node.heartbeat_max == 0 {
            return Err(invalid(
                "logic.node.heartbeat / logic.node.heartbeat_max",
                "must be > 0",
            ));
        }
        if logic.backpressure.interval.is_zero() {
            return Err(invalid("logic.backpressure.interval", "must be > 0"));
        }
        if logic.backpressure.retry_after.is_zero() {
            return Err(invalid("logic.backpressure.retry_after", "must be > 0"));
        }
        if logic.session_expire.is_zero() {
            return Err(invalid("logic.session_expire", "must be > 0"));
        }
        if logic.online_expire.is_zero() {
            return Err(invalid("logic.online_expire", "must be > 0"));
        }
        if logic.http.max_body == 0 {
            return Err(invalid("logic.http.max_body", "must be > 0"));
        }
        if !(logic.node.region_weight.is_finite() && logic.node.region_weight > 0.0) {
            return Err(invalid("logic.node.region_weight", "must be > 0"));
        }
        let job = &self.job;
        if job.room.batch == 0 {
            return Err(invalid("job.room.batch", "must be > 0"));
        }
        if job.queue == 0 {
            return Err(invalid("job.queue", "must be > 0"));
        }
        if job.room.idle.is_zero() {
            return Err(invalid("job.room.idle", "must be > 0"));
        }
        if job.delivery.timeout.is_zero() {
            return Err(invalid("job.delivery.timeout", "must be > 0"));
        }
        let nats = &self.nats;
        if nats.url.trim().is_empty() {
            return Err(invalid("nats.url", "must not be empty"));
        }
        if nats.partitions == 0 || nats.partitions > 1024 {
            return Err(invalid("nats.partitions", "must be 1 to 1024"));
        }
        if nats.lease_ttl < Duration::from_secs(1) {
            return Err(invalid("nats.lease_ttl", "must be at least 1s"));
        }
        if nats.max_deliver == 0 {
            return Err(invalid("nats.max_deliver", "must be > 0"));
        }
        if nats.ack_wait <= job.delivery.retry_for {
            return Err(invalid(
                "nats.ack_wait",
                "must exceed job.delivery.retry_for, or messages are redelivered while still retried",
            ));
        }
        for (key, value) in [
            ("nats.stream.name", &nats.stream.name),
            ("nats.stream.subject_prefix", &nats.stream.subject_prefix),
            ("nats.consumer_prefix", &nats.consumer_prefix),
            ("nats.buckets.sessions", &nats.buckets.sessions),
            ("nats.buckets.online", &nats.buckets.online),
            ("nats.buckets.leases", &nats.buckets.leases),
        ] {
            if value.is_empty()
                || value.contains(char::is_whitespace)
                || value.contains('*')
                || value.contains('>')
            {
                return Err(invalid(
                    key,
                    "must be a non-empty NATS name without spaces or wildcards",
                ));
            }
        }
        let discovery = &self.discovery;
        if discovery.kind == DiscoveryKind::Kubernetes
            && (discovery.comet_service.is_empty() || discovery.logic_service.is_empty())
        {
            return Err(invalid(
                "discovery.comet_service / discovery.logic_service",
                "must be set for kind: kubernetes",
            ));
        }
        if job.delivery.backoff_base.is_zero()
            || job.delivery.backoff_max < job.delivery.backoff_base
        {
            return Err(invalid(
                "job.delivery.backoff_base / job.delivery.backoff_max",
                "need 0 < backoff_base <= backoff_max",
            ));
        }
        self.validate_auth()?;
        self.history.validate()?;
        if let Some(tls) = &self.grpc_tls
            && [
                &tls.cert_file,
                &tls.key_file,
                &tls.ca_file,
                &tls.server_name,
            ]
            .iter()
            .any(|v| v.trim().is_empty())
        {
            return Err(invalid(
                "grpc_tls",
                "cert_file, key_file, ca_file and server_name must be set",
            ));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.logic.auth;
        match auth.mode {
            Some(AuthMode::Jwt) => {
                let jwt = &auth.jwt;
                if jwt.hs256_secret.is_some() && jwt.hs256_secret_file.is_some() {
                    return Err(invalid(
                        "logic.auth.jwt.hs256_secret",
                        "set hs256_secret or hs256_secret_file, not both",
                    ));
                }
                if jwt.hs256_secret.as_ref().is_some_and(|s| s.len() < 32) {
                    return Err(invalid(
                        "logic.auth.jwt.hs256_secret",
                        "must be at least 32 bytes (a short HS256 secret can be guessed offline)",
                    ));
                }
                if jwt.hs256_secret.is_none()
                    && jwt.hs256_secret_file.is_none()
                    && jwt.public_key_files.is_empty()
                {
                    return Err(invalid(
                        "logic.auth.jwt",
                        "mode jwt needs hs256_secret, hs256_secret_file or public_key_files",
                    ));
                }
                if jwt.reload_interval.is_zero() {
                    return Err(invalid("logic.auth.jwt.reload_interval", "must be > 0"));
                }
            }
            Some(AuthMode::Webhook) => {
                let url = &auth.webhook.url;
                if url.starts_with("https://") {
                    return Err(invalid(
                        "logic.auth.webhook.url",
                        "https is not supported yet; call an in-cluster http:// URL \
                         (a service mesh or sidecar can add TLS)",
                    ));
                }
                if !url.starts_with("http://") {
                    return Err(invalid(
                        "logic.auth.webhook.url",
                        "mode webhook needs an http:// URL",
                    ));
                }
                if auth.webhook.timeout.is_zero() {
                    return Err(invalid("logic.auth.webhook.timeout", "must be > 0"));
                }
            }
            Some(AuthMode::None) | None => {}
        }
        if self.logic.api.tokens.iter().any(|t| t.trim().len() < 16) {
            return Err(invalid(
                "logic.api.tokens",
                "each token must be at least 16 characters",
            ));
        }
        Ok(())
    }

    /// What a process in `role` must have chosen explicitly before it
    /// serves anyone. Returns the warnings to log about an open setup;
    /// standalone (the try-it-out mode) may run open, the separate
    /// processes may not without saying so.
    pub fn check_exposure(&self, role: Role) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        let separate = role != Role::Standalone;
        match self.logic.auth.mode {
            None if separate => {
                return Err(invalid(
                    "logic.auth.mode",
                    "must be set (jwt, webhook, or none to believe any client like goim)",
                ));
            }
            None | Some(AuthMode::None) => warnings.push(
                "logic.auth.mode is none: any client can claim any mid and room (goim's behaviour); \
                 set jwt or webhook before exposing this server"
                    .to_string(),
            ),
            Some(_) => {}
        }
        let api = &self.logic.api;
        if !api.has_tokens() {
            if separate && !api.allow_unauthenticated {
                return Err(invalid(
                    "logic.api.tokens",
                    "the push API needs tokens (logic.api.tokens or token_files), \
                     or logic.api.allow_unauthenticated: true",
                ));
            }
            warnings.push(
                "the push API is open: anyone who reaches it can push and read online counts; \
                 set logic.api.tokens"
                    .to_string(),
            );
        }
        Ok(warnings)
    }
}

/// `runtime`: the async runtime every role runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Tasks a worker thread runs between two looks at its sockets and
    /// timers (tokio's `event_interval`, whose own default is 61). While a
    /// large room's fan-out keeps every worker busy with writes of about
    /// 10 µs each, 61 of them hold a new request — a push to a quiet room,
    /// a client's frame — for over half a millisecond before it is even
    /// seen. Lower answers sooner, at the cost of one more non-blocking
    /// `epoll_wait` per that many tasks.
    pub event_interval: u32,
    /// The CPU slice the kernel gives this process's threads (Linux 6.12+,
    /// EEVDF's `sched_runtime`); unset or `0s`: the kernel's own. A thread
    /// whose slice is shorter than the running one's is switched in as soon
    /// as it wakes instead of at the next tick (4 ms on many kernels), which
    /// helps a relay (logic, job) that shares a core with a busy comet, and
    /// costs throughput when the relays themselves are busy: they run per
    /// message instead of per batch (docs/benchmarks.md).
    #[serde(with = "humantime_serde")]
    pub scheduler_slice: Option<Duration>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            event_interval: 8,
            scheduler_slice: None,
        }
    }
}

/// The shortest and longest slice Linux accepts (it clamps to these).
const SCHEDULER_SLICE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_micros(100)..=Duration::from_millis(100);

impl RuntimeConfig {
    /// The slice to ask the kernel for; `None`: the kernel's own.
    pub fn scheduler_slice(&self) -> Option<Duration> {
        self.scheduler_slice.filter(|slice| !slice.is_zero())
    }

    /// This runtime with one role's `runtime` section applied over it.
    fn overridden_by(&self, role: &RoleRuntimeConfig) -> RuntimeConfig {
        RuntimeConfig {
            event_interval: role.event_interval.unwrap_or(self.event_interval),
            scheduler_slice: role.scheduler_slice.or(self.scheduler_slice),
        }
    }

    /// Checks this runtime's values; errors name the keys given.
    fn validate(
        &self,
        event_interval_key: &'static str,
        scheduler_slice_key: &'static str,
    ) -> Result<(), ConfigError> {
        if self.event_interval == 0 {
            return Err(invalid(event_interval_key, "must be > 0"));
        }
        if let Some(slice) = self.scheduler_slice()
            && !SCHEDULER_SLICE_RANGE.contains(&slice)
        {
            return Err(invalid(
                scheduler_slice_key,
                "must be 0s (the kernel's own) or from 100us to 100ms",
            ));
        }
        Ok(())
    }
}

/// `comet.runtime`, `logic.runtime`, `job.runtime`: what that role's
/// processes change of `runtime`, so one file (or a PushCluster's
/// `spec.config`) can, say, give logic and job a shorter slice than the
/// comets. An unset key keeps `runtime`'s; standalone runs every role in one
/// process and uses `runtime` alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoleRuntimeConfig {
    pub event_interval: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub scheduler_slice: Option<Duration>,
}

/// `admin`: the port serving `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// host:port of the admin HTTP server. Default: `0.0.0.0:3190` for
    /// standalone and comet, `:3191` for logic, `:3192` for job, so the
    /// three can share one host with one config file.
    pub bind: Option<String>,
}

/// Which process reads the config (for role-dependent defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Standalone,
    Comet,
    Logic,
    Job,
}

impl AdminConfig {
    pub fn bind_for(&self, role: Role) -> String {
        self.bind.clone().unwrap_or_else(|| {
            let port = match role {
                Role::Standalone | Role::Comet => 3190,
                Role::Logic => 3191,
                Role::Job => 3192,
            };
            format!("0.0.0.0:{port}")
        })
    }
}

/// `log`: logging; `--log-format` / `--log-level` on the command line win.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `info,pushcluster_comet=debug`.
    /// The `RUST_LOG` environment variable wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `comet`: the connection server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CometConfig {
    /// Server id stored in sessions and used by job to reach this comet.
    /// Default: env `POD_NAME`, else the hostname (goim: `-host`).
    pub id: Option<String>,
    pub tcp: TcpConfig,
    pub websocket: WebSocketConfig,
    pub grpc: GrpcConfig,
    pub protocol: ProtocolConfig,
    pub bucket: BucketConfig,
    pub limits: LimitsConfig,
    /// How often room counts are reported to logic (goim: 10 s).
    #[serde(with = "humantime_serde")]
    pub online_report_interval: Duration,
    /// On SIGTERM, client connections are closed spread over this period.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// Broadcasts waiting to start on this comet; they run one at a time, in
    /// order. A broadcast that finds the queue full is refused (job retries).
    pub broadcast_queue: usize,
    /// Deadline of each call to logic (Connect, Disconnect, ...).
    #[serde(with = "humantime_serde")]
    pub logic_timeout: Duration,
    /// Weight of this comet in `/goim/nodes/weighted` (goim: `-weight`).
    pub weight: i32,
    /// Leave this comet out of `/goim/nodes/weighted` (goim: `-offline`).
    pub offline: bool,
    /// Public addresses handed to clients (goim: `-addrs`). Empty: env
    /// `POD_IP` when set (a comet pod lists its own address).
    pub addrs: Vec<String>,
    /// Region of this comet, matched against `logic.regions`.
    pub region: String,
    pub zone: String,
    /// Between two chunks of a large room's fan-out, offer the core to any
    /// other thread ready to run on it (`sched_yield`), so a process that
    /// shares the comet's cores (logic, job, nats-server) waits for at most
    /// a chunk of writes instead of the kernel's next tick. On by default.
    pub yield_cpu: bool,
    /// Comets' own `runtime` settings, over `runtime`.
    pub runtime: RoleRuntimeConfig,
}

impl Default for CometConfig {
    fn default() -> Self {
        CometConfig {
            id: None,
            tcp: TcpConfig::default(),
            websocket: WebSocketConfig::default(),
            grpc: GrpcConfig {
                bind: "0.0.0.0:3109".into(),
            },
            protocol: ProtocolConfig::default(),
            bucket: BucketConfig::default(),
            limits: LimitsConfig::default(),
            online_report_interval: Duration::from_secs(10),
            drain: Duration::from_secs(30),
            broadcast_queue: 1024,
            logic_timeout: Duration::from_secs(5),
            weight: 10,
            offline: false,
            addrs: Vec::new(),
            region: String::new(),
            zone: String::new(),
            yield_cpu: true,
            runtime: RoleRuntimeConfig::default(),
        }
    }
}

/// `comet.tcp`: the goim TCP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpConfig {
    /// host:port list (goim: `:3101`).
    pub bind: Vec<String>,
    /// SO_SNDBUF of each connection in bytes; 0 leaves the kernel default.
    pub sndbuf: u32,
    /// SO_RCVBUF of each connection in bytes; 0 leaves the kernel default.
    pub rcvbuf: u32,
    /// TCP keepalive probes.
    pub keepalive: bool,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            bind: vec!["0.0.0.0:3101".into()],
            sndbuf: 4096,
            rcvbuf: 4096,
            keepalive: false,
        }
    }
}

/// `comet.websocket`: the goim WebSocket listener (path `/sub`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// host:port list (goim: `:3102`).
    pub bind: Vec<String>,
    /// WebSocket over TLS (goim: `tlsOpen`, `:3103`); off when absent.
    pub tls: Option<WssConfig>,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            bind: vec!["0.0.0.0:3102".into()],
            tls: None,
        }
    }
}

/// `comet.websocket.tls`: the WSS listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WssConfig {
    /// host:port list (goim: `:3103`).
    #[serde(default = "default_wss_bind")]
    pub bind: Vec<String>,
    /// PEM certificate chain.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// How often the files are checked for a renewed certificate (on the
    /// next handshake); a changed pair is served without a restart.
    #[serde(default = "default_tls_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_tls_reload() -> Duration {
    Duration::from_secs(10)
}

fn default_wss_bind() -> Vec<String> {
    vec!["0.0.0.0:3103".into()]
}

/// A gRPC server's listen address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    pub bind: String,
}

/// `comet.protocol`: per-connection behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolConfig {
    /// Time a new connection has to authenticate (goim: 5 s).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Frames that may wait for one connection's socket. A connection whose
    /// queue is full when a frame arrives is closed as a slow consumer and
    /// the frame counted as dropped; other connections never wait for it.
    pub send_queue: usize,
    /// A write to a client socket that takes longer than this closes the
    /// connection as a slow consumer (the client stopped reading).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            handshake_timeout: Duration::from_secs(5),
            send_queue: 256,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// `comet.limits`: what one client or address may take of a comet. 0 turns
/// a limit off. Each refusal is counted in
/// `pushcluster_comet_limited_total{limit}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open client connections on this comet; more are refused at accept.
    pub max_connections: usize,
    /// Open client connections from one IP address.
    pub max_connections_per_ip: usize,
    /// New connections per second from one IP address (a burst of this
    /// many is allowed, refilled at this rate).
    pub new_connections_per_second_per_ip: u32,
    /// Frames a client may send per second on one connection (burst of
    /// twice this); a connection over it is closed.
    pub frames_per_second_per_connection: u32,
    /// Rooms one connection may be in at once (goim's room and those joined
    /// with op 22 or the auth body's `rooms`); a join past it is refused.
    pub rooms_per_connection: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 0,
            max_connections_per_ip: 0,
            new_connections_per_second_per_ip: 0,
            frames_per_second_per_connection: 50,
            rooms_per_connection: 16,
        }
    }
}

/// `comet.bucket`: how connections are sharded (goim: 32 buckets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BucketConfig {
    pub size: usize,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig { size: 32 }
    }
}

/// `logic`: the push API and the service comets call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogicConfig {
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub auth: AuthConfig,
    pub api: ApiConfig,
    pub node: NodeConfig,
    pub backoff: BackoffConfig,
    /// Region name → client networks (CIDR). A client whose address is in a
    /// region's networks prefers comets of that region (goim mapped provinces,
    /// but its lookup was a stub that never matched).
    pub regions: BTreeMap<String, Vec<IpNet>>,
    /// Lifetime of a session mapping without a heartbeat (goim: redis expire, 30 m).
    #[serde(with = "humantime_serde")]
    pub session_expire: Duration,
    /// A comet that has not reported for this long leaves the online counts
    /// and the node list.
    #[serde(with = "humantime_serde")]
    pub online_expire: Duration,
    pub backpressure: BackpressureConfig,
    /// Logic's own `runtime` settings, over `runtime`.
    pub runtime: RoleRuntimeConfig,
}

/// `logic.backpressure`: bounded lag. A push whose partition's backlog
/// would take longer than `max_delay` to deliver (at the rate it drains),
/// or holds more than `max_lag` messages, is refused with HTTP 429 and
/// `Retry-After`, so publishers slow down instead of every message getting
/// later without limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackpressureConfig {
    /// Longest a partition's backlog may take to deliver; 0: no limit.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Most messages one partition may hold undelivered; 0: no limit.
    /// Both 0 turn backpressure off (goim's behaviour).
    pub max_lag: u64,
    /// The `Retry-After` of a refused push.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// How often logic reads the lag from the bus.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for BackpressureConfig {
    fn default() -> Self {
        BackpressureConfig {
            max_delay: Duration::from_secs(2),
            max_lag: 10_000,
            retry_after: Duration::from_secs(1),
            interval: Duration::from_millis(250),
        }
    }
}

impl Default for LogicConfig {
    fn default() -> Self {
        LogicConfig {
            http: HttpConfig::default(),
            grpc: GrpcConfig {
                bind: "0.0.0.0:3119".into(),
            },
            auth: AuthConfig::default(),
            api: ApiConfig::default(),
            node: NodeConfig::default(),
            backoff: BackoffConfig::default(),
            regions: BTreeMap::new(),
            session_expire: Duration::from_secs(30 * 60),
            online_expire: Duration::from_secs(30),
            backpressure: BackpressureConfig::default(),
            runtime: RoleRuntimeConfig::default(),
        }
    }
}

/// `logic.auth`: how clients prove who they are (the op-7 auth body).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `none` (goim: the body is believed), `jwt` or `webhook`. Standalone
    /// runs with `none` when unset (and warns); the separate processes
    /// refuse to start until it is set.
    pub mode: Option<AuthMode>,
    pub jwt: JwtConfig,
    pub webhook: WebhookConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    None,
    Jwt,
    Webhook,
}

/// `logic.auth.jwt`: the auth body's `token` is a JWT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret for HS256 tokens.
    pub hs256_secret: Option<String>,
    /// File holding the HS256 secret (reloaded when it changes).
    pub hs256_secret_file: Option<String>,
    /// PEM public keys (RSA for RS256, P-256 EC for ES256), reloaded when
    /// the files change.
    pub public_key_files: Vec<String>,
    /// Required `iss` claim, if set.
    pub issuer: Option<String>,
    /// Required `aud` claim, if set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// How often the key files are checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            hs256_secret: None,
            hs256_secret_file: None,
            public_key_files: Vec::new(),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// `logic.auth.webhook`: logic asks the business backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` URL that gets a POST per connecting client (in-cluster;
    /// https is not supported yet: use a mesh or sidecar for TLS).
    pub url: String,
    /// An answer slower than this denies the client.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Sent as `Authorization: Bearer ...` so the webhook knows it is logic.
    pub bearer_token: Option<String>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            timeout: Duration::from_secs(2),
            bearer_token: None,
        }
    }
}

/// `logic.api`: who may call the push and online API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer tokens accepted on every route but `/goim/nodes/*`.
    pub tokens: Vec<String>,
    /// Files holding one token per line (re-read when they change).
    pub token_files: Vec<String>,
    /// Serve the API without tokens. Standalone does when no token is set
    /// (and warns); the separate processes need tokens or this opt-out.
    pub allow_unauthenticated: bool,
}

impl ApiConfig {
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty() || !self.token_files.is_empty()
    }
}

/// `grpc_tls`: mutual TLS on the fleet's gRPC links. Every process serves
/// and dials with a certificate signed by `ca_file`; a peer without one is
/// refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcTlsConfig {
    /// PEM certificate chain presented as server and as client.
    pub cert_file: String,
    /// Its PEM private key.
    pub key_file: String,
    /// PEM CA certificates a peer's certificate must chain to.
    pub ca_file: String,
    /// Name (a DNS SAN) every peer's certificate carries; peers are dialled
    /// by address, so this is what is verified.
    #[serde(default = "default_grpc_tls_server_name")]
    pub server_name: String,
}

fn default_grpc_tls_server_name() -> String {
    "pushcluster".into()
}

/// `logic.http`: goim's HTTP push API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// host:port (goim: `:3111`).
    pub bind: String,
    /// Largest accepted request body in bytes; larger gets HTTP 413.
    pub max_body: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: "0.0.0.0:3111".into(),
            max_body: 1 << 20,
        }
    }
}

/// `logic.node`: what `/goim/nodes/weighted` and Connect tell clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub default_domain: String,
    pub host_domain: String,
    /// Heartbeat interval clients are told to use (goim: 4 m).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Missed heartbeats before a connection is closed; the server's
    /// heartbeat timeout is heartbeat × heartbeat_max (goim: 2).
    pub heartbeat_max: u32,
    pub tcp_port: u16,
    pub ws_port: u16,
    pub wss_port: u16,
    /// Weight multiplier for comets in the client's region (goim: 1.6).
    pub region_weight: f64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            default_domain: "conn.goim.io".into(),
            host_domain: ".goim.io".into(),
            heartbeat: Duration::from_secs(4 * 60),
            heartbeat_max: 2,
            tcp_port: 3101,
            ws_port: 3102,
            wss_port: 3103,
            region_weight: 1.6,
        }
    }
}

/// `logic.backoff`: reconnect backoff handed to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    pub max_delay: i32,
    pub base_delay: i32,
    pub factor: f32,
    pub jitter: f32,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            max_delay: 300,
            base_delay: 3,
            factor: 1.8,
            jitter: 1.3,
        }
    }
}

/// `job`: moves messages from the bus to the comets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// This job's member id for partition leases. Default: env `POD_NAME`,
    /// else the hostname, plus a random suffix (unique per process).
    pub id: Option<String>,
    pub room: RoomConfig,
    pub delivery: DeliveryConfig,
    /// Messages that may wait per room / per comet before consuming pauses.
    pub queue: usize,
    /// Jobs' own `runtime` settings, over `runtime`.
    pub runtime: RoleRuntimeConfig,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            id: None,
            room: RoomConfig::default(),
            delivery: DeliveryConfig::default(),
            queue: 1024,
            runtime: RoleRuntimeConfig::default(),
        }
    }
}

/// `job.room`: room batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomConfig {
    /// Most frames in one op-9 batch (goim: 20).
    pub batch: usize,
    /// How long a batch may wait for more messages once the room's queue is
    /// empty. 0 (the default) sends as soon as the queue is empty, so a lone
    /// message is never delayed (goim waits up to 1 s).
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// A room without messages for this long releases its resources (goim: 15 m).
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            batch: 20,
            linger: Duration::ZERO,
            idle: Duration::from_secs(15 * 60),
        }
    }
}

/// `job.delivery`: calls to comets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Deadline of one call to a comet.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Total time a message is retried against a comet before it is given up
    /// (counted, and returned to the bus for redelivery where it supports it).
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(30),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(3),
        }
    }
}

/// `nats`: the fleet's one stateful dependency (distributed mode only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// A NATS `.creds` file (JWT + NKey), if the server needs one.
    pub credentials_file: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// Deadline of each JetStream / KV request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub stream: StreamConfig,
    /// Ordering partitions of the stream. Every room, target comet and
    /// broadcast op maps to one; each partition has one job owner at a time.
    /// Change only with an empty stream.
    pub partitions: u32,
    /// Prefix of the durable consumers, one per partition.
    pub consumer_prefix: String,
    /// How long a delivered, unacked message waits before redelivery.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries of one message before it is given up (counted).
    pub max_deliver: u32,
    /// Unacked messages one partition may have out at once.
    pub max_ack_pending: u32,
    pub buckets: BucketNames,
    /// Replicas of the KV buckets.
    pub kv_replicas: u32,
    /// Lifetime of a job's partition lease without renewal; a dead job's
    /// partitions move to the others after about this long.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            credentials_file: None,
            user: None,
            password: None,
            token: None,
            request_timeout: Duration::from_secs(5),
            stream: StreamConfig::default(),
            partitions: 16,
            consumer_prefix: "pushcluster-job".into(),
            ack_wait: Duration::from_secs(60),
            max_deliver: 5,
            max_ack_pending: 1024,
            buckets: BucketNames::default(),
            kv_replicas: 1,
            lease_ttl: Duration::from_secs(6),
        }
    }
}

/// `nats.stream`: the JetStream stream carrying PushMsg.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    /// Subjects are `<subject_prefix>.<partition>`.
    pub subject_prefix: String,
    pub retention: Retention,
    pub storage: Storage,
    pub replicas: u32,
    /// Messages older than this are removed even if never consumed.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Stream size limit in bytes; -1 for none.
    pub max_bytes: i64,
    /// Window in which a repeated `Idempotency-Key` is recognised.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            name: "PUSHCLUSTER".into(),
            subject_prefix: "pushcluster.push".into(),
            retention: Retention::Limits,
            storage: Storage::File,
            replicas: 1,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: -1,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    /// A message is removed once acked (goim's Kafka topic was read once).
    /// Leaves no room history to resume from.
    Workqueue,
    /// Messages stay until their time-to-live (`history`), `max_age` or
    /// `max_bytes`: the room history reconnecting clients resume from.
    #[default]
    Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    #[default]
    File,
    Memory,
}

/// `nats.buckets`: KV bucket names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BucketNames {
    /// Sessions: key → (mid, server), mid → keys.
    pub sessions: String,
    /// Comet reports: room counts and node metadata.
    pub online: String,
    /// Job membership and partition leases.
    pub leases: String,
}

impl Default for BucketNames {
    fn default() -> Self {
        BucketNames {
            sessions: "pushcluster-sessions".into(),
            online: "pushcluster-online".into(),
            leases: "pushcluster-leases".into(),
        }
    }
}

/// `discovery`: how job finds comets and comets find logic (distributed mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    pub kind: DiscoveryKind,
    /// `static`: the comets (id = `comet.id`, addr = gRPC host:port).
    pub comets: Vec<StaticComet>,
    /// `static`: logic gRPC host:port list.
    pub logics: Vec<String>,
    /// `kubernetes`: namespace of the services (default: this pod's).
    pub namespace: Option<String>,
    /// `kubernetes`: the comets' headless Service.
    pub comet_service: String,
    /// `kubernetes`: the logic Service.
    pub logic_service: String,
    /// `kubernetes`: name of the gRPC port in the EndpointSlices.
    pub grpc_port_name: String,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            kind: DiscoveryKind::Static,
            comets: Vec::new(),
            logics: Vec::new(),
            namespace: None,
            comet_service: String::new(),
            logic_service: String::new(),
            grpc_port_name: "grpc".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryKind {
    #[default]
    Static,
    Kubernetes,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticComet {
    pub id: String,
    pub addr: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_may_run_open_with_warnings_the_separate_processes_may_not() {
        let open = Config::default();
        let warnings = open.check_exposure(Role::Standalone).expect("standalone");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        for role in [Role::Comet, Role::Logic, Role::Job] {
            let error = open.check_exposure(role).expect_err("unset mode");
            assert!(error.to_string().contains("logic.auth.mode"), "{error}");
        }
        let chosen = Config::from_yaml(
            "logic: { auth: { mode: none }, api: { allow_unauthenticated: true } }",
        )
        .expect("valid");
        assert_eq!(
            chosen.check_exposure(Role::Logic).expect("explicit").len(),
            2
        );
        let no_tokens = Config::from_yaml("logic: { auth: { mode: none } }").expect("valid");
        let error = no_tokens
            .check_exposure(Role::Logic)
            .expect_err("no tokens");
        assert!(error.to_string().contains("logic.api.tokens"), "{error}");
        let closed = Config::from_yaml(
            "logic: { auth: { mode: jwt, jwt: { hs256_secret_file: /s } }, api: { tokens: [0123456789abcdef] } }",
        )
        .expect("valid");
        assert!(
            closed
                .check_exposure(Role::Logic)
                .expect("closed")
                .is_empty()
        );
    }

    #[test]
    fn auth_settings_that_cannot_work_are_refused() {
        for (yaml, key) in [
            ("logic: { auth: { mode: jwt } }", "logic.auth.jwt"),
            (
                "logic: { auth: { mode: jwt, jwt: { hs256_secret: short } } }",
                "logic.auth.jwt.hs256_secret",
            ),
            (
                "logic: { auth: { mode: webhook } }",
                "logic.auth.webhook.url",
            ),
            (
                "logic: { auth: { mode: webhook, webhook: { url: \"https://x\" } } }",
                "logic.auth.webhook.url",
            ),
            ("logic: { api: { tokens: [short] } }", "logic.api.tokens"),
            ("logic: { auth: { mode: open } }", "unknown variant"),
        ] {
            let error = Config::from_yaml(yaml).expect_err(yaml);
            assert!(error.to_string().contains(key), "{yaml}: {error}");
        }
    }

    #[test]
    fn empty_document_is_all_defaults() {
        let config = Config::from_yaml("").expect("valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.comet.tcp.bind, vec!["0.0.0.0:3101"]);
        assert_eq!(config.comet.websocket.bind, vec!["0.0.0.0:3102"]);
        assert_eq!(config.comet.grpc.bind, "0.0.0.0:3109");
        assert_eq!(config.logic.http.bind, "0.0.0.0:3111");
        assert_eq!(config.logic.grpc.bind, "0.0.0.0:3119");
        assert_eq!(
            config.comet.protocol.handshake_timeout,
            Duration::from_secs(5)
        );
        assert_eq!(config.job.room.batch, 20);
        assert!(config.comet.yield_cpu, "on by default");
    }

    #[test]
    fn the_keys_outside_tools_drive_exist() {
        let config = Config::from_yaml(
            r#"
admin: { bind: "127.0.0.1:1" }
comet:
  tcp: { bind: ["127.0.0.1:2"] }
  websocket: { bind: ["127.0.0.1:3"] }
  grpc: { bind: "127.0.0.1:4" }
logic:
  http: { bind: "127.0.0.1:5" }
  grpc: { bind: "127.0.0.1:6" }
"#,
        )
        .expect("valid");
        assert_eq!(config.admin.bind_for(Role::Logic), "127.0.0.1:1");
        assert_eq!(Config::default().admin.bind_for(Role::Job), "0.0.0.0:3192");
        assert_eq!(config.comet.tcp.bind, vec!["127.0.0.1:2"]);
        assert_eq!(config.comet.websocket.bind, vec!["127.0.0.1:3"]);
        assert_eq!(config.comet.grpc.bind, "127.0.0.1:4");
        assert_eq!(config.logic.http.bind, "127.0.0.1:5");
        assert_eq!(config.logic.grpc.bind, "127.0.0.1:6");
    }

    #[test]
    fn durations_are_human_readable() {
        let config = Config::from_yaml(
            "comet: { protocol: { handshake_timeout: 8s } }\nlogic: { node: { heartbeat: 4m } }",
        )
        .expect("valid");
        assert_eq!(
            config.comet.protocol.handshake_timeout,
            Duration::from_secs(8)
        );
        assert_eq!(config.logic.node.heartbeat, Duration::from_secs(240));
    }

    #[test]
    fn yaml_round_trips() {
        let mut config = Config::default();
        config.comet.id = Some("comet-0".into());
        config
            .logic
            .regions
            .insert("east".into(), vec!["10.0.0.0/8".parse().expect("cidr")]);
        let text = config.to_yaml().expect("serializes");
        assert_eq!(Config::from_yaml(&text).expect("parses"), config);
    }

    #[test]
    fn distributed_keys_exist() {
        let config = Config::from_yaml(
            r#"
nats: { url: "nats://nats:4222" }
comet: { id: comet-0 }
discovery:
  kind: static
  comets: [{ id: comet-0, addr: "10.0.0.1:3109" }]
  logics: ["10.0.0.2:3119"]
"#,
        )
        .expect("valid");
        assert_eq!(config.nats.url, "nats://nats:4222");
        assert_eq!(config.discovery.comets[0].addr, "10.0.0.1:3109");
        let config = Config::from_yaml(
            "discovery: { kind: kubernetes, namespace: push, comet_service: c, logic_service: l }",
        )
        .expect("valid");
        assert_eq!(config.discovery.kind, DiscoveryKind::Kubernetes);
        assert_eq!(config.discovery.namespace.as_deref(), Some("push"));
        assert!(Config::from_yaml("discovery: { kind: kubernetes }").is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let error = Config::from_yaml("comet: { tcp: { bnd: [] } }").expect_err("typo");
        assert!(error.to_string().contains("bnd"), "{error}");
    }

    #[test]
    fn impossible_values_are_errors() {
        for (yaml, key) in [
            ("job: { room: { batch: 0 } }", "job.room.batch"),
            (
                "comet: { protocol: { send_queue: 0 } }",
                "comet.protocol.send_queue",
            ),
            (
                "comet: { tcp: { bind: [] }, websocket: { bind: [] } }",
                "comet.tcp.bind",
            ),
            ("comet: { id: ' ' }", "comet.id"),
            ("runtime: { event_interval: 0 }", "runtime.event_interval"),
            (
                "runtime: { scheduler_slice: 50us }",
                "runtime.scheduler_slice",
            ),
            (
                "runtime: { scheduler_slice: 1s }",
                "runtime.scheduler_slice",
            ),
            (
                "logic: { runtime: { scheduler_slice: 50us } }",
                "logic.runtime.scheduler_slice",
            ),
            (
                "job: { runtime: { event_interval: 0 } }",
                "job.runtime.event_interval",
            ),
            (
                "comet: { runtime: { scheduler_slice: 2s } }",
                "comet.runtime.scheduler_slice",
            ),
        ] {
            let error = Config::from_yaml(yaml).expect_err(yaml).to_string();
            assert!(error.contains(key), "{yaml}: {error}");
        }
    }

    #[test]
    fn the_scheduler_slice_is_the_kernels_unless_set() {
        let slice = |yaml: &str| {
            Config::from_yaml(yaml)
                .expect(yaml)
                .runtime
                .scheduler_slice()
        };
        assert_eq!(slice("{}"), None);
        assert_eq!(slice("runtime: { scheduler_slice: 0s }"), None);
        assert_eq!(
            slice("runtime: { scheduler_slice: 100us }"),
            Some(Duration::from_micros(100))
        );
    }

    #[test]
    fn a_roles_runtime_section_overrides_runtime_for_that_role_only() {
        let config = Config::from_yaml(
            "runtime: { event_interval: 16 }\n\
             logic: { runtime: { scheduler_slice: 100us } }\n\
             job: { runtime: { scheduler_slice: 200us, event_interval: 4 } }\n\
             comet: { runtime: { scheduler_slice: 0s } }",
        )
        .expect("valid");
        let runtime = |role| {
            let runtime = config.runtime_for(role);
            (runtime.event_interval, runtime.scheduler_slice())
        };
        let micros = |n| Some(Duration::from_micros(n));
        assert_eq!(runtime(Role::Logic), (16, micros(100)));
        assert_eq!(runtime(Role::Job), (4, micros(200)));
        assert_eq!(runtime(Role::Comet), (16, None));
        assert_eq!(runtime(Role::Standalone), (16, None));

        // A role's `0s` takes back a slice `runtime` set for everyone.
        let config = Config::from_yaml(
            "runtime: { scheduler_slice: 100us }\ncomet: { runtime: { scheduler_slice: 0s } }",
        )
        .expect("valid");
        assert_eq!(config.runtime_for(Role::Comet).scheduler_slice(), None);
        assert_eq!(config.runtime_for(Role::Job).scheduler_slice(), micros(100));
    }
}

/// `history`: how long each room's messages stay available to clients that
/// reconnect and resume (`docs/recovery.md`). Standalone keeps them in a
/// ring per room in memory; a fleet in the JetStream push stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Off: resuming clients always get `recovered: false`, nothing is kept.
    pub enabled: bool,
    /// Rooms no rule below matches.
    pub default: RoomHistory,
    /// Per room type, by room id prefix (`live://`, `chat://`); the longest
    /// matching prefix wins.
    pub rooms: Vec<RoomHistoryRule>,
    /// Pushes to mids and keys (`/goim/push/mids`, `/goim/push/keys`).
    pub direct: DirectHistory,
    /// A fleet never lets a message leave the stream sooner than this,
    /// delivered or not (it is also how long an undelivered message waits
    /// for a job to come back). A room's shorter `max_age` still bounds
    /// what is replayed.
    #[serde(with = "humantime_serde")]
    pub min_ttl: Duration,
    pub replay: ReplayConfig,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            default: RoomHistory::default(),
            rooms: Vec::new(),
            direct: DirectHistory::default(),
            min_ttl: Duration::from_secs(15 * 60),
            replay: ReplayConfig::default(),
        }
    }
}

/// How much of one room's history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomHistory {
    /// Messages older than this are not replayed.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// At most this many of the room's latest messages are replayed; a
    /// client that missed more gets `recovered: false`.
    pub max_messages: usize,
}

impl Default for RoomHistory {
    fn default() -> Self {
        RoomHistory {
            max_age: Duration::from_secs(5 * 60),
            max_messages: 1000,
        }
    }
}

/// `history.direct`: each user's (`@mid:<mid>`) and each key's
/// (`@key:<key>`) stream of direct pushes. On, a push to a mid or key is
/// stored whether or not its user is online, and job finds the user's
/// connections when it delivers (`docs/recovery.md`); off, logic looks
/// them up when it publishes and pushes to nobody online are dropped, as in
/// goim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectHistory {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub max_messages: usize,
}

impl Default for DirectHistory {
    fn default() -> Self {
        DirectHistory {
            enabled: true,
            max_age: Duration::from_secs(15 * 60),
            max_messages: 1000,
        }
    }
}

/// `upstream`: messages clients send (op 4) go to the business backend
/// through a JetStream stream, with the identity the server authenticated
/// (`docs/upstream.md`). Off: op 4 is only logged, as in goim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub enabled: bool,
    /// Longest message body accepted; longer ones are answered `too_large`.
    pub max_bytes: usize,
    /// Messages one connection may send per second (a burst of twice
    /// this); more are answered `rate_limited`.
    pub per_second_per_connection: u32,
    /// The JetStream stream, created (or updated) by logic.
    pub stream: String,
    /// Messages are published to `<subject>.<comet id>`.
    pub subject: String,
    /// How long the stream keeps a message the backend did not take.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The backend's durable consumer: logic reports its backlog
    /// (`pushcluster_logic_upstream_pending`) for the alert when the
    /// backend stops consuming. Empty: not watched.
    pub consumer: String,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            enabled: false,
            max_bytes: 4096,
            per_second_per_connection: 10,
            stream: "PUSHCLUSTER_UPSTREAM".into(),
            subject: "pushcluster.upstream".into(),
            max_age: Duration::from_secs(24 * 3600),
            consumer: String::new(),
        }
    }
}

/// `history.rooms[]`: the history of rooms whose id starts with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomHistoryRule {
    pub prefix: String,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub max_messages: usize,
}

/// `history.replay`: bounds on one resume and on resumes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayConfig {
    /// Bytes of message bodies one resume may replay; past it the client
    /// gets `recovered: false` and reloads.
    pub max_bytes: usize,
    /// History reads one logic runs at once; more wait their turn, so a
    /// reconnect storm cannot starve live pushes or NATS.
    pub concurrency: usize,
    /// One history read, waiting included; past it `recovered: false`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            max_bytes: 1 << 20,
            concurrency: 16,
            timeout: Duration::from_secs(5),
        }
    }
}

impl HistoryConfig {
    /// Whether mid and key pushes go through direct streams.
    pub fn direct_streams(&self) -> bool {
        self.enabled && self.direct.enabled
    }

    /// The history kept for `room` (or a direct stream, `@mid:`/`@key:`):
    /// the longest matching prefix's rule.
    pub fn for_room(&self, room: &str) -> RoomHistory {
        if crate::streams::is_direct(room) {
            return RoomHistory {
                max_age: self.direct.max_age,
                max_messages: self.direct.max_messages,
            };
        }
        self.rooms
            .iter()
            .filter(|rule| room.starts_with(&rule.prefix))
            .max_by_key(|rule| rule.prefix.len())
            .map(|rule| RoomHistory {
                max_age: rule.max_age,
                max_messages: rule.max_messages,
            })
            .unwrap_or(self.default)
    }

    /// How long a fleet stores a message of `room` (NATS `Nats-TTL`).
    pub fn ttl_for_room(&self, room: &str) -> Duration {
        self.for_room(room).max_age.max(self.min_ttl)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, max_age, max_messages) in std::iter::once((
            "history.default",
            self.default.max_age,
            self.default.max_messages,
        ))
        .chain(
            self.rooms
                .iter()
                .map(|rule| ("history.rooms[]", rule.max_age, rule.max_messages)),
        )
        .chain(std::iter::once((
            "history.direct",
            self.direct.max_age,
            self.direct.max_messages,
        ))) {
            if max_age < Duration::from_secs(1) {
                return Err(invalid(key, "max_age must be at least 1s"));
            }
            if max_messages == 0 {
                return Err(invalid(key, "max_messages must be > 0"));
            }
        }
        if self.rooms.iter().any(|rule| rule.prefix.is_empty()) {
            return Err(invalid(
                "history.rooms[].prefix",
                "must not be empty (use history.default)",
            ));
        }
        if self.min_ttl < Duration::from_secs(1) {
            return Err(invalid("history.min_ttl", "must be at least 1s"));
        }
        if self.replay.concurrency == 0 || self.replay.max_bytes == 0 {
            return Err(invalid(
                "history.replay",
                "concurrency and max_bytes must be > 0",
            ));
        }
        if self.replay.timeout.is_zero() {
            return Err(invalid("history.replay.timeout", "must be > 0"));
        }
        Ok(())
    }
}
