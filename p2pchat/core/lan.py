"""The LAN announcement: what a node puts in the TXT record of its mDNS service, and the strict parser for it.

A node on a local network registers one DNS-SD service of type :data:`SERVICE_TYPE` whose instance label is its
node id in hex.  The TXT record carries the protocol version, the node id, the identity key and the UDP (DHT) and
TCP (direct channel) ports.  Everything in it is a claim by whoever is on the LAN: :func:`decode_txt` checks that
it is well formed and self-consistent (the key hashes to the node id), and the discovery service then makes the
node prove the id over the DHT protocol before it is used.  Pure: no I/O, no zeroconf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from p2pchat.core.identity import PUBLIC_KEY_BYTES, PublicIdentity
from p2pchat.core.ids import NODE_ID_BYTES, NodeId
from p2pchat.errors import ProtocolError

__all__ = [
    "LAN_PROTOCOL_VERSION",
    "MAX_TXT_BYTES",
    "MAX_TXT_KEYS",
    "MAX_TXT_KEY_BYTES",
    "MAX_TXT_VALUE_BYTES",
    "SERVICE_TYPE",
    "TXT_ID",
    "TXT_KEY",
    "TXT_TCP",
    "TXT_UDP",
    "TXT_VERSION",
    "LanAnnouncement",
    "decode_txt",
    "encode_txt",
    "instance_label",
    "service_name",
]

SERVICE_TYPE: Final = "_p2pchat._udp.local."
"""The DNS-SD service type every p2pchat node registers and browses."""

LAN_PROTOCOL_VERSION: Final = 1
"""The TXT format version this code writes and the only one it reads."""

TXT_VERSION: Final = b"v"
TXT_ID: Final = b"id"
TXT_KEY: Final = b"key"
TXT_UDP: Final = b"udp"
TXT_TCP: Final = b"tcp"

MAX_TXT_BYTES: Final = 400
"""Largest TXT record accepted, counted as on the wire (a length byte per ``key=value`` string).  Ours is ~140
bytes; the rest is room for fields a later version may add, while a stuffed record is refused before any work."""

MAX_TXT_KEYS: Final = 16
"""Most ``key=value`` strings in a TXT record (we write five; unknown keys are ignored, up to this many)."""

MAX_TXT_KEY_BYTES: Final = 9
"""Longest TXT key (RFC 6763 recommends at most nine characters)."""

MAX_TXT_VALUE_BYTES: Final = 2 * PUBLIC_KEY_BYTES
"""Longest TXT value: the identity key in hex is the longest field."""

_PORT_DIGITS: Final = 5
_HEX_DIGITS: Final = frozenset(b"0123456789abcdef")
_DECIMAL_DIGITS: Final = frozenset(b"0123456789")


@dataclass(frozen=True, slots=True)
class LanAnnouncement:
    """A well-formed announcement: a node id consistent with its identity key, and its ports.

    ``tcp_port`` 0 means the node accepts no direct channels (a bare DHT node).  None of this is proved yet:
    the node must still answer a ping from the announced address with a certificate for ``node_id``.
    """

    node_id: NodeId
    identity: PublicIdentity
    udp_port: int
    tcp_port: int


def instance_label(node_id: NodeId) -> str:
    """The service instance label of the node with *node_id*: its id in lowercase hex."""
    return node_id.hex()


def service_name(node_id: NodeId, service_type: str = SERVICE_TYPE) -> str:
    """The full DNS-SD service name a node registers, ``<node id hex>._p2pchat._udp.local.``.

    *service_type* is :data:`SERVICE_TYPE` except where a test keeps its nodes apart from other tests running on
    the same host (a LAN of its own, as a network namespace would be)."""
    return f"{instance_label(node_id)}.{service_type}"


def encode_txt(identity: PublicIdentity, *, udp_port: int, tcp_port: int) -> dict[bytes, bytes]:
    """The TXT properties announcing *identity*'s node on *udp_port* (DHT) and *tcp_port* (0: no direct channels)."""
    if not 0 < udp_port < 65536:
        raise ValueError(f"udp_port must be 1..65535, got {udp_port}")
    if not 0 <= tcp_port < 65536:
        raise ValueError(f"tcp_port must be 0..65535, got {tcp_port}")
    return {
        TXT_VERSION: str(LAN_PROTOCOL_VERSION).encode(),
        TXT_ID: identity.node_id.hex().encode(),
        TXT_KEY: identity.key.hex().encode(),
        TXT_UDP: str(udp_port).encode(),
        TXT_TCP: str(tcp_port).encode(),
    }


