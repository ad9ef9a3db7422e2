//! The distributed fleet: real `nats-server -js`, 2 logic, 2 comet and 2 job
//! processes, clients on both comets.

use std::time::{Duration, Instant};

use pushcluster_api::pb::comet::RoomsReq;
use pushcluster_api::pb::comet::comet_client::CometClient;
use pushcluster_backplane::testing::NatsServer;
use serde_json::json;

use crate::common::*;

const COMETS: [&str; 2] = ["comet-a", "comet-b"];

fn base_config(nats_url: &str) -> serde_yaml_ng::Value {
    let text = format!(
        r#"
admin: {{ bind: "127.0.0.1:0" }}
nats: {{ url: "{nats_url}", partitions: 8, lease_ttl: 2s, request_timeout: 2s }}
logic:
  http: {{ bind: "127.0.0.1:0" }}
  grpc: {{ bind: "127.0.0.1:0" }}
  online_expire: 3s
  auth: {{ mode: none }}
  api: {{ allow_unauthenticated: true }}
comet:
  tcp: {{ bind: ["127.0.0.1:0"] }}
  websocket: {{ bind: ["127.0.0.1:0"] }}
  grpc: {{ bind: "127.0.0.1:0" }}
  online_report_interval: 500ms
  logic_timeout: 2s
  drain: 2s
job:
  delivery: {{ timeout: 2s, retry_for: 10s, backoff_base: 50ms, backoff_max: 500ms }}
discovery: {{ kind: static }}
"#
    );
    serde_yaml_ng::from_str(&text).expect("fleet config")
}

fn with(mut config: serde_yaml_ng::Value, extra: &str) -> serde_yaml_ng::Value {
    merge(&mut config, serde_yaml_ng::from_str(extra).expect("extra"));
    config
}

pub struct Fleet {
    pub nats: NatsServer,
    pub logics: Vec<Server>,
    pub comets: Vec<Server>,
    pub jobs: Vec<Server>,
    job_config: serde_yaml_ng::Value,
    comet_configs: Vec<serde_yaml_ng::Value>,
}

/// A free loopback port, for a comet's gRPC address: jobs find comets by
/// a static address, so a restarted comet must come back on the same one.
fn reserve_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

impl Fleet {
    pub fn start() -> Fleet {
        Fleet::start_with("{}")
    }

    /// A fleet whose every process gets `extra` YAML over the base config.
    pub fn start_with(extra: &str) -> Fleet {
        let nats = NatsServer::start();
        let base = with(base_config(&nats.url()), extra);
        let logics: Vec<Server> = (0..2)
            .map(|_| Server::spawn("logic", &base, "logic ready"))
            .collect();
        let logic_addrs: Vec<String> = logics
            .iter()
            .map(|l| l.addr("logic.grpc").to_string())
            .collect();
        let comet_configs: Vec<serde_yaml_ng::Value> = COMETS
            .iter()
            .map(|id| {
                with(
                    base.clone(),
                    &format!(
                        "comet: {{ id: {id}, grpc: {{ bind: '127.0.0.1:{}' }} }}\n\
                         discovery: {{ logics: {logic_addrs:?} }}",
                        reserve_port()
                    ),
                )
            })
            .collect();
        let comets: Vec<Server> = comet_configs
            .iter()
            .map(|config| Server::spawn("comet", config, "accepting clients"))
            .collect();
        let comet_list: Vec<serde_json::Value> = COMETS
            .iter()
            .zip(&comets)
            .map(|(id, c)| json!({"id": id, "addr": c.addr("comet.grpc").to_string()}))
            .collect();
        let job_config = with(
            base,
            &format!(
                "discovery: {{ comets: {} }}",
                serde_json::to_string(&comet_list).expect("json")
            ),
        );
        let jobs = (0..2)
            .map(|_| Server::spawn("job", &job_config, "job ready"))
            .collect();
        Fleet {
            nats,
            logics,
            comets,
            jobs,
            job_config,
            comet_configs,
        }
    }

