"""X3DH: both sides agree, every forged or stale bundle is refused, one-time prekeys are used once, limits hold.

The shared key is checked against an independent derivation (other pynacl entry points for the key conversions,
HKDF written out by hand) and pinned; HKDF itself is pinned by RFC 5869's test vectors.  Every decoder is fuzzed
for the one invariant: a value or ProtocolError, nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import random
import struct
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import nacl.bindings
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.core import envelope, records, x3dh
from p2pchat.core.identity import Identity
from p2pchat.core.records import (
    CLOCK_SKEW_ALLOWANCE,
    MAX_MAILBOX_TTL,
    MAX_VALUE_BYTES,
    RecordKind,
    prekey_bundle_key,
    sign_record,
    validate_record,
)
from p2pchat.core.schema import to_wire
from p2pchat.core.x3dh import (
    MAX_ENCODED_BUNDLE_BYTES,
    MAX_ENCODED_HEADER_BYTES,
    MAX_ENCODED_PREKEY_STATE_BYTES,
    MAX_ONE_TIME_PREKEYS_PER_BUNDLE,
    MAX_PREKEY_ID,
    MAX_PREVIOUS_SIGNED_PREKEYS,
    MAX_SIGNED_PREKEY_AGE,
    ONE_TIME_PREKEY_TARGET,
    SIGNED_PREKEY_CONTEXT,
    SIGNED_PREKEY_GRACE,
    SIGNED_PREKEY_ROTATION,
    X3DH_INFO,
    InitialHeader,
    OneTimePrekey,
    OneTimePrekeySecret,
    PrekeyBundle,
    PrekeyState,
    SignedPrekeySecret,
    bundle_for,
    bundle_message,
    decode_bundle,
    decode_initial_header,
    decode_prekey_state,
    encode_bundle,
    encode_initial_header,
    encode_prekey_state,
    initiate,
    new_prekeys,
    replenish,
    respond,
    rotate_signed_prekey,
    signed_prekey_pair,
    validate_bundle,
)
from p2pchat.errors import ProtocolError

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None)

NOW = 1_700_000_000.0
T = int(NOW)
DAY = 86400

# Known answer for the seeds and randomness of test_shared_key_is_pinned: it pins the DH order, the KDF and AD.
EXPECTED_SHARED_KEY = "ba9cd4698e433eb05c27df488c501726c0d2097b31a277eeb3185225f383cfd1"

# X25519 points of small order (libsodium's list): the DH output with any of them is all zero.
LOW_ORDER_POINTS = [
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
]

# An Ed25519 public key of small order (the neutral element): no X25519 key may be derived from it.
SMALL_ORDER_ED25519 = bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000000")


def _rng(seed: int = 1) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


class _Recorder:
    """A seeded random_bytes that remembers what it handed out, so a test can redo the derivation."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self.draws: list[bytes] = []

    def __call__(self, count: int) -> bytes:
        data = self._random.randbytes(count)
        self.draws.append(data)
        return data


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.from_seed(b"\xa1" * 32)


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.from_seed(b"\xb0" * 32)


@pytest.fixture(scope="module")
def mallory() -> Identity:
    return Identity.from_seed(b"\x66" * 32)


@pytest.fixture(scope="module")
def bob_state(bob: Identity) -> PrekeyState:
    return new_prekeys(bob, _rng(2), NOW, count=3)


@pytest.fixture(scope="module")
def bob_bundle(bob: Identity, bob_state: PrekeyState) -> PrekeyBundle:
    return bundle_for(bob_state, bob, NOW)


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _rejected(fn: Callable[..., Any], *args: Any) -> bool:
    try:
        fn(*args)
    except ProtocolError:
        return True
    return False


def _resign(identity: Identity, bundle: PrekeyBundle, **changes: Any) -> PrekeyBundle:
    """*bundle* with *changes*, signed again by *identity*: a well-formed bundle whose content is chosen."""
    changed = dataclasses.replace(bundle, **changes)
    message = bundle_message(
        changed.identity_key,
        changed.signed_prekey_id,
        changed.signed_prekey,
        changed.created_at,
        changed.one_time_prekeys,
    )
    return dataclasses.replace(changed, signature=identity.sign(message))


# --- agreement ----------------------------------------------------------------------------------------------------


def test_both_sides_agree_with_a_one_time_prekey(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle
) -> None:
    validate_bundle(decode_bundle(encode_bundle(bob_bundle)), bob.public.key, NOW)
    shared, header, ad = initiate(alice, bob_bundle, _rng(3))
    assert header.one_time_prekey_id is not None
    received = decode_initial_header(encode_initial_header(header))
    new_state, bob_shared, bob_ad, sender = respond(bob, bob_state, received, NOW)
    assert bob_shared == shared and len(shared) == x3dh.SHARED_KEY_BYTES
    assert bob_ad == ad == alice.public.key + bob.public.key
    assert len(ad) == x3dh.ASSOCIATED_DATA_BYTES
    assert sender == alice.public
    # The used one-time prekey is gone from the new state, and only it; the state given is untouched.
    assert [k.prekey_id for k in new_state.one_time_prekeys] == [
        k.prekey_id for k in bob_state.one_time_prekeys if k.prekey_id != header.one_time_prekey_id
    ]
    assert len(bob_state.one_time_prekeys) == 3


