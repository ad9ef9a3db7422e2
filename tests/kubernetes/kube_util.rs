//! What the Kubernetes suite needs around kube-rs: a client from the
//! kubeconfig, bounded waits, server-side apply of YAML as `kubectl apply
//! --server-side` does it, the chart rendered by the Helm SDK, and pods.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::Scope;
use kube::{Client, Config, ResourceExt};
use serde_json::Value;

/// Field manager of everything the suite applies.
pub const MANAGER: &str = "pushcluster-e2e";
/// Bound for anything that involves starting pods.
pub const LONG: Duration = Duration::from_secs(180);

/// What `tests/kubernetes/run.sh` hands the suite.
pub struct Env {
    pub kubeconfig: String,
    pub image: String,
    pub nats_image: String,
}

impl Env {
    pub fn from_env() -> Env {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: run the Kubernetes suite with tests/kubernetes/run.sh \
                     (it starts ../shared/k8s, builds and loads the images and sets \
                     PUSHCLUSTER_E2E_KUBECONFIG, PUSHCLUSTER_E2E_IMAGE, PUSHCLUSTER_E2E_NATS_IMAGE)"
                )
            })
        };
        Env {
            kubeconfig: var("PUSHCLUSTER_E2E_KUBECONFIG"),
            image: var("PUSHCLUSTER_E2E_IMAGE"),
            nats_image: var("PUSHCLUSTER_E2E_NATS_IMAGE"),
        }
    }

    /// The image as `(repository, tag)`.
    pub fn image_parts(&self) -> (String, String) {
        let (repository, tag) = self
            .image
            .rsplit_once(':')
            .expect("PUSHCLUSTER_E2E_IMAGE is repository:tag");
        (repository.to_string(), tag.to_string())
    }
}

pub async fn client(path: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("read PUSHCLUSTER_E2E_KUBECONFIG");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

/// Polls `check` every 500 ms until it returns Some; fails after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, check: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Server-side applies every document of `yaml` (as `kubectl apply
/// --server-side --force-conflicts`); namespaced objects without a namespace
/// go to `namespace`. Kinds are resolved through the API server's discovery.
pub async fn apply_yaml(client: &Client, yaml: &str, namespace: &str) {
    // Parsed first: the YAML parser may not be held across an await.
    let mut documents: Vec<Value> = serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|document| serde::Deserialize::deserialize(document).expect("YAML document"))
        .filter(|value: &Value| !value.is_null())
        .collect();
    // Helm's install order: what pods need (accounts, RBAC, config) first.
    documents.sort_by_key(|d| install_rank(d["kind"].as_str().unwrap_or_default()));
    for value in documents {
        apply_value(client, value, namespace).await;
    }
}

fn install_rank(kind: &str) -> usize {
    const ORDER: [&str; 12] = [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "PodDisruptionBudget",
        "Deployment",
    ];
    ORDER.iter().position(|k| *k == kind).unwrap_or(ORDER.len())
}

pub async fn apply_value(client: &Client, value: Value, namespace: &str) {
    let object: DynamicObject = serde_json::from_value(value).expect("a Kubernetes object");
    let types = object.types.clone().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(&types).expect("apiVersion");
    let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("the API server does not serve {gvk:?}: {e}"));
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            object.metadata.namespace.as_deref().unwrap_or(namespace),
            &resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let name = object.name_any();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {} {name}: {e}", types.kind));
}

/// The chart's templates as the Helm v4 SDK renders them
/// (`tests/chart/helm.py`), YAML only (NOTES.txt left out).
pub fn render_chart(release: &str, namespace: &str, values: &Value) -> Vec<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .arg(format!("{root}/tests/chart/helm.py"))
        .args(["render", &format!("{root}/charts/pushcluster")])
        .args(["--values", &values.to_string()])
        .args(["--name", release, "--namespace", namespace])
        .output()
        .expect("run python3 tests/chart/helm.py (pip install helm-python-sdk)");
    assert!(
        output.status.success(),
        "helm render failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered: Value = serde_json::from_slice(&output.stdout).expect("helm.py JSON");
    let templates = rendered["templates"].as_object().expect("templates");
    templates
        .iter()
        .filter(|(path, _)| path.ends_with(".yaml"))
        .filter_map(|(_, text)| text.as_str().map(str::to_string))
        .collect()
}

/// Pods matching `selector` that are Ready and not being deleted.
pub async fn ready_pods(client: &Client, namespace: &str, selector: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = pods.list(&ListParams::default().labels(selector)).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && is_ready(pod))
        .collect()
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_ip(pod: &Pod) -> IpAddr {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .expect("a running pod has an IP")
        .parse()
        .expect("pod IP")
}

/// A Service's ClusterIP and the port named `port` (the cluster has no DNS;
/// the host routes to Service addresses).
pub async fn service_addr(client: &Client, namespace: &str, name: &str, port: &str) -> SocketAddr {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let service = services.get(name).await.expect("Service");
    let spec = service.spec.expect("spec");
    let ip: IpAddr = spec
        .cluster_ip
        .as_deref()
        .expect("ClusterIP")
        .parse()
        .expect("ClusterIP address");
    let port = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(port))
        .unwrap_or_else(|| panic!("Service {name} has no port {port}"))
        .port;
    SocketAddr::new(ip, u16::try_from(port).expect("port"))
}

pub async fn secret_value(client: &Client, namespace: &str, name: &str, key: &str) -> String {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets.get(name).await.expect("Secret");
    let data = secret.data.expect("Secret data");
    String::from_utf8(data.get(key).expect("Secret key").0.clone()).expect("UTF-8 Secret value")
}

/// A GET on the API server with another Accept header (server-side
/// printing: `application/json;as=Table;v=v1;g=meta.k8s.io`).
pub async fn get_as(client: &Client, path: &str, accept: &str) -> Value {
    let request = http::Request::get(path)
        .header(http::header::ACCEPT, accept)
        .body(Vec::new())
        .expect("request");
    client.request(request).await.expect("GET")
}
