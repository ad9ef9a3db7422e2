//! From a `PushCluster` to the Kubernetes objects of its fleet — pure
//! functions, so the output can be reviewed as golden YAML.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Resource, ResourceExt};
use pushcluster_api::config::{
    AuthMode, Config, DiscoveryKind, LogFormat, RoomHistory, RoomHistoryRule,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::crd::{AuthModeSpec, PushCluster};

/// The field manager of every server-side apply.
pub const MANAGER: &str = "pushcluster-operator";
/// Pod annotation carrying the rendered config's hash: a config change
/// changes the pod template, so the pods roll.
pub const CONFIG_HASH: &str = "pushcluster.io/config-hash";
const CONFIG_DIR: &str = "/etc/pushcluster";
const CONFIG_FILE: &str = "config.yaml";
const TLS_DIR: &str = "/etc/pushcluster/tls";
const NATS_DIR: &str = "/etc/pushcluster/nats";
/// Logic's credentials: API tokens, the JWT secret and public keys, from a
/// projected volume so rotated Secrets reach the files (logic re-reads them).
const AUTH_DIR: &str = "/etc/pushcluster/auth";
const GRPC_TLS_DIR: &str = "/etc/pushcluster/grpc-tls";
/// Key of the API token in the generated Secret.
pub const API_TOKEN_KEY: &str = "token";
const ADMIN_PORT: i32 = 3190;
const TCP_PORT: i32 = 3101;
const WS_PORT: i32 = 3102;
const WSS_PORT: i32 = 3103;
const COMET_GRPC_PORT: i32 = 3109;
const HTTP_PORT: i32 = 3111;
const LOGIC_GRPC_PORT: i32 = 3119;
/// Seconds a comet gets beyond its drain to flush and say goodbye.
const DRAIN_MARGIN: i64 = 15;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the PushCluster has no {0}")]
    Missing(&'static str),
    #[error("invalid spec.config: {0}")]
    InvalidConfig(String),
    #[error("cannot build {kind}: {source}")]
    Build {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// The Prometheus Operator's ServiceMonitor.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "monitoring.coreos.com",
        "v1",
        "ServiceMonitor",
    ))
}

/// Every object of one fleet.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub config_yaml: String,
    pub config_hash: String,
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub config_map: ConfigMap,
    pub comet_headless: Service,
    pub comet_client: Service,
    pub logic_service: Service,
    pub metrics_service: Service,
    pub comet_pdb: PodDisruptionBudget,
    pub logic_pdb: PodDisruptionBudget,
    pub comet: Deployment,
    pub logic: Deployment,
    pub job: Deployment,
    pub service_monitor: Option<DynamicObject>,
}

/// Object names derived from the PushCluster's name.
pub struct Names {
    pub instance: String,
}

impl Names {
    pub fn config(&self) -> String {
        format!("{}-config", self.instance)
    }
    pub fn comet(&self) -> String {
        format!("{}-comet", self.instance)
    }
    pub fn comet_headless(&self) -> String {
        format!("{}-comet-headless", self.instance)
    }
    pub fn logic(&self) -> String {
        format!("{}-logic", self.instance)
    }
    pub fn job(&self) -> String {
        format!("{}-job", self.instance)
    }
    pub fn metrics(&self) -> String {
        format!("{}-metrics", self.instance)
    }
    /// The Secret the operator generates when `spec.auth.apiTokenSecret`
    /// names none.
    pub fn api_token(&self) -> String {
        format!("{}-api-token", self.instance)
    }
    pub fn account(&self) -> String {
        self.instance.clone()
    }
}

/// Labels selecting one component's pods.
pub fn selector_labels(instance: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "pushcluster".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            instance.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
    ])
}

/// The label selector string of a component (scale subresource, HPAs).
pub fn selector_string(instance: &str, component: &str) -> String {
    selector_labels(instance, component)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels(instance: &str, component: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(instance, component);
    labels.insert(
        "app.kubernetes.io/managed-by".to_string(),
        MANAGER.to_string(),
    );
    labels.insert(
        "app.kubernetes.io/part-of".to_string(),
        "pushcluster".to_string(),
    );
    labels
}

fn build<T: DeserializeOwned>(kind: &'static str, value: Value) -> Result<T, RenderError> {
    serde_json::from_value(value).map_err(|source| RenderError::Build { kind, source })
}

/// Merges `extra` into `base` (objects key by key, anything else replaced).
fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(base), Value::Object(extra)) => {
            for (key, value) in extra {
                match base.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, extra) => *base = extra.clone(),
    }
}

