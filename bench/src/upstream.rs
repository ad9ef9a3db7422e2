//! `upstream`: clients send messages to the backend (op 4) as fast as the
//! server answers them (op 5), one in flight per connection — the
//! upstream throughput of a comet and the latency of its answers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use pushcluster_api::protocol::{Frame, decode_server_stream, op};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{Connection, Identity, source_for};
use crate::controller::Plan;
use crate::report::{Report, cpu_seconds};
use crate::spec::ServerKind;
use crate::worker::histogram;

/// What all connections saw.
#[derive(Default)]
struct Tally {
    /// Op-5 answers by result: accepted, or the error.
    answers: BTreeMap<String, u64>,
    /// Connections the server closed before the end (a frame-rate limit,
    /// `comet.limits.frames_per_second_per_connection`, closes them).
    closed: u64,
}

/// Runs `connections` goim TCP clients sending `size`-byte messages for
/// `duration`, each waiting for the answer to its last one.
pub async fn run(plan: &Plan, duration: Duration, size: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(
        plan.client.server == ServerKind::Goim,
        "upstream messages are pushcluster's (goim protocol)"
    );
    let mut connections = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        let identity = Identity::new(&plan.client.namespace, index, index % plan.rooms.max(1));
        let addr = plan.client.addrs[index % plan.client.addrs.len()];
        let connection = Connection::open(&plan.client, &identity, source_for(addr, index))
            .await
            .with_context(|| format!("connection {index}"))?;
        connections.push(connection);
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let latency = Arc::new(Mutex::new(histogram()?));
    let cpu_start: Vec<f64> = plan
        .pids
        .iter()
        .map(|pid| cpu_seconds(Some(*pid)).unwrap_or(0.0))
        .collect();
    let started = Instant::now();
    let deadline = started + duration;
    let body = "u".repeat(size.max(1));
    let mut tasks = Vec::new();
    for connection in connections {
        let Connection::GoimTcp {
            mut stream,
            mut buf,
        } = connection
        else {
            anyhow::bail!("the upstream scenario needs TCP clients");
        };
        let (tally, latency, body) = (tally.clone(), latency.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 10;
            while Instant::now() < deadline {
                seq += 1;
                let frame = Frame {
                    ver: 1,
                    op: op::SEND_MSG,
                    seq,
                    body: body.clone().into(),
                };
                let sent = Instant::now();
                let answer = match stream.write_all(&frame.encode()).await {
                    Ok(()) => read_answer(&mut stream, &mut buf, seq).await,
                    Err(_) => None,
                };
                let Some(answer) = answer else {
                    if let Ok(mut tally) = tally.lock() {
                        tally.closed += 1;
                    }
                    return;
                };
                if let Ok(mut latency) = latency.lock() {
                    let micros = sent.elapsed().as_micros() as u64;
                    let _ = latency.record(micros.max(1));
                }
                if let Ok(mut tally) = tally.lock() {
                    *tally.answers.entry(answer).or_default() += 1;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tally = tally
        .lock()
        .map_err(|_| anyhow::anyhow!("tally poisoned"))?;
    let accepted = tally.answers.get("accepted").copied().unwrap_or(0);
    let mut report = Report::new();
    report.add("scenario", "upstream");
    report.add("connections", plan.connections as u64);
    report.add("message_bytes", size as u64);
    for (result, count) in &tally.answers {
        report.add(format!("answers_{result}"), *count);
    }
    report.add("connections_closed_by_server", tally.closed);
    report.add("accepted_per_s", accepted as f64 / elapsed);
    if let Ok(latency) = latency.lock() {
        report.latency("answer", &latency);
    }
    let mut server_cpu = 0.0;
    for (i, pid) in plan.pids.iter().enumerate() {
        let cpu = cpu_seconds(Some(*pid)).unwrap_or(0.0) - cpu_start[i];
        report.add(format!("server_{i}_cpu_seconds"), cpu);
        server_cpu += cpu;
    }
    if accepted > 0 {
        report.add(
            "server_cpu_us_per_message",
            server_cpu * 1e6 / accepted as f64,
        );
    }
    report.add("generator_cpu_seconds", cpu_seconds(None).unwrap_or(0.0));
    Ok(report)
}

/// Reads frames until the op-5 answer to `seq`: "accepted" or its error.
async fn read_answer(
    stream: &mut tokio::net::TcpStream,
    buf: &mut BytesMut,
    seq: i32,
) -> Option<String> {
    loop {
        while let Ok(Some(frame)) = decode_server_stream(buf) {
            if frame.op == op::SEND_MSG_REPLY && frame.seq == seq {
                let answer: serde_json::Value = serde_json::from_slice(&frame.body).ok()?;
                return Some(match answer["error"].as_str() {
                    Some(error) => error.to_string(),
                    None => "accepted".to_string(),
                });
            }
            if frame.op == op::SEND_MSG {
                return Some("upstream_off".to_string());
            }
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}