def test_both_sides_agree_without_a_one_time_prekey(alice: Identity, bob: Identity) -> None:
    state = new_prekeys(bob, _rng(4), NOW, count=0)
    bundle = bundle_for(state, bob, NOW)
    assert bundle.one_time_prekeys == ()
    recorder = _Recorder(5)
    shared, header, ad = initiate(alice, bundle, recorder)
    assert header.one_time_prekey_id is None
    assert [len(d) for d in recorder.draws] == [32]  # no index is drawn when there is nothing to pick
    new_state, bob_shared, bob_ad, _ = respond(bob, state, header, NOW)
    assert (bob_shared, bob_ad) == (shared, ad)
    assert new_state == state


def _reference_shared_key(alice: Identity, bob: Identity, ephemeral: bytes, spk: bytes, opk: bytes | None) -> bytes:
    """X3DH written out from the spec with other pynacl entry points and a hand-rolled single-block HKDF."""
    ik_a = bytes(nacl.signing.SigningKey(alice.seed).to_curve25519_private_key())
    ik_b = bytes(nacl.signing.VerifyKey(bob.public.key).to_curve25519_public_key())
    spk_public = nacl.bindings.crypto_scalarmult_base(spk)
    dh = [
        nacl.bindings.crypto_scalarmult(ik_a, spk_public),
        nacl.bindings.crypto_scalarmult(ephemeral, ik_b),
        nacl.bindings.crypto_scalarmult(ephemeral, spk_public),
    ]
    if opk is not None:
        dh.append(nacl.bindings.crypto_scalarmult(ephemeral, nacl.bindings.crypto_scalarmult_base(opk)))
    prk = hmac.new(bytes(32), b"\xff" * 32 + b"".join(dh), hashlib.sha256).digest()
    return hmac.new(prk, b"p2pchat-x3dh-v1" + b"\x01", hashlib.sha256).digest()


@pytest.mark.parametrize("count", [0, 3])
def test_shared_key_matches_an_independent_derivation(alice: Identity, bob: Identity, count: int) -> None:
    state = new_prekeys(bob, _rng(6), NOW, count=count)
    recorder = _Recorder(7)
    shared, header, _ = initiate(alice, bundle_for(state, bob, NOW), recorder)
    ephemeral = recorder.draws[0]
    assert header.ephemeral_key == nacl.bindings.crypto_scalarmult_base(ephemeral)
    opk = None
    if header.one_time_prekey_id is not None:
        opk = next(k.private_key for k in state.one_time_prekeys if k.prekey_id == header.one_time_prekey_id)
    assert shared == _reference_shared_key(alice, bob, ephemeral, state.current.private_key, opk)


def test_shared_key_is_pinned(alice: Identity, bob: Identity) -> None:
    state = new_prekeys(bob, _rng(8), NOW, count=2)
    shared, header, _ = initiate(alice, bundle_for(state, bob, NOW), _rng(9))
    assert (header.signed_prekey_id, header.one_time_prekey_id) == (0, 0)
    assert shared.hex() == EXPECTED_SHARED_KEY


def test_bundle_signed_bytes_are_pinned(bob: Identity, bob_bundle: PrekeyBundle) -> None:
    expected = (
        b"p2pchat-spk-v1\x00"
        + bob.public.key
        + struct.pack(">IQ", bob_bundle.signed_prekey_id, bob_bundle.created_at)
        + bob_bundle.signed_prekey
        + struct.pack(">H", 3)
        + b"".join(struct.pack(">I", k.prekey_id) + k.public_key for k in bob_bundle.one_time_prekeys)
    )
    message = bundle_message(
        bob.public.key,
        bob_bundle.signed_prekey_id,
        bob_bundle.signed_prekey,
        bob_bundle.created_at,
        bob_bundle.one_time_prekeys,
    )
    assert message == expected
    assert bob.public.verify(expected, bob_bundle.signature)


def test_signature_contexts_are_distinct_and_prefix_free() -> None:
    contexts = [
        records.RECORD_SIGNATURE_CONTEXT,
        records.TOMBSTONE_SIGNATURE_CONTEXT,
        SIGNED_PREKEY_CONTEXT,
        envelope.ENVELOPE_SIGNATURE_CONTEXT,
    ]
    for a in contexts:
        assert a.isascii() and a.endswith(b"\x00")
        for b in contexts:
            assert a == b or not b.startswith(a)
    assert len({X3DH_INFO, envelope.ENVELOPE_KDF_INFO}) == 2


def test_initiators_pick_one_time_prekeys_at_random(alice: Identity, bob: Identity) -> None:
    state = new_prekeys(bob, _rng(10), NOW, count=MAX_ONE_TIME_PREKEYS_PER_BUNDLE)
    bundle = bundle_for(state, bob, NOW)
    picked = {initiate(alice, bundle, _rng(seed))[1].one_time_prekey_id for seed in range(60)}
    # Sixty initiators who fetched the same bundle: with a uniform pick, about 45 distinct prekeys.
    assert len(picked) > 30