/// The fleet's config file: defaults, then `spec.config`, then what the
/// operator manages.
pub fn render_config(pc: &PushCluster) -> Result<Config, RenderError> {
    let spec = &pc.spec;
    let namespace = pc.namespace().ok_or(RenderError::Missing("namespace"))?;
    let names = Names {
        instance: pc.name_any(),
    };
    let mut value = serde_json::to_value(Config::default())
        .map_err(|e| RenderError::InvalidConfig(e.to_string()))?;
    if let Some(overrides) = &spec.config {
        if !overrides.is_object() {
            return Err(RenderError::InvalidConfig("must be an object".into()));
        }
        merge(&mut value, overrides);
    }
    let mut config: Config =
        serde_json::from_value(value).map_err(|e| RenderError::InvalidConfig(e.to_string()))?;

    // In pods every process has its own address: one admin port for all.
    config.admin.bind = Some(format!("0.0.0.0:{ADMIN_PORT}"));
    config.log.format = LogFormat::Json;
    config.comet.id = None; // POD_NAME
    config.comet.tcp.bind = vec![format!("0.0.0.0:{TCP_PORT}")];
    config.comet.websocket.bind = vec![format!("0.0.0.0:{WS_PORT}")];
    config.comet.websocket.tls =
        spec.comet
            .tls_secret
            .as_ref()
            .map(|_| pushcluster_api::config::WssConfig {
                bind: vec![format!("0.0.0.0:{WSS_PORT}")],
                cert_file: format!("{TLS_DIR}/tls.crt"),
                key_file: format!("{TLS_DIR}/tls.key"),
                reload_interval: std::time::Duration::from_secs(10),
            });
    config.comet.grpc.bind = format!("0.0.0.0:{COMET_GRPC_PORT}");
    config.comet.drain = std::time::Duration::from_secs(u64::from(spec.comet.drain_seconds));
    config.logic.http.bind = format!("0.0.0.0:{HTTP_PORT}");
    config.logic.grpc.bind = format!("0.0.0.0:{LOGIC_GRPC_PORT}");
    // What /goim/nodes/weighted tells clients: the client Service's ports.
    let port = |p: i32| u16::try_from(p).unwrap_or(0);
    config.logic.node.tcp_port = port(spec.comet.service.tcp_port);
    config.logic.node.ws_port = port(spec.comet.service.ws_port);
    config.logic.node.wss_port = port(spec.comet.service.wss_port);
    config.nats.url = spec.nats.url.clone();
    config.nats.stream.name = spec.nats.stream.clone();
    config.nats.partitions = spec.nats.partitions;
    config.nats.buckets.sessions = spec.nats.buckets.sessions.clone();
    config.nats.buckets.online = spec.nats.buckets.online.clone();
    config.nats.buckets.leases = spec.nats.buckets.leases.clone();
    config.nats.credentials_file = spec
        .nats
        .credentials_secret
        .as_ref()
        .map(|secret| format!("{NATS_DIR}/{}", secret.key));
    let mode = spec.auth.mode.ok_or_else(|| {
        RenderError::InvalidConfig(
            "spec.auth.mode is required: none (goim's behaviour), jwt or webhook".into(),
        )
    })?;
    config.logic.auth.mode = Some(match mode {
        AuthModeSpec::None => AuthMode::None,
        AuthModeSpec::Jwt => AuthMode::Jwt,
        AuthModeSpec::Webhook => AuthMode::Webhook,
    });
    config.logic.auth.jwt.hs256_secret = None;
    config.logic.auth.jwt.hs256_secret_file = spec
        .auth
        .jwt_secret
        .as_ref()
        .map(|_| format!("{AUTH_DIR}/jwt-secret"));
    config.logic.auth.jwt.public_key_files = (0..spec.auth.jwt_public_keys.len())
        .map(|i| format!("{AUTH_DIR}/jwt-key-{i}.pem"))
        .collect();
    if let Some(url) = &spec.auth.webhook_url {
        config.logic.auth.webhook.url = url.clone();
    }
    config.logic.api.tokens = Vec::new();
    config.logic.api.token_files = vec![format!("{AUTH_DIR}/api-tokens")];
    config.logic.api.allow_unauthenticated = false;
    config.grpc_tls =
        spec.grpc_tls_secret
            .as_ref()
            .map(|_| pushcluster_api::config::GrpcTlsConfig {
                cert_file: format!("{GRPC_TLS_DIR}/tls.crt"),
                key_file: format!("{GRPC_TLS_DIR}/tls.key"),
                ca_file: format!("{GRPC_TLS_DIR}/ca.crt"),
                server_name: "pushcluster".to_string(),
            });
    if let Some(history) = &spec.history {
        let seconds = |s: u32| std::time::Duration::from_secs(u64::from(s));
        config.history.enabled = history.enabled;
        if let Some(default) = &history.default {
            config.history.default = RoomHistory {
                max_age: seconds(default.max_age_seconds),
                max_messages: default.max_messages as usize,
            };
        }
        config.history.rooms = history
            .rooms
            .iter()
            .map(|rule| RoomHistoryRule {
                prefix: rule.prefix.clone(),
                max_age: seconds(rule.max_age_seconds),
                max_messages: rule.max_messages as usize,
            })
            .collect();
        if let Some(direct) = &history.direct {
            config.history.direct.enabled = direct.enabled;
            if let Some(max_age) = direct.max_age_seconds {
                config.history.direct.max_age = seconds(max_age);
            }
            if let Some(max_messages) = direct.max_messages {
                config.history.direct.max_messages = max_messages as usize;
            }
        }
        if let Some(min_ttl) = history.min_ttl_seconds {
            config.history.min_ttl = seconds(min_ttl);
        }
    }
    config.discovery.kind = DiscoveryKind::Kubernetes;
    config.discovery.namespace = Some(namespace);
    config.discovery.comet_service = names.comet_headless();
    config.discovery.logic_service = names.logic();
    config.discovery.grpc_port_name = "grpc".to_string();
    config.discovery.comets = Vec::new();
    config.discovery.logics = Vec::new();
    config
        .validate()
        .map_err(|e| RenderError::InvalidConfig(e.to_string()))?;
    Ok(config)
}

