"""What a DHT node holds for others: records, mailbox entries, tombstones and compat values, within quotas.

The store is plain code (no trio, no network): the node hands it a blob that arrived under a key from a source IP,
and the store decodes it, validates it (:mod:`p2pchat.core.records`), applies the replacement and tombstone
rules, enforces the quotas, and persists the change through an optional backend.  Everything it holds is also
kept in memory -- the quotas bound that to :attr:`StoreLimits.total_bytes` plus indexes -- so lookups never touch
the disk and a simulation can run thousands of stores without a database (``backend=None``).

Persistence: :class:`SqliteBackend` writes every change to SQLite in WAL mode before the store returns, so what a
node acknowledged survives kill -9; on start the store reloads every row and validates it again as if it had come
from the network (a corrupt or tampered row is dropped and counted, never trusted).

Quotas (:class:`StoreLimits`; refused writes raise :class:`QuotaExceededError`):

* per key: at most ``per_key_entries`` entries, ``per_key_tombstones`` tombstones and ``per_key_bytes`` bytes
  in one mailbox; a record key holds one record;
* per source IP: at most ``per_source_bytes`` bytes written by one IP address and still held;
* compat values (the ``kademlia`` package's plain values) have their own pool: ``compat_total_bytes`` in all,
  ``compat_per_source_bytes`` per IP;
* in total: ``total_bytes`` (default 64 MiB) over everything.

Eviction order when the total is reached (documented in docs/protocol.md):

1. expired items (the sweep runs first);
2. compat values, oldest first (they are best-effort and unauthenticated);
3. items under the key farthest (XOR) from this node's id -- the data this node is least responsible for --
   entries and records oldest first, tombstones last within a key.

A write is refused rather than evicting anything under a key at least as close to this node as its own key, so
an outsider cannot push out the data this node is responsible for with data it is not.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from p2pchat.core.ids import NODE_ID_BYTES, NodeId
from p2pchat.core.parts import Part, blob_digest, split
from p2pchat.core.records import (
    decode_entry,
    decode_record,
    decode_tombstone,
    should_replace,
    tombstone_expires_at,
    validate_entry,
    validate_record,
    validate_tombstone,
)
from p2pchat.dbfile import open_database
from p2pchat.errors import ProtocolError

__all__ = [
    "COMPAT_TTL",
    "DEFAULT_TOTAL_BYTES",
    "ITEM_OVERHEAD_BYTES",
    "DeletedEntryError",
    "Item",
    "QuotaExceededError",
    "Space",
    "SqliteBackend",
    "Store",
    "StoreBackend",
    "StoreLimits",
    "StoreStats",
]

log = logging.getLogger(__name__)

DEFAULT_TOTAL_BYTES: Final = 64 * 1024 * 1024
"""Default cap on everything a node holds for others."""

COMPAT_TTL: Final = 24 * 3600
"""How long a plain value stored by a ``kademlia`` peer lives (that package republishes hourly)."""

ITEM_OVERHEAD_BYTES: Final = 1024
"""Bytes charged per item on top of its blob, for its key, ids and index entries, so that a flood of tiny items
costs its sender quota too.  Measured: an item costs the Python process about 1,000 bytes besides its blob (the
Item, its ids, its slot and index entries, its source's entry).  At the former 128, a store filled with one-byte
entries from many addresses held 420 MiB for its 64 MiB quota; at 1,024 its memory is within 1.25 times
:attr:`StoreLimits.total_bytes` (``tests/test_fuzz_flood.py``)."""


class Space(enum.IntEnum):
    """What kind of item; the same 160-bit key may name different things in different spaces."""

    RECORD = 1
    ENTRY = 2
    TOMBSTONE = 3
    COMPAT = 4


class QuotaExceededError(ProtocolError):
    """The write would exceed a quota (per key, per source, or in total)."""


class DeletedEntryError(ProtocolError):
    """The entry was deleted by a tombstone this store still holds; it is not taken back."""


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """The store's quotas.  Nodes sharing one IP (a benchmark on loopback) need a higher ``per_source_bytes``."""

    total_bytes: int = DEFAULT_TOTAL_BYTES
    per_source_bytes: int = 4 * 1024 * 1024
    per_key_bytes: int = 4 * 1024 * 1024
    per_key_entries: int = 1024
    per_key_tombstones: int = 256
    compat_total_bytes: int = 4 * 1024 * 1024
    compat_per_source_bytes: int = 256 * 1024


@dataclass(slots=True)
class Item:
    """One stored blob, and what the quotas and eviction need to know about it."""

    space: Space
    key: NodeId
    item_id: bytes
    """Records and compat values: empty (one per key).  Entries: the entry id.  Tombstones: the blob digest."""
    blob: bytes
    expires_at: int
    source: str
    stored_at: float
    seq: int = 0
    deletes: tuple[bytes, ...] = ()
    """A tombstone's entry ids."""
    _digest: bytes | None = field(default=None, repr=False)

    @property
    def cost(self) -> int:
        """Bytes charged to quotas."""
        return len(self.blob) + ITEM_OVERHEAD_BYTES

    @property
    def digest(self) -> bytes:
        """The blob digest every part of it announces (computed once)."""
        if self._digest is None:
            self._digest = blob_digest(self.blob)
        return self._digest

    def parts(self) -> list[Part]:
        """The blob cut into parts, each under a transfer id derived from the digest.

        Cut afresh on each call rather than kept: kept parts would be a second copy of every blob ever served,
        and a full store would hold twice its quota.  Cutting a blob of at most 69 KiB costs microseconds.
        """
        digest = self.digest
        chunks = split(self.blob)
        return [Part(digest[:8], index, len(chunks), digest, chunk) for index, chunk in enumerate(chunks)]


@dataclass(slots=True)
class StoreStats:
    """Counters: what was refused and why, and what left."""

    stored: int = 0
    replaced: int = 0
    refused_invalid: int = 0
    refused_quota: int = 0
    refused_stale: int = 0
    refused_deleted: int = 0
    evicted: int = 0
    expired: int = 0
    deleted_by_tombstone: int = 0
    dropped_on_load: int = 0


class StoreBackend(Protocol):
    """Where a store persists its items (:class:`SqliteBackend`); ``None`` keeps them in memory only."""

    def load(self) -> Iterator[tuple[int, bytes, bytes, bytes, str, float]]:
        """Every row: ``(space, key, item_id, blob, source, stored_at)``."""
        ...

    def save(self, item: Item) -> None:
        """Insert or replace *item*, durably."""
        ...

    def delete(self, items: Iterable[Item]) -> None:
        """Remove *items*, durably."""
        ...

    def delete_rows(self, rows: Iterable[tuple[object, object, object]]) -> None:
        """Remove rows by their raw primary key ``(space, key, item_id)`` (rows that did not load)."""
        ...

    def close(self) -> None:
        """Release the database."""
        ...


_ADVICE: Final = (
    "move it away and start again: it holds only copies of other users' data, which their other replicas hand over"
)
"""What to do about a damaged DHT store."""


def _create_items(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE items ("
        " space INTEGER NOT NULL, key BLOB NOT NULL, item_id BLOB NOT NULL, blob BLOB NOT NULL,"
        " source TEXT NOT NULL, stored_at REAL NOT NULL, PRIMARY KEY (space, key, item_id)) WITHOUT ROWID"
    )


def _foreign(db: sqlite3.Connection) -> str | None:
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'").fetchone()
    return None if found is not None else "not a p2pchat DHT store (it has no items table)"


class SqliteBackend:
    """Items in one SQLite table, WAL mode.

    ``synchronous=NORMAL`` in WAL mode makes each commit durable against a crash of the process (kill -9), which is
    the promise the node makes; only a power loss can take the last commits back.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # A damaged file is refused (DatabaseError), never replaced: see p2pchat.dbfile.
        self._db = open_database(path, _create_items, advice=_ADVICE, foreign=_foreign)
        self._db.text_factory = _text_or_bytes

    def load(self) -> Iterator[tuple[int, bytes, bytes, bytes, str, float]]:
        """Every stored row (types are checked by the store, which trusts nothing from disk)."""
        yield from self._db.execute("SELECT space, key, item_id, blob, source, stored_at FROM items")

    def save(self, item: Item) -> None:
        """Insert or replace one item (one transaction)."""
        self._db.execute(
            "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?)",
            (int(item.space), item.key.bytes, item.item_id, item.blob, item.source, item.stored_at),
        )

    def delete(self, items: Iterable[Item]) -> None:
        """Remove items (one transaction)."""
        self.delete_rows((int(i.space), i.key.bytes, i.item_id) for i in items)

    def delete_rows(self, rows: Iterable[tuple[object, object, object]]) -> None:
        """Remove rows by raw primary key (one transaction)."""
        rows = list(rows)
        if rows:
            with self._db:
                self._db.executemany("DELETE FROM items WHERE space = ? AND key = ? AND item_id = ?", rows)

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def _text_or_bytes(raw: bytes) -> str | bytes:
    """SQLite text as str; text that is not UTF-8 (a corrupt or tampered row) stays bytes, which the reload then
    drops and counts as a malformed row -- sqlite3's own decoder would raise and stop the whole reload."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


_MAILBOX_SPACES: Final = (Space.ENTRY, Space.TOMBSTONE)


class _Slot:
    """Everything stored under one key in one group of spaces (records; a mailbox; compat)."""

    __slots__ = ("bytes", "deleted", "entries", "items", "tombstones")

    def __init__(self) -> None:
        self.items: dict[tuple[Space, bytes], Item] = {}
        self.bytes = 0
        self.entries = 0
        self.tombstones = 0
        self.deleted: dict[bytes, int] = {}
        """Entry ids deleted by a held tombstone -> when the last such tombstone expires."""


def _group(space: Space) -> Space:
    return Space.ENTRY if space in _MAILBOX_SPACES else space


class Store:
    """The items this node holds for others.  See the module docstring for the rules."""

    def __init__(
        self,
        own_id: NodeId,
        limits: StoreLimits | None = None,
        backend: StoreBackend | None = None,
        *,
        now: float | None = None,
    ) -> None:
        self.own_id = own_id
        self.limits = limits or StoreLimits()
        self.backend = backend
        self.stats = StoreStats()
        self._slots: dict[tuple[Space, NodeId], _Slot] = {}
        self._next_expiry = math.inf
        """No item expires before this (an item's expiry may have moved later since): sweeps until then are free.
        Every node sweeps once a minute, and a scan of everything held was 2% of a churn simulation's CPU."""
        self._by_source: dict[str, int] = {}
        self._compat_by_source: dict[str, int] = {}
        self.total_bytes = 0
        self.compat_bytes = 0
        if backend is not None:
            self._load(backend, now)

    # --- reading ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(slot.items) for slot in self._slots.values())

    def record(self, key: NodeId, now: float) -> Item | None:
        """The record held under *key*, if any and not expired."""
        item = self._get(Space.RECORD, key, b"")
        return item if item is not None and item.expires_at > now else None

    def compat(self, key: NodeId, now: float) -> bytes | None:
        """The compat value held under *key*, if any and not expired."""
        item = self._get(Space.COMPAT, key, b"")
        return item.blob if item is not None and item.expires_at > now else None

    def item(self, space: Space, key: NodeId, item_id: bytes, now: float) -> Item | None:
        """One item by its id (records: the blob digest), if held and not expired."""
        if space in (Space.RECORD, Space.COMPAT):
            item = self._get(space, key, b"")
            if item is not None and item.digest != item_id:
                return None
        else:
            item = self._get(space, key, item_id)
        return item if item is not None and item.expires_at > now else None

    def entry_count(self, key: NodeId) -> int:
        """Entries held in the mailbox *key*."""
        slot = self._slots.get((Space.ENTRY, key))
        return 0 if slot is None else slot.entries

    def mailbox_ids(self, key: NodeId, now: float, after: bytes = b"", limit: int = 64) -> tuple[list[bytes], bool]:
        """Up to *limit* ids of live entries in mailbox *key*, in byte order after *after*; and whether there are
        more."""
        slot = self._slots.get((Space.ENTRY, key))
        if slot is None:
            return [], False
        ids = sorted(
            item_id
            for (space, item_id), item in slot.items.items()
            if space is Space.ENTRY and item.expires_at > now and item_id > after
        )
        return ids[:limit], len(ids) > limit

    def items(self) -> list[Item]:
        """Every item held (a snapshot, for hand-over)."""
        return [item for slot in self._slots.values() for item in slot.items.values()]

    def items_for(self, space: Space, key: NodeId) -> list[Item]:
        """The items held under *key* in *space*'s group (a mailbox's entries and tombstones together)."""
        slot = self._slots.get((_group(space), key))
        return [] if slot is None else list(slot.items.values())

    def keys(self) -> list[tuple[Space, NodeId]]:
        """Every (space group, key) held."""
        return list(self._slots)

    def source_bytes(self, source: str) -> int:
        """Bytes held that *source* wrote (compat values not included)."""
        return self._by_source.get(source, 0)

    # --- writing ---------------------------------------------------------------------------------------------

    def put(self, space: Space, key: NodeId, blob: bytes, source: str, now: float) -> bool:
        """Validate and store *blob*, which arrived under *key* from *source* at wall time *now*.

        Returns True if something changed, False if the same thing was already held.  Raises
        :class:`~p2pchat.errors.ProtocolError` (a subclass says why) if the blob is refused.
        """
        try:
            item = self._make_item(space, key, blob, source, now)
        except QuotaExceededError:
            raise
        except ProtocolError:
            self.stats.refused_invalid += 1
            raise
        return self._insert(item, now, persist=True)

    def sweep(self, now: float) -> int:
        """Drop everything expired; return how many items went."""
        if now < self._next_expiry:
            return 0
        gone: list[Item] = []
        next_expiry = math.inf
        for slot in self._slots.values():
            for item in slot.items.values():
                if item.expires_at <= now:
                    gone.append(item)
                elif item.expires_at < next_expiry:
                    next_expiry = item.expires_at
        self._next_expiry = next_expiry
        for item in gone:
            self._remove(item)
        if gone and self.backend is not None:
            self.backend.delete(gone)
        self.stats.expired += len(gone)
        return len(gone)

    def close(self) -> None:
        """Close the backend."""
        if self.backend is not None:
            self.backend.close()

    # --- internals -------------------------------------------------------------------------------------------

    def _get(self, space: Space, key: NodeId, item_id: bytes) -> Item | None:
        slot = self._slots.get((_group(space), key))
        return None if slot is None else slot.items.get((space, item_id))

    def _make_item(self, space: Space, key: NodeId, blob: bytes, source: str, now: float) -> Item:
        if space is Space.RECORD:
            record = decode_record(blob)
            validate_record(record, key, now)
            return Item(space, key, b"", blob, record.expires_at, source, now, seq=record.seq)
        if space is Space.ENTRY:
            entry = decode_entry(blob)
            validate_entry(entry, key, now)
            return Item(space, key, entry.entry_id, blob, entry.expires_at, source, now)
        if space is Space.TOMBSTONE:
            tombstone = decode_tombstone(blob)
            validate_tombstone(tombstone, key, now)
            item_id = blob_digest(blob)
            return Item(
                space, key, item_id, blob, tombstone_expires_at(tombstone), source, now, deletes=tombstone.entry_ids
            )
        if space is Space.COMPAT:
            return Item(space, key, b"", blob, int(now) + COMPAT_TTL, source, now)
        raise ProtocolError(f"unknown store space {space!r}")

    def _insert(self, item: Item, now: float, *, persist: bool) -> bool:
        slot_key = (_group(item.space), item.key)
        slot = self._slots.get(slot_key)
        old = None if slot is None else slot.items.get((item.space, item.item_id))
        if old is not None and old.blob == item.blob:
            if item.space is Space.COMPAT and item.expires_at > old.expires_at:
                # A kademlia peer republishes hourly: the same value again extends its life.
                old.expires_at = item.expires_at
                old.stored_at = item.stored_at
                if persist and self.backend is not None:
                    self.backend.save(old)
            return False
        if item.space is Space.RECORD and old is not None:
            try:
                if not should_replace(decode_record(old.blob), decode_record(item.blob)):
                    return False  # the same record, encoded differently: keep the blob we advertise
            except ProtocolError:
                self.stats.refused_stale += 1
                raise
        if item.space is Space.ENTRY and slot is not None and item.item_id in slot.deleted:
            self.stats.refused_deleted += 1
            raise DeletedEntryError("this mailbox entry was deleted by its owner")
        self._check_quotas(item, old, slot, now)
        if old is not None:
            self._remove(old)
            self.stats.replaced += 1
        slot = self._slots.setdefault(slot_key, _Slot())
        slot.items[(item.space, item.item_id)] = item
        self._next_expiry = min(self._next_expiry, item.expires_at)
        slot.bytes += item.cost
        if item.space is Space.COMPAT:
            self.compat_bytes += item.cost
            self._compat_by_source[item.source] = self._compat_by_source.get(item.source, 0) + item.cost
        else:
            self._by_source[item.source] = self._by_source.get(item.source, 0) + item.cost
        self.total_bytes += item.cost
        removed: list[Item] = []
        if item.space is Space.ENTRY:
            slot.entries += 1
        elif item.space is Space.TOMBSTONE:
            slot.tombstones += 1
            for entry_id in item.deletes:
                slot.deleted[entry_id] = max(slot.deleted.get(entry_id, 0), item.expires_at)
                victim = slot.items.get((Space.ENTRY, entry_id))
                if victim is not None:
                    removed.append(victim)
            for victim in removed:
                self._remove(victim)
            self.stats.deleted_by_tombstone += len(removed)
        self.stats.stored += 1
        if persist and self.backend is not None:
            self.backend.save(item)
            self.backend.delete(removed)
        return True

    def _check_quotas(self, item: Item, old: Item | None, slot: _Slot | None, now: float) -> None:
        limits = self.limits
        freed = old.cost if old is not None else 0
        growth = item.cost - freed

        def refuse(why: str) -> QuotaExceededError:
            self.stats.refused_quota += 1
            return QuotaExceededError(why)

        if item.space is Space.COMPAT:
            if self._compat_by_source.get(item.source, 0) + growth > limits.compat_per_source_bytes:
                raise refuse(f"compat quota for {item.source} ({limits.compat_per_source_bytes} bytes) reached")
            while self.compat_bytes + growth > limits.compat_total_bytes:
                if not self._evict_one(item, compat_only=True):
                    raise refuse("compat store is full")
        else:
            if self._by_source.get(item.source, 0) + growth > limits.per_source_bytes:
                raise refuse(f"quota for source {item.source} ({limits.per_source_bytes} bytes) reached")
            if slot is not None:
                if slot.bytes + growth > limits.per_key_bytes:
                    raise refuse(f"quota for this key ({limits.per_key_bytes} bytes) reached")
                if item.space is Space.ENTRY and old is None and slot.entries >= limits.per_key_entries:
                    raise refuse(f"mailbox holds {limits.per_key_entries} entries already")
                if item.space is Space.TOMBSTONE and old is None and slot.tombstones >= limits.per_key_tombstones:
                    raise refuse(f"mailbox holds {limits.per_key_tombstones} tombstones already")
        if self.total_bytes + growth > limits.total_bytes:
            self.sweep(now)
        while self.total_bytes + growth > limits.total_bytes:
            if not self._evict_one(item, compat_only=False):
                raise refuse(f"store is full ({limits.total_bytes} bytes)")

    def _evict_one(self, incoming: Item, *, compat_only: bool) -> bool:
        """Evict the first item in the documented order; False if nothing may be evicted for *incoming*."""
        compat = [
            item for (group, _), slot in self._slots.items() if group is Space.COMPAT for item in slot.items.values()
        ]
        if compat:
            victim = min(compat, key=lambda i: i.stored_at)
            if incoming.space is Space.COMPAT and victim is incoming:
                return False
            self._evict(victim)
            return True
        if compat_only or incoming.space is Space.COMPAT:
            return False
        farthest = max(
            (slot_key for slot_key, slot in self._slots.items() if slot.items),
            key=lambda slot_key: slot_key[1].distance(self.own_id),
            default=None,
        )
        if farthest is None or farthest[1].distance(self.own_id) <= incoming.key.distance(self.own_id):
            return False
        slot = self._slots[farthest]
        victim = min(slot.items.values(), key=lambda i: (i.space is Space.TOMBSTONE, i.stored_at))
        self._evict(victim)
        return True

    def _evict(self, victim: Item) -> None:
        self._remove(victim)
        self.stats.evicted += 1
        if self.backend is not None:
            self.backend.delete([victim])

    def _remove(self, item: Item) -> None:
        slot_key = (_group(item.space), item.key)
        slot = self._slots[slot_key]
        del slot.items[(item.space, item.item_id)]
        slot.bytes -= item.cost
        self.total_bytes -= item.cost
        if item.space is Space.COMPAT:
            self.compat_bytes -= item.cost
            _debit(self._compat_by_source, item.source, item.cost)
        else:
            _debit(self._by_source, item.source, item.cost)
        if item.space is Space.ENTRY:
            slot.entries -= 1
        elif item.space is Space.TOMBSTONE:
            slot.tombstones -= 1
            slot.deleted = {}
            for other in slot.items.values():
                if other.space is Space.TOMBSTONE:
                    for entry_id in other.deletes:
                        slot.deleted[entry_id] = max(slot.deleted.get(entry_id, 0), other.expires_at)
        if not slot.items:
            del self._slots[slot_key]

    def _load(self, backend: StoreBackend, now: float | None) -> None:
        if now is None:
            raise ValueError("a store with a backend needs the wall time to reload it")
        rows = list(backend.load())
        # Tombstones first, so that an entry they delete is not taken back on reload.
        rows.sort(key=lambda row: 0 if row[0] == Space.TOMBSTONE else 1)
        dropped: list[tuple[object, object, object]] = []
        for row in rows:
            try:
                space_value, key_bytes, item_id, blob, source, stored_at = row
                if not (
                    isinstance(space_value, int)
                    and isinstance(key_bytes, bytes)
                    and len(key_bytes) == NODE_ID_BYTES
                    and isinstance(item_id, bytes)
                    and isinstance(blob, bytes)
                    and isinstance(source, str)
                    and isinstance(stored_at, float | int)
                    and math.isfinite(stored_at)
                ):
                    raise ProtocolError("malformed row")
                space = Space(space_value)
                key = NodeId(key_bytes)
                item = self._make_item(space, key, blob, source, now)
                if item.item_id != item_id:
                    raise ProtocolError("row id does not match its blob")
                item.stored_at = float(stored_at)
                if space is Space.COMPAT:
                    item.expires_at = int(stored_at) + COMPAT_TTL
                    if item.expires_at <= now:
                        raise ProtocolError("compat value expired")
                self._insert(item, now, persist=False)
            except (ProtocolError, ValueError) as exc:
                log.warning("dropping a stored item that no longer validates: %s", exc)
                self.stats.dropped_on_load += 1
                with contextlib.suppress(TypeError, IndexError):
                    dropped.append((row[0], row[1], row[2]))
        if dropped:
            backend.delete_rows(dropped)


def _debit(table: dict[str, int], source: str, amount: int) -> None:
    left = table.get(source, 0) - amount
    if left > 0:
        table[source] = left
    else:
        table.pop(source, None)
