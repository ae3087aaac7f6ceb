// Integration tests against real brokers started by tests/test_js_client.py (BROKER_URL: a
// broker with small limits, BROKER_AUTH_URL and BROKER_AUTH_SECRET: one with authentication),
// each run over both transports: the WebSocket and the SSE + POST fallback.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import net from "node:net";
import { Client, ConnectionClosed, ErrorCode, RequestError, Timeout } from "../dist/index.js";

const URL = process.env.BROKER_URL;
const AUTH_URL = process.env.BROKER_AUTH_URL;
const LIMITS_URL = process.env.BROKER_LIMITS_URL;
const SECRET = process.env.BROKER_AUTH_SECRET;
const skip = URL && LIMITS_URL ? false : "BROKER_URL is not set (tests/test_js_client.py starts the brokers)";
const TRANSPORTS = (process.env.BROKER_TRANSPORTS || "websocket,fallback").split(",");
const bytes = (text) => new TextEncoder().encode(text);
const text = (data) => new TextDecoder().decode(data);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let topicCounter = 0;
const unique = (prefix) => `${prefix}.t${process.pid}x${++topicCounter}x${Date.now() % 100000}`;

async function until(predicate, what, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

function token(claims) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ exp: Math.floor(Date.now() / 1000) + 60, ...claims })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

function client(transport, options = {}, url = URL) {
  return new Client(url, { transports: [transport], reconnectDelayMs: [20, 200], page: null, ...options });
}

