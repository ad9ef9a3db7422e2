//! The comet's connection paths over real loopback sockets, with logic
//! replaced by a recording fake: the TCP frame reader (tcp.rs), the
//! WebSocket upgrade and framing (ws.rs), a connection's handshake and life
//! (conn.rs), accepting and draining (server.rs), and broadcasts (lib.rs).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use pushcluster_api::config::CometConfig;
use pushcluster_api::health::Readiness;
use pushcluster_api::link::{CometLink, LinkError, LogicLink};
use pushcluster_api::pb::comet::{BroadcastReq, BroadcastRoomReq};
use pushcluster_api::pb::logic::{
    ConnectReply, ConnectReq, DisconnectReply, DisconnectReq, HeartbeatReply, HeartbeatReq,
    HistoryMessage, HistoryReply, HistoryReq, OnlineReply, OnlineReq, ReceiveReply, ReceiveReq,
    StreamPosition,
};
use pushcluster_api::protocol::{
    Frame, RawBatch, decode_positioned_stream, decode_server_stream, op,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_util::sync::CancellationToken;

use crate::Comet;
use crate::metrics::CometMetrics;
use crate::server::CometServer;
use crate::stream_guard::StreamMark;

const WAIT: Duration = Duration::from_secs(10);

/// Logic as the comet sees it. The auth body is `MID KEY ROOM` (or `deny`);
/// every connection accepts ops 1000 and 1001.
#[derive(Default)]
struct FakeLogic {
    disconnects: Mutex<Vec<DisconnectReq>>,
    receives: Mutex<Vec<ReceiveReq>>,
    /// While set, RenewOnline waits: the comet has no first report yet.
    hold_reports: AtomicBool,
    reports_released: Notify,
    reports: AtomicUsize,
    /// The heartbeat timeout handed to clients; 0: 60 s.
    heartbeat_ms: std::sync::atomic::AtomicU64,
    /// History calls: each says it started, then waits for a reply here.
    history_calls: Mutex<Vec<HistoryReq>>,
    history_started: Notify,
    history_replies: Mutex<Option<tokio::sync::mpsc::Receiver<HistoryReply>>>,
}

#[async_trait]
impl LogicLink for FakeLogic {
    async fn connect(&self, req: ConnectReq) -> Result<ConnectReply, LinkError> {
        let body = String::from_utf8_lossy(&req.token).into_owned();
        let mut parts: Vec<&str> = body.split_whitespace().collect();
        // Trailing words: `positions`, `direct` (mid and key pushes go
        // through direct streams), `since=EPOCH/OFFSET` (of the user's),
        // `rooms=A,B` (rooms besides), `allowed=A,B` (the token's rooms).
        let (mut positions, mut direct_streams) = (false, false);
        let mut direct_since = std::collections::HashMap::new();
        let (mut rooms, mut allowed_rooms) = (Vec::new(), None);
        let list = |text: &str| text.split(',').map(str::to_string).collect::<Vec<_>>();
        while parts.len() > 3 {
            match parts.pop() {
                Some("positions") => positions = true,
                Some("direct") => direct_streams = true,
                Some(word) if word.starts_with("rooms=") => rooms = list(&word[6..]),
                Some(word) if word.starts_with("allowed=") => {
                    allowed_rooms = Some(list(&word[8..]));
                }
                Some(word) => {
                    let (epoch, offset) = word
                        .strip_prefix("since=")
                        .and_then(|at| at.split_once('/'))
                        .ok_or_else(|| LinkError::InvalidArgument(word.into()))?;
                    let position = StreamPosition {
                        epoch: epoch.parse().unwrap_or_default(),
                        offset: offset.parse().unwrap_or_default(),
                    };
                    direct_since.insert(format!("@mid:{}", parts[0]), position);
                }
                None => {}
            }
        }
        match parts.as_slice() {
            [mid, key, room] => Ok(ConnectReply {
                positions,
                since: None,
                direct_streams,
                direct_since,
                rooms,
                rooms_restricted: allowed_rooms.is_some(),
                allowed_rooms: allowed_rooms.unwrap_or_default(),
                rooms_since: Default::default(),
                mid: mid
                    .parse()
                    .map_err(|_| LinkError::InvalidArgument("mid".into()))?,
                key: key.to_string(),
                // `-`: no room.
                room_id: room.trim_matches('-').to_string(),
                accepts: vec![1000, 1001],
                heartbeat: match self.heartbeat_ms.load(Ordering::SeqCst) {
                    0 => Duration::from_secs(60),
                    ms => Duration::from_millis(ms),
                }
                .as_nanos() as i64,
            }),
            _ => Err(LinkError::Rejected(format!("refused {body:?}"))),
        }
    }

    async fn disconnect(&self, req: DisconnectReq) -> Result<DisconnectReply, LinkError> {
        self.disconnects.lock().expect("lock").push(req);
        Ok(DisconnectReply::default())
    }

    async fn heartbeat(&self, _req: HeartbeatReq) -> Result<HeartbeatReply, LinkError> {
        Ok(HeartbeatReply::default())
    }

    async fn renew_online(&self, _req: OnlineReq) -> Result<OnlineReply, LinkError> {
        while self.hold_reports.load(Ordering::SeqCst) {
            let released = self.reports_released.notified();
            if !self.hold_reports.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
        self.reports.fetch_add(1, Ordering::SeqCst);
        Ok(OnlineReply::default())
    }

    async fn receive(&self, req: ReceiveReq) -> Result<ReceiveReply, LinkError> {
        let mut receives = self.receives.lock().expect("lock");
        receives.push(req);
        Ok(ReceiveReply {
            id: receives.len().to_string(),
        })
    }

    async fn history(&self, req: HistoryReq) -> Result<HistoryReply, LinkError> {
        self.history_calls.lock().expect("lock").push(req);
        self.history_started.notify_one();
        let replies = self.history_replies.lock().expect("lock").take();
        let Some(mut replies) = replies else {
            return Err(LinkError::Unavailable("no history here".into()));
        };
        let reply = replies.recv().await;
        *self.history_replies.lock().expect("lock") = Some(replies);
        reply.ok_or_else(|| LinkError::Unavailable("no history reply".into()))
    }
}

struct Harness {
    comet: Arc<Comet>,
    logic: Arc<FakeLogic>,
    tcp: SocketAddr,
    ws: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
    force: CancellationToken,
    running: JoinHandle<()>,
}

fn config(change: impl FnOnce(&mut CometConfig)) -> CometConfig {
    let mut config = CometConfig::default();
    config.tcp.bind = vec!["127.0.0.1:0".into()];
    config.websocket.bind = vec!["127.0.0.1:0".into()];
    config.grpc.bind = "127.0.0.1:0".into();
    config.online_report_interval = Duration::from_millis(100);
    config.drain = Duration::from_millis(300);
    change(&mut config);
    config
}

async fn start_with(config: CometConfig, logic: Arc<FakeLogic>) -> Harness {
    let comet = Comet::new(
        "comet-test".into(),
        config,
        logic.clone(),
        CometMetrics::new(&prometheus::Registry::new()).expect("metrics"),
    );
    let server = CometServer::bind(comet.clone()).await.expect("bind");
    let addr = |name: &str| {
        server
            .local_addrs()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| a)
            .expect(name)
    };
    let (tcp, ws) = (addr("comet.tcp"), addr("comet.websocket"));
    let (shutdown, force, ready) = (
        CancellationToken::new(),
        CancellationToken::new(),
        Readiness::new(),
    );
    let mut accepting = server.accepting();
    let running = tokio::spawn(server.run(shutdown.clone(), force.clone(), ready.clone()));
    if !logic.hold_reports.load(Ordering::SeqCst) {
        tokio::time::timeout(WAIT, accepting.wait_for(|a| *a))
            .await
            .expect("accepting in time")
            .expect("server running");
    }
    Harness {
        comet,
        logic,
        tcp,
        ws,
        ready,
        shutdown,
        force,
        running,
    }
}

async fn start(change: impl FnOnce(&mut CometConfig)) -> Harness {
    start_with(config(change), Arc::new(FakeLogic::default())).await
}

impl Harness {
    async fn stop(self) {
        self.force.cancel();
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.running)
            .await
            .expect("stopped in time")
            .expect("server task");
    }

    /// Waits (up to [`WAIT`]) until `family{labels}` reaches `at_least`;
    /// panics with `what` otherwise.
    async fn wait_metric(&self, family: &str, labels: &[&str], at_least: u64, what: &str) {
        let reached = tokio::time::timeout(WAIT, async {
            while self.metric(family, labels) < at_least {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(reached.is_ok(), "{what}");
    }

    fn metric(&self, family: &str, labels: &[&str]) -> u64 {
        let metrics = &self.comet.metrics;
        match family {
            "bad_frames" => metrics.bad_frames.with_label_values(labels).get(),
            "handshake_failures" => metrics.handshake_failures.with_label_values(labels).get(),
            "frames_before_auth" => metrics.frames_before_auth.get(),
            "disconnects" => metrics.disconnects.with_label_values(labels).get(),
            "duplicates" => metrics.duplicates.with_label_values(labels).get(),
            other => panic!("no metric {other}"),
        }
    }
}

fn frame(op: i32, seq: i32, body: &str) -> Frame {
    Frame {
        ver: 1,
        op,
        seq,
        body: Bytes::from(body.to_string()),
    }
}

/// A raw goim TCP client.
struct Tcp {
    stream: TcpStream,
    buf: BytesMut,
}

impl Tcp {
    async fn connect(addr: SocketAddr) -> Tcp {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Tcp {
            stream,
            buf: BytesMut::new(),
        }
    }

    async fn auth(addr: SocketAddr, body: &str) -> Tcp {
        let mut client = Tcp::connect(addr).await;
        client.send(&frame(op::AUTH, 1, body)).await;
        let reply = client.recv().await.expect("auth reply");
        assert_eq!((reply.op, reply.seq), (op::AUTH_REPLY, 1));
        client
    }

    async fn send(&mut self, frame: &Frame) {
        self.stream.write_all(&frame.encode()).await.expect("write");
    }

    /// The next frame, or None when the server closed the connection.
    async fn recv(&mut self) -> Option<Frame> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(frame) = decode_server_stream(&mut self.buf).expect("valid frame") {
                    return Some(frame);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("a frame or a close in time")
    }

    async fn silent_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.recv()).await.is_err()
    }

    /// The next frame as a client with positions reads it: body and offset.
    async fn recv_positioned(&mut self) -> (i32, String, Option<u64>) {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some((frame, position)) =
                    decode_positioned_stream(&mut self.buf).expect("valid frame")
                {
                    let body = String::from_utf8_lossy(&frame.body).into_owned();
                    return (frame.op, body, position.map(|p| p.offset));
                }
                let read = self.stream.read_buf(&mut self.buf).await;
                assert!(matches!(read, Ok(n) if n > 0), "connection open");
            }
        })
        .await
        .expect("a frame in time")
    }
}

