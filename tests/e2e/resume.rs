//! Positions and resume (docs/recovery.md): a client that opts in gets each
//! room message with its position, and after reconnecting (or changing
//! room) with the position it last saw, everything it missed, in order and
//! once, then an op-20 reply, then live messages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pushcluster_api::protocol::{Frame, FramePosition, decode_positioned_stream, op};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{QUIET, Server, TcpClient, WAIT, auth_frame, body, frame, wait_until};
use crate::fleet::Fleet;

/// A goim TCP client that opted in to positions.
pub struct PositionedClient {
    stream: TcpStream,
    buf: BytesMut,
}

/// What such a client reads: a frame and, for room messages, its position.
pub type Received = (Frame, Option<FramePosition>);

impl PositionedClient {
    /// Connects anonymously (no mid: no direct stream), authenticates with
    /// `"positions": true` (and `since` for `room` when given) and reads
    /// the auth reply.
    pub async fn join(addr: SocketAddr, room: &str, since: Option<&Value>) -> PositionedClient {
        let mut auth = json!({"room_id": room, "positions": true, "accepts": [1000]});
        if let Some(since) = since {
            auth["since"] = json!({ room: since });
        }
        Self::auth(addr, auth).await
    }

    /// Connects and authenticates with this auth body; reads the reply.
    pub async fn auth(addr: SocketAddr, auth: Value) -> PositionedClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut client = PositionedClient {
            stream,
            buf: BytesMut::new(),
        };
        client.send(&auth_frame(&auth)).await;
        let (reply, _) = client.recv().await;
        assert_eq!(reply.op, op::AUTH_REPLY);
        client
    }

    pub async fn send(&mut self, frame: &Frame) {
        self.stream.write_all(&frame.encode()).await.expect("write");
    }

    async fn read(&mut self) -> Option<Received> {
        loop {
            if let Some(received) =
                decode_positioned_stream(&mut self.buf).expect("valid server frame")
            {
                return Some(received);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    pub async fn recv(&mut self) -> Received {
        tokio::time::timeout(WAIT, self.read())
            .await
            .expect("a frame in time")
            .expect("connection open")
    }

    /// The op-20 reply after a join, as JSON.
    pub async fn resume_reply(&mut self) -> Value {
        let (frame, position) = self.recv().await;
        assert_eq!(frame.op, op::RESUME_REPLY, "{frame:?}");
        assert_eq!(position, None);
        serde_json::from_slice(&frame.body).expect("JSON resume reply")
    }

    /// `count` room messages: (body, offset), checking their epoch and room.
    pub async fn messages(&mut self, count: usize, epoch: &str, room: &str) -> Vec<(String, u64)> {
        let mut messages = Vec::new();
        while messages.len() < count {
            let (frame, position) = self.recv().await;
            let position = position.unwrap_or_else(|| panic!("no position on {frame:?}"));
            assert_eq!(
                (
                    position.epoch.to_string().as_str(),
                    position.stream.as_str()
                ),
                (epoch, room)
            );
            messages.push((body(&frame), position.offset));
        }
        messages
    }

    pub async fn expect_silence(&mut self) {
        if let Ok(Some(received)) = tokio::time::timeout(QUIET, self.read()).await {
            panic!("unexpected frame {received:?}");
        }
    }
}

async fn push_room(server: &Server, room: &str, body: &str) {
    server
        .push(
            &format!("/goim/push/room?operation=1000&type=live&room={room}"),
            body,
        )
        .await;
}

fn since(epoch: &str, offset: u64) -> Value {
    json!({"epoch": epoch, "offset": offset})
}

fn bodies(messages: &[(String, u64)]) -> Vec<&str> {
    messages.iter().map(|(body, _)| body.as_str()).collect()
}

#[tokio::test]
async fn a_client_that_comes_back_gets_what_it_missed_once_then_live() {
    let server = Server::start();
    let room = "live://1";
    let mut client = PositionedClient::join(server.tcp(), room, None).await;
    let joined = client.resume_reply().await;
    assert_eq!(
        (&joined["room"], &joined["recovered"], &joined["reason"]),
        (&json!(room), &json!(false), &json!("fresh"))
    );
    let epoch = joined["epoch"].as_str().expect("epoch string").to_string();
    // A goim client without positions in the same room.
    let mut plain = TcpClient::auth(server.tcp(), json!({"mid": 2, "room_id": room})).await;

    for body in ["m1", "m2"] {
        push_room(&server, "1", body).await;
    }
    let seen = client.messages(2, &epoch, room).await;
    assert_eq!(bodies(&seen), ["m1", "m2"]);
    assert!(seen[0].1 < seen[1].1, "offsets increase: {seen:?}");
    // The goim client's frames are goim's: a 16-byte header (its decoder
    // refuses any other) and the body.
    assert_eq!(body(&plain.recv().await), "m1");
    assert_eq!(body(&plain.recv().await), "m2");

    drop(client);
    for body in ["m3", "m4", "m5"] {
        push_room(&server, "1", body).await;
    }
    let last_seen = seen[1].1;
    let mut client =
        PositionedClient::join(server.tcp(), room, Some(&since(&epoch, last_seen))).await;
    let replayed = client.messages(3, &epoch, room).await;
    assert_eq!(bodies(&replayed), ["m3", "m4", "m5"]);
    let resumed = client.resume_reply().await;
    assert_eq!(
        (
            &resumed["recovered"],
            &resumed["replayed"],
            &resumed["offset"]
        ),
        (&json!(true), &json!(3), &json!(replayed[2].1)),
        "{resumed}"
    );
    push_room(&server, "1", "m6").await;
    let live = client.messages(1, &epoch, room).await;
    assert_eq!(bodies(&live), ["m6"]);
    assert!(live[0].1 > replayed[2].1);
    client.expect_silence().await;

    // Resuming from the newest position replays nothing and is complete.
    let mut again =
        PositionedClient::join(server.tcp(), room, Some(&since(&epoch, live[0].1))).await;
    let resumed = again.resume_reply().await;
    assert_eq!(
        (&resumed["recovered"], &resumed["replayed"]),
        (&json!(true), &json!(0))
    );
    assert_eq!(
        server
            .metric(
                "pushcluster_logic_resumes_total",
                &[("result", "recovered")]
            )
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_client_is_told_when_history_no_longer_reaches_back() {
    let server = Server::start_with(
        "history: { rooms: [ { prefix: 'live://brief', max_age: 1s, max_messages: 2 } ] }",
    );
    let room = "live://brief";
    let mut client = PositionedClient::join(server.tcp(), room, None).await;
    let joined = client.resume_reply().await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_string();
    let start = joined["offset"].as_u64().expect("offset");
    drop(client);

    // Three missed, two kept: not recovered, nothing replayed, and the
    // offset to go on from.
    for body in ["a", "b", "c"] {
        push_room(&server, "brief", body).await;
    }
    let mut client = PositionedClient::join(server.tcp(), room, Some(&since(&epoch, start))).await;
    let reply = client.resume_reply().await;
    assert_eq!(
        (&reply["recovered"], &reply["replayed"], &reply["reason"]),
        (&json!(false), &json!(0), &json!("too_many")),
        "{reply}"
    );
    let head = reply["offset"].as_u64().expect("offset");
    assert!(head >= start + 3, "{reply}");
    drop(client);

    // Another epoch (a restarted standalone): not recovered.
    let mut client = PositionedClient::join(server.tcp(), room, Some(&since("12345", head))).await;
    let reply = client.resume_reply().await;
    assert_eq!(
        (&reply["recovered"], &reply["reason"], &reply["epoch"]),
        (&json!(false), &json!("epoch_changed"), &json!(epoch))
    );
    drop(client);

    // Older than the room's max_age: expired.
    push_room(&server, "brief", "d").await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut client = PositionedClient::join(server.tcp(), room, Some(&since(&epoch, head))).await;
    let reply = client.resume_reply().await;
    assert_eq!(
        (&reply["recovered"], &reply["reason"]),
        (&json!(false), &json!("expired")),
        "{reply}"
    );
}

#[tokio::test]
async fn changing_room_resumes_the_new_room() {
    let server = Server::start();
    let mut client = PositionedClient::join(server.tcp(), "live://a", None).await;
    let joined = client.resume_reply().await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_string();
    let start = joined["offset"].as_u64().expect("offset");
    push_room(&server, "b", "b1").await;
    push_room(&server, "b", "b2").await;

    let change = json!({"room": "live://b", "since": since(&epoch, start)});
    client
        .send(&frame(op::CHANGE_ROOM, 7, &change.to_string()))
        .await;
    let (reply, _) = client.recv().await;
    assert_eq!((reply.op, reply.seq), (op::CHANGE_ROOM_REPLY, 7));
    let replayed = client.messages(2, &epoch, "live://b").await;
    assert_eq!(bodies(&replayed), ["b1", "b2"]);
    let resumed = client.resume_reply().await;
    assert_eq!(
        (&resumed["room"], &resumed["recovered"]),
        (&json!("live://b"), &json!(true))
    );
    // A plain room id (goim's op 12 body) joins fresh.
    client.send(&frame(op::CHANGE_ROOM, 8, "live://c")).await;
    let (reply, _) = client.recv().await;
    assert_eq!(
        (reply.op, &reply.body[..]),
        (op::CHANGE_ROOM_REPLY, &b"live://c"[..])
    );
    let fresh = client.resume_reply().await;
    assert_eq!(
        (&fresh["room"], &fresh["reason"]),
        (&json!("live://c"), &json!("fresh"))
    );
    push_room(&server, "c", "c1").await;
    assert_eq!(
        bodies(&client.messages(1, &epoch, "live://c").await),
        ["c1"]
    );
}

async fn push_to(server: &Server, target: &str, body: &str) {
    server
        .push(&format!("/goim/push/{target}&operation=1000"), body)
        .await;
}

impl PositionedClient {
    /// Frames until `replies` op-20 replies came: the bodies of each
    /// stream's positioned messages, and the replies.
    async fn until_resumed(
        &mut self,
        replies: usize,
    ) -> (HashMap<String, Vec<String>>, Vec<Value>) {
        let mut streams: HashMap<String, Vec<String>> = HashMap::new();
        let mut resumed = Vec::new();
        while resumed.len() < replies {
            let (frame, position) = self.recv().await;
            match position {
                Some(position) => streams
                    .entry(position.stream)
                    .or_default()
                    .push(body(&frame)),
                None => {
                    assert_eq!(frame.op, op::RESUME_REPLY, "{frame:?}");
                    resumed.push(serde_json::from_slice(&frame.body).expect("JSON"));
                }
            }
        }
        (streams, resumed)
    }
}

/// Pushes to a user and to a key are kept in their direct streams whether
/// or not anyone is online. A client with positions gets them positioned
/// and resumes its own streams — never another user's — and a goim client
/// of the same user gets the live ones as goim frames.
#[tokio::test]
async fn a_users_direct_messages_are_kept_while_it_is_away_and_replayed_once() {
    let server = Server::start();
    let auth = json!({"mid": 5, "key": "k5", "positions": true, "accepts": [1000]});
    let mut client = PositionedClient::auth(server.tcp(), auth.clone()).await;
    let joined = client.resume_reply().await;
    assert_eq!(
        (&joined["room"], &joined["reason"]),
        (&json!("@mid:5"), &json!("fresh"))
    );
    let epoch = joined["epoch"].as_str().expect("epoch").to_string();
    let mut plain = TcpClient::auth(server.tcp(), json!({"mid": 5, "accepts": [1000]})).await;

    push_to(&server, "mids?mids=5", "d1").await;
    push_to(&server, "keys?keys=k5", "k1").await;
    let mut positions = serde_json::Map::new();
    for _ in 0..2 {
        let (frame, position) = client.recv().await;
        let position = position.unwrap_or_else(|| panic!("no position on {frame:?}"));
        assert_eq!(position.epoch.to_string(), epoch);
        let expected = if position.stream == "@mid:5" {
            "d1"
        } else {
            "k1"
        };
        assert_eq!(body(&frame), expected, "{position:?}");
        positions.insert(position.stream, since(&epoch, position.offset));
    }
    assert_eq!(body(&plain.recv().await), "d1");

    drop(client);
    push_to(&server, "mids?mids=5", "d2").await;
    push_to(&server, "keys?keys=k5", "k2").await;
    push_to(&server, "mids?mids=5&mids=6", "d3").await;
    // Another user's stream, named in `since`, is not this client's.
    positions.insert("@mid:6".into(), since(&epoch, 0));
    let mut auth = auth;
    auth["since"] = Value::Object(positions);
    let mut client = PositionedClient::auth(server.tcp(), auth).await;
    let (streams, replies) = client.until_resumed(2).await;
    assert_eq!(streams["@mid:5"], ["d2", "d3"]);
    assert_eq!(streams["@key:k5"], ["k2"]);
    assert_eq!(streams.len(), 2, "{streams:?}");
    for reply in &replies {
        assert_eq!(reply["recovered"], json!(true), "{reply}");
    }
    client.expect_silence().await;
    assert_eq!(body(&plain.recv().await), "d2");
    assert_eq!(body(&plain.recv().await), "d3");
    plain.expect_silence().await;
}

/// One resuming client of the distributed tests, user `mid`: joins any
/// comet of `comets` that answers, reads room messages and pushes to its
/// user, and whenever its connection ends joins again with the last
/// position it saw in each — until it has `total` of each. Returns the
/// bodies of each stream in the order received, and its joins.
async fn resuming_client(
    comets: Arc<Mutex<Vec<SocketAddr>>>,
    first: usize,
    room: &'static str,
    mid: i64,
    total: usize,
) -> (Vec<String>, Vec<String>, usize) {
    let user = format!("@mid:{mid}");
    let mut bodies: HashMap<String, Vec<String>> = HashMap::new();
    let mut since = serde_json::Map::new();
    let mut joins = 0;
    let mut attempt = first;
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = |bodies: &HashMap<String, Vec<String>>| {
        [room, user.as_str()]
            .iter()
            .all(|stream| bodies.get(*stream).map_or(0, Vec::len) >= total)
    };
    while !done(&bodies) {
        assert!(
            Instant::now() < deadline,
            "client {first} stuck at {:?} of {total}",
            bodies
                .iter()
                .map(|(stream, got)| (stream, got.len()))
                .collect::<Vec<_>>()
        );
        let addr = {
            let comets = comets.lock().expect("lock");
            comets[attempt % comets.len()]
        };
        attempt += 1;
        let auth = json!({"mid": mid, "room_id": room, "positions": true, "accepts": [1000], "since": since});
        let Some(mut client) = PositionedClient::try_auth(addr, &auth).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        joins += 1;
        while !done(&bodies) {
            let Some((frame, position)) = client.read_for(Duration::from_secs(30)).await else {
                break;
            };
            match position {
                Some(position) => {
                    bodies
                        .entry(position.stream.clone())
                        .or_default()
                        .push(body(&frame));
                    since.insert(
                        position.stream,
                        json!({"epoch": position.epoch.to_string(), "offset": position.offset}),
                    );
                }
                None if frame.op == op::RESUME_REPLY => {
                    let reply: Value = serde_json::from_slice(&frame.body).expect("JSON");
                    let stream = reply["room"].as_str().expect("room").to_string();
                    if since.contains_key(&stream) {
                        assert_eq!(reply["recovered"], json!(true), "client {first}: {reply}");
                    }
                    since.insert(
                        stream,
                        json!({"epoch": reply["epoch"], "offset": reply["offset"]}),
                    );
                }
                None => {}
            }
        }
    }
    let mut take = |stream: &str| bodies.remove(stream).unwrap_or_default();
    (take(room), take(&user), joins)
}

impl PositionedClient {
    /// `auth` that gives up quietly on a comet that is gone or draining.
    async fn try_auth(addr: SocketAddr, auth: &Value) -> Option<PositionedClient> {
        let stream = TcpStream::connect(addr).await.ok()?;
        let mut client = PositionedClient {
            stream,
            buf: BytesMut::new(),
        };
        client
            .stream
            .write_all(&auth_frame(auth).encode())
            .await
            .ok()?;
        let (reply, _) = client.read_for(Duration::from_secs(5)).await?;
        (reply.op == op::AUTH_REPLY).then_some(client)
    }

    async fn read_for(&mut self, wait: Duration) -> Option<Received> {
        tokio::time::timeout(wait, self.read()).await.ok().flatten()
    }
}

/// Clients with positions on both comets of a fleet, room pushes and
/// pushes to each client's user all along, and every comet replaced in
/// turn — drained with SIGTERM, or killed with SIGKILL — while they
/// arrive: every client gets every message exactly once, in order.
async fn comets_go_away_while_clients_resume(kill: bool) {
    const CLIENTS: usize = 16;
    const TOTAL: usize = 300;
    let mut fleet = Fleet::start();
    let comets = Arc::new(Mutex::new(
        fleet.comets.iter().map(Server::tcp).collect::<Vec<_>>(),
    ));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mid = 100 + i as i64;
            tokio::spawn(resuming_client(
                comets.clone(),
                i,
                "live://roll",
                mid,
                TOTAL,
            ))
        })
        .collect();
    // Every client joined (each comet reports its room members to logic).
    let logic = &fleet.logics[0];
    wait_until(|| async {
        let (_, online) = logic.get("/goim/online/room?type=live&rooms=roll").await;
        online["data"]["roll"] == json!(CLIENTS)
    })
    .await;

    let pushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pusher = {
        let logics: Vec<SocketAddr> = fleet.logics.iter().map(|l| l.addr("logic.http")).collect();
        let pushed = pushed.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mids: Vec<String> = (0..CLIENTS).map(|i| format!("mids={}", 100 + i)).collect();
            let mids = mids.join("&");
            for i in 0..TOTAL {
                let logic = logics[i % logics.len()];
                for (url, body) in [
                    (
                        format!("http://{logic}/goim/push/room?operation=1000&type=live&room=roll"),
                        i.to_string(),
                    ),
                    (
                        format!("http://{logic}/goim/push/mids?operation=1000&{mids}"),
                        format!("direct {i}"),
                    ),
                ] {
                    loop {
                        let response = http.post(&url).body(body.clone()).send().await;
                        if response.is_ok_and(|r| r.status() == 200) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                pushed.store(i + 1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    for (i, at) in [(0, TOTAL / 3), (1, 2 * TOTAL / 3)] {
        wait_until(|| async { pushed.load(std::sync::atomic::Ordering::SeqCst) >= at }).await;
        if kill {
            fleet.comets[i].kill9();
        } else {
            fleet.comets[i].sigterm();
            fleet.comets[i].exited(Duration::from_secs(20)).await;
        }
        fleet.restart_comet(i);
        comets.lock().expect("lock")[i] = fleet.comets[i].tcp();
    }
    pusher.await.expect("pusher");
    let expected: Vec<String> = (0..TOTAL).map(|i| i.to_string()).collect();
    let expected_direct: Vec<String> = (0..TOTAL).map(|i| format!("direct {i}")).collect();
    let mut resumes = 0;
    for client in clients {
        let (room, direct, joins) = client.await.expect("client");
        assert_eq!(room, expected, "every room message once, in order");
        assert_eq!(
            direct, expected_direct,
            "every direct message once, in order"
        );
        resumes += joins - 1;
    }
    // Every client of the first comet moved with a third of the pushes to
    // go; those of the second may have had them all before their turn in
    // its drain came.
    assert!(resumes >= CLIENTS / 2, "{resumes} resumes");
    let recovered = Fleet::sum(
        &fleet.logics,
        "pushcluster_logic_resumes_total",
        &[("result", "recovered")],
    )
    .await;
    assert!(
        recovered >= resumes as f64,
        "{recovered} of {resumes} resumes recovered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_comet_loses_nothing_for_resuming_clients() {
    comets_go_away_while_clients_resume(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_comets_lose_nothing_for_resuming_clients() {
    comets_go_away_while_clients_resume(true).await;
}
