// Live numbers from the broker's admin server: one server-sent event a second (/events),
// read with fetch so that the request carries the admin key as a header (EventSource cannot
// send headers). The key is asked for once, or taken from the address's fragment
// (#key=KEY, which browsers never send to a server), and kept in this tab's sessionStorage.
//
// Rates are the difference of two snapshots' counters. A broker that started again (another
// `instance`, or a counter that went down) counts from 0: that interval has no rate (shown as
// "–", a gap in the chart) rather than a negative one. When no snapshot came for STALE_MS, or
// the stream broke, the numbers on the page are old: they are dimmed and the status says since
// when.
"use strict";
const STALE_MS = 3000;
const HISTORY = 60;  // seconds the chart shows
const rates = [];  // delivered msg/s, the last HISTORY seconds (null: unknown)
const fmt = (n) => n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n >= 1e3 ? (n / 1e3).toFixed(1) + " k" : String(Math.round(n));
let previous = null;
let lastUpdate = 0;  // Date.now() of the last snapshot shown
let stale = false;

function show(id, text) { document.getElementById(id).textContent = text; }

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  if (d) return d + " d " + h + " h";
  if (h) return h + " h " + m + " min";
  if (m) return m + " min " + (s % 60) + " s";
  return s + " s";
}

// A round upper bound for the chart's axis: 1, 2 or 5 times a power of ten.
function niceCeil(value) {
  if (value <= 1) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

const SVG = "http://www.w3.org/2000/svg";

function svg(parent, name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  parent.appendChild(element);
  return element;
}

// The chart: delivered msg/s over the last minute, with a y axis (0, half, the top, in msg/s)
// and an x axis (seconds ago). Unknown rates break the line.
function draw() {
  const chart = document.getElementById("chart");
  chart.replaceChildren();
  const width = 640, height = 220, left = 56, right = 12, top = 22, bottom = 30;
  const plotW = width - left - right, plotH = height - top - bottom;
  const known = rates.filter((value) => value !== null);
  const ceiling = niceCeil(Math.max(1, ...known));
  const y = (value) => top + plotH - (value / ceiling) * plotH;
  const x = (i) => left + plotW - ((rates.length - 1 - i) / (HISTORY - 1)) * plotW;
  svg(chart, "text", { x: left, y: 13 }, "delivered msg/s, last " + HISTORY + " s");
  const axes = svg(chart, "g", { class: "axes" });
  for (const fraction of [0, 0.5, 1]) {
    const value = ceiling * fraction;
    if (fraction) svg(axes, "line", { class: "grid", x1: left, x2: left + plotW, y1: y(value), y2: y(value) });
    svg(axes, "text", { class: "tick y", x: left - 6, y: y(value) + 4, "text-anchor": "end" }, fmt(value));
  }
  for (const ago of [HISTORY, HISTORY / 2, 0]) {
    const at = left + plotW - (ago / HISTORY) * plotW;
    svg(axes, "text", { class: "tick x", x: at, y: height - 10, "text-anchor": ago === 0 ? "end" : ago === HISTORY ? "start" : "middle" },
        ago === 0 ? "now" : "−" + ago + " s");
  }
  svg(axes, "line", { class: "axis", x1: left, x2: left, y1: top, y2: top + plotH });
  svg(axes, "line", { class: "axis", x1: left, x2: left + plotW, y1: top + plotH, y2: top + plotH });
  let path = "";
  let drawing = false;
  rates.forEach((value, i) => {
    if (value === null) { drawing = false; return; }
    path += (drawing ? "L" : "M") + x(i).toFixed(1) + " " + y(value).toFixed(1);
    drawing = true;
  });
  if (path) svg(chart, "path", { class: "line", d: path });
}

function rate(now, before, seconds) {
  return now >= before ? (now - before) / seconds : null;  // went down: counted again from 0
}

function update(snapshot) {
  const restarted = previous !== null && snapshot.instance !== previous.instance;
  const seconds = previous ? Math.max(0.001, snapshot.time - previous.time) : 1;
  let published = null, delivered = null;
  if (previous !== null && !restarted) {
    published = rate(snapshot.published, previous.published, seconds);
    delivered = rate(snapshot.delivered, previous.delivered, seconds);
  }
  previous = snapshot;
  lastUpdate = Date.now();
  setStale(false);
  show("node", snapshot.node || "–");
  show("version", "version " + (snapshot.version || "?") + (snapshot.workers ? " · " + snapshot.workers + " workers" : ""));
  show("uptime", duration(snapshot.time - snapshot.started));
  show("connections", fmt(snapshot.connections));
  show("published-rate", published === null ? "–" : fmt(published));
  show("delivered-rate", delivered === null ? "–" : fmt(delivered));
  show("topics", fmt(snapshot.topics));
  show("slow", fmt(snapshot.slow_consumers));
  show("pending", fmt(snapshot.pending_bytes));
  show("lag", snapshot.backplane_lag_ms === null ? "no Redis" : snapshot.backplane_lag_ms + " ms");
  show("loop-lag", (snapshot.loop_lag_s * 1000).toFixed(1) + " ms");
  rates.push(delivered);
  if (rates.length > HISTORY) rates.shift();
  draw();
  const nodes = snapshot.nodes || [];
  show("nodes-count", "(" + nodes.length + ")");
  document.getElementById("nodes").replaceChildren(...nodes.map((node) => row([
    [node.node, ""], [node.version, ""], [node.state, ""], [duration(node.time - node.started), "num"], [fmt(node.connections), "num"],
    [node.published_rate === null ? "–" : fmt(node.published_rate), "num"], [node.delivered_rate === null ? "–" : fmt(node.delivered_rate), "num"],
  ], node.node === snapshot.node ? "this" : "")));
  const body = document.getElementById("hot");
  body.replaceChildren(...snapshot.hot.map((topic) => row([[topic.topic, ""], [fmt(topic.rate), "num"], [String(topic.seq), "num"]])));
}

// A table row of [text, class] cells (text, never HTML: names come from clients and nodes).
function row(cells, kind) {
  const tr = document.createElement("tr");
  if (kind) tr.className = kind;
  for (const [text, cls] of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
  return tr;
}

function setStale(on) {
  if (on === stale) return;
  stale = on;
  document.getElementById("data").classList.toggle("stale", on);
  const status = document.getElementById("status");
  status.classList.toggle("stale", on);
  if (on) {
    const since = lastUpdate ? new Date(lastUpdate).toLocaleTimeString() : "the start";
    status.textContent = "no data since " + since + ": the broker does not answer (numbers below are old)";
  }
}

// Old numbers are marked as such whether the stream broke or just went silent.
setInterval(() => { if (lastUpdate && Date.now() - lastUpdate > STALE_MS) setStale(true); }, 500);

const KEY = "broker-admin-key";

function takeKeyFromFragment() {
  const match = /^#key=(.+)$/.exec(location.hash);
  if (!match) return;
  sessionStorage.setItem(KEY, decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search);  // out of the address bar
}

function askForKey(why) {
  show("status", why);
  const form = document.getElementById("key-form");
  form.hidden = false;
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("key").value);
    document.getElementById("key").value = "";
    form.hidden = true;
    follow();
  };
}

function lost(text) {
  if (lastUpdate) setStale(true);
  else show("status", text);
  setTimeout(follow, 2000);
}

async function follow() {
  const key = sessionStorage.getItem(KEY);
  if (!key) return askForKey("needs the admin key");
  if (!stale) show("status", "connecting…");
  let response;
  try {
    response = await fetch("events", { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
  } catch (error) {
    return lost("reconnecting…");
  }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    return askForKey("the key was refused");
  }
  if (!response.ok) return lost("reconnecting… (" + response.status + ")");
  show("status", "live");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
        if (data) {
          const wasStale = stale;
          update(JSON.parse(data));
          if (wasStale) show("status", "live");
        }
      }
    }
  } catch (error) {
    // the stream broke: connect again
  }
  lost("reconnecting…");
}

takeKeyFromFragment();
follow();
