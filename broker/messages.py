"""Wire schema of protocol v1: msgspec tagged structs encoded as MessagePack arrays.

Every message is an array whose first element is its type name. New optional fields are only
ever appended at the end with defaults; decoders ignore trailing elements they do not know, so
an older peer can read a newer one's messages.

A client frame carries either one message (`["pub", ...]`) or an array of messages
(`[["pub", ...], ["sub", ...]]`): the batch form lets a client send many publishes in one frame.
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple, final

import msgspec

from .errors import BrokerError, ErrorCode, RequestError
from .fastpath import FRAME_LONG_ARRAY, FRAME_LONG_BATCH, FRAME_LONG_MAP, FRAME_TOO_DEEP, FRAME_TOO_MANY_VALUES, measure_frame
from .letterhead import dead_letter_head

PROTOCOL_VERSION = 1
SUBPROTOCOL = "broker.v1"

# Above this an integer is not exact in a JavaScript number (IEEE double): JSON.parse rounds
# it. Epochs are milliseconds times 2^20 (about 2^60), so every JSON the broker writes carries
# them also as strings, `epoch_str`.
MAX_SAFE_INTEGER = (1 << 53) - 1


def position_json(epoch: int, seq: int) -> dict:
    """A position (epoch, seq) as JSON fields: the epoch as a number and as a string."""
    return {"epoch": epoch, "epoch_str": str(epoch), "seq": seq}


RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Wire(msgspec.Struct, array_like=True, frozen=True, tag_field="type"):
    pass


# Client to server

# A subscription's slow-consumer policy as a `sub` names it ("": the server's).
PolicyName = Literal["", "disconnect", "drop", "conflate"]


class Sub(_Wire, tag="sub", frozen=True):
    """Subscribe to an exact topic or a wildcard pattern.

    `since`: recover from history what came after a position: `[epoch, seq]` for a topic,
    `[time_ms, {topic: [epoch, seq], ...}]` for a pattern (checked by the session). `last`:
    start with the latest retained message of each matching topic. `respond`: receive the
    requests (`req`) to this concrete topic instead of its messages. `policy`: what the
    broker does with this subscription's messages when the connection falls behind
    (`"disconnect"`, `"drop"` or `"conflate"`; `""`: the server's `slow_consumer_policy`)."""

    id: RequestId
    topic: str
    since: list | None = None
    last: bool = False
    respond: bool = False
    policy: PolicyName = ""


class Unsub(_Wire, tag="unsub", frozen=True):
    """Drop a subscription made earlier with the same topic or pattern."""

    id: RequestId
    topic: str


MAX_MSG_ID_LENGTH = 128


class Pub(_Wire, tag="pub", frozen=True):
    """Publish one payload to an exact topic. id 0 asks for no ack (errors still come back).
    `msg_id`: the publisher's own id for the message; a repeat within the broker's dedupe
    window is acknowledged with the original sequence number and not delivered again."""

    id: RequestId
    topic: str
    data: bytes
    msg_id: Annotated[str, msgspec.Meta(max_length=MAX_MSG_ID_LENGTH)] = ""


MAX_REQUEST_TIMEOUT_MS = 600_000


class Req(_Wire, tag="req", frozen=True):
    """Ask one responder subscribed to `topic` for a reply, within `timeout_ms`."""

    id: RequestId
    topic: str
    data: bytes
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUEST_TIMEOUT_MS)] = 5000


class Reply(_Wire, tag="reply", frozen=True):
    """A responder's answer to the `request` numbered `id` (client to server), or the answer
    to the requester's `req` with id `id` (server to client). Either way an id in the range of
    request ids (a request number the server gave is one too), so a client's reply with an
    id out of it is refused like any other bad id."""

    id: RequestId
    data: bytes


class Auth(_Wire, tag="auth", frozen=True):
    """A fresh token for this connection (before the current one expires): the same user,
    its grants replace the old ones."""

    id: RequestId
    token: str


# The heartbeat interval a client may ask for: 0 (none), or 1 s to 1 hour.
MIN_HEARTBEAT_MS = 1000
MAX_HEARTBEAT_MS = 3_600_000


class Hb(_Wire, tag="hb", frozen=True):
    """Ask the server to send this connection a `beat` whenever it has sent it nothing else for
    `interval_ms` (0: stop), so that the client can tell a quiet connection from a dead one."""

    id: RequestId
    interval_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_HEARTBEAT_MS)]


