"""X3DH key agreement (Signal's specification, revision 1) on our Ed25519 identities, sans-I/O and functional.

Bob publishes a :class:`PrekeyBundle` (as a :attr:`~p2pchat.core.records.RecordKind.PREKEYS` record); Alice
fetches it, checks it with :func:`validate_bundle` and calls :func:`initiate`, which gives her the shared key, an
:class:`InitialHeader` to send with her first message and the associated data.  Bob feeds that header to
:func:`respond` with his private :class:`PrekeyState` and gets the same key and associated data back -- with a
*new* state from which the one-time prekey used is gone.  Both then start the Double Ratchet: Alice with Bob's
signed prekey as his first ratchet key, Bob with its key pair (:func:`signed_prekey_pair`).

Identity keys: Ed25519 converted, not XEdDSA
-------------------------------------------

Signal's identity keys are X25519 keys that sign with XEdDSA.  Ours are the Ed25519 keys a user already has (the
address, node id and safety number are all derived from it), so for the DH steps the identity key is converted
to X25519 with libsodium's ``crypto_sign_ed25519_pk_to_curve25519`` / ``crypto_sign_ed25519_sk_to_curve25519``
(the birational map from the Edwards to the Montgomery curve).  One key pair serves both purposes, the
conversion is a supported libsodium primitive rather than a signature scheme we would have to implement, and
the public conversion refuses keys of small order or outside the prime-order subgroup.  Using one key for
Ed25519 signatures and X25519 has been analysed as safe (Thormarker, "On using the same key pair for Ed25519
and an X25519 based KEM", 2021); every signature we make carries a context prefix in any case.

Algorithms
----------

* ``DH1 = DH(IK_A, SPK_B)``, ``DH2 = DH(EK_A, IK_B)``, ``DH3 = DH(EK_A, SPK_B)``, ``DH4 = DH(EK_A, OPK_B)`` when
  Bob's bundle offers a one-time prekey; an all-zero DH output (a low-order point) is refused.
* ``SK = HKDF-SHA256(IKM = F || DH1 || DH2 || DH3 [|| DH4], salt = 32 zero bytes, info = X3DH_INFO)``, 32 bytes,
  with ``F`` 32 0xFF bytes (:func:`p2pchat.core.kdf.hkdf_sha256`, RFC 5869).
* ``AD = IK_A || IK_B``: the two Ed25519 public keys, 64 bytes.

The bundle signature covers the whole bundle
--------------------------------------------

Signal signs only the signed prekey, because its server hands one-time prekeys out one at a time.  Our bundle is
published whole, so its signature covers every public field (:func:`bundle_message`)::

    SIGNED_PREKEY_CONTEXT || identity_key (32) || signed_prekey_id (4) || created_at (8) || signed_prekey (32) ||
    count (2) || count * (one-time prekey id (4) || one-time prekey (32))

(integers big-endian, unsigned).  ``created_at`` is signed so a replayed prekey cannot pass for a fresh one, and
the one-time prekeys are signed so a bundle is authentic on its own, outside the record that carries it.

What the caller must do
-----------------------

* Commit the state :func:`respond` returns in the same transaction as the session it opens -- and only once the
  first message has decrypted, or a forged header could burn one-time prekeys.  A one-time prekey that is gone
  from the state is refused for ever after.
* A header without a one-time prekey can be replayed (X3DH section 4.2): remember recent initial headers.
  :func:`respond` refuses non-canonical ephemeral keys, so a replay cannot hide behind other header bytes.
* Open the first message with the associated data :func:`respond` returns: the DH steps see the sender's key
  only in its X25519 form, which two Ed25519 keys share (they differ in the sign bit); the AD tells them apart.
* Everyone who fetched one bundle picks among the same one-time prekeys (at random, so two initiators collide
  with probability about 1/100).  The later of two is refused as "already used": an initiator that hears
  nothing back should start over with a freshly fetched bundle.
* Publish :func:`bundle_for` after every change to the state; call :func:`rotate_signed_prekey` and
  :func:`replenish` at start-up and periodically.

Private keys are Python ``bytes`` and cannot be wiped; they live as long as the objects that hold them.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Final, NamedTuple, TypeVar

import nacl.bindings
import nacl.exceptions

from p2pchat.core.framing import decode_struct, encode_struct
from p2pchat.core.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PublicIdentity
from p2pchat.core.kdf import hkdf_sha256
from p2pchat.core.records import CLOCK_SKEW_ALLOWANCE, MAX_MAILBOX_TTL, MAX_TIMESTAMP
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
    "ASSOCIATED_DATA_BYTES",
    "MAX_ENCODED_BUNDLE_BYTES",
    "MAX_ENCODED_HEADER_BYTES",
    "MAX_ENCODED_PREKEY_STATE_BYTES",
    "MAX_ONE_TIME_PREKEYS_PER_BUNDLE",
    "MAX_PREKEY_ID",
    "MAX_PREVIOUS_SIGNED_PREKEYS",
    "MAX_SIGNED_PREKEY_AGE",
    "ONE_TIME_PREKEY_TARGET",
    "SHARED_KEY_BYTES",
    "SIGNED_PREKEY_CONTEXT",
    "SIGNED_PREKEY_GRACE",
    "SIGNED_PREKEY_ROTATION",
    "X3DH_INFO",
    "X3DH_KDF_PADDING",
    "X25519_KEY_BYTES",
    "InitialHeader",
    "OneTimePrekey",
    "OneTimePrekeySecret",
    "PrekeyBundle",
    "PrekeyState",
    "RandomBytes",
    "SignedPrekeySecret",
    "X25519KeyPair",
    "bundle_for",
    "bundle_message",
    "decode_bundle",
    "decode_initial_header",
    "decode_prekey_state",
    "ed25519_to_x25519_public",
    "encode_bundle",
    "encode_initial_header",
    "encode_prekey_state",
    "identity_x25519_private",
    "initiate",
    "new_prekeys",
    "replenish",
    "respond",
    "rotate_signed_prekey",
    "signed_prekey_pair",
    "validate_bundle",
    "x25519_public",
    "x25519_shared",
]

_DAY: Final = 24 * 3600

# --- sizes and limits -------------------------------------------------------------------------------------------

X25519_KEY_BYTES: Final = 32
"""Size of an X25519 private or public key (and of a DH output)."""

SHARED_KEY_BYTES: Final = 32
"""Size of the X3DH shared key ``SK`` (the Double Ratchet's first root key)."""

ASSOCIATED_DATA_BYTES: Final = 2 * PUBLIC_KEY_BYTES
"""Size of the associated data ``IK_A || IK_B``."""


MAX_PREKEY_ID: Final = (1 << 32) - 1
"""Largest prekey id (signed and one-time ids count separately): four bytes in the signed layout.

Ids are never reused; at a hundred one-time prekeys a day they last a hundred thousand years, so running out is
an error (:class:`ValueError`), not a wrap-around.
"""

MAX_ONE_TIME_PREKEYS_PER_BUNDLE: Final = 100
"""Most one-time prekeys in a bundle (and in a :class:`PrekeyState`).

Signal's server keeps a hundred.  A full bundle encodes to about 4.2 KB (:data:`MAX_ENCODED_BUNDLE_BYTES`), far
below :data:`~p2pchat.core.records.MAX_VALUE_BYTES`, and a few DHT parts to fetch.
"""

ONE_TIME_PREKEY_TARGET: Final = MAX_ONE_TIME_PREKEYS_PER_BUNDLE
"""How many one-time prekeys :func:`replenish` tops the state up to by default: all a bundle can publish."""

SIGNED_PREKEY_ROTATION: Final = 7 * _DAY
"""Age at which :func:`rotate_signed_prekey` replaces the signed prekey (Signal rotates weekly too)."""

MAX_SIGNED_PREKEY_AGE: Final = 30 * _DAY + CLOCK_SKEW_ALLOWANCE
"""Oldest signed prekey :func:`validate_bundle` accepts: an owner who is away for three weeks past a missed
rotation stays reachable, while a prekey stolen or replayed from long ago is refused."""

SIGNED_PREKEY_GRACE: Final = MAX_MAILBOX_TTL + CLOCK_SKEW_ALLOWANCE
"""How long a retired signed prekey is kept and accepted by :func:`respond`.

An initial message sent to the signed prekey just before its rotation may wait in a DHT mailbox for the longest
mailbox lifetime before its recipient reads it; one skew allowance covers clocks that disagree.
"""

MAX_PREVIOUS_SIGNED_PREKEYS: Final = SIGNED_PREKEY_GRACE // SIGNED_PREKEY_ROTATION + 1
"""Most retired signed prekeys a state keeps: with rotations at least :data:`SIGNED_PREKEY_ROTATION` apart, at
most this many retire within one :data:`SIGNED_PREKEY_GRACE` (five).  Beyond it the oldest is dropped first."""

# --- domain separation ------------------------------------------------------------------------------------------

SIGNED_PREKEY_CONTEXT: Final = b"p2pchat-spk-v1\x00"
"""Prefix of the bundle's signed message, so a bundle signature is never valid as any other signature."""

X3DH_INFO: Final = b"p2pchat-x3dh-v1"
"""HKDF info of the X3DH shared key (the spec's application-specific ``info``)."""

X3DH_KDF_PADDING: Final = b"\xff" * 32
"""The spec's ``F``: 32 0xFF bytes before the DH outputs, so the IKM never starts like an X25519 output would in
another protocol (the spec's guard for XEdDSA; kept for conformance)."""

_BUNDLE_HEADER: Final = struct.Struct(f">{PUBLIC_KEY_BYTES}sIQ{X25519_KEY_BYTES}sH")
_BUNDLE_PREKEY: Final = struct.Struct(f">I{X25519_KEY_BYTES}s")
_INDEX_BYTES: Final = 8
_CURVE25519_P: Final = (1 << 255) - 19

RandomBytes = Callable[[int], bytes]
"""A source of secret random bytes (``os.urandom`` in production, a seeded generator in tests)."""

# --- wire structs -----------------------------------------------------------------------------------------------

_Ed25519Key = Annotated[bytes, Bytes(min_len=PUBLIC_KEY_BYTES, max_len=PUBLIC_KEY_BYTES)]
_X25519Key = Annotated[bytes, Bytes(min_len=X25519_KEY_BYTES, max_len=X25519_KEY_BYTES)]
_Signature = Annotated[bytes, Bytes(min_len=SIGNATURE_BYTES, max_len=SIGNATURE_BYTES)]
_Timestamp = Annotated[int, Int(min_value=0, max_value=MAX_TIMESTAMP)]
_PrekeyIdSpec = Int(min_value=0, max_value=MAX_PREKEY_ID)
_PrekeyId = Annotated[int, _PrekeyIdSpec]
# The next id to hand out may be one past the last usable one: that is how "ids exhausted" is recorded.
_NextPrekeyId = Annotated[int, Int(min_value=0, max_value=MAX_PREKEY_ID + 1)]


@wire_struct
@dataclass(frozen=True, slots=True)
class OneTimePrekey(WireStruct):
    """A one-time prekey as a bundle publishes it: its id and X25519 public key."""

    prekey_id: _PrekeyId
    public_key: _X25519Key


@wire_struct
@dataclass(frozen=True, slots=True)
class PrekeyBundle(WireStruct):
    """What a user publishes so others can start a session while the user is offline.

    ``signature`` is the identity key's Ed25519 signature of :func:`bundle_message` of the other fields;
    ``created_at`` (unix seconds) is when the signed prekey was made.
    """

    identity_key: _Ed25519Key
    signed_prekey_id: _PrekeyId
    signed_prekey: _X25519Key
    created_at: _Timestamp
    one_time_prekeys: Annotated[
        tuple[OneTimePrekey, ...], List(item=Struct(OneTimePrekey), max_items=MAX_ONE_TIME_PREKEYS_PER_BUNDLE)
    ]
    signature: _Signature


@wire_struct
@dataclass(frozen=True, slots=True)
class InitialHeader(WireStruct):
    """What the initiator sends with its first message so the responder can derive the same key.

    Not authenticated by itself: a tampered header gives the responder another key, and the first message's AEAD
    then fails.
    """

    sender_identity_key: _Ed25519Key
    ephemeral_key: _X25519Key
    signed_prekey_id: _PrekeyId
    one_time_prekey_id: Annotated[int | None, Optional(_PrekeyIdSpec)]


@wire_struct
@dataclass(frozen=True, slots=True)
class SignedPrekeySecret(WireStruct):
    """A signed prekey's private half, when it was made and (once replaced) when it was retired."""

    prekey_id: _PrekeyId
    private_key: _X25519Key = dataclasses.field(repr=False)
    created_at: _Timestamp
    retired_at: Annotated[int | None, Optional(Int(min_value=0, max_value=MAX_TIMESTAMP))]


@wire_struct
@dataclass(frozen=True, slots=True)
class OneTimePrekeySecret(WireStruct):
    """A one-time prekey's private half and its id."""

    prekey_id: _PrekeyId
    private_key: _X25519Key = dataclasses.field(repr=False)


@wire_struct
@dataclass(frozen=True, slots=True)
class PrekeyState(WireStruct):
    """The private prekeys of one identity; immutable: every operation returns a new state.

    ``current`` is the published signed prekey; ``previous`` the retired ones still accepted (oldest first);
    ``one_time_prekeys`` the unused one-time prekeys in increasing id order.  The ``next_*`` ids are the next to
    hand out, never reused.
    """

    identity_key: _Ed25519Key
    current: Annotated[SignedPrekeySecret, Struct(SignedPrekeySecret)]
    previous: Annotated[
        tuple[SignedPrekeySecret, ...], List(item=Struct(SignedPrekeySecret), max_items=MAX_PREVIOUS_SIGNED_PREKEYS)
    ]
    one_time_prekeys: Annotated[
        tuple[OneTimePrekeySecret, ...],
        List(item=Struct(OneTimePrekeySecret), max_items=MAX_ONE_TIME_PREKEYS_PER_BUNDLE),
    ]
    next_signed_prekey_id: _NextPrekeyId
    next_one_time_prekey_id: _NextPrekeyId


class X25519KeyPair(NamedTuple):
    """An X25519 key pair; unpacks as ``private, public``.  Its ``repr`` leaves the private key out (logs)."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"X25519KeyPair(public={self.public.hex()})"


MAX_ENCODED_BUNDLE_BYTES: Final = max_wire_size(PrekeyBundle)
"""Largest encoded :class:`PrekeyBundle`; :func:`decode_bundle` refuses anything longer before unpacking."""

MAX_ENCODED_HEADER_BYTES: Final = max_wire_size(InitialHeader)
"""Largest encoded :class:`InitialHeader`."""

MAX_ENCODED_PREKEY_STATE_BYTES: Final = max_wire_size(PrekeyState)
"""Largest encoded :class:`PrekeyState`."""

# --- primitives -------------------------------------------------------------------------------------------------


def x25519_public(private_key: bytes) -> bytes:
    """The X25519 public key of *private_key* (libsodium clamps the scalar)."""
    if type(private_key) is not bytes or len(private_key) != X25519_KEY_BYTES:
        raise ValueError(f"an X25519 private key is {X25519_KEY_BYTES} bytes")
    public: bytes = nacl.bindings.crypto_scalarmult_base(private_key)
    return public


def x25519_shared(private_key: bytes, public_key: bytes) -> bytes:
    """X25519 of our *private_key* and a peer's *public_key*; :class:`ProtocolError` for an all-zero output.

    An all-zero output means the peer's key is a point of small order: the "shared" secret would be known to
    everyone, so the exchange is refused (libsodium already reports it; the second check costs nothing).
    """
    try:
        shared: bytes = nacl.bindings.crypto_scalarmult(private_key, public_key)
    except nacl.exceptions.CryptoError:
        raise ProtocolError("X25519 with a low-order public key (all-zero output)") from None
    if hmac.compare_digest(shared, bytes(X25519_KEY_BYTES)):
        raise ProtocolError("X25519 with a low-order public key (all-zero output)")
    return shared


def _check_canonical_x25519(key: bytes, what: str) -> None:
    # X25519 ignores the top bit and reduces mod p, so 2 of every 2**256 encodings name one point: a replay
    # with the top bit flipped would derive the same key under other header bytes, and slip past a replay
    # cache keyed on them.  We only ever send canonical keys, so others are refused.
    if int.from_bytes(key, "little") >= _CURVE25519_P:
        raise ProtocolError(f"{what} is not a canonical X25519 public key")


def ed25519_to_x25519_public(key: bytes) -> bytes:
    """The X25519 public key of an Ed25519 public *key*; :class:`ProtocolError` if it is not a usable point.

    libsodium refuses keys that do not decode, are of small order, or lie outside the prime-order subgroup.
    """
    if type(key) is not bytes or len(key) != PUBLIC_KEY_BYTES:
        raise ProtocolError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes")
    try:
        converted: bytes = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(key)
    except nacl.exceptions.CryptoError:
        raise ProtocolError("Ed25519 public key is not a usable curve point") from None
    return converted


def identity_x25519_private(identity: Identity) -> bytes:
    """The X25519 private key of *identity* (libsodium's conversion of its Ed25519 secret key)."""
    converted: bytes = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(identity.seed + identity.public.key)
    return converted


def _draw(random_bytes: RandomBytes, count: int) -> bytes:
    data = random_bytes(count)
    if type(data) is not bytes or len(data) != count:
        raise ValueError(f"random_bytes({count}) returned something other than {count} bytes")
    return data


def _new_private_key(random_bytes: RandomBytes) -> bytes:
    return _draw(random_bytes, X25519_KEY_BYTES)


def _derive_shared_key(dh_outputs: Iterable[bytes]) -> bytes:
    return hkdf_sha256(salt=b"", ikm=X3DH_KDF_PADDING + b"".join(dh_outputs), info=X3DH_INFO, length=SHARED_KEY_BYTES)


# --- codec helpers ----------------------------------------------------------------------------------------------

_W = TypeVar("_W", bound=WireStruct)


def _decode(cls: type[_W], data: bytes, max_size: int) -> _W:
    """Decode exactly one msgpack value filling *data* into *cls*; :class:`ProtocolError` for anything else."""
    if type(data) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise ProtocolError(f"{cls.__name__} of {len(data)} bytes is over the {max_size}-byte limit")
    return decode_struct(cls, data)


def _recheck(obj: object, cls: type[WireStruct]) -> None:
    """Run the decoder's field checks on an object that may not have come through a decoder."""
    if type(obj) is not cls:
        raise ProtocolError(f"expected a {cls.__name__}, got {type(obj).__name__}")
    try:
        to_wire(obj)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


# --- bundles ----------------------------------------------------------------------------------------------------


def bundle_message(
    identity_key: bytes,
    signed_prekey_id: int,
    signed_prekey: bytes,
    created_at: int,
    one_time_prekeys: tuple[OneTimePrekey, ...],
) -> bytes:
    """The exact bytes a bundle's signature covers (see the module docstring for the layout)."""
    header = _BUNDLE_HEADER.pack(identity_key, signed_prekey_id, created_at, signed_prekey, len(one_time_prekeys))
    body = b"".join(_BUNDLE_PREKEY.pack(key.prekey_id, key.public_key) for key in one_time_prekeys)
    return SIGNED_PREKEY_CONTEXT + header + body


def _bundle_signature_valid(bundle: PrekeyBundle) -> bool:
    message = bundle_message(
        bundle.identity_key, bundle.signed_prekey_id, bundle.signed_prekey, bundle.created_at, bundle.one_time_prekeys
    )
    return PublicIdentity(bundle.identity_key).verify(message, bundle.signature)


def _check_bundle(bundle: PrekeyBundle) -> None:
    """The checks that need no clock and no expected owner: fields, distinct ids, signature (last: the dear one)."""
    _recheck(bundle, PrekeyBundle)
    ids = [key.prekey_id for key in bundle.one_time_prekeys]
    if len(set(ids)) != len(ids):
        raise ProtocolError("prekey bundle lists a one-time prekey id twice")
    if not _bundle_signature_valid(bundle):
        raise ProtocolError("prekey bundle signature does not verify")


def validate_bundle(bundle: PrekeyBundle, expected_identity_key: bytes, now: float) -> None:
    """Check a bundle fetched for the user whose identity key is *expected_identity_key*, at *now*.

    :class:`ProtocolError` for: a field out of range, another identity key, a signed prekey made more than
    :data:`~p2pchat.core.records.CLOCK_SKEW_ALLOWANCE` in the future or more than :data:`MAX_SIGNED_PREKEY_AGE`
    ago, a repeated one-time prekey id, or a signature that does not verify.
    """
    _recheck(bundle, PrekeyBundle)
    if bundle.identity_key != expected_identity_key:
        raise ProtocolError("prekey bundle belongs to another identity")
    if bundle.created_at > now + CLOCK_SKEW_ALLOWANCE:
        raise ProtocolError(f"signed prekey made at {bundle.created_at}, in the future (now {now:.0f})")
    if now - bundle.created_at > MAX_SIGNED_PREKEY_AGE:
        raise ProtocolError(f"signed prekey made at {bundle.created_at} is too old (now {now:.0f})")
    _check_bundle(bundle)


def encode_bundle(bundle: PrekeyBundle) -> bytes:
    """The msgpack bytes of *bundle* (at most :data:`MAX_ENCODED_BUNDLE_BYTES`); :class:`ValueError` if invalid."""
    return encode_struct(bundle)


def decode_bundle(data: bytes) -> PrekeyBundle:
    """Decode a bundle (fields only: call :func:`validate_bundle` too); :class:`ProtocolError` if malformed."""
    return _decode(PrekeyBundle, data, MAX_ENCODED_BUNDLE_BYTES)


def encode_initial_header(header: InitialHeader) -> bytes:
    """The msgpack bytes of *header* (at most :data:`MAX_ENCODED_HEADER_BYTES`); :class:`ValueError` if invalid."""
    return encode_struct(header)


def decode_initial_header(data: bytes) -> InitialHeader:
    """Decode an initial header; :class:`ProtocolError` if malformed."""
    return _decode(InitialHeader, data, MAX_ENCODED_HEADER_BYTES)


# --- the private prekey state -----------------------------------------------------------------------------------


def _state_problem(state: PrekeyState) -> str | None:
    """What breaks the invariants of *state* beyond its field ranges, or None."""
    if state.current.retired_at is not None:
        return "the current signed prekey has a retirement time"
    if any(key.retired_at is None for key in state.previous):
        return "a retired signed prekey has no retirement time"
    signed_ids = [state.current.prekey_id, *(key.prekey_id for key in state.previous)]
    if len(set(signed_ids)) != len(signed_ids):
        return "a signed prekey id appears twice"
    if max(signed_ids) >= state.next_signed_prekey_id:
        return "a signed prekey id is not below the next signed prekey id"
    one_time_ids = [key.prekey_id for key in state.one_time_prekeys]
    if any(a >= b for a, b in itertools.pairwise(one_time_ids)):
        return "one-time prekey ids are not strictly increasing"
    if one_time_ids and one_time_ids[-1] >= state.next_one_time_prekey_id:
        return "a one-time prekey id is not below the next one-time prekey id"
    return None


def encode_prekey_state(state: PrekeyState) -> bytes:
    """The msgpack bytes of *state*, to store (sealed) on disk; :class:`ValueError` if it is inconsistent."""
    data = encode_struct(state)
    problem = _state_problem(state)
    if problem is not None:
        raise ValueError(f"PrekeyState: {problem}")
    return data


def decode_prekey_state(data: bytes) -> PrekeyState:
    """Decode a stored state; :class:`ProtocolError` if malformed or inconsistent (treated like network input)."""
    state = _decode(PrekeyState, data, MAX_ENCODED_PREKEY_STATE_BYTES)
    problem = _state_problem(state)
    if problem is not None:
        raise ProtocolError(f"PrekeyState: {problem}")
    return state


def _check_owner(state: PrekeyState, identity: Identity) -> None:
    if state.identity_key != identity.public.key:
        raise ValueError("this prekey state belongs to another identity")


def _timestamp(now: float) -> int:
    stamp = int(now)
    if not 0 <= stamp <= MAX_TIMESTAMP:
        raise ValueError(f"time {now!r} is outside 0..{MAX_TIMESTAMP}")
    return stamp


def _take_ids(next_id: int, count: int, what: str) -> range:
    if next_id + count - 1 > MAX_PREKEY_ID:
        raise ValueError(f"{what} ids are exhausted (next {next_id}, want {count}, last {MAX_PREKEY_ID})")
    return range(next_id, next_id + count)


def new_prekeys(
    identity: Identity, random_bytes: RandomBytes, now: float, count: int = ONE_TIME_PREKEY_TARGET
) -> PrekeyState:
    """A fresh state for *identity*: signed prekey 0 made at *now* and *count* one-time prekeys (ids from 0).

    Draws the signed prekey first, then the one-time prekeys in id order.  :class:`ValueError` if *count* is not
    in ``0..MAX_ONE_TIME_PREKEYS_PER_BUNDLE``.
    """
    current = SignedPrekeySecret(0, _new_private_key(random_bytes), _timestamp(now), None)
    state = PrekeyState(identity.public.key, current, (), (), 1, 0)
    return replenish(state, random_bytes, count)


def replenish(state: PrekeyState, random_bytes: RandomBytes, target: int = ONE_TIME_PREKEY_TARGET) -> PrekeyState:
    """*state* with new one-time prekeys (fresh ids) until it holds *target*; unchanged if it holds that many.

    :class:`ValueError` if *target* is not in ``0..MAX_ONE_TIME_PREKEYS_PER_BUNDLE`` or the ids are exhausted.
    """
    if not 0 <= target <= MAX_ONE_TIME_PREKEYS_PER_BUNDLE:
        raise ValueError(f"one-time prekey target must be 0..{MAX_ONE_TIME_PREKEYS_PER_BUNDLE}, got {target}")
    missing = target - len(state.one_time_prekeys)
    if missing <= 0:
        return state
    ids = _take_ids(state.next_one_time_prekey_id, missing, "one-time prekey")
    added = tuple(OneTimePrekeySecret(prekey_id, _new_private_key(random_bytes)) for prekey_id in ids)
    return dataclasses.replace(state, one_time_prekeys=state.one_time_prekeys + added, next_one_time_prekey_id=ids.stop)


def _within_grace(key: SignedPrekeySecret, now: float) -> bool:
    assert key.retired_at is not None
    return now < key.retired_at + SIGNED_PREKEY_GRACE


def rotate_signed_prekey(state: PrekeyState, identity: Identity, random_bytes: RandomBytes, now: float) -> PrekeyState:
    """Rotate the signed prekey if it is due, and forget retired ones past :data:`SIGNED_PREKEY_GRACE`.

    Due means made :data:`SIGNED_PREKEY_ROTATION` ago or more -- or made more than a clock-skew allowance in the
    future, which only a clock set back can cause and which every peer would refuse.  The replaced prekey is
    kept (retired at *now*) for the grace period so initial messages already on their way to it still open;
    at most :data:`MAX_PREVIOUS_SIGNED_PREKEYS` are kept, the oldest dropped first.  Call it at start-up and
    periodically (hourly, say); it returns *state* itself when there is nothing to do.
    :class:`ValueError` if *state* is not *identity*'s or the signed prekey ids are exhausted.
    """
    _check_owner(state, identity)
    stamp = _timestamp(now)
    previous = tuple(key for key in state.previous if _within_grace(key, now))
    age = now - state.current.created_at
    if not (age >= SIGNED_PREKEY_ROTATION or -age > CLOCK_SKEW_ALLOWANCE):
        return state if previous == state.previous else dataclasses.replace(state, previous=previous)
    (prekey_id,) = _take_ids(state.next_signed_prekey_id, 1, "signed prekey")
    retired = dataclasses.replace(state.current, retired_at=stamp)
    current = SignedPrekeySecret(prekey_id, _new_private_key(random_bytes), stamp, None)
    return dataclasses.replace(
        state,
        current=current,
        previous=(*previous, retired)[-MAX_PREVIOUS_SIGNED_PREKEYS:],
        next_signed_prekey_id=prekey_id + 1,
    )


def bundle_for(state: PrekeyState, identity: Identity, now: float) -> PrekeyBundle:
    """The signed public bundle of *state*, to publish as *identity*'s ``RecordKind.PREKEYS`` record.

    :class:`ValueError` if *state* is not *identity*'s, or if peers would refuse the bundle at *now* because the
    signed prekey is too old or from the future (call :func:`rotate_signed_prekey` first).
    """
    _check_owner(state, identity)
    current = state.current
    if now - current.created_at > MAX_SIGNED_PREKEY_AGE or current.created_at > now + CLOCK_SKEW_ALLOWANCE:
        raise ValueError("the signed prekey is outside its accepted age: rotate it before publishing")
    signed_prekey = x25519_public(current.private_key)
    one_time = tuple(OneTimePrekey(key.prekey_id, x25519_public(key.private_key)) for key in state.one_time_prekeys)
    message = bundle_message(identity.public.key, current.prekey_id, signed_prekey, current.created_at, one_time)
    return PrekeyBundle(
        identity.public.key, current.prekey_id, signed_prekey, current.created_at, one_time, identity.sign(message)
    )


def _signed_prekey(state: PrekeyState, prekey_id: int) -> SignedPrekeySecret:
    for key in (state.current, *state.previous):
        if key.prekey_id == prekey_id:
            return key
    raise ProtocolError(f"unknown signed prekey id {prekey_id}")


def signed_prekey_pair(state: PrekeyState, prekey_id: int) -> X25519KeyPair:
    """The key pair of the signed prekey *prekey_id* (current or retired): the responder's first ratchet key.

    The id comes from a peer's :class:`InitialHeader`, so an unknown one is a :class:`ProtocolError`.
    """
    key = _signed_prekey(state, prekey_id)
    return X25519KeyPair(key.private_key, x25519_public(key.private_key))


# --- the key agreement ------------------------------------------------------------------------------------------


def initiate(
    own_identity: Identity, bundle: PrekeyBundle, random_bytes: RandomBytes
) -> tuple[bytes, InitialHeader, bytes]:
    """Alice's side: ``(shared_key, header, associated_data)`` for a session with the owner of *bundle*.

    Call :func:`validate_bundle` first: it checks that the bundle is the intended peer's and fresh.  This
    function checks the signature again (an unsigned prekey is never used) but knows neither peer nor time.
    Draws the ephemeral key (32 bytes), then, if the bundle offers one-time prekeys, 8 bytes to pick one at
    random, so that peers who fetched the same bundle rarely pick the same one.  Bob's first ratchet key is
    ``bundle.signed_prekey``.  :class:`ProtocolError` for a bad bundle or a low-order key in it.
    """
    _check_bundle(bundle)
    peer_identity = ed25519_to_x25519_public(bundle.identity_key)
    ephemeral = _new_private_key(random_bytes)
    one_time: OneTimePrekey | None = None
    if bundle.one_time_prekeys:
        index = int.from_bytes(_draw(random_bytes, _INDEX_BYTES), "big") % len(bundle.one_time_prekeys)
        one_time = bundle.one_time_prekeys[index]
    outputs = [
        x25519_shared(identity_x25519_private(own_identity), bundle.signed_prekey),
        x25519_shared(ephemeral, peer_identity),
        x25519_shared(ephemeral, bundle.signed_prekey),
    ]
    if one_time is not None:
        outputs.append(x25519_shared(ephemeral, one_time.public_key))
    header = InitialHeader(
        own_identity.public.key,
        x25519_public(ephemeral),
        bundle.signed_prekey_id,
        None if one_time is None else one_time.prekey_id,
    )
    return _derive_shared_key(outputs), header, own_identity.public.key + bundle.identity_key


def respond(
    own_identity: Identity, prekey_state: PrekeyState, header: InitialHeader, now: float
) -> tuple[PrekeyState, bytes, bytes, PublicIdentity]:
    """Bob's side: ``(new_state, shared_key, associated_data, sender)`` for the initial *header* received at *now*.

    *new_state* is *prekey_state* without the one-time prekey the header used; commit it with the session, and
    only once the first message has decrypted under *shared_key*.  Bob's first ratchet key pair is
    ``signed_prekey_pair(new_state, header.signed_prekey_id)``.

    The shared key binds the sender's identity only in its X25519 form, which two Ed25519 keys share (``A`` and
    ``-A``, differing in the sign bit); the associated data binds the exact Ed25519 key, so the first message
    must be opened with the *associated_data* returned here.

    :class:`ProtocolError` for: a malformed header, an unknown signed prekey or one retired more than
    :data:`SIGNED_PREKEY_GRACE` ago, an unknown or already used one-time prekey, an unusable sender key, or an
    ephemeral key that is not canonical or of low order.  :class:`ValueError` if *prekey_state* is not *own_identity*'s.
    """
    _check_owner(prekey_state, own_identity)
    _recheck(header, InitialHeader)
    _check_canonical_x25519(header.ephemeral_key, "ephemeral key")
    signed = _signed_prekey(prekey_state, header.signed_prekey_id)
    if signed.retired_at is not None and not _within_grace(signed, now):
        raise ProtocolError(f"signed prekey {signed.prekey_id} was retired at {signed.retired_at}, too long ago")
    remaining = prekey_state.one_time_prekeys
    one_time: OneTimePrekeySecret | None = None
    if header.one_time_prekey_id is not None:
        one_time = next((key for key in remaining if key.prekey_id == header.one_time_prekey_id), None)
        if one_time is None:
            used = header.one_time_prekey_id < prekey_state.next_one_time_prekey_id
            raise ProtocolError(
                f"one-time prekey {header.one_time_prekey_id} is {'already used' if used else 'unknown'}"
            )
        remaining = tuple(key for key in remaining if key is not one_time)
    sender = PublicIdentity.from_key(header.sender_identity_key)
    sender_x25519 = ed25519_to_x25519_public(header.sender_identity_key)
    outputs = [
        x25519_shared(signed.private_key, sender_x25519),
        x25519_shared(identity_x25519_private(own_identity), header.ephemeral_key),
        x25519_shared(signed.private_key, header.ephemeral_key),
    ]
    if one_time is not None:
        outputs.append(x25519_shared(one_time.private_key, header.ephemeral_key))
    new_state = prekey_state if one_time is None else dataclasses.replace(prekey_state, one_time_prekeys=remaining)
    return new_state, _derive_shared_key(outputs), header.sender_identity_key + own_identity.public.key, sender
