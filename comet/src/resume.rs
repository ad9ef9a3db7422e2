//! Positions and resume for clients that opt in (auth body
//! `"positions": true`; `docs/recovery.md`).
//!
//! Such a client gets each room message with its position (stream offset
//! and epoch) in an extended header. When it joins a room — at auth or with
//! op 12 — it may send the position it last saw there; the comet then
//! writes what the client missed (from logic's History), an op-20 reply
//! saying whether that was everything, and only then live messages.
//!
//! The seam between replay and live: the channel starts *holding* live
//! room batches before it joins the room, history is read after the join,
//! and on release the held batches — and every later one — are written only
//! above the offset the replay reached. So a message is neither missed
//! (it is in the history read or arrives live after the join) nor written
//! twice (live copies at or below the offset are dropped).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pushcluster_api::backoff::Backoff;
use pushcluster_api::link::LinkError;
use pushcluster_api::pb::logic::{HistoryMessage, HistoryReply, HistoryReq, StreamPosition};
use pushcluster_api::protocol::{
    EncodedPush, Frame, inner_frames, op, positioned_header_len, put_positioned_frame, skip_frames,
};
use pushcluster_api::streams::{self, DirectStream};
use tokio::time::Instant;

use crate::Comet;
use crate::channel::{Channel, Queued};
use crate::stream_guard::StreamMark;

/// History messages per replayed op-9 batch.
const REPLAY_BATCH: usize = 64;

/// Room messages encoded with their positions, shared by every opted-in
/// member of the room on this comet.
pub struct PositionedBatch {
    pub push: EncodedPush,
    pub epoch: u64,
    /// Offset of each inner frame, increasing.
    pub offsets: Vec<u64>,
}

impl PositionedBatch {
    /// `frames` (op, body) at `offsets` of `room`, as one op-9 batch.
    pub fn new<'a>(
        room: &str,
        epoch: u64,
        frames: impl Iterator<Item = (i32, &'a [u8], u64)>,
        published_us: u64,
    ) -> Option<PositionedBatch> {
        let mut buf = BytesMut::new();
        let mut offsets = Vec::new();
        for (op, body, offset) in frames {
            buf.reserve(positioned_header_len(room) + body.len());
            put_positioned_frame(&mut buf, op, body, offset, epoch, room);
            offsets.push(offset);
        }
        if offsets.is_empty() {
            return None;
        }
        let mut push = EncodedPush::new(&Frame::server(op::RAW, buf.freeze()));
        push.published_us = published_us;
        Some(PositionedBatch {
            push,
            epoch,
            offsets,
        })
    }

    /// A push from job, positioned: the frames of `frame` at the offsets
    /// of `mark`.
    pub fn from_push(
        room: &str,
        frame: &Frame,
        mark: &StreamMark,
        published_us: u64,
    ) -> Option<PositionedBatch> {
        let seqs = &mark.seqs;
        if frame.op == op::RAW {
            let frames: Vec<(i32, Bytes)> = inner_frames(&frame.body).collect();
            PositionedBatch::new(
                room,
                mark.epoch,
                frames
                    .iter()
                    .zip(seqs)
                    .map(|((op, body), seq)| (*op, &body[..], *seq)),
                published_us,
            )
        } else {
            PositionedBatch::new(
                room,
                mark.epoch,
                std::iter::once((frame.op, &frame.body[..], *seqs.first()?)),
                published_us,
            )
        }
    }

    /// This batch without the frames at or below `floor` (`None`: nothing left).
    fn above(&self, floor: u64) -> Option<EncodedPush> {
        let covered = self.offsets.iter().take_while(|o| **o <= floor).count();
        if covered == 0 {
            return Some(self.push.clone());
        }
        if covered == self.offsets.len() {
            return None;
        }
        let inner = self.push.tcp.clone();
        let rest = skip_frames(&inner, covered)?;
        let mut push = EncodedPush::new(&Frame::server(op::RAW, rest));
        push.published_us = self.push.published_us;
        Some(push)
    }
}

/// A positioned channel's place in each of its rooms and in its own
/// direct streams (`@mid:<mid>`, `@key:<key>`).
#[derive(Default)]
pub struct PositionedState {
    /// By room id or stream name: a few entries.
    inner: Mutex<Vec<(String, Floor)>>,
}

fn floor<'a>(floors: &'a mut Vec<(String, Floor)>, name: &str) -> &'a mut Floor {
    let at = match floors.iter().position(|(known, _)| known == name) {
        Some(at) => at,
        None => {
            floors.push((name.to_string(), Floor::default()));
            floors.len() - 1
        }
    };
    &mut floors[at].1
}

#[derive(Default)]
struct Floor {
    epoch: u64,
    /// Messages at or below this offset were already written.
    offset: u64,
    /// While a join reads history: live batches wait here.
    held: Option<Vec<Arc<PositionedBatch>>>,
}

