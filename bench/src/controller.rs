//! The controller: starts the workers (in this process for small runs, as
//! child processes otherwise), pushes, shows progress, and sums up.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::oneshot;

use crate::push::{Publisher, PusherApp};
use crate::report::{Report, cpu_seconds, rss_bytes};
use crate::spec::{
    ClientSpec, Fanout, FinalReport, Finish, ServerKind, WorkerEvent, WorkerSpec, body, now_nanos,
};
use crate::worker::{Worker, histogram};

/// Everything a run needs to know about the server and the load.
#[derive(Clone, Debug)]
pub struct Plan {
    pub client: ClientSpec,
    pub http: Vec<std::net::SocketAddr>,
    pub app: PusherApp,
    pub pids: Vec<u32>,
    pub connections: usize,
    pub rooms: usize,
    pub connect_rate: f64,
    /// Connections per worker process.
    pub per_worker: usize,
    pub quiet: bool,
}

impl Plan {
    fn workers(&self) -> usize {
        self.connections.div_ceil(self.per_worker.max(1)).max(1)
    }

    fn specs(
        &self,
        fanout: Fanout,
        max_pushes: usize,
        churn_rate: f64,
        hold_ms: u64,
    ) -> Vec<WorkerSpec> {
        self.specs_with_direct(fanout, max_pushes, 0, churn_rate, hold_ms)
    }

    fn specs_with_direct(
        &self,
        fanout: Fanout,
        max_pushes: usize,
        direct_pushes: usize,
        churn_rate: f64,
        hold_ms: u64,
    ) -> Vec<WorkerSpec> {
        let workers = self.workers();
        let share = self.connections.div_ceil(workers);
        (0..workers)
            .map(|worker| {
                let first = (worker * share).min(self.connections);
                let count = share.min(self.connections - first);
                WorkerSpec {
                    client: self.client.clone(),
                    fanout,
                    first,
                    count,
                    total: self.connections,
                    rooms: self.rooms.max(1),
                    connect_rate: self.connect_rate / workers as f64,
                    max_pushes,
                    direct_pushes,
                    churn_rate: churn_rate / workers as f64,
                    churn_hold_ms: hold_ms,
                    worker,
                }
            })
            .collect()
    }
}

/// One worker, local or a child process.
enum Handle {
    Local(Arc<Worker>),
    Remote(Box<Remote>),
}

struct Remote {
    child: Child,
    stdin: ChildStdin,
    progress: Arc<Mutex<(u64, u64, u64)>>,
    report: oneshot::Receiver<FinalReport>,
}

struct Ready {
    connected: u64,
    failed: Vec<usize>,
}

fn worker_binary() -> anyhow::Result<std::path::PathBuf> {
    match std::env::var_os("PUSHCLUSTER_BENCH_BIN") {
        Some(path) => Ok(path.into()),
        None => std::env::current_exe().context("cannot find this executable for the workers"),
    }
}

