"""The Double Ratchet: conversations, loss, reordering, replays, every limit at its edge, tampering bit by bit.

Every test is deterministic: keys come from ``random.Random(seed).randbytes``.  States are immutable, so "the state
is unchanged after a refused message" is shown the way it matters: the next genuine message still decrypts from
the state the caller kept.  The decoders are fuzzed for the one invariant: a valid value or ProtocolError.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import random
import struct
from collections.abc import Callable
from typing import NamedTuple

import msgpack  # type: ignore[import-untyped]
import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.core.kdf import hkdf_sha256
from p2pchat.core.ratchet import (
    KEY_BYTES,
    MAX_CHAIN_LENGTH,
    MAX_CIPHERTEXT_BYTES,
    MAX_ENCODED_HEADER_BYTES,
    MAX_ENCODED_STATE_BYTES,
    MAX_PLAINTEXT_BYTES,
    MAX_SKIP,
    MAX_SKIPPED_KEYS,
    MESSAGE_KDF_INFO,
    ROOT_KDF_INFO,
    STATE_VERSION,
    TAG_BYTES,
    Header,
    RatchetState,
    SkippedKey,
    decode_header,
    decode_state,
    decrypt,
    encode_header,
    encode_state,
    encrypt,
    init_receiver,
    init_sender,
)
from p2pchat.core.schema import to_wire
from p2pchat.errors import ProtocolError

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None)

AD = b"A" * 32 + b"B" * 32
"""Associated data as X3DH gives it: both identity keys."""

# The first message of the seed-0 session, computed once: pins the KDF chain, the AEAD and the header format.
EXPECTED_FIRST_MESSAGE_SHA256 = "94077536879f8aee8c784d1a2f2f51939f1ad6eb0730066a7f20f15b4d95725e"

RandomBytes = Callable[[int], bytes]


class Message(NamedTuple):
    """A message as it travels: encoded header and ciphertext; and the plaintext the receiver must get."""

    header: bytes
    ciphertext: bytes
    plaintext: bytes


class Session(NamedTuple):
    alice: RatchetState
    bob: RatchetState
    random_bytes: RandomBytes


def new_session(seed: int) -> Session:
    """Alice and Bob right after X3DH: Bob's signed prekey is his first ratchet key."""
    random_bytes = random.Random(seed).randbytes
    shared_key = random_bytes(KEY_BYTES)
    bob_private = random_bytes(KEY_BYTES)
    bob_public = nacl.bindings.crypto_scalarmult_base(bob_private)
    alice = init_sender(shared_key, bob_public, random_bytes)
    bob = init_receiver(shared_key, bob_private, bob_public)
    return Session(alice, bob, random_bytes)


def send(state: RatchetState, plaintext: bytes, random_bytes: RandomBytes) -> tuple[RatchetState, Message]:
    state, header, ciphertext = encrypt(state, plaintext, AD, random_bytes)
    return state, Message(encode_header(header), ciphertext, plaintext)


def send_many(
    state: RatchetState, count: int, random_bytes: RandomBytes, label: bytes = b"m"
) -> tuple[RatchetState, list[Message]]:
    messages = []
    for index in range(count):
        state, message = send(state, label + b"%d" % index, random_bytes)
        messages.append(message)
    return state, messages


def receive(state: RatchetState, message: Message, random_bytes: RandomBytes) -> RatchetState:
    state, plaintext = decrypt(state, decode_header(message.header), message.ciphertext, AD, random_bytes)
    assert plaintext == message.plaintext
    return state


def refused(state: RatchetState, header: bytes, ciphertext: bytes, random_bytes: RandomBytes, ad: bytes = AD) -> bool:
    """Whether the message is refused, as it must be, with ProtocolError (any other exception propagates)."""
    try:
        decrypt(state, decode_header(header), ciphertext, ad, random_bytes)
    except ProtocolError:
        return True
    return False


def established(seed: int) -> Session:
    """A session after one message each way: both sides have both chains, and Alice has ratcheted once."""
    alice, bob, random_bytes = new_session(seed)
    alice, hello = send(alice, b"hello", random_bytes)
    bob = receive(bob, hello, random_bytes)
    bob, reply = send(bob, b"hi", random_bytes)
    alice = receive(alice, reply, random_bytes)
    return Session(alice, bob, random_bytes)


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _pack_state(wire: object) -> bytes:
    packed: bytes = msgpack.packb(wire)
    return bytes((STATE_VERSION,)) + packed


