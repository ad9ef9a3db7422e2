//! `pushcluster-bench`: a load generator that speaks goim v2 to comets (TCP)
//! and goim's HTTP push API to logic, and measures what arrives.
//!
//! Every pushed body starts with `<send time in ns since the epoch>,<seq>,`
//! so receivers measure end-to-end latency (HTTP request sent → frame read
//! from the socket) and spot loss, duplicates and reordering.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::BytesMut;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use pushcluster_api::protocol::{Frame, decode_server_stream, op};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The business op the benchmark pushes.
const PUSH_OP: i32 = 1000;
/// Connections opened from one loopback source address.
const PER_SOURCE: usize = 5000;
const HISTOGRAM_SHARDS: usize = 16;

#[derive(Parser)]
#[command(name = "pushcluster-bench", version, about)]
struct Cli {
    /// Print the summary as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Room fan-out: connections in rooms, room pushes through the HTTP API.
    Room(RoomArgs),
    /// Lone room pushes, one at a time: the latency of a message that waits
    /// for nothing.
    Lone(LoneArgs),
}

#[derive(Args, Clone)]
struct Target {
    /// Comet TCP addresses; connections are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:3101")]
    comet: Vec<SocketAddr>,
    /// Logic HTTP addresses; pushes are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:3111")]
    http: Vec<SocketAddr>,
    /// New connections per second while connecting.
    #[arg(long, default_value_t = 2000)]
    connect_rate: u64,
    /// Server process ids to report RSS and CPU time for.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
}

#[derive(Args)]
struct RoomArgs {
    #[command(flatten)]
    target: Target,
    /// Client connections.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Rooms the connections are spread over (`bench://0` ...).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Room pushes per second (0: as fast as `--concurrency` allows).
    #[arg(long, default_value_t = 40)]
    rate: u64,
    /// Pushes in flight at once when `--rate 0`.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to push.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Bytes per pushed body (at least the timestamp header).
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// How long to wait for stragglers after the last push.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    settle: Duration,
    /// Stop after this many pushes (bounds the loss accounting's memory).
    #[arg(long, default_value_t = 2_000_000)]
    max_pushes: usize,
}

#[derive(Args)]
struct LoneArgs {
    #[command(flatten)]
    target: Target,
    /// Client connections in the room.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Pushes to send, one at a time.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Pause between pushes, in milliseconds.
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    #[arg(long, default_value_t = 32)]
    size: usize,
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    text.trim_end_matches('s')
        .parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| format!("seconds: {e}"))
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What every receiving connection records.
struct Receivers {
    received: AtomicU64,
    out_of_order: AtomicU64,
    last_receive: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Copies received of each pushed sequence number (loss and duplicates).
    copies: Vec<std::sync::atomic::AtomicU32>,
    /// Whether each sequence number's push was accepted.
    accepted: Vec<std::sync::atomic::AtomicBool>,
}

impl Receivers {
    fn new(max_pushes: usize) -> anyhow::Result<Arc<Self>> {
        let latency = (0..HISTOGRAM_SHARDS)
            .map(|_| Histogram::new_with_bounds(1, 600_000_000, 3).map(Mutex::new))
            .collect::<Result<_, _>>()
            .context("histogram")?;
        Ok(Arc::new(Receivers {
            received: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            last_receive: AtomicU64::new(0),
            latency,
            copies: (0..max_pushes).map(|_| Default::default()).collect(),
            accepted: (0..max_pushes).map(|_| Default::default()).collect(),
        }))
    }

    /// (lost, duplicated) copies over the accepted pushes, given who should
    /// get each push.
    fn loss_and_duplicates(&self, members_of: impl Fn(usize) -> u64) -> (u64, u64) {
        let (mut lost, mut duplicated) = (0, 0);
        for (seq, accepted) in self.accepted.iter().enumerate() {
            let copies = u64::from(self.copies[seq].load(Ordering::Relaxed));
            let expected = if accepted.load(Ordering::Relaxed) {
                members_of(seq)
            } else {
                0
            };
            lost += expected.saturating_sub(copies);
            duplicated += copies.saturating_sub(expected);
        }
        (lost, duplicated)
    }

