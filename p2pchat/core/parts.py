"""Values larger than a datagram: split into parts, reassembled sans-I/O within hard bounds.

A record or mailbox entry may be 64 KiB, but no datagram p2pchat sends on its own protocol is larger than
:data:`~p2pchat.core.framing.MAX_DATAGRAM_SIZE` (1280 bytes).  The sender splits the encoded value (the *blob*)
with :func:`make_parts` and embeds each :class:`Part` in a DHT packet; the receiver feeds them, in any order and
with duplicates, to a :class:`Reassembler`, which returns the blob once every part is in.

Every part carries the whole transfer's header -- ``transfer_id``, ``index``, ``total`` and the ``digest``
(BLAKE2b-128 of the whole blob) -- rather than the first part alone.  So parts may arrive in any order and the
first one to arrive opens the transfer; a later part that disagrees on ``total`` or ``digest`` is refused at once;
and parts of two different blobs sent under one transfer id (by mistake or by a forger) can never be joined into
a third: the assembled blob must hash to the announced digest.  Sixteen bytes per part is a small price for that.

Chunks are fixed-size: every part but the last carries exactly :data:`PART_PAYLOAD_BYTES`, the last 1 to that
many, so a blob's size follows from ``total`` and the last chunk, and no part can be padded or shrunk.

The reassembler holds state only for incomplete multi-part transfers (a one-part blob is returned straight away),
keyed by ``(source, transfer_id)`` where *source* is whatever the caller identifies the sender by (its address).
Its bounds: :data:`MAX_CONCURRENT_TRANSFERS` transfers, :data:`MAX_TRANSFERS_PER_SOURCE` of them from one source,
:data:`MAX_REASSEMBLY_BYTES` of buffered chunks, and :data:`TRANSFER_TIMEOUT` seconds from a transfer's first part
to its last.  When a bound is hit the oldest transfer (by first part) is dropped and counted; a peer that starts
transfers and never finishes them holds nothing for long.  It also remembers up to :data:`MAX_RECENT_TRANSFERS`
finished transfer ids for :data:`TRANSFER_TIMEOUT`, so a duplicated datagram never yields a blob twice.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Annotated, Final

from p2pchat.core.framing import MAX_DATAGRAM_SIZE, P2P_HEADER_SIZE
from p2pchat.core.schema import Bytes, Int, WireStruct, max_wire_size, wire_struct
from p2pchat.errors import ProtocolError

__all__ = [
    "BLOB_DIGEST_BYTES",
    "BLOB_DIGEST_PERSONALIZATION",
    "MAX_BLOB_BYTES",
    "MAX_CONCURRENT_TRANSFERS",
    "MAX_PARTS",
    "MAX_REASSEMBLY_BYTES",
    "MAX_RECENT_TRANSFERS",
    "MAX_TRANSFERS_PER_SOURCE",
    "PART_HEADROOM",
    "PART_PAYLOAD_BYTES",
    "TRANSFER_ID_BYTES",
    "TRANSFER_TIMEOUT",
    "Part",
    "Reassembler",
    "blob_digest",
    "make_parts",
    "split",
]

PART_PAYLOAD_BYTES: Final = 1024
"""Chunk bytes per part.  A full :class:`Part` encodes to 1058 bytes, which leaves :data:`PART_HEADROOM` bytes of
a 1280-byte datagram for the packet header and the fields of the packet that carries it (txid, key, token)."""

MAX_BLOB_BYTES: Final = 69 * 1024
"""Largest blob carried in parts: the largest DHT value (68 KiB, :data:`~p2pchat.core.records.MAX_VALUE_BYTES`)
plus the record, entry or tombstone wrapping around it (under 200 bytes), rounded up to a whole number of parts."""

MAX_PARTS: Final = math.ceil(MAX_BLOB_BYTES / PART_PAYLOAD_BYTES)
"""Most parts in one transfer (65); a part announcing more is refused before anything is buffered."""

TRANSFER_ID_BYTES: Final = 8
"""Size of a transfer id, drawn at random by the sender: unique among one source's concurrent transfers."""

