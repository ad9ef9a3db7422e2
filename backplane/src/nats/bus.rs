//! The push stream on NATS JetStream.
//!
//! Logic publishes each goim `PushMsg` to `<subject_prefix>.<partition>`,
//! where the partition is a stable hash of its ordering key (room, target
//! comet, broadcast op) — so one room's messages share a subject and keep
//! their order. An `Idempotency-Key` becomes the `Nats-Msg-Id` header, which
//! JetStream deduplicates within the stream's duplicate window.
//!
//! Job replicas share the partitions through leases ([`super::lease`]): the
//! owner of a partition consumes it through that partition's durable
//! consumer. A new owner first resets the consumer to its ack floor
//! (deleting and recreating it), so everything the previous owner left
//! unacked is delivered again, in order, before anything newer. Each
//! delivery carries its position (stream epoch, partition, the owner's lease
//! generation, stream sequence) so comets drop what they already delivered
//! and refuse a stale owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use prost::Message as _;
use pushcluster_api::backoff::Backoff;
use pushcluster_api::config::{HistoryConfig, NatsConfig, Retention};
use pushcluster_api::pb::logic::PushMsg;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::lease::{self, LeaseEvent};
use super::{Nats, NatsError, retry, stable_hash, storage_type};
use crate::bus::{
    Acker, Bus, BusError, BusMetrics, Delivery, HistoryEntry, PartitionLag, Position, Published,
    RoomHistory, Since, Subscription, Unrecovered, history_of, history_ordering_key, ordering_key,
};

/// How often consumer lag is read.
const LAG_INTERVAL: Duration = Duration::from_secs(5);
/// Deliveries buffered between the partition consumers and job.
const MERGED_QUEUE: usize = 1024;

struct Inner {
    nats: Nats,
    metrics: BusMetrics,
    member_id: Option<String>,
    stream_ready: AtomicBool,
    /// The stream's creation time in nanoseconds: identifies it in positions.
    epoch: AtomicU64,
    history: HistoryConfig,
    /// The stream keeps messages after they are acked.
    limits_retention: AtomicBool,
    /// The stream takes per-message TTLs (NATS 2.11+).
    ttl_enabled: AtomicBool,
}

/// [`Bus`] on JetStream. Cheap to clone.
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

/// The partition of a message (stable across processes and versions).
pub fn partition_of(msg: &PushMsg, partitions: u32) -> u32 {
    partition_of_key(&ordering_key(msg), partitions)
}

fn partition_of_key(key: &str, partitions: u32) -> u32 {
    (stable_hash(&[key.as_bytes()]) % u64::from(partitions.max(1))) as u32
}

impl NatsBus {
    /// A bus for publishing (logic). The stream is created or updated in the
    /// background until it works; `stop` ends those attempts.
    pub fn publisher(
        nats: Nats,
        metrics: BusMetrics,
        history: HistoryConfig,
        stop: CancellationToken,
    ) -> NatsBus {
        Self::build(nats, metrics, history, None, stop)
    }

    /// A bus for consuming (job) as member `member_id` of the job group.
    pub fn consumer(
        nats: Nats,
        metrics: BusMetrics,
        history: HistoryConfig,
        member_id: String,
        stop: CancellationToken,
    ) -> NatsBus {
        Self::build(nats, metrics, history, Some(member_id), stop)
    }

    fn build(
        nats: Nats,
        metrics: BusMetrics,
        history: HistoryConfig,
        member_id: Option<String>,
        stop: CancellationToken,
    ) -> NatsBus {
        let bus = NatsBus {
            inner: Arc::new(Inner {
                nats,
                metrics,
                member_id,
                stream_ready: AtomicBool::new(false),
                epoch: AtomicU64::new(0),
                history,
                limits_retention: AtomicBool::new(false),
                ttl_enabled: AtomicBool::new(false),
            }),
        };
        let ensure = bus.clone();
        tokio::spawn(async move {
            let done = retry("create or update the push stream", &stop, || {
                ensure.ensure_stream()
            })
            .await;
            if done.is_some() {
                ensure.inner.stream_ready.store(true, Ordering::SeqCst);
            }
        });
        bus
    }

