//! Publishing through a server's HTTP API: goim's push routes, or the
//! Pusher HTTP events API with its HMAC-SHA256 request signature.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

use crate::spec::{Fanout, PUSH_OP, PUSHER_EVENT, ServerKind, mid_of};

/// A Pusher application's credentials.
#[derive(Clone, Debug)]
pub struct PusherApp {
    pub id: String,
    pub key: String,
    pub secret: String,
}

/// How long one push may take before it counts as refused.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Publisher {
    client: reqwest::Client,
    server: ServerKind,
    http: Vec<SocketAddr>,
    app: PusherApp,
    total: usize,
    rooms: usize,
    namespace: String,
    /// Pushes the server refused with 429 (backpressure).
    throttled: Arc<AtomicU64>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The query string of a signed Pusher request (`auth_signature` last).
pub fn pusher_signed_query(app: &PusherApp, path: &str, body: &str, timestamp: u64) -> String {
    let body_md5 = hex(&Md5::digest(body.as_bytes()));
    // Parameters in key order, as the signature requires.
    let query = format!(
        "auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={body_md5}",
        app.key
    );
    let mut mac = match Hmac::<Sha256>::new_from_slice(app.secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    format!("{query}&auth_signature={signature}")
}

impl Publisher {
    pub fn new(
        server: ServerKind,
        http: Vec<SocketAddr>,
        app: PusherApp,
        total: usize,
        rooms: usize,
        concurrency: usize,
    ) -> anyhow::Result<Publisher> {
        Publisher::with_timeout(server, http, app, total, rooms, concurrency, PUSH_TIMEOUT)
    }

    /// As [`Publisher::new`], with each push bounded by `timeout`.
    pub fn with_timeout(
        server: ServerKind,
        http: Vec<SocketAddr>,
        app: PusherApp,
        total: usize,
        rooms: usize,
        concurrency: usize,
        timeout: Duration,
    ) -> anyhow::Result<Publisher> {
        if http.is_empty() {
            bail!("no HTTP address to push to");
        }
        // A server out of file descriptors can take a connection into its
        // backlog and never answer: without a bound, the pushers waited
        // forever and the run printed "pushes 0" until it was killed.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency.max(16))
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()?;
        Ok(Publisher {
            client,
            server,
            http,
            app,
            total,
            rooms: rooms.max(1),
            namespace: "bench".into(),
            throttled: Arc::default(),
        })
    }

    /// Pushes to the rooms of `namespace` (`--namespace`).
    pub fn in_namespace(mut self, namespace: &str) -> Publisher {
        self.namespace = namespace.to_string();
        self
    }

    /// Publishes push `seq`; true when the server accepted it.
    pub async fn push(&self, seq: u64, fanout: Fanout, body: String) -> bool {
        let http = self.http[seq as usize % self.http.len()];
        let room = seq % self.rooms as u64;
        let request = match (self.server, fanout) {
            (ServerKind::Goim, Fanout::Room) => self.client.post(format!(
                "http://{http}/goim/push/room?operation={PUSH_OP}&type={}&room={room}",
                self.namespace
            )),
            (ServerKind::Goim, Fanout::Broadcast) => self
                .client
                .post(format!("http://{http}/goim/push/all?operation={PUSH_OP}")),
            (ServerKind::Goim, Fanout::Mids { per_push }) => {
                let mut url = format!("http://{http}/goim/push/mids?operation={PUSH_OP}");
                for index in Fanout::mid_targets(seq, per_push, self.total) {
                    url.push_str(&format!("&mids={}", mid_of(index)));
                }
                self.client.post(url)
            }
            (ServerKind::Pusher, Fanout::Room) => {
                let path = format!("/apps/{}/events", self.app.id);
                let event = serde_json::json!({
                    "name": PUSHER_EVENT,
                    "channel": format!("{}-{room}", self.namespace),
                    "data": body,
                })
                .to_string();
                let timestamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let query = pusher_signed_query(&self.app, &path, &event, timestamp);
                return self
                    .send(
                        self.client
                            .post(format!("http://{http}{path}?{query}"))
                            .header("content-type", "application/json")
                            .body(event),
                        false,
                    )
                    .await;
            }
            (ServerKind::Pusher, _) => return false,
        };
        self.send(request.body(body), true).await
    }

    /// Pushes refused with 429 so far.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    async fn send(&self, request: reqwest::RequestBuilder, goim: bool) -> bool {
        let Ok(response) = request.send().await else {
            return false;
        };
        if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            // Backpressure: this pusher waits as asked (at most 10 s), which
            // is how a well-behaved publisher slows down.
            self.throttled.fetch_add(1, Ordering::Relaxed);
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1)
                .min(10);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            return false;
        }
        let success = response.status().is_success();
        let Ok(bytes) = response.bytes().await else {
            return false;
        };
        if goim {
            serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v["code"] == 0)
        } else {
            success
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_never_answers_refuses_the_push_in_bounded_time() {
        // Takes the connection and the request, never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let publisher = Publisher::with_timeout(
            ServerKind::Goim,
            vec![addr],
            PusherApp {
                id: "1".into(),
                key: "k".into(),
                secret: "s".into(),
            },
            10,
            1,
            1,
            Duration::from_millis(300),
        )
        .expect("publisher");
        let started = std::time::Instant::now();
        let accepted = tokio::time::timeout(
            Duration::from_secs(10),
            publisher.push(0, Fanout::Room, "x".into()),
        )
        .await
        .expect("the push gave up instead of waiting forever");
        assert!(!accepted, "a push without an answer is not counted as sent");
        assert!(started.elapsed() < Duration::from_secs(5));
        silent.abort();
    }

    /// The example of Pusher's HTTP API reference ("Generating
    /// authentication signatures").
    #[test]
    fn pusher_signature_matches_the_reference_example() {
        let app = PusherApp {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        };
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let query = pusher_signed_query(&app, "/apps/3/events", body, 1353088179);
        assert_eq!(
            query,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }
}
