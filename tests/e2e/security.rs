//! Authentication, the protected push API and comet limits, over real
//! sockets against real processes: what a refused client sees (its
//! connection closed without an auth reply) and what is counted.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pushcluster_api::protocol::op;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::common::{QUIET, Server, TcpClient, WAIT, WsClient, auth_frame, body, frame};

pub const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
const API_TOKEN: &str = "push-api-token-0123456789";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

pub fn hs256(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// Connects from `from` (any 127.x address), sends the auth frame and
/// reports whether the comet answered it (true) or closed (false).
pub async fn try_auth(addr: SocketAddr, from: IpAddr, body: &Value) -> bool {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    let Ok(mut stream) = socket.connect(addr).await else {
        return false;
    };
    if stream.write_all(&auth_frame(body).encode()).await.is_err() {
        return false;
    }
    let mut buf = BytesMut::new();
    let read = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) if buf.len() >= 16 => {
                    let op = i32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
                    return op == op::AUTH_REPLY;
                }
                Ok(_) => {}
            }
        }
    })
    .await;
    read.expect("the comet answers or closes in time")
}

fn localhost(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[tokio::test]
async fn jwt_mode_admits_what_the_token_allows_and_refuses_the_rest() {
    let server = Server::start_with(&format!(
        "logic: {{ auth: {{ mode: jwt, jwt: {{ hs256_secret: \"{SECRET}\" }} }} }}"
    ));
    let tcp = server.tcp();
    let exp = now() + 600;
    let good = hs256(
        json!({"sub": "42", "exp": exp, "room": "live://1", "accepts": [1000]}),
        SECRET,
    );

    // The token's mid, room and ops: a push to mid 42 and to its room arrive.
    let mut client = TcpClient::auth(tcp, json!({"token": good})).await;
    server
        .push("/goim/push/mids?operation=1000&mids=42", "to 42")
        .await;
    assert_eq!(body(&client.recv().await), "to 42");
    server
        .push(
            "/goim/push/room?operation=1000&type=live&room=1",
            "to the room",
        )
        .await;
    let room = client.recv().await;
    assert_eq!((room.op, body(&room).as_str()), (1000, "to the room"));

    let refused = [
        (json!({}), "missing_token"),
        (json!({"token": "not-a-jwt"}), "invalid_token"),
        (
            json!({"token": hs256(json!({"sub": "42", "exp": exp}), "another-secret-of-32-bytes-or-more!!")}),
            "invalid_token",
        ),
        (
            json!({"token": hs256(json!({"sub": "42", "exp": now() - 3600}), SECRET)}),
            "expired_token",
        ),
        (json!({"token": good, "mid": 7}), "mid_mismatch"),
        (
            json!({"token": good, "room_id": "live://2"}),
            "room_forbidden",
        ),
        (
            json!({"token": good, "accepts": [1000, 1001]}),
            "accept_forbidden",
        ),
        // alg "none": an unsigned token.
        (
            json!({"token": "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiI0MiIsImV4cCI6OTk5OTk5OTk5OX0."}),
            "invalid_token",
        ),
    ];
    for (auth, reason) in &refused {
        assert!(
            !try_auth(tcp, localhost(1), auth).await,
            "{reason}: {auth} was admitted"
        );
    }
    for reason in [
        "missing_token",
        "expired_token",
        "mid_mismatch",
        "room_forbidden",
        "accept_forbidden",
    ] {
        server
            .wait_metric(
                "pushcluster_logic_connects_total",
                &[("result", reason)],
                1.0,
            )
            .await;
    }
    server
        .wait_metric(
            "pushcluster_logic_connects_total",
            &[("result", "invalid_token")],
            3.0,
        )
        .await;
    // The connection admitted before is untouched by the refusals.
    client.heartbeat(2).await;
    assert!(!server.log_contains(&good), "a token was logged");
}

#[tokio::test]
async fn jwt_public_keys_are_reloaded_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("jwt.pub");
    let first = rcgen::KeyPair::generate().expect("P-256 key");
    let second = rcgen::KeyPair::generate().expect("P-256 key");
    std::fs::write(&key_file, first.public_key_pem()).expect("write key");
    let server = Server::start_with(&format!(
        "logic: {{ auth: {{ mode: jwt, jwt: {{ public_key_files: [\"{}\"], reload_interval: 100ms }} }} }}",
        key_file.display()
    ));
    let es256 = |key: &rcgen::KeyPair| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &json!({"sub": 5, "exp": now() + 600}),
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("EC key"),
        )
        .expect("sign")
    };
    let (by_first, by_second) = (es256(&first), es256(&second));
    assert!(
        try_auth(server.tcp(), localhost(1), &json!({"token": by_first})).await,
        "{}",
        server.logs().join("\n")
    );
    assert!(!try_auth(server.tcp(), localhost(1), &json!({"token": by_second})).await);

    // Rotate the key as a Secret update would: write aside, rename over.
    let staged = dir.path().join("jwt.pub.new");
    std::fs::write(&staged, second.public_key_pem()).expect("write key");
    std::fs::rename(&staged, &key_file).expect("rotate");
    // Keys are looked at in the background every 100 ms.
    let deadline = std::time::Instant::now() + WAIT;
    while !try_auth(server.tcp(), localhost(1), &json!({"token": by_second})).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the new key was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.log_contains("JWT keys reloaded"));
    assert!(!try_auth(server.tcp(), localhost(1), &json!({"token": by_first})).await);
}

