//! `pushcluster-bench`: a load generator for goim-protocol servers
//! (pushcluster, goim) and Pusher-protocol servers (Sockudo, Soketi).
//!
//! Clients connect over TCP or WebSocket into rooms; pushes go through the
//! server's HTTP API. Every pushed body starts with `<send time, ns>,<seq>,`
//! so receivers measure end-to-end latency and account for loss,
//! duplicates and reordering. Connections are spread over worker processes
//! (a process may hold only so many open files) and loopback source
//! addresses (each has ~28k ephemeral ports).
#![forbid(unsafe_code)]

mod client;
mod controller;
mod push;
mod report;
mod spec;
mod upstream;
mod worker;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::controller::{Load, Plan};
use crate::push::PusherApp;
use crate::spec::{ClientSpec, Fanout, ServerKind, Transport, WorkerSpec};

#[derive(Parser)]
#[command(name = "pushcluster-bench", version, about)]
struct Cli {
    /// Print the summary as one JSON object.
    #[arg(long, global = true)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Room fan-out: connections in rooms, room pushes through the HTTP
    /// API (goim's benchmark shape by default: 40 pushes/s).
    Room(FanoutArgs),
    /// Per-user pushes: each push names `--per-push` mids (goim only).
    Mids {
        #[command(flatten)]
        load: FanoutArgs,
        #[arg(long, default_value_t = 10)]
        per_push: usize,
    },
    /// Pushes to every connection (goim only).
    Broadcast(FanoutArgs),
    /// Lone room pushes, one at a time: the latency of a message that waits
    /// for nothing.
    Lone(LoneArgs),
    /// Connection churn: connects and disconnects per second.
    Churn(ChurnArgs),
    /// Idle connections: open, hold, report the server's memory per
    /// connection.
    Idle(IdleArgs),
    /// Messages from clients to the backend (op 4, `upstream` on), one in
    /// flight per connection: the answers per second and their latency.
    Upstream(UpstreamArgs),
    /// (internal) One worker process of a run.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        spec: String,
    },
}

#[derive(Args, Clone)]
struct TargetArgs {
    /// Protocol of the server under test.
    #[arg(long, value_enum, default_value = "goim")]
    server: ServerKind,
    /// Client transport (the Pusher protocol is WebSocket only).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
    /// Client-facing addresses, connections spread over them (default:
    /// goim TCP 127.0.0.1:3101, goim WebSocket :3102, Pusher :6001).
    #[arg(long, alias = "comet", value_delimiter = ',')]
    connect: Vec<SocketAddr>,
    /// HTTP API addresses, pushes spread over them (default: goim
    /// 127.0.0.1:3111, Pusher 127.0.0.1:6001).
    #[arg(long, value_delimiter = ',')]
    http: Vec<SocketAddr>,
    /// Pusher app id, key and secret.
    #[arg(long, default_value = "bench")]
    app_id: String,
    #[arg(long, default_value = "bench-key")]
    app_key: String,
    #[arg(long, default_value = "bench-secret")]
    app_secret: String,
    /// Server process ids: their RSS and CPU time are reported.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// New connections per second while connecting (all workers).
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Connections per worker process (a process may hold at most 20,000
    /// open files on the reference machine).
    #[arg(long, default_value_t = 15_000)]
    per_worker: usize,
    /// Room type and key prefix (`NAMESPACE://0`, `NAMESPACE-0`): two runs
    /// in different namespaces share a server without sharing rooms or
    /// keys (a quiet room's latency beside a busy one).
    #[arg(long, default_value = "bench")]
    namespace: String,
    /// goim clients opt in to positions; a client whose connection ends
    /// reconnects to the next `--connect` address and resumes where it
    /// left off (docs/recovery.md). Run a rolling restart beside it
    /// (`ROLL=term bench/fleet.sh ...`): lost must stay 0.
    #[arg(long)]
    resume: bool,
    /// Rooms each goim client is in (pushcluster's auth body `rooms`): its
    /// own and the next ones of `--rooms`; at most `--rooms`.
    #[arg(long, default_value_t = 1)]
    rooms_per_client: usize,
}

impl TargetArgs {
    fn plan(&self, connections: usize, rooms: usize, quiet: bool) -> anyhow::Result<Plan> {
        let transport = match self.server {
            ServerKind::Pusher => Transport::Ws,
            ServerKind::Goim => self.transport,
        };
        let default_connect = match (self.server, transport) {
            (ServerKind::Goim, Transport::Tcp) => "127.0.0.1:3101",
            (ServerKind::Goim, Transport::Ws) => "127.0.0.1:3102",
            (ServerKind::Pusher, _) => "127.0.0.1:6001",
        };
        let default_http = match self.server {
            ServerKind::Goim => "127.0.0.1:3111",
            ServerKind::Pusher => "127.0.0.1:6001",
        };
        let connect = if self.connect.is_empty() {
            vec![default_connect.parse()?]
        } else {
            self.connect.clone()
        };
        let http = if self.http.is_empty() {
            vec![default_http.parse()?]
        } else {
            self.http.clone()
        };
        Ok(Plan {
            client: ClientSpec {
                server: self.server,
                transport,
                addrs: connect,
                pusher_key: self.app_key.clone(),
                namespace: self.namespace.clone(),
                resume: self.resume && self.server == ServerKind::Goim,
                rooms_per_client: self.rooms_per_client.clamp(1, rooms.max(1)),
                room_count: rooms.max(1),
            },
            http,
            app: PusherApp {
                id: self.app_id.clone(),
                key: self.app_key.clone(),
                secret: self.app_secret.clone(),
            },
            pids: self.pid.clone(),
            connections,
            rooms: rooms.max(1),
            connect_rate: self.connect_rate,
            per_worker: self.per_worker.max(1),
            quiet,
        })
    }
}

#[derive(Args, Clone)]
struct FanoutArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Client connections.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Rooms the connections are spread over (`bench://0` ...).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Pushes per second (0: as fast as `--concurrency` pushers get answers).
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Pushes in flight at once: the pushers of `--rate 0`, or the most
    /// unanswered pushes of a paced run (1 keeps publish order = sequence
    /// order, so reordering is reported).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to push, in seconds.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Bytes per pushed body (at least the stamp).
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// How long to wait for stragglers after the last push, in seconds.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    settle: Duration,
    /// Stop after this many pushes (bounds the accounting's memory).
    #[arg(long, default_value_t = 2_000_000)]
    max_pushes: usize,
    /// Pushes per second to single users (`/goim/push/mids`, one
    /// connection's user each, walking over all of them) on top of the
    /// scenario's own; with `--resume` they are resumed too.
    #[arg(long, default_value_t = 0.0)]
    direct_rate: f64,
    /// A logic `/metrics` URL (standalone: the admin port's): its
    /// `pushcluster_logic_bus_lag_max_messages` is sampled every second and
    /// reported as the lag curve.
    #[arg(long)]
    lag_url: Option<String>,
}

