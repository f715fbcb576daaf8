"""The p2pchat packet kinds: the base DHT messages.

Every packet is a frozen dataclass registered in :data:`p2pchat.core.schema.PACKETS` under a one-byte kind; the
datagram header (see :mod:`p2pchat.core.framing`) carries that kind and the body is a msgpack array of the
fields in the order written here.

====  ==============  =========================================================================
kind  packet          meaning
====  ==============  =========================================================================
1     :class:`Ping`        are you there?  (request)
2     :class:`Pong`        yes; and this is the address your ping came from  (reply to Ping)
3     :class:`FindNode`    which nodes do you know closest to ``target``?  (request)
4     :class:`Nodes`       these ones  (reply to FindNode)

Requests carry the sender's :class:`~p2pchat.core.nodecert.NodeCert` (``None`` for a node in client mode,
which asks but is never added to routing tables); replies always carry the responder's, so every node that
enters a routing table has proved that it owns its id, from the address it is listed under.
5     :class:`ErrorReply`  your request ``txid`` failed: ``code`` and a short ``message``
====  ==============  =========================================================================

Every request carries an 8-byte ``txid`` that its reply echoes, so a reply can be matched to the request (and an
unsolicited or spoofed reply dropped).  To add a packet: pick the next free kind, write the class here (or in the
module that owns it) with ``@packet(kind=N)`` above ``@dataclass(frozen=True, slots=True)``, add it to the table,
and check it still fits a datagram (``tests/test_codec.py`` checks every registered kind).  A kind, once used on
the network, is never reassigned: new fields mean a new kind or a new protocol version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final

from p2pchat.core.ids import NODE_ID_BYTES
from p2pchat.core.nodecert import NodeCert
from p2pchat.core.schema import (
    Bytes,
    Int,
    IpAddress,
    List,
    Optional,
    Packet,
    Str,
    Struct,
    WireStruct,
    packet,
    wire_struct,
)

__all__ = [
    "MAX_ERROR_CODE",
    "MAX_ERROR_MESSAGE_BYTES",
    "MAX_NODES_PER_REPLY",
    "MAX_PORT",
    "MIN_PORT",
    "TXID_BYTES",
    "ErrorReply",
    "FindNode",
    "NodeInfo",
    "Nodes",
    "Ping",
    "Pong",
]

TXID_BYTES: Final = 8
"""Size of a transaction id: enough that guessing a pending one is hopeless, small enough to repeat everywhere."""

MIN_PORT: Final = 1
"""Smallest port a contact can have (0 means "any" and cannot be reached)."""

MAX_PORT: Final = 65535
"""Largest UDP/TCP port."""

MAX_NODES_PER_REPLY: Final = 20
"""Most contacts in one :class:`Nodes` reply: Kademlia's k, the bucket size."""

MAX_ERROR_CODE: Final = 0xFFFF
"""Largest :attr:`ErrorReply.code` (codes are small non-negative integers; the DHT defines their meaning)."""

MAX_ERROR_MESSAGE_BYTES: Final = 200
"""Longest :attr:`ErrorReply.message`, in UTF-8 bytes: a hint for logs, not a place for data."""

_Txid = Annotated[bytes, Bytes(min_len=TXID_BYTES, max_len=TXID_BYTES)]
_NodeIdBytes = Annotated[bytes, Bytes(min_len=NODE_ID_BYTES, max_len=NODE_ID_BYTES)]
_Host = Annotated[str, IpAddress()]
_Port = Annotated[int, Int(min_value=MIN_PORT, max_value=MAX_PORT)]
_Sender = Annotated[NodeCert | None, Optional(Struct(NodeCert))]
_Responder = Annotated[NodeCert, Struct(NodeCert)]


@wire_struct
@dataclass(frozen=True, slots=True)
class NodeInfo(WireStruct):
    """A DHT contact: its node id and the UDP address it answers on.

    ``host`` is a canonical IP literal (``str(ipaddress.ip_address(...))``); it travels packed (4 or 16 bytes).
    """

    node_id: _NodeIdBytes
    host: _Host
    port: _Port


@packet(kind=1)
@dataclass(frozen=True, slots=True)
class Ping(Packet):
    """Liveness probe; answered with :class:`Pong`."""

    txid: _Txid
    sender: _Sender


@packet(kind=2)
@dataclass(frozen=True, slots=True)
class Pong(Packet):
    """Reply to :class:`Ping`, telling the pinger the address its ping arrived from (as STUN does)."""

    txid: _Txid
    responder: _Responder
    observed_host: _Host
    observed_port: _Port


@packet(kind=3)
@dataclass(frozen=True, slots=True)
class FindNode(Packet):
    """Ask for the contacts the receiver knows closest (by XOR distance) to ``target``; answered with :class:`Nodes`."""

    txid: _Txid
    sender: _Sender
    target: _NodeIdBytes


@packet(kind=4)
@dataclass(frozen=True, slots=True)
class Nodes(Packet):
    """Reply to :class:`FindNode`: up to :data:`MAX_NODES_PER_REPLY` contacts."""

    txid: _Txid
    responder: _Responder
    nodes: Annotated[tuple[NodeInfo, ...], List(item=Struct(NodeInfo), max_items=MAX_NODES_PER_REPLY)]


@packet(kind=5)
@dataclass(frozen=True, slots=True)
class ErrorReply(Packet):
    """The request ``txid`` was refused or failed; ``code`` says why, ``message`` is a hint for logs."""

    txid: _Txid
    code: Annotated[int, Int(min_value=0, max_value=MAX_ERROR_CODE)]
    message: Annotated[str, Str(max_bytes=MAX_ERROR_MESSAGE_BYTES)]
