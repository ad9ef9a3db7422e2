//! One connection in many rooms (docs/goim-compatibility.md, ops 22–25):
//! rooms from the auth body and op 22, room pushes and online counts for
//! each, a push to the user once per connection, the token's rooms
//! enforced, and bad requests answered without closing anything.

use pushcluster_api::protocol::op;
use serde_json::{Value, json};

use crate::common::{Server, TcpClient, body, frame};
use crate::security::{SECRET, hs256, now};

async fn push_room(server: &Server, room: &str, text: &str) {
    server
        .push(
            &format!("/goim/push/room?operation=1000&type=live&room={room}"),
            text,
        )
        .await;
}

/// Sends op `op` with `body` and reads the JSON reply.
async fn ask(client: &mut TcpClient, op: i32, room: &str) -> (i32, Value) {
    client.send(&frame(op, 5, room)).await;
    let reply = client.recv().await;
    let answer = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.op, answer)
}

#[tokio::test]
async fn a_connection_in_several_rooms_gets_each_rooms_pushes_and_its_users_once() {
    let server = Server::start_with("comet: { limits: { rooms_per_connection: 3 } }");
    let mut client = TcpClient::auth(
        server.tcp(),
        json!({"mid": 7, "room_id": "live://a", "rooms": ["live://b"], "accepts": [1000]}),
    )
    .await;
    let mut other = TcpClient::auth(server.tcp(), json!({"room_id": "live://c"})).await;
    assert_eq!(
        ask(&mut client, op::JOIN, "live://c").await,
        (op::JOIN_REPLY, json!({"room": "live://c", "ok": true}))
    );
    assert_eq!(
        ask(&mut client, op::JOIN, "live://d").await,
        (
            op::JOIN_REPLY,
            json!({"room": "live://d", "ok": false, "reason": "limit"})
        )
    );
    for room in ["a", "b", "c", "d"] {
        push_room(&server, room, room).await;
    }
    // Each room keeps its own order; rooms are delivered in parallel, so
    // the three may arrive in any order.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(body(&client.recv().await));
    }
    got.sort();
    assert_eq!(got, ["a", "b", "c"]);
    assert_eq!(body(&other.recv().await), "c");
    // Online counts: the client counts in each of its rooms.
    let (_, online) = server
        .get("/goim/online/room?type=live&rooms=a&rooms=b&rooms=c&rooms=d")
        .await;
    crate::common::wait_until(|| async {
        let (_, online) = server
            .get("/goim/online/room?type=live&rooms=a&rooms=b&rooms=c")
            .await;
        online["data"] == json!({"a": 1, "b": 1, "c": 2})
    })
    .await;
    assert_eq!(online["data"]["d"], json!(0));
    // A push to the user arrives once, not once per room.
    server
        .push("/goim/push/mids?operation=1000&mids=7", "to 7")
        .await;
    assert_eq!(body(&client.recv().await), "to 7");
    // Leaving one room stops its pushes; a bad request closes nothing.
    assert_eq!(
        ask(&mut client, op::LEAVE, "live://b").await,
        (op::LEAVE_REPLY, json!({"room": "live://b", "ok": true}))
    );
    assert_eq!(
        ask(&mut client, op::JOIN, "").await,
        (
            op::JOIN_REPLY,
            json!({"room": "", "ok": false, "reason": "invalid"})
        )
    );
    push_room(&server, "b", "b again").await;
    push_room(&server, "a", "a again").await;
    assert_eq!(body(&client.recv().await), "a again");
    client.expect_silence().await;
    client.heartbeat(9).await;
}

