// Subscriber fleet: N WebSocket client connections in one Bun process, each with its own
// subscriptions, handling every delivery the way an application does: one onmessage callback
// per WebSocket message, a full decode, the topic or subject resolved, every payload touched.
//
//   bun fleet.js CONFIG.json
//
// CONFIG: {url, urls: null or the url of each connection (a cluster's nodes), protocol: "broker" | "broker-old" | "nats" | "raw", subprotocol, acks, connections: [[pattern...]...],
//          counter: path of the shared counter file, slot, latency, concurrency, ready_timeout_s,
//          ca: for a wss:// url, the PEM file of the CA to trust (or null)}
// Protocols: "broker" is protocol v1 with coalesced frames (every frame is an array of
// messages: ack, err, topic, msg); "nats" is the NATS text protocol; "raw" is the Bun peer,
// one payload per binary frame. Payloads start with their publish time: 20 ASCII digits of
// CLOCK_MONOTONIC nanoseconds.
//
// Driven over stdin/stdout, one JSON line per reply: it prints {"ready": ...} once every
// connection is subscribed, then answers "mark" (counts), "latency" (histogram since the last
// "latency", then cleared) and stops at "exit" or when stdin closes. The total of delivered
// payloads is also kept in slot `slot` (float64) of the shared counter file after every
// callback, for the publisher's closed loop.
import { Decoder, Encoder } from "@msgpack/msgpack";
import { dlopen, FFIType } from "bun:ffi";

const config = JSON.parse(await Bun.file(process.argv[2]).text());
const tls = config.ca ? { ca: await Bun.file(config.ca).text() } : null; // wss://: trust the benchmark's CA
const STAMP = 20;

// CLOCK_MONOTONIC, the clock of Python's time.monotonic_ns(): Bun's own hrtime and
// nanoseconds() count from process start.
const libc = dlopen("libc.so.6", { clock_gettime: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 } });
const clockGettime = libc.symbols.clock_gettime;
const timespec = new BigInt64Array(2);
const timespecWords = new Int32Array(timespec.buffer);
function monotonicNs() {
  clockGettime(1, timespec);
  return timespecWords[0] * 1e9 + timespecWords[2];
}

// Latency histogram in microseconds: exact below 2048 µs, then 1024 buckets per power of two
// (0.1% resolution), up to 2^31 µs. Fixed size: recording allocates nothing.
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

const counterMap = Bun.mmap(config.counter);
const counter = new Float64Array(counterMap.buffer, counterMap.byteOffset, counterMap.byteLength >> 3);
const slot = config.slot;
const measureLatency = !!config.latency;
const histogram = new Histogram();
let total = 0;
let frames = 0;
let sink = 0; // what the payload reads produce, reported so no read can be optimized away
let stopping = false;
const closes = {};

// One delivered payload: read its stamp and its last byte, count it, time it.
function deliver(conn, payload, now) {
  const n = payload.length < STAMP ? payload.length : STAMP;
  let stamp = 0;
  for (let i = 0; i < n; i++) stamp = stamp * 10 + (payload[i] - 48);
  sink = (sink + payload[payload.length - 1]) | 0;
  conn.delivered++;
  total++;
  if (now) histogram.record(now - stamp);
}

class Conn {
  constructor(index, patterns) {
    this.index = index;
    this.patterns = patterns;
    this.delivered = 0;
    this.ready = false;
    this.closedWith = 0;
    this.failure = ""; // why the connection could not get ready, when it is the client that knows
  }
  open() {
    return new Promise((resolve, reject) => {
      this.resolveReady = () => {
        this.ready = true;
        resolve();
      };
      // subprotocol: one entry, or several separated by ", " (a bearer.TOKEN entry beside broker.v1)
      const protocols = config.subprotocol ? config.subprotocol.split(",").map((p) => p.trim()) : [];
      const url = config.urls ? config.urls[this.index] : config.url;
      const ws = tls ? new WebSocket(url, { protocols, tls }) : new WebSocket(url, protocols);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.onopen = () => this.subscribe();
      ws.onmessage = (event) => {
        frames++;
        this.receive(event.data, measureLatency ? monotonicNs() : 0);
        counter[slot] = total;
      };
      ws.onerror = () => {}; // a close event follows
      ws.onclose = (event) => {
        if (!this.ready) {
          reject(new Error(this.failure || `connection ${this.index} closed before it was ready: ${event.code} ${event.reason}`));
          return;
        }
        this.closedWith = event.code;
        if (!stopping) closes[event.code] = (closes[event.code] || 0) + 1;
      };
    });
  }
  stats() {
    return {};
  }
}

