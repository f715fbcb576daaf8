"""The channel handshake and transport ciphers (sans-I/O): each test is named after what it stops."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import cast

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.core.handshake import (
    CHANNEL_VERSION,
    EPHEMERAL_KEY_BYTES,
    FRAME_OVERHEAD,
    MAX_CHANNEL_FRAME,
    MAX_CHANNEL_WIRE_FRAME,
    MAX_FRAMES_PER_CHANNEL,
    MAX_HANDSHAKE_MESSAGE,
    Handshake,
    HandshakeResult,
    InitiatorAuth,
    InitiatorHello,
    ReceiveCipher,
    ResponderAuth,
    SendCipher,
)
from p2pchat.core.identity import Identity, PublicIdentity
from p2pchat.core.schema import max_wire_size
from p2pchat.errors import ProtocolError

FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None)

ALICE = Identity.from_seed(bytes([1]) * 32)
BOB = Identity.from_seed(bytes([2]) * 32)
MALLORY = Identity.from_seed(bytes([3]) * 32)


def _random(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def _pair(
    seed: int = 0,
    *,
    initiator: Identity = ALICE,
    responder: Identity = BOB,
    expected: bytes | None = None,
    responder_expects: bytes | None = None,
) -> tuple[Handshake, Handshake]:
    """An initiator and a responder; the same seed gives the same ephemerals, so messages are repeatable."""
    rng = _random(seed)
    return (
        Handshake(initiator, rng, initiator=True, expected_peer=expected),
        Handshake(responder, rng, initiator=False, expected_peer=responder_expects),
    )


def _complete(initiator: Handshake, responder: Handshake) -> tuple[bytes, bytes, bytes]:
    """Run a whole handshake; return its three messages."""
    first = initiator.start()
    assert first is not None
    assert responder.start() is None
    second = responder.receive(first)
    assert second is not None
    third = initiator.receive(second)
    assert third is not None
    assert responder.receive(third) is None
    return first, second, third


def _results(initiator: Handshake, responder: Handshake) -> tuple[HandshakeResult, HandshakeResult]:
    assert initiator.result is not None
    assert responder.result is not None
    return initiator.result, responder.result


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


class _Impostor:
    """Claims *claimed*'s public key (which everyone knows) but can only sign with its own private key."""

    def __init__(self, claimed: Identity, own: Identity) -> None:
        self.public = claimed.public
        self._own = own

    def sign(self, message: bytes) -> bytes:
        return self._own.sign(message)


# --- HKDF (RFC 5869 test cases 1-3, SHA-256) --------------------------------------------------------------------


# --- a good handshake -------------------------------------------------------------------------------------------


def test_both_sides_agree_and_learn_each_other() -> None:
    initiator, responder = _pair(1, expected=BOB.public.key)
    _complete(initiator, responder)
    mine, theirs = _results(initiator, responder)
    assert mine.peer == BOB.public
    assert theirs.peer == ALICE.public
    assert mine.handshake_hash == theirs.handshake_hash
    # Each side's sender is the other side's receiver, in both directions.
    assert theirs.receiver.open(mine.sender.seal(b"hello bob")) == b"hello bob"
    assert mine.receiver.open(theirs.sender.seal(b"hello alice")) == b"hello alice"


def test_every_session_has_its_own_keys() -> None:
    first = _pair(1)
    second = _pair(2)
    _complete(*first)
    _complete(*second)
    one, _ = _results(*first)
    _, other = _results(*second)
    assert one.handshake_hash != other.handshake_hash
    with pytest.raises(ProtocolError, match="authentication"):
        other.receiver.open(one.sender.seal(b"for session one"))


def test_identities_are_hidden_from_a_passive_observer() -> None:
    initiator, responder = _pair(1)
    messages = _complete(initiator, responder)
    for message in messages:
        assert ALICE.public.key not in message
        assert BOB.public.key not in message


def test_handshake_messages_fit_the_limit() -> None:
    messages = _complete(*_pair(1))
    for cls, message in zip((InitiatorHello, ResponderAuth, InitiatorAuth), messages, strict=True):
        assert len(message) == max_wire_size(cls) <= MAX_HANDSHAKE_MESSAGE


def test_ephemeral_secrets_are_dropped_once_keys_exist() -> None:
    initiator, responder = _pair(1)
    _complete(initiator, responder)
    for side in (initiator, responder):
        assert side._ephemeral_secret is None
        assert side._ee is None
        assert side._initiator_key is None


