"""The identity key file: the user's 32-byte Ed25519 seed on disk, optionally sealed under a passphrase.

The file is a msgpack map::

    {"format": "p2pchat-identity", "version": 1,
     "kdf": None | {"alg": "argon2id13", "salt": 16 bytes, "ops": int, "mem": int},
     "secret": the seed (32 bytes) | SecretBox(nonce || ciphertext) of the seed under the Argon2id key}

Reading treats the file as untrusted input: it is size-limited, every field is checked, the Argon2id limits
are bounded (a crafted file must not make us allocate gigabytes), and every failure is a
:class:`~p2pchat.errors.KeyFileError` whose message says what to do.  Reading never changes the file.  Writing
never replaces an existing file: a lost identity cannot be recovered, so overwriting one is the worst mistake
this module could make.
"""

from __future__ import annotations

import contextlib
import os
import stat
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgpack  # type: ignore[import-untyped]
import nacl.exceptions
import nacl.pwhash.argon2id
import nacl.secret
import nacl.utils

from p2pchat.core.identity import SEED_BYTES, Identity
from p2pchat.errors import KeyFileError, PassphraseError

__all__ = [
    "DEFAULT_KDF",
    "INTERACTIVE_KDF",
    "KDF_ALGORITHM",
    "KEY_FILE_FORMAT",
    "KEY_FILE_VERSION",
    "MAX_KDF_MEMLIMIT",
    "MAX_KDF_OPSLIMIT",
    "MAX_KEY_FILE_BYTES",
    "KdfLimits",
    "is_protected",
    "load_identity",
    "save_identity",
]

KEY_FILE_FORMAT: Final = "p2pchat-identity"
"""The ``format`` field that marks a p2pchat identity file."""

KEY_FILE_VERSION: Final = 1
"""The ``version`` field this code writes and reads."""

KDF_ALGORITHM: Final = "argon2id13"
"""The ``alg`` field of a protected file: Argon2id version 1.3, as libsodium implements it."""

MAX_KEY_FILE_BYTES: Final = 4096
"""A key file larger than this is refused unread: a real one is about 150 bytes."""

MAX_KDF_OPSLIMIT: Final = 10
"""Highest Argon2id ops limit a key file may ask for (SENSITIVE is 4), so a crafted file cannot stall us."""

MAX_KDF_MEMLIMIT: Final = 512 * 1024 * 1024
"""Highest Argon2id memory limit a key file may ask for (MODERATE is 256 MiB, SENSITIVE 1 GiB)."""

_SALT_BYTES: Final = nacl.pwhash.argon2id.SALTBYTES
_SEALED_SECRET_BYTES: Final = nacl.secret.SecretBox.NONCE_SIZE + SEED_BYTES + nacl.secret.SecretBox.MACBYTES
_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700


def _limits_in_bounds(ops: int, mem: int) -> bool:
    """Whether Argon2id limits lie between libsodium's minima and our maxima."""
    return (
        nacl.pwhash.argon2id.OPSLIMIT_MIN <= ops <= MAX_KDF_OPSLIMIT
        and nacl.pwhash.argon2id.MEMLIMIT_MIN <= mem <= MAX_KDF_MEMLIMIT
    )


@dataclass(frozen=True, slots=True)
class KdfLimits:
    """Argon2id cost parameters for sealing a key file: CPU passes (*ops*) and memory in bytes (*mem*)."""

    ops: int
    mem: int

    def __post_init__(self) -> None:
        if not _limits_in_bounds(self.ops, self.mem):
            raise ValueError(
                f"Argon2id limits ops={self.ops}, mem={self.mem} are outside "
                f"[{nacl.pwhash.argon2id.OPSLIMIT_MIN}, {MAX_KDF_OPSLIMIT}] x "
                f"[{nacl.pwhash.argon2id.MEMLIMIT_MIN}, {MAX_KDF_MEMLIMIT}]"
            )


DEFAULT_KDF: Final = KdfLimits(nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE)
"""Limits for a user's key file: libsodium's MODERATE (about a second, 256 MiB)."""

INTERACTIVE_KDF: Final = KdfLimits(nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE)
"""libsodium's INTERACTIVE limits (64 MiB): fast enough for tests and throwaway demo identities."""


@dataclass(frozen=True, slots=True)
class _KdfParams:
    """The checked ``kdf`` field of a protected key file."""

    salt: bytes
    limits: KdfLimits


@dataclass(frozen=True, slots=True)
class _KeyFileContents:
    """A key file after its structure has been checked, before any passphrase is applied."""

    kdf: _KdfParams | None
    secret: bytes


