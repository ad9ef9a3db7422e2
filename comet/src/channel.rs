//! One authenticated client connection as the rest of the comet sees it:
//! identity, watched ops, room, and a bounded queue of encoded frames that
//! only the connection's own task drains.
//!
//! Pushing never waits: a frame goes into the queue or, when the queue is
//! full, the connection is closed as a slow consumer (it can reconnect) and
//! the frame is counted as dropped. No other connection ever waits for it.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pushcluster_api::protocol::EncodedPush;
use tokio::sync::Notify;

use crate::resume::{PositionedBatch, PositionedState};
use crate::room::Room;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    WebSocket,
}

impl TransportKind {
    pub fn label(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::WebSocket => "websocket",
        }
    }
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed the socket.
    ClientClosed,
    /// No heartbeat (op 2) within the heartbeat timeout.
    HeartbeatTimeout,
    /// The send queue was full.
    SlowConsumer,
    /// A newer connection authenticated with the same key on this comet.
    Replaced,
    /// The client sent bytes that are not a valid frame.
    BadFrame,
    /// Reading or writing the socket failed.
    IoError,
    /// The comet is shutting down and drains its connections.
    Drain,
    /// The client sent more frames than `comet.limits` allows.
    FrameRate,
    /// A connection with positions missed room messages this comet could
    /// not get back (its calls from job failed and history no longer has
    /// them): it reconnects, resumes, and is told it was not recovered.
    Resync,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Replaced => "replaced",
            CloseReason::BadFrame => "bad_frame",
            CloseReason::IoError => "io_error",
            CloseReason::Drain => "drain",
            CloseReason::FrameRate => "frame_rate",
            CloseReason::Resync => "resync",
        }
    }

    /// Whether frames already queued are still written before closing.
    pub fn flushes(self) -> bool {
        matches!(self, CloseReason::Replaced | CloseReason::Drain)
    }
}

/// Outcome of queueing one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Yes,
    /// The queue was full: the connection is now closing as a slow consumer;
    /// `dropped` frames (this one included) will not be written.
    Overflow {
        dropped: usize,
    },
    /// The connection is already closing.
    Closed,
    /// Nothing to queue: the connection already had these frames (a
    /// resumed connection's live copy of replayed messages).
    Skipped,
}

struct QueueState {
    frames: VecDeque<Bytes>,
    /// Publish time (µs since the epoch) of each frame; 0 for replies.
    published_us: VecDeque<u64>,
    closing: Option<CloseReason>,
}

/// What the connection task takes from its queue. The task keeps one and
/// swaps it with the queue's buffers at each drain, so a busy connection
/// reuses two buffers instead of allocating one per burst.
#[derive(Default)]
pub struct Drained {
    pub frames: VecDeque<Bytes>,
    pub published_us: VecDeque<u64>,
    pub closing: Option<CloseReason>,
}

impl Drained {
    /// Empties the buffers, keeping their memory for the next burst.
    pub fn clear(&mut self) {
        self.frames.clear();
        self.published_us.clear();
        self.closing = None;
    }

    /// Gives the buffers' memory back (an idle connection holds none).
    pub fn release(&mut self) {
        self.clear();
        self.frames = VecDeque::new();
        self.published_us = VecDeque::new();
    }
}

pub struct Channel {
    pub id: u64,
    pub key: String,
    pub mid: i64,
    pub ip: IpAddr,
    pub transport: TransportKind,
    capacity: usize,
    watched_ops: Mutex<Vec<i32>>,
    pub(crate) rooms: Mutex<ChannelRooms>,
    queue: Mutex<QueueState>,
    wake: Notify,
    /// When the client's next heartbeat is due, and when a write that
    /// waits for the socket must have finished (0: none waits), in ms of
    /// the comet's clock. The comet's sweeper closes the connection when
    /// either passes: no timer per connection.
    heartbeat_due_ms: AtomicU64,
    write_due_ms: AtomicU64,
    /// Set for connections that opted in to positions.
    positioned: Option<Box<PositionedState>>,
}

/// The rooms a connection is in. goim's one room is `primary`; rooms
/// joined besides (op 22, the auth body's `rooms`) and the rooms a token
/// allows live in a box only connections that use them allocate.
#[derive(Default)]
pub struct ChannelRooms {
    pub primary: Option<Arc<Room>>,
    more: Option<Box<MoreRooms>>,
}

