//! What every `Registry` and `Bus` must do, written once and run against
//! each backend: the in-memory ones (registry.rs, bus.rs tests) and the NATS
//! ones on a real `nats-server` (nats/tests.rs). A behaviour a backend has
//! beyond these (partitions and leases on NATS, the delivery limit of the
//! memory bus) is tested next to that backend.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use pushcluster_api::pb::logic::PushMsg;
use pushcluster_api::pb::logic::push_msg::Type as PushType;

use crate::bus::{Bus, Delivery, RoomHistory, Since, Subscription, Unrecovered};
use crate::registry::{CometReport, Registry, Session};

const WAIT: Duration = Duration::from_secs(20);

/// The session TTL and report TTL the expiry checks build their backends with.
pub const SHORT_TTL: Duration = Duration::from_secs(1);

fn session(mid: i64, key: &str, server: &str) -> Session {
    Session {
        mid,
        key: key.into(),
        server: server.into(),
    }
}

async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    tokio::time::timeout(WAIT, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Keys and mids find their comets; anonymous sessions (mid 0) are found
/// by key only; keys may hold any characters.
pub async fn sessions_are_found_by_key_and_mid(registry: &dyn Registry) {
    for s in [
        session(7, "phone/1 ü", "c1"),
        session(7, "web", "c2"),
        session(0, "anon", "c1"),
    ] {
        registry.add_session(&s).await.expect("add");
    }
    let by_key = registry
        .servers_by_keys(&["phone/1 ü".into(), "anon".into(), "missing".into()])
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
}

/// A key that moved to another comet keeps its new mapping when the old
/// comet's Disconnect arrives late; only the holder removes it.
pub async fn a_late_disconnect_keeps_the_newer_mapping(registry: &dyn Registry) {
    registry
        .add_session(&session(7, "k", "old"))
        .await
        .expect("add");
    registry
        .add_session(&session(7, "k", "new"))
        .await
        .expect("move");
    assert!(
        !registry
            .remove_session(&session(7, "k", "old"))
            .await
            .expect("remove"),
        "the old comet removed nothing"
    );
    assert_eq!(
        registry.servers_by_mids(&[7]).await.expect("mids")["k"],
        "new"
    );
    assert!(
        registry
            .remove_session(&session(7, "k", "new"))
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
    assert!(
        registry
            .servers_by_keys(&["k".into()])
            .await
            .expect("keys")
            .is_empty()
    );
}

/// With a session TTL of [`SHORT_TTL`]: a refreshed session outlives its
/// TTL, one left alone disappears from both lookups.
pub async fn sessions_expire_unless_refreshed(registry: &dyn Registry) {
    let kept = session(1, "kept", "c");
    let left = session(2, "left", "c");
    registry.add_session(&kept).await.expect("add");
    registry.add_session(&left).await.expect("add");
    let until = tokio::time::Instant::now() + SHORT_TTL * 2;
    while tokio::time::Instant::now() < until {
        registry.refresh_session(&kept).await.expect("refresh");
        tokio::time::sleep(SHORT_TTL / 4).await;
    }
    eventually("the session left alone to expire", || async {
        registry
            .servers_by_keys(&["left".into()])
            .await
            .expect("keys")
            .is_empty()
            && registry
                .servers_by_mids(&[2])
                .await
                .expect("mids")
                .is_empty()
    })
    .await;
    registry.refresh_session(&kept).await.expect("refresh");
    assert_eq!(
        registry
            .servers_by_keys(&["kept".into()])
            .await
            .expect("keys")["kept"],
        "c"
    );
}

/// A comet's report reaches every reader of the registry (`writer` and
/// `reader` may be the same object, or two processes' views) with its
/// counts and the time it was made, and leaves once no newer report came
/// for [`SHORT_TTL`] (the registries' report TTL): no ghost counts.
pub async fn reports_are_shared_and_expire(writer: &dyn Registry, reader: &dyn Registry) {
    writer
        .report_comet(CometReport {
            server: "comet-1".into(),
            room_counts: HashMap::from([("live://1".into(), 3)]),
            conn_count: 3,
            ..Default::default()
        })
        .await
        .expect("report");
    eventually("the report seen by the reader", || async {
        reader.comet_reports().await.map(|r| r.len()).unwrap_or(0) == 1
    })
    .await;
    let reports = reader.comet_reports().await.expect("reports");
    assert_eq!(reports[0].server, "comet-1");
    assert_eq!(reports[0].room_counts["live://1"], 3);
    assert_eq!(reports[0].conn_count, 3);
    assert!(reports[0].updated.is_some());
    eventually("the stale report to leave", || async {
        reader.comet_reports().await.expect("reports").is_empty()
    })
    .await;
}

pub(crate) fn room(room: &str, body: &str) -> PushMsg {
    PushMsg {
        r#type: PushType::Room as i32,
        operation: 1000,
        room: room.into(),
        msg: body.to_string().into(),
        ..Default::default()
    }
}

/// A push to a direct stream (`@mid:<mid>`, `@key:<key>`).
pub(crate) fn direct(stream: &str, body: &str) -> PushMsg {
    PushMsg {
        r#type: PushType::Push as i32,
        operation: 1000,
        stream: stream.into(),
        msg: body.to_string().into(),
        ..Default::default()
    }
}

pub(crate) async fn next(subscription: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
}

pub(crate) fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.msg.msg).into_owned()
}