def save_identity(
    path: Path,
    identity: Identity,
    passphrase: str | None = None,
    *,
    kdf_limits: KdfLimits = DEFAULT_KDF,
    random_bytes: Callable[[int], bytes] = nacl.utils.random,
) -> None:
    """Write *identity* to a new key file at *path*, sealed under *passphrase* when one is given.

    Missing parent directories are created private to the user.  The file appears atomically, complete and
    with mode 0600, or not at all; an existing file is never replaced (:class:`~p2pchat.errors.KeyFileError`).
    """
    if passphrase == "":
        raise KeyFileError("the passphrase is empty; choose a non-empty passphrase, or none to leave the key unsealed")
    if os.path.lexists(path):
        raise _exists_error(path)
    blob = _encode(identity.seed, passphrase, kdf_limits, random_bytes)
    try:
        _make_private_dirs(path.parent)
        _write_new_file(path, blob, random_bytes)
    except OSError as error:
        raise KeyFileError(f"cannot write key file {path}: {error.strerror or error}") from error


def load_identity(path: Path, passphrase: str | None = None) -> Identity:
    """Read the identity in the key file at *path*, unsealing it with *passphrase* if it is protected.

    A passphrase given for an unprotected file is ignored.  Every failure raises
    :class:`~p2pchat.errors.KeyFileError` (:class:`~p2pchat.errors.PassphraseError` for a missing or wrong
    passphrase); the file is never modified.
    """
    contents = _read_contents(path)
    if contents.kdf is None:
        return Identity.from_seed(contents.secret)
    if passphrase is None:
        raise PassphraseError(f"key file {path} is passphrase-protected; give its passphrase to unlock it")
    return Identity.from_seed(_unseal(path, contents.kdf, contents.secret, passphrase))


def is_protected(path: Path) -> bool:
    """Whether the key file at *path* is sealed under a passphrase (raises as :func:`load_identity` does)."""
    return _read_contents(path).kdf is not None


def _derive_key(passphrase: str, salt: bytes, limits: KdfLimits) -> bytes:
    """The SecretBox key for *passphrase* under *salt* and *limits*."""
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE,
        _passphrase_bytes(passphrase),
        salt,
        opslimit=limits.ops,
        memlimit=limits.mem,
    )


def _passphrase_bytes(passphrase: str) -> bytes:
    """The bytes a passphrase stands for: NFC-normalized UTF-8.

    Normalizing first means the same passphrase typed on systems whose input methods compose accents
    differently still unlocks the file; surrogatepass makes any str encodable, so this never raises.
    """
    return unicodedata.normalize("NFC", passphrase).encode("utf-8", "surrogatepass")


def _encode(seed: bytes, passphrase: str | None, limits: KdfLimits, random_bytes: Callable[[int], bytes]) -> bytes:
    """The key file bytes for *seed*, sealed under *passphrase* if given."""
    if passphrase is None:
        kdf = None
        secret = seed
    else:
        salt = random_bytes(_SALT_BYTES)
        box = nacl.secret.SecretBox(_derive_key(passphrase, salt, limits))
        secret = bytes(box.encrypt(seed, random_bytes(nacl.secret.SecretBox.NONCE_SIZE)))
        kdf = {"alg": KDF_ALGORITHM, "salt": salt, "ops": limits.ops, "mem": limits.mem}
    document = {"format": KEY_FILE_FORMAT, "version": KEY_FILE_VERSION, "kdf": kdf, "secret": secret}
    blob: bytes = msgpack.packb(document, use_bin_type=True)
    return blob


def _make_private_dirs(directory: Path) -> None:
    """Create *directory* and any missing parents with mode 0700; leave existing ones as they are."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=_DIR_MODE)
        except FileExistsError:
            # Someone else created it meanwhile; it is theirs to have chosen a mode for.
            continue
        # The umask may have taken bits away from the mode; set it exactly.
        os.chmod(new, _DIR_MODE)


def _write_new_file(path: Path, blob: bytes, random_bytes: Callable[[int], bytes]) -> None:
    """Put *blob* at *path* atomically; raise KeyFileError rather than replace an existing file.

    The bytes go to a private temporary file in the same directory and are synced; ``os.link`` then gives it
    its final name, which (unlike ``rename``) fails if the name is taken.  Finally the directory is synced so
    the new name survives a crash.
    """
    temporary = path.with_name(f".{path.name}.{random_bytes(8).hex()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        try:
            os.fchmod(descriptor, _FILE_MODE)
            view = memoryview(blob)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise _exists_error(path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """fsync *directory* so a name just added to it is durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _exists_error(path: Path) -> KeyFileError:
    """The error for refusing to replace an existing key file."""
    return KeyFileError(
        f"key file {path} already exists and will not be overwritten; move it away or pass a different home"
    )


