//! The life of one client connection, the same for TCP and WebSocket:
//! handshake (frames until op 7, then logic Connect, within the handshake
//! timeout), then one loop that writes what was queued for the connection
//! and answers the client's frames, until the client leaves, misses its
//! heartbeat, overflows its queue, or the comet drains.

use std::collections::VecDeque;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use pushcluster_api::link::LinkError;
use pushcluster_api::pb::logic::{
    ConnectReply, ConnectReq, DisconnectReq, HeartbeatReq, ReceiveReq,
};
use pushcluster_api::protocol::{self, Frame, FrameError, op};
use tokio::time::{Instant, timeout, timeout_at};

use crate::channel::{Channel, CloseReason, Drained, Queued, TransportKind};
use crate::limits::{Admitted, FrameBudget, Limit};
use crate::resume;
use crate::{Comet, count_reply};
use pushcluster_api::log_budget::LogBudget;

/// goim renews a session with logic every 10 to 30 minutes of heartbeats.
const RENEW_MIN: Duration = Duration::from_secs(10 * 60);
const RENEW_MAX: Duration = Duration::from_secs(30 * 60);
/// Used when logic hands out no heartbeat timeout (goim's example: 8 min).
const FALLBACK_HEARTBEAT: Duration = Duration::from_secs(8 * 60);

static BAD_INPUT_LOG: LogBudget = LogBudget::new(10);
static LOGIC_ERROR_LOG: LogBudget = LogBudget::new(5);

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("message of {0} bytes exceeds the client frame limit")]
    Oversized(usize),
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ReadError {
    fn reason(&self) -> &'static str {
        match self {
            ReadError::Frame(e) => e.reason(),
            ReadError::Oversized(_) => "pack_len_too_large",
            ReadError::Protocol(_) => "websocket_protocol",
            ReadError::Io(_) => "io",
        }
    }

    fn is_bad_input(&self) -> bool {
        !matches!(self, ReadError::Io(_))
    }
}

/// A client socket speaking goim frames.
pub(crate) trait Transport: Send + 'static {
    fn kind(&self) -> TransportKind;
    /// The next client frame; `None` when the client closed. Cancel-safe:
    /// a partly read frame is kept for the next call.
    fn read_frame(&mut self) -> impl Future<Output = Result<Option<Frame>, ReadError>> + Send;
    /// Writes queued bytes, emptying `frames`; returns the number of bytes
    /// written.
    fn write(
        &mut self,
        frames: &mut VecDeque<Bytes>,
    ) -> impl Future<Output = std::io::Result<u64>> + Send;
    /// Closes the connection politely, saying why where the protocol can
    /// (`None`: refused before authenticating).
    fn shutdown(&mut self, reason: Option<CloseReason>) -> impl Future<Output = ()> + Send;
}

fn log_bad_input(kind: TransportKind, ip: IpAddr, error: &ReadError) {
    if let Some(suppressed) = BAD_INPUT_LOG.allow() {
        tracing::warn!(
            transport = kind.label(),
            %ip,
            reason = error.reason(),
            %error,
            suppressed,
            "closing connection: bad client input"
        );
    }
}

/// A connection refused before auth (never logs the auth body itself).
pub(crate) fn log_refused(kind: TransportKind, ip: IpAddr, reason: &str, detail: &str) {
    if let Some(suppressed) = BAD_INPUT_LOG.allow() {
        tracing::warn!(
            transport = kind.label(),
            %ip,
            reason,
            detail,
            suppressed,
            "closing connection before auth"
        );
    }
}

static FRAME_LIMIT_LOG: LogBudget = LogBudget::new(1);

fn count_frame_limit(comet: &Comet, kind: TransportKind, ip: IpAddr) {
    comet
        .metrics
        .limited
        .with_label_values(&[kind.label(), Limit::FramesPerConnection.label()])
        .inc();
    if let Some(suppressed) = FRAME_LIMIT_LOG.allow() {
        tracing::info!(%ip, transport = kind.label(), suppressed, "connection closed: over its frame rate");
    }
}

fn log_logic_error(call: &'static str, error: &LinkError) {
    if let Some(suppressed) = LOGIC_ERROR_LOG.allow() {
        tracing::warn!(call, %error, suppressed, "logic call failed");
    }
}

