//! job: takes `PushMsg`s from the bus and delivers them to comets.
//!
//! Runtime shape: one consumer loop reads the bus in order and hands each
//! message to a *lane*, one per ordering key — a room, a target comet, or
//! broadcasts. A lane is a bounded queue and a task that delivers its
//! messages one batch at a time, so each room (and each comet's key pushes)
//! keeps publish order while different rooms proceed in parallel. A full
//! lane makes the consumer wait (back-pressure to the bus), never drops.
//!
//! Direct pushes (`history.direct`: a PushMsg naming a user's or key's
//! stream instead of a comet) get a lane per stream; job looks up the
//! stream's connections in the registry when it delivers, not logic when
//! it publishes — so a client that connects meanwhile either gets the
//! message live or finds it in the history it resumes from.
//!
//! Room lanes batch: whatever is queued for the room, up to `job.room.batch`
//! messages, goes out as one op-9 frame; a lone message goes out at once.
//! A message is acked only after every target comet accepted it; calls are
//! retried with backoff for `job.delivery.retry_for`, then the message is
//! returned to the bus.
//!
//! Invariant: job knows the bus, the registry and discovery only through
//! the backplane traits, and comets only through [`CometLink`].
#![forbid(unsafe_code)]

pub mod grpc;
pub mod metrics;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use pushcluster_api::backoff::Backoff;
use pushcluster_api::config::JobConfig;
use pushcluster_api::link::{CometLink, LinkError};
use pushcluster_api::log_budget::LogBudget;
use pushcluster_api::pb::comet::{BroadcastReq, BroadcastRoomReq, PushMsgReq};
use pushcluster_api::pb::logic::push_msg::Type as PushType;
use pushcluster_api::protocol::RawBatch;
use pushcluster_api::streams::DirectStream;
use pushcluster_backplane::bus::{Bus, BusError, Delivery};
use pushcluster_backplane::discovery::{CometEndpoint, Discovery};
use pushcluster_backplane::registry::{Registry, RegistryError};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::JobMetrics;

/// How long the set of reporting comets is reused (comets report every
/// few seconds; their reports expire after `logic.online_expire`).
const REPORTS_CACHE: Duration = Duration::from_secs(1);

/// Most key pushes a push lane takes from its queue at once (each is still
/// its own call, in order).
const PUSH_BATCH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot consume the bus: {0}")]
    Bus(#[from] BusError),
}

/// Opens links to comets found by discovery.
pub trait CometConnector: Send + Sync + 'static {
    fn connect(&self, endpoint: &CometEndpoint) -> Result<Arc<dyn CometLink>, LinkError>;
}

/// Links to comets in this process (standalone mode), by comet id.
#[derive(Default)]
pub struct InProcessConnector {
    comets: HashMap<String, Arc<dyn CometLink>>,
}

impl InProcessConnector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, id: impl Into<String>, comet: Arc<dyn CometLink>) -> Self {
        self.comets.insert(id.into(), comet);
        self
    }
}

impl CometConnector for InProcessConnector {
    fn connect(&self, endpoint: &CometEndpoint) -> Result<Arc<dyn CometLink>, LinkError> {
        self.comets.get(&endpoint.id).cloned().ok_or_else(|| {
            LinkError::Unavailable(format!("comet {} is not in this process", endpoint.id))
        })
    }
}

fn kind_label(kind: PushType) -> &'static str {
    match kind {
        PushType::Push => "push",
        PushType::Room => "room",
        PushType::Broadcast => "broadcast",
    }
}

/// The ordering key of a lane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LaneKey {
    Push(String),
    Direct(String),
    Room(String),
    Broadcast,
}

impl LaneKey {
    fn max_batch(&self, config: &JobConfig) -> usize {
        match self {
            LaneKey::Push(_) | LaneKey::Direct(_) => PUSH_BATCH,
            LaneKey::Room(_) => config.room.batch,
            LaneKey::Broadcast => 1,
        }
    }
}

/// How one call to one comet ended.
enum CallOutcome {
    Ok,
    /// The comet left discovery; its clients reconnect elsewhere.
    CometGone,
    /// The comet refused the request as invalid; retrying cannot help.
    Rejected(LinkError),
    /// Failed for `job.delivery.retry_for`, or the comet is marked down
    /// (it kept failing; its clients are reconnecting elsewhere).
    Unavailable,
    /// A newer owner of the stream partition has delivered (fencing): this
    /// job must leave the message to it.
    Stale,
}

