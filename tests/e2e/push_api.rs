//! goim's HTTP API (PROTOCOL.md §3.2) end to end: every route, the accepts
//! filter, online counts and node lists.

use pushcluster_api::protocol::op;
use serde_json::{Value, json};

use crate::common::*;

#[tokio::test]
async fn key_pushes_reach_every_named_key_that_watches_the_op() {
    let server = Server::start();
    let mut a = TcpClient::auth(server.tcp(), json!({"key": "a", "accepts": [1000]})).await;
    let mut b = WsClient::auth(server.ws(), json!({"key": "b", "accepts": [1000]})).await;
    let mut deaf = TcpClient::auth(server.tcp(), json!({"key": "c", "accepts": [2000]})).await;
    server
        .push(
            "/goim/push/keys?operation=1000&keys=a&keys=b&keys=c&keys=offline",
            "hi",
        )
        .await;
    let push = a.recv().await;
    assert_eq!((push.op, body(&push).as_str()), (1000, "hi"));
    assert_eq!(body(&inner_frames(&b.recv_frame().await)[0]), "hi");
    deaf.expect_silence().await;
    server
        .wait_metric(
            // Counted by job, which finds a direct push's connections.
            "pushcluster_job_messages_dropped_total",
            &[("kind", "push"), ("reason", "offline")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn mid_pushes_reach_every_connection_of_the_user() {
    mid_pushes_reach_every_connection(Server::start(), true).await;
}

/// With `history.direct` off, logic looks the users up and publishes per
/// comet, as goim does, and counts those it finds offline.
#[tokio::test]
async fn mid_pushes_without_direct_streams_go_per_comet_as_in_goim() {
    let server = Server::start_with("history: {direct: {enabled: false}}");
    mid_pushes_reach_every_connection(server, false).await;
}

async fn mid_pushes_reach_every_connection(server: Server, direct_streams: bool) {
    let mut phone = TcpClient::auth(
        server.tcp(),
        json!({"mid": 9, "key": "phone", "accepts": [1000]}),
    )
    .await;
    let mut web = WsClient::auth(
        server.ws(),
        json!({"mid": 9, "key": "web", "accepts": [1000]}),
    )
    .await;
    let mut other = TcpClient::auth(server.tcp(), json!({"mid": 10, "accepts": [1000]})).await;
    server
        .push("/goim/push/mids?operation=1000&mids=9&mids=404", "for 9")
        .await;
    assert_eq!(body(&phone.recv().await), "for 9");
    assert_eq!(body(&inner_frames(&web.recv_frame().await)[0]), "for 9");
    other.expect_silence().await;
    // Mid 404 is offline: job finds nobody for its direct push, or logic
    // nobody to publish to.
    server
        .push("/goim/push/mids?operation=1000&mids=404", "for nobody")
        .await;
    let (name, labels): (&str, &[(&str, &str)]) = if direct_streams {
        (
            "pushcluster_job_messages_dropped_total",
            &[("kind", "push"), ("reason", "offline")],
        )
    } else {
        (
            "pushcluster_logic_push_targets_offline_total",
            &[("target", "mid")],
        )
    };
    server.wait_metric(name, labels, 1.0).await;
}

#[tokio::test]
async fn room_pushes_ignore_the_watch_set_and_broadcasts_respect_it() {
    let server = Server::start();
    let mut watching = TcpClient::auth(
        server.tcp(),
        json!({"room_id": "live://1", "accepts": [1000]}),
    )
    .await;
    let mut not_watching = TcpClient::auth(server.tcp(), json!({"room_id": "live://1"})).await;

    server
        .push("/goim/push/room?operation=5000&type=live&room=1", "room")
        .await;
    assert_eq!(body(&watching.recv().await), "room");
    assert_eq!(body(&not_watching.recv().await), "room");

    server.push("/goim/push/all?operation=1000", "all").await;
    assert_eq!(body(&watching.recv().await), "all");
    not_watching.expect_silence().await;

    // speed paces a broadcast but it still arrives.
    server
        .push("/goim/push/all?operation=1000&speed=100", "paced")
        .await;
    assert_eq!(body(&watching.recv().await), "paced");
}

#[tokio::test]
async fn push_bodies_are_delivered_byte_for_byte() {
    let server = Server::start();
    let mut client = TcpClient::auth(server.tcp(), json!({"room_id": "live://b"})).await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let (status, json) = server
        .post(
            "/goim/push/room?operation=1000&type=live&room=b",
            payload.clone(),
        )
        .await;
    assert_eq!((status, &json["code"]), (200, &Value::from(0)));
    let push = client.recv().await;
    assert_eq!(
        &push.body[..],
        &payload[..],
        "server frames may exceed 4112 bytes"
    );
}

#[tokio::test]
async fn bad_requests_get_code_minus_400_with_a_message() {
    let server = Server::start();
    for path in [
        "/goim/push/keys?operation=1000",
        "/goim/push/keys?operation=abc&keys=a",
        "/goim/push/mids?operation=1000&mids=x",
        "/goim/push/mids?operation=1000",
        "/goim/push/room?type=live&room=1",
        "/goim/push/room?operation=1000&room=1",
        "/goim/push/room?operation=1000&type=live",
        "/goim/push/all",
        "/goim/push/all?operation=1000&speed=-1",
    ] {
        let (status, json) = server.post(path, "m").await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(json["code"], -400, "{path}: {json}");
        assert!(
            !json["message"].as_str().unwrap_or_default().is_empty(),
            "{path}: {json}"
        );
    }
    for path in [
        "/goim/online/top?type=live",
        "/goim/online/top?limit=5",
        "/goim/online/room?type=live",
        "/goim/online/room?rooms=1",
    ] {
        let (status, json) = server.get(path).await;
        assert_eq!((status, &json["code"]), (200, &Value::from(-400)), "{path}");
    }
    let (status, json) = server.get("/goim/unknown").await;
    assert_eq!((status, &json["code"]), (404, &Value::from(-404)));
    let (status, _) = server.get("/goim/push/room").await;
    assert_eq!(status, 405);
    server
        .wait_metric(
            "pushcluster_logic_http_requests_total",
            &[("route", "/goim/push/room"), ("code", "-400")],
            3.0,
        )
        .await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let server = Server::start_with("logic: { http: { max_body: 1024 } }");
    let (status, json) = server
        .post(
            "/goim/push/room?operation=1000&type=live&room=1",
            vec![b'x'; 2048],
        )
        .await;
    assert_eq!((status, &json["code"]), (413, &Value::from(-400)));
}

#[tokio::test]
async fn online_routes_report_cluster_counts() {
    let server = Server::start();
    let _a = TcpClient::auth(server.tcp(), json!({"room_id": "live://1000"})).await;
    let _b = TcpClient::auth(server.tcp(), json!({"room_id": "live://1000"})).await;
    let _c = WsClient::auth(server.ws(), json!({"room_id": "live://1001"})).await;
    let _d = TcpClient::auth(server.tcp(), json!({"room_id": "chat://1000"})).await;

    wait_until(|| async {
        let (_, json) = server.get("/goim/online/total").await;
        json["data"]["conn_count"] == 4
    })
    .await;
    let (_, json) = server.get("/goim/online/total").await;
    assert_eq!(json["data"], json!({"conn_count": 4, "ip_count": 1}));

    let (_, json) = server.get("/goim/online/top?type=live&limit=10").await;
    assert_eq!(
        json["data"],
        json!([{"room_id": "1000", "count": 2}, {"room_id": "1001", "count": 1}])
    );
    let (_, json) = server.get("/goim/online/top?type=live&limit=1").await;
    assert_eq!(json["data"], json!([{"room_id": "1000", "count": 2}]));
    let (_, json) = server.get("/goim/online/top?type=none&limit=1").await;
    assert_eq!(json["data"], json!([]));

    let (_, json) = server
        .get("/goim/online/room?type=live&rooms=1000&rooms=1001&rooms=9")
        .await;
    assert_eq!(json["data"], json!({"1000": 2, "1001": 1, "9": 0}));
}

#[tokio::test]
async fn nodes_routes_list_the_comet() {
    let server = Server::start_with(
        r#"
comet: { addrs: ["203.0.113.7", "203.0.113.8"], region: east, weight: 20 }
logic: { regions: { east: ["10.0.0.0/8"] } }
"#,
    );
    let _client = TcpClient::auth(server.tcp(), json!({})).await;
    wait_until(|| async {
        let (_, json) = server.get("/goim/nodes/instances").await;
        json["data"][0]["metadata"]["conn_count"] == "1"
    })
    .await;
    let (_, json) = server.get("/goim/nodes/instances").await;
    let instance = &json["data"][0];
    assert_eq!(instance["hostname"], "comet-test");
    assert_eq!(instance["appid"], "goim.comet");
    assert_eq!(instance["region"], "east");
    assert_eq!(instance["metadata"]["weight"], "20");
    assert_eq!(instance["metadata"]["addrs"], "203.0.113.7,203.0.113.8");
    assert_eq!(
        instance["addrs"][0],
        format!("grpc://{}", server.addr("comet.grpc"))
    );

    let (_, json) = server.get("/goim/nodes/weighted").await;
    let data = &json["data"];
    assert_eq!(data["nodes"], json!(["203.0.113.7", "203.0.113.8"]));
    assert_eq!(
        (data["tcp_port"].clone(), data["heartbeat"].clone()),
        (json!(3101), json!(240))
    );
    let (_, json) = server.get("/goim/nodes/weighted?platform=web").await;
    assert_eq!(json["data"]["nodes"], json!(["comet-test.goim.io"]));
}

#[tokio::test]
async fn idempotency_keys_deliver_a_push_once() {
    let server = Server::start();
    let mut client = TcpClient::auth(server.tcp(), json!({"room_id": "live://i"})).await;
    let url = format!(
        "http://{}/goim/push/room?operation=1000&type=live&room=i",
        server.addr("logic.http")
    );
    for _ in 0..2 {
        let response = reqwest::Client::new()
            .post(&url)
            .header("Idempotency-Key", "order-17")
            .body("once")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
    }
    server
        .push("/goim/push/room?operation=1000&type=live&room=i", "after")
        .await;
    assert_eq!(body(&client.recv().await), "once");
    assert_eq!(body(&client.recv().await), "after");
    assert_eq!(
        server
            .metric(
                "pushcluster_logic_duplicate_publishes_total",
                &[("kind", "room")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn heartbeat_replies_and_pushes_interleave_in_order() {
    let server = Server::start();
    let mut client = TcpClient::auth(server.tcp(), json!({"room_id": "live://o"})).await;
    server
        .push("/goim/push/room?operation=1000&type=live&room=o", "first")
        .await;
    assert_eq!(body(&client.recv().await), "first");
    client.send(&frame(op::HEARTBEAT, 2, "")).await;
    assert_eq!(client.recv().await.op, op::HEARTBEAT_REPLY);
}