/// The Secret holding a generated push API token: owned by the PushCluster
/// (deleted with it), created once and then left alone.
pub fn api_token_secret(pc: &PushCluster, token: &str) -> Result<Secret, RenderError> {
    let (namespace, owner) = home(pc)?;
    let names = Names {
        instance: pc.name_any(),
    };
    build(
        "Secret",
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": names.api_token(),
                "namespace": namespace,
                "labels": labels(&names.instance, "logic"),
                "ownerReferences": [owner]
            },
            "type": "Opaque",
            "stringData": {API_TOKEN_KEY: token}
        }),
    )
}

/// The namespace a PushCluster's children go to, and their owner reference.
fn home(pc: &PushCluster) -> Result<(String, OwnerReference), RenderError> {
    let namespace = pc.namespace().ok_or(RenderError::Missing("namespace"))?;
    let owner = pc
        .controller_owner_ref(&())
        .ok_or(RenderError::Missing("uid (not created yet)"))?;
    Ok((namespace, owner))
}

fn hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Renders every object of the fleet.
pub fn render(pc: &PushCluster) -> Result<Fleet, RenderError> {
    let spec = &pc.spec;
    let (namespace, owner) = home(pc)?;
    let names = Names {
        instance: pc.name_any(),
    };
    let instance = names.instance.as_str();
    let config = render_config(pc)?;
    let config_yaml = config
        .to_yaml()
        .map_err(|e| RenderError::InvalidConfig(e.to_string()))?;
    let config_hash = hash(&config_yaml);
    let metadata = |name: String, component: &str| {
        json!({
            "name": name,
            "namespace": namespace,
            "labels": labels(instance, component),
            "ownerReferences": [owner],
        })
    };

    let service_account = build(
        "ServiceAccount",
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(names.account(), "fleet"),
        }),
    )?;
    // Exactly what the processes read: comets find logic and jobs find
    // comets through EndpointSlices.
    let role = build(
        "Role",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(names.account(), "fleet"),
            "rules": [{
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["get", "list", "watch"]
            }]
        }),
    )?;
    let role_binding = build(
        "RoleBinding",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(names.account(), "fleet"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.account()},
            "subjects": [{"kind": "ServiceAccount", "name": names.account(), "namespace": namespace}]
        }),
    )?;
    let config_map = build(
        "ConfigMap",
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(names.config(), "fleet"),
            "data": {CONFIG_FILE: config_yaml}
        }),
    )?;

    let comet_headless = build(
        "Service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(names.comet_headless(), "comet"),
            "spec": {
                "clusterIP": "None",
                "selector": selector_labels(instance, "comet"),
                "ports": [{"name": "grpc", "port": COMET_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}]
            }
        }),
    )?;
    let tls = spec.comet.tls_secret.is_some();
    let mut client_ports = vec![
        json!({"name": "tcp", "port": spec.comet.service.tcp_port, "targetPort": "tcp", "protocol": "TCP"}),
        json!({"name": "ws", "port": spec.comet.service.ws_port, "targetPort": "ws", "protocol": "TCP"}),
    ];
    if tls {
        client_ports.push(
            json!({"name": "wss", "port": spec.comet.service.wss_port, "targetPort": "wss", "protocol": "TCP"}),
        );
    }
    let mut client_metadata = metadata(names.comet(), "comet");
    if !spec.comet.service.annotations.is_empty() {
        client_metadata["annotations"] = json!(spec.comet.service.annotations);
    }
    let comet_client = build(
        "Service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": client_metadata,
            "spec": {
                "type": spec.comet.service.service_type.as_str(),
                "selector": selector_labels(instance, "comet"),
                "ports": client_ports
            }
        }),
    )?;
    let mut logic_metadata = metadata(names.logic(), "logic");
    if !spec.logic.service.annotations.is_empty() {
        logic_metadata["annotations"] = json!(spec.logic.service.annotations);
    }
    let logic_service = build(
        "Service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": logic_metadata,
            "spec": {
                "type": spec.logic.service.service_type.as_str(),
                "selector": selector_labels(instance, "logic"),
                "ports": [
                    {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                    {"name": "grpc", "port": LOGIC_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}
                ]
            }
        }),
    )?;
    let mut metrics_metadata = metadata(names.metrics(), "metrics");
    metrics_metadata["labels"]["pushcluster.io/metrics"] = json!("true");
    let metrics_service = build(
        "Service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metrics_metadata,
            "spec": {
                "clusterIP": "None",
                "selector": {
                    "app.kubernetes.io/name": "pushcluster",
                    "app.kubernetes.io/instance": instance
                },
                "ports": [{"name": "metrics", "port": ADMIN_PORT, "targetPort": "metrics", "protocol": "TCP"}]
            }
        }),
    )?;

    let pdb = |component: &str, name: String| {
        build::<PodDisruptionBudget>(
            "PodDisruptionBudget",
            json!({
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": metadata(name, component),
                "spec": {
                    "maxUnavailable": 1,
                    "selector": {"matchLabels": selector_labels(instance, component)}
                }
            }),
        )
    };
    let comet_pdb = pdb("comet", names.comet())?;
    let logic_pdb = pdb("logic", names.logic())?;

    let pods = PodTemplate {
        pc,
        names: &names,
        config_hash: &config_hash,
    };
    let comet = pods.deployment(
        "comet",
        names.comet(),
        spec.comet.replicas,
        pods.comet_container(),
    )?;
    let logic = pods.deployment(
        "logic",
        names.logic(),
        spec.logic.replicas,
        pods.logic_container(),
    )?;
    let job = pods.deployment(
        "job",
        names.job(),
        spec.job.replicas,
        pods.container("job", &spec.job.resources, Vec::new()),
    )?;

    let service_monitor = if spec.monitoring.service_monitor {
        let mut monitor_labels = labels(instance, "metrics");
        monitor_labels.extend(spec.monitoring.labels.clone());
        let resource = service_monitor_resource();
        let mut object = DynamicObject::new(&names.metrics(), &resource).within(&namespace);
        object.metadata.labels = Some(monitor_labels);
        object.metadata.owner_references = Some(vec![owner.clone()]);
        object.data = json!({
            "spec": {
                "selector": {"matchLabels": {
                    "app.kubernetes.io/instance": instance,
                    "pushcluster.io/metrics": "true"
                }},
                "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
            }
        });
        Some(object)
    } else {
        None
    };

    Ok(Fleet {
        config_yaml,
        config_hash,
        service_account,
        role,
        role_binding,
        config_map,
        comet_headless,
        comet_client,
        logic_service,
        metrics_service,
        comet_pdb,
        logic_pdb,
        comet,
        logic,
        job,
        service_monitor,
    })
}