/// Drops are rare and each one is a message someone did not get: log them,
/// a few lines a second at most.
static DROP_LOG: LogBudget = LogBudget::new(5);

fn log_drop(kind: &str, reason: &str, count: usize) {
    if let Some(suppressed) = DROP_LOG.allow() {
        tracing::warn!(kind, reason, count, suppressed, "messages dropped");
    }
}

/// The later of two stream positions (epoch, seq): a new epoch (a new
/// stream) replaces the old one; within one, the higher sequence wins, so a
/// redelivered older message never moves a lane's position back.
fn newest(known: Option<(u64, u64)>, next: Option<(u64, u64)>) -> Option<(u64, u64)> {
    match (known, next) {
        (Some((epoch, seq)), Some((next_epoch, next_seq))) if epoch == next_epoch => {
            Some((epoch, seq.max(next_seq)))
        }
        (known, None) => known,
        (_, next) => next,
    }
}

/// The stream position fields of goim.comet requests for these deliveries.
struct StreamFields {
    epoch: u64,
    partition: u32,
    generation: u64,
    seqs: Vec<u64>,
    /// The earliest publish time, in µs since the epoch (0 if unknown).
    publish_unix_micros: i64,
}

impl StreamFields {
    fn of(deliveries: &[Delivery]) -> StreamFields {
        let first = deliveries.first().map(|d| d.position).unwrap_or_default();
        StreamFields {
            epoch: first.epoch,
            partition: first.partition,
            generation: deliveries
                .iter()
                .map(|d| d.position.generation)
                .max()
                .unwrap_or(0),
            seqs: deliveries.iter().map(|d| d.position.seq).collect(),
            publish_unix_micros: deliveries
                .iter()
                .filter_map(|d| d.published_at.duration_since(UNIX_EPOCH).ok())
                .min()
                .and_then(|since| i64::try_from(since.as_micros()).ok())
                .unwrap_or(0),
        }
    }
}

/// Consecutive failed calls after which a comet is marked down: calls to it
/// then fail at once, so one dead comet does not hold up every room.
const DOWN_AFTER: u32 = 3;
const FIRST_DOWN_PERIOD: Duration = Duration::from_secs(1);
const MAX_DOWN_PERIOD: Duration = Duration::from_secs(30);

/// A comet's recent call history (a circuit breaker).
struct Health {
    failures: u32,
    down_until: Option<Instant>,
    /// How long it is skipped each time it is marked down again.
    down_periods: Backoff,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            failures: 0,
            down_until: None,
            down_periods: Backoff::new(FIRST_DOWN_PERIOD, MAX_DOWN_PERIOD),
        }
    }
}

struct Shared {
    config: JobConfig,
    health: Mutex<HashMap<String, Health>>,
    comets: RwLock<BTreeMap<String, Arc<dyn CometLink>>>,
    /// The address each linked comet was linked at.
    addrs: Mutex<HashMap<String, String>>,
    /// Where direct streams' connections are (sessions).
    registry: OnceLock<Arc<dyn Registry>>,
    /// Comets with a fresh report, and when that was read.
    reporting: Mutex<Option<(Instant, Arc<HashSet<String>>)>>,
    metrics: JobMetrics,
}

impl Shared {
    fn comet(&self, id: &str) -> Option<Arc<dyn CometLink>> {
        self.comets.read().ok()?.get(id).cloned()
    }

    fn all_comets(&self) -> Vec<(String, Arc<dyn CometLink>)> {
        self.comets
            .read()
            .map(|c| c.iter().map(|(id, l)| (id.clone(), l.clone())).collect())
            .unwrap_or_default()
    }

    /// Whether calls to the comet should fail at once (it is marked down and
    /// its probe time has not come).
    fn is_down(&self, id: &str) -> bool {
        self.health
            .lock()
            .ok()
            .and_then(|h| h.get(id).and_then(|h| h.down_until))
            .is_some_and(|until| Instant::now() < until)
    }

    fn record_success(&self, id: &str) {
        if let Ok(mut health) = self.health.lock()
            && let Some(entry) = health.remove(id)
            && entry.down_until.is_some()
        {
            tracing::info!(comet = id, "comet answers again");
            self.update_down_gauge(&health);
        }
    }

    /// Counts a failure; returns true when the comet is (now) down.
    fn record_failure(&self, id: &str) -> bool {
        let Ok(mut health) = self.health.lock() else {
            return false;
        };
        let entry = health.entry(id.to_string()).or_default();
        entry.failures += 1;
        if entry.failures < DOWN_AFTER {
            return false;
        }
        let down_for = entry.down_periods.next_delay();
        entry.down_until = Some(Instant::now() + down_for);
        tracing::warn!(
            comet = id,
            ?down_for,
            "comet keeps failing; skipping it for a while"
        );
        self.update_down_gauge(&health);
        true
    }

