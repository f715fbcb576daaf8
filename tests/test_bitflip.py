"""Every bit of every signed, keyed, check-summed or encrypted structure, flipped one at a time, is rejected.

In the manner of libsignal's tests: take a valid encoding, check that it is accepted (so the test can fail), then
flip each of its bits in turn and check that the receiver refuses the result with the project's error --
:class:`~p2pchat.errors.ProtocolError` for what comes from the network, :class:`~p2pchat.errors.AddressError` for
an address -- and with nothing else.  The receiver is the real one: decode, then validate (or decrypt) exactly as
the node does with network input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fuzz.corpus import NOW, corpus, seeded_random_bytes

from p2pchat.core import envelope, ratchet, x3dh
from p2pchat.core.address import ADDRESS_HRP, ADDRESS_PREFIX, BECH32_ALPHABET, decode_address, encode_address
from p2pchat.core.framing import unpack_strict
from p2pchat.core.handshake import Handshake, ReceiveCipher
from p2pchat.core.messages import Content, RatchetMessage, decode, encode
from p2pchat.core.nodecert import CertCache, NodeCert
from p2pchat.core.records import (
    decode_entry,
    decode_record,
    decode_tombstone,
    encode_entry,
    encode_record,
    encode_tombstone,
    validate_entry,
    validate_record,
    validate_tombstone,
)
from p2pchat.core.schema import from_wire
from p2pchat.errors import AddressError, ProtocolError


def _flipped(data: bytes) -> Iterator[tuple[int, bytes]]:
    for bit in range(len(data) * 8):
        copy = bytearray(data)
        copy[bit // 8] ^= 1 << (bit % 8)
        yield bit, bytes(copy)


def assert_every_flip_rejected(
    data: bytes, receive: Callable[[bytes], object], error: type[Exception] = ProtocolError
) -> int:
    """*receive* accepts *data* and raises *error* for each one-bit change of it; returns the bits tried."""
    receive(data)
    accepted = []
    for bit, flipped in _flipped(data):
        try:
            receive(flipped)
        except error:
            continue
        accepted.append(f"byte {bit // 8} bit {bit % 8}")
    assert not accepted, f"{len(accepted)} flipped encodings accepted: {accepted[:10]}"
    return len(data) * 8


# --- DHT structures -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ipv4", "ipv6"])
def test_node_certificate(which: str) -> None:
    c = corpus()
    cert = c.cert if which == "ipv4" else c.cert6
    [data] = [d for d in c.nodecerts() if from_wire(NodeCert, unpack_strict(d)) == cert]

    def receive(wire: bytes) -> None:
        # A fresh cache each time: a cached verdict must not be what accepts a flipped certificate.
        CertCache().verify(from_wire(NodeCert, unpack_strict(wire)), cert.host, cert.port, NOW)

    assert assert_every_flip_rejected(data, receive) > 800


def test_signed_record() -> None:
    c = corpus()
    assert_every_flip_rejected(encode_record(c.record), lambda d: validate_record(decode_record(d), c.record_key, NOW))


def test_tombstone() -> None:
    c = corpus()
    data = encode_tombstone(c.tombstone)
    assert_every_flip_rejected(data, lambda d: validate_tombstone(decode_tombstone(d), c.mailbox, NOW))


@pytest.mark.parametrize("index", [0, 1])
def test_mailbox_entry(index: int) -> None:
    c = corpus()
    data = encode_entry(c.entries[index])
    assert_every_flip_rejected(data, lambda d: validate_entry(decode_entry(d), c.mailbox, NOW))


def test_sealed_envelope() -> None:
    c = corpus()

    def receive(sealed: bytes) -> None:
        sender, payload = envelope.open_envelope(c.mailbox_owner, sealed)
        assert sender.key == c.alice.public.key and payload == b"hello through the mailbox"

    assert_every_flip_rejected(c.envelope, receive)


# --- X3DH and the Double Ratchet ---------------------------------------------------------------------------------


def test_prekey_bundle() -> None:
    c = corpus()
    data = x3dh.encode_bundle(c.bundle)
    assert_every_flip_rejected(data, lambda d: x3dh.validate_bundle(x3dh.decode_bundle(d), c.bob.public.key, NOW))


def _bob_receives_first(wire: bytes) -> Content:
    """Bob takes Alice's first ratchet message: its X3DH initial header starts the session (as the messenger)."""
    c = corpus()
    pair = c.ratchet_pair
    message = decode(RatchetMessage, wire)
    if message.initial is None:
        raise ProtocolError("no initial header")
    initial = x3dh.decode_initial_header(message.initial)
    if initial.sender_identity_key != c.alice.public.key:
        raise ProtocolError("the initial header names another sender")  # the messenger's own check
    prekeys, shared, associated, _ = x3dh.respond(c.bob, pair.bob_prekeys, initial, NOW)
    private, public = x3dh.signed_prekey_pair(prekeys, initial.signed_prekey_id)
    state = ratchet.init_receiver(shared, private, public)
    header = ratchet.decode_header(message.header)
    _, plaintext = ratchet.decrypt(state, header, message.ciphertext, associated, seeded_random_bytes(1))
    return decode(Content, plaintext)


