// The connection layer: opens a transport (a WebSocket, or the SSE + POST fallback), sends
// what the core queued once per microtask, reconnects with exponential backoff and full
// jitter (the URLs of a cluster in turn), notices a dead connection through the protocol's
// heartbeat, follows the page (hidden, offline, a machine that slept) and refreshes the token.
import { BrokerError, CloseCode, ConnectionClosed, QueueFull, RequestError, Timeout } from "./errors.js";
import { Core, type HiddenMode, type PublishAck, type Responder } from "./protocol.js";
import { Subscription, type Gap, type Handler, type Message, type SubscribeOptions } from "./subscription.js";
import { FallbackTransport, WebSocketTransport, type Transport, type TransportKind } from "./transport.js";
import { validateTopic } from "./topics.js";
import * as wire from "./wire.js";

export type TokenSource = string | (() => string | Promise<string>);
export type State = "idle" | "connecting" | "connected" | "disconnected" | "offline" | "closed";

export interface StateChange {
  state: State;
  /** Why: the close code and reason, the URL connected to, "offline", ... */
  reason: string;
  /** The close code (or HTTP status of a refused fallback stream) that caused it, or 0. */
  code: number;
  url: string;
  transport: TransportKind | null;
}

/** The page (or a stand-in for tests): `document`-like visibility and `window`-like online
 * events. Defaults to the global `document` and `window` where they exist. */
export interface PageEvents {
  hidden(): boolean;
  online(): boolean;
  on(event: "visibilitychange" | "online" | "offline", listener: () => void): () => void;
}

export interface ClientOptions {
  /** A JWT, or a function returning one (or a promise of one): asked before every connection
   * and, `refreshBeforeMs` before the token expires, for a fresh one sent in an `auth`. */
  token?: TokenSource | null;
  refreshBeforeMs?: number;
  /** Transports tried in order on every connection attempt (default both). */
  transports?: TransportKind[];
  reconnect?: boolean;
  /** [first, most]: the bound of the n-th retry's delay is min(most, first * 2^n). */
  reconnectDelayMs?: [number, number];
  maxReconnectAttempts?: number;
  /** A number in [0, 1): the share of the bound waited (full jitter). */
  jitter?: () => number;
  connectTimeoutMs?: number;
  /** How long publishAcked, authenticate and unsubscribe wait for their answer. */
  requestTimeoutMs?: number;
  /** Ask the broker for a `beat` after this much silence (0: none). */
  heartbeatMs?: number;
  /** Nothing at all received for this long: the connection is dead, reconnect. */
  heartbeatTimeoutMs?: number;
  maxBatchBytes?: number;
  maxBatchMessages?: number;
  /** publish() raises QueueFull while this much waits in the transport. */
  maxBufferedBytes?: number;
  maxOfflineMessages?: number;
  offlineOverflow?: "raise" | "dropOldest";
  hiddenMode?: HiddenMode;
  hiddenDelayMs?: number;
  /** A timer that fired this much later than asked: the machine slept; reconnect at once. */
  sleepThresholdMs?: number;
  page?: PageEvents | null;
}

type Events = {
  state: (change: StateChange) => void;
  gap: (gap: Gap, sub: Subscription) => void;
  error: (error: Error) => void;
  dropped: (dropped: { topic: string; data: Uint8Array; msgId: string }) => void;
};

const DEFAULTS = {
  token: null as TokenSource | null,
  refreshBeforeMs: 30_000,
  transports: ["websocket", "fallback"] as TransportKind[],
  reconnect: true,
  reconnectDelayMs: [100, 10_000] as [number, number],
  maxReconnectAttempts: Infinity,
  jitter: Math.random,
  connectTimeoutMs: 5_000,
  requestTimeoutMs: 10_000,
  heartbeatMs: 5_000,
  heartbeatTimeoutMs: 15_000,
  maxBatchBytes: 256 << 10,
  maxBatchMessages: wire.DEFAULT_MAX_BATCH,
  maxBufferedBytes: 8 << 20,
  maxOfflineMessages: 10_000,
  offlineOverflow: "raise" as "raise" | "dropOldest",
  hiddenMode: "none" as HiddenMode,
  hiddenDelayMs: 10_000,
  sleepThresholdMs: 10_000,
};

