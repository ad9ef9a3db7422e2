//! One fleet's life on real pods: the chart installs the operator, which
//! runs in-cluster with exactly the chart's RBAC; a PushCluster becomes
//! ready comet, logic and job pods on a NATS pod; goim clients connect
//! through the comet Service with JWTs and receive every kind of push; the
//! fleet scales, rolls with drains, keeps working when its operator pod is
//! deleted and when a comet pod is killed, pauses, and is deleted.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use pushcluster_api::protocol::{Frame, decode_positioned_stream, op};
use pushcluster_operator::crd::PushCluster;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::apply_crd;
use crate::common::{TcpClient, WsClient, auth_frame, body, frame, inner_frames, parse_metric};
use crate::kube_util::{
    Env, LONG, apply_value, apply_yaml, client, eventually, get_as, pod_ip, ready_pods,
    render_chart, secret_value, service_addr,
};

const JWT_SECRET: &str = "a-jwt-secret-of-at-least-32-bytes-for-e2e";
/// Comets close their connections spread over this many seconds on shutdown.
const DRAIN_SECONDS: u64 = 8;
const COMETS: &str = "app.kubernetes.io/instance=push,app.kubernetes.io/component=comet";
const JOBS: &str = "app.kubernetes.io/instance=push,app.kubernetes.io/component=job";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A client token: mid `mid`, key `key`, room `room`, ops 1000-1003.
fn token(mid: i64, key: &str, room: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": mid.to_string(), "key": key, "room": room, "exp": now() + 3600,
                "accepts": [1000, 1001, 1002, 1003]}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign")
}

fn condition(pc: &PushCluster, type_: &str) -> Option<(String, String)> {
    pc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

pub async fn whole_life(env: Env) {
    let client = client(&env.kubeconfig).await;
    let suffix = format!("{:06x}", rand::random_range(0..0x100_0000u32));
    let names = Names {
        system: format!("pushcluster-system-{suffix}"),
        apps: format!("pushcluster-e2e-{suffix}"),
        release: format!("e2e-{suffix}"),
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for namespace in [&names.system, &names.apps] {
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("ns"),
            )
            .await
            .expect("create namespace");
    }
    let result = tokio::spawn(drive(client.clone(), env, names.clone())).await;
    // Clean up whatever happened: the namespaces and the chart's
    // cluster-scoped RBAC (the CRD stays, as `helm uninstall` leaves it).
    for namespace in [&names.system, &names.apps] {
        let _ = namespaces.delete(namespace, &DeleteParams::default()).await;
    }
    let by_release =
        ListParams::default().labels(&format!("app.kubernetes.io/instance={}", names.release));
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let _ = roles
        .delete_collection(&DeleteParams::default(), &by_release)
        .await;
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let _ = bindings
        .delete_collection(&DeleteParams::default(), &by_release)
        .await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic.into_panic());
    }
}

#[derive(Clone)]
struct Names {
    /// The operator's namespace (the chart's release namespace).
    system: String,
    /// The fleet's namespace.
    apps: String,
    release: String,
}

/// The fleet's addresses and credentials, as a user finds them.
struct Fleet {
    client: Client,
    namespace: String,
    http: reqwest::Client,
    logic: SocketAddr,
    comet_tcp: SocketAddr,
    comet_ws: SocketAddr,
    api_token: String,
}