impl Floor {
    /// The part of `batch` not yet written (all of it in another epoch).
    fn above(&self, batch: &PositionedBatch) -> Option<EncodedPush> {
        if batch.epoch == self.epoch {
            batch.above(self.offset)
        } else {
            Some(batch.push.clone())
        }
    }
}

impl PositionedState {
    /// Live batches of `stream` (a room id or a direct stream's name) wait
    /// from now until [`release`](Self::release).
    pub fn hold(&self, stream: &str) {
        if let Ok(mut floors) = self.inner.lock() {
            floor(&mut floors, stream).held = Some(Vec::new());
        }
    }

    /// The connection left room `stream`: its place there is forgotten.
    pub fn forget(&self, stream: &str) {
        if let Ok(mut floors) = self.inner.lock() {
            floors.retain(|(name, _)| name != stream);
        }
    }

    /// Queues a live batch of `stream`: held during a join, else written
    /// above the floor. A direct stream's floor follows what is written
    /// (its messages come from many partitions and comets); a room's
    /// duplicates are dropped by the room.
    pub fn push(
        &self,
        channel: &Channel,
        stream: &str,
        batch: &Arc<PositionedBatch>,
        capacity: usize,
    ) -> Queued {
        let Ok(mut floors) = self.inner.lock() else {
            return Queued::Closed;
        };
        let floor = floor(&mut floors, stream);
        if let Some(held) = &mut floor.held {
            if held.len() >= capacity {
                drop(floors);
                return channel.overflow();
            }
            held.push(batch.clone());
            return Queued::Yes;
        }
        let push = floor.above(batch);
        if streams::is_direct(stream)
            && let Some(last) = batch.offsets.last()
        {
            floor.epoch = batch.epoch;
            floor.offset = floor.offset.max(*last);
        }
        match push {
            Some(push) => channel.push(&push),
            None => Queued::Skipped,
        }
    }

    /// Queues a live batch of direct stream `stream` whose previous
    /// message was `prev_seq` (0: unknown). `Err`: this connection never
    /// got that one (job's calls here failed meanwhile): the batch is held,
    /// and the caller resumes the stream from the position returned.
    pub fn push_direct(
        &self,
        channel: &Channel,
        stream: &str,
        batch: &Arc<PositionedBatch>,
        capacity: usize,
        prev_seq: u64,
    ) -> Result<Queued, StreamPosition> {
        if let Ok(mut floors) = self.inner.lock() {
            let floor = floor(&mut floors, stream);
            if floor.held.is_none()
                && floor.epoch == batch.epoch
                && floor.offset > 0
                && prev_seq > floor.offset
            {
                floor.held = Some(vec![batch.clone()]);
                return Err(StreamPosition {
                    epoch: floor.epoch,
                    offset: floor.offset,
                });
            }
        }
        Ok(self.push(channel, stream, batch, capacity))
    }

    /// Ends a hold of `stream`: held batches go out above `offset` of
    /// `epoch`, and so does every later one.
    pub fn release(&self, channel: &Channel, stream: &str, epoch: u64, offset: u64) {
        let Ok(mut floors) = self.inner.lock() else {
            return;
        };
        let floor = floor(&mut floors, stream);
        floor.epoch = epoch;
        floor.offset = offset;
        for batch in floor.held.take().unwrap_or_default() {
            let push = floor.above(&batch);
            if streams::is_direct(stream) && batch.epoch == floor.epoch {
                let last = batch.offsets.last().copied().unwrap_or(0);
                floor.offset = floor.offset.max(last);
            }
            if let Some(push) = push
                && let Queued::Overflow { .. } = channel.push(&push)
            {
                break;
            }
        }
    }
}

/// What a client sends to join a room with positions: a room id, and
/// optionally where it left off. Op 12's body is the room id as goim has
/// it, or for opted-in clients `{"room": "...", "since": {"epoch": "...",
/// "offset": N}}`.
pub struct Join {
    pub room: String,
    pub since: Option<StreamPosition>,
}

impl Join {
    pub fn parse_change_room(body: &[u8]) -> Join {
        fn number(value: &serde_json::Value) -> Option<u64> {
            value
                .as_u64()
                .or_else(|| value.as_str().and_then(|text| text.parse().ok()))
        }
        if body.first() == Some(&b'{')
            && let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(body)
            && let Some(room) = parsed.get("room").and_then(|room| room.as_str())
        {
            let since = parsed.get("since").and_then(|since| {
                Some(StreamPosition {
                    epoch: number(since.get("epoch")?)?,
                    offset: number(since.get("offset")?)?,
                })
            });
            return Join {
                room: room.to_string(),
                since,
            };
        }
        Join {
            room: String::from_utf8_lossy(body).into_owned(),
            since: None,
        }
    }
}

