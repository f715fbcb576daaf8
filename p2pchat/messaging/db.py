"""The messenger's durable state: contacts, sessions, prekeys, messages (history and outbox), pending acks.

One SQLite database per node (WAL mode).  Every change that a user or a peer is told about is committed before it
is announced: a message is in the database before ``send`` returns "queued"; an incoming message, the session
state that decrypted it, the one-time prekey it consumed and the acknowledgement owed for it are committed in one
transaction before the acknowledgement leaves.  ``synchronous=NORMAL`` in WAL mode makes each commit durable
against a crash of the process (kill -9); only a power failure can take back the last commits.

The database is plain synchronous code: each call is a short indexed statement.  Simulations pass ``":memory:"``.

Stored blobs (session states, prekey state) are decoded by their own strict decoders when read, so a corrupt or
tampered database gives a clear error, never a silently wrong state.  The file itself is opened through
:mod:`p2pchat.dbfile`: a damaged or truncated one is refused with a one-line error and left as it is, never
replaced by a fresh database.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from p2pchat.dbfile import DatabaseError, damaged, open_database

__all__ = ["SCHEMA_VERSION", "Contact", "ContactStatus", "DatabaseError", "MessageDB", "MessageRow", "MessageState"]

SCHEMA_VERSION: Final = 1
"""Version of the tables below; a database from another version is refused with a clear error."""


class MessageState(enum.StrEnum):
    """Where a message is.  Outgoing: queued -> sent (direct) / stored (n replicas) -> delivered, or failed.
    Incoming messages are ``received``."""

    QUEUED = "queued"
    SENT = "sent"
    STORED = "stored"
    DELIVERED = "delivered"
    FAILED = "failed"
    RECEIVED = "received"


class ContactStatus(enum.StrEnum):
    """A known identity: a contact, a contact request (wrote to us first), or blocked."""

    CONTACT = "contact"
    REQUEST = "request"
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class Contact:
    """A row of the contacts table."""

    key: bytes
    name: str | None
    status: ContactStatus
    added_at: float


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A row of the messages table (history and outbox in one)."""

    id: bytes
    peer: bytes
    outgoing: bool
    text: str
    sent_at: float
    seq: int
    state: MessageState
    replicas: int
    reason: str | None
    expires_at: float
    received_at: float | None
    wire: bytes | None
    next_attempt: float | None
    attempts: int


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS kv (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS contacts (
    key BLOB PRIMARY KEY, name TEXT UNIQUE, status TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    peer BLOB PRIMARY KEY, current BLOB NOT NULL, previous BLOB);
CREATE TABLE IF NOT EXISTS messages (
    id BLOB PRIMARY KEY, peer BLOB NOT NULL, outgoing INTEGER NOT NULL, text TEXT NOT NULL,
    sent_at REAL NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL, replicas INTEGER NOT NULL DEFAULT 0,
    reason TEXT, expires_at REAL NOT NULL, received_at REAL, wire BLOB, next_attempt REAL,
    attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS messages_outbox ON messages (outgoing, state, next_attempt);
CREATE INDEX IF NOT EXISTS messages_peer ON messages (peer, sent_at, seq);
CREATE INDEX IF NOT EXISTS messages_seq ON messages (peer, outgoing, seq);
CREATE TABLE IF NOT EXISTS pending_acks (peer BLOB NOT NULL, message_id BLOB NOT NULL,
    PRIMARY KEY (peer, message_id));
CREATE TABLE IF NOT EXISTS seen_entries (entry_id BLOB PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS taken_wires (digest BLOB PRIMARY KEY, peer BLOB NOT NULL, message_id BLOB,
    taken_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen_initials (ephemeral BLOB PRIMARY KEY, seen_at REAL NOT NULL);
"""

_SEQ_INDEX: Final = "CREATE INDEX IF NOT EXISTS messages_seq ON messages (peer, outgoing, seq)"
"""Makes :meth:`MessageDB.next_seq` one index probe instead of a scan of the conversation."""

_PAIRWISE_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS pairwise (peer BLOB PRIMARY KEY, heard INTEGER NOT NULL DEFAULT 0,"
    " wrote_ack INTEGER NOT NULL DEFAULT 0, wrote_text INTEGER NOT NULL DEFAULT 0)"
)
"""What decides the pairwise mailboxes (see :meth:`MessageDB.mark_heard`, :meth:`MessageDB.mark_wrote`): whether
we have taken a ratchet message from the peer, and whether we have written it an acknowledgement or a text."""

_ADDED_SINCE_VERSION_1: Final = (_SEQ_INDEX, _PAIRWISE_TABLE)
"""Created on every open when missing.  Each only adds (an index, or a table that starts empty and means "nothing
known yet"), so a database written before it stays valid as it is, and needs no new :data:`SCHEMA_VERSION`."""

_MESSAGE_COLUMNS: Final = (
    "id, peer, outgoing, text, sent_at, seq, state, replicas, reason, expires_at, received_at, wire, next_attempt,"
    " attempts"
)

_OPEN_STATES: Final = (MessageState.QUEUED, MessageState.SENT, MessageState.STORED)


def _corrupt(what: str, value: object) -> DatabaseError:
    return DatabaseError(
        f"the message database is corrupt: {what} holds a {type(value).__name__}; restore it from a backup"
    )


# Rows are read back as strictly as network input: a tampered or corrupt cell is a DatabaseError naming it, never
# a stray TypeError, a silently converted value, or a bytes(n) that allocates n bytes.


def _blob(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise _corrupt(what, value)
    return value


def _text(value: object, what: str) -> str:
    if type(value) is not str:
        raise _corrupt(what, value)
    return value


def _integer(value: object, what: str) -> int:
    if type(value) is not int:
        raise _corrupt(what, value)
    return value


def _real(value: object, what: str) -> float:
    # SQLite hands back a REAL that holds a whole number as int when the column stored it as one.
    if type(value) is not float and type(value) is not int:
        raise _corrupt(what, value)
    return float(value)


_E = TypeVar("_E", MessageState, ContactStatus)


def _enum(cls: type[_E], value: object, what: str) -> _E:
    try:
        return cls(_text(value, what))
    except ValueError:
        raise DatabaseError(f"the message database is corrupt: {what} holds an unknown value") from None


def _message(row: tuple[object, ...]) -> MessageRow:
    (id_, peer, outgoing, text, sent_at, seq, state, replicas, reason, expires_at, received_at, wire, nxt, tries) = row
    return MessageRow(
        id=_blob(id_, "a message id"),
        peer=_blob(peer, "a message peer"),
        outgoing=bool(_integer(outgoing, "a message direction")),
        text=_text(text, "a message text"),
        sent_at=_real(sent_at, "a message time"),
        seq=_integer(seq, "a message sequence number"),
        state=_enum(MessageState, state, "a message state"),
        replicas=_integer(replicas, "a message replica count"),
        reason=None if reason is None else _text(reason, "a failure reason"),
        expires_at=_real(expires_at, "a message expiry"),
        received_at=None if received_at is None else _real(received_at, "a message receive time"),
        wire=None if wire is None else _blob(wire, "a message ciphertext"),
        next_attempt=None if nxt is None else _real(nxt, "a message's next attempt"),
        attempts=_integer(tries, "a message attempt count"),
    )


_ADVICE: Final = "restore it from a copy, or move it away to start again without its history, sessions and contacts"
"""What to do about a damaged message database (it is the only copy of the history and of the sessions)."""


def _create_tables(db: sqlite3.Connection) -> None:
    # executescript() would commit on its own; the statements run inside open_database's transaction instead.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _foreign(db: sqlite3.Connection) -> str | None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return None
    if version == 0:
        return "not a p2pchat message database"
    return f"a p2pchat message database of version {version}, and this p2pchat reads version {SCHEMA_VERSION}"


def _text_or_bytes(raw: bytes) -> str | bytes:
    """SQLite text as str; text that is not UTF-8 stays bytes (and is then refused as a corrupt cell)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


class MessageDB:
    """The messenger's tables.  Use :meth:`transaction` around every group of changes that must land together."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.commits = 0
        self.after_commit: Callable[[int], None] | None = None
        """Called with the commit count after every commit: the seam crash tests use to stop a node at each
        commit boundary (None in production)."""
        self._depth = 0
        self._db = open_database(path, _create_tables, advice=_ADVICE, foreign=_foreign)
        self._db.text_factory = _text_or_bytes
        try:
            for statement in _ADDED_SINCE_VERSION_1:
                self._db.execute(statement)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise damaged(self.path, str(exc), _ADVICE) from None

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); nested calls join the outer transaction."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        self._db.execute("COMMIT")
        self.commits += 1
        if self.after_commit is not None:
            self.after_commit(self.commits)

    # --- key/value -----------------------------------------------------------------------------------------------

    def get(self, name: str) -> bytes | None:
        """A blob from the key/value table."""
        row = self._db.execute("SELECT value FROM kv WHERE name = ?", (name,)).fetchone()
        return None if row is None else _blob(row[0], f"the {name!r} entry")

    def put(self, name: str, value: bytes) -> None:
        """Set a blob in the key/value table."""
        self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (name, value))

    # --- contacts ------------------------------------------------------------------------------------------------

    def contact(self, key: bytes) -> Contact | None:
        """The contact row for an identity key."""
        row = self._db.execute("SELECT key, name, status, added_at FROM contacts WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        name = None if row[1] is None else _text(row[1], "a contact name")
        return Contact(
            _blob(row[0], "a contact key"),
            name,
            _enum(ContactStatus, row[2], "a contact status"),
            _real(row[3], "a contact time"),
        )

    def contact_by_name(self, name: str) -> Contact | None:
        """The contact row with this name."""
        row = self._db.execute("SELECT key FROM contacts WHERE name = ?", (name,)).fetchone()
        return None if row is None else self.contact(_blob(row[0], "a contact key"))

    def contacts(self) -> list[Contact]:
        """Every contact row, by name."""
        rows = self._db.execute("SELECT key FROM contacts ORDER BY name, key").fetchall()
        return [c for c in (self.contact(_blob(r[0], "a contact key")) for r in rows) if c is not None]

    def set_contact(self, key: bytes, name: str | None, status: ContactStatus, now: float) -> None:
        """Insert or update a contact (keeps the original ``added_at``)."""
        self._db.execute(
            "INSERT INTO contacts VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET name = excluded.name,"
            " status = excluded.status",
            (key, name, str(status), now),
        )

    def remove_contact(self, key: bytes) -> None:
        """Forget a contact (its history stays)."""
        self._db.execute("DELETE FROM contacts WHERE key = ?", (key,))

    # --- sessions ------------------------------------------------------------------------------------------------

    def session(self, peer: bytes) -> tuple[bytes, bytes | None] | None:
        """The encoded current and previous session records with *peer*."""
        row = self._db.execute("SELECT current, previous FROM sessions WHERE peer = ?", (peer,)).fetchone()
        if row is None:
            return None
        return _blob(row[0], "a session"), None if row[1] is None else _blob(row[1], "a previous session")

    def delete_session(self, peer: bytes) -> None:
        """Forget the sessions with *peer* (a new one will be started)."""
        self._db.execute("DELETE FROM sessions WHERE peer = ?", (peer,))

    def set_session(self, peer: bytes, current: bytes, previous: bytes | None) -> None:
        """Store the session records with *peer*."""
        self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", (peer, current, previous))

    # --- messages ------------------------------------------------------------------------------------------------

    def add_message(self, row: MessageRow) -> bool:
        """Insert a message; False if its id is already there (a duplicate)."""
        cursor = self._db.execute(
            f"INSERT OR IGNORE INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.id,
                row.peer,
                int(row.outgoing),
                row.text,
                row.sent_at,
                row.seq,
                str(row.state),
                row.replicas,
                row.reason,
                row.expires_at,
                row.received_at,
                row.wire,
                row.next_attempt,
                row.attempts,
            ),
        )
        return cursor.rowcount == 1

    def message(self, message_id: bytes) -> MessageRow | None:
        """One message by id."""
        row = self._db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        return None if row is None else _message(row)

    def update_message(self, message_id: bytes, **fields: object) -> None:
        """Set some columns of one message."""
        allowed = {"state", "replicas", "reason", "wire", "next_attempt", "attempts"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        columns = ", ".join(f"{name} = ?" for name in fields)
        values = [str(v) if isinstance(v, MessageState) else v for v in fields.values()]
        self._db.execute(f"UPDATE messages SET {columns} WHERE id = ?", (*values, message_id))

    def history(self, peer: bytes | None = None, limit: int = 1000) -> list[MessageRow]:
        """Messages with *peer* (or all), oldest first: by the sender's clock, then by the sender's sequence."""
        if peer is None:
            rows = self._db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages ORDER BY sent_at, seq LIMIT ?", (limit,)
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE peer = ? ORDER BY sent_at, seq LIMIT ?", (peer, limit)
            ).fetchall()
        return [_message(r) for r in rows]

    def recent(self, peer: bytes | None, limit: int, *, incoming_only: bool = False) -> list[MessageRow]:
        """The newest *limit* messages with *peer* (or all; or only those received), oldest first."""
        where = []
        values: list[object] = []
        if peer is not None:
            where.append("peer = ?")
            values.append(peer)
        if incoming_only:
            where.append("outgoing = 0")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages {clause} ORDER BY sent_at DESC, seq DESC LIMIT ?",
            (*values, limit),
        ).fetchall()
        return [_message(r) for r in reversed(rows)]

    def open_outgoing(self) -> list[MessageRow]:
        """Outgoing messages not yet delivered or failed, oldest first (the outbox)."""
        marks = ", ".join("?" for _ in _OPEN_STATES)
        rows = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE outgoing = 1 AND state IN ({marks}) ORDER BY sent_at, seq",
            tuple(str(s) for s in _OPEN_STATES),
        ).fetchall()
        return [_message(r) for r in rows]

    def reschedule_open(self, at: float) -> None:
        """Set the next attempt of every open outgoing message to *at*."""
        marks = ", ".join("?" for _ in _OPEN_STATES)
        self._db.execute(
            f"UPDATE messages SET next_attempt = ? WHERE outgoing = 1 AND state IN ({marks})",
            (at, *(str(s) for s in _OPEN_STATES)),
        )

    def next_seq(self, peer: bytes) -> int:
        """The next outgoing sequence number in the conversation with *peer*."""
        row = self._db.execute("SELECT MAX(seq) FROM messages WHERE peer = ? AND outgoing = 1", (peer,)).fetchone()
        return 0 if row[0] is None else _integer(row[0], "a message sequence number") + 1

    # --- acknowledgements owed -----------------------------------------------------------------------------------

    def owe_ack(self, peer: bytes, message_id: bytes) -> None:
        """Remember that *peer* must be told we have *message_id*."""
        self._db.execute("INSERT OR IGNORE INTO pending_acks VALUES (?, ?)", (peer, message_id))

    def acks_owed(self) -> dict[bytes, list[bytes]]:
        """Acknowledgements still to send, by peer."""
        owed: dict[bytes, list[bytes]] = {}
        for peer, message_id in self._db.execute("SELECT peer, message_id FROM pending_acks ORDER BY rowid"):
            owed.setdefault(_blob(peer, "an owed ack's peer"), []).append(_blob(message_id, "an owed ack"))
        return owed

    def acks_sent(self, peer: bytes, message_ids: list[bytes]) -> None:
        """Forget acknowledgements that have left."""
        rows = [(peer, m) for m in message_ids]
        self._db.executemany("DELETE FROM pending_acks WHERE peer = ? AND message_id = ?", rows)

    # --- mailbox entries already taken ---------------------------------------------------------------------------

    def entry_seen(self, entry_id: bytes) -> bool:
        """Whether a mailbox entry was already processed (its tombstone may not have reached every replica)."""
        return self._db.execute("SELECT 1 FROM seen_entries WHERE entry_id = ?", (entry_id,)).fetchone() is not None

    def mark_entry_seen(self, entry_id: bytes, expires_at: float) -> None:
        """Remember a processed mailbox entry until it expires."""
        self._db.execute("INSERT OR IGNORE INTO seen_entries VALUES (?, ?)", (entry_id, expires_at))

    def forget_seen_entries(self, now: float) -> None:
        """Drop processed-entry ids whose entries have expired everywhere."""
        self._db.execute("DELETE FROM seen_entries WHERE expires_at <= ?", (now,))

    # --- ratchet messages already taken ----------------------------------------------------------------------

    def taken_wire(self, digest: bytes) -> tuple[bytes, bytes | None] | None:
        """``(peer, message id or None for an ack)`` of a ratchet message already taken, by its digest."""
        row = self._db.execute("SELECT peer, message_id FROM taken_wires WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            return None
        return _blob(row[0], "a taken message's peer"), None if row[1] is None else _blob(row[1], "a taken message")

    def take_wire(self, digest: bytes, peer: bytes, message_id: bytes | None, now: float) -> None:
        """Remember a ratchet message taken (its key is gone: a resend must be recognised without decrypting)."""
        self._db.execute("INSERT OR IGNORE INTO taken_wires VALUES (?, ?, ?, ?)", (digest, peer, message_id, now))

    def forget_taken_wires(self, before: float) -> None:
        """Forget ratchet messages taken before *before* (no sender retries that long)."""
        self._db.execute("DELETE FROM taken_wires WHERE taken_at < ?", (before,))

    def initial_seen(self, ephemeral: bytes) -> bool:
        """Whether an X3DH initial header with this ephemeral key already started a session."""
        return self._db.execute("SELECT 1 FROM seen_initials WHERE ephemeral = ?", (ephemeral,)).fetchone() is not None

    def see_initial(self, ephemeral: bytes, now: float) -> None:
        """Remember an initial header's ephemeral key, so a replay cannot start the session again."""
        self._db.execute("INSERT OR IGNORE INTO seen_initials VALUES (?, ?)", (ephemeral, now))

    def forget_initials(self, before: float) -> None:
        """Forget initial headers seen before *before* (their signed prekeys are gone by then)."""
        self._db.execute("DELETE FROM seen_initials WHERE seen_at < ?", (before,))

    # --- pairwise mailboxes ----------------------------------------------------------------------------------

    def mark_heard(self, peer: bytes) -> None:
        """Remember that we have taken an authenticated ratchet message from *peer* (so it polls our pairwise
        mailbox at its side: see :class:`~p2pchat.messaging.messenger.Messenger`)."""
        self._db.execute(
            "INSERT INTO pairwise (peer, heard) VALUES (?, 1) ON CONFLICT(peer) DO UPDATE SET heard = 1", (peer,)
        )

    def heard_from(self, peer: bytes) -> bool:
        """Whether :meth:`mark_heard` was ever called for *peer*."""
        row = self._db.execute("SELECT heard FROM pairwise WHERE peer = ?", (peer,)).fetchone()
        return row is not None and bool(_integer(row[0], "a pairwise mailbox flag"))

    def mark_wrote(self, peer: bytes, *, text: bool) -> None:
        """Remember that we have encrypted a ratchet message for *peer*: a text, or (``text=False``) an ack."""
        column = "wrote_text" if text else "wrote_ack"
        self._db.execute(
            f"INSERT INTO pairwise (peer, {column}) VALUES (?, 1) ON CONFLICT(peer) DO UPDATE SET {column} = 1",
            (peer,),
        )

    def written_to(self) -> list[tuple[bytes, bool]]:
        """``(peer, whether we wrote it a text)`` for every peer we have written to, ordered by key."""
        rows = self._db.execute(
            "SELECT peer, wrote_text FROM pairwise WHERE wrote_ack = 1 OR wrote_text = 1 ORDER BY peer"
        ).fetchall()
        return [(_blob(r[0], "a pairwise peer"), bool(_integer(r[1], "a pairwise mailbox flag"))) for r in rows]
