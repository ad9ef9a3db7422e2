//! The push stream: logic publishes goim `PushMsg`s, job consumes them.
//!
//! Guarantees every implementation gives:
//! - messages with the same [`ordering_key`] are delivered in publish order;
//! - a delivery stays pending until it is acked; a nacked delivery comes back
//!   (up to the bus's delivery limit), so job acks only after comets accepted;
//! - a publish with a message id already seen within the dedupe window is
//!   accepted but not delivered again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use pushcluster_api::config::HistoryConfig;
use pushcluster_api::pb::logic::PushMsg;
use pushcluster_api::pb::logic::push_msg::Type as PushType;
use tokio::sync::mpsc;

/// Why the bus refused an operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus closed")]
    Closed,
    #[error("{0}")]
    Other(String),
}

/// The key that orders messages: one room, one direct stream, one target
/// comet, or one broadcast op is consumed in publish order.
pub fn ordering_key(msg: &PushMsg) -> String {
    match history_of(msg) {
        Some(name) => history_ordering_key(name),
        None if msg.r#type() == PushType::Push => format!("push.{}", msg.server),
        None => format!("broadcast.{}", msg.operation),
    }
}

/// The history a message is kept in: its room's, or its direct stream's
/// (`pushcluster_api::streams`); broadcasts and goim's per-comet pushes
/// have none.
pub fn history_of(msg: &PushMsg) -> Option<&str> {
    match msg.r#type() {
        PushType::Room => Some(&msg.room),
        PushType::Push if !msg.stream.is_empty() => Some(&msg.stream),
        _ => None,
    }
}

/// The ordering key of the messages kept in history `name`.
pub fn history_ordering_key(name: &str) -> String {
    if pushcluster_api::streams::is_direct(name) {
        format!("direct.{name}")
    } else {
        format!("room.{name}")
    }
}

/// Result of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The message id was seen before within the dedupe window; the message
    /// was not stored again.
    pub duplicate: bool,
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Stores the message; returns once the bus holds it durably (for its
    /// kind of durability). `msg_id` makes the publish idempotent.
    async fn publish(&self, msg: PushMsg, msg_id: Option<String>) -> Result<Published, BusError>;

    /// Starts consuming. Deliveries with the same ordering key arrive in order.
    async fn subscribe(&self) -> Result<Subscription, BusError>;

    /// The partition `msg` is published to (its ordering key's).
    fn partition_of(&self, msg: &PushMsg) -> u32;

    /// Each partition's lag, measured now (`None`: not known, e.g. no
    /// consumer yet). Publishers read it to push back before the backlog
    /// grows without bound.
    async fn lag(&self) -> Result<Vec<Option<PartitionLag>>, BusError>;

    /// What a client that last saw `since` in `room` missed, within the
    /// room's history limits; with no `since`, only the current position.
    async fn room_history(
        &self,
        room: &str,
        since: Option<Since>,
        max_bytes: usize,
    ) -> Result<RoomHistory, BusError>;
}

/// A place in a room's history, as clients keep it: the stream's epoch and
/// the offset (stream sequence) of the last message seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Since {
    pub epoch: u64,
    pub offset: u64,
}

/// One message of a room's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub offset: u64,
    pub published_at: SystemTime,
    pub msg: PushMsg,
}

/// Why a resume could not give a client everything it missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecovered {
    /// The client asked for nothing to resume from.
    Fresh,
    /// The history the client's position belongs to is gone (a new stream,
    /// a restarted standalone).
    EpochChanged,
    /// Some of what the client missed has expired.
    Expired,
    /// More messages were missed than the room's `max_messages`.
    TooMany,
    /// What was missed is larger than `history.replay.max_bytes`.
    TooLarge,
    /// History is off (`history.enabled`, or a work-queue stream).
    Disabled,
    /// History could not be read in time.
    Unavailable,
}

