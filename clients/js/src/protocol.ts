// The sans-I/O core of the client: request ids and their replies, the topic table, the
// subscriptions and their positions, responders, the offline queue with msg_ids, and the
// frames to send. It never touches a socket or a timer: the connection layer (client.ts)
// hands it every frame received and the connection's ups and downs, and sends what
// `takeFrames()` gives.
import { ConnectionClosed, ErrorCode, QueueFull, RequestError, SubscriptionEnded } from "./errors.js";
import { Subscription, type Gap, type Handler, type Message, type Since, type SubscribeOptions } from "./subscription.js";
import { isPattern, matches, validatePattern, validateTopic } from "./topics.js";
import * as wire from "./wire.js";
import { MAX_SINCE_TOPICS, POLICIES, toBig, toNumber, type Policy, type WireSince } from "./wire.js";

/** A request passed to a responder: `user` is the requester's, as its token names it
 * (null without authentication or for an anonymous requester). */
export interface Request {
  id: number;
  topic: string;
  data: Uint8Array;
  user: string | null;
}
export type Responder = (request: Request) => Uint8Array | string | Promise<Uint8Array | string>;

export interface PublishAck {
  epoch: bigint;
  seq: number;
}

/** What the core tells the connection layer and the application. */
export interface CoreEvents {
  message(sub: Subscription, message: Message): void;
  gap(sub: Subscription, gap: Gap): void;
  /** An `err` no request waits for (a fire-and-forget publish), a refused re-subscription,
   * a failing handler. */
  error(error: Error): void;
  /** Something arrived that breaks the protocol: the connection must be closed. */
  violation(text: string): void;
  /** A publish was dropped from the full offline queue (offlineOverflow "dropOldest"). */
  dropped(topic: string, data: Uint8Array, msgId: string): void;
  /** Something was queued to send (the connection layer sends it at the end of the turn). */
  queued(): void;
}

export interface CoreOptions {
  maxBatchBytes: number;
  maxBatchMessages: number;
  maxOfflineMessages: number;
  offlineOverflow: "raise" | "dropOldest";
  heartbeatMs: number;
}

/** How subscriptions are held while the page is hidden (client option hiddenMode). */
export type HiddenMode = "none" | "unsubscribe" | "conflate";

type Pending = {
  onAck?: (epoch: bigint, seq: number) => void;
  resolve?: (value: any) => void;
  reject?: (error: Error) => void;
};
type TopicEntry = { name: string; epoch: bigint; subs: Subscription[]; version: number };
type Outgoing = { bytes: Uint8Array; topic?: string; data?: Uint8Array };
type OfflineItem = { topic: string; data: Uint8Array; msgId: string };
type AckedPublish = OfflineItem & { resolve: (ack: PublishAck) => void; reject: (error: Error) => void; id: number };

const NO_SINCE: WireSince | null = null;

function randomHex(bytes: number): string {
  const buffer = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(buffer);
  let out = "";
  for (const b of buffer) out += b.toString(16).padStart(2, "0");
  return out;
}

function wireSince(since: Since, wildcard: boolean): WireSince {
  if ("time" in since) {
    if (!wildcard) throw new TypeError("since: a topic subscription takes {epoch, seq}");
    const topics: Record<string, [bigint, number]> = {};
    let n = 0;
    for (const [topic, p] of Object.entries(since.topics)) {
      if (++n > MAX_SINCE_TOPICS) break;
      topics[topic] = [BigInt(p.epoch), p.seq];
    }
    return [BigInt(since.time), topics];
  }
  if (wildcard) throw new TypeError("since: a pattern subscription takes {time, topics}");
  return [BigInt(since.epoch), since.seq];
}