/// Why a connection ended before it authenticated.
enum HandshakeFailure {
    Timeout,
    Closed,
    Read(ReadError),
    Rejected(LinkError),
    LogicUnavailable(LinkError),
    Drain,
    FrameRate,
}

impl HandshakeFailure {
    fn reason(&self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "client_closed",
            HandshakeFailure::Read(e) if e.is_bad_input() => "bad_frame",
            HandshakeFailure::Read(_) => "io_error",
            HandshakeFailure::Rejected(_) => "auth_rejected",
            HandshakeFailure::LogicUnavailable(_) => "logic_unavailable",
            HandshakeFailure::Drain => "drain",
            HandshakeFailure::FrameRate => "frame_rate",
        }
    }
}

/// Reads frames until the auth frame (ignoring, like goim, anything before
/// it) and asks logic to authenticate it.
async fn authenticate<T: Transport>(
    comet: &Comet,
    transport: &mut T,
    cookie: String,
    budget: &mut FrameBudget,
) -> Result<(Frame, ConnectReply), HandshakeFailure> {
    let auth = loop {
        let read = transport.read_frame().await;
        if matches!(read, Ok(Some(_))) && !budget.take() {
            return Err(HandshakeFailure::FrameRate);
        }
        match read {
            Ok(Some(frame)) if frame.op == op::AUTH => break frame,
            Ok(Some(frame)) => {
                comet.metrics.frames_before_auth.inc();
                tracing::debug!(op = frame.op, "frame before auth ignored");
            }
            Ok(None) => return Err(HandshakeFailure::Closed),
            Err(error) => return Err(HandshakeFailure::Read(error)),
        }
    };
    let request = ConnectReq {
        server: comet.id().to_string(),
        cookie,
        token: auth.body.clone(),
    };
    match comet.logic().connect(request).await {
        Ok(reply) => Ok((auth, reply)),
        Err(error @ (LinkError::Rejected(_) | LinkError::InvalidArgument(_))) => {
            Err(HandshakeFailure::Rejected(error))
        }
        Err(error) => Err(HandshakeFailure::LogicUnavailable(error)),
    }
}

/// How an accepted socket becomes a goim frame stream: at once for TCP;
/// after the TLS handshake and the WebSocket upgrade for WS and WSS. Gives
/// the transport and the cookie for logic Connect, or `None` (refused,
/// counted and logged). Boxed, so its state is freed once it is done.
pub(crate) type Opening<T> = Pin<Box<dyn Future<Output = Option<(T, String)>> + Send>>;

/// Drives one accepted connection to its end. `started` is when it was
/// accepted: the handshake timeout counts from there; `admitted` is its
/// place under `comet.limits`, given back when it ends.
///
/// The task of every connection is most of an idle connection's memory,
/// so everything that happens once (opening, handshake, teardown) or
/// rarely runs in boxed futures, freed when done, and the transport is
/// held once, here.
pub(crate) fn run<T: Transport>(
    comet: Arc<Comet>,
    opening: Opening<T>,
    ip: IpAddr,
    started: Instant,
    admitted: Option<Admitted>,
) -> impl Future<Output = ()> + Send {
    // Boxed: the task keeps only what opening returns, not the arguments
    // (a future keeps its captured values for its whole life).
    let opened = Box::pin(open(comet, opening, ip, started, admitted));
    async move {
        let Some((mut transport, mut session)) = opened.await else {
            return;
        };
        let reason = session.serve(&mut transport).await;
        Box::pin(teardown(
            &session.comet,
            &session.channel,
            reason,
            &mut transport,
        ))
        .await;
    }
}

/// Opens the transport (TLS, WebSocket upgrade), authenticates, and joins
/// the connection to the comet with the auth reply as its first queued
/// frame. `None`: refused (counted, logged and closed).
async fn open<T: Transport>(
    comet: Arc<Comet>,
    opening: Opening<T>,
    ip: IpAddr,
    started: Instant,
    admitted: Option<Admitted>,
) -> Option<(T, Session)> {
    let (mut transport, cookie) = opening.await?;
    match join(comet, &mut transport, ip, cookie, started, admitted).await {
        Some(session) => Some((transport, session)),
        None => {
            transport.shutdown(None).await;
            None
        }
    }
}

