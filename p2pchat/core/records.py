"""What the DHT stores: signed mutable records, mailbox entries and tombstones, and the pure rules that check them.

Three kinds of value live in the DHT, each under a 160-bit key (a :class:`~p2pchat.core.ids.NodeId`):

* **Signed records** (:class:`SignedRecord`), mutable items in the manner of BitTorrent's BEP 44: one per owner
  and :class:`RecordKind`, stored under :func:`record_key` of the owner's Ed25519 key, signed by that key, with a
  sequence number (a higher one replaces a lower one) and an expiry.  The peer record says where a user's node can
  be reached; the prekey bundle carries X3DH prekeys.  The value itself is opaque here.
* **Mailbox entries** (:class:`MailboxEntry`): many per mailbox, stored under :func:`mailbox_key` of the mailbox's
  public key, written by anyone (within the store's quotas) and unsigned -- the payload is an envelope sealed to
  the recipient.  An entry's id is a hash of the mailbox key, its expiry and its payload, so a storer cannot
  change what an id stands for, nor stretch an entry's life.
* **Tombstones** (:class:`Tombstone`): a list of entry ids to delete, signed by the mailbox's private key.  The
  mailbox public key travels inside, and the DHT key is its hash, so a storer checks a delete without learning
  whose mailbox it is.

Validation (:func:`validate_record`, :func:`validate_entry`, :func:`validate_tombstone`) is pure: the caller passes
``now`` (unix seconds, its own wall clock) and the DHT key the value was stored or fetched under.  Bad input raises
:class:`~p2pchat.errors.ProtocolError` and nothing else.  Encoders raise :class:`ValueError` (our own bug).

Canonical signed bytes
----------------------

Signatures never cover msgpack: a decoder accepts several encodings of one value, so a re-encoding may not be
the bytes that were signed.  Each signature and hash covers a fixed layout with a distinct ASCII prefix per
purpose (all integers big-endian, unsigned):

* record: ``RECORD_SIGNATURE_CONTEXT || kind (1) || owner_key (32) || seq (8) || expires_at (8) ||
  len(value) (4) || value`` -- see :func:`record_message`;
* entry id: ``BLAKE2b-128(person=ENTRY_ID_PERSONALIZATION; mailbox key (20) || expires_at (8) || payload)`` --
  see :func:`entry_id`;
* tombstone: ``TOMBSTONE_SIGNATURE_CONTEXT || mailbox_public_key (32) || issued_at (8) || count (2) ||
  entry ids (16 each)`` -- see :func:`tombstone_message`;
* DHT keys: ``BLAKE2b-160(person=...; public key)`` with one personalization per kind of key.

Time
----

Two nodes' clocks may differ by :data:`CLOCK_SKEW_ALLOWANCE` without harm: an expiry may lie that much beyond the
longest lifetime, and a tombstone may be issued that far in the future.  ``expires_at <= now`` is expired.

Tombstones and replication
--------------------------

A storer that applies a tombstone must keep each deleted id (not the entry) until that entry could no longer
be valid anywhere, or a replica that missed the delete would hand the entry back during replication.  The id
binds the entry's ``expires_at``, so if the storer held the entry it keeps the id until that time; otherwise it
keeps it until :func:`tombstone_expires_at`, the latest moment any entry the tombstone can name may still live.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Final, TypeVar

from p2pchat.core.framing import decode_struct, encode_struct
from p2pchat.core.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PublicIdentity
from p2pchat.core.ids import NODE_ID_BYTES, NodeId
from p2pchat.core.schema import Bytes, Int, List, Spec, WireStruct, max_wire_size, to_wire, wire_struct
from p2pchat.errors import ProtocolError

__all__ = [
    "CLOCK_SKEW_ALLOWANCE",
    "DEFAULT_MAILBOX_TTL",
    "ENTRY_ID_BYTES",
    "ENTRY_ID_PERSONALIZATION",
    "MAILBOX_KEY_PERSONALIZATION",
    "MAX_ENCODED_ENTRY_BYTES",
    "MAX_ENCODED_RECORD_BYTES",
    "MAX_ENCODED_TOMBSTONE_BYTES",
    "MAX_MAILBOX_TTL",
    "MAX_RECORD_TTL",
    "MAX_SEQ",
    "MAX_TIMESTAMP",
    "MAX_TOMBSTONE_IDS",
    "MAX_VALUE_BYTES",
    "RECORD_KEY_PERSONALIZATION",
    "RECORD_SIGNATURE_CONTEXT",
    "TOMBSTONE_LIFETIME",
    "TOMBSTONE_SIGNATURE_CONTEXT",
    "ConflictingRecordError",
    "MailboxEntry",
    "MergeResult",
    "RecordKind",
    "SignedRecord",
    "StaleRecordError",
    "Tombstone",
    "decode_entry",
    "decode_record",
    "decode_tombstone",
    "encode_entry",
    "encode_record",
    "encode_tombstone",
    "entry_expiry",
    "entry_id",
    "mailbox_key",
    "make_entry",
    "merge_records",
    "peer_record_key",
    "prekey_bundle_key",
    "record_key",
    "record_message",
    "should_replace",
    "sign_record",
    "sign_tombstone",
    "tombstone_expires_at",
    "tombstone_message",
    "validate_entry",
    "validate_record",
    "validate_tombstone",
]

# --- limits -----------------------------------------------------------------------------------------------------

MAX_VALUE_BYTES: Final = 68 * 1024
"""Largest record value or mailbox entry payload: 64 KiB of user data plus 4 KiB for what wraps a message on its
way (sealed envelope, ratchet header, X3DH initial header), so a 64 KiB message fits in one mailbox entry."""

MAX_SEQ: Final = (1 << 63) - 1
"""Largest sequence number: a signed 64-bit integer, so the store can keep it in an SQLite INTEGER."""

MAX_TIMESTAMP: Final = (1 << 63) - 1
"""Largest ``expires_at``/``issued_at`` the wire carries (SQLite INTEGER again); validation bounds it far lower."""

MAX_RECORD_TTL: Final = 28 * 24 * 3600
"""Longest a signed record may live (28 days): owners republish long before, and a stolen-key record dies."""

CLOCK_SKEW_ALLOWANCE: Final = 3600
"""How far two nodes' wall clocks may disagree (one hour) without a valid value being refused."""