struct PodTemplate<'a> {
    pc: &'a PushCluster,
    names: &'a Names,
    config_hash: &'a str,
}

impl PodTemplate<'_> {
    fn container(
        &self,
        role: &str,
        resources: &Option<k8s_openapi::api::core::v1::ResourceRequirements>,
        mut ports: Vec<Value>,
    ) -> Value {
        let spec = &self.pc.spec;
        ports.push(json!({"name": "metrics", "containerPort": ADMIN_PORT, "protocol": "TCP"}));
        let mut mounts = vec![json!({"name": "config", "mountPath": CONFIG_DIR, "readOnly": true})];
        if spec.nats.credentials_secret.is_some() {
            mounts
                .push(json!({"name": "nats-credentials", "mountPath": NATS_DIR, "readOnly": true}));
        }
        if spec.grpc_tls_secret.is_some() {
            mounts.push(json!({"name": "grpc-tls", "mountPath": GRPC_TLS_DIR, "readOnly": true}));
        }
        let mut container = json!({
            "name": role,
            "image": spec.image.reference(),
            "args": [role, "--config", format!("{CONFIG_DIR}/{CONFIG_FILE}")],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
            ],
            "ports": ports,
            // Leaves the Services within seconds of a drain starting.
            "readinessProbe": {
                "httpGet": {"path": "/readyz", "port": "metrics"},
                "periodSeconds": 2,
                "failureThreshold": 2,
                "timeoutSeconds": 1
            },
            "livenessProbe": {
                "httpGet": {"path": "/healthz", "port": "metrics"},
                "periodSeconds": 10,
                "failureThreshold": 3,
                "timeoutSeconds": 2
            },
            "volumeMounts": mounts,
            "securityContext": {
                "runAsNonRoot": true,
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]}
            }
        });
        if let Some(policy) = spec.image.pull_policy {
            container["imagePullPolicy"] = json!(policy.as_str());
        }
        if let Some(resources) = resources {
            container["resources"] = json!(resources);
        }
        container
    }

    fn comet_container(&self) -> Value {
        let spec = &self.pc.spec;
        let mut ports = vec![
            json!({"name": "tcp", "containerPort": TCP_PORT, "protocol": "TCP"}),
            json!({"name": "ws", "containerPort": WS_PORT, "protocol": "TCP"}),
        ];
        if spec.comet.tls_secret.is_some() {
            ports.push(json!({"name": "wss", "containerPort": WSS_PORT, "protocol": "TCP"}));
        }
        ports.push(json!({"name": "grpc", "containerPort": COMET_GRPC_PORT, "protocol": "TCP"}));
        let mut container = self.container("comet", &spec.comet.resources, ports);
        if spec.comet.tls_secret.is_some()
            && let Some(mounts) = container["volumeMounts"].as_array_mut()
        {
            mounts.push(json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}));
        }
        container
    }

    fn logic_container(&self) -> Value {
        let spec = &self.pc.spec;
        let mut container = self.container(
            "logic",
            &spec.logic.resources,
            vec![
                json!({"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}),
                json!({"name": "grpc", "containerPort": LOGIC_GRPC_PORT, "protocol": "TCP"}),
            ],
        );
        if let Some(mounts) = container["volumeMounts"].as_array_mut() {
            mounts.push(json!({"name": "auth", "mountPath": AUTH_DIR, "readOnly": true}));
        }
        container
    }

    /// Logic's credentials as files: API tokens (the named or the generated
    /// Secret), the JWT secret and public keys.
    fn auth_volume(&self) -> Value {
        let auth = &self.pc.spec.auth;
        let item = |name: &str, key: &str, path: String| json!({"secret": {"name": name, "items": [{"key": key, "path": path}]}});
        let mut sources = vec![match &auth.api_token_secret {
            Some(secret) => item(&secret.name, &secret.key, "api-tokens".into()),
            None => item(&self.names.api_token(), API_TOKEN_KEY, "api-tokens".into()),
        }];
        if let Some(secret) = &auth.jwt_secret {
            sources.push(item(&secret.name, &secret.key, "jwt-secret".into()));
        }
        for (i, secret) in auth.jwt_public_keys.iter().enumerate() {
            sources.push(item(&secret.name, &secret.key, format!("jwt-key-{i}.pem")));
        }
        json!({"name": "auth", "projected": {"sources": sources}})
    }

    fn deployment(
        &self,
        component: &str,
        name: String,
        replicas: i32,
        container: Value,
    ) -> Result<Deployment, RenderError> {
        let spec = &self.pc.spec;
        let instance = self.names.instance.as_str();
        let (namespace, owner) = home(self.pc)?;
        let mut volumes =
            vec![json!({"name": "config", "configMap": {"name": self.names.config()}})];
        if let Some(secret) = &spec.nats.credentials_secret {
            volumes.push(json!({
                "name": "nats-credentials",
                "secret": {"secretName": secret.name, "items": [{"key": secret.key, "path": secret.key}]}
            }));
        }
        if let Some(secret) = &spec.grpc_tls_secret {
            volumes.push(json!({"name": "grpc-tls", "secret": {"secretName": secret}}));
        }
        let mut pod_spec = json!({
            "serviceAccountName": self.names.account(),
            "containers": [container],
            "volumes": volumes,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"}
            }
        });
        if !spec.image_pull_secrets.is_empty() {
            pod_spec["imagePullSecrets"] = json!(spec.image_pull_secrets);
        }
        let mut strategy =
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}});
        if component == "comet" {
            // Keep capacity while old comets drain; give them their drain.
            strategy["rollingUpdate"]["maxUnavailable"] = json!(0);
            pod_spec["terminationGracePeriodSeconds"] =
                json!(i64::from(spec.comet.drain_seconds) + DRAIN_MARGIN);
            if let Some(secret) = &spec.comet.tls_secret
                && let Some(volumes) = pod_spec["volumes"].as_array_mut()
            {
                volumes.push(json!({"name": "tls", "secret": {"secretName": secret}}));
            }
            if !spec.comet.node_selector.is_empty() {
                pod_spec["nodeSelector"] = json!(spec.comet.node_selector);
            }
            if !spec.comet.tolerations.is_empty() {
                pod_spec["tolerations"] = json!(spec.comet.tolerations);
            }
            if let Some(affinity) = &spec.comet.affinity {
                pod_spec["affinity"] = json!(affinity);
            }
            pod_spec["topologySpreadConstraints"] =
                if spec.comet.topology_spread_constraints.is_empty() {
                    json!([{
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": selector_labels(instance, "comet")}
                    }])
                } else {
                    json!(spec.comet.topology_spread_constraints)
                };
        } else {
            pod_spec["terminationGracePeriodSeconds"] = json!(30);
        }
        if component == "logic"
            && let Some(volumes) = pod_spec["volumes"].as_array_mut()
        {
            volumes.push(self.auth_volume());
        }
        build(
            "Deployment",
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": labels(instance, component),
                    "ownerReferences": [owner]
                },
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": selector_labels(instance, component)},
                    "strategy": strategy,
                    "template": {
                        "metadata": {
                            "labels": labels(instance, component),
                            "annotations": {CONFIG_HASH: self.config_hash}
                        },
                        "spec": pod_spec
                    }
                }
            }),
        )
    }
}
