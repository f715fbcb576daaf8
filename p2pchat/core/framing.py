"""Frames on the wire: p2pchat packets, ``rpcudp`` compat datagrams, and length-prefixed stream frames.

Three formats share the UDP port or the TCP stream:

* **p2pchat packets** -- ``P2P_MAGIC``, ``PROTOCOL_VERSION``, the packet kind (one byte each), then the packet's
  msgpack array (see :mod:`p2pchat.core.schema`).  A datagram holds one packet and is at most
  :data:`MAX_DATAGRAM_SIZE` bytes, as OpenDHT keeps its own.  The same bytes travel inside stream frames, where
  the larger :data:`MAX_STREAM_FRAME` bounds them (:func:`encode_packet`/:func:`decode_packet` take the limit).
* **rpcudp frames** -- the wire format of the ``kademlia`` package, which our DHT speaks so stock nodes can join:
  ``0x00`` (request) or ``0x01`` (response), a 20-byte message id, then msgpack: ``[name, args]`` for a request,
  any value for a response.  :func:`classify_datagram` tells the formats apart by their first byte.
* **stream frames** -- a 4-byte big-endian length, then that many bytes; :class:`FrameDecoder` splits a TCP byte
  stream back into frames without I/O (the h11 style: the caller feeds bytes, then asks for frames).

Every decoder here keeps one invariant, whatever the input: it returns a valid typed value or raises
:class:`~p2pchat.errors.ProtocolError` -- never another exception.  msgpack's own errors are caught at the one
place msgpack is called and converted.  Every encoder raises :class:`ValueError` for values we would refuse to
decode, so we never send what a peer running this code would drop.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn, TypeAlias, TypeVar, cast

import msgpack  # type: ignore[import-untyped]
import msgspec

from p2pchat.core.fastwire import fast_decoder
from p2pchat.core.schema import (
    MSGPACK_INT_MAX,
    MSGPACK_INT_MIN,
    PACKETS,
    Packet,
    PacketRegistry,
    WireStruct,
    from_wire,
    to_wire,
)
from p2pchat.errors import ProtocolError

__all__ = [
    "MAX_DATAGRAM_SIZE",
    "MAX_RPCUDP_BODY",
    "MAX_RPCUDP_DATAGRAM",
    "MAX_RPCUDP_DEPTH",
    "MAX_RPCUDP_NAME_BYTES",
    "MAX_STREAM_BUFFER",
    "MAX_STREAM_FRAME",
    "MIN_STREAM_FRAME",
    "P2P_HEADER_SIZE",
    "P2P_MAGIC",
    "PROTOCOL_VERSION",
    "RPCUDP_HEADER_SIZE",
    "RPCUDP_MSG_ID_BYTES",
    "RPCUDP_REQUEST",
    "RPCUDP_RESPONSE",
    "STREAM_HEADER_SIZE",
    "DatagramKind",
    "FrameDecoder",
    "RpcValue",
    "RpcudpRequest",
    "RpcudpResponse",
    "classify_datagram",
    "decode_datagram",
    "decode_packet",
    "decode_rpcudp",
    "decode_struct",
    "encode_datagram",
    "encode_frame",
    "encode_packet",
    "encode_rpcudp_request",
    "encode_rpcudp_response",
    "encode_struct",
    "unpack_strict",
]

# --- p2pchat packets ------------------------------------------------------------------------------------------

P2P_MAGIC: Final = 0x50
"""First byte of every p2pchat packet ("P"); distinct from rpcudp's 0x00/0x01 so one UDP port serves both."""

PROTOCOL_VERSION: Final = 1
"""Second byte of every p2pchat packet.  A packet of another version is refused, with the version named."""

P2P_HEADER_SIZE: Final = 3
"""Magic, version and kind bytes."""