DEFAULT_MAILBOX_TTL: Final = 7 * 24 * 3600
"""Lifetime of a mailbox entry unless the sender asks otherwise (7 days: a message's default time to live)."""

MAX_MAILBOX_TTL: Final = 28 * 24 * 3600
"""Longest a mailbox entry may live (28 days), so storers are never asked to hold mail indefinitely."""

MAX_TOMBSTONE_IDS: Final = 256
"""Most entry ids one tombstone deletes; more need several tombstones (each fits a few parts, ~4.7 KB)."""

ENTRY_ID_BYTES: Final = 16
"""Size of a mailbox entry id (BLAKE2b-128): collisions are out of reach, and 256 fit a small tombstone."""

TOMBSTONE_LIFETIME: Final = MAX_MAILBOX_TTL + 2 * CLOCK_SKEW_ALLOWANCE
"""How long after ``issued_at`` an entry the tombstone names may still be alive somewhere.

The entry was written before the tombstone was issued, with an expiry at most :data:`MAX_MAILBOX_TTL` plus one
skew allowance ahead of its storer's clock, and the issuer's clock may itself be one allowance behind: two
allowances cover both.  A tombstone older than this deletes nothing that could still exist, so it is refused.
"""

# --- domain separation ------------------------------------------------------------------------------------------


class RecordKind(enum.IntEnum):
    """What a signed record holds; the kind is part of the DHT key and of the signed message."""

    PEER = 1
    """Where the owner's node can be reached (addresses, ports)."""
    PREKEYS = 2
    """The owner's X3DH prekey bundle."""


_KIND_BY_VALUE: Final = {int(kind): kind for kind in RecordKind}

RECORD_KEY_PERSONALIZATION: Final = {
    RecordKind.PEER: b"p2pchat-peer",
    RecordKind.PREKEYS: b"p2pchat-prekeys",
}
"""BLAKE2b personalization of the DHT key of each :class:`RecordKind`, so kinds never share a key.  A new kind
needs a new entry here (and a new personalization): the kind is not hashed in, only this prefix separates them."""