    fn merged(&self) -> anyhow::Result<Histogram<u64>> {
        let mut all = Histogram::new_with_bounds(1, 600_000_000, 3).context("histogram")?;
        for shard in &self.latency {
            if let Ok(shard) = shard.lock() {
                all.add(&*shard).context("histogram")?;
            }
        }
        Ok(all)
    }
}

/// Parses `<ns>,<seq>,` at the start of a body.
fn stamp(body: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(body.get(..body.len().min(48))?).ok()?;
    let mut parts = text.splitn(3, ',');
    let ns = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((ns, seq))
}

fn body(seq: u64, size: usize) -> Vec<u8> {
    let mut body = format!("{},{seq},", now_nanos()).into_bytes();
    if body.len() < size {
        body.resize(size, b'x');
    }
    body
}

/// Opens and authenticates one connection into `room`.
async fn connect(addr: SocketAddr, index: usize, room: usize) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if addr.ip().is_loopback() {
        // Spread over 127.0.0.x sources: one source has ~28k ephemeral ports.
        let source = Ipv4Addr::new(127, 0, 0, 1 + (index / PER_SOURCE) as u8);
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    }
    let mut stream = socket.connect(addr).await?;
    let auth = format!(
        r#"{{"mid":{},"key":"bench-{index}","room_id":"bench://{room}","accepts":[{PUSH_OP}]}}"#,
        index + 1
    );
    let frame = Frame {
        ver: 1,
        op: op::AUTH,
        seq: 1,
        body: auth.into(),
    };
    stream.write_all(&frame.encode()).await?;
    let mut buf = BytesMut::with_capacity(64);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("closed during auth");
        }
        if let Some(reply) = decode_server_stream(&mut buf)? {
            if reply.op == op::AUTH_REPLY {
                return Ok(stream);
            }
        }
    }
}

/// Reads pushes until the connection closes, heartbeating every 30 s.
async fn receive(mut stream: TcpStream, index: usize, receivers: Arc<Receivers>) {
    let shard = &receivers.latency[index % HISTOGRAM_SHARDS];
    let mut buf = BytesMut::with_capacity(4096);
    let mut last_seq: Option<u64> = None;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(30));
    heartbeat.tick().await;
    let beat = Frame {
        ver: 1,
        op: op::HEARTBEAT,
        seq: 2,
        body: Default::default(),
    }
    .encode();
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if stream.write_all(&beat).await.is_err() {
                    return;
                }
            }
            read = stream.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
                let now = now_nanos();
                while let Ok(Some(frame)) = decode_server_stream(&mut buf) {
                    if frame.op != PUSH_OP {
                        continue;
                    }
                    receivers.received.fetch_add(1, Ordering::Relaxed);
                    receivers.last_receive.fetch_max(now, Ordering::Relaxed);
                    if let Some((sent, seq)) = stamp(&frame.body) {
                        if last_seq.is_some_and(|last| seq <= last) {
                            receivers.out_of_order.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(copies) = receivers.copies.get(seq as usize) {
                            copies.fetch_add(1, Ordering::Relaxed);
                        }
                        last_seq = Some(seq);
                        let micros = now.saturating_sub(sent) / 1000;
                        if let Ok(mut histogram) = shard.lock() {
                            let _ = histogram.record(micros.max(1));
                        }
                    }
                }
                if buf.capacity() > 64 * 1024 && buf.is_empty() {
                    buf = BytesMut::with_capacity(4096);
                }
            }
        }
    }
}

