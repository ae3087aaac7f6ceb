// Live numbers from the broker's admin server: one server-sent event a second (/events).
"use strict";
const history = [];  // delivered msg/s, the last 60 seconds
const fmt = (n) => n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n >= 1e3 ? (n / 1e3).toFixed(1) + " k" : String(Math.round(n));
let previous = null;

function show(id, text) { document.getElementById(id).textContent = text; }

function draw() {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const top = Math.max(1, ...history);
  ctx.strokeStyle = "#0969da";
  ctx.lineWidth = 2;
  ctx.beginPath();
  history.forEach((value, i) => {
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
  history.push(delivered);
  if (history.length > 60) history.shift();
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

const source = new EventSource("events");
source.onopen = () => show("status", "live");
source.onerror = () => show("status", "reconnecting…");
source.onmessage = (event) => update(JSON.parse(event.data));
