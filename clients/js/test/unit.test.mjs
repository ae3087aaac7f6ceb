// Unit tests of the sans-I/O core and the pure parts of the client: no network, no timers.
// Run with `node --test test/` (Node 22+) or `bun test` after `npm run build`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Decoder, Encoder } from "@msgpack/msgpack";
import { Client, Core, ErrorCode, QueueFull, RequestError, matches, validatePattern, validateTopic, wire } from "../dist/index.js";

const encoder = new Encoder({ useBigInt64: true });
const decoder = new Decoder({ useBigInt64: true });
const frame = (...messages) => encoder.encode(messages);
const EPOCH = 1853070350745970085n;
const bytes = (text) => new TextEncoder().encode(text);
const text = (data) => new TextDecoder().decode(data);

function core(options = {}) {
  const seen = { messages: [], gaps: [], errors: [], violations: [], dropped: [] };
  const c = new Core(
    { maxBatchBytes: 1 << 20, maxBatchMessages: 10000, maxOfflineMessages: 100, offlineOverflow: "raise", heartbeatMs: 0, ...options },
    {
      message: (sub, m) => sub.handler(m),
      gap: (sub, g) => seen.gaps.push([sub.pattern, g]),
      error: (e) => seen.errors.push(e),
      violation: (t) => seen.violations.push(t),
      dropped: (topic, data, msgId) => seen.dropped.push([topic, text(data), msgId]),
      queued: () => {},
    },
  );
  return { c, seen };
}

/** The messages of the frames the core would send now. */
function sent(c) {
  const out = [];
  for (const f of c.takeFrames()) {
    const value = decoder.decode(f);
    if (Array.isArray(value[0])) out.push(...value);
    else out.push(value);
  }
  return out;
}

function subscribe(c, pattern, options = {}) {
  const got = [];
  const sub = c.subscribe(pattern, (m) => got.push([m.topic, m.seq, text(m.data), m.conflated]), options, async () => {});
  return { sub, got };
}

test("topics and patterns follow protocol.md section 4", () => {
  validateTopic("md.NASDAQ.AAPL");
  validatePattern("md.*.AAPL");
  validatePattern(">");
  for (const bad of ["", "md..a", ".md", "md.", "md.A*", "md.>.x", "md AAPL", "md.é", "a.".repeat(40) + "a"]) {
    assert.throws(() => validatePattern(bad), (e) => e instanceof RequestError && e.code === ErrorCode.INVALID_TOPIC, bad);
  }
  assert.throws(() => validateTopic("md.*"), (e) => e.code === ErrorCode.PATTERN_NOT_ALLOWED);
  assert.ok(matches("md.>", "md.a.b") && matches("md.*.AAPL", "md.X.AAPL") && matches(">", "a"));
  assert.ok(!matches("md.>", "md") && !matches("md.*.AAPL", "md.AAPL") && !matches("md.a", "md.b"));
});

test("the publishes of one turn leave in one frame, split by count and by bytes", () => {
  const { c } = core({ maxBatchMessages: 3, maxBatchBytes: 1000 });
  c.opened();
  for (let i = 0; i < 7; i++) c.publish("md.a", bytes(`p${i}`));
  const frames = c.takeFrames();
  assert.equal(frames.length, 3);
  assert.deepEqual(decoder.decode(frames[0]).map((m) => m[0]), ["pub", "pub", "pub"]);
  assert.deepEqual(decoder.decode(frames[2]), ["pub", 0, "md.a", bytes("p6")]); // a single message is sent as itself
  c.publish("md.a", new Uint8Array(600));
  c.publish("md.a", new Uint8Array(600));
  assert.equal(c.takeFrames().length, 2); // 1000 bytes would be passed
});

test("deliveries reach each matching subscription once and in order; replays are skipped", () => {
  const { c, seen } = core();
  c.opened();
  const all = subscribe(c, "md.>");
  const one = subscribe(c, "md.a");
  const [s1, s2] = sent(c);
  assert.deepEqual(s1.slice(0, 3), ["sub", 1, "md.>"]);
  c.receive(frame(["ack", 1, 1767225660000n, 0], ["ack", 2, EPOCH, 2], ["topic", 0, "md.a", EPOCH], ["msg", [0, 1, bytes("x1"), bytes("x2"), bytes("x3")]]));
  assert.deepEqual(all.got.map((m) => m[1]), [1, 2, 3]);
  assert.deepEqual(one.got.map((m) => m[1]), [3]); // its ack said seq 2: what came before is not its own
  c.receive(frame(["msg", [0, 2, bytes("x2"), bytes("x3"), bytes("x4")]])); // a replay overlapping what arrived
  assert.deepEqual(all.got.map((m) => m[1]), [1, 2, 3, 4]);
  assert.equal(typeof all.got[0][0], "string");
  assert.deepEqual([...all.sub.positions.get("md.a").epoch.toString()], [...EPOCH.toString()]); // exact, 63 bits
  assert.deepEqual(all.sub.since(), { time: "1767225660000", topics: { "md.a": { epoch: EPOCH.toString(), seq: 4 } } });
  assert.deepEqual(one.sub.since(), { epoch: EPOCH.toString(), seq: 4 });
  assert.equal(seen.violations.length, 0);
});

