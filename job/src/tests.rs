//! Job against the in-memory bus and recording comets.

use std::sync::atomic::AtomicU32;

use async_trait::async_trait;
use pushcluster_api::pb::comet::{BroadcastReply, BroadcastRoomReply, PushMsgReply, RoomsReply};
use pushcluster_api::pb::logic::PushMsg;
use pushcluster_api::protocol::{Frame, decode_stream, op};
use pushcluster_backplane::bus::MemoryBus;
use pushcluster_backplane::discovery::StaticDiscovery;
use pushcluster_backplane::registry::{CometReport, MemoryRegistry, Session};
use tokio::sync::{Notify, Semaphore};

use super::*;

/// A comet that records what it is asked, can hold calls until released,
/// and can fail its first calls.
#[derive(Default)]
struct RecordingComet {
    calls: Mutex<Vec<Call>>,
    called: Notify,
    gate: Option<Semaphore>,
    failures_left: AtomicU32,
}

#[derive(Debug, Clone)]
enum Call {
    Push {
        keys: Vec<String>,
        op: i32,
        frames: Vec<Frame>,
        stream: String,
    },
    Room {
        room: String,
        frames: Vec<Frame>,
        seqs: Vec<u64>,
        prev_seq: u64,
    },
    Broadcast {
        op: i32,
        speed: i32,
    },
}

fn inner_frames(proto: Option<pushcluster_api::pb::protocol::Proto>) -> Vec<Frame> {
    let proto = proto.expect("proto");
    assert_eq!(proto.op, op::RAW);
    let mut buf = bytes::BytesMut::from(&proto.body[..]);
    let mut frames = Vec::new();
    while let Some(frame) = decode_stream(&mut buf).expect("valid inner frames") {
        assert_eq!((frame.ver, frame.seq), (1, 0));
        frames.push(frame);
    }
    assert!(buf.is_empty());
    frames
}

impl RecordingComet {
    fn gated() -> Self {
        RecordingComet {
            gate: Some(Semaphore::new(0)),
            ..Default::default()
        }
    }

    fn failing(times: u32) -> Self {
        RecordingComet {
            failures_left: AtomicU32::new(times),
            ..Default::default()
        }
    }

