//! The reconciler against a mocked API server (tower-test): every request
//! it makes is answered here and recorded, then checked — the exact objects
//! applied, the status patch, pause, and failures.

use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use pushcluster_operator::crd::PushCluster;
use pushcluster_operator::metrics::OperatorMetrics;
use pushcluster_operator::reconcile::{Context, error_policy, reconcile};
use pushcluster_operator::render::render;
use serde_json::{Value, json};
use tower_test::mock;

use crate::common::stored;

/// How the mocked API server behaves.
#[derive(Clone, Default)]
struct Scenario {
    /// Deployments report this many ready pods (else all desired).
    ready: Option<i32>,
    /// ServiceMonitors answer 404 (the CRD is not installed).
    no_service_monitor_crd: bool,
    /// Deployment applies fail with 500.
    fail_deployments: bool,
    /// HorizontalPodAutoscalers in the namespace (names), all targeting
    /// the PushCluster `push`.
    hpas: Vec<&'static str>,
}

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    query: String,
    body: Value,
}

fn status_error(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": format!("mocked {reason}"), "reason": reason, "code": code})
}

fn answer(request: &Recorded, scenario: &Scenario, pc: &PushCluster) -> (StatusCode, Value) {
    let is = |resource: &str| {
        request.path.contains(&format!("/{resource}/"))
            || request.path.ends_with(&format!("/{resource}"))
    };
    match request.method.as_str() {
        "POST" if is("events") || is("secrets") => (StatusCode::CREATED, request.body.clone()),
        "DELETE" if is("servicemonitors") => (StatusCode::NOT_FOUND, status_error(404, "NotFound")),
        "PATCH" if request.path.ends_with("/status") => {
            let mut object = serde_json::to_value(pc).expect("pc");
            object["status"] = request.body["status"].clone();
            (StatusCode::OK, object)
        }
        "PATCH" if is("servicemonitors") && scenario.no_service_monitor_crd => {
            (StatusCode::NOT_FOUND, status_error(404, "NotFound"))
        }
        "PATCH" if is("deployments") && scenario.fail_deployments => (
            StatusCode::INTERNAL_SERVER_ERROR,
            status_error(500, "InternalError"),
        ),
        "PATCH" => {
            let mut object = request.body.clone();
            object["metadata"]["uid"] = json!("child-uid");
            object["metadata"]["resourceVersion"] = json!("1");
            if is("deployments") {
                let desired = object["spec"]["replicas"].as_i64().unwrap_or(1);
                let ready = scenario.ready.map(i64::from).unwrap_or(desired);
                object["metadata"]["generation"] = json!(1);
                object["status"] = json!({
                    "observedGeneration": 1,
                    "replicas": desired,
                    "updatedReplicas": desired,
                    "readyReplicas": ready,
                    "availableReplicas": ready
                });
            }
            (StatusCode::OK, object)
        }
        // The autoscaler's lists: no pods yet (so no metrics), and the
        // scenario's HPAs.
        "GET" if request.path.ends_with("/pods") => (
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
        ),
        "GET" if request.path.ends_with("/horizontalpodautoscalers") => {
            let items: Vec<Value> = scenario
                .hpas
                .iter()
                .map(|name| {
                    json!({
                        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                        "metadata": {"name": name, "namespace": "push"},
                        "spec": {
                            "scaleTargetRef": {"apiVersion": "pushcluster.io/v1alpha1", "kind": "PushCluster", "name": "push"},
                            "minReplicas": 1, "maxReplicas": 5
                        }
                    })
                })
                .collect();
            (
                StatusCode::OK,
                json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscalerList", "metadata": {}, "items": items}),
            )
        }
        _ => (StatusCode::NOT_FOUND, status_error(404, "NotFound")),
    }
}

/// Runs one reconcile against the mock; returns its result and the requests.
async fn run(
    pc: PushCluster,
    scenario: Scenario,
) -> (Result<(), String>, Vec<Recorded>, Arc<Context>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let log = Arc::new(Mutex::new(Vec::new()));
    let server = {
        let (log, pc, scenario) = (log.clone(), pc.clone(), scenario.clone());
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let recorded = Recorded {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let (status, body) = answer(&recorded, &scenario, &pc);
                log.lock().expect("log").push(recorded);
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response");
                send.send_response(response);
            }
        })
    };
    let client = Client::new(service, "push");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "pushcluster-operator".into(),
            instance: Some("test".into()),
        },
    );
    let context = Arc::new(Context::new(
        client,
        recorder,
        OperatorMetrics::unregistered(),
    ));
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        reconcile(Arc::new(pc), context.clone()),
    )
    .await
    .expect("reconcile finished in time");
    drop(context.client.clone());
    server.abort();
    let log = log.lock().expect("log").clone();
    (result.map(|_| ()).map_err(|e| e.to_string()), log, context)
}

fn patches(log: &[Recorded]) -> Vec<&Recorded> {
    log.iter().filter(|r| r.method == "PATCH").collect()
}