/// The handshake, then the connection joins the comet with the auth reply
/// as its first queued frame. `None`: refused (counted and logged).
async fn join<T: Transport>(
    comet: Arc<Comet>,
    transport: &mut T,
    ip: IpAddr,
    cookie: String,
    started: Instant,
    admitted: Option<Admitted>,
) -> Option<Session> {
    let comet = &comet;
    let mut budget = FrameBudget::new(comet.config().limits.frames_per_second_per_connection);
    let (auth, mut reply) = handshake(comet, transport, ip, cookie, started, &mut budget).await?;
    let kind = transport.kind();
    let mut channel = Channel::new(
        comet.next_channel_id(),
        reply.key,
        reply.mid,
        ip,
        kind,
        comet.config().protocol.send_queue,
        &reply.accepts,
    );
    if reply.positions {
        channel = channel.with_positions();
    }
    if reply.rooms_restricted {
        channel.restrict_rooms(std::mem::take(&mut reply.allowed_rooms));
    }
    // Each room once, goim's room not again: a room is joined (and
    // resumed) once.
    let mut seen = std::collections::HashSet::new();
    reply
        .rooms
        .retain(|room| *room != reply.room_id && seen.insert(room.clone()));
    let channel = Arc::new(channel);
    // Queued before the channel becomes reachable, so it is the first
    // frame the client sees.
    channel.push_bytes(auth.reply(op::AUTH_REPLY, Bytes::new()).encode());
    if let Some(state) = channel.positioned() {
        // Everything this connection can be pushed is held from before it
        // becomes reachable until its history was read.
        let direct = resume::direct_streams(&channel, reply.direct_streams, &reply.direct_since);
        let joins_room = !reply.room_id.is_empty();
        if joins_room {
            state.hold(&reply.room_id);
        }
        for name in direct.iter().map(|(name, _)| name).chain(&reply.rooms) {
            state.hold(name);
        }
        comet.register(&channel, &reply.room_id, &reply.rooms);
        // Rooms left out (over the limit) hold nothing.
        let joined = channel.room_ids();
        for room in &reply.rooms {
            if !joined.iter().any(|id| &**id == room) {
                state.forget(room);
            }
        }
        let room = async {
            if joins_room {
                let target = resume::Resuming::Room(&reply.room_id);
                resume::resume(comet, &channel, state, target, reply.since).await;
            }
        };
        let more = reply
            .rooms
            .iter()
            .filter(|room| joined.iter().any(|id| &**id == room.as_str()))
            .map(|room| {
                let since = reply.rooms_since.get(room).copied();
                resume::resume(comet, &channel, state, resume::Resuming::Room(room), since)
            });
        let streams = direct.iter().map(|(name, since)| {
            let target = resume::Resuming::Direct(name);
            resume::resume(comet, &channel, state, target, *since)
        });
        futures_util::future::join3(
            room,
            futures_util::future::join_all(more),
            futures_util::future::join_all(streams),
        )
        .await;
    } else {
        comet.register(&channel, &reply.room_id, &reply.rooms);
    }
    comet
        .metrics
        .connects
        .with_label_values(&[kind.label()])
        .inc();
    let heartbeat = u64::try_from(reply.heartbeat)
        .ok()
        .filter(|nanos| *nanos > 0)
        .map(Duration::from_nanos)
        .unwrap_or(FALLBACK_HEARTBEAT);
    Some(Session {
        comet: comet.clone(),
        _admitted: admitted,
        channel,
        heartbeat,
        next_renew: Instant::now() + renew_interval(),
        budget,
        upstream_budget: None,
    })
}

/// Authenticates within the handshake timeout (or until the comet drains);
/// counts and logs a failure, which the caller answers by closing.
async fn handshake<T: Transport>(
    comet: &Comet,
    transport: &mut T,
    ip: IpAddr,
    cookie: String,
    started: Instant,
    budget: &mut FrameBudget,
) -> Option<(Frame, ConnectReply)> {
    let kind = transport.kind();
    let deadline = started + comet.config().protocol.handshake_timeout;
    let outcome = tokio::select! {
        result = timeout_at(deadline, authenticate(comet, transport, cookie, budget)) => {
            result.unwrap_or(Err(HandshakeFailure::Timeout))
        }
        _ = comet.drain_started.cancelled() => Err(HandshakeFailure::Drain),
    };
    let failure = match outcome {
        Ok(done) => return Some(done),
        Err(failure) => failure,
    };
    comet
        .metrics
        .handshake_failures
        .with_label_values(&[kind.label(), failure.reason()])
        .inc();
    match &failure {
        HandshakeFailure::Read(error) if error.is_bad_input() => {
            comet
                .metrics
                .bad_frames
                .with_label_values(&[kind.label(), error.reason()])
                .inc();
            log_bad_input(kind, ip, error);
        }
        HandshakeFailure::Rejected(error) => {
            log_refused(kind, ip, "auth_rejected", &error.to_string());
        }
        HandshakeFailure::Timeout => {
            log_refused(kind, ip, "handshake_timeout", "no successful auth in time");
        }
        HandshakeFailure::LogicUnavailable(error) => log_logic_error("Connect", error),
        HandshakeFailure::FrameRate => count_frame_limit(comet, kind, ip),
        _ => {}
    }
    None
}

