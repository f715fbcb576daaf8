"""Pairwise mailbox keys: both parties derive the same key pair, it differs per direction and per pair, and it
cannot be computed from public keys alone."""

from __future__ import annotations

import hashlib
import hmac
import random

import nacl.bindings
import pytest

from p2pchat.core import envelope, ratchet, x3dh
from p2pchat.core.identity import Identity
from p2pchat.core.pairwise import PAIRWISE_MAILBOX_INFO, inbound_mailbox, outbound_mailbox, pairwise_mailbox_seed
from p2pchat.core.records import mailbox_key
from p2pchat.errors import ProtocolError


def _identity(seed: int) -> Identity:
    return Identity.generate(random.Random(seed).randbytes)


ALICE, BOB, CAROL = _identity(1), _identity(2), _identity(3)


def test_both_sides_derive_the_same_mailbox() -> None:
    # Bob's mailbox for mail from Alice, as Bob (who polls it) and as Alice (who stores into it) compute it.
    assert inbound_mailbox(BOB, ALICE.public.key).seed == outbound_mailbox(ALICE, BOB.public.key).seed
    assert inbound_mailbox(ALICE, BOB.public.key).seed == outbound_mailbox(BOB, ALICE.public.key).seed


def test_it_matches_an_independent_derivation() -> None:
    # X25519 of the converted identity keys, then RFC 5869 HKDF-SHA256 written out with hmac.
    a_secret = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(ALICE.seed + ALICE.public.key)
    b_public = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(BOB.public.key)
    shared = nacl.bindings.crypto_scalarmult(a_secret, b_public)
    prk = hmac.digest(bytes(32), shared, "sha256")
    info = b"p2pchat-pairwise-mailbox-v1" + BOB.public.key + ALICE.public.key
    seed = hmac.digest(prk, info + b"\x01", "sha256")
    assert outbound_mailbox(ALICE, BOB.public.key).seed == seed
    assert pairwise_mailbox_seed(BOB, ALICE.public.key, recipient=BOB.public.key, sender=ALICE.public.key) == seed


def test_known_answers_of_protocol_12_10() -> None:
    # The identities of seeds 00x32 (Alice) and 01x32 (Bob), as in docs/protocol.md 12.10.
    alice, bob = Identity.from_seed(bytes(32)), Identity.from_seed(b"\x01" * 32)
    bobs = outbound_mailbox(alice, bob.public.key)
    assert bobs.seed.hex() == "8453471b97b4f86f47d040e6842cdcf0e0da85ebd8e8c60c41c330878c28565a"
    assert bobs.public.key.hex() == "4b5e60e543627e6f4f49c87a728c4337a54d2d06cd3c730fbe071ca02ba106fc"
    assert mailbox_key(bobs.public.key).hex() == "18b191ed824ba540b5511c31e427eb01d4c5cee3"
    alices = outbound_mailbox(bob, alice.public.key)
    assert alices.seed.hex() == "ba711854be6ea90c37af45626b1dc81ce9d8d95039b9a84ccf0f2e7b540c44e4"
    assert mailbox_key(alices.public.key).hex() == "8808332a62bad212c3665fe3a6e9c412b8385738"


def test_each_direction_and_each_pair_has_its_own_mailbox() -> None:
    keys = {
        outbound_mailbox(ALICE, BOB.public.key).public.key,  # Bob's, from Alice
        outbound_mailbox(BOB, ALICE.public.key).public.key,  # Alice's, from Bob
        outbound_mailbox(ALICE, CAROL.public.key).public.key,
        outbound_mailbox(CAROL, ALICE.public.key).public.key,
        outbound_mailbox(BOB, CAROL.public.key).public.key,
        outbound_mailbox(CAROL, BOB.public.key).public.key,
    }
    assert len(keys) == 6
    # ... and none is anyone's identity key.
    assert not keys & {ALICE.public.key, BOB.public.key, CAROL.public.key}


def test_it_depends_on_a_private_key_not_only_on_public_ones() -> None:
    bobs = outbound_mailbox(ALICE, BOB.public.key)
    # Another private key in either role gives another mailbox: the public keys alone do not determine it.
    mallory = _identity(4)
    assert outbound_mailbox(mallory, BOB.public.key).seed != bobs.seed
    assert inbound_mailbox(mallory, ALICE.public.key).seed != bobs.seed
    # What an observer can compute from the two public keys (hashes of them under the label, the public mailbox
    # key scheme applied to them) is not it.
    public_only = [
        hashlib.sha256(PAIRWISE_MAILBOX_INFO + BOB.public.key + ALICE.public.key).digest(),
        hashlib.blake2b(BOB.public.key + ALICE.public.key, digest_size=32).digest(),
        BOB.public.key,
        ALICE.public.key,
    ]
    assert bobs.seed not in public_only
    assert mailbox_key(bobs.public.key) not in {mailbox_key(k) for k in public_only}


def test_the_mailbox_is_a_full_mailbox_key_pair() -> None:
    # An envelope sealed to it by the sender opens with the recipient's copy of the key pair.
    sealed = envelope.seal(ALICE, outbound_mailbox(ALICE, BOB.public.key).public.key, b"hi", random.Random(5).randbytes)
    sender, payload = envelope.open_envelope(inbound_mailbox(BOB, ALICE.public.key), sealed)
    assert (sender.key, payload) == (ALICE.public.key, b"hi")


def test_wrong_parties_are_refused() -> None:
    with pytest.raises(ValueError, match="two distinct identities"):
        outbound_mailbox(ALICE, ALICE.public.key)
    with pytest.raises(ValueError, match="two distinct identities"):
        pairwise_mailbox_seed(ALICE, BOB.public.key, recipient=CAROL.public.key, sender=ALICE.public.key)
    with pytest.raises(ValueError, match="two distinct identities"):
        pairwise_mailbox_seed(ALICE, b"short", recipient=b"short", sender=ALICE.public.key)


def test_a_peer_key_of_small_order_is_a_protocol_error() -> None:
    # The all-zero encoding is a point of small order: a "shared" secret with it would be known to everyone.
    with pytest.raises(ProtocolError):
        outbound_mailbox(ALICE, bytes(32))


def test_the_label_is_distinct_from_every_other_kdf_info() -> None:
    infos = [
        PAIRWISE_MAILBOX_INFO,
        x3dh.X3DH_INFO,
        envelope.ENVELOPE_KDF_INFO,
        ratchet.ROOT_KDF_INFO,
        ratchet.MESSAGE_KDF_INFO,
    ]
    for a in infos:
        for b in infos:
            assert a is b or not b.startswith(a)
