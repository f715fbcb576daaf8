"""The control protocol, without I/O: frames, limits, and the checked shape of every request.

A frame is a 4-byte big-endian length and then that many bytes of msgpack holding one map.  The client sends
requests ``{"id": int, "op": str, ...}``; the daemon answers each with ``{"id": same, "ok": True, ...}`` or
``{"id": same, "ok": False, "error": one line}``, and on a subscribed connection also pushes events
``{"event": "message" | "delivery", "message": view}``.  The full specification is docs/control.md.

Both directions are bounded: a request over :data:`MAX_REQUEST_BYTES` is refused as soon as its length prefix
arrives (before its body is read), and a client refuses replies over :data:`MAX_REPLY_BYTES`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import msgpack  # type: ignore[import-untyped]

from p2pchat.core.framing import unpack_strict
from p2pchat.core.messages import MAX_TEXT_BYTES, MESSAGE_ID_BYTES
from p2pchat.errors import ProtocolError

__all__ = [
    "CONTROL_VERSION",
    "HEADER_BYTES",
    "MAX_PEER_CHARS",
    "MAX_REPLY_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_ID",
    "OPS",
    "FrameReader",
    "Request",
    "encode_frame",
    "error_reply",
    "parse_request",
]

CONTROL_VERSION: Final = 1
"""Version of this protocol, reported by the ``status`` op."""

HEADER_BYTES: Final = 4
"""The length prefix of a frame."""

MAX_REQUEST_BYTES: Final = MAX_TEXT_BYTES + 4096
"""Largest request body: a ``send`` of a maximal message text plus room for its other fields."""

MAX_REPLY_BYTES: Final = 4 * 1024 * 1024
"""Largest reply or event body a client accepts: a history of 50 maximal messages fits."""

MAX_REQUEST_ID: Final = 2**53
"""Request ids are integers in ``0..MAX_REQUEST_ID`` (exact in JSON and JavaScript, for a web UI)."""

MAX_PEER_CHARS: Final = 128
"""Longest ``to``/``peer`` field: a contact name (64) or an address (63)."""

OPS: Final = ("status", "send", "message", "history", "subscribe")
"""The operations a daemon serves."""

_LENGTH: Final = struct.Struct(">I")

JsonDict = dict[str, Any]


def encode_frame(value: JsonDict, max_bytes: int) -> bytes:
    """One frame holding *value*; ValueError if its body would exceed *max_bytes*."""
    body: bytes = msgpack.packb(value, use_bin_type=True)
    if len(body) > max_bytes:
        raise ValueError(f"a control frame of {len(body)} bytes is over the {max_bytes}-byte limit")
    return _LENGTH.pack(len(body)) + body


def error_reply(request_id: int | None, message: str) -> JsonDict:
    """The reply that refuses a request, with one line saying why."""
    return {"id": request_id, "ok": False, "error": message}


class FrameReader:
    """Splits a byte stream into decoded maps; at most one frame of *max_bytes* is ever buffered.

    Feed bytes with :meth:`feed`, then call :meth:`next` until it returns None.  A length over *max_bytes*, a
    body that is not one msgpack map, or a stream ending inside a frame raise :class:`ProtocolError`; after
    that the reader is broken for good (the stream has lost its framing).
    """

    __slots__ = ("_broken", "_buffer", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held now (at most a header plus one maximal body, plus the last chunk fed)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append the next bytes of the stream."""
        self._check()
        self._buffer += data

    def feed_eof(self) -> None:
        """The stream ended; ProtocolError if it ended inside a frame."""
        self._check()
        if self._buffer:
            self._fail(f"the stream ended inside a frame ({len(self._buffer)} bytes pending)")

    def next(self) -> JsonDict | None:
        """The next complete frame's map, or None if more bytes are needed."""
        self._check()
        if len(self._buffer) < HEADER_BYTES:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length == 0 or length > self.max_bytes:
            self._fail(f"a frame of {length} bytes; frames hold 1..{self.max_bytes} bytes")
        if len(self._buffer) < HEADER_BYTES + length:
            return None
        body = bytes(self._buffer[HEADER_BYTES : HEADER_BYTES + length])
        del self._buffer[: HEADER_BYTES + length]
        try:
            value = unpack_strict(body)
        except ProtocolError as exc:
            self._fail(str(exc))
        if not isinstance(value, dict):
            self._fail(f"a frame holds a {type(value).__name__}, not a map")
        return value

    def _check(self) -> None:
        if self._broken is not None:
            raise ProtocolError(self._broken)

    def _fail(self, reason: str) -> NoReturn:
        self._broken = reason
        self._buffer.clear()
        raise ProtocolError(reason)


@dataclass(frozen=True, slots=True)
class Request:
    """A checked request: its id, its op, and its arguments (exactly those the op takes, typed)."""

    id: int
    op: str
    args: JsonDict


def _peer(value: object, field: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_CHARS:
        raise ProtocolError(f"{field!r} must be a contact name or an address (1..{MAX_PEER_CHARS} characters)")
    return value


def parse_request(value: JsonDict) -> Request:
    """Check a decoded request; ProtocolError (one line, sent back to the client) if it is not a valid one."""
    request_id = value.get("id")
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ProtocolError(f"'id' must be an integer in 0..{MAX_REQUEST_ID}")
    op = value.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}; the ops are {', '.join(OPS)}")
    args: JsonDict = {}
    if op == "send":
        args["to"] = _peer(value.get("to"), "to")
        text = value.get("text")
        if not isinstance(text, str) or not text:
            raise ProtocolError("'text' must be a non-empty string")
        args["text"] = text
    elif op == "message":
        message_id = value.get("message_id")
        try:
            if not isinstance(message_id, str) or len(message_id) != 2 * MESSAGE_ID_BYTES:
                raise ValueError("wrong size")
            args["message_id"] = bytes.fromhex(message_id)
        except ValueError:
            raise ProtocolError(f"'message_id' must be {2 * MESSAGE_ID_BYTES} hexadecimal digits") from None
    elif op == "history":
        args["peer"] = _peer(value.get("peer"), "peer", optional=True)
        limit = value.get("limit", None)
        if limit is not None and (type(limit) is not int or limit < 0):
            raise ProtocolError("'limit' must be a non-negative integer")
        args["limit"] = limit
    extra = set(value) - {"id", "op"} - set(args)
    if op == "history":
        extra -= {"limit"}
    if extra:
        raise ProtocolError(f"op {op!r} takes no {', '.join(sorted(map(repr, extra)))}")
    return Request(request_id, str(op), args)
