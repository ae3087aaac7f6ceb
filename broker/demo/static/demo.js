// The demo page: the broker's TypeScript client, subscribed to every instrument (md.>), a row
// per instrument, the connection's state, the gaps the client reports, and a switch that takes
// the client offline as the browser's own offline event does. Query parameters set client
// options (for trying them, and for the browser tests): transports, hiddenMode, hiddenDelayMs,
// heartbeatMs, heartbeatTimeoutMs, url. `window.demo` holds what the page received.
import { Client } from "/client/index.js";

const params = new URLSearchParams(location.search);
const number = (name, fallback) => (params.has(name) ? Number(params.get(name)) : fallback);
const settings = await (await fetch("/settings")).json();

// The browser's page events, plus the switch: "simulate offline" is an offline event.
const switchListeners = { offline: new Set(), online: new Set() };
let simulatedOffline = false;
const page = {
  hidden: () => document.visibilityState === "hidden",
  online: () => navigator.onLine && !simulatedOffline,
  on(event, listener) {
    const target = event === "visibilitychange" ? document : window;
    target.addEventListener(event, listener);
    if (event in switchListeners) switchListeners[event].add(listener);
    return () => {
      target.removeEventListener(event, listener);
      switchListeners[event]?.delete(listener);
    };
  },
};
document.getElementById("offline").addEventListener("change", (event) => {
  simulatedOffline = event.target.checked;
  for (const listener of switchListeners[simulatedOffline ? "offline" : "online"]) listener();
});

const client = new Client(params.get("url") || settings.url, {
  page,
  transports: (params.get("transports") || "websocket,fallback").split(","),
  hiddenMode: params.get("hiddenMode") || "unsubscribe",
  hiddenDelayMs: number("hiddenDelayMs", 5000),
  heartbeatMs: number("heartbeatMs", 5000),
  heartbeatTimeoutMs: number("heartbeatTimeoutMs", 15000),
});

const demo = { received: {}, gaps: [], states: [], count: 0, client };
window.demo = demo;
const rows = new Map();
const tbody = document.getElementById("prices");
const decoder = new TextDecoder();

function row(topic) {
  let r = rows.get(topic);
  if (r === undefined) {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td></td><td></td><td></td>";
    tr.cells[0].textContent = topic.slice(3);
    const after = [...rows.keys()].sort().find((t) => t > topic);
    tbody.insertBefore(tr, after ? rows.get(after).tr : null);
    r = { tr, price: 0 };
    rows.set(topic, r);
  }
  return r;
}

// Rows are painted once per animation frame, whatever the tick rate.
const dirty = new Map();
function paint() {
  for (const [topic, tick] of dirty) {
    const r = row(topic);
    const cells = r.tr.cells;
    cells[1].textContent = tick.p.toFixed(2);
    cells[1].className = tick.p > r.price ? "up" : tick.p < r.price ? "down" : "";
    cells[2].textContent = tick.q;
    cells[3].textContent = tick.seq;
    r.price = tick.p;
  }
  dirty.clear();
  document.getElementById("count").textContent = demo.count;
  requestAnimationFrame(paint);
}
requestAnimationFrame(paint);

client.on("state", ({ state, reason, transport }) => {
  demo.states.push({ state, reason, at: Date.now() });
  const el = document.getElementById("state");
  el.textContent = state;
  el.className = state;
  document.getElementById("detail").textContent = state === "connected" ? "" : `(${reason})`;
  document.getElementById("transport").textContent = transport ?? "–";
});

client.subscribe(
  "md.>",
  (message) => {
    const tick = JSON.parse(decoder.decode(message.data));
    tick.seq = message.seq;
    dirty.set(message.topic, tick);
    (demo.received[message.topic] ??= []).push([message.epoch.toString(), message.seq]);
    demo.count++;
  },
  {
    onGap: (gap) => {
      demo.gaps.push({ topic: gap.topic, epoch: gap.epoch.toString(), first: gap.first, last: gap.last, cause: gap.cause });
      document.getElementById("no-gaps").hidden = true;
      const li = document.createElement("li");
      li.textContent = `${gap.topic}: ${gap.last ? `${gap.first} to ${gap.last}` : `${gap.first} to the end of its epoch`} (${gap.cause})`;
      document.getElementById("gap-list").prepend(li);
    },
  },
);
await client.connect();