#[derive(Default)]
struct MoreRooms {
    joined: Vec<Arc<Room>>,
    /// `Some`: only these may be joined.
    allowed: Option<Vec<String>>,
}

impl ChannelRooms {
    fn more_mut(&mut self) -> &mut MoreRooms {
        self.more.get_or_insert_with(Box::default)
    }

    /// goim's room first, then the others in the order joined.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Room>> {
        self.primary
            .iter()
            .chain(self.more.iter().flat_map(|more| more.joined.iter()))
    }

    pub fn first(&self) -> Option<&Arc<Room>> {
        self.all().next()
    }

    pub fn count(&self) -> usize {
        self.all().count()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.all().any(|room| &*room.id == id)
    }

    /// Whether the connection may be in room `id`.
    pub fn allows(&self, id: &str) -> bool {
        match self.more.as_ref().and_then(|more| more.allowed.as_ref()) {
            Some(allowed) => allowed.iter().any(|room| room == id),
            None => true,
        }
    }

    pub fn add(&mut self, room: Arc<Room>) {
        self.more_mut().joined.push(room);
    }

    /// Takes a joined room (not goim's) out of the list.
    pub fn remove(&mut self, id: &str) -> Option<Arc<Room>> {
        let more = self.more.as_mut()?;
        let at = more.joined.iter().position(|room| &*room.id == id)?;
        Some(more.joined.swap_remove(at))
    }

    /// Takes every room out: goim's and the joined ones.
    pub fn take_all(&mut self) -> Vec<Arc<Room>> {
        let mut all: Vec<Arc<Room>> = self.primary.take().into_iter().collect();
        if let Some(more) = self.more.as_mut() {
            all.append(&mut more.joined);
        }
        all
    }
}

impl Channel {
    pub fn new(
        id: u64,
        key: String,
        mid: i64,
        ip: IpAddr,
        transport: TransportKind,
        capacity: usize,
        accepts: &[i32],
    ) -> Self {
        let channel = Channel {
            id,
            key,
            mid,
            ip,
            transport,
            capacity: capacity.max(1),
            watched_ops: Mutex::new(Vec::new()),
            rooms: Mutex::new(ChannelRooms::default()),
            queue: Mutex::new(QueueState {
                frames: VecDeque::new(),
                published_us: VecDeque::new(),
                closing: None,
            }),
            wake: Notify::new(),
            heartbeat_due_ms: AtomicU64::new(u64::MAX),
            write_due_ms: AtomicU64::new(0),
            positioned: None,
        };
        channel.watch(accepts);
        channel
    }

    /// This connection gets room messages with their positions.
    pub fn with_positions(mut self) -> Self {
        self.positioned = Some(Box::default());
        self
    }

    pub fn positioned(&self) -> Option<&PositionedState> {
        self.positioned.as_deref()
    }

    /// Queues a positioned batch of a room or a direct stream, by its name
    /// (positioned connections only).
    pub fn push_positioned(&self, stream: &str, batch: &Arc<PositionedBatch>) -> Queued {
        match &self.positioned {
            Some(state) => state.push(self, stream, batch, self.capacity),
            None => self.push(&batch.push),
        }
    }

    /// Adds ops to the watch set (auth `accepts`, op 14).
    pub fn watch(&self, ops: &[i32]) {
        if let Ok(mut watched) = self.watched_ops.lock() {
            watched.extend_from_slice(ops);
            watched.sort_unstable();
            watched.dedup();
        }
    }

    /// Removes ops from the watch set (op 16).
    pub fn unwatch(&self, ops: &[i32]) {
        if let Ok(mut watched) = self.watched_ops.lock() {
            watched.retain(|op| !ops.contains(op));
        }
    }

    /// Whether key/mid pushes and broadcasts of `op` reach this connection.
    pub fn watches(&self, op: i32) -> bool {
        self.watched_ops
            .lock()
            .map(|watched| watched.binary_search(&op).is_ok())
            .unwrap_or(false)
    }

    /// The room's online count for heartbeat replies: goim's room (the
    /// one op 12 moves), else the first room joined; 0 outside any room.
    pub fn room_online(&self) -> i32 {
        self.rooms
            .lock()
            .ok()
            .and_then(|rooms| rooms.first().map(|r| r.online_num()))
            .unwrap_or(0)
    }

