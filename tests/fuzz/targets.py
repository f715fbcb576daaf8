"""Fuzz targets: every decoder and handler that reads network or disk input, with its invariant.

The invariant is h11's: whatever the bytes, the code under test returns (having parsed something valid) or
raises the one error type its docstring promises -- :class:`~p2pchat.errors.ProtocolError` for network input,
:class:`~p2pchat.errors.KeyFileError` for the key file, :class:`~p2pchat.errors.AddressError` for a typed
address, :class:`~p2pchat.messaging.db.DatabaseError` for a message database row -- and nothing else.  Where a
decoder holds state (the stream frame decoder, the parts reassembler, a DHT node) the target also checks that its
memory stays within the decoder's named bounds.  A violation is any other exception, an ``AssertionError``
included.

Each :class:`Target` takes one ``bytes`` input, so the same targets run under hypothesis (the bounded suite,
``tests/test_fuzz_*.py``), atheris and the seeded mutation loop (``python -m tests.fuzz.campaign``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
from zeroconf import ServiceInfo

from p2pchat.control.protocol import HEADER_BYTES, MAX_REQUEST_BYTES, FrameReader, parse_request
from p2pchat.control.protocol import encode_frame as control_frame
from p2pchat.core import envelope, ratchet, x3dh
from p2pchat.core.address import decode_address
from p2pchat.core.framing import (
    MAX_RPCUDP_DATAGRAM,
    MAX_STREAM_BUFFER,
    DatagramKind,
    FrameDecoder,
    classify_datagram,
    decode_datagram,
    decode_rpcudp,
    encode_datagram,
    unpack_strict,
)
from p2pchat.core.handshake import Handshake, ReceiveCipher
from p2pchat.core.ids import NodeId
from p2pchat.core.lan import SERVICE_TYPE, decode_txt, service_name
from p2pchat.core.messages import Content, PeerInfo, PrekeyInfo, RatchetMessage, SessionRecord, decode
from p2pchat.core.nodecert import CertCache, NodeCert
from p2pchat.core.parts import MAX_CONCURRENT_TRANSFERS, MAX_REASSEMBLY_BYTES, Part, Reassembler
from p2pchat.core.records import (
    decode_entry,
    decode_record,
    decode_tombstone,
    encode_entry,
    encode_record,
    encode_tombstone,
    mailbox_key,
    record_key,
    should_replace,
    validate_entry,
    validate_record,
    validate_tombstone,
)
from p2pchat.core.schema import from_wire, to_wire
from p2pchat.dht.store import Space, SqliteBackend, Store
from p2pchat.env import Env
from p2pchat.errors import AddressError, KeyFileError, ProtocolError, UserError
from p2pchat.home import MAX_SAVED_BOOTSTRAP, Home
from p2pchat.keyfile import KdfLimits, load_identity, save_identity
from p2pchat.messaging.db import DatabaseError, MessageDB
from p2pchat.messaging.messenger import Messenger

from .corpus import NOW, corpus, seal_raw_envelope, seeded_random_bytes

__all__ = ["TARGETS", "Target", "run_checked"]


@dataclass(frozen=True)
class Target:
    """One fuzz target: a function of one input, the errors it may raise, and valid inputs to start from."""

    name: str
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    max_size: int
    doc: str = ""
    slow: bool = field(default=False)
    """Costs milliseconds an input (SQLite, a file, Argon2): fewer examples in the suite."""


def run_checked(target: Target, data: bytes) -> bool:
    """Run *target* on *data*; True if it parsed, False if it raised an allowed error; anything else propagates."""
    try:
        target.run(data)
    except target.allowed:
        return False
    return True


# --- datagrams ------------------------------------------------------------------------------------------------


def _datagram(data: bytes) -> None:
    kind = classify_datagram(data)
    if kind is DatagramKind.P2PCHAT:
        packet = decode_datagram(data)
        # What we accept we could send, and it means the same thing.
        assert decode_datagram(encode_datagram(packet)) == packet
    else:
        decode_rpcudp(data)


# --- stream frames ----------------------------------------------------------------------------------------------


def _frames_in_chunks(data: bytes, sizes: list[int]) -> tuple[list[bytes], str | None]:
    """Feed *data* in chunks of *sizes* (cycled); the frames and the error, if any, checking the buffer bound."""
    decoder = FrameDecoder()
    frames: list[bytes] = []
    position = 0
    index = 0
    try:
        while position < len(data):
            size = sizes[index % len(sizes)]
            index += 1
            decoder.feed(data[position : position + size])
            position += size
            frames.extend(decoder.frames())
            assert decoder.buffered_size <= MAX_STREAM_BUFFER
        decoder.feed_eof()
    except ProtocolError as exc:
        # Broken for good: every later call refuses too.
        for call in (decoder.next_frame, decoder.feed_eof, lambda: decoder.feed(b"x")):
            try:
                call()
            except ProtocolError:
                continue
            raise AssertionError("a broken FrameDecoder accepted more input") from exc
        return frames, "error"
    return frames, None


def _stream_frames(data: bytes) -> None:
    whole = _frames_in_chunks(data, [max(1, len(data))])
    one_byte = _frames_in_chunks(data, [1])
    chunked = _frames_in_chunks(data, [3, 1, 7, 4096, 5])
    # The same frames whatever the chunking, and the same verdict (an error may come a frame later, never earlier).
    assert whole[1] == one_byte[1] == chunked[1], (whole[1], one_byte[1], chunked[1])
    assert whole[0] == one_byte[0] == chunked[0]
    if whole[1] is not None:
        raise ProtocolError("framing error")


# --- handshake and transport -------------------------------------------------------------------------------------


def _handshake_hello(data: bytes) -> None:
    run = corpus().handshake
    responder = Handshake(run.responder, seeded_random_bytes(run.responder_seed), initiator=False)
    responder.start()
    responder.receive(data)


def _handshake_responder_auth(data: bytes) -> None:
    run = corpus().handshake
    initiator = Handshake(run.initiator, seeded_random_bytes(run.initiator_seed), initiator=True)
    initiator.start()
    initiator.receive(data)
    assert initiator.result is not None


def _handshake_initiator_auth(data: bytes) -> None:
    run = corpus().handshake
    responder = Handshake(run.responder, seeded_random_bytes(run.responder_seed), initiator=False)
    responder.start()
    assert responder.receive(run.hello) == run.responder_auth
    responder.receive(data)
    assert responder.result is not None and responder.result.peer.key == run.initiator.public.key


def _transport_frames(data: bytes) -> None:
    """A transport frame opened as the first, second or third of a channel (after valid ones)."""
    run = corpus().handshake
    for earlier in range(len(run.frames)):
        cipher = ReceiveCipher(run.responder_key)
        for frame in run.frames[:earlier]:
            assert cipher.open(frame) is not None
        try:
            cipher.open(data)
        except ProtocolError:
            if earlier == len(run.frames) - 1:
                raise
            continue
        return


# --- records, entries, tombstones, parts ----------------------------------------------------------------------


def _record(data: bytes) -> None:
    c = corpus()
    record = decode_record(data)
    assert decode_record(encode_record(record)) == record
    try:
        validate_record(record, c.record_key, NOW)
    finally:
        # Under its own key too: a forged record must fail on its signature, not merely on the key.
        validate_record(record, record_key(record.kind, record.owner_key), NOW)
        if record.kind == c.record.kind and record.owner_key == c.record.owner_key:
            should_replace(c.record, record)


def _entry(data: bytes) -> None:
    entry = decode_entry(data)
    assert decode_entry(encode_entry(entry)) == entry
    validate_entry(entry, corpus().mailbox, NOW)


def _tombstone(data: bytes) -> None:
    tombstone = decode_tombstone(data)
    assert decode_tombstone(encode_tombstone(tombstone)) == tombstone
    try:
        validate_tombstone(tombstone, corpus().mailbox, NOW)
    finally:
        validate_tombstone(tombstone, mailbox_key(tombstone.mailbox_public_key), NOW)


def _parts(data: bytes) -> None:
    """A msgpack array of parts, fed to one reassembler from a few sources; its memory must stay in bounds."""
    items = unpack_strict(data)
    if type(items) is not list:
        raise ProtocolError("not an array of parts")
    reassembler = Reassembler()
    refused = 0
    for index, item in enumerate(items):
        try:
            part = from_wire(Part, item)
            reassembler.add(("10.0.0.1", index % 3), part, float(index) * 0.25)
        except ProtocolError:
            refused += 1
        assert reassembler.buffered_bytes <= MAX_REASSEMBLY_BYTES
        assert len(reassembler) <= MAX_CONCURRENT_TRANSFERS
    if refused:
        raise ProtocolError(f"{refused} parts refused")


# --- envelopes, X3DH, the ratchet -------------------------------------------------------------------------------


def _envelope(data: bytes) -> None:
    envelope.open_envelope(corpus().mailbox_owner, data)


def _envelope_inside(data: bytes) -> None:
    """Arbitrary bytes sealed correctly, so the decoder behind the AEAD sees them."""
    c = corpus()
    envelope.open_envelope(c.mailbox_owner, seal_raw_envelope(c.mailbox_owner, data))


def _ratchet_message(data: bytes) -> None:
    """What the messenger does with a ratchet message from Alice (see Messenger._decrypt), without a database."""
    c = corpus()
    pair = c.ratchet_pair
    message = decode(RatchetMessage, data)
    header = ratchet.decode_header(message.header)
    state = pair.bob_state
    if message.initial is not None:
        initial = x3dh.decode_initial_header(message.initial)
        prekeys, shared, _, _ = x3dh.respond(c.bob, pair.bob_prekeys, initial, NOW)
        private, public = x3dh.signed_prekey_pair(prekeys, initial.signed_prekey_id)
        state = ratchet.init_receiver(shared, private, public)
    _, plaintext = ratchet.decrypt(state, header, message.ciphertext, pair.associated_data, seeded_random_bytes(1))
    decode(Content, plaintext)


def _ratchet_header(data: bytes) -> None:
    """A header, then a decrypt with it (the skip logic runs before the AEAD refuses)."""
    pair = corpus().ratchet_pair
    header = ratchet.decode_header(data)
    assert ratchet.encode_header(header) == data
    with contextlib.suppress(ProtocolError):
        ratchet.decrypt(
            pair.bob_state, header, pair.messages[0].ciphertext, pair.associated_data, seeded_random_bytes(1)
        )


def _content(data: bytes) -> None:
    decode(Content, data)


def _bundle(data: bytes) -> None:
    c = corpus()
    try:
        bundle = x3dh.decode_bundle(data)
    except ProtocolError:
        info = decode(PrekeyInfo, data)
        bundle = x3dh.decode_bundle(info.bundle)
    x3dh.validate_bundle(bundle, c.bob.public.key, NOW)
    x3dh.initiate(c.alice, bundle, seeded_random_bytes(2))


def _initial_header(data: bytes) -> None:
    c = corpus()
    header = x3dh.decode_initial_header(data)
    x3dh.respond(c.bob, c.ratchet_pair.bob_prekeys, header, NOW)


def _disk_state(data: bytes) -> None:
    """The blobs the messenger reads back from SQLite: a session record, a ratchet state, the prekey state."""
    parsed = 0
    for decoder in (
        lambda: decode(SessionRecord, data),
        lambda: ratchet.decode_state(data),
        lambda: x3dh.decode_prekey_state(data),
        lambda: decode(PeerInfo, data),
    ):
        with contextlib.suppress(ProtocolError):
            decoder()
            parsed += 1
    if not parsed:
        raise ProtocolError("no decoder took it")


def _messenger_take(data: bytes) -> None:
    """The messenger's receive handler (``Messenger._take``, what a channel or the mailbox feeds) on a fresh
    database: byte 0 picks the claimed sender (Alice, a stranger, Bob himself), the rest is the ratchet message.
    ``_take`` catches the protocol errors itself; anything it lets out would end the task that called it."""
    c = corpus()
    if not data:
        raise ProtocolError("empty")
    sender = (c.alice.public.key, c.node.public.key, c.bob.public.key)[data[0] % 3]
    messenger = _bob_messenger()
    try:
        if not messenger._take(sender, data[1:]):
            raise ProtocolError("not taken")
        [row] = messenger.db.history()
        assert row.peer == sender and not row.outgoing
    finally:
        messenger.db.close()


def _bob_messenger() -> Messenger:
    """Bob's messenger on a fresh in-memory database holding the prekeys Alice's corpus messages were made for."""
    c = corpus()
    db = MessageDB(":memory:")
    with db.transaction():
        db.put("prekeys", x3dh.encode_prekey_state(c.ratchet_pair.bob_prekeys))
        db.put("mailbox_seed", bytes(32))
    env = Env(None, rng=random.Random(1), random_bytes=seeded_random_bytes(3), wall=lambda: float(NOW))  # type: ignore[arg-type]
    # _take needs neither the DHT nor the network: it decrypts, checks and commits.
    return Messenger(env, c.bob, None, db, host="127.0.0.1")  # type: ignore[arg-type]


# --- node certificates, LAN TXT records, addresses -------------------------------------------------------------


def _nodecert(data: bytes) -> None:
    cert = from_wire(NodeCert, unpack_strict(data))
    assert from_wire(NodeCert, to_wire(cert)) == cert
    cache = CertCache()
    with contextlib.suppress(ProtocolError):
        cache.verify(cert, "127.0.0.1", 4000, NOW)
    cache.verify(cert, cert.host, cert.port, NOW)


def _lan_txt(data: bytes) -> None:
    """TXT rdata as zeroconf hands it over (its own parser makes the properties), then our strict decoder."""
    properties = ServiceInfo(SERVICE_TYPE, f"fuzz.{SERVICE_TYPE}", properties=data).properties
    announcement = decode_txt(properties)
    decode_txt(properties, name=service_name(announcement.node_id))


def _address(data: bytes) -> None:
    decode_address(data.decode("utf-8", "replace"))


# --- the control socket, the home directory's files -----------------------------------------------------------


def _control_frames(data: bytes) -> None:
    """Control-socket bytes: frames split whole and one byte at a time (same maps, same verdict), each request
    checked; the reader never holds more than a header, one maximal body and the last chunk fed."""
    verdicts = []
    for size in (max(1, len(data)), 1):
        reader = FrameReader(MAX_REQUEST_BYTES)
        maps: list[object] = []
        verdict = None
        try:
            for start in range(0, len(data), size):
                reader.feed(data[start : start + size])
                assert reader.buffered <= HEADER_BYTES + MAX_REQUEST_BYTES + size
                while (value := reader.next()) is not None:
                    maps.append(value)
            reader.feed_eof()
        except ProtocolError as exc:
            verdict = str(exc)
        verdicts.append((maps, verdict))
    assert repr(verdicts[0]) == repr(verdicts[1]), verdicts  # repr: a NaN in a map is not equal to itself
    maps, verdict = verdicts[0]
    for value in maps:
        parse_request(value)  # type: ignore[arg-type]
    if verdict is not None:
        raise ProtocolError(verdict)


def _home_with(name: str, data: bytes) -> Home:
    home = Home(_scratch_dir() / "home")
    home.path.mkdir(exist_ok=True)
    home.key_file.write_bytes(b"")  # "an identity lives here": the profile reader checks it first
    (home.path / name).write_bytes(data)
    return home


def _profile(data: bytes) -> None:
    home = _home_with("profile.json", data)
    profile = home.profile()
    assert isinstance(profile.address, str)


def _bootstrap_file(data: bytes) -> None:
    home = _home_with(Home(Path("x")).bootstrap_file.name, data)
    addresses = home.saved_bootstrap()
    assert len(addresses) <= MAX_SAVED_BOOTSTRAP
    if not addresses:
        raise UserError("no address")


def _control_seeds() -> list[bytes]:
    requests = [
        {"id": 1, "op": "status"},
        {"id": 2, "op": "send", "to": "bob", "text": "hello"},
        {"id": 3, "op": "message", "message_id": "00" * 16},
        {"id": 4, "op": "history", "peer": None, "limit": 50},
        {"id": 5, "op": "subscribe"},
    ]
    frames = [control_frame(r, MAX_REQUEST_BYTES) for r in requests]
    return [*frames, b"".join(frames)]


def _profile_seeds() -> list[bytes]:
    c = corpus()
    return [
        json.dumps({"address": c.alice.public.address, "name": "alice"}, indent=2).encode() + b"\n",
        json.dumps({"address": c.bob.public.address, "name": None}).encode(),
    ]


# --- the key file ---------------------------------------------------------------------------------------------

PASSPHRASE = "correct horse"
"""The passphrase of the protected seed key file."""

CHEAP_KDF = KdfLimits(1, 8192)
"""The smallest Argon2id limits libsodium allows: the seed key file uses them so that unlocking costs little."""

_MAX_FUZZ_KDF_MEM = 1 << 20
"""A mutated key file is unlocked only if its Argon2id memory limit is at most this (a real file may ask for
512 MiB, which would make every input cost a second); above it only the structure is parsed."""


@functools.cache
def _scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="p2pchat-fuzz-"))


def _keyfile(data: bytes) -> None:
    path = _scratch_dir() / "identity.key"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, data)
    finally:
        os.close(descriptor)
    try:
        load_identity(path)
    except KeyFileError as exc:
        if "passphrase" not in str(exc):
            raise
        document = msgpack.unpackb(data)
        kdf = document["kdf"]
        if kdf["mem"] <= _MAX_FUZZ_KDF_MEM and kdf["ops"] <= 3:
            load_identity(path, PASSPHRASE)


def keyfile_seeds() -> list[bytes]:
    """An unprotected and a protected key file."""
    c = corpus()
    out = []
    for index, passphrase in enumerate((None, PASSPHRASE)):
        path = _scratch_dir() / f"seed-{index}.key"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        save_identity(path, c.alice, passphrase, kdf_limits=CHEAP_KDF, random_bytes=seeded_random_bytes(index))
        out.append(path.read_bytes())
    return out


# --- SQLite-loaded state --------------------------------------------------------------------------------------


def _harness_unpack(data: bytes) -> object:
    """The harness's own input format is msgpack; input that is not is refused like any other bad input."""
    try:
        return msgpack.unpackb(data, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"harness input is not msgpack: {exc}") from None


