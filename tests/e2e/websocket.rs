//! The goim client protocol over WebSocket (PROTOCOL.md §1.8, §1.9).

use bytes::Bytes;
use pushcluster_api::protocol::op;
use serde_json::json;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::common::*;

#[tokio::test]
async fn websocket_clients_authenticate_heartbeat_and_get_replies() {
    let server = Server::start();
    let mut client = WsClient::auth(server.ws(), json!({"room_id": "live://1"})).await;
    client.send(&frame(op::HEARTBEAT, 2, "")).await;
    let reply = client.recv_frame().await;
    assert_eq!(
        (reply.op, reply.seq, reply.encoded_len()),
        (op::HEARTBEAT_REPLY, 2, 20)
    );

    client.send(&frame(op::CHANGE_ROOM, 3, "live://2")).await;
    let reply = client.recv_frame().await;
    assert_eq!(
        (reply.op, body(&reply).as_str()),
        (op::CHANGE_ROOM_REPLY, "live://2")
    );

    // Text messages carry frames too.
    let echo = frame(4, 4, "x").encode();
    let text = String::from_utf8(echo.to_vec()).expect("ASCII frame");
    client.send_message(Message::text(text)).await;
    let reply = client.recv_frame().await;
    assert_eq!((reply.op, reply.seq, reply.body.len()), (4, 4, 0));
}

#[tokio::test]
async fn websocket_pushes_are_op_9_batches_with_frames_inside() {
    let server = Server::start();
    let mut client = WsClient::auth(
        server.ws(),
        json!({"mid": 5, "room_id": "live://1", "accepts": [1001, 1002]}),
    )
    .await;

    server
        .push("/goim/push/mids?operation=1001&mids=5", "to mid")
        .await;
    let batch = client.recv_frame().await;
    let inner = inner_frames(&batch);
    assert_eq!(inner.len(), 1);
    assert_eq!((inner[0].op, inner[0].ver, inner[0].seq), (1001, 1, 0));
    assert_eq!(body(&inner[0]), "to mid");

    server.push("/goim/push/all?operation=1002", "to all").await;
    let inner = inner_frames(&client.recv_frame().await);
    assert_eq!((inner.len(), body(&inner[0]).as_str()), (1, "to all"));

    for i in 0..40 {
        server
            .push(
                "/goim/push/room?operation=1000&type=live&room=1",
                &format!("r{i}"),
            )
            .await;
    }
    let mut seen = Vec::new();
    while seen.len() < 40 {
        let batch = client.recv_frame().await;
        let inner = inner_frames(&batch);
        assert!(
            !inner.is_empty() && inner.len() <= 20,
            "batch of {}",
            inner.len()
        );
        seen.extend(inner.iter().map(body));
    }
    let expected: Vec<String> = (0..40).map(|i| format!("r{i}")).collect();
    assert_eq!(seen, expected, "room order kept across batches");
}

#[tokio::test]
async fn only_the_sub_path_upgrades() {
    let server = Server::start();
    match WsClient::connect_path(server.ws(), "/other").await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 404),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("/other must not upgrade"),
    }
    // The listener keeps serving; a query string on /sub is fine.
    WsClient::auth(server.ws(), json!({})).await;
    WsClient::connect_path(server.ws(), "/sub?v=1")
        .await
        .expect("query accepted");
    server
        .wait_metric(
            "pushcluster_comet_handshake_failures_total",
            &[("transport", "websocket"), ("reason", "upgrade_failed")],
            1.0,
        )
        .await;
    server.wait_for_log("upgrade_failed").await;
}

#[tokio::test]
async fn websocket_bad_input_closes_only_that_connection() {
    let server = Server::start();
    let mut neighbour = WsClient::auth(server.ws(), json!({"room_id": "live://8"})).await;

    // packLen says 21 but the message holds 22 bytes.
    let mut longer = frame(4, 1, "hello").encode().to_vec();
    longer.push(b'!');
    // A message shorter than a header.
    let short = Bytes::from_static(b"\x00\x00\x00\x10\x00\x10");
    // packLen larger than the client limit, in a message that is small.
    let mut huge = frame(4, 1, "").encode().to_vec();
    huge[0..4].copy_from_slice(&5000i32.to_be_bytes());
    // A message over the limit itself.
    let oversized = frame(4, 1, &"y".repeat(5000)).encode();

    for (payload, reason) in [
        (Bytes::from(longer), "payload_mismatch"),
        (short, "truncated"),
        (Bytes::from(huge), "pack_len_too_large"),
        (oversized, "pack_len_too_large"),
    ] {
        let mut client = WsClient::auth(server.ws(), json!({})).await;
        client.send_message(Message::Binary(payload)).await;
        client.expect_closed().await;
        server
            .wait_metric(
                "pushcluster_comet_bad_frames_total",
                &[("transport", "websocket"), ("reason", reason)],
                1.0,
            )
            .await;
    }
    server
        .push("/goim/push/room?operation=1000&type=live&room=8", "fine")
        .await;
    let inner = inner_frames(&neighbour.recv_frame().await);
    assert_eq!(body(&inner[0]), "fine");
}

