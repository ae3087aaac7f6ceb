// Errors of the client: one base, a shallow tree, and the protocol's codes (docs/protocol.md
// sections 8 and 9) as named constants.

/** The broker's error codes (`err` messages, docs/protocol.md section 8). */
export const ErrorCode = {
  BAD_MESSAGE: 1,
  UNKNOWN_TYPE: 2,
  INVALID_TOPIC: 3,
  PATTERN_NOT_ALLOWED: 4,
  ALREADY_SUBSCRIBED: 5,
  NOT_SUBSCRIBED: 6,
  PAYLOAD_TOO_LARGE: 7,
  TOO_MANY_SUBSCRIPTIONS: 8,
  TOO_MANY_TOPICS: 9,
  BAD_POSITION: 10,
  NO_RESPONDERS: 11,
  REQUEST_TIMEOUT: 12,
  UNKNOWN_REQUEST: 13,
  TOO_MANY_REQUESTS: 14,
  RATE_LIMITED: 15,
  FORBIDDEN: 16,
  BAD_TOKEN: 17,
  UNAVAILABLE: 18,
} as const;
export type ErrorCodeName = keyof typeof ErrorCode;

/** Close codes a client can see (docs/protocol.md section 9). */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  SLOW_CONSUMER: 1013,
  TOKEN_EXPIRED: 4001,
  TOKEN_REVOKED: 4003,
  /** The node is leaving (lame-duck mode): reconnect at once, to the next URL, and recover. */
  RECONNECT_ELSEWHERE: 4010,
} as const;

const NAMES: Record<number, string> = Object.fromEntries(Object.entries(ErrorCode).map(([name, code]) => [code, name]));

/** The base of every error this client raises. */
export class BrokerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BrokerError";
  }
}

/** The broker refused a request: `code` is one of ErrorCode (an unknown code is a generic
 * failure of the request), `id` the request's id. */
export class RequestError extends BrokerError {
  readonly code: number;
  readonly codeName: string;
  readonly id: number;
  constructor(code: number, text: string, id = 0) {
    super(`${NAMES[code] ?? `error ${code}`}: ${text}`);
    this.name = "RequestError";
    this.code = code;
    this.codeName = NAMES[code] ?? "UNKNOWN";
    this.id = id;
  }
}

/** The connection (or the client) closed before a request was answered, or the client is
 * closed for good: `code` is the close code (1006 when none was received), `reason` says why. */
export class ConnectionClosed extends BrokerError {
  readonly code: number;
  readonly reason: string;
  constructor(code: number, reason: string) {
    super(`connection closed (${code}${reason ? `: ${reason}` : ""})`);
    this.name = "ConnectionClosed";
    this.code = code;
    this.reason = reason;
  }
}

/** No answer within the time the caller gave. */
export class Timeout extends BrokerError {
  constructor(message: string) {
    super(message);
    this.name = "Timeout";
  }
}

/** A publish could not be queued: the offline queue is full (offlineOverflow "raise"), or
 * too much waits for a socket that takes no more. */
/** An operator ended the subscription at the broker (the `unsubscribed` message): it
 * delivers nothing more, and is not made again on a reconnection. */
export class SubscriptionEnded extends BrokerError {
  readonly pattern: string;
  readonly reason: string;
  constructor(pattern: string, reason: string) {
    super(`subscription ${JSON.stringify(pattern)} ended by the broker: ${reason}`);
    this.name = "SubscriptionEnded";
    this.pattern = pattern;
    this.reason = reason;
  }
}

export class QueueFull extends BrokerError {
  constructor(message: string) {
    super(message);
    this.name = "QueueFull";
  }
}
