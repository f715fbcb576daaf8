"""Regression tests for what the fuzzer found, each named after the attack it stops.

* A DHT store database holding a row whose text is not UTF-8 (or whose time is infinite) made the reload raise
  out of ``Store.__init__``: one tampered row stopped the node from starting.  Now such rows are dropped and
  counted like any other row that no longer validates.
* ``DhtNode._fetch_blob`` fetched parts in a nursery: a holder answering several parts wrongly (or several
  timing out) raised an ExceptionGroup that no caller catches, so one hostile holder stopped a mailbox fetch.
* A home's profile.json of nested arrays (4 KiB of ``[`` fits its size limit) made ``json.loads`` raise
  RecursionError out of ``Home.profile`` instead of its one-line error.
* The messenger's database rows were converted with ``bytes()``/``float()``/``int()``/enum calls: a tampered
  cell raised ``ValueError``/``TypeError`` (not the module's ``DatabaseError``), was silently converted (an int
  id became that many zero bytes), or -- an id holding a large integer -- made ``bytes(n)`` allocate n bytes.
"""

from __future__ import annotations

import sqlite3
import tracemalloc
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import trio.testing
from fuzz.corpus import NOW, corpus, identity
from fuzz.node import node_under_fire

from p2pchat.core.framing import decode_datagram, encode_datagram
from p2pchat.core.ids import NodeId
from p2pchat.core.nodecert import NodeCert, issue_cert
from p2pchat.core.packets import (
    EntryIds,
    FindNode,
    FindValue,
    Found,
    GetPart,
    ListEntries,
    Nodes,
    PartReply,
    Ping,
    Pong,
)
from p2pchat.core.parts import make_parts
from p2pchat.core.records import decode_entry, encode_entry, encode_record, entry_expiry, make_entry
from p2pchat.core.schema import Packet
from p2pchat.dht.store import Space, SqliteBackend, Store
from p2pchat.errors import UserError
from p2pchat.home import Home
from p2pchat.messaging.db import DatabaseError, MessageDB
from p2pchat.net.base import DatagramEndpoint

OWN_ID = NodeId(bytes(20))


def _store_with_one_record(path: Path) -> None:
    c = corpus()
    store = Store(OWN_ID, backend=SqliteBackend(path), now=NOW)
    assert store.put(Space.RECORD, c.record_key, encode_record(c.record), "10.0.0.1", NOW)
    store.close()


def _plant(path: Path, sql: str, params: tuple[object, ...]) -> None:
    with sqlite3.connect(path) as db:
        db.execute(sql, params)
    db.close()


def test_store_row_with_text_that_is_not_utf8_is_dropped_and_the_rest_reloads(tmp_path: Path) -> None:
    path = tmp_path / "dht.sqlite"
    _store_with_one_record(path)
    c = corpus()
    entry = c.entries[0]
    _plant(
        path,
        "INSERT INTO items VALUES (?, ?, ?, ?, CAST(? AS TEXT), ?)",
        (int(Space.ENTRY), c.mailbox.bytes, entry.entry_id, encode_entry(entry), b"\xff\xfe", float(NOW)),
    )
    store = Store(OWN_ID, backend=SqliteBackend(path), now=NOW)
    assert store.stats.dropped_on_load == 1
    assert store.record(c.record_key, NOW) is not None
    assert store.item(Space.ENTRY, c.mailbox, entry.entry_id, NOW) is None
    store.close()


@pytest.mark.parametrize("stored_at", [float("inf"), float("-inf")])  # SQLite stores NaN as NULL
def test_store_row_with_a_time_that_is_not_finite_is_dropped(tmp_path: Path, stored_at: float) -> None:
    path = tmp_path / "dht.sqlite"
    _store_with_one_record(path)
    _plant(
        path,
        "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
        (int(Space.COMPAT), bytes(range(20)), b"", msgpack.packb("v"), "10.0.0.9", stored_at),
    )
    store = Store(OWN_ID, backend=SqliteBackend(path), now=NOW)
    assert store.stats.dropped_on_load == 1
    assert len(store) == 1
    store.close()


def _messages_db(tmp_path: Path) -> Path:
    path = tmp_path / "messages.sqlite"
    MessageDB(path).close()
    return path


_MESSAGE = "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


@pytest.mark.parametrize(
    ("sql", "params", "read"),
    [
        ("INSERT INTO contacts VALUES (?, ?, ?, ?)", (b"k" * 32, "eve", "friend", 1.0), "contacts"),
        ("INSERT INTO contacts VALUES (?, ?, ?, ?)", (b"k" * 32, "eve", "contact", "yesterday"), "contacts"),
        ("INSERT INTO contacts VALUES (?, ?, ?, ?)", ("not a key", "eve", "contact", 1.0), "contacts"),
        ("INSERT INTO contacts VALUES (?, CAST(? AS TEXT), ?, ?)", (b"k" * 32, b"\xff", "contact", 1.0), "contacts"),
        (_MESSAGE, (b"i" * 16, b"p" * 32, 1, "hi", 1.0, 0, "lost", 0, None, 9.0, None, None, None, 0), "history"),
        (_MESSAGE, (b"i" * 16, b"p" * 32, 1, b"blob", 1.0, 0, "queued", 0, None, 9.0, None, None, None, 0), "history"),
        (_MESSAGE, (b"i" * 16, b"p" * 32, 1, "hi", "soon", 0, "queued", 0, None, 9.0, None, None, 1.0, 0), "outbox"),
        ("INSERT INTO sessions VALUES (?, ?, ?)", (b"p" * 32, "not a blob", None), "session"),
        ("INSERT INTO pending_acks VALUES (?, ?)", (b"p" * 32, 12), "acks"),
        ("INSERT INTO kv VALUES (?, ?)", ("prekeys", 7), "kv"),
    ],
)
def test_message_db_cell_of_the_wrong_type_is_a_database_error(
    tmp_path: Path, sql: str, params: tuple[object, ...], read: str
) -> None:
    path = _messages_db(tmp_path)
    _plant(path, sql, params)
    db = MessageDB(path)
    readers = {
        "contacts": db.contacts,
        "history": db.history,
        "outbox": db.open_outgoing,
        "session": lambda: db.session(b"p" * 32),
        "acks": db.acks_owed,
        "kv": lambda: db.get("prekeys"),
    }
    with pytest.raises(DatabaseError, match="corrupt"):
        readers[read]()
    db.close()