#[tokio::test]
async fn tcp_and_websocket_members_of_one_room_both_receive() {
    let server = Server::start();
    let mut tcp = TcpClient::auth(server.tcp(), json!({"room_id": "live://5"})).await;
    let mut ws = WsClient::auth(server.ws(), json!({"room_id": "live://5"})).await;
    server
        .push("/goim/push/room?operation=1000&type=live&room=5", "both")
        .await;
    assert_eq!(body(&tcp.recv().await), "both");
    assert_eq!(body(&inner_frames(&ws.recv_frame().await)[0]), "both");
    let mut seq = 1;
    let mut online = 0;
    while online != 2 && seq < 200 {
        seq += 1;
        online = tcp.heartbeat(seq).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(online, 2, "the room counts members of both transports");
    assert!(ws.try_recv_frame(QUIET).await.is_none());
}

#[tokio::test]
async fn websocket_over_tls_serves_goim_clients() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert_file = dir.path().join("tls.crt");
    let key_file = dir.path().join("tls.key");
    std::fs::write(&cert_file, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).expect("write key");
    let server = Server::start_with(&format!(
        "comet: {{ websocket: {{ tls: {{ bind: [\"127.0.0.1:0\"], cert_file: {:?}, key_file: {:?} }} }} }}",
        cert_file.display().to_string(),
        key_file.display().to_string()
    ));

    let tls = tls_connect(server.addr("comet.wss"), &[cert.cert.der()]).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/sub", tls)
        .await
        .expect("upgrade over TLS");
    use futures_util::{SinkExt, StreamExt};
    ws.send(Message::Binary(
        auth_frame(&json!({"room_id": "live://tls"})).encode(),
    ))
    .await
    .expect("auth");
    let reply = ws
        .next()
        .await
        .expect("reply")
        .expect("message")
        .into_data();
    assert_eq!(&reply[8..12], &op::AUTH_REPLY.to_be_bytes());
    server
        .push(
            "/goim/push/room?operation=1000&type=live&room=tls",
            "secret",
        )
        .await;
    let push = ws.next().await.expect("push").expect("message").into_data();
    let mut buf = bytes::BytesMut::from(&push[..]);
    let batch = pushcluster_api::protocol::decode_server_stream(&mut buf)
        .expect("frame")
        .expect("whole");
    assert_eq!(body(&inner_frames(&batch)[0]), "secret");

    // A plain-text client on the TLS port is refused and counted.
    let mut plain = TcpClient::connect(server.addr("comet.wss")).await;
    plain.send(&frame(op::AUTH, 1, "{}")).await;
    plain.expect_closed().await;
    server
        .wait_metric(
            "pushcluster_comet_handshake_failures_total",
            &[("transport", "websocket"), ("reason", "tls_failed")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn a_renewed_wss_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cert_file = dir.path().join("tls.crt");
    let key_file = dir.path().join("tls.key");
    let issue = |name: &str| {
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), name.to_string()])
            .expect("cert")
    };
    // Writes aside and renames over, as a Secret volume update does.
    let install = |cert: &rcgen::CertifiedKey<rcgen::KeyPair>| {
        let (cert_new, key_new) = (dir.path().join("crt.new"), dir.path().join("key.new"));
        std::fs::write(&cert_new, cert.cert.pem()).expect("write cert");
        std::fs::write(&key_new, cert.signing_key.serialize_pem()).expect("write key");
        std::fs::rename(&key_new, &key_file).expect("rotate key");
        std::fs::rename(&cert_new, &cert_file).expect("rotate cert");
    };
    let (first, second) = (issue("first.test"), issue("second.test"));
    install(&first);
    let server = Server::start_with(&format!(
        "comet: {{ websocket: {{ tls: {{ bind: [\"127.0.0.1:0\"], cert_file: {:?}, key_file: {:?}, reload_interval: 100ms }} }} }}",
        cert_file.display().to_string(),
        key_file.display().to_string()
    ));
    // The certificate a TLS client is shown (trusting either).
    let served = || async {
        let tls = tls_connect(
            server.addr("comet.wss"),
            &[first.cert.der(), second.cert.der()],
        )
        .await;
        let (_, session) = tls.get_ref();
        session.peer_certificates().expect("a certificate")[0].clone()
    };
    assert_eq!(&served().await, first.cert.der());
    install(&second);
    // The files are looked at on a handshake, at most every 100 ms.
    let deadline = std::time::Instant::now() + WAIT;
    while &served().await != second.cert.der() {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(server.log_contains("WSS certificate reloaded"));
}

/// A TLS connection to `addr` as `localhost`, trusting `roots`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    roots: &[&rustls::pki_types::CertificateDer<'static>],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).expect("trust the test cert");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}