MAX_DATAGRAM_SIZE: Final = 1280
"""Largest p2pchat datagram, header included: the IPv6 minimum MTU, so our packets are never fragmented."""


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    """msgpack ``ext_hook``: no format of ours uses extension types, so any one (timestamps too) is refused."""
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def unpack_strict(body: bytes) -> object:
    """Unpack exactly one msgpack value filling *body*, with every length bounded by the body's own size."""
    size = len(body)
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=size,
            max_str_len=size,
            max_array_len=size,
            max_map_len=size // 2,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:
        # msgpack documents no closed set of exceptions (ValueError and its subclasses ExtraData, FormatError,
        # StackError, UnicodeDecodeError; TypeError; OverflowError ...).  Whatever it raised, the cause is the
        # input, so it is a ProtocolError: this is the one boundary where that conversion happens.
        raise ProtocolError(f"malformed msgpack ({type(exc).__name__}: {exc})") from exc


_S = TypeVar("_S", bound=WireStruct)

# msgspec's encoder writes the same bytes as msgpack.packb for what to_wire returns (lists, bytes, str, ints,
# bools, floats, None; the smallest form of each) in a fraction of the time.
_pack = msgspec.msgpack.Encoder().encode


def encode_struct(obj: WireStruct) -> bytes:
    """The msgpack bytes of a schema object, validated as :func:`~p2pchat.core.schema.to_wire` validates it.

    :class:`ValueError` names the failing field.
    """
    # msgspec trims its output's length but not its allocation, which stays up to half as large again; a struct's
    # bytes are often kept (stored records and entries, persisted state), so they are copied to their exact size.
    # A packet needs no copy: its header is prepended, which makes a new exact-size object anyway.
    return bytes(memoryview(_pack(to_wire(obj))))


def decode_struct(cls: type[_S], data: bytes) -> _S:
    """Decode *data*, exactly one msgpack array, as a *cls*; :class:`ProtocolError` names what is wrong.

    The compiled decoder (:mod:`p2pchat.core.fastwire`) tries first.  Whatever it refuses, for whatever reason,
    goes through the reference path -- :func:`unpack_strict` then :func:`~p2pchat.core.schema.from_wire` --
    which accepts or refuses it by the schema's rules and words the error.
    """
    try:
        return cast(_S, fast_decoder(cls)(data))
    except Exception:  # noqa: S110 - the reference below decides, and raises the error worth reading
        pass
    return from_wire(cls, unpack_strict(data))


def encode_packet(packet: Packet, *, max_size: int) -> bytes:
    """Encode *packet* with its header; :class:`ValueError` if a field is invalid or the result exceeds *max_size*.

    Use :func:`encode_datagram` for UDP; a stream sender passes its own limit (e.g. :data:`MAX_STREAM_FRAME`).
    """
    body = _pack(to_wire(packet))
    size = P2P_HEADER_SIZE + len(body)
    if size > max_size:
        raise ValueError(f"{type(packet).__name__} encodes to {size} bytes, over the {max_size}-byte limit: split it")
    return bytes((P2P_MAGIC, PROTOCOL_VERSION, packet.KIND)) + body


def decode_packet(data: bytes, *, max_size: int, registry: PacketRegistry = PACKETS) -> Packet:
    """Decode one packet of at most *max_size* bytes; :class:`ProtocolError` for anything invalid."""
    size = len(data)
    if size > max_size:
        raise ProtocolError(f"packet of {size} bytes is over the {max_size}-byte limit")
    if size <= P2P_HEADER_SIZE:
        raise ProtocolError(f"packet of {size} bytes is too short for a header and a body")
    if data[0] != P2P_MAGIC:
        raise ProtocolError(f"bad magic byte 0x{data[0]:02x}, expected 0x{P2P_MAGIC:02x}")
    if data[1] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {data[1]} (this node speaks {PROTOCOL_VERSION})")
    cls = registry.lookup(data[2])
    if cls is None:
        raise ProtocolError(f"unknown packet kind {data[2]}")
    return decode_struct(cls, data[P2P_HEADER_SIZE:])