/// A complete History answer of epoch 5: the messages at `offsets`.
fn recovered(offsets: std::ops::RangeInclusive<u64>) -> HistoryReply {
    HistoryReply {
        epoch: 5,
        offset: *offsets.end(),
        messages: offsets.map(history_message).collect(),
        recovered: true,
        reason: String::new(),
    }
}

/// A room message of history whose body is its offset, op 1000.
fn history_message(offset: u64) -> HistoryMessage {
    HistoryMessage {
        offset,
        op: 1000,
        body: offset.to_string().into(),
        publish_unix_micros: 0,
    }
}

/// A comet whose logic answers History with what the test sends on the
/// returned channel (`capacity` replies may wait there).
async fn start_with_history(
    capacity: usize,
) -> (
    Harness,
    Arc<FakeLogic>,
    tokio::sync::mpsc::Sender<HistoryReply>,
) {
    let logic = Arc::new(FakeLogic::default());
    let (history, replies) = tokio::sync::mpsc::channel(capacity);
    *logic.history_replies.lock().expect("lock") = Some(replies);
    let harness = start_with(config(|_| {}), logic.clone()).await;
    (harness, logic, history)
}

/// Job's BroadcastRoom of room messages at `seqs` of epoch 5 (op 1000,
/// each body its seq), from owner `generation`, after `prev_seq`.
fn room_request(room: &str, seqs: &[u64], generation: u64, prev_seq: u64) -> BroadcastRoomReq {
    let mut batch = RawBatch::default();
    for seq in seqs {
        batch.push(1000, seq.to_string().as_bytes());
    }
    BroadcastRoomReq {
        room_id: room.into(),
        proto: Some(batch.finish().into()),
        stream_epoch: 5,
        partition: 0,
        owner_generation: generation,
        seqs: seqs.to_vec(),
        publish_unix_micros: 0,
        prev_seq,
    }
}

/// In `room`: a client with positions that joins fresh at offset 0 of
/// epoch 5 (the next History reply says so), and a goim client.
async fn positioned_and_plain(
    harness: &Harness,
    history: &tokio::sync::mpsc::Sender<HistoryReply>,
    room: &str,
) -> (Tcp, Tcp) {
    history
        .send(HistoryReply {
            epoch: 5,
            reason: "fresh".into(),
            ..HistoryReply::default()
        })
        .await
        .expect("reply");
    let mut positioned = Tcp::connect(harness.tcp).await;
    positioned
        .send(&frame(op::AUTH, 1, &format!("1 p {room} positions")))
        .await;
    assert_eq!(positioned.recv_positioned().await.0, op::AUTH_REPLY);
    assert_eq!(positioned.recv_positioned().await.0, op::RESUME_REPLY);
    let plain = Tcp::auth(harness.tcp, &format!("2 q {room}")).await;
    (positioned, plain)
}

/// Each of `offsets` (a message whose body is its offset), in order, to
/// the client with positions and to the goim client.
async fn both_get(positioned: &mut Tcp, plain: &mut Tcp, offsets: std::ops::RangeInclusive<u64>) {
    for offset in offsets {
        assert_eq!(
            positioned.recv_positioned().await,
            (1000, offset.to_string(), Some(offset))
        );
        assert_eq!(
            plain.recv().await.map(|f| f.body),
            Some(Bytes::from(offset.to_string()))
        );
    }
}

/// A room push whose previous message this comet never got (job's calls
/// here failed meanwhile): the missing ones come from History first, to
/// every member; when History no longer has them, members with positions
/// are closed to resync.
#[tokio::test]
async fn a_comet_that_missed_room_messages_fills_the_gap_from_history() {
    let (harness, logic, history) = start_with_history(4).await;
    let (mut positioned, mut plain) = positioned_and_plain(&harness, &history, "live://g").await;
    let push = |seqs: &[u64], prev_seq: u64| room_request("live://g", seqs, 1, prev_seq);
    harness
        .comet
        .broadcast_room(push(&[1, 2], 0))
        .await
        .expect("push");
    // 3 and 4 never reached this comet; 5 says its previous was 4.
    history.send(recovered(3..=5)).await.expect("reply");
    harness
        .comet
        .broadcast_room(push(&[5], 4))
        .await
        .expect("push");
    both_get(&mut positioned, &mut plain, 1..=5).await;
    assert_eq!(
        logic.history_calls.lock().expect("lock")[1].since,
        Some(StreamPosition {
            epoch: 5,
            offset: 2
        })
    );

    // 6 and 7 missed, and history no longer has them.
    history
        .send(HistoryReply {
            epoch: 5,
            recovered: false,
            offset: 8,
            reason: "expired".into(),
            ..HistoryReply::default()
        })
        .await
        .expect("reply");
    harness
        .comet
        .broadcast_room(push(&[8], 7))
        .await
        .expect("push");
    assert!(
        positioned
            .recv()
            .await
            .is_none_or(|f| f.op != 1000 || f.body != "8"),
        "the client with positions is closed, not handed a hole"
    );
    assert_eq!(plain.recv().await.map(|f| f.body), Some(Bytes::from("8")));
    assert_eq!(harness.metric("disconnects", &["tcp", "resync"]), 1);

    // A room that got no push here yet: a client with positions joined at
    // 10, and the first push says its previous was 12 (job learned of this
    // comet late). 11 and 12 come from history first.
    history
        .send(HistoryReply {
            epoch: 5,
            offset: 10,
            reason: "fresh".into(),
            ..HistoryReply::default()
        })
        .await
        .expect("reply");
    let mut late = Tcp::connect(harness.tcp).await;
    late.send(&frame(op::AUTH, 1, "3 r live://n positions"))
        .await;
    assert_eq!(late.recv_positioned().await.0, op::AUTH_REPLY);
    assert_eq!(late.recv_positioned().await.0, op::RESUME_REPLY);
    history.send(recovered(11..=12)).await.expect("reply");
    let first = BroadcastRoomReq {
        room_id: "live://n".into(),
        ..push(&[13], 12)
    };
    harness.comet.broadcast_room(first).await.expect("push");
    for offset in 11..=13 {
        assert_eq!(
            late.recv_positioned().await,
            (1000, offset.to_string(), Some(offset))
        );
    }
    harness.stop().await;
}