# --- HKDF and known answers ---------------------------------------------------------------------------------------


def test_first_message_is_pinned_and_follows_the_documented_derivation() -> None:
    random_bytes = random.Random(0).randbytes
    shared_key = random_bytes(KEY_BYTES)
    bob_private = random_bytes(KEY_BYTES)
    bob_public = nacl.bindings.crypto_scalarmult_base(bob_private)
    alice = init_sender(shared_key, bob_public, random_bytes)
    _, header, ciphertext = encrypt(alice, b"hello", AD, random_bytes)

    # The same message from the module docstring's formulas, step by step.
    dh = nacl.bindings.crypto_scalarmult(alice.dhs_private, bob_public)
    chain_key = hkdf_sha256(salt=shared_key, ikm=dh, info=ROOT_KDF_INFO, length=64)[32:]
    message_key = hmac.digest(chain_key, b"\x01", "sha256")
    okm = hkdf_sha256(salt=bytes(32), ikm=message_key, info=MESSAGE_KDF_INFO, length=56)
    header_bytes = msgpack.packb([alice.dhs_public, 0, 0])
    expected = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        b"hello", struct.pack(">Q", len(AD)) + AD + header_bytes, okm[32:], okm[:32]
    )
    assert header == Header(dh=alice.dhs_public, pn=0, n=0)
    assert encode_header(header) == header_bytes
    assert ciphertext == expected
    assert hashlib.sha256(header_bytes + ciphertext).hexdigest() == EXPECTED_FIRST_MESSAGE_SHA256


def test_kdf_infos_are_distinct_and_prefix_free() -> None:
    infos = [ROOT_KDF_INFO, MESSAGE_KDF_INFO]
    for a in infos:
        for b in infos:
            assert a is b or not b.startswith(a)


# --- conversations ------------------------------------------------------------------------------------------------


def test_many_turns_in_both_directions_round_trip_through_persistence() -> None:
    alice, bob, random_bytes = new_session(1)
    turns = random.Random(1)
    ratchet_keys = set()
    for turn in range(60):
        sender_is_alice = turn % 2 == 0
        sender, receiver = (alice, bob) if sender_is_alice else (bob, alice)
        for index in range(turns.randint(1, 4)):
            sender, message = send(sender, b"turn %d message %d" % (turn, index), random_bytes)
            receiver = receive(receiver, message, random_bytes)
            ratchet_keys.add(decode_header(message.header).dh)
        # Every step goes through the database, as the messaging layer will do it.
        sender, receiver = decode_state(encode_state(sender)), decode_state(encode_state(receiver))
        alice, bob = (sender, receiver) if sender_is_alice else (receiver, sender)
        assert not alice.skipped and not bob.skipped
    assert len(ratchet_keys) == 60  # a fresh ratchet key every turn: each reply is a DH ratchet step


def test_the_receiver_cannot_send_before_the_first_message() -> None:
    _, bob, random_bytes = new_session(2)
    with pytest.raises(ValueError, match="first message"):
        encrypt(bob, b"too early", AD, random_bytes)


def test_out_of_order_within_a_chain() -> None:
    alice, bob, random_bytes = new_session(3)
    alice, messages = send_many(alice, 20, random_bytes)
    random.Random(3).shuffle(messages)
    for message in messages:
        bob = receive(bob, message, random_bytes)
    assert not bob.skipped and bob.nr == 20


def test_out_of_order_across_ratchet_steps() -> None:
    alice, bob, random_bytes = new_session(4)
    alice, (a0, a1, a2) = send_many(alice, 3, random_bytes, b"a")
    bob = receive(bob, a0, random_bytes)
    bob, (b0, b1) = send_many(bob, 2, random_bytes, b"b")
    alice = receive(alice, b1, random_bytes)  # b0 is late; Alice ratchets on b1
    alice, (c0, c1) = send_many(alice, 2, random_bytes, b"c")
    assert decode_header(c1.header).pn == 3  # a0..a2 were sent on the previous chain
    bob = receive(bob, c1, random_bytes)  # keeps a1, a2 (previous chain) and c0 (this one)
    assert {(entry.dh, entry.n) for entry in bob.skipped} == {
        (decode_header(a1.header).dh, 1),
        (decode_header(a2.header).dh, 2),
        (decode_header(c0.header).dh, 0),
    }
    for late in (a2, c0, a1):
        bob = receive(bob, late, random_bytes)
    alice = receive(alice, b0, random_bytes)
    assert not bob.skipped and not alice.skipped
    # The conversation carries on from there.
    bob, d0 = send(bob, b"still here", random_bytes)
    alice = receive(alice, d0, random_bytes)


