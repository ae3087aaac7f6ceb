// What a client pays to decode deliveries, by wire layout: @msgpack/msgpack in Bun, the
// decoder the fleet uses, 256 messages of 100 bytes to 256 different topics (the wildcard case:
// one message per topic per loop iteration), every payload touched as the fleet does.
//
//   bun bench/fleet/formats.js
//
// Layouts:
//   per-topic frames   one frame per topic, ["msg", topic, epoch, seq, [payload]] (the broker
//                      before coalesced frames): 256 decodes of one message each
//   topic strings      one frame, [["msg", topic, epoch, seq, [payload]], ...]
//   topic ids          one frame, [["msg", [topic_id, seq, payload], ...]] (protocol v1)
//   payloads only      one frame, [payload, ...]: the floor, no topic and no sequence number
import { Decoder, encode } from "@msgpack/msgpack";

const N = 256;
const EPOCH = 1767225600000;
const payload = new Uint8Array(100).fill(120);
for (let i = 0; i < 20; i++) payload[i] = 48 + (i % 10);
const names = Array.from({ length: N }, (_, i) => `md.x.${i}`);
const decoder = new Decoder();
let sink = 0;

function touch(p) {
  let stamp = 0;
  for (let i = 0; i < 20; i++) stamp = stamp * 10 + (p[i] - 48);
  sink = (sink + p[p.length - 1] + (stamp & 1)) | 0;
}

const perTopic = names.map((t, i) => encode(["msg", t, EPOCH, 1000 + i, [payload]]));
const topicStrings = encode(names.map((t, i) => ["msg", t, EPOCH, 1000 + i, [payload]]));
const topicIds = encode([["msg", ...names.map((_, i) => [i, 1000 + i, payload])]]);
const payloadsOnly = encode(Array.from({ length: N }, () => payload));
const table = names.map((name) => ({ name, deliveries: 0 }));
const byName = new Map(names.map((name) => [name, { deliveries: 0 }]));

const layouts = {
  "per-topic frames": () => {
    for (const frame of perTopic) {
      const m = decoder.decode(frame);
      byName.get(m[1]).deliveries++;
      for (const p of m[4]) touch(p);
    }
  },
  "topic strings": () => {
    for (const m of decoder.decode(topicStrings)) {
      byName.get(m[1]).deliveries++;
      for (const p of m[4]) touch(p);
    }
  },
  "topic ids": () => {
    for (const m of decoder.decode(topicIds)) {
      for (let b = 1; b < m.length; b++) {
        const batch = m[b];
        table[batch[0]].deliveries++;
        for (let k = 2; k < batch.length; k++) touch(batch[k]);
      }
    }
  },
  "payloads only": () => {
    for (const p of decoder.decode(payloadsOnly)) touch(p);
  },
};

const results = {};
for (let round = 0; round < 5; round++) {
  for (const [name, run] of Object.entries(layouts)) {
    for (let i = 0; i < 200; i++) run();
    const reps = 2000;
    const began = performance.now();
    for (let i = 0; i < reps; i++) run();
    const ns = ((performance.now() - began) * 1e6) / (reps * N);
    (results[name] ||= []).push(ns);
  }
}
console.log("| layout | ns per message (median of 5) |");
console.log("|---|---|");
for (const [name, values] of Object.entries(results)) {
  values.sort((a, b) => a - b);
  console.log(`| ${name} | ${values[2].toFixed(0)} |`);
}
if (sink === 42) console.log("");