const decoder = new Decoder();
const encoder = new Encoder();

// Broker protocol v1, coalesced frames: [message, ...], messages ["ack", id, epoch, seq],
// ["err", id, code, text], ["topic", topic_id, name, epoch], ["msg", [topic_id, seq, payload...]...].
// The application's handler of each topic name, shared by the connections of the process (one
// application); a connection maps its topic ids to them.
const handlers = new Map();
function handlerOf(name) {
  let handler = handlers.get(name);
  if (handler === undefined) {
    handler = { deliveries: 0 };
    handlers.set(name, handler);
  }
  return handler;
}

class BrokerConn extends Conn {
  constructor(index, patterns) {
    super(index, patterns);
    // Topic ids are small (below twice the number of topics, in an order of the server's), so
    // a connection's tables are arrays indexed by id: the handler of the topic, its epoch and
    // the next expected sequence number. They grow by doubling, filled, so that an id far past
    // the end never turns an array into a dictionary.
    this.handlers = new Array(64).fill(undefined);
    this.epochs = new Float64Array(64);
    this.next = new Float64Array(64);
    this.acked = 0;
    this.gaps = 0;
    this.dups = 0;
    this.unknown = 0;
    this.errors = 0;
  }
  subscribe() {
    const ids = config.acks ? 1 : 0;
    this.ws.send(encoder.encode(this.patterns.map((p, i) => ["sub", ids && i + 1, p])));
    if (!config.acks) this.resolveReady();
  }
  receive(data, now) {
    const frame = decoder.decode(data);
    if (!Array.isArray(frame) || !Array.isArray(frame[0])) {
      this.malformed(frame);
      return;
    }
    for (let i = 0; i < frame.length; i++) {
      const m = frame[i];
      const type = m[0];
      if (type === "msg") {
        for (let j = 1; j < m.length; j++) this.batch(m[j], now);
      } else if (type === "topic") {
        this.announce(m[1], m[2], m[3]);
      } else if (type === "ack") {
        if (++this.acked === this.patterns.length && !this.ready) this.resolveReady();
      } else if (type === "err") {
        this.errors++;
        console.error(`connection ${this.index}: err ${JSON.stringify(m)}`);
      }
    }
  }
  // A frame that is not an array of messages: another wire format (the broker before coalesced frames).
  malformed(frame) {
    this.errors++;
    const text = `connection ${this.index}: a frame is not an array of messages: ${JSON.stringify(frame).slice(0, 120)}`;
    if (!this.ready) this.ws.close(1002, "not an array of messages");
    this.failure = text;
    console.error(text);
  }
  announce(id, name, epoch) {
    // the handler of the topic's name is looked up once, when the id is announced
    const handler = handlerOf(name);
    if (this.handlers[id] === handler) {
      if (this.epochs[id] !== epoch) {
        this.epochs[id] = epoch;
        this.next[id] = -1; // a new epoch starts a new sequence
      }
      return;
    }
    if (id >= this.next.length) {
      const size = Math.max(id + 1, this.next.length * 2);
      const handlers = new Array(size).fill(undefined);
      for (let i = 0; i < this.handlers.length; i++) handlers[i] = this.handlers[i];
      this.handlers = handlers;
      const epochs = new Float64Array(size);
      epochs.set(this.epochs);
      this.epochs = epochs;
      const next = new Float64Array(size);
      next.set(this.next);
      this.next = next;
    }
    this.handlers[id] = handler;
    this.epochs[id] = epoch;
    this.next[id] = -1;
  }
  batch(b, now) {
    const count = b.length - 2;
    const id = b[0];
    const handler = this.handlers[id];
    if (handler === undefined) {
      this.unknown += count;
    } else {
      handler.deliveries += count; // dispatch to the topic's handler, as an application would
      const seq = b[1];
      const next = this.next[id];
      if (next >= 0 && seq !== next) {
        if (seq > next) this.gaps += seq - next;
        else this.dups += Math.min(next - seq, count);
      }
      this.next[id] = seq + count;
    }
    for (let k = 2; k < b.length; k++) deliver(this, b[k], now);
  }
  stats() {
    return { gaps: this.gaps, dups: this.dups, unknown: this.unknown, errors: this.errors };
  }
}

