//! comet: the connection server. Clients speak goim v2 over TCP or
//! WebSocket; job pushes through `goim.comet.Comet` (in process or gRPC);
//! comet asks logic through a [`LogicLink`] (Connect, Disconnect, Heartbeat,
//! RenewOnline, Receive).
//!
//! Runtime shape: one task per connection owns its socket, reads client
//! frames and writes what other tasks queued on its [`Channel`]. Pushes only
//! queue (never wait); a connection whose queue is full is closed.
//!
//! Invariant: comet never talks to the bus or the registry; it hears from
//! job and asks logic.
#![forbid(unsafe_code)]

pub mod bucket;
pub mod channel;
mod conn;
pub mod grpc;
pub mod limits;
pub mod logic_client;
pub mod metrics;
mod report;
pub mod resume;
pub mod room;
pub mod server;
pub mod stream_guard;
mod tcp;
#[cfg(test)]
mod tests;
pub mod tls;
mod ws;

#[doc(hidden)]
pub use tcp::read_tcp_frames;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use pushcluster_api::config::{CometConfig, UpstreamConfig};
use pushcluster_api::link::{CometLink, LinkError, LogicLink};
use pushcluster_api::pb::comet::{
    BroadcastReply, BroadcastReq, BroadcastRoomReply, BroadcastRoomReq, PushMsgReply, PushMsgReq,
    RoomsReply,
};
use pushcluster_api::pb::logic::{HistoryMessage, HistoryReq, OnlineReq, StreamPosition};
use pushcluster_api::protocol::{EncodedPush, Frame, RawBatch};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bucket::Buckets;
use crate::channel::{Channel, CloseReason, Queued};
use crate::limits::Admission;
use crate::metrics::CometMetrics;
use crate::resume::PositionedBatch;
use crate::room::{Fanout, JoinRefusal, Room, RoomTurn, Rooms};
use crate::stream_guard::{StreamGuard, StreamMark};

pub use crate::server::CometServer;

/// Shards of the room table (rooms are looked up by id, not by key).
const ROOM_SHARDS: usize = 64;

/// The comet core shared by its listeners, its gRPC service and, in
/// standalone mode, job.
/// How often connection deadlines (heartbeat, pending write) are checked:
/// a connection closes at most this much after its deadline.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub struct Comet {
    me: Weak<Comet>,
    id: String,
    config: CometConfig,
    logic: Arc<dyn LogicLink>,
    pub(crate) buckets: Buckets,
    pub(crate) rooms: Rooms,
    guard: StreamGuard,
    ips: Mutex<HashMap<IpAddr, u32>>,
    next_channel_id: AtomicU64,
    /// The zero of the connections' deadlines (`now_ms`).
    epoch: Instant,
    pub(crate) metrics: CometMetrics,
    draining: AtomicBool,
    /// Cancelled when draining starts: connections still authenticating stop.
    pub(crate) drain_started: CancellationToken,
    /// Connection tasks, so a drain can wait for them.
    pub(crate) tasks: TaskTracker,
    /// The gRPC address reported to logic, known once bound.
    pub(crate) grpc_addr: OnceLock<String>,
    /// `comet.limits` on connections.
    pub(crate) admission: Arc<Admission>,
    /// The broadcast queue, started with the first broadcast.
    broadcasts: OnceLock<mpsc::Sender<Broadcast>>,
    /// Broadcasts queued or being sent; a drain waits until it is 0.
    broadcasts_pending: AtomicUsize,
    broadcasts_idle: Notify,
    /// `upstream`, when on: op 4 goes to the backend, answered with op 5.
    upstream: OnceLock<UpstreamConfig>,
}

/// A broadcast waiting for its turn.
struct Broadcast {
    op: i32,
    push: EncodedPush,
    speed: i32,
}

impl Comet {
    pub fn new(
        id: String,
        config: CometConfig,
        logic: Arc<dyn LogicLink>,
        metrics: CometMetrics,
    ) -> Arc<Comet> {
        Arc::new_cyclic(|me| Comet {
            me: me.clone(),
            id,
            buckets: Buckets::new(config.bucket.size),
            rooms: Rooms::new(ROOM_SHARDS, config.limits.rooms_per_connection)
                .yielding_cpu(config.yield_cpu),
            guard: StreamGuard::default(),
            admission: Admission::new(config.limits.clone()),
            config,
            logic,
            ips: Mutex::new(HashMap::new()),
            next_channel_id: AtomicU64::new(1),
            epoch: Instant::now(),
            metrics,
            draining: AtomicBool::new(false),
            drain_started: CancellationToken::new(),
            tasks: TaskTracker::new(),
            grpc_addr: OnceLock::new(),
            broadcasts: OnceLock::new(),
            broadcasts_pending: AtomicUsize::new(0),
            broadcasts_idle: Notify::new(),
            upstream: OnceLock::new(),
        })
    }