    /// Starts comet `i` again (after it exited), with the same id and gRPC
    /// address; its client ports are new.
    pub fn restart_comet(&mut self, i: usize) {
        self.comets[i] = Server::spawn("comet", &self.comet_configs[i], "accepting clients");
    }

    /// Starts one more job process.
    pub fn start_job(&mut self) {
        self.jobs
            .push(Server::spawn("job", &self.job_config, "job ready"));
    }

    /// A push through logic `i` that must succeed.
    pub async fn push(&self, logic: usize, path: &str, body: &str) {
        self.logics[logic % self.logics.len()]
            .push(path, body)
            .await;
    }

    /// Sum of a metric over a group of processes.
    pub async fn sum(group: &[Server], name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for process in group {
            total += process.metric(name, labels).await;
        }
        total
    }
}

async fn all_bodies(client: &mut TcpClient, count: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    while bodies.len() < count {
        bodies.push(body(&client.recv().await));
    }
    bodies
}

async fn all_ws_bodies(client: &mut WsClient, count: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    while bodies.len() < count {
        bodies.extend(inner_frames(&client.recv_frame().await).iter().map(body));
    }
    bodies
}

#[tokio::test]
async fn pushes_of_every_kind_arrive_once_across_comets() {
    let fleet = Fleet::start();
    let (a, b) = (&fleet.comets[0], &fleet.comets[1]);
    let mut a1 = TcpClient::auth(
        a.tcp(),
        json!({"mid": 1, "key": "a1", "room_id": "live://1", "accepts": [1000]}),
    )
    .await;
    let mut b1 = WsClient::auth(
        b.ws(),
        json!({"mid": 2, "key": "b1", "room_id": "live://1", "accepts": [1000]}),
    )
    .await;
    let mut b2 = TcpClient::auth(b.tcp(), json!({"mid": 1, "key": "b2", "accepts": [1000]})).await;

    // The room count in heartbeats spans both comets (reports through NATS KV).
    let mut online = 0;
    for seq in 2..400 {
        online = a1.heartbeat(seq).await;
        if online == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(online, 2, "cluster-wide room count");

    fleet
        .push(0, "/goim/push/keys?operation=1000&keys=a1&keys=b1", "keys")
        .await;
    assert_eq!(body(&a1.recv().await), "keys");
    assert_eq!(all_ws_bodies(&mut b1, 1).await, ["keys"]);

    fleet
        .push(1, "/goim/push/mids?operation=1000&mids=1", "mid 1")
        .await;
    assert_eq!(body(&a1.recv().await), "mid 1");
    assert_eq!(body(&b2.recv().await), "mid 1");

    for i in 0..50 {
        fleet
            .push(
                i,
                "/goim/push/room?operation=1000&type=live&room=1",
                &format!("r{i}"),
            )
            .await;
    }
    let expected: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
    assert_eq!(
        all_bodies(&mut a1, 50).await,
        expected,
        "in order on comet-a"
    );
    assert_eq!(
        all_ws_bodies(&mut b1, 50).await,
        expected,
        "in order on comet-b"
    );

    fleet.push(0, "/goim/push/all?operation=1000", "all").await;
    assert_eq!(body(&a1.recv().await), "all");
    assert_eq!(all_ws_bodies(&mut b1, 1).await, ["all"]);
    assert_eq!(body(&b2.recv().await), "all");

    // The same Idempotency-Key through either logic delivers once.
    for logic in &fleet.logics {
        let response = reqwest::Client::new()
            .post(format!(
                "http://{}/goim/push/room?operation=1000&type=live&room=1",
                logic.addr("logic.http")
            ))
            .header("Idempotency-Key", "order-1")
            .body("once")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
    }
    assert_eq!(body(&a1.recv().await), "once");
    assert_eq!(all_ws_bodies(&mut b1, 1).await, ["once"]);

    // Exactly once: nothing else is on its way.
    a1.expect_silence().await;
    b2.expect_silence().await;
    assert!(b1.try_recv_frame(QUIET).await.is_none());

    // Every process's metrics are documented.
    for process in fleet.logics.iter().chain(&fleet.comets).chain(&fleet.jobs) {
        let (_, text) = process.admin("/metrics").await;
        crate::docs::assert_metrics_documented(&text);
    }
}

#[tokio::test]
async fn a_killed_job_loses_nothing_and_keeps_room_order() {
    let mut fleet = Fleet::start();
    let mut a1 = TcpClient::auth(fleet.comets[0].tcp(), json!({"room_id": "live://k"})).await;
    let mut b1 = TcpClient::auth(fleet.comets[1].tcp(), json!({"room_id": "live://k"})).await;
    let total = 1000;
    let mut killed = false;
    for i in 0..total {
        fleet
            .push(
                0,
                "/goim/push/room?operation=1000&type=live&room=k",
                &format!("{i}"),
            )
            .await;
        if i == 300 {
            // Kill the job that owns the room's partition.
            let mut owner = None;
            for (index, job) in fleet.jobs.iter().enumerate() {
                if job
                    .metric(
                        "pushcluster_job_messages_consumed_total",
                        &[("kind", "room")],
                    )
                    .await
                    > 0.0
                {
                    owner = Some(index);
                }
            }
            let owner = owner.expect("one job consumed the room");
            fleet.jobs[owner].kill9();
            killed = true;
        }
    }
    assert!(killed);
    let expected: Vec<String> = (0..total).map(|i| i.to_string()).collect();
    assert_eq!(
        all_bodies(&mut a1, total).await,
        expected,
        "comet-a: all, in order"
    );
    assert_eq!(
        all_bodies(&mut b1, total).await,
        expected,
        "comet-b: all, in order"
    );
    a1.expect_silence().await;
    b1.expect_silence().await;
    let duplicates = Fleet::sum(
        &fleet.comets,
        "pushcluster_comet_duplicates_dropped_total",
        &[("kind", "room")],
    )
    .await;
    eprintln!("duplicates dropped at comets after the kill: {duplicates}");
}

#[tokio::test]
async fn a_killed_comet_leaves_the_registry_and_does_not_delay_the_other() {
    let mut fleet = Fleet::start();
    let _gone = TcpClient::auth(fleet.comets[0].tcp(), json!({"key": "on-a"})).await;
    let mut b1 = TcpClient::auth(fleet.comets[1].tcp(), json!({"room_id": "live://x"})).await;
    fleet.comets[0].kill9();

    // Room pushes keep reaching comet-b promptly: the dead comet is skipped.
    for i in 0..5 {
        let sent = Instant::now();
        fleet
            .push(
                0,
                "/goim/push/room?operation=1000&type=live&room=x",
                &format!("{i}"),
            )
            .await;
        assert_eq!(body(&b1.recv().await), i.to_string());
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "delivery to the live comet waited {:?} (retry_for is 10 s)",
            sent.elapsed()
        );
    }
    // Once its reports stop counting (online_expire: 3 s), its sessions are
    // offline for pushes.
    let started = Instant::now();
    loop {
        fleet
            .push(1, "/goim/push/keys?operation=1000&keys=on-a", "x")
            .await;
        // Counted by job, which finds a direct push's connections.
        let offline = Fleet::sum(
            &fleet.jobs,
            "pushcluster_job_messages_dropped_total",
            &[("kind", "push"), ("reason", "offline")],
        )
        .await;
        if offline >= 1.0 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the dead comet's session stayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_fleet_recovers_from_a_nats_restart() {
    let mut fleet = Fleet::start();
    let mut a1 = TcpClient::auth(fleet.comets[0].tcp(), json!({"room_id": "live://n"})).await;
    fleet
        .push(
            0,
            "/goim/push/room?operation=1000&type=live&room=n",
            "before",
        )
        .await;
    assert_eq!(body(&a1.recv().await), "before");

    fleet.nats.stop();
    for logic in &fleet.logics {
        logic.wait_readyz(503).await;
    }
    let (_, json) = fleet.logics[0]
        .post("/goim/push/room?operation=1000&type=live&room=n", "lost?")
        .await;
    assert_eq!(
        json["code"], -500,
        "a push NATS cannot take is refused, not lost silently"
    );
    assert!(
        json["message"]
            .as_str()
            .unwrap_or_default()
            .contains("NATS"),
        "{json}"
    );

    fleet.nats.restart();
    for process in fleet.logics.iter().chain(&fleet.jobs) {
        process.wait_readyz(200).await;
    }
    fleet
        .push(
            1,
            "/goim/push/room?operation=1000&type=live&room=n",
            "after",
        )
        .await;
    assert_eq!(body(&a1.recv().await), "after");
    a1.expect_silence().await;
}

#[tokio::test]
async fn a_draining_comet_closes_its_clients_over_the_drain_period() {
    let mut fleet = Fleet::start();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(TcpClient::auth(fleet.comets[0].tcp(), json!({})).await);
    }
    let started = Instant::now();
    fleet.comets[0].sigterm();
    fleet.comets[0].wait_readyz(503).await;
    let closes = clients.iter_mut().map(|client| async move {
        client.expect_closed().await;
        started.elapsed()
    });
    let mut closed_after = futures_util::future::join_all(closes).await;
    closed_after.sort();
    assert!(
        closed_after[3] - closed_after[0] >= Duration::from_millis(1000),
        "closes were not spread over the 2 s drain: {closed_after:?}"
    );
    assert!(fleet.comets[0].wait_exit(Duration::from_secs(20)).success());
    // The other comet still serves.
    TcpClient::auth(fleet.comets[1].tcp(), json!({})).await;
}