impl Unrecovered {
    pub fn label(self) -> &'static str {
        match self {
            Unrecovered::Fresh => "fresh",
            Unrecovered::EpochChanged => "epoch_changed",
            Unrecovered::Expired => "expired",
            Unrecovered::TooMany => "too_many",
            Unrecovered::TooLarge => "too_large",
            Unrecovered::Disabled => "disabled",
            Unrecovered::Unavailable => "unavailable",
        }
    }
}

impl RoomHistory {
    /// Nothing replayed: the client goes on from `head`.
    pub fn unrecovered(epoch: u64, head: u64, gap: Unrecovered) -> RoomHistory {
        RoomHistory {
            epoch,
            messages: Vec::new(),
            gap: Some(gap),
            offset: head,
        }
    }

    /// The answers every bus gives before reading: no position (fresh),
    /// another epoch, history off. `Ok`: the position to read after.
    pub fn check(
        epoch: u64,
        head: u64,
        since: Option<Since>,
        enabled: bool,
    ) -> Result<Since, RoomHistory> {
        let gap = match since {
            None => Unrecovered::Fresh,
            Some(since) if since.epoch != epoch => Unrecovered::EpochChanged,
            Some(_) if !enabled => Unrecovered::Disabled,
            Some(since) => return Ok(since),
        };
        Err(RoomHistory::unrecovered(epoch, head, gap))
    }
}

/// What a room's history holds for a resuming client.
#[derive(Debug, Clone, Default)]
pub struct RoomHistory {
    /// The history's epoch now.
    pub epoch: u64,
    /// Messages after the client's offset, oldest first (empty unless
    /// recovered).
    pub messages: Vec<HistoryEntry>,
    /// `None`: `messages` is everything the client missed.
    pub gap: Option<Unrecovered>,
    /// Where the client is once `messages` are written: live messages at or
    /// below it are already covered.
    pub offset: u64,
}

/// One partition's backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionLag {
    /// Messages published and not yet settled by the consumers.
    pub pending: u64,
    /// Messages settled so far (a counter: its growth is the drain rate).
    pub settled: u64,
}

/// Where a message sits in the stream, handed to comets so they can drop
/// duplicates and refuse a stale partition owner (see `goim.comet`'s
/// extension fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// Identity of the stream the sequence numbers belong to (0: unknown).
    pub epoch: u64,
    /// The ordering partition the message belongs to.
    pub partition: u32,
    /// Fencing token of the partition's owner that delivered the message;
    /// a later owner has a larger one.
    pub generation: u64,
    /// Stream sequence: increases with publish order within a partition.
    pub seq: u64,
}

/// Settles one delivery. Dropping it unsettled is a nack without delay.
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// Done: never deliver again.
    async fn ack(self: Box<Self>);
    /// Not done: deliver again after `delay` (if the delivery limit allows).
    async fn nack(self: Box<Self>, delay: Duration);
}

/// One message handed to a consumer.
pub struct Delivery {
    pub msg: PushMsg,
    /// When logic published it (for end-to-end latency).
    pub published_at: SystemTime,
    /// 1 on the first delivery, then 2, 3, ...
    pub attempt: u32,
    pub position: Position,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("msg", &self.msg)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    pub fn new(
        msg: PushMsg,
        published_at: SystemTime,
        attempt: u32,
        position: Position,
        acker: Box<dyn Acker>,
    ) -> Self {
        Delivery {
            msg,
            published_at,
            attempt,
            position,
            acker,
        }
    }

    pub async fn ack(self) {
        self.acker.ack().await
    }

    pub async fn nack(self, delay: Duration) {
        self.acker.nack(delay).await
    }
}

/// A stream of deliveries.
pub struct Subscription {
    rx: mpsc::Receiver<Delivery>,
    /// The consuming side's task, stopped and awaited by [`Subscription::close`].
    consumer: Option<(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    )>,
}

impl Subscription {
    pub fn new(rx: mpsc::Receiver<Delivery>) -> Self {
        Subscription { rx, consumer: None }
    }

