//! `pushcluster operator` as a real process against an API server over
//! HTTP (the in-memory fake of `fake_kube.rs`): it takes its Lease, applies
//! a fleet for a PushCluster, reports status, and asks for nothing its RBAC
//! (the Helm chart's, `pushcluster_operator::rbac`) does not grant.

use std::time::Duration;

use pushcluster_operator::rbac::{self, FLEET_RULES, LEADER_RULES};
use serde_json::{Value, json};

use crate::common::*;
use crate::fake_kube::FakeKube;

pub const PUSHCLUSTER_PATH: &str =
    "/apis/pushcluster.io/v1alpha1/namespaces/push/pushclusters/push";
const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/pushcluster-operator";

/// An API server holding one PushCluster (`push/push`, the minimal example).
pub async fn api_with_a_pushcluster() -> FakeKube {
    let kube = FakeKube::start().await;
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/pushcluster-minimal.yaml"
    ))
    .expect("example");
    let mut pushcluster: Value = serde_yaml_ng::from_str(&example).expect("YAML");
    pushcluster["metadata"]["namespace"] = json!("push");
    kube.insert(PUSHCLUSTER_PATH, pushcluster);
    kube
}

/// Starts `pushcluster operator` against `kube`, leading through the Lease
/// `ops/pushcluster-operator`.
pub fn start_operator(kube: &FakeKube) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig()).expect("write kubeconfig");
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    Server::spawn_args(
        &[
            "operator",
            "--admin-bind",
            "127.0.0.1:0",
            "--lease-namespace",
            "ops",
            "--lease-seconds",
            "5",
        ],
        &[("KUBECONFIG", &kubeconfig), ("POD_NAME", "operator-0")],
        dir,
        "pushcluster operator started",
    )
}

fn condition<'a>(pushcluster: &'a Value, type_: &str) -> Option<&'a Value> {
    pushcluster["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

// Multi-threaded: the fake API server must answer while the test thread
// blocks waiting for the process to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_process_runs_a_fleet_through_the_kubernetes_api() {
    let kube = api_with_a_pushcluster().await;
    let mut operator = start_operator(&kube);

    // It leads, then applies the fleet and reports on it.
    operator
        .wait_metric("pushcluster_operator_leader", &[], 1.0)
        .await;
    let lease = kube
        .get(LEASE_PATH)
        .expect("the operator created its Lease");
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .is_some_and(|h| h.starts_with("operator-0-")),
        "{lease}"
    );
    operator
        .wait_metric(
            "pushcluster_operator_reconciliations_total",
            &[("result", "applied")],
            1.0,
        )
        .await;
    let pushcluster = kube.get(PUSHCLUSTER_PATH).expect("PushCluster");
    let progressing = condition(&pushcluster, "Progressing").expect("a Progressing condition");
    // The fake runs no pods: the fleet is applied and waits for them.
    assert_eq!(progressing["status"], "True", "{pushcluster}");
    for child in [
        "/apis/apps/v1/namespaces/push/deployments/push-comet",
        "/apis/apps/v1/namespaces/push/deployments/push-logic",
        "/apis/apps/v1/namespaces/push/deployments/push-job",
        "/api/v1/namespaces/push/services/push-comet",
        "/api/v1/namespaces/push/services/push-logic",
        "/api/v1/namespaces/push/services/push-metrics",
        "/api/v1/namespaces/push/configmaps/push-config",
    ] {
        let object = kube
            .get(child)
            .unwrap_or_else(|| panic!("{child} not applied"));
        assert_eq!(
            object["metadata"]["ownerReferences"][0]["kind"], "PushCluster",
            "{child}"
        );
    }
    assert_eq!(
        operator
            .metric("pushcluster_ready", &[("role", "operator")])
            .await,
        1.0
    );
    // The spec names no API token Secret: one was generated, owned by the
    // PushCluster, and logic reads it.
    let secret = kube
        .get("/api/v1/namespaces/push/secrets/push-api-token")
        .expect("the API token Secret");
    let token = secret["stringData"]["token"].as_str().unwrap_or_default();
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{secret}"
    );
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["kind"],
        "PushCluster"
    );
    let logic = kube
        .get("/apis/apps/v1/namespaces/push/deployments/push-logic")
        .expect("logic");
    assert!(
        logic["spec"]["template"]["spec"]["volumes"]
            .to_string()
            .contains("push-api-token"),
        "{logic}"
    );

    // Every request it made is one the chart's RBAC grants.
    let mut granted = rbac::permissions(FLEET_RULES);
    granted.extend(rbac::permissions(LEADER_RULES));
    let requests = kube.requests();
    for request in &requests {
        let needed = rbac::required(&request.method, &request.path, &request.query)
            .unwrap_or_else(|| panic!("not a resource request: {request:?}"));
        assert!(
            granted.contains(&needed),
            "{needed:?} is not granted: {request:?}"
        );
    }
    // It watches what it owns.
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/apis/apps/v1/deployments" && r.query.contains("watch"))
    );

    // SIGTERM: it stops reconciling and exits cleanly.
    operator.sigterm();
    let status = operator.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
}
