//! The `PushCluster` custom resource (`pushcluster.io/v1alpha1`): one
//! object describes a whole fleet — comets, logic, jobs — on a NATS server
//! the user runs. Doc comments become the schema's descriptions; schemars
//! attributes and CEL rules become its validation.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Image tag used when `spec.image.tag` is empty: this operator's version.
pub const DEFAULT_TAG: &str = env!("CARGO_PKG_VERSION");
pub const DEFAULT_REPOSITORY: &str = "ghcr.io/pushcluster/pushcluster";

/// A goim v2-compatible push fleet: comets hold client connections (TCP,
/// WebSocket), logic serves the HTTP push API, jobs deliver from the NATS
/// push stream to the comets.
// Several printcolumn(...) share keys; clippy mistakes them for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pushcluster.io",
    version = "v1alpha1",
    kind = "PushCluster",
    namespaced,
    // `pc` is taken by PriorityClasses; the e2e suite checks this one
    // against a real API server's discovery.
    shortname = "pushc",
    category = "all",
    status = "PushClusterStatus",
    derive = "PartialEq",
    doc = "A goim v2-compatible push fleet (comets, logic, jobs) on NATS",
    scale(
        spec_replicas_path = ".spec.comet.replicas",
        status_replicas_path = ".status.comet.replicas",
        label_selector_path = ".status.comet.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status",
        description = "Every component has ready pods"
    ),
    printcolumn(
        name = "Comets",
        type_ = "string",
        json_path = ".status.comet.ready",
        description = "Ready/desired comet pods"
    ),
    printcolumn(
        name = "Logic",
        type_ = "string",
        json_path = ".status.logic.ready",
        description = "Ready/desired logic pods"
    ),
    printcolumn(
        name = "Job",
        type_ = "string",
        json_path = ".status.job.ready",
        description = "Ready/desired job pods"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// `auth` is required by the schema and has no schema default (a default of
// `{}` would break its own `mode` requirement, which the API server refuses);
// Rust still decodes an object stored before `auth` existed.
#[schemars(extend("required" = ["nats", "auth"]))]
pub struct PushClusterSpec {
    /// The container image every process runs (`pushcluster comet|logic|job`).
    #[serde(default)]
    pub image: ImageSpec,
    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// The NATS server or cluster (JetStream enabled) holding the push stream,
    /// sessions and leases.
    pub nats: NatsSpec,
    /// Comets: the connection servers clients reach.
    #[serde(default)]
    pub comet: CometSpec,
    /// Logic: the HTTP push API and the service comets call.
    #[serde(default)]
    pub logic: LogicSpec,
    /// Jobs: deliver the push stream to the comets.
    #[serde(default)]
    pub job: JobSpec,
    /// Who clients are and who may push. Required, with its `mode`, so
    /// exposing a fleet without authentication is a written decision. (An
    /// object stored before this field existed gets an InvalidConfig
    /// condition instead of stopping the operator's watch.)
    #[serde(default, skip_serializing_if = "AuthSpec::is_unset")]
    pub auth: AuthSpec,
    /// Mutual TLS on the gRPC links between comets, logic and jobs: a
    /// Secret with `tls.crt`, `tls.key` and `ca.crt` (cert-manager's
    /// layout) whose certificate carries the DNS name `pushcluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_tls_secret: Option<String>,
    /// Overrides merged into the rendered YAML configuration (the schema of
    /// docs/configuration.md), e.g. `{logic: {node: {heartbeat: 30s}}}`.
    /// Keys the operator manages (listen addresses, NATS, discovery) win.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub config: Option<serde_json::Value>,
    /// Room history for clients that resume after a reconnect
    /// (docs/recovery.md); `history` of the YAML configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,
    /// Prometheus Operator integration.
    #[serde(default)]
    pub monitoring: MonitoringSpec,
    /// Stop changing the fleet's objects (they keep running); reported by
    /// the ReconciliationPaused condition.
    #[serde(default)]
    pub paused: bool,
}

fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Image repository.
    #[serde(default = "default_repository")]
    #[schemars(length(min = 1))]
    pub repository: String,
    /// Image tag; empty means the operator's own version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// When to pull the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            repository: default_repository(),
            tag: None,
            pull_policy: None,
        }
    }
}