def _cell(value: object) -> tuple[str, object] | None:
    """A decoded msgpack value as an SQL placeholder and its parameter (a [bytes] list is raw, maybe bad, text)."""
    if value is None or type(value) in (bytes, str, float):
        return "?", value
    if type(value) is bool:
        return "?", int(value)
    if type(value) is int:
        return ("?", value) if -(1 << 63) <= value < (1 << 63) else None
    if type(value) is list and len(value) == 1 and type(value[0]) is bytes:
        return "CAST(? AS TEXT)", value[0]
    return None


def _insert_rows(db: sqlite3.Connection, table: str, columns: int, rows: object) -> int:
    if type(rows) is not list:
        raise ProtocolError("rows are not an array")
    inserted = 0
    for row in rows:
        if type(row) is not list:
            continue
        cells = [_cell(v) for v in (row + [None] * columns)[:columns]]
        if any(cell is None for cell in cells):
            continue
        marks = ", ".join(cell[0] for cell in cells if cell is not None)
        params = [cell[1] for cell in cells if cell is not None]
        try:
            cursor = db.execute(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", params)
        except (sqlite3.Error, OverflowError, ValueError):
            continue  # the harness could not write this row (e.g. a string with a lone surrogate)
        inserted += cursor.rowcount
    return inserted


def _store_rows(data: bytes) -> None:
    """Rows planted in a DHT store's database; reloading must drop and count the bad ones, never fail."""
    rows = _harness_unpack(data)
    backend = SqliteBackend(":memory:")
    try:
        inserted = _insert_rows(backend._db, "items", 6, rows)
        store = Store(NodeId(bytes(20)), backend=backend, now=NOW)
        assert store.stats.dropped_on_load <= inserted
        assert len(store) + store.stats.dropped_on_load <= inserted
    finally:
        backend.close()


_MESSAGE_TABLES = (("kv", 2), ("contacts", 4), ("sessions", 3), ("messages", 14), ("pending_acks", 2))
_MESSAGE_TABLES += (("seen_entries", 2), ("taken_wires", 4), ("seen_initials", 2))


def _message_rows(data: bytes) -> None:
    """Rows planted in the messenger's database; every reader returns valid rows or raises DatabaseError."""
    planted = _harness_unpack(data)
    if type(planted) is not list:
        raise ProtocolError("not an array of tables")
    db = MessageDB(":memory:")
    try:
        for (table, columns), rows in zip(_MESSAGE_TABLES, planted, strict=False):
            _insert_rows(db._db, table, columns, rows)
        keys = [bytes(r[0]) for r in db._db.execute("SELECT key FROM contacts WHERE typeof(key) = 'blob'")]
        peers = [bytes(r[0]) for r in db._db.execute("SELECT peer FROM sessions WHERE typeof(peer) = 'blob'")]
        ids = [bytes(r[0]) for r in db._db.execute("SELECT id FROM messages WHERE typeof(id) = 'blob'")]
        failures = 0
        readers: list[Callable[[], object]] = [db.history, db.open_outgoing, db.contacts, db.acks_owed]
        readers += [functools.partial(db.contact, k) for k in keys]
        readers += [functools.partial(db.session, p) for p in peers]
        readers += [functools.partial(db.message, i) for i in ids] + [functools.partial(db.next_seq, i) for i in ids]
        readers += [functools.partial(db.get, "prekeys"), functools.partial(db.taken_wire, bytes(16))]
        for read in readers:
            try:
                read()
            except DatabaseError:
                failures += 1
        if failures:
            raise DatabaseError(f"{failures} reads refused")
    finally:
        db.close()


def store_row_seeds() -> list[bytes]:
    """Valid item rows (a record, entries, a tombstone, a compat value), and rows with bad cells."""
    c = corpus()
    record = [int(Space.RECORD), c.record_key.bytes, b"", encode_record(c.record), "10.0.0.1", float(NOW)]
    entries = [
        [int(Space.ENTRY), c.mailbox.bytes, e.entry_id, encode_entry(e), "10.0.0.2", float(NOW)] for e in c.entries
    ]
    tomb_blob = encode_tombstone(c.tombstone)
    from p2pchat.core.parts import blob_digest  # noqa: PLC0415 - only the seeds need it

    tomb = [int(Space.TOMBSTONE), c.mailbox.bytes, blob_digest(tomb_blob), tomb_blob, "10.0.0.3", float(NOW)]
    compat = [int(Space.COMPAT), bytes(range(20)), b"", msgpack.packb("v"), "10.0.0.4", float(NOW)]
    odd = [[int(Space.COMPAT), bytes(range(1, 21)), b"", msgpack.packb(1), [b"\xff\xfe"], float("inf")]]
    return [
        msgpack.packb([record, *entries, tomb, compat]),
        msgpack.packb([record, *entries, *odd]),
        msgpack.packb([entries[0], tomb]),
    ]


def message_row_seeds() -> list[bytes]:
    """A small valid message database: a contact, a session, messages in and out, an ack owed."""
    c = corpus()
    peer = c.alice.public.key
    session = c.disk_states()[0]
    message_in = [bytes(16), peer, 0, "hello", float(NOW), 0, "received", 0, None, float(NOW), float(NOW)]
    message_in += [None, None, 0]
    message_out = [bytes(range(16)), peer, 1, "hi", float(NOW), 0, "queued", 0, None, float(NOW + 60), None]
    message_out += [b"wire", float(NOW), 1]
    tables = [
        [["prekeys", c.disk_states()[2]]],
        [[peer, "alice", "contact", float(NOW)]],
        [[peer, session, None]],
        [message_in, message_out],
        [[peer, bytes(16)]],
        [[bytes(16), float(NOW)]],
        [[bytes(16), peer, bytes(16), float(NOW)]],
        [[bytes(32), float(NOW)]],
    ]
    return [msgpack.packb(tables)]


# --- the registry ---------------------------------------------------------------------------------------------

_P = (ProtocolError,)


def _targets() -> dict[str, Target]:
    c = corpus
    entries = [
        Target("datagram", _datagram, _P, lambda: c().datagrams(), MAX_RPCUDP_DATAGRAM + 1, "classify + decode"),
        Target("stream_frames", _stream_frames, _P, lambda: c().stream_frames(), 8192, "FrameDecoder, 3 ways"),
        Target("handshake_hello", _handshake_hello, _P, lambda: [c().handshake.hello], 512, "message 1"),
        Target(
            "handshake_responder_auth",
            _handshake_responder_auth,
            _P,
            lambda: [c().handshake.responder_auth],
            512,
            "message 2",
        ),
        Target(
            "handshake_initiator_auth",
            _handshake_initiator_auth,
            _P,
            lambda: [c().handshake.initiator_auth],
            512,
            "message 3",
        ),
        Target("transport_frame", _transport_frames, _P, lambda: list(c().handshake.frames), 4096, "ReceiveCipher"),
        Target("record", _record, _P, lambda: [encode_record(c().record)], 4096, "decode + validate + replace"),
        Target("entry", _entry, _P, lambda: [encode_entry(e) for e in c().entries], 4096, "decode + validate"),
        Target("tombstone", _tombstone, _P, lambda: [encode_tombstone(c().tombstone)], 4096, "decode + validate"),
        Target("parts", _parts, _P, lambda: [msgpack.packb([to_wire(p) for p in ps]) for ps in c().blob_parts()], 8192),
        Target("envelope", _envelope, _P, lambda: [c().envelope], 4096, "open_envelope"),
        Target("envelope_inside", _envelope_inside, _P, _envelope_inside_seeds, 4096, "behind the AEAD"),
        Target("ratchet_message", _ratchet_message, _P, lambda: c().ratchet_messages(), 4096, "X3DH + ratchet"),
        Target("ratchet_header", _ratchet_header, _P, lambda: c().ratchet_headers(), 256, "header + skip"),
        Target(
            "messenger_take",
            _messenger_take,
            _P,
            lambda: [bytes((0,)) + m for m in c().ratchet_messages()],
            4096,
            "Messenger._take on a fresh database",
            slow=True,
        ),
        Target("content", _content, _P, lambda: c().contents(), 4096, "message plaintext"),
        Target("bundle", _bundle, _P, lambda: c().bundles(), 8192, "prekey bundle + initiate"),
        Target("initial_header", _initial_header, _P, lambda: c().initial_headers(), 512, "X3DH respond"),
        Target("disk_state", _disk_state, _P, lambda: c().disk_states(), 16384, "session/ratchet/prekey blobs"),
        Target("nodecert", _nodecert, _P, lambda: c().nodecerts(), 512, "decode + verify"),
        Target("lan_txt", _lan_txt, _P, lambda: c().txt_records(), 1024, "zeroconf TXT -> decode_txt"),
        Target("address", _address, (AddressError,), lambda: c().addresses(), 256, "decode_address"),
        Target("control_frames", _control_frames, _P, _control_seeds, 8192, "control socket frames + requests"),
        Target("profile", _profile, (UserError,), _profile_seeds, 4200, "home profile.json", slow=True),
        Target(
            "bootstrap_file",
            _bootstrap_file,
            (UserError,),
            lambda: [b"127.0.0.1:7391\n[::1]:7391\n10.0.0.1:1\n"],
            4096,
            "home bootstrap file",
            slow=True,
        ),
        Target("keyfile", _keyfile, (KeyFileError,), keyfile_seeds, 4096, "load_identity", slow=True),
        Target("store_rows", _store_rows, _P, store_row_seeds, 16384, "SqliteBackend reload", slow=True),
        Target(
            "message_rows",
            _message_rows,
            (DatabaseError, ProtocolError),
            message_row_seeds,
            16384,
            "MessageDB reads",
            slow=True,
        ),
    ]
    return {t.name: t for t in entries}


def _envelope_inside_seeds() -> list[bytes]:
    c = corpus()
    sender = c.alice
    payload = b"hello"
    signature = sender.sign(envelope.envelope_message(c.mailbox_owner.public.key, payload))
    inner = msgpack.packb(to_wire(envelope.EnvelopeContent(sender.public.key, signature, payload)))
    return [inner]


TARGETS: dict[str, Target] = _targets()
"""Every target by name (the node-level target lives in :mod:`tests.fuzz.node`)."""