    fn update_down_gauge(&self, health: &HashMap<String, Health>) {
        let down = health.values().filter(|h| h.down_until.is_some()).count();
        self.metrics.comets_down.set(down as i64);
    }

    /// Calls one comet, retrying failures with exponential backoff until
    /// `job.delivery.retry_for` has passed or the comet is marked down.
    async fn call_comet<F, Fut, T>(&self, id: &str, kind: &'static str, call: F) -> CallOutcome
    where
        F: Fn(Arc<dyn CometLink>) -> Fut,
        Fut: Future<Output = Result<T, LinkError>>,
    {
        let delivery = &self.config.delivery;
        let give_up_at = Instant::now() + delivery.retry_for;
        let mut backoff = Backoff::new(delivery.backoff_base, delivery.backoff_max);
        loop {
            let Some(link) = self.comet(id) else {
                return CallOutcome::CometGone;
            };
            if self.is_down(id) {
                return CallOutcome::Unavailable;
            }
            match timeout(delivery.timeout, call(link)).await {
                Ok(Ok(_)) => {
                    self.metrics
                        .comet_calls
                        .with_label_values(&[kind, "ok"])
                        .inc();
                    self.record_success(id);
                    return CallOutcome::Ok;
                }
                Ok(Err(LinkError::Stale(reason))) => {
                    self.metrics
                        .comet_calls
                        .with_label_values(&[kind, "error"])
                        .inc();
                    tracing::info!(comet = id, kind, %reason, "partition moved to another job");
                    return CallOutcome::Stale;
                }
                Ok(Err(error)) if !error.is_retryable() => {
                    self.metrics
                        .comet_calls
                        .with_label_values(&[kind, "error"])
                        .inc();
                    return CallOutcome::Rejected(error);
                }
                Ok(Err(error)) => {
                    self.metrics
                        .comet_calls
                        .with_label_values(&[kind, "error"])
                        .inc();
                    tracing::debug!(comet = id, kind, %error, "comet call failed");
                }
                Err(_) => {
                    self.metrics
                        .comet_calls
                        .with_label_values(&[kind, "timeout"])
                        .inc();
                    tracing::debug!(comet = id, kind, "comet call timed out");
                }
            }
            if self.record_failure(id) {
                return CallOutcome::Unavailable;
            }
            let delay = backoff.next_delay();
            if Instant::now() + delay > give_up_at {
                tracing::warn!(comet = id, kind, "giving up on a comet after retries");
                return CallOutcome::Unavailable;
            }
            self.metrics.retries.with_label_values(&[kind]).inc();
            tokio::time::sleep(delay).await;
        }
    }

    /// Acks or returns the deliveries depending on how the calls went;
    /// true when they were acked (some comet took them).
    async fn settle(
        &self,
        kind: &'static str,
        deliveries: Vec<Delivery>,
        outcomes: &[CallOutcome],
    ) -> bool {
        if outcomes.iter().any(|o| matches!(o, CallOutcome::Stale)) {
            // Neither ack nor nack: the partition's new owner redelivers them.
            self.metrics
                .failures
                .with_label_values(&[kind, "stale_owner"])
                .inc_by(deliveries.len() as u64);
            drop(deliveries);
            return false;
        }
        for outcome in outcomes {
            if let CallOutcome::Rejected(error) = outcome {
                self.metrics
                    .failures
                    .with_label_values(&[kind, "rejected"])
                    .inc();
                tracing::warn!(kind, %error, "a comet rejected a push");
            }
        }
        let unavailable = outcomes
            .iter()
            .filter(|o| matches!(o, CallOutcome::Unavailable))
            .count();
        if unavailable > 0 && unavailable == outcomes.len() {
            // No target took it: maybe this job cannot reach the comets. Give
            // it back to the bus (up to its delivery limit).
            self.metrics
                .failures
                .with_label_values(&[kind, "gave_up"])
                .inc_by(deliveries.len() as u64);
            for delivery in deliveries {
                delivery.nack(self.config.delivery.backoff_max).await;
            }
            return false;
        }
        if unavailable > 0 {
            // Others took it; the unreachable comets' clients miss it.
            self.metrics
                .dropped
                .with_label_values(&[kind, "comet_unavailable"])
                .inc_by((deliveries.len() * unavailable) as u64);
            log_drop(kind, "comet_unavailable", deliveries.len() * unavailable);
        }
        let now = SystemTime::now();
        for delivery in deliveries {
            if let Ok(latency) = now.duration_since(delivery.published_at) {
                self.metrics
                    .latency
                    .with_label_values(&[kind])
                    .observe(latency.as_secs_f64());
            }
            self.metrics.delivered.with_label_values(&[kind]).inc();
            delivery.ack().await;
        }
        true
    }

    async fn drop_all(&self, kind: &'static str, reason: &str, deliveries: Vec<Delivery>) {
        self.metrics
            .dropped
            .with_label_values(&[kind, reason])
            .inc_by(deliveries.len() as u64);
        if reason == "offline" {
            // Normal: the stream's history keeps it for when the user is back.
        } else if reason == "unknown_comet" {
            // The key's comet left: its client is gone too.
            tracing::debug!(
                kind,
                count = deliveries.len(),
                "push for a comet that left dropped"
            );
        } else {
            log_drop(kind, reason, deliveries.len());
        }
        for delivery in deliveries {
            delivery.ack().await;
        }
    }

    /// `previous`: the stream position of the lane's last message before
    /// this batch (rooms tell comets, so a comet sees what it missed).
    /// True when a room batch was taken by comets and acked (other kinds:
    /// always true).
    async fn process(
        &self,
        key: &LaneKey,
        batch: Vec<Delivery>,
        previous: Option<(u64, u64)>,
    ) -> bool {
        match key {
            LaneKey::Room(room) => return self.deliver_room(room, batch, previous).await,
            LaneKey::Push(server) => {
                for delivery in batch {
                    self.deliver_push(server, delivery).await;
                }
            }
            LaneKey::Direct(stream) => {
                let mut previous = previous;
                for delivery in batch {
                    let at = (delivery.position.epoch, delivery.position.seq);
                    let prev_seq = previous
                        .filter(|(epoch, _)| *epoch == at.0)
                        .map_or(0, |(_, seq)| seq);
                    self.deliver_direct(stream, delivery, prev_seq).await;
                    previous = newest(previous, Some(at));
                }
            }
            LaneKey::Broadcast => {
                for delivery in batch {
                    self.deliver_broadcast(delivery).await;
                }
            }
        }
        true
    }

    /// Leaves out of a room batch the redelivered copies of messages older
    /// than the newest one comets took (`taken`) or than one before them
    /// in the batch. The bus redelivers what is unacked when a partition's
    /// consumer restarts from its ack floor (after an error, or when the
    /// partition comes back to this job) or when the ack wait runs out,
    /// while the originals may still be queued in the lane; sent again
    /// after newer messages, such a copy would reach clients twice or out
    /// of order. Comets have those messages, or fill them from history
    /// because a later batch's `prev_seq` names them. The copies are acked
    /// and counted. A message given back to the bus goes out again when
    /// nothing newer was taken meanwhile.
    async fn drop_old_copies(
        &self,
        batch: Vec<Delivery>,
        taken: Option<(u64, u64)>,
    ) -> Vec<Delivery> {
        let mut newest_kept = taken;
        let mut kept = Vec::with_capacity(batch.len());
        for delivery in batch {
            let at = (delivery.position.epoch, delivery.position.seq);
            let copy =
                at.1 != 0 && newest_kept.is_some_and(|(epoch, seq)| epoch == at.0 && at.1 <= seq);
            if copy {
                self.metrics.duplicates.with_label_values(&["room"]).inc();
                delivery.ack().await;
            } else {
                newest_kept = newest(newest_kept, Some(at));
                kept.push(delivery);
            }
        }
        kept
    }

    /// One op-9 batch of every queued room message to every comet; true
    /// when comets took it (acked).
    async fn deliver_room(
        &self,
        room: &str,
        batch: Vec<Delivery>,
        previous: Option<(u64, u64)>,
    ) -> bool {
        let comets = self.all_comets();
        if comets.is_empty() {
            self.drop_all("room", "no_comets", batch).await;
            return false;
        }
        let size: usize = batch.iter().map(|d| d.msg.msg.len() + 16).sum();
        let mut frames = RawBatch::with_capacity(size);
        for delivery in &batch {
            frames.push(delivery.msg.operation, &delivery.msg.msg);
        }
        self.metrics.room_batch.observe(frames.frames() as f64);
        let proto = frames.finish().into();
        let stream = StreamFields::of(&batch);
        let request = BroadcastRoomReq {
            room_id: room.to_string(),
            proto: Some(proto),
            stream_epoch: stream.epoch,
            partition: stream.partition,
            owner_generation: stream.generation,
            publish_unix_micros: stream.publish_unix_micros,
            prev_seq: previous
                .filter(|(epoch, _)| *epoch == stream.epoch)
                .map_or(0, |(_, seq)| seq),
            seqs: stream.seqs,
        };
        let calls = comets.iter().map(|(id, _)| {
            let request = request.clone();
            self.call_comet(id, "room", move |link| {
                let request = request.clone();
                async move { link.broadcast_room(request).await }
            })
        });
        let outcomes = join_all(calls).await;
        self.settle("room", batch, &outcomes).await
    }

    /// A push to a direct stream: to every live connection of the user (or
    /// key) the registry knows now, each comet its own keys in one call.
    /// Nobody online: acked — the stream's history keeps it for the user.
    /// `prev_seq`: the stream's message before (0: unknown), so a comet
    /// that missed it has its clients with positions catch up.
    async fn deliver_direct(&self, stream: &str, delivery: Delivery, prev_seq: u64) {
        let Some(registry) = self.registry.get() else {
            return self.drop_all("push", "no_registry", vec![delivery]).await;
        };
        let Some(target) = DirectStream::parse(stream) else {
            return self.drop_all("push", "invalid", vec![delivery]).await;
        };
        let lookup = async {
            let found = match &target {
                DirectStream::Mid(mid) => registry.servers_by_mids(&[*mid]).await?,
                DirectStream::Key(key) => {
                    registry.servers_by_keys(std::slice::from_ref(key)).await?
                }
            };
            let reporting = self.reporting_comets(registry.as_ref()).await?;
            Ok::<_, RegistryError>((found, reporting))
        };
        let (found, reporting) = match lookup.await {
            Ok(both) => both,
            Err(error) => {
                // Sessions unreadable: the message waits in the stream.
                self.metrics
                    .failures
                    .with_label_values(&["push", "registry"])
                    .inc();
                tracing::warn!(%error, "cannot read sessions; the push goes back to the bus");
                delivery.nack(self.config.delivery.backoff_max).await;
                return;
            }
        };
        let mut by_server: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, server) in found {
            by_server.entry(server).or_default().push(key);
        }
        by_server.retain(|server, _| self.comet(server).is_some());
        if by_server.is_empty() {
            // Offline, or only on comets that left (their clients reconnect).
            return self.drop_all("push", "offline", vec![delivery]).await;
        }
        let calls = by_server.into_iter().map(|(server, mut keys)| {
            keys.sort();
            let request = PushMsgReq {
                prev_seq,
                ..self.push_request(&delivery, keys, stream)
            };
            let reports = reporting.contains(&server);
            async move {
                let outcome = self
                    .call_comet(&server, "push", |link| {
                        let request = request.clone();
                        async move { link.push_msg(request).await }
                    })
                    .await;
                (reports, outcome)
            }
        });
        let mut gone = 0u64;
        let outcomes: Vec<CallOutcome> = join_all(calls)
            .await
            .into_iter()
            .map(|(reports, outcome)| match outcome {
                // A comet that left since: its clients reconnect and resume.
                CallOutcome::CometGone => CallOutcome::Ok,
                // One that stopped reporting and does not answer is gone
                // too: its sessions are offline, as logic judges them for
                // goim's pushes. (It is still called: reports are read a
                // second late, and a comet just restarted may not be in
                // them yet.)
                CallOutcome::Unavailable if !reports => {
                    gone += 1;
                    CallOutcome::Ok
                }
                other => other,
            })
            .collect();
        if gone > 0 {
            self.metrics
                .dropped
                .with_label_values(&["push", "offline"])
                .inc_by(gone);
        }
        self.settle("push", vec![delivery], &outcomes).await;
    }