fn status_patch(log: &[Recorded]) -> &Value {
    &log.iter()
        .find(|r| r.method == "PATCH" && r.path.ends_with("/status"))
        .expect("a status patch")
        .body["status"]
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

#[tokio::test]
async fn applies_every_child_then_the_status() {
    let pc = stored("examples/pushcluster.yaml");
    let fleet = render(&pc).expect("renders");
    let (result, log, _) = run(pc, Scenario::default()).await;
    assert_eq!(result, Ok(()));

    let applied = patches(&log);
    let paths: Vec<&str> = applied.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/push/serviceaccounts/push",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/push/roles/push",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/push/rolebindings/push",
            "/api/v1/namespaces/push/configmaps/push-config",
            "/api/v1/namespaces/push/services/push-comet-headless",
            "/api/v1/namespaces/push/services/push-comet",
            "/api/v1/namespaces/push/services/push-logic",
            "/api/v1/namespaces/push/services/push-metrics",
            "/apis/policy/v1/namespaces/push/poddisruptionbudgets/push-comet",
            "/apis/policy/v1/namespaces/push/poddisruptionbudgets/push-logic",
            "/apis/apps/v1/namespaces/push/deployments/push-comet",
            "/apis/apps/v1/namespaces/push/deployments/push-logic",
            "/apis/apps/v1/namespaces/push/deployments/push-job",
            "/apis/monitoring.coreos.com/v1/namespaces/push/servicemonitors/push-metrics",
            "/apis/pushcluster.io/v1alpha1/namespaces/push/pushclusters/push/status",
        ]
    );
    for request in &applied {
        // Server-side apply, one field manager, taking ownership.
        assert!(
            request.query.contains("fieldManager=pushcluster-operator"),
            "{}",
            request.query
        );
        assert!(request.query.contains("force=true"), "{}", request.query);
    }
    // The exact rendered objects.
    let expected = [
        serde_json::to_value(&fleet.service_account),
        serde_json::to_value(&fleet.config_map),
        serde_json::to_value(&fleet.comet),
        serde_json::to_value(&fleet.job),
    ];
    for (index, want) in [0usize, 3, 10, 12].into_iter().zip(expected) {
        assert_eq!(
            applied[index].body,
            want.expect("json"),
            "{}",
            applied[index].path
        );
    }

    let status = status_patch(&log);
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(status["comet"]["ready"], "3/3");
    assert_eq!(
        status["comet"]["selector"],
        "app.kubernetes.io/component=comet,app.kubernetes.io/instance=push,app.kubernetes.io/name=pushcluster"
    );
    assert_eq!(condition(status, "Available")["status"], "True");
    assert_eq!(condition(status, "Progressing")["status"], "False");
    assert_eq!(condition(status, "Degraded")["status"], "False");
    assert_eq!(condition(status, "ReconciliationPaused")["status"], "False");
    assert_eq!(condition(status, "ServiceMonitorReady")["status"], "True");
    assert_eq!(condition(status, "Available")["observedGeneration"], 3);
    // The Available transition is announced.
    let events: Vec<&Value> = log
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
        .map(|r| &r.body)
        .collect();
    assert!(
        events.iter().any(|e| e["reason"] == "Available"),
        "{events:?}"
    );
}

