//! A tiny goim v2 TCP client: connects, authenticates, heartbeats, and
//! prints every frame it receives.
//!
//! ```text
//! cargo run --example client -- --mid 123 --room live://1000 --accepts 1000
//! ```
//!
//! Then push to it, for example:
//!
//! ```text
//! curl -d 'hello room' 'http://127.0.0.1:3111/goim/push/room?operation=1000&type=live&room=1000'
//! ```

use std::time::Duration;

use bytes::BytesMut;
use clap::Parser;
use pushcluster_api::protocol::{Frame, decode_server_stream, op};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// The comet's TCP address.
    #[arg(long, default_value = "127.0.0.1:3101")]
    addr: String,
    /// User id (0: anonymous).
    #[arg(long, default_value_t = 0)]
    mid: i64,
    /// Device key; empty lets the server pick one.
    #[arg(long, default_value = "")]
    key: String,
    /// Room to join, `type://id`.
    #[arg(long, default_value = "live://1000")]
    room: String,
    /// Ops to receive from key, mid and broadcast pushes, comma-separated.
    #[arg(long, default_value = "1000,1001,1002")]
    accepts: String,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 30)]
    heartbeat: u64,
}

fn describe(frame: &Frame) -> String {
    let name = match frame.op {
        op::AUTH_REPLY => "auth reply".to_string(),
        op::HEARTBEAT_REPLY => {
            let online = frame
                .body
                .first_chunk::<4>()
                .map(|b| i32::from_be_bytes(*b))
                .unwrap_or(0);
            return format!("heartbeat reply (seq {}): room online {online}", frame.seq);
        }
        other => format!("op {other}"),
    };
    format!(
        "{name} (seq {}): {}",
        frame.seq,
        String::from_utf8_lossy(&frame.body)
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let accepts: Vec<i32> = args
        .accepts
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let mut stream = TcpStream::connect(&args.addr).await?;
    println!("connected to {}", args.addr);

    let auth = serde_json::json!({
        "mid": args.mid,
        "key": args.key,
        "room_id": args.room,
        "platform": "rust-example",
        "accepts": accepts,
    });
    let frame = Frame {
        ver: 1,
        op: op::AUTH,
        seq: 1,
        body: serde_json::to_vec(&auth)?.into(),
    };
    stream.write_all(&frame.encode()).await?;

    let mut heartbeat = tokio::time::interval(Duration::from_secs(args.heartbeat.max(1)));
    let mut buf = BytesMut::with_capacity(4096);
    let mut seq = 1;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                seq += 1;
                let frame = Frame { ver: 1, op: op::HEARTBEAT, seq, body: Default::default() };
                stream.write_all(&frame.encode()).await?;
            }
            read = stream.read_buf(&mut buf) => {
                if read? == 0 {
                    println!("server closed the connection");
                    return Ok(());
                }
                // Server frames are not capped at 4112 bytes.
                while let Some(frame) = decode_server_stream(&mut buf)? {
                    println!("{}", describe(&frame));
                }
            }
        }
    }
}
