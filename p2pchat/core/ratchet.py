"""The Double Ratchet (Signal's specification, revision 1), sans-I/O and functional, on X25519 and XChaCha20-Poly1305.

After X3DH has given both sides a shared secret, the initiator (Alice) calls :func:`init_sender` with Bob's
signed prekey as his first ratchet key, and Bob calls :func:`init_receiver` with that prekey's key pair.  Bob
cannot send until he has received Alice's first message.  Then :func:`encrypt` and :func:`decrypt` do the rest.

Functional state
----------------

:class:`RatchetState` is immutable.  Every operation returns a *new* state and leaves the one it was given
untouched, so the caller can commit the new state in the same database transaction as the message it produced
or consumed, and a crash between the two loses nothing.  A :func:`decrypt` that fails (bad tag, forged header,
too many skipped messages, replay) raises :class:`~p2pchat.errors.ProtocolError` and the caller simply keeps the
state it had: a forgery can neither advance nor corrupt a session.

One rule follows for the sender: **never send a ciphertext before its new state is committed**, and never call
:func:`encrypt` twice on one state for different plaintexts.  The AEAD key and nonce derive from the message key
alone, so two plaintexts encrypted from the same state share a key and nonce, which breaks XChaCha20-Poly1305.
Commit the new state and the ciphertext (in the outbox) together, then send from the outbox.

Algorithms
----------

* DH: X25519 (``crypto_scalarmult``); a key pair is ``random_bytes(32)`` as the private scalar (libsodium
  clamps it) and its base-point multiple.  A peer key of small order (an all-zero shared secret) is refused.
* KDF_RK: HKDF-SHA256 (:func:`p2pchat.core.kdf.hkdf_sha256`, RFC 5869) with salt = root key, IKM = DH output,
  info = :data:`ROOT_KDF_INFO`, 64 bytes: the new root key and a chain key.
* KDF_CK: message key = HMAC-SHA256(chain key, 0x01), next chain key = HMAC-SHA256(chain key, 0x02).
* ENCRYPT: XChaCha20-Poly1305 (IETF), key and nonce = HKDF-SHA256 (zero salt, IKM = message key,
  info = :data:`MESSAGE_KDF_INFO`), 32 + 24 bytes.  Each message key encrypts one message, so a derived nonce
  is never reused and no random nonce is needed.  The associated data is ``len(AD) (8 bytes, big-endian) || AD
  || encode_header(header)``: the caller's AD (X3DH's ``IK_A || IK_B``, say) and the header, framed so that no
  two different (AD, header) pairs give the same bytes.

Headers are not encrypted (the spec's "header encryption" variant is not used): the envelope and the transport
are encrypted around them, and the AEAD authenticates them.  A header encodes canonically and
:func:`decode_header` refuses any other encoding, so the bytes on the wire are exactly those authenticated.

Limits
------

Out-of-order and lost messages are handled by storing skipped message keys, bounded in the manner of libsignal:
:data:`MAX_SKIP` keys at most in one jump of one chain, :data:`MAX_SKIPPED_KEYS` stored across chains (oldest
dropped first).  A message whose key was dropped, or already used, cannot be decrypted: a replay is refused.
"""

from __future__ import annotations

import dataclasses
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Final

import nacl.bindings
import nacl.exceptions

from p2pchat.core.framing import decode_struct, encode_struct
from p2pchat.core.kdf import hkdf_sha256
from p2pchat.core.schema import (
    Bytes,
    Int,
    List,
    Optional,
    Struct,
    WireStruct,
    max_wire_size,
    to_wire,
    wire_struct,
)
from p2pchat.errors import ProtocolError

