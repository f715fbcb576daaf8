"""The store a node keeps for others (quotas, eviction order, tombstones, expiry, SQLite persistence), the
write tokens and the per-source rate limiter -- all plain code, driven directly."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.ratelimit import DEFAULT_BURST, DEFAULT_RATE, MAX_TRACKED_SOURCES, RateLimiter, RateLimits
from p2pchat.core.records import (
    MAX_VALUE_BYTES,
    TOMBSTONE_LIFETIME,
    RecordKind,
    StaleRecordError,
    encode_entry,
    encode_record,
    encode_tombstone,
    entry_expiry,
    mailbox_key,
    make_entry,
    record_key,
    sign_record,
    sign_tombstone,
)
from p2pchat.core.tokens import TOKEN_BYTES, TOKEN_ROTATION, WriteTokens
from p2pchat.dht.store import (
    COMPAT_TTL,
    DEFAULT_TOTAL_BYTES,
    ITEM_OVERHEAD_BYTES,
    DeletedEntryError,
    QuotaExceededError,
    Space,
    SqliteBackend,
    Store,
    StoreLimits,
)
from p2pchat.errors import ProtocolError

NOW = 1_767_225_600.0
RNG = random.Random(1)
OWNER = Identity.from_seed(bytes(32))
MAILBOX = Identity.from_seed(bytes([1]) * 32)
MBOX = mailbox_key(MAILBOX.public.key)
OWN_ID = NodeId(bytes(20))


def record_blob(seq: int = 1, value: bytes = b"v", owner: Identity = OWNER) -> tuple[NodeId, bytes]:
    record = sign_record(owner, RecordKind.PEER, seq, int(NOW) + 3600, value)
    return record_key(RecordKind.PEER, owner.public.key), encode_record(record)


def entry_blob(payload: bytes, key: NodeId = MBOX) -> tuple[bytes, bytes]:
    entry = make_entry(key, payload, entry_expiry(NOW))
    return entry.entry_id, encode_entry(entry)


# --- records ------------------------------------------------------------------------------------------------------


def test_records_follow_the_sequence_rules() -> None:
    store = Store(OWN_ID)
    key, first = record_blob(2)
    assert store.put(Space.RECORD, key, first, "10.0.0.1", NOW)
    assert not store.put(Space.RECORD, key, first, "10.0.0.1", NOW)  # the same again changes nothing
    _, lower = record_blob(1)
    with pytest.raises(StaleRecordError):
        store.put(Space.RECORD, key, lower, "10.0.0.1", NOW)
    _, same_seq_other = record_blob(2, b"other")
    with pytest.raises(ProtocolError):
        store.put(Space.RECORD, key, same_seq_other, "10.0.0.1", NOW)
    _, higher = record_blob(3, b"newer")
    assert store.put(Space.RECORD, key, higher, "10.0.0.2", NOW)
    item = store.record(key, NOW)
    assert item is not None and item.seq == 3 and item.blob == higher
    assert store.source_bytes("10.0.0.1") == 0  # the replaced record no longer counts against its writer
    assert store.stats.refused_stale == 2


def test_the_same_record_encoded_differently_keeps_the_stored_blob() -> None:
    store = Store(OWN_ID)
    key, blob = record_blob(2)
    store.put(Space.RECORD, key, blob, "10.0.0.1", NOW)
    # Re-encode the same record with a wider integer for seq: a different blob, the same signed content.
    assert blob[36] == 2  # fixarray(6), kind, bin8 key (34 bytes), then seq as a positive fixint
    wider = blob[:36] + b"\xcd\x00\x02" + blob[37:]
    assert wider != blob
    assert not store.put(Space.RECORD, key, wider, "10.0.0.1", NOW)
    item = store.record(key, NOW)
    assert item is not None and item.blob == blob


def test_a_republished_compat_value_lives_on() -> None:
    store = Store(OWN_ID)
    key = NodeId(b"\x05" * 20)
    store.put(Space.COMPAT, key, b"\xa1v", "10.0.0.1", NOW)
    assert not store.put(Space.COMPAT, key, b"\xa1v", "10.0.0.1", NOW + COMPAT_TTL - 10)
    assert store.compat(key, NOW + COMPAT_TTL + 10) == b"\xa1v"


def test_forged_and_misplaced_records_are_refused() -> None:
    store = Store(OWN_ID)
    key, blob = record_blob()
    forged = bytearray(blob)
    forged[-1] ^= 1  # the last byte of the signature
    with pytest.raises(ProtocolError):
        store.put(Space.RECORD, key, bytes(forged), "10.0.0.1", NOW)
    with pytest.raises(ProtocolError):
        store.put(Space.RECORD, NodeId(bytes(19) + b"\x01"), blob, "10.0.0.1", NOW)
    with pytest.raises(ProtocolError):
        store.put(Space.RECORD, key, blob, "10.0.0.1", NOW + 7200)  # expired by then
    assert len(store) == 0
    assert store.stats.refused_invalid == 3


# --- mailboxes ------------------------------------------------------------------------------------------------------


def test_tombstones_delete_entries_and_keep_them_deleted() -> None:
    store = Store(OWN_ID)
    ids = []
    for i in range(5):
        entry_id, blob = entry_blob(bytes([i]) * 10)
        assert store.put(Space.ENTRY, MBOX, blob, "10.0.0.1", NOW)
        ids.append(entry_id)
    assert store.entry_count(MBOX) == 5
    listed, more = store.mailbox_ids(MBOX, NOW, limit=3)
    assert listed == sorted(ids)[:3] and more
    listed, more = store.mailbox_ids(MBOX, NOW, after=listed[-1], limit=3)
    assert listed == sorted(ids)[3:] and not more
    tombstone = sign_tombstone(MAILBOX, ids[:2], int(NOW))
    assert store.put(Space.TOMBSTONE, MBOX, encode_tombstone(tombstone), "10.0.0.9", NOW)
    assert store.entry_count(MBOX) == 3
    assert store.stats.deleted_by_tombstone == 2
    with pytest.raises(DeletedEntryError):  # a replica that missed the delete cannot hand it back
        store.put(Space.ENTRY, MBOX, entry_blob(bytes([0]) * 10)[1], "10.0.0.2", NOW)
    # A tombstone signed by someone else is refused, and deletes nothing.
    other = sign_tombstone(OWNER, ids[2:], int(NOW))
    with pytest.raises(ProtocolError):
        store.put(Space.TOMBSTONE, MBOX, encode_tombstone(other), "10.0.0.9", NOW)
    assert store.entry_count(MBOX) == 3
    # Once the tombstone expires it is swept, and with it the memory of the deleted ids.
    assert store.sweep(NOW + TOMBSTONE_LIFETIME + 1) >= 1
    assert len(store) == 0


def test_entries_expire() -> None:
    store = Store(OWN_ID)
    _, blob = entry_blob(b"x")
    store.put(Space.ENTRY, MBOX, blob, "10.0.0.1", NOW)
    assert store.sweep(NOW + 3600) == 0
    assert store.sweep(entry_expiry(NOW) + 1) == 1
    assert store.entry_count(MBOX) == 0 and store.total_bytes == 0 and store.source_bytes("10.0.0.1") == 0


def test_a_sweep_finds_what_expires_first_even_if_it_was_stored_last() -> None:
    # Sweeps skip the scan until the earliest expiry; an item stored later that expires sooner must move it.
    store = Store(OWN_ID)
    late = make_entry(MBOX, b"late", entry_expiry(NOW))
    soon = make_entry(MBOX, b"soon", int(NOW) + 600)
    store.put(Space.ENTRY, MBOX, encode_entry(late), "10.0.0.1", NOW)
    assert store.sweep(NOW + 1) == 0
    store.put(Space.ENTRY, MBOX, encode_entry(soon), "10.0.0.1", NOW + 1)
    assert store.sweep(NOW + 599) == 0
    assert store.sweep(NOW + 600) == 1
    assert store.entry_count(MBOX) == 1
    assert store.sweep(entry_expiry(NOW) - 1) == 0
    assert store.sweep(entry_expiry(NOW)) == 1
    assert len(store) == 0


# --- quotas -------------------------------------------------------------------------------------------------------


def test_per_key_entry_quota_is_reached() -> None:
    store = Store(OWN_ID, StoreLimits(per_key_entries=10))
    for i in range(10):
        store.put(Space.ENTRY, MBOX, entry_blob(i.to_bytes(4, "big"))[1], f"10.0.0.{i}", NOW)
    with pytest.raises(QuotaExceededError):
        store.put(Space.ENTRY, MBOX, entry_blob(b"eleventh")[1], "10.0.1.1", NOW)
    assert store.stats.refused_quota == 1


def test_per_key_byte_and_tombstone_quotas_are_reached() -> None:
    payload = bytes(1000)
    cost = len(entry_blob(payload)[1]) + ITEM_OVERHEAD_BYTES
    store = Store(OWN_ID, StoreLimits(per_key_bytes=3 * cost, per_key_tombstones=1))
    for i in range(3):
        store.put(Space.ENTRY, MBOX, entry_blob(payload[:-1] + bytes([i]))[1], "10.0.0.1", NOW)
    with pytest.raises(QuotaExceededError):
        store.put(Space.ENTRY, MBOX, entry_blob(payload[:-1] + b"\xff")[1], "10.0.0.2", NOW)
    store = Store(OWN_ID, StoreLimits(per_key_tombstones=1))
    store.put(Space.TOMBSTONE, MBOX, encode_tombstone(sign_tombstone(MAILBOX, [bytes(16)], int(NOW))), "a", NOW)
    second = sign_tombstone(MAILBOX, [bytes(15) + b"\x01"], int(NOW))
    with pytest.raises(QuotaExceededError):
        store.put(Space.TOMBSTONE, MBOX, encode_tombstone(second), "10.0.0.1", NOW)


def test_per_source_quota_is_reached_and_other_sources_still_write() -> None:
    _, blob = entry_blob(bytes(500))
    cost = len(blob) + ITEM_OVERHEAD_BYTES
    store = Store(OWN_ID, StoreLimits(per_source_bytes=4 * cost))
    for i in range(4):
        key = NodeId(bytes([i + 1]) * 20)
        store.put(Space.ENTRY, key, entry_blob(bytes(500), key)[1], "10.0.0.1", NOW)
    assert store.source_bytes("10.0.0.1") == 4 * cost
    key = NodeId(bytes([9]) * 20)
    with pytest.raises(QuotaExceededError):
        store.put(Space.ENTRY, key, entry_blob(bytes(500), key)[1], "10.0.0.1", NOW)
    assert store.put(Space.ENTRY, key, entry_blob(bytes(500), key)[1], "10.0.0.2", NOW)


def test_the_default_total_is_64_mib() -> None:
    assert StoreLimits().total_bytes == DEFAULT_TOTAL_BYTES == 64 * 1024 * 1024


def test_eviction_order_when_the_total_is_reached() -> None:
    payload = bytes(1000)
    cost = len(entry_blob(payload)[1]) + ITEM_OVERHEAD_BYTES
    store = Store(OWN_ID, StoreLimits(total_bytes=4 * cost + 50, per_source_bytes=1 << 30))
    near, middle, far = NodeId(bytes(19) + b"\x01"), NodeId(b"\x01" + bytes(19)), NodeId(b"\xff" * 20)
    store.put(Space.COMPAT, NodeId(b"\x07" * 20), b"\xa1x", "10.0.0.5", NOW)  # compat: evicted first of all
    for key in (far, far, middle):
        store.put(Space.ENTRY, key, entry_blob(payload + bytes([len(store)]), key)[1], "10.0.0.1", NOW)
    # Full: a write near our id evicts compat values first, then the oldest entry under the farthest key.
    store.put(Space.ENTRY, near, entry_blob(payload, near)[1], "10.0.0.1", NOW)
    assert store.compat(NodeId(b"\x07" * 20), NOW) is None
    store.put(Space.ENTRY, near, entry_blob(payload + b"2", near)[1], "10.0.0.1", NOW + 1)
    assert store.entry_count(far) == 1 and store.entry_count(middle) == 1 and store.entry_count(near) == 2
    assert store.stats.evicted == 2
    # A write farther than everything held is refused rather than evicting what we are responsible for.
    with pytest.raises(QuotaExceededError):
        store.put(Space.ENTRY, far, entry_blob(payload + b"3", far)[1], "10.0.0.1", NOW)
    assert store.total_bytes <= 4 * cost + 50


def test_compat_values_have_their_own_quotas_and_expire() -> None:
    store = Store(OWN_ID, StoreLimits(compat_per_source_bytes=2 * (10 + ITEM_OVERHEAD_BYTES)))
    store.put(Space.COMPAT, NodeId(b"\x01" * 20), bytes(10), "10.0.0.1", NOW)
    store.put(Space.COMPAT, NodeId(b"\x02" * 20), bytes(10), "10.0.0.1", NOW)
    with pytest.raises(QuotaExceededError):
        store.put(Space.COMPAT, NodeId(b"\x03" * 20), bytes(10), "10.0.0.1", NOW)
    assert store.source_bytes("10.0.0.1") == 0  # compat bytes never count against signed-data quotas
    assert store.compat(NodeId(b"\x01" * 20), NOW + COMPAT_TTL - 1) == bytes(10)
    assert store.compat(NodeId(b"\x01" * 20), NOW + COMPAT_TTL) is None
    total = Store(OWN_ID, StoreLimits(compat_total_bytes=2 * (10 + ITEM_OVERHEAD_BYTES)))
    for i in range(3):  # the pool is full: the oldest compat value makes room
        total.put(Space.COMPAT, NodeId(bytes([i + 1]) * 20), bytes(10), f"10.0.0.{i}", NOW + i)
    assert total.compat(NodeId(b"\x01" * 20), NOW) is None
    assert total.compat(NodeId(b"\x03" * 20), NOW) == bytes(10)


def test_largest_values_fit() -> None:
    store = Store(OWN_ID)
    key, blob = record_blob(1, bytes(MAX_VALUE_BYTES))
    assert store.put(Space.RECORD, key, blob, "10.0.0.1", NOW)
    item = store.record(key, NOW)
    assert item is not None and len(item.parts()) == -(-len(blob) // 1024)
    assert store.item(Space.RECORD, key, item.digest, NOW) is item
    assert store.item(Space.RECORD, key, bytes(16), NOW) is None


# --- persistence ----------------------------------------------------------------------------------------------------


def test_sqlite_store_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = Store(OWN_ID, backend=SqliteBackend(path), now=NOW)
    key, blob = record_blob(5, b"peer")
    store.put(Space.RECORD, key, blob, "10.0.0.1", NOW)
    ids = [entry_blob(bytes([i]) * 20)[0] for i in range(4)]
    for i in range(4):
        store.put(Space.ENTRY, MBOX, entry_blob(bytes([i]) * 20)[1], "10.0.0.2", NOW)
    store.put(Space.TOMBSTONE, MBOX, encode_tombstone(sign_tombstone(MAILBOX, ids[:1], int(NOW))), "10.0.0.3", NOW)
    store.put(Space.COMPAT, NodeId(b"\x05" * 20), b"\xa3abc", "127.0.0.1", NOW)
    store.close()  # no clean-up happens on close: what is on disk is what a kill -9 would leave

    again = Store(OWN_ID, backend=SqliteBackend(path), now=NOW + 60)
    item = again.record(key, NOW)
    assert item is not None and item.seq == 5 and item.blob == blob
    assert again.entry_count(MBOX) == 3
    assert again.compat(NodeId(b"\x05" * 20), NOW) == b"\xa3abc"
    with pytest.raises(DeletedEntryError):  # the tombstone came back too
        again.put(Space.ENTRY, MBOX, entry_blob(bytes([0]) * 20)[1], "10.0.0.2", NOW)
    assert again.total_bytes == store.total_bytes
    assert again.source_bytes("10.0.0.2") == store.source_bytes("10.0.0.2")
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    again.close()


def test_tampered_and_expired_rows_are_dropped_on_load(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = Store(OWN_ID, backend=SqliteBackend(path), now=NOW)
    key, blob = record_blob(1)
    store.put(Space.RECORD, key, blob, "10.0.0.1", NOW)
    store.put(Space.ENTRY, MBOX, entry_blob(b"keep")[1], "10.0.0.1", NOW)
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE items SET blob = ? WHERE space = ?", (blob[:-1] + bytes([blob[-1] ^ 1]), int(Space.RECORD)))
    db.execute("INSERT INTO items VALUES (99, ?, ?, ?, 'x', 0.0)", (bytes(20), b"", b"junk"))
    db.commit()
    db.close()
    again = Store(OWN_ID, backend=SqliteBackend(path), now=NOW)
    assert again.record(key, NOW) is None
    assert again.entry_count(MBOX) == 1
    assert again.stats.dropped_on_load == 2
    again.close()
    later = Store(OWN_ID, backend=SqliteBackend(path), now=entry_expiry(NOW) + 1)
    assert len(later) == 0 and later.stats.dropped_on_load == 1
    later.close()


# --- write tokens ---------------------------------------------------------------------------------------------------


def test_write_tokens_are_bound_to_address_and_key_and_expire() -> None:
    tokens = WriteTokens(random.Random(2).randbytes, now=0.0)
    key, other_key = NodeId(b"\x01" * 20), NodeId(b"\x02" * 20)
    token = tokens.issue("10.0.0.1", key, 0.0)
    assert len(token) == TOKEN_BYTES
    assert tokens.check(token, "10.0.0.1", key, 1.0)
    assert not tokens.check(token, "10.0.0.2", key, 1.0)
    assert not tokens.check(token, "10.0.0.1", other_key, 1.0)
    assert not tokens.check(token[:-1], "10.0.0.1", key, 1.0)
    assert tokens.check(token, "10.0.0.1", key, TOKEN_ROTATION + 1)  # one rotation later: still good
    assert not tokens.check(token, "10.0.0.1", key, 2 * TOKEN_ROTATION + 2)  # two: gone
    idle = WriteTokens(random.Random(3).randbytes, now=0.0)
    token = idle.issue("::1", key, 0.0)
    assert not idle.check(token, "::1", key, 10 * TOKEN_ROTATION)


# --- rate limits ----------------------------------------------------------------------------------------------------


def test_the_rate_limit_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter()
    allowed = sum(limiter.allow("10.0.0.1", 0.0) for _ in range(int(DEFAULT_BURST) + 100))
    assert allowed == DEFAULT_BURST
    assert limiter.dropped == 100
    assert limiter.allow("10.0.0.2", 0.0)  # others are not affected
    assert sum(limiter.allow("10.0.0.1", 1.0) for _ in range(1000)) == DEFAULT_RATE
    assert RateLimiter(RateLimits(rate=None)).allow("10.0.0.1", 0.0, cost=1e9)


def test_the_rate_limiter_tracks_a_bounded_number_of_sources() -> None:
    limiter = RateLimiter()
    for i in range(MAX_TRACKED_SOURCES + 500):
        limiter.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 0.0)
    assert len(limiter) == MAX_TRACKED_SOURCES