/// Opens `count` connections spread over comets and rooms; returns members
/// per room.
async fn open_all(
    target: &Target,
    count: usize,
    rooms: usize,
    receivers: &Arc<Receivers>,
) -> (Vec<u64>, usize) {
    let started = Instant::now();
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let members: Arc<Vec<AtomicU64>> = Arc::new((0..rooms).map(|_| AtomicU64::new(0)).collect());
    let gap = Duration::from_secs_f64(1.0 / target.connect_rate.max(1) as f64);
    let mut next = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        next += gap;
        tokio::time::sleep_until(next).await;
        let addr = target.comet[index % target.comet.len()];
        let room = index % rooms;
        let (opened, failed, members, receivers) = (
            opened.clone(),
            failed.clone(),
            members.clone(),
            receivers.clone(),
        );
        tasks.push(tokio::spawn(async move {
            match connect(addr, index, room).await {
                Ok(stream) => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    members[room].fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(receive(stream, index, receivers));
                }
                Err(error) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("connection {index} to {addr} failed: {error}");
                    }
                }
            }
        }));
        if index > 0 && index % 5000 == 0 {
            eprintln!(
                "  {index} connections requested ({:.1}s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let failed = failed.load(Ordering::Relaxed) as usize;
    eprintln!(
        "connected {} ({} failed) in {:.1}s",
        opened.load(Ordering::Relaxed),
        failed,
        started.elapsed().as_secs_f64()
    );
    (
        members.iter().map(|m| m.load(Ordering::Relaxed)).collect(),
        failed,
    )
}

/// One room push through the HTTP API; true if logic answered code 0.
async fn push(client: &reqwest::Client, http: SocketAddr, room: usize, body: Vec<u8>) -> bool {
    let url = format!("http://{http}/goim/push/room?operation={PUSH_OP}&type=bench&room={room}");
    match client.post(url).body(body).send().await {
        Ok(response) => match response.bytes().await {
            Ok(bytes) => {
                serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v["code"] == 0)
            }
            Err(_) => false,
        },
        Err(_) => false,
    }
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

struct Report {
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl Report {
    fn new() -> Self {
        Report { fields: Vec::new() }
    }

    fn add(&mut self, name: &'static str, value: impl Into<serde_json::Value>) {
        self.fields.push((name, value.into()));
    }

    fn latency(&mut self, histogram: &Histogram<u64>) {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        self.add("latency_p50_ms", ms(0.5));
        self.add("latency_p90_ms", ms(0.9));
        self.add("latency_p99_ms", ms(0.99));
        self.add("latency_max_ms", histogram.max() as f64 / 1000.0);
    }

    fn servers(&mut self, pids: &[u32], cpu_before: &[Option<f64>], connections: u64) {
        for (pid, before) in pids.iter().zip(cpu_before) {
            if let Some(rss) = rss_bytes(*pid) {
                self.add("server_rss_bytes", rss);
                if connections > 0 {
                    self.add("server_rss_bytes_per_connection", rss / connections);
                }
            }
            if let (Some(before), Some(after)) = (before, cpu_seconds(Some(*pid))) {
                self.add("server_cpu_seconds", after - before);
            }
        }
    }

    fn print(&self, json: bool) {
        if json {
            let object: serde_json::Map<String, serde_json::Value> = self
                .fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            println!("{}", serde_json::Value::Object(object));
        } else {
            for (name, value) in &self.fields {
                println!("{name:>34}  {value}");
            }
        }
    }
}

async fn room(args: RoomArgs, json: bool) -> anyhow::Result<()> {
    let max_pushes = if args.rate > 0 {
        ((args.rate as f64 * args.duration.as_secs_f64() * 1.2) as usize + 100).min(args.max_pushes)
    } else {
        args.max_pushes
    };
    let receivers = Receivers::new(max_pushes)?;
    let rooms = args.rooms.max(1);
    let (members, failed) = open_all(&args.target, args.connections, rooms, &receivers).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(16))
        .build()?;
    let cpu_self = cpu_seconds(None);
    let cpu_servers: Vec<Option<f64>> = args
        .target
        .pid
        .iter()
        .map(|p| cpu_seconds(Some(*p)))
        .collect();
    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(AtomicU64::new(0));
    let members = Arc::new(members);
    let started = Instant::now();
    let started_ns = now_nanos();
    let deadline = started + args.duration;
    let seq = Arc::new(AtomicU64::new(0));
    let workers = if args.rate == 0 {
        args.concurrency.max(1)
    } else {
        1
    };
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (client, sent, refused, expected, members, seq, receivers) = (
            client.clone(),
            sent.clone(),
            refused.clone(),
            expected.clone(),
            members.clone(),
            seq.clone(),
            receivers.clone(),
        );
        let (https, rate, size) = (args.target.http.clone(), args.rate, args.size);
        tasks.push(tokio::spawn(async move {
            let mut ticks = (rate > 0).then(|| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            while Instant::now() < deadline {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let Some(accepted) = receivers.accepted.get(n as usize) else {
                    break;
                };
                let room = (n as usize) % members.len();
                let http = https[(n as usize + worker) % https.len()];
                if push(&client, http, room, body(n, size)).await {
                    accepted.store(true, Ordering::Relaxed);
                    sent.fetch_add(1, Ordering::Relaxed);
                    expected.fetch_add(members[room], Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let pushing = started.elapsed();
    let expected = expected.load(Ordering::Relaxed);
    let settle_until = Instant::now() + args.settle;
    while receivers.received.load(Ordering::Relaxed) < expected && Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = receivers.received.load(Ordering::Relaxed);
    // From the first push to the last message read.
    let window = Duration::from_nanos(
        receivers
            .last_receive
            .load(Ordering::Relaxed)
            .saturating_sub(started_ns),
    )
    .max(pushing);
    let mut report = Report::new();
    let connected: u64 = members.iter().sum();
    report.add("scenario", "room");
    report.add("connections", connected);
    report.add("connections_failed", failed as u64);
    report.add("rooms", rooms as u64);
    report.add("pushes_sent", sent.load(Ordering::Relaxed));
    report.add("pushes_refused", refused.load(Ordering::Relaxed));
    report.add(
        "push_rate_per_s",
        sent.load(Ordering::Relaxed) as f64 / pushing.as_secs_f64(),
    );
    let (lost, duplicated) = receivers.loss_and_duplicates(|seq| members[seq % members.len()]);
    report.add("messages_expected", expected);
    report.add("messages_received", received);
    report.add("messages_lost", lost);
    report.add("messages_duplicated", duplicated);
    if workers == 1 {
        // One pusher: publish order is sequence order.
        report.add(
            "messages_out_of_order",
            receivers.out_of_order.load(Ordering::Relaxed),
        );
    }
    report.add("delivered_per_s", received as f64 / window.as_secs_f64());
    report.latency(&receivers.merged()?);
    let generator_cpu = match (cpu_self, cpu_seconds(None)) {
        (Some(before), Some(after)) => after - before,
        _ => 0.0,
    };
    report.add("generator_cpu_seconds", generator_cpu);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let saturated = generator_cpu / window.as_secs_f64() > 0.9 * cores;
    report.add("generator_saturated", saturated);
    report.servers(&args.target.pid, &cpu_servers, connected);
    report.print(json);
    if saturated {
        eprintln!(
            "warning: the generator used most of the CPU; figures may measure it, not the server"
        );
    }
    Ok(())
}

async fn lone(args: LoneArgs, json: bool) -> anyhow::Result<()> {
    let receivers = Receivers::new(args.count)?;
    let (members, failed) = open_all(&args.target, args.connections.max(1), 1, &receivers).await;
    let client = reqwest::Client::new();
    let mut refused = 0u64;
    for n in 0..args.count as u64 {
        let before = receivers.received.load(Ordering::Relaxed);
        let http = args.target.http[n as usize % args.target.http.len()];
        if !push(&client, http, 0, body(n, args.size)).await {
            refused += 1;
            continue;
        }
        receivers.accepted[n as usize].store(true, Ordering::Relaxed);
        // Wait until every member got it, so each push is alone.
        let wait_until = Instant::now() + Duration::from_secs(5);
        while receivers.received.load(Ordering::Relaxed) < before + members[0]
            && Instant::now() < wait_until
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    let mut report = Report::new();
    report.add("scenario", "lone");
    report.add("connections", members[0]);
    report.add("connections_failed", failed as u64);
    report.add("pushes_sent", args.count as u64 - refused);
    report.add(
        "messages_received",
        receivers.received.load(Ordering::Relaxed),
    );
    let (lost, duplicated) = receivers.loss_and_duplicates(|_| members[0]);
    report.add("messages_lost", lost);
    report.add("messages_duplicated", duplicated);
    report.latency(&receivers.merged()?);
    report.print(json);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Room(args) => room(args, cli.json).await,
        Scenario::Lone(args) => lone(args, cli.json).await,
    }
}
