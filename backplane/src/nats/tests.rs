//! The NATS backplane against a real `nats-server -js`.

use std::collections::BTreeMap;
use std::time::Duration;

use pushcluster_api::config::{HistoryConfig, NatsConfig};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::bus::{Bus, BusMetrics, Subscription};
use crate::conformance::{self, SHORT_TTL, body, next, room};
use crate::testing::NatsServer;

const WAIT: Duration = Duration::from_secs(20);

fn config(url: &str) -> NatsConfig {
    NatsConfig {
        url: url.to_string(),
        partitions: 4,
        lease_ttl: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

/// `RUST_LOG=debug cargo test ...` shows the backplane's logs.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn connect(config: &NatsConfig) -> Nats {
    logs();
    Nats::connect(config, "test", NatsMetrics::unregistered())
        .await
        .expect("connect")
}

async fn publisher(config: &NatsConfig, stop: &CancellationToken) -> NatsBus {
    let bus = NatsBus::publisher(
        connect(config).await,
        BusMetrics::unregistered(),
        conformance::history_config(),
        stop.clone(),
    );
    tokio::time::timeout(WAIT, async {
        while !bus.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("stream ready");
    bus
}

async fn consumer(config: &NatsConfig, member: &str, stop: &CancellationToken) -> Subscription {
    consumer_with(config, member, stop, BusMetrics::unregistered()).await
}

async fn consumer_with(
    config: &NatsConfig,
    member: &str,
    stop: &CancellationToken,
    metrics: BusMetrics,
) -> Subscription {
    let bus = NatsBus::consumer(
        connect(config).await,
        metrics,
        HistoryConfig::default(),
        member.to_string(),
        stop.clone(),
    );
    bus.subscribe().await.expect("subscribe")
}

#[tokio::test]
async fn a_room_arrives_in_order_with_increasing_positions() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    let mut sub = consumer(&config, "job-a", &stop).await;
    conformance::a_room_arrives_in_order_with_increasing_positions(&bus, &mut sub).await;
    sub.close().await;
    stop.cancel();
}

#[tokio::test]
async fn a_room_history_gives_what_a_client_missed() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    let mut sub = consumer(&config, "job-a", &stop).await;
    conformance::a_room_history_gives_what_a_client_missed(&bus, &mut sub).await;
    sub.close().await;
    stop.cancel();
}

#[tokio::test]
async fn a_direct_stream_keeps_what_a_user_was_sent() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    let mut sub = consumer(&config, "job-a", &stop).await;
    conformance::a_direct_stream_keeps_what_a_user_was_sent(&bus, &mut sub).await;
    sub.close().await;
    stop.cancel();
}

#[tokio::test]
async fn a_room_history_says_when_it_no_longer_reaches_back() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    let mut sub = consumer(&config, "job-a", &stop).await;
    conformance::a_room_history_says_when_it_no_longer_reaches_back(&bus, &mut sub).await;
    sub.close().await;
    stop.cancel();
}

#[tokio::test]
async fn messages_leave_the_stream_after_their_time_to_live() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    // `live://brief` rooms keep 1 s (and min_ttl is 1 s); rooms under the
    // default history keep 5 minutes.
    bus.publish(room("live://brief", "short"), None)
        .await
        .expect("publish");
    bus.publish(room("live://h", "long"), None)
        .await
        .expect("publish");
    let stream = bus.stream().await.expect("stream");
    let seq_of = |room: &str| {
        let (stream, subject) = (stream.clone(), bus.room_subject(room));
        async move {
            stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .expect("the room's message")
                .sequence
        }
    };
    let (brief_seq, long_seq) = (seq_of("live://brief").await, seq_of("live://h").await);
    tokio::time::timeout(WAIT, async {
        while stream.get_raw_message(brief_seq).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the 1 s message removed by its TTL");
    assert!(stream.get_raw_message(long_seq).await.is_ok());
    stop.cancel();
}

#[tokio::test]
async fn a_work_queue_stream_keeps_its_retention_and_serves_no_history() {
    let server = NatsServer::start();
    let mut config = config(&server.url());
    config.stream.retention = pushcluster_api::config::Retention::Workqueue;
    let stop = CancellationToken::new();
    let old = publisher(&config, &stop).await;
    assert!(!old.history_ready());
    // A newer version configured with limits retention finds the work
    // queue: it keeps it (JetStream cannot change it) and says history is off.
    config.stream.retention = pushcluster_api::config::Retention::Limits;
    let bus = publisher(&config, &stop).await;
    assert!(!bus.history_ready());
    let mut sub = consumer(&config, "job-a", &stop).await;
    bus.publish(room("live://wq", "a"), None)
        .await
        .expect("publish");
    let delivery = next(&mut sub).await;
    let at = delivery.position;
    delivery.ack().await;
    let history = bus
        .room_history(
            "live://wq",
            Some(crate::bus::Since {
                epoch: at.epoch,
                offset: at.seq - 1,
            }),
            1 << 20,
        )
        .await
        .expect("history");
    assert_eq!(history.gap, Some(crate::bus::Unrecovered::Disabled));
    sub.close().await;
    stop.cancel();
}

#[tokio::test]
async fn message_ids_deduplicate() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    let mut sub = consumer(&config, "job-a", &stop).await;
    conformance::message_ids_deduplicate(&bus, &mut sub).await;
    sub.close().await;
    stop.cancel();
}