MAILBOX_KEY_PERSONALIZATION: Final = b"p2pchat-mailbox"
"""BLAKE2b personalization of a mailbox's DHT key."""

ENTRY_ID_PERSONALIZATION: Final = b"p2pchat-entry-id"
"""BLAKE2b personalization of a mailbox entry id."""

RECORD_SIGNATURE_CONTEXT: Final = b"p2pchat-record-v1\x00"
"""Prefix of every signed record message, so a record signature is never valid as any other signature."""

TOMBSTONE_SIGNATURE_CONTEXT: Final = b"p2pchat-tombstone-v1\x00"
"""Prefix of every signed tombstone message."""

_U64: Final = struct.Struct(">Q")
_RECORD_HEADER: Final = struct.Struct(f">B{PUBLIC_KEY_BYTES}sQQI")
_TOMBSTONE_HEADER: Final = struct.Struct(f">{PUBLIC_KEY_BYTES}sQH")


class StaleRecordError(ProtocolError):
    """An incoming record has a lower sequence number than the one stored (BEP 44: never go back)."""


class ConflictingRecordError(ProtocolError):
    """An incoming record has the stored sequence number but different content: the owner signed two versions."""


# --- schema -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RecordKindSpec(Spec):
    """A :class:`RecordKind` as its one-byte integer; an unknown kind is refused, not carried along."""

    def check(self, value: object) -> RecordKind:
        """Return the kind for a known integer value."""
        if type(value) is not int:
            raise ProtocolError(f"expected a record kind (int), got {type(value).__name__}")
        # A dict, not RecordKind(value): the enum call goes through EnumType.__call__, and every stored or fetched
        # record passes here.
        kind = _KIND_BY_VALUE.get(value)
        if kind is None:
            raise ProtocolError(f"unknown record kind {value}")
        return kind

    def to_wire(self, value: object) -> int:
        """Return the plain int (msgpack would not know an enum member)."""
        if isinstance(value, RecordKind):
            return int(value)
        try:
            return int(self.check(value))
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None

    @property
    def max_wire_size(self) -> int:
        """A positive fixint: one byte."""
        return 1

    def accepts_annotation(self, annotation: object) -> bool:
        """Kind fields are annotated :class:`RecordKind`."""
        return annotation is RecordKind


_PublicKey = Annotated[bytes, Bytes(min_len=PUBLIC_KEY_BYTES, max_len=PUBLIC_KEY_BYTES)]
_Signature = Annotated[bytes, Bytes(min_len=SIGNATURE_BYTES, max_len=SIGNATURE_BYTES)]
_Timestamp = Annotated[int, Int(min_value=0, max_value=MAX_TIMESTAMP)]
_EntryId = Bytes(min_len=ENTRY_ID_BYTES, max_len=ENTRY_ID_BYTES)


@wire_struct
@dataclass(frozen=True, slots=True)
class SignedRecord(WireStruct):
    """A mutable value signed by its owner: stored under ``record_key(kind, owner_key)``, newest ``seq`` wins."""

    kind: Annotated[RecordKind, _RecordKindSpec()]
    owner_key: _PublicKey
    seq: Annotated[int, Int(min_value=0, max_value=MAX_SEQ)]
    expires_at: _Timestamp
    value: Annotated[bytes, Bytes(max_len=MAX_VALUE_BYTES)]
    signature: _Signature


@wire_struct
@dataclass(frozen=True, slots=True)
class MailboxEntry(WireStruct):
    """One sealed envelope in a mailbox; ``entry_id`` is :func:`entry_id` of the rest, checked by every storer."""

    entry_id: Annotated[bytes, _EntryId]
    expires_at: _Timestamp
    # Never empty: every envelope has a ciphertext, and refusing empty ones means no entry is free to store.
    payload: Annotated[bytes, Bytes(min_len=1, max_len=MAX_VALUE_BYTES)]


@wire_struct
@dataclass(frozen=True, slots=True)
class Tombstone(WireStruct):
    """A delete of up to :data:`MAX_TOMBSTONE_IDS` entries of one mailbox, signed by the mailbox's private key."""

    mailbox_public_key: _PublicKey
    entry_ids: Annotated[tuple[bytes, ...], List(item=_EntryId, min_items=1, max_items=MAX_TOMBSTONE_IDS)]
    issued_at: _Timestamp
    signature: _Signature