#[tokio::test]
async fn the_fleet_links_run_over_mutual_tls_and_refuse_plain_peers() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    let dir = tempfile::tempdir().expect("temp dir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["pushcluster".to_string()])
        .expect("params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("ca.crt"), ca.pem()).expect("write");
    std::fs::write(path("tls.crt"), leaf.pem()).expect("write");
    std::fs::write(path("tls.key"), leaf_key.serialize_pem()).expect("write");
    let fleet = Fleet::start_with(&format!(
        "grpc_tls: {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?} }}",
        path("tls.crt"),
        path("tls.key"),
        path("ca.crt")
    ));

    // Connect (comet → logic) and delivery (job → comet) both cross TLS.
    let mut client =
        TcpClient::auth(fleet.comets[0].tcp(), json!({"mid": 9, "accepts": [1000]})).await;
    fleet
        .push(0, "/goim/push/mids?operation=1000&mids=9", "over mTLS")
        .await;
    assert_eq!(body(&client.recv().await), "over mTLS");

    // A peer without a client certificate gets nothing from a comet.
    let plain = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        fleet.comets[0].addr("comet.grpc")
    ))
    .expect("endpoint")
    .connect_timeout(Duration::from_secs(2))
    .connect()
    .await;
    if let Ok(channel) = plain {
        let mut comet = CometClient::new(channel);
        let answer = tokio::time::timeout(WAIT, comet.rooms(RoomsReq {}))
            .await
            .expect("an answer in time");
        assert!(answer.is_err(), "a plain-text peer was served: {answer:?}");
    }
}