    /// The comets whose report is fresh, read at most every
    /// [`REPORTS_CACHE`].
    async fn reporting_comets(
        &self,
        registry: &dyn Registry,
    ) -> Result<Arc<HashSet<String>>, RegistryError> {
        if let Ok(cache) = self.reporting.lock()
            && let Some((at, servers)) = cache.as_ref()
            && at.elapsed() < REPORTS_CACHE
        {
            return Ok(servers.clone());
        }
        let servers: HashSet<String> = registry
            .comet_reports()
            .await?
            .into_iter()
            .map(|report| report.server)
            .collect();
        let servers = Arc::new(servers);
        if let Ok(mut cache) = self.reporting.lock() {
            *cache = Some((Instant::now(), servers.clone()));
        }
        Ok(servers)
    }

    /// PushMsgReq for `keys` on one comet (`stream`: the direct stream, or
    /// empty for goim's per-comet pushes).
    fn push_request(&self, delivery: &Delivery, keys: Vec<String>, stream: &str) -> PushMsgReq {
        let msg = &delivery.msg;
        let mut frame = RawBatch::with_capacity(msg.msg.len() + 16);
        frame.push(msg.operation, &msg.msg);
        let fields = StreamFields::of(std::slice::from_ref(delivery));
        PushMsgReq {
            keys,
            proto_op: msg.operation,
            proto: Some(frame.finish().into()),
            stream_epoch: fields.epoch,
            partition: fields.partition,
            owner_generation: fields.generation,
            seqs: fields.seqs,
            publish_unix_micros: fields.publish_unix_micros,
            stream: stream.to_string(),
            prev_seq: 0,
        }
    }