/// With JWT auth a connection may be only in the rooms its token allows:
/// rooms outside them are refused at auth, at op 22 and at op 12, and
/// counted.
#[tokio::test]
async fn a_token_limits_the_rooms_a_connection_may_join() {
    let server = Server::start_with(&format!(
        "logic: {{ auth: {{ mode: jwt, jwt: {{ hs256_secret: \"{SECRET}\" }} }} }}"
    ));
    let token = hs256(
        json!({"sub": "42", "exp": now() + 600, "rooms": ["live://1", "live://2", "live://3"]}),
        SECRET,
    );
    let admitted = crate::security::try_auth(
        server.tcp(),
        std::net::IpAddr::from([127, 0, 0, 1]),
        &json!({"token": token, "room_id": "live://1", "rooms": ["live://9"]}),
    )
    .await;
    assert!(!admitted, "a room outside the token was admitted");
    let mut client = TcpClient::auth(
        server.tcp(),
        json!({"token": token, "room_id": "live://1", "rooms": ["live://2"]}),
    )
    .await;
    assert_eq!(
        ask(&mut client, op::JOIN, "live://9").await,
        (
            op::JOIN_REPLY,
            json!({"room": "live://9", "ok": false, "reason": "forbidden"})
        )
    );
    assert_eq!(
        ask(&mut client, op::CHANGE_ROOM, "live://9").await,
        (
            op::CHANGE_ROOM_REPLY,
            json!({"room": "live://9", "ok": false, "reason": "forbidden"})
        )
    );
    assert_eq!(
        ask(&mut client, op::JOIN, "live://3").await,
        (op::JOIN_REPLY, json!({"room": "live://3", "ok": true}))
    );
    push_room(&server, "9", "not yours").await;
    push_room(&server, "3", "three").await;
    assert_eq!(body(&client.recv().await), "three");
    server
        .wait_metric(
            "pushcluster_comet_room_joins_total",
            &[("result", "forbidden")],
            2.0,
        )
        .await;
    server
        .wait_metric(
            "pushcluster_logic_connects_total",
            &[("result", "room_forbidden")],
            1.0,
        )
        .await;
}

/// The same across a fleet: connections on two comets, each in several
/// rooms; pushes through logic, NATS and job reach each member once, and
/// logic's online counts add both comets' members of each room.
#[tokio::test]
async fn rooms_on_a_fleet_reach_every_member_once() {
    let fleet = crate::fleet::Fleet::start();
    let mut phone = TcpClient::auth(
        fleet.comets[0].tcp(),
        json!({"mid": 11, "room_id": "live://f1", "rooms": ["live://f2"], "accepts": [1000]}),
    )
    .await;
    let mut laptop = TcpClient::auth(
        fleet.comets[1].tcp(),
        json!({"mid": 11, "room_id": "live://f2", "accepts": [1000]}),
    )
    .await;
    assert_eq!(
        ask(&mut laptop, op::JOIN, "live://f3").await,
        (op::JOIN_REPLY, json!({"room": "live://f3", "ok": true}))
    );
    let logic = &fleet.logics[0];
    crate::common::wait_until(|| async {
        let (_, online) = logic
            .get("/goim/online/room?type=live&rooms=f1&rooms=f2&rooms=f3")
            .await;
        online["data"] == json!({"f1": 1, "f2": 2, "f3": 1})
    })
    .await;
    for (room, text) in [("f1", "one"), ("f2", "two"), ("f3", "three")] {
        fleet
            .push(
                0,
                &format!("/goim/push/room?operation=1000&type=live&room={room}"),
                text,
            )
            .await;
    }
    fleet
        .push(0, "/goim/push/mids?operation=1000&mids=11", "to 11")
        .await;
    let mut phone_got = vec![
        body(&phone.recv().await),
        body(&phone.recv().await),
        body(&phone.recv().await),
    ];
    let mut laptop_got = vec![
        body(&laptop.recv().await),
        body(&laptop.recv().await),
        body(&laptop.recv().await),
    ];
    phone_got.sort();
    laptop_got.sort();
    assert_eq!(phone_got, ["one", "to 11", "two"]);
    assert_eq!(laptop_got, ["three", "to 11", "two"]);
    phone.expect_silence().await;
    laptop.expect_silence().await;
}
