"""Opening the home's SQLite files: a new file appears complete or not at all, and a damaged one is refused,
never replaced.

SQLite takes an empty file for an empty database, and ``sqlite3.connect`` creates a missing one.  Left to that, a
``messages.sqlite`` truncated to nothing would silently become a fresh database -- contacts, sessions, history and
outbox gone, new mailbox and prekeys made over them.  So:

* a missing file is built under a temporary name (tables and all) and linked into place with ``os.link``, which
  never replaces a file; no file of ours at its real name is ever empty or without its tables;
* an existing file is opened with ``mode=rw`` (SQLite must not create it), checked with ``PRAGMA quick_check``
  before anything is written, and refused -- :class:`DatabaseError`, one line naming the file and what to do --
  if it is not a database, is damaged, or holds no tables.  A refused file is left byte for byte as it was.

``synchronous=NORMAL`` in WAL mode makes each commit durable against a crash of the process (kill -9).  SQLite
keeps no checksums of its pages, so damage inside a stored value that leaves the page structure intact is not
seen here; what reads those values checks them (signed records are validated again, session states decoded
strictly).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Final

from p2pchat.errors import UserError

__all__ = ["MAX_REASON_CHARS", "MEMORY", "DatabaseError", "damaged", "open_database"]

MEMORY: Final = ":memory:"
"""The path of a database that lives in memory only (simulations)."""

_FILE_MODE: Final = 0o600


class DatabaseError(UserError):
    """A database file that cannot be used (damaged, truncated, from another version, or not a database)."""


MAX_REASON_CHARS: Final = 160
"""Most characters of SQLite's own account of the damage quoted in the error (``quick_check`` can list pages)."""


def damaged(path: Path | str, reason: str, advice: str) -> DatabaseError:
    """The one-line error for a database file that is refused."""
    # SQLite's reports span lines ("*** in database main ***\nPage 3: ..."); the user gets one line.
    reason = " ".join(reason.split())
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return DatabaseError(f"{path} is damaged ({reason}); it was left untouched: {advice}")


def open_database(
    path: Path | str,
    create: Callable[[sqlite3.Connection], None],
    *,
    advice: str,
    foreign: Callable[[sqlite3.Connection], str | None],
) -> sqlite3.Connection:
    """A connection (autocommit, WAL, ``synchronous=NORMAL``) to the database at *path*.

    A missing file is made with *create* (run in one transaction on the new, empty database) before it takes its
    name.  An existing file is checked and refused with :class:`DatabaseError` -- whose message ends with *advice*,
    what the user should do -- if it is damaged or empty, or if *foreign* (asked before anything is written)
    says why it is not the kind of database the caller keeps.  ``":memory:"`` gives a fresh in-memory database.
    """
    if str(path) == MEMORY:
        connection = sqlite3.connect(MEMORY, isolation_level=None, check_same_thread=False)
        _create_in(connection, create)
        return connection
    path = Path(path)
    try:
        if not os.path.lexists(path):
            _create_file(path, create)
        uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=rw"
        connection = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.DatabaseError as exc:
        raise damaged(path, str(exc), advice) from None
    except OSError as exc:
        raise DatabaseError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        # Checked before anything is written: a refused file must be left exactly as it was.
        problems = [str(row[0]) for row in connection.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise damaged(path, problems[0] if problems else "no answer to quick_check", advice)
        if connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            raise damaged(path, "it holds no tables: truncated, or emptied", advice)
        problem = foreign(connection)
        if problem is not None:
            raise DatabaseError(f"{path} is {problem}; it was left untouched: {advice}")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise damaged(path, str(exc), advice) from None
    except DatabaseError:
        connection.close()
        raise
    return connection


def _create_in(connection: sqlite3.Connection, create: Callable[[sqlite3.Connection], None]) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("BEGIN IMMEDIATE")
    try:
        create(connection)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _create_file(path: Path, create: Callable[[sqlite3.Connection], None]) -> None:
    """Build the database under a temporary name, then give it *path* (unless someone else just did)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    # Made here, private and empty, so SQLite finds an empty database and the file is the user's alone.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))
    try:
        connection = sqlite3.connect(temporary, isolation_level=None)
        try:
            _create_in(connection, create)
        finally:
            connection.close()  # the last connection checkpoints the WAL into the file and removes it
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        with contextlib.suppress(FileExistsError):  # another process made it first: theirs is as good
            os.link(temporary, path)
    finally:
        for leftover in (temporary, Path(f"{temporary}-wal"), Path(f"{temporary}-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