    async fn deliver_push(&self, server: &str, delivery: Delivery) {
        let request = self.push_request(&delivery, delivery.msg.keys.clone(), "");
        let outcome = self
            .call_comet(server, "push", |link| {
                let request = request.clone();
                async move { link.push_msg(request).await }
            })
            .await;
        match outcome {
            CallOutcome::CometGone => self.drop_all("push", "unknown_comet", vec![delivery]).await,
            outcome => {
                self.settle("push", vec![delivery], &[outcome]).await;
            }
        }
    }

    /// To every comet, each paced to its share of the speed. goim divided by
    /// the comet count and crashed when there were none.
    async fn deliver_broadcast(&self, delivery: Delivery) {
        let comets = self.all_comets();
        if comets.is_empty() {
            return self
                .drop_all("broadcast", "no_comets", vec![delivery])
                .await;
        }
        let msg = &delivery.msg;
        let count = i32::try_from(comets.len()).unwrap_or(i32::MAX);
        let speed = if msg.speed > 0 {
            (msg.speed + count - 1) / count
        } else {
            0
        };
        let mut frame = RawBatch::with_capacity(msg.msg.len() + 16);
        frame.push(msg.operation, &msg.msg);
        let stream = StreamFields::of(std::slice::from_ref(&delivery));
        let request = BroadcastReq {
            proto_op: msg.operation,
            proto: Some(frame.finish().into()),
            speed,
            stream_epoch: stream.epoch,
            partition: stream.partition,
            owner_generation: stream.generation,
            seqs: stream.seqs,
            publish_unix_micros: stream.publish_unix_micros,
        };
        let calls = comets.iter().map(|(id, _)| {
            let request = request.clone();
            self.call_comet(id, "broadcast", move |link| {
                let request = request.clone();
                async move { link.broadcast(request).await }
            })
        });
        let outcomes: Vec<CallOutcome> = join_all(calls)
            .await
            .into_iter()
            .map(|o| match o {
                // A comet that left has no clients to reach.
                CallOutcome::CometGone => CallOutcome::Ok,
                other => other,
            })
            .collect();
        self.settle("broadcast", vec![delivery], &outcomes).await;
    }
}