impl FanoutArgs {
    fn load(&self, fanout: Fanout) -> Load {
        Load {
            fanout,
            rate: self.rate,
            concurrency: self.concurrency,
            duration: self.duration,
            size: self.size,
            settle: self.settle,
            max_pushes: self.max_pushes,
            direct_rate: self.direct_rate,
            lag_url: self.lag_url.clone(),
        }
    }
}

#[derive(Args)]
struct LoneArgs {
    #[command(flatten)]
    target: TargetArgs,
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

#[derive(Args)]
struct ChurnArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Stable connections held while churning.
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// How long each churned connection stays, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    hold_ms: u64,
    /// How long to churn, in seconds.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
}

#[derive(Args)]
struct UpstreamArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Bytes per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    /// How long to hold them before measuring, in seconds.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    hold: Duration,
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    text.trim_end_matches('s')
        .parse::<f64>()
        .map_err(|e| format!("seconds: {e}"))
        .and_then(|s| Duration::try_from_secs_f64(s).map_err(|e| e.to_string()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let quiet = cli.quiet;
    let report = match cli.scenario {
        Scenario::Room(args) => {
            let plan = args.target.plan(args.connections, args.rooms, quiet)?;
            controller::fanout(&plan, &args.load(Fanout::Room)).await?
        }
        Scenario::Mids { load, per_push } => {
            let plan = load.target.plan(load.connections, load.rooms, quiet)?;
            controller::fanout(&plan, &load.load(Fanout::Mids { per_push })).await?
        }
        Scenario::Broadcast(args) => {
            let plan = args.target.plan(args.connections, args.rooms, quiet)?;
            controller::fanout(&plan, &args.load(Fanout::Broadcast)).await?
        }
        Scenario::Lone(args) => {
            let plan = args.target.plan(args.connections.max(1), 1, quiet)?;
            controller::lone(
                &plan,
                args.count,
                Duration::from_millis(args.interval_ms),
                args.size,
            )
            .await?
        }
        Scenario::Churn(args) => {
            let plan = args.target.plan(args.connections, 1, quiet)?;
            controller::churn(
                &plan,
                args.rate,
                Duration::from_millis(args.hold_ms),
                args.duration,
            )
            .await?
        }
        Scenario::Idle(args) => {
            let plan = args.target.plan(args.connections, args.rooms, quiet)?;
            controller::idle(&plan, args.hold).await?
        }
        Scenario::Upstream(args) => {
            let plan = args.target.plan(args.connections, 1, quiet)?;
            upstream::run(&plan, args.duration, args.size).await?
        }
        Scenario::Worker { .. } => unreachable!("workers run in main"),
    };
    report.print(cli.json);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Scenario::Worker { spec } = &cli.scenario {
        // One thread per worker process: several of them share the cores.
        let spec: WorkerSpec = serde_json::from_str(spec)?;
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(worker::run_process(spec));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cli))
}
