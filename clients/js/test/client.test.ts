// The client against real servers: `pushcluster standalone` and a fleet on
// a real nats-server. Node's test runner; the WebSocket is Node's own
// (`--experimental-websocket` on Node 20).

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { after, before, describe, test } from "node:test";

import { PushClient, type PushClientOptions, type PushMessage, type ResumeInfo } from "../src/index.js";
import { type ChildProcess, spawn } from "node:child_process";
import { join } from "node:path";

import {
  Fleet,
  Nats,
  type Process,
  pushMid,
  pushRoom,
  repo,
  reservePort,
  sleep,
  startStandalone,
  until,
} from "./harness.js";

/** A client that records what it gets. */
function recorder(options: PushClientOptions) {
  const client = new PushClient({ heartbeatMs: 1_000, reconnect: { baseMs: 100, maxMs: 1_000 }, ...options });
  const messages: PushMessage[] = [];
  const resumes: ResumeInfo[] = [];
  const opens: string[] = [];
  const errors: Error[] = [];
  client.on("message", (message) => messages.push(message));
  client.on("resume", (info) => resumes.push(info));
  client.on("open", ({ url }) => opens.push(url));
  client.on("error", (error) => errors.push(error));
  return { client, messages, resumes, opens, errors, texts: () => messages.map((m) => m.text()) };
}

function wsUrl(server: Process): string {
  return `ws://${server.addr("comet.websocket")}/sub`;
}

describe("standalone", () => {
  let server: Process;
  before(async () => {
    server = await startStandalone();
  });
  after(async () => {
    await server.stop();
  });

  test("room pushes arrive with positions; heartbeats; changing room resumes it", async () => {
    const r = recorder({ urls: [wsUrl(server)], room: "live://js1" });
    const online: number[] = [];
    r.client.on("heartbeat", ({ online: count }) => online.push(count));
    r.client.connect();
    await until("the join", () => r.resumes.length === 1);
    assert.deepEqual(
      [r.resumes[0]?.room, r.resumes[0]?.recovered, r.resumes[0]?.reason],
      ["live://js1", false, "fresh"],
    );
    await until("a heartbeat reply", () => online.length > 0);
    assert.equal(online.at(-1), 1);

    const http = server.addr("logic.http");
    await pushRoom(http, "live://js1", "a");
    await pushRoom(http, "live://js1", JSON.stringify({ n: 2 }));
    await until("two messages", () => r.messages.length === 2);
    assert.equal(r.messages[0]?.text(), "a");
    assert.deepEqual(r.messages[1]?.json(), { n: 2 });
    assert.equal(r.messages[0]?.room, "live://js1");
    assert.equal(r.messages[1]?.replayed, false);
    const first = r.messages[0]?.position;
    const second = r.messages[1]?.position;
    assert.ok(first && second && second.offset > first.offset && first.epoch === second.epoch);
    assert.deepEqual(r.client.position("live://js1"), second);

    // Another room, then back: what came meanwhile is replayed.
    r.client.changeRoom("live://js2");
    await until("the second join", () => r.resumes.length === 2);
    await pushRoom(http, "live://js1", "while away");
    r.client.changeRoom("live://js1");
    await until("the third join", () => r.resumes.length === 3);
    assert.deepEqual(
      [r.resumes[2]?.recovered, r.resumes[2]?.replayed],
      [true, 1],
    );
    assert.deepEqual(r.texts(), ["a", '{"n":2}', "while away"]);
    assert.equal(r.messages[2]?.replayed, true);
    r.client.close();
  });

  test("joins and leaves rooms; after a reconnect every room resumes", async () => {
    const r = recorder({ urls: [wsUrl(server)], room: "live://m0", rooms: ["live://m1"] });
    r.client.connect();
    await until("the joins", () => r.resumes.length === 2);
    assert.deepEqual(await r.client.join("live://m2"), { room: "live://m2", ok: true });
    assert.deepEqual(await r.client.join(""), { room: "", ok: false, reason: "invalid" });
    await until("the new room's join", () => r.resumes.length === 3);
    assert.deepEqual(r.client.rooms.sort(), ["live://m1", "live://m2"]);
    const http = server.addr("logic.http");
    for (const room of ["live://m0", "live://m1", "live://m2"]) {
      await pushRoom(http, room, `${room} live`);
    }
    await until("a message per room", () => r.messages.length === 3);
    r.client.reconnect();
    for (const room of ["live://m0", "live://m1", "live://m2"]) {
      await pushRoom(http, room, `${room} away`);
    }
    await until("the rejoins", () => r.resumes.length === 6);
    assert.ok(r.resumes.slice(3).every((info) => info.recovered), JSON.stringify(r.resumes));
    await until("what was missed", () => r.messages.length === 6);
    assert.deepEqual(
      r.messages.slice(3).map((m) => [m.room, m.text(), m.replayed]).sort(),
      ["live://m0", "live://m1", "live://m2"].map((room) => [room, `${room} away`, true]),
    );
    assert.deepEqual(await r.client.leave("live://m1"), { room: "live://m1", ok: true });
    assert.deepEqual(await r.client.leave("live://m1"), { room: "live://m1", ok: false, reason: "not_member" });
    await pushRoom(http, "live://m1", "gone");
    await pushRoom(http, "live://m2", "still here");
    await until("the last message", () => r.messages.length === 7);
    assert.equal(r.messages[6]?.text(), "still here");
    r.client.close();
    await assert.rejects(r.client.join("live://m3"), /not connected/);
  });

  test("a reconnect loses and repeats nothing", async () => {
    const r = recorder({ urls: [wsUrl(server)], room: "live://js3" });
    r.client.connect();
    await until("the join", () => r.resumes.length === 1);
    const http = server.addr("logic.http");
    await pushRoom(http, "live://js3", "0");
    await until("the first message", () => r.messages.length === 1);
    for (let round = 1; round <= 3; round += 1) {
      r.client.reconnect();
      // Pushed while the client is away (it waits ~100 ms to come back).
      for (let i = 0; i < 5; i += 1) {
        await pushRoom(http, "live://js3", `${round}.${i}`);
      }
      await until(`rejoin ${round}`, () => r.resumes.length === round + 1);
    }
    await pushRoom(http, "live://js3", "last");
    const expected = ["0"];
    for (let round = 1; round <= 3; round += 1) {
      for (let i = 0; i < 5; i += 1) {
        expected.push(`${round}.${i}`);
      }
    }
    expected.push("last");
    await until("every message", () => r.messages.length >= expected.length);
    await sleep(200);
    assert.deepEqual(r.texts(), expected);
    assert.ok(r.resumes.slice(1).every((info) => info.recovered), JSON.stringify(r.resumes));
    assert.equal(r.opens.length, 4);
    r.client.close();
  });
});