#[tokio::test]
async fn rs256_tokens_verify_against_a_public_key_file() {
    // A key pair made for this test only (tests/e2e/fixtures).
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/fixtures");
    let server = Server::start_with(&format!(
        "logic: {{ auth: {{ mode: jwt, jwt: {{ public_key_files: [\"{fixtures}/jwt-rs256-test-only.pub\"], issuer: backend }} }} }}"
    ));
    let private = std::fs::read(format!("{fixtures}/jwt-rs256-test-only.key")).expect("key");
    let rs256 = |claims: Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(&private).expect("RSA key"),
        )
        .expect("sign")
    };
    let good = rs256(json!({"sub": "8", "exp": now() + 600, "iss": "backend"}));
    assert!(try_auth(server.tcp(), localhost(1), &json!({"token": good})).await);
    let other_issuer = rs256(json!({"sub": "8", "exp": now() + 600, "iss": "someone"}));
    assert!(!try_auth(server.tcp(), localhost(1), &json!({"token": other_issuer})).await);
    // The public key is not an HS256 secret: an HS256 token "signed" with
    // the key's PEM text is refused (algorithm confusion).
    let pem = std::fs::read_to_string(format!("{fixtures}/jwt-rs256-test-only.pub")).expect("pub");
    let confused = hs256(
        json!({"sub": "8", "exp": now() + 600, "iss": "backend"}),
        &pem,
    );
    assert!(!try_auth(server.tcp(), localhost(1), &json!({"token": confused})).await);
}