__all__ = [
    "KEY_BYTES",
    "MAX_CHAIN_LENGTH",
    "MAX_CIPHERTEXT_BYTES",
    "MAX_ENCODED_HEADER_BYTES",
    "MAX_ENCODED_STATE_BYTES",
    "MAX_PLAINTEXT_BYTES",
    "MAX_SKIP",
    "MAX_SKIPPED_KEYS",
    "MESSAGE_KDF_INFO",
    "ROOT_KDF_INFO",
    "STATE_VERSION",
    "TAG_BYTES",
    "Header",
    "RatchetState",
    "SkippedKey",
    "decode_header",
    "decode_state",
    "decrypt",
    "encode_header",
    "encode_state",
    "encrypt",
    "init_receiver",
    "init_sender",
]

# --- constants and limits ---------------------------------------------------------------------------------------

KEY_BYTES: Final = 32
"""Size of every key here: X25519 private and public keys, root, chain and message keys."""

TAG_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
"""Size of the Poly1305 tag each ciphertext carries on top of its plaintext."""

ROOT_KDF_INFO: Final = b"p2pchat-ratchet-rk"
"""HKDF info of KDF_RK: separates root-chain derivations from every other use of HKDF."""

MESSAGE_KDF_INFO: Final = b"p2pchat-ratchet-msg"
"""HKDF info turning a message key into an AEAD key and nonce."""


MAX_PLAINTEXT_BYTES: Final = 66 * 1024
"""Largest plaintext :func:`encrypt` takes: a 64 KiB message plus 2 KiB for its msgpack wrapper.

The ciphertext, header and envelope then still fit one 128 KiB stream frame.
"""

MAX_CIPHERTEXT_BYTES: Final = MAX_PLAINTEXT_BYTES + TAG_BYTES
"""Largest ciphertext :func:`decrypt` accepts; a longer one is refused before any key is derived."""

MAX_SKIP: Final = 2000
"""Most message keys one :func:`decrypt` derives and stores in one jump of one chain.

A header announcing a message further ahead (or a previous chain longer than that, by ``pn``) is refused.  It
bounds the work a single message can make us do (at most ``2 * MAX_SKIP`` chain steps: the rest of the old chain
and the start of the new one) before its tag is even checked.  libsignal allows 25,000 forward jumps, for devices
offline for months behind a server queue; our outbox resends until acknowledged, so a gap in a chain is messages
lost for good or still in flight, and 2,000 unacknowledged messages in one chain is far beyond a conversation.
It equals :data:`MAX_SKIPPED_KEYS`, so one jump within one chain never evicts its own keys.
"""

MAX_SKIPPED_KEYS: Final = 2000
"""Most skipped message keys stored across all chains (libsignal's MAX_MESSAGE_KEYS); the oldest go first.

Each costs about 75 bytes of encoded state, which the caller rewrites on every message: 2,000 keep the state
under 145 KiB in the worst case (:data:`MAX_ENCODED_STATE_BYTES`), and about 200 bytes in the usual case, with
none stored.
"""

MAX_CHAIN_LENGTH: Final = 1 << 32
"""Most messages in one sending chain: header numbers are below it (a 32-bit counter, as libsignal's).

A sender whose chain is full must wait for a reply (a DH ratchet step) to send again; at one message a second
that is 136 years of silence from the peer.
"""

STATE_VERSION: Final = 1
"""First byte of an encoded :class:`RatchetState`; a state of another version is refused."""

_U64: Final = struct.Struct(">Q")
_MESSAGE_KEY_CONSTANT: Final = b"\x01"
_CHAIN_KEY_CONSTANT: Final = b"\x02"
_NONCE_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_AEAD_KEY_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES

# --- schema -----------------------------------------------------------------------------------------------------

_Key = Annotated[bytes, Bytes(min_len=KEY_BYTES, max_len=KEY_BYTES)]
_OptionalKey = Annotated[bytes | None, Optional(Bytes(min_len=KEY_BYTES, max_len=KEY_BYTES))]
_MessageNumber = Annotated[int, Int(min_value=0, max_value=MAX_CHAIN_LENGTH - 1)]
_Count = Annotated[int, Int(min_value=0, max_value=MAX_CHAIN_LENGTH)]


