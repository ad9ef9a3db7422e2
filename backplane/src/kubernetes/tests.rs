//! EndpointSlice discovery against a mocked API server (tower-test): the
//! test answers each request the watcher makes and checks what it asked.

use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use pushcluster_api::config::{DiscoveryConfig, DiscoveryKind};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use super::*;

type ApiServer = Handle<Request<Body>, Response<Body>>;

fn slice(name: &str, version: &str, endpoints: &[(&str, &str, Option<bool>)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "push",
            "resourceVersion": version,
            "labels": {"kubernetes.io/service-name": "comets"}
        },
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 3109, "protocol": "TCP"}, {"name": "tcp", "port": 3101}],
        "endpoints": endpoints.iter().map(|(pod, ip, ready)| json!({
            "addresses": [ip],
            "conditions": {"ready": ready},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": "push"}
        })).collect::<Vec<_>>()
    })
}

async fn answer(server: &mut ApiServer, body: Value, expect: impl Fn(&str)) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(10), server.next_request())
        .await
        .expect("the watcher asked in time")
        .expect("a request");
    let uri = request.uri().to_string();
    expect(&uri);
    let bytes = match body {
        // A watch answer is a stream of JSON lines.
        Value::Array(events) => events
            .iter()
            .map(|e| format!("{e}\n"))
            .collect::<String>()
            .into_bytes(),
        other => serde_json::to_vec(&other).expect("json"),
    };
    send.send_response(
        Response::builder()
            .body(Body::from(bytes))
            .expect("response"),
    );
}

fn list(items: Vec<Value>, version: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSliceList",
        "metadata": {"resourceVersion": version},
        "items": items
    })
}

async fn wait_for(rx: &mut watch::Receiver<Vec<CometEndpoint>>, expected: &[(&str, &str)]) {
    let expected: Vec<CometEndpoint> = expected
        .iter()
        .map(|(id, addr)| CometEndpoint {
            id: id.to_string(),
            addr: addr.to_string(),
        })
        .collect();
    let reached = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c == expected))
        .await
        .map(|r| r.is_ok());
    assert_eq!(
        reached,
        Ok(true),
        "comets never became {expected:?}: {:?}",
        *rx.borrow()
    );
}

#[tokio::test]
async fn ready_comet_endpoints_follow_slice_changes() {
    let (service, mut server) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let config = DiscoveryConfig {
        kind: DiscoveryKind::Kubernetes,
        namespace: Some("push".into()),
        comet_service: "comets".into(),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let discovery = KubernetesDiscovery::with_client(client, &config, stop.clone());
    let mut comets = discovery.comets();

    // The initial list: two ready comets, one not ready yet.
    let first = slice(
        "comets-a",
        "10",
        &[
            ("comet-0", "10.0.0.10", Some(true)),
            ("comet-1", "10.0.0.11", None),
            ("comet-2", "10.0.0.12", Some(false)),
        ],
    );
    answer(&mut server, list(vec![first], "10"), |uri| {
        assert!(
            uri.starts_with("/apis/discovery.k8s.io/v1/namespaces/push/endpointslices?"),
            "{uri}"
        );
        assert!(
            uri.contains("labelSelector=kubernetes.io%2Fservice-name%3Dcomets"),
            "{uri}"
        );
    })
    .await;
    wait_for(
        &mut comets,
        &[("comet-0", "10.0.0.10:3109"), ("comet-1", "10.0.0.11:3109")],
    )
    .await;

    // comet-0 turns not ready (draining), comet-2 ready.
    let modified = slice(
        "comets-a",
        "11",
        &[
            ("comet-0", "10.0.0.10", Some(false)),
            ("comet-1", "10.0.0.11", Some(true)),
            ("comet-2", "10.0.0.12", Some(true)),
        ],
    );
    answer(
        &mut server,
        json!([{"type": "MODIFIED", "object": modified}]),
        |uri| {
            assert!(
                uri.contains("watch=true") && uri.contains("resourceVersion=10"),
                "{uri}"
            );
        },
    )
    .await;
    wait_for(
        &mut comets,
        &[("comet-1", "10.0.0.11:3109"), ("comet-2", "10.0.0.12:3109")],
    )
    .await;

    // A second slice appears.
    let added = slice("comets-b", "12", &[("comet-3", "10.0.0.13", Some(true))]);
    answer(
        &mut server,
        json!([{"type": "ADDED", "object": added}]),
        |uri| {
            assert!(uri.contains("watch=true"), "{uri}");
        },
    )
    .await;
    wait_for(
        &mut comets,
        &[
            ("comet-1", "10.0.0.11:3109"),
            ("comet-2", "10.0.0.12:3109"),
            ("comet-3", "10.0.0.13:3109"),
        ],
    )
    .await;

    // The first slice goes away.
    let deleted = slice("comets-a", "13", &[]);
    answer(
        &mut server,
        json!([{"type": "DELETED", "object": deleted}]),
        |_| {},
    )
    .await;
    wait_for(&mut comets, &[("comet-3", "10.0.0.13:3109")]).await;
    stop.cancel();
}

#[test]
fn endpoints_without_the_port_or_an_address_are_skipped() {
    let mut value = slice("s", "1", &[("comet-0", "fd00::1", Some(true))]);
    let parsed: EndpointSlice = serde_json::from_value(value.clone()).expect("slice");
    assert_eq!(
        ready_endpoints(&parsed, "grpc"),
        vec![Ready {
            pod: Some("comet-0".into()),
            addr: "[fd00::1]:3109".into()
        }]
    );
    assert!(ready_endpoints(&parsed, "metrics").is_empty());
    value["endpoints"][0]["addresses"] = json!([]);
    let parsed: EndpointSlice = serde_json::from_value(value).expect("slice");
    assert!(ready_endpoints(&parsed, "grpc").is_empty());
}