/// The bus redelivers unacked messages (a consumer restarted from its ack
/// floor) while job still holds the originals, so a copy may share a batch
/// with newer messages: every member still gets each message once, in
/// order, and the copies are counted as duplicates.
#[tokio::test]
async fn redelivered_copies_inside_a_newer_batch_reach_no_member_twice() {
    let (harness, _logic, history) = start_with_history(1).await;
    let (mut positioned, mut plain) = positioned_and_plain(&harness, &history, "live://r").await;
    let push = |seqs: &[u64]| {
        let request = room_request("live://r", seqs, 1, 0);
        let comet = harness.comet.clone();
        async move { comet.broadcast_room(request).await.expect("push") }
    };
    push(&[1, 2]).await;
    // 1 and 2 again, between new ones; then a batch of copies only.
    push(&[3, 1, 4, 2, 5]).await;
    push(&[4, 5]).await;
    push(&[6]).await;
    both_get(&mut positioned, &mut plain, 1..=6).await;
    assert!(positioned.silent_for(Duration::from_millis(200)).await);
    assert!(plain.silent_for(Duration::from_millis(50)).await);
    assert_eq!(harness.metric("duplicates", &["room"]), 4);
    harness.stop().await;
}

/// During a partition takeover two jobs may call at once: the old owner's
/// push fills this comet's gap from history while the new owner's push of
/// a later message arrives. The later push waits for the fill, so members
/// get the missed messages and then the later one, none taken for seen.
#[tokio::test]
async fn a_push_waits_for_the_gap_fill_of_an_earlier_one() {
    let (harness, logic, history) = start_with_history(2).await;
    let (mut positioned, mut plain) = positioned_and_plain(&harness, &history, "live://t").await;
    // The join's History call.
    logic.history_started.notified().await;
    let call = |seqs: &[u64], generation: u64, prev_seq: u64| {
        let request = room_request("live://t", seqs, generation, prev_seq);
        let comet = harness.comet.clone();
        tokio::spawn(async move { comet.broadcast_room(request).await.expect("push") })
    };
    call(&[1, 2], 1, 0).await.expect("first push");
    // The old owner's 5 names 4 as its previous: 3 and 4 never came here.
    let old_owner = call(&[5], 1, 4);
    logic.history_started.notified().await;
    let mut new_owner = call(&[6], 2, 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut new_owner)
            .await
            .is_err(),
        "the new owner's push went ahead of the gap fill"
    );
    history.send(recovered(3..=5)).await.expect("reply");
    old_owner.await.expect("old owner's push");
    new_owner.await.expect("new owner's push");
    both_get(&mut positioned, &mut plain, 1..=6).await;
    assert!(plain.silent_for(Duration::from_millis(100)).await);
    harness.stop().await;
}