impl Handle {
    /// Starts a worker and waits until its connections are open.
    async fn start(spec: WorkerSpec, local: bool) -> anyhow::Result<(Handle, Ready)> {
        if local {
            let worker = Worker::new(spec)?;
            let (connected, failed) = worker.connect_all().await;
            worker.start_churn();
            return Ok((Handle::Local(worker), Ready { connected, failed }));
        }
        let mut child = tokio::process::Command::new(worker_binary()?)
            .arg("worker")
            .arg("--spec")
            .arg(serde_json::to_string(&spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a worker process")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let progress = Arc::new(Mutex::new((0, 0, 0)));
        let (ready_tx, ready_rx) = oneshot::channel();
        let (report_tx, report_rx) = oneshot::channel();
        {
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                let (mut ready_tx, mut report_tx) = (Some(ready_tx), Some(report_tx));
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<WorkerEvent>(&line) {
                        Ok(WorkerEvent::Ready { connected, failed }) => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(Ready { connected, failed });
                            }
                        }
                        Ok(WorkerEvent::Progress {
                            received,
                            closed,
                            churned,
                        }) => {
                            if let Ok(mut progress) = progress.lock() {
                                *progress = (received, closed, churned);
                            }
                        }
                        Ok(WorkerEvent::Final(report)) => {
                            if let Some(tx) = report_tx.take() {
                                let _ = tx.send(*report);
                            }
                        }
                        Err(error) => eprintln!("worker said something odd ({error}): {line}"),
                    }
                }
            });
        }
        let ready = ready_rx
            .await
            .context("a worker exited before its connections were open")?;
        Ok((
            Handle::Remote(Box::new(Remote {
                child,
                stdin,
                progress,
                report: report_rx,
            })),
            ready,
        ))
    }

    fn progress(&self) -> (u64, u64, u64) {
        match self {
            Handle::Local(worker) => worker.progress(),
            Handle::Remote(remote) => remote.progress.lock().map(|p| *p).unwrap_or_default(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Handle::Local(_) => Some(std::process::id()),
            Handle::Remote(remote) => remote.child.id(),
        }
    }

    async fn finish(self, finish: &Finish) -> anyhow::Result<FinalReport> {
        match self {
            Handle::Local(worker) => worker.finish(finish),
            Handle::Remote(remote) => {
                let Remote {
                    mut child,
                    mut stdin,
                    report,
                    ..
                } = *remote;
                let mut line = serde_json::to_vec(finish)?;
                line.push(b'\n');
                stdin.write_all(&line).await?;
                stdin.flush().await?;
                let report = tokio::time::timeout(Duration::from_secs(60), report)
                    .await
                    .context("a worker did not report in time")?
                    .context("a worker exited without its report")?;
                let _ = child.wait().await;
                Ok(report)
            }
        }
    }
}

/// All workers of a run.
struct Workers {
    handles: Vec<Handle>,
    connected: u64,
    failed: Vec<usize>,
}

impl Workers {
    async fn start(plan: &Plan, specs: Vec<WorkerSpec>) -> anyhow::Result<Workers> {
        let local = specs.len() == 1;
        let started = Instant::now();
        let starts = specs.into_iter().map(|spec| Handle::start(spec, local));
        let mut handles = Vec::new();
        let (mut connected, mut failed) = (0, Vec::new());
        for result in futures_util::future::join_all(starts).await {
            let (handle, ready) = result?;
            connected += ready.connected;
            failed.extend(ready.failed);
            handles.push(handle);
        }
        failed.sort_unstable();
        if !plan.quiet {
            eprintln!(
                "connected {connected} of {} ({} failed) in {:.1}s with {} worker process(es)",
                plan.connections,
                failed.len(),
                started.elapsed().as_secs_f64(),
                if local { 0 } else { handles.len() },
            );
        }
        Ok(Workers {
            handles,
            connected,
            failed,
        })
    }

    fn progress(&self) -> (u64, u64, u64) {
        self.handles.iter().fold((0, 0, 0), |acc, h| {
            let p = h.progress();
            (acc.0 + p.0, acc.1 + p.1, acc.2 + p.2)
        })
    }

    fn generator_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.handles.iter().filter_map(Handle::pid).collect();
        pids.push(std::process::id());
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    async fn finish(self, finish: &Finish) -> anyhow::Result<Vec<FinalReport>> {
        let mut reports = Vec::new();
        for handle in self.handles {
            reports.push(handle.finish(finish).await?);
        }
        Ok(reports)
    }
}

/// Sums of the workers' reports.
struct Totals {
    received: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    closed: u64,
    last_receive_ns: u64,
    latency: Histogram<u64>,
    worker_cpu: f64,
    busiest_worker: f64,
    churn_ok: u64,
    churn_failed: u64,
    churn_latency: Histogram<u64>,
    resumes_recovered: u64,
    resumes_not_recovered: u64,
    replayed: u64,
    resume_gap: Histogram<u64>,
}