    /// A subscription whose consumer task is stopped by `stop` on close.
    pub fn with_close(
        rx: mpsc::Receiver<Delivery>,
        stop: tokio_util::sync::CancellationToken,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Subscription {
            rx,
            consumer: Some((stop, task)),
        }
    }

    /// The next delivery; `None` once the bus is closed.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// Stops consuming and gives up what this consumer held (for NATS: its
    /// partition leases, so other jobs take over at once).
    pub async fn close(mut self) {
        self.rx.close();
        if let Some((stop, task)) = self.consumer.take() {
            stop.cancel();
            let _ = task.await;
        }
    }
}

/// Metrics every bus implementation keeps.
#[derive(Clone)]
pub struct BusMetrics {
    pub published: prometheus::IntCounter,
    pub redelivered: prometheus::IntCounter,
    pub dropped: prometheus::IntCounterVec,
    pub pending: prometheus::IntGauge,
    pub consumer_restarts: prometheus::IntCounter,
}

impl BusMetrics {
    /// Metrics not registered anywhere (tests, or when nobody scrapes).
    pub fn unregistered() -> Self {
        Self::build().unwrap_or_else(|_| unreachable!("static metric definitions are valid"))
    }

    fn build() -> Result<Self, prometheus::Error> {
        Ok(BusMetrics {
            published: prometheus::IntCounter::new(
                "pushcluster_bus_published_total",
                "PushMsg stored on the bus (duplicates by message id excluded).",
            )?,
            redelivered: prometheus::IntCounter::new(
                "pushcluster_bus_redelivered_total",
                "Deliveries repeated because the previous attempt was nacked or abandoned.",
            )?,
            dropped: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "pushcluster_bus_dropped_total",
                    "PushMsg the bus gave up on, by reason (max_deliveries).",
                ),
                &["reason"],
            )?,
            pending: prometheus::IntGauge::new(
                "pushcluster_bus_pending_messages",
                "PushMsg published and not yet acked (consumer lag).",
            )?,
            consumer_restarts: prometheus::IntCounter::new(
                "pushcluster_bus_consumer_restarts_total",
                "Partition consumers that failed and were started again.",
            )?,
        })
    }

    pub fn new(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::build()?;
        metrics.dropped.with_label_values(&["max_deliveries"]);
        registry.register(Box::new(metrics.published.clone()))?;
        registry.register(Box::new(metrics.redelivered.clone()))?;
        registry.register(Box::new(metrics.dropped.clone()))?;
        registry.register(Box::new(metrics.pending.clone()))?;
        registry.register(Box::new(metrics.consumer_restarts.clone()))?;
        Ok(metrics)
    }
}

/// Settings of the in-memory bus.
#[derive(Debug, Clone)]
pub struct MemoryBusConfig {
    /// Messages held before `publish` waits for the consumer.
    pub capacity: usize,
    /// Deliveries of one message before a nack drops it (counted, logged).
    pub max_deliveries: u32,
    /// How long message ids are remembered for deduplication.
    pub dedupe_window: Duration,
    /// Room history kept for resuming clients (a ring per room).
    pub history: HistoryConfig,
}

impl Default for MemoryBusConfig {
    fn default() -> Self {
        MemoryBusConfig {
            capacity: 65_536,
            max_deliveries: 5,
            dedupe_window: Duration::from_secs(120),
            history: HistoryConfig::default(),
        }
    }
}

/// The in-process bus of standalone mode: one FIFO queue, so every ordering
/// key keeps publish order. Publishing waits when the queue is full, which
/// pushes back on the HTTP API instead of dropping.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<MemoryBusInner>,
}