impl Fleet {
    /// POSTs a push with the API token; the status and goim's answer.
    async fn push(&self, path: &str, body: &str) -> Result<(u16, Value), reqwest::Error> {
        let response = self
            .http
            .post(format!("http://{}{path}", self.logic))
            .bearer_auth(&self.api_token)
            .body(body.to_string())
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// A push that must be accepted; a 429 (backpressure, e.g. while a job
    /// waits out a call to a comet that just went away) is retried after
    /// its `Retry-After`, for up to 30 s.
    async fn push_ok(&self, path: &str, body: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (status, answer) = loop {
            let (status, answer) = self.push(path, body).await.expect("push API reachable");
            if status != 429 || Instant::now() > deadline {
                break (status, answer);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        assert_eq!(
            (status, answer["code"].as_i64()),
            (200, Some(0)),
            "{path}: {answer}"
        );
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("http://{}{path}", self.logic))
            .bearer_auth(&self.api_token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("logic reachable");
        let bytes = response.bytes().await.expect("logic answers");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    /// Comet pod names in `/goim/nodes/instances` (from the comets' reports).
    async fn instances(&self) -> BTreeSet<String> {
        self.get("/goim/nodes/instances").await["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["hostname"].as_str().map(str::to_string))
            .collect()
    }

    fn pushclusters(&self) -> Api<PushCluster> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn comet_pods(&self) -> Vec<Pod> {
        ready_pods(&self.client, &self.namespace, COMETS).await
    }

    async fn comet_names(&self) -> BTreeSet<String> {
        self.comet_pods()
            .await
            .iter()
            .map(|p| p.name_any())
            .collect()
    }

    /// `(comets, comets_unavailable)` as every ready job pod reports them.
    async fn job_views(&self) -> Vec<(f64, f64)> {
        let mut views = Vec::new();
        for pod in ready_pods(&self.client, &self.namespace, JOBS).await {
            let url = format!("http://{}:3190/metrics", pod_ip(&pod));
            let Ok(response) = self
                .http
                .get(url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            else {
                continue;
            };
            let text = response.text().await.unwrap_or_default();
            views.push((
                parse_metric(&text, "pushcluster_job_comets", &[]),
                parse_metric(&text, "pushcluster_job_comets_unavailable", &[]),
            ));
        }
        views
    }

    /// Waits until every job links to exactly `comets` comets, none of
    /// them counted unavailable.
    async fn jobs_see(&self, comets: usize, jobs: usize) {
        let want = vec![(comets as f64, 0.0); jobs];
        eventually(
            &format!("{jobs} jobs linked to {comets} comets, none unavailable"),
            LONG,
            || async { (self.job_views().await == want).then_some(()) },
        )
        .await;
    }

    async fn wait_available(&self, comets: i32) -> PushCluster {
        let api = self.pushclusters();
        eventually(
            &format!("Available=True with {comets} comets"),
            LONG,
            || async {
                let pc = api.get("push").await.ok()?;
                let status = pc.status.as_ref()?;
                (status.observed_generation == pc.metadata.generation
                    && condition(&pc, "Available").map(|c| c.0).as_deref() == Some("True")
                    && status.comet.ready == format!("{comets}/{comets}"))
                .then_some(pc)
            },
        )
        .await
    }
}

async fn drive(client: Client, env: Env, names: Names) {
    let started = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());

    step("an object stored under an older CRD (no spec.auth)");
    let crd_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/pushcluster/crds/pushcluster.yaml"
    ))
    .expect("chart CRD");
    let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&crd_text).expect("CRD");
    let changing = crate::CRD_CHANGES.lock().await;
    apply_crd(&client, &older_crd(&crd)).await;
    apply_value(
        &client,
        json!({
            "apiVersion": "pushcluster.io/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": "legacy", "namespace": names.apps},
            "spec": {"nats": {"url": "nats://127.0.0.1:4222"}}
        }),
        &names.apps,
    )
    .await;

    step("the chart: CRD, then the Helm SDK's rendering with the test image");
    apply_crd(&client, &crd).await;
    drop(changing);
    let (repository, tag) = env.image_parts();
    let values = json!({
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "operator": {"replicas": 2, "log": {"level": "info"}, "autoscaleSeconds": 2}
    });
    apply_yaml(
        &client,
        &render_chart(&names.release, &names.system, &values).join("\n---\n"),
        &names.system,
    )
    .await;
    let operators = format!(
        "app.kubernetes.io/component=operator,app.kubernetes.io/instance={}",
        names.release
    );
    let operator_pods = eventually("2 ready operator pods", LONG, || async {
        let pods = ready_pods(&client, &names.system, &operators).await;
        (pods.len() == 2).then_some(pods)
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &names.system);
    let lease_name = format!("{}-pushcluster-leader", names.release);
    let holder = || async {
        leases
            .get(&lease_name)
            .await
            .ok()?
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    };
    let leader = eventually("an operator pod holding the Lease", LONG, || async {
        let holder = holder().await?;
        operator_pods
            .iter()
            .map(|p| p.name_any())
            .find(|name| holder.starts_with(&format!("{name}-")))
    })
    .await;
    step(&format!("operator {leader} leads"));

    step("the older object gets InvalidConfig instead of stopping the operator");
    let pushclusters: Api<PushCluster> = Api::namespaced(client.clone(), &names.apps);
    eventually(
        "Degraded/InvalidConfig on the older object",
        LONG,
        || async {
            let pc = pushclusters.get("legacy").await.ok()?;
            (condition(&pc, "Degraded") == Some(("True".into(), "InvalidConfig".into())))
                .then_some(())
        },
    )
    .await;
    pushclusters
        .delete("legacy", &DeleteParams::default())
        .await
        .expect("delete the older object");

    step("NATS as a pod");
    let nats_yaml = include_str!("nats.yaml").replace("IMAGE", &env.nats_image);
    apply_yaml(&client, &nats_yaml, &names.apps).await;
    eventually("a ready NATS pod", LONG, || async {
        (!ready_pods(&client, &names.apps, "app.kubernetes.io/name=nats")
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    let nats = service_addr(&client, &names.apps, "nats", "client").await;

    step("a PushCluster with JWT authentication");
    apply_value(
        &client,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "push-jwt", "namespace": names.apps},
            "stringData": {"secret": JWT_SECRET}
        }),
        &names.apps,
    )
    .await;
    apply_value(
        &client,
        json!({
            "apiVersion": "pushcluster.io/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": "push", "namespace": names.apps},
            "spec": {
                "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
                // No DNS in this cluster: NATS by its Service address.
                "nats": {"url": format!("nats://{nats}")},
                "auth": {"mode": "jwt", "jwtSecret": {"name": "push-jwt", "key": "secret"}},
                "comet": {"replicas": 2, "drainSeconds": DRAIN_SECONDS},
                "logic": {"replicas": 2},
                "job": {"replicas": 2},
                // Client messages for the backend (docs/upstream.md), and
                // a scheduler slice for the relays only, which a
                // container's seccomp must allow.
                "config": {
                    "upstream": {"enabled": true},
                    "logic": {"runtime": {"scheduler_slice": "100us"}},
                    "job": {"runtime": {"scheduler_slice": "100us"}}
                },
                // What roll clients resume from (docs/recovery.md).
                "history": {
                    "default": {"maxAgeSeconds": 600, "maxMessages": 5000},
                    "rooms": [{"prefix": "live://roll", "maxAgeSeconds": 600, "maxMessages": 5000}]
                }
            }
        }),
        &names.apps,
    )
    .await;
    let fleet = Fleet {
        client: client.clone(),
        namespace: names.apps.clone(),
        http: reqwest::Client::new(),
        logic: SocketAddr::from(([0, 0, 0, 0], 0)),
        comet_tcp: SocketAddr::from(([0, 0, 0, 0], 0)),
        comet_ws: SocketAddr::from(([0, 0, 0, 0], 0)),
        api_token: String::new(),
    };
    fleet.wait_available(2).await;
    let fleet = Fleet {
        logic: service_addr(&client, &names.apps, "push-logic", "http").await,
        comet_tcp: service_addr(&client, &names.apps, "push-comet", "tcp").await,
        comet_ws: service_addr(&client, &names.apps, "push-comet", "ws").await,
        api_token: secret_value(&client, &names.apps, "push-api-token", "token").await,
        ..fleet
    };
    step("Available=True");
    // kube-proxy programs a new Service's endpoints within about a second.
    for (what, addr) in [
        ("the comet Service (TCP)", fleet.comet_tcp),
        ("the comet Service (WebSocket)", fleet.comet_ws),
        ("the logic Service", fleet.logic),
    ] {
        eventually(&format!("{what} to accept connections"), LONG, || async {
            TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
    }
    printer_columns(&client, &names.apps, ["True", "2/2", "2/2", "2/2"]).await;

    step(
        "logic and job run with their runtime.scheduler_slice inside their containers, comets without",
    );
    scheduler_slice_was_set(&client, &names.apps).await;

    step("clients through the comet Service receive key, mid, room and broadcast pushes");
    pushes_reach_clients(&fleet).await;

    step("a client joins a second room its token allows and sends to the backend");
    rooms_and_upstream(&fleet, nats).await;

    step("scale subresource: 3 comets");
    let before = fleet.comet_names().await;
    pushclusters
        .patch_scale(
            "push",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("scale to 3");
    fleet.wait_available(3).await;
    let pods = fleet.comet_pods().await;
    let new_pod = pods
        .iter()
        .find(|p| !before.contains(&p.name_any()))
        .expect("a new comet pod")
        .clone();
    new_comet_serves(&fleet, &new_pod).await;
    fleet.jobs_see(3, 2).await;

    step("a config change rolls the fleet; comets drain one by one");
    rolling_update(&fleet, &pushclusters).await;
    step("rolled");

    step("the operator pod holding the Lease is deleted");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &names.system);
    pods.delete(&leader, &DeleteParams::default())
        .await
        .expect("delete the leading operator pod");
    let successor = eventually("another operator to take the Lease", LONG, || async {
        let holder = holder().await?;
        (!holder.starts_with(&format!("{leader}-"))).then_some(holder)
    })
    .await;
    step(&format!("{successor} leads"));
    pushclusters
        .patch(
            "push",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"comet": {"replicas": 2}}})),
        )
        .await
        .expect("scale to 2");
    fleet.wait_available(2).await;
    step("the new leader reconciled a scale-down to 2");

    step("discovery forgets comets that left: scaled down, then one killed");
    fleet.jobs_see(2, 2).await;
    let comets = fleet.comet_pods().await;
    let wanted: BTreeSet<String> = comets.iter().map(|p| p.name_any()).collect();
    eventually("/goim/nodes/instances lists the 2 comets", LONG, || async {
        (fleet.instances().await == wanted).then_some(())
    })
    .await;
    let killed = comets[0].name_any();
    let comet_pods: Api<Pod> = Api::namespaced(client.clone(), &names.apps);
    comet_pods
        .delete(&killed, &DeleteParams::default().grace_period(0))
        .await
        .expect("kill a comet pod");
    // Room pushes right away: jobs call the dead comet, fail and mark it down.
    for i in 0..5 {
        fleet
            .push_ok(
                "/goim/push/room?operation=1000&type=live&room=1000",
                &format!("after kill {i}"),
            )
            .await;
    }
    eventually("a replacement comet", LONG, || async {
        let pods = fleet.comet_pods().await;
        (pods.len() == 2 && pods.iter().all(|p| p.name_any() != killed)).then_some(())
    })
    .await;
    fleet.jobs_see(2, 2).await;
    step("jobs link to the replacement and count no comet unavailable");

    step("autoscaling: comets follow their connections, scale-down drains the emptiest");
    autoscaling(&fleet, &pushclusters).await;

    step("paused: changes wait; resumed: they apply");
    pause_and_resume(&fleet, &pushclusters).await;

    step("deleting the PushCluster removes every child");
    pushclusters
        .delete("push", &DeleteParams::foreground())
        .await
        .expect("delete");
    everything_is_gone(&client, &names.apps).await;
    step("done");
}