@wire_struct
@dataclass(frozen=True, slots=True)
class Header(WireStruct):
    """The cleartext header of a ratchet message: the sender's ratchet key, its previous chain's length, and the
    message's number in the current chain.

    Not encrypted: the envelope and transport are encrypted around it, and the AEAD authenticates it.
    """

    dh: _Key
    pn: _Count
    n: _MessageNumber


@wire_struct
@dataclass(frozen=True, slots=True)
class SkippedKey(WireStruct):
    """A stored key of a message not yet received: message ``n`` of the chain of the peer's ratchet key ``dh``."""

    dh: _Key
    n: _MessageNumber
    message_key: _Key = dataclasses.field(repr=False)


@wire_struct
@dataclass(frozen=True, slots=True)
class RatchetState(WireStruct):
    """One side of a Double Ratchet session; immutable (operations return a new state).

    Field names follow the specification.  ``dhr`` is None until the peer's ratchet key is known (Bob before the
    first message), ``cks`` until we may send (Bob again), ``ckr`` until we have received (Alice).  ``skipped``
    holds the keys of messages not yet received, oldest first.  Secrets are left out of the repr, which may end
    up in logs.
    """

    dhs_private: _Key = dataclasses.field(repr=False)
    dhs_public: _Key
    dhr: _OptionalKey
    rk: _Key = dataclasses.field(repr=False)
    cks: _OptionalKey = dataclasses.field(repr=False)
    ckr: _OptionalKey = dataclasses.field(repr=False)
    ns: _Count
    nr: _Count
    pn: _Count
    skipped: Annotated[tuple[SkippedKey, ...], List(item=Struct(SkippedKey), max_items=MAX_SKIPPED_KEYS)] = (
        dataclasses.field(repr=False)
    )


MAX_ENCODED_HEADER_BYTES: Final = max_wire_size(Header)
"""Largest encoded :class:`Header`; :func:`decode_header` refuses anything longer before unpacking."""

MAX_ENCODED_STATE_BYTES: Final = 1 + max_wire_size(RatchetState)
"""Largest encoded :class:`RatchetState` (version byte included); :func:`decode_state` refuses anything longer."""


# --- primitives -------------------------------------------------------------------------------------------------


def _dh(private: bytes, public: bytes) -> bytes:
    """X25519; a peer key of small order gives an all-zero secret, which libsodium refuses and so do we."""
    try:
        return nacl.bindings.crypto_scalarmult(private, public)
    except nacl.exceptions.CryptoError:
        raise ProtocolError("peer ratchet key is of small order (no shared secret)") from None


def _generate_key_pair(random_bytes: Callable[[int], bytes]) -> tuple[bytes, bytes]:
    private = random_bytes(KEY_BYTES)
    if type(private) is not bytes or len(private) != KEY_BYTES:
        raise ValueError(f"random_bytes({KEY_BYTES}) must return {KEY_BYTES} bytes")
    return private, nacl.bindings.crypto_scalarmult_base(private)


def _kdf_rk(root_key: bytes, dh_output: bytes) -> tuple[bytes, bytes]:
    """KDF_RK: (new root key, new chain key)."""
    okm = hkdf_sha256(salt=root_key, ikm=dh_output, info=ROOT_KDF_INFO, length=2 * KEY_BYTES)
    return okm[:KEY_BYTES], okm[KEY_BYTES:]


def _kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """KDF_CK: (next chain key, message key)."""
    return (
        hmac.digest(chain_key, _CHAIN_KEY_CONSTANT, "sha256"),
        hmac.digest(chain_key, _MESSAGE_KEY_CONSTANT, "sha256"),
    )