BLOB_DIGEST_BYTES: Final = 16
"""Size of the blob digest every part carries (BLAKE2b-128)."""

BLOB_DIGEST_PERSONALIZATION: Final = b"p2pchat-blob"
"""BLAKE2b personalization of the blob digest, distinct from every other hash in p2pchat."""

MAX_CONCURRENT_TRANSFERS: Final = 64
"""Incomplete transfers one reassembler holds; a new one beyond this drops the oldest."""

MAX_TRANSFERS_PER_SOURCE: Final = 8
"""Incomplete transfers from one source; a source starting more drops its own oldest, not someone else's."""

MAX_REASSEMBLY_BYTES: Final = 2 * 1024 * 1024
"""Chunk bytes one reassembler buffers in all (about 31 maximal transfers); a chunk beyond it drops the oldest
other transfers until it fits."""

MAX_RECENT_TRANSFERS: Final = 1024
"""Finished transfers remembered (for :data:`TRANSFER_TIMEOUT`) so a duplicated part arriving after the blob was
returned neither returns it again nor opens a transfer that can never complete."""

TRANSFER_TIMEOUT: Final = 10.0
"""Seconds from a transfer's first part after which it is dropped if incomplete.  Counted from the first part,
not the latest, so trickling duplicates cannot keep a transfer alive; several request timeouts (<= 1 s each) fit."""


@wire_struct
@dataclass(frozen=True, slots=True)
class Part(WireStruct):
    """One chunk of a blob, with the whole transfer's header (embed it in the packets that carry large values)."""

    transfer_id: Annotated[bytes, Bytes(min_len=TRANSFER_ID_BYTES, max_len=TRANSFER_ID_BYTES)]
    index: Annotated[int, Int(min_value=0, max_value=MAX_PARTS - 1)]
    total: Annotated[int, Int(min_value=1, max_value=MAX_PARTS)]
    digest: Annotated[bytes, Bytes(min_len=BLOB_DIGEST_BYTES, max_len=BLOB_DIGEST_BYTES)]
    chunk: Annotated[bytes, Bytes(min_len=1, max_len=PART_PAYLOAD_BYTES)]


PART_HEADROOM: Final = MAX_DATAGRAM_SIZE - P2P_HEADER_SIZE - 1 - max_wire_size(Part)
"""Bytes left in a datagram for the other fields of a packet that embeds one :class:`Part` (the 1 is the
packet's own array header, for up to 15 fields)."""


def blob_digest(blob: bytes) -> bytes:
    """The digest that every part of *blob* announces: personalized BLAKE2b-128."""
    return hashlib.blake2b(blob, digest_size=BLOB_DIGEST_BYTES, person=BLOB_DIGEST_PERSONALIZATION).digest()


def split(blob: bytes) -> list[bytes]:
    """Cut *blob* into chunks of :data:`PART_PAYLOAD_BYTES` (the last may be shorter); :class:`ValueError` if the
    blob is empty or over :data:`MAX_BLOB_BYTES`."""
    if not 0 < len(blob) <= MAX_BLOB_BYTES:
        raise ValueError(f"a blob carried in parts is 1..{MAX_BLOB_BYTES} bytes, got {len(blob)}")
    return [blob[start : start + PART_PAYLOAD_BYTES] for start in range(0, len(blob), PART_PAYLOAD_BYTES)]


def make_parts(blob: bytes, transfer_id: bytes) -> list[Part]:
    """The parts of *blob* under *transfer_id* (random, :data:`TRANSFER_ID_BYTES` long, supplied by the caller)."""
    if len(transfer_id) != TRANSFER_ID_BYTES:
        raise ValueError(f"a transfer id is {TRANSFER_ID_BYTES} bytes, got {len(transfer_id)}")
    chunks = split(blob)
    digest = blob_digest(blob)
    return [Part(transfer_id, index, len(chunks), digest, chunk) for index, chunk in enumerate(chunks)]