// The broker before coalesced frames (the baseline of before/after comparisons): each frame is
// one message, ["msg", topic, epoch, seq, [payload, ...]], ["ack", id, epoch, seq] or ["err", ...].
class BrokerOldConn extends BrokerConn {
  constructor(index, patterns) {
    super(index, patterns);
    this.byName = new Map(); // topic name -> {next, handler}
  }
  receive(data, now) {
    const m = decoder.decode(data);
    const type = m[0];
    if (type === "msg") {
      let topic = this.byName.get(m[1]);
      if (topic === undefined) {
        topic = { next: -1, handler: handlerOf(m[1]) };
        this.byName.set(m[1], topic);
      }
      const payloads = m[4];
      topic.handler.deliveries += payloads.length;
      const seq = m[3];
      if (topic.next >= 0 && seq !== topic.next) {
        if (seq > topic.next) this.gaps += seq - topic.next;
        else this.dups += Math.min(topic.next - seq, payloads.length);
      }
      topic.next = seq + payloads.length;
      for (let k = 0; k < payloads.length; k++) deliver(this, payloads[k], now);
    } else if (type === "ack") {
      if (++this.acked === this.patterns.length && !this.ready) this.resolveReady();
    } else if (type === "err") {
      this.errors++;
      console.error(`connection ${this.index}: err ${JSON.stringify(m)}`);
    }
  }
}

// NATS text protocol, parsed byte by byte like nats.js: op lines up to "\r\n", MSG payloads
// of the announced size (a subarray when whole in one frame), anything split across frames.
const LINE = 0;
const PAYLOAD = 1;
const TRAILER = 2;
const textDecoder = new TextDecoder();
const textEncoder = new TextEncoder();

class NatsConn extends Conn {
  constructor(index, patterns) {
    super(index, patterns);
    this.state = LINE;
    this.line = new Uint8Array(256); // an op line split across frames
    this.lineLength = 0;
    this.size = 0;
    this.subject = "";
    this.sid = 0;
    this.pending = null; // a payload split across frames
    this.have = 0;
    this.trailer = 0;
    this.fields = new Int32Array(10);
    this.subs = patterns.map((subject) => ({ subject, deliveries: 0 }));
    this.errors = 0;
    this.slow = 0;
  }
  subscribe() {
    const lines = ['CONNECT {"verbose":false,"pedantic":false,"protocol":1,"headers":false,"no_responders":false}\r\n'];
    this.patterns.forEach((p, i) => lines.push(`SUB ${p} ${i + 1}\r\n`));
    lines.push("PING\r\n");
    this.ws.send(lines.join(""));
  }
  receive(data, now) {
    const buf = typeof data === "string" ? textEncoder.encode(data) : new Uint8Array(data);
    const n = buf.length;
    let i = 0;
    while (i < n) {
      if (this.state === PAYLOAD) {
        if (this.pending === null && n - i >= this.size) {
          this.message(buf.subarray(i, i + this.size), now);
          i += this.size;
        } else {
          if (this.pending === null) {
            this.pending = new Uint8Array(this.size);
            this.have = 0;
          }
          const take = Math.min(this.size - this.have, n - i);
          this.pending.set(buf.subarray(i, i + take), this.have);
          this.have += take;
          i += take;
          if (this.have < this.size) continue;
          this.message(this.pending, now);
          this.pending = null;
        }
        this.state = TRAILER;
        this.trailer = 2;
      } else if (this.state === TRAILER) {
        const skip = Math.min(this.trailer, n - i);
        this.trailer -= skip;
        i += skip;
        if (this.trailer === 0) this.state = LINE;
      } else {
        let j = i;
        while (j < n && buf[j] !== 10) j++;
        if (j === n) {
          this.keep(buf, i, n);
          break;
        }
        if (this.lineLength) {
          this.keep(buf, i, j);
          this.op(this.line, 0, this.lineLength);
          this.lineLength = 0;
        } else {
          this.op(buf, i, j);
        }
        i = j + 1;
      }
    }
  }
  keep(buf, start, end) {
    const need = this.lineLength + end - start;
    if (need > this.line.length) {
      const grown = new Uint8Array(Math.max(need, this.line.length * 2));
      grown.set(this.line.subarray(0, this.lineLength));
      this.line = grown;
    }
    this.line.set(buf.subarray(start, end), this.lineLength);
    this.lineLength = need;
  }
  // One op line, b[start:end] without its "\n".
  op(b, start, end) {
    if (end > start && b[end - 1] === 13) end--;
    if (b[start] === 77 && b[start + 1] === 83 && b[start + 2] === 71 && b[start + 3] === 32) {
      // MSG <subject> <sid> [reply-to] <size>
      const f = this.fields;
      let count = 0;
      let from = start + 4;
      for (let k = from; k <= end; k++) {
        if (k === end || b[k] === 32 || b[k] === 9) {
          if (k > from && count < 10) {
            f[count++] = from;
            f[count++] = k;
          }
          from = k + 1;
        }
      }
      this.subject = textDecoder.decode(b.subarray(f[0], f[1]));
      this.sid = digits(b, f[2], f[3]);
      this.size = digits(b, f[count - 2], f[count - 1]);
      this.state = PAYLOAD;
      return;
    }
    const word = textDecoder.decode(b.subarray(start, Math.min(end, start + 64)));
    if (word === "PING") this.ws.send("PONG\r\n");
    else if (word === "PONG") {
      if (!this.ready) this.resolveReady();
    } else if (word.startsWith("-ERR")) {
      this.errors++;
      if (word.toLowerCase().includes("slow consumer")) this.slow++;
      console.error(`connection ${this.index}: ${word}`);
    }
  }
  message(payload, now) {
    const sub = this.subs[this.sid - 1]; // dispatch by subscription id, as nats.js does
    if (sub !== undefined) sub.deliveries++;
    deliver(this, payload, now);
  }
  stats() {
    return { errors: this.errors, slow: this.slow };
  }
}

