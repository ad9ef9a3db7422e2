//! A short run of every scenario against a real `pushcluster standalone`,
//! so the generator keeps working. The big runs are not CI's job
//! (docs/benchmarks.md).
//!
//! The server binary is the workspace's `pushcluster`, next to this
//! package's binary in the target directory (`cargo test --workspace`
//! builds both).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_pushcluster-bench");

struct Standalone {
    child: Child,
    addrs: BTreeMap<String, SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Standalone {
    fn start() -> Standalone {
        let server: PathBuf = PathBuf::from(BENCH).with_file_name("pushcluster");
        assert!(
            server.exists(),
            "{} is missing: `cargo build --bin pushcluster` (cargo test --workspace builds it)",
            server.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("pushcluster.yaml");
        std::fs::write(
            &config,
            r#"
admin: { bind: "127.0.0.1:0" }
comet:
  tcp: { bind: ["127.0.0.1:0"] }
  websocket: { bind: ["127.0.0.1:0"] }
  grpc: { bind: "127.0.0.1:0" }
  online_report_interval: 100ms
logic:
  http: { bind: "127.0.0.1:0" }
  grpc: { bind: "127.0.0.1:0" }
"#,
        )
        .expect("write config");
        let mut child = Command::new(server)
            .args(["--log-format", "json", "standalone", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pushcluster");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut addrs = BTreeMap::new();
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(event) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let fields = &event["fields"];
                match fields["message"].as_str() {
                    Some("listening") => {
                        if let (Some(name), Some(addr)) = (
                            fields["name"].as_str(),
                            fields["addr"].as_str().and_then(|a| a.parse().ok()),
                        ) {
                            addrs.insert(name.to_string(), addr);
                        }
                    }
                    Some("pushcluster standalone ready") => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(addrs.clone());
                        }
                    }
                    _ => {}
                }
            }
        });
        let addrs = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("pushcluster standalone became ready");
        Standalone {
            child,
            addrs,
            _dir: dir,
        }
    }

    fn addr(&self, name: &str) -> String {
        self.addrs[name].to_string()
    }

    /// Runs the generator with this server's addresses; returns its JSON
    /// summary.
    fn bench(&self, scenario: &str, transport: &str, extra: &[&str]) -> Value {
        let connect = match transport {
            "ws" => self.addr("comet.websocket"),
            _ => self.addr("comet.tcp"),
        };
        let pid = self.child.id().to_string();
        let output = Command::new(BENCH)
            .args(["--json", "--quiet", scenario])
            .args(["--transport", transport, "--connect", &connect])
            .args(["--http", &self.addr("logic.http"), "--pid", &pid])
            .args(extra)
            .output()
            .expect("run pushcluster-bench");
        assert!(
            output.status.success(),
            "{scenario}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "{scenario}: {e}: {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn number(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing from {report}"))
}

/// Everything pushed arrived exactly once, and the report says so.
fn assert_all_delivered(report: &Value, connections: f64) {
    assert_eq!(number(report, "connections"), connections, "{report}");
    assert_eq!(number(report, "connections_failed"), 0.0, "{report}");
    assert!(number(report, "pushes_sent") > 0.0, "{report}");
    assert_eq!(number(report, "messages_lost"), 0.0, "{report}");
    assert_eq!(number(report, "messages_duplicated"), 0.0, "{report}");
    assert_eq!(
        number(report, "messages_received"),
        number(report, "messages_expected"),
        "{report}"
    );
    assert!(number(report, "latency_p99_ms") > 0.0, "{report}");
    assert!(number(report, "server_rss_bytes") > 0.0, "{report}");
    assert!(report["generator_saturated"].is_boolean(), "{report}");
}

#[test]
fn every_scenario_runs_against_standalone() {
    let server = Standalone::start();
    let short = ["--duration", "1", "--settle", "5"];

    // First, on a fresh server: freed connections of later scenarios would
    // hide the growth.
    let idle = server.bench(
        "idle",
        "ws",
        &[
            "--connections",
            "200",
            "--per-worker",
            "100",
            "--hold",
            "0.5",
        ],
    );
    assert_eq!(number(&idle, "connections"), 200.0, "{idle}");
    assert!(
        number(&idle, "server_rss_growth_bytes_per_connection") > 0.0,
        "{idle}"
    );

    // Several worker processes (100 connections each) over TCP.
    let room = server.bench(
        "room",
        "tcp",
        &[
            &[
                "--connections",
                "300",
                "--per-worker",
                "100",
                "--rooms",
                "3",
            ][..],
            &short,
            &["--rate", "50", "--concurrency", "1"],
        ]
        .concat(),
    );
    assert_all_delivered(&room, 300.0);
    assert_eq!(number(&room, "messages_out_of_order"), 0.0);
    // Each push reached its room's 100 members.
    assert_eq!(
        number(&room, "messages_expected"),
        number(&room, "pushes_sent") * 100.0
    );

    // Clients with positions (`--resume`; WebSocket, so positioned frames
    // come inside op-9 batches): the same accounting, nothing resumed.
    let resumed = server.bench(
        "room",
        "ws",
        &[
            &["--connections", "100", "--rooms", "1", "--resume"][..],
            &short,
            &["--rate", "50", "--concurrency", "1"],
        ]
        .concat(),
    );
    assert_all_delivered(&resumed, 100.0);
    assert_eq!(number(&resumed, "messages_out_of_order"), 0.0);
    assert_eq!(number(&resumed, "resumes_not_recovered"), 0.0, "{resumed}");

    let mids = server.bench(
        "mids",
        "ws",
        &[
            &["--connections", "50", "--per-push", "5", "--rate", "50"][..],
            &short,
        ]
        .concat(),
    );
    assert_all_delivered(&mids, 50.0);
    assert_eq!(
        number(&mids, "messages_expected"),
        number(&mids, "pushes_sent") * 5.0
    );

    let broadcast = server.bench(
        "broadcast",
        "tcp",
        &[&["--connections", "40", "--rate", "20"][..], &short].concat(),
    );
    assert_all_delivered(&broadcast, 40.0);

    let lone = server.bench(
        "lone",
        "tcp",
        &["--connections", "2", "--count", "10", "--interval-ms", "1"],
    );
    assert_eq!(number(&lone, "messages_received"), 20.0, "{lone}");
    assert_eq!(number(&lone, "messages_lost"), 0.0, "{lone}");

    let churn = server.bench(
        "churn",
        "tcp",
        &["--rate", "100", "--hold-ms", "50", "--duration", "1"],
    );
    assert!(number(&churn, "churn_connects") >= 50.0, "{churn}");
    assert_eq!(number(&churn, "churn_failures"), 0.0, "{churn}");
    assert!(number(&churn, "handshake_p99_ms") > 0.0, "{churn}");
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    let output = Command::new(BENCH)
        .args(["mids", "--server", "pusher", "--connections", "1"])
        .output()
        .expect("run pushcluster-bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Pusher protocol has no per-user"),
        "{stderr}"
    );
}