MAX_ENCODED_RECORD_BYTES: Final = max_wire_size(SignedRecord)
"""Largest encoded :class:`SignedRecord`; :func:`decode_record` refuses anything longer before unpacking."""

MAX_ENCODED_ENTRY_BYTES: Final = max_wire_size(MailboxEntry)
"""Largest encoded :class:`MailboxEntry`."""

MAX_ENCODED_TOMBSTONE_BYTES: Final = max_wire_size(Tombstone)
"""Largest encoded :class:`Tombstone`."""


# --- DHT keys ---------------------------------------------------------------------------------------------------


def _key_hash(public_key: bytes, person: bytes) -> NodeId:
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return NodeId(hashlib.blake2b(public_key, digest_size=NODE_ID_BYTES, person=person).digest())


def record_key(kind: RecordKind, owner_key: bytes) -> NodeId:
    """The DHT key of *owner_key*'s record of *kind*: BLAKE2b-160 of the key, personalized per kind."""
    return _key_hash(owner_key, RECORD_KEY_PERSONALIZATION[RecordKind(kind)])


def peer_record_key(owner_key: bytes) -> NodeId:
    """The DHT key of *owner_key*'s peer record (personalization ``p2pchat-peer``)."""
    return record_key(RecordKind.PEER, owner_key)


def prekey_bundle_key(owner_key: bytes) -> NodeId:
    """The DHT key of *owner_key*'s prekey bundle (personalization ``p2pchat-prekeys``)."""
    return record_key(RecordKind.PREKEYS, owner_key)


def mailbox_key(mailbox_public_key: bytes) -> NodeId:
    """The DHT key of the mailbox whose (Ed25519) public key is *mailbox_public_key* (``p2pchat-mailbox``)."""
    return _key_hash(mailbox_public_key, MAILBOX_KEY_PERSONALIZATION)


# --- shared checks ----------------------------------------------------------------------------------------------

_W = TypeVar("_W", bound=WireStruct)


def _recheck(obj: object, cls: type[WireStruct]) -> None:
    """Run the schema's field checks on a value that may not have come through a decoder (e.g. built in Python).

    ``to_wire`` is the same check a decoder runs, so a validator never trusts a field's type or size merely
    because the object exists.
    """
    if type(obj) is not cls:
        raise ProtocolError(f"expected a {cls.__name__}, got {type(obj).__name__}")
    try:
        to_wire(obj)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def _check_expiry(expires_at: int, now: float, max_ttl: int, what: str) -> None:
    if expires_at <= now:
        raise ProtocolError(f"{what} expired at {expires_at} (now {now:.0f})")
    if expires_at > now + max_ttl + CLOCK_SKEW_ALLOWANCE:
        raise ProtocolError(f"{what} expires at {expires_at}, too far in the future (now {now:.0f})")


def _check_key(expected: NodeId, actual: NodeId, what: str) -> None:
    if type(actual) is not NodeId:
        raise ProtocolError(f"DHT key must be a NodeId, got {type(actual).__name__}")
    if expected != actual:
        raise ProtocolError(f"{what} does not belong under DHT key {actual.hex()}")


def _verify(public_key: bytes, message: bytes, signature: bytes, what: str) -> None:
    # PublicIdentity.verify returns False (never raises) for a bad signature or a key that is not a curve point.
    if not PublicIdentity(public_key).verify(message, signature):
        raise ProtocolError(f"{what} signature does not verify")


# --- signed records ---------------------------------------------------------------------------------------------


def record_message(kind: RecordKind, owner_key: bytes, seq: int, expires_at: int, value: bytes) -> bytes:
    """The exact bytes a record's signature covers (see the module docstring for the layout)."""
    return RECORD_SIGNATURE_CONTEXT + _RECORD_HEADER.pack(int(kind), owner_key, seq, expires_at, len(value)) + value


def _signed_bytes(record: SignedRecord) -> bytes:
    return record_message(record.kind, record.owner_key, record.seq, record.expires_at, record.value)