fn totals(reports: &[FinalReport], local: bool) -> anyhow::Result<Totals> {
    let mut totals = Totals {
        received: 0,
        lost: 0,
        duplicated: 0,
        out_of_order: 0,
        closed: 0,
        last_receive_ns: 0,
        latency: histogram()?,
        worker_cpu: 0.0,
        busiest_worker: 0.0,
        churn_ok: 0,
        churn_failed: 0,
        churn_latency: histogram()?,
        resumes_recovered: 0,
        resumes_not_recovered: 0,
        replayed: 0,
        resume_gap: histogram()?,
    };
    for report in reports {
        totals.received += report.received;
        totals.lost += report.lost;
        totals.duplicated += report.duplicated;
        totals.out_of_order += report.out_of_order;
        totals.closed += report.closed;
        totals.last_receive_ns = totals.last_receive_ns.max(report.last_receive_ns);
        for &(value, count) in &report.latency_us {
            totals.latency.record_n(value, count).context("histogram")?;
        }
        for &(value, count) in &report.churn_latency_us {
            totals
                .churn_latency
                .record_n(value, count)
                .context("histogram")?;
        }
        totals.churn_ok += report.churn_ok;
        totals.churn_failed += report.churn_failed;
        totals.resumes_recovered += report.resumes_recovered;
        totals.resumes_not_recovered += report.resumes_not_recovered;
        totals.replayed += report.replayed;
        for &(value, count) in &report.resume_gap_us {
            totals
                .resume_gap
                .record_n(value, count)
                .context("histogram")?;
        }
        if !local {
            // A local worker's CPU is the controller's own, counted apart.
            totals.worker_cpu += report.cpu_seconds;
            if report.wall_seconds > 0.0 {
                totals.busiest_worker = totals
                    .busiest_worker
                    .max(report.cpu_seconds / report.wall_seconds);
            }
        }
    }
    Ok(totals)
}

/// Server figures: RSS before and after the connections opened, CPU.
struct Servers {
    pids: Vec<u32>,
    rss_idle: Vec<Option<u64>>,
    rss_connected: Vec<Option<u64>>,
    cpu_start: Vec<Option<f64>>,
}

impl Servers {
    fn before_connecting(pids: &[u32]) -> Servers {
        Servers {
            pids: pids.to_vec(),
            rss_idle: pids.iter().map(|p| rss_bytes(*p)).collect(),
            rss_connected: Vec::new(),
            cpu_start: Vec::new(),
        }
    }

    fn connected(&mut self) {
        self.rss_connected = self.pids.iter().map(|p| rss_bytes(*p)).collect();
        self.cpu_start = self.pids.iter().map(|p| cpu_seconds(Some(*p))).collect();
    }

    /// Adds RSS per connection and CPU figures; returns the CPU seconds.
    fn report(&self, report: &mut Report, connections: u64, delivered: u64) -> f64 {
        let mut cpu_total = 0.0;
        let (mut rss_total, mut growth_total) = (0u64, 0u64);
        for (i, pid) in self.pids.iter().enumerate() {
            let rss = rss_bytes(*pid);
            let cpu = match (
                self.cpu_start.get(i).copied().flatten(),
                cpu_seconds(Some(*pid)),
            ) {
                (Some(start), Some(end)) => end - start,
                _ => 0.0,
            };
            cpu_total += cpu;
            rss_total += rss.unwrap_or(0);
            if let (Some(Some(idle)), Some(Some(connected))) =
                (self.rss_idle.get(i), self.rss_connected.get(i))
            {
                let growth = connected.saturating_sub(*idle);
                growth_total += growth;
                if self.pids.len() > 1 {
                    // A fleet: each process's share (in --pid order).
                    report.add(format!("server_{i}_pid"), u64::from(*pid));
                    report.add(format!("server_{i}_rss_growth_bytes"), growth);
                    report.add(format!("server_{i}_cpu_seconds"), cpu);
                }
            }
        }
        if self.pids.is_empty() {
            return 0.0;
        }
        report.add("server_rss_bytes", rss_total);
        if let (Some(per), Some(growth)) = (
            rss_total.checked_div(connections),
            growth_total.checked_div(connections),
        ) {
            report.add("server_rss_bytes_per_connection", per);
            report.add("server_rss_growth_bytes_per_connection", growth);
        }
        report.add("server_cpu_seconds", cpu_total);
        if delivered > 0 {
            report.add(
                "server_cpu_us_per_delivered_message",
                cpu_total * 1e6 / delivered as f64,
            );
        }
        cpu_total
    }
}

