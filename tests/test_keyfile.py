"""The identity key file: round trips, private modes, never overwritten, and corrupt files refused cleanly."""

from __future__ import annotations

import contextlib
import os
import random
import re
import stat
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import nacl.pwhash.argon2id
import pytest

from p2pchat.core.identity import Identity
from p2pchat.errors import KeyFileError, PassphraseError
from p2pchat.keyfile import (
    INTERACTIVE_KDF,
    MAX_KDF_MEMLIMIT,
    MAX_KDF_OPSLIMIT,
    MAX_KEY_FILE_BYTES,
    KdfLimits,
    is_protected,
    load_identity,
    save_identity,
)

IDENTITY = Identity.from_seed(bytes(range(32)))
PASSPHRASE = "correct horse battery staple"


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def _plain_document() -> dict[str, Any]:
    return {"format": "p2pchat-identity", "version": 1, "kdf": None, "secret": IDENTITY.seed}


def _assert_refused(path: Path, passphrase: str | None = None) -> str:
    """Loading *path* fails with KeyFileError but not PassphraseError, and leaves the file as it was."""
    before = path.read_bytes()
    with pytest.raises(KeyFileError) as caught:
        load_identity(path, passphrase)
    assert type(caught.value) is KeyFileError
    assert path.read_bytes() == before
    return str(caught.value)


@pytest.fixture
def plain_file(tmp_path: Path) -> Path:
    path = tmp_path / "identity.key"
    save_identity(path, IDENTITY)
    return path


@pytest.fixture(scope="module")
def protected_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("protected") / "identity.key"
    save_identity(path, IDENTITY, PASSPHRASE, kdf_limits=INTERACTIVE_KDF)
    return path.read_bytes()


@pytest.fixture
def protected_file(tmp_path: Path, protected_bytes: bytes) -> Path:
    path = tmp_path / "identity.key"
    _write(path, protected_bytes)
    return path


def test_plain_round_trip(plain_file: Path) -> None:
    assert load_identity(plain_file).seed == IDENTITY.seed
    assert not is_protected(plain_file)
    # A passphrase offered for an unprotected file is not needed and does no harm.
    assert load_identity(plain_file, "anything").seed == IDENTITY.seed


def test_protected_round_trip(protected_file: Path) -> None:
    assert is_protected(protected_file)
    assert IDENTITY.seed not in protected_file.read_bytes()
    assert load_identity(protected_file, PASSPHRASE).public == IDENTITY.public


def test_passphrase_is_normalized_before_derivation(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    save_identity(path, IDENTITY, "cafe\u0301", kdf_limits=INTERACTIVE_KDF)
    assert load_identity(path, "caf\u00e9").seed == IDENTITY.seed


def test_save_is_deterministic_given_the_randomness(tmp_path: Path) -> None:
    def fixed_random(size: int) -> bytes:
        return b"\x01" * size

    limits = KdfLimits(nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN)
    save_identity(tmp_path / "a", IDENTITY, PASSPHRASE, kdf_limits=limits, random_bytes=fixed_random)
    save_identity(tmp_path / "b", IDENTITY, PASSPHRASE, kdf_limits=limits, random_bytes=fixed_random)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_file_is_0600_and_new_parents_are_0700(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = tmp_path / "home" / "keys" / "identity.key"
    save_identity(path, IDENTITY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "home" / "keys").stat().st_mode) == 0o700
    # A directory that already existed is the user's; its mode is left alone.
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert os.listdir(path.parent) == ["identity.key"]


def test_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o777)
    try:
        save_identity(tmp_path / "home" / "identity.key", IDENTITY)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "home" / "identity.key").stat().st_mode) == 0o600


def test_wrong_passphrase(protected_file: Path, protected_bytes: bytes) -> None:
    with pytest.raises(PassphraseError, match=f"^wrong passphrase for {re.escape(str(protected_file))}$"):
        load_identity(protected_file, "incorrect horse")
    assert protected_file.read_bytes() == protected_bytes


def test_missing_passphrase(protected_file: Path, protected_bytes: bytes) -> None:
    with pytest.raises(PassphraseError, match="passphrase-protected"):
        load_identity(protected_file)
    assert protected_file.read_bytes() == protected_bytes