/// The sending side of one lane.
struct Lane {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    /// Senders waiting for room in the queue; the lane stays while any wait.
    waiting: Arc<AtomicUsize>,
}

struct Lanes {
    shared: Arc<Shared>,
    map: Mutex<HashMap<LaneKey, Lane>>,
    next_id: AtomicU64,
    tasks: TaskTracker,
}

impl Lanes {
    fn spawn(self: &Arc<Self>, key: &LaneKey) -> Lane {
        let (tx, rx) = mpsc::channel(self.shared.config.queue);
        let waiting = Arc::new(AtomicUsize::new(0));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.tasks
            .spawn(self.clone().run_lane(key.clone(), id, rx, waiting.clone()));
        Lane { id, tx, waiting }
    }

    /// Queues a delivery on its lane, waiting while the lane is full.
    async fn send(self: &Arc<Self>, key: LaneKey, mut delivery: Delivery) {
        loop {
            let (tx, waiting) = {
                let mut map = self.lane_map();
                let lane = map.entry(key.clone()).or_insert_with(|| self.spawn(&key));
                match lane.tx.try_send(delivery) {
                    Ok(()) => return,
                    Err(mpsc::error::TrySendError::Full(back)) => {
                        delivery = back;
                        lane.waiting.fetch_add(1, Ordering::SeqCst);
                        (lane.tx.clone(), lane.waiting.clone())
                    }
                    Err(mpsc::error::TrySendError::Closed(back)) => {
                        delivery = back;
                        map.remove(&key);
                        continue;
                    }
                }
            };
            let sent = tx.send(delivery).await;
            waiting.fetch_sub(1, Ordering::SeqCst);
            match sent {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => delivery = back,
            }
        }
    }

