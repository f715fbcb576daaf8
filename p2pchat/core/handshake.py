"""The direct channel's cryptography: a mutually authenticated handshake and the transport ciphers it yields.

Sans-I/O, in the h11 style: a :class:`Handshake` takes handshake messages (stream frame payloads) and returns
the messages to send; when it completes, its :attr:`~Handshake.result` holds the peer's identity and a
:class:`SendCipher`/:class:`ReceiveCipher` pair.  Nothing here reads a clock or a random source: ephemeral keys
come from the caller's ``random_bytes``.  Whatever the bytes, the only exception remote input can raise is
:class:`~p2pchat.errors.ProtocolError`.

The handshake is shaped like Noise XX, with Ed25519 signatures in place of static Diffie-Hellman (as in
SIGMA-I): both identities are authenticated, both are hidden from passive observers, and the transport keys
come from ephemeral keys only, so they are forward secret.  Three messages::

    1. initiator -> responder   [version, 1, e_i]
    2. responder -> initiator   [version, 2, e_r, AEAD_k2(id_r || sig_r, ad=h2)]
    3. initiator -> responder   [version, 3, AEAD_k3(id_i || sig_i, ad=h3)]

``h`` is a running SHA-256 transcript hash: it starts as ``SHA-256(PROTOCOL_NAME)`` and absorbs message 1,
then ``e_r`` (``h2``), then the responder's identity and message 2 (``h3``), then the initiator's identity and
message 3 (``h4``).  ``k2``/``k3`` come from HKDF over the ephemeral-ephemeral X25519 secret salted with ``h2``;
each side signs a role label and the hash of the transcript so far with its own identity key, so

* a peer that claims someone else's identity key fails: it cannot make the signature;
* a replayed or spliced message fails: every session has fresh ephemerals, and every byte of every message is in
  the transcript that the AEAD tags and the signatures cover;
* a signature made as responder cannot be passed off as an initiator's (distinct role labels);
* the initiator reveals its identity only to a responder it has authenticated, under the handshake key.

The transport keys (one per direction) come from HKDF over the same DH secret salted with the final hash
``h4``, which also identifies the session (:attr:`HandshakeResult.handshake_hash`).  Once they exist, the
ephemeral secret and the DH output are dropped.

Transport frames are ``counter (8 bytes, big-endian) || XChaCha20-Poly1305(type || payload)``, the counter
being the nonce.  Each direction has its own key and counter; a receiver accepts only the counter it expects
next, so a replayed, reordered, dropped or forged frame is a :class:`~p2pchat.errors.ProtocolError` and ends
the channel.  The counter travels in the clear, though both sides could compute it, so that a refusal can say
what happened (a replay, a gap) instead of only "failed authentication"; eight bytes a frame is cheap for that.
A close frame (type 1) authenticates the end of the channel, so an attacker who cuts the TCP stream cannot make a
truncated conversation look complete.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final, TypeVar

import nacl.bindings
import nacl.exceptions

from p2pchat.core.framing import MAX_STREAM_FRAME, encode_struct, unpack_strict
from p2pchat.core.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PublicIdentity
from p2pchat.core.kdf import hkdf_expand, hkdf_extract
from p2pchat.core.schema import Bytes, Int, WireStruct, from_wire, max_wire_size, wire_struct
from p2pchat.errors import ProtocolError

__all__ = [
    "CHANNEL_VERSION",
    "EPHEMERAL_KEY_BYTES",
    "FRAME_OVERHEAD",
    "MAX_CHANNEL_FRAME",
    "MAX_CHANNEL_WIRE_FRAME",
    "MAX_FRAMES_PER_CHANNEL",
    "MAX_HANDSHAKE_MESSAGE",
    "PROTOCOL_NAME",
    "Handshake",
    "HandshakeResult",
    "InitiatorAuth",
    "InitiatorHello",
    "ReceiveCipher",
    "ResponderAuth",
    "SendCipher",
]

PROTOCOL_NAME: Final = b"p2pchat-channel-v1"
"""Seeds the transcript hash and prefixes every key-derivation label and signed message (domain separation)."""

CHANNEL_VERSION: Final = 1
"""The first field of every handshake message; another version is refused with the version named."""

MAX_HANDSHAKE_MESSAGE: Final = 256
"""Largest handshake message in bytes (the largest we send is 151), checked before anything is unpacked."""

EPHEMERAL_KEY_BYTES: Final = 32
"""Size of an X25519 public or secret key."""

MAX_CHANNEL_FRAME: Final = 66 * 1024
"""Largest payload of one transport frame: a 64 KiB message plus the wrapper of the layer above."""

MAX_FRAMES_PER_CHANNEL: Final = 1 << 64
"""Frames one direction of a channel may carry.

