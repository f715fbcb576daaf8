"""DHT node ids: 160-bit values derived from identity keys, compared by XOR distance.

A node id is the BLAKE2b hash of the node's Ed25519 public key, so nobody can claim an id without holding its
key (S/Kademlia).  The DHT simulates thousands of nodes and compares ids constantly, so :class:`NodeId` keeps
both its bytes and its integer value and does no work on comparison beyond an int operation.
"""

from __future__ import annotations

import builtins
import hashlib
from typing import Any, Final, final

__all__ = [
    "NODE_ID_BITS",
    "NODE_ID_BYTES",
    "NODE_ID_PERSONALIZATION",
    "NodeId",
    "bucket_index",
    "node_id_for_key",
]

NODE_ID_BITS: Final = 160
"""Size of a node id in bits (the ``kademlia`` package's size, so stock peers interoperate)."""

NODE_ID_BYTES: Final = NODE_ID_BITS // 8
"""Size of a node id in bytes."""

NODE_ID_PERSONALIZATION: Final = b"p2pchat-nodeid"
"""BLAKE2b personalization that separates node-id hashing from every other hash of a public key."""

_PUBLIC_KEY_BYTES: Final = 32
_MAX_ID_INT: Final = 1 << NODE_ID_BITS


@final
class NodeId:
    """An immutable 160-bit DHT node id, hashable and ordered by its integer value."""

    __slots__ = ("_bytes", "_int")

    # The properties below are named bytes and int, so annotations in this class spell out builtins.
    _bytes: builtins.bytes
    _int: builtins.int

    def __init__(self, raw: builtins.bytes) -> None:
        if len(raw) != NODE_ID_BYTES:
            raise ValueError(f"a node id is {NODE_ID_BYTES} bytes, got {len(raw)}")
        raw = bytes(raw)
        object.__setattr__(self, "_bytes", raw)
        object.__setattr__(self, "_int", int.from_bytes(raw, "big"))

    @classmethod
    def from_bytes(cls, raw: builtins.bytes) -> NodeId:
        """Wrap exactly :data:`NODE_ID_BYTES` bytes; raise :class:`ValueError` on any other length."""
        return cls(raw)

    @classmethod
    def from_int(cls, value: builtins.int) -> NodeId:
        """Make the id whose big-endian integer value is *value* (``0 <= value < 2**160``)."""
        if not 0 <= value < _MAX_ID_INT:
            raise ValueError(f"a node id is an integer in [0, 2**{NODE_ID_BITS}), got {value}")
        return cls(value.to_bytes(NODE_ID_BYTES, "big"))

    @property
    def bytes(self) -> builtins.bytes:
        """The id as 20 bytes (the wire form)."""
        return self._bytes

    @property
    def int(self) -> builtins.int:
        """The id as a big-endian unsigned integer."""
        return self._int

    def distance(self, other: NodeId) -> builtins.int:
        """The Kademlia XOR distance to *other*: symmetric, and zero only to itself."""
        return self._int ^ other._int

    def hex(self) -> str:
        """The id as 40 lowercase hex digits."""
        return self._bytes.hex()

    def __repr__(self) -> str:
        # Eight hex digits tell ids apart in logs and test failures without flooding them.
        return f"NodeId({self._bytes[:4].hex()}…)"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"NodeId is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"NodeId is immutable; cannot delete {name!r}")

    def __reduce__(self) -> tuple[type[NodeId], tuple[builtins.bytes]]:
        # The immutable __setattr__ defeats the default slot-by-slot unpickling and copying.
        return (NodeId, (self._bytes,))

    def __hash__(self) -> builtins.int:
        # bytes caches its own hash, so this is cheaper than hashing the 160-bit int every time.
        return hash(self._bytes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeId):
            return NotImplemented
        return self._int == other._int

    def __lt__(self, other: NodeId) -> bool:
        if not isinstance(other, NodeId):
            return NotImplemented
        return self._int < other._int

    def __le__(self, other: NodeId) -> bool:
        if not isinstance(other, NodeId):
            return NotImplemented
        return self._int <= other._int

    def __gt__(self, other: NodeId) -> bool:
        if not isinstance(other, NodeId):
            return NotImplemented
        return self._int > other._int

    def __ge__(self, other: NodeId) -> bool:
        if not isinstance(other, NodeId):
            return NotImplemented
        return self._int >= other._int


def node_id_for_key(public_key: bytes) -> NodeId:
    """The node id of the holder of a 32-byte Ed25519 *public_key*: its personalized BLAKE2b-160 hash."""
    if len(public_key) != _PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {_PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    digest = hashlib.blake2b(public_key, digest_size=NODE_ID_BYTES, person=NODE_ID_PERSONALIZATION).digest()
    return NodeId(digest)


def bucket_index(a: NodeId, b: NodeId) -> int:
    """The routing-table bucket *b* falls in as seen from *a*: the index of the highest differing bit.

    It is ``distance.bit_length() - 1``, so ids sharing no prefix land in bucket 159 and an id compared with
    itself gives -1.
    """
    return (a.int ^ b.int).bit_length() - 1
