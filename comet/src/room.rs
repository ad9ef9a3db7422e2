//! Rooms: who is in which room on this comet. A connection is in goim's
//! one room (op 12 moves it) and in any others it joined (op 22, the auth
//! body's `rooms`), up to `comet.limits.rooms_per_connection`. Rooms are sharded by id; a room push holds only that room's
//! member lock, and queueing to a member never waits, so one busy room never
//! stalls another and every member sees a room's pushes in the same order.
//!
//! Fairness between rooms: queueing to a member wakes its connection task,
//! and tokio runs woken tasks in order. A room larger than
//! [`FANOUT_CHUNK`] is therefore fanned out a chunk at a time, going to the
//! back of the run queue in between, so a message for a quiet room waits
//! behind at most about a chunk of a busy room's writes, not all of them;
//! with `comet.yield_cpu` it also offers its core to other threads in
//! between, so a process sharing that core waits at most a chunk too, not a
//! scheduler tick.
//! A smaller room's push lets the tasks it woke run before it returns, so
//! the next task its caller wakes cannot push them to the back of the queue.
//! A room's pushes take turns (`turn`), so they stay in order; a push that
//! first fills a gap from history holds its turn across both.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use pushcluster_api::protocol::{EncodedPush, Frame, MAX_STREAM_NAME, op, select_frames};

use crate::channel::{Channel, ChannelRooms, Queued};
use crate::resume::PositionedBatch;
use crate::stream_guard::{Admitted, HighWater, StreamMark};

/// Members queued to before a room push lets the tasks it woke run.
pub(crate) const FANOUT_CHUNK: usize = 64;

/// Offers this thread's core to any other thread ready to run on it
/// (`sched_yield`), between two chunks of a large room's fan-out. A busy
/// fan-out keeps its worker running for milliseconds, and the kernel
/// switches a running thread out only at its next tick (4 ms at HZ=250) or
/// when another thread wakes; a thread that is ready but was passed over
/// (a relay on the same core — logic, job, nats-server — or the kernel's
/// softirq thread carrying their packets) would wait that long.
fn yield_cpu() {
    #[cfg(test)]
    tests::CPU_YIELDS.with(|yields| yields.set(yields.get() + 1));
    std::thread::yield_now();
}

/// Goes to the back of the run queue once, behind the tasks this one just
/// woke (tokio's `yield_now` waits for the next I/O poll instead).
async fn yield_to_woken() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

#[derive(Default)]
struct Members {
    channels: HashMap<u64, Arc<Channel>>,
    /// Members that opted in to positions: they get the room's messages
    /// encoded with their offsets.
    positioned: HashMap<u64, Arc<Channel>>,
    /// Last stream sequence pushed to this room (duplicate detection).
    high_water: HighWater,
    /// Before the room's first push: the lowest position a member with
    /// positions joined at, what a gap is measured from until then.
    joined_at: Option<(u64, u64)>,
}

pub struct Room {
    pub id: Arc<str>,
    members: Mutex<Members>,
    /// Members on this comet.
    online: AtomicI32,
    /// Members in the whole cluster, as last reported by logic (0 = unknown).
    all_online: AtomicI32,
    /// One push at a time, so pushes stay in order while a large room's
    /// fan-out yields.
    turn: tokio::sync::Mutex<()>,
    /// `comet.yield_cpu`: offer the core to other threads between chunks.
    yield_cpu: bool,
}

/// A room's turn to push, held across a gap fill and the push after it.
pub struct RoomTurn<'a> {
    _held: tokio::sync::MutexGuard<'a, ()>,
}

/// What happened to one room push.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    pub queued: u64,
    /// Frames dropped because members overflowed and were closed.
    pub dropped: u64,
}

impl Fanout {
    pub fn record(&mut self, outcome: Queued) {
        match outcome {
            Queued::Yes => self.queued += 1,
            Queued::Overflow { dropped } => self.dropped += dropped as u64,
            Queued::Closed | Queued::Skipped => {}
        }
    }
}

