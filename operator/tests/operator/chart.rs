//! The Helm chart (charts/pushcluster), rendered and linted by a real Helm
//! (the Helm v4 SDK through PyPI's helm-python-sdk, driven by
//! tests/chart/helm.py) and its output validated by kubernetes-validate
//! --strict. `.ci/run` installs both.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};

use pushcluster_operator::crd::PushCluster;
use pushcluster_operator::rbac::{self, FLEET_RULES, LEADER_RULES, Permission};
use pushcluster_operator::render::render;
use serde_json::{Value, json};

use crate::common::{read, repo};

const CHART: &str = "charts/pushcluster";
const NAMESPACE: &str = "pushcluster-system";

fn helm(args: &[&str], values: &Value) -> Output {
    let output = Command::new("python3")
        .arg(repo("tests/chart/helm.py"))
        .args(args)
        .arg(repo(CHART))
        .args(["--values", &values.to_string(), "--namespace", NAMESPACE])
        .args(["--name", "pc"])
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("helm_python is missing"),
        "{stderr} (.ci/run installs it)"
    );
    output
}

/// Every template's text (NOTES.txt included), by path.
fn render_chart(values: &Value) -> BTreeMap<String, String> {
    let output = helm(&["render"], values);
    assert!(
        output.status.success(),
        "helm render failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered: Value = serde_json::from_slice(&output.stdout).expect("JSON from helm.py");
    serde_json::from_value(rendered["templates"].clone()).expect("templates")
}

/// The Kubernetes objects a chart render produces.
fn render_objects(values: &Value) -> Vec<Value> {
    let mut objects = Vec::new();
    for (path, text) in render_chart(values) {
        if !path.ends_with(".yaml") {
            continue;
        }
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let object: Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{path} is not YAML: {e}\n{text}"));
            if !object.is_null() {
                objects.push(object);
            }
        }
    }
    objects
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {}", summary(objects)))
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn summary(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
        .collect::<Vec<_>>()
        .join(", ")
}

fn everything_on() -> Value {
    json!({
        "metrics": {
            "serviceMonitor": {
                "enabled": true,
                "interval": "15s",
                "additionalLabels": {"release": "kube-prometheus-stack"}
            },
            "prometheusRule": {
                "enabled": true,
                "additionalLabels": {"release": "kube-prometheus-stack"}
            }
        },
        "grafana": {"dashboards": {"enabled": true, "namespace": "monitoring"}},
        "example": {"enabled": true}
    })
}

fn yaml_file(path: &str) -> Value {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Everything `rules` (RBAC rule objects) grant, as (group, resource, verb).
fn granted(rules: &Value) -> BTreeSet<Permission> {
    let mut permissions = BTreeSet::new();
    for rule in rules.as_array().expect("rules") {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().expect("a string").to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                for verb in strings("verbs") {
                    permissions.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    permissions
}

#[test]
fn chart_crd_is_the_generated_one() {
    assert!(
        read("charts/pushcluster/crds/pushcluster.yaml") == read("crds/pushcluster.yaml"),
        "charts/pushcluster/crds/pushcluster.yaml differs: cp crds/pushcluster.yaml charts/pushcluster/crds/"
    );
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart = yaml_file("charts/pushcluster/Chart.yaml");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["apiVersion"], "v2");
}

#[test]
fn chart_lints_clean_with_default_and_all_values() {
    for values in [
        json!({}),
        everything_on(),
        json!({"operator": {"watchNamespace": "push"}}),
    ] {
        let output = helm(&["lint"], &values);
        let result: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("lint: {}", String::from_utf8_lossy(&output.stderr)));
        assert!(output.status.success(), "lint with {values}: {result:#}");
        assert_eq!(result["errors"], json!([]));
        // Only informational remarks (severity 1, like "icon is recommended").
        for message in result["messages"].as_array().expect("messages") {
            assert!(message["severity"].as_i64() <= Some(1), "{message}");
        }
    }
}

#[test]
fn defaults_install_just_the_operator_hardened() {
    let objects = render_objects(&json!({}));
    assert_eq!(
        kinds(&objects),
        BTreeSet::from(
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "Deployment",
                "PodDisruptionBudget",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount"
            ]
            .map(String::from)
        ),
        "{}",
        summary(&objects)
    );
    for object in &objects {
        if object["kind"] != "ClusterRole" && object["kind"] != "ClusterRoleBinding" {
            assert_eq!(object["metadata"]["namespace"], NAMESPACE, "{object}");
        }
    }
    let deployment = find(&objects, "Deployment", "pc-pushcluster");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "pc-pushcluster");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"],
        format!(
            "ghcr.io/pushcluster/pushcluster:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args[0], "operator");
    assert!(
        args.contains(&"--lease-name=pc-pushcluster-leader"),
        "{args:?}"
    );
    assert!(!args.iter().any(|a| a.starts_with("--namespace")));

    // Probes and the metrics Service use the port the container declares.
    assert_eq!(container["ports"][0]["name"], "metrics");
    let service = find(&objects, "Service", "pc-pushcluster-metrics");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    let selects_pods = service["spec"]["selector"]
        .as_object()
        .expect("selector")
        .iter()
        .all(|(k, v)| deployment["spec"]["template"]["metadata"]["labels"][k] == *v);
    assert!(
        selects_pods,
        "the metrics Service selects the operator pods"
    );
    // The operator pods are never mistaken for a fleet's (whose metrics
    // Service selects app.kubernetes.io/name=pushcluster).
    assert_ne!(
        deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
        "pushcluster"
    );
    let pdb = find(&objects, "PodDisruptionBudget", "pc-pushcluster");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
}

#[test]
fn rbac_grants_exactly_what_the_operator_uses() {
    let fleet = rbac::permissions(FLEET_RULES);
    let leader = rbac::permissions(LEADER_RULES);

    // Cluster-wide by default; the Lease only in the operator's namespace,
    // get/update only on its own Lease.
    let objects = render_objects(&json!({}));
    let cluster_role = find(&objects, "ClusterRole", "pc-pushcluster");
    assert_eq!(granted(&cluster_role["rules"]), fleet);
    let binding = find(&objects, "ClusterRoleBinding", "pc-pushcluster");
    assert_eq!(binding["roleRef"]["name"], "pc-pushcluster");
    assert_eq!(binding["subjects"][0]["name"], "pc-pushcluster");
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
    let lease_role = find(&objects, "Role", "pc-pushcluster-leader-election");
    assert_eq!(lease_role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(granted(&lease_role["rules"]), leader);
    for rule in lease_role["rules"].as_array().expect("rules") {
        let verbs = &rule["verbs"];
        if verbs
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v == "get"))
        {
            assert_eq!(rule["resourceNames"], json!(["pc-pushcluster-leader"]));
        }
    }
    find(&objects, "RoleBinding", "pc-pushcluster-leader-election");

    // One watched namespace: nothing cluster-wide.
    let objects = render_objects(&json!({"operator": {"watchNamespace": "push"}}));
    assert!(!kinds(&objects).contains("ClusterRole"));
    assert!(!kinds(&objects).contains("ClusterRoleBinding"));
    let role = find(&objects, "Role", "pc-pushcluster");
    assert_eq!(role["metadata"]["namespace"], "push");
    assert_eq!(granted(&role["rules"]), fleet);
    let binding = find(&objects, "RoleBinding", "pc-pushcluster");
    assert_eq!(binding["metadata"]["namespace"], "push");
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
    let deployment = find(&objects, "Deployment", "pc-pushcluster");
    assert!(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .contains(&json!("--namespace=push"))
    );

    // No leader election: no Lease rights, and the flag that turns it off.
    let objects = render_objects(&json!({"operator": {"leaderElection": {"enabled": false}}}));
    assert!(
        objects
            .iter()
            .all(|o| o["metadata"]["name"] != "pc-pushcluster-leader-election")
    );
    let deployment = find(&objects, "Deployment", "pc-pushcluster");
    assert!(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .contains(&json!("--no-leader-election"))
    );

    // The plain manifests grant the same.
    let manifests: Vec<Value> = read("deploy/operator.yaml")
        .split("\n---\n")
        .filter_map(|doc| serde_yaml_ng::from_str::<Value>(doc).ok())
        .collect();
    let cluster_role = manifests
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    assert_eq!(granted(&cluster_role["rules"]), fleet);
    let lease_role = manifests
        .iter()
        .find(|d| d["kind"] == "Role")
        .expect("a Role");
    assert_eq!(granted(&lease_role["rules"]), leader);

    // What the fleet's Role grants, the operator holds (else Kubernetes
    // refuses to create it).
    let example = crate::common::stored("examples/pushcluster.yaml");
    let fleet_role = render(&example).expect("renders").role;
    let fleet_role = serde_json::to_value(fleet_role).expect("json");
    for permission in granted(&fleet_role["rules"]) {
        assert!(fleet.contains(&permission), "cannot grant {permission:?}");
    }
}

