"""A corrupt or truncated database or key file gives a clear error and is never silently replaced.

The home's three files that matter -- ``messages.sqlite`` (history, sessions, outbox), ``dht.sqlite`` (what the
node holds for others) and ``identity.key`` -- are damaged in the ways disks and crashes damage files: truncated to
nothing, cut in half, overwritten with garbage, a byte flipped in the file header or in a page's structure (for
the key file: in the seed).  Opening each the way a node does must raise the project's error, one line naming
the file and what to do, and leave the file byte for byte as it was; ``p2pchat run`` and ``p2pchat send`` on a
damaged home exit 1 with that one line.  Sweeps then flip every bit of the key file and hundreds of bits of each
database: the only error is the project's, and a refused file is never changed.

What SQLite cannot see: it keeps no page checksums, so a flipped bit inside a stored value (a message's text)
leaves a well-formed database.  Stored signed records are validated again on load (a bad one is dropped and
counted, ``tests/test_store.py``), and session and prekey states are decoded strictly when read.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pchat.cli.passphrases import unlock
from p2pchat.core.identity import Identity
from p2pchat.core.records import (
    RecordKind,
    encode_entry,
    encode_record,
    entry_expiry,
    mailbox_key,
    make_entry,
    record_key,
    sign_record,
)
from p2pchat.dbfile import MAX_REASON_CHARS, DatabaseError, damaged
from p2pchat.dht.store import Space, SqliteBackend, Store
from p2pchat.errors import UserError
from p2pchat.home import Home
from p2pchat.messaging.db import MessageDB

LOOPBACK = ["--host", "127.0.0.1", "--udp-port", "0", "--tcp-port", "0", "--no-lan"]
COMMAND_DEADLINE = 60.0
"""Seconds one command may take (each refuses at once; this only bounds a hang)."""


def _p2pchat(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pchat", "--home", str(home), *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=COMMAND_DEADLINE,
        check=False,
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home as a user has it after a while: an identity, a contact, a queued message, and a DHT store holding a
    record and mailbox entries for others.  Built once; each test damages a copy."""
    base = tmp_path_factory.mktemp("pristine")
    alice, bob = base / "alice", base / "bob"
    for home, name in ((alice, "alice"), (bob, "bob")):
        result = _p2pchat(home, "init", "--name", name)
        assert result.returncode == 0, result.stderr
    bob_address = Home(bob).profile().address
    assert _p2pchat(alice, "contacts", "add", "bob", bob_address).returncode == 0
    # No daemon, no bootstrap: the command's own node queues the message (and creates both databases).
    result = _p2pchat(alice, "send", *LOOPBACK, "bob", "kept safe on disk")
    assert result.returncode == 0 and result.stdout.startswith("queued"), result.stdout + result.stderr
    now = time.time()  # the commands below load the store at the real time: its items must still be valid then
    store = Store(Home(alice).profile().public.node_id, backend=SqliteBackend(alice / "dht.sqlite"), now=now)
    owner = Identity.from_seed(bytes([7]) * 32)
    record = sign_record(owner, RecordKind.PEER, 1, int(now) + 3600, b"somewhere")
    store.put(Space.RECORD, record_key(RecordKind.PEER, owner.public.key), encode_record(record), "127.0.0.1", now)
    mailbox = mailbox_key(owner.public.key)
    for i in range(20):
        entry = make_entry(mailbox, bytes([i]) * 300, entry_expiry(now))
        store.put(Space.ENTRY, mailbox, encode_entry(entry), "127.0.0.1", now)
    store.close()
    for name in ("messages.sqlite", "dht.sqlite"):
        assert not (alice / f"{name}-wal").exists()  # closed cleanly: everything is in the file itself
    return alice


@pytest.fixture
def home(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine home to damage."""
    copy = tmp_path / "alice"
    shutil.copytree(pristine, copy)
    return copy


def _page_size(path: Path) -> int:
    size = int.from_bytes(path.read_bytes()[16:18], "big")
    return 65536 if size == 1 else size


def _truncate_to_nothing(path: Path) -> None:
    path.write_bytes(b"")


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(path.name).randbytes(path.stat().st_size))


def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0x20  # "SQLite format 3" for a database; the msgpack map's first byte for the key file
    path.write_bytes(bytes(data))


def _flip_structure(path: Path) -> None:
    """A database: the type byte of the second page's b-tree header.  The key file: a byte of the seed."""
    data = bytearray(path.read_bytes())
    offset = len(data) - 5 if path.name == "identity.key" else _page_size(path)
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated to nothing": _truncate_to_nothing,
    "cut in half": _cut_in_half,
    "garbage": _garbage,
    "header byte flipped": _flip_header,
    "structure byte flipped": _flip_structure,
}

FILES = ("messages.sqlite", "dht.sqlite", "identity.key")

ADVICE = {
    "messages.sqlite": "restore it from a copy, or move it away",
    "dht.sqlite": "move it away and start again",
    "identity.key": "restore it from a backup",
}


def _one_line_error(result: subprocess.CompletedProcess[str], path: Path) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no traceback, no log noise
    assert lines[0].startswith("p2pchat: ") and str(path) in lines[0], lines[0]
    return lines[0]


def _open(home: Path, name: str) -> None:
    """Open *name* of *home* the way a node does."""
    if name == "messages.sqlite":
        MessageDB(home / name).close()
    elif name == "dht.sqlite":
        SqliteBackend(home / name).close()
    else:
        unlock(Home(home), None)


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("name", FILES)
def test_every_damage_is_refused_with_one_line_and_the_file_left_untouched(home: Path, name: str, damage: str) -> None:
    path = home / name
    DAMAGES[damage](path)
    before = _digest(path)
    with pytest.raises(UserError) as caught:
        _open(home, name)
    message = str(caught.value)
    assert str(path) in message and ADVICE[name] in message and "\n" not in message, message
    assert _digest(path) == before


