//! The NATS backplane against a real `nats-server -js`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use pushcluster_api::config::NatsConfig;
use pushcluster_api::pb::logic::PushMsg;
use pushcluster_api::pb::logic::push_msg::Type as PushType;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::bus::{Bus, BusMetrics, Delivery, Subscription};
use crate::registry::{CometReport, Registry, Session};
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

fn room(room: &str, body: &str) -> PushMsg {
    PushMsg {
        r#type: PushType::Room as i32,
        operation: 1000,
        room: room.into(),
        msg: body.to_string().into(),
        ..Default::default()
    }
}

async fn publisher(config: &NatsConfig, stop: &CancellationToken) -> NatsBus {
    let bus = NatsBus::publisher(
        connect(config).await,
        BusMetrics::unregistered(),
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
    let bus = NatsBus::consumer(
        connect(config).await,
        BusMetrics::unregistered(),
        member.to_string(),
        stop.clone(),
    );
    bus.subscribe().await.expect("subscribe")
}

async fn next(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.msg.msg).into_owned()
}

#[tokio::test]
async fn messages_of_a_room_arrive_in_order_with_positions() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    for i in 0..20 {
        bus.publish(room("live://1", &i.to_string()), None)
            .await
            .expect("publish");
    }
    let mut sub = consumer(&config, "job-a", &stop).await;
    let mut last_seq = 0;
    for i in 0..20 {
        let delivery = next(&mut sub).await;
        assert_eq!(body(&delivery), i.to_string());
        assert!(delivery.position.epoch != 0);
        assert!(delivery.position.generation > 0);
        assert!(delivery.position.seq > last_seq);
        assert_eq!(delivery.attempt, 1);
        last_seq = delivery.position.seq;
        delivery.ack().await;
    }
    sub.close().await;
    stop.cancel();
}

#[tokio::test]
async fn idempotency_keys_are_deduplicated_by_jetstream() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let bus = publisher(&config, &stop).await;
    let first = bus
        .publish(room("live://1", "x"), Some("id-1".into()))
        .await
        .expect("publish");
    let again = bus
        .publish(room("live://1", "x"), Some("id-1".into()))
        .await
        .expect("publish");
    assert!(!first.duplicate && again.duplicate);
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

    let mut b = consumer(&config, "job-b", &stop).await;
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

#[tokio::test]
async fn sessions_map_keys_and_mids_and_resist_late_disconnects() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let registry = NatsRegistry::new(
        connect(&config).await,
        Duration::from_secs(60),
        Duration::from_secs(60),
        stop.clone(),
    );
    let session = |mid: i64, key: &str, server: &str| Session {
        mid,
        key: key.into(),
        server: server.into(),
    };
    registry
        .add_session(&session(7, "phone/1 ü", "c1"))
        .await
        .expect("add");
    registry
        .add_session(&session(7, "web", "c2"))
        .await
        .expect("add");
    registry
        .add_session(&session(0, "anon", "c1"))
        .await
        .expect("add");
    let by_key = registry
        .servers_by_keys(&["phone/1 ü".into(), "anon".into(), "none".into()])
        .await
        .expect("keys");
    assert_eq!(
        by_key,
        HashMap::from([
            ("phone/1 ü".into(), "c1".into()),
            ("anon".into(), "c1".into())
        ])
    );
    let by_mid = registry.servers_by_mids(&[7, 8]).await.expect("mids");
    assert_eq!(
        by_mid,
        HashMap::from([
            ("phone/1 ü".into(), "c1".into()),
            ("web".into(), "c2".into())
        ])
    );
    // The key moves to c3; a late disconnect from c1 must not remove it.
    registry
        .add_session(&session(7, "phone/1 ü", "c3"))
        .await
        .expect("move");
    assert!(
        !registry
            .remove_session(&session(7, "phone/1 ü", "c1"))
            .await
            .expect("remove")
    );
    assert_eq!(
        registry.servers_by_mids(&[7]).await.expect("mids")["phone/1 ü"],
        "c3"
    );
    assert!(
        registry
            .remove_session(&session(7, "phone/1 ü", "c3"))
            .await
            .expect("remove")
    );
    assert!(
        registry
            .remove_session(&session(7, "web", "c2"))
            .await
            .expect("remove")
    );
    assert!(
        registry
            .servers_by_mids(&[7])
            .await
            .expect("mids")
            .is_empty()
    );
    stop.cancel();
}

#[tokio::test]
async fn reports_are_shared_between_processes_and_expire() {
    let server = NatsServer::start();
    let config = config(&server.url());
    let stop = CancellationToken::new();
    let writer = NatsRegistry::new(
        connect(&config).await,
        Duration::from_secs(60),
        Duration::from_secs(2),
        stop.clone(),
    );
    let reader = NatsRegistry::new(
        connect(&config).await,
        Duration::from_secs(60),
        Duration::from_secs(2),
        stop.clone(),
    );
    writer
        .report_comet(CometReport {
            server: "comet-1".into(),
            room_counts: HashMap::from([("live://1".into(), 3)]),
            conn_count: 3,
            ..Default::default()
        })
        .await
        .expect("report");
    tokio::time::timeout(WAIT, async {
        while reader.comet_reports().await.map(|r| r.len()).unwrap_or(0) != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("seen by the other process");
    let reports = reader.comet_reports().await.expect("reports");
    assert_eq!(reports[0].room_counts["live://1"], 3);
    // No more reports: it drops out (no ghost counts).
    tokio::time::timeout(WAIT, async {
        while !reader.comet_reports().await.expect("reports").is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("stale report dropped");
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
    let bus = NatsBus::publisher(nats.clone(), BusMetrics::unregistered(), stop.clone());
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
