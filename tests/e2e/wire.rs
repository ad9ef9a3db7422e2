//! The goim client protocol over TCP (PROTOCOL.md §1).

use pushcluster_api::protocol::op;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn auth_heartbeat_and_replies_echo_version_and_sequence() {
    let server = Server::start();
    let mut client = TcpClient::connect(server.tcp()).await;
    let mut auth = auth_frame(&json!({"mid": 1, "room_id": "live://1000", "accepts": [1000]}));
    auth.ver = 5;
    auth.seq = 77;
    client.send(&auth).await;
    let reply = client.recv().await;
    assert_eq!((reply.op, reply.ver, reply.seq), (op::AUTH_REPLY, 5, 77));
    assert!(reply.body.is_empty());

    let mut heartbeat = frame(op::HEARTBEAT, 9, "ignored body");
    heartbeat.ver = 3;
    client.send(&heartbeat).await;
    let reply = client.recv().await;
    // 20 bytes on the wire: header plus a 4-byte online count.
    assert_eq!(reply.encoded_len(), 20);
    assert_eq!(
        (reply.op, reply.ver, reply.seq),
        (op::HEARTBEAT_REPLY, 3, 9)
    );
    assert_eq!(online_of(&reply), 1);
}

#[tokio::test]
async fn heartbeat_reply_carries_the_room_online_count() {
    let server = Server::start();
    let mut a = TcpClient::auth(server.tcp(), json!({"room_id": "live://7"})).await;
    let _b = TcpClient::auth(server.tcp(), json!({"room_id": "live://7"})).await;
    let mut outside = TcpClient::auth(server.tcp(), json!({})).await;
    // Poll heartbeats until the count includes both members (reports are async).
    let mut count = 0;
    for seq in 2..200 {
        count = a.heartbeat(seq).await;
        if count == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(count, 2);
    assert_eq!(
        outside.heartbeat(2).await,
        0,
        "outside any room the count is 0"
    );
}

#[tokio::test]
async fn frames_before_auth_are_ignored_and_the_auth_reply_comes_first() {
    let server = Server::start();
    let mut client = TcpClient::connect(server.tcp()).await;
    client.send(&frame(op::HEARTBEAT, 1, "")).await;
    client.send(&frame(4, 2, "early message")).await;
    client.expect_silence().await;
    client.send(&auth_frame(&json!({"accepts": [1000]}))).await;
    let first = client.recv().await;
    assert_eq!(first.op, op::AUTH_REPLY);
    server
        .wait_metric("pushcluster_comet_frames_before_auth_total", &[], 2.0)
        .await;
}

#[tokio::test]
async fn other_ops_are_echoed_with_an_empty_body() {
    let server = Server::start();
    let mut client = TcpClient::auth(server.tcp(), json!({})).await;
    for (op, seq) in [(op::SEND_MSG, 3), (4321, 4), (op::AUTH, 5)] {
        let mut request = frame(op, seq, "payload");
        request.ver = 2;
        client.send(&request).await;
        let reply = client.recv().await;
        assert_eq!((reply.op, reply.ver, reply.seq), (op, 2, seq));
        assert!(reply.body.is_empty());
    }
    server
        .wait_metric("pushcluster_logic_upstream_frames_total", &[], 3.0)
        .await;
}

#[tokio::test]
async fn change_room_moves_the_connection_between_rooms() {
    let server = Server::start();
    let mut client = TcpClient::auth(server.tcp(), json!({"room_id": "live://1"})).await;
    client.send(&frame(op::CHANGE_ROOM, 5, "live://2")).await;
    let reply = client.recv().await;
    assert_eq!(
        (reply.op, reply.seq, body(&reply).as_str()),
        (op::CHANGE_ROOM_REPLY, 5, "live://2")
    );

    server
        .push("/goim/push/room?operation=1000&type=live&room=1", "old")
        .await;
    server
        .push("/goim/push/room?operation=1000&type=live&room=2", "new")
        .await;
    let push = client.recv().await;
    assert_eq!((push.op, body(&push).as_str()), (1000, "new"));

    // Same room again changes nothing (goim dropped a room whose only member did this).
    client.send(&frame(op::CHANGE_ROOM, 6, "live://2")).await;
    assert_eq!(client.recv().await.op, op::CHANGE_ROOM_REPLY);
    server
        .push("/goim/push/room?operation=1000&type=live&room=2", "still")
        .await;
    assert_eq!(body(&client.recv().await), "still");

    // An empty body leaves every room.
    client.send(&frame(op::CHANGE_ROOM, 7, "")).await;
    assert_eq!(client.recv().await.op, op::CHANGE_ROOM_REPLY);
    server
        .push("/goim/push/room?operation=1000&type=live&room=2", "gone")
        .await;
    client.expect_silence().await;
}

#[tokio::test]
async fn sub_and_unsub_change_which_key_pushes_arrive() {
    let server = Server::start();
    let mut client = TcpClient::auth(server.tcp(), json!({"mid": 42, "accepts": [1000]})).await;
    // 1001 is not watched: the 1000 push behind it is the next frame.
    server
        .push("/goim/push/mids?operation=1001&mids=42", "filtered")
        .await;
    server
        .push("/goim/push/mids?operation=1000&mids=42", "marker")
        .await;
    assert_eq!(body(&client.recv().await), "marker");

    client.send(&frame(op::SUB, 8, "1001,1002")).await;
    let reply = client.recv().await;
    assert_eq!(
        (reply.op, reply.seq, body(&reply).as_str()),
        (op::SUB_REPLY, 8, "1001,1002")
    );
    server
        .push("/goim/push/mids?operation=1001&mids=42", "now")
        .await;
    let push = client.recv().await;
    assert_eq!((push.op, body(&push).as_str()), (1001, "now"));

    client.send(&frame(op::UNSUB, 9, "1001")).await;
    let reply = client.recv().await;
    assert_eq!((reply.op, body(&reply).as_str()), (op::UNSUB_REPLY, "1001"));
    server
        .push("/goim/push/mids?operation=1001&mids=42", "filtered again")
        .await;
    server
        .push(
            "/goim/push/mids?operation=1002&mids=42",
            "1002 still watched",
        )
        .await;
    assert_eq!(body(&client.recv().await), "1002 still watched");

    // A list that does not parse changes nothing but is still answered.
    client.send(&frame(op::SUB, 10, "1003,abc")).await;
    assert_eq!(body(&client.recv().await), "1003,abc");
    server
        .push("/goim/push/mids?operation=1003&mids=42", "not watched")
        .await;
    server
        .push("/goim/push/mids?operation=1000&mids=42", "marker 2")
        .await;
    assert_eq!(body(&client.recv().await), "marker 2");
}

#[tokio::test]
async fn tcp_pushes_are_plain_frames_with_version_1_and_sequence_0() {
    let server = Server::start();
    let mut client = TcpClient::auth(server.tcp(), json!({"room_id": "live://3"})).await;
    for i in 0..30 {
        server
            .push(
                "/goim/push/room?operation=1000&type=live&room=3",
                &format!("m{i}"),
            )
            .await;
    }
    for i in 0..30 {
        let push = client.recv().await;
        assert_eq!(
            (push.op, push.ver, push.seq),
            (1000, 1, 0),
            "TCP never sees op 9"
        );
        assert_eq!(body(&push), format!("m{i}"), "room order kept");
    }
}

#[tokio::test]
async fn a_client_that_never_authenticates_is_closed_after_the_handshake_timeout() {
    let server = Server::start_with("comet: { protocol: { handshake_timeout: 300ms } }");
    let mut silent = TcpClient::connect(server.tcp()).await;
    silent.expect_closed().await;
    let mut chatty = TcpClient::connect(server.tcp()).await;
    chatty.send(&frame(op::HEARTBEAT, 1, "")).await;
    chatty.expect_closed().await;
    server
        .wait_metric(
            "pushcluster_comet_handshake_failures_total",
            &[("reason", "timeout")],
            2.0,
        )
        .await;
    server.wait_for_log("handshake_timeout").await;
}

#[tokio::test]
async fn a_client_without_heartbeats_is_closed_and_its_session_removed() {
    let server = Server::start_with("logic: { node: { heartbeat: 1s, heartbeat_max: 1 } }");
    let mut client = TcpClient::auth(server.tcp(), json!({"key": "quiet"})).await;
    client.expect_closed().await;
    server
        .wait_metric(
            "pushcluster_comet_disconnects_total",
            &[("reason", "heartbeat_timeout")],
            1.0,
        )
        .await;
    server
        .wait_metric(
            "pushcluster_logic_disconnects_total",
            &[("result", "removed")],
            1.0,
        )
        .await;
    // Heartbeats keep a connection alive past the timeout.
    let mut alive = TcpClient::auth(server.tcp(), json!({})).await;
    for seq in 2..8 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        alive.heartbeat(seq).await;
    }
}