impl Room {
    fn new(id: Arc<str>, yield_cpu: bool) -> Self {
        Room {
            id,
            members: Mutex::new(Members::default()),
            online: AtomicI32::new(0),
            all_online: AtomicI32::new(0),
            turn: tokio::sync::Mutex::new(()),
            yield_cpu,
        }
    }

    /// goim's `OnlineNum`: the cluster count when known, else the local one.
    pub fn online_num(&self) -> i32 {
        let all = self.all_online.load(Ordering::Relaxed);
        if all > 0 {
            all
        } else {
            self.online.load(Ordering::Relaxed)
        }
    }

    /// When a push says the room's previous message was `prev_seq` and
    /// this comet's last one is older: the offset it has (what is missing
    /// comes after it).
    pub fn missing_before(&self, epoch: u64, prev_seq: u64) -> Option<u64> {
        let members = self.members.lock().ok()?;
        members
            .high_water
            .last_in(epoch)
            .or_else(|| {
                members
                    .joined_at
                    .filter(|(at, _)| *at == epoch)
                    .map(|(_, offset)| offset)
            })
            .filter(|last| *last < prev_seq)
    }

    /// A member with positions joined at `offset` of `epoch` (its replay
    /// written). Before any push reached the room here, a push naming an
    /// older previous message than that is a gap too (a comet that job
    /// does not know yet).
    pub fn joined_at(&self, epoch: u64, offset: u64) {
        let Ok(mut members) = self.members.lock() else {
            return;
        };
        if epoch == 0 || members.high_water.last_in(epoch).is_some() {
            return;
        }
        members.joined_at = Some(match members.joined_at {
            Some((at, lowest)) if at == epoch => (at, lowest.min(offset)),
            _ => (epoch, offset),
        });
    }

    /// Closes every member with positions (their view has a hole).
    pub fn close_positioned(&self, reason: crate::channel::CloseReason) -> usize {
        let Ok(members) = self.members.lock() else {
            return 0;
        };
        for channel in members.positioned.values() {
            channel.close(reason);
        }
        members.positioned.len()
    }

    pub fn local_online(&self) -> i32 {
        self.online.load(Ordering::Relaxed)
    }

