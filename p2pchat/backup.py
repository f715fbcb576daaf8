"""Backups: the identity and the contacts in one file, sealed under a passphrase.

The file is a msgpack map::

    {"format": "p2pchat-backup", "version": 1,
     "kdf": {"alg": "argon2id13", "salt": 16 bytes, "ops": int, "mem": int},
     "box": SecretBox(nonce || ciphertext) of msgpack {"seed": 32 bytes, "name": str | None,
                                                        "contacts": [[name | None, key, status, added_at], ...]}}

A backup is always sealed: it is meant to be copied to places less safe than the home directory.  Reading treats
the file as untrusted input (size, every field, the Argon2id limits bounded as for key files), and every failure
is a :class:`BackupError` that says what to do.  History and sessions are not in a backup: a restored identity
starts new sessions with its contacts (their old ones can no longer decrypt anyway once the ratchet moved on).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]
import nacl.exceptions
import nacl.pwhash.argon2id
import nacl.secret
import nacl.utils

from p2pchat.core.framing import unpack_strict
from p2pchat.core.identity import PUBLIC_KEY_BYTES, SEED_BYTES, Identity
from p2pchat.errors import ProtocolError, UserError
from p2pchat.keyfile import DEFAULT_KDF, KDF_ALGORITHM, KdfLimits
from p2pchat.messaging.db import ContactStatus

__all__ = [
    "BACKUP_FORMAT",
    "BACKUP_VERSION",
    "MAX_BACKUP_BYTES",
    "MAX_BACKUP_CONTACTS",
    "Backup",
    "BackupContact",
    "BackupError",
    "read_backup",
    "write_backup",
]

BACKUP_FORMAT: Final = "p2pchat-backup"
"""The ``format`` field of a backup file."""

BACKUP_VERSION: Final = 1
"""The ``version`` field this code writes and reads."""

MAX_BACKUP_CONTACTS: Final = 10_000
"""Most contacts a backup may hold."""

MAX_BACKUP_BYTES: Final = 2 * 1024 * 1024
"""A backup file larger than this is refused unread (10,000 contacts take about 1 MiB)."""

_SALT_BYTES: Final = nacl.pwhash.argon2id.SALTBYTES


class BackupError(UserError):
    """A backup that cannot be written or read: wrong passphrase, damaged, or not a backup."""


@dataclass(frozen=True, slots=True)
class BackupContact:
    """One contact in a backup."""

    name: str | None
    key: bytes
    status: ContactStatus
    added_at: float


@dataclass(frozen=True, slots=True)
class Backup:
    """What a backup holds."""

    identity: Identity
    name: str | None
    contacts: list[BackupContact]


def _key(passphrase: str, salt: bytes, limits: KdfLimits) -> bytes:
    # NFC first, as for key files, so the same passphrase typed on another system still opens the backup.
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8", "surrogatepass")
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, secret, salt, opslimit=limits.ops, memlimit=limits.mem
    )


def write_backup(
    path: Path,
    backup: Backup,
    passphrase: str,
    *,
    kdf_limits: KdfLimits = DEFAULT_KDF,
    random_bytes: Callable[[int], bytes] = nacl.utils.random,
) -> None:
    """Seal *backup* under *passphrase* into a new file at *path* (mode 0600; an existing file is not replaced)."""
    if not passphrase:
        raise BackupError("a backup needs a non-empty passphrase")
    if len(backup.contacts) > MAX_BACKUP_CONTACTS:
        raise BackupError(f"{len(backup.contacts)} contacts; a backup holds at most {MAX_BACKUP_CONTACTS}")
    inner = {
        "seed": backup.identity.seed,
        "name": backup.name,
        "contacts": [[c.name, c.key, str(c.status), c.added_at] for c in backup.contacts],
    }
    salt = random_bytes(_SALT_BYTES)
    box = nacl.secret.SecretBox(_key(passphrase, salt, kdf_limits))
    sealed = bytes(box.encrypt(msgpack.packb(inner, use_bin_type=True), random_bytes(box.NONCE_SIZE)))
    kdf = {"alg": KDF_ALGORITHM, "salt": salt, "ops": kdf_limits.ops, "mem": kdf_limits.mem}
    blob: bytes = msgpack.packb(
        {"format": BACKUP_FORMAT, "version": BACKUP_VERSION, "kdf": kdf, "box": sealed}, use_bin_type=True
    )
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BackupError(f"{path} already exists; choose a new file name for the backup") from None
    except OSError as exc:
        raise BackupError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())


def read_backup(path: Path, passphrase: str) -> Backup:
    """Open the backup at *path* with *passphrase*; BackupError if it cannot be."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BACKUP_BYTES + 1)
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_BACKUP_BYTES:
        raise BackupError(f"{path} is larger than a backup can be ({MAX_BACKUP_BYTES} bytes); is it a backup?")
    outer = _map(data, path)
    if outer.get("format") != BACKUP_FORMAT:
        raise BackupError(f"{path} is not a p2pchat backup")
    if outer.get("version") != BACKUP_VERSION:
        raise BackupError(
            f"{path} is a backup of version {outer.get('version')!r}; this p2pchat reads {BACKUP_VERSION}"
        )
    kdf, sealed = outer.get("kdf"), outer.get("box")
    if not isinstance(kdf, dict) or kdf.get("alg") != KDF_ALGORITHM or not isinstance(sealed, bytes):
        raise _damaged(path)
    salt, ops, mem = kdf.get("salt"), kdf.get("ops"), kdf.get("mem")
    if not isinstance(salt, bytes) or len(salt) != _SALT_BYTES or type(ops) is not int or type(mem) is not int:
        raise _damaged(path)
    try:
        limits = KdfLimits(ops, mem)
    except ValueError:
        raise BackupError(f"{path} asks for key-derivation limits beyond what p2pchat allows; refusing it") from None
    try:
        plain = nacl.secret.SecretBox(_key(passphrase, salt, limits)).decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise BackupError(f"wrong passphrase for the backup {path} (or the file is damaged); try again") from None
    return _contents(_map(plain, path), path)


def _map(data: bytes, path: Path) -> dict[str, Any]:
    try:
        value = unpack_strict(data)
    except ProtocolError:
        raise _damaged(path) from None
    if not isinstance(value, dict):
        raise _damaged(path)
    return value


def _damaged(path: Path) -> BackupError:
    return BackupError(f"{path} is damaged or not a p2pchat backup")


def _contents(inner: dict[str, Any], path: Path) -> Backup:
    seed, name, rows = inner.get("seed"), inner.get("name"), inner.get("contacts")
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES or not (name is None or isinstance(name, str)):
        raise _damaged(path)
    if not isinstance(rows, list) or len(rows) > MAX_BACKUP_CONTACTS:
        raise _damaged(path)
    contacts = []
    statuses = {str(s) for s in ContactStatus}
    for row in rows:
        if not isinstance(row, list) or len(row) != 4:
            raise _damaged(path)
        contact_name, key, status, added_at = row
        if (
            not (contact_name is None or isinstance(contact_name, str))
            or not isinstance(key, bytes)
            or len(key) != PUBLIC_KEY_BYTES
            or status not in statuses
            or type(added_at) not in (int, float)
        ):
            raise _damaged(path)
        contacts.append(BackupContact(contact_name, key, ContactStatus(status), float(added_at)))
    return Backup(Identity.from_seed(seed), name, contacts)