def _aead_key_and_nonce(message_key: bytes) -> tuple[bytes, bytes]:
    okm = hkdf_sha256(salt=b"", ikm=message_key, info=MESSAGE_KDF_INFO, length=_AEAD_KEY_BYTES + _NONCE_BYTES)
    return okm[:_AEAD_KEY_BYTES], okm[_AEAD_KEY_BYTES:]


def _associated_data(associated_data: bytes, header: Header) -> bytes:
    return _U64.pack(len(associated_data)) + associated_data + encode_header(header)


def _open(message_key: bytes, header: Header, ciphertext: bytes, associated_data: bytes) -> bytes:
    key, nonce = _aead_key_and_nonce(message_key)
    try:
        plaintext: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext, _associated_data(associated_data, header), nonce, key
        )
    except nacl.exceptions.CryptoError:
        raise ProtocolError("ratchet message does not authenticate") from None
    return plaintext


# --- headers ----------------------------------------------------------------------------------------------------


def encode_header(header: Header) -> bytes:
    """The canonical msgpack bytes of *header* (at most :data:`MAX_ENCODED_HEADER_BYTES`); :class:`ValueError`."""
    return encode_struct(header)


def decode_header(data: bytes) -> Header:
    """Decode a header; :class:`ProtocolError` for anything but the canonical encoding of a valid header.

    msgpack allows several encodings of one value (an int in a wider form than needed); only the one
    :func:`encode_header` produces is accepted, so the authenticated bytes are exactly the bytes received.
    """
    if type(data) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_ENCODED_HEADER_BYTES:
        raise ProtocolError(f"ratchet header of {len(data)} bytes is over the {MAX_ENCODED_HEADER_BYTES}-byte limit")
    header = decode_struct(Header, data)
    if encode_header(header) != data:
        raise ProtocolError("ratchet header is not canonically encoded")
    return header


def _checked_header(header: object) -> Header:
    """*header* if it is a valid :class:`Header`; it may have been built by hand rather than decoded."""
    if type(header) is not Header:
        raise ProtocolError(f"expected a Header, got {type(header).__name__}")
    try:
        to_wire(header)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    return header


# --- state persistence ------------------------------------------------------------------------------------------


def encode_state(state: RatchetState) -> bytes:
    """The bytes to persist *state* as (at most :data:`MAX_ENCODED_STATE_BYTES`): version byte, then msgpack.

    They hold every secret of the session: store them as carefully as the identity key.
    """
    return bytes((STATE_VERSION,)) + encode_struct(state)


def decode_state(data: bytes) -> RatchetState:
    """Decode a persisted state; :class:`ProtocolError` if it is malformed, of another version or inconsistent.

    Beyond the field checks, the state must be one the ratchet can reach: the public ratchet key is the private
    one's; the peer's key and a sending chain come together (with no chains nor counts before them); without a
    receiving chain nothing was received, skipped or ratcheted; no skipped key appears twice.
    """
    if type(data) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    if not 1 < len(data) <= MAX_ENCODED_STATE_BYTES:
        raise ProtocolError(f"ratchet state of {len(data)} bytes, expected 2..{MAX_ENCODED_STATE_BYTES}")
    if data[0] != STATE_VERSION:
        raise ProtocolError(f"ratchet state version {data[0]} is not {STATE_VERSION}")
    state = decode_struct(RatchetState, data[1:])
    if nacl.bindings.crypto_scalarmult_base(state.dhs_private) != state.dhs_public:
        raise ProtocolError("ratchet state: public key does not match the private key")
    if state.dhr is None:
        if state.cks is not None or state.ckr is not None or state.ns:
            raise ProtocolError("ratchet state: chains or counts without the peer's ratchet key")
    elif state.cks is None:
        raise ProtocolError("ratchet state: the peer's ratchet key but no sending chain")
    if state.ckr is None and (state.nr or state.pn or state.skipped):
        raise ProtocolError("ratchet state: receive counts or skipped keys without a receiving chain")
    if len({(entry.dh, entry.n) for entry in state.skipped}) != len(state.skipped):
        raise ProtocolError("ratchet state: a skipped message key is stored twice")
    return state