    async fn enter(&self) -> Result<(), LinkError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        let fail = self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(LinkError::Unavailable("test failure".into()));
        }
        Ok(())
    }

    fn record(&self, call: Call) {
        self.calls.lock().expect("calls").push(call);
        self.called.notify_waiters();
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    fn room_bodies(&self, room: &str) -> Vec<Vec<String>> {
        self.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Room {
                    room: r, frames, ..
                } if r == room => Some(
                    frames
                        .iter()
                        .map(|f| String::from_utf8_lossy(&f.body).into_owned())
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    /// Waits until `done` holds for the recorded calls (bounded).
    async fn wait_for(&self, done: impl Fn(&[Call]) -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let notified = self.called.notified();
                if done(&self.calls()) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("calls arrived in time");
    }
}

#[async_trait]
impl CometLink for RecordingComet {
    async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, LinkError> {
        self.enter().await?;
        self.record(Call::Push {
            keys: req.keys,
            op: req.proto_op,
            frames: inner_frames(req.proto),
            stream: req.stream,
        });
        Ok(PushMsgReply {})
    }

    async fn broadcast(&self, req: BroadcastReq) -> Result<BroadcastReply, LinkError> {
        self.enter().await?;
        self.record(Call::Broadcast {
            op: req.proto_op,
            speed: req.speed,
        });
        Ok(BroadcastReply {})
    }

    async fn broadcast_room(&self, req: BroadcastRoomReq) -> Result<BroadcastRoomReply, LinkError> {
        self.enter().await?;
        self.record(Call::Room {
            room: req.room_id,
            frames: inner_frames(req.proto),
            seqs: req.seqs,
            prev_seq: req.prev_seq,
        });
        Ok(BroadcastRoomReply {})
    }

    async fn rooms(&self) -> Result<RoomsReply, LinkError> {
        Ok(RoomsReply::default())
    }
}

struct Harness {
    bus: MemoryBus,
    sessions: Arc<MemoryRegistry>,
    job: Arc<Job>,
    metrics: JobMetrics,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<Result<(), JobError>>,
    discovery: Arc<StaticDiscovery>,
}

/// A job delivering to comet "live" and to comet "dead", whose calls
/// always fail; retries are fast.
fn with_a_dead_comet() -> (Harness, Arc<RecordingComet>) {
    let dead = Arc::new(RecordingComet::failing(u32::MAX));
    let live = Arc::new(RecordingComet::default());
    let mut config = JobConfig::default();
    config.delivery.backoff_base = Duration::from_millis(1);
    config.delivery.backoff_max = Duration::from_millis(2);
    let harness = start(vec![("dead", dead), ("live", live.clone())], config);
    (harness, live)
}

/// Room frames delivered over all calls so far.
fn room_frames(calls: &[Call]) -> usize {
    calls
        .iter()
        .map(|c| match c {
            Call::Room { frames, .. } => frames.len(),
            _ => 0,
        })
        .sum()
}

fn endpoint(id: &str) -> CometEndpoint {
    CometEndpoint {
        id: id.into(),
        addr: format!("{id}:3109"),
    }
}

fn start(comets: Vec<(&str, Arc<RecordingComet>)>, config: JobConfig) -> Harness {
    let mut connector = InProcessConnector::new();
    let mut endpoints = Vec::new();
    for (id, comet) in comets {
        connector = connector.with(id, comet);
        endpoints.push(endpoint(id));
    }
    let metrics = JobMetrics::new(&prometheus::Registry::new()).expect("metrics");
    let sessions = Arc::new(MemoryRegistry::new(
        Duration::from_secs(60),
        Duration::from_secs(60),
    ));
    let job = Arc::new(
        Job::new(config, Arc::new(connector), metrics.clone()).with_registry(sessions.clone()),
    );
    let bus = MemoryBus::default();
    let discovery = Arc::new(StaticDiscovery::new(endpoints, Vec::new()));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (job, bus, discovery, shutdown) = (
            job.clone(),
            bus.clone(),
            discovery.clone(),
            shutdown.clone(),
        );
        async move { job.run(Arc::new(bus), discovery, shutdown).await }
    });
    Harness {
        bus,
        sessions,
        job,
        metrics,
        shutdown,
        running,
        discovery,
    }
}

impl Harness {
    /// Redelivered room copies job acked without sending.
    fn room_duplicates(&self) -> u64 {
        self.metrics.duplicates.with_label_values(&["room"]).get()
    }

    async fn publish(&self, msg: PushMsg) {
        self.bus.publish(msg, None).await.expect("publish");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.running.await.expect("job task").expect("job ran");
    }
}