def test_lost_messages_keep_their_keys_and_the_rest_decrypt() -> None:
    alice, bob, random_bytes = new_session(5)
    alice, messages = send_many(alice, 10, random_bytes)
    lost = {3, 5, 7}
    for index, message in enumerate(messages):
        if index not in lost:
            bob = receive(bob, message, random_bytes)
    for turn in range(6):  # several ratchet steps later, the keys of the lost messages are still held
        bob, reply = send(bob, b"reply %d" % turn, random_bytes)
        alice = receive(alice, reply, random_bytes)
        alice, message = send(alice, b"again %d" % turn, random_bytes)
        bob = receive(bob, message, random_bytes)
    assert sorted(entry.n for entry in bob.skipped) == sorted(lost)
    bob = receive(bob, messages[5], random_bytes)  # a "lost" message that turns up after all
    assert len(bob.skipped) == 2


def test_random_conversation_with_loss_reordering_replays_and_restarts() -> None:
    """libsignal's fuzz target in miniature: both sides send, the network shuffles, drops and replays."""
    choose = random.Random(6)
    alice, bob, random_bytes = new_session(6)
    states = {"alice": alice, "bob": bob}
    peer = {"alice": "bob", "bob": "alice"}
    in_flight: list[tuple[str, Message]] = []
    delivered: list[tuple[str, Message]] = []
    ratchet_keys: set[bytes] = set()
    lost = replayed = restarts = 0
    for step in range(800):
        action = choose.random()
        if action < 0.4:
            sender = choose.choice(("alice", "bob"))
            if states[sender].cks is None:
                continue  # Bob waits for Alice's first message
            states[sender], message = send(states[sender], b"%s %d" % (sender.encode(), step), random_bytes)
            in_flight.append((peer[sender], message))
            ratchet_keys.add(decode_header(message.header).dh)
        elif action < 0.85 and in_flight:
            recipient, message = in_flight.pop(choose.randrange(len(in_flight)))
            states[recipient] = receive(states[recipient], message, random_bytes)
            delivered.append((recipient, message))
        elif action < 0.9 and in_flight:
            in_flight.pop(choose.randrange(len(in_flight)))
            lost += 1
        elif delivered:
            recipient, message = choose.choice(delivered)
            assert refused(states[recipient], message.header, message.ciphertext, random_bytes)
            replayed += 1
        if choose.random() < 0.05:
            name = choose.choice(("alice", "bob"))
            states[name] = decode_state(encode_state(states[name]))
            restarts += 1
    for recipient, message in in_flight:
        states[recipient] = receive(states[recipient], message, random_bytes)
    # The run exercised what it claims to.
    assert len(delivered) > 200 and lost > 10 and replayed > 10 and restarts > 10 and len(ratchet_keys) > 20
    assert len(states["alice"].skipped) + len(states["bob"].skipped) <= lost


# --- replays and forgeries ----------------------------------------------------------------------------------------


def test_replays_are_refused_in_order_out_of_order_and_after_a_ratchet_step() -> None:
    alice, bob, random_bytes = established(7)
    alice, (m0, m1, m2) = send_many(alice, 3, random_bytes)
    bob = receive(bob, m0, random_bytes)
    with pytest.raises(ProtocolError, match="already received"):  # its key was used and is gone
        decrypt(bob, decode_header(m0.header), m0.ciphertext, AD, random_bytes)
    bob = receive(bob, m2, random_bytes)
    bob = receive(bob, m1, random_bytes)  # from the skipped keys, which it leaves
    assert refused(bob, m1.header, m1.ciphertext, random_bytes)
    assert refused(bob, m2.header, m2.ciphertext, random_bytes)
    bob, reply = send(bob, b"reply", random_bytes)
    alice = receive(alice, reply, random_bytes)
    alice, m3 = send(alice, b"new chain", random_bytes)
    bob = receive(bob, m3, random_bytes)
    for old in (m0, m1, m2, m3):
        assert refused(bob, old.header, old.ciphertext, random_bytes)
    bob, reply = send(bob, b"still fine", random_bytes)
    alice = receive(alice, reply, random_bytes)