    /// goim's room: the auth body's `room_id`, moved by op 12.
    pub fn room_id(&self) -> Option<Arc<str>> {
        self.rooms
            .lock()
            .ok()
            .and_then(|rooms| rooms.primary.as_ref().map(|r| r.id.clone()))
    }

    /// Every room the connection is in.
    pub fn room_ids(&self) -> Vec<Arc<str>> {
        self.rooms
            .lock()
            .map(|rooms| rooms.all().map(|room| room.id.clone()).collect())
            .unwrap_or_default()
    }

    /// Only these rooms may be joined (the token's `room`/`rooms` claims).
    pub fn restrict_rooms(&self, allowed: Vec<String>) {
        if let Ok(mut rooms) = self.rooms.lock() {
            rooms.more_mut().allowed = Some(allowed);
        }
    }

    /// Queues a push encoded for both transports.
    pub fn push(&self, push: &EncodedPush) -> Queued {
        let bytes = match self.transport {
            TransportKind::Tcp => push.tcp.clone(),
            TransportKind::WebSocket => push.websocket.clone(),
        };
        self.enqueue(bytes, push.published_us)
    }

    /// Queues bytes to write as they are (one WebSocket message, or raw TCP bytes).
    pub fn push_bytes(&self, bytes: Bytes) -> Queued {
        self.enqueue(bytes, 0)
    }

    fn enqueue(&self, bytes: Bytes, published_us: u64) -> Queued {
        let Ok(mut queue) = self.queue.lock() else {
            return Queued::Closed;
        };
        if queue.closing.is_some() {
            return Queued::Closed;
        }
        if queue.frames.len() >= self.capacity {
            drop(queue);
            return self.overflow();
        }
        let was_empty = queue.frames.is_empty();
        queue.frames.push_back(bytes);
        queue.published_us.push_back(published_us);
        drop(queue);
        if was_empty {
            self.wake.notify_one();
        }
        Queued::Yes
    }

    /// Closes the connection as a slow consumer: what it has queued, and
    /// the frame that did not fit, are dropped.
    pub fn overflow(&self) -> Queued {
        let Ok(mut queue) = self.queue.lock() else {
            return Queued::Closed;
        };
        if queue.closing.is_some() {
            return Queued::Closed;
        }
        let dropped = queue.frames.len() + 1;
        queue.frames = VecDeque::new();
        queue.published_us = VecDeque::new();
        queue.closing = Some(CloseReason::SlowConsumer);
        drop(queue);
        self.wake.notify_one();
        Queued::Overflow { dropped }
    }