/// A room's messages arrive in publish order, first attempts, with stream
/// positions of one epoch that increase.
pub async fn a_room_arrives_in_order_with_increasing_positions(
    bus: &dyn Bus,
    subscription: &mut Subscription,
) {
    for i in 0..20 {
        bus.publish(room("live://order", &i.to_string()), None)
            .await
            .expect("publish");
    }
    let mut last: Option<Delivery> = None;
    for i in 0..20 {
        let delivery = next(subscription).await;
        assert_eq!(body(&delivery), i.to_string());
        assert_eq!(delivery.attempt, 1);
        assert_ne!(delivery.position.epoch, 0);
        if let Some(last) = &last {
            assert_eq!(delivery.position.epoch, last.position.epoch);
            assert!(delivery.position.seq > last.position.seq);
        }
        if let Some(done) = last.replace(delivery) {
            done.ack().await;
        }
    }
    if let Some(done) = last {
        done.ack().await;
    }
}

/// A message published twice under one id is stored once: the second
/// publish says it was a duplicate, and only one copy is delivered.
pub async fn message_ids_deduplicate(bus: &dyn Bus, subscription: &mut Subscription) {
    let first = bus
        .publish(room("live://dedupe", "a"), Some("id-1".into()))
        .await
        .expect("publish");
    let again = bus
        .publish(room("live://dedupe", "a"), Some("id-1".into()))
        .await
        .expect("publish");
    bus.publish(room("live://dedupe", "b"), Some("id-2".into()))
        .await
        .expect("publish");
    assert!(!first.duplicate);
    assert!(again.duplicate);
    let a = next(subscription).await;
    assert_eq!(body(&a), "a");
    a.ack().await;
    let b = next(subscription).await;
    assert_eq!(body(&b), "b", "the duplicate was not delivered");
    b.ack().await;
}

/// A nacked message comes again, counted as a later attempt, at the same
/// stream position (so comets drop it if they already had it).
pub async fn a_nacked_message_comes_again_at_its_position(
    bus: &dyn Bus,
    subscription: &mut Subscription,
) {
    bus.publish(room("live://nack", "again"), None)
        .await
        .expect("publish");
    let first = next(subscription).await;
    let position = first.position;
    first.nack(Duration::ZERO).await;
    let second = next(subscription).await;
    assert_eq!(body(&second), "again");
    assert_eq!(second.attempt, 2);
    assert_eq!(
        (second.position.epoch, second.position.seq),
        (position.epoch, position.seq)
    );
    second.ack().await;
}

/// The history config the history checks build their buses with: rooms
/// under `live://few` keep 2 messages, rooms under `live://brief` 1 s.
pub fn history_config() -> pushcluster_api::config::HistoryConfig {
    use pushcluster_api::config::{HistoryConfig, RoomHistoryRule};
    HistoryConfig {
        rooms: vec![
            RoomHistoryRule {
                prefix: "live://few".into(),
                max_age: Duration::from_secs(60),
                max_messages: 2,
            },
            RoomHistoryRule {
                prefix: "live://brief".into(),
                max_age: Duration::from_secs(1),
                max_messages: 100,
            },
        ],
        min_ttl: Duration::from_secs(1),
        ..HistoryConfig::default()
    }
}

/// Publishes `bodies` to their rooms and consumes them: the offset of each.
async fn publish_all(
    bus: &dyn Bus,
    subscription: &mut Subscription,
    messages: &[(&str, &str)],
) -> HashMap<String, u64> {
    for (name, text) in messages {
        let msg = if pushcluster_api::streams::is_direct(name) {
            direct(name, text)
        } else {
            room(name, text)
        };
        bus.publish(msg, None).await.expect("publish");
    }
    let mut offsets = HashMap::new();
    for _ in messages {
        let delivery = next(subscription).await;
        offsets.insert(body(&delivery), delivery.position.seq);
        delivery.ack().await;
    }
    offsets
}

fn history_bodies(history: &RoomHistory) -> Vec<String> {
    history
        .messages
        .iter()
        .map(|entry| String::from_utf8_lossy(&entry.msg.msg).into_owned())
        .collect()
}