    fn config(&self) -> &NatsConfig {
        self.inner.nats.config()
    }

    /// Connected to NATS and the stream exists.
    pub fn is_ready(&self) -> bool {
        self.inner.stream_ready.load(Ordering::SeqCst) && self.inner.nats.is_connected()
    }

    /// The push stream.
    pub(crate) async fn stream(
        &self,
    ) -> Result<jetstream::stream::Stream, jetstream::context::GetStreamError> {
        self.inner
            .nats
            .jetstream()
            .get_stream(&self.config().stream.name)
            .await
    }

    pub fn subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.config().stream.subject_prefix)
    }

    /// A room's (or direct stream's) messages have a subject of their own
    /// under their partition's, so its history can be read by subject:
    /// `<prefix>.<partition>.r.<room id or stream name in unpadded
    /// base64url>`.
    pub fn room_subject(&self, room: &str) -> String {
        use base64::Engine as _;
        let partition = partition_of_key(&history_ordering_key(room), self.config().partitions);
        format!(
            "{}.r.{}",
            self.subject(partition),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(room)
        )
    }

    fn subject_of(&self, msg: &PushMsg) -> String {
        if let Some(name) = history_of(msg) {
            self.room_subject(name)
        } else {
            self.subject(partition_of(msg, self.config().partitions))
        }
    }

    /// Whether resumes can be served (limits retention, history on).
    pub fn history_ready(&self) -> bool {
        self.inner.history.enabled && self.retention() == Retention::Limits
    }

    fn stream_config(&self) -> stream::Config {
        let config = &self.config().stream;
        stream::Config {
            name: config.name.clone(),
            subjects: vec![format!("{}.>", config.subject_prefix)],
            allow_message_ttl: true,
            retention: match config.retention {
                Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
                Retention::Limits => stream::RetentionPolicy::Limits,
            },
            storage: storage_type(config.storage),
            num_replicas: config.replicas.max(1) as usize,
            max_age: config.max_age,
            max_bytes: config.max_bytes,
            duplicate_window: config.duplicate_window,
            ..Default::default()
        }
    }

    async fn ensure_stream(&self) -> Result<(), NatsError> {
        let jetstream = self.inner.nats.jetstream();
        let mut config = self.stream_config();
        // JetStream cannot change a stream's retention: keep the one it has.
        match jetstream.get_stream(&config.name).await {
            Ok(existing) => {
                let retention = existing.cached_info().config.retention;
                if retention != config.retention {
                    tracing::warn!(
                        stream = %config.name,
                        existing = ?retention,
                        configured = ?config.retention,
                        "the push stream keeps its retention; room history needs limits \
                         retention (recreate the stream while it is empty to change it)"
                    );
                    config.retention = retention;
                }
            }
            Err(error)
                if matches!(error.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
            Err(error) => return Err(NatsError::request(error)),
        }
        let info = jetstream
            .create_or_update_stream(config)
            .await
            .map_err(NatsError::request)?;
        let epoch = info.created.unix_timestamp_nanos().max(1) as u64;
        self.inner.epoch.store(epoch, Ordering::SeqCst);
        self.inner.limits_retention.store(
            info.config.retention == stream::RetentionPolicy::Limits,
            Ordering::SeqCst,
        );
        self.inner
            .ttl_enabled
            .store(info.config.allow_message_ttl, Ordering::SeqCst);
        Ok(())
    }

    /// The retention the stream really has (an existing stream keeps its own).
    fn retention(&self) -> Retention {
        if self.inner.limits_retention.load(Ordering::SeqCst) {
            Retention::Limits
        } else {
            Retention::Workqueue
        }
    }

    /// How long the stream is sure to keep a message of `room`.
    fn kept_for(&self, room: &str) -> Duration {
        if self.inner.ttl_enabled.load(Ordering::SeqCst) {
            self.inner.history.ttl_for_room(room)
        } else {
            self.config().stream.max_age
        }
    }

    /// Reads `room`'s messages from `since` on (see [`Bus::room_history`]).
    async fn read_history(
        &self,
        stream: &jetstream::stream::Stream,
        room: &str,
        since: Since,
        max_bytes: usize,
    ) -> Result<Result<(Vec<HistoryEntry>, u64), Unrecovered>, NatsError> {
        let limits = self.inner.history.for_room(room);
        // Start at the client's own offset: when that message is still
        // there, everything of the room after it is too.
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: self.room_subject(room),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: since.offset.max(1),
                },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(NatsError::request)?;
        let name = consumer.cached_info().name.clone();
        let pending = consumer.cached_info().num_pending;
        let outcome = self
            .fetch_history(stream, &consumer, pending, room, since, max_bytes, limits)
            .await;
        let stream = stream.clone();
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_history(
        &self,
        stream: &jetstream::stream::Stream,
        consumer: &jetstream::consumer::Consumer<consumer::pull::Config>,
        pending: u64,
        room: &str,
        since: Since,
        max_bytes: usize,
        limits: pushcluster_api::config::RoomHistory,
    ) -> Result<Result<(Vec<HistoryEntry>, u64), Unrecovered>, NatsError> {
        if pending > limits.max_messages as u64 + 1 {
            return Ok(Err(Unrecovered::TooMany));
        }
        let mut entries = Vec::with_capacity(pending as usize);
        let mut position_time = None;
        let mut bytes = 0usize;
        if pending > 0 {
            let mut batch = consumer
                .batch()
                .max_messages(pending as usize)
                .expires(self.inner.history.replay.timeout)
                .messages()
                .await
                .map_err(NatsError::request)?;
            let mut fetched = 0u64;
            while let Some(message) = batch.next().await {
                let message = message.map_err(NatsError::request)?;
                fetched += 1;
                let info = message.info().map_err(NatsError::request)?;
                let offset = info.stream_sequence;
                let published_at = SystemTime::UNIX_EPOCH
                    + Duration::from_nanos(info.published.unix_timestamp_nanos().max(0) as u64);
                if offset == since.offset {
                    position_time = Some(published_at);
                    if fetched >= pending {
                        break;
                    }
                    continue;
                }
                let Ok(msg) = PushMsg::decode(message.payload.clone()) else {
                    continue;
                };
                bytes += msg.msg.len();
                if bytes > max_bytes {
                    return Ok(Err(Unrecovered::TooLarge));
                }
                entries.push(HistoryEntry {
                    offset,
                    published_at,
                    msg,
                });
                if fetched >= pending {
                    break;
                }
            }
        }
        if entries.len() > limits.max_messages {
            return Ok(Err(Unrecovered::TooMany));
        }
        // The client's last message was of another room (or the position it
        // joined at): when it was stored tells whether the room's messages
        // since are all still kept.
        // Offset 0 is the stream's start: the epoch is its creation time.
        if since.offset == 0 {
            position_time = Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(since.epoch));
        }
        if position_time.is_none() {
            match stream.get_raw_message(since.offset).await {
                Ok(message) => {
                    position_time = Some(
                        SystemTime::UNIX_EPOCH
                            + Duration::from_nanos(
                                message.time.unix_timestamp_nanos().max(0) as u64
                            ),
                    );
                }
                Err(error)
                    if matches!(error.kind(), stream::RawMessageErrorKind::NoMessageFound) => {}
                Err(error) => return Err(NatsError::request(error)),
            }
        }
        let now = SystemTime::now();
        let age = |at: SystemTime| now.duration_since(at).unwrap_or_default();
        let Some(position_time) = position_time else {
            return Ok(Err(Unrecovered::Expired));
        };
        if age(position_time) >= self.kept_for(room)
            || entries
                .first()
                .is_some_and(|e| age(e.published_at) >= limits.max_age)
        {
            return Ok(Err(Unrecovered::Expired));
        }
        let offset = entries.last().map_or(since.offset, |e| e.offset);
        Ok(Ok((entries, offset)))
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, msg: PushMsg, msg_id: Option<String>) -> Result<Published, BusError> {
        // While disconnected the client would buffer the message and send it
        // after reconnecting, although the caller was told it failed.
        if !self.inner.nats.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        let subject = self.subject_of(&msg);
        let payload = msg.encode_to_vec();
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        }
        if self.inner.ttl_enabled.load(Ordering::SeqCst) {
            let ttl = match history_of(&msg) {
                Some(name) => self.inner.history.ttl_for_room(name),
                None => self.inner.history.min_ttl,
            };
            headers.insert("Nats-TTL", format!("{}s", ttl.as_secs().max(1)).as_str());
        }
        let ack = self
            .inner
            .nats
            .jetstream()
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        if !ack.duplicate {
            self.inner.metrics.published.inc();
        }
        Ok(Published {
            duplicate: ack.duplicate,
        })
    }

    fn partition_of(&self, msg: &PushMsg) -> u32 {
        partition_of(msg, self.config().partitions)
    }

    async fn lag(&self) -> Result<Vec<Option<PartitionLag>>, BusError> {
        if !self.inner.nats.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        let config = self.config();
        let stream = self
            .stream()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        // One listing (paged by the server) instead of a request per
        // partition: logic reads this every few hundred milliseconds.
        let mut lag = vec![None; config.partitions as usize];
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|e| BusError::Unavailable(e.to_string()))?;
            let partition = info
                .name
                .strip_prefix(&format!("{}-", config.consumer_prefix))
                .and_then(|p| p.parse::<usize>().ok());
            if let Some(slot) = partition.and_then(|p| lag.get_mut(p)) {
                *slot = Some(PartitionLag {
                    pending: info.num_pending + info.num_ack_pending as u64,
                    settled: info.ack_floor.consumer_sequence,
                });
            }
        }
        Ok(lag)
    }

    async fn room_history(
        &self,
        room: &str,
        since: Option<Since>,
        max_bytes: usize,
    ) -> Result<RoomHistory, BusError> {
        if !self.inner.nats.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        // Read after the client joined the room, so every message above
        // the head it is given reaches it live.
        let stream = self
            .stream()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let head = stream.cached_info().state.last_sequence;
        let epoch = self.inner.epoch.load(Ordering::SeqCst);
        let since = match RoomHistory::check(epoch, head, since, self.history_ready()) {
            Ok(since) => since,
            Err(answer) => return Ok(answer),
        };
        match self.read_history(&stream, room, since, max_bytes).await {
            Ok(Ok((messages, offset))) => Ok(RoomHistory {
                epoch,
                messages,
                gap: None,
                offset,
            }),
            Ok(Err(gap)) => Ok(RoomHistory::unrecovered(epoch, head, gap)),
            Err(error) => Err(BusError::Unavailable(error.to_string())),
        }
    }

    async fn subscribe(&self) -> Result<Subscription, BusError> {
        let member = self
            .inner
            .member_id
            .clone()
            .ok_or_else(|| BusError::Other("this bus was built for publishing".into()))?;
        let (tx, rx) = mpsc::channel(MERGED_QUEUE);
        let stop = CancellationToken::new();
        let task = tokio::spawn(self.clone().consume(member, tx, stop.clone()));
        Ok(Subscription::with_close(rx, stop, task))
    }
}

