// The two ways the client reaches the broker. A WebSocket (the runtime's global `WebSocket`:
// browsers, Node 22+, Bun), or the fallback: a Server-Sent Events stream for what the broker
// sends plus an HTTP POST for each frame the client sends (docs/protocol.md, section 12),
// for where a WebSocket cannot be opened. Both carry the same frames; the core never knows
// which one it has.
import { BEARER_PREFIX, CLIENT_ID, SUBPROTOCOL } from "./wire.js";

/** `url` with the client's identification as its `client` query parameter (a WebSocket,
 * in a browser or Node, cannot send headers), unless it names one already. */
export function identified(url: string): string {
  const parsed = new URL(url);
  if (!parsed.searchParams.has("client")) parsed.searchParams.set("client", CLIENT_ID);
  return parsed.toString();
}

export type TransportKind = "websocket" | "fallback";

export interface TransportEvents {
  /** The transport is open. A fallback transport whose stream was cut takes up its session
   * at the broker again on a new stream (Last-Event-ID) and says nothing; when the broker no
   * longer held the session, `open` comes again with `fresh`: everything must be made again. */
  open(fresh: boolean): void;
  frame(data: ArrayBuffer | Uint8Array): void;
  /** The transport ended (`opened`: after it had opened). `status` is the HTTP status of a
   * refused fallback request, 0 otherwise. Called once, never after close() was called. */
  closed(code: number, reason: string, opened: boolean, status: number): void;
}

export interface Transport {
  readonly kind: TransportKind;
  /** Bytes handed over and not yet sent. */
  readonly buffered: number;
  send(frame: Uint8Array): void;
  /** End it now; no event follows. */
  close(code?: number, reason?: string): void;
}

export class WebSocketTransport implements Transport {
  readonly kind = "websocket";
  private ws: WebSocket;
  private done = false;

  constructor(url: string, token: string | null, events: TransportEvents) {
    const protocols = token ? [SUBPROTOCOL, BEARER_PREFIX + token] : [SUBPROTOCOL];
    const ws = new WebSocket(identified(url), protocols);
    ws.binaryType = "arraybuffer";
    let opened = false;
    ws.onopen = () => {
      opened = true;
      events.open(true);
    };
    ws.onmessage = (event: MessageEvent) => {
      if (typeof event.data === "string") {
        this.close(1003, "text frames are not part of broker.v1");
        events.closed(1003, "the broker sent a text frame", true, 0);
        return;
      }
      events.frame(event.data as ArrayBuffer);
    };
    ws.onerror = () => {}; // a close event follows
    ws.onclose = (event: CloseEvent) => {
      if (this.done) return;
      this.done = true;
      const reason = event.reason || (opened ? "connection lost" : `could not open a WebSocket to ${url}`);
      events.closed(event.code || 1006, reason, opened, 0);
    };
    this.ws = ws;
  }

  get buffered(): number {
    return this.ws.bufferedAmount;
  }

  send(frame: Uint8Array): void {
    if (this.ws.readyState === 1) this.ws.send(frame);
  }

  close(code = 1000, reason = ""): void {
    if (this.done) return;
    this.done = true;
    const ws = this.ws;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close(code, reason);
    } catch {
      ws.close(); // a code a browser does not let a script send
    }
  }
}

/** The http(s) URL of a ws(s) URL: the fallback is served on the same port and path. */
export function httpUrl(url: string): string {
  return url.replace(/^ws(s?):/i, "http$1:");
}

const NodeBuffer = (globalThis as { Buffer?: { from(text: string, encoding: string): Uint8Array } }).Buffer;

function fromBase64(text: string): Uint8Array {
  if (NodeBuffer !== undefined) return NodeBuffer.from(text, "base64");
  const binary = atob(text);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

const MAX_ERROR_TEXT = 512;

/** The fields of one Server-Sent Event (its lines without the blank line that ends it): its
 * type ("message" when it names none), its data and its id (null when it sets none). */
export function readEvent(block: string): { kind: string; data: string; id: string | null } {
  let kind = "message";
  let data = "";
  let id: string | null = null;
  let first = true;
  for (const line of block.split("\n")) {
    if (line.startsWith("data:")) {
      data += (first ? "" : "\n") + line.slice(line.charCodeAt(5) === 32 ? 6 : 5);
      first = false;
    } else if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("id:")) id = line.slice(3).trim();
  }
  return { kind, data, id };
}

/** The bytes of a message event's data (base64). */
export function eventBytes(data: string): Uint8Array {
  return fromBase64(data);
}

function newStreamId(): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** The fallback: an event stream (GET) for what the broker sends, a POST for each frame the
 * client sends, both naming the stream by a random id of the client's (Broker-Stream, also
 * the key a load balancer keeps a stream's requests together by). A cut stream is opened
 * again at once with Last-Event-ID: the broker holds the session for a moment and goes on
 * where it stopped; POSTs are independent of the stream and go on meanwhile. */