def test_responder_ratchet_key_pair_is_the_signed_prekey(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle
) -> None:
    _, header, _ = initiate(alice, bob_bundle, _rng(11))
    new_state, _, _, _ = respond(bob, bob_state, header, NOW)
    pair = signed_prekey_pair(new_state, header.signed_prekey_id)
    assert pair.public == bob_bundle.signed_prekey
    assert pair.private == bob_state.current.private_key
    assert nacl.bindings.crypto_scalarmult_base(pair.private) == pair.public
    assert pair.private.hex() not in repr(pair)
    with pytest.raises(ProtocolError, match="signed prekey"):
        signed_prekey_pair(new_state, 99)


# --- one-time prekeys are used once -------------------------------------------------------------------------------


def test_a_used_one_time_prekey_is_refused_the_second_time(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle
) -> None:
    _, header, _ = initiate(alice, bob_bundle, _rng(12))
    state, _, _, _ = respond(bob, bob_state, header, NOW)
    with pytest.raises(ProtocolError, match="already used"):
        respond(bob, state, header, NOW)
    # Also after the state went to disk and back, and for another initiator who picked the same prekey.
    stored = decode_prekey_state(encode_prekey_state(state))
    with pytest.raises(ProtocolError, match="already used"):
        respond(bob, stored, header, NOW)
    _, other, _ = initiate(Identity.from_seed(b"\x0c" * 32), bob_bundle, _rng(12))
    assert other.one_time_prekey_id == header.one_time_prekey_id
    with pytest.raises(ProtocolError, match="already used"):
        respond(bob, stored, other, NOW)
    # Replenishing never brings an id back.
    topped = replenish(stored, _rng(13), 3)
    assert header.one_time_prekey_id not in {k.prekey_id for k in topped.one_time_prekeys}
    with pytest.raises(ProtocolError, match="already used"):
        respond(bob, topped, header, NOW)


def test_unknown_prekey_ids_are_refused(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle
) -> None:
    _, header, _ = initiate(alice, bob_bundle, _rng(14))
    with pytest.raises(ProtocolError, match="unknown"):
        respond(bob, bob_state, dataclasses.replace(header, one_time_prekey_id=1000), NOW)
    with pytest.raises(ProtocolError, match="unknown signed prekey"):
        respond(bob, bob_state, dataclasses.replace(header, signed_prekey_id=1), NOW)


def test_a_tampered_header_never_yields_the_same_key(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle
) -> None:
    # The header is not signed: tampering shows as a different key or associated data, so the first message's
    # AEAD fails.  (The sender key's sign bit gives the same X25519 key, hence the same SK: the AD catches it.)
    shared, header, ad = initiate(alice, bob_bundle, _rng(15))
    data = encode_initial_header(header)
    for bit in range(len(data) * 8):
        try:
            _, bob_shared, bob_ad, _ = respond(bob, bob_state, decode_initial_header(_flip(data, bit)), NOW)
        except ProtocolError:
            continue
        assert (bob_shared, bob_ad) != (shared, ad)


def test_non_canonical_ephemeral_keys_are_refused(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle
) -> None:
    # X25519 ignores the top bit: without this check a replayed header could differ in one bit and agree.
    _, header, _ = initiate(alice, bob_bundle, _rng(15))
    key = header.ephemeral_key
    assert key[31] & 0x80 == 0
    for bad in (key[:31] + bytes([key[31] | 0x80]), ((1 << 255) - 19).to_bytes(32, "little"), b"\xff" * 32):
        with pytest.raises(ProtocolError, match="canonical"):
            respond(bob, bob_state, dataclasses.replace(header, ephemeral_key=bad), NOW)
    # The largest canonical value is a valid (if unlikely) key: only the refusal above is about canonical form.
    largest = ((1 << 255) - 20).to_bytes(32, "little")
    try:
        respond(bob, bob_state, dataclasses.replace(header, ephemeral_key=largest), NOW)
    except ProtocolError as exc:
        assert "canonical" not in str(exc)


# --- bundles ------------------------------------------------------------------------------------------------------


def test_every_bit_of_the_bundle_signature_matters(bob: Identity, bob_bundle: PrekeyBundle) -> None:
    for bit in range(len(bob_bundle.signature) * 8):
        bad = dataclasses.replace(bob_bundle, signature=_flip(bob_bundle.signature, bit))
        with pytest.raises(ProtocolError, match="signature"):
            validate_bundle(bad, bob.public.key, NOW)


def test_every_bit_of_the_signed_prekey_matters(alice: Identity, bob: Identity, bob_bundle: PrekeyBundle) -> None:
    for bit in range(len(bob_bundle.signed_prekey) * 8):
        bad = dataclasses.replace(bob_bundle, signed_prekey=_flip(bob_bundle.signed_prekey, bit))
        with pytest.raises(ProtocolError, match="signature"):
            validate_bundle(bad, bob.public.key, NOW)
        # initiate checks the signature itself, so a substituted prekey is never used even unvalidated.
        with pytest.raises(ProtocolError, match="signature"):
            initiate(alice, bad, _rng())