#[test]
fn monitoring_objects_match_what_they_watch() {
    let objects = render_objects(&everything_on());

    // The operator's ServiceMonitor selects its metrics Service, by port name.
    let monitor = find(&objects, "ServiceMonitor", "pc-pushcluster-operator");
    let service = find(&objects, "Service", "pc-pushcluster-metrics");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&service["metadata"]["labels"][key], value, "{key}");
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );

    // The fleets' ServiceMonitor selects the metrics Service the operator
    // renders for every PushCluster, in any namespace.
    let fleets = find(&objects, "ServiceMonitor", "pc-pushcluster-fleets");
    assert_eq!(fleets["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(
        fleets["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let fleet = render(&crate::common::stored("examples/pushcluster.yaml")).expect("renders");
    let metrics_service = serde_json::to_value(&fleet.metrics_service).expect("json");
    for (key, value) in fleets["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&metrics_service["metadata"]["labels"][key], value, "{key}");
    }
    assert_eq!(
        fleets["spec"]["endpoints"][0]["port"],
        metrics_service["spec"]["ports"][0]["name"]
    );
    // Other fleet Services (comet, logic) are not scraped twice.
    for other in [
        &fleet.comet_client,
        &fleet.logic_service,
        &fleet.comet_headless,
    ] {
        let labels = serde_json::to_value(&other.metadata.labels).expect("json");
        assert_ne!(labels["pushcluster.io/metrics"], "true");
    }

    // One watched namespace: only there.
    let scoped = render_objects(&json!({
        "operator": {"watchNamespace": "push"},
        "metrics": {"serviceMonitor": {"enabled": true}}
    }));
    let fleets = find(&scoped, "ServiceMonitor", "pc-pushcluster-fleets");
    assert_eq!(
        fleets["spec"]["namespaceSelector"]["matchNames"],
        json!(["push"])
    );

    // The PrometheusRule holds files/alerts.yaml unchanged.
    let rule = find(&objects, "PrometheusRule", "pc-pushcluster");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    assert_eq!(
        rule["spec"]["groups"],
        yaml_file("charts/pushcluster/files/alerts.yaml")["groups"]
    );

    // The dashboard ConfigMap, where and how Grafana's sidecar finds it.
    let dashboards = find(&objects, "ConfigMap", "pc-pushcluster-dashboards");
    assert_eq!(dashboards["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboards["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(
        dashboards["data"]["pushcluster.json"]
            .as_str()
            .expect("pushcluster.json"),
    )
    .expect("dashboard JSON");
    let file: Value = serde_json::from_str(&read("charts/pushcluster/dashboards/pushcluster.json"))
        .expect("dashboard JSON");
    assert_eq!(shipped, file);

    // Another sidecar label.
    let objects = render_objects(&json!({"grafana": {"dashboards": {
        "enabled": true, "label": "dashboards", "labelValue": "pushcluster"
    }}}));
    let dashboards = find(&objects, "ConfigMap", "pc-pushcluster-dashboards");
    assert_eq!(
        dashboards["metadata"]["labels"]["dashboards"],
        "pushcluster"
    );
    assert_eq!(dashboards["metadata"]["namespace"], NAMESPACE);
}

#[test]
fn example_pushcluster_is_valid_for_the_crd() {
    let objects = render_objects(&everything_on());
    let example = find(&objects, "PushCluster", "push");
    assert_eq!(example["metadata"]["namespace"], NAMESPACE);
    let crd = serde_json::to_value(<PushCluster as kube::CustomResourceExt>::crd()).expect("crd");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let validator = jsonschema::validator_for(schema).expect("a valid JSON schema");
    let errors: Vec<String> = validator
        .iter_errors(example)
        .map(|e| e.to_string())
        .collect();
    assert_eq!(errors, Vec::<String>::new());
    // And the operator can run it.
    let mut stored = example.clone();
    stored["metadata"]["uid"] = json!("0b5e6c7a-1111-4222-8333-944455556666");
    let pc: PushCluster = serde_json::from_value(stored).expect("a PushCluster");
    render(&pc).expect("the operator renders the example");
}

#[test]
fn rendered_manifests_pass_kubernetes_validate_strict() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, values) in [
        json!({}),
        everything_on(),
        json!({"operator": {"watchNamespace": "push", "leaderElection": {"enabled": false}}}),
    ]
    .iter()
    .enumerate()
    {
        let documents: Vec<String> = render_objects(values)
            .iter()
            .map(|o| serde_yaml_ng::to_string(o).expect("yaml"))
            .collect();
        let path = dir.path().join(format!("render-{i}.yaml"));
        std::fs::write(&path, documents.join("---\n")).expect("write");
        // The oldest Kubernetes the chart supports (kubeVersion) and the
        // newest the validator knows.
        for version in [None, Some("1.29.0")] {
            let mut command = Command::new("kubernetes-validate");
            command.arg("--strict").arg("--no-warn");
            if let Some(version) = version {
                command.args(["-k", version]);
            }
            let output = command.arg(&path).output().unwrap_or_else(|e| {
                panic!("kubernetes-validate: {e} (pip install kubernetes-validate; .ci/run does)")
            });
            assert!(
                output.status.success(),
                "kubernetes-validate {version:?} with {values}:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

#[test]
fn invalid_values_are_refused_with_helms_message() {
    for (values, needle) in [
        (
            json!({"operator": {"replicas": "two"}}),
            "/operator/replicas",
        ),
        // A typo is an error, not a silently ignored key.
        (
            json!({"metrics": {"serviceMonitor": {"enable": true}}}),
            "enable",
        ),
        (
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
        ),
        (
            json!({"operator": {"watchNamespace": "Not_A_Namespace"}}),
            "/operator/watchNamespace",
        ),
        // Helm merges over the defaults; null removes the default NATS URL.
        (
            json!({"example": {"enabled": true, "spec": {"nats": null}}}),
            "nats",
        ),
    ] {
        let output = helm(&["render"], &values);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{values}: {stderr}");
        assert!(stderr.contains(needle), "{values}: {stderr}");
    }
}

#[test]
fn notes_give_the_next_steps() {
    let notes = |values: &Value| {
        render_chart(values)
            .into_iter()
            .find(|(path, _)| path.ends_with("NOTES.txt"))
            .map(|(_, text)| text)
            .expect("NOTES.txt")
    };
    let text = notes(&json!({}));
    assert!(
        text.contains("kubectl -n pushcluster-system rollout status deployment/pc-pushcluster")
    );
    assert!(text.contains("kind: PushCluster"));
    assert!(text.contains("curl -d"));
    assert!(text.contains("metrics.serviceMonitor.enabled=true"));
    let text = notes(&everything_on());
    assert!(text.contains("get pushcluster push -w"));
    assert!(text.contains("PrometheusRule pc-pushcluster"));
    assert!(text.contains("label grafana_dashboard=1"));
}

/// Every metric a panel or alert reads exists (docs/metrics.md lists them
/// all, and tests/e2e checks that list against /metrics).
#[test]
fn dashboard_and_alerts_use_documented_metrics() {
    let documented = read("docs/metrics.md");
    let dashboard: Value =
        serde_json::from_str(&read("charts/pushcluster/dashboards/pushcluster.json"))
            .expect("dashboard JSON");
    let mut expressions = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_i64().expect("id")),
            "duplicate id"
        );
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("title");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}");
        for target in targets {
            expressions.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    let alerts = yaml_file("charts/pushcluster/files/alerts.yaml");
    for group in alerts["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            expressions.push(rule["expr"].as_str().expect("expr").to_string());
            let runbook = rule["annotations"]["runbook_url"]
                .as_str()
                .expect("runbook_url");
            let anchor = runbook.rsplit('#').next().expect("anchor");
            let alert = rule["alert"].as_str().expect("alert");
            assert_eq!(anchor, alert.to_lowercase());
            assert!(
                read("docs/observability.md").contains(&format!("### {alert}")),
                "docs/observability.md has no section for {alert}"
            );
        }
    }
    let mut used = BTreeSet::new();
    for expression in &expressions {
        for word in expression.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("pushcluster_") || word.starts_with("process_") {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| word.strip_suffix(suffix))
                    .unwrap_or(word);
                used.insert(base.to_string());
            }
        }
    }
    for metric in &used {
        if metric.starts_with("process_") {
            continue;
        }
        assert!(
            documented.contains(&format!("`{metric}`")),
            "{metric} is used but not in docs/metrics.md"
        );
    }
    assert!(used.len() > 40, "{used:?}");
}