def encode_datagram(packet: Packet) -> bytes:
    """Encode *packet* as one datagram; :class:`ValueError` if it is invalid or over :data:`MAX_DATAGRAM_SIZE`."""
    return encode_packet(packet, max_size=MAX_DATAGRAM_SIZE)


def decode_datagram(data: bytes, *, registry: PacketRegistry = PACKETS) -> Packet:
    """Decode one p2pchat datagram; :class:`ProtocolError` for anything invalid, nothing else."""
    return decode_packet(data, max_size=MAX_DATAGRAM_SIZE, registry=registry)


# --- classification -------------------------------------------------------------------------------------------

RPCUDP_REQUEST: Final = 0x00
"""First byte of an rpcudp request."""

RPCUDP_RESPONSE: Final = 0x01
"""First byte of an rpcudp response."""


class DatagramKind(enum.Enum):
    """Which format a datagram on the DHT port is in."""

    P2PCHAT = "p2pchat"
    """A p2pchat packet: decode with :func:`decode_datagram`."""
    RPCUDP_REQUEST = "rpcudp-request"
    """An rpcudp request from a ``kademlia`` peer: decode with :func:`decode_rpcudp`."""
    RPCUDP_RESPONSE = "rpcudp-response"
    """An rpcudp response to a request we sent: decode with :func:`decode_rpcudp`."""


_KIND_BY_FIRST_BYTE: Final = {
    P2P_MAGIC: DatagramKind.P2PCHAT,
    RPCUDP_REQUEST: DatagramKind.RPCUDP_REQUEST,
    RPCUDP_RESPONSE: DatagramKind.RPCUDP_RESPONSE,
}


def classify_datagram(data: bytes) -> DatagramKind:
    """Tell a datagram's format from its first byte; :class:`ProtocolError` if it is empty or in none of them.

    Only the first byte is read: the matching decoder still checks everything else.
    """
    if not data:
        raise ProtocolError("empty datagram")
    kind = _KIND_BY_FIRST_BYTE.get(data[0])
    if kind is None:
        raise ProtocolError(f"unknown datagram format (first byte 0x{data[0]:02x})")
    return kind


# --- rpcudp compat frames -------------------------------------------------------------------------------------

RPCUDP_MSG_ID_BYTES: Final = 20
"""Size of an rpcudp message id (rpcudp uses a SHA-1 of random bytes)."""

RPCUDP_HEADER_SIZE: Final = 1 + RPCUDP_MSG_ID_BYTES
"""Request/response byte plus message id."""

MAX_RPCUDP_BODY: Final = 8192
"""Largest msgpack body of an rpcudp frame: rpcudp refuses to send a request body above 8 KiB."""

MAX_RPCUDP_DATAGRAM: Final = RPCUDP_HEADER_SIZE + MAX_RPCUDP_BODY
"""Largest rpcudp datagram we accept or send (8213 bytes).

rpcudp's 8 KiB limit applies to the body alone, so a stock peer's datagram can be 21 bytes longer; a receive
buffer must hold this many bytes (plus one, to notice a longer datagram).
"""

MAX_RPCUDP_NAME_BYTES: Final = 32
"""Longest rpcudp method name (the ``kademlia`` package's longest is ``find_value``)."""

MAX_RPCUDP_DEPTH: Final = 4
"""Deepest nesting of arrays and maps in an rpcudp body, counting the body itself.

The ``kademlia`` package needs 2 (``[name, [args]]`` and ``[[id, ip, port], ...]``); 4 leaves room and keeps the
recursive check of a decoded value short.  The total number of values needs no limit of its own: each takes at
least one byte of a bounded datagram.
"""

RpcValue: TypeAlias = (
    bool
    | int
    | float
    | str
    | bytes
    | Sequence["RpcValue"]
    | Mapping[str, "RpcValue"]
    | Mapping[bytes, "RpcValue"]
    | None
)
"""A plain msgpack value as rpcudp carries it.  Decoded values use ``list`` and ``dict``; tuples encode as arrays."""

