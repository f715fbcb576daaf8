"""Valid encodings of everything p2pchat reads from the network or the disk, built deterministically.

The fuzz targets mutate these (a fuzzer that starts from real packets gets past the first checks), and the
bit-flip tests flip every bit of them.  Every key comes from a fixed seed and every clock reading is :data:`NOW`,
so the same call gives the same bytes in every process.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped]
import nacl.bindings

from p2pchat.core import envelope, handshake, ratchet, x3dh
from p2pchat.core.framing import encode_datagram, encode_frame, encode_rpcudp_request, encode_rpcudp_response
from p2pchat.core.identity import Identity
from p2pchat.core.lan import encode_txt
from p2pchat.core.messages import (
    Content,
    ContentKind,
    PeerAddress,
    PeerInfo,
    PrekeyInfo,
    RatchetMessage,
    SessionRecord,
    encode,
)
from p2pchat.core.nodecert import issue_cert
from p2pchat.core.packets import (
    EntryIds,
    ErrorCode,
    ErrorReply,
    FindNode,
    FindValue,
    Found,
    GetPart,
    ItemSpace,
    ListEntries,
    LookupSpace,
    NodeInfo,
    Nodes,
    PartReply,
    Ping,
    Pong,
    Store,
    Stored,
)
from p2pchat.core.parts import Part, make_parts
from p2pchat.core.records import (
    RecordKind,
    encode_entry,
    encode_record,
    entry_expiry,
    mailbox_key,
    make_entry,
    record_key,
    sign_record,
    sign_tombstone,
)
from p2pchat.core.schema import Packet, to_wire

__all__ = [
    "NOW",
    "Corpus",
    "HandshakeRun",
    "RatchetPair",
    "corpus",
    "identity",
    "seal_raw_envelope",
    "seeded_random_bytes",
]

NOW = 1_767_225_600
"""The wall clock of every seed and every check: 2026-01-01T00:00:00Z (the simulations' epoch)."""

RandomBytes = Callable[[int], bytes]


def seeded_random_bytes(seed: int) -> RandomBytes:
    """A deterministic ``random_bytes`` (never for real keys: tests and fuzzing only)."""
    return random.Random(seed).randbytes


def identity(seed: int) -> Identity:
    """A fixed identity per seed."""
    return Identity.from_seed(random.Random(f"identity-{seed}").randbytes(32))


@dataclass(frozen=True, slots=True)
class RatchetPair:
    """Alice's first messages to Bob (initial header attached), and Bob's state to decrypt them."""

    bob_state: ratchet.RatchetState
    associated_data: bytes
    messages: tuple[RatchetMessage, ...]
    bob_prekeys: x3dh.PrekeyState


@dataclass(frozen=True, slots=True)
class HandshakeRun:
    """The three messages of one handshake, and what each side needs to replay it deterministically."""

    initiator: Identity
    responder: Identity
    initiator_seed: int
    responder_seed: int
    hello: bytes
    responder_auth: bytes
    initiator_auth: bytes
    result: handshake.HandshakeResult
    """The initiator's result (its send cipher sealed :attr:`frames`)."""
    frames: tuple[bytes, ...]
    """Transport frames the initiator sealed: two data frames and the close frame."""
    responder_key: bytes
    """The transport key the responder opens the initiator's frames with."""


class Corpus:
    """Valid objects and encodings; build it once with :func:`corpus`."""

    def __init__(self) -> None:
        self.alice = identity(1)
        self.bob = identity(2)
        self.node = identity(3)
        self.mailbox_owner = identity(4)
        self.cert = issue_cert(self.node, "127.0.0.1", 4000, NOW)
        self.cert6 = issue_cert(self.node, "2001:db8::7", 65535, NOW)
        # Records, entries, tombstones.
        peer_info = encode(PeerInfo((PeerAddress("127.0.0.1", 4001), PeerAddress("::1", 4001))))
        self.record = sign_record(self.alice, RecordKind.PEER, 7, NOW + 3600, peer_info)
        self.record_key = record_key(RecordKind.PEER, self.alice.public.key)
        self.mailbox = mailbox_key(self.mailbox_owner.public.key)
        sealed = envelope.seal(self.alice, self.mailbox_owner.public.key, b"hello through the mailbox", _rb(5))
        self.envelope = sealed
        self.entry = make_entry(self.mailbox, sealed, entry_expiry(NOW))
        small = make_entry(self.mailbox, b"x", entry_expiry(NOW, 60))
        self.entries = (self.entry, small)
        self.tombstone = sign_tombstone(self.mailbox_owner, [e.entry_id for e in self.entries], NOW)
        # X3DH and the ratchet.
        self.ratchet_pair = _ratchet_pair(self.alice, self.bob)
        prekeys = x3dh.new_prekeys(self.bob, _rb(6), NOW, 3)
        self.bundle = x3dh.bundle_for(prekeys, self.bob, NOW)
        self.prekey_info = PrekeyInfo(x3dh.encode_bundle(self.bundle), self.mailbox_owner.public.key)
        self.handshake = _handshake_run(self.alice, self.bob)

    # --- encodings, grouped by decoder -----------------------------------------------------------------------

    def packets(self) -> list[Packet]:
        """One or more valid packets of every registered kind."""
        txid = bytes(range(8))
        key = self.record_key.bytes
        nodes = tuple(NodeInfo(bytes([i]) * 20, f"10.0.0.{i + 1}", 4000 + i) for i in range(10))
        nodes6 = tuple(NodeInfo(bytes([i]) * 20, f"2001:db8::{i + 1:x}", 4000 + i) for i in range(20))
        part = self.record_parts()[0]
        return [
            Ping(txid, self.cert),
            Ping(txid, None),
            Pong(txid, self.cert, "127.0.0.1", 4000),
            Pong(txid, self.cert6, "2001:db8::1", 1),
            FindNode(txid, self.cert, key),
            Nodes(txid, self.cert, nodes),
            Nodes(txid, self.cert6, nodes6),
            ErrorReply(txid, int(ErrorCode.BAD_TOKEN), "write token missing or stale"),
            FindValue(txid, self.cert, key, int(LookupSpace.RECORD)),
            FindValue(txid, None, self.mailbox.bytes, int(LookupSpace.MAILBOX)),
            Found(txid, self.cert, nodes, bytes(16), 7, bytes(range(16)), 0),
            Found(txid, self.cert, (), bytes(16), None, None, 3),
            GetPart(txid, key, int(ItemSpace.RECORD), bytes(range(16)), 0),
            PartReply(txid, part),
            ListEntries(txid, self.mailbox.bytes, b""),
            ListEntries(txid, self.mailbox.bytes, self.entry.entry_id),
            EntryIds(txid, tuple(e.entry_id for e in self.entries), True),
            Store(txid, key, int(ItemSpace.RECORD), bytes(16), part),
            Stored(txid, True),
        ]

    def datagrams(self) -> list[bytes]:
        """Every packet as a datagram, and rpcudp (kademlia package) requests and responses."""
        out = [encode_datagram(p) for p in self.packets()]
        msg_id = bytes(range(20))
        node_id = bytes(20)
        out += [
            encode_rpcudp_request(msg_id, "ping", [node_id]),
            encode_rpcudp_request(msg_id, "store", [node_id, bytes(range(20)), "a value"]),
            encode_rpcudp_request(msg_id, "store", [node_id, bytes(range(20)), 12345]),
            encode_rpcudp_request(msg_id, "find_node", [node_id, bytes(range(20))]),
            encode_rpcudp_request(msg_id, "find_value", [node_id, bytes(range(20))]),
            encode_rpcudp_response(msg_id, [[node_id, "127.0.0.1", 8468]]),
            encode_rpcudp_response(msg_id, {"value": b"x"}),
        ]
        return out

    def record_parts(self) -> list[Part]:
        """The record cut into parts (one: it is small)."""
        return make_parts(encode_record(self.record), bytes(8))

    def blob_parts(self) -> list[list[Part]]:
        """Part lists of several blobs: one part, three parts (a large entry)."""
        big = make_entry(self.mailbox, bytes(range(256)) * 10, entry_expiry(NOW))
        return [self.record_parts(), make_parts(encode_entry(big), b"transfer")]

    def stream_frames(self) -> list[bytes]:
        """Streams of length-prefixed frames: handshake messages, transport frames, several in a row."""
        run = self.handshake
        one = encode_frame(run.hello)
        many = b"".join(encode_frame(f) for f in (run.hello, run.responder_auth, run.initiator_auth, *run.frames))
        return [one, many, encode_frame(b"\x00" * 300)]

    def ratchet_messages(self) -> list[bytes]:
        """Alice's encoded ratchet messages (the first carries the X3DH initial header)."""
        return [encode(m) for m in self.ratchet_pair.messages]

    def ratchet_headers(self) -> list[bytes]:
        """Canonical ratchet headers."""
        return [m.header for m in self.ratchet_pair.messages]

    def contents(self) -> list[bytes]:
        """Plaintexts of ratchet messages: a text and an ack."""
        mid = bytes(range(16))
        return [
            encode(Content(int(ContentKind.TEXT), mid, 3, NOW * 1000, "hello, wörld", ())),
            encode(Content(int(ContentKind.ACK), mid, 4, NOW * 1000, "", (mid, bytes(16)))),
        ]

    def initial_headers(self) -> list[bytes]:
        """X3DH initial headers."""
        first = self.ratchet_pair.messages[0]
        assert first.initial is not None
        return [first.initial]

    def bundles(self) -> list[bytes]:
        """An X3DH prekey bundle and the prekey record value around it."""
        return [x3dh.encode_bundle(self.bundle), encode(self.prekey_info)]

    def disk_states(self) -> list[bytes]:
        """What the messenger keeps in SQLite blobs: session records, ratchet states, the prekey state."""
        pair = self.ratchet_pair
        state = ratchet.encode_state(pair.bob_state)
        record = SessionRecord(state, pair.associated_data, None, bytes(32), True)
        return [encode(record), state, x3dh.encode_prekey_state(pair.bob_prekeys)]

    def nodecerts(self) -> list[bytes]:
        """Node certificates, as msgpack arrays (how they travel inside packets)."""
        return [msgpack.packb(to_wire(c)) for c in (self.cert, self.cert6)]

    def txt_records(self) -> list[bytes]:
        """DNS TXT rdata (length-prefixed ``key=value`` strings) of a LAN announcement."""
        properties = encode_txt(self.node.public, udp_port=4000, tcp_port=4001)
        return [_txt_rdata(properties), _txt_rdata({**properties, b"tcp": b"0"})]

    def addresses(self) -> list[bytes]:
        """p2pchat addresses (UTF-8), lower and upper case."""
        text = self.alice.public.address
        return [text.encode(), text.upper().encode(), f"  {self.bob.public.address}\n".encode()]


def _rb(seed: int) -> RandomBytes:
    return seeded_random_bytes(seed)


def _txt_rdata(properties: dict[bytes, bytes]) -> bytes:
    out = bytearray()
    for key, value in properties.items():
        item = key + b"=" + value
        out += bytes((len(item),)) + item
    return bytes(out)


def _ratchet_pair(alice: Identity, bob: Identity) -> RatchetPair:
    prekeys = x3dh.new_prekeys(bob, _rb(7), NOW, 3)
    bundle = x3dh.bundle_for(prekeys, bob, NOW)
    shared, initial, associated = x3dh.initiate(alice, bundle, _rb(8))
    state = ratchet.init_sender(shared, bundle.signed_prekey, _rb(9))
    messages = []
    mid = bytes(range(16))
    for seq, text in enumerate(("first", "second", "third")):
        plaintext = encode(Content(int(ContentKind.TEXT), mid[:-1] + bytes((seq,)), seq, NOW * 1000, text, ()))
        state, header, ciphertext = ratchet.encrypt(state, plaintext, associated, _rb(10))
        messages.append(RatchetMessage(x3dh.encode_initial_header(initial), ratchet.encode_header(header), ciphertext))
    new_prekeys, bob_shared, bob_associated, _ = x3dh.respond(bob, prekeys, initial, NOW)
    private, public = x3dh.signed_prekey_pair(new_prekeys, initial.signed_prekey_id)
    bob_state = ratchet.init_receiver(bob_shared, private, public)
    assert bob_associated == associated
    return RatchetPair(bob_state, associated, tuple(messages), prekeys)


def _handshake_run(initiator: Identity, responder: Identity) -> HandshakeRun:
    initiator_seed, responder_seed = 11, 12
    a = handshake.Handshake(initiator, _rb(initiator_seed), initiator=True)
    b = handshake.Handshake(responder, _rb(responder_seed), initiator=False)
    hello = a.start()
    assert hello is not None and b.start() is None
    responder_auth = b.receive(hello)
    assert responder_auth is not None
    initiator_auth = a.receive(responder_auth)
    assert initiator_auth is not None and b.receive(initiator_auth) is None
    assert a.result is not None and b.result is not None
    frames = (a.result.sender.seal(b"first frame"), a.result.sender.seal(b"x" * 100), a.result.sender.seal_close())
    responder_key = b.result.receiver._key  # the transport key, to build fresh receive ciphers per input
    return HandshakeRun(
        initiator,
        responder,
        initiator_seed,
        responder_seed,
        hello,
        responder_auth,
        initiator_auth,
        a.result,
        frames,
        responder_key,
    )


def seal_raw_envelope(mailbox: Identity, inner: bytes, seed: int = 13) -> bytes:
    """An envelope sealed correctly to *mailbox* around arbitrary *inner* bytes (not a valid EnvelopeContent).

    The AEAD is the envelope's first check: without this, a fuzzer never gets past it to the decoder inside.
    """
    mailbox_x25519 = x3dh.ed25519_to_x25519_public(mailbox.public.key)
    ephemeral = seeded_random_bytes(seed)(32)
    ephemeral_public = x3dh.x25519_public(ephemeral)
    key, nonce = envelope._key_and_nonce(
        x3dh.x25519_shared(ephemeral, mailbox_x25519), ephemeral_public, mailbox_x25519
    )
    header = bytes((envelope.ENVELOPE_VERSION,)) + ephemeral_public
    ciphertext: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(inner, header, nonce, key)
    return header + ciphertext


@functools.cache
def corpus() -> Corpus:
    """The corpus, built once per process."""
    return Corpus()
