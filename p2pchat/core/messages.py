"""What the messenger puts on the wire and in the DHT, and the session records it keeps: pure wire structs.

* :class:`Content` -- the plaintext inside a Double Ratchet message: a text message, or acknowledgements.
* :class:`RatchetMessage` -- one ratchet message as it travels: in a direct-channel frame, or as the payload of a
  sealed envelope in a DHT mailbox.  ``initial`` carries the X3DH initial header until the peer has answered,
  so the first messages of a session can be read even if the peer gets them in any order.
* :class:`PeerInfo` -- the value of a user's peer record (:attr:`~p2pchat.core.records.RecordKind.PEER`): where
  the user's node accepts direct channels.
* :class:`PrekeyInfo` -- the value of a user's prekey record (:attr:`~p2pchat.core.records.RecordKind.PREKEYS`):
  the X3DH prekey bundle and the public key of the user's mailbox.
* :class:`SessionRecord` -- one Double Ratchet session with a peer, as stored on disk.

Every decoder is strict (:func:`decode`), so a frame, an envelope payload or a database row that does not parse
raises :class:`~p2pchat.errors.ProtocolError` and nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Final, TypeVar

from p2pchat.core.framing import decode_struct, encode_struct
from p2pchat.core.identity import PUBLIC_KEY_BYTES
from p2pchat.core.packets import MAX_PORT, MIN_PORT
from p2pchat.core.ratchet import MAX_CIPHERTEXT_BYTES
from p2pchat.core.records import MAX_VALUE_BYTES
from p2pchat.core.schema import (
    Bool,
    Bytes,
    Int,
    IpAddress,
    List,
    Optional,
    Str,
    Struct,
    WireStruct,
    max_wire_size,
    wire_struct,
)
from p2pchat.errors import ProtocolError

__all__ = [
    "MAX_ACKS_PER_MESSAGE",
    "MAX_PEER_ADDRESSES",
    "MAX_TEXT_BYTES",
    "MESSAGE_ID_BYTES",
    "Content",
    "ContentKind",
    "PeerAddress",
    "PeerInfo",
    "PrekeyInfo",
    "RatchetMessage",
    "SessionRecord",
    "decode",
    "encode",
]

MESSAGE_ID_BYTES: Final = 16
"""Size of a message id (random, chosen by the sender)."""

MAX_TEXT_BYTES: Final = 64 * 1024
"""Longest message text, in UTF-8 bytes: 64 KiB."""

MAX_ACKS_PER_MESSAGE: Final = 256
"""Most message ids acknowledged in one :class:`Content`; more acknowledgements go in several."""

MAX_PEER_ADDRESSES: Final = 8
"""Most addresses in a peer record."""

_MAX_HEADER_BYTES: Final = 256
_MAX_INITIAL_BYTES: Final = 512
_MAX_SESSION_BYTES: Final = 512 * 1024


class ContentKind(enum.IntEnum):
    """What a :class:`Content` is."""

    TEXT = 1
    ACK = 2


_MESSAGE_ID: Final = Bytes(min_len=MESSAGE_ID_BYTES, max_len=MESSAGE_ID_BYTES)
_MessageId = Annotated[bytes, _MESSAGE_ID]
_Key = Annotated[bytes, Bytes(min_len=PUBLIC_KEY_BYTES, max_len=PUBLIC_KEY_BYTES)]


@wire_struct
@dataclass(frozen=True, slots=True)
class Content(WireStruct):
    """The plaintext of a ratchet message.  ``sent_at`` is the sender's wall clock in milliseconds; ``seq`` orders
    one sender's messages in a conversation."""

    kind: Annotated[int, Int(min_value=min(ContentKind), max_value=max(ContentKind))]
    message_id: _MessageId
    seq: Annotated[int, Int(min_value=0, max_value=(1 << 63) - 1)]
    sent_at: Annotated[int, Int(min_value=0, max_value=(1 << 63) - 1)]
    text: Annotated[str, Str(max_bytes=MAX_TEXT_BYTES)]
    acks: Annotated[tuple[bytes, ...], List(item=_MESSAGE_ID, max_items=MAX_ACKS_PER_MESSAGE)]

    def __post_init__(self) -> None:
        # A text carries no acks and an ack no text, so the largest content is a full text (and fits an envelope).
        if (self.kind == ContentKind.TEXT and self.acks) or (self.kind == ContentKind.ACK and self.text):
            raise ProtocolError("a text message carries no acks, and an ack no text")