ClientMessage = Sub | Unsub | Pub | Req | Reply | Auth | Hb
CLIENT_TYPES = ("sub", "unsub", "pub", "req", "reply", "auth", "hb")


# Server to client


class Ack(_Wire, tag="ack", frozen=True):
    """Success reply. For `pub`: the topic epoch and the sequence number given to the message.
    For `sub` of an exact topic: the topic epoch and the last sequence number published so far
    (0, 0 when nothing was published yet). 0, 0 for patterns and `unsub`."""

    id: int
    epoch: int = 0
    seq: int = 0


class Err(_Wire, tag="err", frozen=True):
    """Failure reply: echoes the request id (0 when none could be read)."""

    id: int
    code: int
    text: str


@final  # final: ServerReader tells it apart by its exact type
class Topic(_Wire, tag="topic", frozen=True):
    """Announces that `id` stands for `topic` (with its epoch) in this connection's deliveries.
    Sent once per connection before the first delivery of the topic, again only if its epoch
    changes."""

    id: int
    topic: str
    epoch: int


GAP_CAUSES = ("history", "ended", "replay", "dropped", "conflated", "backplane")


class GapNotice(_Wire, tag="gap", frozen=True):
    """Messages `first` ... `last` of `topic` in `epoch` will not reach this connection
    (`last` 0: up to the end of that epoch); `reason` says why, for people; `cause`, for
    programs, is one of GAP_CAUSES (`conflated`: the topic's next delivery is the newest
    message there was when the others were skipped)."""

    topic: str
    epoch: int
    first: int
    last: int
    reason: str
    cause: str = ""


class Gap(NamedTuple):
    """Messages `first` ... `last` of `topic` in `epoch` that a subscription will not get
    (`last` 0: to the end of that epoch): what a GapNotice says, as the router hands it to a
    connection and as the client hands it to the application. `reason` is for people; `cause`,
    for programs, is one of GAP_CAUSES: "history" (history no longer held them), "ended"
    (their epoch ended), "replay" (from earlier broker versions: a replay stopped at their
    bound), "dropped" or "conflated" (the connection fell behind and its slow-consumer policy
    dropped or conflated them), "backplane" (the cluster backplane lost them)."""

    topic: str
    epoch: int
    first: int
    last: int
    reason: str
    cause: str = ""


class Request(_Wire, tag="request", frozen=True):
    """A `req` passed to this connection as its responder: answer with `["reply", id, data]`.
    `user`: the requester's (its token's `auth_user_claim`); None without authentication or
    for an anonymous requester (and from servers before the field was added)."""

    id: int
    topic: str
    data: bytes
    user: str | None = None


class Heartbeat(_Wire, tag="beat", frozen=True):
    """The server is there: sent to a connection that asked for heartbeats (`hb`) and was sent
    nothing else for its interval. `time_ms`: the server's clock (Unix time, milliseconds)."""

    time_ms: int


class Unsubscribed(_Wire, tag="unsubscribed", frozen=True):
    """The server ended this connection's subscription `topic` (the topic or pattern as its
    `sub` named it): nothing more comes of it, and it is not made again on a reconnection.
    Sent when an operator unsubscribes the connection's user (the admin API); `reason` says
    why, for people."""

    topic: str
    reason: str


class Batch(NamedTuple):
    """Consecutive messages of one topic: message i has sequence number seq + i."""

    topic_id: int
    seq: int
    data: list[bytes]


@final  # final: ServerReader tells it apart by its exact type
class Msg(NamedTuple):
    """`["msg", batch, batch, ...]`: deliveries, each batch `[topic_id, seq, payload, ...]`."""

    batches: list[Batch]


class Delivery(NamedTuple):
    """A batch with its topic resolved (what ServerReader returns for each batch)."""

    topic: str
    epoch: int
    seq: int
    data: list[bytes]


ServerMessage = Ack | Err | Topic | GapNotice | Request | Reply | Heartbeat | Unsubscribed | Msg
# What ServerReader returns: the server's messages but announcements, each msg batch resolved.
ReaderEvent = Ack | Err | GapNotice | Request | Reply | Heartbeat | Unsubscribed | Delivery
SERVER_TYPES = ("ack", "err", "topic", "gap", "request", "reply", "beat", "unsubscribed", "msg")

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode

client_decoder = msgspec.msgpack.Decoder(ClientMessage)
client_batch_decoder = msgspec.msgpack.Decoder(list[ClientMessage])
_named_decoder = msgspec.msgpack.Decoder(Ack | Err | Topic | GapNotice | Request | Reply | Heartbeat | Unsubscribed)
_any_decoder = msgspec.msgpack.Decoder()
_raw_list_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_id_decoder = msgspec.msgpack.Decoder(RequestId)
_str_decoder = msgspec.msgpack.Decoder(str)


DEFAULT_MAX_BATCH = 10_000
# Topics one pattern subscription's `since` may name.
MAX_SINCE_TOPICS = 10_000


def payload_too_large(size: int, limit: int) -> RequestError:
    """The refusal of a payload over max_payload_bytes (the compiled publish path leaves a
    frame with such a payload to the general path, which refuses it with this)."""
    return RequestError(ErrorCode.PAYLOAD_TOO_LARGE, f"payload is {size} bytes; the limit is {limit}")


def check_payload(data: bytes, limit: int) -> None:
    """The payload-size rule of every publish, request, reply and server-side publish: raise
    payload_too_large when `data` is longer than `limit` (max_payload_bytes). The general
    publish path writes the comparison inline, per message, and raises the same error."""
    if len(data) > limit:
        raise payload_too_large(len(data), limit)


MAX_ERRORS_PER_FRAME = 100

# The shape of a client frame, checked before it is decoded (protocol.md 2.2). A message has a
# handful of fields (a `sub`, the longest, has 7; later revisions may append a few), and the
# only nested values are a `sub`'s `since`: `[epoch, seq]`, or `[time, {topic: [epoch, seq]}]`
# whose map names at most MAX_SINCE_TOPICS topics. So:
MAX_MESSAGE_FIELDS = 16  # elements of a message, and of any array inside one
MAX_NESTING = 4  # containers one inside the other, the message included: message, since, map, position
MESSAGE_VALUES = 16  # MessagePack values a frame may hold per message it may hold,
SINCE_MAP_VALUES = 4 * MAX_SINCE_TOPICS  # and for a full pattern `since` map (a key, an array, two integers per topic)


