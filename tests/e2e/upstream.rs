//! Messages from clients to the business backend (`docs/upstream.md`):
//! op 4 is stored in the upstream stream with the identity the server
//! authenticated, answered with op 5 and its id, in order per connection,
//! and nothing answered as stored is lost when a logic goes away.

use async_nats::jetstream;
use futures_util::StreamExt;
use pushcluster_api::protocol::op;
use serde_json::{Value, json};

use crate::common::{TcpClient, WAIT, frame};
use crate::fleet::Fleet;

/// Sends op 4 with `text` as seq `seq` until the server stores it (op 5
/// with an id); an `unavailable` answer is sent again, as a client would.
async fn send_until_stored(client: &mut TcpClient, seq: i32, text: &str) -> u64 {
    for _ in 0..100 {
        client.send(&frame(op::SEND_MSG, seq, text)).await;
        let reply = client.recv().await;
        assert_eq!((reply.op, reply.seq), (op::SEND_MSG_REPLY, seq));
        let answer: Value = serde_json::from_slice(&reply.body).expect("JSON");
        if let Some(id) = answer["id"].as_str() {
            return id.parse().expect("a numeric id");
        }
        assert_eq!(answer["error"], json!("unavailable"), "{answer}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("message {seq} never stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_messages_reach_the_backend_in_order_with_the_servers_identity() {
    let mut fleet = Fleet::start_with(
        "upstream: { enabled: true, max_bytes: 64, per_second_per_connection: 1000 }",
    );
    let mut client = TcpClient::auth(
        fleet.comets[0].tcp(),
        json!({"mid": 5, "key": "k5", "room_id": "chat://1", "rooms": ["chat://2"]}),
    )
    .await;
    // The body may claim anything; the headers say who really sent it.
    let text = |i: usize| json!({"mid": 999, "text": i}).to_string();
    let mut ids = Vec::new();
    for i in 0..40 {
        if i == 20 {
            // One logic goes away; the comet's calls go to the other.
            fleet.logics[0].kill9();
        }
        ids.push(send_until_stored(&mut client, i as i32 + 1, &text(i)).await);
    }
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    // Too large: refused with a reason, the connection goes on.
    client.send(&frame(op::SEND_MSG, 99, &"x".repeat(65))).await;
    let reply = client.recv().await;
    assert_eq!(
        (
            reply.op,
            serde_json::from_slice::<Value>(&reply.body).expect("JSON")
        ),
        (op::SEND_MSG_REPLY, json!({"error": "too_large"}))
    );
    client.heartbeat(100).await;

    // The backend reads the stream.
    let nats = async_nats::connect(fleet.nats.url())
        .await
        .expect("connect");
    let stream = jetstream::new(nats)
        .get_stream("PUSHCLUSTER_UPSTREAM")
        .await
        .expect("the upstream stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("chat-backend".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut seen = Vec::new();
    while seen.last() != Some(&39) {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("a message in time")
            .expect("the stream goes on")
            .expect("a message");
        let headers = message.headers.clone().expect("headers");
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(header("Pushcluster-Mid").as_deref(), Some("5"));
        assert_eq!(header("Pushcluster-Key").as_deref(), Some("k5"));
        assert_eq!(header("Pushcluster-Comet").as_deref(), Some("comet-a"));
        assert_eq!(
            header("Pushcluster-Rooms").as_deref(),
            Some(r#"["chat://1","chat://2"]"#)
        );
        let body: Value = serde_json::from_slice(&message.payload).expect("JSON");
        seen.push(body["text"].as_u64().expect("text") as usize);
        message.ack().await.expect("ack");
    }
    // Every message in order; one sent twice (stored, its answer lost with
    // the logic) may repeat, never go missing.
    seen.dedup();
    assert_eq!(seen, (0..40).collect::<Vec<_>>());
}