struct MemoryBusInner {
    config: MemoryBusConfig,
    tx: mpsc::Sender<Delivery>,
    rx: Mutex<Option<mpsc::Receiver<Delivery>>>,
    seen_ids: Mutex<Dedupe>,
    metrics: BusMetrics,
    epoch: u64,
    /// The next sequence number, locked from numbering to enqueueing so
    /// sequence order is queue order even with concurrent publishers.
    next_seq: tokio::sync::Mutex<u64>,
    /// The last sequence number given out (read without the lock above).
    last_seq: std::sync::atomic::AtomicU64,
    history: Mutex<MemoryHistory>,
}

/// Publishes between sweeps of every room's expired history.
const HISTORY_SWEEP_EVERY: u64 = 4096;

/// Standalone's room history: a ring per room, bounded by the room's
/// `max_messages` and `max_age`.
#[derive(Default)]
struct MemoryHistory {
    rooms: HashMap<String, RoomRing>,
    /// Highest sequence of a room ring swept away whole: a room without a
    /// ring may have lost messages up to here.
    swept_up_to: u64,
    publishes: u64,
}

#[derive(Default)]
struct RoomRing {
    entries: VecDeque<HistoryEntry>,
    /// Highest sequence this ring let go of.
    evicted_up_to: u64,
    /// Highest sequence it let go of to stay within `max_messages`.
    overflowed_up_to: u64,
}

impl RoomRing {
    fn expire(&mut self, max_age: Duration, now: SystemTime) {
        while let Some(oldest) = self.entries.front() {
            let age = now.duration_since(oldest.published_at).unwrap_or_default();
            if age < max_age {
                break;
            }
            self.evicted_up_to = oldest.offset;
            self.entries.pop_front();
        }
    }
}

impl MemoryHistory {
    fn record(&mut self, config: &HistoryConfig, entry: HistoryEntry) {
        let Some(name) = history_of(&entry.msg) else {
            return;
        };
        let limits = config.for_room(name);
        let ring = self.rooms.entry(name.to_string()).or_default();
        ring.entries.push_back(entry);
        while ring.entries.len() > limits.max_messages {
            if let Some(oldest) = ring.entries.pop_front() {
                ring.evicted_up_to = oldest.offset;
                ring.overflowed_up_to = oldest.offset;
            }
        }
        self.publishes += 1;
        if self.publishes.is_multiple_of(HISTORY_SWEEP_EVERY) {
            self.sweep(config, SystemTime::now());
        }
    }

    /// Expires old entries everywhere and forgets empty rings.
    fn sweep(&mut self, config: &HistoryConfig, now: SystemTime) {
        let mut swept = self.swept_up_to;
        self.rooms.retain(|room, ring| {
            ring.expire(config.for_room(room).max_age, now);
            if ring.entries.is_empty() {
                swept = swept.max(ring.evicted_up_to);
                false
            } else {
                true
            }
        });
        self.swept_up_to = swept;
    }

    fn read(
        &mut self,
        config: &HistoryConfig,
        room: &str,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<HistoryEntry>, Unrecovered> {
        let limits = config.for_room(room);
        let Some(ring) = self.rooms.get_mut(room) else {
            return if after >= self.swept_up_to {
                Ok(Vec::new())
            } else {
                Err(Unrecovered::Expired)
            };
        };
        ring.expire(limits.max_age, SystemTime::now());
        // Lost: what this ring let go of, and what an earlier ring of the
        // room swept away held (all older than this ring's first entry).
        let earlier_ring = self.swept_up_to.min(ring.first_offset().saturating_sub(1));
        if after < ring.overflowed_up_to {
            return Err(Unrecovered::TooMany);
        }
        if after < ring.evicted_up_to.max(earlier_ring) {
            return Err(Unrecovered::Expired);
        }
        let missed: Vec<HistoryEntry> = ring
            .entries
            .iter()
            .filter(|entry| entry.offset > after)
            .cloned()
            .collect();
        let bytes: usize = missed.iter().map(|entry| entry.msg.msg.len()).sum();
        if bytes > max_bytes {
            return Err(Unrecovered::TooLarge);
        }
        Ok(missed)
    }
}

impl RoomRing {
    /// The oldest sequence held (u64::MAX when empty).
    fn first_offset(&self) -> u64 {
        self.entries.front().map_or(u64::MAX, |entry| entry.offset)
    }
}

#[derive(Default)]
struct Dedupe {
    ids: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Dedupe {
    /// Records the id; false if it was already seen within the window.
    fn insert(&mut self, id: String, window: Duration) -> bool {
        let now = Instant::now();
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < window {
                break;
            }
            if let Some((at, old)) = self.order.pop_front()
                && self.ids.get(&old) == Some(&at)
            {
                self.ids.remove(&old);
            }
        }
        if self.ids.contains_key(&id) {
            return false;
        }
        self.ids.insert(id.clone(), now);
        self.order.push_back((now, id));
        true
    }
}

impl MemoryBus {
    pub fn new(config: MemoryBusConfig) -> Self {
        Self::with_metrics(config, BusMetrics::unregistered())
    }

