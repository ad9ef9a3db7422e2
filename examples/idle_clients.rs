//! Opens many idle goim TCP connections, authenticates them into rooms, and
//! holds them (heartbeating) so the server's memory per connection can be
//! measured.
//!
//! ```text
//! cargo run --release --example idle_clients -- --addr 127.0.0.1:3101 --count 10000
//! ```
//!
//! Connections are spread over source addresses 127.0.0.1, 127.0.0.2, ...
//! (5,000 each) so one source never runs out of ephemeral ports. One process
//! may hold at most its open-file limit of sockets.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use pushcluster_api::protocol::{Frame, decode_server_stream, op};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:3101")]
    addr: SocketAddr,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Rooms to spread them over (`live://0` ...).
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 60)]
    heartbeat: u64,
    /// Seconds to hold the connections once open (0: until killed).
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

const PER_SOURCE: usize = 5000;

async fn open(index: usize, args: &Args) -> std::io::Result<TcpStream> {
    let source = Ipv4Addr::new(127, 0, 0, 1 + (index / PER_SOURCE) as u8);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut stream = socket.connect(args.addr).await?;
    let body = format!(
        r#"{{"mid":{},"room_id":"live://{}","accepts":[1000]}}"#,
        index + 1,
        index % args.rooms.max(1)
    );
    let auth = Frame {
        ver: 1,
        op: op::AUTH,
        seq: 1,
        body: body.into(),
    };
    stream.write_all(&auth.encode()).await?;
    let mut buf = BytesMut::with_capacity(64);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Ok(Some(reply)) = decode_server_stream(&mut buf)
            && reply.op == op::AUTH_REPLY
        {
            return Ok(stream);
        }
    }
}

/// Heartbeats and discards whatever the server sends.
async fn hold(mut stream: TcpStream, heartbeat: Duration) {
    let mut ticks = tokio::time::interval(heartbeat);
    ticks.tick().await;
    let mut sink = [0u8; 512];
    let beat = Frame {
        ver: 1,
        op: op::HEARTBEAT,
        seq: 2,
        body: Default::default(),
    }
    .encode();
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if stream.write_all(&beat).await.is_err() {
                    return;
                }
            }
            read = stream.read(&mut sink) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut next = tokio::time::Instant::now();
    for index in 0..args.count {
        next += gap;
        tokio::time::sleep_until(next).await;
        let (args, opened, failed) = (args.clone(), opened.clone(), failed.clone());
        tokio::spawn(async move {
            match open(index, &args).await {
                Ok(stream) => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    hold(stream, Duration::from_secs(args.heartbeat.max(1))).await;
                }
                Err(error) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("connection {index} failed: {error}");
                    }
                }
            }
        });
    }
    while opened.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < args.count {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "open: {} failed: {} in {:.1}s",
        opened.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    if args.hold > 0 {
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    } else {
        std::future::pending::<()>().await;
    }
}