def _corrupt(path: Path, reason: str) -> KeyFileError:
    """The error for a key file that cannot be parsed."""
    return KeyFileError(f"key file {path} is corrupt ({reason}); restore it from a backup")


def _read_bytes(path: Path) -> bytes:
    """The bytes of the key file at *path*, after checking it is a private regular file of sane size."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang us; it is refused below as not a regular file.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(f"no identity key file at {path}; create one with `p2pchat init`") from None
    except OSError as error:
        raise KeyFileError(f"cannot open key file {path}: {error.strerror or error}") from error
    try:
        # fstat on the open descriptor checks the very file we read, not whatever the name points to later.
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} can be read or changed by other users; run `chmod 600 {path}` and check "
                "that nobody copied it"
            )
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise _corrupt(path, f"{info.st_size} bytes, more than the {MAX_KEY_FILE_BYTES} a key file may have")
        chunks = []
        remaining = MAX_KEY_FILE_BYTES + 1
        while remaining > 0:
            chunk = os.read(descriptor, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as error:
        raise KeyFileError(f"cannot read key file {path}: {error.strerror or error}") from error
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    if len(data) > MAX_KEY_FILE_BYTES:
        # The file grew after fstat; the limit is on what we parse, not on what stat said.
        raise _corrupt(path, f"more than the {MAX_KEY_FILE_BYTES} bytes a key file may have")
    return data


def _read_contents(path: Path) -> _KeyFileContents:
    """Read and check the structure of the key file at *path*."""
    data = _read_bytes(path)
    try:
        document = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise _corrupt(path, f"not a readable msgpack document: {error}") from None
    return _parse_document(path, document)


def _parse_document(path: Path, document: object) -> _KeyFileContents:
    """Check every field of a decoded key file; raise KeyFileError naming the first bad one."""
    if not isinstance(document, dict) or document.get("format") != KEY_FILE_FORMAT:
        raise _corrupt(path, "not a p2pchat identity file")
    version = document.get("version")
    if type(version) is not int:
        raise _corrupt(path, "missing or malformed version")
    if version != KEY_FILE_VERSION:
        raise KeyFileError(
            f"key file {path} has version {version}, which this p2pchat cannot read; it may need a newer p2pchat"
        )
    if "kdf" not in document:
        raise _corrupt(path, "missing kdf field")
    kdf = None if document["kdf"] is None else _parse_kdf(path, document["kdf"])
    secret = document.get("secret")
    expected_size = SEED_BYTES if kdf is None else _SEALED_SECRET_BYTES
    if not isinstance(secret, bytes) or len(secret) != expected_size:
        raise _corrupt(path, f"the secret is not {expected_size} bytes")
    return _KeyFileContents(kdf=kdf, secret=secret)


def _parse_kdf(path: Path, kdf: object) -> _KdfParams:
    """Check the ``kdf`` field, refusing Argon2id limits beyond our maxima before any memory is spent."""
    if not isinstance(kdf, Mapping):
        raise _corrupt(path, "the kdf field is not a map")
    if kdf.get("alg") != KDF_ALGORITHM:
        raise _corrupt(path, f"unknown key derivation {kdf.get('alg')!r}")
    salt, ops, mem = kdf.get("salt"), kdf.get("ops"), kdf.get("mem")
    if not isinstance(salt, bytes) or len(salt) != _SALT_BYTES:
        raise _corrupt(path, f"the salt is not {_SALT_BYTES} bytes")
    # type() rather than isinstance(): msgpack booleans are ints to isinstance.
    if type(ops) is not int or type(mem) is not int:
        raise _corrupt(path, "the key derivation limits are not integers")
    if not _limits_in_bounds(ops, mem):
        raise KeyFileError(
            f"key file {path} asks for key-derivation limits ops={ops}, mem={mem}, beyond the allowed "
            f"ops <= {MAX_KDF_OPSLIMIT}, mem <= {MAX_KDF_MEMLIMIT}; "
            "refusing to unlock it (restore it from a backup)"
        )
    return _KdfParams(salt=salt, limits=KdfLimits(ops, mem))


def _unseal(path: Path, kdf: _KdfParams, secret: bytes, passphrase: str) -> bytes:
    """The seed sealed in *secret*, or PassphraseError if *passphrase* does not open it."""
    try:
        box = nacl.secret.SecretBox(_derive_key(passphrase, kdf.salt, kdf.limits))
        seed = box.decrypt(secret)
    except nacl.exceptions.CryptoError:
        raise PassphraseError(f"wrong passphrase for {path}") from None
    if len(seed) != SEED_BYTES:
        raise _corrupt(path, "the sealed secret is not a seed")
    return seed
