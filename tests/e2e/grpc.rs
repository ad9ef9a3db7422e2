//! goim's gRPC services, called the way goim's job and comet call them.

use std::net::SocketAddr;

use bytes::Bytes;
use pushcluster_api::pb::comet::comet_client::CometClient;
use pushcluster_api::pb::comet::{BroadcastReq, BroadcastRoomReq, PushMsgReq, RoomsReq};
use pushcluster_api::pb::logic::logic_client::LogicClient;
use pushcluster_api::pb::logic::{ConnectReq, DisconnectReq, NodesReq, OnlineReq};
use pushcluster_api::pb::protocol::Proto;
use pushcluster_api::protocol::{Frame, RawBatch};
use serde_json::json;
use tonic::transport::Channel;

use crate::common::*;

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("gRPC connect")
}

fn raw(op: i32, body: &str) -> Proto {
    let mut batch = RawBatch::default();
    batch.push(op, body.as_bytes());
    batch.finish().into()
}

#[tokio::test]
async fn comet_service_pushes_like_goims_job() {
    let server = Server::start();
    let mut comet = CometClient::new(channel(server.addr("comet.grpc")).await);
    let mut tcp = TcpClient::auth(
        server.tcp(),
        json!({"key": "k", "room_id": "live://g", "accepts": [1000]}),
    )
    .await;
    let mut ws = WsClient::auth(
        server.ws(),
        json!({"room_id": "live://g", "accepts": [1000]}),
    )
    .await;

    comet
        .push_msg(PushMsgReq {
            keys: vec!["k".into(), "unknown".into()],
            proto_op: 1000,
            proto: Some(raw(1000, "by key")),
            ..Default::default()
        })
        .await
        .expect("PushMsg");
    assert_eq!(body(&tcp.recv().await), "by key");

    let mut batch = RawBatch::default();
    batch.push(1000, b"one");
    batch.push(1001, b"two");
    comet
        .broadcast_room(BroadcastRoomReq {
            room_id: "live://g".into(),
            proto: Some(batch.finish().into()),
            ..Default::default()
        })
        .await
        .expect("BroadcastRoom");
    let (one, two) = (tcp.recv().await, tcp.recv().await);
    assert_eq!(
        (one.op, body(&one).as_str(), two.op, body(&two).as_str()),
        (1000, "one", 1001, "two")
    );
    let inner = inner_frames(&ws.recv_frame().await);
    assert_eq!(
        inner.len(),
        2,
        "one WebSocket message holds the whole batch"
    );

    comet
        .broadcast(BroadcastReq {
            proto_op: 1000,
            proto: Some(raw(1000, "everyone")),
            speed: 0,
            ..Default::default()
        })
        .await
        .expect("Broadcast");
    assert_eq!(body(&tcp.recv().await), "everyone");
    assert_eq!(body(&inner_frames(&ws.recv_frame().await)[0]), "everyone");

    // A non-op-9 proto is written as a frame of its own on both transports.
    let frame = Frame {
        ver: 1,
        op: 1000,
        seq: 0,
        body: Bytes::from_static(b"plain"),
    };
    comet
        .push_msg(PushMsgReq {
            keys: vec!["k".into()],
            proto_op: 1000,
            proto: Some(frame.into()),
            ..Default::default()
        })
        .await
        .expect("PushMsg plain");
    let push = tcp.recv().await;
    assert_eq!((push.op, body(&push).as_str()), (1000, "plain"));

    let rooms = comet.rooms(RoomsReq {}).await.expect("Rooms").into_inner();
    assert_eq!(rooms.rooms.get("live://g"), Some(&true));
}

