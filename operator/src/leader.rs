//! Leader election with a `coordination.k8s.io/v1` Lease, so several
//! operator replicas are safe: only the holder reconciles. Writes use the
//! Lease's resourceVersion (optimistic concurrency), so two candidates can
//! never both win.
//!
//! As client-go does it: whether another replica's lease has expired is
//! judged by the local monotonic time at which this replica last saw the
//! record change — never by comparing the holder's `renewTime` with the local
//! clock, which two nodes with skewed clocks would read differently. Every
//! API call is bounded by the renew deadline, a leader that cannot renew
//! within it steps down, and a leader that stops hands the Lease back.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("lease request took longer than {0:?}")]
    Deadline(Duration),
}

/// The part of a Lease that says who leads; a change of any field is a
/// sign of life from its holder.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    lease_seconds: Option<i32>,
    acquire_time: Option<MicroTime>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            lease_seconds: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time.clone(),
            renew_time: spec.renew_time.clone(),
            transitions: spec.lease_transitions,
        }
    }
}

/// The record as last seen, and when (local monotonic time) it last changed.
struct Observed {
    record: Record,
    changed_at: Instant,
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    observed: Mutex<Option<Observed>>,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Self {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration,
            observed: Mutex::new(None),
        }
    }

    /// How long a leader may go without renewing before it steps down, and
    /// the bound of every API call (client-go: 10 s of a 15 s lease).
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// How often a leader renews and a candidate retries (client-go: 2 s).
    fn retry_period(&self) -> Duration {
        (self.lease_duration / 6).max(Duration::from_millis(500))
    }

    async fn bounded<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, LeaderError> {
        match tokio::time::timeout(limit, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(LeaderError::Deadline(limit)),
        }
    }

    /// Notes `record` as seen now; returns when it last changed.
    fn observe(&self, record: Record, now: Instant) -> Instant {
        let Ok(mut observed) = self.observed.lock() else {
            // A poisoned lock: treat the record as just changed (never
            // takes over early).
            return now;
        };
        match observed.as_mut() {
            Some(seen) if seen.record == record => seen.changed_at,
            _ => {
                *observed = Some(Observed {
                    record,
                    changed_at: now,
                });
                now
            }
        }
    }

    /// One attempt to take or keep the lease, each request bounded by
    /// `limit`; true if held afterwards.
    pub async fn try_acquire(&self, limit: Duration) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let existing = self.bounded(limit, self.api.get_opt(&self.name)).await?;
        let Some(existing) = existing else {
            let spec = LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            };
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(spec.clone()),
            };
            return match self
                .bounded(limit, self.api.create(&PostParams::default(), &lease))
                .await
            {
                Ok(_) => {
                    self.observe(Record::of(&spec), Instant::now());
                    Ok(true)
                }
                Err(LeaderError::Api(kube::Error::Api(response))) if response.code == 409 => {
                    Ok(false)
                }
                Err(error) => Err(error),
            };
        };
        let mut spec = existing.spec.clone().unwrap_or_default();
        let record = Record::of(&spec);
        let changed_at = self.observe(record.clone(), Instant::now());
        let ours = record.holder.as_deref() == Some(self.identity.as_str());
        if !ours && record.holder.is_some() {
            let lasts =
                Duration::from_secs(u64::try_from(record.lease_seconds.unwrap_or(0)).unwrap_or(0));
            if changed_at.elapsed() <= lasts {
                return Ok(false);
            }
            tracing::info!(holder = ?record.holder, unchanged_for = ?changed_at.elapsed(), "the leader's lease expired");
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        let mut lease = existing;
        lease.spec = Some(spec.clone());
        // Carries the resourceVersion we read: a concurrent writer wins instead.
        match self
            .bounded(
                limit,
                self.api.replace(&self.name, &PostParams::default(), &lease),
            )
            .await
        {
            Ok(_) => {
                self.observe(Record::of(&spec), Instant::now());
                Ok(true)
            }
            Err(LeaderError::Api(kube::Error::Api(response))) if response.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Waits until this replica holds the lease (or `stop`).
    pub async fn acquire(&self, stop: &CancellationToken) -> bool {
        let mut logged = false;
        loop {
            match self.try_acquire(self.renew_deadline()).await {
                Ok(true) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "became the leader");
                    return true;
                }
                Ok(false) => {
                    if !logged {
                        tracing::info!(lease = %self.name, "another replica leads; standing by");
                        logged = true;
                    }
                }
                Err(error) => tracing::warn!(%error, "leader election request failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(self.retry_period()) => {}
            }
        }
    }

    /// Renews the lease until `stop`; cancels `lost` when it was taken, or
    /// could not be renewed within the renew deadline (before it expires
    /// for the others, so two replicas never both reconcile).
    pub async fn keep(&self, stop: CancellationToken, lost: CancellationToken) {
        let mut last_renewed = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.retry_period()) => {}
            }
            let left = self.renew_deadline().saturating_sub(last_renewed.elapsed());
            match self.try_acquire(left).await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => {
                    tracing::error!("leader lease taken by another replica");
                    lost.cancel();
                    return;
                }
                Err(error) => tracing::warn!(%error, "leader lease renewal failed"),
            }
            if last_renewed.elapsed() >= self.renew_deadline() {
                tracing::error!(deadline = ?self.renew_deadline(), "could not renew the leader lease in time");
                lost.cancel();
                return;
            }
        }
    }

    /// Hands the lease back (client-go's ReleaseOnCancel) once this replica
    /// has stopped reconciling, so a standby takes over at once instead of
    /// after the lease expires. Does nothing if another replica holds it.
    pub async fn release(&self) -> Result<(), LeaderError> {
        let limit = self.renew_deadline();
        let Some(mut lease) = self.bounded(limit, self.api.get_opt(&self.name)).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now.clone());
        spec.acquire_time = Some(now);
        lease.spec = Some(spec);
        self.bounded(
            limit,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await?;
        tracing::info!(lease = %self.name, "released the leader lease");
        Ok(())
    }
}
