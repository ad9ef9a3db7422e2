// A small chat backend for pushcluster (docs/upstream.md): it reads what
// clients send (op 4 → the upstream stream on NATS JetStream) and answers
// through the push API: each message goes to every room of its sender, as
// {"from": <mid>, "text": <message>}. The sender's mid and rooms come from
// the server's headers, never from the client.
//
//   npm ci
//   NATS_URL=nats://127.0.0.1:4222 PUSH_URL=http://127.0.0.1:3111 node backend.mjs
//
// Environment: NATS_URL, PUSH_URL (logic's HTTP API), PUSH_TOKEN (a push
// API bearer token, when logic.api requires one), UPSTREAM_STREAM
// (PUSHCLUSTER_UPSTREAM), UPSTREAM_CONSUMER (chat-backend: set
// upstream.consumer to it so logic reports this backend's backlog).

import { AckPolicy, DeliverPolicy, connect } from "nats";

const natsUrl = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
const pushUrl = process.env.PUSH_URL ?? "http://127.0.0.1:3111";
const token = process.env.PUSH_TOKEN;
const stream = process.env.UPSTREAM_STREAM ?? "PUSHCLUSTER_UPSTREAM";
const durable = process.env.UPSTREAM_CONSUMER ?? "chat-backend";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const nc = await connect({ servers: natsUrl, maxReconnectAttempts: -1 });
const jsm = await nc.jetstreamManager();

// logic creates the stream when it starts; wait for it, then make (or
// find) this backend's durable consumer: several instances may share it.
for (;;) {
  try {
    await jsm.consumers.add(stream, {
      durable_name: durable,
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
      ack_wait: 30_000_000_000, // ns
    });
    break;
  } catch (error) {
    console.error(`waiting for stream ${stream}: ${error.message}`);
    await sleep(500);
  }
}

/** Pushes `body` to room `room` (`type://id`); true when logic took it. */
async function pushRoom(room, body) {
  const at = room.indexOf("://");
  if (at < 0) {
    return true; // not a room the push API can address
  }
  const type = encodeURIComponent(room.slice(0, at));
  const id = encodeURIComponent(room.slice(at + 3));
  const response = await fetch(`${pushUrl}/goim/push/room?operation=1000&type=${type}&room=${id}`, {
    method: "POST",
    headers: token ? { authorization: `Bearer ${token}` } : {},
    body,
  });
  return response.ok;
}

const consumer = await nc.jetstream().consumers.get(stream, durable);
console.log(`chat backend: reading ${stream} as ${durable}, answering through ${pushUrl}`);
const messages = await consumer.consume();
for await (const m of messages) {
  const from = m.headers?.get("Pushcluster-Mid") ?? "";
  const rooms = JSON.parse(m.headers?.get("Pushcluster-Rooms") || "[]");
  const body = JSON.stringify({ from, text: m.string() });
  let delivered = true;
  for (const room of rooms) {
    try {
      delivered = (await pushRoom(room, body)) && delivered;
    } catch (error) {
      console.error(`push to ${room}: ${error.message}`);
      delivered = false;
    }
  }
  // Not delivered (logic down, 429): the stream gives it again later.
  if (delivered) {
    m.ack();
  } else {
    m.nak(1000);
  }
}