def test_every_bit_of_the_identity_key_matters(bob: Identity, bob_bundle: PrekeyBundle) -> None:
    for bit in range(len(bob_bundle.identity_key) * 8):
        bad = dataclasses.replace(bob_bundle, identity_key=_flip(bob_bundle.identity_key, bit))
        with pytest.raises(ProtocolError, match="another identity"):
            validate_bundle(bad, bob.public.key, NOW)
        with pytest.raises(ProtocolError, match="signature"):
            validate_bundle(bad, bad.identity_key, NOW)


def test_every_other_signed_field_matters(bob: Identity, bob_bundle: PrekeyBundle) -> None:
    key = bob.public.key
    for bit in range(32):
        with pytest.raises(ProtocolError):
            validate_bundle(
                dataclasses.replace(bob_bundle, signed_prekey_id=bob_bundle.signed_prekey_id ^ (1 << bit)), key, NOW
            )
    for bit in range(63):
        with pytest.raises(ProtocolError):
            validate_bundle(dataclasses.replace(bob_bundle, created_at=bob_bundle.created_at ^ (1 << bit)), key, NOW)
    first = bob_bundle.one_time_prekeys[0]
    rest = bob_bundle.one_time_prekeys[1:]
    for bit in range(32):
        swapped = (dataclasses.replace(first, prekey_id=first.prekey_id ^ (1 << bit)), *rest)
        with pytest.raises(ProtocolError):
            validate_bundle(dataclasses.replace(bob_bundle, one_time_prekeys=swapped), key, NOW)
    for bit in range(256):
        swapped = (dataclasses.replace(first, public_key=_flip(first.public_key, bit)), *rest)
        with pytest.raises(ProtocolError, match="signature"):
            validate_bundle(dataclasses.replace(bob_bundle, one_time_prekeys=swapped), key, NOW)
    # Dropping or adding a one-time prekey breaks the signature too.
    with pytest.raises(ProtocolError, match="signature"):
        validate_bundle(dataclasses.replace(bob_bundle, one_time_prekeys=rest), key, NOW)


def test_every_bit_of_the_encoded_bundle_matters(bob: Identity, bob_bundle: PrekeyBundle) -> None:
    data = encode_bundle(bob_bundle)
    for bit in range(len(data) * 8):
        assert _rejected(lambda raw: validate_bundle(decode_bundle(raw), bob.public.key, NOW), _flip(data, bit))
    for size in range(len(data)):
        assert _rejected(decode_bundle, data[:size])


def test_a_bundle_signed_by_another_key_is_refused(
    alice: Identity, bob: Identity, mallory: Identity, bob_bundle: PrekeyBundle
) -> None:
    forged = _resign(mallory, bob_bundle)
    with pytest.raises(ProtocolError, match="signature"):
        validate_bundle(forged, bob.public.key, NOW)
    with pytest.raises(ProtocolError, match="signature"):
        initiate(alice, forged, _rng())
    # Mallory's own, valid bundle offered in Bob's place: refused for its identity.
    mallory_bundle = bundle_for(new_prekeys(mallory, _rng(16), NOW, count=1), mallory, NOW)
    validate_bundle(mallory_bundle, mallory.public.key, NOW)
    with pytest.raises(ProtocolError, match="another identity"):
        validate_bundle(mallory_bundle, bob.public.key, NOW)


def test_bundle_age_boundaries(bob: Identity, bob_bundle: PrekeyBundle) -> None:
    key = bob.public.key
    made = bob_bundle.created_at
    validate_bundle(bob_bundle, key, made + MAX_SIGNED_PREKEY_AGE)
    with pytest.raises(ProtocolError, match="too old"):
        validate_bundle(bob_bundle, key, made + MAX_SIGNED_PREKEY_AGE + 1)
    validate_bundle(bob_bundle, key, made - CLOCK_SKEW_ALLOWANCE)
    with pytest.raises(ProtocolError, match="future"):
        validate_bundle(bob_bundle, key, made - CLOCK_SKEW_ALLOWANCE - 1)
    assert MAX_SIGNED_PREKEY_AGE == 30 * DAY + CLOCK_SKEW_ALLOWANCE


def test_repeated_one_time_prekey_ids_are_refused(bob: Identity, bob_bundle: PrekeyBundle) -> None:
    first = bob_bundle.one_time_prekeys[0]
    twice = _resign(bob, bob_bundle, one_time_prekeys=(first, dataclasses.replace(first, public_key=b"\x09" * 32)))
    with pytest.raises(ProtocolError, match="twice"):
        validate_bundle(twice, bob.public.key, NOW)


