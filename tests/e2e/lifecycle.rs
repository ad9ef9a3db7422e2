//! Admin endpoints, slow consumers and shutdown.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn admin_port_serves_health_readiness_and_metrics() {
    let server = Server::start();
    assert_eq!(server.admin("/healthz").await.0, 200);
    assert_eq!(server.admin("/readyz").await.0, 200);
    let _client = TcpClient::auth(server.tcp(), json!({})).await;
    server
        .push("/goim/push/room?operation=1000&type=live&room=1", "m")
        .await;
    server
        .wait_metric(
            "pushcluster_comet_connections",
            &[("transport", "tcp")],
            1.0,
        )
        .await;
    assert_eq!(
        server
            .metric("pushcluster_ready", &[("role", "standalone")])
            .await,
        1.0
    );
    let (_, text) = server.admin("/metrics").await;
    assert!(text.contains(&format!(
        "pushcluster_build_info{{role=\"standalone\",version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    for name in [
        "pushcluster_comet_connects_total",
        "pushcluster_comet_pushes_total",
        "pushcluster_logic_http_requests_total",
        "pushcluster_logic_http_request_duration_seconds_bucket",
        "pushcluster_logic_messages_published_total",
        "pushcluster_job_messages_consumed_total",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            line.starts_with("pushcluster_") || line.starts_with("process_"),
            "unprefixed metric: {line}"
        );
    }
}

#[tokio::test]
async fn delivery_latency_is_measured_from_publish_to_the_client_socket() {
    let server = Server::start();
    let mut client = TcpClient::auth(
        server.tcp(),
        json!({"mid": 7, "key": "k-latency", "room_id": "live://lat", "accepts": [1000]}),
    )
    .await;
    let latency = "pushcluster_comet_delivery_latency_seconds_count";
    assert_eq!(server.metric(latency, &[]).await, 0.0);
    // A heartbeat reply is no pushed message: it is not measured.
    client.heartbeat(1).await;
    server
        .push("/goim/push/keys?operation=1000&keys=k-latency", "a")
        .await;
    server
        .push("/goim/push/room?operation=1000&type=live&room=lat", "b")
        .await;
    server.push("/goim/push/all?operation=1000", "c").await;
    let mut bodies = Vec::new();
    while bodies.len() < 3 {
        let frame = client.recv().await;
        if frame.op == 9 {
            bodies.extend(inner_frames(&frame).iter().map(body));
        } else {
            bodies.push(body(&frame));
        }
    }
    bodies.sort();
    assert_eq!(bodies, ["a", "b", "c"]);
    // One observation per socket write that carried pushes (the three may
    // share a write).
    server.wait_metric(latency, &[], 1.0).await;
    let writes = server.metric(latency, &[]).await;
    assert!((1.0..=3.0).contains(&writes), "{writes} observations");
    // In seconds, from a real publish time: not 0 (unset), not epoch-sized.
    let sum = server
        .metric("pushcluster_comet_delivery_latency_seconds_sum", &[])
        .await;
    assert!(sum > 0.0 && sum < 60.0, "latency sum {sum}s");
}

#[tokio::test]
async fn a_slow_consumer_is_closed_and_counted_without_stalling_its_room() {
    let server = Server::start_with(
        r#"
comet:
  protocol: { send_queue: 8, write_timeout: 60s }
  tcp: { sndbuf: 4096 }
"#,
    );
    // Never reads, with a small receive buffer: its socket fills up quickly.
    let mut slow = TcpClient::connect_small_buffer(server.tcp()).await;
    slow.send(&auth_frame(&json!({"room_id": "live://s"})))
        .await;
    let mut healthy = TcpClient::auth(server.tcp(), json!({"room_id": "live://s"})).await;
    server
        .wait_metric(
            "pushcluster_comet_connections",
            &[("transport", "tcp")],
            2.0,
        )
        .await;

    let payload = "z".repeat(2 * 1024);
    let mut received = 0;
    for i in 0..300 {
        server
            .push(
                "/goim/push/room?operation=1000&type=live&room=s",
                &format!("{i}:{payload}"),
            )
            .await;
        // The healthy member keeps up the whole time.
        while let Some(push) = healthy.try_recv(Duration::from_millis(1)).await {
            assert!(body(&push).starts_with(&format!("{received}:")), "in order");
            received += 1;
        }
    }
    while received < 300 {
        let push = healthy.recv().await;
        assert!(body(&push).starts_with(&format!("{received}:")), "in order");
        received += 1;
    }
    server
        .wait_metric(
            "pushcluster_comet_disconnects_total",
            &[("reason", "slow_consumer")],
            1.0,
        )
        .await;
    assert!(
        server
            .metric(
                "pushcluster_comet_messages_dropped_total",
                &[("reason", "slow_consumer")]
            )
            .await
            >= 1.0
    );
    let frames = slow.expect_closed().await;
    assert!(frames.len() < 300, "the slow client was cut off");
}