/// Overload: with every job gone, a room's partition backs up. Past
/// `logic.backpressure.max_lag` logic answers 429 with `Retry-After`
/// instead of growing the backlog; once a job is back and has caught up,
/// pushes are accepted again, and every accepted push is delivered in order.
#[tokio::test]
async fn pushes_are_refused_with_retry_after_while_the_backlog_is_over_its_bound() {
    let mut fleet = Fleet::start_with(
        "logic: { backpressure: { max_lag: 20, max_delay: 0s, interval: 100ms, retry_after: 2s } }",
    );
    let mut client = TcpClient::auth(fleet.comets[0].tcp(), json!({"room_id": "live://bp"})).await;
    let path = "/goim/push/room?operation=1000&type=live&room=bp";
    fleet.push(0, path, "0").await;
    assert_eq!(body(&client.recv().await), "0");
    for job in &mut fleet.jobs {
        job.kill9();
    }
    let http = reqwest::Client::new();
    let url = format!("http://{}{path}", fleet.logics[0].addr("logic.http"));
    let mut accepted = vec!["0".to_string()];
    let mut refusal = None;
    // Pushes go in bursts, and after each the test waits for a lag reading
    // that includes them: how many are accepted then depends on the bound,
    // not on how long a reading takes on a busy machine. Within a burst a
    // reading taken before its last pushes were stored can undercount them,
    // by at most the burst.
    const BURST: usize = 5;
    'pushing: for burst in 0..100 {
        for i in burst * BURST + 1..=(burst + 1) * BURST {
            let response = http
                .post(&url)
                .body(i.to_string())
                .send()
                .await
                .expect("push");
            match response.status().as_u16() {
                200 => accepted.push(i.to_string()),
                429 => {
                    let retry_after = response.headers()["retry-after"]
                        .to_str()
                        .expect("header")
                        .to_string();
                    let bytes = response.bytes().await.expect("body");
                    let json: serde_json::Value =
                        serde_json::from_slice(&bytes).expect("JSON body");
                    refusal = Some((retry_after, json));
                    break 'pushing;
                }
                other => panic!("push {i}: HTTP {other}"),
            }
        }
        let undelivered = (accepted.len() - 1) as f64;
        fleet.logics[0]
            .wait_metric("pushcluster_logic_bus_lag_max_messages", &[], undelivered)
            .await;
    }
    let (retry_after, json) = refusal.expect("refused before 500 pushes");
    assert_eq!(retry_after, "2");
    assert_eq!(json["code"], -429, "{json}");
    // Refused once the backlog passed the bound (20): not before 19 were
    // undelivered (the lag may also count "0" if job was killed before
    // acking it, and one publish that a reading already saw), and not
    // after one burst more.
    let undelivered = accepted.len() - 1;
    assert!(
        (19..=20 + BURST).contains(&undelivered),
        "refused after {undelivered} undelivered pushes"
    );
    assert!(
        fleet.logics[0]
            .metric(
                "pushcluster_logic_pushes_throttled_total",
                &[("kind", "room")]
            )
            .await
            >= 1.0
    );
    // A job comes back and drains the backlog; pushes are accepted again.
    fleet.start_job();
    let after = accepted.len();
    wait_until(|| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http.post(&url).body(after.to_string()).send().await;
            matches!(response, Ok(r) if r.status().as_u16() == 200)
        }
    })
    .await;
    accepted.push(after.to_string());
    assert_eq!(
        all_bodies(&mut client, accepted.len() - 1).await,
        accepted[1..],
        "every accepted push, in order"
    );
}