_RPC_SCALARS: Final = frozenset({type(None), bool, float, str, bytes})


def _rpc_value_problem(value: object, level: int) -> str | None:
    """What makes *value* (found inside *level* containers) unfit for an rpcudp body, or None if nothing does."""
    if type(value) in _RPC_SCALARS:
        return None
    if type(value) is int:
        # Decoded ints always fit; this stops us encoding one that msgpack cannot carry.
        return None if MSGPACK_INT_MIN <= value <= MSGPACK_INT_MAX else f"int {value} does not fit msgpack"
    if type(value) is list or type(value) is tuple or type(value) is dict:
        if level >= MAX_RPCUDP_DEPTH:
            return f"nested deeper than {MAX_RPCUDP_DEPTH} levels"
        if type(value) is dict:
            items: Iterable[object] = value.values()
            for key in value:
                if type(key) is not str and type(key) is not bytes:
                    return f"map key of type {type(key).__name__}"
        else:
            items = value
        for item in items:
            problem = _rpc_value_problem(item, level + 1)
            if problem is not None:
                return problem
        return None
    return f"unsupported type {type(value).__name__}"


def _rpc_name_problem(name: object) -> str | None:
    if type(name) is not str:
        return f"method name of type {type(name).__name__}"
    # rpcudp looks the name up as a method "rpc_<name>": anything but a short ASCII identifier is an attack
    # or garbage (and the length test comes first, so the character tests never scan a long string).
    if not 0 < len(name) <= MAX_RPCUDP_NAME_BYTES or not name.isascii() or not name.isidentifier():
        return f"bad method name {name[:MAX_RPCUDP_NAME_BYTES]!r}"
    return None


@dataclass(frozen=True, slots=True)
class RpcudpRequest:
    """A decoded rpcudp request: call ``rpc_<name>(sender, *args)``, reply with the same ``msg_id``."""

    msg_id: bytes
    name: str
    args: tuple[RpcValue, ...]


@dataclass(frozen=True, slots=True)
class RpcudpResponse:
    """A decoded rpcudp response to the request with ``msg_id``."""

    msg_id: bytes
    value: RpcValue


def _encode_rpcudp(tag: int, msg_id: bytes, body: object) -> bytes:
    if type(msg_id) is not bytes or len(msg_id) != RPCUDP_MSG_ID_BYTES:
        raise ValueError(f"an rpcudp message id is {RPCUDP_MSG_ID_BYTES} bytes")
    problem = _rpc_value_problem(body, 0)
    if problem is not None:
        raise ValueError(f"rpcudp body: {problem}")
    try:
        packed: bytes = msgpack.packb(body)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a str holding a lone surrogate
        raise ValueError(f"rpcudp body cannot be packed: {exc}") from exc
    if len(packed) > MAX_RPCUDP_BODY:
        raise ValueError(f"rpcudp body of {len(packed)} bytes is over the {MAX_RPCUDP_BODY}-byte limit")
    return bytes((tag,)) + msg_id + packed


def encode_rpcudp_request(msg_id: bytes, name: str, args: Sequence[RpcValue]) -> bytes:
    """Encode an rpcudp request exactly as rpcudp does (``0x00 + msg_id + msgpack([name, args])``).

    :class:`ValueError` for a bad message id or name, an unsupported or too deeply nested argument, or a body
    over :data:`MAX_RPCUDP_BODY`.
    """
    problem = _rpc_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return _encode_rpcudp(RPCUDP_REQUEST, msg_id, [name, list(args)])


def encode_rpcudp_response(msg_id: bytes, value: RpcValue) -> bytes:
    """Encode an rpcudp response (``0x01 + msg_id + msgpack(value)``); :class:`ValueError` as for requests."""
    return _encode_rpcudp(RPCUDP_RESPONSE, msg_id, value)