/** A TCP proxy in front of the broker whose connections can all be cut at once. */
async function proxy(target) {
  const { hostname, port } = new globalThis.URL(target.replace(/^ws/, "http"));
  const sockets = new Set();
  let refusing = 0;
  const server = net.createServer((inbound) => {
    if (Date.now() < refusing) {
      inbound.destroy();
      return;
    }
    const outbound = net.connect(Number(port), hostname);
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on("error", () => {});
      s.on("close", () => sockets.delete(s));
    }
    inbound.pipe(outbound);
    outbound.pipe(inbound);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `ws://127.0.0.1:${server.address().port}/`,
    cut(refuseMs = 0) {
      refusing = Date.now() + refuseMs;
      for (const s of sockets) s.destroy();
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

for (const transport of TRANSPORTS) {
  test(`${transport}: subscribe, publish (batched and acked), deliveries in order, unsubscribe`, { skip, timeout: 30000 }, async () => {
    const c = client(transport);
    await c.connect();
    assert.equal(c.transportKind, transport);
    const topic = unique("it");
    const got = [];
    const sub = c.subscribe(`${topic}.>`, (m) => got.push([m.topic, m.seq, text(m.data)]));
    await sub.ready;
    for (let i = 1; i <= 200; i++) c.publish(`${topic}.a`, `m${i}`);
    const ack = await c.publishAcked(`${topic}.b`, "acked");
    assert.equal(ack.seq, 1);
    assert.equal(typeof ack.epoch, "bigint");
    await until(() => got.length === 201, "201 deliveries");
    assert.deepEqual(got.filter((m) => m[0] === `${topic}.a`).map((m) => m[1]), Array.from({ length: 200 }, (_, i) => i + 1));
    await sub.unsubscribe();
    c.publish(`${topic}.a`, "after");
    await c.publishAcked(`${topic}.a`, "after2");
    await sleep(50);
    assert.equal(got.length, 201);
    await c.close();
    assert.equal(c.state, "closed");
  });

  test(`${transport}: requests, responders and their errors`, { skip, timeout: 30000 }, async () => {
    const server = client(transport);
    const requester = client(transport);
    await Promise.all([server.connect(), requester.connect()]);
    const topic = unique("svc");
    const errors = [];
    server.on("error", (e) => errors.push(e));
    await server.respond(`${topic}.echo`, (r) => `echo ${text(r.data)}`);
    await server.respond(`${topic}.slow`, () => new Promise((resolve) => setTimeout(() => resolve(bytes("late")), 400)));
    assert.equal(text(await requester.request(`${topic}.echo`, "hi")), "echo hi");
    await assert.rejects(requester.request(`${topic}.none`, "x"), (e) => e instanceof RequestError && e.code === ErrorCode.NO_RESPONDERS);
    await assert.rejects(requester.request(`${topic}.slow`, "x", { timeoutMs: 100 }), (e) => e.code === ErrorCode.REQUEST_TIMEOUT);
    await until(() => errors.length === 1, "the late reply's error"); // the responder answered after the timeout
    assert.equal(errors[0].code, ErrorCode.UNKNOWN_REQUEST);
    await assert.rejects(server.respond(`${topic}.echo`, () => "again"), (e) => e.code === ErrorCode.ALREADY_SUBSCRIBED);
    await server.unrespond(`${topic}.echo`);
    await assert.rejects(requester.request(`${topic}.echo`, "x"), (e) => e.code === ErrorCode.NO_RESPONDERS);
    await Promise.all([server.close(), requester.close()]);
  });

  test(`${transport}: the broker's refusals arrive as typed errors with their codes`, { skip, timeout: 30000 }, async () => {
    const c = client(transport);
    await c.connect();
    const topic = unique("err");
    await assert.rejects(c.publishAcked(topic, new Uint8Array(600 << 10)), (e) => e.code === ErrorCode.PAYLOAD_TOO_LARGE);
    const ack = await c.publishAcked(topic, "one");
    const ahead = c.subscribe(topic, () => {}, { since: { epoch: ack.epoch.toString(), seq: 99 } });
    await assert.rejects(ahead.ready, (e) => e.code === ErrorCode.BAD_POSITION);
    const many = [];
    for (let i = 0; i < 8; i++) many.push(c.subscribe(`${topic}.s${i}`, () => {}).ready.then(() => "ok", (e) => e.code));
    const results = await Promise.all(many);
    assert.ok(results.includes(ErrorCode.TOO_MANY_SUBSCRIPTIONS), results); // the broker holds 5 at most
    assert.throws(() => c.subscribe("md..x", () => {}), (e) => e.code === ErrorCode.INVALID_TOPIC);
    await assert.rejects(async () => c.publishAcked("md.*", "x"), (e) => e.code === ErrorCode.PATTERN_NOT_ALLOWED);
    await assert.rejects(c.authenticate("not-a-token"), (e) => e.code === ErrorCode.BAD_TOKEN);
    await c.close();
    // on a broker of its own (BROKER_LIMITS_URL): max_open_requests 3, max_topics 50
    const limited = client(transport, {}, LIMITS_URL);
    const responder = client(transport, {}, LIMITS_URL);
    await Promise.all([limited.connect(), responder.connect()]);
    await responder.respond(`${topic}.slow`, () => new Promise((resolve) => setTimeout(() => resolve(bytes("late")), 300)));
    const waiting = [1, 2, 3, 4].map(() => limited.request(`${topic}.slow`, "x", { timeoutMs: 2000 }).then(() => "ok", (e) => e.code));
    assert.deepEqual((await Promise.all(waiting)).sort(), ["ok", "ok", "ok", ErrorCode.TOO_MANY_REQUESTS].sort());
    let refused = null;
    for (let i = 0; i < 100 && refused === null; i++) {
      await limited.publishAcked(`${topic}.many.${i}`, "x").catch((e) => (refused = e));
    }
    assert.equal(refused?.code, ErrorCode.TOO_MANY_TOPICS);
    await Promise.all([limited.close(), responder.close()]);
    assert.throws(() => c.publish(topic, "x"), ConnectionClosed);
  });

  test(`${transport}: history: since and last, and a gap with its exact range`, { skip, timeout: 30000 }, async () => {
    const c = client(transport);
    await c.connect();
    const topic = unique("hist");
    const first = await c.publishAcked(topic, "h1");
    for (let i = 2; i <= 8; i++) await c.publishAcked(topic, `h${i}`); // the broker keeps 5
    const got = [];
    const gaps = [];
    const sub = c.subscribe(topic, (m) => got.push(m.seq), { since: { epoch: first.epoch.toString(), seq: 1 }, onGap: (g) => gaps.push(g) });
    await sub.ready;
    await until(() => got.length === 5, "the replay");
    assert.deepEqual(got, [4, 5, 6, 7, 8]);
    assert.deepEqual(gaps.map((g) => [g.first, g.last, g.cause]), [[2, 3, "history"]]);
    assert.deepEqual(sub.since(), { epoch: first.epoch.toString(), seq: 8 });
    const other = client(transport);
    await other.connect();
    const latest = [];
    await other.subscribe(topic, (m) => latest.push([m.seq, text(m.data)]), { last: true }).ready;
    await until(() => latest.length === 1, "the last value");
    assert.deepEqual(latest, [[8, "h8"]]);
    await Promise.all([c.close(), other.close()]);
  });

  for (const cutFor of transport === "websocket" ? [0] : [0, 300]) test(`${transport}: a connection cut${cutFor ? ` for ${cutFor} ms` : ""} is recovered exactly: nothing lost, nothing twice`, { skip, timeout: 30000 }, async () => {
    const p = await proxy(URL);
    const c = client(transport, {}, p.url);
    const publisher = client("websocket");
    await Promise.all([c.connect(), publisher.connect()]);
    const topic = unique("rec");
    const got = [];
    const states = [];
    c.on("state", (s) => states.push(s.state));
    const sub = c.subscribe(`${topic}.>`, (m) => got.push(`${m.topic}:${m.seq}`));
    await sub.ready;
    let sent = 0;
    const publish = async (n) => {
      for (let i = 0; i < n; i++) {
        sent++;
        await publisher.publishAcked(`${topic}.${sent % 3}`, `p${sent}`);
      }
    };
    await publish(10);
    await until(() => got.length === 10, "the first ten");
    p.cut(cutFor);
    await publish(10); // while the client is away (or reconnecting)
    c.publish(`${topic}.own`, "queued while away"); // waits with a msg_id if offline
    // a WebSocket client reconnects and subscribes again with since; a fallback client opens
    // its event stream again with Last-Event-ID and the broker's session goes on
    // (cut for a while, a fallback client cannot take its session up again: it reconnects too)
    const reconnecting = transport === "websocket" || cutFor > 0;
    if (reconnecting) await until(() => c.reconnects >= 1 && c.state === "connected", "the reconnection");
    await publish(10);
    await until(() => got.length === 31, `31 deliveries, got ${got.length}`);
    const perTopic = {};
    for (const entry of got) {
      const [name, seq] = entry.split(":");
      (perTopic[name] ??= []).push(Number(seq));
    }
    for (const [name, seqs] of Object.entries(perTopic)) assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => i + 1), name);
    assert.equal(new Set(got).size, got.length);
    if (reconnecting) assert.ok(states.includes("disconnected"), states.join());
    else assert.equal(c.reconnects, 0);
    await Promise.all([c.close(), publisher.close()]);
    p.close();
  });

  test(`${transport}: a silent connection is found by the heartbeat and replaced`, { skip, timeout: 30000 }, async () => {
    const p = await proxy(URL);
    const c = client(transport, { heartbeatMs: 1000, heartbeatTimeoutMs: 2500 }, p.url);
    await c.connect();
    await sleep(3000); // nothing published: only beats keep it alive
    assert.equal(c.reconnects, 0);
    assert.equal(c.state, "connected");
    await c.close();
    p.close();
  });

  test(`${transport}: tokens: refreshed before expiry through auth; a bad one stops the client`, { skip: skip || (AUTH_URL ? false : "no BROKER_AUTH_URL"), timeout: 30000 }, async () => {
    let issued = 0;
    const c = client(transport, {
      token: () => {
        issued++;
        return token({ sub: "alice", exp: Math.floor(Date.now() / 1000) + 3, subscribe: [">"], publish: ["md.>"] });
      },
      refreshBeforeMs: 2000,
    }, AUTH_URL);
    await c.connect();
    const got = [];
    await c.subscribe("md.>", (m) => got.push(m.seq)).ready;
    await assert.rejects(c.publishAcked("secret.x", "x"), (e) => e.code === ErrorCode.FORBIDDEN);
    await sleep(3500); // past the first token's expiry
    assert.ok(issued >= 2, `a fresh token was asked for (${issued})`);
    assert.equal(c.state, "connected");
    assert.equal(c.reconnects, 0);
    await c.close();
    // a token the broker refuses: no retry, the client says why
    const bad = new Client(AUTH_URL, { token: "not.a.token", page: null, reconnectDelayMs: [20, 100], transports: transport === "fallback" ? ["fallback"] : ["websocket", "fallback"] });
    await assert.rejects(bad.connect(), (e) => e instanceof ConnectionClosed && /token/.test(e.reason));
    assert.equal(bad.state, "closed");
  });
}

test("a machine that slept (timers that fired far too late) reconnects at once and recovers", { skip, timeout: 30000 }, async () => {
  const c = client("websocket", { heartbeatMs: 1000, heartbeatTimeoutMs: 4000, sleepThresholdMs: 2000 });
  const publisher = client("websocket");
  await Promise.all([c.connect(), publisher.connect()]);
  const topic = unique("sleep");
  const got = [];
  await c.subscribe(topic, (m) => got.push(m.seq)).ready;
  await publisher.publishAcked(topic, "1");
  const realNow = Date.now;
  Date.now = () => realNow() + 60_000; // the watchdog's next check finds it ran a minute late
  try {
    await until(() => c.reconnects === 1 && c.state === "connected", "the reconnection");
  } finally {
    Date.now = realNow;
  }
  await publisher.publishAcked(topic, "2");
  await until(() => got.length === 2, "both messages");
  assert.deepEqual(got, [1, 2]);
  await Promise.all([c.close(), publisher.close()]);
});

test("the client moves to the fallback where a WebSocket cannot be opened", { skip, timeout: 30000 }, async () => {
  // a "proxy" that refuses every upgrade but passes plain HTTP
  const { hostname, port } = new globalThis.URL(URL.replace(/^ws/, "http"));
  const server = net.createServer((inbound) => {
    inbound.once("data", (head) => {
      if (/^upgrade:\s*websocket/im.test(head.toString("latin1"))) {
        inbound.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      const outbound = net.connect(Number(port), hostname);
      outbound.on("error", () => inbound.destroy());
      inbound.on("error", () => outbound.destroy());
      outbound.write(head);
      inbound.pipe(outbound);
      outbound.pipe(inbound);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const c = new Client(`ws://127.0.0.1:${server.address().port}/`, { page: null });
  await c.connect();
  assert.equal(c.transportKind, "fallback");
  const got = [];
  const topic = unique("fb");
  await c.subscribe(topic, (m) => got.push(text(m.data))).ready;
  await c.publishAcked(topic, "through the fallback");
  await until(() => got.length === 1, "the delivery");
  await c.close();
  server.close();
});
