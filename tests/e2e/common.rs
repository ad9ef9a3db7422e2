//! Test harness: starts the real `pushcluster standalone` binary on
//! ephemeral loopback ports with a temp config, and drives it with real TCP,
//! WebSocket, HTTP and gRPC clients. Every wait is bounded.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use pushcluster_api::protocol::{Frame, decode_server_stream, op};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a test waits to be sure something does not arrive.
pub const QUIET: Duration = Duration::from_millis(300);

/// Base config: every listener on 127.0.0.1:0, fast reports, short drain.
const BASE_CONFIG: &str = r#"
admin: { bind: "127.0.0.1:0" }
comet:
  id: comet-test
  tcp: { bind: ["127.0.0.1:0"] }
  websocket: { bind: ["127.0.0.1:0"] }
  grpc: { bind: "127.0.0.1:0" }
  online_report_interval: 100ms
  drain: 1s
logic:
  http: { bind: "127.0.0.1:0" }
  grpc: { bind: "127.0.0.1:0" }
"#;

pub fn merge(base: &mut serde_yaml_ng::Value, extra: serde_yaml_ng::Value) {
    match (base, extra) {
        (serde_yaml_ng::Value::Mapping(base), serde_yaml_ng::Value::Mapping(extra)) => {
            for (key, value) in extra {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, extra) => *base = extra,
    }
}

pub struct Server {
    child: Child,
    addrs: BTreeMap<String, SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with("")
    }

    /// Starts standalone with `extra` YAML merged over the base config.
    pub fn start_with(extra: &str) -> Server {
        let mut config: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(BASE_CONFIG).expect("base config");
        if !extra.trim().is_empty() {
            merge(
                &mut config,
                serde_yaml_ng::from_str(extra).expect("extra config"),
            );
        }
        Server::spawn("standalone", &config, "pushcluster standalone ready")
    }

    /// Runs `pushcluster <command> --config <config>` and waits for the log
    /// line `ready` (listening addresses are logged before it).
    pub fn spawn(command: &str, config: &serde_yaml_ng::Value, ready: &str) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pushcluster.yaml");
        std::fs::write(&path, serde_yaml_ng::to_string(&config).expect("yaml")).expect("write");
        let path = path.to_string_lossy().into_owned();
        Server::spawn_args(&[command, "--config", &path], &[], dir, ready)
    }

    /// Runs `pushcluster <args>` with extra environment variables, keeps
    /// `dir` until the process is gone, and waits for the log line `ready`.
    pub fn spawn_args(
        args: &[&str],
        envs: &[(&str, &str)],
        dir: tempfile::TempDir,
        ready: &str,
    ) -> Server {
        let command = args.first().copied().unwrap_or_default().to_string();
        let mut child = Command::new(env!("CARGO_BIN_EXE_pushcluster"))
            .args([
                "--log-format",
                "json",
                "--log-level",
                "info,pushcluster_comet=debug",
            ])
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pushcluster");
        let stdout = child.stdout.take().expect("stdout");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        let ready = ready.to_string();
        std::thread::spawn(move || {
            let mut addrs = BTreeMap::new();
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    let fields = &event["fields"];
                    match fields["message"].as_str() {
                        Some("listening") => {
                            let name = fields["name"].as_str().unwrap_or_default().to_string();
                            if let Some(addr) = fields["addr"].as_str().and_then(|a| a.parse().ok())
                            {
                                addrs.insert(name, addr);
                            }
                        }
                        Some(message) if message == ready => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(addrs.clone());
                            }
                        }
                        _ => {}
                    }
                }
                sink.lock().expect("logs").push(line);
            }
        });
        let addrs = match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "pushcluster {command} did not become ready; log:\n{}",
                    logs.lock().expect("logs").join("\n")
                );
            }
        };
        Server {
            child,
            addrs,
            logs,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("no listener {name}: {:?}", self.addrs))
    }

    pub fn tcp(&self) -> SocketAddr {
        self.addr("comet.tcp")
    }

    pub fn ws(&self) -> SocketAddr {
        self.addr("comet.websocket")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log lines so far (JSON).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs").clone()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.logs().iter().any(|line| line.contains(needle))
    }

    pub async fn wait_for_log(&self, needle: &str) {
        wait_until(|| async { self.log_contains(needle) }).await;
    }

    /// POSTs to the logic HTTP API and returns (status, JSON body).
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let url = format!("http://{}{path}", self.addr("logic.http"));
        let response = self
            .http
            .post(url)
            .body(body)
            .send()
            .await
            .expect("HTTP request");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("HTTP body");
        (status, serde_json::from_slice(&bytes).expect("JSON body"))
    }

    /// A push that must succeed with code 0. Refused with 429 (backpressure:
    /// e.g. while a killed job's partition waits for its new owner), it is
    /// sent again after a second, as a publisher honouring `Retry-After`.
    pub async fn push(&self, path: &str, body: &str) {
        let deadline = std::time::Instant::now() + 3 * WAIT;
        let (status, json) = loop {
            let (status, json) = self.post(path, body.to_string()).await;
            if status != 429 || std::time::Instant::now() > deadline {
                break (status, json);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        assert_eq!(
            (status, &json["code"]),
            (200, &Value::from(0)),
            "{path}: {json}"
        );
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let url = format!("http://{}{path}", self.addr("logic.http"));
        let response = self.http.get(url).send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("HTTP body");
        (status, serde_json::from_slice(&bytes).expect("JSON body"))
    }

    /// GETs from the admin port: (status, text).
    pub async fn admin(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.addr("admin"));
        let response = self.http.get(url).send().await.expect("admin request");
        (
            response.status().as_u16(),
            response.text().await.expect("admin body"),
        )
    }

    /// The value of one series from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, text) = self.admin("/metrics").await;
        parse_metric(&text, name, labels)
    }

    /// Waits until the series reaches at least `value`.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let reached = tokio::time::timeout(WAIT, async {
            loop {
                if self.metric(name, labels).await >= value {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if reached.is_err() {
            panic!(
                "{name}{labels:?} stayed below {value} (is {})",
                self.metric(name, labels).await
            );
        }
    }

    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// `kill -9`: no goodbye, nothing released.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_readyz(&self, status: u16) {
        let url = format!("http://{}/readyz", self.addr("admin"));
        let http = self.http.clone();
        wait_until(|| {
            let (url, http) = (url.clone(), http.clone());
            async move { matches!(http.get(url).send().await, Ok(r) if r.status().as_u16() == status) }
        })
        .await;
    }

    /// Waits for the process to exit (bounded).
    /// Waits (without blocking the runtime) until the process exited.
    pub async fn exited(&mut self, limit: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "process did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parse_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            if all { value.parse::<f64>().ok() } else { None }
        })
        .sum()
}