The counter travels in 8 bytes and is compared for equality with the next expected value, so it can take each
of its 2**64 values once and never wraps: sealing frame number 2**64 raises instead.  (At a million frames a
second that is half a million years, so there is no re-keying.)"""

_KEY_BYTES: Final = 32
_TAG_BYTES: Final = 16
_COUNTER_BYTES: Final = 8
_TYPE_BYTES: Final = 1
_NONCE_PAD: Final = bytes(24 - _COUNTER_BYTES)
_HANDSHAKE_NONCE: Final = bytes(24)  # each handshake key seals exactly one message

FRAME_OVERHEAD: Final = _COUNTER_BYTES + _TYPE_BYTES + _TAG_BYTES
"""Bytes a transport frame adds to its payload: counter, type and authentication tag."""

MAX_CHANNEL_WIRE_FRAME: Final = MAX_CHANNEL_FRAME + FRAME_OVERHEAD
"""Largest transport frame on the wire; a larger one is refused before it is decrypted."""

assert MAX_CHANNEL_WIRE_FRAME <= MAX_STREAM_FRAME, "a channel frame must fit one stream frame"

_PROOF_BYTES: Final = PUBLIC_KEY_BYTES + SIGNATURE_BYTES
_SEALED_PROOF_BYTES: Final = _PROOF_BYTES + _TAG_BYTES

_FRAME_DATA: Final = 0
_FRAME_CLOSE: Final = 1

_ROLE_INITIATOR: Final = b"initiator"
_ROLE_RESPONDER: Final = b"responder"

_S = TypeVar("_S", bound="_HandshakeMessage")


# --- wire structs --------------------------------------------------------------------------------------------


class _HandshakeMessage(WireStruct):
    __slots__ = ()

    STEP: ClassVar[int]


@wire_struct
@dataclass(frozen=True, slots=True)
class InitiatorHello(_HandshakeMessage):
    """Handshake message 1, sent in the clear: the initiator's ephemeral X25519 key."""

    STEP: ClassVar[int] = 1

    version: Annotated[int, Int(min_value=CHANNEL_VERSION, max_value=CHANNEL_VERSION)]
    step: Annotated[int, Int(min_value=1, max_value=1)]
    ephemeral: Annotated[bytes, Bytes(min_len=EPHEMERAL_KEY_BYTES, max_len=EPHEMERAL_KEY_BYTES)]


@wire_struct
@dataclass(frozen=True, slots=True)
class ResponderAuth(_HandshakeMessage):
    """Handshake message 2: the responder's ephemeral key, and its identity key and signature, sealed."""

    STEP: ClassVar[int] = 2

    version: Annotated[int, Int(min_value=CHANNEL_VERSION, max_value=CHANNEL_VERSION)]
    step: Annotated[int, Int(min_value=2, max_value=2)]
    ephemeral: Annotated[bytes, Bytes(min_len=EPHEMERAL_KEY_BYTES, max_len=EPHEMERAL_KEY_BYTES)]
    sealed: Annotated[bytes, Bytes(min_len=_SEALED_PROOF_BYTES, max_len=_SEALED_PROOF_BYTES)]


@wire_struct
@dataclass(frozen=True, slots=True)
class InitiatorAuth(_HandshakeMessage):
    """Handshake message 3: the initiator's identity key and signature, sealed."""

    STEP: ClassVar[int] = 3

    version: Annotated[int, Int(min_value=CHANNEL_VERSION, max_value=CHANNEL_VERSION)]
    step: Annotated[int, Int(min_value=3, max_value=3)]
    sealed: Annotated[bytes, Bytes(min_len=_SEALED_PROOF_BYTES, max_len=_SEALED_PROOF_BYTES)]