def test_a_forged_message_neither_advances_nor_corrupts_the_state() -> None:
    alice, bob, random_bytes = established(8)
    alice, genuine = send(alice, b"genuine", random_bytes)
    header = decode_header(genuine.header)
    forgeries = [
        # Far ahead in the current chain: would store keys for 500 skipped messages if it were believed.
        Header(dh=header.dh, pn=header.pn, n=500),
        # A new ratchet key: would step the root chain and replace our key pair.
        Header(dh=random_bytes(KEY_BYTES), pn=400, n=300),
        # The genuine header with a made-up ciphertext.
        header,
    ]
    before = encode_state(bob)
    for forged in forgeries:
        with pytest.raises(ProtocolError, match="authenticate"):
            decrypt(bob, forged, random_bytes(len(genuine.ciphertext)), AD, random_bytes)
    assert encode_state(bob) == before
    bob = receive(bob, genuine, random_bytes)
    assert not bob.skipped  # nothing the forgeries announced was kept
    bob, reply = send(bob, b"reply", random_bytes)
    alice = receive(alice, reply, random_bytes)


@pytest.mark.parametrize("situation", ["first message", "mid-session with skipped keys"])
def test_every_flipped_bit_of_header_or_ciphertext_is_refused(situation: str) -> None:
    if situation == "first message":
        alice, bob, random_bytes = new_session(9)
    else:
        alice, bob, random_bytes = established(9)
        alice, (_, second) = send_many(alice, 2, random_bytes)
        bob = receive(bob, second, random_bytes)
        assert len(bob.skipped) == 1  # so that a flipped n may name a stored key
    alice, genuine = send(alice, b"attack at dawn", random_bytes)
    before = encode_state(bob)
    for bit in range(len(genuine.header) * 8):
        header = _flip(genuine.header, bit)
        assert refused(bob, header, genuine.ciphertext, random_bytes), f"header bit {bit}"
    for bit in range(len(genuine.ciphertext) * 8):
        ciphertext = _flip(genuine.ciphertext, bit)
        assert refused(bob, genuine.header, ciphertext, random_bytes), f"ciphertext bit {bit}"
    assert encode_state(bob) == before
    bob = receive(bob, genuine, random_bytes)


def test_wrong_associated_data_is_refused_and_does_not_use_up_the_key() -> None:
    alice, bob, random_bytes = established(10)
    alice, (late, current) = send_many(alice, 2, random_bytes)
    for wrong in (b"", AD[:-1], AD + b"\x00", b"B" * 32 + b"A" * 32):
        assert refused(bob, current.header, current.ciphertext, random_bytes, ad=wrong)
    bob = receive(bob, current, random_bytes)
    assert refused(bob, late.header, late.ciphertext, random_bytes, ad=b"other")  # a skipped key's message
    bob = receive(bob, late, random_bytes)


def test_a_message_claiming_the_prekey_chain_is_refused() -> None:
    """Before Bob replies, Alice's "peer key" is Bob's prekey, which has no chain to receive on."""
    alice, _, random_bytes = new_session(11)
    assert alice.dhr is not None
    with pytest.raises(ProtocolError, match="no key"):
        decrypt(alice, Header(dh=alice.dhr, pn=0, n=0), bytes(TAG_BYTES), AD, random_bytes)


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little")], ids=["zero", "order-4"])
def test_small_order_ratchet_keys_are_refused(point: bytes) -> None:
    _, bob, random_bytes = established(12)
    with pytest.raises(ProtocolError, match="small order"):
        decrypt(bob, Header(dh=point, pn=0, n=0), bytes(TAG_BYTES), AD, random_bytes)
    with pytest.raises(ProtocolError, match="small order"):
        init_sender(bytes(32), point, random_bytes)