def test_ephemeral_secrets_are_dropped_after_a_failure() -> None:
    initiator, _ = _pair(1)
    initiator.start()
    with pytest.raises(ProtocolError):
        initiator.receive(b"garbage")
    assert initiator._ephemeral_secret is None


# --- identity -----------------------------------------------------------------------------------------------------


def test_wrong_expected_peer_fails_clearly() -> None:
    initiator, responder = _pair(1, expected=MALLORY.public.key)
    first = initiator.start()
    responder.start()
    assert first is not None
    second = responder.receive(first)
    assert second is not None
    with pytest.raises(ProtocolError, match=f"peer is {BOB.public.address}, not the expected"):
        initiator.receive(second)
    assert initiator.result is None


def test_responder_can_expect_a_peer_too() -> None:
    initiator, responder = _pair(1, responder_expects=MALLORY.public.key)
    first = initiator.start()
    responder.start()
    assert first is not None
    second = responder.receive(first)
    assert second is not None
    third = initiator.receive(second)
    assert third is not None
    with pytest.raises(ProtocolError, match=f"peer is {ALICE.public.address}, not the expected"):
        responder.receive(third)


def test_expected_peer_must_be_a_key() -> None:
    with pytest.raises(ValueError, match="32-byte"):
        Handshake(ALICE, _random(1), initiator=True, expected_peer=b"short")


def test_impostor_responder_with_alices_public_key_fails() -> None:
    # Mallory answers a connection meant for Alice, presenting Alice's public key: she cannot sign as Alice.
    impostor = cast(Identity, _Impostor(ALICE, MALLORY))
    initiator, responder = _pair(1, initiator=BOB, responder=impostor, expected=ALICE.public.key)
    first = initiator.start()
    responder.start()
    assert first is not None
    second = responder.receive(first)
    assert second is not None
    with pytest.raises(ProtocolError, match="responder's signature does not verify"):
        initiator.receive(second)


def test_impostor_initiator_with_alices_public_key_fails() -> None:
    impostor = cast(Identity, _Impostor(ALICE, MALLORY))
    initiator, responder = _pair(1, initiator=impostor, responder=BOB)
    first = initiator.start()
    responder.start()
    assert first is not None
    second = responder.receive(first)
    assert second is not None
    third = initiator.receive(second)
    assert third is not None
    with pytest.raises(ProtocolError, match="initiator's signature does not verify"):
        responder.receive(third)
    assert responder.result is None


# --- tampering ----------------------------------------------------------------------------------------------------


def test_every_bit_flip_of_message_1_fails() -> None:
    first, _, _ = _complete(*_pair(1))
    refused_by_responder = refused_by_initiator = 0
    for bit in range(len(first) * 8):
        initiator, responder = _pair(1)
        assert initiator.start() == first
        responder.start()
        try:
            second = responder.receive(_flip(first, bit))
        except ProtocolError:
            refused_by_responder += 1
            continue
        # The responder cannot tell a changed ephemeral key; the initiator can: the transcripts differ.
        assert second is not None
        with pytest.raises(ProtocolError):
            initiator.receive(second)
        refused_by_initiator += 1
    assert refused_by_responder > 0
    assert refused_by_initiator >= EPHEMERAL_KEY_BYTES * 8  # every flip of the key, the ignored top bit included


def test_every_bit_flip_of_message_2_fails() -> None:
    _, second, _ = _complete(*_pair(1))
    for bit in range(len(second) * 8):
        initiator, _ = _pair(1)
        initiator.start()
        with pytest.raises(ProtocolError):
            initiator.receive(_flip(second, bit))
        assert initiator.result is None


def test_every_bit_flip_of_message_3_fails() -> None:
    first, second, third = _complete(*_pair(1))
    for bit in range(len(third) * 8):
        _, responder = _pair(1)
        responder.start()
        assert responder.receive(first) == second
        with pytest.raises(ProtocolError):
            responder.receive(_flip(third, bit))
        assert responder.result is None


def test_replayed_message_2_from_an_earlier_session_fails() -> None:
    _, old_second, _ = _complete(*_pair(1))
    initiator, _ = _pair(2)  # fresh ephemeral: the old message was sealed under another DH secret
    initiator.start()
    with pytest.raises(ProtocolError, match="failed authentication"):
        initiator.receive(old_second)


