// Interoperability with docs/protocol.md: every hex example of section 11 decodes with this
// package to the documented value and encodes back to the same bytes, the complete server
// frames are handled by the client's core, and the event examples of section 12 read as the
// fallback transport reads them. The examples come from the document itself, through
// tests/test_js_client.py, which writes them to the file named by BROKER_EXAMPLES.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { Core, eventBytes, readEvent, wire } from "../dist/index.js";

const path = process.env.BROKER_EXAMPLES;
const examples = path ? JSON.parse(readFileSync(path, "utf8")) : null;
const skip = path ? false : "BROKER_EXAMPLES is not set (tests/test_js_client.py sets it)";

const hex = (data) => Array.from(data, (b) => b.toString(16).padStart(2, "0")).join("");
const fromHex = (text) => Uint8Array.from(text.match(/../g) ?? [], (h) => parseInt(h, 16));

/** A decoded value in the documented form: integers as {i: decimal}, bytes as {b: hex}. */
function normal(value) {
  if (typeof value === "number" || typeof value === "bigint") return { i: String(value) };
  if (value instanceof Uint8Array) return { b: hex(value) };
  if (Array.isArray(value)) return value.map(normal);
  if (value !== null && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, normal(v)]));
  return value;
}

/** The payload of a complete server WebSocket frame (unmasked). */
function payloadOf(frame) {
  const length = frame[1] & 0x7f;
  const start = length < 126 ? 2 : length === 126 ? 4 : 10;
  return frame.subarray(start);
}

test("every hex example of protocol.md decodes to its value and encodes back to its bytes", { skip }, () => {
  assert.ok(examples.messages.length >= 25, "the examples were read");
  for (const example of examples.messages) {
    const data = fromHex(example.hex);
    const body = example.encoding === "websocket-frame" ? payloadOf(data) : data;
    const value = wire.decode(body);
    assert.deepEqual(normal(value), example.value, example.name);
    assert.equal(hex(wire.encode(value)), hex(body), `${example.name}: re-encoded`);
    if (example.encoding === "websocket-frame" || (Array.isArray(value) && Array.isArray(value[0]) && typeof value[0][0] === "string" && !["pub", "sub"].includes(value[0][0]))) {
      assert.ok(wire.messagesOf(body).length >= 1, `${example.name}: a server frame`);
    }
  }
});

test("the client's core handles the documented server frames", { skip }, () => {
  const byName = Object.fromEntries(examples.messages.map((e) => [e.name, e]));
  const got = [];
  const core = new Core(
    { maxBatchBytes: 1 << 20, maxBatchMessages: 10000, maxOfflineMessages: 10, offlineOverflow: "raise", heartbeatMs: 0 },
    { message: (sub, m) => got.push([m.topic, m.epoch, m.seq, hex(m.data)]), gap: () => {}, error: (e) => assert.fail(e.message), violation: (t) => assert.fail(t), dropped: () => {}, queued: () => {} },
  );
  core.opened();
  core.subscribe("md.*.AAPL", () => {}, {}, async () => {});
  core.takeFrames();
  const one = (name) => Uint8Array.of(0x91, ...fromHex(byName[name].hex)); // a message alone in a frame
  core.receive(one("ack_sub"));
  core.receive(payloadOf(fromHex(byName.frame.hex)));
  core.receive(one("topic"));
  const second = wire.encode([["topic", 1, "md.NYSE.AAPL", 1853070350745970085n]]);
  core.receive(second);
  core.receive(one("msg"));
  core.receive(one("beat"));
  assert.deepEqual(got, [
    ["md.NASDAQ.AAPL", 1853070350745970085n, 1, hex(new TextEncoder().encode("189.25"))],
    ["md.NASDAQ.AAPL", 1853070350745970085n, 2, hex(new TextEncoder().encode("189.30"))],
    ["md.NASDAQ.AAPL", 1853070350745970085n, 3, hex(new TextEncoder().encode("189.35"))],
    ["md.NYSE.AAPL", 1853070350745970085n, 1, hex(new TextEncoder().encode("189.31"))],
    ["md.NYSE.AAPL", 1853070350745970085n, 2, "0001ff"],
  ]);
});

test("the event examples of protocol.md section 12 read as the fallback transport reads them", { skip }, () => {
  assert.ok(examples.events.length >= 2);
  for (const example of examples.events) {
    const { kind, data, id } = readEvent(example.event);
    assert.equal(kind, "message", example.name);
    assert.match(id, /^[0-9a-f]{8}-\d+$/);
    assert.deepEqual(normal(wire.messagesOf(eventBytes(data))), example.value, example.name);
  }
  assert.deepEqual(readEvent("id: 5a5a5a5a-0\nevent: open\ndata: new"), { kind: "open", data: "new", id: "5a5a5a5a-0" });
  assert.deepEqual(readEvent("event: close\ndata: 1013 slow consumer: 9 bytes pending, limit 8"), { kind: "close", data: "1013 slow consumer: 9 bytes pending, limit 8", id: null });
});
