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
5     :class:`ErrorReply`  your request ``txid`` failed: ``code`` (an :class:`ErrorCode`) and a short ``message``
6     :class:`FindValue`   as FindNode, and: what do you hold under ``key``, and a write token for it  (request)
7     :class:`Found`       contacts, a write token, and a summary of what is held  (reply to FindValue)
8     :class:`GetPart`     send part ``index`` of the item ``item_id`` under ``key``  (request)
9     :class:`PartReply`   that part  (reply to GetPart)
10    :class:`ListEntries` which entry ids do you hold in mailbox ``key``, after ``after``?  (request)
11    :class:`EntryIds`    these, and whether there are more  (reply to ListEntries)
12    :class:`Store`       store this part of a blob under ``key`` (needs a write token)  (request)
13    :class:`Stored`      got it; ``complete`` once the whole blob is in and stored  (reply to Store)
====  ==============  =========================================================================

Every request carries an 8-byte ``txid`` that its reply echoes, so a reply can be matched to the request (and an
unsolicited or spoofed reply dropped).  To add a packet: pick the next free kind, write the class here (or in the
module that owns it) with ``@packet(kind=N)`` above ``@dataclass(frozen=True, slots=True)``, add it to the table,
and check it still fits a datagram (``tests/test_codec.py`` checks every registered kind).  A kind, once used on
the network, is never reassigned: new fields mean a new kind or a new protocol version.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Final

