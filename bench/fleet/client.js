// The broker's own TypeScript client (clients/js, built) as a benchmark subscriber, in Node
// 22+ or Bun: each connection is a Client with a handler per message that reads the payload's
// stamp and last byte, as fleet.js's own decoder does per payload, after the client's full
// decode of every frame. Same config, stdin/stdout commands and shared counter as fleet.js
// (bench/fleetproc.py drives both), plus `transport`: "websocket" or "fallback".
//
//   node client.js CONFIG.json      bun client.js CONFIG.json
import { openSync, readFileSync, writeSync } from "node:fs";
import { Client } from "../../clients/js/dist/index.js";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const isBun = typeof globalThis.Bun !== "undefined";
const STAMP = 20;

// CLOCK_MONOTONIC ns, the clock of Python's time.monotonic_ns(): Node's hrtime is it; Bun's
// counts from the process start, so Bun reads clock_gettime through FFI.
let monotonicNs = () => Number(process.hrtime.bigint());
if (isBun) {
  const { dlopen, FFIType } = await import("bun:ffi");
  const libc = dlopen("libc.so.6", { clock_gettime: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 } });
  const timespec = new BigInt64Array(2);
  const words = new Int32Array(timespec.buffer);
  monotonicNs = () => {
    libc.symbols.clock_gettime(1, timespec);
    return words[0] * 1e9 + words[2];
  };
}

// fleet.js's histogram: microseconds, exact below 2048, then 1024 buckets per power of two
class Histogram {
  constructor() {
    this.counts = new Float64Array(2048 + 21 * 1024);
  }
  record(ns) {
    let us = Math.floor(ns / 1000);
    if (us < 0) us = 0;
    if (us >= 2147483647) us = 2147483647;
    if (us < 2048) {
      this.counts[us]++;
      return;
    }
    const e = 31 - Math.clz32(us);
    this.counts[2048 + (e - 11) * 1024 + ((us >>> (e - 10)) & 1023)]++;
  }
  static value(index) {
    if (index < 2048) return index;
    const e = 11 + Math.floor((index - 2048) / 1024);
    return (((index - 2048) % 1024) + 1024) * 2 ** (e - 10);
  }
  take() {
    const out = [];
    for (let i = 0; i < this.counts.length; i++) if (this.counts[i]) out.push([Histogram.value(i), this.counts[i]]);
    this.counts.fill(0);
    return out;
  }
}

// The delivered total goes to slot `slot` of the shared counter file once per turn of the
// event loop (Bun maps the file; Node writes the 8 bytes at the slot's offset).
const slot = config.slot;
const totalBox = new Float64Array(1);
let writeCounter;
if (isBun) {
  const map = Bun.mmap(config.counter);
  const counter = new Float64Array(map.buffer, map.byteOffset, map.byteLength >> 3);
  writeCounter = () => (counter[slot] = total);
} else {
  const fd = openSync(config.counter, "r+");
  const bytes = new Uint8Array(totalBox.buffer);
  writeCounter = () => {
    totalBox[0] = total;
    writeSync(fd, bytes, 0, 8, slot * 8);
  };
}
let counterDue = false;
let frames = 0; // turns of the event loop that delivered something: one per WebSocket message (or event)
const flushCounter = () => {
  counterDue = false;
  frames++;
  writeCounter();
};

const measureLatency = !!config.latency;
const histogram = new Histogram();
let total = 0;
let sink = 0;
let stopping = false;
const closes = {};

const conns = config.connections.map((patterns, index) => ({ index, patterns, delivered: 0, gaps: 0, client: null, ready: false }));

function open(conn) {
  const url = config.urls ? config.urls[conn.index] : config.url;
  const client = new Client(url, { transports: [config.transport || "websocket"], page: null, heartbeatMs: 0, maxOfflineMessages: 0 });
  conn.client = client;
  client.on("state", ({ state, code }) => {
    if (!stopping && conn.ready && (state === "disconnected" || state === "closed")) closes[code] = (closes[code] || 0) + 1;
  });
  client.on("gap", () => conn.gaps++);
  const handler = (message) => {
    const payload = message.data;
    const n = payload.length < STAMP ? payload.length : STAMP;
    let stamp = 0;
    for (let i = 0; i < n; i++) stamp = stamp * 10 + (payload[i] - 48);
    sink = (sink + payload[payload.length - 1]) | 0;
    conn.delivered++;
    total++;
    if (measureLatency) histogram.record(monotonicNs() - stamp);
    if (!counterDue) {
      counterDue = true;
      queueMicrotask(flushCounter);
    }
  };
  const subs = conn.patterns.map((p) => client.subscribe(p, handler));
  return client.connect().then(() => Promise.all(subs.map((s) => s.ready))).then(() => {
    conn.ready = true;
  });
}

function reply(value) {
  process.stdout.write(JSON.stringify(value) + "\n");
}

function mark() {
  return {
    time_ns: monotonicNs(),
    delivered: total,
    per_conn: conns.map((c) => c.delivered),
    frames,
    open: conns.filter((c) => c.client && c.client.state === "connected").length,
    closes,
    sink,
    gaps: conns.reduce((sum, c) => sum + c.gaps, 0),
  };
}

function stop(code) {
  stopping = true;
  for (const c of conns) c.client?.close();
  setTimeout(() => process.exit(code), 100);
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  input += chunk;
  let end;
  while ((end = input.indexOf("\n")) >= 0) {
    const line = input.slice(0, end).trim();
    input = input.slice(end + 1);
    if (line === "mark") reply(mark());
    else if (line === "latency") reply({ histogram: histogram.take() });
    else if (line === "exit") stop(0);
    else if (line) reply({ error: `unknown command ${line}` });
  }
});
process.stdin.on("end", () => stop(0));

const timeout = setTimeout(() => {
  reply({ error: `not ready after ${config.ready_timeout_s} s` });
  stop(2);
}, (config.ready_timeout_s || 60) * 1000);
try {
  let next = 0;
  const worker = async () => {
    while (next < conns.length) await open(conns[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(config.concurrency || 100, conns.length) }, worker));
  clearTimeout(timeout);
  reply({ ready: conns.length, clock_ns: monotonicNs(), pid: process.pid });
} catch (err) {
  clearTimeout(timeout);
  reply({ error: String(err.message || err) });
  stop(2);
}