def test_replayed_messages_1_and_3_from_an_earlier_session_fail() -> None:
    old_first, _, old_third = _complete(*_pair(1))
    _, responder = _pair(2)
    responder.start()
    # Replaying message 1 gets a reply (with a fresh ephemeral), but the recorded message 3 cannot finish it.
    assert responder.receive(old_first) is not None
    with pytest.raises(ProtocolError, match="failed authentication"):
        responder.receive(old_third)
    assert responder.result is None


def test_substituted_initiator_ephemeral_fails() -> None:
    # A man in the middle replaces Alice's ephemeral key with his own: Bob answers, Alice refuses the answer.
    mitm, _ = _pair(99, initiator=MALLORY)
    mitm_first = mitm.start()
    initiator, responder = _pair(1)
    initiator.start()
    responder.start()
    assert mitm_first is not None
    second = responder.receive(mitm_first)
    assert second is not None
    with pytest.raises(ProtocolError):
        initiator.receive(second)


def test_substituted_responder_ephemeral_fails() -> None:
    _, second, _ = _complete(*_pair(1))
    _, other_second, _ = _complete(*_pair(2))
    other_ephemeral = msgpack.unpackb(other_second)[2]
    wire = msgpack.unpackb(second)
    wire[2] = other_ephemeral
    initiator, _ = _pair(1)
    initiator.start()
    with pytest.raises(ProtocolError, match="failed authentication"):
        initiator.receive(msgpack.packb(wire))


def test_swapped_ephemerals_fail() -> None:
    # The responder's message carrying the initiator's own ephemeral key (a reflection): refused.
    first, second, _ = _complete(*_pair(1))
    wire = msgpack.unpackb(second)
    wire[2] = msgpack.unpackb(first)[2]
    initiator, _ = _pair(1)
    initiator.start()
    with pytest.raises(ProtocolError):
        initiator.receive(msgpack.packb(wire))


def test_message_2_spliced_from_a_parallel_session_fails() -> None:
    one = _pair(1)
    two = _pair(2)
    seconds = []
    for initiator, responder in (one, two):
        first = initiator.start()
        responder.start()
        assert first is not None
        second = responder.receive(first)
        assert second is not None
        seconds.append(second)
    with pytest.raises(ProtocolError):
        one[0].receive(seconds[1])
    with pytest.raises(ProtocolError):
        two[0].receive(seconds[0])


def test_reflected_message_1_is_refused_by_the_initiator() -> None:
    initiator, _ = _pair(1)
    first = initiator.start()
    assert first is not None
    with pytest.raises(ProtocolError, match="expected handshake message 2"):
        initiator.receive(first)


def test_message_2_in_place_of_message_3_is_refused() -> None:
    first, second, _ = _complete(*_pair(1))
    _, responder = _pair(1)
    responder.start()
    responder.receive(first)
    with pytest.raises(ProtocolError, match="expected handshake message 3"):
        responder.receive(second)


@pytest.mark.parametrize(
    "point",
    [
        bytes(32),  # zero
        (1).to_bytes(32, "little"),  # order 4
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    ],
)
def test_low_order_ephemeral_is_refused(point: bytes) -> None:
    _, responder = _pair(1)
    responder.start()
    with pytest.raises(ProtocolError, match="low-order point"):
        responder.receive(msgpack.packb([CHANNEL_VERSION, 1, point]))


def test_unknown_version_is_named() -> None:
    _, responder = _pair(1)
    responder.start()
    with pytest.raises(ProtocolError, match="unsupported channel protocol version 2"):
        responder.receive(msgpack.packb([2, 1, bytes(32)]))


def test_handshake_message_limit_is_reached_exactly() -> None:
    def hello_of_size(size: int) -> bytes:
        padding = size - len(msgpack.packb([CHANNEL_VERSION, 1, b""]))  # a bin8 still: padding stays under 256
        message: bytes = msgpack.packb([CHANNEL_VERSION, 1, bytes(padding)])
        assert len(message) == size
        return message

    _, responder = _pair(1)
    responder.start()
    with pytest.raises(ProtocolError) as at_limit:
        responder.receive(hello_of_size(MAX_HANDSHAKE_MESSAGE))
    assert "limit" not in str(at_limit.value)  # refused for its content, not its size
    _, responder = _pair(1)
    responder.start()
    with pytest.raises(ProtocolError, match=f"over the {MAX_HANDSHAKE_MESSAGE}-byte handshake limit"):
        responder.receive(hello_of_size(MAX_HANDSHAKE_MESSAGE + 1))


# --- misuse is the caller's bug, not the peer's -------------------------------------------------------------------