def decode_rpcudp(data: bytes) -> RpcudpRequest | RpcudpResponse:
    """Decode an rpcudp datagram; :class:`ProtocolError` for anything invalid, nothing else."""
    size = len(data)
    if size > MAX_RPCUDP_DATAGRAM:
        raise ProtocolError(f"rpcudp datagram of {size} bytes is over the {MAX_RPCUDP_DATAGRAM}-byte limit")
    if size <= RPCUDP_HEADER_SIZE:
        raise ProtocolError(f"rpcudp datagram of {size} bytes is too short")
    tag = data[0]
    if tag not in (RPCUDP_REQUEST, RPCUDP_RESPONSE):
        raise ProtocolError(f"not an rpcudp datagram (first byte 0x{tag:02x})")
    msg_id = bytes(data[1:RPCUDP_HEADER_SIZE])
    body = unpack_strict(data[RPCUDP_HEADER_SIZE:])
    problem = _rpc_value_problem(body, 0)
    if problem is not None:
        raise ProtocolError(f"rpcudp body: {problem}")
    if tag == RPCUDP_RESPONSE:
        return RpcudpResponse(msg_id, cast(RpcValue, body))  # its shape was just checked
    if type(body) is not list or len(body) != 2:
        raise ProtocolError("rpcudp request body is not a [name, args] pair")
    name, args = body
    problem = _rpc_name_problem(name)
    if problem is not None:
        raise ProtocolError(problem)
    if type(args) is not list:
        raise ProtocolError(f"rpcudp request args are a {type(args).__name__}, not an array")
    return RpcudpRequest(msg_id, name, tuple(args))


# --- stream frames --------------------------------------------------------------------------------------------

STREAM_HEADER_SIZE: Final = 4
"""Size of a stream frame's big-endian length prefix."""

MAX_STREAM_FRAME: Final = 131072
"""Largest stream frame payload: a 64 KiB message plus its envelope and encryption overhead fits."""

MIN_STREAM_FRAME: Final = 1
"""Smallest stream frame payload.  Empty frames are refused: every payload we send (a packet or a ciphertext) is
non-empty, so an empty frame is garbage, and refusing it means no frame is ever free for a peer to send."""

MAX_STREAM_BUFFER: Final = STREAM_HEADER_SIZE + MAX_STREAM_FRAME
"""Most bytes a :class:`FrameDecoder` copies and holds: one incomplete frame of the largest size."""

_LENGTH: Final = struct.Struct(">I")


def encode_frame(payload: bytes) -> bytes:
    """Prefix *payload* with its length; :class:`ValueError` if it is empty or over :data:`MAX_STREAM_FRAME`."""
    size = len(payload)
    if not MIN_STREAM_FRAME <= size <= MAX_STREAM_FRAME:
        raise ValueError(f"a stream frame holds {MIN_STREAM_FRAME}..{MAX_STREAM_FRAME} bytes, got {size}")
    return _LENGTH.pack(size) + payload