# --- initialisation ---------------------------------------------------------------------------------------------


def _check_key_argument(value: bytes, name: str) -> None:
    if type(value) is not bytes or len(value) != KEY_BYTES:
        raise ValueError(f"{name} must be {KEY_BYTES} bytes")


def init_sender(
    shared_key: bytes, receiver_ratchet_public: bytes, random_bytes: Callable[[int], bytes]
) -> RatchetState:
    """Alice's state after X3DH: *shared_key* is its secret, *receiver_ratchet_public* Bob's signed prekey.

    :class:`ValueError` for arguments of the wrong size; :class:`ProtocolError` if Bob's key is of small order.
    """
    _check_key_argument(shared_key, "shared_key")
    _check_key_argument(receiver_ratchet_public, "receiver_ratchet_public")
    private, public = _generate_key_pair(random_bytes)
    root_key, sending_chain = _kdf_rk(shared_key, _dh(private, receiver_ratchet_public))
    return RatchetState(
        dhs_private=private,
        dhs_public=public,
        dhr=receiver_ratchet_public,
        rk=root_key,
        cks=sending_chain,
        ckr=None,
        ns=0,
        nr=0,
        pn=0,
        skipped=(),
    )


def init_receiver(shared_key: bytes, own_ratchet_private: bytes, own_ratchet_public: bytes) -> RatchetState:
    """Bob's state after X3DH: his signed prekey pair is his first ratchet key pair.

    Bob can :func:`decrypt` at once but :func:`encrypt` only after his first message has arrived.
    :class:`ValueError` for arguments of the wrong size or a public key that is not the private key's.
    """
    _check_key_argument(shared_key, "shared_key")
    _check_key_argument(own_ratchet_private, "own_ratchet_private")
    _check_key_argument(own_ratchet_public, "own_ratchet_public")
    if nacl.bindings.crypto_scalarmult_base(own_ratchet_private) != own_ratchet_public:
        raise ValueError("own_ratchet_public is not the public key of own_ratchet_private")
    return RatchetState(
        dhs_private=own_ratchet_private,
        dhs_public=own_ratchet_public,
        dhr=None,
        rk=shared_key,
        cks=None,
        ckr=None,
        ns=0,
        nr=0,
        pn=0,
        skipped=(),
    )


# --- messages ---------------------------------------------------------------------------------------------------


def encrypt(
    state: RatchetState, plaintext: bytes, associated_data: bytes, random_bytes: Callable[[int], bytes]
) -> tuple[RatchetState, Header, bytes]:
    """Encrypt *plaintext* as the next message of the sending chain: (new state, header, ciphertext).

    Deterministic: the key and nonce derive from the state, so *random_bytes* is not drawn from today; it is taken
    so both directions have one signature and a later version (padding, say) needs no change of API.  Commit the
    new state before the ciphertext leaves (see the module docstring).  :class:`ValueError` if we cannot send
    yet (Bob before his first message), the plaintext is over :data:`MAX_PLAINTEXT_BYTES`, or the chain is full
    (:data:`MAX_CHAIN_LENGTH`).
    """
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise ValueError(f"plaintext of {len(plaintext)} bytes is over the {MAX_PLAINTEXT_BYTES}-byte limit")
    if state.cks is None:
        raise ValueError("no sending chain yet: the receiver must decrypt the first message before it replies")
    if state.ns >= MAX_CHAIN_LENGTH:
        raise ValueError(f"sending chain holds {MAX_CHAIN_LENGTH} messages: wait for the peer's reply")
    chain_key, message_key = _kdf_ck(state.cks)
    header = Header(dh=state.dhs_public, pn=state.pn, n=state.ns)
    key, nonce = _aead_key_and_nonce(message_key)
    ciphertext: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, _associated_data(associated_data, header), nonce, key
    )
    return dataclasses.replace(state, cks=chain_key, ns=state.ns + 1), header, ciphertext