def test_out_of_order_calls_are_runtime_errors() -> None:
    initiator, responder = _pair(1)
    with pytest.raises(RuntimeError, match="start"):
        initiator.receive(b"x")
    _complete(initiator, responder)
    with pytest.raises(RuntimeError, match="already started"):
        initiator.start()
    with pytest.raises(RuntimeError, match="over"):
        responder.receive(b"x")
    failed, _ = _pair(2)
    failed.start()
    with pytest.raises(ProtocolError):
        failed.receive(b"x")
    with pytest.raises(RuntimeError, match="failed"):
        failed.receive(b"x")


# --- transport ----------------------------------------------------------------------------------------------------


def _ciphers() -> tuple[SendCipher, ReceiveCipher]:
    key = bytes(range(32))
    return SendCipher(key), ReceiveCipher(key)


def test_transport_round_trips_in_order() -> None:
    sender, receiver = _ciphers()
    payloads = [b"", b"x", bytes(range(256)) * 10]
    for payload in payloads:
        assert receiver.open(sender.seal(payload)) == payload
    assert sender.frames_sent == receiver.frames_received == len(payloads)


def test_counters_are_per_direction() -> None:
    initiator, responder = _pair(1)
    _complete(initiator, responder)
    mine, theirs = _results(initiator, responder)
    for i in range(5):
        theirs.receiver.open(mine.sender.seal(b"a%d" % i))
    # The other direction starts at counter 0 whatever this one has sent.
    reply = theirs.sender.seal(b"b")
    assert reply[:8] == bytes(8)
    assert mine.receiver.open(reply) == b"b"
    assert (mine.sender.frames_sent, mine.receiver.frames_received) == (5, 1)
    assert (theirs.sender.frames_sent, theirs.receiver.frames_received) == (1, 5)


def test_frame_reflected_to_its_sender_is_refused() -> None:
    initiator, responder = _pair(1)
    _complete(initiator, responder)
    mine, _ = _results(initiator, responder)
    with pytest.raises(ProtocolError, match="authentication"):
        mine.receiver.open(mine.sender.seal(b"echo"))


def test_replayed_frame_is_refused_and_ends_the_channel() -> None:
    sender, receiver = _ciphers()
    frame = sender.seal(b"pay 10")
    receiver.open(frame)
    with pytest.raises(ProtocolError, match="replayed or reordered frame: counter 0, expected 1"):
        receiver.open(frame)
    with pytest.raises(ProtocolError, match="earlier bad frame"):
        receiver.open(sender.seal(b"next"))


def test_reordered_frames_are_refused() -> None:
    sender, receiver = _ciphers()
    first, second = sender.seal(b"1"), sender.seal(b"2")
    with pytest.raises(ProtocolError, match="counter 1 skips ahead of 0"):
        receiver.open(second)
    with pytest.raises(ProtocolError):
        receiver.open(first)


def test_forged_counter_is_refused() -> None:
    # Rewriting the counter to the expected value does not help: it is the nonce, so authentication fails.
    sender, receiver = _ciphers()
    sender.seal(b"lost")
    second = sender.seal(b"second")
    with pytest.raises(ProtocolError, match="failed authentication"):
        receiver.open(bytes(8) + second[8:])


def test_every_bit_flip_of_a_frame_is_refused() -> None:
    sender, _ = _ciphers()
    frame = sender.seal(b"attack at dawn")
    for bit in range(len(frame) * 8):
        _, receiver = _ciphers()
        with pytest.raises(ProtocolError):
            receiver.open(_flip(frame, bit))


def test_truncated_and_short_frames_are_refused() -> None:
    sender, _ = _ciphers()
    frame = sender.seal(b"hello")
    for size in range(len(frame)):
        _, receiver = _ciphers()
        with pytest.raises(ProtocolError):
            receiver.open(frame[:size])


def test_max_channel_frame_is_reached_exactly() -> None:
    sender, receiver = _ciphers()
    largest = bytes(MAX_CHANNEL_FRAME)
    frame = sender.seal(largest)
    assert len(frame) == MAX_CHANNEL_WIRE_FRAME == MAX_CHANNEL_FRAME + FRAME_OVERHEAD
    assert receiver.open(frame) == largest
    with pytest.raises(ValueError, match=str(MAX_CHANNEL_FRAME)):
        sender.seal(bytes(MAX_CHANNEL_FRAME + 1))
    # A peer that seals a larger frame anyway is refused before decryption.
    rogue = SendCipher(bytes(range(32)))
    rogue._next = 1
    oversized = rogue._seal(0, bytes(MAX_CHANNEL_FRAME + 1))
    with pytest.raises(ProtocolError, match=f"over the {MAX_CHANNEL_WIRE_FRAME}-byte limit"):
        receiver.open(oversized)