    /// Asks the connection to close. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        if let Ok(mut queue) = self.queue.lock()
            && queue.closing.is_none()
        {
            queue.closing = Some(reason);
            drop(queue);
            self.wake.notify_one();
        }
    }

    pub fn closing(&self) -> Option<CloseReason> {
        self.queue.lock().ok().and_then(|q| q.closing)
    }

    /// Takes everything queued. The connection task calls this and writes.
    pub fn drain(&self) -> Drained {
        let mut drained = Drained::default();
        self.drain_into(&mut drained);
        drained
    }

    /// Takes everything queued into `drained`, whose (empty) buffers become
    /// the queue's: no allocation when the sizes repeat.
    pub fn drain_into(&self, drained: &mut Drained) {
        drained.clear();
        match self.queue.lock() {
            Ok(mut queue) => {
                std::mem::swap(&mut queue.frames, &mut drained.frames);
                std::mem::swap(&mut queue.published_us, &mut drained.published_us);
                drained.closing = queue.closing;
            }
            Err(_) => drained.closing = Some(CloseReason::IoError),
        }
    }

    /// Frees the queue's spare buffer memory when nothing is queued.
    pub fn release_spare(&self) {
        if let Ok(mut queue) = self.queue.lock()
            && queue.frames.is_empty()
        {
            queue.frames = VecDeque::new();
            queue.published_us = VecDeque::new();
        }
    }

    /// The client's next heartbeat is due at `due_ms` (comet clock).
    pub fn heartbeat_due(&self, due_ms: u64) {
        self.heartbeat_due_ms.store(due_ms, Ordering::Relaxed);
    }

    /// A write waits for the socket and must finish by `due_ms`; `None`
    /// when no write waits.
    pub fn write_due(&self, due_ms: Option<u64>) {
        self.write_due_ms
            .store(due_ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// Why the connection must close at `now_ms`, if a deadline passed.
    pub fn overdue(&self, now_ms: u64) -> Option<CloseReason> {
        let write_due = self.write_due_ms.load(Ordering::Relaxed);
        if write_due != 0 && now_ms >= write_due {
            return Some(CloseReason::SlowConsumer);
        }
        (now_ms >= self.heartbeat_due_ms.load(Ordering::Relaxed))
            .then_some(CloseReason::HeartbeatTimeout)
    }

    /// Resolves when frames were queued or a close was requested since the
    /// last call (a notification is never lost between `drain` and this).
    pub async fn wait(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(capacity: usize, transport: TransportKind) -> Channel {
        Channel::new(
            1,
            "key".into(),
            0,
            IpAddr::from([127, 0, 0, 1]),
            transport,
            capacity,
            &[1000],
        )
    }

    #[test]
    fn a_full_queue_closes_the_connection_and_counts_the_drops() {
        let ch = channel(2, TransportKind::Tcp);
        assert_eq!(ch.push_bytes(Bytes::from_static(b"1")), Queued::Yes);
        assert_eq!(ch.push_bytes(Bytes::from_static(b"2")), Queued::Yes);
        assert_eq!(
            ch.push_bytes(Bytes::from_static(b"3")),
            Queued::Overflow { dropped: 3 }
        );
        assert_eq!(ch.push_bytes(Bytes::from_static(b"4")), Queued::Closed);
        let drained = ch.drain();
        assert!(drained.frames.is_empty());
        assert_eq!(drained.closing, Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn pushes_pick_the_bytes_of_their_transport() {
        let frame = pushcluster_api::protocol::Frame::server(
            pushcluster_api::protocol::op::RAW,
            Bytes::from_static(b"inner"),
        );
        let push = EncodedPush::new(&frame);
        let tcp = channel(4, TransportKind::Tcp);
        let ws = channel(4, TransportKind::WebSocket);
        tcp.push(&push);
        ws.push(&push);
        assert_eq!(tcp.drain().frames[0], push.tcp);
        assert_eq!(ws.drain().frames[0], push.websocket);
    }

    #[test]
    fn draining_reuses_buffers_and_releasing_frees_them() {
        let ch = channel(64, TransportKind::Tcp);
        let mut drained = Drained::default();
        for round in 0..3u8 {
            for i in 0..10u8 {
                ch.push_bytes(Bytes::from(vec![round, i]));
            }
            ch.drain_into(&mut drained);
            let got: Vec<u8> = drained.frames.iter().map(|f| f[1]).collect();
            assert_eq!(got, (0..10).collect::<Vec<u8>>(), "in order, round {round}");
            assert_eq!(drained.published_us.len(), 10);
            drained.frames.clear();
        }
        // Both buffers have room for a burst of 10: no allocation per burst.
        assert!(drained.frames.capacity() >= 10);
        ch.push_bytes(Bytes::from_static(b"x"));
        ch.drain_into(&mut drained);
        assert!(drained.frames.capacity() >= 10);
        drained.release();
        ch.release_spare();
        assert_eq!(drained.frames.capacity(), 0);
        ch.drain_into(&mut drained);
        assert_eq!(
            drained.frames.capacity(),
            0,
            "the queue's spare is freed too"
        );
    }

    #[test]
    fn watch_set() {
        let ch = channel(1, TransportKind::Tcp);
        assert!(ch.watches(1000));
        ch.watch(&[5, 6, 5]);
        ch.unwatch(&[1000, 6]);
        assert!(ch.watches(5) && !ch.watches(6) && !ch.watches(1000));
    }

    #[tokio::test]
    async fn wakeups_are_not_lost() {
        let ch = channel(4, TransportKind::Tcp);
        ch.push_bytes(Bytes::from_static(b"x"));
        // The push happened before anyone waited; wait() still returns.
        tokio::time::timeout(std::time::Duration::from_secs(5), ch.wait())
            .await
            .expect("stored notification");
    }
}