/// What a resume reads: the channel's room, or one of its own direct
/// streams (`@mid:<mid>`, `@key:<key>`).
#[derive(Debug, Clone, Copy)]
pub enum Resuming<'a> {
    Room(&'a str),
    Direct(&'a str),
}

/// Reads what the channel missed in the room or stream (it holds live
/// batches of it and already receives them), writes it, then the op-20
/// reply, then releases the hold.
pub async fn resume(
    comet: &Comet,
    channel: &Channel,
    state: &PositionedState,
    target: Resuming<'_>,
    since: Option<StreamPosition>,
) {
    let (name, direct) = match target {
        Resuming::Room(room) => (room, false),
        Resuming::Direct(name) => (name, true),
    };
    let reply = if !direct && streams::is_direct(name) {
        // A room named like a direct stream never reads that stream: it
        // would be another user's messages.
        HistoryReply {
            reason: "disabled".into(),
            ..HistoryReply::default()
        }
    } else {
        let request = HistoryReq {
            room: name.to_string(),
            since,
        };
        history(comet, request).await
    };
    // A direct stream's live pushes reach only connections watching their
    // op; so does its replay. A room's reach every member.
    let messages: Vec<&HistoryMessage> = reply
        .messages
        .iter()
        .filter(|m| !direct || channel.watches(m.op))
        .collect();
    comet.metrics.replayed.inc_by(messages.len() as u64);
    for chunk in messages.chunks(REPLAY_BATCH) {
        let Some(batch) = replay_batch(name, reply.epoch, chunk) else {
            continue;
        };
        if let Queued::Overflow { .. } = channel.push(&batch.push) {
            return;
        }
    }
    let status = serde_json::json!({
        "room": name,
        "epoch": reply.epoch.to_string(),
        "offset": reply.offset,
        "recovered": reply.recovered,
        "replayed": messages.len(),
        "reason": reply.reason,
    });
    let frame = Frame::server(op::RESUME_REPLY, Bytes::from(status.to_string()));
    channel.push(&EncodedPush::new(&frame));
    state.release(channel, name, reply.epoch, reply.offset);
    if !direct && let Some(room) = comet.rooms.get(name) {
        room.joined_at(reply.epoch, reply.offset);
    }
}

/// The direct streams a connection with positions resumes at connect,
/// with where it left off in each: its user's (`@mid:<mid>`, always when
/// it has a mid — fresh, it learns the position to keep), and its key's
/// (`@key:<key>`, when it named it in `since`: a key is new unless the
/// client reuses one). None when logic does not use direct streams.
pub fn direct_streams(
    channel: &Channel,
    direct_streams: bool,
    since: &HashMap<String, StreamPosition>,
) -> Vec<(String, Option<StreamPosition>)> {
    if !direct_streams {
        return Vec::new();
    }
    let mut streams = Vec::with_capacity(2);
    if channel.mid != 0 {
        let name = DirectStream::Mid(channel.mid).name();
        let since = since.get(&name).copied();
        streams.push((name, since));
    }
    let name = DirectStream::Key(channel.key.clone()).name();
    if let Some(since) = since.get(&name) {
        streams.push((name, Some(*since)));
    }
    streams
}

/// How long a join keeps asking when history is unavailable (a logic pod
/// rolling away, NATS failing over) before it tells the client so.
const HISTORY_PATIENCE: Duration = Duration::from_secs(10);

/// Logic's History, asked again with backoff (another logic, often) while
/// the answer is "unavailable", for up to [`HISTORY_PATIENCE`].
pub async fn history(comet: &Comet, request: HistoryReq) -> HistoryReply {
    let deadline = Instant::now() + HISTORY_PATIENCE;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        let answer = comet.logic().history(request.clone()).await;
        let retry = match &answer {
            Ok(reply) => !reply.recovered && reply.reason == "unavailable",
            Err(error) => error.is_retryable(),
        };
        let delay = backoff.next_delay();
        if !retry || Instant::now() + delay > deadline {
            return match answer {
                Ok(reply) => reply,
                Err(error) => unavailable(&error, request.since),
            };
        }
        tokio::time::sleep(delay).await;
    }
}

fn replay_batch(room: &str, epoch: u64, messages: &[&HistoryMessage]) -> Option<PositionedBatch> {
    let published_us = messages
        .first()
        .map_or(0, |m| u64::try_from(m.publish_unix_micros).unwrap_or(0));
    PositionedBatch::new(
        room,
        epoch,
        messages.iter().map(|m| (m.op, &m.body[..], m.offset)),
        published_us,
    )
}

fn unavailable(error: &LinkError, since: Option<StreamPosition>) -> HistoryReply {
    tracing::warn!(%error, "History failed; the client is told it was not recovered");
    let since = since.unwrap_or_default();
    HistoryReply {
        epoch: since.epoch,
        messages: Vec::new(),
        recovered: false,
        offset: since.offset,
        reason: "unavailable".into(),
    }
}