assert max(max_wire_size(cls) for cls in (InitiatorHello, ResponderAuth, InitiatorAuth)) <= MAX_HANDSHAKE_MESSAGE


def _decode_message(cls: type[_S], data: bytes) -> _S:
    """Decode handshake message *cls*; version and step are checked first so their errors say what is wrong."""
    name = cls.__name__
    if len(data) > MAX_HANDSHAKE_MESSAGE:
        raise ProtocolError(f"{name}: {len(data)} bytes is over the {MAX_HANDSHAKE_MESSAGE}-byte handshake limit")
    wire = unpack_strict(data)
    if type(wire) is not list or len(wire) < 2:
        raise ProtocolError(f"{name}: a handshake message is an array of at least version and step")
    version, step = wire[0], wire[1]
    if type(version) is not int or version != CHANNEL_VERSION:
        raise ProtocolError(f"unsupported channel protocol version {version!r} (this node speaks {CHANNEL_VERSION})")
    if type(step) is not int or step != cls.STEP:
        raise ProtocolError(f"expected handshake message {cls.STEP} ({name}), got step {step!r}")
    return from_wire(cls, wire)


# --- primitives ------------------------------------------------------------------------------------------------


def _hash(*parts: bytes) -> bytes:
    # Every part but the last has a fixed length, so the concatenation is unambiguous.
    return hashlib.sha256(b"".join(parts)).digest()