    /// Waits for the room's turn: pushes made while it is held come after.
    pub async fn take_turn(&self) -> RoomTurn<'_> {
        RoomTurn {
            _held: self.turn.lock().await,
        }
    }

    /// Queues the push to every member (room pushes ignore the watch set),
    /// a chunk at a time for a large room. With a stream mark, frames this
    /// room already got are left out; the number left out is returned with
    /// the fan-out.
    pub async fn push(
        &self,
        push: &EncodedPush,
        frame: &Frame,
        mark: Option<&StreamMark>,
    ) -> (Fanout, usize) {
        let turn = self.take_turn().await;
        self.push_in_turn(&turn, push, frame, mark).await
    }

    /// [`push`](Self::push) while holding the room's turn (`_turn`, from
    /// [`take_turn`](Self::take_turn) of this room).
    pub async fn push_in_turn(
        &self,
        _turn: &RoomTurn<'_>,
        push: &EncodedPush,
        frame: &Frame,
        mark: Option<&StreamMark>,
    ) -> (Fanout, usize) {
        let mut fanout = Fanout::default();
        let (large, seen) = {
            let Ok(mut members) = self.members.lock() else {
                return (fanout, 0);
            };
            let total = mark.map(|m| m.seqs.len()).unwrap_or(1);
            let admitted = mark.map(|m| members.high_water.admit_each(m));
            let (seen, partial) = match admitted {
                None | Some(Admitted::All) => (0, None),
                Some(Admitted::Only(fresh)) if fresh.is_empty() => return (fanout, total),
                Some(Admitted::Only(fresh)) => {
                    // Only some are new: rebuild the batch of those (rare).
                    let Some(partial) = mark.and_then(|mark| only(push, frame, mark, &fresh))
                    else {
                        return (fanout, total);
                    };
                    (total - fresh.len(), Some(partial))
                }
            };
            let (push, frame, mark) = match &partial {
                Some((push, frame, mark)) => (push, frame, Some(mark)),
                None => (push, frame, mark),
            };
            // Encoded once more, with offsets, when someone opted in.
            let positioned = match mark {
                Some(mark) if !members.positioned.is_empty() => {
                    PositionedBatch::from_push(&self.id, frame, mark, push.published_us)
                        .map(Arc::new)
                }
                _ => None,
            };
            let send = |channel: &Channel, fanout: &mut Fanout, with_positions: bool| {
                fanout.record(match (&positioned, with_positions) {
                    (Some(batch), true) => channel.push_positioned(&self.id, batch),
                    _ => channel.push(push),
                })
            };
            if members.channels.len() + members.positioned.len() <= FANOUT_CHUNK {
                for channel in members.channels.values() {
                    send(channel, &mut fanout, false);
                }
                for channel in members.positioned.values() {
                    send(channel, &mut fanout, true);
                }
                (None, seen)
            } else {
                // Who is a member now: later joiners miss this push, leavers
                // are closed and skip it.
                let members: Vec<(Arc<Channel>, bool)> = members
                    .channels
                    .values()
                    .map(|c| (c.clone(), false))
                    .chain(members.positioned.values().map(|c| (c.clone(), true)))
                    .collect();
                (
                    Some((members, partial.map(|(push, _, _)| push), positioned)),
                    seen,
                )
            }
        };
        let Some((members, partial, positioned)) = large else {
            // A small room: its members' tasks run before the caller goes
            // on. Otherwise whatever the caller wakes next (the gRPC
            // answer to job) takes tokio's LIFO slot and sends them to the
            // back of the run queue, behind a busy room's writes.
            if fanout.queued > 0 {
                yield_to_woken().await;
            }
            return (fanout, seen);
        };
        let push = partial.as_ref().unwrap_or(push);
        for chunk in members.chunks(FANOUT_CHUNK) {
            for (channel, with_positions) in chunk {
                fanout.record(match (&positioned, with_positions) {
                    (Some(batch), true) => channel.push_positioned(&self.id, batch),
                    _ => channel.push(push),
                });
            }
            if self.yield_cpu {
                yield_cpu();
            }
            yield_to_woken().await;
        }
        (fanout, seen)
    }
}

/// The messages at indices `fresh` of a room push, as a push, frame and
/// mark of their own (`None`: the batch does not match its mark).
fn only(
    push: &EncodedPush,
    frame: &Frame,
    mark: &StreamMark,
    fresh: &[usize],
) -> Option<(EncodedPush, Frame, StreamMark)> {
    if frame.op != op::RAW {
        return None;
    }
    let frame = Frame::server(op::RAW, select_frames(&frame.body, fresh)?);
    let seqs = fresh
        .iter()
        .map(|at| mark.seqs.get(*at).copied())
        .collect::<Option<Vec<u64>>>()?;
    let push = EncodedPush {
        published_us: push.published_us,
        ..EncodedPush::new(&frame)
    };
    let mark = StreamMark {
        seqs,
        ..mark.clone()
    };
    Some((push, frame, mark))
}

pub struct Rooms {
    shards: Vec<Mutex<HashMap<Arc<str>, Arc<Room>>>>,
    hasher: RandomState,
    /// `comet.limits.rooms_per_connection`.
    max_per_connection: usize,
    /// `comet.yield_cpu`, for the rooms created.
    yield_cpu: bool,
}

/// Why a connection may not join a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefusal {
    /// It is in `comet.limits.rooms_per_connection` rooms already.
    Limit,
    /// Its token does not allow the room.
    Forbidden,
    /// An empty or overlong room id.
    Invalid,
}

impl JoinRefusal {
    pub fn label(self) -> &'static str {
        match self {
            JoinRefusal::Limit => "limit",
            JoinRefusal::Forbidden => "forbidden",
            JoinRefusal::Invalid => "invalid",
        }
    }
}

/// Whether a connection in `rooms` may enter room `id`; `replacing`: it
/// leaves one room for it (op 12), so the count does not grow.
fn check_join(
    rooms: &ChannelRooms,
    id: &str,
    max: usize,
    replacing: bool,
) -> Result<(), JoinRefusal> {
    if id.is_empty() || id.len() > MAX_STREAM_NAME {
        return Err(JoinRefusal::Invalid);
    }
    if !rooms.allows(id) {
        return Err(JoinRefusal::Forbidden);
    }
    if !replacing && rooms.count() >= max {
        return Err(JoinRefusal::Limit);
    }
    Ok(())
}