    /// Client messages (op 4) go to the backend through logic, each
    /// answered with op 5 (`upstream.enabled`).
    pub fn set_upstream(&self, config: UpstreamConfig) {
        if config.enabled {
            let _ = self.upstream.set(config);
        }
    }

    pub(crate) fn upstream(&self) -> Option<&UpstreamConfig> {
        self.upstream.get()
    }

    /// The server id stored in sessions and carried in `PushMsg.server`.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> &CometConfig {
        &self.config
    }

    pub(crate) fn logic(&self) -> &Arc<dyn LogicLink> {
        &self.logic
    }

    pub fn connection_count(&self) -> usize {
        self.buckets.len()
    }

    /// Milliseconds since the comet started: the clock of connection
    /// deadlines.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `after` from now on the clock of connection deadlines.
    pub(crate) fn deadline_ms(&self, after: Duration) -> u64 {
        self.now_ms()
            .saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX))
    }

    /// Closes the connections whose heartbeat or pending write is overdue;
    /// returns how many. Run every [`SWEEP_INTERVAL`] by the server.
    pub(crate) fn sweep(&self) -> usize {
        let now = self.now_ms();
        let mut closed = 0;
        for index in 0..self.buckets.shard_count() {
            for channel in self.buckets.shard_channels(index) {
                if channel.closing().is_none()
                    && let Some(reason) = channel.overdue(now)
                {
                    channel.close(reason);
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Counts a join's outcome (`pushcluster_comet_room_joins_total`).
    pub(crate) fn count_join(&self, joined: Result<bool, JoinRefusal>) {
        let result = match joined {
            Ok(true) => "ok",
            Ok(false) => "already",
            Err(refusal) => refusal.label(),
        };
        self.metrics.room_joins.with_label_values(&[result]).inc();
    }

    pub(crate) fn next_channel_id(&self) -> u64 {
        self.next_channel_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes an authenticated channel reachable: by key (replacing an older
    /// connection with the same key) and in its rooms (logic allowed them;
    /// past `comet.limits.rooms_per_connection` the rest are left out).
    pub(crate) fn register(&self, channel: &Arc<Channel>, room: &str, more: &[String]) {
        if let Some(old) = self.buckets.put(channel.clone()) {
            old.close(CloseReason::Replaced);
        }
        if !room.is_empty() {
            self.count_join(self.rooms.change(channel, room).map(|_| true));
        }
        for room in more {
            self.count_join(self.rooms.join_more(channel, room));
        }
        if let Ok(mut ips) = self.ips.lock() {
            *ips.entry(channel.ip).or_insert(0) += 1;
        }
        self.metrics
            .connections
            .with_label_values(&[channel.transport.label()])
            .inc();
        // A drain that started meanwhile did not see this channel.
        if self.draining.load(Ordering::SeqCst) {
            channel.close(CloseReason::Drain);
        }
    }

    /// Undoes [`register`](Self::register).
    pub(crate) fn unregister(&self, channel: &Arc<Channel>) {
        self.buckets.remove(channel);
        self.rooms.leave_all(channel);
        if let Ok(mut ips) = self.ips.lock()
            && let Some(count) = ips.get_mut(&channel.ip)
        {
            *count -= 1;
            if *count == 0 {
                ips.remove(&channel.ip);
            }
        }
        self.metrics
            .connections
            .with_label_values(&[channel.transport.label()])
            .dec();
    }

    fn record(&self, kind: &str, fanout: Fanout) {
        self.metrics
            .delivered
            .with_label_values(&[kind])
            .inc_by(fanout.queued);
        if fanout.dropped > 0 {
            self.metrics
                .dropped
                .with_label_values(&["slow_consumer"])
                .inc_by(fanout.dropped);
        }
    }

    /// Refuses a stale partition owner; counts and reports duplicates.
    fn admit(
        &self,
        kind: &str,
        mark: Option<&StreamMark>,
        seen: impl FnOnce(&StreamMark) -> usize,
    ) -> Result<usize, LinkError> {
        let Some(mark) = mark else { return Ok(0) };
        if let Err(newer) = self.guard.check_owner(mark) {
            self.metrics.stale_owners.inc();
            return Err(LinkError::Stale(format!(
                "partition {} has owner generation {newer}, this push {}",
                mark.partition, mark.generation
            )));
        }
        let seen = seen(mark);
        if seen > 0 {
            self.metrics
                .duplicates
                .with_label_values(&[kind])
                .inc_by(seen as u64);
        }
        Ok(seen)
    }

    /// PushMsg: to the connections with these keys that watch `op`. Unlike
    /// goim, a full connection never stops the remaining keys. `stream`:
    /// the direct stream the message belongs to (empty for goim's
    /// per-comet pushes); connections with positions get it positioned,
    /// and one that missed the stream's message before (`prev_seq`)
    /// resumes the stream from history.
    #[allow(clippy::too_many_arguments)]
    pub fn push_keys(
        &self,
        keys: &[String],
        op: i32,
        stream: &str,
        frame: &Frame,
        mark: Option<&StreamMark>,
        prev_seq: u64,
        publish_unix_micros: i64,
    ) -> Result<Fanout, LinkError> {
        self.metrics.pushes.with_label_values(&["keys"]).inc();
        let seen = self.admit("keys", mark, |m| {
            if stream.is_empty() {
                self.guard.admit_key_push(m)
            } else {
                self.guard.admit_stream(stream, m)
            }
        })?;
        if seen > 0 {
            return Ok(Fanout::default());
        }
        let push = EncodedPush::new(frame).published_at(publish_unix_micros);
        let published_us = u64::try_from(publish_unix_micros).unwrap_or(0);
        let mut positioned: Option<Option<Arc<PositionedBatch>>> = None;
        let mut fanout = Fanout::default();
        for key in keys {
            let Some(channel) = self.buckets.get(key) else {
                self.metrics.keys_not_found.inc();
                continue;
            };
            if !channel.watches(op) {
                continue;
            }
            let batch = match (channel.positioned(), mark) {
                (Some(_), Some(mark)) if !stream.is_empty() => positioned
                    .get_or_insert_with(|| {
                        PositionedBatch::from_push(stream, frame, mark, published_us).map(Arc::new)
                    })
                    .as_ref(),
                _ => None,
            };
            let queued = match (batch, channel.positioned()) {
                (Some(batch), Some(state)) => {
                    let capacity = self.config.protocol.send_queue;
                    match state.push_direct(&channel, stream, batch, capacity, prev_seq) {
                        Ok(queued) => queued,
                        Err(since) => {
                            self.metrics.direct_gaps.inc();
                            self.resume_direct(channel.clone(), stream, since);
                            Queued::Yes
                        }
                    }
                }
                _ => channel.push(&push),
            };
            fanout.record(queued);
        }
        self.record("keys", fanout);
        Ok(fanout)
    }

    /// Reads what `channel` missed of direct stream `stream` after `since`
    /// and writes it (the stream's live batches are held meanwhile).
    fn resume_direct(&self, channel: Arc<Channel>, stream: &str, since: StreamPosition) {
        let Some(comet) = self.me.upgrade() else {
            return;
        };
        let stream = stream.to_string();
        tokio::spawn(async move {
            if let Some(state) = channel.positioned() {
                let target = resume::Resuming::Direct(&stream);
                resume::resume(&comet, &channel, state, target, Some(since)).await;
            }
        });
    }

    /// BroadcastRoom: to every member of the room on this comet.
    pub async fn push_room(
        &self,
        room: &str,
        frame: &Frame,
        mark: Option<&StreamMark>,
        publish_unix_micros: i64,
    ) -> Result<Fanout, LinkError> {
        self.push_room_after(room, frame, mark, 0, publish_unix_micros)
            .await
    }

    /// [`push_room`](Self::push_room) of a push whose previous message in
    /// the room is `prev_seq` (0: unknown): what this comet missed before
    /// it is filled from history first, in the same turn of the room, so
    /// no other push of the room (another partition owner's, during a
    /// takeover) comes between and makes the filled messages look seen.
    async fn push_room_after(
        &self,
        room: &str,
        frame: &Frame,
        mark: Option<&StreamMark>,
        prev_seq: u64,
        publish_unix_micros: i64,
    ) -> Result<Fanout, LinkError> {
        self.metrics.pushes.with_label_values(&["room"]).inc();
        self.admit("room", mark, |_| 0)?;
        let Some(room) = self.rooms.get(room) else {
            return Ok(Fanout::default());
        };
        let turn = room.take_turn().await;
        if let Some(mark) = mark
            && prev_seq > 0
        {
            self.fill_gap(&room, &turn, mark, prev_seq).await;
        }
        let push = EncodedPush::new(frame).published_at(publish_unix_micros);
        let (fanout, seen) = room.push_in_turn(&turn, &push, frame, mark).await;
        if seen > 0 {
            self.metrics
                .duplicates
                .with_label_values(&["room"])
                .inc_by(seen as u64);
        }
        self.record("room", fanout);
        Ok(fanout)
    }

    /// A room push whose previous message (`prev_seq`) is newer than the
    /// last one this comet has for the room: the ones between never came
    /// (job's calls here failed meanwhile). They are read from logic's
    /// History and pushed first, so every member — resumed clients
    /// included — stays complete and in order. When history no longer has
    /// them, members with positions are closed to resync: they reconnect,
    /// resume and are told `recovered: false`.
    async fn fill_gap(&self, room: &Room, turn: &RoomTurn<'_>, mark: &StreamMark, prev_seq: u64) {
        let room_id = &*room.id;
        let Some(last) = room.missing_before(mark.epoch, prev_seq) else {
            return;
        };
        let request = HistoryReq {
            room: room_id.to_string(),
            since: Some(StreamPosition {
                epoch: mark.epoch,
                offset: last,
            }),
        };
        let reply = resume::history(self, request).await;
        let missed: Vec<HistoryMessage> = match reply {
            reply if reply.recovered && reply.epoch == mark.epoch => reply
                .messages
                .into_iter()
                .filter(|m| m.offset <= prev_seq)
                .collect(),
            other => {
                let closed = room.close_positioned(CloseReason::Resync);
                self.metrics.gaps.with_label_values(&["unfilled"]).inc();
                tracing::warn!(
                    room = room_id,
                    missing_after = last,
                    up_to = prev_seq,
                    closed,
                    reason = %other.reason,
                    "room messages missed and not in history; members with positions resync"
                );
                return;
            }
        };
        self.metrics.gaps.with_label_values(&["filled"]).inc();
        let mut batch = RawBatch::default();
        for message in &missed {
            batch.push(message.op, &message.body);
        }
        if batch.is_empty() {
            return;
        }
        let frame = batch.finish();
        let filled = StreamMark {
            seqs: missed.iter().map(|m| m.offset).collect(),
            ..mark.clone()
        };
        let published = missed.first().map_or(0, |m| m.publish_unix_micros);
        let push = EncodedPush::new(&frame).published_at(published);
        let (fanout, _) = room.push_in_turn(turn, &push, &frame, Some(&filled)).await;
        self.record("room", fanout);
    }

    /// Broadcast: to every connection watching `op`, paced to `speed`
    /// connections per second when `speed > 0`. Returns once queued:
    /// broadcasts run one at a time in arrival order (so a later one never
    /// overtakes an earlier one), from a queue of `comet.broadcast_queue`; a
    /// full queue refuses the broadcast (Unavailable: job retries it).
    pub fn start_broadcast(
        self: &Arc<Self>,
        op: i32,
        frame: &Frame,
        speed: i32,
        mark: Option<&StreamMark>,
        publish_unix_micros: i64,
    ) -> Result<(), LinkError> {
        self.metrics.pushes.with_label_values(&["broadcast"]).inc();
        let queue = self.broadcasts.get_or_init(|| self.spawn_broadcaster());
        // A place first: refusing after the stream guard admitted the
        // message would make job's retry look like a duplicate.
        let place = queue.try_reserve().map_err(|error| match error {
            mpsc::error::TrySendError::Full(()) => LinkError::Unavailable(format!(
                "{} broadcasts already queued (comet.broadcast_queue)",
                self.config.broadcast_queue
            )),
            mpsc::error::TrySendError::Closed(()) => {
                LinkError::Unavailable("comet is shutting down".into())
            }
        })?;
        if self.admit("broadcast", mark, |m| self.guard.admit_broadcast(op, m))? > 0 {
            return Ok(());
        }
        self.broadcasts_pending.fetch_add(1, Ordering::SeqCst);
        place.send(Broadcast {
            op,
            push: EncodedPush::new(frame).published_at(publish_unix_micros),
            speed,
        });
        Ok(())
    }

    /// The task that sends queued broadcasts, one at a time. It holds the
    /// comet only while sending, and ends with it.
    fn spawn_broadcaster(&self) -> mpsc::Sender<Broadcast> {
        let (tx, mut rx) = mpsc::channel::<Broadcast>(self.config.broadcast_queue.max(1));
        let me = self.me.clone();
        tokio::spawn(async move {
            while let Some(broadcast) = rx.recv().await {
                let Some(comet) = me.upgrade() else { break };
                comet.send_broadcast(broadcast).await;
                comet.broadcasts_pending.fetch_sub(1, Ordering::SeqCst);
                comet.broadcasts_idle.notify_waiters();
            }
        });
        tx
    }

    async fn send_broadcast(&self, broadcast: Broadcast) {
        let Broadcast { op, push, speed } = broadcast;
        let started = Instant::now();
        let mut sent = 0u64;
        for shard in 0..self.buckets.shard_count() {
            let mut fanout = Fanout::default();
            for channel in self.buckets.shard_channels(shard) {
                if channel.watches(op) {
                    fanout.record(channel.push(&push));
                    sent += 1;
                }
            }
            self.record("broadcast", fanout);
            if speed > 0 && !self.drain_started.is_cancelled() {
                // Pace: `sent` connections should take sent/speed seconds;
                // a drain ends the pacing so it need not wait for it.
                let due = started + Duration::from_secs_f64(sent as f64 / f64::from(speed));
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = self.drain_started.cancelled() => {}
                }
            }
        }
    }

    /// Waits until every queued broadcast has been sent.
    async fn broadcasts_sent(&self) {
        loop {
            // Registered before the check, so a wake-up cannot be missed.
            let idle = self.broadcasts_idle.notified();
            if self.broadcasts_pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Rooms with at least one member here.
    pub fn room_ids(&self) -> HashMap<String, bool> {
        self.rooms
            .counts()
            .into_keys()
            .map(|room| (room, true))
            .collect()
    }

    /// The RenewOnline report: room counts plus what goim kept in discovery
    /// metadata.
    pub(crate) fn online_request(&self) -> OnlineReq {
        let (conn_count, ip_count) = match self.ips.lock() {
            Ok(ips) => (ips.values().sum::<u32>(), ips.len()),
            Err(_) => (0, 0),
        };
        OnlineReq {
            server: self.id.clone(),
            room_count: self.rooms.counts(),
            has_metadata: true,
            conn_count: i32::try_from(conn_count).unwrap_or(i32::MAX),
            ip_count: i32::try_from(ip_count).unwrap_or(i32::MAX),
            weight: self.config.weight,
            offline: self.config.offline || self.draining.load(Ordering::SeqCst),
            addrs: self.config.addrs.clone(),
            region: self.config.region.clone(),
            zone: self.config.zone.clone(),
            grpc_addr: self.grpc_addr.get().cloned().unwrap_or_default(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Closes every connection, spread evenly over `period` so clients
    /// reconnect elsewhere without a storm, then waits for the connection
    /// tasks (queued frames are flushed first). `force` closes the rest at once.
    pub async fn drain(&self, period: Duration, force: &CancellationToken) {
        self.draining.store(true, Ordering::SeqCst);
        self.drain_started.cancel();
        // Broadcasts already taken reach the connections before they close.
        tokio::select! {
            _ = self.broadcasts_sent() => {}
            _ = tokio::time::sleep(self.config.protocol.write_timeout) => {
                tracing::warn!(
                    left = self.broadcasts_pending.load(Ordering::SeqCst),
                    "broadcasts still being sent when the drain started closing connections"
                );
            }
            _ = force.cancelled() => {}
        }
        let channels = self.buckets.all_channels();
        let count = channels.len();
        tracing::info!(connections = count, ?period, "draining connections");
        let deadline = Instant::now() + period;
        let still_here = |c: &Arc<Channel>| {
            self.buckets
                .get(&c.key)
                .is_some_and(|current| current.id == c.id)
        };
        let mut first = true;
        for channel in &channels {
            if !still_here(channel) {
                continue;
            }
            if !first {
                // Clients that leave by themselves shorten the drain: what is
                // left of the period is spread over the connections still here.
                // Looked at again every quarter second, as clients leave.
                let slot_started = Instant::now();
                loop {
                    let open = self.buckets.len().max(1) as u32;
                    let due =
                        slot_started + deadline.saturating_duration_since(slot_started) / open;
                    let now = Instant::now();
                    if now >= due || force.is_cancelled() || !still_here(channel) {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.min(now + Duration::from_millis(250))) => {}
                        _ = force.cancelled() => {}
                    }
                }
                if !still_here(channel) {
                    continue;
                }
            }
            first = false;
            channel.close(CloseReason::Drain);
        }
        self.tasks.close();
        let bound = self.config.protocol.write_timeout + self.config.logic_timeout;
        tokio::select! {
            _ = self.tasks.wait() => {}
            _ = tokio::time::sleep(bound) => {
                tracing::warn!(left = self.tasks.len(), "connections still closing after the drain");
            }
            _ = force.cancelled() => {}
        }
        tracing::info!("drain finished");
    }
}

fn frame_of(proto: Option<pushcluster_api::pb::protocol::Proto>) -> Result<Frame, LinkError> {
    proto
        .map(Frame::from)
        .ok_or_else(|| LinkError::InvalidArgument("proto is required".into()))
}

/// Serves one WebSocket client on any byte stream, as the WebSocket
/// listener does after accepting it: upgrade, authenticate, run. Public for
/// the fuzz target (`fuzz/fuzz_targets/ws_upgrade.rs`).
pub async fn serve_websocket<S>(comet: Arc<Comet>, stream: S, ip: IpAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let opening = ws::opening(comet.clone(), stream, ip, started);
    conn::run(comet, opening, ip, started, None).await;
}

/// What job calls, in process (standalone) or through [`grpc`].
#[async_trait]
impl CometLink for Comet {
    async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, LinkError> {
        if req.keys.is_empty() {
            return Err(LinkError::InvalidArgument("keys are required".into()));
        }
        let frame = frame_of(req.proto)?;
        let mark = StreamMark::from_fields(
            req.stream_epoch,
            req.partition,
            req.owner_generation,
            req.seqs,
        );
        self.push_keys(
            &req.keys,
            req.proto_op,
            &req.stream,
            &frame,
            mark.as_ref(),
            req.prev_seq,
            req.publish_unix_micros,
        )?;
        Ok(PushMsgReply {})
    }

    async fn broadcast(&self, req: BroadcastReq) -> Result<BroadcastReply, LinkError> {
        let frame = frame_of(req.proto)?;
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| LinkError::Unavailable("comet is shutting down".into()))?;
        let mark = StreamMark::from_fields(
            req.stream_epoch,
            req.partition,
            req.owner_generation,
            req.seqs,
        );
        me.start_broadcast(
            req.proto_op,
            &frame,
            req.speed,
            mark.as_ref(),
            req.publish_unix_micros,
        )?;
        Ok(BroadcastReply {})
    }

    async fn broadcast_room(&self, req: BroadcastRoomReq) -> Result<BroadcastRoomReply, LinkError> {
        if req.room_id.is_empty() {
            return Err(LinkError::InvalidArgument("roomID is required".into()));
        }
        let frame = frame_of(req.proto)?;
        let mark = StreamMark::from_fields(
            req.stream_epoch,
            req.partition,
            req.owner_generation,
            req.seqs,
        );
        if let Some(mark) = &mark
            && frame.op != pushcluster_api::protocol::op::RAW
            && mark.seqs.len() != 1
        {
            return Err(LinkError::InvalidArgument(
                "seqs must have one entry per frame".into(),
            ));
        }
        self.push_room_after(
            &req.room_id,
            &frame,
            mark.as_ref(),
            req.prev_seq,
            req.publish_unix_micros,
        )
        .await?;
        Ok(BroadcastRoomReply {})
    }

    async fn rooms(&self) -> Result<RoomsReply, LinkError> {
        Ok(RoomsReply {
            rooms: self.room_ids(),
        })
    }
}

/// Records a queue outcome for frames the comet itself produced (replies).
pub(crate) fn count_reply(metrics: &CometMetrics, outcome: Queued) {
    if let Queued::Overflow { dropped } = outcome {
        metrics
            .dropped
            .with_label_values(&["slow_consumer"])
            .inc_by(dropped as u64);
    }
}