// Close codes that say the client itself is at fault, or its token was revoked: retrying
// would not help. 4001 (token expired) is retried only when a token function can give a new one.
const FATAL_CLOSE_CODES = new Set([1002, 1003, 1007, 1008, 1009, 1010, CloseCode.TOKEN_REVOKED]);
// Refusals of a fallback stream (the same rules as the WebSocket handshake) that will not
// change by retrying: a bad request or path, a forbidden origin or a revoked token.
const FATAL_STATUSES = new Set([400, 403, 404, 405, 415, 426]);

function tokenExpiry(token: string): number | null {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

function browserPage(): PageEvents | null {
  const doc = (globalThis as { document?: Document }).document;
  const win = globalThis as unknown as { addEventListener?: Window["addEventListener"]; removeEventListener?: Window["removeEventListener"]; navigator?: Navigator };
  if (doc === undefined || typeof win.addEventListener !== "function") return null;
  return {
    hidden: () => doc.visibilityState === "hidden",
    online: () => win.navigator?.onLine !== false,
    on: (event, listener) => {
      const target = event === "visibilitychange" ? doc : (win as unknown as Window);
      target.addEventListener(event, listener);
      return () => target.removeEventListener(event, listener);
    },
  };
}

/** One client of the broker. `url` is `ws://HOST:PORT/PATH` (or wss://), or the URLs of the
 * nodes of one cluster, tried in turn. */
export class Client {
  readonly urls: string[];
  readonly options: Required<Omit<ClientOptions, "page">> & { page: PageEvents | null };
  /** The URL of the current (or last) connection. */
  url: string;
  state: State = "idle";
  /** The transport of the current connection, or null. */
  transportKind: TransportKind | null = null;
  /** Successful connections after the first. */
  reconnects = 0;
  /** Why the client closed for good (set once it did). */
  closeReason: { code: number; reason: string } | null = null;
  private readonly core: Core;
  private transport: Transport | null = null;
  private readonly listeners: { [K in keyof Events]: Set<Events[K]> } = { state: new Set(), gap: new Set(), error: new Set(), dropped: new Set() };
  private flushing = false;
  private attempt = 0;
  private everConnected = false;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private connectTimer: ReturnType<typeof setTimeout> | null = null;
  private watchTimer: ReturnType<typeof setTimeout> | null = null;
  private watchDue = 0;
  private heardFrames = 0;
  private frames = 0;
  private heardAt = 0;
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private hiddenTimer: ReturnType<typeof setTimeout> | null = null;
  private token: string | null = null;
  private refusedToken: string | null = null;
  private unlisten: (() => void)[] = [];
  private firstOpen: { resolve: () => void; reject: (error: Error) => void } | null = null;
  private offlineNow = false;

  constructor(url: string | string[], options: ClientOptions = {}) {
    this.urls = typeof url === "string" ? [url] : [...url];
    if (this.urls.length === 0) throw new TypeError("url: at least one ws:// or wss:// URL");
    for (const u of this.urls) if (!/^wss?:\/\//i.test(u)) throw new TypeError(`url: ws:// or wss:// URLs, not ${u}`);
    this.url = this.urls[0];
    const o = { ...DEFAULTS, page: browserPage(), ...options } as Client["options"];
    for (const [name, value] of Object.entries(options)) if (value === undefined) (o as Record<string, unknown>)[name] = (DEFAULTS as Record<string, unknown>)[name];
    if (o.heartbeatMs && (o.heartbeatMs < wire.MIN_HEARTBEAT_MS || o.heartbeatMs > wire.MAX_HEARTBEAT_MS)) throw new RangeError("heartbeatMs is 0 or 1000 to 3600000");
    if (o.heartbeatMs && !(o.heartbeatTimeoutMs > o.heartbeatMs + 1000)) throw new RangeError("heartbeatTimeoutMs must exceed heartbeatMs + 1000");
    if (!(o.reconnectDelayMs[0] > 0 && o.reconnectDelayMs[0] <= o.reconnectDelayMs[1])) throw new RangeError("reconnectDelayMs is [first, most], 0 < first <= most");
    if (o.transports.length === 0 || o.transports.some((t) => t !== "websocket" && t !== "fallback")) throw new TypeError('transports lists "websocket" and/or "fallback"');
    if (!["none", "unsubscribe", "conflate"].includes(o.hiddenMode)) throw new TypeError('hiddenMode is "none", "unsubscribe" or "conflate"');
    if (o.offlineOverflow !== "raise" && o.offlineOverflow !== "dropOldest") throw new TypeError('offlineOverflow is "raise" or "dropOldest"');
    this.options = o;
    this.core = new Core(
      { maxBatchBytes: o.maxBatchBytes, maxBatchMessages: o.maxBatchMessages, maxOfflineMessages: o.maxOfflineMessages, offlineOverflow: o.offlineOverflow, heartbeatMs: o.heartbeatMs },
      {
        message: (sub, message) => this.deliver(sub, message),
        gap: (sub, gap) => {
          if (sub.onGap) this.guard(() => sub.onGap!(gap));
          this.emit("gap", gap, sub);
        },
        error: (error) => this.emit("error", error),
        violation: (text) => this.violation(text),
        dropped: (topic, data, msgId) => this.emit("dropped", { topic, data, msgId }),
        queued: () => this.schedule(),
      },
    );
    this.core.hiddenMode = o.hiddenMode;
  }

  /** Start connecting; resolves once connected the first time, rejects (ConnectionClosed)
   * when the client closes for good before that. */
  connect(): Promise<void> {
    if (this.state === "closed") return Promise.reject(new ConnectionClosed(this.closeReason?.code ?? 1000, this.closeReason?.reason ?? "closed"));
    if (this.everConnected) return Promise.resolve();
    const ready = new Promise<void>((resolve, reject) => {
      const previous = this.firstOpen;
      this.firstOpen = {
        resolve: () => (previous?.resolve(), resolve()),
        reject: (error) => (previous?.reject(error), reject(error)),
      };
    });
    if (this.state === "idle") {
      this.watchPage();
      if (this.offlineNow) this.setState("offline", "the browser is offline", 0);
      else void this.open();
    }
    return ready;
  }

  /** Listen to an event: "state", "gap", "error" (errors no request waits for) or "dropped"
   * (a publish dropped from the full offline queue). Returns the function that stops it. */
  on<K extends keyof Events>(event: K, listener: Events[K]): () => void {
    this.listeners[event].add(listener);
    return () => this.listeners[event].delete(listener);
  }

  private emit<K extends keyof Events>(event: K, ...args: Parameters<Events[K]>): void {
    for (const listener of this.listeners[event]) {
      try {
        (listener as (...a: unknown[]) => void)(...args);
      } catch (error) {
        if (event !== "error") this.emit("error", error as Error);
      }
    }
  }

  private guard(fn: () => void): void {
    try {
      fn();
    } catch (error) {
      this.emit("error", error as Error);
    }
  }

  private deliver(sub: Subscription, message: Message): void {
    try {
      sub.handler(message);
    } catch (error) {
      this.emit("error", error as Error);
    }
  }

  private setState(state: State, reason: string, code: number): void {
    this.state = state;
    this.emit("state", { state, reason, code, url: this.url, transport: this.transportKind });
  }

  // subscriptions and publishing

  /** Subscribe to a topic or pattern: `handler` runs for every message, once and in order per
   * topic, also across reconnections. Returns at once; `ready` resolves at the broker's ack. */
  subscribe(pattern: string, handler: Handler, options: SubscribeOptions = {}): Subscription {
    this.checkOpen();
    const sub = this.core.subscribe(pattern, handler, options, (s) => this.unsubscribe(s));
    this.schedule();
    return sub;
  }

  /** Stop a subscription (also `sub.unsubscribe()`). */
  unsubscribe(sub: Subscription): Promise<void> {
    const done = this.core.unsubscribe(sub);
    this.schedule();
    return this.within(done, this.options.requestTimeoutMs, `unsubscribe ${sub.pattern}`);
  }

  get subscriptions(): Subscription[] {
    return this.core.subscriptions;
  }

  /** Fire-and-forget publish: the publishes of one microtask leave in one frame. While not
   * connected they wait in the offline queue with msg_ids (QueueFull when it is full and
   * offlineOverflow is "raise"). */
  publish(topic: string, data: Uint8Array | ArrayBuffer | ArrayBufferView | string): void {
    this.checkOpen();
    const bytes = wire.bytesOf(data);
    if (this.core.connected) {
      const buffered = this.transport?.buffered ?? 0;
      if (buffered > this.options.maxBufferedBytes) {
        throw new QueueFull(`${buffered} bytes wait for the socket (maxBufferedBytes); publish again once it drained`);
      }
    }
    this.core.publish(topic, bytes);
    this.schedule();
  }

  /** Publish and wait for the broker's ack (its epoch and sequence number). The publish
   * carries a msg_id, so it is sent again after a lost connection and published once. */
  publishAcked(topic: string, data: Uint8Array | ArrayBuffer | ArrayBufferView | string, options: { msgId?: string; timeoutMs?: number } = {}): Promise<PublishAck> {
    this.checkOpen();
    const msgId = options.msgId ?? this.core.newMsgId();
    if (msgId.length > wire.MAX_MSG_ID_LENGTH) throw new RangeError(`msgId is at most ${wire.MAX_MSG_ID_LENGTH} characters`);
    const { promise, cancel } = this.core.publishAcked(topic, wire.bytesOf(data), msgId);
    this.schedule();
    const timeout = options.timeoutMs ?? this.options.requestTimeoutMs;
    const timer = setTimeout(() => cancel(new Timeout(`no ack for the publish to ${topic} within ${timeout} ms`)), timeout);
    return promise.finally(() => clearTimeout(timer));
  }

  /** Ask one responder of `topic` and return its reply (RequestError NO_RESPONDERS at once
   * when nobody responds, REQUEST_TIMEOUT after `timeoutMs`). */
  request(topic: string, data: Uint8Array | ArrayBuffer | ArrayBufferView | string, options: { timeoutMs?: number } = {}): Promise<Uint8Array> {
    this.checkOpen();
    validateTopic(topic, "a request's topic");
    const timeoutMs = Math.min(Math.max(1, Math.round(options.timeoutMs ?? 5000)), wire.MAX_REQUEST_TIMEOUT_MS);
    const bytes = wire.bytesOf(data);
    return new Promise<Uint8Array>((resolve, reject) => {
      const timer = setTimeout(() => {
        cancel();
        reject(new Timeout(`no reply from ${topic} within ${timeoutMs + this.options.requestTimeoutMs} ms`));
      }, timeoutMs + this.options.requestTimeoutMs);
      const cancel = this.core.call((id) => wire.req(id, topic, bytes, timeoutMs), {
        resolve: (value: Uint8Array) => (clearTimeout(timer), resolve(value)),
        reject: (error) => (clearTimeout(timer), reject(error)),
      });
      this.schedule();
    });
  }

  /** Answer the requests to `topic`: `responder(request)` returns (or resolves to) the reply. */
  respond(topic: string, responder: Responder): Promise<void> {
    this.checkOpen();
    const done = this.core.respond(topic, responder);
    this.schedule();
    return this.within(done, this.options.requestTimeoutMs, `respond ${topic}`);
  }

  unrespond(topic: string): Promise<void> {
    const done = this.core.unrespond(topic);
    this.schedule();
    return this.within(done, this.options.requestTimeoutMs, `unrespond ${topic}`);
  }

  /** Send a fresh token now (RequestError BAD_TOKEN when the broker refuses it). */
  authenticate(token: string): Promise<void> {
    this.checkOpen();
    return this.sendToken(token);
  }

  private sendToken(token: string): Promise<void> {
    const done = new Promise<void>((resolve, reject) => {
      this.core.call((id) => wire.auth(id, token), { resolve: () => resolve(), reject });
    });
    this.schedule();
    return this.within(done, this.options.requestTimeoutMs, "auth").then(() => {
      this.token = token;
      this.scheduleRefresh(token);
    });
  }

  /** Publishes waiting for a connection (in the offline queue, or sent and not acknowledged). */
  get offlineCount(): number {
    return this.core.offlineCount;
  }

  get offlineDropped(): number {
    return this.core.offlineDropped;
  }

  private within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
    let timer: ReturnType<typeof setTimeout>;
    const limit = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Timeout(`${what}: no answer within ${ms} ms`)), ms);
    });
    return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
  }

  private checkOpen(): void {
    if (this.state === "closed") throw new ConnectionClosed(this.closeReason?.code ?? 1000, this.closeReason?.reason ?? "the client is closed");
  }

  /** Send what the core queued at the end of this microtask, in one frame when it fits. */
  private schedule(): void {
    if (this.flushing || !this.core.hasOutgoing) return;
    this.flushing = true;
    queueMicrotask(() => {
      this.flushing = false;
      this.flush();
    });
  }

  private flush(): void {
    if (this.transport === null || !this.core.connected) return;
    for (const frame of this.core.takeFrames()) this.transport.send(frame);
  }

  // connecting

  private async open(): Promise<void> {
    this.clearTimer("retryTimer");
    if (this.state === "closed" || this.transport !== null) return;
    this.setState("connecting", this.url, 0);
    let token: string | null = null;
    if (this.options.token !== null) {
      try {
        token = await this.freshToken();
      } catch (error) {
        this.lost(1006, `the token function failed: ${(error as Error).message}`, false, 0);
        return;
      }
      if (this.state !== "connecting") return;
    }
    this.token = token;
    this.openTransport(0, token);
  }

  private openTransport(index: number, token: string | null): void {
    const kind = this.options.transports[index];
    const events = {
      open: (fresh: boolean) => this.opened(transport, fresh),
      frame: (data: ArrayBuffer | Uint8Array) => {
        this.frames++;
        this.core.receive(data);
        if (this.core.hasOutgoing) this.schedule();
      },
      closed: (code: number, reason: string, opened: boolean, status: number) => {
        if (this.transport !== transport) return;
        this.transport = null;
        this.clearTimer("connectTimer");
        if (!opened && status === 0 && index + 1 < this.options.transports.length && this.state === "connecting") {
          this.openTransport(index + 1, token); // e.g. a proxy that refuses the upgrade: the fallback next
          return;
        }
        this.lost(code, reason, opened, status);
      },
    };
    let transport: Transport;
    try {
      transport = kind === "websocket" ? new WebSocketTransport(this.url, token, events) : new FallbackTransport(this.url, token, events);
    } catch (error) {
      // no WebSocket in this runtime (an old browser, a page that removed it): the next transport
      transport = { kind, buffered: 0, send: () => {}, close: () => {} };
      this.transport = transport;
      queueMicrotask(() => events.closed(1006, `cannot open a ${kind}: ${(error as Error).message}`, false, 0));
      return;
    }
    this.transport = transport;
    this.transportKind = kind;
    this.clearTimer("connectTimer");
    this.connectTimer = setTimeout(() => {
      if (this.transport !== transport) return;
      transport.close();
      events.closed(1006, `could not connect to ${this.url} within ${this.options.connectTimeoutMs} ms`, false, 0);
    }, this.options.connectTimeoutMs);
  }

  private opened(transport: Transport, fresh: boolean): void {
    if (this.transport !== transport || !fresh) return;
    this.clearTimer("connectTimer");
    if (this.core.connected) {
      // a fallback stream whose session the broker no longer held: make everything again
      this.core.lost(1006, "the broker no longer held the fallback stream's session", true);
      this.core.opened();
      this.emit("state", { state: "connected", reason: "a new session", code: 0, url: this.url, transport: this.transportKind });
      this.schedule();
      return;
    }
    if (this.everConnected) this.reconnects++;
    this.everConnected = true;
    this.attempt = 0;
    this.refusedToken = null;
    this.core.opened();
    this.setState("connected", this.url, 0);
    this.startWatch();
    if (this.token !== null) this.scheduleRefresh(this.token);
    this.schedule();
    if (this.firstOpen) {
      const first = this.firstOpen;
      this.firstOpen = null;
      first.resolve();
    }
  }

  /** The connection (or an attempt) ended: reconnect, or close for good when retrying cannot help. */
  private lost(code: number, reason: string, opened: boolean, status: number): void {
    this.clearTimer("watchTimer");
    this.clearTimer("refreshTimer");
    if (this.state === "closed") return;
    let fatal = FATAL_CLOSE_CODES.has(code) || FATAL_STATUSES.has(status);
    const renewable = typeof this.options.token === "function";
    if (code === CloseCode.TOKEN_EXPIRED && !renewable) fatal = true;
    if (status === 401) {
      // a bad or expired token: a token function may give a good one; the same one again will not do
      fatal = !renewable || this.refusedToken === this.token;
      this.refusedToken = this.token;
    }
    const keep = !fatal && this.options.reconnect;
    this.core.lost(code, reason, keep);
    if (!keep) {
      this.finish(status || code, reason);
      return;
    }
    if (code === CloseCode.RECONNECT_ELSEWHERE && !this.offlineNow) {
      // the node is leaving: at once, without a backoff, to the next URL of the list
      this.setState("disconnected", reason, code);
      if (this.urls.length > 1) this.url = this.urls[(this.urls.indexOf(this.url) + 1) % this.urls.length];
      this.retryTimer = setTimeout(() => void this.open(), 0);
      return;
    }
    this.scheduleRetry(code || status, reason);
  }

  private scheduleRetry(code: number, reason: string): void {
    if (this.offlineNow) {
      this.setState("offline", "the browser is offline", code);
      return;
    }
    if (this.attempt >= this.options.maxReconnectAttempts) {
      this.finish(1006, `gave up after ${this.attempt} reconnection attempts: ${reason}`);
      return;
    }
    this.setState("disconnected", reason, code);
    const [first, most] = this.options.reconnectDelayMs;
    const delay = this.options.jitter() * Math.min(most, first * 2 ** this.attempt);
    this.attempt++;
    if (this.urls.length > 1) this.url = this.urls[(this.urls.indexOf(this.url) + 1) % this.urls.length];
    this.retryTimer = setTimeout(() => void this.open(), delay);
  }

  /** The delay bound of reconnection attempt `attempt` (0, 1, ...), before jitter. */
  backoffBound(attempt: number): number {
    const [first, most] = this.options.reconnectDelayMs;
    return Math.min(most, first * 2 ** attempt);
  }

  private finish(code: number, reason: string): void {
    for (const name of ["retryTimer", "connectTimer", "watchTimer", "refreshTimer", "hiddenTimer"] as const) this.clearTimer(name);
    for (const stop of this.unlisten) stop();
    this.unlisten = [];
    this.closeReason = { code, reason };
    const transport = this.transport;
    this.transport = null;
    transport?.close(1000, "");
    this.core.lost(code, reason, false);
    this.transportKind = null;
    this.setState("closed", reason, code);
    if (this.firstOpen) {
      const first = this.firstOpen;
      this.firstOpen = null;
      first.reject(new ConnectionClosed(code, reason));
    }
  }

  /** Close for good: what is queued is sent first; subscriptions end. */
  async close(): Promise<void> {
    if (this.state === "closed") return;
    this.flush();
    this.finish(1000, "closed by the application");
  }

  /** Drop the current connection as lost and reconnect at once (a dead path, a resumed machine). */
  private restart(reason: string): void {
    const transport = this.transport;
    if (transport !== null) {
      this.transport = null;
      transport.close(4000, reason);
      this.clearTimer("connectTimer");
      this.lost(1006, reason, this.core.connected, 0);
    }
    if (this.state === "disconnected" || this.state === "offline") {
      this.attempt = 0;
      this.clearTimer("retryTimer");
      void this.open();
    }
  }

  private violation(text: string): void {
    const transport = this.transport;
    if (transport === null) return;
    this.transport = null;
    transport.close(1003, "undecodable server message");
    this.lost(1006, `the broker sent something unreadable: ${text}`, true, 0);
  }

  // liveness: the heartbeat watchdog, which also notices a machine that slept

  private startWatch(): void {
    this.heardFrames = this.frames;
    this.heardAt = Date.now();
    this.armWatch();
  }

  private armWatch(): void {
    const period = this.options.heartbeatMs ? this.options.heartbeatTimeoutMs / 4 : 1000;
    this.watchDue = Date.now() + period;
    this.watchTimer = setTimeout(() => this.checkAlive(), period);
  }

  private checkAlive(): void {
    this.watchTimer = null;
    if (this.transport === null || !this.core.connected) return;
    const now = Date.now();
    if (now - this.watchDue > this.options.sleepThresholdMs) {
      this.restart(`timers ran ${now - this.watchDue} ms late (the machine slept): reconnecting`);
      return;
    }
    if (this.frames !== this.heardFrames) {
      this.heardFrames = this.frames;
      this.heardAt = now;
    } else if (this.options.heartbeatMs && now - this.heardAt >= this.options.heartbeatTimeoutMs) {
      this.restart(`nothing from the broker for ${this.options.heartbeatTimeoutMs} ms (no heartbeat)`);
      return;
    }
    this.armWatch();
  }

  // the page: hidden, offline, online

  private watchPage(): void {
    const page = this.options.page;
    if (page === null) return;
    this.offlineNow = !page.online();
    this.unlisten.push(
      page.on("offline", () => {
        this.offlineNow = true;
        this.clearTimer("retryTimer");
        const transport = this.transport;
        if (transport !== null) {
          this.transport = null;
          transport.close(4000, "offline");
          this.clearTimer("connectTimer");
          this.lost(1006, "the browser went offline", this.core.connected, 0);
        } else if (this.state !== "closed" && this.state !== "idle") {
          this.setState("offline", "the browser is offline", 0);
        }
      }),
      page.on("online", () => {
        this.offlineNow = false;
        if (this.state === "offline" || this.state === "disconnected") {
          this.attempt = 0;
          this.clearTimer("retryTimer");
          void this.open();
        }
      }),
      page.on("visibilitychange", () => this.visibility(page.hidden())),
    );
    if (page.hidden()) this.visibility(true);
  }

  private visibility(hidden: boolean): void {
    if (this.options.hiddenMode === "none") return;
    this.clearTimer("hiddenTimer");
    if (hidden) {
      this.hiddenTimer = setTimeout(() => {
        this.hiddenTimer = null;
        this.core.setHidden(true);
        this.schedule();
      }, this.options.hiddenDelayMs);
    } else {
      this.core.setHidden(false);
      this.schedule();
    }
  }

  // tokens

  private async freshToken(): Promise<string> {
    const source = this.options.token;
    const token = typeof source === "function" ? await source() : source;
    if (typeof token !== "string" || token.length === 0) throw new BrokerError("the token (or token function) must give a non-empty string");
    return token;
  }

  private scheduleRefresh(token: string): void {
    this.clearTimer("refreshTimer");
    const expires = tokenExpiry(token);
    if (expires === null || typeof this.options.token !== "function") return;
    const left = expires - Date.now();
    const delay = Math.max(0, Math.min(left - this.options.refreshBeforeMs, left * 0.8));
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      if (!this.core.connected) return;
      this.freshToken()
        .then((fresh) => this.sendToken(fresh))
        .catch((error: Error) => {
          if (error instanceof RequestError || !(error instanceof ConnectionClosed)) this.emit("error", error);
        });
    }, delay);
  }

  private clearTimer(name: "retryTimer" | "connectTimer" | "watchTimer" | "refreshTimer" | "hiddenTimer"): void {
    const timer = this[name];
    if (timer !== null) {
      clearTimeout(timer);
      this[name] = null;
    }
  }
}