#[tokio::test]
async fn invalid_auth_bodies_close_only_their_connection() {
    let server = Server::start();
    let mut neighbour = TcpClient::auth(server.tcp(), json!({"room_id": "live://9"})).await;
    for bad in ["not json", "{\"mid\":\"1\"}", ""] {
        let mut client = TcpClient::connect(server.tcp()).await;
        client.send(&frame(op::AUTH, 1, bad)).await;
        let frames = client.expect_closed().await;
        assert!(frames.is_empty(), "no reply to a refused auth: {frames:?}");
    }
    server
        .wait_metric(
            "pushcluster_comet_handshake_failures_total",
            &[("reason", "auth_rejected")],
            3.0,
        )
        .await;
    server.wait_for_log("auth_rejected").await;
    assert!(
        !server.log_contains("not json"),
        "auth bodies are never logged"
    );
    server
        .push("/goim/push/room?operation=1000&type=live&room=9", "fine")
        .await;
    assert_eq!(body(&neighbour.recv().await), "fine");
}

#[tokio::test]
async fn malformed_frames_close_only_their_connection_and_are_counted() {
    let server = Server::start();
    let mut neighbour = TcpClient::auth(server.tcp(), json!({"room_id": "live://9"})).await;
    let header = |pack_len: i32, header_len: i16| {
        let mut raw = Vec::new();
        raw.extend_from_slice(&pack_len.to_be_bytes());
        raw.extend_from_slice(&header_len.to_be_bytes());
        raw.extend_from_slice(&1i16.to_be_bytes());
        raw.extend_from_slice(&op::HEARTBEAT.to_be_bytes());
        raw.extend_from_slice(&1i32.to_be_bytes());
        raw
    };
    for (raw, reason) in [
        (header(4113, 16), "pack_len_too_large"),
        (header(100_000_000, 16), "pack_len_too_large"),
        (header(20, 12), "bad_header_len"),
        (header(3, 16), "pack_len_too_small"),
    ] {
        // Before auth and after it.
        let mut before = TcpClient::connect(server.tcp()).await;
        before.send_raw(&raw).await;
        before.expect_closed().await;
        let mut after = TcpClient::auth(server.tcp(), json!({})).await;
        after.send_raw(&raw).await;
        after.expect_closed().await;
        server
            .wait_metric(
                "pushcluster_comet_bad_frames_total",
                &[("reason", reason)],
                2.0,
            )
            .await;
    }
    server.wait_for_log("bad client input").await;
    // The largest legal frame is fine.
    let mut big = TcpClient::auth(server.tcp(), json!({})).await;
    big.send(&frame(4, 3, &"x".repeat(4096))).await;
    assert_eq!(big.recv().await.op, 4);
    server
        .push("/goim/push/room?operation=1000&type=live&room=9", "fine")
        .await;
    assert_eq!(body(&neighbour.recv().await), "fine");
}

#[tokio::test]
async fn a_newer_connection_with_the_same_key_replaces_the_older() {
    let server = Server::start();
    let mut old = TcpClient::auth(server.tcp(), json!({"key": "device", "accepts": [1000]})).await;
    let mut new = TcpClient::auth(server.tcp(), json!({"key": "device", "accepts": [1000]})).await;
    old.expect_closed().await;
    server
        .wait_metric(
            "pushcluster_comet_disconnects_total",
            &[("reason", "replaced")],
            1.0,
        )
        .await;
    // The old connection's disconnect did not remove the new session.
    server
        .push(
            "/goim/push/keys?operation=1000&keys=device",
            "to the new one",
        )
        .await;
    assert_eq!(body(&new.recv().await), "to the new one");
}