def sign_record(identity: Identity, kind: RecordKind, seq: int, expires_at: int, value: bytes) -> SignedRecord:
    """A record of *kind* owned and signed by *identity*; :class:`ValueError` if a field is out of range."""
    kind = RecordKind(kind)
    owner_key = identity.public.key
    # Check the fields before packing them: struct.pack would raise its own error for an out-of-range integer.
    unsigned = SignedRecord(kind, owner_key, seq, expires_at, value, bytes(SIGNATURE_BYTES))
    to_wire(unsigned)
    signature = identity.sign(record_message(kind, owner_key, seq, expires_at, value))
    return SignedRecord(kind, owner_key, seq, expires_at, value, signature)


def validate_record(record: SignedRecord, key: NodeId, now: float) -> None:
    """Check a record stored or fetched under DHT *key* at time *now*; :class:`ProtocolError` if it is unfit.

    Refused: any field out of range (value over :data:`MAX_VALUE_BYTES`, unknown kind ...), a *key* other than
    ``record_key(kind, owner_key)``, ``expires_at <= now``, an expiry beyond ``now + MAX_RECORD_TTL +
    CLOCK_SKEW_ALLOWANCE``, and a signature that does not verify.  The signature is checked last: it is the
    expensive step, and garbage should cost a storer as little as possible.
    """
    _recheck(record, SignedRecord)
    _check_key(record_key(record.kind, record.owner_key), key, "record")
    _check_expiry(record.expires_at, now, MAX_RECORD_TTL, "record")
    _verify(record.owner_key, _signed_bytes(record), record.signature, "record")