/// Each thread's scheduler slice in nanoseconds, as the kernel reports it.
fn thread_slices(pid: u32) -> Vec<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("sched")).ok())
        .map(|sched| {
            sched
                .lines()
                .find(|line| line.starts_with("se.slice"))
                .and_then(|line| line.split(':').nth(1))
                .and_then(|value| value.trim().parse().ok())
                .expect("se.slice in /proc/PID/task/TID/sched (Linux 6.12 or later)")
        })
        .collect()
}

/// `runtime.scheduler_slice` sets the slice of every thread of the process
/// that has it (here a job, as one would for a relay sharing a core with a
/// busy comet); without it the kernel's own applies. In a file every role
/// shares, the job's own `job.runtime` wins over `runtime`, and the comets'
/// section is not the job's.
#[tokio::test]
async fn the_scheduler_slice_applies_to_every_thread_of_the_process_that_sets_it() {
    let mut fleet = Fleet::start();
    let kernels = thread_slices(fleet.comets[0].pid());
    assert!(!kernels.is_empty());
    assert!(kernels.iter().all(|&s| s != 100_000), "{kernels:?}");
    assert_eq!(thread_slices(fleet.jobs[0].pid())[0], kernels[0]);
    fleet.job_config = with(
        fleet.job_config.clone(),
        "{ runtime: { scheduler_slice: 300us }, \
           comet: { runtime: { scheduler_slice: 200us } }, \
           job: { runtime: { scheduler_slice: 100us } } }",
    );
    fleet.start_job();
    let slices = thread_slices(fleet.jobs[2].pid());
    assert!(slices.len() > 1, "the runtime's threads too: {slices:?}");
    assert!(slices.iter().all(|&s| s == 100_000), "{slices:?}");
}
