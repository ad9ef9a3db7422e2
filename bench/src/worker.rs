//! A worker holds a share of the client connections, records what arrives
//! and accounts for every push. It runs in the controller's process for
//! small runs, or as its own process (`pushcluster-bench worker`) so that
//! no process holds more than a share of the open-file limit.

use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::AsyncBufReadExt;

use crate::client::{Connection, Identity, Positions, Received, source_for};
use crate::report::cpu_seconds;
use crate::spec::{Fanout, FinalReport, Finish, WorkerEvent, WorkerSpec, now_nanos, stamp};

const SHARDS: usize = 8;
/// Latency histograms span 1 µs .. 10 min at 3 significant digits.
const LATENCY_MAX_US: u64 = 600_000_000;

pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).context("histogram")
}

/// (value, count) pairs of a histogram, to ship between processes.
pub fn pairs(histogram: &Histogram<u64>) -> Vec<(u64, u64)> {
    histogram
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub struct Worker {
    spec: WorkerSpec,
    started: Instant,
    received: AtomicU64,
    out_of_order: AtomicU64,
    last_receive: AtomicU64,
    closed: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Copies received of each push, by sequence number.
    copies: Vec<AtomicU32>,
    /// Which of this worker's connections opened (by offset from `first`).
    connected: Mutex<Vec<bool>>,
    failures_logged: AtomicU64,
    churn_stop: AtomicBool,
    churn_ok: AtomicU64,
    churn_failed: AtomicU64,
    churn_latency: Mutex<Histogram<u64>>,
    /// `--resume`: the run is over, connections that end stay closed.
    stopping: AtomicBool,
    resumes_recovered: AtomicU64,
    resumes_not_recovered: AtomicU64,
    replayed: AtomicU64,
    resume_gap: Mutex<Histogram<u64>>,
}

impl Worker {
    pub fn new(spec: WorkerSpec) -> anyhow::Result<Arc<Worker>> {
        let latency = (0..SHARDS)
            .map(|_| histogram().map(Mutex::new))
            .collect::<anyhow::Result<_>>()?;
        Ok(Arc::new(Worker {
            copies: (0..spec.max_pushes + spec.direct_pushes)
                .map(|_| AtomicU32::new(0))
                .collect(),
            connected: Mutex::new(vec![false; spec.count]),
            spec,
            started: Instant::now(),
            received: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            last_receive: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            latency,
            failures_logged: AtomicU64::new(0),
            churn_stop: AtomicBool::new(false),
            churn_ok: AtomicU64::new(0),
            churn_failed: AtomicU64::new(0),
            churn_latency: Mutex::new(histogram()?),
            stopping: AtomicBool::new(false),
            resumes_recovered: AtomicU64::new(0),
            resumes_not_recovered: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            resume_gap: Mutex::new(histogram()?),
        }))
    }

    /// Opens this worker's connections at its connect rate; returns how
    /// many opened and the global indices of those that failed.
    pub async fn connect_all(self: &Arc<Self>) -> (u64, Vec<usize>) {
        let gap = Duration::from_secs_f64(1.0 / self.spec.connect_rate.max(1.0));
        let mut next = tokio::time::Instant::now();
        let mut opening = Vec::with_capacity(self.spec.count);
        for offset in 0..self.spec.count {
            next += gap;
            tokio::time::sleep_until(next).await;
            let worker = self.clone();
            opening.push(tokio::spawn(async move {
                let index = worker.spec.first + offset;
                let identity = Identity::new(
                    &worker.spec.client.namespace,
                    index,
                    worker.spec.room_of(index),
                );
                let addr = worker.spec.client.addrs[index % worker.spec.client.addrs.len()];
                match Connection::open(&worker.spec.client, &identity, source_for(addr, index))
                    .await
                {
                    Ok(connection) => {
                        if let Ok(mut connected) = worker.connected.lock() {
                            connected[offset] = true;
                        }
                        tokio::spawn(worker.clone().receive(connection, index));
                        None
                    }
                    Err(error) => {
                        // The first few say why; the count is in the report.
                        if worker.failures_logged.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("connection {index} to {addr} failed: {error:#}");
                        }
                        Some(index)
                    }
                }
            }));
        }
        let mut failed = Vec::new();
        for task in opening {
            if let Ok(Some(index)) = task.await {
                failed.push(index);
            }
        }
        ((self.spec.count - failed.len()) as u64, failed)
    }

    /// Records what connection `index` reads until it ends; a `--resume`
    /// client then reconnects (the next address, backing off) with the
    /// last position it saw, until the run is over. Order and copies are
    /// counted across its connections.
    async fn receive(self: Arc<Self>, connection: Connection, index: usize) {
        let shard = &self.latency[index % SHARDS];
        let client = &self.spec.client;
        let identity = Identity::new(&client.namespace, index, self.spec.room_of(index));
        // The last push seen of the scenario's, and of the direct ones.
        let mut last_seq: [Option<u64>; 2] = [None, None];
        let mut since = Positions::default();
        let mut closed_at: Option<Instant> = None;
        let mut next = Some(connection);
        let mut attempt = index;
        while let Some(connection) = next.take() {
            // Until its op-20 reply: the room's, the user's stream's.
            let rejoin = closed_at.is_some();
            let mut replaying = [rejoin; 2];
            let mut body_of_user = false;
            connection
                .receive(|received| match received {
                    Received::Body(body) => {
                        if replaying[usize::from(body_of_user)] {
                            self.replayed.fetch_add(1, Ordering::Relaxed);
                        }
                        self.record(shard, &mut last_seq, body);
                        body_of_user = false;
                    }
                    Received::Position { user, since: at } => {
                        since.set(user, at);
                        body_of_user = user;
                    }
                    Received::Resumed {
                        user,
                        recovered,
                        since: at,
                    } => {
                        since.set(user, at);
                        replaying[usize::from(user)] = false;
                        if rejoin {
                            let counter = if recovered {
                                &self.resumes_recovered
                            } else {
                                &self.resumes_not_recovered
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        // The gap: from the end to the room's reply.
                        if user {
                            return;
                        }
                        if let Some(closed) = closed_at.take()
                            && let Ok(mut gap) = self.resume_gap.lock()
                        {
                            let micros = closed.elapsed().as_micros() as u64;
                            let _ = gap.record(micros.clamp(1, LATENCY_MAX_US));
                        }
                    }
                })
                .await;
            self.closed.fetch_add(1, Ordering::Relaxed);
            if !client.resume {
                return;
            }
            closed_at.get_or_insert_with(Instant::now);
            let mut delay = Duration::from_millis(50);
            while next.is_none() {
                if self.stopping.load(Ordering::Relaxed) {
                    return;
                }
                attempt += 1;
                let addr = client.addrs[attempt % client.addrs.len()];
                let source = source_for(addr, index);
                match Connection::open_at(client, addr, &identity, source, since).await {
                    Ok(connection) => next = Some(connection),
                    Err(_) => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                }
            }
        }
    }

    /// Counts one received body: copies of its push, order (of the
    /// scenario's pushes and of the direct ones, each), latency.
    fn record(&self, shard: &Mutex<Histogram<u64>>, last_seq: &mut [Option<u64>; 2], body: &[u8]) {
        let now = now_nanos();
        self.received.fetch_add(1, Ordering::Relaxed);
        self.last_receive.fetch_max(now, Ordering::Relaxed);
        let Some((sent, seq)) = stamp(body) else {
            return;
        };
        let last_seq = &mut last_seq[usize::from(seq >= self.spec.max_pushes as u64)];
        if last_seq.is_some_and(|last| seq <= last) {
            self.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        *last_seq = Some(seq);
        if let Some(copies) = self.copies.get(seq as usize) {
            copies.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut histogram) = shard.lock() {
            let micros = (now.saturating_sub(sent) / 1000).clamp(1, LATENCY_MAX_US);
            let _ = histogram.record(micros);
        }
    }

    /// Connections that open, wait `churn_hold_ms` and close, at
    /// `churn_rate` per second until [`Worker::finish`].
    pub fn start_churn(self: &Arc<Self>) {
        if self.spec.churn_rate <= 0.0 {
            return;
        }
        let worker = self.clone();
        tokio::spawn(async move {
            let gap = Duration::from_secs_f64(1.0 / worker.spec.churn_rate);
            let hold = Duration::from_millis(worker.spec.churn_hold_ms);
            let mut next = tokio::time::Instant::now();
            let mut n: usize = 0;
            while !worker.churn_stop.load(Ordering::Relaxed) {
                next += gap;
                tokio::time::sleep_until(next).await;
                n += 1;
                let worker = worker.clone();
                tokio::spawn(async move {
                    // Beyond the stable connections' indices and keys.
                    let index = worker.spec.total + worker.spec.worker * 100_000_000 + n;
                    let mut identity = Identity::new(
                        &worker.spec.client.namespace,
                        index,
                        n % worker.spec.rooms.max(1),
                    );
                    identity.key = format!("churn-{}-{n}", worker.spec.worker);
                    let addr = worker.spec.client.addrs[index % worker.spec.client.addrs.len()];
                    // Churned sockets linger in TIME_WAIT: rotate sources.
                    let source = source_for(addr, 0).map(|_| {
                        Ipv4Addr::new(
                            127,
                            1,
                            (worker.spec.worker % 250) as u8,
                            1 + ((n / 1000) % 250) as u8,
                        )
                    });
                    let started = Instant::now();
                    match Connection::open(&worker.spec.client, &identity, source).await {
                        Ok(connection) => {
                            let micros = (started.elapsed().as_micros() as u64).max(1);
                            if let Ok(mut histogram) = worker.churn_latency.lock() {
                                let _ = histogram.record(micros.min(LATENCY_MAX_US));
                            }
                            worker.churn_ok.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(hold).await;
                            connection.close().await;
                        }
                        Err(error) => {
                            if worker.churn_failed.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("churned connection failed: {error:#}");
                            }
                        }
                    }
                });
            }
        });
    }

    /// (received, closed by the server, churned connections so far).
    pub fn progress(&self) -> (u64, u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.closed.load(Ordering::Relaxed),
            self.churn_ok.load(Ordering::Relaxed),
        )
    }

    /// Stops churning and accounts for every push: `finish.pushes` were
    /// attempted, `finish.refused` of them refused by the server.
    pub fn finish(&self, finish: &Finish) -> anyhow::Result<FinalReport> {
        self.churn_stop.store(true, Ordering::Relaxed);
        self.stopping.store(true, Ordering::Relaxed);
        let connected = self.connected.lock().map(|c| c.clone()).unwrap_or_default();
        let refused: std::collections::HashSet<u64> = finish.refused.iter().copied().collect();
        let spec = &self.spec;
        let rooms = spec.rooms.max(1);
        // Who of this worker's connections each push should reach.
        let mut room_members: Vec<u64> = vec![0; rooms];
        for (offset, open) in connected.iter().enumerate() {
            if *open {
                for room in spec.client.rooms_of(spec.first + offset, rooms) {
                    room_members[room] += 1;
                }
            }
        }
        let open_connections = connected.iter().filter(|open| **open).count() as u64;
        let mine = |index: usize| {
            index
                .checked_sub(spec.first)
                .and_then(|offset| connected.get(offset).copied())
                .unwrap_or(false)
        };
        let (mut lost, mut duplicated) = (0u64, 0u64);
        for (seq, copies) in self.copies.iter().enumerate() {
            let seq = seq as u64;
            let copies = u64::from(copies.load(Ordering::Relaxed));
            let direct = seq.checked_sub(spec.max_pushes as u64);
            let expected = if refused.contains(&seq) {
                0
            } else if let Some(n) = direct {
                // A direct push reaches its one user's connection.
                if n < finish.direct {
                    Fanout::mid_targets(n, 1, spec.total)
                        .filter(|&index| mine(index))
                        .count() as u64
                } else {
                    0
                }
            } else if seq >= finish.pushes {
                0
            } else {
                match spec.fanout {
                    Fanout::Room => room_members[(seq % rooms as u64) as usize],
                    Fanout::Broadcast => open_connections,
                    Fanout::Mids { per_push } => Fanout::mid_targets(seq, per_push, spec.total)
                        .filter(|&index| mine(index))
                        .count() as u64,
                }
            };
            lost += expected.saturating_sub(copies);
            duplicated += copies.saturating_sub(expected);
        }
        let mut latency = histogram()?;
        for shard in &self.latency {
            if let Ok(shard) = shard.lock() {
                latency.add(&*shard).context("histogram")?;
            }
        }
        let churn_latency = self
            .churn_latency
            .lock()
            .map(|h| pairs(&h))
            .unwrap_or_default();
        Ok(FinalReport {
            received: self.received.load(Ordering::Relaxed),
            lost,
            duplicated,
            out_of_order: self.out_of_order.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            latency_us: pairs(&latency),
            last_receive_ns: self.last_receive.load(Ordering::Relaxed),
            cpu_seconds: cpu_seconds(None).unwrap_or(0.0),
            wall_seconds: self.started.elapsed().as_secs_f64(),
            churn_ok: self.churn_ok.load(Ordering::Relaxed),
            churn_failed: self.churn_failed.load(Ordering::Relaxed),
            churn_latency_us: churn_latency,
            resumes_recovered: self.resumes_recovered.load(Ordering::Relaxed),
            resumes_not_recovered: self.resumes_not_recovered.load(Ordering::Relaxed),
            replayed: self.replayed.load(Ordering::Relaxed),
            resume_gap_us: self
                .resume_gap
                .lock()
                .map(|h| pairs(&h))
                .unwrap_or_default(),
        })
    }
}

fn emit(event: &WorkerEvent) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, event)?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(())
}

/// `pushcluster-bench worker`: runs one worker, talking JSON lines with
/// the controller (events on stdout, the [`Finish`] on stdin).
pub async fn run_process(spec: WorkerSpec) -> anyhow::Result<()> {
    let worker = Worker::new(spec)?;
    let (connected, failed) = worker.connect_all().await;
    emit(&WorkerEvent::Ready { connected, failed })?;
    worker.start_churn();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let (received, closed, churned) = worker.progress();
                emit(&WorkerEvent::Progress { received, closed, churned })?;
            }
            line = stdin.next_line() => {
                let finish: Finish = match line? {
                    Some(line) => serde_json::from_str(&line).context("a Finish line")?,
                    // The controller is gone: nothing to report to.
                    None => return Ok(()),
                };
                let report = worker.finish(&finish)?;
                emit(&WorkerEvent::Final(Box::new(report)))?;
                return Ok(());
            }
        }
    }
}
