//! Rendering: every object of a fleet, compared with golden YAML files
//! reviewed by eye. `UPDATE_GOLDEN=1 cargo test -p pushcluster-operator`
//! rewrites them after an intended change.

use pushcluster_api::config::Config;
use pushcluster_operator::crd::PushCluster;
use pushcluster_operator::render::{CONFIG_HASH, Fleet, render};

use crate::common::{read, repo, stored};

fn documents(fleet: &Fleet) -> String {
    let mut values = vec![
        serde_json::to_value(&fleet.service_account),
        serde_json::to_value(&fleet.role),
        serde_json::to_value(&fleet.role_binding),
        serde_json::to_value(&fleet.config_map),
        serde_json::to_value(&fleet.comet_headless),
        serde_json::to_value(&fleet.comet_client),
        serde_json::to_value(&fleet.logic_service),
        serde_json::to_value(&fleet.metrics_service),
        serde_json::to_value(&fleet.comet_pdb),
        serde_json::to_value(&fleet.logic_pdb),
        serde_json::to_value(&fleet.comet),
        serde_json::to_value(&fleet.logic),
        serde_json::to_value(&fleet.job),
    ];
    if let Some(monitor) = &fleet.service_monitor {
        values.push(serde_json::to_value(monitor));
    }
    values
        .into_iter()
        .map(|v| serde_yaml_ng::to_string(&v.expect("json")).expect("yaml"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn check_golden(example: &str, golden: &str) {
    let fleet = render(&stored(example)).expect("renders");
    let rendered = documents(&fleet);
    let path = repo(golden);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).expect("write golden");
    }
    assert!(
        read(golden) == rendered,
        "{golden} differs from the rendering of {example}; review and run with UPDATE_GOLDEN=1"
    );
}

#[test]
fn minimal_fleet_matches_golden() {
    check_golden(
        "examples/pushcluster-minimal.yaml",
        "operator/tests/golden/minimal.yaml",
    );
}

#[test]
fn full_fleet_matches_golden() {
    check_golden(
        "examples/pushcluster.yaml",
        "operator/tests/golden/full.yaml",
    );
}

#[test]
fn rendered_config_is_what_the_binary_reads() {
    let pc = stored("examples/pushcluster.yaml");
    let fleet = render(&pc).expect("renders");
    let config = Config::from_yaml(&fleet.config_yaml).expect("the binary accepts it");
    // Overrides from spec.config, and what the operator manages.
    assert_eq!(config.comet.protocol.handshake_timeout.as_secs(), 8);
    assert_eq!(config.logic.node.heartbeat.as_secs(), 30);
    assert_eq!(config.nats.partitions, 32);
    assert_eq!(
        config.nats.credentials_file.as_deref(),
        Some("/etc/pushcluster/nats/user.creds")
    );
    assert_eq!(config.discovery.comet_service, "push-comet-headless");
    assert_eq!(config.discovery.logic_service, "push-logic");
    assert_eq!(config.discovery.namespace.as_deref(), Some("push"));
    assert_eq!(config.comet.drain.as_secs(), 60);
    assert!(config.comet.websocket.tls.is_some());
}

#[test]
fn a_config_change_rolls_the_pods_and_nothing_else_does() {
    let pc = stored("examples/pushcluster-minimal.yaml");
    let hash = |pc: &PushCluster| {
        let fleet = render(pc).expect("renders");
        let template = fleet
            .comet
            .spec
            .expect("spec")
            .template
            .metadata
            .expect("metadata");
        template.annotations.expect("annotations")[CONFIG_HASH].clone()
    };
    let before = hash(&pc);
    let mut scaled = pc.clone();
    scaled.spec.comet.replicas = 7;
    assert_eq!(hash(&scaled), before, "scaling does not roll pods");
    let mut changed = pc.clone();
    changed.spec.config = Some(serde_json::json!({"logic": {"node": {"heartbeat": "1m"}}}));
    assert_ne!(hash(&changed), before, "a config change rolls pods");
}

#[test]
fn invalid_overrides_are_refused_with_the_key() {
    let mut pc = stored("examples/pushcluster-minimal.yaml");
    pc.spec.config = Some(serde_json::json!({"comet": {"protocol": {"send_queue": 0}}}));
    let error = render(&pc).expect_err("invalid").to_string();
    assert!(error.contains("comet.protocol.send_queue"), "{error}");
    pc.spec.config = Some(serde_json::json!({"comet": {"no_such_key": 1}}));
    let error = render(&pc).expect_err("unknown key").to_string();
    assert!(error.contains("no_such_key"), "{error}");
}

#[test]
fn every_child_is_owned_by_the_pushcluster() {
    let fleet = render(&stored("examples/pushcluster.yaml")).expect("renders");
    let owners = [
        fleet.service_account.metadata.owner_references.clone(),
        fleet.config_map.metadata.owner_references.clone(),
        fleet.comet.metadata.owner_references.clone(),
        fleet.logic.metadata.owner_references.clone(),
        fleet.job.metadata.owner_references.clone(),
        fleet.comet_pdb.metadata.owner_references.clone(),
        fleet
            .service_monitor
            .as_ref()
            .and_then(|m| m.metadata.owner_references.clone()),
    ];
    for references in owners {
        let references = references.expect("owner references");
        assert_eq!(references.len(), 1);
        assert_eq!(references[0].kind, "PushCluster");
        assert_eq!(references[0].controller, Some(true));
        assert_eq!(references[0].uid, "0b5e6c7a-1111-4222-8333-944455556666");
    }
}

#[test]
fn a_pushcluster_stored_before_auth_existed_is_an_invalid_config() {
    // What the API server hands over for an old object: no `auth` (decoded
    // as the empty default), so no mode.
    let mut pc = stored("examples/pushcluster-minimal.yaml");
    pc.spec.auth = Default::default();
    let error = pushcluster_operator::render::render(&pc).expect_err("no auth mode");
    assert!(error.to_string().contains("spec.auth.mode"), "{error}");
}