/// The CRD as it was before `spec.auth` existed.
fn older_crd(crd: &CustomResourceDefinition) -> CustomResourceDefinition {
    let mut value = serde_json::to_value(crd).expect("CRD");
    let spec = &mut value["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    spec["properties"]
        .as_object_mut()
        .expect("properties")
        .remove("auth");
    spec["required"]
        .as_array_mut()
        .expect("required")
        .retain(|r| r != "auth");
    serde_json::from_value(value).expect("older CRD")
}

/// `kubectl get pushc` as the API server prints it (Table).
async fn printer_columns(client: &Client, namespace: &str, want: [&str; 4]) {
    let table = get_as(
        client,
        &format!("/apis/pushcluster.io/v1alpha1/namespaces/{namespace}/pushclusters/push"),
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    )
    .await;
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let cells = table["rows"][0]["cells"].as_array().expect("a row");
    let cell = |name: &str| {
        let at = columns.iter().position(|c| *c == name).expect(name);
        cells[at].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(
        [cell("Ready"), cell("Comets"), cell("Logic"), cell("Job")],
        want.map(str::to_string),
        "printer columns {columns:?}: {cells:?}"
    );
}

/// `(op, body)` of what a client received, op-9 batches opened.
fn messages(frame: &Frame) -> Vec<(i32, String)> {
    if frame.op == op::RAW {
        inner_frames(frame)
            .iter()
            .map(|f| (f.op, body(f)))
            .collect()
    } else {
        vec![(frame.op, body(frame))]
    }
}

async fn pushes_reach_clients(fleet: &Fleet) {
    let mut tcp = TcpClient::auth(
        fleet.comet_tcp,
        json!({"token": token(1001, "tcp-1001", "live://1000")}),
    )
    .await;
    let mut ws = WsClient::auth(
        fleet.comet_ws,
        json!({"token": token(1002, "ws-1002", "live://1000")}),
    )
    .await;
    // A push without the generated token is refused.
    let response = fleet
        .http
        .post(format!(
            "http://{}/goim/push/all?operation=1003",
            fleet.logic
        ))
        .body("no token")
        .send()
        .await
        .expect("logic reachable");
    assert_eq!(response.status().as_u16(), 401);

    let sent = [
        (
            "/goim/push/keys?operation=1000&keys=tcp-1001&keys=ws-1002",
            "to keys",
        ),
        (
            "/goim/push/mids?operation=1001&mids=1001&mids=1002",
            "to mids",
        ),
        (
            "/goim/push/room?operation=1002&type=live&room=1000",
            "to the room",
        ),
        ("/goim/push/all?operation=1003", "to all"),
    ];
    // Sessions reach logic through the comets' Connect calls; a key push
    // can only race the registry right after auth, so wait for the first.
    let deadline = Instant::now() + LONG;
    loop {
        fleet.push_ok(sent[0].0, "probe").await;
        if tcp.try_recv(Duration::from_secs(1)).await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no key push reached the TCP client"
        );
    }
    while ws.try_recv_frame(Duration::from_secs(1)).await.is_some() {}
    let want: Vec<(i32, String)> = sent
        .iter()
        .enumerate()
        .map(|(i, (_, body))| (1000 + i as i32, body.to_string()))
        .collect();
    for (path, body) in sent {
        fleet.push_ok(path, body).await;
    }
    // A late probe may still come; the pushes are what is checked.
    let not_probe = |m: &(i32, String)| m.1 != "probe";
    let mut got_tcp = Vec::new();
    while got_tcp.len() < want.len() {
        got_tcp.extend(messages(&tcp.recv().await).into_iter().filter(not_probe));
    }
    let mut got_ws = Vec::new();
    while got_ws.len() < want.len() {
        got_ws.extend(
            messages(&ws.recv_frame().await)
                .into_iter()
                .filter(not_probe),
        );
    }
    // Each kind goes its own way (room lanes, comet lanes, broadcasts):
    // order holds within a room or a key, not across kinds.
    got_tcp.sort();
    got_ws.sort();
    assert_eq!(got_tcp, want, "TCP client");
    assert_eq!(got_ws, want, "WebSocket client");
}

/// Through the comet Service: a client whose token allows two rooms joins
/// the second (op 22) and not a third, gets the second room's pushes, and
/// its message (op 4) is stored in the upstream stream on the cluster's
/// NATS with the identity its token gave it.
async fn rooms_and_upstream(fleet: &Fleet, nats: SocketAddr) {
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "1004", "rooms": ["live://1000", "chat://k8s"], "exp": now() + 3600,
                "accepts": [1000]}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign");
    let mut client = TcpClient::auth(
        fleet.comet_tcp,
        json!({"token": token, "room_id": "live://1000"}),
    )
    .await;
    let mut ask = async |op: i32, seq: i32, body: &str| {
        client.send(&frame(op, seq, body)).await;
        loop {
            let reply = client.recv().await;
            if reply.seq == seq {
                let answer: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                return (reply.op, answer);
            }
        }
    };
    assert_eq!(
        ask(op::JOIN, 2, "chat://k8s").await,
        (op::JOIN_REPLY, json!({"room": "chat://k8s", "ok": true}))
    );
    assert_eq!(
        ask(op::JOIN, 3, "chat://other").await,
        (
            op::JOIN_REPLY,
            json!({"room": "chat://other", "ok": false, "reason": "forbidden"})
        )
    );
    // Logic may still be creating the stream: "unavailable" is sent again.
    let deadline = Instant::now() + LONG;
    let id = loop {
        let (reply_op, answer) = ask(op::SEND_MSG, 4, r#"{"text":"hello from k8s"}"#).await;
        assert_eq!(reply_op, op::SEND_MSG_REPLY);
        if let Some(id) = answer["id"].as_str() {
            break id.parse::<u64>().expect("numeric id");
        }
        assert!(Instant::now() < deadline, "never stored: {answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    fleet
        .push_ok(
            "/goim/push/room?operation=1000&type=chat&room=k8s",
            "to the chat",
        )
        .await;
    let pushed = loop {
        let frame = client.recv().await;
        if let Some(message) = messages(&frame).into_iter().find(|m| m.0 == 1000) {
            break message.1;
        }
    };
    assert_eq!(pushed, "to the chat");

    // The backend's view: the message, with the sender from the token.
    let nats = async_nats::connect(format!("nats://{nats}"))
        .await
        .expect("the cluster's NATS");
    let stream = async_nats::jetstream::new(nats)
        .get_stream("PUSHCLUSTER_UPSTREAM")
        .await
        .expect("the upstream stream");
    let message = stream
        .get_raw_message(id)
        .await
        .expect("the stored message");
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(header("Pushcluster-Mid").as_deref(), Some("1004"));
    assert_eq!(
        header("Pushcluster-Rooms").as_deref(),
        Some(r#"["live://1000","chat://k8s"]"#)
    );
    assert_eq!(&message.payload[..], br#"{"text":"hello from k8s"}"#);
}

/// A client on the new comet pod gets room pushes, and the pod's address
/// is handed out by `/goim/nodes/weighted`.
async fn new_comet_serves(fleet: &Fleet, pod: &Pod) {
    let ip = pod_ip(pod);
    let mut client = TcpClient::auth(
        SocketAddr::new(ip, 3101),
        json!({"token": token(2001, "new-2001", "live://1000")}),
    )
    .await;
    // The new comet's first report may still be on its way to logic.
    let deadline = Instant::now() + LONG;
    loop {
        fleet
            .push_ok(
                "/goim/push/room?operation=1000&type=live&room=1000",
                "to the new comet",
            )
            .await;
        if client.try_recv(Duration::from_secs(1)).await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no room push reached the new comet"
        );
    }
    eventually("the new comet in /goim/nodes/weighted", LONG, || async {
        let nodes = fleet.get("/goim/nodes/weighted").await;
        nodes["data"]["nodes"]
            .as_array()?
            .iter()
            .any(|n| n.as_str() == Some(&ip.to_string()))
            .then_some(())
    })
    .await;
}

/// One client's connections during the roll: where each started, the room
/// messages it got, and when the server closed it.
#[derive(Debug, Default, Clone)]
struct Session {
    /// Frames of op 1000 or 1001 (the room's pushes) on this connection.
    frames: usize,
    received: Vec<u64>,
    closed_at: Option<Instant>,
    /// The op-20 reply after joining: (recovered, reason).
    resumed: Option<(bool, String)>,
}

/// A goim TCP client with positions that stays in room `live://roll`: it
/// starts on `first` (a comet pod) and, each time the server closes it,
/// reconnects through the Service with the last position it saw, as an app
/// using clients/js does, and resumes.
async fn roll_client(
    first: SocketAddr,
    service: SocketAddr,
    token: String,
    sessions: Arc<Mutex<Vec<Session>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut addr = first;
    let mut since: Option<Value> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
        else {
            addr = service;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let index = {
            let mut all = sessions.lock().expect("sessions");
            all.push(Session::default());
            all.len() - 1
        };
        let mut buf = BytesMut::new();
        let mut auth = json!({"token": token, "positions": true});
        if let Some(since) = &since {
            auth["since"] = json!({"live://roll": since});
        }
        let mut open = stream.write_all(&auth_frame(&auth).encode()).await.is_ok();
        while open {
            let frame = loop {
                match decode_positioned_stream(&mut buf) {
                    Ok(Some((frame, position))) => {
                        // The room's position (its user's direct stream,
                        // `@mid:<mid>`, has positions of its own).
                        if let Some(position) = position.filter(|p| p.stream == "live://roll") {
                            since = Some(json!({
                                "epoch": position.epoch.to_string(),
                                "offset": position.offset
                            }));
                        }
                        break Some(frame);
                    }
                    Ok(None) => {}
                    Err(_) => break None,
                }
                tokio::select! {
                    read = stream.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => break None,
                        Ok(_) => {}
                    },
                    _ = stop.changed() => return,
                }
            };
            let Some(frame) = frame else {
                open = false;
                continue;
            };
            let mut all = sessions.lock().expect("sessions");
            let session = &mut all[index];
            if frame.op == op::RESUME_REPLY
                && let Ok(reply) = serde_json::from_slice::<Value>(&frame.body)
                && reply["room"] == "live://roll"
            {
                since = Some(json!({"epoch": reply["epoch"], "offset": reply["offset"]}));
                session.resumed = Some((
                    reply["recovered"].as_bool().unwrap_or(false),
                    reply["reason"].as_str().unwrap_or_default().to_string(),
                ));
            }
            if frame.op == 1000 || frame.op == 1001 {
                session.frames += 1;
            }
            if frame.op == 1000
                && let Ok(n) = body(&frame).parse::<u64>()
            {
                session.received.push(n);
            }
        }
        sessions.lock().expect("sessions")[index].closed_at = Some(Instant::now());
        addr = service;
    }
}

/// Whether a roll client's current connection is open and `check` holds
/// for it.
fn on_open_connection(sessions: &Mutex<Vec<Session>>, check: impl Fn(&Session) -> bool) -> bool {
    sessions
        .lock()
        .expect("sessions")
        .last()
        .is_some_and(|s| s.closed_at.is_none() && check(s))
}

async fn rolling_update(fleet: &Fleet, pushclusters: &Api<PushCluster>) {
    let old_pods = fleet.comet_pods().await;
    assert_eq!(old_pods.len(), 3);
    const PER_COMET: usize = 4;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut clients = Vec::new();
    for (p, pod) in old_pods.iter().enumerate() {
        for c in 0..PER_COMET {
            let mid = 3000 + (p * PER_COMET + c) as i64;
            let sessions = Arc::new(Mutex::new(Vec::new()));
            let task = tokio::spawn(roll_client(
                SocketAddr::new(pod_ip(pod), 3101),
                fleet.comet_tcp,
                token(mid, &format!("roll-{mid}"), "live://roll"),
                sessions.clone(),
                stop_rx.clone(),
            ));
            clients.push((pod.name_any(), sessions, task));
        }
    }
    // Every client is in the room before the roll starts.
    eventually("every roll client receiving", LONG, || async {
        fleet
            .push_ok(
                "/goim/push/room?operation=1001&type=live&room=roll",
                "ready?",
            )
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        clients
            .iter()
            .all(|(_, s, _)| on_open_connection(s, |s| s.frames > 0))
            .then_some(())
    })
    .await;

    // Numbered room pushes every 100 ms through the roll. A push whose
    // answer was lost may have been published: it is sent again under the
    // same number, so a client may see that number twice in a row.
    let pushed = Arc::new(Mutex::new((0u64, HashSet::<u64>::new())));
    let (pusher_stop, mut pusher_stopped) = watch::channel(false);
    let pusher = {
        let (pushed, http, logic, token) = (
            pushed.clone(),
            fleet.http.clone(),
            fleet.logic,
            fleet.api_token.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let sent = http
                        .post(format!(
                            "http://{logic}/goim/push/room?operation=1000&type=live&room=roll"
                        ))
                        .bearer_auth(&token)
                        .body(n.to_string())
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status().is_success() => break,
                        Ok(_) => {}
                        Err(error) if !error.is_connect() => {
                            pushed.lock().expect("pushed").1.insert(n);
                        }
                        Err(_) => {}
                    }
                    assert!(Instant::now() < deadline, "push {n} failed for 30 s");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                pushed.lock().expect("pushed").0 = n + 1;
                n += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = pusher_stopped.changed() => return n,
                }
            }
        })
    };

    // The roll: a config change gives every pod template a new hash.
    let deployments: Api<Deployment> = Api::namespaced(fleet.client.clone(), &fleet.namespace);
    pushclusters
        .patch(
            "push",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"config": {"logic": {"node": {"heartbeat": "3m"}}}}})),
        )
        .await
        .expect("change config");
    let old_names: BTreeSet<String> = old_pods.iter().map(|p| p.name_any()).collect();
    let pods: Api<Pod> = Api::namespaced(fleet.client.clone(), &fleet.namespace);
    let mut fewest_available = i32::MAX;
    let deadline = Instant::now() + LONG;
    loop {
        assert!(
            Instant::now() < deadline,
            "the roll did not finish in {LONG:?}"
        );
        let comet = deployments
            .get("push-comet")
            .await
            .expect("comet Deployment");
        let status = comet.status.clone().unwrap_or_default();
        fewest_available = fewest_available.min(status.available_replicas.unwrap_or(0));
        let left = pods
            .list(&ListParams::default().labels(COMETS))
            .await
            .expect("pods")
            .items
            .iter()
            .filter(|p| old_names.contains(&p.name_any()))
            .count();
        let mut rolled = left == 0
            && status.observed_generation == comet.metadata.generation
            && status.updated_replicas == Some(3)
            && status.ready_replicas == Some(3)
            && status.replicas == Some(3);
        for name in ["push-logic", "push-job"] {
            let d = deployments.get(name).await.expect("Deployment");
            let s = d.status.unwrap_or_default();
            rolled &= s.observed_generation == d.metadata.generation
                && s.updated_replicas == Some(2)
                && s.replicas == Some(2)
                && s.ready_replicas == Some(2);
        }
        if rolled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = pusher_stop.send(true);
    let pushes = pusher.await.expect("pusher");
    let retried = pushed.lock().expect("pushed").1.clone();
    eprintln!(
        "{pushes} room pushes during the roll; {} sent twice",
        retried.len()
    );

    // After the roll every client is back and gets the last message.
    let last = pushes;
    fleet
        .push_ok(
            "/goim/push/room?operation=1000&type=live&room=roll",
            &last.to_string(),
        )
        .await;
    eventually(
        "every roll client to get the message after the roll",
        LONG,
        || async {
            clients
                .iter()
                .all(|(_, s, _)| on_open_connection(s, |s| s.received.contains(&last)))
                .then_some(())
        },
    )
    .await;
    let _ = stop_tx.send(true);
    for (_, _, task) in &mut clients {
        let _ = task.await;
    }

    assert!(
        fewest_available >= 3,
        "comets available during the roll fell to {fewest_available} (maxUnavailable 0)"
    );
    let mut closes: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
    let mut reconnects = 0;
    for (first_pod, sessions, _) in &clients {
        let sessions = sessions.lock().expect("sessions").clone();
        reconnects += sessions.len() - 1;
        // Over all its connections, with resume: every room push once and
        // in order (a push sent twice under one number may show twice).
        let all: Vec<u64> = sessions
            .iter()
            .flat_map(|s| s.received.iter().copied())
            .collect();
        let mut expected = 0;
        for &n in &all {
            if n + 1 == expected && retried.contains(&n) {
                continue;
            }
            assert_eq!(
                n,
                expected,
                "a client of {first_pod} lost or repeated a push across its {} connections: {all:?}",
                sessions.len()
            );
            expected = n + 1;
        }
        assert_eq!(
            expected,
            last + 1,
            "a client of {first_pod} ends at {expected}"
        );
        // A rejoin that got anything got its resume reply first, and it
        // was complete. (An attempt the server closed at once — a comet
        // starting its drain — got neither.)
        for session in sessions[1..]
            .iter()
            .filter(|s| s.resumed.is_some() || !s.received.is_empty())
        {
            assert_eq!(
                session.resumed.as_ref().map(|(recovered, _)| *recovered),
                Some(true),
                "a rejoin of a client of {first_pod} was not recovered: {:?}",
                session.resumed
            );
        }
        let first = sessions[0]
            .closed_at
            .unwrap_or_else(|| panic!("a client of {first_pod} was not drained"));
        closes.entry(first_pod.clone()).or_default().push(first);
        for (i, session) in sessions.iter().enumerate() {
            // While connected, nothing is lost and nothing is out of order.
            let mut previous: Option<u64> = None;
            for &n in &session.received {
                if let Some(p) = previous {
                    assert!(
                        n == p + 1 || (n == p && retried.contains(&n)),
                        "client of {first_pod}, connection {i}: {p} then {n} in {:?}",
                        session.received
                    );
                }
                previous = Some(n);
            }
        }
    }
    // A drain spreads its closes over drainSeconds: never all at once.
    for (pod, mut times) in closes {
        times.sort();
        let spread = times[times.len() - 1] - times[0];
        eprintln!("{pod}: {} clients drained over {spread:?}", times.len());
        assert!(
            spread >= Duration::from_secs(DRAIN_SECONDS) * 2 / 5,
            "{pod} closed its {} clients within {spread:?} (drain {DRAIN_SECONDS} s)",
            times.len()
        );
    }
    eprintln!("{reconnects} reconnects, each resumed; no client lost or repeated a push");
}