export class FallbackTransport implements Transport {
  readonly kind = "fallback";
  readonly streamId = newStreamId();
  private readonly url: string;
  private readonly token: string | null;
  private readonly events: TransportEvents;
  private readonly abort = new AbortController();
  private readonly posts: Uint8Array[] = [];
  private posting = false;
  private queued = 0;
  private opened = false;
  private done = false;
  private lastEventId = "";
  private resuming = false;

  constructor(url: string, token: string | null, events: TransportEvents) {
    this.url = httpUrl(url);
    this.token = token;
    this.events = events;
    void this.stream();
  }

  get buffered(): number {
    return this.queued;
  }

  private async stream(): Promise<void> {
    const headers: Record<string, string> = {
      Accept: "text/event-stream",
      "Broker-Protocol": SUBPROTOCOL,
      "Broker-Stream": this.streamId,
      "Broker-Client": CLIENT_ID,
    };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (this.lastEventId) headers["Last-Event-ID"] = this.lastEventId;
    let ended = "the event stream ended";
    try {
      const response = await fetch(this.url, { method: "GET", headers, cache: "no-store", signal: this.abort.signal });
      if (!response.ok || response.body === null) {
        const text = (await response.text().catch(() => "")).trim().slice(0, MAX_ERROR_TEXT);
        this.end(1006, text || `HTTP ${response.status}`, response.status);
        return;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (this.done) return;
        if (done) break;
        buffer += value;
        let end: number;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          this.event(block);
          if (this.done) return;
        }
      }
    } catch (error) {
      if (this.done) return;
      ended = `the event stream failed: ${(error as Error).message}`;
    }
    if (this.opened && !this.resuming) {
      this.resuming = true; // once: a stream that cannot be taken up again is lost
      void this.stream();
      return;
    }
    this.end(1006, this.opened ? ended : `could not open an event stream at ${this.url}: ${ended}`, 0);
  }

  /** One event of the stream (its lines, without the blank line that ended it). */
  private event(block: string): void {
    const { kind, data, id } = readEvent(block);
    if (id !== null) this.lastEventId = id;
    switch (kind) {
      case "message":
        this.events.frame(fromBase64(data));
        break;
      case "open": {
        const resumed = data === "resumed";
        this.resuming = false;
        if (!this.opened || !resumed) {
          this.opened = true;
          this.events.open(true);
        }
        break;
      }
      case "ping":
        this.post(new Uint8Array(0)); // the answer the broker waits for (its ping rule)
        break;
      case "close": {
        const space = data.indexOf(" ");
        const code = Number(space < 0 ? data : data.slice(0, space)) || 1006;
        this.end(code, space < 0 ? "" : data.slice(space + 1), 0);
        break;
      }
      default:
        break; // an event this client does not know
    }
  }

  send(frame: Uint8Array): void {
    if (!this.done) this.post(frame);
  }

  private post(body: Uint8Array): void {
    this.posts.push(body);
    this.queued += body.length;
    if (!this.posting) void this.drain();
  }

  /** POST the frames one after the other: the broker applies each before answering, so
   * they are applied in the order sent. */
  private async drain(): Promise<void> {
    this.posting = true;
    while (this.posts.length !== 0 && !this.done) {
      const body = this.posts.shift()!;
      let response: Response;
      try {
        response = await fetch(this.url, {
          method: "POST",
          headers: { "Content-Type": "application/msgpack", "Broker-Protocol": SUBPROTOCOL, "Broker-Stream": this.streamId },
          body: body as unknown as BodyInit,
          cache: "no-store",
          signal: this.abort.signal,
        });
      } catch (error) {
        this.end(1006, `a POST failed: ${(error as Error).message}`, 0);
        return;
      }
      this.queued -= body.length;
      if (response.status !== 204) {
        const text = (await response.text().catch(() => "")).trim().slice(0, MAX_ERROR_TEXT);
        this.end(1006, `a POST was refused (${response.status}): ${text}`, 0);
        return;
      }
    }
    this.posting = false;
  }

  private end(code: number, reason: string, status: number): void {
    if (this.done) return;
    this.done = true;
    this.abort.abort();
    this.events.closed(code, reason, this.opened, status);
  }

  /** End the stream and its session at the broker (a DELETE, as a WebSocket client sends a
   * close frame), without waiting. */
  close(): void {
    if (this.done) return;
    this.done = true;
    this.abort.abort();
    if (this.opened) {
      fetch(this.url, { method: "DELETE", headers: { "Broker-Protocol": SUBPROTOCOL, "Broker-Stream": this.streamId }, keepalive: true }).catch(() => {});
    }
  }
}