#[tokio::test]
async fn sigterm_stops_accepting_flushes_closes_and_exits_0() {
    let mut server = Server::start_with("comet: { drain: 2s, tcp: { sndbuf: 4096 } }");
    // A reader that has not read yet: its pushes wait in the comet.
    let mut lagging = TcpClient::connect_small_buffer(server.tcp()).await;
    lagging
        .send(&auth_frame(&json!({"room_id": "live://d", "accepts": []})))
        .await;
    let mut other = TcpClient::auth(server.tcp(), json!({"room_id": "live://d"})).await;
    server
        .wait_metric(
            "pushcluster_comet_connections",
            &[("transport", "tcp")],
            2.0,
        )
        .await;
    let payload = "p".repeat(8 * 1024);
    for i in 0..20 {
        server
            .push(
                "/goim/push/room?operation=1000&type=live&room=d",
                &format!("{i}:{payload}"),
            )
            .await;
    }
    server
        .wait_metric(
            "pushcluster_job_messages_delivered_total",
            &[("kind", "room")],
            20.0,
        )
        .await;

    server.sigterm();
    // Not ready any more while draining; new connections are refused.
    wait_until(|| async {
        let url = format!("http://{}/readyz", server.addr("admin"));
        matches!(reqwest::get(url).await, Ok(r) if r.status() == 503)
    })
    .await;
    assert_eq!(
        server
            .metric("pushcluster_ready", &[("role", "standalone")])
            .await,
        0.0,
        "alerts see the drain too"
    );
    wait_until(|| async { tokio::net::TcpStream::connect(server.tcp()).await.is_err() }).await;

    // Everything queued before the drain still arrives, then the close.
    let frames = lagging.expect_closed().await;
    let bodies: Vec<String> = frames.iter().map(body).collect();
    assert_eq!(bodies[0], "", "auth reply first");
    assert_eq!(
        bodies.len(),
        21,
        "auth reply and all 20 pushes were flushed"
    );
    for (i, body) in bodies[1..].iter().enumerate() {
        assert!(body.starts_with(&format!("{i}:")));
    }
    let frames = other.expect_closed().await;
    assert_eq!(frames.len(), 20);

    let status = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    assert!(server.log_contains("drain finished"));
    assert!(server.log_contains("\"stopped\""));
}

#[tokio::test]
async fn sigterm_spreads_closes_over_the_drain_period() {
    let mut server = Server::start_with("comet: { drain: 2s }");
    let mut clients = four_clients(&server).await;
    let started = std::time::Instant::now();
    server.sigterm();
    let closes = clients.iter_mut().map(|client| async move {
        client.expect_closed().await;
        started.elapsed()
    });
    let mut closed_after = futures_util::future::join_all(closes).await;
    closed_after.sort();
    // Four closes over 2 s: the last comes well after the first.
    assert!(
        closed_after[3] - closed_after[0] >= Duration::from_millis(1000),
        "closes were not spread: {closed_after:?}"
    );
    assert!(server.wait_exit(Duration::from_secs(20)).success());
}

#[tokio::test]
async fn a_drain_ends_when_the_clients_have_left_by_themselves() {
    let mut server = Server::start_with("comet: { drain: 60s }");
    let mut clients = four_clients(&server).await;
    server.sigterm();
    // One is closed by the drain; the others leave on their own (as
    // clients of a pod being replaced do). The drain must not wait out its
    // 60 s for connections that are gone.
    let closes = clients
        .iter_mut()
        .map(|client| Box::pin(client.expect_closed()));
    futures_util::future::select_all(closes).await;
    drop(clients);
    assert!(server.wait_exit(Duration::from_secs(15)).success());
    assert!(server.log_contains("drain finished"));
}

/// Four authenticated TCP clients, counted by the comet.
async fn four_clients(server: &Server) -> Vec<TcpClient> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(TcpClient::auth(server.tcp(), json!({})).await);
    }
    server
        .wait_metric(
            "pushcluster_comet_connections",
            &[("transport", "tcp")],
            4.0,
        )
        .await;
    clients
}