@wire_struct
@dataclass(frozen=True, slots=True)
class RatchetMessage(WireStruct):
    """One Double Ratchet message: the encoded X3DH initial header (until the peer has answered), the encoded
    ratchet header, and the ciphertext of an encoded :class:`Content`."""

    initial: Annotated[bytes | None, Optional(Bytes(max_len=_MAX_INITIAL_BYTES))]
    header: Annotated[bytes, Bytes(max_len=_MAX_HEADER_BYTES)]
    ciphertext: Annotated[bytes, Bytes(max_len=MAX_CIPHERTEXT_BYTES)]


MAX_RATCHET_MESSAGE_BYTES: Final = max_wire_size(RatchetMessage)
"""Largest encoded :class:`RatchetMessage` (what a channel frame or an envelope must be able to carry)."""


@wire_struct
@dataclass(frozen=True, slots=True)
class PeerAddress(WireStruct):
    """An address where a node accepts direct channels (TCP)."""

    host: Annotated[str, IpAddress()]
    port: Annotated[int, Int(min_value=MIN_PORT, max_value=MAX_PORT)]


@wire_struct
@dataclass(frozen=True, slots=True)
class PeerInfo(WireStruct):
    """The value of a peer record."""

    addresses: Annotated[tuple[PeerAddress, ...], List(item=Struct(PeerAddress), max_items=MAX_PEER_ADDRESSES)]


@wire_struct
@dataclass(frozen=True, slots=True)
class PrekeyInfo(WireStruct):
    """The value of a prekey record: the encoded X3DH bundle and the user's mailbox public key."""

    bundle: Annotated[bytes, Bytes(max_len=MAX_VALUE_BYTES - 256)]
    mailbox_key: _Key


@wire_struct
@dataclass(frozen=True, slots=True)
class SessionRecord(WireStruct):
    """A ratchet session with one peer, as stored.

    ``initial`` is our X3DH initial header while the peer has not answered (attached to every message we send);
    ``peer_ephemeral`` is the ephemeral key of the peer's initial header that created this session (so a repeat of
    that header is recognised, not answered twice); ``associated_data`` is X3DH's AD for every message.
    """

    ratchet: Annotated[bytes, Bytes(max_len=_MAX_SESSION_BYTES)]
    associated_data: Annotated[bytes, Bytes(max_len=2 * PUBLIC_KEY_BYTES)]
    initial: Annotated[bytes | None, Optional(Bytes(max_len=_MAX_INITIAL_BYTES))]
    peer_ephemeral: Annotated[bytes | None, Optional(Bytes(max_len=PUBLIC_KEY_BYTES))]
    answered: Annotated[bool, Bool()]


_W = TypeVar("_W", bound=WireStruct)


def encode(obj: WireStruct) -> bytes:
    """Encode a struct of this module; :class:`ValueError` if it is out of range (our own bug)."""
    return encode_struct(obj)


def decode(cls: type[_W], data: bytes) -> _W:
    """Decode a struct of *cls* strictly; :class:`ProtocolError` for anything else."""
    if not isinstance(data, bytes):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    limit = max_wire_size(cls)
    if len(data) > limit:
        raise ProtocolError(f"{cls.__name__} of {len(data)} bytes is over its {limit}-byte limit")
    return decode_struct(cls, data)