from p2pchat.core.ids import NODE_ID_BYTES
from p2pchat.core.nodecert import NodeCert
from p2pchat.core.parts import Part
from p2pchat.core.schema import (
    Bool,
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
from p2pchat.core.tokens import TOKEN_BYTES

__all__ = [
    "ITEM_ID_BYTES",
    "MAX_ENTRY_IDS_PER_REPLY",
    "MAX_ERROR_CODE",
    "MAX_ERROR_MESSAGE_BYTES",
    "MAX_NODES_PER_REPLY",
    "MAX_PORT",
    "MIN_PORT",
    "TXID_BYTES",
    "EntryIds",
    "ErrorCode",
    "ErrorReply",
    "FindNode",
    "FindValue",
    "Found",
    "GetPart",
    "ItemSpace",
    "ListEntries",
    "LookupSpace",
    "NodeInfo",
    "Nodes",
    "PartReply",
    "Ping",
    "Pong",
    "Store",
    "Stored",
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

ITEM_ID_BYTES: Final = 16
"""Size of an item id in :class:`GetPart`: an entry id, or the blob digest of a record or tombstone."""

MAX_ENTRY_IDS_PER_REPLY: Final = 60
"""Most ids in one :class:`EntryIds` reply (60 * 18 bytes fit a datagram with room to spare)."""


class LookupSpace(enum.IntEnum):
    """What a :class:`FindValue` asks about."""

    RECORD = 1
    """A signed record (the key is a record key)."""
    MAILBOX = 2
    """A mailbox (the key is a mailbox key)."""


class ItemSpace(enum.IntEnum):
    """What a :class:`Store` or :class:`GetPart` carries."""

    RECORD = 1
    ENTRY = 2
    TOMBSTONE = 3


class ErrorCode(enum.IntEnum):
    """Why a request failed (:attr:`ErrorReply.code`)."""

    BAD_REQUEST = 1
    """The request was well-formed but cannot be served (e.g. a client-mode node was asked to store)."""
    BAD_TOKEN = 2
    """The write token is missing, stale or for another address or key: look the key up again."""
    RATE_LIMITED = 3
    """Too many requests from your address: slow down."""
    QUOTA = 4
    """A quota (per key, per source, in total) would be exceeded."""
    INVALID = 5
    """The value does not validate (signature, key, expiry, shape)."""
    STALE = 6
    """A record with a higher sequence number (or different content at the same one) is held."""
    NOT_FOUND = 7
    """The item asked for is not held (any more)."""
    DELETED = 8
    """The entry was deleted by its mailbox's owner."""


_Txid = Annotated[bytes, Bytes(min_len=TXID_BYTES, max_len=TXID_BYTES)]
_NodeIdBytes = Annotated[bytes, Bytes(min_len=NODE_ID_BYTES, max_len=NODE_ID_BYTES)]
_Host = Annotated[str, IpAddress()]
_Port = Annotated[int, Int(min_value=MIN_PORT, max_value=MAX_PORT)]
_Sender = Annotated[NodeCert | None, Optional(Struct(NodeCert))]
_Responder = Annotated[NodeCert, Struct(NodeCert)]
_Key = _NodeIdBytes
_Token = Annotated[bytes, Bytes(min_len=TOKEN_BYTES, max_len=TOKEN_BYTES)]
_ItemId = Annotated[bytes, Bytes(min_len=ITEM_ID_BYTES, max_len=ITEM_ID_BYTES)]
_LookupSpace = Annotated[int, Int(min_value=min(LookupSpace), max_value=max(LookupSpace))]
_ItemSpace = Annotated[int, Int(min_value=min(ItemSpace), max_value=max(ItemSpace))]
_PartSpec = Annotated[Part, Struct(Part)]


@wire_struct(memo=True)
@dataclass(frozen=True, slots=True)
class NodeInfo(WireStruct):
    """A DHT contact: its node id and the UDP address it answers on.

    ``host`` is a canonical IP literal (``str(ipaddress.ip_address(...))``); it travels packed (4 or 16 bytes).
    """

    node_id: _NodeIdBytes
    host: _Host
    port: _Port


_Nodes = Annotated[tuple[NodeInfo, ...], List(item=Struct(NodeInfo), max_items=MAX_NODES_PER_REPLY)]


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
    nodes: _Nodes


@packet(kind=5)
@dataclass(frozen=True, slots=True)
class ErrorReply(Packet):
    """The request ``txid`` was refused or failed; ``code`` says why, ``message`` is a hint for logs."""

    txid: _Txid
    code: Annotated[int, Int(min_value=0, max_value=MAX_ERROR_CODE)]
    message: Annotated[str, Str(max_bytes=MAX_ERROR_MESSAGE_BYTES)]


@packet(kind=6)
@dataclass(frozen=True, slots=True)
class FindValue(Packet):
    """FindNode for a value: also tell me what you hold under ``key`` and give me a write token for it.

    ``space`` is a :class:`LookupSpace`.  Answered with :class:`Found`.
    """

    txid: _Txid
    sender: _Sender
    key: _Key
    space: _LookupSpace


@packet(kind=7)
@dataclass(frozen=True, slots=True)
class Found(Packet):
    """Reply to :class:`FindValue`: contacts as in :class:`Nodes`, a write token for the asker's IP and the key,
    and a summary of what the responder holds -- the fetch of the value itself is a separate request, so a reply
    is always one datagram whatever the value's size.

    Records: ``seq`` and ``digest`` (the blob digest, to ask for with :class:`GetPart`) of the held record, or
    ``None``; ``entries`` is 0.  Mailboxes: ``entries`` is how many entries are held (tombstones are not counted:
    they move by the delete flow and by hand-over); ``seq`` and ``digest`` are ``None``.
    """

    txid: _Txid
    responder: _Responder
    nodes: _Nodes
    token: _Token
    seq: Annotated[int | None, Optional(Int(min_value=0, max_value=(1 << 63) - 1))]
    digest: Annotated[bytes | None, Optional(Bytes(min_len=ITEM_ID_BYTES, max_len=ITEM_ID_BYTES))]
    entries: Annotated[int, Int(min_value=0, max_value=0xFFFF_FFFF)]


@packet(kind=8)
@dataclass(frozen=True, slots=True)
class GetPart(Packet):
    """Send part ``index`` of item ``item_id`` (an :class:`ItemSpace` ``space``) under ``key``.

    Answered with :class:`PartReply`, or :class:`ErrorReply` ``NOT_FOUND``.
    """

    txid: _Txid
    key: _Key
    space: _ItemSpace
    item_id: _ItemId
    index: Annotated[int, Int(min_value=0, max_value=0xFFFF)]


@packet(kind=9)
@dataclass(frozen=True, slots=True)
class PartReply(Packet):
    """Reply to :class:`GetPart`."""

    txid: _Txid
    part: _PartSpec


@packet(kind=10)
@dataclass(frozen=True, slots=True)
class ListEntries(Packet):
    """Which entry ids do you hold in mailbox ``key``, in byte order after ``after`` (empty: from the start)?
    Answered with :class:`EntryIds`."""

    txid: _Txid
    key: _Key
    after: Annotated[bytes, Bytes(max_len=ITEM_ID_BYTES)]


@packet(kind=11)
@dataclass(frozen=True, slots=True)
class EntryIds(Packet):
    """Reply to :class:`ListEntries`: entry ids in byte order, each to fetch with :class:`GetPart` (``space``
    ENTRY), and whether more follow the last."""

    txid: _Txid
    ids: Annotated[
        tuple[bytes, ...],
        List(item=Bytes(min_len=ITEM_ID_BYTES, max_len=ITEM_ID_BYTES), max_items=MAX_ENTRY_IDS_PER_REPLY),
    ]
    more: Annotated[bool, Bool()]


@packet(kind=12)
@dataclass(frozen=True, slots=True)
class Store(Packet):
    """Store one part of a blob (a record, entry or tombstone, by ``space``) under ``key``, with a write token from
    a recent :class:`Found`.  Answered with :class:`Stored` or :class:`ErrorReply`."""

    txid: _Txid
    key: _Key
    space: _ItemSpace
    token: _Token
    part: _PartSpec


@packet(kind=13)
@dataclass(frozen=True, slots=True)
class Stored(Packet):
    """Reply to :class:`Store`: the part arrived; ``complete`` once the whole blob is stored (or already was)."""

    txid: _Txid
    complete: Annotated[bool, Bool()]
