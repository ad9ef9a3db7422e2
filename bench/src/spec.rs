//! What the controller tells a worker, what a worker reports back, and the
//! arithmetic both sides share: who should receive push number `seq`.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The business op goim pushes carry.
pub const PUSH_OP: i32 = 1000;
/// The Pusher event name of benchmark messages.
pub const PUSHER_EVENT: &str = "bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    /// goim v2 protocol (pushcluster, goim).
    Goim,
    /// The Pusher protocol (Sockudo, Soketi, Pusher Channels).
    Pusher,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Ws,
}

/// How clients reach the server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientSpec {
    pub server: ServerKind,
    pub transport: Transport,
    /// Client-facing addresses; connection `i` uses `addrs[i % len]`.
    pub addrs: Vec<SocketAddr>,
    /// Pusher application key (the `/app/<key>` path).
    pub pusher_key: String,
    /// Room type, key and channel prefix: runs in different namespaces
    /// share a server without sharing rooms or keys.
    pub namespace: String,
    /// goim clients opt in to positions and, when their connection ends,
    /// reconnect (to the next address) and resume where they left off.
    #[serde(default)]
    pub resume: bool,
    /// Rooms each client is in: its own (`index % room_count`) and the
    /// next ones (goim clients; pushcluster's auth body `rooms`).
    #[serde(default)]
    pub rooms_per_client: usize,
    #[serde(default)]
    pub room_count: usize,
}

/// Who receives a push.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fanout {
    /// Push `seq` goes to room `seq % rooms`.
    Room,
    /// Push `seq` goes to `per_push` users (one connection each).
    Mids { per_push: usize },
    /// Push `seq` goes to every connection.
    Broadcast,
}

impl Fanout {
    /// The connection indices push `seq` targets, for `Mids`: a window that
    /// walks over all connections so every user gets pushes.
    pub fn mid_targets(seq: u64, per_push: usize, total: usize) -> impl Iterator<Item = usize> {
        let total = total.max(1);
        let start = (seq as usize).wrapping_mul(per_push) % total;
        (0..per_push.min(total)).map(move |j| (start + j) % total)
    }
}

/// The mid of connection `index` (goim mids are positive).
pub fn mid_of(index: usize) -> u64 {
    index as u64 + 1
}

/// What one worker process does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub client: ClientSpec,
    pub fanout: Fanout,
    /// This worker's connections: global indices `first .. first + count`.
    pub first: usize,
    pub count: usize,
    /// Connections over all workers.
    pub total: usize,
    pub rooms: usize,
    /// New connections per second, for this worker.
    pub connect_rate: f64,
    /// Pushes the loss accounting can track.
    pub max_pushes: usize,
    /// Direct pushes (`--direct-rate`) it can track: sequence numbers
    /// `max_pushes ..`, push `n` to the user of connection
    /// `mid_targets(n, 1, total)`.
    #[serde(default)]
    pub direct_pushes: usize,
    /// Connection churn: connects per second (0: none) and how long each
    /// connection stays before closing.
    pub churn_rate: f64,
    pub churn_hold_ms: u64,
    /// Worker number (spreads churn over source addresses).
    pub worker: usize,
}

impl WorkerSpec {
    pub fn room_of(&self, index: usize) -> usize {
        index % self.rooms.max(1)
    }
}

impl ClientSpec {
    /// The rooms connection `index` is in, of `rooms`: its own and the
    /// next `rooms_per_client - 1`.
    pub fn rooms_of(&self, index: usize, rooms: usize) -> impl Iterator<Item = usize> {
        let rooms = rooms.max(1);
        (0..self.rooms_per_client.clamp(1, rooms)).map(move |j| (index + j) % rooms)
    }
}

/// A line a worker prints on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum WorkerEvent {
    /// Its connections are open (or have failed).
    Ready {
        connected: u64,
        failed: Vec<usize>,
    },
    Progress {
        received: u64,
        closed: u64,
        churned: u64,
    },
    Final(Box<FinalReport>),
}

/// The controller's last word to a worker: which pushes exist.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Finish {
    /// Pushes `0 .. pushes` were attempted.
    pub pushes: u64,
    /// Of those, the ones the server refused (direct ones by their
    /// sequence number, `max_pushes + n`).
    pub refused: Vec<u64>,
    /// Direct pushes `0 .. direct` were attempted.
    #[serde(default)]
    pub direct: u64,
}

/// A worker's totals.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FinalReport {
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Connections the server closed while the test ran.
    pub closed: u64,
    /// End-to-end latency in microseconds, as (value, count) pairs.
    pub latency_us: Vec<(u64, u64)>,
    pub last_receive_ns: u64,
    pub cpu_seconds: f64,
    /// Wall time the worker ran, for its saturation.
    pub wall_seconds: f64,
    pub churn_ok: u64,
    pub churn_failed: u64,
    /// Connect + handshake latency of churned connections, microseconds.
    pub churn_latency_us: Vec<(u64, u64)>,
    /// `--resume`: rejoins after a closed connection that were told
    /// `recovered: true`, and those that were not.
    #[serde(default)]
    pub resumes_recovered: u64,
    #[serde(default)]
    pub resumes_not_recovered: u64,
    /// Messages written from history to resuming connections.
    #[serde(default)]
    pub replayed: u64,
    /// From a connection's end to its resume reply on the next, µs.
    #[serde(default)]
    pub resume_gap_us: Vec<(u64, u64)>,
}

pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A pushed body: `<send time, ns since the epoch>,<seq>,` padded to `size`.
pub fn body(seq: u64, size: usize) -> String {
    let mut body = format!("{},{seq},", now_nanos());
    if body.len() < size {
        body.extend(std::iter::repeat_n('x', size - body.len()));
    }
    body
}

/// Parses the `<ns>,<seq>,` header of a body.
pub fn stamp(body: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(body.get(..body.len().min(48))?).ok()?;
    let mut parts = text.splitn(3, ',');
    let ns = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((ns, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_stamp() {
        let text = body(42, 64);
        assert_eq!(text.len(), 64);
        let (ns, seq) = stamp(text.as_bytes()).expect("stamp");
        assert_eq!(seq, 42);
        assert!(ns > 0);
        assert_eq!(stamp(b"not a stamp"), None);
    }

    #[test]
    fn mid_pushes_walk_over_every_connection() {
        let targets: Vec<usize> = Fanout::mid_targets(3, 4, 10).collect();
        assert_eq!(targets, [2, 3, 4, 5]);
        let wrapped: Vec<usize> = Fanout::mid_targets(2, 4, 10).collect();
        assert_eq!(wrapped, [8, 9, 0, 1]);
        // Never more targets than connections, never one twice.
        let small: Vec<usize> = Fanout::mid_targets(1, 5, 3).collect();
        assert_eq!(small, [2, 0, 1]);
    }
}