class FrameDecoder:
    """Splits a byte stream into frames: sans-I/O, bounded, fast for many small frames and for one slow big one.

    Use::

        decoder.feed(await stream.receive_some())
        for frame in decoder.frames():
            handle(frame)
        ...
        decoder.feed_eof()  # when the peer closes: refuses a stream that ended inside a frame

    The decoder copies only an incomplete frame into its own buffer (:attr:`buffered_size`, never above
    :data:`MAX_STREAM_BUFFER`); frames that arrive whole are sliced straight out of the fed chunk, which is
    referenced, not copied.  So a caller must drain :meth:`next_frame` (until it returns None) before feeding
    again -- :meth:`feed` raises :class:`RuntimeError` otherwise -- and the decoder's memory is one maximal
    frame plus the caller's own chunk, whatever the peer sends.

    A length prefix outside ``MIN_STREAM_FRAME..MAX_STREAM_FRAME`` raises :class:`ProtocolError` as soon as its
    four bytes are in, before any of its payload.  After a ProtocolError the decoder is broken for good: every
    later call raises it again, since the stream has lost its framing.
    """

    __slots__ = ("_error", "_input", "_offset", "_partial")

    def __init__(self) -> None:
        self._partial = bytearray()
        self._input = b""
        self._offset = 0
        self._error: str | None = None

    @property
    def buffered_size(self) -> int:
        """Bytes of an incomplete frame held in the decoder's own buffer (at most :data:`MAX_STREAM_BUFFER`)."""
        return len(self._partial)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Hand the decoder the next bytes of the stream (any chunk size, empty included)."""
        self._raise_if_broken()
        if self._offset < len(self._input):
            raise RuntimeError("drain next_frame() until it returns None before feeding more data")
        # Hold an immutable copy only if given a mutable buffer: the caller may reuse it after we return.
        self._input = data if type(data) is bytes else bytes(data)
        self._offset = 0

    def next_frame(self) -> bytes | None:
        """The next complete frame's payload, or None if more data is needed; :class:`ProtocolError` if invalid."""
        self._raise_if_broken()
        data = self._input
        offset = self._offset
        end = len(data)
        partial = self._partial
        if not partial:
            # Fast path: nothing carried over, so a frame lying whole in the chunk is one slice, no buffering.
            if end - offset >= STREAM_HEADER_SIZE:
                stop = offset + STREAM_HEADER_SIZE + self._frame_length(_LENGTH.unpack_from(data, offset)[0])
                if stop <= end:
                    self._consumed(stop)
                    return data[offset + STREAM_HEADER_SIZE : stop]
            # An incomplete frame: its length (if its header is in) was checked above, so this copy is bounded.
            partial += memoryview(data)[offset:]
            self._consumed(end)
            return None
        # Slow path: complete the frame carried over in the buffer.
        if len(partial) < STREAM_HEADER_SIZE:
            take = min(STREAM_HEADER_SIZE - len(partial), end - offset)
            partial += data[offset : offset + take]
            offset += take
            if len(partial) < STREAM_HEADER_SIZE:
                self._consumed(offset)
                return None
        missing = STREAM_HEADER_SIZE + self._frame_length(_LENGTH.unpack_from(partial)[0]) - len(partial)
        take = min(missing, end - offset)
        partial += memoryview(data)[offset : offset + take]
        self._consumed(offset + take)
        if take < missing:
            return None
        # Deleting from the front of a bytearray is O(1) in CPython, so this copies the payload once.
        del partial[:STREAM_HEADER_SIZE]
        frame = bytes(partial)
        partial.clear()
        return frame

    def frames(self) -> Iterator[bytes]:
        """Yield every frame complete so far (drains :meth:`next_frame`)."""
        while (frame := self.next_frame()) is not None:
            yield frame

    def feed_eof(self) -> None:
        """The stream ended: :class:`ProtocolError` if it ended inside a frame.

        Call it after draining; :class:`RuntimeError` if fed bytes are still unread.
        """
        self._raise_if_broken()
        if self._offset < len(self._input):
            raise RuntimeError("drain next_frame() until it returns None before feed_eof()")
        if self._partial:
            self._fail(f"stream ended inside a frame ({len(self._partial)} bytes buffered)")

    def _frame_length(self, length: int) -> int:
        if not MIN_STREAM_FRAME <= length <= MAX_STREAM_FRAME:
            self._fail(f"stream frame length {length} outside {MIN_STREAM_FRAME}..{MAX_STREAM_FRAME}")
        return length

    def _consumed(self, offset: int) -> None:
        if offset >= len(self._input):
            # Drop our reference to a spent chunk so the caller's buffer can be freed.
            self._input = b""
            offset = 0
        self._offset = offset

    def _fail(self, message: str) -> NoReturn:
        self._error = message
        self._partial = bytearray()
        self._input = b""
        self._offset = 0
        raise ProtocolError(message)

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise ProtocolError(f"stream framing already broken: {self._error}")
