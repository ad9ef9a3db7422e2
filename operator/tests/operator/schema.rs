//! The generated CRD: checked in unchanged, and its schema and CEL rules
//! accept the examples and refuse invalid specs.

use pushcluster_operator::crd::{AuthSpec, CometServiceSpec, NatsSpec, PushCluster};
use serde_json::{Value, json};

use crate::common::{read, yaml};

#[test]
fn checked_in_crd_is_the_generated_one() {
    let generated = pushcluster_operator::crd_yaml().expect("yaml");
    assert!(
        read("crds/pushcluster.yaml") == generated,
        "crds/pushcluster.yaml is stale: run `cargo run -- crd > crds/pushcluster.yaml`"
    );
}

fn schema() -> Value {
    let crd = serde_json::to_value(<PushCluster as kube::CustomResourceExt>::crd()).expect("crd");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn errors(object: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(&schema()).expect("a valid JSON schema");
    validator
        .iter_errors(object)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn examples_are_valid() {
    for example in [
        "examples/pushcluster-minimal.yaml",
        "examples/pushcluster.yaml",
    ] {
        let object = yaml(example);
        assert_eq!(errors(&object), Vec::<String>::new(), "{example}");
        // And they deserialize into the Rust types the operator uses.
        serde_json::from_value::<PushCluster>(object).expect(example);
    }
}

fn minimal() -> Value {
    yaml("examples/pushcluster-minimal.yaml")
}

fn with(path: &[&str], value: Value) -> Value {
    let mut object = minimal();
    let mut cursor = &mut object;
    for key in &path[..path.len() - 1] {
        if cursor.get(*key).is_none() {
            cursor[*key] = json!({});
        }
        cursor = &mut cursor[*key];
    }
    cursor[path[path.len() - 1]] = value;
    object
}

#[test]
fn invalid_specs_are_refused() {
    let mut missing_url = minimal();
    missing_url["spec"]["nats"] = json!({});
    for (case, object) in [
        (
            "negative comet replicas",
            with(&["spec", "comet", "replicas"], json!(-1)),
        ),
        (
            "negative job replicas",
            with(&["spec", "job", "replicas"], json!(-3)),
        ),
        (
            "too many partitions",
            with(&["spec", "nats", "partitions"], json!(5000)),
        ),
        (
            "zero partitions",
            with(&["spec", "nats", "partitions"], json!(0)),
        ),
        (
            "bad pull policy",
            with(&["spec", "image", "pullPolicy"], json!("Sometimes")),
        ),
        (
            "bad service type",
            with(&["spec", "comet", "service", "type"], json!("Ingress")),
        ),
        (
            "port out of range",
            with(&["spec", "comet", "service", "tcpPort"], json!(70000)),
        ),
        (
            "drain too long",
            with(&["spec", "comet", "drainSeconds"], json!(86400)),
        ),
        (
            "nats url not a nats url",
            with(&["spec", "nats", "url"], json!("http://nats:4222")),
        ),
        ("empty nats url", with(&["spec", "nats", "url"], json!(""))),
        ("missing nats url", missing_url),
        ("missing auth", {
            let mut object = minimal();
            object["spec"]
                .as_object_mut()
                .map(|spec| spec.remove("auth"));
            object
        }),
        (
            "config not an object",
            with(&["spec", "config"], json!("comet: {}")),
        ),
        ("auth without a mode", with(&["spec", "auth"], json!({}))),
        (
            "unknown auth mode",
            with(&["spec", "auth", "mode"], json!("open")),
        ),
        (
            "webhook over https",
            with(
                &["spec", "auth"],
                json!({"mode": "webhook", "webhookUrl": "https://auth"}),
            ),
        ),
    ] {
        assert!(!errors(&object).is_empty(), "{case} was accepted");
    }
}

#[test]
fn cel_rules_refuse_clashing_ports_and_changed_partitions() {
    let ports = |tcp: i32, ws: i32, wss: i32| json!({"type": "ClusterIP", "tcpPort": tcp, "wsPort": ws, "wssPort": wss});
    assert!(CometServiceSpec::validate_cel(&ports(3101, 3102, 3103), None).is_ok());
    assert!(CometServiceSpec::validate_cel(&ports(3101, 3101, 3103), None).is_err());
    assert!(CometServiceSpec::validate_cel(&ports(3101, 3102, 3102), None).is_err());

    let nats = |partitions: u32| json!({"url": "nats://n:4222", "stream": "S", "partitions": partitions, "buckets": {}});
    assert!(NatsSpec::validate_cel(&nats(16), Some(&nats(16))).is_ok());
    assert!(
        NatsSpec::validate_cel(&nats(32), Some(&nats(16))).is_err(),
        "partitions are immutable"
    );
    assert!(
        NatsSpec::validate_cel(&nats(32), None).is_ok(),
        "any value on create"
    );

    let secret = json!({"name": "s", "key": "k"});
    for (auth, ok) in [
        (json!({"mode": "none"}), true),
        (json!({"mode": "jwt"}), false),
        (json!({"mode": "jwt", "jwtSecret": secret}), true),
        (json!({"mode": "jwt", "jwtPublicKeys": []}), false),
        (json!({"mode": "jwt", "jwtPublicKeys": [secret]}), true),
        (json!({"mode": "webhook"}), false),
        (
            json!({"mode": "webhook", "webhookUrl": "http://auth/check"}),
            true,
        ),
    ] {
        assert_eq!(AuthSpec::validate_cel(&auth, None).is_ok(), ok, "{auth}");
    }
}

#[test]
fn scale_subresource_and_printer_columns() {
    let crd = serde_json::to_value(<PushCluster as kube::CustomResourceExt>::crd()).expect("crd");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(
        version["subresources"]["scale"],
        json!({
            "specReplicasPath": ".spec.comet.replicas",
            "statusReplicasPath": ".status.comet.replicas",
            "labelSelectorPath": ".status.comet.selector"
        })
    );
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(columns, ["Ready", "Comets", "Logic", "Job", "Age"]);
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["pushc"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
}

#[test]
fn every_field_is_documented() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        if let Some(properties) = schema["properties"].as_object() {
            for (name, property) in properties {
                let here = format!("{path}.{name}");
                if property["description"].as_str().is_none_or(str::is_empty)
                    && !here.starts_with(".status")
                    && !["apiVersion", "kind", "metadata"].contains(&name.as_str())
                {
                    missing.push(here.clone());
                }
                // Kubernetes' own types are documented upstream.
                if ![
                    "resources",
                    "affinity",
                    "tolerations",
                    "topologySpreadConstraints",
                    "imagePullSecrets",
                ]
                .contains(&name.as_str())
                {
                    walk(&here, property, missing);
                    walk(&here, &property["items"], missing);
                }
            }
        }
    }
    let mut missing = Vec::new();
    walk("", &schema(), &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

/// The API server validates every `default` against the schema it sits in
/// and refuses the whole CRD otherwise (`auth: {}` with a required `mode`
/// once broke every install). The Kubernetes suite applies the CRD to a real
/// API server too; this finds the same mistake in a unit test.
#[test]
fn every_default_satisfies_its_own_schema() {
    fn walk(path: &str, node: &Value, bad: &mut Vec<String>) {
        let Some(object) = node.as_object() else {
            return;
        };
        if let Some(default) = object.get("default") {
            let mut schema = node.clone();
            schema.as_object_mut().map(|s| s.remove("default"));
            match jsonschema::validator_for(&schema) {
                Ok(validator) => {
                    for error in validator.iter_errors(default) {
                        bad.push(format!("{path}: default {default}: {error}"));
                    }
                }
                Err(error) => bad.push(format!("{path}: {error}")),
            }
        }
        for (key, child) in object {
            match (key.as_str(), child) {
                ("properties", Value::Object(properties)) => {
                    for (name, property) in properties {
                        walk(&format!("{path}.{name}"), property, bad);
                    }
                }
                ("items" | "additionalProperties", child) => walk(&format!("{path}[]"), child, bad),
                _ => {}
            }
        }
    }
    let mut bad = Vec::new();
    walk("", &schema(), &mut bad);
    assert_eq!(bad, Vec::<String>::new());
}

#[test]
fn a_spec_without_auth_still_decodes_for_the_invalid_config_condition() {
    // Objects stored before `auth` existed: the schema now requires it, but
    // the operator must still read them (and report InvalidConfig).
    let mut object = minimal();
    object["spec"]
        .as_object_mut()
        .map(|spec| spec.remove("auth"));
    let pc: PushCluster = serde_json::from_value(object).expect("decodes");
    assert!(pc.spec.auth.is_unset());
}