impl ImageSpec {
    pub fn reference(&self) -> String {
        let tag = self
            .tag
            .as_deref()
            .filter(|t| !t.is_empty())
            .unwrap_or(DEFAULT_TAG);
        format!("{}:{tag}", self.repository)
    }
}

fn default_repository() -> String {
    DEFAULT_REPOSITORY.to_string()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Client authentication (`logic.auth`) and the push API's bearer tokens
/// (`logic.api`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.mode != 'jwt' || has(self.jwtSecret) || (has(self.jwtPublicKeys) && size(self.jwtPublicKeys) > 0)").message("mode jwt needs jwtSecret or jwtPublicKeys"),
    validation = Rule::new("self.mode != 'webhook' || has(self.webhookUrl)").message("mode webhook needs webhookUrl")
)]
#[schemars(extend("required" = ["mode"]))]
pub struct AuthSpec {
    /// `none` (goim: any client may claim any mid and room), `jwt` (the
    /// auth body carries a signed token) or `webhook` (logic asks your
    /// backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "auth_mode_schema")]
    pub mode: Option<AuthModeSpec>,
    /// jwt: the HS256 shared secret (at least 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<SecretKey>,
    /// jwt: PEM public keys for RS256/ES256 tokens. Rotating a Secret
    /// applies without a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_public_keys: Vec<SecretKey>,
    /// webhook: the in-cluster `http://` URL logic POSTs each auth body to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^http://\S+$"))]
    pub webhook_url: Option<String>,
    /// Bearer tokens of the push API, one per line. When absent the
    /// operator generates the Secret `<name>-api-token` (key `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token_secret: Option<SecretKey>,
}

impl AuthSpec {
    /// Nothing set: what an object stored before `auth` existed decodes to.
    pub fn is_unset(&self) -> bool {
        *self == AuthSpec::default()
    }
}

/// Not nullable: `Option` in Rust only so objects stored before `auth`
/// existed still decode.
fn auth_mode_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["none", "jwt", "webhook"],
        "description": "`none` (goim: any client may claim any mid and room), `jwt` (the auth body carries a signed token) or `webhook` (logic asks your backend)."
    })
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthModeSpec {
    None,
    Jwt,
    Webhook,
}

/// A key of a Secret in the PushCluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKey {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(cel)]
pub struct NatsSpec {
    /// Server URL(s), comma-separated, e.g. `nats://nats.nats:4222`.
    #[schemars(regex(
        pattern = r"^(nats|tls|ws|wss)://[^,\s]+(,\s*(nats|tls|ws|wss)://[^,\s]+)*$"
    ))]
    pub url: String,
    /// A NATS `.creds` file (JWT and NKey seed) in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretKey>,
    /// The JetStream stream carrying pushes.
    #[serde(default = "default_stream")]
    #[schemars(length(min = 1, max = 64))]
    pub stream: String,
    /// Ordering partitions of the stream; each has one job owner at a time.
    /// It cannot change once set: a room would move to another partition.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("partitions cannot change; create a new PushCluster (or stream) instead"))]
    pub partitions: u32,
    /// KV bucket names.
    #[serde(default)]
    pub buckets: BucketsSpec,
}

fn default_stream() -> String {
    "PUSHCLUSTER".to_string()
}