def decode_txt(properties: object, *, name: str | None = None, service_type: str = SERVICE_TYPE) -> LanAnnouncement:
    """Parse TXT *properties* (as zeroconf gives them: ``dict[bytes, bytes | None]``) into an announcement.

    Strict: a non-mapping, non-bytes keys or values, a missing, empty, oversized or non-canonical field, an
    unknown version, too many keys, or a key that does not hash to the announced node id raise
    :class:`~p2pchat.errors.ProtocolError`.  With *name* (the DNS-SD service name it was found under), the
    instance label must be the announced node id (under *service_type*), so one node cannot appear under many
    names.
    """
    if not isinstance(properties, Mapping):
        raise ProtocolError(f"TXT properties must be a mapping, got {type(properties).__name__}")
    if len(properties) > MAX_TXT_KEYS:
        raise ProtocolError(f"TXT record has {len(properties)} keys, the limit is {MAX_TXT_KEYS}")
    size = 0
    for key, value in properties.items():
        if not isinstance(key, bytes) or not (value is None or isinstance(value, bytes)):
            raise ProtocolError("TXT keys and values must be bytes")
        if not key or len(key) > MAX_TXT_KEY_BYTES:
            raise ProtocolError(f"TXT key of {len(key)} bytes (1..{MAX_TXT_KEY_BYTES} allowed)")
        if value is not None and len(value) > MAX_TXT_VALUE_BYTES:
            raise ProtocolError(f"TXT value of {len(value)} bytes, the limit is {MAX_TXT_VALUE_BYTES}")
        size += 1 + len(key) + (0 if value is None else 1 + len(value))
    if size > MAX_TXT_BYTES:
        raise ProtocolError(f"TXT record of {size} bytes, the limit is {MAX_TXT_BYTES}")

    version = _decimal(_field(properties, TXT_VERSION), TXT_VERSION, max_digits=_PORT_DIGITS)
    if version != LAN_PROTOCOL_VERSION:
        raise ProtocolError(f"unknown LAN protocol version {version}")
    node_id = NodeId(_hex(_field(properties, TXT_ID), TXT_ID, NODE_ID_BYTES))
    identity = PublicIdentity(_hex(_field(properties, TXT_KEY), TXT_KEY, PUBLIC_KEY_BYTES))
    if identity.node_id != node_id:
        raise ProtocolError("TXT identity key does not hash to the announced node id")
    udp_port = _decimal(_field(properties, TXT_UDP), TXT_UDP, max_digits=_PORT_DIGITS)
    tcp_port = _decimal(_field(properties, TXT_TCP), TXT_TCP, max_digits=_PORT_DIGITS)
    if not 0 < udp_port < 65536:
        raise ProtocolError(f"TXT udp port {udp_port} out of range")
    if not 0 <= tcp_port < 65536:
        raise ProtocolError(f"TXT tcp port {tcp_port} out of range")
    if name is not None and name != service_name(node_id, service_type):
        raise ProtocolError("service instance name does not match the announced node id")
    return LanAnnouncement(node_id, identity, udp_port, tcp_port)


def _field(properties: Mapping[bytes, bytes | None], key: bytes) -> bytes:
    value = properties.get(key)
    if not value:  # missing, valueless (``key`` without ``=``) or empty
        raise ProtocolError(f"TXT field {key.decode()!r} is missing or empty")
    return value


def _hex(value: bytes, key: bytes, size: int) -> bytes:
    # bytes.fromhex would also take upper case and spaces; one canonical spelling means one record per node.
    if len(value) != 2 * size or not _HEX_DIGITS.issuperset(value):
        raise ProtocolError(f"TXT field {key.decode()!r} must be {2 * size} lowercase hex digits")
    return bytes.fromhex(value.decode("ascii"))


def _decimal(value: bytes, key: bytes, *, max_digits: int) -> int:
    canonical = value == b"0" or not value.startswith(b"0")
    if len(value) > max_digits or not _DECIMAL_DIGITS.issuperset(value) or not canonical:
        raise ProtocolError(f"TXT field {key.decode()!r} must be a decimal number of at most {max_digits} digits")
    return int(value)