def test_full_bundle_fits_a_prekeys_record(bob: Identity) -> None:
    state = new_prekeys(bob, _rng(17), NOW, count=MAX_ONE_TIME_PREKEYS_PER_BUNDLE)
    bundle = bundle_for(state, bob, NOW)
    assert len(bundle.one_time_prekeys) == MAX_ONE_TIME_PREKEYS_PER_BUNDLE == ONE_TIME_PREKEY_TARGET
    data = encode_bundle(bundle)
    assert len(data) <= MAX_ENCODED_BUNDLE_BYTES < MAX_VALUE_BYTES // 10
    record = sign_record(bob, RecordKind.PREKEYS, 1, T + DAY, data)
    validate_record(record, prekey_bundle_key(bob.public.key), NOW)
    validate_bundle(decode_bundle(record.value), bob.public.key, NOW)


def test_bundle_one_time_prekey_limit(bob: Identity, bob_bundle: PrekeyBundle) -> None:
    too_many = tuple(OneTimePrekey(i, b"\x09" * 32) for i in range(MAX_ONE_TIME_PREKEYS_PER_BUNDLE + 1))
    with pytest.raises(ValueError, match="one_time_prekeys"):
        encode_bundle(dataclasses.replace(bob_bundle, one_time_prekeys=too_many))
    wire = msgpack.packb(
        [
            bob.public.key,
            0,
            bob_bundle.signed_prekey,
            T,
            [[k.prekey_id, k.public_key] for k in too_many],
            bob_bundle.signature,
        ]
    )
    with pytest.raises(ProtocolError, match="one_time_prekeys"):
        decode_bundle(wire)
    with pytest.raises(ProtocolError, match="one_time_prekeys"):
        validate_bundle(dataclasses.replace(bob_bundle, one_time_prekeys=too_many), bob.public.key, NOW)


def test_decoders_refuse_input_over_their_limit_before_unpacking() -> None:
    for decode, limit in (
        (decode_bundle, MAX_ENCODED_BUNDLE_BYTES),
        (decode_initial_header, MAX_ENCODED_HEADER_BYTES),
        (decode_prekey_state, MAX_ENCODED_PREKEY_STATE_BYTES),
    ):
        with pytest.raises(ProtocolError, match="over the"):
            decode(b"\x00" * (limit + 1))
        with pytest.raises(ProtocolError, match="bytes"):
            decode(bytearray(b"\x90"))  # type: ignore[arg-type]


def test_prekey_id_limit_on_the_wire(alice: Identity, bob_bundle: PrekeyBundle) -> None:
    _, header, _ = initiate(alice, bob_bundle, _rng())
    top = dataclasses.replace(header, one_time_prekey_id=MAX_PREKEY_ID, signed_prekey_id=MAX_PREKEY_ID)
    assert decode_initial_header(encode_initial_header(top)) == top
    with pytest.raises(ValueError, match="one_time_prekey_id"):
        encode_initial_header(dataclasses.replace(header, one_time_prekey_id=MAX_PREKEY_ID + 1))
    wire = msgpack.packb([header.sender_identity_key, header.ephemeral_key, MAX_PREKEY_ID + 1, None])
    with pytest.raises(ProtocolError, match="signed_prekey_id"):
        decode_initial_header(wire)


# --- low-order points ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_low_order_prekeys_are_refused(alice: Identity, bob: Identity, bob_bundle: PrekeyBundle, point: bytes) -> None:
    # Bob (or whoever holds his key) signs a low-order prekey: the all-zero DH is refused all the same.
    bad_spk = _resign(bob, bob_bundle, signed_prekey=point)
    with pytest.raises(ProtocolError, match="low-order"):
        initiate(alice, bad_spk, _rng())
    bad_opk = _resign(bob, bob_bundle, one_time_prekeys=(OneTimePrekey(0, point),))
    with pytest.raises(ProtocolError, match="low-order"):
        initiate(alice, bad_opk, _rng())


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_low_order_ephemeral_key_is_refused(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle, point: bytes
) -> None:
    _, header, _ = initiate(alice, bob_bundle, _rng())
    # The last two are p and p + 1, non-canonical spellings of 0 and 1: refused before any DH.
    with pytest.raises(ProtocolError, match=r"low-order|canonical"):
        respond(bob, bob_state, dataclasses.replace(header, ephemeral_key=point), NOW)


def test_small_order_identity_keys_are_refused(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle
) -> None:
    _, header, _ = initiate(alice, bob_bundle, _rng())
    with pytest.raises(ProtocolError, match="curve point"):
        respond(bob, bob_state, dataclasses.replace(header, sender_identity_key=SMALL_ORDER_ED25519), NOW)
    # A bundle cannot claim such a key either: no signature verifies under it, and the conversion refuses it.
    with pytest.raises(ProtocolError):
        initiate(alice, dataclasses.replace(bob_bundle, identity_key=SMALL_ORDER_ED25519), _rng())
    with pytest.raises(ProtocolError, match="curve point"):
        x3dh.ed25519_to_x25519_public(SMALL_ORDER_ED25519)


# --- the private state --------------------------------------------------------------------------------------------