/// Polls `condition` until it holds (bounded by [`WAIT`]).
pub async fn wait_until<F, Fut>(condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(WAIT, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("condition held in time");
}

pub fn frame(op: i32, seq: i32, body: &str) -> Frame {
    Frame {
        ver: 1,
        op,
        seq,
        body: Bytes::from(body.to_string()),
    }
}

pub fn auth_frame(body: &Value) -> Frame {
    frame(op::AUTH, 1, &body.to_string())
}

pub fn online_of(frame: &Frame) -> i32 {
    assert_eq!(frame.op, op::HEARTBEAT_REPLY);
    i32::from_be_bytes(*frame.body.first_chunk::<4>().expect("4-byte body"))
}

/// A goim TCP client.
pub struct TcpClient {
    stream: TcpStream,
    buf: BytesMut,
}

impl TcpClient {
    pub async fn connect(addr: SocketAddr) -> TcpClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        TcpClient {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects with a small receive buffer, to play a slow reader.
    pub async fn connect_small_buffer(addr: SocketAddr) -> TcpClient {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let stream = socket.connect(addr).await.expect("connect");
        TcpClient {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects from a chosen local address (any of 127.0.0.0/8).
    pub async fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> TcpClient {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(from, 0)).expect("bind");
        let stream = socket.connect(addr).await.expect("connect");
        TcpClient {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// `auth` from a chosen local address.
    pub async fn auth_from(addr: SocketAddr, from: std::net::IpAddr, body: Value) -> TcpClient {
        TcpClient::connect_from(addr, from)
            .await
            .authenticated(body)
            .await
    }

    /// Connects and authenticates; the auth reply is checked and consumed.
    pub async fn auth(addr: SocketAddr, body: Value) -> TcpClient {
        TcpClient::connect(addr).await.authenticated(body).await
    }

    async fn authenticated(mut self, body: Value) -> TcpClient {
        self.send(&auth_frame(&body)).await;
        let reply = self.recv().await;
        assert_eq!(
            (reply.op, reply.seq, reply.body.len()),
            (op::AUTH_REPLY, 1, 0)
        );
        self
    }

    pub async fn send(&mut self, frame: &Frame) {
        self.send_raw(&frame.encode()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    pub async fn heartbeat(&mut self, seq: i32) -> i32 {
        self.send(&frame(op::HEARTBEAT, seq, "")).await;
        let reply = self.recv().await;
        assert_eq!(reply.seq, seq);
        online_of(&reply)
    }

    async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = decode_server_stream(&mut self.buf).expect("valid server frame") {
                return Some(frame);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next frame; fails the test on timeout or close.
    pub async fn recv(&mut self) -> Frame {
        tokio::time::timeout(WAIT, self.read_frame())
            .await
            .expect("a frame in time")
            .expect("connection open")
    }

    /// The next frame if one comes within `wait`.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Frame> {
        tokio::time::timeout(wait, self.read_frame())
            .await
            .ok()
            .flatten()
    }

    /// Reads and discards frames until the server closes the connection.
    pub async fn read_until_closed(mut self) {
        while self.read_frame().await.is_some() {}
    }

    /// Asserts nothing arrives for a moment.
    pub async fn expect_silence(&mut self) {
        if let Some(frame) = self.try_recv(QUIET).await {
            panic!("unexpected frame {frame:?}");
        }
    }

    /// Asserts the server closes the connection (after any pending frames).
    pub async fn expect_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        tokio::time::timeout(WAIT, async {
            while let Some(frame) = self.read_frame().await {
                frames.push(frame);
            }
        })
        .await
        .expect("server closed the connection in time");
        frames
    }
}

/// A goim WebSocket client (path `/sub`).
pub struct WsClient {
    ws: WebSocketStream<TcpStream>,
}

impl WsClient {
    pub async fn connect(addr: SocketAddr) -> WsClient {
        WsClient::connect_path(addr, "/sub").await.expect("upgrade")
    }

    pub async fn connect_path(
        addr: SocketAddr,
        path: &str,
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
        Ok(WsClient { ws })
    }

    pub async fn auth(addr: SocketAddr, body: Value) -> WsClient {
        WsClient::connect(addr).await.authenticated(body).await
    }

    /// `auth` with a Cookie header on the upgrade request.
    pub async fn auth_with_cookie(addr: SocketAddr, cookie: &str, body: Value) -> WsClient {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{addr}/sub")
            .into_client_request()
            .expect("request");
        request
            .headers_mut()
            .insert("cookie", cookie.parse().expect("header"));
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .expect("upgrade");
        WsClient { ws }.authenticated(body).await
    }

    async fn authenticated(mut self, body: Value) -> WsClient {
        self.send(&auth_frame(&body)).await;
        let reply = self.recv_frame().await;
        assert_eq!(
            (reply.op, reply.seq, reply.body.len()),
            (op::AUTH_REPLY, 1, 0)
        );
        self
    }

    pub async fn send(&mut self, frame: &Frame) {
        self.send_message(Message::Binary(frame.encode())).await;
    }

    pub async fn send_message(&mut self, message: Message) {
        self.ws.send(message).await.expect("ws send");
    }

    async fn next_payload(&mut self) -> Option<Bytes> {
        // The server sends binary messages only, and never pings.
        match self.ws.next().await? {
            Ok(Message::Binary(payload)) => Some(payload),
            Ok(Message::Close(_)) | Err(_) => None,
            Ok(other) => panic!("unexpected WebSocket message {other:?}"),
        }
    }

    /// The next binary message, decoded as exactly one goim frame.
    pub async fn recv_frame(&mut self) -> Frame {
        let payload = tokio::time::timeout(WAIT, self.next_payload())
            .await
            .expect("a message in time")
            .expect("connection open");
        let mut buf = BytesMut::from(&payload[..]);
        let frame = decode_server_stream(&mut buf)
            .expect("valid frame")
            .expect("whole frame");
        assert!(buf.is_empty(), "one goim frame per WebSocket message");
        frame
    }

    pub async fn try_recv_frame(&mut self, wait: Duration) -> Option<Frame> {
        let payload = tokio::time::timeout(wait, self.next_payload())
            .await
            .ok()??;
        let mut buf = BytesMut::from(&payload[..]);
        decode_server_stream(&mut buf).expect("valid frame")
    }

    /// Reads and discards messages until the server closes the connection.
    pub async fn read_until_closed(mut self) {
        while self.next_payload().await.is_some() {}
    }

    /// Asserts the server closes the connection.
    pub async fn expect_closed(&mut self) {
        tokio::time::timeout(WAIT, async { while self.next_payload().await.is_some() {} })
            .await
            .expect("server closed the connection in time");
    }
}

/// The inner frames of an op-9 batch.
pub fn inner_frames(batch: &Frame) -> Vec<Frame> {
    assert_eq!((batch.op, batch.ver, batch.seq), (op::RAW, 1, 0));
    let mut buf = BytesMut::from(&batch.body[..]);
    let mut frames = Vec::new();
    while let Some(frame) = decode_server_stream(&mut buf).expect("valid inner frame") {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "inner frames fill the batch exactly");
    frames
}

pub fn body(frame: &Frame) -> String {
    String::from_utf8_lossy(&frame.body).into_owned()
}
