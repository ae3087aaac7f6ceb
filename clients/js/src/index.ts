// The broker's client for browsers, Node 22+ and Bun (protocol broker.v1).
export { Client } from "./client.js";
export type { ClientOptions, PageEvents, State, StateChange, TokenSource } from "./client.js";
export { BrokerError, CloseCode, ConnectionClosed, ErrorCode, QueueFull, RequestError, SubscriptionEnded, Timeout } from "./errors.js";
export type { HiddenMode, PublishAck, Request, Responder } from "./protocol.js";
export { Core } from "./protocol.js";
export { Subscription } from "./subscription.js";
export type { Gap, GapHandler, Handler, Message, SavedPosition, Since, SubscribeOptions } from "./subscription.js";
export { isPattern, matches, validatePattern, validateTopic } from "./topics.js";
export type { TransportKind } from "./transport.js";
export { eventBytes, readEvent } from "./transport.js";
export * as wire from "./wire.js";