def max_frame_values(max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """The MessagePack values a client frame may hold: 200,000 for max_batch_messages 10,000."""
    return MESSAGE_VALUES * max_batch + SINCE_MAP_VALUES


def batch_size(data: bytes | memoryview) -> int:
    """How many messages a client batch frame holds, or -1 when the frame is one message.

    Looks only at the header: the first element of a batch is an array (fixarray 0x90-0x9f or
    array16/32 0xdc/0xdd), the first element of a single message is its type string."""
    if len(data) < 2:
        return -1
    first = data[0]
    if 0x90 <= first <= 0x9F:
        count, offset = first & 0x0F, 1
    elif first == 0xDC and len(data) >= 3:
        count, offset = int.from_bytes(data[1:3], "big"), 3
    elif first == 0xDD and len(data) >= 5:
        count, offset = int.from_bytes(data[1:5], "big"), 5
    else:
        return -1
    if len(data) <= offset:
        return -1
    nxt = data[offset]
    return count if 0x90 <= nxt <= 0x9F or nxt in (0xDC, 0xDD) else -1


def is_message_array(data: bytes | memoryview) -> bool:
    """True when a client frame holds an array of messages rather than one message (not to be
    confused with fastpath.is_batch: a piece of a server frame that is a delivery batch)."""
    return batch_size(data) >= 0


# Invalid UTF-8 in a str field surfaces as UnicodeDecodeError, and too deeply nested arrays as
# RecursionError, not as msgspec.DecodeError.
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class BadMessage(BrokerError):
    """One undecodable client message: what the `err` reply should say."""

    def __init__(self, request_id: int, code: int, text: str, data: bytes = b"") -> None:
        super().__init__(text)
        self.request_id = request_id
        self.code = code
        self.text = text
        self.data = data  # the start of the message (or frame) it is about, for dead letters
        self.index = -1  # its place in a batch frame (-1: it is about the whole frame)


def decode_client_frame(data: bytes | memoryview, max_batch: int = DEFAULT_MAX_BATCH) -> tuple[list[ClientMessage], list[BadMessage]]:
    """Decode one client frame into the messages it holds and the errors for those it could not
    (`read_client_frame` without the count of values)."""
    messages, bad, _ = read_client_frame(data, max_batch)
    return messages, bad


def _refused(data, text: str) -> tuple[list[ClientMessage], list[BadMessage], int]:
    return [], [BadMessage(0, ErrorCode.BAD_MESSAGE, text, dead_letter_head(data))], 0


def read_client_frame(data: bytes | memoryview, max_batch: int = DEFAULT_MAX_BATCH) -> tuple[list[ClientMessage], list[BadMessage], int]:
    """Decode one client frame into the messages it holds, the errors for those it could not,
    and the number of MessagePack values it holds (the work its decoding took).

    Before anything is decoded the frame's shape is walked (`measure_frame`, compiled): a
    batch of more than `max_batch` messages, a message or an array in one of more than
    MAX_MESSAGE_FIELDS elements, a map of more than MAX_SINCE_TOPICS entries, containers
    nested deeper than MAX_NESTING (one more in a batch) or more than max_frame_values(max_batch)
    values in all make the whole frame refused with one error (id 0), undecoded. Within those
    bounds the common case (well-formed) costs one msgspec decode. Only when it fails is the
    frame taken apart element by element, so that each bad message gets its own error with its
    own id and the good ones in the same batch still apply; after MAX_ERRORS_PER_FRAME bad
    elements the rest of a frame is ignored: one frame cannot make the broker do unbounded work
    or queue unbounded replies."""
    count = batch_size(data)
    if count > max_batch:
        return _refused(data, f"a batch holds {count} messages; the limit is {max_batch}")
    limit = max_frame_values(max_batch)
    values = measure_frame(data, max_batch, MAX_MESSAGE_FIELDS, MAX_SINCE_TOPICS, MAX_NESTING, limit)
    if values < 0:
        return _refused(data, _SHAPE_ERRORS[values].format(limit=limit) + "; the frame was not decoded")
    messages, bad = _decode(data, count)
    return messages, bad, values


_SHAPE_ERRORS = {
    FRAME_LONG_BATCH: "a batch holds too many messages",
    FRAME_LONG_ARRAY: f"an array of more than {MAX_MESSAGE_FIELDS} elements (a message, or an array inside one)",
    FRAME_LONG_MAP: f"a map of more than {MAX_SINCE_TOPICS} entries",
    FRAME_TOO_DEEP: f"values nested more than {MAX_NESTING} deep in a message (a message, its since, a map, a position)",
    FRAME_TOO_MANY_VALUES: "more than {limit} MessagePack values in one frame",
}


def _decode(data, count: int) -> tuple[list[ClientMessage], list[BadMessage]]:
    """Decode a frame whose shape is within the bounds (`count`: its batch size, -1 for one message)."""
    try:
        if count >= 0:
            return client_batch_decoder.decode(data), []
        return [client_decoder.decode(data)], []
    except _DECODE_ERRORS as exc:
        first_error = exc
    if count < 0:
        return [], [_with_data(_explain(data, first_error), data)]
    try:
        parts = _raw_list_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        return [], [BadMessage(0, ErrorCode.BAD_MESSAGE, f"malformed batch: {exc}", dead_letter_head(data))]
    good: list[ClientMessage] = []
    bad: list[BadMessage] = []
    for index, part in enumerate(parts):
        try:
            good.append(client_decoder.decode(part))
        except _DECODE_ERRORS as exc:
            if len(bad) == MAX_ERRORS_PER_FRAME:
                bad.append(
                    BadMessage(
                        0, ErrorCode.BAD_MESSAGE, f"more than {MAX_ERRORS_PER_FRAME} bad messages in one frame; the rest of it was ignored"
                    )
                )
                break
            problem = _with_data(_explain(part, exc), part)
            problem.index = index
            bad.append(problem)
    return good, bad


def message_heads(data: bytes, bad: list[BadMessage]) -> list[bytes]:
    """The dead-letter head (`dead_letter_head`), cut from the bytes the client sent, of each
    message that `read_client_frame` decoded from `data` (`bad`: the errors it returned with
    them), in the order it returned them: a dead letter keeps what was received, not a
    re-encoding of it."""
    if batch_size(data) < 0:
        return [dead_letter_head(data)]
    skipped = {problem.index for problem in bad}
    parts = _raw_list_decoder.decode(data)
    return [dead_letter_head(part) for i, part in enumerate(parts) if i not in skipped]


def _with_data(bad: BadMessage, data) -> BadMessage:
    bad.data = dead_letter_head(data)
    return bad


def _explain(data, exc: Exception) -> BadMessage:
    """Turn a failed decode into an error reply, recovering the request id when there is one.

    The elements are split without decoding them (msgspec.Raw), so a bad field elsewhere (even
    invalid UTF-8) does not hide the type name or the id."""
    try:
        parts = _raw_list_decoder.decode(data)
    except msgspec.ValidationError:
        parts = []
    except _DECODE_ERRORS:
        return BadMessage(0, ErrorCode.BAD_MESSAGE, f"malformed MessagePack: {exc}")
    if not parts:
        return BadMessage(0, ErrorCode.BAD_MESSAGE, "a message is a non-empty array whose first element is its type")
    request_id = 0
    if len(parts) > 1:
        try:
            request_id = _id_decoder.decode(parts[1])
        except _DECODE_ERRORS:
            pass
    try:
        kind = _str_decoder.decode(parts[0])
    except _DECODE_ERRORS:
        kind = None
    if kind not in CLIENT_TYPES:
        shown = repr(kind) if kind is None or len(kind) <= 40 else repr(kind[:40]) + "..."
        return BadMessage(request_id, ErrorCode.UNKNOWN_TYPE, f"unknown message type {shown}; expected one of {', '.join(CLIENT_TYPES)}")
    return BadMessage(request_id, ErrorCode.BAD_MESSAGE, f"invalid {kind}: {exc}")


# Server frames


class ProtocolViolation(BrokerError, ValueError):
    """A server frame that does not follow the protocol."""


def decode_server_frame(data: bytes | memoryview) -> list[ServerMessage]:
    """The messages of one server frame (an array of messages), in order. Messages of a type
    this version does not know are skipped (a newer server may send them)."""
    try:
        parts = _raw_list_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise ProtocolViolation(f"a server frame is an array of messages: {exc}") from None
    if not parts:
        raise ProtocolViolation("a server frame holds at least one message")
    out: list[ServerMessage] = []
    for part in parts:
        raw = bytes(part)
        head = raw[0] if raw else 0
        offset = 1 if 0x90 <= head <= 0x9F else (3 if head == 0xDC else 5)
        if raw[offset : offset + 4] == b"\xa3msg":
            out.append(_decode_msg(raw))
            continue
        try:
            out.append(_named_decoder.decode(raw))
        except _DECODE_ERRORS as exc:
            name = _type_name(raw)
            if name is not None and name not in SERVER_TYPES:
                continue  # a message type from a newer protocol revision
            raise ProtocolViolation(f"unreadable server message: {exc}") from None
    return out


def _type_name(raw: bytes) -> str | None:
    """The type name of a message (its first element, a str), or None when it has none."""
    try:
        parts = _raw_list_decoder.decode(raw)
        return _str_decoder.decode(parts[0]) if parts else None
    except (*_DECODE_ERRORS, msgspec.ValidationError):
        return None


def _decode_msg(raw: bytes) -> Msg:
    try:
        value = _any_decoder.decode(raw)
    except _DECODE_ERRORS as exc:
        raise ProtocolViolation(f"unreadable msg: {exc}") from None
    batches = []
    for batch in value[1:]:
        if not (
            type(batch) is list
            and len(batch) >= 3
            and type(batch[0]) is int
            and type(batch[1]) is int
            and batch[0] >= 0
            and batch[1] >= 0
            and all(type(p) is bytes for p in batch[2:])
        ):
            raise ProtocolViolation(f"a msg batch is [topic_id, seq, payload, ...], got {batch!r:.80}")
        batches.append(Batch(batch[0], batch[1], batch[2:]))
    if not batches:
        raise ProtocolViolation("a msg holds at least one batch")
    return Msg(batches)


class ServerReader:
    """Reads one connection's server frames: keeps its topic table (id -> name, epoch) from
    `topic` messages and resolves every batch to a Delivery."""

    def __init__(self) -> None:
        self.topics: dict[int, tuple[str, int]] = {}

    def read(self, data: bytes | memoryview) -> list[ReaderEvent]:
        """Acks, errors, heartbeats, other notices and deliveries of one frame, in order;
        announcements update the table."""
        out: list[ReaderEvent] = []
        for message in decode_server_frame(data):
            if type(message) is Msg:
                for batch in message.batches:
                    known = self.topics.get(batch.topic_id)
                    if known is None:
                        raise ProtocolViolation(f"delivery for topic id {batch.topic_id}, which was never announced")
                    out.append(Delivery(known[0], known[1], batch.seq, batch.data))
            elif type(message) is Topic:
                self.topics[message.id] = (message.topic, message.epoch)
            else:
                out.append(message)
        return out
