// The wire format of broker.v1 (docs/protocol.md): every message is a MessagePack array whose
// first element is its type name; a server frame is an array of messages. Epochs need 63 bits,
// so integers encoded as uint 64 decode as bigint and every epoch is kept as a bigint.
import { Decoder, Encoder } from "@msgpack/msgpack";

export const SUBPROTOCOL = "broker.v1";
/** Who this client says it is (protocol.md 1.1: the Broker-Client header, or the `client`
 * query parameter where headers cannot be set, as on a WebSocket): NAME/VERSION. */
export const CLIENT_ID = "broker-js/0.1.0";
/** The prefix of the Sec-WebSocket-Protocol entry that carries a token from a browser. */
export const BEARER_PREFIX = "bearer.";
export const DEFAULT_MAX_BATCH = 10_000;
export const MAX_SINCE_TOPICS = 10_000;
export const MAX_REQUEST_TIMEOUT_MS = 600_000;
export const MIN_HEARTBEAT_MS = 1000;
export const MAX_HEARTBEAT_MS = 3_600_000;
export const MAX_MSG_ID_LENGTH = 128;
export const POLICIES = ["", "disconnect", "drop", "conflate"] as const;
export type Policy = (typeof POLICIES)[number];

export type Int = number | bigint;
export type Position = { epoch: bigint; seq: number };
/** `since` on the wire: [epoch, seq] for a topic, [time, {topic: [epoch, seq]}] for a pattern. */
export type WireSince = [bigint, number] | [bigint, Record<string, [bigint, number]>];

const encoder = new Encoder({ useBigInt64: true, ignoreUndefined: false });
const decoder = new Decoder({ useBigInt64: true });

/** One client message, encoded. */
export function encode(message: unknown[]): Uint8Array {
  return encoder.encode(message);
}

/** Decode one MessagePack value (any bytes: what a server frame holds). */
export function decode(data: ArrayBuffer | Uint8Array): unknown {
  return decoder.decode(data);
}

export function toBig(value: unknown): bigint {
  return typeof value === "bigint" ? value : BigInt(value as number);
}

export function toNumber(value: unknown): number {
  return typeof value === "number" ? value : Number(value as bigint);
}

export const sub = (id: number, topic: string, since: WireSince | null = null, last = false, respond = false, policy: Policy = ""): Uint8Array =>
  encode(["sub", id, topic, since, last, respond, policy]);
export const unsub = (id: number, topic: string): Uint8Array => encode(["unsub", id, topic]);
export const pub = (id: number, topic: string, data: Uint8Array, msgId = ""): Uint8Array =>
  encode(msgId ? ["pub", id, topic, data, msgId] : ["pub", id, topic, data]);
export const req = (id: number, topic: string, data: Uint8Array, timeoutMs: number): Uint8Array => encode(["req", id, topic, data, timeoutMs]);
export const reply = (id: number, data: Uint8Array): Uint8Array => encode(["reply", id, data]);
export const auth = (id: number, token: string): Uint8Array => encode(["auth", id, token]);
export const hb = (id: number, intervalMs: number): Uint8Array => encode(["hb", id, intervalMs]);

/** The frame holding `messages` (each already encoded): the message itself, or a batch. */
export function frameOf(messages: Uint8Array[], bytes: number): Uint8Array {
  if (messages.length === 1) return messages[0];
  const n = messages.length;
  const head = n < 16 ? 1 : n < 65536 ? 3 : 5;
  const out = new Uint8Array(head + bytes);
  if (n < 16) out[0] = 0x90 | n;
  else if (n < 65536) {
    out[0] = 0xdc;
    out[1] = n >> 8;
    out[2] = n & 0xff;
  } else {
    out[0] = 0xdd;
    new DataView(out.buffer).setUint32(1, n);
  }
  let at = head;
  for (const m of messages) {
    out.set(m, at);
    at += m.length;
  }
  return out;
}

/** A server frame that cannot be read as an array of messages (a protocol violation). */
export class Unreadable extends Error {}

/** The messages of a server frame: an array of arrays, each starting with a type name. */
export function messagesOf(data: ArrayBuffer | Uint8Array): unknown[][] {
  let value: unknown;
  try {
    value = decoder.decode(data);
  } catch (error) {
    throw new Unreadable(`not MessagePack: ${(error as Error).message}`);
  }
  if (!Array.isArray(value) || value.length === 0) throw new Unreadable("a server frame is a non-empty array of messages");
  for (const m of value) {
    if (!Array.isArray(m) || typeof m[0] !== "string") throw new Unreadable("a message is an array whose first element is its type name");
  }
  return value as unknown[][];
}

const utf8 = new TextEncoder();

/** Payloads are bytes; a string is sent as its UTF-8 bytes. */
export function bytesOf(data: Uint8Array | ArrayBuffer | ArrayBufferView | string): Uint8Array {
  if (data instanceof Uint8Array) return data;
  if (typeof data === "string") return utf8.encode(data);
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("data is a Uint8Array, an ArrayBuffer, a typed array or a string");
}