class _Transfer:
    """The chunks received so far of one incomplete transfer."""

    __slots__ = ("chunks", "digest", "received", "size", "source", "started", "total")

    def __init__(self, source: Hashable, total: int, digest: bytes, started: float) -> None:
        self.source = source
        self.total = total
        self.digest = digest
        self.started = started
        self.chunks: list[bytes | None] = [None] * total
        self.received = 0
        self.size = 0


def _check_shape(part: Part) -> None:
    """The checks that need no state: ranges across fields and the fixed chunk size."""
    if type(part) is not Part:
        raise ProtocolError(f"expected a Part, got {type(part).__name__}")
    total, index, chunk = part.total, part.index, part.chunk
    if type(total) is not int or not 1 <= total <= MAX_PARTS:
        raise ProtocolError(f"part total {total!r} outside 1..{MAX_PARTS}")
    if type(index) is not int or not 0 <= index < total:
        raise ProtocolError(f"part index {index!r} outside 0..{total - 1}")
    if type(part.transfer_id) is not bytes or len(part.transfer_id) != TRANSFER_ID_BYTES:
        raise ProtocolError(f"a transfer id is {TRANSFER_ID_BYTES} bytes")
    if type(part.digest) is not bytes or len(part.digest) != BLOB_DIGEST_BYTES:
        raise ProtocolError(f"a blob digest is {BLOB_DIGEST_BYTES} bytes")
    if type(chunk) is not bytes:
        raise ProtocolError(f"a chunk is bytes, got {type(chunk).__name__}")
    if index < total - 1:
        if len(chunk) != PART_PAYLOAD_BYTES:
            raise ProtocolError(f"part {index} of {total} has {len(chunk)} bytes; all but the last are full")
    elif not 1 <= len(chunk) <= PART_PAYLOAD_BYTES:
        raise ProtocolError(f"last part has {len(chunk)} bytes, expected 1..{PART_PAYLOAD_BYTES}")


