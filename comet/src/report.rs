//! RenewOnline: every `comet.online_report_interval` the comet tells logic
//! its room counts and node metadata, and learns the cluster-wide room
//! counts that heartbeat replies carry.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{MissedTickBehavior, timeout};
use tokio_util::sync::CancellationToken;

use crate::Comet;

/// goim retries a failed report after a second.
const RETRY: Duration = Duration::from_secs(1);

/// Reports until `stop`. The first report is made before this returns
/// `ready` (logic only sends pushes to comets it has heard from), retrying
/// every second until logic answers.
pub(crate) async fn run(
    comet: Arc<Comet>,
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut ticks = tokio::time::interval(comet.config().online_report_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        loop {
            let request = comet.online_request();
            let call = comet.logic().renew_online(request);
            let result = match timeout(comet.config().logic_timeout, call).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err("timed out".to_string()),
            };
            comet.metrics.rooms.set(comet.rooms.len() as i64);
            match result {
                Ok(reply) => {
                    comet.rooms.set_all_online(&reply.all_room_count);
                    comet
                        .metrics
                        .online_reports
                        .with_label_values(&["ok"])
                        .inc();
                    if failing {
                        tracing::info!("online reports to logic work again");
                        failing = false;
                    }
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                    break;
                }
                Err(error) => {
                    comet
                        .metrics
                        .online_reports
                        .with_label_values(&["error"])
                        .inc();
                    if !failing {
                        tracing::warn!(%error, "online report to logic failed; retrying");
                        failing = true;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        }
    }
}