impl Rooms {
    pub fn new(shards: usize, max_per_connection: usize) -> Self {
        Rooms {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            hasher: RandomState::new(),
            max_per_connection: max_per_connection.max(1),
            yield_cpu: false,
        }
    }

    /// Rooms whose large fan-outs offer the core to other threads between
    /// chunks (`comet.yield_cpu`).
    pub fn yielding_cpu(mut self, yield_cpu: bool) -> Self {
        self.yield_cpu = yield_cpu;
        self
    }

    fn shard(&self, id: &str) -> &Mutex<HashMap<Arc<str>, Arc<Room>>> {
        let index = self.hasher.hash_one(id) as usize % self.shards.len();
        &self.shards[index]
    }

    pub fn get(&self, id: &str) -> Option<Arc<Room>> {
        self.shard(id).lock().ok()?.get(id).cloned()
    }

    /// Adds the channel to the room, creating it if needed.
    pub fn join(&self, id: &str, channel: &Arc<Channel>) -> Option<Arc<Room>> {
        let mut shard = self.shard(id).lock().ok()?;
        let room = shard
            .entry(Arc::from(id))
            .or_insert_with_key(|key| Arc::new(Room::new(key.clone(), self.yield_cpu)))
            .clone();
        if let Ok(mut members) = room.members.lock() {
            let members = if channel.positioned().is_some() {
                &mut members.positioned
            } else {
                &mut members.channels
            };
            if members.insert(channel.id, channel.clone()).is_none() {
                room.online.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(room)
    }

    /// Removes the channel; an empty room is removed too.
    pub fn leave(&self, room: &Arc<Room>, channel_id: u64) {
        let Ok(mut shard) = self.shard(&room.id).lock() else {
            return;
        };
        let Ok(mut members) = room.members.lock() else {
            return;
        };
        if members.channels.remove(&channel_id).is_some()
            || members.positioned.remove(&channel_id).is_some()
        {
            room.online.fetch_sub(1, Ordering::Relaxed);
        }
        if members.channels.is_empty()
            && members.positioned.is_empty()
            && shard
                .get(&room.id)
                .is_some_and(|current| Arc::ptr_eq(current, room))
        {
            shard.remove(&room.id);
        }
    }

    /// Moves a channel's goim room (op 12) to `id` (empty: out of it). Moving
    /// to the room it is already in changes nothing (goim dropped the room
    /// when alone); moving to a room it joined besides makes that its goim
    /// room.
    pub fn change(&self, channel: &Arc<Channel>, id: &str) -> Result<(), JoinRefusal> {
        let Ok(mut rooms) = channel.rooms.lock() else {
            return Ok(());
        };
        if rooms.primary.as_ref().is_some_and(|room| &*room.id == id) {
            return Ok(());
        }
        if !id.is_empty() {
            // Making a room it joined besides its goim room adds none.
            let replacing = rooms.primary.is_some() || rooms.contains(id);
            check_join(&rooms, id, self.max_per_connection, replacing)?;
        }
        if let Some(old) = rooms.primary.take() {
            self.leave_room(channel, &old);
        }
        if !id.is_empty() {
            rooms.primary = match rooms.remove(id) {
                Some(joined) => Some(joined),
                None => self.join(id, channel),
            };
        }
        Ok(())
    }

    /// Adds room `id` to the channel's rooms (op 22, the auth body's
    /// `rooms`). `Ok(false)`: it was already in it.
    pub fn join_more(&self, channel: &Arc<Channel>, id: &str) -> Result<bool, JoinRefusal> {
        let Ok(mut rooms) = channel.rooms.lock() else {
            return Ok(false);
        };
        if rooms.contains(id) {
            return Ok(false);
        }
        check_join(&rooms, id, self.max_per_connection, false)?;
        if let Some(room) = self.join(id, channel) {
            rooms.add(room);
        }
        Ok(true)
    }

    /// Takes the channel out of room `id` (op 24; goim's room too). `false`:
    /// it was not in it.
    pub fn leave_one(&self, channel: &Arc<Channel>, id: &str) -> bool {
        let Ok(mut rooms) = channel.rooms.lock() else {
            return false;
        };
        let room = match rooms.remove(id) {
            Some(room) => room,
            None if rooms.primary.as_ref().is_some_and(|room| &*room.id == id) => {
                match rooms.primary.take() {
                    Some(room) => room,
                    None => return false,
                }
            }
            None => return false,
        };
        self.leave_room(channel, &room);
        true
    }

    /// Takes the channel out of every room (its connection ended).
    pub fn leave_all(&self, channel: &Arc<Channel>) {
        let all = match channel.rooms.lock() {
            Ok(mut rooms) => rooms.take_all(),
            Err(_) => return,
        };
        for room in all {
            self.leave_room(channel, &room);
        }
    }

    fn leave_room(&self, channel: &Channel, room: &Arc<Room>) {
        self.leave(room, channel.id);
        if let Some(state) = channel.positioned() {
            state.forget(&room.id);
        }
    }

    /// Members per room, for rooms with at least one member.
    pub fn counts(&self) -> HashMap<String, i32> {
        let mut counts = HashMap::new();
        for shard in &self.shards {
            if let Ok(shard) = shard.lock() {
                for room in shard.values() {
                    let online = room.local_online();
                    if online > 0 {
                        counts.insert(room.id.to_string(), online);
                    }
                }
            }
        }
        counts
    }

    /// Stores logic's cluster-wide counts (0 for rooms it does not know).
    pub fn set_all_online(&self, all: &HashMap<String, i32>) {
        for shard in &self.shards {
            if let Ok(shard) = shard.lock() {
                for room in shard.values() {
                    let count = all.get(&*room.id).copied().unwrap_or(0);
                    room.all_online.store(count, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::TransportKind;
    use std::net::IpAddr;

    fn channel(id: u64) -> Arc<Channel> {
        Arc::new(Channel::new(
            id,
            format!("k{id}"),
            0,
            IpAddr::from([127, 0, 0, 1]),
            TransportKind::Tcp,
            8,
            &[],
        ))
    }

    #[test]
    fn a_connection_at_its_limit_may_still_make_a_joined_room_its_goim_room() {
        let rooms = Rooms::new(1, 2);
        let a = channel(1);
        assert_eq!(rooms.join_more(&a, "live://x"), Ok(true));
        assert_eq!(rooms.join_more(&a, "live://y"), Ok(true));
        assert_eq!(rooms.join_more(&a, "live://z"), Err(JoinRefusal::Limit));
        rooms.change(&a, "live://x").expect("no room added");
        assert_eq!(a.room_id().as_deref(), Some("live://x"));
        assert_eq!(rooms.change(&a, "live://z"), Ok(()), "replaces goim's room");
        let mut ids: Vec<String> = a.room_ids().iter().map(|id| id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["live://y", "live://z"]);
        assert!(rooms.get("live://x").is_none(), "an empty room is removed");
        rooms.leave_all(&a);
        assert!(a.room_ids().is_empty());
        assert_eq!(rooms.counts().len(), 0);
    }

    #[test]
    fn join_change_and_leave() {
        let rooms = Rooms::new(4, 16);
        let (a, b) = (channel(1), channel(2));
        rooms.change(&a, "live://1").expect("changed");
        rooms.change(&b, "live://1").expect("changed");
        assert_eq!(rooms.counts()["live://1"], 2);
        assert_eq!(a.room_online(), 2);

        rooms.change(&a, "live://2").expect("changed");
        assert_eq!(rooms.counts()["live://1"], 1);
        assert_eq!(rooms.counts()["live://2"], 1);

        rooms.change(&b, "").expect("changed");
        assert_eq!(
            rooms.get("live://1").map(|_| ()),
            None,
            "empty room removed"
        );
        assert_eq!(b.room_online(), 0);
        assert_eq!(rooms.len(), 1);
    }

    #[test]
    fn changing_to_the_same_room_keeps_it() {
        let rooms = Rooms::new(1, 16);
        let a = channel(1);
        rooms.change(&a, "live://1").expect("changed");
        rooms.change(&a, "live://1").expect("changed");
        assert_eq!(rooms.counts()["live://1"], 1);
        assert_eq!(a.room_id().as_deref(), Some("live://1"));
    }

    #[tokio::test]
    async fn redelivered_frames_reach_members_once() {
        use pushcluster_api::protocol::RawBatch;
        let rooms = Rooms::new(1, 16);
        let a = channel(1);
        rooms.change(&a, "live://1").expect("changed");
        let room = rooms.get("live://1").expect("room");
        let batch = |bodies: &[&str]| {
            let mut batch = RawBatch::default();
            for body in bodies {
                batch.push(1000, body.as_bytes());
            }
            batch.finish()
        };
        let mark = |seqs: &[u64]| StreamMark {
            epoch: 9,
            partition: 0,
            generation: 1,
            seqs: seqs.to_vec(),
        };
        let first = batch(&["1", "2"]);
        let (fanout, seen) = room
            .push(&EncodedPush::new(&first), &first, Some(&mark(&[1, 2])))
            .await;
        assert_eq!((fanout.queued, seen), (1, 0));
        // 2 again, with 3: only 3 goes out.
        let again = batch(&["2", "3"]);
        let (fanout, seen) = room
            .push(&EncodedPush::new(&again), &again, Some(&mark(&[2, 3])))
            .await;
        assert_eq!((fanout.queued, seen), (1, 1));
        let queued = a.drain().frames;
        assert_eq!(queued.len(), 2);
        // TCP bytes of the second push: just frame "3".
        assert_eq!(&queued[1][16..], b"3");
        // Wholly seen: nothing queued.
        let old = batch(&["1"]);
        let (fanout, seen) = room
            .push(&EncodedPush::new(&old), &old, Some(&mark(&[1])))
            .await;
        assert_eq!((fanout.queued, seen), (0, 1));
    }

    thread_local! {
        /// `yield_cpu` calls on this thread.
        pub(super) static CPU_YIELDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// With `comet.yield_cpu`, a large room's fan-out offers the core to
    /// other threads once per chunk; a room of one chunk or less does not,
    /// nor does any room without the setting.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_rooms_fan_out_offers_the_core_between_its_chunks() {
        let yields = || CPU_YIELDS.with(|yields| yields.get());
        let rooms = Rooms::new(4, 16).yielding_cpu(true);
        let large: Vec<Arc<Channel>> = (0..FANOUT_CHUNK as u64 * 3).map(channel).collect();
        for member in &large {
            rooms.change(member, "live://large").expect("changed");
        }
        let small: Vec<Arc<Channel>> = (1_000_000..1_000_000 + FANOUT_CHUNK as u64)
            .map(channel)
            .collect();
        for member in &small {
            rooms.change(member, "live://small").expect("changed");
        }
        let frame = Frame::server(1000, bytes::Bytes::from_static(b"hi"));
        let push = EncodedPush::new(&frame);

        let before = yields();
        let room = rooms.get("live://large").expect("room");
        let (fanout, _) = room.push(&push, &frame, None).await;
        assert_eq!(fanout.queued, large.len() as u64);
        assert_eq!(yields() - before, 3, "one per chunk of {FANOUT_CHUNK}");

        let before = yields();
        let room = rooms.get("live://small").expect("room");
        let (fanout, _) = room.push(&push, &frame, None).await;
        assert_eq!(fanout.queued, small.len() as u64);
        assert_eq!(yields() - before, 0);

        let rooms = Rooms::new(4, 16);
        for member in &large {
            rooms.change(member, "live://default").expect("changed");
        }
        let before = yields();
        let room = rooms.get("live://default").expect("room");
        let (fanout, _) = room.push(&push, &frame, None).await;
        assert_eq!(fanout.queued, large.len() as u64);
        assert_eq!(yields() - before, 0, "off without the setting");
    }

    /// A busy room's fan-out leaves room for a quiet room's push between
    /// its chunks, and the busy room's own pushes stay in order.
    #[tokio::test(flavor = "current_thread")]
    async fn a_quiet_room_is_served_between_the_chunks_of_a_busy_one() {
        // In a task of its own: the test's body would be polled only after
        // a whole batch of spawned tasks.
        tokio::spawn(quiet_room_beside_a_busy_one())
            .await
            .expect("test task");
    }

    async fn quiet_room_beside_a_busy_one() {
        let rooms = Arc::new(Rooms::new(4, 16));
        // Eight chunks: the quiet push yields once itself, so it returns a
        // chunk or two after it queued.
        let busy: Vec<Arc<Channel>> = (0..FANOUT_CHUNK as u64 * 8).map(channel).collect();
        for member in &busy {
            rooms.change(member, "live://busy").expect("changed");
        }
        let quiet = channel(1_000_000);
        rooms.change(&quiet, "live://quiet").expect("changed");
        let frame = |body: &str| Frame::server(1000, bytes::Bytes::from(body.to_string()));
        let fan_out = |room: &'static str, body: &'static str| {
            let rooms = rooms.clone();
            tokio::spawn(async move {
                let frame = frame(body);
                let room = rooms.get(room).expect("room");
                room.push(&EncodedPush::new(&frame), &frame, None).await.0
            })
        };
        let first = fan_out("live://busy", "1");
        let second = fan_out("live://busy", "2");
        // The first busy push queues one chunk and yields.
        yield_to_woken().await;
        let quiet_push = fan_out("live://quiet", "q").await.expect("quiet push");
        assert_eq!(quiet_push.queued, 1);
        let bodies = |member: &Channel| -> Vec<Vec<u8>> {
            member
                .drain()
                .frames
                .iter()
                .map(|tcp| tcp[16..].to_vec())
                .collect()
        };
        let mut received: Vec<Vec<Vec<u8>>> = busy.iter().map(|m| bodies(m)).collect();
        let reached = received.iter().filter(|r| !r.is_empty()).count();
        assert!(
            reached < busy.len(),
            "the quiet push waited for the whole busy room ({reached} reached)"
        );
        assert_eq!(first.await.expect("first").queued, busy.len() as u64);
        assert_eq!(second.await.expect("second").queued, busy.len() as u64);
        for (member, so_far) in busy.iter().zip(&mut received) {
            so_far.extend(bodies(member));
            assert_eq!(*so_far, [b"1".to_vec(), b"2".to_vec()], "in order");
        }
    }

    /// A small room's push returns only after its members' connection
    /// tasks ran, so whatever the caller wakes next cannot put them behind
    /// other work (in a fleet, the gRPC answer took their place).
    #[tokio::test(flavor = "current_thread")]
    async fn a_small_rooms_members_run_before_its_push_returns() {
        tokio::spawn(async {
            let rooms = Rooms::new(4, 16);
            let member = channel(1);
            rooms.change(&member, "live://small").expect("changed");
            let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let connection = tokio::spawn({
                let (member, written) = (member.clone(), written.clone());
                async move {
                    member.wait().await;
                    written.store(!member.drain().frames.is_empty(), Ordering::SeqCst);
                }
            });
            // The connection task starts waiting.
            yield_to_woken().await;
            let frame = Frame::server(1000, bytes::Bytes::from_static(b"hi"));
            let room = rooms.get("live://small").expect("room");
            let (fanout, _) = room.push(&EncodedPush::new(&frame), &frame, None).await;
            assert_eq!(fanout.queued, 1);
            assert!(
                written.load(Ordering::SeqCst),
                "the push returned before the member's task ran"
            );
            connection.await.expect("connection task");
        })
        .await
        .expect("test task");
    }

    #[test]
    fn cluster_counts_win_when_known() {
        let rooms = Rooms::new(1, 16);
        let a = channel(1);
        rooms.change(&a, "live://1").expect("changed");
        assert_eq!(a.room_online(), 1);
        rooms.set_all_online(&HashMap::from([("live://1".to_string(), 40)]));
        assert_eq!(a.room_online(), 40);
        rooms.set_all_online(&HashMap::new());
        assert_eq!(a.room_online(), 1);
    }
}
