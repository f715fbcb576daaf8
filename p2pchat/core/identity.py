"""User identities: an Ed25519 key pair, its address, node id, fingerprint and the safety number of two users.

:class:`Identity` holds the private key and signs.  :class:`PublicIdentity` is what others know of a user --
the 32-byte public key -- with everything derived from it (address, DHT node id, fingerprint) computed once
and cached.  The safety number is what two users compare out of band to rule out a man in the middle; it is
built like Signal's numeric fingerprint, so it is the same on both sides and easy to read aloud.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Final, final

import nacl.exceptions
import nacl.signing
import nacl.utils

from p2pchat.core.address import decode_address, encode_address
from p2pchat.core.ids import NodeId, node_id_for_key
from p2pchat.errors import ProtocolError

__all__ = [
    "FINGERPRINT_DIGITS",
    "FINGERPRINT_ITERATIONS",
    "FINGERPRINT_VERSION",
    "PUBLIC_KEY_BYTES",
    "SEED_BYTES",
    "SIGNATURE_BYTES",
    "Identity",
    "PublicIdentity",
    "fingerprint_digits",
    "format_safety_number",
    "safety_number",
]

PUBLIC_KEY_BYTES: Final = 32
"""Size of an Ed25519 public key."""

SEED_BYTES: Final = 32
"""Size of the Ed25519 seed the whole private key is derived from."""

SIGNATURE_BYTES: Final = 64
"""Size of a detached Ed25519 signature."""

FINGERPRINT_VERSION: Final = b"\x00\x00"
"""Two bytes mixed into every fingerprint hash, so a future scheme cannot collide with this one."""

FINGERPRINT_ITERATIONS: Final = 5200
"""SHA-512 rounds per fingerprint (Signal's count): ~2 ms once, but costly to grind a look-alike key."""

FINGERPRINT_DIGITS: Final = 30
"""Decimal digits in one fingerprint; a safety number is two of them."""

_FINGERPRINT_CHUNK_BYTES: Final = 5
_FINGERPRINT_CHUNK_DIGITS: Final = 5
_SAFETY_GROUP_DIGITS: Final = 5


@final
class PublicIdentity:
    """A user's public Ed25519 key and what is derived from it; immutable, hashable, compared by key."""

    __slots__ = ("_address", "_fingerprint", "_key", "_node_id", "_verify_key")

    _key: bytes
    _verify_key: nacl.signing.VerifyKey
    _address: str | None
    _node_id: NodeId | None
    _fingerprint: str | None

    def __init__(self, key: bytes) -> None:
        if len(key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(key)}")
        key = bytes(key)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_verify_key", nacl.signing.VerifyKey(key))
        object.__setattr__(self, "_address", None)
        object.__setattr__(self, "_node_id", None)
        object.__setattr__(self, "_fingerprint", None)

    @classmethod
    def from_key(cls, key: object) -> PublicIdentity:
        """Validate a peer's public key; raise :class:`~p2pchat.errors.ProtocolError` if it is unusable."""
        if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
            size = len(key) if isinstance(key, bytes) else type(key).__name__
            raise ProtocolError(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {size}")
        return cls(key)

    @classmethod
    def from_address(cls, text: str) -> PublicIdentity:
        """The identity behind a typed address; raise :class:`~p2pchat.errors.AddressError` if not one."""
        return cls(decode_address(text))

    @property
    def key(self) -> bytes:
        """The 32-byte Ed25519 public key."""
        return self._key

    @property
    def address(self) -> str:
        """The human address, ``p2p1...``."""
        if self._address is None:
            object.__setattr__(self, "_address", encode_address(self._key))
        assert self._address is not None
        return self._address

    @property
    def node_id(self) -> NodeId:
        """The DHT node id of this user's node."""
        if self._node_id is None:
            object.__setattr__(self, "_node_id", node_id_for_key(self._key))
        assert self._node_id is not None
        return self._node_id

    @property
    def fingerprint(self) -> str:
        """Thirty decimal digits that stand for this key (see :func:`fingerprint_digits`)."""
        if self._fingerprint is None:
            object.__setattr__(self, "_fingerprint", fingerprint_digits(self._key))
        assert self._fingerprint is not None
        return self._fingerprint

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether *signature* is this key's valid Ed25519 signature of *message*.

        Never raises for bad input: a signature of the wrong size, garbage, or a key that is not a valid curve
        point all give False, so callers on the receive path need no try block.
        """
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            self._verify_key.verify(message, signature)
        except (nacl.exceptions.CryptoError, TypeError):
            return False
        return True

    def __repr__(self) -> str:
        return f"PublicIdentity({self.address})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicIdentity):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PublicIdentity is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"PublicIdentity is immutable; cannot delete {name!r}")

    def __reduce__(self) -> tuple[type[PublicIdentity], tuple[bytes]]:
        # The immutable __setattr__ defeats default copying and pickling; rebuild from the key instead.
        return (PublicIdentity, (self._key,))


@final
class Identity:
    """A user's Ed25519 key pair: it signs, and its :attr:`public` half is what others see."""

    __slots__ = ("_public", "_signing_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self._public = PublicIdentity(bytes(signing_key.verify_key))

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = nacl.utils.random) -> Identity:
        """A new identity from a seed drawn from *random_bytes* (injected so tests can be deterministic)."""
        return cls.from_seed(random_bytes(SEED_BYTES))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity whose private key is derived from the 32-byte *seed*."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"an Ed25519 seed is {SEED_BYTES} bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @property
    def seed(self) -> bytes:
        """The 32-byte seed: the whole secret, as stored in the key file."""
        return bytes(self._signing_key)

    @property
    def public(self) -> PublicIdentity:
        """The public half of this identity."""
        return self._public

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached Ed25519 signature of *message*."""
        return self._signing_key.sign(message).signature

    def __repr__(self) -> str:
        # Never show the seed: reprs end up in logs and tracebacks.
        return f"Identity({self._public.address})"


def fingerprint_digits(key: bytes) -> str:
    """The 30-digit fingerprint of a public *key*, in the manner of Signal's numeric fingerprint.

    ``h = b""`` then :data:`FINGERPRINT_ITERATIONS` times ``h = SHA-512(FINGERPRINT_VERSION || key || h)``
    (the first round hashes just version || key).  The first 30 bytes of ``h`` are read as six 40-bit
    big-endian integers, each reduced mod 100000 and written as five digits.
    """
    prefix = FINGERPRINT_VERSION + key
    digest = b""
    for _ in range(FINGERPRINT_ITERATIONS):
        digest = hashlib.sha512(prefix + digest).digest()
    chunks = FINGERPRINT_DIGITS // _FINGERPRINT_CHUNK_DIGITS
    return "".join(
        _chunk_digits(digest[i * _FINGERPRINT_CHUNK_BYTES : (i + 1) * _FINGERPRINT_CHUNK_BYTES]) for i in range(chunks)
    )


def _chunk_digits(chunk: bytes) -> str:
    """Five decimal digits from a 5-byte chunk: its big-endian value mod 100000, zero-padded."""
    return f"{int.from_bytes(chunk, 'big') % 10**_FINGERPRINT_CHUNK_DIGITS:0{_FINGERPRINT_CHUNK_DIGITS}d}"


def safety_number(a: PublicIdentity, b: PublicIdentity) -> str:
    """The 60-digit number two users compare to verify each other, as 12 space-separated groups of 5 digits.

    The two fingerprints are sorted before they are joined, so both sides see the same number whichever way
    round they call this.
    """
    digits = "".join(sorted((a.fingerprint, b.fingerprint)))
    return " ".join(digits[i : i + _SAFETY_GROUP_DIGITS] for i in range(0, len(digits), _SAFETY_GROUP_DIGITS))


def format_safety_number(number: str, per_line: int = 4) -> str:
    """Lay out a :func:`safety_number` with *per_line* groups per line (three lines of four by default)."""
    if per_line < 1:
        raise ValueError(f"per_line must be at least 1, got {per_line}")
    groups = number.split()
    return "\n".join(" ".join(groups[i : i + per_line]) for i in range(0, len(groups), per_line))