    /// Leaves the lane map if nothing is queued or about to be; otherwise
    /// returns the next delivery.
    fn retire(
        &self,
        key: &LaneKey,
        id: u64,
        rx: &mut mpsc::Receiver<Delivery>,
        waiting: &AtomicUsize,
    ) -> Retire {
        let mut map = self.lane_map();
        if waiting.load(Ordering::SeqCst) > 0 {
            return Retire::Stay;
        }
        // Senders only try_send under the map lock, so nothing can arrive
        // between this check and the removal.
        match rx.try_recv() {
            Ok(delivery) => Retire::Process(Box::new(delivery)),
            Err(_) => {
                if map.get(key).is_some_and(|lane| lane.id == id) {
                    map.remove(key);
                }
                Retire::Exit
            }
        }
    }

    async fn run_lane(
        self: Arc<Self>,
        key: LaneKey,
        id: u64,
        mut rx: mpsc::Receiver<Delivery>,
        waiting: Arc<AtomicUsize>,
    ) {
        let shared = self.shared.clone();
        shared.metrics.lanes.inc();
        let max_batch = key.max_batch(&shared.config);
        let linger = shared.config.room.linger;
        // The newest stream position this lane handed on, and the newest
        // one comets took.
        let mut previous: Option<(u64, u64)> = None;
        let mut taken: Option<(u64, u64)> = None;
        loop {
            let first = match timeout(shared.config.room.idle, rx.recv()).await {
                Ok(Some(delivery)) => delivery,
                Ok(None) => break,
                Err(_) => match self.retire(&key, id, &mut rx, &waiting) {
                    Retire::Process(delivery) => *delivery,
                    Retire::Stay => continue,
                    Retire::Exit => break,
                },
            };
            let first_at = Instant::now();
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(delivery) => batch.push(delivery),
                    Err(_) => break,
                }
            }
            if matches!(key, LaneKey::Room(_)) && !linger.is_zero() {
                while batch.len() < max_batch {
                    match timeout_at(first_at + linger, rx.recv()).await {
                        Ok(Some(delivery)) => batch.push(delivery),
                        _ => break,
                    }
                }
            }
            if matches!(key, LaneKey::Room(_)) {
                batch = shared.drop_old_copies(batch, taken).await;
                if batch.is_empty() {
                    continue;
                }
            }
            let last = batch
                .iter()
                .map(|d| Some((d.position.epoch, d.position.seq)))
                .fold(None, newest);
            if shared.process(&key, batch, previous).await {
                taken = newest(taken, last);
            }
            previous = newest(previous, last);
        }
        shared.metrics.lanes.dec();
    }

    /// Lets every lane finish what it holds and exit.
    fn close(&self) {
        self.lane_map().clear();
        self.tasks.close();
    }

    /// The lane map, also after a panic elsewhere poisoned its lock: every
    /// change to it is one insert or remove, so it is never half-updated,
    /// and refusing it would drop the delivery at hand.
    fn lane_map(&self) -> MutexGuard<'_, HashMap<LaneKey, Lane>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

enum Retire {
    Process(Box<Delivery>),
    Stay,
    Exit,
}

pub struct Job {
    shared: Arc<Shared>,
    connector: Arc<dyn CometConnector>,
    lanes: Arc<Lanes>,
}

impl Job {
    pub fn new(config: JobConfig, connector: Arc<dyn CometConnector>, metrics: JobMetrics) -> Self {
        let shared = Arc::new(Shared {
            config,
            comets: RwLock::new(BTreeMap::new()),
            health: Mutex::new(HashMap::new()),
            addrs: Mutex::new(HashMap::new()),
            registry: OnceLock::new(),
            reporting: Mutex::new(None),
            metrics,
        });
        Job {
            lanes: Arc::new(Lanes {
                shared: shared.clone(),
                map: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                tasks: TaskTracker::new(),
            }),
            shared,
            connector,
        }
    }

    /// Sessions, for direct pushes (`history.direct`); without it they are
    /// dropped (`no_registry`).
    pub fn with_registry(self, registry: Arc<dyn Registry>) -> Self {
        let _ = self.shared.registry.set(registry);
        self
    }

