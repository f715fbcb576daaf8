"""DHT records: signed mutable records (BEP 44 rules), mailbox entries and tombstones.

Every rule a storer or a reader applies is tested at its boundary, every signed field is tampered with bit by bit,
and the decoders are fuzzed for the one invariant: a valid value or ProtocolError, nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import struct
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.core import parts, records
from p2pchat.core.identity import Identity
from p2pchat.core.ids import NODE_ID_PERSONALIZATION, NodeId, node_id_for_key
from p2pchat.core.records import (
    CLOCK_SKEW_ALLOWANCE,
    DEFAULT_MAILBOX_TTL,
    ENTRY_ID_BYTES,
    MAX_ENCODED_ENTRY_BYTES,
    MAX_ENCODED_RECORD_BYTES,
    MAX_ENCODED_TOMBSTONE_BYTES,
    MAX_MAILBOX_TTL,
    MAX_RECORD_TTL,
    MAX_SEQ,
    MAX_TOMBSTONE_IDS,
    MAX_VALUE_BYTES,
    RECORD_SIGNATURE_CONTEXT,
    TOMBSTONE_LIFETIME,
    TOMBSTONE_SIGNATURE_CONTEXT,
    ConflictingRecordError,
    MailboxEntry,
    RecordKind,
    SignedRecord,
    StaleRecordError,
    Tombstone,
    decode_entry,
    decode_record,
    decode_tombstone,
    encode_entry,
    encode_record,
    encode_tombstone,
    entry_expiry,
    entry_id,
    mailbox_key,
    make_entry,
    merge_records,
    peer_record_key,
    prekey_bundle_key,
    record_key,
    record_message,
    should_replace,
    sign_record,
    sign_tombstone,
    tombstone_expires_at,
    tombstone_message,
    validate_entry,
    validate_record,
    validate_tombstone,
)
from p2pchat.errors import ProtocolError

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None)

NOW = 1_700_000_000.0
T = int(NOW)
DAY = 86400
SEED = bytes(range(32))

# Known answers for SEED, computed once: they pin the key derivations, the signed layout and the wire format.
EXPECTED_PEER_KEY = "b357339ae76a858e080595f09b4c7aa09c3d2f78"
EXPECTED_PREKEYS_KEY = "6b51d46364c3dfe6236ecc8c9065579e52f3f5b2"
EXPECTED_MAILBOX_KEY = "46be8ba181f675a7245b25e6b52a46311d8acb8f"
EXPECTED_ENTRY_ID = "ec78da7a0cfaf9166958e45e0cee8e47"
EXPECTED_RECORD_WIRE = (
    "9601c42003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b807ce65554280c40568656c6c6fc440"
    "b19459b1528cafdf46c09489a1fe413c232b2d30a085672d8ac595536bcf5ecac86fa35e4ae026c48f30519802783ccebbb469"
    "13c59fcb0c473e4c9087dc9c08"
)


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.from_seed(SEED)


@pytest.fixture(scope="module")
def mallory() -> Identity:
    return Identity.from_seed(b"\x66" * 32)


@pytest.fixture(scope="module")
def inbox() -> Identity:
    """Alice's mailbox key pair (a key pair of its own, not her identity)."""
    return Identity.from_seed(b"\x11" * 32)


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _record(
    identity: Identity,
    seq: int = 1,
    value: bytes = b"addr",
    kind: RecordKind = RecordKind.PEER,
    expires_at: int = T + DAY,
) -> SignedRecord:
    return sign_record(identity, kind, seq, expires_at, value)


def _key(record: SignedRecord) -> NodeId:
    return record_key(record.kind, record.owner_key)