#[tokio::test]
async fn comet_service_rejects_incomplete_requests() {
    let server = Server::start();
    let mut comet = CometClient::new(channel(server.addr("comet.grpc")).await);
    let status = comet
        .push_msg(PushMsgReq {
            keys: vec![],
            proto_op: 1,
            proto: Some(raw(1, "x")),
            ..Default::default()
        })
        .await
        .expect_err("no keys");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = comet
        .broadcast_room(BroadcastRoomReq {
            room_id: "live://1".into(),
            proto: None,
            ..Default::default()
        })
        .await
        .expect_err("no proto");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = comet
        .broadcast_room(BroadcastRoomReq {
            room_id: String::new(),
            proto: Some(raw(1, "x")),
            ..Default::default()
        })
        .await
        .expect_err("no room");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn comet_service_drops_redelivered_messages_and_fences_old_owners() {
    let server = Server::start();
    let mut comet = CometClient::new(channel(server.addr("comet.grpc")).await);
    let mut client = TcpClient::auth(server.tcp(), json!({"room_id": "live://f"})).await;
    let room = |bodies: &[&str], seqs: &[u64], generation: u64| {
        let mut batch = RawBatch::default();
        for body in bodies {
            batch.push(1000, body.as_bytes());
        }
        BroadcastRoomReq {
            room_id: "live://f".into(),
            proto: Some(batch.finish().into()),
            stream_epoch: 42,
            partition: 3,
            owner_generation: generation,
            seqs: seqs.to_vec(),
            ..Default::default()
        }
    };
    comet
        .broadcast_room(room(&["1", "2"], &[1, 2], 5))
        .await
        .expect("first");
    // A new owner redelivers 2 and delivers 3: only 3 reaches the client.
    comet
        .broadcast_room(room(&["2", "3"], &[2, 3], 6))
        .await
        .expect("redelivery");
    let bodies: Vec<String> = [
        client.recv().await,
        client.recv().await,
        client.recv().await,
    ]
    .iter()
    .map(body)
    .collect();
    assert_eq!(bodies, ["1", "2", "3"]);
    client.expect_silence().await;
    // The old owner is refused.
    let status = comet
        .broadcast_room(room(&["4"], &[4], 5))
        .await
        .expect_err("stale owner");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    server
        .wait_metric(
            "pushcluster_comet_duplicates_dropped_total",
            &[("kind", "room")],
            1.0,
        )
        .await;
    server
        .wait_metric("pushcluster_comet_stale_owner_rejected_total", &[], 1.0)
        .await;
}

#[tokio::test]
async fn logic_service_serves_goim_comets() {
    let server = Server::start();
    let mut logic = LogicClient::new(channel(server.addr("logic.grpc")).await);
    let reply = logic
        .connect(ConnectReq {
            server: "goim-comet-1".into(),
            cookie: String::new(),
            token: Bytes::from(r#"{"mid":77,"key":"gk","room_id":"live://x","accepts":[1000]}"#),
        })
        .await
        .expect("Connect")
        .into_inner();
    assert_eq!(
        (reply.mid, reply.key.as_str(), reply.room_id.as_str()),
        (77, "gk", "live://x")
    );
    assert_eq!(
        (reply.accepts, reply.heartbeat),
        (vec![1000], 480_000_000_000)
    );

    let status = logic
        .connect(ConnectReq {
            server: "c".into(),
            cookie: String::new(),
            token: Bytes::from_static(b"{"),
        })
        .await
        .expect_err("bad token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // A goim comet reports without the metadata fields.
    let reply = logic
        .renew_online(OnlineReq {
            server: "goim-comet-1".into(),
            room_count: [("live://x".to_string(), 3)].into(),
            ..Default::default()
        })
        .await
        .expect("RenewOnline")
        .into_inner();
    assert_eq!(reply.all_room_count.get("live://x"), Some(&3));

    let nodes = logic
        .nodes(NodesReq {
            platform: "web".into(),
            client_ip: "10.1.2.3".into(),
        })
        .await
        .expect("Nodes")
        .into_inner();
    assert_eq!((nodes.tcp_port, nodes.heartbeat_max), (3101, 2));
    assert!(
        nodes.nodes.contains(&"goim-comet-1.goim.io".to_string()),
        "{:?}",
        nodes.nodes
    );

    let reply = logic
        .disconnect(DisconnectReq {
            mid: 77,
            key: "gk".into(),
            server: "goim-comet-1".into(),
        })
        .await
        .expect("Disconnect")
        .into_inner();
    assert!(reply.has);
    // The goim comet's session is gone: a key push finds nobody.
    server
        .push("/goim/push/keys?operation=1000&keys=gk", "x")
        .await;
    server
        .wait_metric(
            // Counted by job, which finds a direct push's connections.
            "pushcluster_job_messages_dropped_total",
            &[("kind", "push"), ("reason", "offline")],
            1.0,
        )
        .await;
}