/// Connections on one comet pod, from its own metrics.
async fn connections_on(fleet: &Fleet, pod: &Pod) -> Option<f64> {
    let url = format!("http://{}:3190/metrics", pod_ip(pod));
    let response = fleet
        .http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let text = response.text().await.ok()?;
    Some(parse_metric(&text, "pushcluster_comet_connections", &[]))
}

async fn autoscaling(fleet: &Fleet, pushclusters: &Api<PushCluster>) {
    let started = Instant::now();
    let autoscaled =
        |pc: &PushCluster| pc.status.as_ref().and_then(|s| s.comet.autoscaling.clone());
    pushclusters
        .patch(
            "push",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"comet": {"autoscaling": {
                "enabled": true, "minReplicas": 2, "maxReplicas": 3, "target": 4,
                "scaleDownStabilizationSeconds": 10
            }}}})),
        )
        .await
        .expect("turn on autoscaling");
    eventually("the autoscaler to report", LONG, || async {
        autoscaled(&pushclusters.get("push").await.ok()?).map(|_| ())
    })
    .await;

    // An HPA on the scale subresource would fight the operator: refused
    // with a condition naming it, cleared once it is gone.
    let hpa = json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "comets-by-cpu", "namespace": fleet.namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": "pushcluster.io/v1alpha1", "kind": "PushCluster", "name": "push"},
            "minReplicas": 2, "maxReplicas": 5,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}}]
        }
    });
    apply_value(&fleet.client, hpa, &fleet.namespace).await;
    let conflict = |want: &'static str| {
        let pushclusters = pushclusters.clone();
        async move {
            let pc = pushclusters.get("push").await.ok()?;
            let (status, _) = condition(&pc, "AutoscalingConflict")?;
            (status == want).then_some(pc)
        }
    };
    let pc = eventually("AutoscalingConflict=True for the HPA", LONG, || {
        conflict("True")
    })
    .await;
    let message = pc
        .status
        .iter()
        .flat_map(|s| s.conditions.iter())
        .find(|c| c.type_ == "AutoscalingConflict")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("comets-by-cpu"), "{message}");
    let hpas: Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler> =
        Api::namespaced(fleet.client.clone(), &fleet.namespace);
    hpas.delete("comets-by-cpu", &DeleteParams::default())
        .await
        .expect("delete the HPA");
    eventually("AutoscalingConflict=False without the HPA", LONG, || {
        conflict("False")
    })
    .await;

    // What a user watching the fleet sees, once a second, for the note.
    let (timeline_stop, mut timeline_stopped) = watch::channel(false);
    let timeline = {
        let (pushclusters, client, namespace) = (
            pushclusters.clone(),
            fleet.client.clone(),
            fleet.namespace.clone(),
        );
        tokio::spawn(async move {
            let mut lines = Vec::new();
            loop {
                if let Ok(pc) = pushclusters.get("push").await
                    && let Some(status) = pc.status
                {
                    let pods = ready_pods(&client, &namespace, COMETS).await.len();
                    let scaling = status.comet.autoscaling.unwrap_or_default();
                    lines.push(format!(
                        "{:>5.1}s connections {:>4} desired {} ready comets {} ({})",
                        started.elapsed().as_secs_f64(),
                        scaling.load.unwrap_or(f64::NAN),
                        scaling.desired_replicas,
                        pods,
                        scaling.reason
                    ));
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = timeline_stopped.changed() => return lines,
                }
            }
        })
    };

    // 10 connections at 4 per comet want 3 comets.
    let before = fleet.comet_names().await;
    assert_eq!(before.len(), 2);
    let mut crowd = Vec::new();
    for i in 0..10 {
        crowd.push(
            TcpClient::auth(
                fleet.comet_tcp,
                json!({"token": token(4000 + i, &format!("crowd-{i}"), "live://crowd")}),
            )
            .await,
        );
    }
    let new_pod = eventually("a third comet for 10 connections", LONG, || async {
        let pods = fleet.comet_pods().await;
        let pc = pushclusters.get("push").await.ok()?;
        (pods.len() == 3 && autoscaled(&pc)?.desired_replicas == 3)
            .then(|| pods.into_iter().find(|p| !before.contains(&p.name_any())))
            .flatten()
    })
    .await;
    let new_ip = pod_ip(&new_pod).to_string();
    // Jobs deliver room pushes to the comets their EndpointSlice watch
    // knows; one published before they see the new comet never reaches it
    // (goim's behaviour for a client on a comet job does not know yet).
    fleet.jobs_see(3, 2).await;

    // New connections go where /goim/nodes/weighted sends them: the new
    // comet, which has none.
    eventually(
        "the new comet first in /goim/nodes/weighted",
        LONG,
        || async {
            let nodes = fleet.get("/goim/nodes/weighted").await;
            (nodes["data"]["nodes"][0].as_str() == Some(new_ip.as_str())).then_some(())
        },
    )
    .await;
    let mut stayed = Vec::new();
    for i in 0..4 {
        stayed.push(
            TcpClient::auth(
                SocketAddr::new(pod_ip(&new_pod), 3101),
                json!({"token": token(5000 + i, &format!("stay-{i}"), "live://stay")}),
            )
            .await,
        );
    }
    assert_eq!(connections_on(fleet, &new_pod).await, Some(4.0));

    // The crowd leaves while numbered pushes reach the clients that stay.
    let mut pushed = 0u64;
    let path = "/goim/push/room?operation=1000&type=live&room=stay";
    fleet.push_ok(path, &pushed.to_string()).await;
    pushed += 1;
    drop(crowd);
    let deployments: Api<Deployment> = Api::namespaced(fleet.client.clone(), &fleet.namespace);
    let mut lowest = i32::MAX;
    let scaled_down = async {
        loop {
            fleet.push_ok(path, &pushed.to_string()).await;
            pushed += 1;
            // Down only: a step taken is never undone (no flapping).
            let replicas = deployments
                .get("push-comet")
                .await
                .ok()
                .and_then(|d| d.spec?.replicas)
                .unwrap_or(i32::MAX);
            assert!(
                replicas <= lowest || lowest == i32::MAX,
                "comets went back up from {lowest} to {replicas} while the load stayed low"
            );
            lowest = lowest.min(replicas);
            let names = fleet.comet_names().await;
            let all: Api<Pod> = Api::namespaced(fleet.client.clone(), &fleet.namespace);
            let listed = all
                .list(&ListParams::default().labels(COMETS))
                .await
                .map(|l| l.items.len())
                .unwrap_or(0);
            if listed == 2 && names.len() == 2 {
                return names;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let Ok(left) = tokio::time::timeout(LONG, scaled_down).await else {
        let pc = pushclusters.get("push").await.expect("PushCluster");
        panic!(
            "not back to 2 comets once the crowd left; status: {:?}",
            pc.status.map(|s| s.comet)
        );
    };
    assert!(
        left.contains(&new_pod.name_any()),
        "the comet holding the clients that stayed was kept: {left:?}"
    );
    let pc = pushclusters.get("push").await.expect("PushCluster");
    let scaling = autoscaled(&pc).expect("autoscaling status");
    assert_eq!(scaling.desired_replicas, 2);
    assert!(scaling.last_scale_time.is_some());

    // Every client that stayed got every push, in order. Pushes may come
    // late, not lost: a job's call to a comet that has just exited can
    // wait out `job.delivery.timeout` before discovery drops it, and a
    // room's pushes keep their order behind it.
    for client in &mut stayed {
        let mut got = Vec::new();
        while got.len() < pushed as usize {
            let frame = client
                .try_recv(Duration::from_secs(60))
                .await
                .unwrap_or_else(|| panic!("push {} of {pushed} never came: {got:?}", got.len()));
            if let Ok(n) = body(&frame).parse::<u64>() {
                got.push(n);
            }
        }
        assert_eq!(got, (0..pushed).collect::<Vec<_>>(), "a client that stayed");
    }
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(fleet.client.clone(), &fleet.namespace);
    let reasons: BTreeSet<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.contains("ScaledUp") && reasons.contains("ScaledDown"),
        "an Event for each scaling step: {reasons:?}"
    );
    let _ = timeline_stop.send(true);
    for line in timeline.await.expect("timeline") {
        eprintln!("  {line}");
    }
    eprintln!("  {pushed} pushes to the clients that stayed, none lost");

    // Jobs by stream lag and logic by push requests/s: idle, both go down
    // to their minimum once the (short) window has passed.
    let idle = json!({"enabled": true, "minReplicas": 1, "maxReplicas": 2, "target": 1000,
                      "scaleDownStabilizationSeconds": 4});
    pushclusters
        .patch(
            "push",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"job": {"autoscaling": idle}, "logic": {"autoscaling": idle}}}),
            ),
        )
        .await
        .expect("autoscale jobs and logic");
    let scaled_to_one = eventually("jobs and logic scaled down to 1", LONG, || async {
        let pc = pushclusters.get("push").await.ok()?;
        let status = pc.status?;
        let (job, logic) = (status.job.autoscaling?, status.logic.autoscaling?);
        for name in ["push-job", "push-logic"] {
            let replicas = deployments.get(name).await.ok()?.spec?.replicas;
            if replicas != Some(1) {
                return None;
            }
        }
        (job.desired_replicas == 1 && logic.desired_replicas == 1).then_some((job, logic))
    })
    .await;
    eprintln!(
        "  job: {} | logic: {}",
        scaled_to_one.0.reason, scaled_to_one.1.reason
    );

    // Off again: the spec's replicas apply.
    pushclusters
        .patch(
            "push",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "comet": {"autoscaling": null},
                "job": {"autoscaling": null},
                "logic": {"autoscaling": null}
            }})),
        )
        .await
        .expect("turn off autoscaling");
    eventually("autoscaling off, spec replicas back", LONG, || async {
        let pc = pushclusters.get("push").await.ok()?;
        let status = pc.status.clone()?;
        let off = autoscaled(&pc).is_none()
            && status.job.autoscaling.is_none()
            && status.logic.autoscaling.is_none();
        (off && status.logic.ready == "2/2" && status.job.ready == "2/2").then_some(())
    })
    .await;
}

