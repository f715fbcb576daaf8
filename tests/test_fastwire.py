"""The compiled msgspec decoders against the reference schema checks they stand in for.

The contract (see :mod:`p2pchat.core.fastwire`): on valid input the fast path returns exactly what the reference
returns -- the same values of the same types -- and it never accepts what the reference refuses.  It may refuse
more (the reference then decides), so every check below is one-sided where it has to be and exact where it can be.
"""

from __future__ import annotations

import gc
import importlib
import math
import pkgutil
import random
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from schema_strategies import Everything, Pair, struct_strategy

import p2pchat.core
from p2pchat.core import fastwire, framing
from p2pchat.core.framing import decode_datagram, decode_struct, encode_datagram, encode_struct, unpack_strict
from p2pchat.core.identity import Identity
from p2pchat.core.nodecert import issue_cert
from p2pchat.core.packets import MAX_ERROR_MESSAGE_BYTES, ErrorReply, NodeInfo, Nodes
from p2pchat.core.schema import PACKETS, STRUCT_MEMO_SIZE, WireStruct, from_wire, schema_of, to_wire
from p2pchat.errors import ProtocolError

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)

CERT = issue_cert(Identity.from_seed(bytes(32)), "127.0.0.1", 4000, 1)


def _schema_classes() -> list[type[WireStruct]]:
    """Every schema class the protocol defines, and the test-only ones with a field of every spec kind."""
    for module in pkgutil.iter_modules(p2pchat.core.__path__):
        importlib.import_module(f"p2pchat.core.{module.name}")
    found: list[type[WireStruct]] = [Everything, Pair]
    pending = list(WireStruct.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("p2pchat.") and "__wire_schema__" in cls.__dict__:
            found.append(cls)
    return sorted(set(found), key=lambda cls: (cls.__module__, cls.__name__))


SCHEMA_CLASSES = _schema_classes()


def _same(a: object, b: object) -> bool:
    """Equal values of exactly the same types, all the way down (``==`` alone takes True for 1, 1.0 for 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, WireStruct):
        return all(_same(getattr(a, name), getattr(b, name)) for name in schema_of(type(a)).names)
    if isinstance(a, tuple):
        assert isinstance(b, tuple)
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)  # type: ignore[arg-type]
    return a == b


def _reference(cls: type[WireStruct], data: bytes) -> WireStruct | ProtocolError:
    try:
        return from_wire(cls, unpack_strict(data))
    except ProtocolError as exc:
        return exc


def _fast(cls: type[WireStruct], data: bytes) -> WireStruct | None:
    try:
        return fastwire.fast_decoder(cls)(data)
    except Exception:
        return None


def _agree(cls: type[WireStruct], data: bytes) -> bool:
    """Assert the contract for one input; return whether the fast path accepted it."""
    fast = _fast(cls, data)
    if fast is None:
        return False
    reference = _reference(cls, data)
    assert not isinstance(reference, ProtocolError), f"fast path accepted what the reference refuses: {reference}"
    assert _same(fast, reference), (fast, reference)
    return True


def test_the_protocol_schemas_are_all_found() -> None:
    names = {cls.__name__ for cls in SCHEMA_CLASSES}
    assert {"Found", "Nodes", "NodeInfo", "NodeCert", "SignedRecord", "Header", "RatchetState"} <= names
    assert len(SCHEMA_CLASSES) > 30


@pytest.mark.parametrize("cls", SCHEMA_CLASSES, ids=lambda cls: cls.__name__)
def test_valid_values_take_the_fast_path_and_come_back_the_same(cls: type[WireStruct]) -> None:
    @FAST
    @given(struct_strategy(cls))
    def check(obj: WireStruct) -> None:
        data = encode_struct(obj)
        # msgspec writes what msgpack-python wrote before it, byte for byte: signatures and canonical-form checks
        # elsewhere (ratchet headers) depend on the bytes, and so do nodes running the previous version.
        assert data == msgpack.packb(to_wire(obj))
        decoded = fastwire.fast_decoder(cls)(data)  # raises if the fast path refused a valid value
        assert _same(decoded, obj)
        assert _same(decode_struct(cls, data), obj)

    check()


@pytest.mark.parametrize("cls", SCHEMA_CLASSES, ids=lambda cls: cls.__name__)
def test_mutated_bytes_never_pass_the_fast_path_alone(cls: type[WireStruct]) -> None:
    # Byte flips, inserts and cuts of valid encodings: whatever the fast path accepts, the reference accepts as the
    # same value.
    accepted = 0

    @settings(max_examples=8, deadline=None, derandomize=True, database=None)
    @given(struct_strategy(cls), st.randoms(use_true_random=False))
    def check(obj: WireStruct, rng: random.Random) -> None:
        nonlocal accepted
        base = encode_struct(obj)
        for _ in range(40):
            data = bytearray(base)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(data))
                roll = rng.random()
                if roll < 0.6:
                    data[at] ^= 1 << rng.randrange(8)
                elif roll < 0.8:
                    data[at] = rng.choice((0xC0, 0xC2, 0xC3, 0xCA, 0xCB, 0xCC, 0xD0, 0xD9, 0xC4, 0x90, 0x80, 0xA1))
                elif roll < 0.9:
                    data[at:at] = rng.randbytes(rng.randint(1, 4))
                else:
                    del data[at:]
                    if not data:
                        data = bytearray(b"\x90")
            accepted += _agree(cls, bytes(data))

    check()
    # Some mutations still decode (a flipped bit inside a bytes field), so the comparison in _agree ran.
    assert accepted > 0, f"{cls.__name__}: no mutation decoded"


_ODD_VALUES: list[object] = [
    True,
    False,
    0,
    1,
    -1,
    255,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
    -(1 << 63),
    0.0,
    1.0,
    -1.5,
    math.nan,
    math.inf,
    "",
    "x",
    "é" * 40,
    "\u4e2d" * 200,
    b"",
    b"\x00",
    b"\x7f\x00\x00\x01",
    b"\x00" * 5,
    b"\x01" * 16,
    b"\xff" * 20,
    b"\xab" * 32,
    b"\xcd" * 64,
    [],
    [1],
    [b"\x00" * 20, b"\x7f\x00\x00\x01", 80],
    {},
    {"a": 1},
    None,
    msgpack.ExtType(1, b"x"),
]


@pytest.mark.parametrize("cls", SCHEMA_CLASSES, ids=lambda cls: cls.__name__)
def test_odd_values_in_every_field_never_pass_the_fast_path_alone(cls: type[WireStruct]) -> None:
    # The differences between msgspec and our rules live here: True for 1, 1 for 1.0, uint64 bounds, a str for
    # bytes, characters against UTF-8 bytes, 5-byte addresses, nil, maps and extension types; plus an extra item
    # and a missing one.
    bodies = 0

    @settings(max_examples=3, deadline=None, derandomize=True, database=None)
    @given(struct_strategy(cls))
    def check(obj: WireStruct) -> None:
        nonlocal bodies
        good = to_wire(obj)
        variants = [[*good, 0], good[:-1], good + good]
        for index in range(len(good)):
            for value in _ODD_VALUES:
                bad = list(good)
                bad[index] = value
                variants.append(bad)
        for body in variants:
            _agree(cls, msgpack.packb(body))
        bodies += len(variants)

    check()
    assert bodies >= 3 * len(_ODD_VALUES)


def test_a_string_within_the_character_count_but_over_the_byte_limit_is_refused() -> None:
    # msgspec bounds characters, the schema UTF-8 bytes: the converter must catch the difference.
    message = "é" * MAX_ERROR_MESSAGE_BYTES
    body = msgpack.packb([b"\x00" * 8, 1, message])
    data = bytes((framing.P2P_MAGIC, framing.PROTOCOL_VERSION, ErrorReply.KIND)) + body
    with pytest.raises(ProtocolError, match=r"ErrorReply\.message"):
        decode_datagram(data)
    assert _fast(ErrorReply, body) is None


def test_refusals_read_as_the_reference_words_them(monkeypatch: pytest.MonkeyPatch) -> None:
    body = msgpack.packb([b"\x00" * 20, b"\x7f\x00\x00\x01", 0])
    with pytest.raises(ProtocolError, match=r"^NodeInfo\.port: 0 is outside 1\.\.65535$"):
        decode_struct(NodeInfo, body)
    # And a fast path that refuses everything changes nothing but speed.
    good = encode_struct(NodeInfo(b"\x01" * 20, "127.0.0.1", 80))

    def refuse(cls: type[WireStruct]) -> Callable[[bytes], WireStruct]:
        def decode(data: bytes) -> WireStruct:
            raise RuntimeError("refused")

        return decode

    monkeypatch.setattr(framing, "fast_decoder", refuse)
    assert decode_struct(NodeInfo, good) == NodeInfo(b"\x01" * 20, "127.0.0.1", 80)
    with pytest.raises(ProtocolError, match=r"NodeInfo\.port"):
        decode_struct(NodeInfo, body)


def test_contacts_are_memoised_and_the_memo_is_bounded() -> None:
    decode = fastwire.fast_decoder(NodeInfo)
    body = encode_struct(NodeInfo(b"\x02" * 20, "10.0.0.1", 4000))
    first = decode(body)
    assert decode(body) is first
    memo: dict[Any, Any] | None = fastwire._shadow(NodeInfo).memo
    assert memo is not None
    for port in range(1, STRUCT_MEMO_SIZE + 100):
        decode(encode_struct(NodeInfo(b"\x03" * 20, "10.0.0.1", port)))
    assert len(memo) == STRUCT_MEMO_SIZE
    # A reply's contacts take their hits in one pass and convert the misses: equal contacts, and known ones are
    # the very objects decoded before.
    known = tuple(NodeInfo(bytes([n]) * 20, "10.0.0.2", 5000 + n) for n in range(19))
    fresh = NodeInfo(b"\xee" * 20, "2001:db8::7", 6000)
    first_reply = decode_datagram(encode_datagram(Nodes(b"\x00" * 8, CERT, known)))
    assert isinstance(first_reply, Nodes)
    second_reply = decode_datagram(encode_datagram(Nodes(b"\x01" * 8, CERT, (*known, fresh))))
    assert isinstance(second_reply, Nodes)
    assert second_reply.nodes == (*known, fresh)
    assert all(a is b for a, b in zip(first_reply.nodes, second_reply.nodes[:19], strict=True))


@given(st.data())
@settings(max_examples=20, deadline=None, derandomize=True, database=None)
def test_whole_datagrams_decode_the_same_both_ways(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(list(PACKETS)))
    packet = data.draw(struct_strategy(cls))
    encoded = encode_datagram(packet)
    assert _same(decode_datagram(encoded), packet)


def test_encoded_structs_take_no_more_memory_than_their_bytes() -> None:
    # msgspec's output keeps an allocation up to half as large again as its length; stored records and entries are
    # kept for days, so encode_struct hands back exact-size bytes.
    obj = Everything(0, b"\x01" * 300, None, (), "", "::")
    gc.collect()
    tracemalloc.start()
    try:
        kept = [encode_struct(obj) for _ in range(200)]
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    exact = sum(sys.getsizeof(data) for data in kept) + sys.getsizeof(kept)
    assert used < exact * 1.05, (used, exact)