# What the user sees, for one damage of each file -- the three that went wrong before: a truncated message
# database silently replaced by an empty one, a damaged DHT store ending in a traceback, a key file with a flipped
# seed byte answered with advice to rewrite the profile from the wrong key.
CLI_CASES = [
    ("messages.sqlite", "truncated to nothing"),
    ("dht.sqlite", "garbage"),
    ("identity.key", "structure byte flipped"),
]


@pytest.mark.parametrize(("name", "damage"), CLI_CASES)
def test_run_and_send_refuse_a_damaged_home(home: Path, name: str, damage: str) -> None:
    path = home / name
    DAMAGES[damage](path)
    before = _digest(path)
    commands: list[list[str]] = [["run", *LOOPBACK], ["send", *LOOPBACK, "bob", "after the damage"]]
    if name == "messages.sqlite":
        commands.append(["inbox"])  # the commands that only read it open it the same way (p2pchat.cli.contacts)
    for argv in commands:
        error = _one_line_error(_p2pchat(home, *argv), path)
        assert ADVICE[name] in error, error
        assert _digest(path) == before, f"{argv[0]} changed {name}"
    assert not (home / "control.sock").exists()  # no daemon came up on a damaged home
    if name == "identity.key":  # nor does init replace a damaged key file
        result = _p2pchat(home, "init")
        assert result.returncode == 1 and "never overwritten" in result.stderr
        assert _digest(path) == before


def test_sqlite_s_account_of_the_damage_is_kept_to_one_short_line() -> None:
    error = damaged("x.sqlite", "*** in database main ***\nPage 3: " + "bad " * 100, "move it away")
    text = str(error)
    assert "\n" not in text and "*** in database main *** Page 3: bad" in text
    assert text.count("bad") < 100 and "...)" in text
    assert len(text) <= len("x.sqlite is damaged (); it was left untouched: move it away") + MAX_REASON_CHARS


def test_the_undamaged_copy_works(home: Path) -> None:
    """The damage, not the copy, is what the commands above refuse."""
    result = _p2pchat(home, "history", "bob", "--json")
    assert result.returncode == 0 and "kept safe on disk" in result.stdout, result.stderr


def test_a_missing_database_is_created_complete_and_private(tmp_path: Path) -> None:
    path = tmp_path / "messages.sqlite"
    MessageDB(path).close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["messages.sqlite"]  # no temporary file left behind
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()
    again = MessageDB(path)  # and it opens again as it is
    assert again.contacts() == []
    again.close()


def test_a_database_from_elsewhere_is_refused_untouched(tmp_path: Path) -> None:
    other = tmp_path / "messages.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE notes (text TEXT)")
    db.commit()
    db.close()
    before = _digest(other)
    with pytest.raises(DatabaseError, match="not a p2pchat message database"):
        MessageDB(other)
    with pytest.raises(DatabaseError, match="not a p2pchat DHT store"):
        SqliteBackend(other)
    assert _digest(other) == before


def test_every_bit_of_the_key_file_flipped_is_refused(home: Path) -> None:
    path = home / "identity.key"
    original = path.read_bytes()
    for offset in range(len(original)):
        for bit in range(8):
            damaged = bytearray(original)
            damaged[offset] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            with pytest.raises(UserError) as caught:
                unlock(Home(home), None)
            assert str(path) in str(caught.value) and "\n" not in str(caught.value)
            assert path.read_bytes() == bytes(damaged)
    path.write_bytes(original)
    assert unlock(Home(home), None).public.address == Home(home).profile().address


FLIPS_PER_DATABASE = 300
"""Single-bit flips at random places tried on each database (seeded)."""

BTREE_PAGE_TYPES = (0x02, 0x05, 0x0A, 0x0D)
"""The first byte of a b-tree page: index interior, table interior, index leaf, table leaf."""


@pytest.mark.parametrize("name", ["messages.sqlite", "dht.sqlite"])
def test_byte_flips_in_a_database_are_refused_or_harmless(home: Path, name: str) -> None:
    """Every flip either opens (SQLite cannot see damage inside a value) or is refused with the project's error;
    a refused file is unchanged.  A b-tree page whose type byte no longer names a page type is always refused."""
    path = home / name
    original = path.read_bytes()
    page = _page_size(path)
    rng = random.Random(name)
    btree_pages = [offset for offset in range(page, len(original), page) if original[offset] in BTREE_PAGE_TYPES]
    assert len(btree_pages) >= 2
    flips = [(offset, 0x40) for offset in btree_pages]  # 0x0D ^ 0x40 = 0x4D and so on: no page type
    flips += [(rng.randrange(len(original)), 1 << rng.randrange(8)) for _ in range(FLIPS_PER_DATABASE)]
    refused = 0
    for number, (offset, mask) in enumerate(flips):
        damaged = bytearray(original)
        damaged[offset] ^= mask
        path.write_bytes(bytes(damaged))
        for leftover in (home / f"{name}-wal", home / f"{name}-shm"):
            leftover.unlink(missing_ok=True)
        try:
            opened = MessageDB(path) if name == "messages.sqlite" else SqliteBackend(path)
        except DatabaseError as exc:
            refused += 1
            assert str(path) in str(exc) and "\n" not in str(exc)
            assert path.read_bytes() == bytes(damaged), f"a refused file was changed (flip at {offset})"
        else:
            assert number >= len(btree_pages), f"the type byte of the page at {offset} was flipped unnoticed"
            opened.close()
    assert refused >= len(btree_pages)