#[tokio::test]
async fn a_nacked_message_comes_again_at_its_position() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    let mut sub = consumer(&config, "job-a", &stop).await;
    conformance::a_nacked_message_comes_again_at_its_position(&bus, &mut sub).await;
    sub.close().await;
    stop.cancel();
}

#[tokio::test]
async fn unacked_messages_of_a_dead_member_move_to_another_in_order() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    for i in 0..10 {
        bus.publish(room("live://1", &i.to_string()), None)
            .await
            .expect("publish");
    }
    // Member a, in a runtime of its own, takes everything, acks 0..4 and
    // dies holding 5..9: its runtime is torn down, nothing is released.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let a_config = config.clone();
    let member_a = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut a = consumer(&a_config, "job-a", &CancellationToken::new()).await;
            let mut held = Vec::new();
            for i in 0..10 {
                let delivery = next(&mut a).await;
                assert_eq!(body(&delivery), i.to_string());
                if i < 5 {
                    delivery.ack().await;
                } else {
                    held.push(delivery);
                }
            }
            let _ = held_tx.send(held[0].position.generation);
            // Keep everything alive until killed.
            let _ = kill_rx.recv();
            std::mem::forget(held);
            std::mem::forget(a);
        });
        runtime.shutdown_background();
    });
    let generation_a = held_rx
        .recv_timeout(WAIT)
        .expect("member a got its messages");
    kill_tx.send(()).expect("kill a");
    member_a.join().expect("member a ended");

    let metrics_b = BusMetrics::unregistered();
    let mut b = consumer_with(&config, "job-b", &stop, metrics_b.clone()).await;
    // Acks are not confirmed (at-least-once; comets drop repeats by stream
    // sequence), so acks a sent just before dying may not have reached the
    // server: b may see some of 0..4 again, but in order, then all of 5..9.
    let mut seen = Vec::new();
    while seen.last() != Some(&9) {
        let delivery = next(&mut b).await;
        let n: u32 = body(&delivery).parse().expect("a number");
        assert!(
            seen.last().is_none_or(|last| n > *last),
            "in order: {n} after {seen:?}"
        );
        assert!(
            delivery.position.generation > generation_a,
            "a newer fencing token"
        );
        seen.push(n);
        delivery.ack().await;
    }
    assert!(
        seen.ends_with(&[5, 6, 7, 8, 9]),
        "every unacked message, in order: {seen:?}"
    );
    bus.publish(room("live://1", "10"), None)
        .await
        .expect("publish");
    assert_eq!(body(&next(&mut b).await), "10");
    // The takeover reset each partition's consumer to its ack floor without
    // a failed attempt (a work queue takes no start sequence).
    assert_eq!(metrics_b.consumer_restarts.get(), 0);
    stop.cancel();
}

#[tokio::test]
async fn members_share_partitions_and_every_message_goes_to_one() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    let mut a = consumer(&config, "job-a", &stop).await;
    let mut b = consumer(&config, "job-b", &stop).await;
    // Let both members join before counting partitions.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rooms: Vec<String> = (0..16).map(|i| format!("live://{i}")).collect();
    for room_id in &rooms {
        bus.publish(room(room_id, room_id), None)
            .await
            .expect("publish");
    }
    let mut got: BTreeMap<String, &str> = BTreeMap::new();
    tokio::time::timeout(WAIT, async {
        while got.len() < rooms.len() {
            tokio::select! {
                Some(d) = a.next() => { got.insert(body(&d), "a"); d.ack().await; }
                Some(d) = b.next() => { got.insert(body(&d), "b"); d.ack().await; }
            }
        }
    })
    .await
    .expect("all delivered");
    assert!(
        got.values().any(|m| *m == "a") && got.values().any(|m| *m == "b"),
        "{got:?}"
    );
    // Nothing is delivered twice.
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        tokio::select! { d = a.next() => d, d = b.next() => d }
    })
    .await;
    assert!(quiet.is_err(), "a message was delivered twice");
    stop.cancel();
}