def test_new_prekeys_and_replenish_reach_the_target(bob: Identity) -> None:
    state = new_prekeys(bob, _rng(18), NOW)
    assert len(state.one_time_prekeys) == ONE_TIME_PREKEY_TARGET
    assert [k.prekey_id for k in state.one_time_prekeys] == list(range(ONE_TIME_PREKEY_TARGET))
    assert replenish(state, _rng(19)) is state
    # Use three, then top up: three new keys with fresh ids.
    used = PrekeyState(
        state.identity_key,
        state.current,
        state.previous,
        state.one_time_prekeys[3:],
        state.next_signed_prekey_id,
        state.next_one_time_prekey_id,
    )
    topped = replenish(used, _rng(19))
    assert len(topped.one_time_prekeys) == ONE_TIME_PREKEY_TARGET
    assert [k.prekey_id for k in topped.one_time_prekeys[-3:]] == [100, 101, 102]
    assert topped.next_one_time_prekey_id == 103
    assert len({k.private_key for k in topped.one_time_prekeys}) == ONE_TIME_PREKEY_TARGET
    for bad in (-1, MAX_ONE_TIME_PREKEYS_PER_BUNDLE + 1):
        with pytest.raises(ValueError, match="target"):
            replenish(state, _rng(), bad)
    with pytest.raises(ValueError, match="target"):
        new_prekeys(bob, _rng(), NOW, count=MAX_ONE_TIME_PREKEYS_PER_BUNDLE + 1)


def test_prekey_ids_run_out_with_an_error_not_a_wrap(bob: Identity) -> None:
    state = new_prekeys(bob, _rng(20), NOW, count=0)
    near_end = dataclasses.replace(state, next_one_time_prekey_id=MAX_PREKEY_ID)
    last = replenish(near_end, _rng(), 1)
    assert [k.prekey_id for k in last.one_time_prekeys] == [MAX_PREKEY_ID]
    assert decode_prekey_state(encode_prekey_state(last)) == last
    with pytest.raises(ValueError, match="exhausted"):
        replenish(last, _rng(), 2)
    with pytest.raises(ValueError, match="exhausted"):
        replenish(near_end, _rng(), 2)
    spent = dataclasses.replace(state, next_signed_prekey_id=MAX_PREKEY_ID + 1)
    with pytest.raises(ValueError, match="exhausted"):
        rotate_signed_prekey(spent, bob, _rng(), NOW + SIGNED_PREKEY_ROTATION)


def test_rotation_keeps_the_previous_signed_prekey_for_the_grace_period(alice: Identity, bob: Identity) -> None:
    state = new_prekeys(bob, _rng(21), NOW, count=2)
    old_bundle = bundle_for(state, bob, NOW)
    assert rotate_signed_prekey(state, bob, _rng(), NOW + SIGNED_PREKEY_ROTATION - 1) is state
    rotated_at = NOW + SIGNED_PREKEY_ROTATION
    rotated = rotate_signed_prekey(state, bob, _rng(22), rotated_at)
    assert rotated.current.prekey_id == 1 and rotated.current.created_at == int(rotated_at)
    assert [(k.prekey_id, k.retired_at) for k in rotated.previous] == [(0, int(rotated_at))]
    new_bundle = bundle_for(rotated, bob, rotated_at)
    assert new_bundle.signed_prekey_id == 1 and new_bundle.signed_prekey != old_bundle.signed_prekey
    # A message to the old prekey, opened within the grace period, still works ...
    shared, header, _ = initiate(alice, old_bundle, _rng(23))
    last_moment = rotated_at + SIGNED_PREKEY_GRACE - 1
    assert respond(bob, rotated, header, last_moment)[1] == shared
    # (By then prekey 1 is due as well; prekey 0 is still kept.)
    assert [k.prekey_id for k in rotate_signed_prekey(rotated, bob, _rng(), last_moment).previous] == [0, 1]
    # ... and not after it; the next rotation call forgets the key.
    expired_at = rotated_at + SIGNED_PREKEY_GRACE
    with pytest.raises(ProtocolError, match="retired"):
        respond(bob, rotated, header, expired_at)
    pruned = rotate_signed_prekey(rotated, bob, _rng(), expired_at)
    assert [k.prekey_id for k in pruned.previous] == [1]
    with pytest.raises(ProtocolError, match="unknown signed prekey"):
        respond(bob, pruned, header, expired_at)
    with pytest.raises(ProtocolError):
        signed_prekey_pair(pruned, 0)
    assert SIGNED_PREKEY_GRACE == MAX_MAILBOX_TTL + CLOCK_SKEW_ALLOWANCE


def test_rotation_call_forgets_expired_prekeys_even_when_no_rotation_is_due(bob: Identity) -> None:
    state = PrekeyState(bob.public.key, _secret(1), (_secret(0, retired_at=T - SIGNED_PREKEY_GRACE),), (), 2, 0)
    state = dataclasses.replace(state, current=dataclasses.replace(state.current, created_at=T))
    assert rotate_signed_prekey(state, bob, _rng(), NOW - 1).previous == state.previous
    pruned = rotate_signed_prekey(state, bob, _rng(), NOW)
    assert pruned.previous == ()
    assert pruned.current == state.current