#[tokio::test]
async fn pods_not_ready_yet_are_progressing() {
    let pc = stored("examples/pushcluster-minimal.yaml");
    let (result, log, _) = run(
        pc,
        Scenario {
            ready: Some(0),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(result, Ok(()));
    let status = status_patch(&log);
    assert_eq!(condition(status, "Available")["status"], "False");
    assert_eq!(condition(status, "Progressing")["status"], "True");
    assert_eq!(status["comet"]["ready"], "0/2");
    // Monitoring is off: an old ServiceMonitor is deleted, none applied.
    assert!(
        log.iter()
            .any(|r| r.method == "DELETE" && r.path.contains("servicemonitors/push-metrics"))
    );
    assert_eq!(
        condition(status, "ServiceMonitorReady")["reason"],
        "Disabled"
    );
}

#[tokio::test]
async fn paused_clusters_only_get_their_status() {
    let mut pc = stored("examples/pushcluster.yaml");
    pc.spec.paused = true;
    let (result, log, _) = run(pc, Scenario::default()).await;
    assert_eq!(result, Ok(()));
    let applied = patches(&log);
    assert_eq!(
        applied.len(),
        1,
        "only the status: {:?}",
        applied.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    let status = status_patch(&log);
    assert_eq!(condition(status, "ReconciliationPaused")["status"], "True");
}

#[tokio::test]
async fn a_missing_service_monitor_crd_is_a_condition_not_a_failure() {
    let pc = stored("examples/pushcluster.yaml");
    let (result, log, _) = run(
        pc,
        Scenario {
            no_service_monitor_crd: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(result, Ok(()));
    let monitor = condition(status_patch(&log), "ServiceMonitorReady");
    assert_eq!(
        (monitor["status"].as_str(), monitor["reason"].as_str()),
        (Some("False"), Some("CRDNotInstalled"))
    );
}

#[tokio::test]
async fn an_invalid_config_is_reported_and_nothing_applied() {
    let mut pc = stored("examples/pushcluster-minimal.yaml");
    pc.spec.config = Some(json!({"job": {"room": {"batch": 0}}}));
    let (result, log, _) = run(pc, Scenario::default()).await;
    assert_eq!(result, Ok(()));
    assert_eq!(patches(&log).len(), 1, "only the status");
    let degraded = condition(status_patch(&log), "Degraded");
    assert_eq!(degraded["reason"], "InvalidConfig");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("job.room.batch")
    );
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_and_back_off() {
    let pc = stored("examples/pushcluster-minimal.yaml");
    let (result, log, context) = run(
        pc.clone(),
        Scenario {
            fail_deployments: true,
            ..Default::default()
        },
    )
    .await;
    let error = result.expect_err("failed");
    assert!(error.contains("Kubernetes API"), "{error}");
    assert!(
        !log.iter().any(|r| r.path.ends_with("/status")),
        "no status after a failure"
    );
    // The error policy counts and backs off exponentially.
    let fake = pushcluster_operator::reconcile::Error::Render(
        pushcluster_operator::render::RenderError::Missing("test"),
    );
    let pc = Arc::new(pc);
    let first = error_policy(pc.clone(), &fake, context.clone());
    let second = error_policy(pc.clone(), &fake, context.clone());
    assert_ne!(first, second, "the delay grows");
    assert_eq!(
        context
            .metrics
            .failures
            .with_label_values(&["render"])
            .get(),
        2
    );
}

/// Every request a reconcile makes is one the operator's RBAC grants
/// (operator/src/rbac.rs, which the chart and deploy/operator.yaml grant
/// exactly).
#[tokio::test]
async fn every_request_is_within_the_operators_rbac() {
    let allowed = pushcluster_operator::rbac::permissions(pushcluster_operator::rbac::FLEET_RULES);
    let mut paused = stored("examples/pushcluster.yaml");
    paused.spec.paused = true;
    let mut seen = std::collections::BTreeSet::new();
    for (pc, scenario) in [
        (stored("examples/pushcluster.yaml"), Scenario::default()),
        (
            stored("examples/pushcluster-minimal.yaml"),
            Scenario::default(),
        ),
        (
            stored("examples/pushcluster.yaml"),
            Scenario {
                ready: Some(0),
                ..Default::default()
            },
        ),
        (paused, Scenario::default()),
    ] {
        let (_, log, _) = run(pc, scenario).await;
        for request in log {
            let needed = pushcluster_operator::rbac::required(
                &request.method,
                &request.path,
                &request.query,
            )
            .unwrap_or_else(|| panic!("not a resource request: {request:?}"));
            assert!(
                allowed.contains(&needed),
                "{needed:?} not granted: {request:?}"
            );
            seen.insert(needed);
        }
    }
    // The scenarios did apply, delete a ServiceMonitor, patch the status
    // and record events.
    for (group, resource, verb) in [
        ("apps", "deployments", "patch"),
        ("monitoring.coreos.com", "servicemonitors", "delete"),
        ("pushcluster.io", "pushclusters/status", "patch"),
        ("events.k8s.io", "events", "create"),
    ] {
        assert!(
            seen.contains(&(group.to_string(), resource.to_string(), verb.to_string())),
            "no {verb} {group}/{resource} in {seen:?}"
        );
    }
}

#[tokio::test]
async fn autoscaled_comets_get_the_operators_replicas_and_an_hpa_is_a_conflict() {
    let mut pc = stored("examples/pushcluster-minimal.yaml");
    // spec says 2; autoscaling's minimum is 3: the operator's 3 is applied
    // (no metrics are needed to respect the bounds).
    pc.spec.comet.replicas = 2;
    pc.spec.comet.autoscaling = Some(
        serde_json::from_value(
            json!({"enabled": true, "minReplicas": 3, "maxReplicas": 5, "target": 100}),
        )
        .expect("autoscaling"),
    );
    let (result, log, context) = run(
        pc,
        Scenario {
            hpas: vec!["comets"],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(result, Ok(()));
    let comet = patches(&log)
        .into_iter()
        .find(|r| r.path.ends_with("/deployments/push-comet"))
        .expect("comet Deployment applied");
    assert_eq!(comet.body["spec"]["replicas"], 3);
    let status = status_patch(&log);
    assert_eq!(status["comet"]["autoscaling"]["desiredReplicas"], 3);
    assert!(
        status["comet"]["autoscaling"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("below minReplicas")),
        "{status}"
    );
    let conflict = condition(status, "AutoscalingConflict");
    assert_eq!(conflict["status"], "True");
    assert!(
        conflict["message"]
            .as_str()
            .is_some_and(|m| m.contains("comets")),
        "{conflict}"
    );
    assert_eq!(
        context
            .metrics
            .autoscaler_decisions
            .with_label_values(&["comet", "up"])
            .get(),
        1
    );
    // Logic and job are not autoscaled: their spec replicas, no status.
    assert!(status["logic"].get("autoscaling").is_none());
    let logic = patches(&log)
        .into_iter()
        .find(|r| r.path.ends_with("/deployments/push-logic"))
        .expect("logic Deployment applied");
    assert_eq!(logic.body["spec"]["replicas"], 2);
}