/// Takes the connection out of the comet, counts what it leaves unwritten,
/// closes the socket and tells logic the session ended.
async fn teardown<T: Transport>(
    comet: &Comet,
    channel: &Arc<Channel>,
    reason: CloseReason,
    transport: &mut T,
) {
    let kind = transport.kind();
    comet.unregister(channel);
    channel.close(reason);
    let left = channel.drain().frames.len();
    if left > 0 {
        comet
            .metrics
            .dropped
            .with_label_values(&["connection_closed"])
            .inc_by(left as u64);
    }
    comet
        .metrics
        .disconnects
        .with_label_values(&[kind.label(), reason.label()])
        .inc();
    tracing::debug!(
        mid = channel.mid,
        reason = reason.label(),
        "connection closed"
    );
    transport.shutdown(Some(reason)).await;
    // A replacing connection with the same key now owns the session here.
    if reason != CloseReason::Replaced {
        let request = DisconnectReq {
            mid: channel.mid,
            key: channel.key.clone(),
            server: comet.id().to_string(),
        };
        match timeout(
            comet.config().logic_timeout,
            comet.logic().disconnect(request),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => log_logic_error("Disconnect", &error),
            Err(_) => log_logic_error("Disconnect", &LinkError::Unavailable("timed out".into())),
        }
    }
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn renew_interval() -> Duration {
    let secs = rand::random_range(RENEW_MIN.as_secs()..RENEW_MAX.as_secs());
    Duration::from_secs(secs)
}

/// An authenticated connection's loop.
struct Session {
    comet: Arc<Comet>,
    /// The connection's place under `comet.limits`, given back when the
    /// session ends.
    _admitted: Option<Admitted>,
    channel: Arc<Channel>,
    heartbeat: Duration,
    next_renew: Instant,
    budget: FrameBudget,
    /// Op-4 messages' rate (`upstream.per_second_per_connection`), made at
    /// the first one.
    upstream_budget: Option<Box<FrameBudget>>,
}

impl Session {
    /// Publish → socket latency of a write that carried pushed frames,
    /// measured from the oldest of them: one observation per write keeps
    /// the cost off the fan-out path (replies carry no publish time).
    fn observe_delivery(&self, published_us: &VecDeque<u64>) {
        let Some(oldest) = published_us.iter().copied().filter(|&us| us != 0).min() else {
            return;
        };
        let seconds = unix_micros().saturating_sub(oldest) as f64 / 1_000_000.0;
        self.comet.metrics.delivery_latency.observe(seconds);
    }

    async fn serve<T: Transport>(&mut self, transport: &mut T) -> CloseReason {
        let kind = transport.kind();
        self.channel
            .heartbeat_due(self.comet.deadline_ms(self.heartbeat));
        let mut drained = Drained::default();
        // The first write is the auth reply; most connections then idle.
        let mut first_write = true;
        loop {
            self.channel.drain_into(&mut drained);
            if let Some(reason) = drained.closing
                && !reason.flushes()
            {
                return reason;
            }
            if !drained.frames.is_empty() {
                let frames = drained.frames.len();
                let written = self.write(transport, &mut drained).await;
                match written {
                    Err(reason) => return reason,
                    Ok(bytes) => {
                        self.comet
                            .metrics
                            .sent_bytes
                            .with_label_values(&[kind.label()])
                            .inc_by(bytes);
                        self.comet.metrics.write_batch_frames.observe(frames as f64);
                        self.observe_delivery(&drained.published_us);
                        if std::mem::take(&mut first_write) {
                            drained.release();
                            self.channel.release_spare();
                        }
                    }
                }
                continue;
            }
            if let Some(reason) = drained.closing {
                // A flushing close (drain, replaced): everything is written.
                return reason;
            }
            tokio::select! {
                biased;
                _ = self.channel.wait() => {}
                read = transport.read_frame() => match read {
                    Ok(Some(_)) if !self.budget.take() => {
                        count_frame_limit(&self.comet, kind, self.channel.ip);
                        return CloseReason::FrameRate;
                    }
                    Ok(Some(frame)) => {
                        if frame.op == op::HEARTBEAT {
                            self.channel
                                .heartbeat_due(self.comet.deadline_ms(self.heartbeat));
                            // Between bursts a connection keeps its write
                            // buffers; each heartbeat gives them back, so
                            // idle connections hold none.
                            drained.release();
                            self.channel.release_spare();
                        }
                        let handled = match frame.op {
                            op::CHANGE_ROOM if self.channel.positioned().is_some() => {
                                Box::pin(self.change_room_with_positions(frame)).await
                            }
                            op::JOIN => Box::pin(self.join_room(frame)).await,
                            op::HEARTBEAT | op::CHANGE_ROOM | op::SUB | op::UNSUB | op::LEAVE => {
                                self.handle(frame)
                            }
                            // Boxed for the same reason as the handshake.
                            _ => Box::pin(self.receive(frame)).await,
                        };
                        if let Err(reason) = handled {
                            return reason;
                        }
                    }
                    Ok(None) => return CloseReason::ClientClosed,
                    Err(error) if error.is_bad_input() => {
                        self.comet
                            .metrics
                            .bad_frames
                            .with_label_values(&[kind.label(), error.reason()])
                            .inc();
                        log_bad_input(kind, self.channel.ip, &error);
                        return CloseReason::BadFrame;
                    }
                    Err(_) => return CloseReason::IoError,
                },
            }
        }
    }

    /// Writes what was drained. Most writes finish at once; a write that
    /// waits for the socket gets a deadline, which the comet's sweeper
    /// enforces by closing the connection as a slow consumer. A final
    /// flush (drain, replaced) enforces it here: the sweeper may no longer
    /// see the connection.
    async fn write<T: Transport>(
        &self,
        transport: &mut T,
        drained: &mut Drained,
    ) -> Result<u64, CloseReason> {
        let write = transport.write(&mut drained.frames);
        tokio::pin!(write);
        if let Poll::Ready(result) =
            std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await
        {
            return result.map_err(|_| CloseReason::IoError);
        }
        let write_timeout = self.comet.config().protocol.write_timeout;
        let write_due = Instant::now() + write_timeout;
        self.channel
            .write_due(Some(self.comet.deadline_ms(write_timeout)));
        let mut flushing = drained.closing.is_some();
        while !flushing {
            tokio::select! {
                result = &mut write => {
                    self.channel.write_due(None);
                    return result.map_err(|_| CloseReason::IoError);
                }
                _ = self.channel.wait() => match self.channel.closing() {
                    Some(reason) if !reason.flushes() => return Err(reason),
                    Some(_) => flushing = true,
                    None => {}
                },
            }
        }
        // Rare (a close while the socket is full): a timer of its own.
        match Box::pin(timeout_at(write_due, &mut write)).await {
            Ok(result) => {
                self.channel.write_due(None);
                result.map_err(|_| CloseReason::IoError)
            }
            Err(_) => Err(CloseReason::SlowConsumer),
        }
    }

    fn reply(&self, frame: &Frame, op: i32, body: Bytes) -> Result<(), CloseReason> {
        let outcome = self.channel.push_bytes(frame.reply(op, body).encode());
        count_reply(&self.comet.metrics, outcome);
        match outcome {
            Queued::Overflow { .. } => Err(CloseReason::SlowConsumer),
            Queued::Yes | Queued::Closed | Queued::Skipped => Ok(()),
        }
    }

    fn count_upstream(&self, kind: &str) {
        self.comet
            .metrics
            .upstream_frames
            .with_label_values(&[kind])
            .inc();
    }

    /// Answers a heartbeat, change-room or (un)subscribe frame
    /// (PROTOCOL.md §1.5, §1.7).
    fn handle(&mut self, frame: Frame) -> Result<(), CloseReason> {
        match frame.op {
            op::HEARTBEAT => {
                self.count_upstream("heartbeat");
                let online = self.channel.room_online();
                let bytes = protocol::heartbeat_reply(frame.ver, frame.seq, online);
                let outcome = self.channel.push_bytes(bytes);
                count_reply(&self.comet.metrics, outcome);
                if let Queued::Overflow { .. } = outcome {
                    return Err(CloseReason::SlowConsumer);
                }
                self.renew_session();
                Ok(())
            }
            op::CHANGE_ROOM => {
                self.count_upstream("change_room");
                let room = String::from_utf8_lossy(&frame.body);
                let changed = self.comet.rooms.change(&self.channel, &room);
                self.comet.count_join(changed.map(|_| true));
                match changed {
                    Ok(()) => self.reply(&frame, op::CHANGE_ROOM_REPLY, frame.body.clone()),
                    Err(refusal) => {
                        let body = join_answer(&room, Err(refusal.label()));
                        self.reply(&frame, op::CHANGE_ROOM_REPLY, body)
                    }
                }
            }
            op::LEAVE => {
                self.count_upstream("leave");
                let room = resume::Join::parse_change_room(&frame.body).room;
                let answer = if self.comet.rooms.leave_one(&self.channel, &room) {
                    Ok(())
                } else {
                    Err("not_member")
                };
                self.reply(&frame, op::LEAVE_REPLY, join_answer(&room, answer))
            }
            op::SUB => {
                self.count_upstream("sub");
                if let Some(ops) = protocol::parse_op_list(&frame.body) {
                    self.channel.watch(&ops);
                }
                self.reply(&frame, op::SUB_REPLY, frame.body.clone())
            }
            op::UNSUB => {
                self.count_upstream("unsub");
                if let Some(ops) = protocol::parse_op_list(&frame.body) {
                    self.channel.unwatch(&ops);
                }
                self.reply(&frame, op::UNSUB_REPLY, frame.body.clone())
            }
            // `serve` sends every other op to `receive`.
            other => self.reply(&frame, other, Bytes::new()),
        }
    }

    /// Op 22: one more room. The body is the room id, or `{"room", "since"}`
    /// (a client with positions resumes the room from `since`: the op-23
    /// reply comes first, then the replay and the op-20 reply).
    async fn join_room(&mut self, frame: Frame) -> Result<(), CloseReason> {
        self.count_upstream("join");
        let join = resume::Join::parse_change_room(&frame.body);
        let already = self
            .channel
            .rooms
            .lock()
            .map(|rooms| rooms.contains(&join.room))
            .unwrap_or(false);
        let positioned = self.channel.positioned().filter(|_| !already);
        if let Some(state) = positioned {
            state.hold(&join.room);
        }
        let joined = self.comet.rooms.join_more(&self.channel, &join.room);
        self.comet.count_join(joined);
        let answer = joined.map(|_| ()).map_err(|refusal| refusal.label());
        self.reply(&frame, op::JOIN_REPLY, join_answer(&join.room, answer))?;
        if let Some(state) = positioned {
            if joined.is_ok() {
                let target = resume::Resuming::Room(&join.room);
                resume::resume(&self.comet, &self.channel, state, target, join.since).await;
            } else {
                state.forget(&join.room);
            }
        }
        Ok(())
    }

    /// Op 12 of a connection with positions: the body may carry where the
    /// client left off in the new room (`resume::Join`); the op-13 reply
    /// comes first, then the replay and the op-20 reply.
    async fn change_room_with_positions(&mut self, frame: Frame) -> Result<(), CloseReason> {
        self.count_upstream("change_room");
        let join = resume::Join::parse_change_room(&frame.body);
        let Some(state) = self.channel.positioned() else {
            return Ok(());
        };
        // Entering a room it is not in yet (not one it joined besides).
        let entering = !join.room.is_empty()
            && !self
                .channel
                .rooms
                .lock()
                .map(|rooms| rooms.contains(&join.room))
                .unwrap_or(true);
        if entering {
            state.hold(&join.room);
        }
        let changed = self.comet.rooms.change(&self.channel, &join.room);
        self.comet.count_join(changed.map(|_| true));
        if let Err(refusal) = changed {
            if entering {
                state.forget(&join.room);
            }
            let body = join_answer(&join.room, Err(refusal.label()));
            return self.reply(&frame, op::CHANGE_ROOM_REPLY, body);
        }
        self.reply(&frame, op::CHANGE_ROOM_REPLY, frame.body.clone())?;
        if entering {
            let target = resume::Resuming::Room(&join.room);
            resume::resume(&self.comet, &self.channel, state, target, join.since).await;
        }
        Ok(())
    }

    /// Any other op goes to logic's Receive; goim answers it with the same
    /// op and no body. With `upstream` on, op 4 is a message for the
    /// backend: answered with op 5, `{"id"}` once stored, or `{"error"}`
    /// (too_large, rate_limited, unavailable) — the client may resend.
    async fn receive(&mut self, frame: Frame) -> Result<(), CloseReason> {
        let upstream = self
            .comet
            .upstream()
            .filter(|_| frame.op == op::SEND_MSG)
            .map(|config| (config.max_bytes, config.per_second_per_connection));
        self.count_upstream(if upstream.is_some() { "send" } else { "other" });
        if let Some((max_bytes, per_second)) = upstream {
            let refusal = if frame.body.len() > max_bytes {
                Some("too_large")
            } else if !self
                .upstream_budget
                .get_or_insert_with(|| Box::new(FrameBudget::new(per_second)))
                .take()
            {
                Some("rate_limited")
            } else {
                None
            };
            if let Some(error) = refusal {
                return self.answer_upstream(&frame, Err(error));
            }
        }
        let request = ReceiveReq {
            mid: self.channel.mid,
            proto: Some((&frame).into()),
            key: self.channel.key.clone(),
            server: self.comet.id().to_string(),
            rooms: self
                .channel
                .room_ids()
                .iter()
                .map(|id| id.to_string())
                .collect(),
            connection: self.channel.id,
        };
        let call = self.comet.logic().receive(request);
        let answer = match timeout(self.comet.config().logic_timeout, call).await {
            Ok(Ok(reply)) => Ok(reply.id),
            Ok(Err(error)) => {
                log_logic_error("Receive", &error);
                Err(match error {
                    LinkError::InvalidArgument(_) => "too_large",
                    _ => "unavailable",
                })
            }
            Err(_) => {
                log_logic_error("Receive", &LinkError::Unavailable("timed out".into()));
                Err("unavailable")
            }
        };
        if upstream.is_some() {
            return self.answer_upstream(&frame, answer.as_deref().map_err(|e| *e));
        }
        self.reply(&frame, frame.op, Bytes::new())
    }

    /// Op 5 for an upstream message: `{"id"}` or `{"error"}`, counted.
    fn answer_upstream(
        &self,
        frame: &Frame,
        answer: Result<&str, &str>,
    ) -> Result<(), CloseReason> {
        let (result, body) = match answer {
            Ok(id) => ("accepted", serde_json::json!({ "id": id })),
            Err(error) => (error, serde_json::json!({ "error": error })),
        };
        self.comet
            .metrics
            .upstream_messages
            .with_label_values(&[result])
            .inc();
        self.reply(frame, op::SEND_MSG_REPLY, Bytes::from(body.to_string()))
    }

    /// Refreshes the session in logic every 10–30 minutes of heartbeats.
    fn renew_session(&mut self) {
        let now = Instant::now();
        if now < self.next_renew {
            return;
        }
        self.next_renew = now + renew_interval();
        let comet = self.comet.clone();
        let request = HeartbeatReq {
            mid: self.channel.mid,
            key: self.channel.key.clone(),
            server: comet.id().to_string(),
        };
        tokio::spawn(async move {
            let call = comet.logic().heartbeat(request);
            match timeout(comet.config().logic_timeout, call).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => log_logic_error("Heartbeat", &error),
                Err(_) => log_logic_error("Heartbeat", &LinkError::Unavailable("timed out".into())),
            }
        });
    }
}

/// The JSON body of a join, leave or refused change-room reply:
/// `{"room", "ok"}`, with `"reason"` when refused.
fn join_answer(room: &str, answer: Result<(), &str>) -> Bytes {
    let body = match answer {
        Ok(()) => serde_json::json!({"room": room, "ok": true}),
        Err(reason) => serde_json::json!({"room": room, "ok": false, "reason": reason}),
    };
    Bytes::from(body.to_string())
}