def test_message_db_id_holding_a_huge_integer_allocates_nothing(tmp_path: Path) -> None:
    # bytes(n) of an integer cell would have allocated n bytes: here 2**40, a terabyte.
    path = _messages_db(tmp_path)
    row = (2**40, b"p" * 32, 1, "hi", 1.0, 0, "queued", 0, None, 9.0, None, None, 1.0, 0)
    _plant(path, _MESSAGE, row)
    db = MessageDB(path)
    tracemalloc.start()
    try:
        with pytest.raises(DatabaseError, match="message id"):
            db.open_outgoing()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        db.close()
    assert peak < 1024 * 1024


def test_message_db_valid_rows_still_read(tmp_path: Path) -> None:
    # The strict readers accept what the messenger writes, an infinite expiry (received messages) included.
    path = _messages_db(tmp_path)
    peer = b"p" * 32
    _plant(path, _MESSAGE, (b"i" * 16, peer, 0, "hi", 1.0, 3, "received", 0, None, float("inf"), 2.0, None, None, 0))
    _plant(path, "INSERT INTO contacts VALUES (?, ?, ?, ?)", (peer, None, "request", 1))
    db = MessageDB(path)
    [row] = db.history(peer)
    assert (row.text, row.seq, row.expires_at, row.received_at) == ("hi", 3, float("inf"), 2.0)
    contact = db.contact(peer)
    assert contact is not None and contact.added_at == 1.0 and contact.name is None
    assert db.next_seq(peer) == 0
    db.close()


async def _wrong_parts_holder(liar: DatagramEndpoint, cert: NodeCert, mailbox: NodeId, entry_blob: bytes) -> None:
    """Holds one entry of three parts: sends part 0 properly, answers every other part with the wrong packet."""
    parts = make_parts(entry_blob, b"transfer")
    entry_id = decode_entry(entry_blob).entry_id
    while True:
        for data, source in await liar.receive_batch():
            request = decode_datagram(data)
            reply: Packet
            if isinstance(request, Ping):
                reply = Pong(request.txid, cert, source.host, source.port)
            elif isinstance(request, (FindNode, FindValue)):
                reply = Found(request.txid, cert, (), bytes(16), None, None, 1)
                if isinstance(request, FindNode):
                    reply = Nodes(request.txid, cert, ())
            elif isinstance(request, ListEntries):
                reply = EntryIds(request.txid, (entry_id,) if not request.after else (), False)
            elif isinstance(request, GetPart) and request.index == 0:
                reply = PartReply(request.txid, parts[0])
            else:
                reply = Nodes(request.txid, cert, ())  # the wrong answer to a GetPart
            liar.send(encode_datagram(reply), source)


async def test_holder_answering_every_part_wrongly_cannot_crash_a_mailbox_fetch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Several parts failing at once used to escape DhtNode._fetch_blob as an ExceptionGroup, which neither
    # fetch_mailbox nor the messenger's mailbox loop catches: one hostile holder could stop a node's mail.
    c = corpus()
    big = make_entry(c.mailbox, bytes(range(256)) * 10, entry_expiry(NOW))
    blob = encode_entry(big)
    assert len(make_parts(blob, b"transfer")) >= 3
    async with node_under_fire(seed=12) as fire, trio.open_nursery() as nursery:
        host = fire.net.add_host()
        liar = await host.open_datagram(host.address, 4000)
        cert = issue_cert(identity(97), host.address, 4000, int(fire.honest.env.wall_time()))
        nursery.start_soon(_wrong_parts_holder, liar, cert, c.mailbox, blob)
        await fire.honest.ping(liar.local_address)
        result = await fire.honest.fetch_mailbox(c.mailbox)
        assert result.entries == [] and result.invalid == 1 and result.holders == 1
        nursery.cancel_scope.cancel()


def test_profile_nested_deeper_than_python_recursion_is_damaged_not_a_crash(tmp_path: Path) -> None:
    # 4 KiB of "[" fits the profile's size limit, and json.loads raised RecursionError, which escaped Home.profile
    # as a traceback instead of the one-line "damaged" error.
    home = Home(tmp_path / "home")
    home.make_private()
    home.key_file.write_bytes(b"")
    home.profile_file.write_bytes(b"[" * 2000 + b"]" * 2000)
    with pytest.raises(UserError, match="damaged"):
        home.profile()