class Reassembler:
    """Joins the parts of blobs from many sources back together, sans-I/O and within fixed bounds.

    Feed every received :class:`Part` to :meth:`add` with the sender's identity (its address) and the current
    time (any clock in seconds, the same one every call); it returns the blob when the part completes one and
    raises :class:`ProtocolError` for a part that can never belong to a good blob.  :meth:`expire` drops timed-out
    transfers (:meth:`add` also calls it, so a caller with no timer of its own stays bounded).  The counters
    :attr:`completed`, :attr:`duplicates`, :attr:`evicted` and :attr:`expired` are for status and tests; a refused
    part raises, and the caller counts it with its other dropped input.
    """

    __slots__ = ("_buffered", "_per_source", "_recent", "_transfers", "completed", "duplicates", "evicted", "expired")

    def __init__(self) -> None:
        # Insertion order is first-part order, so the oldest transfer is always at the front.
        self._transfers: OrderedDict[tuple[Hashable, bytes], _Transfer] = OrderedDict()
        self._per_source: dict[Hashable, int] = {}
        # Finished transfers and when they finished, oldest first.
        self._recent: OrderedDict[tuple[Hashable, bytes], float] = OrderedDict()
        self._buffered = 0
        self.completed = 0
        """Blobs returned (one-part blobs included)."""
        self.duplicates = 0
        """Parts ignored because their transfer already finished or already had that part."""
        self.evicted = 0
        """Incomplete transfers dropped to make room (transfer count, per-source count or bytes)."""
        self.expired = 0
        """Incomplete transfers dropped after :data:`TRANSFER_TIMEOUT`."""

    def __len__(self) -> int:
        """The number of incomplete transfers held."""
        return len(self._transfers)

    @property
    def buffered_bytes(self) -> int:
        """Chunk bytes held for incomplete transfers (never above :data:`MAX_REASSEMBLY_BYTES`)."""
        return self._buffered

    def add(self, source: Hashable, part: Part, now: float) -> bytes | None:
        """Take one part from *source*; return the whole blob if this part completed it, else None.

        :class:`ProtocolError` for: an index or total out of range, a chunk of the wrong size, a ``total`` or
        ``digest`` that differs from the transfer's earlier parts (the part is ignored, the transfer kept), and
        a completed blob that does not hash to its digest (the transfer is dropped).  A duplicate part is
        ignored (the first copy stays; a wrong one is caught by the digest), and so is a part of a transfer
        that finished within the last :data:`TRANSFER_TIMEOUT` seconds: each blob is returned once.
        """
        self.expire(now)
        _check_shape(part)
        key = (source, part.transfer_id)
        if key in self._recent:
            self.duplicates += 1
            return None
        if part.total == 1:
            return self._finish(key, part.chunk, part.digest, now)
        transfer = self._transfers.get(key)
        if transfer is None:
            self._make_room_for_transfer(source)
            transfer = _Transfer(source, part.total, part.digest, now)
            self._transfers[key] = transfer
            self._per_source[source] = self._per_source.get(source, 0) + 1
        elif part.total != transfer.total or part.digest != transfer.digest:
            raise ProtocolError(f"part {part.index} disagrees with its transfer's total or digest")
        if transfer.chunks[part.index] is not None:
            self.duplicates += 1
            return None
        self._make_room_for_bytes(len(part.chunk), key)
        transfer.chunks[part.index] = part.chunk
        transfer.received += 1
        transfer.size += len(part.chunk)
        self._buffered += len(part.chunk)
        if transfer.received < transfer.total:
            return None
        self._drop(key)
        return self._finish(
            key, b"".join(chunk for chunk in transfer.chunks if chunk is not None), transfer.digest, now
        )

    def missing(self, source: Hashable, transfer_id: bytes) -> tuple[int, ...] | None:
        """Indices not yet received of an incomplete transfer (for a request to resend them), or None if unknown."""
        transfer = self._transfers.get((source, transfer_id))
        if transfer is None:
            return None
        return tuple(index for index, chunk in enumerate(transfer.chunks) if chunk is None)

    def expire(self, now: float) -> int:
        """Drop every transfer whose first part came :data:`TRANSFER_TIMEOUT` or more seconds before *now*.

        Returns how many were dropped.
        """
        dropped = 0
        while self._transfers:
            key, transfer = next(iter(self._transfers.items()))
            if transfer.started + TRANSFER_TIMEOUT > now:
                break
            self._drop(key)
            dropped += 1
        self.expired += dropped
        recent = self._recent
        while recent and next(iter(recent.values())) + TRANSFER_TIMEOUT <= now:
            recent.popitem(last=False)
        return dropped

    def _finish(self, key: tuple[Hashable, bytes], blob: bytes, digest: bytes, now: float) -> bytes:
        if blob_digest(blob) != digest:
            raise ProtocolError("reassembled blob does not match the digest its parts announced")
        self.completed += 1
        self._recent[key] = now
        if len(self._recent) > MAX_RECENT_TRANSFERS:
            self._recent.popitem(last=False)
        return blob

    def _make_room_for_transfer(self, source: Hashable) -> None:
        if self._per_source.get(source, 0) >= MAX_TRANSFERS_PER_SOURCE:
            # Only on this limit path: scan for the source's oldest (at most MAX_CONCURRENT_TRANSFERS entries).
            oldest = next(key for key, transfer in self._transfers.items() if transfer.source == source)
            self._drop(oldest)
            self.evicted += 1
        elif len(self._transfers) >= MAX_CONCURRENT_TRANSFERS:
            self._drop(next(iter(self._transfers)))
            self.evicted += 1

    def _make_room_for_bytes(self, size: int, keep: tuple[Hashable, bytes]) -> None:
        while self._buffered + size > MAX_REASSEMBLY_BYTES:
            # One transfer is at most MAX_BLOB_BYTES, far below the limit, so another one to drop always exists.
            victim = next(key for key in self._transfers if key != keep)
            self._drop(victim)
            self.evicted += 1

    def _drop(self, key: tuple[Hashable, bytes]) -> None:
        transfer = self._transfers.pop(key)
        self._buffered -= transfer.size
        remaining = self._per_source[transfer.source] - 1
        if remaining:
            self._per_source[transfer.source] = remaining
        else:
            del self._per_source[transfer.source]