    pub fn with_metrics(config: MemoryBusConfig, metrics: BusMetrics) -> Self {
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        MemoryBus {
            inner: Arc::new(MemoryBusInner {
                config,
                tx,
                rx: Mutex::new(Some(rx)),
                seen_ids: Mutex::new(Dedupe::default()),
                metrics,
                // Distinguishes this process's sequence numbers from any other's.
                epoch: SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1,
                next_seq: tokio::sync::Mutex::new(1),
                last_seq: std::sync::atomic::AtomicU64::new(0),
                history: Mutex::new(MemoryHistory::default()),
            }),
        }
    }

    /// Messages given up after `max_deliveries` nacks.
    pub fn dropped(&self) -> u64 {
        self.inner
            .metrics
            .dropped
            .with_label_values(&["max_deliveries"])
            .get()
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        MemoryBus::new(MemoryBusConfig::default())
    }
}

struct MemoryAcker {
    bus: Arc<MemoryBusInner>,
    msg: Option<PushMsg>,
    published_at: SystemTime,
    attempt: u32,
    position: Position,
}

impl MemoryAcker {
    fn redeliver(&mut self, delay: Duration) {
        let Some(msg) = self.msg.take() else { return };
        let attempt = self.attempt + 1;
        let bus = self.bus.clone();
        if attempt > bus.config.max_deliveries {
            bus.metrics
                .dropped
                .with_label_values(&["max_deliveries"])
                .inc();
            bus.metrics.pending.dec();
            tracing::warn!(
                key = %ordering_key(&msg),
                attempts = self.attempt,
                "message dropped after its last delivery attempt failed"
            );
            return;
        }
        let published_at = self.published_at;
        let position = self.position;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        bus.metrics.redelivered.inc();
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            let acker = MemoryAcker {
                bus: bus.clone(),
                msg: Some(msg.clone()),
                published_at,
                attempt,
                position,
            };
            let delivery = Delivery::new(msg, published_at, attempt, position, Box::new(acker));
            // Fails only when the bus is gone, and then nobody consumes.
            let _ = bus.tx.send(delivery).await;
        });
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) {
        if self.msg.take().is_some() {
            self.bus.metrics.pending.dec();
        }
    }

    async fn nack(mut self: Box<Self>, delay: Duration) {
        self.redeliver(delay);
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if self.msg.is_some() {
            self.redeliver(Duration::ZERO);
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, msg: PushMsg, msg_id: Option<String>) -> Result<Published, BusError> {
        if let Some(id) = msg_id {
            let fresh = self
                .inner
                .seen_ids
                .lock()
                .map_err(|_| BusError::Other("dedupe table poisoned".into()))?
                .insert(id, self.inner.config.dedupe_window);
            if !fresh {
                return Ok(Published { duplicate: true });
            }
        }
        let published_at = SystemTime::now();
        // One queue: sequence order must be queue order, or comets would take
        // a message overtaken by a later one for a duplicate. A single
        // consumer owns the only partition for good: the generation is fixed.
        let mut next_seq = self.inner.next_seq.lock().await;
        let position = Position {
            epoch: self.inner.epoch,
            partition: 0,
            generation: 1,
            seq: *next_seq,
        };
        *next_seq += 1;
        self.inner
            .last_seq
            .store(position.seq, std::sync::atomic::Ordering::SeqCst);
        let history = &self.inner.config.history;
        if history.enabled
            && history_of(&msg).is_some()
            && let Ok(mut rings) = self.inner.history.lock()
        {
            rings.record(
                history,
                HistoryEntry {
                    offset: position.seq,
                    published_at,
                    msg: msg.clone(),
                },
            );
        }
        let acker = MemoryAcker {
            bus: self.inner.clone(),
            msg: Some(msg.clone()),
            published_at,
            attempt: 1,
            position,
        };
        let delivery = Delivery::new(msg, published_at, 1, position, Box::new(acker));
        // Counted before the send: the consumer may ack before it returns.
        self.inner.metrics.pending.inc();
        let sent = self.inner.tx.send(delivery).await;
        drop(next_seq);
        if let Err(mpsc::error::SendError(delivery)) = sent {
            // Nobody will consume it: settle it so it is not redelivered.
            delivery.acker.ack().await;
            return Err(BusError::Closed);
        }
        self.inner.metrics.published.inc();
        Ok(Published { duplicate: false })
    }

    fn partition_of(&self, _msg: &PushMsg) -> u32 {
        0
    }

    async fn lag(&self) -> Result<Vec<Option<PartitionLag>>, BusError> {
        let pending = u64::try_from(self.inner.metrics.pending.get()).unwrap_or(0);
        let published = self.inner.metrics.published.get();
        Ok(vec![Some(PartitionLag {
            pending,
            settled: published.saturating_sub(pending),
        })])
    }

    async fn room_history(
        &self,
        room: &str,
        since: Option<Since>,
        max_bytes: usize,
    ) -> Result<RoomHistory, BusError> {
        let epoch = self.inner.epoch;
        let head = self
            .inner
            .last_seq
            .load(std::sync::atomic::Ordering::SeqCst);
        let history = &self.inner.config.history;
        let since = match RoomHistory::check(epoch, head, since, history.enabled) {
            Ok(since) => since,
            Err(answer) => return Ok(answer),
        };
        let read = self
            .inner
            .history
            .lock()
            .map_err(|_| BusError::Other("history poisoned".into()))?
            .read(history, room, since.offset, max_bytes);
        Ok(match read {
            Ok(messages) => RoomHistory {
                epoch,
                offset: messages.last().map_or(since.offset, |m| m.offset),
                messages,
                gap: None,
            },
            Err(gap) => RoomHistory::unrecovered(epoch, head, gap),
        })
    }

    async fn subscribe(&self) -> Result<Subscription, BusError> {
        let rx = self
            .inner
            .rx
            .lock()
            .map_err(|_| BusError::Other("subscriber slot poisoned".into()))?
            .take()
            .ok_or_else(|| BusError::Other("the in-memory bus has one subscriber".into()))?;
        Ok(Subscription::new(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    fn room_msg(room: &str, body: &'static [u8]) -> PushMsg {
        PushMsg {
            r#type: PushType::Room as i32,
            operation: 1000,
            room: room.into(),
            msg: body.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_room_arrives_in_order_with_increasing_positions() {
        let bus = MemoryBus::default();
        let mut sub = bus.subscribe().await.expect("first subscriber");
        conformance::a_room_arrives_in_order_with_increasing_positions(&bus, &mut sub).await;
        assert!(bus.subscribe().await.is_err(), "one subscriber only");
    }

    fn with_history() -> MemoryBus {
        MemoryBus::new(MemoryBusConfig {
            history: conformance::history_config(),
            ..MemoryBusConfig::default()
        })
    }

    #[tokio::test]
    async fn a_room_history_gives_what_a_client_missed() {
        let bus = with_history();
        let mut sub = bus.subscribe().await.expect("subscribe");
        conformance::a_room_history_gives_what_a_client_missed(&bus, &mut sub).await;
    }

    #[tokio::test]
    async fn a_direct_stream_keeps_what_a_user_was_sent() {
        let bus = with_history();
        let mut sub = bus.subscribe().await.expect("subscribe");
        conformance::a_direct_stream_keeps_what_a_user_was_sent(&bus, &mut sub).await;
    }

    #[tokio::test]
    async fn a_room_history_says_when_it_no_longer_reaches_back() {
        let bus = with_history();
        let mut sub = bus.subscribe().await.expect("subscribe");
        conformance::a_room_history_says_when_it_no_longer_reaches_back(&bus, &mut sub).await;
    }

    #[tokio::test]
    async fn message_ids_deduplicate() {
        let bus = MemoryBus::default();
        let mut sub = bus.subscribe().await.expect("subscribe");
        conformance::message_ids_deduplicate(&bus, &mut sub).await;
    }

    #[tokio::test]
    async fn a_nacked_message_comes_again_at_its_position() {
        let bus = MemoryBus::default();
        let mut sub = bus.subscribe().await.expect("subscribe");
        conformance::a_nacked_message_comes_again_at_its_position(&bus, &mut sub).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishers_get_sequences_in_queue_order() {
        let bus = MemoryBus::default();
        let mut sub = bus.subscribe().await.expect("subscribe");
        let publishers: Vec<_> = (0..4)
            .map(|_| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    for _ in 0..500 {
                        bus.publish(room_msg("live://1", b"x"), None)
                            .await
                            .expect("publish");
                    }
                })
            })
            .collect();
        let mut last = 0;
        for _ in 0..2000 {
            let delivery = sub.next().await.expect("delivery");
            assert!(delivery.position.seq > last, "sequence went backwards");
            last = delivery.position.seq;
            delivery.ack().await;
        }
        for publisher in publishers {
            publisher.await.expect("publisher");
        }
    }

    #[tokio::test]
    async fn nack_redelivers_until_the_limit() {
        let bus = MemoryBus::new(MemoryBusConfig {
            max_deliveries: 2,
            ..Default::default()
        });
        let mut sub = bus.subscribe().await.expect("subscribe");
        bus.publish(room_msg("live://1", b"x"), None)
            .await
            .expect("publish");
        let first = sub.next().await.expect("first");
        first.nack(Duration::from_millis(1)).await;
        let second = sub.next().await.expect("redelivered");
        assert_eq!(second.attempt, 2);
        second.nack(Duration::ZERO).await;
        assert_eq!(bus.dropped(), 1);
    }

    #[tokio::test]
    async fn dropping_an_unsettled_delivery_redelivers_it() {
        let bus = MemoryBus::default();
        let mut sub = bus.subscribe().await.expect("subscribe");
        bus.publish(room_msg("live://1", b"x"), None)
            .await
            .expect("publish");
        drop(sub.next().await.expect("first"));
        assert_eq!(sub.next().await.expect("again").attempt, 2);
    }

    #[test]
    fn dedupe_window_forgets_old_ids() {
        let mut dedupe = Dedupe::default();
        assert!(dedupe.insert("a".into(), Duration::ZERO));
        assert!(dedupe.insert("a".into(), Duration::ZERO), "window of zero");
        assert!(!dedupe.insert("a".into(), Duration::from_secs(60)));
    }

    #[test]
    fn ordering_keys() {
        assert_eq!(ordering_key(&room_msg("live://1", b"")), "room.live://1");
        let push = PushMsg {
            r#type: PushType::Push as i32,
            server: "comet-1".into(),
            ..Default::default()
        };
        assert_eq!(ordering_key(&push), "push.comet-1");
    }
}
