// One subscription: its handler, and per topic the position of the last message it delivered,
// so that each message reaches the application once and in order, or a Gap says what is missing.
import type { SubscriptionEnded } from "./errors.js";
import type { Policy, Position } from "./wire.js";

/** A delivered message. `conflated`: the broker skipped the messages before it (a Gap with
 * cause "conflated" came first) and this was the topic's newest at that moment. */
export interface Message {
  topic: string;
  epoch: bigint;
  seq: number;
  data: Uint8Array;
  conflated: boolean;
}

/** Messages `first` ... `last` of `topic` in `epoch` this subscription will not get (`last` 0:
 * to the end of that epoch). `cause` is for programs: "history", "ended", "dropped",
 * "conflated", "backplane" (or "replay" from older brokers; an unknown cause is a plain gap). */
export interface Gap {
  topic: string;
  epoch: bigint;
  first: number;
  last: number;
  reason: string;
  cause: string;
}

export type Handler = (message: Message) => void;
export type GapHandler = (gap: Gap) => void;

/** A JSON-safe position to persist (epochs as decimal strings) and give back as `since`. */
export type SavedPosition = { epoch: string; seq: number };
/** What `Subscription.since()` returns: for a topic its position, for a pattern the time of
 * the subscription and the position of every topic it delivered. */
export type Since = SavedPosition | { time: string; topics: Record<string, SavedPosition> };

export interface SubscribeOptions {
  /** Recover what came after a saved position (a value `since()` returned earlier). */
  since?: Since | null;
  /** Start with the latest retained message of each matching topic (ignored with `since`). */
  last?: boolean;
  /** What the broker does with this subscription's messages while the connection is behind:
   * "disconnect", "drop", "conflate", or "" for the server's setting. */
  policy?: Policy;
  /** Called for each Gap of this subscription (otherwise the client's "gap" event has it). */
  onGap?: GapHandler;
  /** Called when the broker ends the subscription (an operator unsubscribed its user: the
   * `unsubscribed` message); otherwise the client's "error" event has a SubscriptionEnded. */
  onEnd?: (error: SubscriptionEnded) => void;
}

export type Sink = {
  message(sub: Subscription, message: Message): void;
  gap(sub: Subscription, gap: Gap): void;
};

export class Subscription {
  readonly pattern: string;
  readonly wildcard: boolean;
  /** Its slow-consumer policy at the broker ("" is the server's). */
  policy: Policy;
  readonly handler: Handler;
  readonly onGap: GapHandler | undefined;
  readonly onEnd: ((error: SubscriptionEnded) => void) | undefined;
  /** From the subscribe ack: for a topic its epoch and the last sequence number published
   * before the subscription; for a pattern the time (ms) the subscription took effect. */
  epoch = 0n;
  seq = 0;
  /** Per topic, the position of the last message delivered. */
  readonly positions = new Map<string, Position>();
  /** Held at the broker (acknowledged on the current connection). */
  active = false;
  /** A `sub` of it was sent on the current connection and not answered yet. */
  requested = false;
  /** Counts the `sub` messages sent for it: only the ack of the latest makes it active. */
  generation = 0;
  /** Unsubscribed by the application, or refused: nothing more is delivered. */
  done = false;
  /** Resolves at the broker's ack; rejects with the refusal (RequestError). */
  readonly ready: Promise<void>;
  settle!: { resolve: () => void; reject: (error: Error) => void; settled: boolean };
  readonly since0: Since | null;
  readonly last: boolean;
  private readonly conflated = new Set<string>();
  private readonly ended = new Map<string, bigint>(); // topic -> the epoch it was told ended
  private readonly unsubscriber: (sub: Subscription) => Promise<void>;
  private readonly sink: Sink;

  constructor(pattern: string, wildcard: boolean, handler: Handler, options: SubscribeOptions, sink: Sink, unsubscriber: (sub: Subscription) => Promise<void>) {
    this.pattern = pattern;
    this.wildcard = wildcard;
    this.handler = handler;
    this.policy = options.policy ?? "";
    this.onGap = options.onGap;
    this.onEnd = options.onEnd;
    this.since0 = options.since ?? null;
    this.last = options.last ?? false;
    this.sink = sink;
    this.unsubscriber = unsubscriber;
    this.ready = new Promise<void>((resolve, reject) => {
      this.settle = { resolve, reject, settled: false };
    });
    this.ready.catch(() => {}); // a refusal is also reported to whoever awaits it
  }

  /** Stop the subscription (at the broker too); nothing more is delivered from now on. */
  unsubscribe(): Promise<void> {
    return this.unsubscriber(this);
  }

  /** The position to persist and pass as `since` later (e.g. across page loads), so that a
   * new subscription continues exactly after what this one delivered. */
  since(): Since {
    if (this.wildcard) {
      const topics: Record<string, SavedPosition> = {};
      for (const [topic, p] of this.positions) topics[topic] = { epoch: p.epoch.toString(), seq: p.seq };
      return { time: this.epoch.toString(), topics };
    }
    const p = this.positions.get(this.pattern);
    if (p !== undefined) return { epoch: p.epoch.toString(), seq: p.seq };
    return { epoch: this.epoch.toString(), seq: this.seq };
  }

  /** A batch of `topic`: deliver the payloads batch[start...] (sequence numbers from `seq`)
   * that lie after this subscription's position. */
  receive(topic: string, epoch: bigint, seq: number, batch: unknown[], start: number): void {
    const position = this.positions.get(topic);
    let i = start;
    const count = batch.length - start;
    if (position !== undefined && position.epoch === epoch) {
      const skip = position.seq + 1 - seq;
      if (skip >= count) return;
      if (skip > 0) i += skip;
      position.seq = seq + count - 1;
    } else {
      this.positions.set(topic, { epoch, seq: seq + count - 1 });
    }
    let conflated = false;
    if (this.conflated.size !== 0 && this.conflated.delete(topic)) conflated = true;
    const sink = this.sink;
    for (; i < batch.length; i++) {
      if (this.done) return;
      sink.message(this, { topic, epoch, seq: seq + i - start, data: batch[i] as Uint8Array, conflated });
      conflated = false;
    }
  }

  gap(gap: Gap): void {
    if (this.done) return;
    if (this.ended.size !== 0 && this.ended.get(gap.topic) === gap.epoch) return; // told already: the rest of this epoch will not come
    const position = this.positions.get(gap.topic);
    if (position !== undefined && position.epoch === gap.epoch) {
      if (gap.last && gap.last <= position.seq) return; // delivered all of it already
      if (gap.first <= position.seq || (!gap.last && gap.first > position.seq + 1)) gap = { ...gap, first: position.seq + 1 };
    }
    if (gap.last) {
      if (position !== undefined && position.epoch === gap.epoch) position.seq = gap.last;
      else this.positions.set(gap.topic, { epoch: gap.epoch, seq: gap.last });
    } else {
      this.ended.set(gap.topic, gap.epoch);
    }
    if (gap.cause === "conflated") this.conflated.add(gap.topic);
    else this.conflated.delete(gap.topic);
    this.sink.gap(this, gap);
  }
}