fn default_partitions() -> u32 {
    16
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketsSpec {
    /// Sessions: key → server, mid → keys.
    #[serde(default = "default_sessions_bucket")]
    #[schemars(length(min = 1, max = 64))]
    pub sessions: String,
    /// Comet reports: room counts and node data.
    #[serde(default = "default_online_bucket")]
    #[schemars(length(min = 1, max = 64))]
    pub online: String,
    /// Job membership and partition leases.
    #[serde(default = "default_leases_bucket")]
    #[schemars(length(min = 1, max = 64))]
    pub leases: String,
}

impl Default for BucketsSpec {
    fn default() -> Self {
        BucketsSpec {
            sessions: default_sessions_bucket(),
            online: default_online_bucket(),
            leases: default_leases_bucket(),
        }
    }
}

fn default_sessions_bucket() -> String {
    "pushcluster-sessions".into()
}

fn default_online_bucket() -> String {
    "pushcluster-online".into()
}

fn default_leases_bucket() -> String {
    "pushcluster-leases".into()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The Service clients connect through.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.tcpPort != self.wsPort && self.tcpPort != self.wssPort && self.wsPort != self.wssPort").message("tcpPort, wsPort and wssPort must differ")
)]
pub struct CometServiceSpec {
    /// Service type: ClusterIP, NodePort or LoadBalancer.
    #[serde(default, rename = "type")]
    pub service_type: ServiceType,
    /// goim TCP port (goim: 3101).
    #[serde(default = "default_tcp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub tcp_port: i32,
    /// goim WebSocket port, path /sub (goim: 3102).
    #[serde(default = "default_ws_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub ws_port: i32,
    /// WebSocket over TLS port, when `comet.tlsSecret` is set (goim: 3103).
    #[serde(default = "default_wss_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub wss_port: i32,
    /// Annotations for the Service (load balancer settings, for example).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for CometServiceSpec {
    fn default() -> Self {
        CometServiceSpec {
            service_type: ServiceType::ClusterIP,
            tcp_port: default_tcp_port(),
            ws_port: default_ws_port(),
            wss_port: default_wss_port(),
            annotations: BTreeMap::new(),
        }
    }
}

fn default_tcp_port() -> i32 {
    3101
}

fn default_ws_port() -> i32 {
    3102
}

fn default_wss_port() -> i32 {
    3103
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CometSpec {
    /// Comet pods (also set through the scale subresource: `kubectl scale pushc/NAME --replicas=N`).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The client Service (TCP, WebSocket, WSS).
    #[serde(default)]
    pub service: CometServiceSpec,
    /// A `kubernetes.io/tls` Secret (tls.crt, tls.key) enabling WebSocket over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
    /// On shutdown a comet closes its connections spread over this many
    /// seconds, so clients reconnect elsewhere gradually.
    #[serde(default = "default_drain_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_seconds: u32,
    /// Nodes comets may run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints comets tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Replaces the default spread (at most one comet per node more than
    /// another, best effort).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Comets by their connections: `target` is the connections one comet
    /// should hold. A scale-down removes the emptiest comet, one at a time,
    /// each after the previous one drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

impl Default for CometSpec {
    fn default() -> Self {
        CometSpec {
            replicas: default_replicas(),
            resources: None,
            service: CometServiceSpec::default(),
            tls_secret: None,
            drain_seconds: default_drain_seconds(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            topology_spread_constraints: Vec::new(),
            autoscaling: None,
        }
    }
}

fn default_replicas() -> i32 {
    2
}

/// Replicas chosen by the operator from the component's own load, read
/// from its pods' metrics. While `enabled`, the operator owns the
/// component's replicas: `replicas` (and the scale subresource, so an HPA)
/// is ignored, and status says so.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas")
)]
pub struct AutoscalingSpec {
    /// Let the operator choose the replicas.
    #[serde(default)]
    pub enabled: bool,
    /// Never fewer pods than this.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Never more pods than this (jobs: nor more than `nats.partitions`).
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// The load one pod should carry (the component's field says in what).
    #[schemars(range(min = 1))]
    pub target: i64,
    /// A higher recommendation must hold this long before scaling up.
    #[serde(default)]
    #[schemars(range(max = 3600))]
    pub scale_up_stabilization_seconds: u32,
    /// Scale down only to the highest recommendation of this long a window.
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(max = 3600))]
    pub scale_down_stabilization_seconds: u32,
    /// Pods added at most in one step (comets are removed one at a time).
    #[serde(default = "default_max_step")]
    #[schemars(range(min = 1, max = 100))]
    pub max_step: i32,
}

fn default_max_replicas() -> i32 {
    10
}

fn default_scale_down_window() -> u32 {
    300
}

fn default_max_step() -> i32 {
    4
}

fn default_drain_seconds() -> u32 {
    30
}

