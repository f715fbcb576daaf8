"""Identities: signatures that fail on any bit flip, pinned fingerprints, symmetric safety numbers."""

from __future__ import annotations

import copy
import hashlib
import re

import pytest

from p2pchat.core.address import decode_address
from p2pchat.core.identity import (
    FINGERPRINT_ITERATIONS,
    Identity,
    PublicIdentity,
    fingerprint_digits,
    format_safety_number,
    safety_number,
)
from p2pchat.core.ids import node_id_for_key
from p2pchat.errors import AddressError, ProtocolError

SEED = bytes(range(32))
# Known answers for SEED, computed once; they pin the key derivation, address format and fingerprint scheme.
EXPECTED_ADDRESS = "p2p1qqwss00lnecgtu8tsm5vwwj7qn9n7f43snwjs6hcamjrxgyj4xxuqn3pu8h"
EXPECTED_NODE_ID = "1030da75e683036d15c6f364b496ed9014d20421"
EXPECTED_FINGERPRINT = "220692146192101365579021333354"


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _reference_fingerprint(key: bytes) -> str:
    """An independent re-derivation of the fingerprint from its description, with hashlib only."""
    digest = b""
    for _ in range(5200):
        digest = hashlib.sha512(b"\x00\x00" + key + digest).digest()
    return "".join(f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5))


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.from_seed(SEED)


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.from_seed(b"\x42" * 32)


def test_sign_and_verify(alice: Identity, bob: Identity) -> None:
    signature = alice.sign(b"hello")
    assert len(signature) == 64
    assert alice.public.verify(b"hello", signature)
    assert not alice.public.verify(b"hellO", signature)
    assert not bob.public.verify(b"hello", signature)


def test_every_bit_flip_of_the_signature_fails(alice: Identity) -> None:
    message = b"attack at dawn"
    signature = alice.sign(message)
    assert all(not alice.public.verify(message, _flip(signature, bit)) for bit in range(512))


def test_every_bit_flip_of_the_message_fails(alice: Identity) -> None:
    message = b"attack at dawn"
    signature = alice.sign(message)
    assert all(not alice.public.verify(_flip(message, bit), signature) for bit in range(len(message) * 8))


def test_every_bit_flip_of_the_key_fails_without_raising(alice: Identity) -> None:
    message = b"attack at dawn"
    signature = alice.sign(message)
    for bit in range(256):
        # Some flipped keys are not valid curve points; verify must still just say no.
        assert not PublicIdentity(_flip(alice.public.key, bit)).verify(message, signature)


@pytest.mark.parametrize("signature", [b"", bytes(63), bytes(65), bytes(64), b"\xff" * 64])
def test_garbage_signatures_are_false_not_errors(alice: Identity, signature: bytes) -> None:
    assert not alice.public.verify(b"hello", signature)


def test_identity_from_seed_is_deterministic(alice: Identity) -> None:
    assert alice.seed == SEED
    assert Identity.from_seed(SEED).public == alice.public
    assert alice.public.address == EXPECTED_ADDRESS
    assert alice.public.node_id.hex() == EXPECTED_NODE_ID
    assert alice.public.node_id == node_id_for_key(alice.public.key)


def test_generate_draws_the_seed_from_the_injected_source() -> None:
    requests: list[int] = []

    def fake_random(size: int) -> bytes:
        requests.append(size)
        return SEED[:size]

    assert Identity.generate(fake_random).seed == SEED
    assert requests == [32]
    assert Identity.generate().public != Identity.generate().public


def test_from_seed_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.from_seed(bytes(31))


def test_identity_repr_hides_the_seed(alice: Identity) -> None:
    assert SEED.hex() not in repr(alice)
    assert EXPECTED_ADDRESS in repr(alice)


def test_fingerprint_is_pinned_and_rederived(alice: Identity) -> None:
    assert FINGERPRINT_ITERATIONS == 5200
    fingerprint = alice.public.fingerprint
    assert re.fullmatch(r"\d{30}", fingerprint)
    assert fingerprint == EXPECTED_FINGERPRINT
    assert _reference_fingerprint(alice.public.key) == EXPECTED_FINGERPRINT
    assert fingerprint_digits(alice.public.key) == EXPECTED_FINGERPRINT
    assert alice.public.fingerprint is fingerprint  # cached


def test_fingerprints_differ_per_key(alice: Identity, bob: Identity) -> None:
    assert alice.public.fingerprint != bob.public.fingerprint
    assert bob.public.fingerprint == _reference_fingerprint(bob.public.key)


def test_safety_number_is_symmetric_and_readable(alice: Identity, bob: Identity) -> None:
    number = safety_number(alice.public, bob.public)
    assert number == safety_number(bob.public, alice.public)
    assert re.fullmatch(r"\d{5}( \d{5}){11}", number)
    digits = number.replace(" ", "")
    assert digits == "".join(sorted([alice.public.fingerprint, bob.public.fingerprint]))
    lines = format_safety_number(number).splitlines()
    assert len(lines) == 3
    assert all(re.fullmatch(r"\d{5}( \d{5}){3}", line) for line in lines)
    assert format_safety_number(number, per_line=6).count("\n") == 1


def test_safety_number_differs_for_different_pairs(alice: Identity, bob: Identity) -> None:
    carol = Identity.from_seed(b"\x07" * 32)
    numbers = {
        safety_number(alice.public, bob.public),
        safety_number(alice.public, carol.public),
        safety_number(bob.public, carol.public),
    }
    assert len(numbers) == 3


def test_from_address_round_trip(alice: Identity) -> None:
    public = PublicIdentity.from_address(alice.public.address)
    assert public == alice.public
    assert hash(public) == hash(alice.public)
    assert decode_address(alice.public.address) == alice.public.key
    with pytest.raises(AddressError):
        PublicIdentity.from_address(alice.public.address[:-1])


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33), "x" * 32, None, 32])
def test_from_key_rejects_bad_remote_keys(key: object) -> None:
    with pytest.raises(ProtocolError):
        PublicIdentity.from_key(key)


def test_from_key_accepts_a_valid_key(alice: Identity) -> None:
    assert PublicIdentity.from_key(alice.public.key) == alice.public


def test_public_identity_is_immutable(alice: Identity) -> None:
    with pytest.raises(AttributeError):
        alice.public._key = bytes(32)
    assert copy.deepcopy(alice.public) == alice.public
    assert alice.public != alice.public.key
