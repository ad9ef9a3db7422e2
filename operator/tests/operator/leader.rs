//! Leader election against a mocked API server (tower-test) on a paused
//! clock: expiry is judged by when this replica saw the Lease change, never
//! by the holder's timestamps; every call has a deadline; a leader that
//! stops hands the Lease back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::ObjectMeta;
use kube::client::Body;
use pushcluster_operator::leader::{LeaderElector, LeaderError};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower_test::mock;

const LEASE: Duration = Duration::from_secs(15);

/// One Lease in memory, served with resourceVersion checks.
#[derive(Clone, Default)]
struct Leases {
    lease: Arc<Mutex<Option<Lease>>>,
    /// Requests are taken and never answered.
    hang: Arc<AtomicBool>,
}

impl Leases {
    fn holder(&self) -> Option<String> {
        self.lease
            .lock()
            .expect("lease")
            .as_ref()
            .and_then(|l| l.spec.as_ref()?.holder_identity.clone())
    }

    /// Another replica renews with its own (skewed) clock: `renewed` is
    /// whatever that clock says.
    fn renew_as(&self, holder: &str, renewed: Timestamp) {
        let mut lease = self.lease.lock().expect("lease");
        let version = lease
            .as_ref()
            .and_then(|l| l.metadata.resource_version.clone())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        *lease = Some(Lease {
            metadata: ObjectMeta {
                name: Some("leader".into()),
                namespace: Some("ops".into()),
                resource_version: Some((version + 1).to_string()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                acquire_time: Some(MicroTime(renewed)),
                renew_time: Some(MicroTime(renewed)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        });
    }

    fn answer(&self, method: &str, body: &[u8]) -> (StatusCode, Value) {
        let status = |code: u16, reason: &str| {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": reason, "reason": reason, "code": code})
        };
        let mut stored = self.lease.lock().expect("lease");
        match method {
            "GET" => match stored.as_ref() {
                Some(lease) => (StatusCode::OK, json!(lease)),
                None => (StatusCode::NOT_FOUND, status(404, "NotFound")),
            },
            "POST" | "PUT" => {
                let mut lease: Lease = serde_json::from_slice(body).expect("a Lease");
                let current = stored
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone());
                if (method == "POST" && stored.is_some())
                    || (method == "PUT" && lease.metadata.resource_version != current)
                {
                    return (StatusCode::CONFLICT, status(409, "Conflict"));
                }
                let version = current.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                lease.metadata.resource_version = Some((version + 1).to_string());
                *stored = Some(lease.clone());
                (StatusCode::OK, json!(lease))
            }
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                status(405, "MethodNotAllowed"),
            ),
        }
    }

    fn client(&self) -> Client {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let leases = self.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                if leases.hang.load(Ordering::SeqCst) {
                    held.push(send);
                    continue;
                }
                let (parts, body) = request.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let (code, answer) = leases.answer(parts.method.as_str(), &bytes);
                let response = Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                    .expect("response");
                send.send_response(response);
            }
        });
        Client::new(service, "ops")
    }

    fn elector(&self, identity: &str) -> LeaderElector {
        LeaderElector::new(self.client(), "ops", "leader", identity, LEASE)
    }
}

fn hours(n: i64) -> SignedDuration {
    SignedDuration::from_hours(n)
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_clock_lags_keeps_the_lease_while_it_renews() {
    let leases = Leases::default();
    // The holder's clock is an hour behind: judged by its renewTime, the
    // lease looks expired to everyone else.
    leases.renew_as("other", Timestamp::now() - hours(1));
    let me = leases.elector("me");
    let deadline = me.renew_deadline();
    assert!(!me.try_acquire(deadline).await.expect("answered"));
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(10)).await;
        leases.renew_as("other", Timestamp::now() - hours(1));
        assert!(
            !me.try_acquire(deadline).await.expect("answered"),
            "took a lease that is still being renewed"
        );
    }
    assert_eq!(leases.holder().as_deref(), Some("other"));
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_stops_changing_expires_whatever_its_renew_time_says() {
    let leases = Leases::default();
    // The holder's clock is an hour ahead and it then died: its renewTime
    // would keep the lease for an hour if compared with our clock.
    leases.renew_as("other", Timestamp::now() + hours(1));
    let me = leases.elector("me");
    let deadline = me.renew_deadline();
    assert!(!me.try_acquire(deadline).await.expect("answered"));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!me.try_acquire(deadline).await.expect("answered"));
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(
        me.try_acquire(deadline).await.expect("answered"),
        "unchanged for longer than its duration: expired"
    );
    assert_eq!(leases.holder().as_deref(), Some("me"));
}

#[tokio::test(start_paused = true)]
async fn every_lease_call_is_bounded_and_a_leader_that_cannot_renew_steps_down() {
    let leases = Leases::default();
    let me = Arc::new(leases.elector("me"));
    assert!(me.try_acquire(me.renew_deadline()).await.expect("answered"));
    leases.hang.store(true, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let error = me
        .try_acquire(me.renew_deadline())
        .await
        .expect_err("an API server that never answers");
    assert!(matches!(error, LeaderError::Deadline(_)), "{error}");
    assert_eq!(started.elapsed(), me.renew_deadline());

    // Keeping the lease: steps down within the renew deadline, before the
    // lease expires for the others.
    let (stop, lost) = (CancellationToken::new(), CancellationToken::new());
    let started = tokio::time::Instant::now();
    let keeper = {
        let (me, stop, lost) = (me.clone(), stop.clone(), lost.clone());
        tokio::spawn(async move { me.keep(stop, lost).await })
    };
    tokio::time::timeout(LEASE, lost.cancelled())
        .await
        .expect("stepped down before the lease expired");
    assert!(started.elapsed() <= me.renew_deadline() + Duration::from_secs(3));
    keeper.await.expect("keeper");
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_stops_hands_the_lease_to_a_standby_at_once() {
    let leases = Leases::default();
    let first = leases.elector("first");
    let standby = leases.elector("standby");
    assert!(
        first
            .try_acquire(first.renew_deadline())
            .await
            .expect("answered")
    );
    assert!(
        !standby
            .try_acquire(standby.renew_deadline())
            .await
            .expect("answered")
    );
    first.release().await.expect("released");
    assert_eq!(leases.holder(), None);
    assert!(
        standby
            .try_acquire(standby.renew_deadline())
            .await
            .expect("answered"),
        "a released lease is free without waiting for it to expire"
    );
    // Releasing a lease held by another replica changes nothing.
    first.release().await.expect("no-op");
    assert_eq!(leases.holder().as_deref(), Some("standby"));
}