def _x25519(secret: bytes, public: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_scalarmult(secret, public)
    except nacl.exceptions.CryptoError:
        # libsodium refuses an all-zero result: the peer sent a low-order point, which would make the shared
        # secret predictable.
        raise ProtocolError("peer's ephemeral key is a low-order point") from None


def _seal(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes | None) -> bytes:
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def _open(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes | None, what: str) -> bytes:
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except nacl.exceptions.CryptoError:
        raise ProtocolError(f"{what} failed authentication") from None


def _signed_message(role: bytes, transcript: bytes, signer_key: bytes) -> bytes:
    """What a side signs: protocol name, its role, and the hash of the transcript so far with its own key."""
    return PROTOCOL_NAME + b" " + role + b" signature\x00" + _hash(transcript, signer_key)


# --- transport ------------------------------------------------------------------------------------------------


def _nonce(counter: int) -> bytes:
    return _NONCE_PAD + counter.to_bytes(_COUNTER_BYTES, "big")


class SendCipher:
    """Seals the frames of one direction of a channel, numbering them 0, 1, 2, ..."""

    __slots__ = ("_closed", "_key", "_next")

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError(f"a transport key is {_KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self._next = 0
        self._closed = False

    @property
    def frames_sent(self) -> int:
        """Frames sealed so far (the close frame included)."""
        return self._next

    @property
    def closed(self) -> bool:
        """Whether the close frame has been sealed; nothing can be sealed after it."""
        return self._closed

    def seal(self, payload: bytes) -> bytes:
        """The next data frame carrying *payload*; :class:`ValueError` if over :data:`MAX_CHANNEL_FRAME`."""
        if len(payload) > MAX_CHANNEL_FRAME:
            raise ValueError(f"a channel frame carries at most {MAX_CHANNEL_FRAME} bytes, got {len(payload)}")
        return self._seal(_FRAME_DATA, payload)

    def seal_close(self) -> bytes:
        """The close frame: tells the peer, authenticated, that nothing follows."""
        frame = self._seal(_FRAME_CLOSE, b"")
        self._closed = True
        return frame

    def _seal(self, frame_type: int, payload: bytes) -> bytes:
        if self._closed:
            raise RuntimeError("the close frame was sent; nothing can follow it")
        counter = self._next
        if counter >= MAX_FRAMES_PER_CHANNEL:
            raise RuntimeError(f"this channel has sent {MAX_FRAMES_PER_CHANNEL} frames; open a new one")
        self._next = counter + 1
        header = counter.to_bytes(_COUNTER_BYTES, "big")
        return header + _seal(self._key, _nonce(counter), bytes((frame_type,)) + payload, None)


class ReceiveCipher:
    """Opens the frames of one direction of a channel, accepting only the next counter in sequence.

    After a :class:`~p2pchat.errors.ProtocolError` the cipher is broken for good (every later call raises it
    again): a frame was lost, replayed, reordered or forged, and the channel cannot be trusted to continue.
    """

    __slots__ = ("_closed", "_error", "_key", "_next")

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError(f"a transport key is {_KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self._next = 0
        self._closed = False
        self._error: str | None = None

    @property
    def frames_received(self) -> int:
        """Frames opened so far (the close frame included)."""
        return self._next

    @property
    def closed(self) -> bool:
        """Whether the peer's close frame has been opened."""
        return self._closed

    def open(self, frame: bytes) -> bytes | None:
        """The payload of *frame*, or None if it is the peer's close frame; :class:`ProtocolError` if invalid."""
        if self._error is not None:
            raise ProtocolError(self._error)
        try:
            return self._open(frame)
        except ProtocolError as exc:
            self._error = f"channel ended by an earlier bad frame: {exc}"
            raise

    def _open(self, frame: bytes) -> bytes | None:
        if self._closed:
            raise ProtocolError("frame after the peer's close frame")
        size = len(frame)
        if size < FRAME_OVERHEAD:
            raise ProtocolError(f"channel frame of {size} bytes is shorter than its {FRAME_OVERHEAD}-byte overhead")
        if size > MAX_CHANNEL_WIRE_FRAME:
            raise ProtocolError(f"channel frame of {size} bytes is over the {MAX_CHANNEL_WIRE_FRAME}-byte limit")
        expected = self._next
        if expected >= MAX_FRAMES_PER_CHANNEL:
            raise ProtocolError(f"peer sent more than {MAX_FRAMES_PER_CHANNEL} frames on one channel")
        counter = int.from_bytes(frame[:_COUNTER_BYTES], "big")
        if counter < expected:
            raise ProtocolError(f"replayed or reordered frame: counter {counter}, expected {expected}")
        if counter > expected:
            raise ProtocolError(f"frame counter {counter} skips ahead of {expected}: frames lost or reordered")
        plaintext = _open(self._key, _nonce(counter), frame[_COUNTER_BYTES:], None, f"channel frame {counter}")
        self._next = expected + 1
        frame_type = plaintext[0]
        if frame_type == _FRAME_DATA:
            return plaintext[_TYPE_BYTES:]
        if frame_type == _FRAME_CLOSE and len(plaintext) == _TYPE_BYTES:
            self._closed = True
            return None
        raise ProtocolError(f"unknown channel frame type {frame_type} ({len(plaintext) - 1}-byte body)")


# --- handshake ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """What a completed handshake yields: who the peer is, and the ciphers of both directions."""

    peer: PublicIdentity
    """The peer's identity, proved by its signature over this session's transcript."""

    sender: SendCipher
    """Seals what this side sends."""

    receiver: ReceiveCipher
    """Opens what the peer sends."""

    handshake_hash: bytes
    """The final transcript hash: the same on both sides, different for every session."""


class _State(enum.Enum):
    START = enum.auto()
    WAIT_RESPONDER_AUTH = enum.auto()  # initiator, message 1 sent
    WAIT_INITIATOR_HELLO = enum.auto()  # responder
    WAIT_INITIATOR_AUTH = enum.auto()  # responder, message 2 sent
    DONE = enum.auto()
    FAILED = enum.auto()


class Handshake:
    """One side of a channel handshake (see the module docstring for the protocol).

    Drive it like this, with each message in its own stream frame::

        handshake = Handshake(identity, random_bytes, initiator=True)
        outgoing = handshake.start()  # the initiator's first message; None for the responder
        while True:
            if outgoing is not None:
                send(outgoing)
            if handshake.result is not None:
                break
            outgoing = handshake.receive(next_message())

    :meth:`receive` raises :class:`~p2pchat.errors.ProtocolError` for any bad message, after which the handshake
    has failed for good.  Calling a method in the wrong state is a :class:`RuntimeError` (a bug of the caller).
    """

    __slots__ = (
        "_ee",
        "_ephemeral_public",
        "_ephemeral_secret",
        "_expected_peer",
        "_identity",
        "_initiator",
        "_initiator_key",
        "_result",
        "_state",
        "_transcript",
    )

    def __init__(
        self,
        identity: Identity,
        random_bytes: Callable[[int], bytes],
        *,
        initiator: bool,
        expected_peer: bytes | None = None,
    ) -> None:
        if expected_peer is not None and len(expected_peer) != PUBLIC_KEY_BYTES:
            raise ValueError(f"expected_peer must be a {PUBLIC_KEY_BYTES}-byte identity key")
        secret = random_bytes(EPHEMERAL_KEY_BYTES)
        if len(secret) != EPHEMERAL_KEY_BYTES:
            raise ValueError(f"random_bytes returned {len(secret)} bytes, not {EPHEMERAL_KEY_BYTES}")
        self._identity = identity
        self._initiator = initiator
        self._expected_peer = expected_peer
        self._ephemeral_secret: bytes | None = secret
        self._ephemeral_public = nacl.bindings.crypto_scalarmult_base(secret)
        self._ee: bytes | None = None
        self._initiator_key: bytes | None = None  # the key that seals message 3
        self._transcript = _hash(PROTOCOL_NAME)
        self._state = _State.START
        self._result: HandshakeResult | None = None

    @property
    def initiator(self) -> bool:
        """Whether this side opened the connection (and speaks first)."""
        return self._initiator

    @property
    def result(self) -> HandshakeResult | None:
        """The peer and the transport ciphers once the handshake is complete; None until then."""
        return self._result

    def start(self) -> bytes | None:
        """Begin: the initiator's first message, or None for the responder, which waits for it."""
        if self._state is not _State.START:
            raise RuntimeError("the handshake was already started")
        if not self._initiator:
            self._state = _State.WAIT_INITIATOR_HELLO
            return None
        message = encode_struct(InitiatorHello(CHANNEL_VERSION, InitiatorHello.STEP, self._ephemeral_public))
        self._transcript = _hash(self._transcript, message)
        self._state = _State.WAIT_RESPONDER_AUTH
        return message

    def receive(self, message: bytes) -> bytes | None:
        """Take the peer's next message; return the message to send in reply, if any.

        After the call, :attr:`result` is set if the handshake is complete.  The initiator completes on message 2
        (and must still send the returned message 3), the responder on message 3.
        """
        state = self._state
        try:
            if state is _State.WAIT_INITIATOR_HELLO:
                return self._receive_hello(message)
            if state is _State.WAIT_RESPONDER_AUTH:
                return self._receive_responder_auth(message)
            if state is _State.WAIT_INITIATOR_AUTH:
                self._receive_initiator_auth(message)
                return None
        except ProtocolError:
            self._fail()
            raise
        if state is _State.START:
            raise RuntimeError("call start() before receive()")
        raise RuntimeError(f"the handshake is over ({state.name.lower()}); it takes no more messages")

    # -- the steps

    def _receive_hello(self, message: bytes) -> bytes:
        hello = _decode_message(InitiatorHello, message)
        assert self._ephemeral_secret is not None
        h1 = _hash(self._transcript, message)
        h2 = _hash(h1, self._ephemeral_public)
        ee = _x25519(self._ephemeral_secret, hello.ephemeral)
        responder_key, initiator_key = self._handshake_keys(h2, ee)
        own_key = self._identity.public.key
        signature = self._identity.sign(_signed_message(_ROLE_RESPONDER, h2, own_key))
        sealed = _seal(responder_key, _HANDSHAKE_NONCE, own_key + signature, h2)
        reply = encode_struct(ResponderAuth(CHANNEL_VERSION, ResponderAuth.STEP, self._ephemeral_public, sealed))
        self._transcript = _hash(h2, own_key, reply)
        self._ee = ee
        self._initiator_key = initiator_key
        self._state = _State.WAIT_INITIATOR_AUTH
        return reply

    def _receive_responder_auth(self, message: bytes) -> bytes:
        auth = _decode_message(ResponderAuth, message)
        assert self._ephemeral_secret is not None
        h2 = _hash(self._transcript, auth.ephemeral)
        ee = _x25519(self._ephemeral_secret, auth.ephemeral)
        responder_key, initiator_key = self._handshake_keys(h2, ee)
        proof = _open(responder_key, _HANDSHAKE_NONCE, auth.sealed, h2, "responder's handshake message")
        peer = self._check_proof(proof, _ROLE_RESPONDER, h2)
        h3 = _hash(h2, peer.key, message)
        own_key = self._identity.public.key
        signature = self._identity.sign(_signed_message(_ROLE_INITIATOR, h3, own_key))
        sealed = _seal(initiator_key, _HANDSHAKE_NONCE, own_key + signature, h3)
        reply = encode_struct(InitiatorAuth(CHANNEL_VERSION, InitiatorAuth.STEP, sealed))
        self._finish(_hash(h3, own_key, reply), ee, peer)
        return reply

    def _receive_initiator_auth(self, message: bytes) -> None:
        auth = _decode_message(InitiatorAuth, message)
        assert self._initiator_key is not None and self._ee is not None
        h3 = self._transcript
        proof = _open(self._initiator_key, _HANDSHAKE_NONCE, auth.sealed, h3, "initiator's handshake message")
        peer = self._check_proof(proof, _ROLE_INITIATOR, h3)
        self._finish(_hash(h3, peer.key, message), self._ee, peer)

    # -- helpers

    @staticmethod
    def _handshake_keys(h2: bytes, ee: bytes) -> tuple[bytes, bytes]:
        """The keys sealing message 2 (responder) and message 3 (initiator)."""
        prk = hkdf_extract(salt=h2, ikm=ee)
        return (
            hkdf_expand(prk=prk, info=PROTOCOL_NAME + b" handshake responder", length=_KEY_BYTES),
            hkdf_expand(prk=prk, info=PROTOCOL_NAME + b" handshake initiator", length=_KEY_BYTES),
        )

    def _check_proof(self, proof: bytes, role: bytes, transcript: bytes) -> PublicIdentity:
        """The peer's identity from its decrypted key and signature, if the signature holds and it is expected."""
        key, signature = proof[:PUBLIC_KEY_BYTES], proof[PUBLIC_KEY_BYTES:]
        peer = PublicIdentity.from_key(key)
        expected = self._expected_peer
        if expected is not None and key != expected:
            raise ProtocolError(
                f"peer is {peer.address}, not the expected {PublicIdentity(expected).address}: wrong peer or an"
                " impersonation attempt"
            )
        if not peer.verify(_signed_message(role, transcript, key), signature):
            raise ProtocolError(
                f"the {role.decode()}'s signature does not verify: it does not hold the private key of"
                f" {peer.address}, or the handshake was tampered with"
            )
        return peer

    def _finish(self, final_hash: bytes, ee: bytes, peer: PublicIdentity) -> None:
        prk = hkdf_extract(salt=final_hash, ikm=ee)
        to_responder = hkdf_expand(
            prk=prk, info=PROTOCOL_NAME + b" transport initiator to responder", length=_KEY_BYTES
        )
        to_initiator = hkdf_expand(
            prk=prk, info=PROTOCOL_NAME + b" transport responder to initiator", length=_KEY_BYTES
        )
        if self._initiator:
            sender, receiver = SendCipher(to_responder), ReceiveCipher(to_initiator)
        else:
            sender, receiver = SendCipher(to_initiator), ReceiveCipher(to_responder)
        self._result = HandshakeResult(peer, sender, receiver, final_hash)
        self._transcript = final_hash
        self._state = _State.DONE
        self._erase()

    def _fail(self) -> None:
        self._state = _State.FAILED
        self._erase()

    def _erase(self) -> None:
        # Forward secrecy rests on the ephemeral secret and the DH output being gone once the transport keys
        # exist.  Python cannot scrub immutable bytes; dropping our references is the most it can do.
        self._ephemeral_secret = None
        self._ee = None
        self._initiator_key = None