/// A client that saw a room up to a position gets what followed in that
/// room — in order, nothing of other rooms — and knows when it got all.
pub async fn a_room_history_gives_what_a_client_missed(
    bus: &dyn Bus,
    subscription: &mut Subscription,
) {
    let history = |since| bus.room_history("live://h", since, 1 << 20);
    let fresh = history(None).await.expect("history");
    assert_eq!(
        (fresh.gap, fresh.messages.len()),
        (Some(Unrecovered::Fresh), 0)
    );
    let epoch = fresh.epoch;
    let start = Since {
        epoch,
        offset: fresh.offset,
    };
    let offsets = publish_all(
        bus,
        subscription,
        &[
            ("live://h", "m1"),
            ("live://other", "x"),
            ("live://h", "m2"),
            ("live://h", "m3"),
        ],
    )
    .await;

    let all = history(Some(start)).await.expect("history");
    assert_eq!((all.gap, all.epoch), (None, epoch));
    assert_eq!(history_bodies(&all), ["m1", "m2", "m3"]);
    let got: Vec<u64> = all.messages.iter().map(|m| m.offset).collect();
    assert_eq!(got, [offsets["m1"], offsets["m2"], offsets["m3"]]);
    assert_eq!(all.offset, offsets["m3"]);

    let after_m1 = history(Some(Since {
        epoch,
        offset: offsets["m1"],
    }))
    .await
    .expect("history");
    assert_eq!(history_bodies(&after_m1), ["m2", "m3"]);

    let up_to_date = history(Some(Since {
        epoch,
        offset: offsets["m3"],
    }))
    .await
    .expect("history");
    assert_eq!((up_to_date.gap, up_to_date.messages.len()), (None, 0));
    assert_eq!(up_to_date.offset, offsets["m3"]);

    let other_epoch = history(Some(Since {
        epoch: epoch + 1,
        offset: offsets["m1"],
    }))
    .await
    .expect("history");
    assert_eq!(other_epoch.gap, Some(Unrecovered::EpochChanged));
    assert_eq!(other_epoch.epoch, epoch);

    let too_large = bus
        .room_history("live://h", Some(start), 4)
        .await
        .expect("history");
    assert_eq!(
        (too_large.gap, too_large.messages.len()),
        (Some(Unrecovered::TooLarge), 0)
    );
    assert!(too_large.offset >= offsets["m3"]);
}

/// A user's direct stream keeps what was pushed to it — whether or not the
/// user was online — apart from every room and every other user's.
pub async fn a_direct_stream_keeps_what_a_user_was_sent(
    bus: &dyn Bus,
    subscription: &mut Subscription,
) {
    let history = |since| bus.room_history("@mid:7", since, 1 << 20);
    let fresh = history(None).await.expect("history");
    let start = Since {
        epoch: fresh.epoch,
        offset: fresh.offset,
    };
    let offsets = publish_all(
        bus,
        subscription,
        &[
            ("@mid:7", "d1"),
            ("@mid:8", "other user"),
            ("live://h", "room"),
            ("@key:k7", "to a key"),
            ("@mid:7", "d2"),
        ],
    )
    .await;
    let missed = history(Some(start)).await.expect("history");
    assert_eq!(missed.gap, None);
    assert_eq!(history_bodies(&missed), ["d1", "d2"]);
    assert_eq!(missed.offset, offsets["d2"]);
    let key = bus
        .room_history("@key:k7", Some(start), 1 << 20)
        .await
        .expect("history");
    assert_eq!(history_bodies(&key), ["to a key"]);
    assert_eq!(
        bus.partition_of(&direct("@mid:7", "x")),
        bus.partition_of(&direct("@mid:7", "y")),
        "one user's pushes share a partition, so they stay in order"
    );
}

/// More missed than a room keeps, or older than it keeps: not recovered,
/// with the offset to go on from.
pub async fn a_room_history_says_when_it_no_longer_reaches_back(
    bus: &dyn Bus,
    subscription: &mut Subscription,
) {
    let fresh = bus
        .room_history("live://few", None, 1 << 20)
        .await
        .expect("history");
    let start = Since {
        epoch: fresh.epoch,
        offset: fresh.offset,
    };
    let offsets = publish_all(
        bus,
        subscription,
        &[
            ("live://few", "1"),
            ("live://few", "2"),
            ("live://few", "3"),
        ],
    )
    .await;
    let few = bus
        .room_history("live://few", Some(start), 1 << 20)
        .await
        .expect("history");
    assert_eq!(
        (few.gap, few.messages.len()),
        (Some(Unrecovered::TooMany), 0)
    );
    assert!(few.offset >= offsets["3"]);
    // Two missed of two kept is fine.
    let two = bus
        .room_history(
            "live://few",
            Some(Since {
                epoch: start.epoch,
                offset: offsets["1"],
            }),
            1 << 20,
        )
        .await
        .expect("history");
    assert_eq!(two.gap, None);
    assert_eq!(history_bodies(&two), ["2", "3"]);

    let offsets = publish_all(bus, subscription, &[("live://brief", "old")]).await;
    let before = Since {
        epoch: start.epoch,
        offset: offsets["old"] - 1,
    };
    eventually("the brief room's message to expire", || async {
        let history = bus
            .room_history("live://brief", Some(before), 1 << 20)
            .await
            .expect("history");
        history.gap == Some(Unrecovered::Expired)
    })
    .await;
}