fn generator_figures(
    report: &mut Report,
    controller_cpu: f64,
    totals: &Totals,
    window: Duration,
    workers: &[u32],
) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let generator_cpu = controller_cpu + totals.worker_cpu;
    report.add("generator_cpu_seconds", generator_cpu);
    let rss: u64 = workers.iter().filter_map(|p| rss_bytes(*p)).sum();
    if rss > 0 {
        report.add("generator_rss_bytes", rss);
    }
    // Saturated: all cores busy with the generator, or one single-threaded
    // worker process at its limit.
    let saturated = generator_cpu / window.as_secs_f64().max(0.001) > 0.9 * cores
        || totals.busiest_worker > 0.9;
    report.add("generator_saturated", saturated);
    if saturated {
        eprintln!(
            "warning: the generator was saturated; these figures may measure it, not the server"
        );
    }
}

/// Prints a progress line every second until dropped.
/// Samples logic's largest partition lag every second from `url`.
#[allow(clippy::type_complexity)]
fn sample_lag(url: String) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<u64>>>) {
    let samples: Arc<Mutex<Vec<u64>>> = Arc::default();
    let task = tokio::spawn({
        let samples = samples.clone();
        async move {
            let http = reqwest::Client::new();
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            loop {
                ticks.tick().await;
                let text = match http.get(&url).timeout(Duration::from_secs(1)).send().await {
                    Ok(response) => response.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                let lag = text
                    .lines()
                    .find_map(|line| line.strip_prefix("pushcluster_logic_bus_lag_max_messages "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0) as u64;
                if let Ok(mut samples) = samples.lock() {
                    samples.push(lag);
                }
            }
        }
    });
    (task, samples)
}

fn progress_ticker(
    workers: &Workers,
    pushes: Arc<AtomicU64>,
    quiet: bool,
) -> Option<tokio::task::JoinHandle<()>> {
    if quiet {
        return None;
    }
    let progress: Vec<_> = workers
        .handles
        .iter()
        .map(|h| match h {
            Handle::Local(worker) => ProgressSource::Local(worker.clone()),
            Handle::Remote(remote) => ProgressSource::Remote(remote.progress.clone()),
        })
        .collect();
    let connected = workers.connected;
    Some(tokio::spawn(async move {
        let started = Instant::now();
        let mut last = (0u64, 0u64);
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let (received, closed, churned) = progress.iter().fold((0, 0, 0), |acc, p| {
                let v = p.get();
                (acc.0 + v.0, acc.1 + v.1, acc.2 + v.2)
            });
            let sent = pushes.load(Ordering::Relaxed);
            eprintln!(
                "[{:>5.1}s] connections {} (closed {closed})  pushes {sent} (+{})  received {received} (+{}/s)  churned {churned}",
                started.elapsed().as_secs_f64(),
                connected,
                sent - last.0,
                received - last.1,
            );
            last = (sent, received);
        }
    }))
}

enum ProgressSource {
    Local(Arc<Worker>),
    Remote(Arc<Mutex<(u64, u64, u64)>>),
}

impl ProgressSource {
    fn get(&self) -> (u64, u64, u64) {
        match self {
            ProgressSource::Local(worker) => worker.progress(),
            ProgressSource::Remote(progress) => progress.lock().map(|p| *p).unwrap_or_default(),
        }
    }
}

/// A push-and-measure run.
#[derive(Clone, Debug)]
pub struct Load {
    pub fanout: Fanout,
    /// Pushes per second; 0: as fast as `concurrency` pushers get answers.
    pub rate: f64,
    pub concurrency: usize,
    pub duration: Duration,
    pub size: usize,
    pub settle: Duration,
    pub max_pushes: usize,
    /// Pushes per second to single users (`/goim/push/mids`) besides the
    /// scenario's, walking over every connection's user; 0: none.
    pub direct_rate: f64,
    /// Sampled every second for the lag curve (`--lag-url`).
    pub lag_url: Option<String>,
}

fn check_support(server: ServerKind, fanout: Fanout) -> anyhow::Result<()> {
    if server == ServerKind::Pusher && fanout != Fanout::Room {
        bail!("the Pusher protocol has no per-user or broadcast push; use the room scenario");
    }
    Ok(())
}

/// What each push of a run adds up to.
#[derive(Clone)]
struct Tally {
    publisher: Publisher,
    sent: Arc<AtomicU64>,
    /// Sequence numbers of the pushes the server refused.
    refused: Arc<Mutex<Vec<u64>>>,
    /// Copies the workers should receive.
    expected: Arc<AtomicU64>,
    /// How many connections push `n` of a fanout reaches.
    expected_of: Arc<dyn Fn(u64, Fanout) -> u64 + Send + Sync>,
}

impl Tally {
    /// Push `n` of `fanout`, its body stamped with sequence `seq`.
    async fn push(&self, n: u64, fanout: Fanout, seq: u64, size: usize) {
        if self.publisher.push(n, fanout, body(seq, size)).await {
            self.expected
                .fetch_add((self.expected_of)(n, fanout), Ordering::Relaxed);
        } else if let Ok(mut refused) = self.refused.lock() {
            refused.push(seq);
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// Room, mids or broadcast pushes to connected clients.
pub async fn fanout(plan: &Plan, load: &Load) -> anyhow::Result<Report> {
    check_support(plan.client.server, load.fanout)?;
    let max_pushes = if load.rate > 0.0 {
        ((load.rate * load.duration.as_secs_f64() * 1.2) as usize + 100).min(load.max_pushes)
    } else {
        load.max_pushes
    };
    let max_direct = if load.direct_rate > 0.0 {
        (load.direct_rate * load.duration.as_secs_f64() * 1.2) as usize + 100
    } else {
        0
    };
    let mut servers = Servers::before_connecting(&plan.pids);
    let specs = plan.specs_with_direct(load.fanout, max_pushes, max_direct, 0.0, 0);
    let workers = Workers::start(plan, specs).await?;
    servers.connected();
    let local = workers.handles.len() == 1;

    // Who gets each push, to know when everything has arrived.
    let rooms = plan.rooms.max(1);
    let failed: std::collections::HashSet<usize> = workers.failed.iter().copied().collect();
    let mut room_members = vec![0u64; rooms];
    for index in (0..plan.connections).filter(|i| !failed.contains(i)) {
        for room in plan.client.rooms_of(index, rooms) {
            room_members[room] += 1;
        }
    }
    let expected_of = {
        let (connected, total) = (workers.connected, plan.connections);
        move |seq: u64, fanout: Fanout| -> u64 {
            match fanout {
                Fanout::Room => room_members[(seq % rooms as u64) as usize],
                Fanout::Broadcast => connected,
                Fanout::Mids { per_push } => Fanout::mid_targets(seq, per_push, total)
                    .filter(|i| !failed.contains(i))
                    .count() as u64,
            }
        }
    };

    let publisher = Publisher::new(
        plan.client.server,
        plan.http.clone(),
        plan.app.clone(),
        plan.connections,
        rooms,
        load.concurrency,
    )?
    .in_namespace(&plan.client.namespace);
    let controller_cpu_start = cpu_seconds(None).unwrap_or(0.0);
    let sent = Arc::new(AtomicU64::new(0));
    let ticker = progress_ticker(&workers, sent.clone(), plan.quiet);
    let seq = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let expected = Arc::new(AtomicU64::new(0));
    let tally = Tally {
        publisher: publisher.clone(),
        sent: sent.clone(),
        refused: refused.clone(),
        expected: expected.clone(),
        expected_of: Arc::new(expected_of),
    };
    let lag_curve = load.lag_url.clone().map(sample_lag);
    let started = Instant::now();
    let started_ns = now_nanos();
    let deadline = started + load.duration;
    // Closed loop: `concurrency` pushers, each waiting for its answer.
    // Paced (`rate` > 0): open loop, one ticker starting a push per tick
    // whether or not earlier answers came back (up to `concurrency` in
    // flight), so a slow answer does not lower the offered rate.
    let pushers = if load.rate > 0.0 {
        1
    } else {
        load.concurrency.max(1)
    };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(load.concurrency.max(1)));
    let mut tasks = Vec::new();
    for _ in 0..pushers {
        let (tally, seq, in_flight) = (tally.clone(), seq.clone(), in_flight.clone());
        let (rate, size, fanout) = (load.rate, load.size, load.fanout);
        tasks.push(tokio::spawn(async move {
            let mut ticks = (rate > 0.0).then(|| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut started_pushes = tokio::task::JoinSet::new();
            while Instant::now() < deadline {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                if n as usize >= max_pushes {
                    break;
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let tally = tally.clone();
                let push = async move {
                    let _permit = permit;
                    tally.push(n, fanout, n, size).await;
                };
                if ticks.is_some() {
                    started_pushes.spawn(push);
                } else {
                    push.await;
                }
            }
            while started_pushes.join_next().await.is_some() {}
        }));
    }
    // Direct pushes, paced on their own: push n to one user.
    let direct_sent = Arc::new(AtomicU64::new(0));
    if load.direct_rate > 0.0 {
        let (tally, in_flight, direct_sent) =
            (tally.clone(), in_flight.clone(), direct_sent.clone());
        let (rate, size, base) = (load.direct_rate, load.size, max_pushes as u64);
        tasks.push(tokio::spawn(async move {
            let direct = Fanout::Mids { per_push: 1 };
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut started_pushes = tokio::task::JoinSet::new();
            let mut n = 0u64;
            while Instant::now() < deadline && (n as usize) < max_direct {
                ticks.tick().await;
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let tally = tally.clone();
                started_pushes.spawn(async move {
                    let _permit = permit;
                    tally.push(n, direct, base + n, size).await;
                });
                n += 1;
                direct_sent.store(n, Ordering::Relaxed);
            }
            while started_pushes.join_next().await.is_some() {}
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let pushing = started.elapsed();
    let expected = expected.load(Ordering::Relaxed);
    let settle_until = Instant::now() + load.settle;
    while workers.progress().0 < expected && Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    let lag_curve = match lag_curve {
        Some((task, samples)) => {
            task.abort();
            samples.lock().map(|s| s.clone()).ok()
        }
        None => None,
    };
    let direct = direct_sent.load(Ordering::Relaxed);
    let attempted = sent.load(Ordering::Relaxed) - direct;
    let refused = refused.lock().map(|r| r.clone()).unwrap_or_default();
    let connected = workers.connected;
    let failed_count = workers.failed.len();
    let generator_pids = workers.generator_pids();
    let finish = Finish {
        pushes: attempted,
        refused: refused.clone(),
        direct,
    };
    let controller_cpu = cpu_seconds(None).unwrap_or(0.0) - controller_cpu_start;
    let reports = workers.finish(&finish).await?;
    let totals = totals(&reports, local)?;
    let window =
        Duration::from_nanos(totals.last_receive_ns.saturating_sub(started_ns)).max(pushing);

    let mut report = Report::new();
    report.add(
        "scenario",
        match load.fanout {
            Fanout::Room => "room",
            Fanout::Mids { .. } => "mids",
            Fanout::Broadcast => "broadcast",
        },
    );
    report.add("server", describe(&plan.client));
    report.add("connections", connected);
    report.add("connections_failed", failed_count as u64);
    report.add("connections_closed_by_server", totals.closed);
    report.add("rooms", rooms as u64);
    let direct_refused = refused.iter().filter(|&&n| n >= max_pushes as u64).count() as u64;
    let refused_count = refused.len() as u64 - direct_refused;
    report.add("pushes_sent", attempted - refused_count);
    report.add("pushes_refused", refused_count);
    if load.direct_rate > 0.0 {
        report.add("direct_pushes_sent", direct - direct_refused);
        report.add("direct_pushes_refused", direct_refused);
    }
    report.add("pushes_throttled", publisher.throttled());
    report.add("push_rate_per_s", attempted as f64 / pushing.as_secs_f64());
    report.add(
        "accepted_push_rate_per_s",
        (attempted - refused_count) as f64 / pushing.as_secs_f64(),
    );
    if let Some(curve) = lag_curve {
        report.add("lag_max_messages", curve.iter().copied().max().unwrap_or(0));
        let text: Vec<String> = curve.iter().map(u64::to_string).collect();
        report.add("lag_curve_per_s", text.join(","));
    }
    report.add("messages_expected", expected);
    report.add("messages_received", totals.received);
    report.add("messages_lost", totals.lost);
    report.add("messages_duplicated", totals.duplicated);
    if load.concurrency <= 1 {
        // One push at a time: publish order is sequence order.
        report.add("messages_out_of_order", totals.out_of_order);
    }
    report.add(
        "delivered_per_s",
        totals.received as f64 / window.as_secs_f64(),
    );
    report.latency("latency", &totals.latency);
    if plan.client.resume {
        report.add("resumes_recovered", totals.resumes_recovered);
        report.add("resumes_not_recovered", totals.resumes_not_recovered);
        report.add("messages_replayed", totals.replayed);
        // From a connection's end to the resume reply on the next one.
        report.latency("resume_gap", &totals.resume_gap);
    }
    servers.report(&mut report, connected, totals.received);
    generator_figures(
        &mut report,
        controller_cpu,
        &totals,
        window,
        &generator_pids,
    );
    Ok(report)
}

/// Lone pushes: one at a time, each waiting for the previous to arrive.
pub async fn lone(
    plan: &Plan,
    count: usize,
    interval: Duration,
    size: usize,
) -> anyhow::Result<Report> {
    if plan.connections > plan.per_worker {
        bail!("lone runs in one process: at most --per-worker connections");
    }
    let mut single_room = plan.clone();
    single_room.rooms = 1;
    let workers =
        Workers::start(&single_room, single_room.specs(Fanout::Room, count, 0.0, 0)).await?;
    let publisher = Publisher::new(
        plan.client.server,
        plan.http.clone(),
        plan.app.clone(),
        plan.connections,
        1,
        1,
    )?
    .in_namespace(&plan.client.namespace);
    let connected = workers.connected;
    let mut refused = Vec::new();
    for n in 0..count as u64 {
        let before = workers.progress().0;
        if !publisher.push(n, Fanout::Room, body(n, size)).await {
            refused.push(n);
            continue;
        }
        let wait_until = Instant::now() + Duration::from_secs(5);
        while workers.progress().0 < before + connected && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(interval).await;
    }
    let finish = Finish {
        pushes: count as u64,
        refused: refused.clone(),
        direct: 0,
    };
    let reports = workers.finish(&finish).await?;
    let totals = totals(&reports, true)?;
    let mut report = Report::new();
    report.add("scenario", "lone");
    report.add("server", describe(&plan.client));
    report.add("connections", connected);
    report.add("pushes_sent", count as u64 - refused.len() as u64);
    report.add("pushes_refused", refused.len() as u64);
    report.add("messages_received", totals.received);
    report.add("messages_lost", totals.lost);
    report.add("messages_duplicated", totals.duplicated);
    report.latency("latency", &totals.latency);
    Ok(report)
}

/// Connection churn: connections open, stay `hold`, close, at `rate` per
/// second for `duration`, next to `plan.connections` stable ones.
pub async fn churn(
    plan: &Plan,
    rate: f64,
    hold: Duration,
    duration: Duration,
) -> anyhow::Result<Report> {
    let mut servers = Servers::before_connecting(&plan.pids);
    let mut specs = plan.specs(Fanout::Room, 0, rate, hold.as_millis() as u64);
    // Churn needs no stable connections, but a worker per share of it.
    if plan.connections == 0 {
        let churners = ((rate / 2000.0).ceil() as usize).max(1);
        specs = (0..churners)
            .map(|worker| WorkerSpec {
                worker,
                churn_rate: rate / churners as f64,
                ..specs[0].clone()
            })
            .collect();
    }
    let workers = Workers::start(plan, specs).await?;
    servers.connected();
    let local = workers.handles.len() == 1;
    let controller_cpu_start = cpu_seconds(None).unwrap_or(0.0);
    let ticker = progress_ticker(&workers, Arc::new(AtomicU64::new(0)), plan.quiet);
    tokio::time::sleep(duration).await;
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    let connected = workers.connected;
    let generator_pids = workers.generator_pids();
    let controller_cpu = cpu_seconds(None).unwrap_or(0.0) - controller_cpu_start;
    let reports = workers.finish(&Finish::default()).await?;
    let totals = totals(&reports, local)?;
    let mut report = Report::new();
    report.add("scenario", "churn");
    report.add("server", describe(&plan.client));
    report.add("connections_stable", connected);
    report.add("churn_rate_requested_per_s", rate);
    report.add("churn_connects", totals.churn_ok);
    report.add("churn_failures", totals.churn_failed);
    report.add(
        "churn_connects_per_s",
        totals.churn_ok as f64 / duration.as_secs_f64(),
    );
    report.latency("handshake", &totals.churn_latency);
    servers.report(&mut report, connected, 0);
    generator_figures(
        &mut report,
        controller_cpu,
        &totals,
        duration,
        &generator_pids,
    );
    Ok(report)
}

/// Idle connections: opens them, holds them, reports memory.
pub async fn idle(plan: &Plan, hold: Duration) -> anyhow::Result<Report> {
    let mut servers = Servers::before_connecting(&plan.pids);
    let workers = Workers::start(plan, plan.specs(Fanout::Room, 0, 0.0, 0)).await?;
    // Let the server settle (reports, buffers) before measuring.
    tokio::time::sleep(hold).await;
    servers.connected();
    let connected = workers.connected;
    let failed = workers.failed.len();
    let generator_pids = workers.generator_pids();
    let generator_rss: u64 = generator_pids.iter().filter_map(|p| rss_bytes(*p)).sum();
    let (_, closed, _) = workers.progress();
    let reports = workers.finish(&Finish::default()).await?;
    let totals = totals(&reports, true)?;
    let mut report = Report::new();
    report.add("scenario", "idle");
    report.add("server", describe(&plan.client));
    report.add("connections", connected);
    report.add("connections_failed", failed as u64);
    report.add("connections_closed_by_server", closed.max(totals.closed));
    servers.report(&mut report, connected, 0);
    report.add("generator_rss_bytes", generator_rss);
    Ok(report)
}

fn describe(client: &ClientSpec) -> String {
    match client.server {
        ServerKind::Goim => format!(
            "goim/{}",
            match client.transport {
                crate::spec::Transport::Tcp => "tcp",
                crate::spec::Transport::Ws => "websocket",
            }
        ),
        ServerKind::Pusher => "pusher/websocket".to_string(),
    }
}