export class Core {
  readonly options: CoreOptions;
  readonly events: CoreEvents;
  /** A transport is open and the core's frames can be sent. */
  connected = false;
  /** The random publisher id that prefixes this client's msg_ids. */
  readonly publisherId = randomHex(8);
  /** Publishes dropped from the full offline queue. */
  offlineDropped = 0;
  hiddenMode: HiddenMode = "none";
  /** The subscriptions are held back at the broker (unsubscribed or conflating) while hidden. */
  hidden = false;
  private msgIds = 0;
  private nextId = 0;
  private readonly pending = new Map<number, Pending>();
  private topics: (TopicEntry | undefined)[] = [];
  private readonly subs = new Map<string, Subscription>();
  private version = 0; // changes whenever the set of indexed subscriptions does
  private readonly indexed = new Set<Subscription>();
  private readonly responders = new Map<string, Responder>();
  private outgoing: Outgoing[] = [];
  private outgoingBytes = 0;
  private frames: Uint8Array[] = [];
  private offline: OfflineItem[] = [];
  private readonly inflight = new Map<number, OfflineItem>();
  private readonly acked = new Set<AckedPublish>();
  private waiting: (() => void)[] = []; // requests made while disconnected, sent when connected

  constructor(options: CoreOptions, events: CoreEvents) {
    this.options = options;
    this.events = events;
  }

  // the connection

  /** A transport opened: what the client holds at the broker is made again. */
  opened(): void {
    this.connected = true;
    this.topics = [];
    if (this.options.heartbeatMs) this.queue(wire.hb(0, this.options.heartbeatMs));
    for (const topic of this.responders.keys()) this.queue(wire.sub(0, topic, null, false, true));
    for (const sub of this.subs.values()) {
      if (sub.done) continue;
      if (!this.hidden || this.hiddenMode === "conflate") this.sendSub(sub);
      else sub.active = false;
    }
    for (const item of this.acked) this.sendAcked(item);
    const offline = this.offline;
    this.offline = [];
    for (const item of offline) this.sendOffline(item);
    this.flushWaiting();
  }