def test_x3dh_initial_message() -> None:
    # The whole first message: initial header (identity and ephemeral keys, prekey ids), ratchet header,
    # ciphertext.  The initial header is not signed; a change to it gives Bob another key and the AEAD fails.
    data = encode(corpus().ratchet_pair.messages[0])
    assert assert_every_flip_rejected(data, _bob_receives_first) > 1000


def _bob_after_first() -> tuple[ratchet.RatchetState, bytes]:
    pair = corpus().ratchet_pair
    first = pair.messages[0]
    state, _ = ratchet.decrypt(
        pair.bob_state,
        ratchet.decode_header(first.header),
        first.ciphertext,
        pair.associated_data,
        seeded_random_bytes(1),
    )
    return state, pair.associated_data


@pytest.mark.parametrize("part", ["header", "ciphertext"])
def test_ratchet_message_header_and_ciphertext(part: str) -> None:
    state, associated = _bob_after_first()
    second = corpus().ratchet_pair.messages[1]

    def receive(changed: bytes) -> None:
        header = changed if part == "header" else second.header
        ciphertext = changed if part == "ciphertext" else second.ciphertext
        _, plaintext = ratchet.decrypt(
            state, ratchet.decode_header(header), ciphertext, associated, seeded_random_bytes(1)
        )
        assert decode(Content, plaintext).text == "second"

    assert_every_flip_rejected(second.header if part == "header" else second.ciphertext, receive)


# --- the direct channel -----------------------------------------------------------------------------------------


def _handshake(tamper: int, data_filter: Callable[[bytes], bytes]) -> None:
    """Run the handshake with message *tamper* (1, 2 or 3) passed through *data_filter*; ProtocolError if refused.

    Message 1 is not authenticated by itself (it is one ephemeral key): a changed one is refused a step later,
    when the transcripts of the two sides disagree.  The run is deterministic: the same ephemerals every time.
    """
    run = corpus().handshake
    initiator = Handshake(run.initiator, seeded_random_bytes(run.initiator_seed), initiator=True)
    responder = Handshake(run.responder, seeded_random_bytes(run.responder_seed), initiator=False)
    hello = initiator.start()
    responder.start()
    assert hello is not None
    auth = responder.receive(data_filter(hello) if tamper == 1 else hello)
    assert auth is not None
    final = initiator.receive(data_filter(auth) if tamper == 2 else auth)
    assert final is not None
    responder.receive(data_filter(final) if tamper == 3 else final)
    assert initiator.result is not None and responder.result is not None
    assert initiator.result.handshake_hash == responder.result.handshake_hash


@pytest.mark.parametrize("message", [1, 2, 3])
def test_handshake_message(message: int) -> None:
    run = corpus().handshake
    original = {1: run.hello, 2: run.responder_auth, 3: run.initiator_auth}[message]
    assert_every_flip_rejected(original, lambda changed: _handshake(message, lambda _: changed))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_channel_transport_frame(index: int) -> None:
    # Counter, type byte, payload and tag: frame 0, a longer data frame, and the close frame.
    run = corpus().handshake

    def receive(frame: bytes) -> None:
        cipher = ReceiveCipher(run.responder_key)
        for earlier in run.frames[:index]:
            cipher.open(earlier)
        cipher.open(frame)

    assert_every_flip_rejected(run.frames[index], receive)


# --- addresses ----------------------------------------------------------------------------------------------------


def test_address_every_bit_of_every_character() -> None:
    # What a person copies: each character's code point with one of its 8 bits flipped (a bit flip in transit, or a
    # typo that lands on a neighbouring code) is caught by the Bech32m checksum or the alphabet.
    text = corpus().alice.public.address

    def receive(changed: bytes) -> None:
        assert decode_address(changed.decode("latin-1")) == corpus().alice.public.key

    assert_every_flip_rejected(text.encode("latin-1"), receive, AddressError)


def test_address_every_bit_of_every_symbol() -> None:
    # The checksum's own unit: each 5-bit data symbol with one bit flipped -- the BCH code detects every
    # single-symbol error, so all 5 * 59 of these (version, key, checksum symbols) must fail.
    key = corpus().bob.public.key
    text = encode_address(key)
    assert decode_address(text) == key
    data = text[len(ADDRESS_PREFIX) :]
    accepted = []
    for index, char in enumerate(data):
        for bit in range(5):
            symbol = BECH32_ALPHABET[BECH32_ALPHABET.index(char) ^ (1 << bit)]
            changed = ADDRESS_HRP + "1" + data[:index] + symbol + data[index + 1 :]
            try:
                decode_address(changed)
            except AddressError:
                continue
            accepted.append((index, bit))
    assert not accepted
    assert len(data) == 59
