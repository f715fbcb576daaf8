"""HKDF-SHA256 (RFC 5869): the one key-derivation function of every protocol layer.

The handshake, X3DH, the Double Ratchet and mailbox envelopes all derive keys with it, each under its own
``info`` string (domain separation).  Arguments are keyword-only: salt and input key material are both bytes, and
swapping them would derive wrong keys silently.  (The standard library has HMAC but no HKDF, and pynacl has
neither; RFC 5869 is a dozen lines, checked here against the RFC's own test vectors.)
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

__all__ = ["HASH_BYTES", "HKDF_MAX_BYTES", "hkdf_expand", "hkdf_extract", "hkdf_sha256"]

HASH_BYTES: Final = hashlib.sha256().digest_size
"""Output size of SHA-256, and so of HKDF-Extract."""

HKDF_MAX_BYTES: Final = 255 * HASH_BYTES
"""Most bytes HKDF-Expand can derive (RFC 5869: 255 blocks of the hash's output)."""

_ZERO_SALT: Final = bytes(HASH_BYTES)


def hkdf_extract(*, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract: a pseudorandom key from *ikm*; an empty *salt* means the RFC's zero salt."""
    return hmac.digest(salt or _ZERO_SALT, ikm, "sha256")


def hkdf_expand(*, prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand: *length* bytes from *prk* for the purpose named by *info*.

    :class:`ValueError` unless ``1 <= length <=`` :data:`HKDF_MAX_BYTES`.
    """
    if not 0 < length <= HKDF_MAX_BYTES:
        raise ValueError(f"HKDF-SHA256 derives 1..{HKDF_MAX_BYTES} bytes, not {length}")
    output = bytearray()
    block = b""
    counter = 1
    while len(output) < length:
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        output += block
        counter += 1
    return bytes(output[:length])


def hkdf_sha256(*, salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Extract then HKDF-Expand: *length* bytes from *ikm* (see :func:`hkdf_extract`, :func:`hkdf_expand`)."""
    return hkdf_expand(prk=hkdf_extract(salt=salt, ikm=ikm), info=info, length=length)