fn room(room: &str, body: &str) -> PushMsg {
    PushMsg {
        r#type: PushType::Room as i32,
        operation: 1000,
        room: room.into(),
        msg: body.to_string().into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_lone_room_message_goes_out_alone_and_at_once() {
    let comet = Arc::new(RecordingComet::default());
    let harness = start(vec![("c1", comet.clone())], JobConfig::default());
    harness.publish(room("live://1", "hello")).await;
    comet.wait_for(|calls| !calls.is_empty()).await;
    assert_eq!(
        comet.room_bodies("live://1"),
        vec![vec!["hello".to_string()]]
    );
    harness.stop().await;
}

#[tokio::test]
async fn room_messages_queued_behind_a_slow_call_are_batched_in_order() {
    let comet = Arc::new(RecordingComet::gated());
    let harness = start(vec![("c1", comet.clone())], JobConfig::default());
    harness.publish(room("live://1", "0")).await;
    // The first batch is now held by the comet; 45 more queue up behind it.
    for i in 1..46 {
        harness.publish(room("live://1", &i.to_string())).await;
    }
    let gate = comet.gate.as_ref().expect("gated");
    // Release calls one at a time until all 46 messages arrived.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            gate.add_permits(1);
            let delivered: usize = comet.room_bodies("live://1").iter().map(Vec::len).sum();
            if delivered == 46 {
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("all delivered");
    let batches = comet.room_bodies("live://1");
    let flat: Vec<String> = batches.iter().flatten().cloned().collect();
    let expected: Vec<String> = (0..46).map(|i| i.to_string()).collect();
    assert_eq!(flat, expected, "publish order kept");
    // Each batch names the room's message before it, so a comet that
    // missed a batch can tell.
    let mut previous = 0;
    for call in comet.calls() {
        if let Call::Room { seqs, prev_seq, .. } = call {
            assert_eq!(prev_seq, previous);
            previous = *seqs.last().expect("a batch has messages");
        }
    }
    assert!(batches.iter().all(|b| b.len() <= 20), "{batches:?}");
    assert!(
        batches.len() >= 3,
        "45 queued messages need at least 3 batches: {batches:?}"
    );
    assert!(
        batches.iter().any(|b| b.len() > 1),
        "queued messages were batched"
    );
    harness.stop().await;
}

#[tokio::test]
async fn key_pushes_go_to_their_comet_only() {
    let (c1, c2) = (
        Arc::new(RecordingComet::default()),
        Arc::new(RecordingComet::default()),
    );
    let harness = start(
        vec![("c1", c1.clone()), ("c2", c2.clone())],
        JobConfig::default(),
    );
    harness
        .publish(PushMsg {
            r#type: PushType::Push as i32,
            operation: 1001,
            server: "c2".into(),
            keys: vec!["k".into()],
            msg: "m".into(),
            ..Default::default()
        })
        .await;
    c2.wait_for(|calls| !calls.is_empty()).await;
    match &c2.calls()[0] {
        Call::Push {
            keys, op, frames, ..
        } => {
            assert_eq!((keys.as_slice(), *op), (&["k".to_string()][..], 1001));
            assert_eq!(
                (frames.len(), frames[0].op, &frames[0].body[..]),
                (1, 1001, &b"m"[..])
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(c1.calls().is_empty());
    harness.stop().await;
}

fn direct(stream: &str, body: &str) -> PushMsg {
    PushMsg {
        r#type: PushType::Push as i32,
        operation: 1001,
        stream: stream.into(),
        msg: body.to_string().into(),
        ..Default::default()
    }
}

/// (stream, keys, body) of each push call.
fn pushes(comet: &RecordingComet) -> Vec<(String, Vec<String>, String)> {
    comet
        .calls()
        .into_iter()
        .filter_map(|call| match call {
            Call::Push {
                keys,
                frames,
                stream,
                ..
            } => Some((
                stream,
                keys,
                String::from_utf8_lossy(&frames[0].body).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

/// A push to a user's direct stream reaches the connections the user has
/// when job delivers it — each comet its own keys — and one to nobody
/// online is acked (its stream's history keeps it), not retried.
#[tokio::test]
async fn direct_pushes_find_the_users_connections_when_delivered() {
    let (c1, c2, c4) = (
        Arc::new(RecordingComet::default()),
        Arc::new(RecordingComet::default()),
        Arc::new(RecordingComet::failing(u32::MAX)),
    );
    let mut config = JobConfig::default();
    config.delivery.backoff_base = Duration::from_millis(1);
    config.delivery.backoff_max = Duration::from_millis(2);
    let harness = start(
        vec![("c1", c1.clone()), ("c2", c2.clone()), ("c4", c4.clone())],
        config,
    );
    for server in ["c1", "c2"] {
        let report = CometReport {
            server: server.into(),
            ..CometReport::default()
        };
        harness.sessions.report_comet(report).await.expect("report");
    }
    // c9 left discovery; c4 is still in it but neither reports nor answers
    // (gone: its sessions are offline, as logic judges them for goim's
    // pushes — not a reason to give the push back).
    for (mid, key, server) in [
        (7, "a", "c1"),
        (7, "b", "c2"),
        (7, "gone", "c9"),
        (7, "quiet", "c4"),
    ] {
        let session = Session {
            mid,
            key: key.into(),
            server: server.into(),
        };
        harness
            .sessions
            .add_session(&session)
            .await
            .expect("session");
    }
    harness.publish(direct("@mid:8", "to nobody")).await;
    harness.publish(direct("@mid:7", "hi")).await;
    c1.wait_for(|calls| !calls.is_empty()).await;
    c2.wait_for(|calls| !calls.is_empty()).await;
    let hi = |key: &str| ("@mid:7".to_string(), vec![key.to_string()], "hi".into());
    assert_eq!(pushes(&c1), [hi("a")]);
    assert_eq!(pushes(&c2), [hi("b")]);
    let dropped = |reason| {
        harness
            .metrics
            .dropped
            .with_label_values(&["push", reason])
            .get()
    };
    // Mid 8's push, and mid 7's on c4; in their own lanes.
    tokio::time::timeout(Duration::from_secs(10), async {
        while dropped("offline") < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the pushes to nobody settled");
    assert_eq!(dropped("offline"), 2);

    // Mid 8 connects: its next push finds it.
    let session = Session {
        mid: 8,
        key: "z".into(),
        server: "c2".into(),
    };
    harness
        .sessions
        .add_session(&session)
        .await
        .expect("session");
    harness.publish(direct("@mid:8", "now")).await;
    harness.publish(direct("@key:a", "to a key")).await;
    c2.wait_for(|calls| calls.len() == 2).await;
    c1.wait_for(|calls| calls.len() == 2).await;
    assert_eq!(
        pushes(&c2)[1],
        ("@mid:8".to_string(), vec!["z".to_string()], "now".into())
    );
    assert_eq!(
        pushes(&c1)[1],
        (
            "@key:a".to_string(),
            vec!["a".to_string()],
            "to a key".into()
        )
    );
    assert_eq!(dropped("offline"), 2);
    let gave_up = harness
        .metrics
        .failures
        .with_label_values(&["push", "gave_up"])
        .get();
    assert_eq!(gave_up, 0);
    harness.stop().await;
}

#[tokio::test]
async fn pushes_to_unknown_comets_and_broadcasts_without_comets_are_counted() {
    let harness = start(Vec::new(), JobConfig::default());
    harness
        .publish(PushMsg {
            r#type: PushType::Push as i32,
            server: "gone".into(),
            keys: vec!["k".into()],
            ..Default::default()
        })
        .await;
    harness
        .publish(PushMsg {
            r#type: PushType::Broadcast as i32,
            operation: 5,
            speed: 100,
            ..Default::default()
        })
        .await;
    let dropped = |kind: &str, reason: &str| {
        harness
            .metrics
            .dropped
            .with_label_values(&[kind, reason])
            .get()
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while dropped("push", "unknown_comet") + dropped("broadcast", "no_comets") < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("both counted, job still alive");
    assert!(!harness.running.is_finished());
    harness.stop().await;
}

#[tokio::test]
async fn broadcast_speed_is_shared_between_comets() {
    let (c1, c2) = (
        Arc::new(RecordingComet::default()),
        Arc::new(RecordingComet::default()),
    );
    let harness = start(
        vec![("c1", c1.clone()), ("c2", c2.clone())],
        JobConfig::default(),
    );
    harness
        .publish(PushMsg {
            r#type: PushType::Broadcast as i32,
            operation: 7,
            speed: 101,
            ..Default::default()
        })
        .await;
    for comet in [&c1, &c2] {
        comet.wait_for(|calls| !calls.is_empty()).await;
        assert!(matches!(
            comet.calls()[0],
            Call::Broadcast { op: 7, speed: 51 }
        ));
    }
    harness.stop().await;
}

#[tokio::test]
async fn failed_calls_are_retried_then_acked() {
    let comet = Arc::new(RecordingComet::failing(2));
    let mut config = JobConfig::default();
    config.delivery.backoff_base = Duration::from_millis(1);
    config.delivery.backoff_max = Duration::from_millis(2);
    let harness = start(vec![("c1", comet.clone())], config);
    harness.publish(room("live://1", "x")).await;
    comet.wait_for(|calls| !calls.is_empty()).await;
    assert_eq!(
        harness.metrics.retries.with_label_values(&["room"]).get(),
        2
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while harness.metrics.delivered.with_label_values(&["room"]).get() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("acked");
    harness.stop().await;
}

#[tokio::test]
async fn comets_follow_discovery() {
    let comet = Arc::new(RecordingComet::default());
    let harness = start(vec![("c1", comet.clone())], JobConfig::default());
    tokio::time::timeout(Duration::from_secs(10), async {
        while harness.job.comet_ids() != ["c1"] {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("c1 linked");
    harness.discovery.set(Vec::new());
    tokio::time::timeout(Duration::from_secs(10), async {
        while !harness.job.comet_ids().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("c1 forgotten");
    harness.stop().await;
}

#[tokio::test]
async fn idle_lanes_exit_without_losing_messages() {
    let comet = Arc::new(RecordingComet::default());
    let mut config = JobConfig::default();
    config.room.idle = Duration::from_millis(1);
    let harness = start(vec![("c1", comet.clone())], config);
    for i in 0..200 {
        harness.publish(room("live://1", &i.to_string())).await;
        if i % 10 == 0 {
            // Give the lane a chance to go idle between bursts.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    comet.wait_for(|calls| room_frames(calls) == 200).await;
    let flat: Vec<String> = comet
        .room_bodies("live://1")
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(flat, (0..200).map(|i| i.to_string()).collect::<Vec<_>>());
    harness.stop().await;
}

#[tokio::test]
async fn a_dead_comet_is_skipped_and_does_not_hold_up_the_others() {
    let (harness, live) = with_a_dead_comet();
    // Separate batches: each waits for the previous one on both comets, so
    // without the breaker every batch would wait out retry_for (30 s).
    for i in 0..10 {
        harness.publish(room("live://1", &i.to_string())).await;
        live.wait_for(|calls| calls.len() > i).await;
    }
    live.wait_for(|calls| room_frames(calls) == 10).await;
    let flat: Vec<String> = live.room_bodies("live://1").into_iter().flatten().collect();
    assert_eq!(flat, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
    tokio::time::timeout(Duration::from_secs(10), async {
        while harness.metrics.delivered.with_label_values(&["room"]).get() < 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("acked although one comet is down");
    assert_eq!(harness.metrics.comets_down.get(), 1);
    assert!(
        harness
            .metrics
            .dropped
            .with_label_values(&["room", "comet_unavailable"])
            .get()
            >= 1
    );
    harness.stop().await;
}

#[tokio::test]
async fn a_down_comet_that_leaves_discovery_is_no_longer_counted_unavailable() {
    let (harness, _live) = with_a_dead_comet();
    harness.publish(room("live://1", "0")).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while harness.metrics.comets_down.get() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the dead comet is marked down");
    // Scaled down: only the live comet is left in discovery.
    harness.discovery.set(vec![endpoint("live")]);
    tokio::time::timeout(Duration::from_secs(10), async {
        while harness.metrics.comets_down.get() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the gauge forgets a comet that left");
    assert_eq!(harness.job.comet_ids(), ["live"]);
    harness.stop().await;
}

#[tokio::test]
async fn a_poisoned_lane_map_still_delivers_every_message() {
    let comet = Arc::new(RecordingComet::default());
    let harness = start(vec![("c1", comet.clone())], JobConfig::default());
    harness.publish(room("live://1", "before")).await;
    comet.wait_for(|calls| !calls.is_empty()).await;
    harness.job.poison_lane_map();
    for room_id in ["live://1", "live://2"] {
        harness.publish(room(room_id, "after")).await;
    }
    comet.wait_for(|calls| room_frames(calls) == 3).await;
    assert_eq!(
        comet.room_bodies("live://2"),
        vec![vec!["after".to_string()]]
    );
    harness.stop().await;
}

/// Records how each delivery handed to job was settled.
#[derive(Default)]
struct Settlements {
    log: Mutex<Vec<(u64, &'static str)>>,
    settled: Notify,
}

struct RecordingAcker {
    seq: u64,
    settlements: Arc<Settlements>,
}

impl RecordingAcker {
    fn settle(&self, how: &'static str) {
        self.settlements
            .log
            .lock()
            .expect("log")
            .push((self.seq, how));
        self.settlements.settled.notify_waiters();
    }
}

#[async_trait]
impl pushcluster_backplane::bus::Acker for RecordingAcker {
    async fn ack(self: Box<Self>) {
        self.settle("ack");
    }

    async fn nack(self: Box<Self>, _delay: Duration) {
        self.settle("nack");
    }
}

impl Settlements {
    /// A delivery of room message `seq` (body: the seq), attempt `attempt`.
    fn delivery(self: &Arc<Self>, seq: u64, attempt: u32) -> Delivery {
        let position = pushcluster_backplane::bus::Position {
            epoch: 7,
            partition: 0,
            generation: 1,
            seq,
        };
        let acker = RecordingAcker {
            seq,
            settlements: self.clone(),
        };
        let msg = room("live://copies", &seq.to_string());
        Delivery::new(msg, SystemTime::now(), attempt, position, Box::new(acker))
    }

    async fn wait_for(&self, count: usize) -> Vec<(u64, &'static str)> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let settled = self.settled.notified();
                let log = self.log.lock().expect("log").clone();
                if log.len() >= count {
                    return log;
                }
                settled.await;
            }
        })
        .await
        .expect("settled in time")
    }
}

/// The bus redelivers a message whose ack wait ran out while its room's
/// lane was held up by a slow comet; the copy arrives behind newer
/// messages. Comets get each message once, in order, with a `prev_seq`
/// that never goes back; the copy is acked and counted.
#[tokio::test]
async fn redelivered_copies_of_taken_room_messages_are_not_sent_again() {
    let comet = Arc::new(RecordingComet::gated());
    let harness = start(vec![("c1", comet.clone())], JobConfig::default());
    let settlements = Arc::new(Settlements::default());
    harness.job.dispatch(settlements.delivery(1, 1)).await;
    comet.wait_for(|_| true).await;
    // 1 is held by the comet; its copy queues between 2 and 3.
    for (seq, attempt) in [(2, 1), (1, 2), (3, 1)] {
        harness
            .job
            .dispatch(settlements.delivery(seq, attempt))
            .await;
    }
    let gate = comet.gate.as_ref().expect("gated");
    gate.add_permits(100);
    let log = settlements.wait_for(4).await;
    assert_eq!(log.iter().filter(|(_, how)| *how == "ack").count(), 4);
    let flat: Vec<String> = comet
        .room_bodies("live://copies")
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(flat, ["1", "2", "3"]);
    let mut previous = 0;
    for call in comet.calls() {
        if let Call::Room { seqs, prev_seq, .. } = call {
            assert_eq!(prev_seq, previous);
            previous = *seqs.last().expect("a batch has messages");
        }
    }
    assert_eq!(harness.room_duplicates(), 1);
    harness.stop().await;
}

/// A room message given back to the bus (no comet took it) is sent again
/// when the bus redelivers it before anything newer went out; a copy that
/// comes after a newer message (comets fill it from history, the newer
/// batch's `prev_seq` names it) is not.
#[tokio::test]
async fn redelivered_room_messages_no_comet_took_go_out_again_in_order() {
    let comet = Arc::new(RecordingComet::failing(1));
    let mut config = JobConfig::default();
    config.delivery.retry_for = Duration::ZERO;
    let harness = start(vec![("c1", comet.clone())], config);
    let settlements = Arc::new(Settlements::default());
    harness.job.dispatch(settlements.delivery(1, 1)).await;
    assert_eq!(settlements.wait_for(1).await, [(1, "nack")]);
    harness.job.dispatch(settlements.delivery(1, 2)).await;
    assert_eq!(settlements.wait_for(2).await[1], (1, "ack"));
    harness.job.dispatch(settlements.delivery(2, 1)).await;
    assert_eq!(settlements.wait_for(3).await[2], (2, "ack"));
    // 3 is given back; 4 goes out before 3's copy comes.
    comet.failures_left.store(1, Ordering::SeqCst);
    harness.job.dispatch(settlements.delivery(3, 1)).await;
    assert_eq!(settlements.wait_for(4).await[3], (3, "nack"));
    harness.job.dispatch(settlements.delivery(4, 1)).await;
    assert_eq!(settlements.wait_for(5).await[4], (4, "ack"));
    harness.job.dispatch(settlements.delivery(3, 2)).await;
    assert_eq!(settlements.wait_for(6).await[5], (3, "ack"));
    let calls: Vec<(Vec<u64>, u64)> = comet
        .calls()
        .into_iter()
        .filter_map(|call| match call {
            Call::Room { seqs, prev_seq, .. } => Some((seqs, prev_seq)),
            _ => None,
        })
        .collect();
    assert_eq!(calls, [(vec![1], 1), (vec![2], 1), (vec![4], 3)]);
    assert_eq!(harness.room_duplicates(), 1);
    harness.stop().await;
}