async fn pause_and_resume(fleet: &Fleet, pushclusters: &Api<PushCluster>) {
    let deployments: Api<Deployment> = Api::namespaced(fleet.client.clone(), &fleet.namespace);
    pushclusters
        .patch(
            "push",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true, "comet": {"replicas": 3}}})),
        )
        .await
        .expect("pause");
    eventually("ReconciliationPaused=True", LONG, || async {
        let pc = pushclusters.get("push").await.ok()?;
        (condition(&pc, "ReconciliationPaused")
            .map(|c| c.0)
            .as_deref()
            == Some("True"))
        .then_some(())
    })
    .await;
    // What a pause promises is an absence: give a reconcile time to (not) act.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let replicas = deployments
        .get("push-comet")
        .await
        .expect("comet")
        .spec
        .and_then(|s| s.replicas);
    assert_eq!(replicas, Some(2), "paused: children unchanged");
    pushclusters
        .patch(
            "push",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .expect("resume");
    fleet.wait_available(3).await;
}

async fn everything_is_gone(client: &Client, namespace: &str) {
    let by_instance = ListParams::default().labels("app.kubernetes.io/instance=push");
    let count = |n: Result<usize, kube::Error>| n.ok();
    eventually(
        "every child of the PushCluster to be gone",
        LONG,
        || async {
            let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
            let services: Api<Service> = Api::namespaced(client.clone(), namespace);
            let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
            let roles: Api<Role> = Api::namespaced(client.clone(), namespace);
            let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
            let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
            let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let left = [
                count(deployments.list(&by_instance).await.map(|l| l.items.len()))?,
                count(services.list(&by_instance).await.map(|l| l.items.len()))?,
                count(config_maps.list(&by_instance).await.map(|l| l.items.len()))?,
                count(accounts.list(&by_instance).await.map(|l| l.items.len()))?,
                count(roles.list(&by_instance).await.map(|l| l.items.len()))?,
                count(bindings.list(&by_instance).await.map(|l| l.items.len()))?,
                count(budgets.list(&by_instance).await.map(|l| l.items.len()))?,
                count(secrets.list(&by_instance).await.map(|l| l.items.len()))?,
                count(pods.list(&by_instance).await.map(|l| l.items.len()))?,
            ];
            (left.iter().sum::<usize>() == 0).then_some(())
        },
    )
    .await;
}

/// A logic and a job pod logged that the kernel took their
/// `runtime.scheduler_slice` (not refused by the runtime's default seccomp
/// profile); a comet, whose section has none, did not ask.
async fn scheduler_slice_was_set(client: &Client, namespace: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for (component, sliced) in [("comet", false), ("logic", true), ("job", true)] {
        let selector =
            format!("app.kubernetes.io/instance=push,app.kubernetes.io/component={component}");
        let listed = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .expect("list pods");
        let pod = listed.items.first().expect("a pod").name_any();
        let logs = pods
            .logs(&pod, &Default::default())
            .await
            .expect("pod logs");
        assert_eq!(
            logs.contains("scheduler slice set"),
            sliced,
            "{component} pod {pod}: scheduler slice set should be {sliced} in its log:\n{logs}"
        );
    }
}