test("gaps: a range, an ended epoch told once, a conflated one marks the next message", () => {
  const { c, seen } = core();
  c.opened();
  const s = subscribe(c, "md.>");
  c.receive(frame(["ack", 1, 5n, 0], ["topic", 0, "md.a", EPOCH], ["msg", [0, 1, bytes("a")]]));
  c.receive(frame(["gap", "md.a", EPOCH, 2, 4, "history no longer holds these messages", "history"], ["msg", [0, 5, bytes("e")]]));
  c.receive(frame(["gap", "md.a", EPOCH, 3, 4, "again, overlapping", "history"])); // delivered past it already
  c.receive(frame(["gap", "md.a", EPOCH, 6, 8, "conflated", "conflated"], ["msg", [0, 9, bytes("i")]]));
  c.receive(frame(["gap", "md.a", EPOCH, 1, 0, "epoch ended", "ended"], ["gap", "md.a", EPOCH, 1, 0, "epoch ended", "ended"]));
  assert.deepEqual(s.got, [["md.a", 1, "a", false], ["md.a", 5, "e", false], ["md.a", 9, "i", true]]);
  assert.deepEqual(seen.gaps.map(([, g]) => [g.first, g.last, g.cause]), [[2, 4, "history"], [6, 8, "conflated"], [10, 0, "ended"]]);
});

test("unknown server message types are ignored; a delivery of an unannounced topic is a violation", () => {
  const { c, seen } = core();
  c.opened();
  subscribe(c, "md.>");
  c.receive(frame(["future-type", 1, 2, 3], ["beat", 1767225660000n], ["ack", 1, 0, 0]));
  assert.equal(seen.violations.length, 0);
  c.receive(frame(["msg", [7, 1, bytes("x")]]));
  assert.match(seen.violations[0], /topic id 7/);
  c.receive(new Uint8Array([0xc1]));
  c.receive(encoder.encode(["ack", 1, 0, 0])); // not an array of messages
  assert.equal(seen.violations.length, 3);
});

test("errors carry the protocol's codes: to the request that waits, else to the error event", async () => {
  const { c, seen } = core();
  c.opened();
  const s = subscribe(c, "md.a");
  sent(c);
  c.receive(frame(["err", 1, 16, "not allowed to subscribe to 'md.a'"], ["err", 0, 7, "payload is 600000 bytes"]));
  await assert.rejects(s.sub.ready, (e) => e instanceof RequestError && e.code === ErrorCode.FORBIDDEN && e.codeName === "FORBIDDEN" && e.id === 1);
  assert.equal(seen.errors[0].code, ErrorCode.PAYLOAD_TOO_LARGE);
  assert.equal(c.subscriptions.length, 0);
  c.receive(frame(["err", 0, 99, "a code from a later broker"]));
  assert.equal(seen.errors[1].codeName, "UNKNOWN");
});

test("offline publishes wait with msg_ids, bounded: raise, or drop the oldest and say so", () => {
  const { c, seen } = core({ maxOfflineMessages: 2 });
  c.publish("md.a", bytes("1"));
  c.publish("md.a", bytes("2"));
  assert.throws(() => c.publish("md.a", bytes("3")), QueueFull);
  const dropping = core({ maxOfflineMessages: 2, offlineOverflow: "dropOldest" });
  for (const p of ["1", "2", "3"]) dropping.c.publish("md.a", bytes(p));
  assert.equal(dropping.c.offlineDropped, 1);
  assert.deepEqual(dropping.seen.dropped.map((d) => d[1]), ["1"]);
  c.opened();
  const first = sent(c);
  assert.deepEqual(first.map((m) => [m[0], m[1], text(m[3])]), [["pub", 1, "1"], ["pub", 2, "2"]]);
  const ids = first.map((m) => m[4]);
  assert.match(ids[0], /^[0-9a-f]{16}-\d+$/);
  c.receive(frame(["ack", 1, EPOCH, 1]));
  c.lost(1006, "connection lost", true); // the second was not acknowledged: sent again, same msg_id
  c.opened();
  const again = sent(c).filter((m) => m[0] === "pub");
  assert.deepEqual(again.map((m) => [text(m[3]), m[4]]), [["2", ids[1]]]);
  assert.equal(seen.errors.length, 0);
});