def test_a_header_built_by_hand_is_checked_like_a_decoded_one() -> None:
    _, bob, random_bytes = new_session(13)
    for bad in (Header(dh=b"short", pn=0, n=0), Header(dh=bytes(32), pn=0, n=MAX_CHAIN_LENGTH), "header"):
        with pytest.raises(ProtocolError):
            decrypt(bob, bad, bytes(TAG_BYTES), AD, random_bytes)  # type: ignore[arg-type]


# --- limits -------------------------------------------------------------------------------------------------------


def test_max_skip_in_the_current_chain_is_reached_exactly() -> None:
    alice, bob, random_bytes = new_session(14)
    alice, messages = send_many(alice, MAX_SKIP + 2, random_bytes)
    furthest = receive(bob, messages[MAX_SKIP], random_bytes)  # skips messages 0..MAX_SKIP-1
    assert len(furthest.skipped) == MAX_SKIP
    too_far = messages[MAX_SKIP + 1]
    with pytest.raises(ProtocolError, match="skips"):
        decrypt(bob, decode_header(too_far.header), too_far.ciphertext, AD, random_bytes)
    # After the first jump the second is short, and every skipped message still decrypts.
    furthest = receive(furthest, too_far, random_bytes)
    for message in messages[:3]:
        furthest = receive(furthest, message, random_bytes)


def test_max_skip_in_the_previous_chain_is_reached_exactly() -> None:
    """``pn`` tells how long the sender's previous chain was; missing more than MAX_SKIP of it is refused."""
    alice, bob, random_bytes = new_session(15)
    alice, messages = send_many(alice, MAX_SKIP + 2, random_bytes)
    bob = receive(bob, messages[0], random_bytes)
    bob, reply = send(bob, b"reply", random_bytes)
    alice = receive(alice, reply, random_bytes)
    alice, next_chain = send(alice, b"next chain", random_bytes)
    assert decode_header(next_chain.header).pn == MAX_SKIP + 2
    # Bob has message 0; messages 1..MAX_SKIP+1 are missing: one too many.
    with pytest.raises(ProtocolError, match="skips"):
        decrypt(bob, decode_header(next_chain.header), next_chain.ciphertext, AD, random_bytes)
    bob = receive(bob, messages[1], random_bytes)  # now exactly MAX_SKIP are missing
    bob = receive(bob, next_chain, random_bytes)
    assert len(bob.skipped) == MAX_SKIP
    bob = receive(bob, messages[MAX_SKIP + 1], random_bytes)


def test_max_skipped_keys_holds_across_chains_and_drops_the_oldest_first() -> None:
    assert MAX_SKIPPED_KEYS <= MAX_SKIP  # so one jump can fill the store
    alice, bob, random_bytes = new_session(16)
    alice, first_chain = send_many(alice, MAX_SKIPPED_KEYS + 1, random_bytes, b"a")
    bob = receive(bob, first_chain[-1], random_bytes)
    assert len(bob.skipped) == MAX_SKIPPED_KEYS
    bob, reply = send(bob, b"reply", random_bytes)
    alice = receive(alice, reply, random_bytes)
    alice, second_chain = send_many(alice, 4, random_bytes, b"b")
    bob = receive(bob, second_chain[-1], random_bytes)  # three more skipped keys, in a new chain
    assert len(bob.skipped) == MAX_SKIPPED_KEYS
    for dropped in first_chain[:3]:
        assert refused(bob, dropped.header, dropped.ciphertext, random_bytes)
    for kept in (first_chain[3], first_chain[-2], *second_chain[:3]):
        bob = receive(bob, kept, random_bytes)
    assert len(bob.skipped) == MAX_SKIPPED_KEYS - 5


def test_one_ratchet_step_may_skip_max_skip_in_each_chain_and_keeps_the_newest() -> None:
    alice, bob, random_bytes = new_session(17)
    alice, first_chain = send_many(alice, MAX_SKIP + 1, random_bytes, b"a")
    bob = receive(bob, first_chain[0], random_bytes)
    bob, reply = send(bob, b"reply", random_bytes)
    alice = receive(alice, reply, random_bytes)
    alice, second_chain = send_many(alice, MAX_SKIP + 1, random_bytes, b"b")
    bob = receive(bob, second_chain[-1], random_bytes)  # 2 * MAX_SKIP keys derived, the oldest dropped
    assert len(bob.skipped) == MAX_SKIPPED_KEYS
    assert refused(bob, first_chain[1].header, first_chain[1].ciphertext, random_bytes)
    bob = receive(bob, second_chain[0], random_bytes)
    bob = receive(bob, second_chain[-2], random_bytes)