/// One partition being consumed.
struct Worker {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl NatsBus {
    /// Follows the leases: consumes the partitions this member owns.
    async fn consume(self, member: String, tx: mpsc::Sender<Delivery>, stop: CancellationToken) {
        let config = self.config().clone();
        // Positions need the stream's epoch.
        if retry("read the push stream", &stop, || self.ensure_stream())
            .await
            .is_none()
        {
            return;
        }
        self.inner.stream_ready.store(true, Ordering::SeqCst);
        let (mut events, leases) = lease::spawn(
            self.inner.nats.clone(),
            member,
            config.partitions,
            config.lease_ttl,
            stop.clone(),
        );
        let lag: Arc<Mutex<HashMap<u32, u64>>> = Arc::default();
        let mut workers: HashMap<u32, Worker> = HashMap::new();
        let mut lag_ticks = tokio::time::interval(LAG_INTERVAL);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(LeaseEvent::Acquired { partition, generation }) => {
                        if let Some(old) = workers.remove(&partition) {
                            old.stop.cancel();
                        }
                        let worker_stop = stop.child_token();
                        let task = tokio::spawn(self.clone().run_partition(
                            partition,
                            generation,
                            tx.clone(),
                            worker_stop.clone(),
                        ));
                        workers.insert(partition, Worker { stop: worker_stop, task });
                    }
                    Some(LeaseEvent::Lost { partition }) => {
                        if let Some(worker) = workers.remove(&partition) {
                            worker.stop.cancel();
                        }
                        if let Ok(mut lag) = lag.lock() {
                            lag.remove(&partition);
                        }
                    }
                    // The lease manager ended: stop is cancelled.
                    None => break,
                },
                _ = lag_ticks.tick() => {
                    self.report_lag(&workers, &lag).await;
                }
            }
        }
        for (_, worker) in workers {
            worker.stop.cancel();
            let _ = worker.task.await;
        }
        let _ = leases.await;
        self.inner.metrics.pending.set(0);
    }

    /// Messages not yet acked in the partitions this member owns.
    async fn report_lag(&self, workers: &HashMap<u32, Worker>, lag: &Mutex<HashMap<u32, u64>>) {
        let config = self.config();
        let Ok(stream) = self.stream().await else {
            return;
        };
        for partition in workers.keys() {
            let name = consumer_name(config, *partition);
            if let Ok(info) = stream.consumer_info(&name).await
                && let Ok(mut lag) = lag.lock()
            {
                lag.insert(*partition, info.num_pending + info.num_ack_pending as u64);
            }
        }
        if let Ok(lag) = lag.lock() {
            self.inner
                .metrics
                .pending
                .set(i64::try_from(lag.values().sum::<u64>()).unwrap_or(i64::MAX));
        }
    }

    async fn run_partition(
        self,
        partition: u32,
        generation: u64,
        tx: mpsc::Sender<Delivery>,
        stop: CancellationToken,
    ) {
        tracing::info!(partition, generation, "consuming partition");
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        while !stop.is_cancelled() {
            match self
                .consume_partition(partition, generation, &tx, &stop)
                .await
            {
                Ok(()) => break,
                Err(error) => {
                    self.inner.metrics.consumer_restarts.inc();
                    tracing::warn!(partition, %error, "partition consumer failed; restarting");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        tracing::info!(partition, "stopped consuming partition");
    }

    /// Resets the partition's consumer to its ack floor and forwards its
    /// messages until `stop` (Ok) or an error.
    async fn consume_partition(
        &self,
        partition: u32,
        generation: u64,
        tx: &mpsc::Sender<Delivery>,
        stop: &CancellationToken,
    ) -> Result<(), NatsError> {
        let config = self.config();
        let stream = self.stream().await.map_err(NatsError::request)?;
        let name = consumer_name(config, partition);
        let start = match stream.consumer_info(&name).await {
            Ok(info) => Some(info.ack_floor.stream_sequence + 1),
            Err(error)
                if error.kind()
                    == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound =>
            {
                None
            }
            Err(error) => return Err(NatsError::request(error)),
        };
        if start.is_some() {
            match stream.delete_consumer(&name).await {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(NatsError::request(error)),
            }
        }
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                // The partition's own subject (key pushes, broadcasts, and
                // rooms published before room subjects) and its rooms'.
                filter_subjects: vec![
                    self.subject(partition),
                    format!("{}.>", self.subject(partition)),
                ],
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_deliver: i64::from(config.max_deliver),
                max_ack_pending: i64::from(config.max_ack_pending),
                deliver_policy: match (start, self.retention()) {
                    (Some(start_sequence), Retention::Limits) => {
                        consumer::DeliverPolicy::ByStartSequence { start_sequence }
                    }
                    // A work queue keeps only what is not acked yet, so all
                    // of it is the ack floor on (and JetStream refuses any
                    // other start on a work queue).
                    _ => consumer::DeliverPolicy::All,
                },
                ..Default::default()
            })
            .await
            .map_err(NatsError::request)?;
        let mut messages = consumer.messages().await.map_err(NatsError::request)?;
        let epoch = self.inner.epoch.load(Ordering::SeqCst);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(NatsError::request(error)),
                None => return Err(NatsError::Request("message stream ended".into())),
            };
            let Some(delivery) = self.delivery(message, epoch, partition, generation).await else {
                continue;
            };
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                sent = tx.send(delivery) => if sent.is_err() {
                    // Nobody consumes any more.
                    return Ok(());
                }
            }
        }
    }

    async fn delivery(
        &self,
        message: jetstream::Message,
        epoch: u64,
        partition: u32,
        generation: u64,
    ) -> Option<Delivery> {
        let (seq, attempt, published_at) = match message.info() {
            Ok(info) => (
                info.stream_sequence,
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
                SystemTime::UNIX_EPOCH
                    + Duration::from_nanos(info.published.unix_timestamp_nanos().max(0) as u64),
            ),
            Err(error) => {
                tracing::warn!(%error, "JetStream message without delivery info");
                return None;
            }
        };
        let (message, acker) = message.split();
        let msg = match PushMsg::decode(message.payload) {
            Ok(msg) => msg,
            Err(error) => {
                tracing::warn!(seq, %error, "undecodable PushMsg dropped");
                self.inner
                    .metrics
                    .dropped
                    .with_label_values(&["undecodable"])
                    .inc();
                let _ = acker.ack_with(jetstream::AckKind::Term).await;
                return None;
            }
        };
        if attempt > 1 {
            self.inner.metrics.redelivered.inc();
        }
        let position = Position {
            epoch,
            partition,
            generation,
            seq,
        };
        let acker = NatsAcker {
            acker,
            attempt,
            max_deliver: self.config().max_deliver,
            metrics: self.inner.metrics.clone(),
        };
        Some(Delivery::new(
            msg,
            published_at,
            attempt,
            position,
            Box::new(acker),
        ))
    }
}

fn consumer_name(config: &NatsConfig, partition: u32) -> String {
    format!("{}-{partition}", config.consumer_prefix)
}

fn is_not_found(error: &stream::ConsumerError) -> bool {
    matches!(
        error.kind(),
        stream::ConsumerErrorKind::JetStream(js) if js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
    )
}

struct NatsAcker {
    acker: jetstream::message::Acker,
    attempt: u32,
    max_deliver: u32,
    metrics: BusMetrics,
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) {
        if let Err(error) = self.acker.ack().await {
            // The message comes again; comets drop it as a duplicate.
            tracing::debug!(%error, "ack failed");
        }
    }

    async fn nack(self: Box<Self>, delay: Duration) {
        let kind = if self.attempt >= self.max_deliver {
            self.metrics
                .dropped
                .with_label_values(&["max_deliveries"])
                .inc();
            tracing::warn!(
                attempts = self.attempt,
                "message given up after its last delivery attempt"
            );
            jetstream::AckKind::Term
        } else {
            jetstream::AckKind::Nak(Some(delay))
        };
        if let Err(error) = self.acker.ack_with(kind).await {
            tracing::debug!(%error, "nack failed");
        }
    }
}