function digits(b, start, end) {
  let v = 0;
  for (let k = start; k < end; k++) v = v * 10 + (b[k] - 48);
  return v;
}

// The Bun peer: "S <topic>" subscribes, "P" is answered with "P" once everything before it is
// handled; each binary frame is one payload.
class RawConn extends Conn {
  subscribe() {
    for (const p of this.patterns) this.ws.send(`S ${p}`);
    this.ws.send("P");
  }
  receive(data, now) {
    if (typeof data === "string") {
      if (data === "P" && !this.ready) this.resolveReady();
      return;
    }
    deliver(this, new Uint8Array(data), now);
  }
}

const kinds = { broker: BrokerConn, "broker-old": BrokerOldConn, nats: NatsConn, raw: RawConn };
const Kind = kinds[config.protocol];
if (Kind === undefined) throw new Error(`unknown protocol ${config.protocol}`);
const conns = config.connections.map((patterns, i) => new Kind(i, patterns));

function reply(value) {
  process.stdout.write(JSON.stringify(value) + "\n");
}

function mark() {
  const sums = {};
  let open = 0;
  for (const c of conns) {
    if (!c.closedWith) open++;
    const s = c.stats();
    for (const key in s) sums[key] = (sums[key] || 0) + s[key];
  }
  return {
    time_ns: monotonicNs(),
    delivered: total,
    per_conn: conns.map((c) => c.delivered),
    frames,
    open,
    closes,
    sink,
    ...sums,
  };
}

function command(line) {
  if (line === "mark") reply(mark());
  else if (line === "latency") reply({ histogram: histogram.take() });
  else if (line === "exit") stop(0);
  else reply({ error: `unknown command ${line}` });
}

function stop(code) {
  stopping = true;
  for (const c of conns) if (c.ws && !c.closedWith) c.ws.close();
  setTimeout(() => process.exit(code), 50);
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  input += chunk;
  let end;
  while ((end = input.indexOf("\n")) >= 0) {
    const line = input.slice(0, end).trim();
    input = input.slice(end + 1);
    if (line) command(line);
  }
});
process.stdin.on("end", () => stop(0)); // the runner is gone

async function openAll() {
  let next = 0;
  const worker = async () => {
    while (next < conns.length) await conns[next++].open();
  };
  await Promise.all(Array.from({ length: Math.min(config.concurrency || 100, conns.length) }, worker));
}

const timeout = setTimeout(() => {
  reply({ error: `not ready after ${config.ready_timeout_s} s: ${conns.filter((c) => c.ready).length} of ${conns.length} connections` });
  stop(2);
}, (config.ready_timeout_s || 60) * 1000);
try {
  await openAll();
  clearTimeout(timeout);
  reply({ ready: conns.length, clock_ns: monotonicNs(), pid: process.pid });
} catch (err) {
  clearTimeout(timeout);
  reply({ error: String(err.message || err) });
  stop(2);
}