def test_plaintext_and_ciphertext_size_limits_are_reached_exactly() -> None:
    alice, bob, random_bytes = new_session(18)
    alice, largest = send(alice, b"\xa5" * MAX_PLAINTEXT_BYTES, random_bytes)
    assert len(largest.ciphertext) == MAX_CIPHERTEXT_BYTES
    bob = receive(bob, largest, random_bytes)
    alice, empty = send(alice, b"", random_bytes)
    assert len(empty.ciphertext) == TAG_BYTES
    bob = receive(bob, empty, random_bytes)
    with pytest.raises(ValueError, match="plaintext"):
        encrypt(alice, bytes(MAX_PLAINTEXT_BYTES + 1), AD, random_bytes)
    header = decode_header(empty.header)
    for size in (TAG_BYTES - 1, MAX_CIPHERTEXT_BYTES + 1):
        with pytest.raises(ProtocolError, match="ciphertext"):
            decrypt(bob, header, bytes(size), AD, random_bytes)


def test_chain_length_limit_is_reached_exactly() -> None:
    alice, _, random_bytes = new_session(19)
    nearly_full = dataclasses.replace(alice, ns=MAX_CHAIN_LENGTH - 1)
    full, header, _ = encrypt(nearly_full, b"last", AD, random_bytes)
    assert header.n == MAX_CHAIN_LENGTH - 1 and full.ns == MAX_CHAIN_LENGTH
    assert decode_state(encode_state(full)) == full
    with pytest.raises(ValueError, match="wait for the peer"):
        encrypt(full, b"one too many", AD, random_bytes)
    with pytest.raises(ProtocolError):
        decode_header(msgpack.packb([header.dh, 0, MAX_CHAIN_LENGTH]))


def test_header_encoding_limit_is_reached_exactly() -> None:
    largest = Header(dh=b"\xff" * 32, pn=MAX_CHAIN_LENGTH, n=MAX_CHAIN_LENGTH - 1)
    data = encode_header(largest)
    assert len(data) == MAX_ENCODED_HEADER_BYTES
    assert decode_header(data) == largest
    with pytest.raises(ProtocolError, match="over"):
        decode_header(data + b"\x00")


def test_state_encoding_limit_is_reached_exactly() -> None:
    random_bytes = random.Random(20).randbytes
    private = random_bytes(KEY_BYTES)
    key = random_bytes(KEY_BYTES)
    largest = RatchetState(
        dhs_private=private,
        dhs_public=nacl.bindings.crypto_scalarmult_base(private),
        dhr=key,
        rk=key,
        cks=key,
        ckr=key,
        ns=MAX_CHAIN_LENGTH,
        nr=MAX_CHAIN_LENGTH,
        pn=MAX_CHAIN_LENGTH,
        skipped=tuple(SkippedKey(dh=key, n=MAX_CHAIN_LENGTH - 1 - i, message_key=key) for i in range(MAX_SKIPPED_KEYS)),
    )
    data = encode_state(largest)
    assert len(data) == MAX_ENCODED_STATE_BYTES
    assert decode_state(data) == largest
    with pytest.raises(ProtocolError, match="bytes"):
        decode_state(data + b"\x00")


# --- headers and state on the wire and on disk --------------------------------------------------------------------


def test_header_round_trip_and_only_the_canonical_encoding_is_accepted() -> None:
    header = Header(dh=bytes(range(32)), pn=5, n=300)
    data = encode_header(header)
    assert decode_header(data) == header
    dh_bin8 = b"\xc4\x20" + header.dh
    not_canonical = [
        b"\x93" + dh_bin8 + b"\xcc\x05" + b"\xcd\x01\x2c",  # pn as uint8 where a fixint will do
        b"\x93" + b"\xc5\x00\x20" + header.dh + b"\x05\xcd\x01\x2c",  # dh as bin16
        b"\xdc\x00\x03" + dh_bin8 + b"\x05\xcd\x01\x2c",  # array16 header
    ]
    for variant in not_canonical:
        assert msgpack.unpackb(variant) == to_wire(header)  # the same value ...
        with pytest.raises(ProtocolError, match="canonical"):  # ... but not the bytes the sender authenticated
            decode_header(variant)
    malformed = [b"", data[:-1], data + b"\x00", msgpack.packb([header.dh, 5]), msgpack.packb([header.dh[:31], 5, 1])]
    malformed += [msgpack.packb([header.dh, -1, 0]), msgpack.packb([header.dh, True, 0]), bytearray(data)]
    for bad in malformed:
        with pytest.raises(ProtocolError):
            decode_header(bad)