def test_weekly_rotation_reaches_the_previous_key_limit_and_stays_there(bob: Identity) -> None:
    state = new_prekeys(bob, _rng(24), NOW, count=0)
    counts = []
    for week in range(1, 12):
        state = rotate_signed_prekey(state, bob, _rng(week), NOW + week * SIGNED_PREKEY_ROTATION)
        counts.append(len(state.previous))
        state = decode_prekey_state(encode_prekey_state(state))
    assert max(counts) == MAX_PREVIOUS_SIGNED_PREKEYS == 5
    assert counts[-1] == MAX_PREVIOUS_SIGNED_PREKEYS
    assert state.current.prekey_id == 11


def test_a_clock_set_back_rotates_and_the_previous_keys_stay_bounded(bob: Identity) -> None:
    state = new_prekeys(bob, _rng(25), NOW, count=0)
    # Each step the clock is two days behind the last prekey's creation: every peer would refuse it, so rotate.
    now = NOW
    for step in range(MAX_PREVIOUS_SIGNED_PREKEYS + 3):
        now -= 2 * DAY
        state = rotate_signed_prekey(state, bob, _rng(step), now)
        assert state.current.created_at == int(now)
        assert len(state.previous) == min(step + 1, MAX_PREVIOUS_SIGNED_PREKEYS)
    assert [k.prekey_id for k in state.previous] == list(range(3, 3 + MAX_PREVIOUS_SIGNED_PREKEYS))
    bundle_for(state, bob, now)
    # Within the skew allowance nothing happens.
    assert rotate_signed_prekey(state, bob, _rng(), now - CLOCK_SKEW_ALLOWANCE) is state


def test_bundle_for_refuses_a_signed_prekey_peers_would_refuse(bob: Identity, bob_state: PrekeyState) -> None:
    bundle_for(bob_state, bob, NOW + MAX_SIGNED_PREKEY_AGE)
    with pytest.raises(ValueError, match="rotate"):
        bundle_for(bob_state, bob, NOW + MAX_SIGNED_PREKEY_AGE + 1)
    with pytest.raises(ValueError, match="rotate"):
        bundle_for(bob_state, bob, NOW - CLOCK_SKEW_ALLOWANCE - 1)


def test_own_misuse_is_a_value_error(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle
) -> None:
    _, header, _ = initiate(alice, bob_bundle, _rng())
    with pytest.raises(ValueError, match="another identity"):
        respond(alice, bob_state, header, NOW)
    with pytest.raises(ValueError, match="another identity"):
        bundle_for(bob_state, alice, NOW)
    with pytest.raises(ValueError, match="another identity"):
        rotate_signed_prekey(bob_state, alice, _rng(), NOW)
    with pytest.raises(ValueError, match="random_bytes"):
        initiate(alice, bob_bundle, lambda n: b"\x01" * (n - 1))
    with pytest.raises(ValueError, match="time"):
        new_prekeys(bob, _rng(), -1.0)


def test_prekey_state_round_trips_and_hides_private_keys(bob_state: PrekeyState) -> None:
    data = encode_prekey_state(bob_state)
    assert decode_prekey_state(data) == bob_state
    text = repr(bob_state)
    assert bob_state.current.private_key.hex() not in text
    assert repr(bob_state.current.private_key) not in text
    assert all(repr(k.private_key) not in text for k in bob_state.one_time_prekeys)


def test_full_prekey_state_fits_its_limit(bob: Identity) -> None:
    state = new_prekeys(bob, _rng(26), NOW)
    for week in range(1, 8):
        state = rotate_signed_prekey(state, bob, _rng(week), NOW + week * SIGNED_PREKEY_ROTATION)
    assert len(state.previous) == MAX_PREVIOUS_SIGNED_PREKEYS
    assert len(encode_prekey_state(state)) <= MAX_ENCODED_PREKEY_STATE_BYTES
    too_many = dataclasses.replace(state, previous=(*state.previous, state.previous[0]))
    with pytest.raises(ValueError, match="previous"):
        encode_prekey_state(too_many)
    wire = to_wire(state)
    previous = wire[2]
    assert isinstance(previous, list)
    wire[2] = [*previous, [9999, b"\x01" * 32, T, T]]
    with pytest.raises(ProtocolError, match="previous"):
        decode_prekey_state(msgpack.packb(wire))


def _secret(prekey_id: int, retired_at: int | None = None) -> SignedPrekeySecret:
    return SignedPrekeySecret(prekey_id, bytes([prekey_id + 1]) * 32, T, retired_at)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"current": _secret(0, retired_at=T)}, "current signed prekey"),
        ({"previous": (_secret(1),)}, "no retirement time"),
        ({"previous": (_secret(0, T),)}, "appears twice"),
        ({"next_signed_prekey_id": 0}, "next signed prekey id"),
        (
            {"one_time_prekeys": (OneTimePrekeySecret(2, b"\x02" * 32), OneTimePrekeySecret(1, b"\x01" * 32))},
            "increasing",
        ),
        ({"one_time_prekeys": (OneTimePrekeySecret(1, b"\x01" * 32),) * 2}, "increasing"),
        ({"one_time_prekeys": (OneTimePrekeySecret(5, b"\x01" * 32),)}, "next one-time prekey id"),
    ],
)
def test_inconsistent_prekey_states_are_refused(bob: Identity, changes: dict[str, Any], problem: str) -> None:
    state = PrekeyState(bob.public.key, _secret(0), (), (), 2, 5)
    assert decode_prekey_state(encode_prekey_state(state)) == state
    bad = dataclasses.replace(state, **changes)
    with pytest.raises(ValueError, match=problem):
        encode_prekey_state(bad)
    with pytest.raises(ProtocolError, match=problem):
        decode_prekey_state(msgpack.packb(to_wire(bad)))


