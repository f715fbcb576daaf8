"""Sealed envelopes: storers learn nothing, the recipient learns the sender, and misaddressed, re-sealed, tampered
or truncated envelopes are refused.

The construction is checked against a reference built here from the module docstring (other pynacl entry points
for the key conversion), and open_envelope is fuzzed -- also with well-sealed garbage inside, which reaches the
inner decoder -- for the one invariant: a result or ProtocolError, nothing else.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import msgpack  # type: ignore[import-untyped]
import nacl.bindings
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.core.envelope import (
    ENVELOPE_HEADER_BYTES,
    ENVELOPE_SIGNATURE_CONTEXT,
    ENVELOPE_VERSION,
    MAX_PAYLOAD_BYTES,
    MAX_SEALED_BYTES,
    TAG_BYTES,
    envelope_message,
    open_envelope,
    seal,
)
from p2pchat.core.identity import Identity
from p2pchat.core.kdf import hkdf_sha256
from p2pchat.core.records import MAX_VALUE_BYTES, decode_entry, encode_entry, mailbox_key, make_entry, validate_entry
from p2pchat.errors import ProtocolError

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None)

NOW = 1_700_000_000.0
T = int(NOW)

# An X25519 point of small order and an Ed25519 key of small order (the neutral element).
LOW_ORDER_X25519 = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
SMALL_ORDER_ED25519 = bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000000")

ALICE = Identity.from_seed(b"\xa1" * 32)
MALLORY = Identity.from_seed(b"\x66" * 32)
BOB_MAILBOX = Identity.from_seed(b"\xb1" * 32)
CAROL_MAILBOX = Identity.from_seed(b"\xc1" * 32)


def _rng(seed: int = 1) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _reference_seal(inner: bytes, mailbox_public_key: bytes, ephemeral: bytes) -> bytes:
    """The outer layer as the module docstring describes it, built without the module."""
    mailbox_x25519 = bytes(nacl.signing.VerifyKey(mailbox_public_key).to_curve25519_public_key())
    ephemeral_public = nacl.bindings.crypto_scalarmult_base(ephemeral)
    shared = nacl.bindings.crypto_scalarmult(ephemeral, mailbox_x25519)
    okm = hkdf_sha256(
        salt=bytes(32), ikm=shared + ephemeral_public + mailbox_x25519, info=b"p2pchat-envelope-key-v1", length=56
    )
    header = bytes((ENVELOPE_VERSION,)) + ephemeral_public
    return header + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(inner, header, okm[32:], okm[:32])


def _inner(sender: Identity, mailbox_public_key: bytes, payload: bytes) -> bytes:
    signature = sender.sign(ENVELOPE_SIGNATURE_CONTEXT + mailbox_public_key + payload)
    packed: bytes = msgpack.packb([sender.public.key, signature, payload])
    return packed


def _refused(mailbox: Identity, sealed: bytes) -> bool:
    try:
        open_envelope(mailbox, sealed)
    except ProtocolError:
        return True
    return False


# --- round trip and construction ----------------------------------------------------------------------------------


def test_round_trip_returns_the_signing_sender_and_the_payload() -> None:
    sealed = seal(ALICE, BOB_MAILBOX.public.key, b"hello bob", _rng())
    sender, payload = open_envelope(BOB_MAILBOX, sealed)
    assert sender == ALICE.public
    assert payload == b"hello bob"
    assert len(sealed) == ENVELOPE_HEADER_BYTES + TAG_BYTES + 1 + 34 + 66 + 2 + len(b"hello bob")


def test_empty_payload_round_trips() -> None:
    assert open_envelope(BOB_MAILBOX, seal(ALICE, BOB_MAILBOX.public.key, b"", _rng())) == (ALICE.public, b"")


def test_construction_matches_the_reference() -> None:
    payload = b"pinned construction"
    draws = random.Random(7).randbytes(32)
    sealed = seal(ALICE, BOB_MAILBOX.public.key, payload, _rng(7))
    assert sealed == _reference_seal(_inner(ALICE, BOB_MAILBOX.public.key, payload), BOB_MAILBOX.public.key, draws)
    assert (
        envelope_message(BOB_MAILBOX.public.key, payload)
        == b"p2pchat-envelope-v1\x00" + BOB_MAILBOX.public.key + payload
    )


def test_sealing_is_deterministic_in_its_randomness_and_fresh_otherwise() -> None:
    key = BOB_MAILBOX.public.key
    assert seal(ALICE, key, b"x", _rng(3)) == seal(ALICE, key, b"x", _rng(3))
    assert seal(ALICE, key, b"x", _rng(3)) != seal(ALICE, key, b"x", _rng(4))


def test_storers_see_neither_sender_nor_content() -> None:
    payload = b"a secret message that is long enough to search for"
    sealed = seal(ALICE, BOB_MAILBOX.public.key, payload, _rng())
    for visible in (ALICE.public.key, payload, payload[:8], BOB_MAILBOX.public.key):
        assert visible not in sealed
    # Two envelopes from one sender to one mailbox share nothing but the version byte.
    other = seal(ALICE, BOB_MAILBOX.public.key, payload, _rng(2))
    assert sealed[0] == other[0] == ENVELOPE_VERSION
    assert sealed[1:ENVELOPE_HEADER_BYTES] != other[1:ENVELOPE_HEADER_BYTES]


# --- misaddressed, re-sealed, forged ------------------------------------------------------------------------------


def test_opened_with_another_mailbox_is_refused() -> None:
    sealed = seal(ALICE, BOB_MAILBOX.public.key, b"for bob", _rng())
    with pytest.raises(ProtocolError, match="decrypt"):
        open_envelope(CAROL_MAILBOX, sealed)
    with pytest.raises(ProtocolError, match="decrypt"):
        open_envelope(ALICE, sealed)


def test_resealed_to_another_mailbox_is_refused() -> None:
    # Bob (or anyone who got the inner part) re-encrypts Alice's signed content to Carol's mailbox: it decrypts,
    # but Alice's signature names Bob's mailbox, so Carol refuses it.
    inner = _inner(ALICE, BOB_MAILBOX.public.key, b"for bob only")
    assert (
        open_envelope(BOB_MAILBOX, _reference_seal(inner, BOB_MAILBOX.public.key, b"\x42" * 32))[1] == b"for bob only"
    )
    resealed = _reference_seal(inner, CAROL_MAILBOX.public.key, b"\x42" * 32)
    with pytest.raises(ProtocolError, match="signature"):
        open_envelope(CAROL_MAILBOX, resealed)


def test_a_claimed_sender_must_have_signed() -> None:
    key = BOB_MAILBOX.public.key
    # Mallory claims to be Alice, signing with her own key: refused.
    forged = msgpack.packb([ALICE.public.key, MALLORY.sign(ENVELOPE_SIGNATURE_CONTEXT + key + b"hi"), b"hi"])
    with pytest.raises(ProtocolError, match="signature"):
        open_envelope(BOB_MAILBOX, _reference_seal(forged, key, b"\x01" * 32))
    # Signing as herself, she is returned as herself.
    sender, _ = open_envelope(BOB_MAILBOX, _reference_seal(_inner(MALLORY, key, b"hi"), key, b"\x01" * 32))
    assert sender == MALLORY.public
    # A signature over another context (a record, say) or another payload is refused.
    for signed in (b"p2pchat-record-v1\x00" + key + b"hi", ENVELOPE_SIGNATURE_CONTEXT + key + b"ho"):
        inner = msgpack.packb([ALICE.public.key, ALICE.sign(signed), b"hi"])
        with pytest.raises(ProtocolError, match="signature"):
            open_envelope(BOB_MAILBOX, _reference_seal(inner, key, b"\x01" * 32))


def test_a_small_order_sender_key_is_refused() -> None:
    inner = msgpack.packb([SMALL_ORDER_ED25519, bytes(64), b"hi"])
    with pytest.raises(ProtocolError, match="signature"):
        open_envelope(BOB_MAILBOX, _reference_seal(inner, BOB_MAILBOX.public.key, b"\x01" * 32))


# --- tampering ----------------------------------------------------------------------------------------------------


def test_every_bit_flip_is_refused() -> None:
    sealed = seal(ALICE, BOB_MAILBOX.public.key, b"small", _rng())
    for bit in range(len(sealed) * 8):
        assert _refused(BOB_MAILBOX, _flip(sealed, bit)), bit


def test_every_truncation_and_extension_is_refused() -> None:
    sealed = seal(ALICE, BOB_MAILBOX.public.key, b"small", _rng())
    for size in range(len(sealed)):
        assert _refused(BOB_MAILBOX, sealed[:size])
        assert _refused(BOB_MAILBOX, sealed[size + 1 :])
    for extra in (b"\x00", b"\x90", sealed[-16:]):
        assert _refused(BOB_MAILBOX, sealed + extra)


def test_unknown_version_is_refused() -> None:
    sealed = seal(ALICE, BOB_MAILBOX.public.key, b"x", _rng())
    for version in (0, 2, 255):
        with pytest.raises(ProtocolError, match="version"):
            open_envelope(BOB_MAILBOX, bytes((version,)) + sealed[1:])


def test_a_low_order_ephemeral_key_is_refused() -> None:
    sealed = seal(ALICE, BOB_MAILBOX.public.key, b"x", _rng())
    with pytest.raises(ProtocolError, match="low-order"):
        open_envelope(BOB_MAILBOX, sealed[:1] + LOW_ORDER_X25519 + sealed[ENVELOPE_HEADER_BYTES:])


@pytest.mark.parametrize(
    "inner",
    [
        b"",
        b"\xc0",
        msgpack.packb([ALICE.public.key, bytes(64)]),
        msgpack.packb([ALICE.public.key, bytes(64), b"x", b"extra"]),
        msgpack.packb([ALICE.public.key[:31], bytes(64), b"x"]),
        msgpack.packb([ALICE.public.key, bytes(64), "text"]),
        _inner(ALICE, BOB_MAILBOX.public.key, b"x") + b"\x00",  # trailing bytes
        msgpack.packb({"sender": ALICE.public.key}),
    ],
)
def test_malformed_inner_parts_are_refused(inner: bytes) -> None:
    with pytest.raises(ProtocolError):
        open_envelope(BOB_MAILBOX, _reference_seal(inner, BOB_MAILBOX.public.key, b"\x05" * 32))


def test_wrong_python_types_are_refused() -> None:
    sealed = seal(ALICE, BOB_MAILBOX.public.key, b"x", _rng())
    for bad in (bytearray(sealed), memoryview(sealed), sealed.hex()):
        with pytest.raises(ProtocolError, match="bytes"):
            open_envelope(BOB_MAILBOX, bad)  # type: ignore[arg-type]


# --- sizes --------------------------------------------------------------------------------------------------------


def test_size_limits_are_reached_exactly() -> None:
    assert MAX_SEALED_BYTES <= MAX_VALUE_BYTES
    assert MAX_SEALED_BYTES >= MAX_VALUE_BYTES - 2  # as full as msgpack's header sizes allow
    assert MAX_PAYLOAD_BYTES >= 64 * 1024 + 1024  # a 64 KiB message with room for its ratchet wrapping
    largest = b"\xab" * MAX_PAYLOAD_BYTES
    sealed = seal(ALICE, BOB_MAILBOX.public.key, largest, _rng())
    assert len(sealed) == MAX_SEALED_BYTES
    assert open_envelope(BOB_MAILBOX, sealed) == (ALICE.public, largest)
    with pytest.raises(ValueError, match="payload"):
        seal(ALICE, BOB_MAILBOX.public.key, largest + b"\xab", _rng())


def test_the_largest_envelope_is_a_valid_mailbox_entry() -> None:
    sealed = seal(ALICE, BOB_MAILBOX.public.key, b"\xab" * MAX_PAYLOAD_BYTES, _rng())
    mailbox = mailbox_key(BOB_MAILBOX.public.key)
    entry = decode_entry(encode_entry(make_entry(mailbox, sealed, T + 3600)))
    validate_entry(entry, mailbox, NOW)
    assert open_envelope(BOB_MAILBOX, entry.payload)[1] == b"\xab" * MAX_PAYLOAD_BYTES


def test_oversized_input_is_refused_before_any_key_is_derived() -> None:
    # Sealed correctly, but larger than any envelope we send: refused on its length alone.
    inner = _inner(ALICE, BOB_MAILBOX.public.key, b"\xab" * (MAX_PAYLOAD_BYTES + 1))
    oversized = _reference_seal(inner, BOB_MAILBOX.public.key, b"\x05" * 32)
    assert len(oversized) == MAX_SEALED_BYTES + 1
    with pytest.raises(ProtocolError, match=f"{MAX_SEALED_BYTES + 1} bytes"):
        open_envelope(BOB_MAILBOX, oversized)
    with pytest.raises(ProtocolError, match="bytes"):
        open_envelope(BOB_MAILBOX, bytes(ENVELOPE_HEADER_BYTES + TAG_BYTES - 1))


# --- our own misuse -----------------------------------------------------------------------------------------------


def test_seal_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mailbox public key"):
        seal(ALICE, BOB_MAILBOX.public.key[:31], b"x", _rng())
    with pytest.raises(ValueError, match="payload"):
        seal(ALICE, BOB_MAILBOX.public.key, "text", _rng())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="random_bytes"):
        seal(ALICE, BOB_MAILBOX.public.key, b"x", lambda n: bytes(n - 1))
    # A mailbox key that is no usable point came from its owner: a protocol error.
    with pytest.raises(ProtocolError, match="curve point"):
        seal(ALICE, SMALL_ORDER_ED25519, b"x", _rng())


# --- fuzzing: ProtocolError and nothing else ----------------------------------------------------------------------

_SMALL = seal(ALICE, BOB_MAILBOX.public.key, b"fuzz me", _rng(9))


def _open_or_protocol_error(sealed: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        open_envelope(BOB_MAILBOX, sealed)


@FAST
@given(st.binary(max_size=400))
def test_fuzz_open_envelope_with_arbitrary_bytes(data: bytes) -> None:
    _open_or_protocol_error(data)


@FAST
@given(st.lists(st.tuples(st.integers(0, len(_SMALL) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_open_envelope_with_a_damaged_envelope(changes: list[tuple[int, int]]) -> None:
    data = bytearray(_SMALL)
    for at, value in changes:
        data[at] = value
    if bytes(data) != _SMALL:
        with pytest.raises(ProtocolError):
            open_envelope(BOB_MAILBOX, bytes(data))


@FAST
@given(st.one_of(st.binary(max_size=300), st.binary(min_size=1, max_size=8).map(lambda tail: b"\x93" + tail)))
def test_fuzz_inner_decoding_behind_a_valid_seal(inner: bytes) -> None:
    # Sealed properly, so the garbage reaches the inner decoder and the signature check.
    _open_or_protocol_error(_reference_seal(inner, BOB_MAILBOX.public.key, b"\x07" * 32))