def should_replace(stored: SignedRecord | None, incoming: SignedRecord) -> bool:
    """Whether a store holding *stored* should keep *incoming* instead (BEP 44 rules); validate *incoming* first.

    * nothing stored, or a higher ``seq``: True -- store *incoming*;
    * the same ``seq`` and the same signed content: False -- a no-op refresh (``expires_at`` is signed content,
      so there is nothing to extend); the store answers "stored" but writes nothing;
    * the same ``seq``, different content: :class:`ConflictingRecordError` -- the owner signed two versions; the
      first one a node saw stays, and readers settle the conflict in :func:`merge_records`;
    * a lower ``seq``: :class:`StaleRecordError` ("stale record").

    Both errors are :class:`ProtocolError` subclasses, so the store can count them apart or together.  The two
    records must share a DHT key (same kind and owner): comparing records of different keys is a bug in the
    caller and raises :class:`ValueError`.
    """
    if stored is None:
        return True
    if stored.kind != incoming.kind or stored.owner_key != incoming.owner_key:
        raise ValueError("should_replace compares records under one DHT key (same kind and owner)")
    if incoming.seq > stored.seq:
        return True
    if incoming.seq < stored.seq:
        raise StaleRecordError(f"stale record: seq {incoming.seq} is below the stored {stored.seq}")
    if _signed_bytes(incoming) == _signed_bytes(stored):
        return False
    raise ConflictingRecordError(f"conflicting record: seq {incoming.seq} is stored with different content")


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What :func:`merge_records` made of the records a get collected."""

    record: SignedRecord | None
    """The winner: the valid record with the highest ``seq`` (None if no candidate was valid)."""
    conflict: bool
    """Valid records at the winning ``seq`` differ in content: the owner equivocated (the winner is the one with
    the lowest signature bytes, so every reader picks the same)."""
    invalid: int
    """Candidates examined and refused (forged, expired, wrong key): evidence against the nodes that sent them.
    Candidates below the winning ``seq`` are not examined (nor counted): they lose whether valid or not."""


def merge_records(candidates: Iterable[SignedRecord], key: NodeId, now: float) -> MergeResult:
    """Merge what the nodes closest to *key* returned for a get, checking every record that could win itself.

    Not the first answer and not a majority vote: one honest replica holding the newest record is enough.
    Candidates are examined from the highest ``seq`` down (ties: lowest signature first), each validated as by
    :func:`validate_record`; the first valid one wins, and the rest at its ``seq`` are checked for a conflict.
    Identical candidates (the common case: k replicas of one record) are verified once.  *candidates* are
    records as :func:`decode_record` returns them.
    """
    # Highest seq first; among equals the lowest signature first, so equivocation resolves the same everywhere.
    ordered = sorted(candidates, key=lambda record: (-record.seq, record.signature))
    verdicts: dict[SignedRecord, bool] = {}
    winner: SignedRecord | None = None
    winner_bytes = b""
    conflict = False
    invalid = 0
    for candidate in ordered:
        if winner is not None and candidate.seq != winner.seq:
            break
        valid = verdicts.get(candidate)
        if valid is None:
            try:
                validate_record(candidate, key, now)
                valid = True
            except ProtocolError:
                valid = False
            verdicts[candidate] = valid
        if not valid:
            invalid += 1
        elif winner is None:
            winner, winner_bytes = candidate, _signed_bytes(candidate)
        elif _signed_bytes(candidate) != winner_bytes:
            conflict = True
    return MergeResult(winner, conflict, invalid)


# --- mailbox entries --------------------------------------------------------------------------------------------


def entry_id(mailbox: NodeId, expires_at: int, payload: bytes) -> bytes:
    """The id of an entry: BLAKE2b-128 (personalized) of the mailbox key, ``expires_at`` (8 bytes) and payload."""
    digest = hashlib.blake2b(digest_size=ENTRY_ID_BYTES, person=ENTRY_ID_PERSONALIZATION)
    digest.update(mailbox.bytes)
    digest.update(_U64.pack(expires_at))
    digest.update(payload)
    return digest.digest()


def entry_expiry(now: float, ttl: int = DEFAULT_MAILBOX_TTL) -> int:
    """The ``expires_at`` of an entry written at *now* to live *ttl* seconds; :class:`ValueError` past the max."""
    if not 0 < ttl <= MAX_MAILBOX_TTL:
        raise ValueError(f"a mailbox TTL is 1..{MAX_MAILBOX_TTL} seconds, got {ttl}")
    return int(now) + ttl


def make_entry(mailbox: NodeId, payload: bytes, expires_at: int) -> MailboxEntry:
    """An entry for the mailbox at DHT key *mailbox*; :class:`ValueError` if the payload or expiry is invalid."""
    unchecked = MailboxEntry(bytes(ENTRY_ID_BYTES), expires_at, payload)
    to_wire(unchecked)
    return MailboxEntry(entry_id(mailbox, expires_at, payload), expires_at, payload)


def validate_entry(entry: MailboxEntry, mailbox: NodeId, now: float) -> None:
    """Check an entry stored or fetched under mailbox key *mailbox* at *now*; :class:`ProtocolError` if unfit.

    Refused: a field out of range, ``expires_at <= now``, an expiry beyond ``now + MAX_MAILBOX_TTL +
    CLOCK_SKEW_ALLOWANCE``, and an ``entry_id`` other than :func:`entry_id` of the rest (which also refuses an
    entry copied under another mailbox's key).
    """
    _recheck(entry, MailboxEntry)
    if type(mailbox) is not NodeId:
        raise ProtocolError(f"DHT key must be a NodeId, got {type(mailbox).__name__}")
    _check_expiry(entry.expires_at, now, MAX_MAILBOX_TTL, "mailbox entry")
    if entry.entry_id != entry_id(mailbox, entry.expires_at, entry.payload):
        raise ProtocolError("mailbox entry id does not match its mailbox, expiry and payload")


# --- tombstones -------------------------------------------------------------------------------------------------


def tombstone_message(mailbox_public_key: bytes, entry_ids: tuple[bytes, ...], issued_at: int) -> bytes:
    """The exact bytes a tombstone's signature covers (see the module docstring for the layout)."""
    header = _TOMBSTONE_HEADER.pack(mailbox_public_key, issued_at, len(entry_ids))
    return TOMBSTONE_SIGNATURE_CONTEXT + header + b"".join(entry_ids)


def sign_tombstone(mailbox_identity: Identity, entry_ids: Iterable[bytes], issued_at: int) -> Tombstone:
    """A tombstone deleting *entry_ids* from *mailbox_identity*'s mailbox; :class:`ValueError` if invalid.

    At most :data:`MAX_TOMBSTONE_IDS` distinct ids; delete more with several tombstones.
    """
    ids = tuple(entry_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("a tombstone lists each entry id once")
    public_key = mailbox_identity.public.key
    to_wire(Tombstone(public_key, ids, issued_at, bytes(SIGNATURE_BYTES)))
    signature = mailbox_identity.sign(tombstone_message(public_key, ids, issued_at))
    return Tombstone(public_key, ids, issued_at, signature)


def tombstone_expires_at(tombstone: Tombstone) -> int:
    """When a storer may forget a tombstoned id it never held the entry of (see "Tombstones and replication")."""
    return tombstone.issued_at + TOMBSTONE_LIFETIME


def validate_tombstone(tombstone: Tombstone, mailbox: NodeId, now: float) -> None:
    """Check a tombstone sent for mailbox key *mailbox* at *now*; :class:`ProtocolError` if it must be ignored.

    Refused: a field out of range (no ids, more than :data:`MAX_TOMBSTONE_IDS`), a repeated id,
    ``mailbox_key(mailbox_public_key) != mailbox``, ``issued_at`` beyond ``now + CLOCK_SKEW_ALLOWANCE``, a
    tombstone whose :func:`tombstone_expires_at` has passed, and a signature that does not verify.

    Replaying a valid tombstone is harmless: it deletes the same ids again, and an id names one payload and
    expiry forever.
    """
    _recheck(tombstone, Tombstone)
    _check_key(mailbox_key(tombstone.mailbox_public_key), mailbox, "tombstone")
    if len(set(tombstone.entry_ids)) != len(tombstone.entry_ids):
        raise ProtocolError("tombstone lists an entry id twice")
    if tombstone.issued_at > now + CLOCK_SKEW_ALLOWANCE:
        raise ProtocolError(f"tombstone issued at {tombstone.issued_at}, in the future (now {now:.0f})")
    if tombstone_expires_at(tombstone) <= now:
        raise ProtocolError(f"tombstone issued at {tombstone.issued_at} is too old to delete anything")
    message = tombstone_message(tombstone.mailbox_public_key, tombstone.entry_ids, tombstone.issued_at)
    _verify(tombstone.mailbox_public_key, message, tombstone.signature, "tombstone")


# --- encoding ---------------------------------------------------------------------------------------------------


def _decode(cls: type[_W], data: bytes, max_size: int) -> _W:
    """Decode exactly one msgpack value filling *data* into *cls*; :class:`ProtocolError` for anything else.

    The same strict settings as :mod:`p2pchat.core.framing` uses for packets: every length bounded by the input's
    own size, no extension types, nothing after the value.
    """
    if type(data) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    size = len(data)
    if size > max_size:
        raise ProtocolError(f"{cls.__name__} of {size} bytes is over the {max_size}-byte limit")
    return decode_struct(cls, data)


def encode_record(record: SignedRecord) -> bytes:
    """The msgpack bytes of *record* (at most :data:`MAX_ENCODED_RECORD_BYTES`); :class:`ValueError` if invalid."""
    return encode_struct(record)


def decode_record(data: bytes) -> SignedRecord:
    """Decode a record (its fields only: call :func:`validate_record` too); :class:`ProtocolError` if malformed."""
    return _decode(SignedRecord, data, MAX_ENCODED_RECORD_BYTES)


def encode_entry(entry: MailboxEntry) -> bytes:
    """The msgpack bytes of *entry* (at most :data:`MAX_ENCODED_ENTRY_BYTES`); :class:`ValueError` if invalid."""
    return encode_struct(entry)


def decode_entry(data: bytes) -> MailboxEntry:
    """Decode an entry (its fields only: call :func:`validate_entry` too); :class:`ProtocolError` if malformed."""
    return _decode(MailboxEntry, data, MAX_ENCODED_ENTRY_BYTES)


def encode_tombstone(tombstone: Tombstone) -> bytes:
    """The msgpack bytes of *tombstone* (at most :data:`MAX_ENCODED_TOMBSTONE_BYTES`); :class:`ValueError`."""
    return encode_struct(tombstone)


def decode_tombstone(data: bytes) -> Tombstone:
    """Decode a tombstone (fields only: call :func:`validate_tombstone` too); :class:`ProtocolError` if malformed."""
    return _decode(Tombstone, data, MAX_ENCODED_TOMBSTONE_BYTES)