def test_validators_refuse_python_objects_with_wrong_field_types(
    alice: Identity, bob: Identity, bob_state: PrekeyState, bob_bundle: PrekeyBundle
) -> None:
    for bad in (
        dataclasses.replace(bob_bundle, signature=bytearray(bob_bundle.signature)),  # type: ignore[arg-type]
        dataclasses.replace(bob_bundle, created_at=float(T)),  # type: ignore[arg-type]
        dataclasses.replace(bob_bundle, one_time_prekeys=list(bob_bundle.one_time_prekeys)),  # type: ignore[arg-type]
    ):
        with pytest.raises(ProtocolError):
            validate_bundle(bad, bob.public.key, NOW)
        with pytest.raises(ProtocolError):
            initiate(alice, bad, _rng())
    with pytest.raises(ProtocolError, match="expected a PrekeyBundle"):
        validate_bundle(object(), bob.public.key, NOW)  # type: ignore[arg-type]
    _, header, _ = initiate(alice, bob_bundle, _rng())
    with pytest.raises(ProtocolError):
        respond(bob, bob_state, dataclasses.replace(header, signed_prekey_id=True), NOW)
    with pytest.raises(ProtocolError, match="expected a InitialHeader"):
        respond(bob, bob_state, object(), NOW)  # type: ignore[arg-type]


# --- fuzzing: ProtocolError and nothing else ----------------------------------------------------------------------

_FUZZ_BOB = Identity.from_seed(b"\xb0" * 32)
_FUZZ_STATE = new_prekeys(_FUZZ_BOB, _rng(27), NOW, count=3)
_FUZZ_BUNDLE_BYTES = encode_bundle(bundle_for(_FUZZ_STATE, _FUZZ_BOB, NOW))
_FUZZ_HEADER_BYTES = encode_initial_header(
    initiate(Identity.from_seed(b"\xa1" * 32), bundle_for(_FUZZ_STATE, _FUZZ_BOB, NOW), _rng(28))[1]
)
_FUZZ_STATE_BYTES = encode_prekey_state(_FUZZ_STATE)


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Bytes near a valid encoding: a few bytes overwritten, inserted or cut."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 4))):
            action = draw(st.sampled_from(["set", "insert", "delete"]))
            at = draw(st.integers(0, max(len(data) - 1, 0)))
            if action == "set" and data:
                data[at] = draw(st.integers(0, 255))
            elif action == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=3))
            elif data:
                del data[at]
        return bytes(data)

    return mutate()


def _only_protocol_errors(fn: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        fn(data)


def _bundle_pipeline(data: bytes) -> None:
    bundle = decode_bundle(data)
    validate_bundle(bundle, _FUZZ_BOB.public.key, NOW)
    initiate(Identity.from_seed(b"\xa1" * 32), bundle, _rng())


def _header_pipeline(data: bytes) -> None:
    respond(_FUZZ_BOB, _FUZZ_STATE, decode_initial_header(data), NOW)


@FAST
@given(st.one_of(st.binary(max_size=MAX_ENCODED_BUNDLE_BYTES + 4), _mutations(_FUZZ_BUNDLE_BYTES)))
def test_fuzz_bundle_decoding(data: bytes) -> None:
    _only_protocol_errors(_bundle_pipeline, data)


@FAST
@given(st.one_of(st.binary(max_size=MAX_ENCODED_HEADER_BYTES + 4), _mutations(_FUZZ_HEADER_BYTES)))
def test_fuzz_header_decoding_and_respond(data: bytes) -> None:
    _only_protocol_errors(_header_pipeline, data)


@FAST
@given(st.one_of(st.binary(max_size=512), _mutations(_FUZZ_STATE_BYTES)))
def test_fuzz_prekey_state_decoding(data: bytes) -> None:
    _only_protocol_errors(decode_prekey_state, data)


@FAST
@given(
    st.builds(
        InitialHeader,
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=32, max_size=32),
        st.integers(0, 3),
        st.one_of(st.none(), st.integers(0, 4)),
    )
)
def test_fuzz_respond_with_arbitrary_keys(header: InitialHeader) -> None:
    try:
        new_state, _, _, _ = respond(_FUZZ_BOB, _FUZZ_STATE, header, NOW)
    except ProtocolError:
        return
    assert len(new_state.one_time_prekeys) == 3 - (header.one_time_prekey_id is not None)