/// The Service backends call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct LogicServiceSpec {
    /// Service type: ClusterIP, NodePort or LoadBalancer.
    #[serde(default, rename = "type")]
    pub service_type: ServiceType,
    /// Annotations for the Service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogicSpec {
    /// Logic pods; comets and HTTP clients balance over them.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The Service (HTTP 3111, gRPC 3119).
    #[serde(default)]
    pub service: LogicServiceSpec,
    /// Logic pods by push requests: `target` is the push API requests per
    /// second one pod should serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

impl Default for LogicSpec {
    fn default() -> Self {
        LogicSpec {
            replicas: default_replicas(),
            resources: None,
            service: LogicServiceSpec::default(),
            autoscaling: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// Job pods; they share the stream's partitions (at most
    /// `nats.partitions` do useful work).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Jobs by stream lag: `target` is the pending (published, not yet
    /// delivered) messages one job should have; never more jobs than
    /// `nats.partitions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            replicas: default_replicas(),
            resources: None,
            autoscaling: None,
        }
    }
}

/// What reconnecting clients can get back, per room type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistorySpec {
    /// Off: nothing is kept, and every resume is told `recovered: false`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Rooms no rule in `rooms` matches (default 300 s, 1000 messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<RoomHistorySpec>,
    /// Per room type, by room id prefix (`live://`, `chat://`); the longest
    /// matching prefix wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<RoomHistoryRuleSpec>,
    /// Pushes to mids and keys, kept per user and per key whether or not
    /// it is online (default on, 900 s, 1000 messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<DirectHistorySpec>,
    /// The least time any message stays in the push stream, delivered or
    /// not (default 900 s): also how long an accepted message waits for a
    /// job when every job is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_ttl_seconds: Option<u32>,
}

fn default_true() -> bool {
    true
}

/// How much of a room's history is replayed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomHistorySpec {
    /// Messages older than this are not replayed.
    #[schemars(range(min = 1))]
    pub max_age_seconds: u32,
    /// At most this many of the room's latest messages are replayed.
    #[schemars(range(min = 1))]
    pub max_messages: u32,
}

/// `history.direct`: each user's and each key's stream of direct pushes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectHistorySpec {
    /// Off: mid and key pushes go per comet, as in goim (a push to nobody
    /// online is dropped, nothing is replayed).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Direct messages older than this are not replayed (default 900).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_age_seconds: Option<u32>,
    /// At most this many of one user's latest direct messages are replayed
    /// (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_messages: Option<u32>,
}

/// `history.rooms[]`: rooms whose id starts with `prefix`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomHistoryRuleSpec {
    /// Room ids starting with this (`live://`).
    #[schemars(length(min = 1))]
    pub prefix: String,
    /// Messages older than this are not replayed.
    #[schemars(range(min = 1))]
    pub max_age_seconds: u32,
    /// At most this many of the room's latest messages are replayed.
    #[schemars(range(min = 1))]
    pub max_messages: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Create a ServiceMonitor (needs the Prometheus Operator's CRDs).
    #[serde(default)]
    pub service_monitor: bool,
    /// Extra labels for the ServiceMonitor (to match a Prometheus's selector).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Observed state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PushClusterStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Available, Progressing, Degraded, ReconciliationPaused,
    /// ServiceMonitorReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub comet: ComponentStatus,
    #[serde(default)]
    pub logic: ComponentStatus,
    #[serde(default)]
    pub job: ComponentStatus,
}

/// One component's pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Pods that exist (for the scale subresource).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub desired_replicas: i32,
    /// "ready/desired", for `kubectl get`.
    #[serde(default)]
    pub ready: String,
    /// Label selector of the pods (for the scale subresource and HPAs).
    #[serde(default)]
    pub selector: String,
    /// Present while `autoscaling.enabled`: the operator owns the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// What the autoscaler saw and decided last.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// The replicas the operator set.
    pub desired_replicas: i32,
    /// The load summed over the pods that answered, in the target's unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<f64>,
    /// Pods whose metrics were read, of the pods that are ready.
    #[serde(default)]
    pub pods_measured: String,
    /// Why the last decision was made.
    #[serde(default)]
    pub reason: String,
    /// When the replicas last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}
