//! The product's whole life on a real Kubernetes (v1.32 API server,
//! controller-manager, scheduler and a node running real containers):
//! `tests/kubernetes/run.sh` starts `../shared/k8s`, builds the images
//! offline with the repository's Dockerfile, loads them, and runs this suite
//! with `PUSHCLUSTER_E2E_KUBECONFIG`, `PUSHCLUSTER_E2E_IMAGE` and
//! `PUSHCLUSTER_E2E_NATS_IMAGE`. Without them the tests are ignored, with
//! that reason in the summary.
//!
//! Every step asserts what a user would see: the CRD and chart install, the
//! operator runs in-cluster with the chart's RBAC, a PushCluster becomes a
//! fleet of ready pods that goim clients use through its Services, and the
//! fleet scales, rolls, survives its operator and goes away cleanly.

#[allow(dead_code)]
#[path = "../e2e/common.rs"]
mod common;
mod fleet;
mod kube_util;

use std::collections::BTreeSet;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::kube_util::{Env, LONG, MANAGER, client, eventually};

/// Every short name the API server serves, by resource (`group/resource`).
async fn short_names(client: &Client) -> Vec<(String, String)> {
    let mut names = Vec::new();
    let core = client
        .list_core_api_resources("v1")
        .await
        .expect("core resources");
    let mut lists = vec![("".to_string(), core)];
    for group in client.list_api_groups().await.expect("groups").groups {
        for version in &group.versions {
            if let Ok(list) = client
                .list_api_group_resources(&version.group_version)
                .await
            {
                lists.push((group.name.clone(), list));
            }
        }
    }
    for (group, list) in lists {
        for resource in list.resources {
            for short in resource.short_names.iter().flatten() {
                names.push((format!("{group}/{}", resource.name), short.clone()));
            }
        }
    }
    names
}

/// Held while a test changes the CRD: the older-CRD step of the fleet's
/// life must not see the current CRD applied under it by the other test.
pub static CRD_CHANGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn apply_crd(client: &Client, crd: &CustomResourceDefinition) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(crd),
    )
    .await
    .expect("the API server accepts the CRD");
    eventually("the CRD to be established", LONG, || async {
        let crd = crds.get(&crd.name_any()).await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
}

/// The CRD from `crds/` and the chart's copy install on a real API server,
/// and its short names collide with no resource the server knows.
#[tokio::test]
#[ignore = "needs a real cluster: tests/kubernetes/run.sh (starts ../shared/k8s)"]
async fn the_crd_installs_and_its_short_names_are_its_own() {
    let env = Env::from_env();
    let client = client(&env.kubeconfig).await;
    let _changing = CRD_CHANGES.lock().await;
    for path in [
        "crds/pushcluster.yaml",
        "charts/pushcluster/crds/pushcluster.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
            .expect("CRD file");
        let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&text).expect("CRD YAML");
        apply_crd(&client, &crd).await;
    }
    let ours = BTreeSet::from_iter(
        <pushcluster_operator::crd::PushCluster as kube::CustomResourceExt>::crd()
            .spec
            .names
            .short_names
            .unwrap_or_default(),
    );
    assert!(!ours.is_empty(), "the CRD has a short name");
    let served = short_names(&client).await;
    for (resource, short) in &served {
        if ours.contains(short) {
            assert_eq!(
                resource, "pushcluster.io/pushclusters",
                "short name {short} is also {resource}'s: `kubectl get {short}` would be ambiguous"
            );
        }
    }
    for short in &ours {
        assert!(
            served
                .iter()
                .any(|(r, s)| s == short && r == "pushcluster.io/pushclusters"),
            "discovery serves the short name {short}"
        );
    }
}

/// The chart, the in-cluster operator and a fleet on real pods, from
/// install to deletion.
#[tokio::test]
#[ignore = "needs a real cluster: tests/kubernetes/run.sh (starts ../shared/k8s)"]
async fn a_fleet_lives_its_whole_life_on_real_pods() {
    fleet::whole_life(Env::from_env()).await;
}