    /// Poisons the lane map's lock, as a panic while holding it would.
    #[cfg(test)]
    fn poison_lane_map(&self) {
        let lanes = self.lanes.clone();
        let _ = std::thread::spawn(move || {
            let _guard = lanes.map.lock();
            panic!("poisoning the lane map on purpose");
        })
        .join();
    }

    /// Comets currently delivered to.
    pub fn comet_ids(&self) -> Vec<String> {
        self.shared
            .comets
            .read()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Follows discovery: links to new comets, forgets vanished ones.
    fn apply_comets(&self, endpoints: &[CometEndpoint]) {
        let Ok(mut comets) = self.shared.comets.write() else {
            return;
        };
        let Ok(mut addrs) = self.shared.addrs.lock() else {
            return;
        };
        // Gone, or back at another address (a restarted pod): link anew.
        comets.retain(|id, _| {
            endpoints
                .iter()
                .any(|e| &e.id == id && addrs.get(id) == Some(&e.addr))
        });
        addrs.retain(|id, _| comets.contains_key(id));
        // A comet that left (scale-down, a killed pod) is no longer down or
        // unavailable, and one back at a new address starts afresh: without
        // this, the comets-unavailable gauge (and its alert) would stay up.
        if let Ok(mut health) = self.shared.health.lock() {
            let before = health.len();
            health.retain(|id, _| comets.contains_key(id));
            if health.len() != before {
                self.shared.update_down_gauge(&health);
            }
        }
        for endpoint in endpoints {
            if comets.contains_key(&endpoint.id) {
                continue;
            }
            match self.connector.connect(endpoint) {
                Ok(link) => {
                    tracing::info!(comet = %endpoint.id, addr = %endpoint.addr, "comet added");
                    comets.insert(endpoint.id.clone(), link);
                    addrs.insert(endpoint.id.clone(), endpoint.addr.clone());
                }
                Err(error) => {
                    tracing::warn!(comet = %endpoint.id, %error, "cannot link to comet");
                }
            }
        }
        self.shared.metrics.comets.set(comets.len() as i64);
    }

    async fn dispatch(&self, delivery: Delivery) {
        let metrics = &self.shared.metrics;
        let Ok(kind) = PushType::try_from(delivery.msg.r#type) else {
            metrics
                .dropped
                .with_label_values(&["unknown", "invalid"])
                .inc();
            if let Some(suppressed) = DROP_LOG.allow() {
                tracing::warn!(
                    r#type = delivery.msg.r#type,
                    suppressed,
                    "PushMsg of unknown type dropped"
                );
            }
            delivery.ack().await;
            return;
        };
        let label = kind_label(kind);
        metrics.consumed.with_label_values(&[label]).inc();
        if delivery.attempt > 1 {
            metrics.redelivered.with_label_values(&[label]).inc();
        }
        let msg = &delivery.msg;
        let key = match kind {
            PushType::Push if !msg.stream.is_empty() => LaneKey::Direct(msg.stream.clone()),
            PushType::Push if !msg.server.is_empty() && !msg.keys.is_empty() => {
                LaneKey::Push(msg.server.clone())
            }
            PushType::Room if !msg.room.is_empty() => LaneKey::Room(msg.room.clone()),
            PushType::Broadcast => LaneKey::Broadcast,
            _ => {
                metrics.dropped.with_label_values(&[label, "invalid"]).inc();
                log_drop(label, "invalid", 1);
                delivery.ack().await;
                return;
            }
        };
        self.lanes.send(key, delivery).await;
    }

    /// Consumes the bus until `shutdown`, then lets the lanes finish what
    /// they hold (bounded by one delivery timeout plus a margin).
    pub async fn run(
        &self,
        bus: Arc<dyn Bus>,
        discovery: Arc<dyn Discovery>,
        shutdown: CancellationToken,
    ) -> Result<(), JobError> {
        let mut comets = discovery.comets();
        self.apply_comets(&comets.borrow_and_update());
        let mut subscription = bus.subscribe().await?;
        let mut discovery_open = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = comets.changed(), if discovery_open => {
                    if changed.is_ok() {
                        let endpoints = comets.borrow_and_update().clone();
                        self.apply_comets(&endpoints);
                    } else {
                        discovery_open = false;
                    }
                }
                delivery = subscription.next() => match delivery {
                    Some(delivery) => {
                        tokio::select! {
                            _ = self.dispatch(delivery) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    }
                    None => break,
                },
            }
        }
        self.lanes.close();
        let bound = self.shared.config.delivery.timeout + Duration::from_secs(5);
        if tokio::time::timeout(bound, self.lanes.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                lanes = self.lanes.tasks.len(),
                "lanes still busy at shutdown"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
