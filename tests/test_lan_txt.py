"""The LAN TXT record: round trip, every malformed case, a key that does not hash to the node id, the size limits
reached exactly and exceeded, and a fuzz whose only allowed failure is ProtocolError."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pchat.core.identity import Identity
from p2pchat.core.lan import (
    MAX_TXT_BYTES,
    MAX_TXT_KEY_BYTES,
    MAX_TXT_KEYS,
    MAX_TXT_VALUE_BYTES,
    SERVICE_TYPE,
    TXT_ID,
    TXT_KEY,
    TXT_TCP,
    TXT_UDP,
    TXT_VERSION,
    decode_txt,
    encode_txt,
    service_name,
)
from p2pchat.errors import ProtocolError

_RNG = random.Random(5)
ALICE = Identity.generate(_RNG.randbytes).public
BOB = Identity.generate(_RNG.randbytes).public


def _txt(**changes: bytes | None) -> dict[bytes, bytes | None]:
    props: dict[bytes, bytes | None] = dict(encode_txt(ALICE, udp_port=4000, tcp_port=4001))
    for key, value in changes.items():
        if value is None:
            del props[key.encode()]
        else:
            props[key.encode()] = value
    return props


def test_round_trip() -> None:
    ann = decode_txt(encode_txt(ALICE, udp_port=4000, tcp_port=4001), name=service_name(ALICE.node_id))
    assert (ann.node_id, ann.identity, ann.udp_port, ann.tcp_port) == (ALICE.node_id, ALICE, 4000, 4001)
    assert service_name(ALICE.node_id) == f"{ALICE.node_id.hex()}.{SERVICE_TYPE}"


def test_port_extremes_round_trip_and_tcp_zero_means_no_direct_channel() -> None:
    assert decode_txt(encode_txt(ALICE, udp_port=1, tcp_port=0)).tcp_port == 0
    assert decode_txt(encode_txt(ALICE, udp_port=65535, tcp_port=65535)).udp_port == 65535


@pytest.mark.parametrize(("udp", "tcp"), [(0, 1), (65536, 1), (1, -1), (1, 65536)])
def test_encoding_refuses_ports_out_of_range(udp: int, tcp: int) -> None:
    with pytest.raises(ValueError, match="port"):
        encode_txt(ALICE, udp_port=udp, tcp_port=tcp)


def test_a_key_that_does_not_hash_to_the_node_id_is_refused() -> None:
    with pytest.raises(ProtocolError, match="does not hash"):
        decode_txt(_txt(key=BOB.key.hex().encode()))


def test_a_service_name_that_is_not_the_node_id_is_refused() -> None:
    with pytest.raises(ProtocolError, match="instance name"):
        decode_txt(_txt(), name=service_name(BOB.node_id))


@pytest.mark.parametrize("field", ["v", "id", "key", "udp", "tcp"])
def test_every_missing_field_is_refused(field: str) -> None:
    with pytest.raises(ProtocolError, match="missing"):
        decode_txt(_txt(**{field: None}))


@pytest.mark.parametrize("field", ["v", "id", "key", "udp", "tcp"])
def test_every_empty_or_valueless_field_is_refused(field: str) -> None:
    with pytest.raises(ProtocolError):
        decode_txt(_txt(**{field: b""}))
    props = _txt()
    props[field.encode()] = None  # "key" without "=" in the TXT string
    with pytest.raises(ProtocolError):
        decode_txt(props)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("v", b"2"),
        ("v", b"0"),
        ("v", b"01"),
        ("v", b"x"),
        ("id", ALICE.node_id.hex().upper().encode()),
        ("id", ALICE.node_id.hex().encode()[:-2]),
        ("id", b"zz" * 20),
        ("key", ALICE.key.hex().upper().encode()),
        ("key", b" " + ALICE.key.hex().encode()[1:]),
        ("key", ALICE.key.hex().encode()[:-2]),
        ("udp", b"0"),
        ("udp", b"65536"),
        ("udp", b"04000"),
        ("udp", b"-1"),
        ("udp", b"+4000"),
        ("udp", b"4000 "),
        ("udp", b"123456"),
        ("tcp", b"65536"),
        ("tcp", b"00"),
        ("tcp", "٤".encode()),  # a non-ASCII digit int() would accept
    ],
)
def test_malformed_fields_are_refused(field: str, value: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_txt(_txt(**{field: value}))


def test_unknown_version_says_so() -> None:
    with pytest.raises(ProtocolError, match="unknown LAN protocol version 2"):
        decode_txt(_txt(v=b"2"))


@pytest.mark.parametrize("properties", [None, b"v=1", [(TXT_VERSION, b"1")], "v=1", 7])
def test_non_mappings_are_refused(properties: object) -> None:
    with pytest.raises(ProtocolError, match="mapping"):
        decode_txt(properties)


def test_non_bytes_keys_and_values_are_refused() -> None:
    with pytest.raises(ProtocolError, match="bytes"):
        bad_key: dict[object, object] = {"v": b"1"}
        for key, value in _txt().items():
            bad_key[key] = value
        decode_txt(bad_key)
    with pytest.raises(ProtocolError, match="bytes"):
        decode_txt({**_txt(), TXT_UDP: 4000})


def test_unknown_keys_are_ignored_up_to_the_key_limit() -> None:
    props = _txt()
    for i in range(MAX_TXT_KEYS - len(props)):
        props[f"x{i}".encode()] = b"1"
    assert len(props) == MAX_TXT_KEYS
    assert decode_txt(props).node_id == ALICE.node_id
    props[b"one_more"] = b"1"
    with pytest.raises(ProtocolError, match="keys"):
        decode_txt(props)


def test_key_length_limit() -> None:
    assert decode_txt({**_txt(), b"k" * MAX_TXT_KEY_BYTES: b"1"}).udp_port == 4000
    with pytest.raises(ProtocolError, match="key of"):
        decode_txt({**_txt(), b"k" * (MAX_TXT_KEY_BYTES + 1): b"1"})
    with pytest.raises(ProtocolError, match="key of"):
        decode_txt({**_txt(), b"": b"1"})


def test_value_length_limit() -> None:
    assert decode_txt({**_txt(), b"pad": b"p" * MAX_TXT_VALUE_BYTES}).udp_port == 4000
    with pytest.raises(ProtocolError, match="value of"):
        decode_txt({**_txt(), b"pad": b"p" * (MAX_TXT_VALUE_BYTES + 1)})


def _wire_size(props: dict[bytes, bytes | None]) -> int:
    return sum(1 + len(k) + (0 if v is None else 1 + len(v)) for k, v in props.items())


def test_total_size_limit_reached_exactly_then_exceeded() -> None:
    props = _txt()
    i = 0
    while _wire_size(props) + 1 + 3 + 1 + MAX_TXT_VALUE_BYTES <= MAX_TXT_BYTES:
        props[f"p{i:02d}".encode()] = b"p" * MAX_TXT_VALUE_BYTES
        i += 1
    room = MAX_TXT_BYTES - _wire_size(props) - 1 - 3 - 1
    props[b"end"] = b"p" * room
    assert _wire_size(props) == MAX_TXT_BYTES
    assert len(props) <= MAX_TXT_KEYS
    assert decode_txt(props).udp_port == 4000
    props[b"end"] = b"p" * (room + 1)
    with pytest.raises(ProtocolError, match=f"the limit is {MAX_TXT_BYTES}"):
        decode_txt(props)


_fields = st.sampled_from([TXT_VERSION, TXT_ID, TXT_KEY, TXT_UDP, TXT_TCP])
_values = st.one_of(st.none(), st.binary(max_size=80), st.integers(), st.text(max_size=10))
_keys = st.one_of(_fields, st.binary(max_size=12), st.text(max_size=4))


@given(st.dictionaries(_keys, _values, max_size=20))
def test_fuzz_arbitrary_properties_only_raise_protocol_error(props: dict[object, object]) -> None:
    with contextlib.suppress(ProtocolError):
        decode_txt(props)


@given(st.sampled_from([TXT_VERSION, TXT_ID, TXT_KEY, TXT_UDP, TXT_TCP]), st.binary(max_size=70), st.booleans())
def test_fuzz_one_field_mutated_either_decodes_consistently_or_raises_protocol_error(
    field: bytes, value: bytes, drop: bool
) -> None:
    props = dict(_txt())
    if drop:
        del props[field]
    else:
        props[field] = value
    try:
        ann = decode_txt(props)
    except ProtocolError:
        return
    assert ann.identity.node_id == ann.node_id
    assert 0 < ann.udp_port < 65536 and 0 <= ann.tcp_port < 65536
