"""Sealed envelopes: what a sender leaves in a recipient's DHT mailbox when the direct path fails.

The nodes that store a mailbox entry must learn neither who sent it nor what it says; the recipient must learn
both, and be sure of the sender.  So an envelope is signed inside and encrypted outside:

* **inner** (:class:`EnvelopeContent`, msgpack): the sender's Ed25519 public key, its signature of
  :func:`envelope_message` and the payload.  The signed message is ``ENVELOPE_SIGNATURE_CONTEXT || mailbox public
  key (32) || payload``: it names the mailbox, so the recipient cannot re-seal a sender's envelope to somebody
  else's mailbox and pass it off as sent there.
* **outer**: ``ENVELOPE_VERSION (1) || ephemeral X25519 public key (32) || XChaCha20-Poly1305(inner)``, an
  anonymous encryption to the mailbox's X25519 key (converted from its Ed25519 public key, as in
  :mod:`p2pchat.core.x3dh`).  Key and nonce are ``HKDF-SHA256(IKM = DH || ephemeral public || mailbox X25519
  public, salt = zeros, info = ENVELOPE_KDF_INFO)``, 32 + 24 bytes; the version byte and the ephemeral key are
  the AEAD's associated data.  Each envelope has a fresh ephemeral key, so each has its own key and the nonce
  never repeats under one key.

Why not libsodium's ``crypto_box_seal``: it draws its ephemeral key from the OS, and a deterministic simulation
must draw every random byte from its own seeded source.  The construction here is the same idea with the
randomness injected.

The mailbox key pair is an :class:`~p2pchat.core.identity.Identity` of its own (not the user's identity), and its
DHT key is :func:`~p2pchat.core.records.mailbox_key` of its public key.  :func:`open_envelope` raises
:class:`~p2pchat.errors.ProtocolError` and nothing else for whatever bytes it is given: misaddressed, tampered,
truncated and forged envelopes are all refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Final

import nacl.bindings
import nacl.exceptions

from p2pchat.core.framing import decode_struct, encode_struct
from p2pchat.core.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PublicIdentity
from p2pchat.core.kdf import hkdf_sha256
from p2pchat.core.records import MAX_VALUE_BYTES
from p2pchat.core.schema import Bytes, WireStruct, max_wire_size, wire_struct
from p2pchat.core.x3dh import (
    X25519_KEY_BYTES,
    ed25519_to_x25519_public,
    identity_x25519_private,
    x25519_public,
    x25519_shared,
)
from p2pchat.errors import ProtocolError

__all__ = [
    "ENVELOPE_HEADER_BYTES",
    "ENVELOPE_KDF_INFO",
    "ENVELOPE_SIGNATURE_CONTEXT",
    "ENVELOPE_VERSION",
    "MAX_PAYLOAD_BYTES",
    "MAX_SEALED_BYTES",
    "TAG_BYTES",
    "EnvelopeContent",
    "envelope_message",
    "open_envelope",
    "seal",
]

ENVELOPE_VERSION: Final = 1
"""First byte of every sealed envelope; an envelope of another version is refused."""

ENVELOPE_HEADER_BYTES: Final = 1 + X25519_KEY_BYTES
"""The version byte and the ephemeral public key, in clear before the ciphertext."""

TAG_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
"""Size of the Poly1305 tag on the ciphertext."""

ENVELOPE_SIGNATURE_CONTEXT: Final = b"p2pchat-envelope-v1\x00"
"""Prefix of the sender's signed message, so an envelope signature is never valid as any other signature."""

ENVELOPE_KDF_INFO: Final = b"p2pchat-envelope-key-v1"
"""HKDF info of the envelope's key and nonce."""

_CONTENT_FIXED_BYTES: Final = 1 + (2 + PUBLIC_KEY_BYTES) + (2 + SIGNATURE_BYTES)
"""The inner msgpack array's header, sender key and signature (each a bin8 with its 2-byte header)."""


def _largest_payload(sealed_limit: int) -> int:
    """The largest payload whose sealed envelope fits *sealed_limit* bytes.

    What is left after the fixed parts holds the payload and its msgpack bin header, which is 2, 3 or 5 bytes as
    the payload passes 255 and 65,535 bytes: take the best of the three.
    """
    room = sealed_limit - ENVELOPE_HEADER_BYTES - TAG_BYTES - _CONTENT_FIXED_BYTES
    return max(min(room - header, most) for header, most in ((2, 0xFF), (3, 0xFFFF), (5, 0xFFFFFFFF)))


MAX_PAYLOAD_BYTES: Final = _largest_payload(MAX_VALUE_BYTES)
"""Largest payload :func:`seal` takes: the most that lets the sealed envelope fit one mailbox entry
(:data:`~p2pchat.core.records.MAX_VALUE_BYTES`).

The envelope adds 155 bytes to a payload over 65,535 bytes: version and ephemeral key (33), tag (16), and the
inner msgpack array (1), sender key (2 + 32), signature (2 + 64) and the payload's bin32 header (5).  With
mailbox entries of 68 KiB (today's limit) that leaves 69,477 bytes: a 64 KiB message with its ratchet header fits.
"""

_AEAD_KEY_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
_AEAD_NONCE_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES


@wire_struct
@dataclasses.dataclass(frozen=True, slots=True)
class EnvelopeContent(WireStruct):
    """The inside of an envelope: who sent it, their signature of :func:`envelope_message`, and the payload."""

    sender_key: Annotated[bytes, Bytes(min_len=PUBLIC_KEY_BYTES, max_len=PUBLIC_KEY_BYTES)]
    signature: Annotated[bytes, Bytes(min_len=SIGNATURE_BYTES, max_len=SIGNATURE_BYTES)]
    payload: Annotated[bytes, Bytes(max_len=MAX_PAYLOAD_BYTES)]


MAX_SEALED_BYTES: Final = ENVELOPE_HEADER_BYTES + max_wire_size(EnvelopeContent) + TAG_BYTES
"""Largest sealed envelope (at most :data:`~p2pchat.core.records.MAX_VALUE_BYTES`, and as close as msgpack's
headers allow); longer input is refused before any key is derived."""

_MIN_SEALED_BYTES: Final = ENVELOPE_HEADER_BYTES + TAG_BYTES


def envelope_message(mailbox_public_key: bytes, payload: bytes) -> bytes:
    """The exact bytes the sender signs: context, the mailbox's Ed25519 public key (32), the payload."""
    return ENVELOPE_SIGNATURE_CONTEXT + mailbox_public_key + payload


def _key_and_nonce(shared: bytes, ephemeral_public: bytes, mailbox_x25519: bytes) -> tuple[bytes, bytes]:
    okm = hkdf_sha256(
        salt=b"",
        ikm=shared + ephemeral_public + mailbox_x25519,
        info=ENVELOPE_KDF_INFO,
        length=_AEAD_KEY_BYTES + _AEAD_NONCE_BYTES,
    )
    return okm[:_AEAD_KEY_BYTES], okm[_AEAD_KEY_BYTES:]


def seal(sender: Identity, mailbox_public_key: bytes, payload: bytes, random_bytes: Callable[[int], bytes]) -> bytes:
    """Sign *payload* as *sender* for the mailbox whose Ed25519 public key is *mailbox_public_key*, and seal it.

    Draws 32 bytes (the ephemeral key).  The result is at most :data:`MAX_SEALED_BYTES`, a valid mailbox entry
    payload.  :class:`ValueError` for a payload over :data:`MAX_PAYLOAD_BYTES`, a key that is not 32 bytes, or
    short randomness; :class:`ProtocolError` if the mailbox key (which came from its owner) is not a usable curve
    point.
    """
    if type(mailbox_public_key) is not bytes or len(mailbox_public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"a mailbox public key is {PUBLIC_KEY_BYTES} bytes")
    if type(payload) is not bytes or len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"an envelope payload is bytes of at most {MAX_PAYLOAD_BYTES}")
    mailbox_x25519 = ed25519_to_x25519_public(mailbox_public_key)
    signature = sender.sign(envelope_message(mailbox_public_key, payload))
    inner = encode_struct(EnvelopeContent(sender.public.key, signature, payload))
    ephemeral = random_bytes(X25519_KEY_BYTES)
    if type(ephemeral) is not bytes or len(ephemeral) != X25519_KEY_BYTES:
        raise ValueError(f"random_bytes({X25519_KEY_BYTES}) returned something other than {X25519_KEY_BYTES} bytes")
    ephemeral_public = x25519_public(ephemeral)
    key, nonce = _key_and_nonce(x25519_shared(ephemeral, mailbox_x25519), ephemeral_public, mailbox_x25519)
    header = bytes((ENVELOPE_VERSION,)) + ephemeral_public
    ciphertext: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(inner, header, nonce, key)
    return header + ciphertext


def open_envelope(mailbox: Identity, sealed: bytes) -> tuple[PublicIdentity, bytes]:
    """Open an envelope found in *mailbox*'s mailbox: ``(sender, payload)``.

    :class:`ProtocolError` (and nothing else) for: the wrong size or version, an envelope sealed to another
    mailbox or tampered with (the AEAD fails), a malformed inside, or a signature that is not the sender's over
    this mailbox's key and the payload.
    """
    if type(sealed) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(sealed).__name__}")
    if not _MIN_SEALED_BYTES <= len(sealed) <= MAX_SEALED_BYTES:
        raise ProtocolError(f"sealed envelope of {len(sealed)} bytes, expected {_MIN_SEALED_BYTES}..{MAX_SEALED_BYTES}")
    if sealed[0] != ENVELOPE_VERSION:
        raise ProtocolError(f"unknown envelope version {sealed[0]}")
    header = sealed[:ENVELOPE_HEADER_BYTES]
    ephemeral_public = sealed[1:ENVELOPE_HEADER_BYTES]
    mailbox_private = identity_x25519_private(mailbox)
    mailbox_x25519 = x25519_public(mailbox_private)
    shared = x25519_shared(mailbox_private, ephemeral_public)
    key, nonce = _key_and_nonce(shared, ephemeral_public, mailbox_x25519)
    try:
        inner: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed[ENVELOPE_HEADER_BYTES:], header, nonce, key
        )
    except nacl.exceptions.CryptoError:
        raise ProtocolError("envelope does not decrypt: not sealed to this mailbox, or tampered with") from None
    content = decode_struct(EnvelopeContent, inner)
    sender = PublicIdentity.from_key(content.sender_key)
    if not sender.verify(envelope_message(mailbox.public.key, content.payload), content.signature):
        raise ProtocolError("envelope signature does not verify for this mailbox")
    return sender, content.payload