test("after a lost connection every subscription is made again from its position", () => {
  const { c } = core({ heartbeatMs: 5000 });
  c.opened();
  const topic = subscribe(c, "md.a");
  const pattern = subscribe(c, "md.>", { policy: "conflate" });
  c.respond("svc.q", () => bytes("r"));
  const first = sent(c);
  assert.deepEqual(first[0], ["hb", 0, 5000]);
  c.receive(frame(["ack", 1, EPOCH, 0], ["ack", 2, 1000n, 0], ["ack", 3, 0, 0], ["topic", 0, "md.a", EPOCH], ["topic", 1, "md.b", EPOCH], ["msg", [0, 1, bytes("a")], [1, 4, bytes("b")]]));
  c.lost(1006, "connection lost", true);
  c.opened();
  const again = sent(c);
  assert.deepEqual(again[0], ["hb", 0, 5000]);
  assert.deepEqual(again[1], ["sub", 0, "svc.q", null, false, true, ""]);
  assert.deepEqual(again[2].slice(2), ["md.a", [EPOCH, 1], false, false, ""]);
  assert.deepEqual(again[3].slice(2), ["md.>", [1000n, { "md.a": [EPOCH, 1], "md.b": [EPOCH, 4] }], false, false, "conflate"]);
  c.receive(frame(["ack", again[2][1], EPOCH, 1], ["topic", 0, "md.a", EPOCH], ["msg", [0, 1, bytes("a"), bytes("a2")]]));
  assert.deepEqual(topic.got.map((m) => m[1]), [1, 2]);
  assert.deepEqual(pattern.got.map((m) => m[1]), [1, 4, 2]);
});

test("a subscription made with a saved position asks the broker for what came after it", () => {
  const { c } = core();
  c.opened();
  subscribe(c, "md.a", { since: { epoch: EPOCH.toString(), seq: 3 } });
  subscribe(c, "md.>", { since: { time: "1767225660000", topics: { "md.a": { epoch: EPOCH.toString(), seq: 3 } } } });
  subscribe(c, "md.b", { last: true });
  const [a, all, b] = sent(c);
  assert.deepEqual(a.slice(2, 5), ["md.a", [EPOCH, 3], false]);
  assert.deepEqual(all.slice(2, 4), ["md.>", [1767225660000n, { "md.a": [EPOCH, 3] }]]);
  assert.deepEqual(b.slice(2, 5), ["md.b", null, true]);
  assert.throws(() => subscribe(c, "md.c", { since: { time: "1", topics: {} } }), TypeError);
  assert.throws(() => subscribe(c, "md.a"), (e) => e.code === ErrorCode.ALREADY_SUBSCRIBED);
  assert.throws(() => subscribe(c, "md.d", { policy: "fast" }), TypeError);
});

test("hidden: unsubscribed at the broker, or conflating; visible again: recovered from the positions", () => {
  for (const mode of ["unsubscribe", "conflate"]) {
    const { c } = core();
    c.hiddenMode = mode;
    c.opened();
    const s = subscribe(c, "md.a", { policy: "drop" });
    sent(c);
    c.receive(frame(["ack", 1, EPOCH, 0], ["topic", 0, "md.a", EPOCH], ["msg", [0, 1, bytes("a")]]));
    c.setHidden(true);
    const hidden = sent(c);
    assert.deepEqual(hidden[0], ["unsub", 0, "md.a"]);
    if (mode === "conflate") assert.deepEqual(hidden[1].slice(2), ["md.a", [EPOCH, 1], false, false, "conflate"]);
    else assert.equal(hidden.length, 1);
    if (mode === "conflate") c.receive(frame(["ack", hidden[1][1], EPOCH, 1]));
    c.setHidden(false);
    const visible = sent(c);
    assert.deepEqual(visible.at(-1).slice(2), ["md.a", [EPOCH, 1], false, false, "drop"]);
    assert.equal(visible[0][0], mode === "conflate" ? "unsub" : "sub");
    assert.deepEqual(s.got.map((m) => m[1]), [1]);
  }
});

test("requests and responders: replies matched by id, the responder's answer sent back", async () => {
  const { c } = core();
  c.opened();
  let reply;
  const done = new Promise((resolve, reject) => (reply = { resolve, reject }));
  c.call((id) => wire.req(id, "svc.q", bytes("hi"), 500), reply);
  const registered = c.respond("svc.echo", (r) => `echo ${text(r.data)} for ${r.user}`);
  const out = sent(c);
  assert.deepEqual(out[0], ["req", 1, "svc.q", bytes("hi"), 500]);
  c.receive(frame(["reply", 1, bytes("there")], ["ack", 2, 0, 0], ["request", 7, "svc.echo", bytes("x"), "alice"]));
  assert.equal(text(await done), "there");
  await registered;
  assert.deepEqual(sent(c), [["reply", 7, bytes("echo x for alice")]]);
});

test("the client's options are checked and its backoff is bounded", () => {
  const client = new Client("ws://127.0.0.1:1/", { reconnectDelayMs: [100, 1000], page: null });
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((n) => client.backoffBound(n)), [100, 200, 400, 800, 1000, 1000]);
  assert.throws(() => new Client("http://x/"), TypeError);
  assert.throws(() => new Client("ws://x/", { heartbeatMs: 500 }), RangeError);
  assert.throws(() => new Client("ws://x/", { heartbeatMs: 5000, heartbeatTimeoutMs: 5500 }), RangeError);
  assert.throws(() => new Client("ws://x/", { hiddenMode: "sleep" }), TypeError);
  assert.throws(() => new Client("ws://x/", { transports: [] }), TypeError);
});
