//! The chart's Grafana dashboard and alert rules against a real Prometheus
//! (Debian's `prometheus` package, which brings `promtool`): a standalone
//! server, a distributed fleet on NATS and the operator (on the fake API
//! server) carry a little load while Prometheus scrapes their admin ports.
//! Every panel query and rule must evaluate, and every panel query must
//! return data.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::fleet::Fleet;
use crate::operator::{api_with_a_pushcluster, start_operator};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn tool(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_string())
}

const NEEDS_PROMETHEUS: &str = "install Prometheus (Debian: apt-get install prometheus; .ci/run does) or set PROMETHEUS_BIN/PROMTOOL_BIN";

struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` every second and evaluating the
    /// chart's rules every second.
    async fn start(jobs: &[(&str, Vec<SocketAddr>)]) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let scrape: Vec<Value> = jobs
            .iter()
            .map(|(job, targets)| {
                json!({
                    "job_name": job,
                    "static_configs": [{
                        "targets": targets.iter().map(ToString::to_string).collect::<Vec<_>>()
                    }]
                })
            })
            .collect();
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [repo("charts/pushcluster/files/alerts.yaml")],
            "scrape_configs": scrape,
        });
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(
            &config_path,
            serde_yaml_ng::to_string(&config).expect("yaml"),
        )
        .expect("write config");
        let http = reqwest::Client::new();
        // Prometheus takes a fixed port: pick a free one, retry if it is
        // taken in between.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut child = Command::new(tool("PROMETHEUS_BIN", "prometheus"))
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run prometheus: {e}; {NEEDS_PROMETHEUS}"));
            let url = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: most likely the port; try another
                }
                let ready = http.get(format!("{url}/-/ready")).send().await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    return Prometheus {
                        child,
                        url,
                        http,
                        _dir: dir,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("prometheus did not become ready");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("prometheus did not start");
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url =
            reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query).expect("a URL");
        let response = self.http.get(url).send().await.expect("prometheus answers");
        let bytes = response.bytes().await.expect("prometheus body");
        serde_json::from_slice(&bytes).expect("prometheus JSON")
    }

    /// An instant query: its result, or Prometheus's error.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let answer = self.api("/api/v1/query", &[("query", expr)]).await;
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Each dashboard query with Grafana's variables filled in as Grafana
/// would: every namespace and fleet, a rate window of a few scrapes.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("charts/pushcluster/dashboards/pushcluster.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "20s")
                .replace("$namespace", ".*")
                .replace("$job", ".*");
            assert!(!expr.contains('$'), "unknown variable in {expr}");
            let name = format!("{} / {}", panel["title"], target["legendFormat"]);
            queries.push((name, expr));
        }
    }
    queries
}

/// A value Grafana would draw: any finite sample.
fn has_data(result: &[Value]) -> bool {
    result.iter().any(|series| {
        series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// Pushes of every kind to one process's HTTP API.
async fn push_round(server: &Server, keys: &str, round: usize) {
    server
        .push(
            &format!("/goim/push/keys?operation=1000&{keys}"),
            &format!("k{round}"),
        )
        .await;
    server
        .push(
            "/goim/push/room?operation=1000&type=live&room=obs",
            &format!("r{round}"),
        )
        .await;
    server
        .push("/goim/push/all?operation=1000", &format!("a{round}"))
        .await;
    // Offline targets and a bad request count too.
    server
        .push("/goim/push/mids?operation=1000&mids=424242", "nobody")
        .await;
    let (_, answer) = server
        .post("/goim/push/room?operation=1000", "no room")
        .await;
    assert_eq!(answer["code"], -400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_panels_and_alert_rules_work_against_a_real_prometheus() {
    let standalone = Server::start();
    let fleet = Fleet::start();
    let kube = api_with_a_pushcluster().await;
    let operator = start_operator(&kube);

    // Clients on every comet, over both transports, reading everything.
    let auth =
        |key: &str| json!({"mid": 7, "key": key, "room_id": "live://obs", "accepts": [1000]});
    let readers = vec![
        tokio::spawn(
            TcpClient::auth(standalone.tcp(), auth("s1"))
                .await
                .read_until_closed(),
        ),
        tokio::spawn(
            WsClient::auth(standalone.ws(), auth("s2"))
                .await
                .read_until_closed(),
        ),
        tokio::spawn(
            TcpClient::auth(fleet.comets[0].tcp(), auth("f1"))
                .await
                .read_until_closed(),
        ),
        tokio::spawn(
            WsClient::auth(fleet.comets[1].ws(), auth("f2"))
                .await
                .read_until_closed(),
        ),
    ];

    let admin = |servers: &[Server]| servers.iter().map(|s| s.addr("admin")).collect::<Vec<_>>();
    let mut fleet_targets = admin(&fleet.comets);
    fleet_targets.extend(admin(&fleet.logics));
    fleet_targets.extend(admin(&fleet.jobs));
    let prometheus = Prometheus::start(&[
        ("standalone", vec![standalone.addr("admin")]),
        ("fleet", fleet_targets),
        ("operator", vec![operator.addr("admin")]),
    ])
    .await;

    // Every panel query and every rule is valid PromQL, at once.
    let queries = dashboard_queries();
    assert!(queries.len() > 50, "{} queries", queries.len());
    for (name, expr) in &queries {
        if let Err(error) = prometheus.query(expr).await {
            panic!("panel {name}: {error}\n{expr}");
        }
    }

    // Load until every panel query has data (bounded).
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut round = 0;
    let mut missing: Vec<String>;
    loop {
        push_round(&standalone, "keys=s1&keys=s2", round).await;
        push_round(&fleet.logics[round % 2], "keys=f1&keys=f2", round).await;
        round += 1;
        missing = Vec::new();
        for (name, expr) in &queries {
            let result = prometheus.query(expr).await.expect("valid");
            if !has_data(&result) {
                missing.push(format!("{name}: {expr}"));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        missing.is_empty(),
        "panels without data:\n{}",
        missing.join("\n")
    );

    // Every scrape target is up and carries its role.
    let targets = prometheus.api("/api/v1/targets", &[]).await;
    let active = targets["data"]["activeTargets"]
        .as_array()
        .expect("targets");
    assert_eq!(active.len(), 8, "{targets}");
    for target in active {
        assert_eq!(target["health"], "up", "{target}");
    }
    let roles = prometheus
        .query("count by (job, role) (pushcluster_build_info)")
        .await
        .expect("valid");
    assert_eq!(
        roles.len(),
        5,
        "standalone; comet, logic, job; operator: {roles:?}"
    );

    // Every rule has been evaluated without error...
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rules = prometheus.api("/api/v1/rules", &[]).await;
        let all: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules").iter())
            .collect();
        assert_eq!(all.len(), 16, "every rule of alerts.yaml is loaded");
        let broken: Vec<&&Value> = all.iter().filter(|r| r["health"] != "ok").collect();
        if broken.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "rules not healthy: {broken:#?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // ...and a healthy system raises none.
    let alerts = prometheus.api("/api/v1/alerts", &[]).await;
    assert_eq!(alerts["data"]["alerts"], json!([]), "{alerts:#}");

    for reader in readers {
        reader.abort();
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let promtool = tool("PROMTOOL_BIN", "promtool");
    for args in [
        vec!["check", "rules", "charts/pushcluster/files/alerts.yaml"],
        vec!["test", "rules", "tests/alerts/alerts_test.yaml"],
    ] {
        let output = Command::new(&promtool)
            .args(&args)
            .current_dir(repo(""))
            .output()
            .unwrap_or_else(|e| panic!("cannot run promtool: {e}; {NEEDS_PROMETHEUS}"));
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