async fn registry(
    config: &NatsConfig,
    session_ttl: Duration,
    report_ttl: Duration,
    stop: &CancellationToken,
) -> NatsRegistry {
    NatsRegistry::new(connect(config).await, session_ttl, report_ttl, stop.clone())
}

#[tokio::test]
async fn sessions_are_found_by_key_and_mid() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let long = Duration::from_secs(60);
    conformance::sessions_are_found_by_key_and_mid(&registry(&config, long, long, &stop).await)
        .await;
    stop.cancel();
}

#[tokio::test]
async fn a_late_disconnect_keeps_the_newer_mapping() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let long = Duration::from_secs(60);
    conformance::a_late_disconnect_keeps_the_newer_mapping(
        &registry(&config, long, long, &stop).await,
    )
    .await;
    stop.cancel();
}

#[tokio::test]
async fn sessions_expire_unless_refreshed() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let registry = registry(&config, SHORT_TTL, Duration::from_secs(60), &stop).await;
    conformance::sessions_expire_unless_refreshed(&registry).await;
    stop.cancel();
}

#[tokio::test]
async fn reports_are_shared_between_processes_and_expire() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let long = Duration::from_secs(60);
    // Two connections: two processes' views of one registry.
    let writer = registry(&config, long, SHORT_TTL, &stop).await;
    let reader = registry(&config, long, SHORT_TTL, &stop).await;
    conformance::reports_are_shared_and_expire(&writer, &reader).await;
    stop.cancel();
}

#[tokio::test]
async fn clients_start_without_nats_and_recover_when_it_comes() {
    let mut server = NatsServer::start();
    let config = config(&server.url());
    server.stop();
    let stop = CancellationToken::new();
    let nats = connect(&config).await;
    assert!(!nats.is_connected());
    let bus = NatsBus::publisher(
        nats.clone(),
        BusMetrics::unregistered(),
        HistoryConfig::default(),
        stop.clone(),
    );
    assert!(bus.publish(room("live://1", "x"), None).await.is_err());
    server.restart();
    tokio::time::timeout(WAIT, async {
        while !bus.is_ready() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("ready once NATS is up");
    bus.publish(room("live://1", "y"), None)
        .await
        .expect("publish");
    stop.cancel();
}

/// Client messages land in the upstream stream in order, their sender in
/// the headers; the backend's consumer's backlog is what `pending` says.
#[tokio::test]
async fn upstream_messages_carry_their_sender_and_the_backends_backlog_shows() {
    use crate::upstream::{Upstream, UpstreamMessage};
    use futures_util::StreamExt as _;

    let server = NatsServer::start();
    let config = config(&server.url());
    let upstream = NatsUpstream::new(
        connect(&config).await,
        pushcluster_api::config::UpstreamConfig {
            enabled: true,
            consumer: "backend".into(),
            ..Default::default()
        },
    );
    assert_eq!(
        upstream.pending().await.expect("pending"),
        None,
        "no consumer yet"
    );
    let mut ids = Vec::new();
    for text in ["hello", "typing", "bye"] {
        let message = UpstreamMessage {
            mid: 42,
            key: "k42".into(),
            comet: "comet-a".into(),
            rooms: vec!["chat://1".into(), "chat://2".into()],
            op: 4,
            body: text.into(),
        };
        ids.push(upstream.send(message).await.expect("sent"));
    }
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");

    // The backend: a durable pull consumer on the stream.
    let client = async_nats::connect(server.url()).await.expect("connect");
    let jetstream = async_nats::jetstream::new(client);
    let stream = jetstream
        .get_stream("PUSHCLUSTER_UPSTREAM")
        .await
        .expect("stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("backend".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    assert_eq!(upstream.pending().await.expect("pending"), Some(3));
    let mut messages = consumer.messages().await.expect("messages");
    for text in ["hello", "typing", "bye"] {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("in time")
            .expect("a message")
            .expect("ok");
        assert_eq!(&message.payload[..], text.as_bytes());
        let headers = message.headers.clone().expect("headers");
        let one = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(one(upstream::HEADER_MID).as_deref(), Some("42"));
        assert_eq!(one(upstream::HEADER_KEY).as_deref(), Some("k42"));
        assert_eq!(one(upstream::HEADER_COMET).as_deref(), Some("comet-a"));
        assert_eq!(one(upstream::HEADER_OP).as_deref(), Some("4"));
        assert_eq!(
            one(upstream::HEADER_ROOMS).as_deref(),
            Some(r#"["chat://1","chat://2"]"#)
        );
        message.ack().await.expect("ack");
    }
    tokio::time::timeout(WAIT, async {
        while upstream.pending().await.expect("pending") != Some(0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the backlog drains");
}
