"""Serving stock ``kademlia`` package nodes (v2.2.x) in their own wire format, rpcudp.

A stock node sends us ``0x00 + msg id + msgpack([name, args])`` and expects ``0x01 + msg id + msgpack(result)``
back.  rpcudp puts the sender's address in front of the arguments itself, so on the wire the arguments are:

=============  =====================  ==================================================================
method         arguments              result
=============  =====================  ==================================================================
``ping``       ``[nodeid]``           our node id (20 bytes)
``store``      ``[nodeid, key, v]``   ``True`` (``False`` when we refuse the value)
``find_node``  ``[nodeid, key]``      ``[[id, ip, port], ...]``: our contacts closest to ``key``
``find_value`` ``[nodeid, key]``      ``{"value": v}`` if we hold ``key``, else the ``find_node`` list
=============  =====================  ==================================================================

``nodeid`` and ``key`` are 20 bytes (``key`` is ``sha1`` of the user's key) and ``v`` is an int, float, bool,
str or bytes, the types ``kademlia.network.Server.set`` allows.

:class:`CompatService` is sans-I/O: :meth:`CompatService.handle` takes one datagram and returns the reply bytes (or
None), and :class:`~p2pchat.dht.rpc.RpcTransport` does the sending.  It is a server only -- we never ask stock
nodes anything -- and it can only read from the node (:class:`CompatBackend` has no way to add a contact), so a
stock node is served but never enters a p2pchat routing table, and it cannot push its unverified id into our
lookups.  Stock values live in a namespace of their own, stored as their msgpack encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, cast

import msgpack  # type: ignore[import-untyped]

from p2pchat.core.framing import (
    MAX_RPCUDP_BODY,
    DatagramKind,
    RpcudpResponse,
    RpcValue,
    decode_rpcudp,
    encode_rpcudp_response,
    unpack_strict,
)
from p2pchat.core.ids import NODE_ID_BYTES, NodeId
from p2pchat.errors import ProtocolError
from p2pchat.net.base import Address

__all__ = [
    "COMPAT_KEY_BYTES",
    "MAX_COMPAT_CONTACTS",
    "MAX_COMPAT_VALUE_BYTES",
    "CompatBackend",
    "CompatService",
    "CompatStats",
]

MAX_COMPAT_VALUE_BYTES: Final = 1000
"""Largest stock value we store, measured as its msgpack encoding; a larger ``store`` is answered ``False``.

Stock nodes put no limit on values; ours keeps one stock key from costing more than a small record, and keeps
every ``find_value`` reply far below :data:`~p2pchat.core.framing.MAX_RPCUDP_BODY`.
"""

MAX_COMPAT_CONTACTS: Final = 20
"""Most contacts in a ``find_node`` (or value-less ``find_value``) reply: the stock node's default ``ksize``."""

COMPAT_KEY_BYTES: Final = NODE_ID_BYTES
"""Size of a stock key (a SHA-1 digest) and of a stock node id."""

_VALUE_TYPES: Final = frozenset({int, float, bool, str, bytes})
"""The types ``kademlia.network.check_dht_value_type`` allows (compared exactly, as it does)."""

_ARRAY16_MIN: Final = 16
"""msgpack arrays of this many items or more take a 3-byte header instead of a 1-byte fixarray header."""


class CompatBackend(Protocol):
    """What the compat service needs from the DHT node: read-only routing, and the compat value namespace."""

    @property
    def node_id(self) -> NodeId:
        """Our node id, the answer to ``ping``."""
        ...

    def compat_closest(self, target: NodeId, count: int) -> list[tuple[NodeId, Address]]:
        """Up to *count* p2pchat nodes closest to *target*, closest first (never stock nodes)."""
        ...

    def compat_get(self, key: bytes, now: float) -> bytes | None:
        """The packed value stored under the 20-byte *key*, or None."""
        ...

    def compat_put(self, key: bytes, packed: bytes, source: Address, now: float) -> bool:
        """Store *packed* under *key* for *source*; False if refused (e.g. the source's quota is spent)."""
        ...

    def wall_time(self) -> float:
        """Seconds since the Unix epoch by the node's clock: the ``now`` of compat_get and compat_put."""
        ...


@dataclass(slots=True)
class CompatStats:
    """What the compat service did with each rpcudp datagram it was handed."""

    pings: int = 0
    """``ping`` requests answered."""
    stores: int = 0
    """``store`` requests whose value was stored."""
    find_nodes: int = 0
    """``find_node`` requests answered."""
    find_values: int = 0
    """``find_value`` requests answered (with the value or with contacts)."""
    values_found: int = 0
    """``find_value`` requests answered with the value."""
    refused: int = 0
    """``store`` requests answered ``False``: value over :data:`MAX_COMPAT_VALUE_BYTES`, or the backend refused."""
    malformed: int = 0
    """Requests that raised :class:`~p2pchat.errors.ProtocolError` and got no reply."""
    responses_ignored: int = 0
    """rpcudp responses: we never send stock nodes requests, so any response is unsolicited."""
    stored_unusable: int = 0
    """Stored values that would not unpack to a stock value type; answered as if absent."""


def _expect_args(name: str, args: Sequence[RpcValue], count: int) -> None:
    if len(args) != count:
        raise ProtocolError(f"rpcudp {name} expects {count} args, got {len(args)}")