/// Room messages pushed while a resuming client's history is read reach it
/// after the replay and the op-20 reply, and only those above the replay.
#[tokio::test]
async fn live_room_messages_during_a_resume_follow_the_replay_once() {
    let (harness, logic, history) = start_with_history(1).await;
    let mut client = Tcp::connect(harness.tcp).await;
    client
        .send(&frame(op::AUTH, 1, "1 k live://s positions"))
        .await;
    tokio::time::timeout(WAIT, logic.history_started.notified())
        .await
        .expect("history asked for");
    let batch = |messages: &[(&str, u64)]| {
        let mut batch = RawBatch::default();
        for (body, _) in messages {
            batch.push(1000, body.as_bytes());
        }
        let mark = StreamMark {
            epoch: 5,
            partition: 0,
            generation: 1,
            seqs: messages.iter().map(|(_, seq)| *seq).collect(),
        };
        (batch.finish(), mark)
    };
    // Live while the history is read: 10 and 11 are in the history too.
    let (live, mark) = batch(&[("10", 10), ("11", 11), ("12", 12)]);
    harness
        .comet
        .push_room("live://s", &live, Some(&mark), 0)
        .await
        .expect("push");
    history.send(recovered(9..=11)).await.expect("reply");
    assert_eq!(client.recv_positioned().await.0, op::AUTH_REPLY);
    for offset in [9, 10, 11] {
        assert_eq!(
            client.recv_positioned().await,
            (1000, offset.to_string(), Some(offset))
        );
    }
    let (op, body, _) = client.recv_positioned().await;
    assert_eq!(op, op::RESUME_REPLY);
    assert!(body.contains(r#""recovered":true"#), "{body}");
    assert_eq!(
        client.recv_positioned().await,
        (1000, "12".into(), Some(12))
    );
    // 11 again (a late live copy) is left out; 13 is new.
    let (late, mark) = batch(&[("11", 11), ("13", 13)]);
    harness
        .comet
        .push_room(
            "live://s",
            &late,
            Some(&StreamMark {
                generation: 2,
                ..mark
            }),
            0,
        )
        .await
        .expect("push");
    assert_eq!(
        client.recv_positioned().await,
        (1000, "13".into(), Some(13))
    );
    assert!(client.silent_for(Duration::from_millis(200)).await);
    harness.stop().await;
}

/// A user's direct pushes while its connection resumes the user's stream
/// come after the replay and the op-20 reply, once each, positioned in
/// the stream; a goim client of the same user gets them plain. A push
/// whose previous message never came has the client catch up first.
#[tokio::test]
async fn direct_pushes_during_a_resume_follow_the_replay_once() {
    let (harness, logic, history) = start_with_history(1).await;
    let mut plain = Tcp::auth(harness.tcp, "7 plain - direct").await;
    let mut client = Tcp::connect(harness.tcp).await;
    client
        .send(&frame(op::AUTH, 1, "7 k - positions direct since=5/8"))
        .await;
    tokio::time::timeout(WAIT, logic.history_started.notified())
        .await
        .expect("history asked for");
    assert_eq!(
        logic.history_calls.lock().expect("lock")[0],
        HistoryReq {
            room: "@mid:7".into(),
            since: Some(StreamPosition {
                epoch: 5,
                offset: 8
            }),
        }
    );
    let push = |seq: u64, generation: u64, prev_seq: u64| {
        let mut batch = RawBatch::default();
        batch.push(1000, seq.to_string().as_bytes());
        let mark = StreamMark {
            epoch: 5,
            partition: 3,
            generation,
            seqs: vec![seq],
        };
        let keys = ["k".to_string(), "plain".to_string()];
        harness
            .comet
            .push_keys(
                &keys,
                1000,
                "@mid:7",
                &batch.finish(),
                Some(&mark),
                prev_seq,
                0,
            )
            .expect("push");
    };
    // Live while the history is read: 10 is in the history too.
    push(10, 1, 0);
    push(11, 1, 10);
    history.send(recovered(9..=10)).await.expect("reply");
    assert_eq!(client.recv_positioned().await.0, op::AUTH_REPLY);
    for offset in [9, 10] {
        assert_eq!(
            client.recv_positioned().await,
            (1000, offset.to_string(), Some(offset))
        );
    }
    let (op, body, _) = client.recv_positioned().await;
    assert_eq!(op, op::RESUME_REPLY);
    assert!(body.contains(r#""room":"@mid:7""#), "{body}");
    assert!(body.contains(r#""recovered":true"#), "{body}");
    assert_eq!(
        client.recv_positioned().await,
        (1000, "11".into(), Some(11))
    );
    // A redelivery by a newer partition owner is dropped; 12 is new.
    push(11, 2, 10);
    push(12, 2, 11);
    let (frame, position) = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(decoded) = decode_positioned_stream(&mut client.buf).expect("valid frame") {
                return decoded;
            }
            let read = client.stream.read_buf(&mut client.buf).await;
            assert!(matches!(read, Ok(n) if n > 0), "connection open");
        }
    })
    .await
    .expect("a frame in time");
    let position = position.expect("positioned");
    assert_eq!(frame.body, "12");
    assert_eq!((position.stream.as_str(), position.offset), ("@mid:7", 12));
    // 13 never came here (job's call failed); 14 says it was before: the
    // client with positions catches up from history, the goim one cannot.
    push(14, 2, 13);
    history.send(recovered(13..=14)).await.expect("reply");
    for offset in [13, 14] {
        assert_eq!(
            client.recv_positioned().await,
            (1000, offset.to_string(), Some(offset))
        );
    }
    assert_eq!(client.recv_positioned().await.0, op::RESUME_REPLY);
    assert_eq!(
        logic.history_calls.lock().expect("lock")[1].since,
        Some(StreamPosition {
            epoch: 5,
            offset: 12
        })
    );
    for body in ["10", "11", "12", "14"] {
        let frame = plain.recv().await.expect("pushed");
        assert_eq!((frame.op, frame.body), (1000, Bytes::from(body)));
    }
    assert!(plain.silent_for(Duration::from_millis(200)).await);
    assert!(client.silent_for(Duration::from_millis(200)).await);
    harness.stop().await;
}

/// A connection in several rooms: rooms from its auth, joins (op 22) and
/// leaves (op 24) with their replies, the per-connection limit and the
/// token's rooms enforced — on op 12 too — and a bad request answered
/// without closing anything.
#[tokio::test]
async fn a_connection_joins_and_leaves_rooms_within_its_limit_and_token() {
    let harness = start(|config| config.limits.rooms_per_connection = 3).await;
    let mut client = Tcp::auth(
        harness.tcp,
        // goim's room and a repeat in `rooms` are joined once.
        "1 k live://a rooms=live://b,live://a,live://b allowed=live://a,live://b,live://c,live://d",
    )
    .await;
    let push = |room: &'static str| {
        let comet = harness.comet.clone();
        async move {
            let mut batch = RawBatch::default();
            batch.push(1000, room.as_bytes());
            comet
                .push_room(room, &batch.finish(), None, 0)
                .await
                .expect("push");
        }
    };
    let mut ask = async |op: i32, body: &str| {
        client.send(&frame(op, 9, body)).await;
        let reply = client.recv().await.expect("a reply");
        (reply.op, String::from_utf8_lossy(&reply.body).into_owned())
    };
    let ok = |room: &str| format!(r#"{{"ok":true,"room":"{room}"}}"#);
    let refused =
        |room: &str, reason: &str| format!(r#"{{"ok":false,"reason":"{reason}","room":"{room}"}}"#);
    assert_eq!(
        ask(op::JOIN, "live://c").await,
        (op::JOIN_REPLY, ok("live://c"))
    );
    assert_eq!(
        ask(op::JOIN, "live://x").await,
        (op::JOIN_REPLY, refused("live://x", "forbidden"))
    );
    assert_eq!(
        ask(op::JOIN, "live://d").await,
        (op::JOIN_REPLY, refused("live://d", "limit"))
    );
    assert_eq!(
        ask(op::JOIN, "live://c").await,
        (op::JOIN_REPLY, ok("live://c"))
    );
    assert_eq!(
        ask(op::JOIN, "").await,
        (op::JOIN_REPLY, refused("", "invalid"))
    );
    assert_eq!(
        ask(op::CHANGE_ROOM, "live://x").await,
        (op::CHANGE_ROOM_REPLY, refused("live://x", "forbidden"))
    );
    assert_eq!(
        ask(op::LEAVE, "live://b").await,
        (op::LEAVE_REPLY, ok("live://b"))
    );
    assert_eq!(
        ask(op::LEAVE, "live://b").await,
        (op::LEAVE_REPLY, refused("live://b", "not_member"))
    );
    let counts = harness.comet.rooms.counts();
    assert_eq!(
        (
            counts.get("live://a"),
            counts.get("live://b"),
            counts.get("live://c")
        ),
        (Some(&1), None, Some(&1))
    );
    for room in ["live://b", "live://a", "live://c"] {
        push(room).await;
    }
    for room in ["live://a", "live://c"] {
        assert_eq!(client.recv().await.map(|f| f.body), Some(Bytes::from(room)));
    }
    assert!(client.silent_for(Duration::from_millis(200)).await);
    let joins = |result| {
        harness
            .comet
            .metrics
            .room_joins
            .with_label_values(&[result])
            .get()
    };
    assert_eq!(
        (
            joins("ok"),
            joins("already"),
            joins("forbidden"),
            joins("limit"),
            joins("invalid")
        ),
        (3, 1, 2, 1, 1)
    );
    harness.stop().await;
}

/// With `upstream` on, op 4 goes to logic with the session's identity and
/// is answered op 5 with its id; too large or too fast is answered with an
/// error and never reaches logic; other ops are answered as goim does.
#[tokio::test]
async fn upstream_messages_are_answered_with_their_id_or_a_reason() {
    let harness = start(|_| {}).await;
    harness
        .comet
        .set_upstream(pushcluster_api::config::UpstreamConfig {
            enabled: true,
            max_bytes: 8,
            per_second_per_connection: 1,
            ..Default::default()
        });
    let mut client = Tcp::auth(harness.tcp, "7 k7 live://u rooms=live://v").await;
    let mut send = async |op: i32, seq: i32, body: &str| {
        client.send(&frame(op, seq, body)).await;
        let reply = client.recv().await.expect("a reply");
        (
            reply.op,
            reply.seq,
            String::from_utf8_lossy(&reply.body).into_owned(),
        )
    };
    assert_eq!(
        send(op::SEND_MSG, 1, "hi").await,
        (op::SEND_MSG_REPLY, 1, r#"{"id":"1"}"#.into())
    );
    assert_eq!(
        send(op::SEND_MSG, 2, "far too long").await,
        (op::SEND_MSG_REPLY, 2, r#"{"error":"too_large"}"#.into())
    );
    // A burst of two a second: the second goes, the third is refused.
    assert_eq!(send(op::SEND_MSG, 3, "two").await.2, r#"{"id":"2"}"#);
    assert_eq!(
        send(op::SEND_MSG, 4, "three").await.2,
        r#"{"error":"rate_limited"}"#
    );
    // Any other op: to logic, answered with the same op and no body.
    assert_eq!(send(1000, 5, "app").await, (1000, 5, String::new()));
    let receives = harness.logic.receives.lock().expect("lock").clone();
    assert_eq!(receives.len(), 3);
    let first = &receives[0];
    assert_eq!(
        (
            first.mid,
            first.key.as_str(),
            first.server.as_str(),
            first.rooms.clone()
        ),
        (
            7,
            "k7",
            "comet-test",
            vec!["live://u".to_string(), "live://v".to_string()]
        )
    );
    let sent = |result| {
        harness
            .comet
            .metrics
            .upstream_messages
            .with_label_values(&[result])
            .get()
    };
    assert_eq!(
        (sent("accepted"), sent("too_large"), sent("rate_limited")),
        (2, 1, 1)
    );
    harness.stop().await;
}

#[tokio::test]
async fn tcp_frames_split_across_reads_or_sent_together_are_all_answered() {
    let harness = start(|_| {}).await;
    let mut client = Tcp::auth(harness.tcp, "1 k1 live://1").await;
    // Three heartbeats in one write.
    let mut burst = BytesMut::new();
    for seq in 2..5 {
        burst.extend_from_slice(&frame(op::HEARTBEAT, seq, "").encode());
    }
    client.stream.write_all(&burst).await.expect("write");
    // One heartbeat a byte at a time: the reader must resume mid-header and
    // mid-body.
    for byte in frame(op::HEARTBEAT, 5, "").encode().iter() {
        client.stream.write_all(&[*byte]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for seq in 2..6 {
        let reply = client.recv().await.expect("heartbeat reply");
        assert_eq!((reply.op, reply.seq), (op::HEARTBEAT_REPLY, seq));
    }
    harness.stop().await;
}

#[tokio::test]
async fn an_oversized_tcp_frame_closes_only_its_own_connection() {
    let harness = start(|_| {}).await;
    let mut neighbour = Tcp::auth(harness.tcp, "1 k1 live://1").await;
    let mut bad = Tcp::auth(harness.tcp, "2 k2 live://1").await;
    // A header announcing a 1 GiB frame.
    let mut header = Vec::new();
    header.extend_from_slice(&(1u32 << 30).to_be_bytes());
    header.extend_from_slice(&16u16.to_be_bytes());
    header.extend_from_slice(&1u16.to_be_bytes());
    header.extend_from_slice(&op::HEARTBEAT.to_be_bytes());
    header.extend_from_slice(&7i32.to_be_bytes());
    bad.stream.write_all(&header).await.expect("write");
    assert!(bad.recv().await.is_none(), "closed");
    assert_eq!(
        harness.metric("bad_frames", &["tcp", "pack_len_too_large"]),
        1
    );
    neighbour.send(&frame(op::HEARTBEAT, 9, "")).await;
    let reply = neighbour.recv().await.expect("the neighbour is served");
    assert_eq!(reply.seq, 9);
    harness.stop().await;
}

#[tokio::test]
async fn frames_before_auth_are_ignored_and_the_auth_reply_comes_first() {
    let harness = start(|_| {}).await;
    let mut client = Tcp::connect(harness.tcp).await;
    client.send(&frame(op::HEARTBEAT, 1, "")).await;
    client.send(&frame(op::AUTH, 2, "3 k3 live://1")).await;
    let reply = client.recv().await.expect("auth reply");
    assert_eq!((reply.op, reply.seq), (op::AUTH_REPLY, 2));
    assert_eq!(harness.metric("frames_before_auth", &[]), 1);
    harness.stop().await;
}

#[tokio::test]
async fn a_client_that_does_not_authenticate_in_time_is_closed() {
    let harness = start(|c| c.protocol.handshake_timeout = Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut client = Tcp::connect(harness.tcp).await;
    assert!(client.recv().await.is_none(), "closed");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(harness.metric("handshake_failures", &["tcp", "timeout"]), 1);
    harness.stop().await;
}

#[tokio::test]
async fn a_refused_auth_closes_and_a_closed_session_is_disconnected_in_logic() {
    let harness = start(|_| {}).await;
    let mut refused = Tcp::connect(harness.tcp).await;
    refused.send(&frame(op::AUTH, 1, "deny")).await;
    assert!(refused.recv().await.is_none(), "closed without a reply");
    assert_eq!(harness.comet.connection_count(), 0);

    let client = Tcp::auth(harness.tcp, "4 k4 live://1").await;
    assert_eq!(harness.comet.connection_count(), 1);
    drop(client);
    tokio::time::timeout(WAIT, async {
        while harness.logic.disconnects.lock().expect("lock").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("Disconnect in time");
    let disconnect = harness.logic.disconnects.lock().expect("lock")[0].clone();
    assert_eq!(
        (
            disconnect.mid,
            disconnect.key.as_str(),
            disconnect.server.as_str()
        ),
        (4, "k4", "comet-test")
    );
    harness.stop().await;
}

#[tokio::test]
async fn other_ops_go_to_logic_and_are_answered_with_the_same_op() {
    let harness = start(|_| {}).await;
    let mut client = Tcp::auth(harness.tcp, "5 k5 live://1").await;
    client.send(&frame(4, 11, "hello")).await;
    let reply = client.recv().await.expect("reply");
    assert_eq!((reply.op, reply.seq, reply.body.len()), (4, 11, 0));
    let receives = harness.logic.receives.lock().expect("lock").clone();
    assert_eq!(receives.len(), 1);
    assert_eq!(receives[0].mid, 5);
    harness.stop().await;
}

#[tokio::test]
async fn websocket_serves_sub_only_and_carries_one_frame_per_message() {
    let harness = start(|_| {}).await;
    let url = |path: &str| format!("ws://{}{path}", harness.ws);
    let stream = TcpStream::connect(harness.ws).await.expect("connect");
    assert!(
        tokio_tungstenite::client_async(url("/other"), stream)
            .await
            .is_err(),
        "only /sub upgrades"
    );
    let stream = TcpStream::connect(harness.ws).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(url("/sub"), stream)
        .await
        .expect("upgrade");
    ws.send(Message::Binary(
        frame(op::AUTH, 1, "6 k6 live://1").encode(),
    ))
    .await
    .expect("send");
    let next = |payload: Message| {
        let mut buf = BytesMut::from(&payload.into_data()[..]);
        let frame = decode_server_stream(&mut buf)
            .expect("valid")
            .expect("whole frame");
        assert!(buf.is_empty(), "one frame per message");
        frame
    };
    let reply = next(ws.next().await.expect("message").expect("ok"));
    assert_eq!(reply.op, op::AUTH_REPLY);
    // Text messages carry frames too (goim accepts both).
    let heartbeat = frame(op::HEARTBEAT, 2, "").encode();
    ws.send(Message::Text(
        String::from_utf8(heartbeat.to_vec())
            .unwrap_or_default()
            .into(),
    ))
    .await
    .expect("send");
    let reply = next(ws.next().await.expect("message").expect("ok"));
    assert_eq!((reply.op, reply.seq), (op::HEARTBEAT_REPLY, 2));
    // Two frames in one message is not goim: the connection is closed.
    let mut two = BytesMut::new();
    two.extend_from_slice(&frame(op::HEARTBEAT, 3, "").encode());
    two.extend_from_slice(&frame(op::HEARTBEAT, 4, "").encode());
    ws.send(Message::Binary(two.freeze())).await.expect("send");
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "closed in time");
    harness.stop().await;
}

/// A WebSocket client of the harness, upgraded and authenticated.
async fn ws_client(harness: &Harness, auth: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(harness.ws).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/sub", harness.ws), stream)
        .await
        .expect("upgrade");
    ws.send(Message::Binary(frame(op::AUTH, 1, auth).encode()))
        .await
        .expect("auth");
    let reply = ws.next().await.expect("reply").expect("message");
    assert_eq!(ws_frame(reply).op, op::AUTH_REPLY);
    ws
}

fn ws_frame(message: Message) -> Frame {
    let mut buf = BytesMut::from(&message.into_data()[..]);
    let frame = decode_server_stream(&mut buf)
        .expect("valid")
        .expect("whole frame");
    assert!(buf.is_empty(), "one frame per message");
    frame
}

/// A raw WebSocket frame as a client sends it (tungstenite masks it).
fn ws_fragment(opcode: OpCode, part: &[u8], last: bool) -> Message {
    Message::Frame(WsFrame::message(Bytes::copy_from_slice(part), opcode, last))
}

/// Pushes one message (op 1000) to `room` on the harness's comet.
async fn push_one(harness: &Harness, room: &str, body: &[u8]) {
    let mut batch = RawBatch::default();
    batch.push(1000, body);
    harness
        .comet
        .push_room(room, &batch.finish(), None, 0)
        .await
        .expect("push");
}

/// Waits until the server ends the WebSocket connection; returns its close
/// frame's code and reason (`Some(None)`: a close frame without them),
/// `None` when it ended without a close frame.
async fn ws_closed(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
) -> Option<Option<(u16, String)>> {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return Some(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("closed in time")
}

#[tokio::test]
async fn websocket_pings_fragments_and_close_follow_rfc_6455() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let harness = start(|_| {}).await;
    let mut ws = ws_client(&harness, "1 k1 live://1").await;

    // A ping is answered with its payload.
    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .expect("ping");
    match ws.next().await.expect("pong").expect("message") {
        Message::Pong(payload) => assert_eq!(&payload[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }

    // A heartbeat in three fragments, a ping between them, is one frame.
    let heartbeat = frame(op::HEARTBEAT, 2, "").encode();
    let parts = [&heartbeat[..5], &heartbeat[5..9], &heartbeat[9..]];
    ws.send(ws_fragment(OpCode::Data(Data::Binary), parts[0], false))
        .await
        .expect("first");
    ws.send(Message::Ping(Bytes::from_static(b"mid")))
        .await
        .expect("ping");
    ws.send(ws_fragment(OpCode::Data(Data::Continue), parts[1], false))
        .await
        .expect("second");
    ws.send(ws_fragment(OpCode::Data(Data::Continue), parts[2], true))
        .await
        .expect("last");
    match ws.next().await.expect("pong").expect("message") {
        Message::Pong(payload) => assert_eq!(&payload[..], b"mid"),
        other => panic!("expected the pong first, got {other:?}"),
    }
    let reply = ws_frame(ws.next().await.expect("reply").expect("message"));
    assert_eq!((reply.op, reply.seq), (op::HEARTBEAT_REPLY, 2));

    // Pushes still arrive as binary messages after all that.
    push_one(&harness, "live://1", b"after").await;
    let batch = ws_frame(ws.next().await.expect("push").expect("message"));
    assert_eq!(batch.op, op::RAW);

    // A close is answered with the client's code, and ends the connection
    // as the client's own close.
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    })))
    .await
    .expect("close");
    assert_eq!(ws_closed(&mut ws).await, Some(Some((1001, String::new()))));
    harness
        .wait_metric(
            "disconnects",
            &["websocket", "client_closed"],
            1,
            "counted as the client's close",
        )
        .await;
    harness.stop().await;
}

#[tokio::test]
async fn websocket_protocol_violations_close_only_that_connection() {
    let harness = start(|_| {}).await;
    let mut neighbour = ws_client(&harness, "9 k9 live://1").await;
    let heartbeat = frame(op::HEARTBEAT, 2, "").encode();
    let cases: Vec<(&str, Vec<Message>, &str)> = vec![
        (
            "continuation without a message",
            vec![ws_fragment(OpCode::Data(Data::Continue), &heartbeat, true)],
            "websocket_protocol",
        ),
        (
            "a new message inside a fragmented one",
            vec![
                ws_fragment(OpCode::Data(Data::Binary), &heartbeat[..4], false),
                ws_fragment(OpCode::Data(Data::Binary), &heartbeat, true),
            ],
            "websocket_protocol",
        ),
        (
            "a reserved opcode",
            vec![ws_fragment(
                OpCode::Data(Data::Reserved(3)),
                &heartbeat,
                true,
            )],
            "websocket_protocol",
        ),
        (
            "text that is not UTF-8",
            vec![ws_fragment(OpCode::Data(Data::Text), &[0xFF, 0xFE], true)],
            "websocket_protocol",
        ),
        (
            "fragments that add up past the frame limit",
            vec![
                ws_fragment(OpCode::Data(Data::Binary), &[0; 3000], false),
                ws_fragment(OpCode::Data(Data::Continue), &[0; 3000], true),
            ],
            "pack_len_too_large",
        ),
    ];
    let mut expected = std::collections::HashMap::<&str, u64>::new();
    for (case, messages, reason) in cases {
        let mut ws = ws_client(&harness, "1 k1 live://1").await;
        for message in messages {
            // The server may close before the last one is sent.
            let _ = ws.send(message).await;
        }
        // Why, in the close frame: protocol error, and the reason's label.
        assert_eq!(
            ws_closed(&mut ws).await,
            Some(Some((1002, "bad_frame".into()))),
            "{case}"
        );
        *expected.entry(reason).or_default() += 1;
        let want = expected[reason];
        harness
            .wait_metric(
                "bad_frames",
                &["websocket", reason],
                want,
                &format!("{case}: counted as {reason}"),
            )
            .await;
    }
    // An unmasked client frame, on a raw socket.
    let mut raw = raw_ws_upgrade(&harness, b"").await;
    let mut unmasked = vec![0x82, heartbeat.len() as u8];
    unmasked.extend_from_slice(&heartbeat);
    raw.write_all(&unmasked).await.expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut rest)).await;
    assert!(rest.starts_with(&[0x88]), "a close frame: {rest:?}");

    neighbour
        .send(Message::Binary(frame(op::HEARTBEAT, 5, "").encode()))
        .await
        .expect("send");
    let reply = ws_frame(neighbour.next().await.expect("reply").expect("message"));
    assert_eq!((reply.op, reply.seq), (op::HEARTBEAT_REPLY, 5));
    harness.stop().await;
}

/// Sends a WebSocket upgrade request for /sub followed by `then` in one
/// write, and reads the 101 answer.
async fn raw_ws_upgrade(harness: &Harness, then: &[u8]) -> TcpStream {
    let mut raw = TcpStream::connect(harness.ws).await.expect("connect");
    let mut request = format!(
        "GET /sub HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        harness.ws
    )
    .into_bytes();
    request.extend_from_slice(then);
    raw.write_all(&request).await.expect("write");
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        answer.push(raw.read_u8().await.expect("answer"));
    }
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    // RFC 6455's own example key and answer.
    assert!(answer.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{answer}");
    raw
}

/// A client frame as a browser masks it.
fn masked_binary(payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![0x82, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[tokio::test]
async fn websocket_frames_sent_with_the_upgrade_request_are_read() {
    let harness = start(|_| {}).await;
    // The auth frame in the same write as the request, as a client that
    // does not wait for the 101 may send it.
    let auth = frame(op::AUTH, 1, "3 k3 live://1").encode();
    let mut raw = raw_ws_upgrade(&harness, &masked_binary(&auth)).await;
    // The auth reply: an unmasked binary frame with one goim frame.
    let mut head = [0u8; 2];
    raw.read_exact(&mut head).await.expect("frame header");
    assert_eq!(head[0], 0x82, "final binary frame");
    let mut payload = vec![0u8; usize::from(head[1])];
    raw.read_exact(&mut payload).await.expect("payload");
    let mut buf = BytesMut::from(&payload[..]);
    let reply = decode_server_stream(&mut buf)
        .expect("valid")
        .expect("frame");
    assert_eq!(reply.op, op::AUTH_REPLY);
    harness.stop().await;
}

#[tokio::test]
async fn websocket_upgrades_that_are_not_websocket_get_an_http_error() {
    let harness = start(|_| {}).await;
    for (request, status) in [
        ("GET /sub HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        ("POST /sub HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        (
            "GET /other HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "404",
        ),
        ("\x00\x01 not http at all\r\n\r\n", "400"),
    ] {
        let mut raw = TcpStream::connect(harness.ws).await.expect("connect");
        raw.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, raw.read_to_end(&mut answer))
            .await
            .expect("answered and closed in time")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer).to_string();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?}: {answer}"
        );
    }
    // A request that never ends is cut off at 16 KiB.
    let mut raw = TcpStream::connect(harness.ws).await.expect("connect");
    let long = format!("GET /sub HTTP/1.1\r\nX-Long: {}\r\n", "a".repeat(20_000));
    let _ = raw.write_all(long.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(
        harness.metric("handshake_failures", &["websocket", "upgrade_failed"]),
        5
    );
    harness.stop().await;
}

#[tokio::test]
async fn websocket_client_frames_up_to_the_limit_are_read_whole() {
    // 200 bytes and the largest goim frame (4,112): both take the 2-byte
    // extended length; a byte more is refused.
    let harness = start(|_| {}).await;
    let mut ws = ws_client(&harness, "5 k5 live://1").await;
    for (seq, body) in [(11, 184usize), (12, 4096)] {
        let message = frame(4, seq, &"b".repeat(body)).encode();
        ws.send(Message::Binary(message)).await.expect("send");
        let reply = ws_frame(ws.next().await.expect("reply").expect("message"));
        assert_eq!((reply.op, reply.seq), (4, seq));
    }
    let receives = harness.logic.receives.lock().expect("lock").clone();
    assert_eq!(
        receives
            .iter()
            .map(|r| r.proto.as_ref().map_or(0, |p| p.body.len()))
            .collect::<Vec<_>>(),
        vec![184, 4096]
    );
    let too_big = frame(4, 13, &"b".repeat(4097)).encode();
    ws.send(Message::Binary(too_big)).await.expect("send");
    assert_eq!(
        ws_closed(&mut ws).await,
        Some(Some((1002, "bad_frame".into())))
    );
    harness.stop().await;
}

#[tokio::test]
async fn websocket_frames_of_every_length_format_go_out_whole() {
    // Pushes of 100 B, 1 KB and 70 KB: 2-, 4- and 10-byte frame headers.
    let harness = start(|_| {}).await;
    let mut ws = ws_client(&harness, "1 k1 live://1").await;
    for size in [100usize, 1_000, 70_000] {
        push_one(&harness, "live://1", "x".repeat(size).as_bytes()).await;
        let batch = ws_frame(ws.next().await.expect("push").expect("message"));
        assert_eq!(batch.op, op::RAW);
        let mut inner = BytesMut::from(&batch.body[..]);
        let pushed = decode_server_stream(&mut inner)
            .expect("valid")
            .expect("frame");
        assert_eq!(pushed.body.len(), size);
    }
    harness.stop().await;
}

#[tokio::test]
async fn clients_are_served_only_after_logic_took_the_first_report() {
    let logic = Arc::new(FakeLogic::default());
    logic.hold_reports.store(true, Ordering::SeqCst);
    let harness = start_with(config(|_| {}), logic.clone()).await;
    assert!(!harness.ready.is_ready());
    let mut client = Tcp::connect(harness.tcp).await;
    client.send(&frame(op::AUTH, 1, "7 k7 live://1")).await;
    assert!(
        client.silent_for(Duration::from_millis(300)).await,
        "no answer before the first report"
    );
    logic.hold_reports.store(false, Ordering::SeqCst);
    logic.reports_released.notify_waiters();
    let reply = client.recv().await.expect("auth reply after the report");
    assert_eq!(reply.op, op::AUTH_REPLY);
    assert!(harness.ready.is_ready());
    harness.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connections_spread_over_the_drain() {
    let harness = start(|c| c.drain = Duration::from_millis(600)).await;
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(Tcp::auth(harness.tcp, &format!("{i} k{i} live://1")).await);
    }
    let started = Instant::now();
    harness.shutdown.cancel();
    let closes = clients.iter_mut().map(|client| async move {
        assert!(client.recv().await.is_none(), "closed by the drain");
        started.elapsed()
    });
    let mut closed_at = futures_util::future::join_all(closes).await;
    assert!(!harness.ready.is_ready(), "not ready while draining");
    closed_at.sort();
    assert!(
        closed_at[3] - closed_at[0] >= Duration::from_millis(300),
        "closes spread over the drain: {closed_at:?}"
    );
    tokio::time::timeout(WAIT, harness.running)
        .await
        .expect("the server stops after the drain")
        .expect("server task");
}

#[tokio::test]
async fn a_drained_websocket_client_is_told_the_server_is_going_away() {
    let harness = start(|c| c.drain = Duration::from_millis(100)).await;
    let mut ws = ws_client(&harness, "1 k1 live://1").await;
    harness.shutdown.cancel();
    // 1001: going away — reconnect, to another comet.
    assert_eq!(ws_closed(&mut ws).await, Some(Some((1001, "drain".into()))));
}

fn broadcast(body: &str, speed: i32) -> BroadcastReq {
    BroadcastReq {
        proto_op: 1000,
        proto: Some((&Frame::server(1000, Bytes::from(body.to_string()))).into()),
        speed,
        ..Default::default()
    }
}

async fn room_of_clients(harness: &Harness, count: usize) -> Vec<Tcp> {
    let mut clients = Vec::new();
    for i in 0..count {
        clients.push(Tcp::auth(harness.tcp, &format!("{i} key-{i} live://1")).await);
    }
    clients
}

#[tokio::test]
async fn a_later_broadcast_never_overtakes_a_paced_one() {
    let harness = start(|_| {}).await;
    let mut clients = room_of_clients(&harness, 16).await;
    // 16 connections at 20/s: the first broadcast takes ~0.8 s.
    harness
        .comet
        .broadcast(broadcast("first", 20))
        .await
        .expect("first");
    harness
        .comet
        .broadcast(broadcast("second", 0))
        .await
        .expect("second");
    for client in &mut clients {
        let got = [client.recv().await, client.recv().await]
            .map(|f| String::from_utf8_lossy(&f.expect("a push").body).into_owned());
        assert_eq!(got, ["first", "second"]);
    }
    harness.stop().await;
}

#[tokio::test]
async fn a_drain_delivers_queued_broadcasts_before_closing() {
    let harness = start(|c| c.drain = Duration::from_millis(100)).await;
    let mut clients = room_of_clients(&harness, 16).await;
    // Paced to take 8 s; the drain ends the pacing instead of cutting it.
    harness
        .comet
        .broadcast(broadcast("before the drain", 2))
        .await
        .expect("broadcast");
    harness.shutdown.cancel();
    for client in &mut clients {
        let frame = client.recv().await.expect("the broadcast, then the close");
        assert_eq!(&frame.body[..], b"before the drain");
        assert!(client.recv().await.is_none(), "closed by the drain");
    }
    tokio::time::timeout(WAIT, harness.running)
        .await
        .expect("stopped")
        .expect("server task");
}

#[tokio::test]
async fn a_full_broadcast_queue_refuses_and_the_retry_is_delivered() {
    let harness = start(|c| c.broadcast_queue = 1).await;
    let mut clients = room_of_clients(&harness, 4).await;
    let marked = |body: &str, speed: i32, seq: u64| BroadcastReq {
        stream_epoch: 1,
        partition: 0,
        owner_generation: 1,
        seqs: vec![seq],
        ..broadcast(body, speed)
    };
    // 4 connections at 1/s: the sender is busy for ~4 s.
    harness
        .comet
        .broadcast(marked("slow", 1, 1))
        .await
        .expect("slow");
    // Once the sender took it, the queue has one place.
    let first = clients[0].recv().await.expect("slow");
    assert_eq!(&first.body[..], b"slow");
    harness
        .comet
        .broadcast(marked("queued", 0, 2))
        .await
        .expect("queued");
    let refused = harness.comet.broadcast(marked("refused", 0, 3)).await;
    assert!(
        matches!(refused, Err(LinkError::Unavailable(_))),
        "{refused:?}"
    );
    // Job retries the same message: it is not taken for a duplicate.
    tokio::time::timeout(WAIT, async {
        while harness
            .comet
            .broadcast(marked("refused", 0, 3))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("accepted once the queue has room");
    for (i, client) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        if i > 0 {
            got.push(
                String::from_utf8_lossy(&client.recv().await.expect("push").body).into_owned(),
            );
        }
        for _ in 0..2 {
            got.push(
                String::from_utf8_lossy(&client.recv().await.expect("push").body).into_owned(),
            );
        }
        let want: &[&str] = if i > 0 {
            &["slow", "queued", "refused"]
        } else {
            &["queued", "refused"]
        };
        assert_eq!(got, want);
    }
    harness.stop().await;
}

#[tokio::test]
async fn the_tcp_reader_agrees_with_the_codec_however_the_bytes_arrive() {
    let mut stream = BytesMut::new();
    for (op, seq, body) in [
        (op::AUTH, 1, "auth"),
        (op::HEARTBEAT, 2, ""),
        (4, 3, "x".repeat(300).as_str()),
    ] {
        stream.extend_from_slice(&frame(op, seq, body).encode());
    }
    let mut expected = Vec::new();
    let mut buf = stream.clone();
    while let Some(frame) = pushcluster_api::protocol::decode_stream(&mut buf).expect("valid") {
        expected.push(frame);
    }
    for chunks in [&[][..], &[1], &[3, 7], &[16], &[15, 1, 200]] {
        let (frames, error) = crate::read_tcp_frames(&stream, chunks).await;
        assert_eq!(
            (frames, error),
            (expected.clone(), None),
            "chunks {chunks:?}"
        );
    }
    // Cut inside the last frame: the frames before it, then an error.
    let (frames, error) = crate::read_tcp_frames(&stream[..stream.len() - 5], &[4]).await;
    assert_eq!(frames, expected[..2].to_vec());
    assert!(error.is_some());
    // A header the codec refuses: the reader refuses it too.
    let mut bad = frame(op::HEARTBEAT, 1, "").encode().to_vec();
    bad[4..6].copy_from_slice(&3u16.to_be_bytes());
    let (frames, error) = crate::read_tcp_frames(&bad, &[2]).await;
    assert!(frames.is_empty());
    assert!(error.is_some(), "a header length other than 16 is refused");
}

/// A connection's task is most of an idle connection's memory
/// (docs/benchmarks.md, "Memory per connection"): the handshake, the
/// teardown and rare paths are boxed so they do not size it for the
/// connection's whole life. tokio allocates a task in steps of 128 bytes
/// with 112 bytes of its own (the task tracker's included): a future of at
/// most 784 bytes takes 896. Debug-build sizes; 2026-11-22: 2,344 (TCP)
/// and 1,992 (WebSocket) bytes; 2026-12-02: 712 and 728.
#[tokio::test]
async fn a_connection_task_stays_small() {
    let harness = start(|_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accept = async || {
        let _client = TcpStream::connect(addr).await.expect("connect");
        listener.accept().await.expect("accept")
    };
    let (stream, peer) = accept().await;
    let opening: crate::conn::Opening<crate::tcp::TcpTransport> =
        Box::pin(async move { Some((crate::tcp::TcpTransport::new(stream), String::new())) });
    let tcp = crate::conn::run(
        harness.comet.clone(),
        opening,
        peer.ip(),
        Instant::now(),
        None,
    );
    let tcp_size = std::mem::size_of_val(&tcp);
    let (stream, peer) = accept().await;
    let opening = crate::ws::opening(harness.comet.clone(), stream, peer.ip(), Instant::now());
    let ws = crate::conn::run(
        harness.comet.clone(),
        opening,
        peer.ip(),
        Instant::now(),
        None,
    );
    let ws_size = std::mem::size_of_val(&ws);
    eprintln!("SIZES tcp {tcp_size} ws {ws_size}");
    assert!(tcp_size <= 784, "TCP connection future: {tcp_size} bytes");
    assert!(
        ws_size <= 784,
        "WebSocket connection future: {ws_size} bytes"
    );
    drop((tcp, ws));
    harness.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_heartbeating_is_closed_and_its_neighbour_is_not() {
    let logic = Arc::new(FakeLogic::default());
    logic.heartbeat_ms.store(400, Ordering::SeqCst);
    let harness = start_with(config(|_| {}), logic).await;
    let mut beating = Tcp::auth(harness.tcp, "1 k1 live://1").await;
    let mut silent = Tcp::auth(harness.tcp, "2 k2 live://1").await;
    let started = Instant::now();
    let closed = async {
        assert!(silent.recv().await.is_none(), "closed");
        started.elapsed()
    };
    tokio::pin!(closed);
    let mut seq = 1;
    let waited = loop {
        tokio::select! {
            waited = &mut closed => break waited,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                seq += 1;
                beating.send(&frame(op::HEARTBEAT, seq, "")).await;
                let reply = beating.recv().await.expect("heartbeat reply");
                assert_eq!(reply.seq, seq);
            }
        }
    };
    // Closed after its deadline, within one sweep of it.
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    assert!(
        waited < Duration::from_millis(400) + crate::SWEEP_INTERVAL * 2,
        "{waited:?}"
    );
    assert_eq!(
        harness.metric("disconnects", &["tcp", "heartbeat_timeout"]),
        1
    );
    beating.send(&frame(op::HEARTBEAT, 99, "")).await;
    assert_eq!(beating.recv().await.expect("still served").seq, 99);
    harness.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_the_write_timeout() {
    let write_timeout = Duration::from_millis(300);
    let harness = start(|c| {
        c.protocol.write_timeout = write_timeout;
        c.protocol.send_queue = 100_000;
    })
    .await;
    // A client with a small receive buffer that never reads.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(harness.tcp).await.expect("connect");
    let mut stuck = Tcp {
        stream,
        buf: BytesMut::new(),
    };
    stuck.send(&frame(op::AUTH, 1, "1 k1 live://1")).await;
    let mut reader = Tcp::auth(harness.tcp, "2 k2 live://1").await;
    // 8 MiB for the stuck client: far more than the sockets' buffers, far
    // less than its queue, so only the write deadline can close it.
    let body = Bytes::from(vec![b'x'; 4096]);
    let started = Instant::now();
    for _ in 0..2048 {
        let push = pushcluster_api::pb::comet::PushMsgReq {
            keys: vec!["k1".into()],
            proto_op: 1000,
            proto: Some(pushcluster_api::pb::protocol::Proto {
                ver: 1,
                op: 1000,
                seq: 0,
                body: body.clone(),
            }),
            ..Default::default()
        };
        harness.comet.push_msg(push).await.expect("push");
    }
    harness
        .wait_metric(
            "disconnects",
            &["tcp", "slow_consumer"],
            1,
            "the stuck client is closed in time",
        )
        .await;
    assert!(started.elapsed() >= write_timeout);
    // The neighbour is served throughout.
    reader.send(&frame(op::HEARTBEAT, 7, "")).await;
    assert_eq!(reader.recv().await.expect("served").seq, 7);
    harness.stop().await;
}

#[tokio::test]
async fn a_websocket_client_that_vanishes_is_not_counted_as_bad_input() {
    let harness = start(|_| {}).await;
    let stream = TcpStream::connect(harness.ws).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/sub", harness.ws), stream)
        .await
        .expect("upgrade");
    ws.send(Message::Binary(
        frame(op::AUTH, 1, "1 k1 live://1").encode(),
    ))
    .await
    .expect("auth");
    let reply = ws.next().await.expect("reply").expect("message");
    assert!(matches!(reply, Message::Binary(_)));
    // Gone without a close frame, as a phone that lost its network.
    drop(ws);
    harness
        .wait_metric(
            "disconnects",
            &["websocket", "io_error"],
            1,
            "the disconnect is counted",
        )
        .await;
    assert_eq!(
        harness.metric("bad_frames", &["websocket", "websocket_protocol"]),
        0
    );
    harness.stop().await;
}