def _skip(chain_key: bytes, peer_key: bytes, start: int, until: int, out: list[SkippedKey]) -> bytes:
    """Store the keys of messages ``start..until-1`` of a receiving chain in *out*; return the chain key at *until*."""
    if until - start > MAX_SKIP:
        raise ProtocolError(f"ratchet message skips {until - start} messages, over the limit of {MAX_SKIP}")
    for number in range(start, until):
        chain_key, message_key = _kdf_ck(chain_key)
        out.append(SkippedKey(dh=peer_key, n=number, message_key=message_key))
    return chain_key


def decrypt(
    state: RatchetState,
    header: Header,
    ciphertext: bytes,
    associated_data: bytes,
    random_bytes: Callable[[int], bytes],
) -> tuple[RatchetState, bytes]:
    """Decrypt a message: (new state, plaintext).  *random_bytes* gives the new key pair of a DH ratchet step.

    :class:`ProtocolError` for any failure -- a ciphertext that does not authenticate, a header skipping more than
    :data:`MAX_SKIP` messages, a message already received or whose key was dropped, a small-order ratchet key --
    and then nothing has changed: the caller keeps *state*.
    """
    header = _checked_header(header)
    if type(ciphertext) is not bytes or not TAG_BYTES <= len(ciphertext) <= MAX_CIPHERTEXT_BYTES:
        size = len(ciphertext) if type(ciphertext) is bytes else type(ciphertext).__name__
        raise ProtocolError(f"ratchet ciphertext of {size} bytes, expected {TAG_BYTES}..{MAX_CIPHERTEXT_BYTES}")

    for index, entry in enumerate(state.skipped):
        if entry.dh == header.dh and entry.n == header.n:
            plaintext = _open(entry.message_key, header, ciphertext, associated_data)
            # The key is used up: removing it is what refuses a replay.
            return dataclasses.replace(state, skipped=state.skipped[:index] + state.skipped[index + 1 :]), plaintext

    skipped = list(state.skipped)
    if header.dh == state.dhr:
        if state.ckr is None:
            # Alice before any reply: the "peer key" is Bob's prekey, which never sends.
            raise ProtocolError("ratchet message on a chain we have no key for")
        if header.n < state.nr:
            raise ProtocolError(f"ratchet message {header.n} was already received (or its key dropped)")
        receiving_chain, nr = state.ckr, state.nr
        root_key, sending_chain, pn, ns = state.rk, state.cks, state.pn, state.ns
        dhs_private, dhs_public = state.dhs_private, state.dhs_public
    else:
        # A new ratchet key from the peer: keep the keys of its previous chain's missing messages, then step.
        if state.ckr is not None and state.dhr is not None:
            _skip(state.ckr, state.dhr, state.nr, header.pn, skipped)
        root_key, receiving_chain = _kdf_rk(state.rk, _dh(state.dhs_private, header.dh))
        dhs_private, dhs_public = _generate_key_pair(random_bytes)
        root_key, sending_chain = _kdf_rk(root_key, _dh(dhs_private, header.dh))
        nr, pn, ns = 0, state.ns, 0

    receiving_chain = _skip(receiving_chain, header.dh, nr, header.n, skipped)
    receiving_chain, message_key = _kdf_ck(receiving_chain)
    plaintext = _open(message_key, header, ciphertext, associated_data)
    new_state = RatchetState(
        dhs_private=dhs_private,
        dhs_public=dhs_public,
        dhr=header.dh,
        rk=root_key,
        cks=sending_chain,
        ckr=receiving_chain,
        ns=ns,
        nr=header.n + 1,
        pn=pn,
        # Oldest first, so the bound drops the keys of the messages least likely to come.
        skipped=tuple(skipped[-MAX_SKIPPED_KEYS:]),
    )
    return new_state, plaintext