def test_close_frame_ends_the_channel() -> None:
    sender, receiver = _ciphers()
    receiver.open(sender.seal(b"bye"))
    assert receiver.open(sender.seal_close()) is None
    assert receiver.closed and sender.closed
    with pytest.raises(RuntimeError, match="close frame"):
        sender.seal(b"after")
    rogue = SendCipher(bytes(range(32)))
    rogue._next = 2
    with pytest.raises(ProtocolError, match="after the peer's close frame"):
        receiver.open(rogue.seal(b"after"))


def test_unknown_frame_type_is_refused() -> None:
    sender, receiver = _ciphers()
    with pytest.raises(ProtocolError, match="unknown channel frame type 7"):
        receiver.open(sender._seal(7, b""))
    sender, receiver = _ciphers()
    with pytest.raises(ProtocolError, match="unknown channel frame type 1"):
        receiver.open(sender._seal(1, b"a close frame has no body"))


def test_counter_cannot_wrap_within_max_frames_per_channel() -> None:
    sender, receiver = _ciphers()
    sender._next = receiver._next = MAX_FRAMES_PER_CHANNEL - 1
    last = sender.seal(b"last")
    assert last[:8] == b"\xff" * 8
    assert receiver.open(last) == b"last"
    with pytest.raises(RuntimeError, match="open a new one"):
        sender.seal(b"one too many")
    with pytest.raises(ProtocolError, match=f"more than {MAX_FRAMES_PER_CHANNEL} frames"):
        receiver.open(last)


def test_transport_keys_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SendCipher(bytes(16))
    with pytest.raises(ValueError, match="32 bytes"):
        ReceiveCipher(bytes(16))


# --- fuzz: whatever the bytes, only ProtocolError ------------------------------------------------------------------

_wire_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(),
    st.binary(max_size=130),
    st.text(max_size=20),
    st.lists(st.integers(0, 3), max_size=3),
)
_structured = st.builds(
    lambda version, step, rest: msgpack.packb([version, step, *rest]),
    st.sampled_from([CHANNEL_VERSION, CHANNEL_VERSION, 0, 2]),
    st.integers(0, 4),
    st.lists(_wire_value, max_size=4),
)
_near_valid = st.builds(
    lambda version, step, size: msgpack.packb([version, step, *[bytes(n) for n in size]]),
    st.just(CHANNEL_VERSION),
    st.integers(1, 3),
    st.lists(st.sampled_from([0, 31, 32, 33, 111, 112, 113]), max_size=3),
)
_handshake_input = st.one_of(st.binary(max_size=MAX_HANDSHAKE_MESSAGE + 8), _structured, _near_valid)


def _at_stage(stage: str) -> Handshake:
    """A handshake waiting for message 1, 2 or 3."""
    initiator, responder = _pair(7)
    first = initiator.start()
    responder.start()
    if stage == "hello":
        return responder
    if stage == "responder_auth":
        return initiator
    assert first is not None
    responder.receive(first)
    return responder


@pytest.mark.parametrize("stage", ["hello", "responder_auth", "initiator_auth"])
@FAST
@given(data=_handshake_input)
def test_fuzz_handshake_decoders_raise_only_protocol_error(stage: str, data: bytes) -> None:
    handshake = _at_stage(stage)
    try:
        handshake.receive(data)
    except ProtocolError:
        return
    # Only the responder's first step can accept bytes it cannot check yet (an unauthenticated ephemeral key).
    assert stage == "hello"


@FAST
@given(st.binary(max_size=MAX_CHANNEL_WIRE_FRAME // 100))
def test_fuzz_receive_cipher_raises_only_protocol_error(data: bytes) -> None:
    # As is, and behind the counter the receiver expects, so the bytes reach the decryption.
    for frame in (data, bytes(8) + data):
        _, receiver = _ciphers()
        with pytest.raises(ProtocolError):
            receiver.open(frame)


def test_peer_identity_is_a_public_identity() -> None:
    initiator, responder = _pair(1)
    _complete(initiator, responder)
    mine, _ = _results(initiator, responder)
    assert isinstance(mine.peer, PublicIdentity)
    assert initiator.initiator and not responder.initiator
