// Live numbers from the broker's admin server: one server-sent event a second (/events),
// read with fetch so that the request carries the admin key as a header (EventSource cannot
// send headers). The key is asked for once, or taken from the address's fragment
// (#key=KEY, which browsers never send to a server), and kept in this tab's sessionStorage.
"use strict";
const rates = [];  // delivered msg/s, the last 60 seconds
const fmt = (n) => n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n >= 1e3 ? (n / 1e3).toFixed(1) + " k" : String(Math.round(n));
let previous = null;

function show(id, text) { document.getElementById(id).textContent = text; }

function draw() {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const top = Math.max(1, ...rates);
  ctx.strokeStyle = "#0969da";
  ctx.lineWidth = 2;
  ctx.beginPath();
  rates.forEach((value, i) => {
    const x = (i / 59) * (canvas.width - 20) + 10;
    const y = canvas.height - 10 - (value / top) * (canvas.height - 30);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#57606a";
  ctx.fillText("delivered msg/s, last 60 s (max " + fmt(top) + ")", 10, 14);
}

function update(snapshot) {
  const seconds = previous ? Math.max(0.001, snapshot.time - previous.time) : 1;
  const published = previous ? (snapshot.published - previous.published) / seconds : 0;
  const delivered = previous ? (snapshot.delivered - previous.delivered) / seconds : 0;
  previous = snapshot;
  show("connections", fmt(snapshot.connections));
  show("published-rate", fmt(published));
  show("delivered-rate", fmt(delivered));
  show("topics", fmt(snapshot.topics));
  show("slow", fmt(snapshot.slow_consumers));
  show("pending", fmt(snapshot.pending_bytes));
  show("lag", snapshot.backplane_lag_ms === null ? "no Redis" : snapshot.backplane_lag_ms + " ms");
  show("loop-lag", (snapshot.loop_lag_s * 1000).toFixed(1) + " ms");
  rates.push(delivered);
  if (rates.length > 60) rates.shift();
  draw();
  const body = document.getElementById("hot");
  body.replaceChildren(...snapshot.hot.map((row) => {
    const tr = document.createElement("tr");
    for (const cell of [row.topic, fmt(row.rate), String(row.seq)]) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.appendChild(td);
    }
    return tr;
  }));
}

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

async function follow() {
  const key = sessionStorage.getItem(KEY);
  if (!key) return askForKey("needs the admin key");
  show("status", "connecting…");
  let response;
  try {
    response = await fetch("events", { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
  } catch (error) {
    show("status", "reconnecting…");
    return setTimeout(follow, 2000);
  }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    return askForKey("the key was refused");
  }
  if (!response.ok) {
    show("status", "reconnecting… (" + response.status + ")");
    return setTimeout(follow, 2000);
  }
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
        if (data) update(JSON.parse(data));
      }
    }
  } catch (error) {
    // the stream broke: connect again
  }
  show("status", "reconnecting…");
  setTimeout(follow, 2000);
}

takeKeyFromFragment();
follow();