  /** The transport closed: requests waiting for a reply fail with `code` and `reason`;
   * publishes not yet sent, or sent from the offline queue and not acknowledged, wait for
   * the next connection (`keep` false: the client closes for good, they are dropped). */
  lost(code: number, reason: string, keep: boolean): void {
    this.connected = false;
    const unsent: OfflineItem[] = [];
    for (const out of this.outgoing) if (out.topic !== undefined) unsent.push({ topic: out.topic, data: out.data!, msgId: this.newMsgId() });
    this.outgoing = [];
    this.outgoingBytes = 0;
    this.frames = [];
    if (keep) this.offline = [...this.inflight.values(), ...this.offline, ...unsent];
    else this.offline = [];
    this.inflight.clear();
    const error = new ConnectionClosed(code, reason);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const sub of this.subs.values()) sub.active = sub.requested = false;
    for (const p of pending) p.reject?.(error);
    if (!keep) {
      for (const item of this.acked) item.reject(error);
      this.acked.clear();
      for (const sub of this.subs.values()) {
        sub.done = true;
        if (!sub.settle.settled) {
          sub.settle.settled = true;
          sub.settle.reject(error);
        }
      }
      const waiting = this.waiting;
      this.waiting = [];
      for (const send of waiting) send(); // each fails at once: the client is closed
    }
  }

  private flushWaiting(): void {
    const waiting = this.waiting;
    this.waiting = [];
    for (const send of waiting) send();
  }

  // frames out

  /** Frames to send now, each within maxBatchBytes (unless one message is larger) and
   * maxBatchMessages. */
  takeFrames(): Uint8Array[] {
    this.cut();
    const frames = this.frames;
    this.frames = [];
    return frames;
  }

  get hasOutgoing(): boolean {
    return this.outgoing.length !== 0 || this.frames.length !== 0;
  }

  private queue(bytes: Uint8Array, topic?: string, data?: Uint8Array): void {
    const out = this.outgoing;
    const idle = out.length === 0 && this.frames.length === 0;
    if (out.length !== 0 && (this.outgoingBytes + bytes.length > this.options.maxBatchBytes || out.length >= this.options.maxBatchMessages)) this.cut();
    this.outgoing.push(topic === undefined ? { bytes } : { bytes, topic, data });
    this.outgoingBytes += bytes.length;
    if (idle) this.events.queued();
  }

  private cut(): void {
    const out = this.outgoing;
    if (out.length === 0) return;
    this.frames.push(wire.frameOf(out.map((o) => o.bytes), this.outgoingBytes));
    this.outgoing = [];
    this.outgoingBytes = 0;
  }

  private request(message: (id: number) => Uint8Array, pending: Pending): number {
    const id = ++this.nextId;
    this.pending.set(id, pending);
    this.queue(message(id));
    return id;
  }

  /** Forget a request (the caller gave up on it): a late reply is ignored. */
  forget(id: number): void {
    this.pending.delete(id);
  }

  // subscriptions

  subscribe(pattern: string, handler: Handler, options: SubscribeOptions, unsubscriber: (sub: Subscription) => Promise<void>): Subscription {
    validatePattern(pattern);
    if (typeof handler !== "function") throw new TypeError("subscribe(pattern, handler): the handler is a function");
    if (options.policy !== undefined && !POLICIES.includes(options.policy)) {
      throw new TypeError(`policy is "disconnect", "drop", "conflate" or "" (the server's), not ${JSON.stringify(options.policy)}`);
    }
    if (this.subs.has(pattern)) throw new RequestError(ErrorCode.ALREADY_SUBSCRIBED, `already subscribed to ${JSON.stringify(pattern)}`);
    const wildcard = isPattern(pattern);
    if (options.since) wireSince(options.since, wildcard); // a malformed since is refused here
    const sub = new Subscription(pattern, wildcard, handler, options, this.events, unsubscriber);
    this.subs.set(pattern, sub);
    if (this.connected && !(this.hidden && this.hiddenMode === "unsubscribe")) this.sendSub(sub);
    return sub;
  }

  private policyNow(sub: Subscription): Policy {
    return this.hidden && this.hiddenMode === "conflate" ? "conflate" : sub.policy;
  }

  /** Subscribe at the broker: the first time with the application's since/last, later from
   * where it stopped delivering. */
  private sendSub(sub: Subscription): void {
    const first = !sub.settle.settled;
    let since: WireSince | null = NO_SINCE;
    if (first) {
      if (sub.since0) since = wireSince(sub.since0, sub.wildcard);
    } else {
      since = this.sinceOf(sub);
    }
    sub.requested = true;
    const generation = ++sub.generation;
    this.request((id) => wire.sub(id, sub.pattern, since, first && sub.last && since === null, false, this.policyNow(sub)), {
      onAck: (epoch, seq) => this.activate(sub, epoch, seq, first, generation === sub.generation),
      reject: (error) => this.refused(sub, error, first),
    });
  }

  private sinceOf(sub: Subscription): WireSince {
    if (sub.wildcard) {
      // the broker takes the positions of at most MAX_SINCE_TOPICS topics; those left out are
      // replayed from the subscription's time and the overlap is skipped
      const topics: Record<string, [bigint, number]> = {};
      let n = 0;
      for (const [topic, p] of sub.positions) {
        if (n++ === MAX_SINCE_TOPICS) break;
        topics[topic] = [p.epoch, p.seq];
      }
      return [sub.epoch, topics];
    }
    const p = sub.positions.get(sub.pattern);
    if (p !== undefined) return [p.epoch, p.seq];
    return sub.epoch ? [sub.epoch, sub.seq] : [0n, 0];
  }

  /** The ack of a `sub`: runs as it is read, before anything later in the frame, so the
   * subscription receives exactly what the broker sends after it. */
  private activate(sub: Subscription, epoch: bigint, seq: number, first: boolean, latest: boolean): void {
    if (sub.done) {
      if (this.connected && latest) this.queue(wire.unsub(0, sub.pattern));
      return;
    }
    if (latest) {
      sub.requested = false;
      sub.active = true;
    }
    if (first && !sub.settle.settled) {
      sub.epoch = epoch;
      sub.seq = seq;
      const since = sub.since0;
      if (since) {
        const w = wireSince(since, sub.wildcard);
        if (sub.wildcard) {
          for (const [topic, [e, s]] of Object.entries(w[1] as Record<string, [bigint, number]>)) sub.positions.set(topic, { epoch: e, seq: s });
        } else {
          sub.positions.set(sub.pattern, { epoch: w[0], seq: w[1] as number });
        }
      } else if (epoch && !sub.wildcard) {
        // what the connection gets of the topic at or before the ack (a replay another
        // subscription asked for) is not this one's, except the last value it asked for
        sub.positions.set(sub.pattern, { epoch, seq: sub.last && seq > 0 ? seq - 1 : seq });
      }
      sub.settle.settled = true;
      sub.settle.resolve();
    } else if (sub.wildcard) {
      sub.epoch = epoch; // the new subscription's time is the position of topics never received
    }
    if (!this.indexed.has(sub)) {
      this.indexed.add(sub);
      this.version++;
    }
  }

  private refused(sub: Subscription, error: Error, first: boolean): void {
    sub.requested = false;
    if (!(error instanceof RequestError)) return; // the connection closed: made again on the next one
    this.drop(sub);
    if (first && !sub.settle.settled) {
      sub.settle.settled = true;
      sub.settle.reject(error);
    } else {
      this.events.error(error);
    }
  }

  private drop(sub: Subscription): void {
    sub.done = true;
    if (this.subs.get(sub.pattern) === sub) this.subs.delete(sub.pattern);
    if (this.indexed.delete(sub)) this.version++;
  }

  /** Stop a subscription: nothing more is delivered; resolves at the broker's ack (at once
   * when it is not held at the broker). */
  unsubscribe(sub: Subscription): Promise<void> {
    if (sub.done) return Promise.resolve();
    const held = sub.active;
    this.drop(sub);
    if (!sub.settle.settled) {
      sub.settle.settled = true;
      sub.settle.reject(new RequestError(ErrorCode.NOT_SUBSCRIBED, `unsubscribed from ${JSON.stringify(sub.pattern)} before the broker acknowledged it`));
    }
    if (!held || !this.connected) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.request((id) => wire.unsub(id, sub.pattern), { onAck: () => resolve(), reject: () => resolve() });
    });
  }

  get subscriptions(): Subscription[] {
    return [...this.subs.values()];
  }

  /** While hidden: unsubscribe every subscription (keeping its position), or subscribe it
   * again with the policy conflate; when visible again, subscribe again from each position
   * with its own policy. Only what is held at the broker changes. */
  setHidden(hidden: boolean): void {
    if (hidden === this.hidden || this.hiddenMode === "none") return;
    this.hidden = hidden;
    if (!this.connected) return;
    for (const sub of this.subs.values()) {
      if (sub.done) continue;
      if (sub.active || sub.requested) this.queue(wire.unsub(0, sub.pattern)); // after the `sub` in flight, if any
      sub.active = sub.requested = false;
      if (!hidden || this.hiddenMode === "conflate") this.sendSub(sub);
    }
  }

  // publishing

  newMsgId(): string {
    return `${this.publisherId}-${++this.msgIds}`;
  }

  publish(topic: string, data: Uint8Array): void {
    if (this.connected) {
      this.queue(wire.pub(0, topic, data), topic, data);
      return;
    }
    validateTopic(topic);
    const offline = this.offline;
    if (offline.length >= this.options.maxOfflineMessages) {
      if (this.options.offlineOverflow === "raise" || offline.length === 0) {
        throw new QueueFull(`not connected and ${offline.length} publishes already wait (maxOfflineMessages)`);
      }
      const old = offline.shift()!;
      this.offlineDropped++;
      this.events.dropped(old.topic, old.data, old.msgId);
    }
    offline.push({ topic, data, msgId: this.newMsgId() });
  }

  get offlineCount(): number {
    return this.offline.length + this.inflight.size;
  }

  private sendOffline(item: OfflineItem): void {
    this.request((id) => {
      this.inflight.set(id, item);
      return wire.pub(id, item.topic, item.data, item.msgId);
    }, {
      onAck: () => {},
      reject: (error) => {
        if (error instanceof RequestError) this.events.error(error);
      },
    });
  }

  /** Publish with an ack; sent again under the same msg_id after a lost connection until
   * acknowledged (the broker acknowledges a repeat with the first sequence number). */
  publishAcked(topic: string, data: Uint8Array, msgId: string): { promise: Promise<PublishAck>; cancel: (error: Error) => void } {
    validateTopic(topic);
    let item!: AckedPublish;
    const promise = new Promise<PublishAck>((resolve, reject) => {
      item = { topic, data, msgId, resolve, reject, id: 0 };
    });
    this.acked.add(item);
    if (this.connected) this.sendAcked(item);
    return {
      promise,
      cancel: (error) => {
        if (this.acked.delete(item)) {
          this.pending.delete(item.id);
          item.reject(error);
        }
      },
    };
  }

  private sendAcked(item: AckedPublish): void {
    item.id = this.request((id) => wire.pub(id, item.topic, item.data, item.msgId), {
      resolve: () => {},
      onAck: (epoch, seq) => {
        this.acked.delete(item);
        item.resolve({ epoch, seq });
      },
      reject: (error) => {
        if (error instanceof RequestError) {
          this.acked.delete(item);
          item.reject(error);
        } // a lost connection: sent again on the next one
      },
    });
  }

  // requests

  /** Send a request now, or as soon as connected; returns a function that forgets it. */
  call(make: (id: number) => Uint8Array, handlers: { resolve: (value: any) => void; reject: (error: Error) => void; onAck?: (epoch: bigint, seq: number) => void }): () => void {
    let id = 0;
    let cancelled = false;
    const send = () => {
      if (cancelled) return;
      if (!this.connected) {
        handlers.reject(new ConnectionClosed(1006, "the client is closed"));
        return;
      }
      id = this.request(make, handlers);
    };
    if (this.connected) send();
    else this.waiting.push(send);
    return () => {
      cancelled = true;
      if (id) this.pending.delete(id);
    };
  }

  /** Become the responder of `topic`; re-registered after every reconnection. */
  respond(topic: string, responder: Responder): Promise<void> {
    validateTopic(topic, "a responder's topic");
    if (this.responders.has(topic)) return Promise.reject(new RequestError(ErrorCode.ALREADY_SUBSCRIBED, `already responding to ${JSON.stringify(topic)}`));
    this.responders.set(topic, responder);
    if (!this.connected) return Promise.resolve(); // registered when connected
    return new Promise<void>((resolve, reject) => {
      this.request((id) => wire.sub(id, topic, null, false, true), {
        onAck: () => resolve(),
        reject: (error) => {
          if (error instanceof RequestError) this.responders.delete(topic);
          reject(error);
        },
      });
    });
  }

  unrespond(topic: string): Promise<void> {
    if (!this.responders.delete(topic)) return Promise.reject(new RequestError(ErrorCode.NOT_SUBSCRIBED, `not responding to ${JSON.stringify(topic)}`));
    if (!this.connected) return Promise.resolve();
    return new Promise<void>((resolve) => this.request((id) => wire.unsub(id, topic), { onAck: () => resolve(), reject: () => resolve() }));
  }

  private answer(id: number, topic: string, data: Uint8Array, user: string | null): void {
    const responder = this.responders.get(topic);
    if (responder === undefined) return; // no longer responding: the requester times out
    const send = (result: Uint8Array | string) => {
      if (this.connected) this.queue(wire.reply(id, wire.bytesOf(result)));
    };
    let result: ReturnType<Responder>;
    try {
      result = responder({ id, topic, data, user });
    } catch (error) {
      this.events.error(error as Error);
      return;
    }
    if (result instanceof Promise) result.then(send, (error) => this.events.error(error as Error));
    else send(result);
  }

  // frames in

  /** Handle one server frame. */
  receive(data: ArrayBuffer | Uint8Array): void {
    let messages: unknown[][];
    try {
      messages = wire.messagesOf(data);
    } catch (error) {
      this.events.violation((error as Error).message);
      return;
    }
    for (let i = 0; i < messages.length; i++) {
      const m = messages[i];
      switch (m[0]) {
        case "msg":
          for (let j = 1; j < m.length; j++) {
            const batch = m[j] as unknown[];
            const entry = this.topics[batch[0] as number];
            if (entry === undefined) {
              this.events.violation(`a delivery for topic id ${String(batch[0])}, which was never announced`);
              return;
            }
            if (entry.version !== this.version) this.route(entry);
            const subs = entry.subs;
            const seq = toNumber(batch[1]);
            for (let k = 0; k < subs.length; k++) subs[k].receive(entry.name, entry.epoch, seq, batch, 2);
          }
          break;
        case "topic": {
          const id = toNumber(m[1]);
          if (id >= this.topics.length) {
            // ids are small but not dense (below twice the broker's topics, in its own order):
            // grow the table by doubling, filled, so that a far id keeps it an array
            const grown = new Array<TopicEntry | undefined>(Math.max(id + 1, this.topics.length * 2, 64)).fill(undefined);
            for (let i = 0; i < this.topics.length; i++) grown[i] = this.topics[i];
            this.topics = grown;
          }
          this.topics[id] = { name: m[2] as string, epoch: toBig(m[3]), subs: [], version: -1 };
          break;
        }
        case "ack": {
          const id = toNumber(m[1]);
          const p = this.pending.get(id);
          if (p !== undefined) {
            this.pending.delete(id);
            this.inflight.delete(id);
            const epoch = toBig(m[2] ?? 0);
            const seq = toNumber(m[3] ?? 0);
            p.onAck?.(epoch, seq);
            p.resolve?.({ epoch, seq });
          }
          break;
        }
        case "err": {
          const id = toNumber(m[1]);
          const error = new RequestError(toNumber(m[2]), String(m[3] ?? ""), id);
          const p = id ? this.pending.get(id) : undefined;
          if (p !== undefined) {
            this.pending.delete(id);
            this.inflight.delete(id);
            if (p.reject) p.reject(error);
            else this.events.error(error);
          } else {
            this.events.error(error);
          }
          break;
        }
        case "reply": {
          const id = toNumber(m[1]);
          const p = this.pending.get(id);
          if (p !== undefined) {
            this.pending.delete(id);
            p.resolve?.(m[2]);
          }
          break;
        }
        case "gap": {
          const gap: Gap = {
            topic: m[1] as string,
            epoch: toBig(m[2]),
            first: toNumber(m[3]),
            last: toNumber(m[4]),
            reason: String(m[5] ?? ""),
            cause: typeof m[6] === "string" ? m[6] : "",
          };
          for (const sub of this.subsOf(gap.topic)) sub.gap(gap);
          break;
        }
        case "unsubscribed": {
          // an operator ended the subscription of this pattern at the broker
          const sub = this.subs.get(m[1] as string);
          if (sub !== undefined && !sub.done) {
            this.drop(sub);
            const error = new SubscriptionEnded(sub.pattern, String(m[2] ?? ""));
            if (sub.onEnd !== undefined) {
              try {
                sub.onEnd(error);
              } catch (e) {
                this.events.error(e as Error);
              }
            } else {
              this.events.error(error);
            }
          }
          break;
        }
        case "request":
          this.answer(toNumber(m[1]), m[2] as string, m[3] as Uint8Array, typeof m[4] === "string" ? m[4] : null);
          break;
        default:
          break; // "beat", and server messages of types this client does not know, are ignored
      }
    }
  }

  private route(entry: TopicEntry): void {
    entry.subs = this.subsOf(entry.name);
    entry.version = this.version;
  }

  private subsOf(topic: string): Subscription[] {
    const out: Subscription[] = [];
    for (const sub of this.indexed) if (matches(sub.pattern, topic)) out.push(sub);
    return out;
  }
}