def test_empty_passphrase_is_refused_when_saving(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    with pytest.raises(KeyFileError, match="passphrase is empty"):
        save_identity(path, IDENTITY, "")
    assert not path.exists()


def test_existing_file_is_never_overwritten(plain_file: Path) -> None:
    before = plain_file.read_bytes()
    other = Identity.from_seed(b"\x09" * 32)
    with pytest.raises(KeyFileError, match=r"already exists.*move it away or pass a different home"):
        save_identity(plain_file, other)
    assert plain_file.read_bytes() == before


def test_existing_dangling_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "identity.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match="already exists"):
        save_identity(link, IDENTITY)
    assert not target.exists()


def test_file_appearing_during_save_is_not_replaced(plain_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the early existence check lost a race: the final link step must still refuse.
    before = plain_file.read_bytes()
    monkeypatch.setattr(os.path, "lexists", lambda _path: False)
    with pytest.raises(KeyFileError, match="already exists"):
        save_identity(plain_file, Identity.from_seed(b"\x09" * 32))
    assert plain_file.read_bytes() == before
    assert os.listdir(plain_file.parent) == ["identity.key"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "identity.key"
    with pytest.raises(KeyFileError, match=f"no identity key file at {re.escape(str(path))}.*p2pchat init"):
        load_identity(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644, 0o601])
def test_file_accessible_to_others_is_refused(plain_file: Path, mode: int) -> None:
    plain_file.chmod(mode)
    message = _assert_refused(plain_file)
    assert f"chmod 600 {plain_file}" in message
    assert stat.S_IMODE(plain_file.stat().st_mode) == mode


def test_directory_and_fifo_are_refused(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        load_identity(directory)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_identity(fifo)


def test_plain_file_truncated_at_every_length(plain_file: Path) -> None:
    whole = plain_file.read_bytes()
    for length in range(len(whole)):
        _write(plain_file, whole[:length])
        message = _assert_refused(plain_file)
        assert message.startswith(f"key file {plain_file} is corrupt (")
        assert message.endswith("); restore it from a backup")


def test_protected_file_truncated(protected_file: Path, protected_bytes: bytes) -> None:
    for length in [0, 1, 10, len(protected_bytes) // 2, len(protected_bytes) - 20, len(protected_bytes) - 1]:
        _write(protected_file, protected_bytes[:length])
        assert "is corrupt" in _assert_refused(protected_file, PASSPHRASE)


def test_random_garbage_is_refused(tmp_path: Path) -> None:
    rng = random.Random(1234)
    path = tmp_path / "identity.key"
    for _ in range(300):
        _write(path, rng.randbytes(rng.randrange(0, 200)))
        _assert_refused(path)


def test_mutated_files_load_or_fail_cleanly(plain_file: Path) -> None:
    # A changed byte in the secret makes another valid key, so success is allowed; any other exception is not.
    whole = plain_file.read_bytes()
    for index in range(len(whole)):
        for value in (0x00, 0xFF, whole[index] ^ 0x01, 0xC1, 0xDE):
            _write(plain_file, whole[:index] + bytes([value]) + whole[index + 1 :])
            with contextlib.suppress(KeyFileError):
                load_identity(plain_file)


BAD_DOCUMENTS: list[object] = [
    None,
    42,
    "p2pchat-identity",
    [1, 2, 3],
    {},
    {**_plain_document(), "format": "p2pchat-identity-x"},
    {**_plain_document(), "format": b"p2pchat-identity"},
    {k: v for k, v in _plain_document().items() if k != "version"},
    {**_plain_document(), "version": "1"},
    {**_plain_document(), "version": True},
    {k: v for k, v in _plain_document().items() if k != "kdf"},
    {**_plain_document(), "kdf": "argon2id13"},
    {**_plain_document(), "kdf": []},
    {k: v for k, v in _plain_document().items() if k != "secret"},
    {**_plain_document(), "secret": None},
    {**_plain_document(), "secret": "x" * 32},
    {**_plain_document(), "secret": bytes(31)},
    {**_plain_document(), "secret": bytes(33)},
    {**_plain_document(), "secret": bytes(72)},
    {
        **_plain_document(),
        "kdf": {"alg": "scrypt", "salt": bytes(16), "ops": 2, "mem": 8192},
        "secret": bytes(72),
    },
    {**_plain_document(), "kdf": {"alg": "argon2id13", "salt": bytes(15), "ops": 2, "mem": 8192}},
    {**_plain_document(), "kdf": {"alg": "argon2id13", "salt": "s" * 16, "ops": 2, "mem": 8192}},
    {**_plain_document(), "kdf": {"alg": "argon2id13", "salt": bytes(16), "ops": 2.0, "mem": 8192}},
    {**_plain_document(), "kdf": {"alg": "argon2id13", "salt": bytes(16), "ops": True, "mem": 8192}},
    {**_plain_document(), "kdf": {"alg": "argon2id13", "salt": bytes(16), "ops": 2}},
    {**_plain_document(), "kdf": {"alg": "argon2id13", "salt": bytes(16), "ops": 2, "mem": 8192}},
]


@pytest.mark.parametrize("document", BAD_DOCUMENTS)
def test_wrong_fields_and_types_are_refused(tmp_path: Path, document: object) -> None:
    path = tmp_path / "identity.key"
    _write(path, msgpack.packb(document, use_bin_type=True))
    assert "is corrupt" in _assert_refused(path, PASSPHRASE)


@pytest.mark.parametrize("raw", [b"\x81\x01\x02", b"\x81\x91\x01\x02", b"\xd6\xff\x00\x00\x00\x00", b"\xc1"])
def test_msgpack_oddities_are_refused(tmp_path: Path, raw: bytes) -> None:
    # Integer and unhashable map keys, a timestamp where a map belongs, and the reserved byte 0xc1.
    path = tmp_path / "identity.key"
    _write(path, raw)
    _assert_refused(path)


def test_unknown_version_asks_for_a_newer_p2pchat(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    _write(path, msgpack.packb({**_plain_document(), "version": 2}, use_bin_type=True))
    assert "newer p2pchat" in _assert_refused(path)


def _padded_file(size: int) -> bytes:
    """A valid plain key file, padded with an extra field to exactly *size* bytes."""
    for padding in range(size):
        data: bytes = msgpack.packb({**_plain_document(), "pad": bytes(padding)}, use_bin_type=True)
        if len(data) == size:
            return data
    raise AssertionError(f"cannot pad to {size}")


def test_size_limit_is_reached_exactly(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    _write(path, _padded_file(MAX_KEY_FILE_BYTES))
    assert load_identity(path).seed == IDENTITY.seed
    _write(path, _padded_file(MAX_KEY_FILE_BYTES + 1))
    assert f"more than the {MAX_KEY_FILE_BYTES}" in _assert_refused(path)
    _write(path, bytes(10 * 1024 * 1024))
    _assert_refused(path)


@pytest.mark.parametrize(
    ("ops", "mem"),
    [
        (MAX_KDF_OPSLIMIT + 1, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE),
        (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, MAX_KDF_MEMLIMIT + 1),
        (2**40, 2**62),
        (0, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE),
        (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, 0),
        (-1, -1),
    ],
)
def test_kdf_limits_outside_bounds_are_refused_before_deriving(
    tmp_path: Path, protected_bytes: bytes, monkeypatch: pytest.MonkeyPatch, ops: int, mem: int
) -> None:
    document = msgpack.unpackb(protected_bytes)
    document["kdf"] = {**document["kdf"], "ops": ops, "mem": mem}
    path = tmp_path / "identity.key"
    _write(path, msgpack.packb(document, use_bin_type=True))

    def no_kdf(*_args: object, **_kwargs: object) -> bytes:
        raise AssertionError("key derivation ran on refused limits")

    monkeypatch.setattr(nacl.pwhash.argon2id, "kdf", no_kdf)
    message = _assert_refused(path, PASSPHRASE)
    assert "key-derivation limits" in message


def test_kdf_limits_at_the_maxima_are_accepted_in_principle() -> None:
    assert KdfLimits(MAX_KDF_OPSLIMIT, MAX_KDF_MEMLIMIT).mem == MAX_KDF_MEMLIMIT
    with pytest.raises(ValueError):
        KdfLimits(MAX_KDF_OPSLIMIT + 1, MAX_KDF_MEMLIMIT)
    with pytest.raises(ValueError):
        KdfLimits(MAX_KDF_OPSLIMIT, MAX_KDF_MEMLIMIT + 1)


def test_stale_temporary_file_is_reported_not_mistaken_for_the_key(tmp_path: Path) -> None:
    def fixed_random(size: int) -> bytes:
        return b"\x01" * size

    path = tmp_path / "identity.key"
    stale = tmp_path / f".identity.key.{fixed_random(8).hex()}.tmp"
    _write(stale, b"left over from a crash")
    with pytest.raises(KeyFileError, match="cannot write key file"):
        save_identity(path, IDENTITY, random_bytes=fixed_random)
    assert not path.exists()
    assert stale.read_bytes() == b"left over from a crash"