test("a restarted standalone (history lost) is reported as not recovered", async () => {
  const wsPort = await reservePort();
  const config = { comet: { websocket: { bind: [`127.0.0.1:${wsPort}`] } } };
  let server = await startStandalone(config);
  const r = recorder({ urls: [`ws://127.0.0.1:${wsPort}/sub`], room: "live://js4" });
  r.client.connect();
  await until("the join", () => r.resumes.length === 1);
  await pushRoom(server.addr("logic.http"), "live://js4", "before");
  await until("a message", () => r.messages.length === 1);
  const before = r.client.position();
  await server.stop();
  server = await startStandalone(config);
  await until("the rejoin", () => r.resumes.length === 2, 15_000);
  const rejoin = r.resumes[1];
  assert.deepEqual([rejoin?.recovered, rejoin?.reason], [false, "epoch_changed"]);
  assert.notEqual(rejoin?.epoch, before?.epoch);
  assert.deepEqual(r.client.position(), { epoch: rejoin?.epoch, offset: rejoin?.offset });
  r.client.close();
  await server.stop();
});

test("endpoints come from /goim/nodes/weighted; JWT auth", async () => {
  const wsPort = await reservePort();
  const secret = "a-secret-of-at-least-thirty-two-bytes!";
  const server = await startStandalone({
    comet: { addrs: ["127.0.0.1"], websocket: { bind: [`127.0.0.1:${wsPort}`] } },
    logic: { node: { ws_port: wsPort }, auth: { mode: "jwt", jwt: { hs256_secret: secret } } },
  });
  const b64 = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url");
  let tokens = 0;
  const token = () => {
    tokens += 1;
    const unsigned = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: "42", rooms: ["live://jwt"], exp: Math.floor(Date.now() / 1000) + 60 })}`;
    return `${unsigned}.${createHmac("sha256", secret).update(unsigned).digest("base64url")}`;
  };
  const r = recorder({
    nodesUrl: `http://${server.addr("logic.http")}`,
    platform: "node",
    room: "live://jwt",
    mid: 42,
    token,
  });
  r.client.connect();
  // The room's join, and the user's direct stream (the token's subject).
  await until("the joins", () => r.resumes.length === 2);
  assert.deepEqual(r.resumes.map((info) => info.room).sort(), ["@mid:42", "live://jwt"]);
  assert.deepEqual(r.opens, [`ws://127.0.0.1:${wsPort}/sub`]);
  assert.equal(tokens, 1);
  await pushRoom(server.addr("logic.http"), "live://jwt", "signed");
  await until("a message", () => r.messages.length === 1);
  r.client.close();

  // A token the server refuses: the client keeps trying, with backoff.
  const refused = recorder({
    urls: [`ws://127.0.0.1:${wsPort}/sub`],
    room: "live://jwt",
    token: "not-a-jwt",
    reconnect: { baseMs: 50, maxMs: 200 },
  });
  const closes: number[] = [];
  refused.client.on("close", ({ reconnectInMs }) => closes.push(reconnectInMs ?? -1));
  refused.client.connect();
  await until("two refusals", () => closes.length >= 2);
  assert.equal(refused.opens.length, 0);
  refused.client.close();
  await server.stop();
});