def test_state_round_trips_at_every_stage() -> None:
    alice, bob, random_bytes = new_session(21)
    stages = [alice, bob]
    alice, messages = send_many(alice, 4, random_bytes)
    stages.append(alice)
    bob = receive(bob, messages[3], random_bytes)
    stages.append(bob)  # with skipped keys
    bob, reply = send(bob, b"reply", random_bytes)
    stages += [bob, receive(alice, reply, random_bytes)]
    for state in stages:
        data = encode_state(state)
        assert data[0] == STATE_VERSION
        decoded = decode_state(data)
        assert decoded == state and encode_state(decoded) == data


def _inconsistent_states() -> dict[str, bytes]:
    alice, bob, random_bytes = new_session(22)
    alice, messages = send_many(alice, 3, random_bytes)
    bob_after = receive(bob, messages[2], random_bytes)
    other_key = random_bytes(KEY_BYTES)
    entry = bob_after.skipped[0]
    wire = to_wire(bob_after)
    too_many = [[bytes([i % 256, i // 256]) * 16, 0, other_key] for i in range(MAX_SKIPPED_KEYS + 1)]
    valid = encode_state(bob_after)
    cases = {
        "empty": b"",
        "version only": bytes((STATE_VERSION,)),
        "old version": bytes((STATE_VERSION - 1,)) + valid[1:],
        "next version": bytes((STATE_VERSION + 1,)) + valid[1:],
        "truncated": valid[:-1],
        "trailing byte": valid + b"\x00",
        "not an array": _pack_state({"rk": other_key}),
        "missing field": _pack_state(wire[:-1]),
        "too many skipped keys": _pack_state([*wire[:-1], too_many]),
    }
    replaced = {
        "public key not the private key's": dataclasses.replace(bob, dhs_public=other_key),
        "chains before the peer's key": dataclasses.replace(bob, cks=other_key),
        "receiving chain before the peer's key": dataclasses.replace(bob, ckr=other_key),
        "sent before the peer's key": dataclasses.replace(bob, ns=1),
        "peer's key without a sending chain": dataclasses.replace(bob_after, cks=None),
        "received without a receiving chain": dataclasses.replace(alice, nr=1),
        "previous chain without a receiving chain": dataclasses.replace(alice, pn=1),
        "skipped keys without a receiving chain": dataclasses.replace(alice, skipped=(entry,)),
        "a skipped key twice": dataclasses.replace(bob_after, skipped=(entry, entry)),
    }
    cases.update({name: encode_state(state) for name, state in replaced.items()})
    return cases


_INCONSISTENT = _inconsistent_states()


@pytest.mark.parametrize("name", sorted(_INCONSISTENT))
def test_decode_state_refuses_malformed_and_inconsistent_states(name: str) -> None:
    with pytest.raises(ProtocolError):
        decode_state(_INCONSISTENT[name])


# --- secrets ------------------------------------------------------------------------------------------------------


def test_forward_secrecy_old_keys_leave_the_state() -> None:
    alice, bob, random_bytes = established(23)
    old = alice
    alice, message = send(alice, b"one", random_bytes)
    assert old.cks is not None and old.cks not in encode_state(alice)  # the sending chain moved on
    bob = receive(bob, message, random_bytes)
    bob, reply = send(bob, b"two", random_bytes)
    alice = receive(alice, reply, random_bytes)  # a DH ratchet step
    persisted = encode_state(alice)
    for secret in (old.rk, old.cks, old.ckr, old.dhs_private):
        assert secret is not None and secret not in persisted
    assert not alice.skipped  # and no message key is kept once used


def test_repr_shows_no_secret() -> None:
    alice, bob, random_bytes = established(24)
    alice, messages = send_many(alice, 2, random_bytes)
    bob = receive(bob, messages[1], random_bytes)
    text = repr(bob)
    assert bob.skipped
    for secret in (bob.dhs_private, bob.rk, bob.cks, bob.ckr, bob.skipped[0].message_key):
        assert secret is not None and repr(secret) not in text
    assert repr(bob.skipped[0].message_key) not in repr(bob.skipped[0])


def test_encryption_is_deterministic_so_commit_the_state_before_sending() -> None:
    """The key and nonce derive from the state: encrypting twice from one state reuses them (see the docs)."""
    alice, _, random_bytes = new_session(25)
    first = encrypt(alice, b"same", AD, random_bytes)
    again = encrypt(alice, b"same", AD, random.Random(99).randbytes)
    assert first == again


# --- misuse -------------------------------------------------------------------------------------------------------


def test_initialisation_misuse_raises_value_error() -> None:
    random_bytes = random.Random(26).randbytes
    key = random_bytes(KEY_BYTES)
    public = nacl.bindings.crypto_scalarmult_base(key)
    with pytest.raises(ValueError, match="shared_key"):
        init_sender(key[:31], public, random_bytes)
    with pytest.raises(ValueError, match="receiver_ratchet_public"):
        init_sender(key, public + b"\x00", random_bytes)
    with pytest.raises(ValueError, match="random_bytes"):
        init_sender(key, public, lambda size: bytes(size - 1))
    with pytest.raises(ValueError, match="own_ratchet_private"):
        init_receiver(key, key[:16], public)
    with pytest.raises(ValueError, match="not the public key"):
        init_receiver(key, key, bytes(32))
    alice, bob, _ = new_session(26)
    alice, message = send(alice, b"x", random_bytes)
    with pytest.raises(ValueError, match="random_bytes"):  # a DH ratchet step needs a 32-byte draw
        decrypt(bob, decode_header(message.header), message.ciphertext, AD, lambda size: b"")


# --- fuzz ---------------------------------------------------------------------------------------------------------


@functools.cache
def _fuzz_session() -> Session:
    """An established session where Bob holds skipped keys, so fuzzed headers can hit every path."""
    alice, bob, random_bytes = established(27)
    alice, messages = send_many(alice, 4, random_bytes)
    bob = receive(bob, messages[3], random_bytes)
    return Session(alice, bob, random_bytes)


@FAST
@given(st.binary(max_size=400))
def test_decode_state_of_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    for candidate in (data, bytes((STATE_VERSION,)) + data):
        try:
            state = decode_state(candidate)
        except ProtocolError:
            continue
        assert decode_state(encode_state(state)) == state


@FAST
@given(st.data())
def test_decode_state_of_mutated_encodings_raises_only_protocol_error(data: st.DataObject) -> None:
    valid = bytearray(encode_state(_fuzz_session().bob))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(valid) - 1))
        operation = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if operation == "flip":
            valid[position] ^= 1 << data.draw(st.integers(0, 7))
        elif operation == "delete":
            del valid[position]
        elif operation == "insert":
            valid.insert(position, data.draw(st.integers(0, 255)))
        else:
            del valid[position:]
        if not valid:
            break
    try:
        state = decode_state(bytes(valid))
    except ProtocolError:
        return
    assert decode_state(encode_state(state)) == state


@FAST
@given(st.binary(max_size=80))
def test_decode_header_of_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    try:
        header = decode_header(data)
    except ProtocolError:
        return
    assert encode_header(header) == data


_counts = st.one_of(st.integers(0, 40), st.integers(0, MAX_CHAIN_LENGTH - 1))


@FAST
@given(st.data(), _counts, _counts, st.binary(max_size=120))
def test_decrypt_of_arbitrary_messages_raises_only_protocol_error(
    data: st.DataObject, pn: int, n: int, ciphertext: bytes
) -> None:
    alice, bob, random_bytes = _fuzz_session()
    known = [alice.dhs_public, *(entry.dh for entry in bob.skipped)]
    dh = data.draw(st.one_of(st.sampled_from(known), st.binary(min_size=32, max_size=32)))
    with pytest.raises(ProtocolError):
        decrypt(bob, Header(dh=dh, pn=pn, n=n), ciphertext, AD, random_bytes)