def _rejected(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except ProtocolError:
        return True
    return False


# --- keys and known answers ---------------------------------------------------------------------------------------


def test_dht_keys_match_known_answers_and_an_independent_derivation(alice: Identity) -> None:
    key = alice.public.key

    def reference(person: bytes) -> str:
        return hashlib.blake2b(key, digest_size=20, person=person).hexdigest()

    assert peer_record_key(key).hex() == EXPECTED_PEER_KEY == reference(b"p2pchat-peer")
    assert prekey_bundle_key(key).hex() == EXPECTED_PREKEYS_KEY == reference(b"p2pchat-prekeys")
    assert mailbox_key(key).hex() == EXPECTED_MAILBOX_KEY == reference(b"p2pchat-mailbox")
    assert record_key(RecordKind.PEER, key) == peer_record_key(key)
    assert record_key(RecordKind.PREKEYS, key) == prekey_bundle_key(key)


def test_every_kind_of_key_of_one_public_key_differs(alice: Identity) -> None:
    key = alice.public.key
    ids = {peer_record_key(key), prekey_bundle_key(key), mailbox_key(key), node_id_for_key(key)}
    assert len(ids) == 4


def test_every_hash_personalization_is_distinct_and_every_kind_has_one() -> None:
    assert set(records.RECORD_KEY_PERSONALIZATION) == set(RecordKind)
    people = [
        *records.RECORD_KEY_PERSONALIZATION.values(),
        records.MAILBOX_KEY_PERSONALIZATION,
        records.ENTRY_ID_PERSONALIZATION,
        NODE_ID_PERSONALIZATION,
        parts.BLOB_DIGEST_PERSONALIZATION,
    ]
    assert len(set(people)) == len(people)
    assert all(person.isascii() and len(person) <= 16 for person in people)  # BLAKE2b's personalization limit


def test_signature_contexts_are_distinct_and_prefix_free() -> None:
    contexts = [RECORD_SIGNATURE_CONTEXT, TOMBSTONE_SIGNATURE_CONTEXT]
    for a in contexts:
        assert a.isascii()
        for b in contexts:
            assert a == b or not b.startswith(a)


def test_record_signed_bytes_and_wire_form_are_pinned(alice: Identity) -> None:
    record = sign_record(alice, RecordKind.PEER, 7, T + DAY, b"hello")
    expected = b"p2pchat-record-v1\x00" + b"\x01" + alice.public.key + struct.pack(">QQI", 7, T + DAY, 5) + b"hello"
    assert record_message(RecordKind.PEER, alice.public.key, 7, T + DAY, b"hello") == expected
    assert alice.public.verify(expected, record.signature)
    assert encode_record(record).hex() == EXPECTED_RECORD_WIRE


def test_entry_id_is_pinned(alice: Identity) -> None:
    mailbox = mailbox_key(alice.public.key)
    reference = hashlib.blake2b(
        mailbox.bytes + struct.pack(">Q", T) + b"payload", digest_size=16, person=b"p2pchat-entry-id"
    ).hexdigest()
    assert entry_id(mailbox, T, b"payload").hex() == EXPECTED_ENTRY_ID == reference


def test_tombstone_signed_bytes_include_the_mailbox_key(inbox: Identity) -> None:
    ids = (b"\x01" * 16, b"\x02" * 16)
    expected = b"p2pchat-tombstone-v1\x00" + inbox.public.key + struct.pack(">QH", T, 2) + b"".join(ids)
    assert tombstone_message(inbox.public.key, ids, T) == expected
    assert inbox.public.verify(expected, sign_tombstone(inbox, ids, T).signature)


def test_encoded_values_fit_the_largest_blob_parts_carry() -> None:
    assert max(MAX_ENCODED_RECORD_BYTES, MAX_ENCODED_ENTRY_BYTES, MAX_ENCODED_TOMBSTONE_BYTES) <= parts.MAX_BLOB_BYTES


# --- signed records -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(RecordKind))
def test_record_round_trip_for_each_kind(alice: Identity, kind: RecordKind) -> None:
    record = _record(alice, seq=3, kind=kind, value=b"v" * 100)
    decoded = decode_record(encode_record(record))
    assert decoded == record
    assert type(decoded.kind) is RecordKind
    validate_record(decoded, record_key(kind, alice.public.key), NOW)


def test_every_bit_of_the_signature_matters(alice: Identity) -> None:
    record = _record(alice)
    for bit in range(len(record.signature) * 8):
        bad = dataclasses.replace(record, signature=_flip(record.signature, bit))
        with pytest.raises(ProtocolError):
            validate_record(bad, _key(record), NOW)


def test_every_bit_of_the_owner_key_matters(alice: Identity) -> None:
    record = _record(alice)
    for bit in range(len(record.owner_key) * 8):
        bad = dataclasses.replace(record, owner_key=_flip(record.owner_key, bit))
        # Under the original key the DHT key check refuses it; under its own key the signature does.
        with pytest.raises(ProtocolError):
            validate_record(bad, _key(record), NOW)
        with pytest.raises(ProtocolError, match="signature"):
            validate_record(bad, _key(bad), NOW)


def test_every_bit_of_seq_expiry_and_value_matters(alice: Identity) -> None:
    record = _record(alice, seq=0x0102030405060708 & MAX_SEQ, value=bytes(range(40)))
    key = _key(record)
    for bit in range(64):
        with pytest.raises(ProtocolError):
            validate_record(dataclasses.replace(record, seq=record.seq ^ (1 << bit)), key, NOW)
        with pytest.raises(ProtocolError):
            validate_record(dataclasses.replace(record, expires_at=record.expires_at ^ (1 << bit)), key, NOW)
    for bit in range(len(record.value) * 8):
        with pytest.raises(ProtocolError, match="signature"):
            validate_record(dataclasses.replace(record, value=_flip(record.value, bit)), key, NOW)
    # The kind too: the other kind's key refuses it, and under its own key the signature does.
    other = dataclasses.replace(record, kind=RecordKind.PREKEYS)
    with pytest.raises(ProtocolError):
        validate_record(other, key, NOW)
    with pytest.raises(ProtocolError, match="signature"):
        validate_record(other, _key(other), NOW)


def test_every_bit_of_the_encoded_record_matters(alice: Identity) -> None:
    record = _record(alice, value=b"tcp://192.0.2.1:4000")
    data = encode_record(record)
    key = _key(record)
    # No flip re-spells the value (msgpack's type bytes differ in more than one bit), so every one is refused.
    for bit in range(len(data) * 8):
        assert _rejected(lambda raw: validate_record(decode_record(raw), key, NOW), _flip(data, bit))


def test_a_non_minimal_msgpack_spelling_still_verifies(alice: Identity) -> None:
    record = _record(alice, seq=5)
    pack = msgpack.packb
    # kind as uint8 and seq as uint64 instead of fixints: the same values, other bytes.
    data = (
        b"\x96\xcc\x01"
        + pack(record.owner_key)
        + b"\xcf"
        + struct.pack(">Q", 5)
        + pack(record.expires_at)
        + pack(record.value)
        + pack(record.signature)
    )
    assert data != encode_record(record)
    decoded = decode_record(data)
    assert decoded == record
    validate_record(decoded, _key(record), NOW)


def test_record_under_the_wrong_key_is_refused(alice: Identity, mallory: Identity) -> None:
    record = _record(alice)
    for wrong in (
        prekey_bundle_key(alice.public.key),
        peer_record_key(mallory.public.key),
        node_id_for_key(alice.public.key),
        mailbox_key(alice.public.key),
    ):
        with pytest.raises(ProtocolError, match="DHT key"):
            validate_record(record, wrong, NOW)


def test_record_signed_by_another_key_is_refused(alice: Identity, mallory: Identity) -> None:
    forged = dataclasses.replace(
        _record(alice), signature=mallory.sign(record_message(RecordKind.PEER, alice.public.key, 1, T + DAY, b"x"))
    )
    with pytest.raises(ProtocolError, match="signature"):
        validate_record(forged, _key(forged), NOW)


def test_record_expiry_boundaries(alice: Identity) -> None:
    at_now = _record(alice, expires_at=T)
    with pytest.raises(ProtocolError, match="expired"):
        validate_record(at_now, _key(at_now), NOW)
    validate_record(_record(alice, expires_at=T + 1), _key(at_now), NOW)
    latest = T + MAX_RECORD_TTL + CLOCK_SKEW_ALLOWANCE
    validate_record(_record(alice, expires_at=latest), _key(at_now), NOW)
    with pytest.raises(ProtocolError, match="future"):
        validate_record(_record(alice, expires_at=latest + 1), _key(at_now), NOW)


@pytest.mark.parametrize("skew", [-CLOCK_SKEW_ALLOWANCE, CLOCK_SKEW_ALLOWANCE])
def test_an_hour_of_clock_skew_either_way_is_harmless(alice: Identity, skew: int) -> None:
    # The signer's clock is off by an hour and it asks for the longest or a short lifetime.
    for ttl in (MAX_RECORD_TTL, 2 * CLOCK_SKEW_ALLOWANCE):
        record = _record(alice, expires_at=T + skew + ttl)
        validate_record(record, _key(record), NOW)


def test_record_value_size_limit(alice: Identity) -> None:
    biggest = _record(alice, value=b"\xaa" * MAX_VALUE_BYTES)
    data = encode_record(biggest)
    assert len(data) <= MAX_ENCODED_RECORD_BYTES
    validate_record(decode_record(data), _key(biggest), NOW)
    with pytest.raises(ValueError, match="value"):
        _record(alice, value=b"\xaa" * (MAX_VALUE_BYTES + 1))
    # A peer that signs an oversized value anyway is refused by the validator and by the decoder.
    value = b"\xaa" * (MAX_VALUE_BYTES + 1)
    signature = alice.sign(record_message(RecordKind.PEER, alice.public.key, 1, T + DAY, value))
    oversized = SignedRecord(RecordKind.PEER, alice.public.key, 1, T + DAY, value, signature)
    with pytest.raises(ProtocolError, match="value"):
        validate_record(oversized, _key(biggest), NOW)
    wire = msgpack.packb([1, alice.public.key, 1, T + DAY, value, signature])
    with pytest.raises(ProtocolError):
        decode_record(wire)


def test_decoders_refuse_input_over_their_limit_before_unpacking() -> None:
    for decode, limit in (
        (decode_record, MAX_ENCODED_RECORD_BYTES),
        (decode_entry, MAX_ENCODED_ENTRY_BYTES),
        (decode_tombstone, MAX_ENCODED_TOMBSTONE_BYTES),
    ):
        with pytest.raises(ProtocolError, match="over the"):
            decode(b"\x00" * (limit + 1))


@pytest.mark.parametrize("kind", [0, 3, 255, -1, True, "1"])
def test_unknown_record_kinds_are_refused(alice: Identity, kind: object) -> None:
    wire = msgpack.packb([kind, alice.public.key, 1, T + DAY, b"", bytes(64)])
    with pytest.raises(ProtocolError, match="kind"):
        decode_record(wire)


def test_seq_limit(alice: Identity) -> None:
    record = _record(alice, seq=MAX_SEQ)
    validate_record(decode_record(encode_record(record)), _key(record), NOW)
    with pytest.raises(ValueError, match="seq"):
        _record(alice, seq=MAX_SEQ + 1)
    with pytest.raises(ProtocolError, match="seq"):
        decode_record(msgpack.packb([1, alice.public.key, MAX_SEQ + 1, T + DAY, b"", bytes(64)]))


def test_validators_refuse_python_objects_with_wrong_field_types(alice: Identity) -> None:
    record = _record(alice)
    for bad in (
        dataclasses.replace(record, value="text"),  # type: ignore[arg-type]
        dataclasses.replace(record, seq=1.0),  # type: ignore[arg-type]
        dataclasses.replace(record, kind=9),  # type: ignore[arg-type]
        dataclasses.replace(record, signature=bytearray(record.signature)),  # type: ignore[arg-type]
    ):
        with pytest.raises(ProtocolError):
            validate_record(bad, _key(record), NOW)


def test_validators_and_decoders_refuse_the_wrong_python_types(alice: Identity, inbox: Identity) -> None:
    record = _record(alice)
    mailbox = mailbox_key(inbox.public.key)
    entry = make_entry(mailbox, b"x", T + DAY)
    tombstone = sign_tombstone(inbox, _ids(1), T)
    cases: list[tuple[Any, object, NodeId]] = [
        (validate_record, record, _key(record)),
        (validate_entry, entry, mailbox),
        (validate_tombstone, tombstone, mailbox),
    ]
    for validate, value, key in cases:
        with pytest.raises(ProtocolError, match="NodeId"):
            validate(value, key.bytes, NOW)
        with pytest.raises(ProtocolError, match="expected a"):
            validate(object(), key, NOW)
    with pytest.raises(ProtocolError, match="expected a SignedRecord"):
        validate_record(tombstone, _key(record), NOW)  # type: ignore[arg-type]
    for decode, data in ((decode_record, encode_record(record)), (decode_entry, encode_entry(entry))):
        with pytest.raises(ProtocolError, match="bytes"):
            decode(bytearray(data))  # type: ignore[arg-type]


# --- BEP 44 replacement -------------------------------------------------------------------------------------------


def test_should_replace_follows_bep44(alice: Identity) -> None:
    stored = _record(alice, seq=5, value=b"a")
    assert should_replace(None, stored) is True
    assert should_replace(stored, _record(alice, seq=6, value=b"b")) is True
    # Equal seq, identical content: a refresh that changes nothing.
    assert should_replace(stored, _record(alice, seq=5, value=b"a")) is False
    with pytest.raises(ConflictingRecordError):
        should_replace(stored, _record(alice, seq=5, value=b"b"))
    with pytest.raises(ConflictingRecordError):
        should_replace(stored, _record(alice, seq=5, value=b"a", expires_at=T + 2 * DAY))
    with pytest.raises(StaleRecordError, match="stale record"):
        should_replace(stored, _record(alice, seq=4, value=b"a"))
    # Both are ProtocolErrors, so a store that does not care which can count them together.
    assert issubclass(StaleRecordError, ProtocolError)
    assert issubclass(ConflictingRecordError, ProtocolError)


def test_should_replace_refuses_to_compare_records_of_different_keys(alice: Identity, mallory: Identity) -> None:
    with pytest.raises(ValueError, match="one DHT key"):
        should_replace(_record(alice), _record(mallory, seq=9))
    with pytest.raises(ValueError, match="one DHT key"):
        should_replace(_record(alice), _record(alice, kind=RecordKind.PREKEYS, seq=9))


# --- merging what a get collected ---------------------------------------------------------------------------------


def test_merge_picks_the_highest_valid_seq_and_ignores_forgeries(alice: Identity, mallory: Identity) -> None:
    key = peer_record_key(alice.public.key)
    good = [_record(alice, seq=seq, value=bytes([seq])) for seq in (1, 3, 2)]
    forged_high = SignedRecord(
        RecordKind.PEER,
        alice.public.key,
        99,
        T + DAY,
        b"evil",
        mallory.sign(record_message(RecordKind.PEER, alice.public.key, 99, T + DAY, b"evil")),
    )
    expired_high = _record(alice, seq=50, expires_at=T)
    wrong_key = _record(mallory, seq=70)
    candidates = [*good, forged_high, expired_high, wrong_key]
    for seed in range(5):
        random.Random(seed).shuffle(candidates)
        result = merge_records(candidates, key, NOW)
        assert result.record == good[1]
        assert result.conflict is False
        assert result.invalid == 3


def test_merge_of_nothing_valid_is_none(alice: Identity, mallory: Identity) -> None:
    key = peer_record_key(alice.public.key)
    assert merge_records([], key, NOW).record is None
    result = merge_records([_record(mallory), _record(alice, expires_at=T)], key, NOW)
    assert result.record is None
    assert result.invalid == 2


def test_merge_flags_equivocation_and_resolves_it_the_same_way_everywhere(alice: Identity) -> None:
    key = peer_record_key(alice.public.key)
    versions = [_record(alice, seq=4, value=bytes([i])) for i in range(4)]
    expected = min(versions, key=lambda record: record.signature)
    for seed in range(5):
        shuffled = [*versions, _record(alice, seq=3)]
        random.Random(seed).shuffle(shuffled)
        result = merge_records(shuffled, key, NOW)
        assert result.record == expected
        assert result.conflict is True


def test_merge_verifies_identical_replicas_once(alice: Identity, monkeypatch: pytest.MonkeyPatch) -> None:
    record = _record(alice, seq=2)
    replicas = [decode_record(encode_record(record)) for _ in range(20)]
    calls = []
    real_verify = records._verify

    def counting_verify(*args: Any) -> None:
        calls.append(args)
        real_verify(*args)

    monkeypatch.setattr(records, "_verify", counting_verify)
    result = merge_records(replicas, _key(record), NOW)
    assert result.record == record
    assert result.conflict is False
    assert len(calls) == 1


# --- mailbox entries ----------------------------------------------------------------------------------------------


def test_entry_round_trip(inbox: Identity) -> None:
    mailbox = mailbox_key(inbox.public.key)
    entry = make_entry(mailbox, b"sealed envelope", entry_expiry(NOW))
    assert entry.expires_at == T + DEFAULT_MAILBOX_TTL
    assert len(entry.entry_id) == ENTRY_ID_BYTES
    decoded = decode_entry(encode_entry(entry))
    assert decoded == entry
    validate_entry(decoded, mailbox, NOW)


def test_entry_id_binds_mailbox_expiry_and_payload(inbox: Identity, mallory: Identity) -> None:
    mailbox = mailbox_key(inbox.public.key)
    entry = make_entry(mailbox, b"sealed envelope", T + DAY)
    for bad in (
        dataclasses.replace(entry, payload=b"sealed envelopf"),
        dataclasses.replace(entry, expires_at=entry.expires_at + 1),
        dataclasses.replace(entry, entry_id=_flip(entry.entry_id, 0)),
    ):
        with pytest.raises(ProtocolError, match="entry id"):
            validate_entry(bad, mailbox, NOW)
    # The same entry copied under another mailbox's key.
    with pytest.raises(ProtocolError, match="entry id"):
        validate_entry(entry, mailbox_key(mallory.public.key), NOW)
    for bit in range(ENTRY_ID_BYTES * 8):
        assert _rejected(validate_entry, dataclasses.replace(entry, entry_id=_flip(entry.entry_id, bit)), mailbox, NOW)


def test_mailbox_ttl_rules(inbox: Identity) -> None:
    mailbox = mailbox_key(inbox.public.key)
    latest = T + MAX_MAILBOX_TTL + CLOCK_SKEW_ALLOWANCE
    validate_entry(make_entry(mailbox, b"x", latest), mailbox, NOW)
    with pytest.raises(ProtocolError, match="future"):
        validate_entry(make_entry(mailbox, b"x", latest + 1), mailbox, NOW)
    with pytest.raises(ProtocolError, match="expired"):
        validate_entry(make_entry(mailbox, b"x", T), mailbox, NOW)
    validate_entry(make_entry(mailbox, b"x", T + 1), mailbox, NOW)
    # A sender whose clock is an hour ahead, asking for the longest lifetime, is still accepted.
    validate_entry(make_entry(mailbox, b"x", entry_expiry(NOW + CLOCK_SKEW_ALLOWANCE, MAX_MAILBOX_TTL)), mailbox, NOW)
    assert entry_expiry(NOW, MAX_MAILBOX_TTL) == T + MAX_MAILBOX_TTL
    for ttl in (0, -1, MAX_MAILBOX_TTL + 1):
        with pytest.raises(ValueError, match="TTL"):
            entry_expiry(NOW, ttl)


def test_entry_payload_size_limit(inbox: Identity) -> None:
    mailbox = mailbox_key(inbox.public.key)
    entry = make_entry(mailbox, b"\x55" * MAX_VALUE_BYTES, T + DAY)
    data = encode_entry(entry)
    assert len(data) <= MAX_ENCODED_ENTRY_BYTES
    validate_entry(decode_entry(data), mailbox, NOW)
    for size in (0, MAX_VALUE_BYTES + 1):
        payload = b"\x55" * size
        with pytest.raises(ValueError, match="payload"):
            make_entry(mailbox, payload, T + DAY)
        with pytest.raises(ProtocolError, match="payload"):
            validate_entry(MailboxEntry(entry_id(mailbox, T + DAY, payload), T + DAY, payload), mailbox, NOW)
        with pytest.raises(ProtocolError, match="payload"):
            decode_entry(msgpack.packb([entry_id(mailbox, T + DAY, payload), T + DAY, payload]))


# --- tombstones ---------------------------------------------------------------------------------------------------


def _ids(count: int) -> list[bytes]:
    return [i.to_bytes(ENTRY_ID_BYTES, "big") for i in range(count)]


def test_tombstone_round_trip(inbox: Identity) -> None:
    mailbox = mailbox_key(inbox.public.key)
    tombstone = sign_tombstone(inbox, _ids(3), T)
    decoded = decode_tombstone(encode_tombstone(tombstone))
    assert decoded == tombstone
    validate_tombstone(decoded, mailbox, NOW)
    assert tombstone_expires_at(tombstone) == T + TOMBSTONE_LIFETIME


def test_tombstone_signed_by_another_key_is_refused(inbox: Identity, mallory: Identity) -> None:
    mailbox = mailbox_key(inbox.public.key)
    ids = tuple(_ids(2))
    forged = Tombstone(inbox.public.key, ids, T, mallory.sign(tombstone_message(inbox.public.key, ids, T)))
    with pytest.raises(ProtocolError, match="signature"):
        validate_tombstone(forged, mailbox, NOW)
    # Mallory's own valid tombstone sent to the storers of Alice's mailbox.
    with pytest.raises(ProtocolError, match="DHT key"):
        validate_tombstone(sign_tombstone(mallory, ids, T), mailbox, NOW)


def test_every_bit_of_a_tombstone_matters(inbox: Identity) -> None:
    mailbox = mailbox_key(inbox.public.key)
    tombstone = sign_tombstone(inbox, _ids(2), T)
    for bit in range(64 * 8):
        assert _rejected(
            validate_tombstone, dataclasses.replace(tombstone, signature=_flip(tombstone.signature, bit)), mailbox, NOW
        )
    for bit in range(ENTRY_ID_BYTES * 8):
        ids = (_flip(tombstone.entry_ids[0], bit), tombstone.entry_ids[1])
        assert _rejected(validate_tombstone, dataclasses.replace(tombstone, entry_ids=ids), mailbox, NOW)
    for bit in range(20):
        bad = dataclasses.replace(tombstone, issued_at=tombstone.issued_at ^ (1 << bit))
        assert _rejected(validate_tombstone, bad, mailbox, NOW)
    for bit in range(32 * 8):
        bad = dataclasses.replace(tombstone, mailbox_public_key=_flip(tombstone.mailbox_public_key, bit))
        assert _rejected(validate_tombstone, bad, mailbox, NOW)
        assert _rejected(validate_tombstone, bad, mailbox_key(bad.mailbox_public_key), NOW)
    data = encode_tombstone(tombstone)
    for bit in range(len(data) * 8):
        assert _rejected(lambda raw: validate_tombstone(decode_tombstone(raw), mailbox, NOW), _flip(data, bit))


def test_tombstone_id_count_limit(inbox: Identity) -> None:
    mailbox = mailbox_key(inbox.public.key)
    full = sign_tombstone(inbox, _ids(MAX_TOMBSTONE_IDS), T)
    data = encode_tombstone(full)
    assert len(data) <= MAX_ENCODED_TOMBSTONE_BYTES
    validate_tombstone(decode_tombstone(data), mailbox, NOW)
    too_many = tuple(_ids(MAX_TOMBSTONE_IDS + 1))
    with pytest.raises(ValueError, match="items"):
        sign_tombstone(inbox, too_many, T)
    signature = inbox.sign(tombstone_message(inbox.public.key, too_many, T))
    with pytest.raises(ProtocolError, match="items"):
        validate_tombstone(Tombstone(inbox.public.key, too_many, T, signature), mailbox, NOW)
    # The decoder's size guard already refuses it, before unpacking anything.
    with pytest.raises(ProtocolError, match="over the"):
        decode_tombstone(msgpack.packb([inbox.public.key, list(too_many), T, signature]))
    with pytest.raises(ValueError, match="items"):
        sign_tombstone(inbox, [], T)


def test_tombstone_with_a_repeated_id_is_refused(inbox: Identity) -> None:
    ids = (b"\x01" * 16, b"\x01" * 16)
    with pytest.raises(ValueError, match="once"):
        sign_tombstone(inbox, ids, T)
    signed = Tombstone(inbox.public.key, ids, T, inbox.sign(tombstone_message(inbox.public.key, ids, T)))
    with pytest.raises(ProtocolError, match="twice"):
        validate_tombstone(signed, mailbox_key(inbox.public.key), NOW)


def test_tombstone_time_window(inbox: Identity) -> None:
    mailbox = mailbox_key(inbox.public.key)
    validate_tombstone(sign_tombstone(inbox, _ids(1), T + CLOCK_SKEW_ALLOWANCE), mailbox, NOW)
    with pytest.raises(ProtocolError, match="future"):
        validate_tombstone(sign_tombstone(inbox, _ids(1), T + CLOCK_SKEW_ALLOWANCE + 1), mailbox, NOW)
    # Old enough that nothing it names can still exist: refused.  One second younger: still useful.
    oldest = T - TOMBSTONE_LIFETIME + 1
    validate_tombstone(sign_tombstone(inbox, _ids(1), oldest), mailbox, NOW)
    with pytest.raises(ProtocolError, match="too old"):
        validate_tombstone(sign_tombstone(inbox, _ids(1), oldest - 1), mailbox, NOW)
    # Any entry a tombstone can name expires before the tombstone does, whatever the two clocks say.
    written_at = T - CLOCK_SKEW_ALLOWANCE
    latest_entry_expiry = written_at + MAX_MAILBOX_TTL + CLOCK_SKEW_ALLOWANCE
    issued_by_slow_clock = written_at - CLOCK_SKEW_ALLOWANCE
    tombstone = sign_tombstone(inbox, _ids(1), issued_by_slow_clock)
    assert tombstone_expires_at(tombstone) >= latest_entry_expiry


# --- fuzzing: ProtocolError and nothing else ----------------------------------------------------------------------


def _valid_encodings() -> list[tuple[Any, bytes]]:
    alice = Identity.from_seed(SEED)
    inbox = Identity.from_seed(b"\x11" * 32)
    mailbox = mailbox_key(inbox.public.key)
    return [
        (decode_record, encode_record(_record(alice, value=b"value"))),
        (decode_entry, encode_entry(make_entry(mailbox, b"payload", T + DAY))),
        (decode_tombstone, encode_tombstone(sign_tombstone(inbox, _ids(3), T))),
    ]


VALID = _valid_encodings()
DECODERS = [decode_record, decode_entry, decode_tombstone]


def _validate_any(value: object) -> None:
    alice = Identity.from_seed(SEED)
    inbox = Identity.from_seed(b"\x11" * 32)
    if isinstance(value, SignedRecord):
        validate_record(value, peer_record_key(alice.public.key), NOW)
    elif isinstance(value, MailboxEntry):
        validate_entry(value, mailbox_key(inbox.public.key), NOW)
    else:
        assert isinstance(value, Tombstone)
        validate_tombstone(value, mailbox_key(inbox.public.key), NOW)


@FAST
@given(st.binary(max_size=400))
def test_decoders_on_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    for decode in DECODERS:
        try:
            value = decode(data)
        except ProtocolError:
            continue
        with pytest.raises(ProtocolError):
            _validate_any(value)


@FAST
@given(st.sampled_from(range(len(VALID))), st.data())
def test_mutated_encodings_decode_and_validate_or_raise_protocol_error(which: int, data: st.DataObject) -> None:
    decode, valid = VALID[which]
    mutated = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        position = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        if action == "flip" and mutated:
            mutated[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set" and mutated:
            mutated[position] = data.draw(st.integers(0, 255))
        elif action == "insert":
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and mutated:
            del mutated[position]
        elif action == "truncate":
            del mutated[position:]
    for any_decode in DECODERS:
        try:
            value = any_decode(bytes(mutated))
        except ProtocolError:
            continue
        try:
            _validate_any(value)
        except ProtocolError:
            continue
        # Surviving both means the mutation re-spelled the very value that was signed or hashed.
        assert any_decode is decode
        assert value == decode(valid)


_records_wire = st.tuples(
    st.integers(-2, 4),
    st.binary(min_size=30, max_size=33),
    st.integers(-1, 2**64 - 1),
    st.integers(-1, 2**64 - 1),
    st.binary(max_size=40),
    st.binary(min_size=63, max_size=65),
)


@FAST
@given(_records_wire)
def test_structurally_plausible_records_raise_only_protocol_error(fields: tuple[Any, ...]) -> None:
    try:
        record = decode_record(msgpack.packb(list(fields)))
    except ProtocolError:
        return
    with pytest.raises(ProtocolError):
        validate_record(record, peer_record_key(record.owner_key), NOW)
