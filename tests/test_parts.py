"""Values larger than a datagram: splitting, reassembly in any order, and every bound of the reassembler."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.core.framing import MAX_DATAGRAM_SIZE, P2P_HEADER_SIZE
from p2pchat.core.parts import (
    BLOB_DIGEST_BYTES,
    MAX_BLOB_BYTES,
    MAX_CONCURRENT_TRANSFERS,
    MAX_PARTS,
    MAX_REASSEMBLY_BYTES,
    MAX_RECENT_TRANSFERS,
    MAX_TRANSFERS_PER_SOURCE,
    PART_HEADROOM,
    PART_PAYLOAD_BYTES,
    TRANSFER_ID_BYTES,
    TRANSFER_TIMEOUT,
    Part,
    Reassembler,
    blob_digest,
    make_parts,
    split,
)
from p2pchat.core.schema import from_wire, max_wire_size, to_wire
from p2pchat.errors import ProtocolError

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)

TID = b"T" * TRANSFER_ID_BYTES
SRC = ("192.0.2.1", 4000)


def _blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _tid(n: int) -> bytes:
    return n.to_bytes(TRANSFER_ID_BYTES, "big")


def _start(reassembler: Reassembler, source: Any, transfer_id: bytes, now: float = 0.0, size: int = 3000) -> list[Part]:
    """Open a transfer by feeding its first part; return the parts not yet fed."""
    parts = make_parts(_blob(size, seed=int.from_bytes(transfer_id, "big")), transfer_id)
    assert reassembler.add(source, parts[0], now) is None
    return parts[1:]


# --- sizes --------------------------------------------------------------------------------------------------------


def test_a_full_part_leaves_room_in_a_datagram() -> None:
    full = make_parts(_blob(MAX_BLOB_BYTES), TID)[0]
    encoded = msgpack.packb(to_wire(full))
    assert len(encoded) == max_wire_size(Part)
    assert P2P_HEADER_SIZE + 1 + len(encoded) + PART_HEADROOM == MAX_DATAGRAM_SIZE
    # Room for a txid, a DHT key, a write token and a few small fields of the packet that carries the part.
    assert PART_HEADROOM >= 128


def test_max_parts_covers_the_largest_blob() -> None:
    assert (MAX_PARTS - 1) * PART_PAYLOAD_BYTES < MAX_BLOB_BYTES <= MAX_PARTS * PART_PAYLOAD_BYTES
    assert len(split(_blob(MAX_BLOB_BYTES))) == MAX_PARTS


@pytest.mark.parametrize(
    ("size", "count"),
    [(1, 1), (PART_PAYLOAD_BYTES, 1), (PART_PAYLOAD_BYTES + 1, 2), (MAX_BLOB_BYTES, MAX_PARTS)],
)
def test_split_sizes(size: int, count: int) -> None:
    blob = _blob(size)
    chunks = split(blob)
    assert len(chunks) == count
    assert b"".join(chunks) == blob
    assert all(len(chunk) == PART_PAYLOAD_BYTES for chunk in chunks[:-1])


@pytest.mark.parametrize("size", [0, MAX_BLOB_BYTES + 1])
def test_split_refuses_empty_and_oversized_blobs(size: int) -> None:
    with pytest.raises(ValueError, match="blob"):
        split(b"\x00" * size)


def test_make_parts_refuses_a_bad_transfer_id() -> None:
    with pytest.raises(ValueError, match="transfer id"):
        make_parts(b"x", b"short")


def test_parts_round_trip_through_the_wire() -> None:
    for part in make_parts(_blob(2500), TID):
        assert from_wire(Part, msgpack.unpackb(msgpack.packb(to_wire(part)))) == part


@pytest.mark.parametrize(
    "wire",
    [
        [TID, 0, MAX_PARTS + 1, bytes(16), b"x"],
        [TID, MAX_PARTS, MAX_PARTS, bytes(16), b"x"],
        [TID, 0, 0, bytes(16), b"x"],
        [TID, 0, 1, bytes(16), b""],
        [TID, 0, 1, bytes(16), b"x" * (PART_PAYLOAD_BYTES + 1)],
        [b"short", 0, 1, bytes(16), b"x"],
        [TID, 0, 1, bytes(15), b"x"],
    ],
)
def test_part_schema_refuses_out_of_range_fields(wire: list[object]) -> None:
    with pytest.raises(ProtocolError):
        from_wire(Part, wire)


# --- round trips --------------------------------------------------------------------------------------------------


@FAST
@given(st.integers(1, MAX_BLOB_BYTES), st.integers(0, 2**32), st.integers(0, 30))
def test_random_blobs_reassemble_in_any_order_with_duplicates(size: int, seed: int, duplicates: int) -> None:
    rng = random.Random(seed)
    blob = rng.randbytes(size)
    parts = make_parts(blob, rng.randbytes(TRANSFER_ID_BYTES))
    stream = parts + [rng.choice(parts) for _ in range(duplicates)]
    rng.shuffle(stream)
    reassembler = Reassembler()
    results = [reassembler.add(SRC, part, 0.0) for part in stream]
    done = [result for result in results if result is not None]
    assert done == [blob]
    # Complete exactly when its last distinct part came in, and never again.
    first_complete = next(i for i in range(len(stream)) if len({p.index for p in stream[: i + 1]}) == len(parts))
    assert results[first_complete] == blob
    # Duplicates arriving after completion neither return the blob again nor reopen a transfer.
    assert len(reassembler) == 0
    assert reassembler.buffered_bytes == 0
    assert reassembler.completed == 1
    assert reassembler.duplicates == duplicates


def test_a_one_part_blob_holds_no_state() -> None:
    reassembler = Reassembler()
    (part,) = make_parts(b"small", TID)
    assert reassembler.add(SRC, part, 0.0) == b"small"
    assert len(reassembler) == 0
    assert reassembler.buffered_bytes == 0


def test_finished_transfers_are_remembered_for_the_timeout_and_up_to_a_bound() -> None:
    reassembler = Reassembler()
    singles = [make_parts(_tid(n), _tid(n))[0] for n in range(MAX_RECENT_TRANSFERS + 1)]
    for part in singles:
        assert reassembler.add(SRC, part, 0.0) == part.chunk
    # The oldest was forgotten to respect the bound; the next one is still remembered.
    assert reassembler.add(SRC, singles[0], 0.0) == singles[0].chunk
    assert reassembler.add(SRC, singles[2], 0.0) is None
    # After the timeout everything is forgotten.
    assert reassembler.add(SRC, singles[2], TRANSFER_TIMEOUT) == singles[2].chunk


def test_one_transfer_id_from_two_sources_does_not_mix() -> None:
    reassembler = Reassembler()
    a, b = _blob(3000, 1), _blob(3000, 2)
    parts_a, parts_b = make_parts(a, TID), make_parts(b, TID)
    for part_a, part_b in zip(parts_a[:-1], parts_b[:-1], strict=True):
        assert reassembler.add("a", part_a, 0.0) is None
        assert reassembler.add("b", part_b, 0.0) is None
    assert reassembler.add("b", parts_b[-1], 0.0) == b
    assert reassembler.add("a", parts_a[-1], 0.0) == a


def test_duplicates_are_counted_once_and_missing_lists_the_gaps() -> None:
    reassembler = Reassembler()
    parts = make_parts(_blob(4000), TID)
    reassembler.add(SRC, parts[1], 0.0)
    reassembler.add(SRC, parts[1], 0.0)
    assert reassembler.buffered_bytes == PART_PAYLOAD_BYTES
    assert reassembler.missing(SRC, TID) == (0, 2, 3)
    assert reassembler.missing(SRC, b"U" * TRANSFER_ID_BYTES) is None
    assert reassembler.missing("elsewhere", TID) is None


# --- refused parts ------------------------------------------------------------------------------------------------


def _part(**changes: Any) -> Part:
    return dataclasses.replace(make_parts(_blob(3000), TID)[0], **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"total": MAX_PARTS + 1}, "total"),
        ({"total": 0}, "total"),
        ({"index": 3, "total": 3}, "index"),
        ({"index": -1}, "index"),
        ({"chunk": b"x" * (PART_PAYLOAD_BYTES - 1)}, "full"),
        ({"chunk": b"x" * (PART_PAYLOAD_BYTES + 1)}, "full"),
        ({"index": 2, "chunk": b""}, "last part"),
        ({"index": 2, "chunk": b"x" * (PART_PAYLOAD_BYTES + 1)}, "last part"),
        ({"transfer_id": b"short"}, "transfer id"),
        ({"digest": bytes(BLOB_DIGEST_BYTES - 1)}, "digest"),
        ({"chunk": bytearray(PART_PAYLOAD_BYTES)}, "bytes"),
        ({"total": True}, "total"),
    ],
)
def test_malformed_parts_are_refused(changes: dict[str, Any], message: str) -> None:
    reassembler = Reassembler()
    with pytest.raises(ProtocolError, match=message):
        reassembler.add(SRC, _part(**changes), 0.0)
    assert len(reassembler) == 0
    assert reassembler.buffered_bytes == 0


def test_only_part_objects_are_taken() -> None:
    with pytest.raises(ProtocolError, match="expected a Part"):
        Reassembler().add(SRC, [TID, 0, 1, bytes(16), b"x"], 0.0)  # type: ignore[arg-type]


def test_a_part_with_another_total_is_refused_and_the_transfer_kept() -> None:
    reassembler = Reassembler()
    rest = _start(reassembler, SRC, TID, size=3000)
    other = make_parts(_blob(5000), TID)[1]
    with pytest.raises(ProtocolError, match="disagrees"):
        reassembler.add(SRC, other, 0.0)
    assert len(reassembler) == 1
    for part in rest[:-1]:
        assert reassembler.add(SRC, part, 0.0) is None
    assert reassembler.add(SRC, rest[-1], 0.0) is not None


def test_parts_of_two_blobs_announcing_their_own_digests_are_refused() -> None:
    reassembler = Reassembler()
    a, b = make_parts(_blob(3000, 1), TID), make_parts(_blob(3000, 2), TID)
    reassembler.add(SRC, a[0], 0.0)
    with pytest.raises(ProtocolError, match="disagrees"):
        reassembler.add(SRC, b[1], 0.0)


def test_parts_of_two_blobs_under_one_forged_digest_fail_the_digest_check() -> None:
    reassembler = Reassembler()
    a, b = make_parts(_blob(3000, 1), TID), make_parts(_blob(3000, 2), TID)
    forged = dataclasses.replace(b[1], digest=a[1].digest)
    reassembler.add(SRC, a[0], 0.0)
    reassembler.add(SRC, forged, 0.0)
    with pytest.raises(ProtocolError, match="digest"):
        reassembler.add(SRC, a[2], 0.0)
    # The doomed transfer is gone, nothing is buffered, and a fresh send works.
    assert len(reassembler) == 0
    assert reassembler.buffered_bytes == 0
    blob = _blob(3000, 1)
    results = [reassembler.add(SRC, part, 0.0) for part in a]
    assert results[-1] == blob
    assert blob_digest(blob) == a[0].digest


def test_a_one_part_blob_with_a_wrong_digest_is_refused() -> None:
    (part,) = make_parts(b"small", TID)
    with pytest.raises(ProtocolError, match="digest"):
        Reassembler().add(SRC, dataclasses.replace(part, chunk=b"smalL"), 0.0)


# --- bounds -------------------------------------------------------------------------------------------------------


def test_transfer_count_limit_drops_the_oldest() -> None:
    reassembler = Reassembler()
    for n in range(MAX_CONCURRENT_TRANSFERS):
        _start(reassembler, ("peer", n), _tid(n))
    assert len(reassembler) == MAX_CONCURRENT_TRANSFERS
    assert reassembler.evicted == 0
    _start(reassembler, ("peer", "late"), _tid(999))
    assert len(reassembler) == MAX_CONCURRENT_TRANSFERS
    assert reassembler.evicted == 1
    assert reassembler.missing(("peer", 0), _tid(0)) is None
    assert reassembler.missing(("peer", 1), _tid(1)) is not None


def test_per_source_limit_drops_that_sources_oldest_only() -> None:
    reassembler = Reassembler()
    _start(reassembler, "victim", _tid(0))
    for n in range(MAX_TRANSFERS_PER_SOURCE):
        _start(reassembler, "flooder", _tid(n))
    assert reassembler.evicted == 0
    _start(reassembler, "flooder", _tid(100))
    assert reassembler.evicted == 1
    assert len(reassembler) == 1 + MAX_TRANSFERS_PER_SOURCE
    assert reassembler.missing("flooder", _tid(0)) is None
    assert reassembler.missing("flooder", _tid(1)) is not None
    assert reassembler.missing("victim", _tid(0)) is not None


def test_buffered_bytes_limit_drops_the_oldest_other_transfers() -> None:
    reassembler = Reassembler()
    full_transfers = MAX_REASSEMBLY_BYTES // (MAX_BLOB_BYTES - PART_PAYLOAD_BYTES)
    blobs = [_blob(MAX_BLOB_BYTES, seed) for seed in range(full_transfers + 1)]
    # Every transfer but its last part: the buffer fills exactly to the limit without eviction...
    for n in range(full_transfers):
        for part in make_parts(blobs[n], _tid(n))[:-1]:
            assert reassembler.add(n, part, 0.0) is None
    assert reassembler.buffered_bytes == full_transfers * (MAX_BLOB_BYTES - PART_PAYLOAD_BYTES)
    assert reassembler.buffered_bytes <= MAX_REASSEMBLY_BYTES
    assert reassembler.evicted == 0
    # ... and one more transfer pushes the oldest out, never the one being filled.
    last = make_parts(blobs[-1], _tid(full_transfers))
    results = [reassembler.add("new", part, 0.0) for part in last]
    assert results[-1] == blobs[-1]
    assert reassembler.evicted >= 1
    assert reassembler.missing(0, _tid(0)) is None
    assert reassembler.buffered_bytes <= MAX_REASSEMBLY_BYTES


def test_incomplete_transfers_expire_after_the_timeout() -> None:
    reassembler = Reassembler()
    rest = _start(reassembler, SRC, TID, now=100.0)
    _start(reassembler, "other", TID, now=105.0)
    # Duplicates of the first part do not keep a transfer alive.
    assert reassembler.expire(100.0 + TRANSFER_TIMEOUT - 0.001) == 0
    assert reassembler.expire(100.0 + TRANSFER_TIMEOUT) == 1
    assert reassembler.expired == 1
    assert reassembler.missing(SRC, TID) is None
    assert reassembler.missing("other", TID) is not None
    # A late part finds no transfer: it opens a new one that cannot complete with what was sent before.
    assert reassembler.add(SRC, rest[-1], 100.0 + TRANSFER_TIMEOUT) is None
    assert reassembler.missing(SRC, TID) == (0, 1)


def test_add_expires_old_transfers_itself() -> None:
    reassembler = Reassembler()
    for n in range(4):
        _start(reassembler, n, TID, now=0.0)
    (small,) = make_parts(b"ping", TID)
    assert reassembler.add("x", small, TRANSFER_TIMEOUT) == b"ping"
    assert len(reassembler) == 0
    assert reassembler.expired == 4
    assert reassembler.buffered_bytes == 0


def test_trickled_duplicates_do_not_extend_a_transfer() -> None:
    reassembler = Reassembler()
    first = make_parts(_blob(3000), TID)[0]
    reassembler.add(SRC, first, 0.0)
    for tick in range(1, int(TRANSFER_TIMEOUT)):
        reassembler.add(SRC, first, float(tick))
    assert len(reassembler) == 1
    reassembler.add(SRC, make_parts(b"other", b"O" * TRANSFER_ID_BYTES)[0], TRANSFER_TIMEOUT)
    assert len(reassembler) == 0


# --- fuzzing ------------------------------------------------------------------------------------------------------

_parts = st.builds(
    Part,
    st.sampled_from([_tid(0), _tid(1)]),
    st.integers(0, MAX_PARTS - 1),
    st.integers(1, MAX_PARTS),
    st.sampled_from([bytes(16), blob_digest(b"x")]),
    st.sampled_from([b"x", b"y" * PART_PAYLOAD_BYTES, b"z" * 100]),
)


@FAST
@given(st.lists(st.tuples(st.integers(0, 3), _parts, st.floats(0, 30)), max_size=200))
def test_arbitrary_part_streams_raise_only_protocol_error_and_stay_bounded(
    stream: list[tuple[int, Part, float]],
) -> None:
    reassembler = Reassembler()
    for source, part, now in sorted(stream, key=lambda item: item[2]):
        with contextlib.suppress(ProtocolError):
            reassembler.add(source, part, now)
        assert len(reassembler) <= MAX_CONCURRENT_TRANSFERS
        assert 0 <= reassembler.buffered_bytes <= MAX_REASSEMBLY_BYTES
