// Topic and pattern rules (docs/protocol.md section 4), checked before anything is sent so
// that a mistake is reported where it is made.
import { ErrorCode, RequestError } from "./errors.js";

export const MAX_TOKENS = 32;
export const DEFAULT_MAX_TOPIC_LENGTH = 255;

function validToken(token: string): boolean {
  if (token.length === 0) return false;
  for (let i = 0; i < token.length; i++) {
    const c = token.charCodeAt(i);
    if (c < 0x21 || c > 0x7e || c === 0x2a || c === 0x2e || c === 0x3e) return false;
  }
  return true;
}

/** True when a whole token of `name` is a wildcard (`*` or `>`). */
export function isPattern(name: string): boolean {
  for (const token of name.split(".")) if (token === "*" || token === ">") return true;
  return false;
}

function check(name: string, wildcards: boolean, what: string): void {
  if (typeof name !== "string" || name.length === 0 || name.length > DEFAULT_MAX_TOPIC_LENGTH) {
    throw new RequestError(ErrorCode.INVALID_TOPIC, `${what} is a non-empty string of at most ${DEFAULT_MAX_TOPIC_LENGTH} characters`);
  }
  const tokens = name.split(".");
  if (tokens.length > MAX_TOKENS) throw new RequestError(ErrorCode.INVALID_TOPIC, `${what} ${JSON.stringify(name)} has more than ${MAX_TOKENS} tokens`);
  for (let i = 0; i < tokens.length; i++) {
    const token = tokens[i];
    if (wildcards && (token === "*" || (token === ">" && i === tokens.length - 1))) continue;
    if (!validToken(token)) throw new RequestError(ErrorCode.INVALID_TOPIC, `${what} ${JSON.stringify(name)} is invalid (docs/protocol.md section 4)`);
  }
}

/** A concrete topic, or RequestError INVALID_TOPIC / PATTERN_NOT_ALLOWED. */
export function validateTopic(name: string, what = "topic"): void {
  check(name, true, what);
  if (isPattern(name)) throw new RequestError(ErrorCode.PATTERN_NOT_ALLOWED, `${what} ${JSON.stringify(name)} is a pattern; name a concrete topic`);
}

/** A topic or a pattern, or RequestError INVALID_TOPIC. */
export function validatePattern(name: string): void {
  check(name, true, "pattern");
}

/** True when `pattern` (or topic) matches the concrete `topic`. */
export function matches(pattern: string, topic: string): boolean {
  if (pattern === topic) return true;
  if (!isPattern(pattern)) return false;
  const p = pattern.split(".");
  const t = topic.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== "*" && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}