describe("upstream to a chat backend", () => {
  let nats: Nats;
  let server: Process;
  let backend: ChildProcess;
  before(async () => {
    nats = await Nats.start();
    server = await startStandalone({
      nats: { url: nats.url },
      upstream: { enabled: true, max_bytes: 100, consumer: "chat-backend" },
    });
    // examples/chat-backend, as its README runs it.
    backend = spawn(process.execPath, [join(repo, "examples/chat-backend/backend.mjs")], {
      env: { ...process.env, NATS_URL: nats.url, PUSH_URL: `http://${server.addr("logic.http")}` },
      stdio: ["ignore", "ignore", "inherit"],
    });
  });
  after(async () => {
    backend.kill("SIGTERM");
    await server.stop();
    await nats.stop();
  });

  test("a line one client sends reaches everyone in its room through the backend", async () => {
    const alice = recorder({ urls: [wsUrl(server)], room: "chat://1", mid: 1, resume: false });
    const bob = recorder({ urls: [wsUrl(server)], room: "chat://1", mid: 2, resume: false });
    alice.client.connect();
    bob.client.connect();
    await until("both connected", () => alice.client.connected && bob.client.connected);
    // NATS may still be connecting: "unavailable" is sent again, as an app would.
    let answer = await alice.client.send("hello, bob");
    for (let tries = 0; answer.error === "unavailable" && tries < 50; tries += 1) {
      await sleep(200);
      answer = await alice.client.send("hello, bob");
    }
    assert.match(answer.id ?? "", /^\d+$/, JSON.stringify(answer));
    const line = { from: "1", text: "hello, bob" };
    await until("bob hears alice", () => bob.messages.length === 1, 20_000);
    await until("alice hears herself", () => alice.messages.length === 1);
    assert.deepEqual(bob.messages[0]?.json(), line);
    assert.deepEqual(alice.messages[0]?.json(), line);
    assert.deepEqual(await alice.client.send("x".repeat(101)), { error: "too_large" });
    alice.client.close();
    bob.client.close();
    await assert.rejects(alice.client.send("gone"), /not connected/);
  });
});

describe("a fleet on NATS", () => {
  let fleet: Fleet;
  before(async () => {
    fleet = await Fleet.start();
  });
  after(async () => {
    await fleet.stop();
  });

  test("a client whose comet is drained moves to the other and resumes its room and its user's messages there", async () => {
    const urls = fleet.comets.map((comet) => `ws://${comet.addr("comet.websocket")}/sub`);
    const mid = 4242;
    const r = recorder({ urls, room: "live://fleet", mid, accepts: [1000] });
    r.client.connect();
    await until("the joins", () => r.resumes.length === 2);
    assert.deepEqual(r.resumes.map((info) => info.room).sort(), [`@mid:${mid}`, "live://fleet"]);
    assert.equal(r.opens[0], urls[0]);
    const http = fleet.logic.addr("logic.http");
    const total = 120;
    const pushing = (async () => {
      for (let i = 0; i < total; i += 1) {
        await pushRoom(http, "live://fleet", String(i));
        await pushMid(http, mid, `direct ${i}`);
        await sleep(10);
      }
    })();
    await until("some messages", () => r.messages.length >= 40);
    // The first comet drains (SIGTERM) and comes back; meanwhile the client
    // is on the second one.
    await fleet.restartComet(0);
    await pushing;
    await until("every message", () => r.messages.length >= 2 * total, 20_000);
    await sleep(200);
    const of = (stream: string) => r.messages.filter((m) => m.room === stream).map((m) => m.text());
    assert.deepEqual(
      of("live://fleet"),
      Array.from({ length: total }, (_, i) => String(i)),
    );
    assert.deepEqual(
      of(`@mid:${mid}`),
      Array.from({ length: total }, (_, i) => `direct ${i}`),
    );
    assert.equal(r.messages.length, 2 * total);
    assert.ok(r.opens.length >= 2, JSON.stringify(r.opens));
    assert.equal(r.opens[1], urls[1]);
    assert.ok(r.resumes.slice(2).every((info) => info.recovered), JSON.stringify(r.resumes));
    r.client.close();
  });
});
