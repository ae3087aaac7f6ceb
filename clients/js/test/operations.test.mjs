// What operators do to a client, against real brokers started by tests/test_js_client.py
// (test_operator_actions_reach_the_client): the client names itself to the broker (the
// admin API shows it), an operator's unsubscribe of its user ends the subscription (onEnd),
// and a node in lame-duck mode (close 4010) is left at once for the next URL of the list.
// The steps the broker side takes are driven over stdin/stdout by the Python test.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createInterface } from "node:readline";
import { Client, CloseCode, SubscriptionEnded } from "../dist/index.js";

const [A, B] = (process.env.BROKER_OPS_URLS || "").split(",");
const TOKEN = process.env.BROKER_OPS_TOKEN;
const TRANSPORT = process.env.BROKER_OPS_TRANSPORT || "websocket";
const skip = A && B && TOKEN ? false : "BROKER_OPS_URLS is not set (tests/test_js_client.py starts the brokers)";
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (text) => process.stdout.write(text + "\n");
const hear = async () => (await lines.next()).value;

test("an operator's actions reach the client", { skip }, async () => {
  const states = [];
  const c = new Client([A, B], { transports: [TRANSPORT], token: TOKEN, reconnectDelayMs: [5000, 5000], page: null });
  c.on("state", (s) => states.push(s));
  await c.connect();
  let ended = null;
  const sub = c.subscribe("ops.t", () => {}, { onEnd: (error) => (ended = error) });
  await sub.ready;
  say("subscribed"); // the Python side checks the admin API's client name, then unsubscribes the user
  assert.equal(await hear(), "unsubscribed");
  const deadline = Date.now() + 5000;
  while (ended === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  assert.ok(ended instanceof SubscriptionEnded, "onEnd was not called");
  assert.equal(ended.pattern, "ops.t");
  say("ended");
  // lame duck: A closes with 4010; the client goes to B at once (its backoff is 5 s)
  assert.equal(await hear(), "lame duck");
  const asked = Date.now();
  const until = Date.now() + 4000;
  while (!(c.url === B && c.state === "connected") && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
  assert.equal(c.url, B);
  assert.equal(c.state, "connected");
  assert.ok(states.some((s) => s.code === CloseCode.RECONNECT_ELSEWHERE), JSON.stringify(states));
  say(`moved in ${Date.now() - asked} ms`);
  await c.close();
});