def _id_bytes(what: str, value: RpcValue) -> bytes:
    if type(value) is not bytes or len(value) != COMPAT_KEY_BYTES:
        shown = f"{len(value)} bytes" if type(value) is bytes else type(value).__name__
        raise ProtocolError(f"rpcudp {what} must be {COMPAT_KEY_BYTES} bytes, got {shown}")
    return value


def _array_header_size(items: int) -> int:
    return 1 if items < _ARRAY16_MIN else 3


class CompatService:
    """Answers stock ``kademlia`` nodes' rpcudp requests from a :class:`CompatBackend`.

    Pass :meth:`handle` to :class:`~p2pchat.dht.rpc.RpcTransport` as its ``compat_handler``.
    """

    __slots__ = ("_methods", "backend", "stats")

    def __init__(self, backend: CompatBackend) -> None:
        self.backend = backend
        self.stats = CompatStats()
        self._methods: dict[str, Callable[[Sequence[RpcValue], Address], RpcValue]] = {
            "ping": self._ping,
            "store": self._store,
            "find_node": self._find_node,
            "find_value": self._find_value,
        }

    def handle(self, data: bytes, source: Address, kind: DatagramKind) -> bytes | None:
        """The reply to one rpcudp datagram from *source*, or None for a response (we asked nothing).

        Raises :class:`~p2pchat.errors.ProtocolError`, and nothing else, for anything malformed: undecodable
        bytes, an unknown method, a wrong argument count or type.  Such a request gets no reply, as a stock
        node gives none to what it cannot parse.
        """
        if kind is DatagramKind.RPCUDP_RESPONSE:
            # Not even decoded: nothing of ours waits for it, so its contents cannot matter.
            self.stats.responses_ignored += 1
            return None
        try:
            message = decode_rpcudp(data)
            if isinstance(message, RpcudpResponse):
                self.stats.responses_ignored += 1
                return None
            method = self._methods.get(message.name)
            if method is None:
                raise ProtocolError(f"unknown rpcudp method {message.name!r}")
            result = method(message.args, source)
        except ProtocolError:
            self.stats.malformed += 1
            raise
        return encode_rpcudp_response(message.msg_id, result)

    # --- the four RPCs -------------------------------------------------------------------------------------
    # The sender's node id is checked but otherwise unused: it is an unverified claim, and using it to list the
    # sender anywhere is exactly what this service must never do.

    def _ping(self, args: Sequence[RpcValue], source: Address) -> RpcValue:
        _expect_args("ping", args, 1)
        _id_bytes("node id", args[0])
        self.stats.pings += 1
        return self.backend.node_id.bytes

    def _store(self, args: Sequence[RpcValue], source: Address) -> RpcValue:
        _expect_args("store", args, 3)
        _id_bytes("node id", args[0])
        key = _id_bytes("key", args[1])
        value = args[2]
        if type(value) not in _VALUE_TYPES:
            raise ProtocolError(f"rpcudp store value of type {type(value).__name__} (not int/float/bool/str/bytes)")
        packed: bytes = msgpack.packb(value)
        if len(packed) > MAX_COMPAT_VALUE_BYTES or not self.backend.compat_put(
            key, packed, source, self.backend.wall_time()
        ):
            # A stock node treats False like any reply (its set() counts it as success), but it is honest.
            self.stats.refused += 1
            return False
        self.stats.stores += 1
        return True

    def _find_node(self, args: Sequence[RpcValue], source: Address) -> RpcValue:
        _expect_args("find_node", args, 2)
        _id_bytes("node id", args[0])
        key = _id_bytes("key", args[1])
        self.stats.find_nodes += 1
        return self._contacts(key)

    def _find_value(self, args: Sequence[RpcValue], source: Address) -> RpcValue:
        _expect_args("find_value", args, 2)
        _id_bytes("node id", args[0])
        key = _id_bytes("key", args[1])
        self.stats.find_values += 1
        value = self._stored_value(key)
        if value is None:
            return self._contacts(key)
        self.stats.values_found += 1
        return {"value": value}

    # --- helpers -------------------------------------------------------------------------------------------

    def _stored_value(self, key: bytes) -> RpcValue:
        packed = self.backend.compat_get(key, self.backend.wall_time())
        if packed is None:
            return None
        # The bytes may have reached the store from another node, so they are checked as strictly as a request.
        try:
            if len(packed) > MAX_COMPAT_VALUE_BYTES:
                raise ProtocolError(f"stored value of {len(packed)} bytes")
            value = unpack_strict(packed)
        except ProtocolError:
            self.stats.stored_unusable += 1
            return None
        if type(value) not in _VALUE_TYPES:
            self.stats.stored_unusable += 1
            return None
        return cast(RpcValue, value)  # one of the scalar types just checked

    def _contacts(self, key: bytes) -> list[RpcValue]:
        """Our closest contacts to *key*, as many as fit a reply body of :data:`MAX_RPCUDP_BODY` bytes.

        The nearest come first, so trimming drops the farthest.  Sizes are summed per contact (a msgpack array
        is its header followed by its items) rather than by re-encoding the whole list after each cut.
        """
        contacts: list[RpcValue] = []
        size = _array_header_size(0)
        for node_id, address in self.backend.compat_closest(NodeId(key), MAX_COMPAT_CONTACTS)[:MAX_COMPAT_CONTACTS]:
            contact: list[RpcValue] = [node_id.bytes, address.host, address.port]
            grown = size + len(msgpack.packb(contact))
            grown += _array_header_size(len(contacts) + 1) - _array_header_size(len(contacts))
            if grown > MAX_RPCUDP_BODY:
                break
            contacts.append(contact)
            size = grown
        return contacts