/// A business backend's auth webhook: allows token "good" as mid 77 in
/// room live://77, denies "bad", answers "slow" too late.
async fn webhook() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    use axum::routing::post;
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/auth",
        post(move |headers: axum::http::HeaderMap, axum::Json(request): axum::Json<Value>| {
            let seen_tx = seen_tx.clone();
            async move {
                let authorized = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    == Some("Bearer hook-secret");
                let token = request["body"]["token"].as_str().unwrap_or_default().to_string();
                let _ = seen_tx.send(request);
                if !authorized {
                    return axum::Json(json!({"allow": false, "reason": "who are you"}));
                }
                match token.as_str() {
                    "good" => axum::Json(
                        json!({"allow": true, "mid": 77, "room_id": "live://77", "accepts": [1000]}),
                    ),
                    "slow" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        axum::Json(json!({"allow": true}))
                    }
                    _ => axum::Json(json!({"allow": false, "reason": "unknown token"})),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

#[tokio::test]
async fn webhook_mode_allows_overrides_and_denies() {
    let (hook, mut seen) = webhook().await;
    let server = Server::start_with(&format!(
        "logic: {{ auth: {{ mode: webhook, webhook: {{ url: \"http://{hook}/auth\", timeout: 500ms, bearer_token: hook-secret }} }} }}"
    ));
    let mut client = TcpClient::auth(server.tcp(), json!({"token": "good", "mid": 1})).await;
    let request = seen.recv().await.expect("the webhook was asked");
    assert_eq!(request["body"]["token"], "good");
    assert_eq!(request["body"]["mid"], 1);
    assert!(request["comet"].is_string());
    // The webhook's mid and room win over the body's.
    server
        .push("/goim/push/mids?operation=1000&mids=77", "to 77")
        .await;
    assert_eq!(body(&client.recv().await), "to 77");
    server
        .push(
            "/goim/push/room?operation=1000&type=live&room=77",
            "room 77",
        )
        .await;
    assert_eq!(body(&client.recv().await), "room 77");

    assert!(!try_auth(server.tcp(), localhost(1), &json!({"token": "bad"})).await);
    server
        .wait_metric(
            "pushcluster_logic_connects_total",
            &[("result", "webhook_denied")],
            1.0,
        )
        .await;
    let _denied = seen.recv().await.expect("asked about the bad token");

    // A WebSocket client's Cookie header reaches the webhook.
    let _ws =
        WsClient::auth_with_cookie(server.ws(), "session=abc123", json!({"token": "good"})).await;
    let request = seen.recv().await.expect("the webhook was asked");
    assert_eq!(request["cookie"], "session=abc123");
    assert!(!try_auth(server.tcp(), localhost(1), &json!({"token": "slow"})).await);
    server
        .wait_metric(
            "pushcluster_logic_connects_total",
            &[("result", "webhook_error")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn the_push_api_needs_a_bearer_token_but_node_lookup_does_not() {
    let server = Server::start_with(&format!(
        "logic: {{ api: {{ tokens: [\"{API_TOKEN}\"] }} }}"
    ));
    let url = |path: &str| format!("http://{}{path}", server.addr("logic.http"));
    let http = reqwest::Client::new();
    let push = "/goim/push/all?operation=1000";
    for authorization in [None, Some("Bearer wrong-token-0123456789"), Some(API_TOKEN)] {
        let mut request = http.post(url(push)).body("x");
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status().as_u16(), 401, "{authorization:?}");
        assert_eq!(
            response
                .headers()
                .get("www-authenticate")
                .map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
        let answer: Value = response.json_body().await;
        assert_eq!(answer["code"], -401);
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let response = http
        .post(url(push))
        .header("authorization", format!("Bearer {API_TOKEN}"))
        .body("x")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json_body().await;
    assert_eq!(answer["code"], 0);
    let online = http
        .get(url("/goim/online/total"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        online.status().as_u16(),
        401,
        "online counts are private too"
    );
    let nodes = http
        .get(url("/goim/nodes/weighted?platform=web"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        nodes.status().as_u16(),
        200,
        "clients look up nodes without a token"
    );
    server
        .wait_metric(
            "pushcluster_logic_http_requests_total",
            &[("route", "/goim/push/all"), ("status", "401")],
            3.0,
        )
        .await;
}

/// reqwest's `json` feature is off in this workspace.
trait JsonBody {
    async fn json_body(self) -> Value;
}

impl JsonBody for reqwest::Response {
    async fn json_body(self) -> Value {
        serde_json::from_slice(&self.bytes().await.expect("body")).expect("JSON")
    }
}

#[test]
fn separate_processes_refuse_to_start_open_without_saying_so() {
    let run = |command: &str, yaml: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).expect("write");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_pushcluster"))
            .args([command, "--config", &path.display().to_string()])
            .output()
            .expect("run");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    for command in ["comet", "logic", "job"] {
        let (ok, stderr) = run(command, "logic: { api: { allow_unauthenticated: true } }");
        assert!(
            !ok && stderr.contains("logic.auth.mode"),
            "{command}: {stderr}"
        );
        let (ok, stderr) = run(command, "logic: { auth: { mode: none } }");
        assert!(
            !ok && stderr.contains("logic.api.tokens"),
            "{command}: {stderr}"
        );
    }
    let (ok, stderr) = run("logic", "logic: { auth: { mode: jwt } }");
    assert!(!ok && stderr.contains("logic.auth.jwt"), "{stderr}");
}

#[tokio::test]
async fn standalone_runs_open_but_says_so() {
    let server = Server::start();
    assert!(server.log_contains("logic.auth.mode is none"));
    assert!(server.log_contains("the push API is open"));
}

#[tokio::test]
async fn per_ip_limits_refuse_exactly_the_excess() {
    let server = Server::start_with(
        "comet: { limits: { max_connections_per_ip: 2, new_connections_per_second_per_ip: 0 } }",
    );
    let tcp = server.tcp();
    let mut held = vec![
        TcpClient::auth_from(tcp, localhost(1), json!({})).await,
        TcpClient::auth_from(tcp, localhost(1), json!({})).await,
    ];
    assert!(
        !try_auth(tcp, localhost(1), &json!({})).await,
        "a third from .1"
    );
    assert!(
        try_auth(tcp, localhost(2), &json!({})).await,
        "another address"
    );
    server
        .wait_metric(
            "pushcluster_comet_limited_total",
            &[("transport", "tcp"), ("limit", "max_connections_per_ip")],
            1.0,
        )
        .await;
    // A place given back is a place again.
    drop(held.pop());
    let mut admitted = false;
    for _ in 0..50 {
        if try_auth(tcp, localhost(1), &json!({})).await {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "the freed place was not given back");
    // The held connection never noticed.
    held[0].heartbeat(2).await;
}

#[tokio::test]
async fn the_connection_rate_per_ip_and_the_comet_limit_hold() {
    let server = Server::start_with(
        "comet: { limits: { max_connections: 4, new_connections_per_second_per_ip: 2 } }",
    );
    let tcp = server.tcp();
    let _a = TcpClient::auth_from(tcp, localhost(1), json!({})).await;
    let _b = TcpClient::auth_from(tcp, localhost(1), json!({})).await;
    assert!(
        !try_auth(tcp, localhost(1), &json!({})).await,
        "over 2/s from .1"
    );
    let _c = TcpClient::auth_from(tcp, localhost(2), json!({})).await;
    let _d = TcpClient::auth_from(tcp, localhost(3), json!({})).await;
    assert!(
        !try_auth(tcp, localhost(4), &json!({})).await,
        "a fifth connection"
    );
    let limited = |limit: &'static str| {
        let server = &server;
        async move {
            server
                .metric(
                    "pushcluster_comet_limited_total",
                    &[("transport", "tcp"), ("limit", limit)],
                )
                .await
        }
    };
    assert_eq!(limited("new_connections_per_second_per_ip").await, 1.0);
    assert_eq!(limited("max_connections").await, 1.0);
}

#[tokio::test]
async fn a_connection_over_its_frame_rate_is_closed_and_its_neighbours_are_not() {
    let server = Server::start_with("comet: { limits: { frames_per_second_per_connection: 5 } }");
    let mut flooder = TcpClient::auth(server.tcp(), json!({})).await;
    let mut neighbour = TcpClient::auth(server.tcp(), json!({})).await;
    let mut flood = Vec::new();
    for seq in 0..40 {
        flood.extend_from_slice(&frame(op::HEARTBEAT, seq, "").encode());
    }
    flooder.send_raw(&flood).await;
    flooder.expect_closed().await;
    server
        .wait_metric(
            "pushcluster_comet_limited_total",
            &[
                ("transport", "tcp"),
                ("limit", "frames_per_second_per_connection"),
            ],
            1.0,
        )
        .await;
    // Five heartbeats in a second are within the rate.
    for seq in 0..5 {
        neighbour.heartbeat(seq).await;
    }
    assert!(neighbour.try_recv(QUIET).await.is_none());
    assert_eq!(
        server
            .metric(
                "pushcluster_comet_limited_total",
                &[
                    ("transport", "tcp"),
                    ("limit", "frames_per_second_per_connection"),
                ],
            )
            .await,
        1.0
    );
}
