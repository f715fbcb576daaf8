"""The packet codec: schemas, p2pchat datagrams and rpcudp compat frames.

The decoder invariant under test everywhere: for any input bytes, decoding returns a valid typed packet or raises
ProtocolError -- never another exception.  Every rejection is checked as a whole datagram and as a stream frame
fed one byte at a time.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import struct
from dataclasses import dataclass
from typing import Annotated, Any, cast

import msgpack  # type: ignore[import-untyped]
import pytest
import umsgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from schema_strategies import TEST_PACKETS, Everything, Pair, any_packet, struct_strategy

from p2pchat.core import packets, schema
from p2pchat.core.framing import (
    MAX_DATAGRAM_SIZE,
    MAX_RPCUDP_BODY,
    MAX_RPCUDP_DATAGRAM,
    MAX_RPCUDP_DEPTH,
    MAX_RPCUDP_NAME_BYTES,
    MAX_STREAM_FRAME,
    P2P_HEADER_SIZE,
    P2P_MAGIC,
    PROTOCOL_VERSION,
    RPCUDP_HEADER_SIZE,
    DatagramKind,
    FrameDecoder,
    RpcudpRequest,
    RpcudpResponse,
    classify_datagram,
    decode_datagram,
    decode_packet,
    decode_rpcudp,
    encode_datagram,
    encode_frame,
    encode_packet,
    encode_rpcudp_request,
    encode_rpcudp_response,
)
from p2pchat.core.identity import Identity
from p2pchat.core.nodecert import issue_cert
from p2pchat.core.packets import (
    MAX_ERROR_CODE,
    MAX_ERROR_MESSAGE_BYTES,
    MAX_NODES_PER_REPLY,
    MAX_PORT,
    TXID_BYTES,
    ErrorReply,
    FindNode,
    NodeInfo,
    Nodes,
    Ping,
    Pong,
)
from p2pchat.core.parts import Part
from p2pchat.core.schema import (
    IP_CACHE_SIZE,
    MAX_PACKET_KIND,
    MSGPACK_INT_MAX,
    MSGPACK_INT_MIN,
    PACKETS,
    Bool,
    Bytes,
    Float,
    Int,
    IpAddress,
    List,
    Optional,
    Packet,
    PacketRegistry,
    Spec,
    Str,
    Struct,
    WireStruct,
    from_wire,
    max_wire_size,
    packet,
    schema_of,
    to_wire,
    wire_struct,
)
from p2pchat.errors import ProtocolError

# Deterministic (style guide: seeded randomness) and quick: the whole file stays well under 15 s.
FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None)

TXID = bytes(range(TXID_BYTES))
NODE_ID = bytes(range(20))
CERT = issue_cert(Identity.from_seed(bytes(32)), "2001:db8::1", 65535, 2**40)
CERT_WIRE = to_wire(CERT)  # [key, packed host, port, issued_at, signature]: the raw form in hand-built bodies


def _frame_one_byte_at_a_time(payload: bytes) -> list[bytes]:
    decoder = FrameDecoder()
    frames: list[bytes] = []
    for byte in struct.pack(">I", len(payload)) + payload:
        decoder.feed(bytes([byte]))
        frames.extend(decoder.frames())
    decoder.feed_eof()
    return frames


def _decode_via_stream(payload: bytes) -> Packet:
    """Send *payload* as one stream frame, one byte at a time, and decode the packet in it."""
    (frame,) = _frame_one_byte_at_a_time(payload)
    return decode_packet(frame, max_size=MAX_STREAM_FRAME)


# --- round trips --------------------------------------------------------------------------------------------------


def test_packet_kind_table_is_stable() -> None:
    # Kinds are wire numbers: changing one breaks every deployed node.
    expected = {
        1: Ping,
        2: Pong,
        3: FindNode,
        4: Nodes,
        5: ErrorReply,
        6: packets.FindValue,
        7: packets.Found,
        8: packets.GetPart,
        9: packets.PartReply,
        10: packets.ListEntries,
        11: packets.EntryIds,
        12: packets.Store,
        13: packets.Stored,
    }
    assert {cls.KIND: cls for cls in PACKETS} == expected


@FAST
@given(any_packet)
def test_every_packet_kind_round_trips(pkt: Packet) -> None:
    data = encode_datagram(pkt)
    assert len(data) <= MAX_DATAGRAM_SIZE
    assert data[:3] == bytes((P2P_MAGIC, PROTOCOL_VERSION, pkt.KIND))
    assert decode_datagram(data) == pkt
    assert from_wire(type(pkt), to_wire(pkt)) == pkt


@FAST
@given(any_packet)
def test_every_packet_kind_round_trips_through_a_stream(pkt: Packet) -> None:
    payload = encode_packet(pkt, max_size=MAX_STREAM_FRAME)
    assert _decode_via_stream(payload) == pkt


@FAST
@given(struct_strategy(Everything))
def test_every_spec_round_trips(pkt: Everything) -> None:
    data = encode_datagram(pkt)
    assert decode_datagram(data, registry=TEST_PACKETS) == pkt


def test_every_registered_packet_fits_a_datagram() -> None:
    for cls in PACKETS:
        assert P2P_HEADER_SIZE + max_wire_size(cls) <= MAX_DATAGRAM_SIZE, cls.__name__


def _largest_nodes() -> Nodes:
    longest_ipv6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    info = NodeInfo(node_id=b"\xff" * 20, host=longest_ipv6, port=MAX_PORT)
    return Nodes(txid=TXID, responder=CERT, nodes=(info,) * MAX_NODES_PER_REPLY)


def test_nodes_with_twenty_ipv6_contacts_fits_a_datagram() -> None:
    data = encode_datagram(_largest_nodes())
    assert len(data) == P2P_HEADER_SIZE + max_wire_size(Nodes)
    assert len(data) <= MAX_DATAGRAM_SIZE
    assert decode_datagram(data) == _largest_nodes()


def test_longest_error_message_is_accepted() -> None:
    # Two-byte characters, so the limit is in encoded bytes, not characters.
    message = "é" * (MAX_ERROR_MESSAGE_BYTES // 2)
    pkt = ErrorReply(txid=TXID, code=MAX_ERROR_CODE, message=message)
    data = encode_datagram(pkt)
    assert len(data) == P2P_HEADER_SIZE + max_wire_size(ErrorReply)
    assert decode_datagram(data) == pkt


def test_max_wire_size_is_exact_for_the_largest_values() -> None:
    largest = Everything(
        wide=MSGPACK_INT_MIN,
        maybe_blob=b"x" * 300,
        maybe_pair=Pair(flag=True, ratio=-1.0),
        grid=((-200, -200, -200),) * 16,
        label="x" * 40,
        host="ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    )
    assert len(msgpack.packb(to_wire(largest))) == max_wire_size(Everything)
    assert len(msgpack.packb(MSGPACK_INT_MAX)) == Int(min_value=0, max_value=MSGPACK_INT_MAX).max_wire_size


@pytest.mark.parametrize(
    ("low", "high"),
    [(0, 127), (-32, 0), (0, 128), (-33, 0), (0, 255), (0, 256), (-128, 0), (-129, 0), (0, 65535), (0, 65536),
     (-32768, 0), (-32769, 0), (0, 2**32 - 1), (0, 2**32), (-(2**31), 0), (-(2**31) - 1, 0)],
)  # fmt: skip
def test_int_max_wire_size_matches_msgpack(low: int, high: int) -> None:
    expected = max(len(msgpack.packb(low)), len(msgpack.packb(high)))
    assert Int(min_value=low, max_value=high).max_wire_size == expected


@pytest.mark.parametrize("length", [0, 31, 32, 255, 256, 65535, 65536])
def test_str_bytes_and_list_max_wire_sizes_match_msgpack(length: int) -> None:
    assert Str(max_bytes=length).max_wire_size == len(msgpack.packb("x" * length))
    assert Bytes(max_len=length).max_wire_size == len(msgpack.packb(b"x" * length))
    assert List(item=Bool(), max_items=length).max_wire_size == len(msgpack.packb([True] * length))


def test_ip_addresses_travel_packed_and_come_back_canonical() -> None:
    pong = Pong(txid=TXID, responder=CERT, observed_host="2001:db8::1", observed_port=4000)
    assert to_wire(pong)[2] == bytes.fromhex("20010db8000000000000000000000001")
    assert decode_datagram(encode_datagram(pong)) == pong
    v4 = Pong(txid=TXID, responder=CERT, observed_host="192.0.2.7", observed_port=1)
    assert to_wire(v4)[2] == bytes([192, 0, 2, 7])


def test_ip_conversion_caches_are_bounded() -> None:
    spec = IpAddress()
    for i in range(IP_CACHE_SIZE + 10):
        packed = i.to_bytes(4, "big")
        assert spec.to_wire(spec.check(packed)) == packed
    assert schema._ip_text.cache_info().currsize == IP_CACHE_SIZE
    assert schema._ip_packed.cache_info().currsize == IP_CACHE_SIZE


# --- rejections ---------------------------------------------------------------------------------------------------


def _dgram(kind: int, body: object, *, version: int = PROTOCOL_VERSION, magic: int = P2P_MAGIC) -> bytes:
    body_bytes: bytes = msgpack.packb(body)
    return bytes((magic, version, kind)) + body_bytes


def _raw(kind: int, body: bytes) -> bytes:
    return bytes((P2P_MAGIC, PROTOCOL_VERSION, kind)) + body


def _node(node_id: object = NODE_ID, host: object = b"\x7f\x00\x00\x01", port: object = 4000) -> list[object]:
    return [node_id, host, port]


def _cert(**changes: object) -> list[object]:
    """CERT's wire form with some fields replaced (by NodeCert field name)."""
    wire = list(CERT_WIRE)
    names = schema_of(type(CERT)).names
    for name, value in changes.items():
        wire[names.index(name)] = value
    return wire


_VALID_PING = _dgram(1, [TXID, CERT_WIRE])

REJECTED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "too short"),
    ("header only", bytes((P2P_MAGIC, PROTOCOL_VERSION, 1)), "too short"),
    ("bad magic", b"\x51" + _VALID_PING[1:], "magic"),
    ("rpcudp byte is not our magic", b"\x00" + _VALID_PING[1:], "magic"),
    ("unknown version 2", _dgram(1, [TXID, CERT_WIRE], version=2), "version 2"),
    ("unknown version 0", _dgram(1, [TXID, CERT_WIRE], version=0), "version 0"),
    ("unknown kind 0", _dgram(0, [TXID, CERT_WIRE]), "kind 0"),
    ("unknown kind 99", _dgram(99, [TXID, CERT_WIRE]), "kind 99"),
    ("oversize", _dgram(4, [TXID, CERT_WIRE, []]) + b"\xc0" * MAX_DATAGRAM_SIZE, "limit"),
    ("trailing byte", _VALID_PING + b"\xc0", "ExtraData"),
    ("trailing packet", _VALID_PING + _VALID_PING[3:], "ExtraData"),
    ("body is a map", _dgram(1, {"txid": TXID, "sender": CERT_WIRE}), "expected an array"),
    ("body is an int", _dgram(1, 1), "expected an array"),
    ("body is nil", _dgram(1, None), "expected an array"),
    ("too few fields", _dgram(1, []), "expected 2 fields"),
    ("too many fields", _dgram(1, [TXID, CERT_WIRE, TXID]), "expected 2 fields"),
    ("Pong missing port", _dgram(2, [TXID, CERT_WIRE, b"\x7f\x00\x00\x01"]), "expected 4 fields"),
    ("Ping sender missing", _dgram(1, [TXID]), "Ping: expected 2 fields, got 1"),
    ("FindNode sender missing", _dgram(3, [TXID, NODE_ID]), "FindNode: expected 3 fields, got 2"),
    ("Pong responder missing", _dgram(2, [TXID, b"\x7f\x00\x00\x01", 80]), "Pong: expected 4 fields, got 3"),
    ("Nodes responder missing", _dgram(4, [TXID, []]), "Nodes: expected 3 fields, got 2"),
    ("Pong responder nil", _dgram(2, [TXID, None, b"\x7f\x00\x00\x01", 80]), "Pong.responder: expected an array"),
    ("Nodes responder nil", _dgram(4, [TXID, None, []]), "Nodes.responder: expected an array"),
    ("sender not an array", _dgram(1, [TXID, CERT.key]), "Ping.sender: expected an array, got bytes"),
    ("responder not an array", _dgram(4, [TXID, CERT.key, []]), "Nodes.responder: expected an array, got bytes"),
    ("sender wrong arity", _dgram(3, [TXID, CERT_WIRE[:4], NODE_ID]), "FindNode.sender: expected 5 fields, got 4"),
    ("sender key too short", _dgram(1, [TXID, _cert(key=CERT.key[:-1])]), "Ping.sender.key: 31 bytes"),
    ("sender key too long", _dgram(3, [TXID, _cert(key=CERT.key + b"\x00"), NODE_ID]), "FindNode.sender.key: 33 bytes"),
    (
        "responder key too short",
        _dgram(2, [TXID, _cert(key=b""), b"\x7f\x00\x00\x01", 80]),
        "Pong.responder.key: 0 bytes",
    ),
    ("responder bad signature length", _dgram(4, [TXID, _cert(signature=bytes(63)), []]), "Nodes.responder.signature"),
    ("responder bad port", _dgram(2, [TXID, _cert(port=0), b"\x7f\x00\x00\x01", 80]), "Pong.responder.port: 0"),
    ("responder ip as text", _dgram(4, [TXID, _cert(host="::1"), []]), "Nodes.responder.host: expected packed"),
    ("sender issued_at negative", _dgram(1, [TXID, _cert(issued_at=-1)]), "Ping.sender.issued_at: -1 is outside"),
    ("txid too short", _dgram(1, [TXID[:-1], CERT_WIRE]), "Ping.txid: 7 bytes"),
    ("txid too long", _dgram(1, [TXID + b"\x00", None]), "Ping.txid: 9 bytes"),
    ("txid empty", _dgram(1, [b"", CERT_WIRE]), "Ping.txid"),
    ("txid as str", _dgram(1, ["abcdefgh", None]), "Ping.txid: expected bytes, got str"),
    ("txid as old raw str", bytes((P2P_MAGIC, 1, 1)) + msgpack.packb([TXID, None], use_bin_type=False), "txid"),
    ("target too short", _dgram(3, [TXID, CERT_WIRE, NODE_ID[:-1]]), "FindNode.target: 19 bytes"),
    ("target too long", _dgram(3, [TXID, None, NODE_ID + b"\x00"]), "FindNode.target: 21 bytes"),
    ("packed ip of 5 bytes", _dgram(2, [TXID, CERT_WIRE, b"\x01" * 5, 80]), "Pong.observed_host"),
    ("packed ip of 0 bytes", _dgram(2, [TXID, CERT_WIRE, b"", 80]), "Pong.observed_host"),
    ("ip as text", _dgram(2, [TXID, CERT_WIRE, "127.0.0.1", 80]), "Pong.observed_host: expected packed"),
    ("port 0", _dgram(2, [TXID, CERT_WIRE, b"\x7f\x00\x00\x01", 0]), "Pong.observed_port: 0 is outside"),
    ("port 65536", _dgram(2, [TXID, CERT_WIRE, b"\x7f\x00\x00\x01", 65536]), "Pong.observed_port"),
    ("port -1", _dgram(2, [TXID, CERT_WIRE, b"\x7f\x00\x00\x01", -1]), "Pong.observed_port"),
    ("port uint64 max", _dgram(2, [TXID, CERT_WIRE, b"\x7f\x00\x00\x01", MSGPACK_INT_MAX]), "Pong.observed_port"),
    ("port int64 min", _dgram(2, [TXID, CERT_WIRE, b"\x7f\x00\x00\x01", MSGPACK_INT_MIN]), "Pong.observed_port"),
    (
        "bool for port",
        _dgram(2, [TXID, CERT_WIRE, b"\x7f\x00\x00\x01", True]),
        "Pong.observed_port: expected int, got bool",
    ),
    (
        "float for port",
        _dgram(2, [TXID, CERT_WIRE, b"\x7f\x00\x00\x01", 80.0]),
        "Pong.observed_port: expected int, got float",
    ),
    ("error code -1", _dgram(5, [TXID, -1, ""]), "ErrorReply.code"),
    ("error code too big", _dgram(5, [TXID, MAX_ERROR_CODE + 1, ""]), "ErrorReply.code"),
    ("message too long", _dgram(5, [TXID, 1, "x" * (MAX_ERROR_MESSAGE_BYTES + 1)]), "ErrorReply.message"),
    ("message too long in bytes", _dgram(5, [TXID, 1, "é" * 101]), "202 bytes"),
    ("message as bytes", _dgram(5, [TXID, 1, b"oops"]), "expected str, got bytes"),
    ("invalid utf-8", _raw(5, b"\x93\xc4\x08" + TXID + b"\x01\xa2\xc3\x28"), "UnicodeDecodeError"),
    ("lone surrogate in utf-8", _raw(5, b"\x93\xc4\x08" + TXID + b"\x01\xa3\xed\xa0\x80"), "UnicodeDecodeError"),
    ("too many nodes", _dgram(4, [TXID, CERT_WIRE, [_node()] * (MAX_NODES_PER_REPLY + 1)]), "Nodes.nodes: 21 items"),
    ("nodes not an array", _dgram(4, [TXID, CERT_WIRE, _node()[0]]), "Nodes.nodes: expected array"),
    ("node not an array", _dgram(4, [TXID, CERT_WIRE, [NODE_ID]]), "Nodes.nodes[0]: expected an array"),
    ("node wrong arity", _dgram(4, [TXID, CERT_WIRE, [_node()[:2]]]), "Nodes.nodes[0]: expected 3 fields"),
    ("node bad port", _dgram(4, [TXID, CERT_WIRE, [_node(), _node(port=0)]]), "Nodes.nodes[1].port"),
    ("node bad id", _dgram(4, [TXID, CERT_WIRE, [_node(node_id=b"short")]]), "Nodes.nodes[0].node_id"),
    ("node bool host", _dgram(4, [TXID, CERT_WIRE, [_node(host=True)]]), "Nodes.nodes[0].host"),
    ("nested arrays for bytes", _dgram(1, [[[[[TXID]]]], CERT_WIRE]), "Ping.txid: expected bytes, got list"),
    ("deep nesting", _raw(1, b"\x91" * (MAX_DATAGRAM_SIZE - 4) + b"\xc0"), "StackError"),
    ("map with int key", _dgram(1, [{1: 2}, None]), "malformed msgpack"),
    ("map with array key", _raw(1, b"\x92\x81\x91\x01\x01\xc0"), "malformed msgpack"),
    ("fixext 1", _raw(1, b"\x92\xd4\x05\x00\xc0"), "ext"),
    ("ext8 of length 0", _raw(1, b"\x92\xc7\x00\x05\xc0"), "extension type 5"),
    ("ext as sender", _raw(1, b"\x92\xc4\x08" + TXID + b"\xc7\x00\x05"), "extension type 5"),
    ("timestamp 32", _raw(1, b"\x92\xd6\xff\x00\x00\x00\x00\xc0"), "ext"),
    ("timestamp 96", _raw(1, b"\x92\xc7\x0c\xff" + bytes(12) + b"\xc0"), "ext"),
    ("reserved byte 0xc1", _raw(1, b"\x92\xc1\xc0"), "malformed msgpack"),
    ("bin length past the end", _raw(1, b"\x92\xc4\x08abc"), "malformed msgpack"),
    ("array32 claiming 4 billion items", _raw(1, b"\xdd\xff\xff\xff\xff"), "malformed msgpack"),
    ("str32 claiming 4 GiB", _raw(5, b"\x93\xc4\x08" + TXID + b"\x01\xdb\xff\xff\xff\xff"), "malformed msgpack"),
]


@pytest.mark.parametrize(("name", "data", "reason"), REJECTED, ids=[case[0] for case in REJECTED])
def test_rejected_as_a_datagram(name: str, data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        decode_datagram(data)


@pytest.mark.parametrize(("name", "data", "reason"), REJECTED, ids=[case[0] for case in REJECTED])
def test_rejected_through_a_stream_one_byte_at_a_time(name: str, data: bytes, reason: str) -> None:
    # An empty payload is refused by the framing itself; everything else reaches the packet decoder.
    with pytest.raises(ProtocolError):
        _decode_via_stream(data)


def test_unknown_version_names_the_version() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_datagram(_dgram(1, [TXID, CERT_WIRE], version=7))
    assert "version 7" in str(info.value)
    assert f"speaks {PROTOCOL_VERSION}" in str(info.value)


def test_datagram_of_exactly_the_limit_passes_the_size_check() -> None:
    # A Ping (no sender: nil) whose txid is a bin16 filling the datagram to exactly MAX_DATAGRAM_SIZE bytes: it gets
    # past the size check (and fails on the txid's length); one byte more fails the size check itself.
    txid_size = MAX_DATAGRAM_SIZE - P2P_HEADER_SIZE - 1 - 3 - 1
    filler = _raw(1, b"\x92\xc5" + txid_size.to_bytes(2, "big") + bytes(txid_size) + b"\xc0")
    assert len(filler) == MAX_DATAGRAM_SIZE
    with pytest.raises(ProtocolError, match=f"Ping.txid: {txid_size} bytes"):
        decode_datagram(filler)
    with pytest.raises(ProtocolError, match="over the 1280-byte limit"):
        decode_datagram(filler + b"\x00")


# Values of every msgpack type; each field must refuse all those its spec does not produce.
_WIRE_SAMPLES: list[object] = [None, True, 7, -7, 1.5, "text", b"\x7f\x00\x00\x01", [], [1], {"k": 1}]
_ACCEPTED_TYPES: dict[type[Spec], tuple[type, ...]] = {
    Bytes: (bytes,),
    Str: (str,),
    Int: (int,),
    Bool: (bool,),
    Float: (float,),
    IpAddress: (bytes,),
    List: (list,),
    Struct: (list,),
}


def _accepted_types(spec: Spec) -> tuple[type, ...]:
    if isinstance(spec, Optional):
        return (type(None), *_accepted_types(spec.spec))
    return _ACCEPTED_TYPES[type(spec)]


def _example(cls: type[Packet]) -> Packet:
    return {
        Ping: Ping(txid=TXID, sender=CERT),
        Pong: Pong(txid=TXID, responder=CERT, observed_host="127.0.0.1", observed_port=80),
        FindNode: FindNode(txid=TXID, sender=None, target=NODE_ID),
        Nodes: Nodes(txid=TXID, responder=CERT, nodes=(NodeInfo(NODE_ID, "::1", 1),)),
        ErrorReply: ErrorReply(txid=TXID, code=1, message="m"),
        packets.FindValue: packets.FindValue(TXID, None, NODE_ID, 1),
        packets.Found: packets.Found(TXID, CERT, (), bytes(16), 3, bytes(16), 0),
        packets.GetPart: packets.GetPart(TXID, NODE_ID, 2, bytes(16), 0),
        packets.PartReply: packets.PartReply(TXID, _PART),
        packets.ListEntries: packets.ListEntries(TXID, NODE_ID, b""),
        packets.EntryIds: packets.EntryIds(TXID, (bytes(16),), True),
        packets.Store: packets.Store(TXID, NODE_ID, 1, bytes(16), _PART),
        packets.Stored: packets.Stored(TXID, True),
    }[cls]


_PART = Part(bytes(8), 0, 1, bytes(16), b"chunk")


def test_wrong_type_for_every_field_of_every_packet() -> None:
    checked = 0
    for cls in PACKETS:
        schema = schema_of(cls)
        good = to_wire(_example(cls))
        for index, (field, spec) in enumerate(zip(schema.names, schema.specs, strict=True)):
            for sample in _WIRE_SAMPLES:
                if type(sample) in _accepted_types(spec):
                    continue
                bad = list(good)
                bad[index] = sample
                data = _dgram(cls.KIND, bad)
                with pytest.raises(ProtocolError, match=f"{cls.__name__}.{field}"):
                    decode_datagram(data)
                with pytest.raises(ProtocolError, match=f"{cls.__name__}.{field}"):
                    _decode_via_stream(data)
                checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("wide", True, "expected int, got bool"),
        ("maybe_blob", b"", "0 bytes"),
        ("maybe_pair", [1, 0.5], "maybe_pair.flag: expected bool, got int"),
        ("maybe_pair", [True, math.nan], "maybe_pair.ratio"),
        ("maybe_pair", [True, math.inf], "maybe_pair.ratio"),
        ("maybe_pair", [True, 1.5], "maybe_pair.ratio"),
        ("maybe_pair", [True, 1], "maybe_pair.ratio: expected float, got int"),
        ("grid", [[1, 2, 3, 4]], r"grid\[0\]: 4 items"),
        ("grid", [[1], [2, 201]], r"grid\[1\]\[1\]: 201 is outside"),
        ("label", "x" * 41, "label"),
    ],
)
def test_every_spec_rejects(field: str, value: object, reason: str) -> None:
    good = to_wire(Everything(0, None, None, (), "", "::"))
    bad = list(good)
    bad[schema_of(Everything).names.index(field)] = value
    with pytest.raises(ProtocolError, match=reason):
        decode_datagram(_dgram(Everything.KIND, bad), registry=TEST_PACKETS)


def _valid_datagrams() -> list[bytes]:
    return [
        encode_datagram(Ping(txid=TXID, sender=CERT)),
        encode_datagram(Pong(txid=TXID, responder=CERT, observed_host="2001:db8::7", observed_port=65535)),
        encode_datagram(FindNode(txid=TXID, sender=None, target=NODE_ID)),
        encode_datagram(_largest_nodes()),
        encode_datagram(ErrorReply(txid=TXID, code=3, message="é" * 100)),
    ]


def test_truncated_at_every_length_is_rejected() -> None:
    for data in _valid_datagrams():
        for cut in range(len(data)):
            with pytest.raises(ProtocolError):
                decode_datagram(data[:cut])


def test_truncated_at_every_length_is_rejected_through_a_stream() -> None:
    ping = encode_datagram(Pong(txid=TXID, responder=CERT, observed_host="2001:db8::7", observed_port=65535))
    for cut in range(1, len(ping)):
        with pytest.raises(ProtocolError):
            _decode_via_stream(ping[:cut])
    # A stream that ends inside the frame is refused by the framing.
    for cut in range(1, len(ping) + 4):
        decoder = FrameDecoder()
        decoder.feed(encode_frame(ping)[:cut])
        assert list(decoder.frames()) == []
        with pytest.raises(ProtocolError, match="ended inside a frame"):
            decoder.feed_eof()


# --- fuzz: any bytes give a packet or a ProtocolError -----------------------------------------------------------


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        result = decode_datagram(data)
    except ProtocolError:
        return
    assert isinstance(result, Packet)
    # Whatever decodes is something we would send too (the bytes may differ: msgpack has non-minimal forms).
    assert decode_datagram(encode_datagram(result)) == result


def _rpcudp_or_protocol_error(data: bytes) -> None:
    try:
        result = decode_rpcudp(data)
    except ProtocolError:
        return
    assert isinstance(result, RpcudpRequest | RpcudpResponse)


def _classify_or_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        assert isinstance(classify_datagram(data), DatagramKind)


@FAST
@given(st.binary(max_size=MAX_DATAGRAM_SIZE + 8))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_protocol_error(data)
    _decode_or_protocol_error(bytes((P2P_MAGIC, PROTOCOL_VERSION)) + data)
    _rpcudp_or_protocol_error(data)
    _rpcudp_or_protocol_error(b"\x00" + bytes(20) + data)
    _rpcudp_or_protocol_error(b"\x01" + bytes(20) + data)
    _classify_or_protocol_error(data)


@FAST
@given(any_packet, st.data())
def test_fuzz_mutated_valid_datagrams(pkt: Packet, data: st.DataObject) -> None:
    raw = bytearray(encode_datagram(pkt))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        at = data.draw(st.integers(0, len(raw)))
        if op == "flip" and at < len(raw):
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[at : at + data.draw(st.integers(1, 8))]
        elif op == "set" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
    _decode_or_protocol_error(bytes(raw))


def test_fuzz_seeded_mutations() -> None:
    rng = random.Random(1280)
    valid = _valid_datagrams()
    for _ in range(20_000):
        raw = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(raw) + 1)
            roll = rng.random()
            if roll < 0.5 and at < len(raw):
                raw[at] ^= 1 << rng.randrange(8)
            elif roll < 0.6:
                del raw[at:]
            elif roll < 0.8:
                raw[at:at] = rng.randbytes(rng.randint(1, 4))
            else:
                del raw[at : at + rng.randint(1, 4)]
        _decode_or_protocol_error(bytes(raw))


# --- classification -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (_VALID_PING, DatagramKind.P2PCHAT),
        (b"\x50", DatagramKind.P2PCHAT),
        (b"\x00" + bytes(21), DatagramKind.RPCUDP_REQUEST),
        (b"\x01" + bytes(21), DatagramKind.RPCUDP_RESPONSE),
    ],
)
def test_classify(data: bytes, kind: DatagramKind) -> None:
    assert classify_datagram(data) is kind


@pytest.mark.parametrize("data", [b"", b"\x02", b"\x4f", b"\x51", b"\xff" + bytes(30), b"{}"])
def test_classify_rejects_unknown_formats(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        classify_datagram(data)


# --- encode-side checks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (Ping(txid=b"short", sender=CERT), "Ping.txid: 5 bytes"),
        (Ping(txid=bytearray(TXID), sender=None), "Ping.txid: expected bytes, got bytearray"),  # type: ignore[arg-type]
        (Pong(txid=TXID, responder=CERT, observed_host="localhost", observed_port=1), "not a canonical IP"),
        (Pong(txid=TXID, responder=CERT, observed_host="::FFFF:1.2.3.4", observed_port=1), "not a canonical IP"),
        (Pong(txid=TXID, responder=CERT, observed_host="fe80::1%eth0", observed_port=1), "not a canonical IP"),
        (Pong(txid=TXID, responder=CERT, observed_host="010.0.0.1", observed_port=1), "not a canonical IP"),
        (Pong(txid=TXID, responder=CERT, observed_host=b"\x7f\x00\x00\x01", observed_port=1), "expected an IP"),  # type: ignore[arg-type]
        (Pong(txid=TXID, responder=CERT, observed_host="127.0.0.1", observed_port=True), "expected int, got bool"),
        (Pong(txid=TXID, responder=CERT, observed_host="127.0.0.1", observed_port=0), "observed_port: 0 is outside"),
        (Nodes(txid=TXID, responder=CERT, nodes=[NodeInfo(NODE_ID, "::1", 1)]), "expected tuple, got list"),  # type: ignore[arg-type]
        (Nodes(txid=TXID, responder=CERT, nodes=(NodeInfo(NODE_ID, "::1", 1),) * 21), "21 items"),
        (
            Nodes(txid=TXID, responder=CERT, nodes=(NodeInfo(NODE_ID, "::1", 1), Ping(TXID, None))),  # type: ignore[arg-type]
            r"nodes\[1\]: expected NodeInfo",
        ),
        (Nodes(txid=TXID, responder=CERT, nodes=(NodeInfo(NODE_ID, "::1", 70000),)), r"Nodes.nodes\[0\].port: 70000"),
        (ErrorReply(txid=TXID, code=1, message="x" * 201), "ErrorReply.message"),
        (ErrorReply(txid=TXID, code=1, message="\udc80"), "surrogate"),
    ],
)
def test_encoding_an_invalid_packet_is_a_value_error(pkt: Packet, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        encode_datagram(pkt)


def test_encoding_over_the_size_limit_is_a_value_error() -> None:
    big = encode_packet(_largest_nodes(), max_size=MAX_STREAM_FRAME)
    with pytest.raises(ValueError, match="split it"):
        encode_packet(_largest_nodes(), max_size=len(big) - 1)
    assert encode_packet(_largest_nodes(), max_size=len(big)) == big


# --- schema declarations ------------------------------------------------------------------------------------------


def test_duplicate_kind_is_refused_at_definition() -> None:
    registry = PacketRegistry()

    @packet(kind=7, registry=registry)
    @dataclass(frozen=True, slots=True)
    class First(Packet):
        txid: Annotated[bytes, Bytes(max_len=8)]

    with pytest.raises(ValueError, match="kind 7 is taken by First"):

        @packet(kind=7, registry=registry)
        @dataclass(frozen=True, slots=True)
        class Second(Packet):
            txid: Annotated[bytes, Bytes(max_len=8)]

    assert registry.lookup(7) is First
    assert len(registry) == 1


@pytest.mark.parametrize("kind", [0, MAX_PACKET_KIND + 1, -1])
def test_kind_out_of_range_is_refused(kind: int) -> None:
    with pytest.raises(ValueError, match="outside"):

        @packet(kind=kind, registry=PacketRegistry())
        @dataclass(frozen=True, slots=True)
        class Bad(Packet):
            txid: Annotated[bytes, Bytes(max_len=8)]


def test_field_without_spec_is_refused() -> None:
    with pytest.raises(TypeError, match="needs an Annotated"):

        @wire_struct
        @dataclass(frozen=True, slots=True)
        class Bad(WireStruct):
            count: int


def test_field_with_two_specs_is_refused() -> None:
    with pytest.raises(TypeError, match="exactly one Spec"):

        @wire_struct
        @dataclass(frozen=True, slots=True)
        class Bad(WireStruct):
            count: Annotated[int, Int(min_value=0, max_value=1), Int(min_value=0, max_value=2)]


@pytest.mark.parametrize(
    "annotation",
    [
        Annotated[str, Bytes(max_len=1)],
        Annotated[bool, Int(min_value=0, max_value=1)],
        Annotated[int | None, Int(min_value=0, max_value=1)],
        Annotated[int, Optional(Int(min_value=0, max_value=1))],
        Annotated[int | str | None, Optional(Int(min_value=0, max_value=1))],
        Annotated[list[int], List(item=Int(min_value=0, max_value=1), max_items=1)],
        Annotated[tuple[int, int], List(item=Int(min_value=0, max_value=1), max_items=1)],
        Annotated[tuple[str, ...], List(item=Int(min_value=0, max_value=1), max_items=1)],
        Annotated[NodeInfo, Struct(Pair)],
        Annotated[bytes, IpAddress()],
        Annotated[int, Float(min_value=0, max_value=1)],
        Annotated[int, Bool()],
        Annotated[bytes, Str(max_bytes=1)],
    ],
)
def test_spec_that_does_not_match_the_type_is_refused(annotation: object) -> None:
    class Bad(WireStruct):
        __annotations__ = {"value": annotation}

    with pytest.raises(TypeError, match="does not produce"):
        wire_struct(dataclass(frozen=True, slots=True)(Bad))


def test_non_frozen_or_unslotted_or_undecorated_classes_are_refused() -> None:
    with pytest.raises(TypeError, match="frozen=True, slots=True"):

        @wire_struct
        @dataclass(slots=True)
        class Mutable(WireStruct):
            count: Annotated[int, Int(min_value=0, max_value=1)]

    with pytest.raises(TypeError, match="frozen=True, slots=True"):

        @wire_struct
        @dataclass(frozen=True)
        class Unslotted(WireStruct):
            count: Annotated[int, Int(min_value=0, max_value=1)]

    with pytest.raises(TypeError, match="must be a dataclass"):

        @wire_struct
        class Plain(WireStruct):
            count: Annotated[int, Int(min_value=0, max_value=1)]

    with pytest.raises(TypeError, match="must subclass WireStruct"):

        @wire_struct
        @dataclass(frozen=True, slots=True)
        class Stray:  # type: ignore[type-var]
            count: Annotated[int, Int(min_value=0, max_value=1)]

    with pytest.raises(TypeError, match="must subclass Packet"):

        @packet(kind=1, registry=PacketRegistry())
        @dataclass(frozen=True, slots=True)
        class NotAPacket(WireStruct):  # type: ignore[type-var]
            count: Annotated[int, Int(min_value=0, max_value=1)]

    with pytest.raises(TypeError, match="no fields"):

        @wire_struct
        @dataclass(frozen=True, slots=True)
        class Empty(WireStruct):
            pass

    with pytest.raises(TypeError, match="not a schema class"):
        schema_of(WireStruct)

    class Undecorated(WireStruct):
        pass

    with pytest.raises(TypeError, match="not a schema class"):
        Struct(Undecorated)


def test_decorating_twice_or_with_unresolvable_annotations_is_refused() -> None:
    with pytest.raises(TypeError, match="already a schema class"):
        wire_struct(Pair)

    class Unresolvable(WireStruct):
        __annotations__ = {"value": "Annotated[NoSuchType, Bool()]"}

    with pytest.raises(TypeError, match="cannot resolve"):
        wire_struct(dataclass(frozen=True, slots=True)(Unresolvable))


def test_an_undecorated_subclass_of_a_packet_is_not_encoded_as_its_parent() -> None:
    class Sneaky(Ping):
        __slots__ = ()

    with pytest.raises(TypeError, match="not a schema class itself"):
        encode_datagram(Sneaky(txid=TXID, sender=CERT))
    with pytest.raises(TypeError, match="not a schema class itself"):
        from_wire(Sneaky, [TXID, CERT_WIRE])


@pytest.mark.parametrize(
    "make",
    [
        lambda: Bytes(min_len=2, max_len=1),
        lambda: Bytes(min_len=-1, max_len=1),
        lambda: Str(max_bytes=-1),
        lambda: Int(min_value=2, max_value=1),
        lambda: Int(min_value=0, max_value=MSGPACK_INT_MAX + 1),
        lambda: Int(min_value=MSGPACK_INT_MIN - 1, max_value=0),
        lambda: Float(min_value=1.0, max_value=0.0),
        lambda: Float(min_value=-math.inf, max_value=0.0),
        lambda: Float(min_value=0.0, max_value=math.nan),
        lambda: List(item=Bool(), max_items=1, min_items=2),
    ],
)
def test_impossible_specs_are_refused(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


# --- rpcudp compat frames ------------------------------------------------------------------------------------------

MSG_ID = bytes(range(100, 120))

# Values as the kademlia package sends them: node ids and keys as bin, method names as str, find_node replies as a
# list of (id, ip, port) tuples, find_value replies as {"value": v}.
rpc_leaf = (
    st.none()
    | st.booleans()
    | st.integers(MSGPACK_INT_MIN, MSGPACK_INT_MAX)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
rpc_value = st.recursive(
    rpc_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
).filter(lambda value: _depth(value) <= MAX_RPCUDP_DEPTH - 2)  # request bodies add two levels: [name, [args]]
rpc_name = st.from_regex(r"[a-z_][a-z0-9_]{0,31}", fullmatch=True)


def _depth(value: object) -> int:
    if isinstance(value, list | tuple):
        return 1 + max((_depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    return 0


def _nest(levels: int) -> Any:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


KADEMLIA_REQUESTS: list[tuple[str, list[Any]]] = [
    ("ping", [NODE_ID]),
    ("store", [NODE_ID, b"k" * 20, "a value"]),
    ("store", [NODE_ID, b"k" * 20, 12345]),
    ("store", [NODE_ID, b"k" * 20, 1.25]),
    ("store", [NODE_ID, b"k" * 20, b"\x00raw"]),
    ("find_node", [NODE_ID, b"t" * 20]),
    ("find_value", [NODE_ID, b"k" * 20]),
]
KADEMLIA_RESPONSES: list[Any] = [
    NODE_ID,
    True,
    [(NODE_ID, "127.0.0.1", 8468), (b"\x01" * 20, "10.0.0.2", 9000)],
    {"value": "stored text"},
    {"value": b"stored bytes"},
    None,
    ["127.0.0.1", 5555],
]


@pytest.mark.parametrize(("name", "args"), KADEMLIA_REQUESTS)
def test_rpcudp_request_built_by_umsgpack_decodes(name: str, args: list[Any]) -> None:
    frame = b"\x00" + MSG_ID + umsgpack.packb([name, tuple(args)])
    assert classify_datagram(frame) is DatagramKind.RPCUDP_REQUEST
    assert decode_rpcudp(frame) == RpcudpRequest(msg_id=MSG_ID, name=name, args=tuple(args))


@pytest.mark.parametrize(("name", "args"), KADEMLIA_REQUESTS)
def test_our_rpcudp_request_decodes_with_umsgpack(name: str, args: list[Any]) -> None:
    frame = encode_rpcudp_request(MSG_ID, name, args)
    assert frame[:RPCUDP_HEADER_SIZE] == b"\x00" + MSG_ID
    assert umsgpack.unpackb(frame[RPCUDP_HEADER_SIZE:]) == [name, args]
    # Byte for byte what rpcudp itself would send.
    assert frame == b"\x00" + MSG_ID + umsgpack.packb([name, tuple(args)])


@pytest.mark.parametrize("value", KADEMLIA_RESPONSES)
def test_rpcudp_response_round_trips_with_umsgpack(value: Any) -> None:
    theirs = b"\x01" + MSG_ID + umsgpack.packb(value)
    ours = encode_rpcudp_response(MSG_ID, value)
    assert ours == theirs
    plain = umsgpack.unpackb(ours[RPCUDP_HEADER_SIZE:])
    assert decode_rpcudp(theirs) == RpcudpResponse(msg_id=MSG_ID, value=plain)


@FAST
@given(rpc_name, st.lists(rpc_value, max_size=4))
def test_rpcudp_request_round_trip(name: str, args: list[Any]) -> None:
    frame = encode_rpcudp_request(MSG_ID, name, args)
    assert decode_rpcudp(frame) == RpcudpRequest(msg_id=MSG_ID, name=name, args=tuple(args))
    assert umsgpack.unpackb(frame[RPCUDP_HEADER_SIZE:]) == [name, args]
    assert decode_rpcudp(b"\x00" + MSG_ID + umsgpack.packb([name, args])) == decode_rpcudp(frame)


@FAST
@given(rpc_value)
def test_rpcudp_response_round_trip(value: Any) -> None:
    frame = encode_rpcudp_response(MSG_ID, value)
    assert decode_rpcudp(frame) == RpcudpResponse(msg_id=MSG_ID, value=value)
    assert umsgpack.unpackb(frame[RPCUDP_HEADER_SIZE:]) == value


def test_rpcudp_limits_are_reached_exactly() -> None:
    name = "n" * MAX_RPCUDP_NAME_BYTES
    assert decode_rpcudp(encode_rpcudp_request(MSG_ID, name, [])).name == name  # type: ignore[union-attr]
    deepest = _nest(MAX_RPCUDP_DEPTH)
    assert decode_rpcudp(encode_rpcudp_response(MSG_ID, deepest)) == RpcudpResponse(MSG_ID, deepest)
    # The largest body: a bin whose header (3 bytes) and content fill MAX_RPCUDP_BODY.
    largest = b"x" * (MAX_RPCUDP_BODY - 3)
    frame = encode_rpcudp_response(MSG_ID, largest)
    assert len(frame) == MAX_RPCUDP_DATAGRAM
    assert decode_rpcudp(frame) == RpcudpResponse(MSG_ID, largest)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too short"),
        (b"\x00" + MSG_ID, "too short"),
        (b"\x02" + MSG_ID + umsgpack.packb(1), "not an rpcudp"),
        (b"\x50" + MSG_ID + umsgpack.packb(1), "not an rpcudp"),
        (b"\x01" + MSG_ID + b"\x00" * (MAX_RPCUDP_BODY + 1), "over the 8213-byte limit"),
        (b"\x01" + MSG_ID + umsgpack.packb(b"x" * (MAX_RPCUDP_BODY - 2)), "over the 8213-byte limit"),
        (b"\x00" + MSG_ID + umsgpack.packb("ping"), "not a \\[name, args\\] pair"),
        (b"\x00" + MSG_ID + umsgpack.packb(["ping"]), "not a \\[name, args\\] pair"),
        (b"\x00" + MSG_ID + umsgpack.packb(["ping", [], 1]), "not a \\[name, args\\] pair"),
        (b"\x00" + MSG_ID + umsgpack.packb({"ping": []}), "not a \\[name, args\\] pair"),
        (b"\x00" + MSG_ID + umsgpack.packb([b"ping", []]), "method name of type bytes"),
        (b"\x00" + MSG_ID + umsgpack.packb([1, []]), "method name of type int"),
        (b"\x00" + MSG_ID + umsgpack.packb(["", []]), "bad method name"),
        (b"\x00" + MSG_ID + umsgpack.packb(["n" * (MAX_RPCUDP_NAME_BYTES + 1), []]), "bad method name"),
        (b"\x00" + MSG_ID + umsgpack.packb(["__class__.x", []]), "bad method name"),
        (b"\x00" + MSG_ID + umsgpack.packb(["pïng", []]), "bad method name"),
        (b"\x00" + MSG_ID + umsgpack.packb(["1ping", []]), "bad method name"),
        (b"\x00" + MSG_ID + umsgpack.packb(["ping", NODE_ID]), "args are a bytes"),
        (b"\x00" + MSG_ID + umsgpack.packb(["ping", {"a": 1}]), "args are a dict"),
        (b"\x00" + MSG_ID + umsgpack.packb(["ping", [_nest(MAX_RPCUDP_DEPTH - 1)]]), "nested deeper"),
        (b"\x01" + MSG_ID + umsgpack.packb(_nest(MAX_RPCUDP_DEPTH + 1)), "nested deeper"),
        (b"\x01" + MSG_ID + umsgpack.packb({"v": _nest(MAX_RPCUDP_DEPTH)}), "nested deeper"),
        (b"\x01" + MSG_ID + b"\x91" * 2000 + b"\xc0", "StackError"),
        (b"\x01" + MSG_ID + umsgpack.packb(1) + b"\x00", "ExtraData"),
        (b"\x01" + MSG_ID + b"\xd4\x05\x00", "ext"),
        (b"\x01" + MSG_ID + b"\xc7\x00\x05", "extension type 5"),
        (b"\x01" + MSG_ID + b"\xd6\xff\x00\x00\x00\x00", "ext"),
        (b"\x01" + MSG_ID + b"\xa2\xc3\x28", "UnicodeDecodeError"),
        (b"\x01" + MSG_ID + umsgpack.packb({1: 2}), "malformed msgpack"),
        (b"\x01" + MSG_ID + umsgpack.packb({(1, 2): 2}), "malformed msgpack"),
        (b"\x01" + MSG_ID + b"\xc4\x05ab", "malformed msgpack"),
        (b"\x01" + MSG_ID + b"\xdf\xff\xff\xff\xff", "malformed msgpack"),
    ],
)
def test_rpcudp_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_rpcudp(data)


@pytest.mark.parametrize(
    ("encode", "reason"),
    [
        (lambda: encode_rpcudp_request(MSG_ID[:-1], "ping", []), "message id"),
        (lambda: encode_rpcudp_response(cast(Any, bytearray(MSG_ID)), 1), "message id"),
        (lambda: encode_rpcudp_request(MSG_ID, "n" * (MAX_RPCUDP_NAME_BYTES + 1), []), "bad method name"),
        (lambda: encode_rpcudp_request(MSG_ID, "no spaces", []), "bad method name"),
        (lambda: encode_rpcudp_request(MSG_ID, "ping", [_nest(MAX_RPCUDP_DEPTH - 1)]), "nested deeper"),
        (lambda: encode_rpcudp_response(MSG_ID, _nest(MAX_RPCUDP_DEPTH + 1)), "nested deeper"),
        (lambda: encode_rpcudp_response(MSG_ID, cast(Any, {1: "int key"})), "map key of type int"),
        (lambda: encode_rpcudp_response(MSG_ID, cast(Any, {1, 2})), "unsupported type set"),
        (lambda: encode_rpcudp_response(MSG_ID, bytearray(b"x")), "unsupported type bytearray"),
        (lambda: encode_rpcudp_response(MSG_ID, MSGPACK_INT_MAX + 1), "does not fit"),
        (lambda: encode_rpcudp_response(MSG_ID, MSGPACK_INT_MIN - 1), "does not fit"),
        (lambda: encode_rpcudp_response(MSG_ID, "\udc80"), "cannot be packed"),
        (lambda: encode_rpcudp_response(MSG_ID, b"x" * (MAX_RPCUDP_BODY - 2)), "over the 8192-byte limit"),
    ],
)
def test_rpcudp_encoding_rejections(encode: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        encode()


@FAST
@given(st.sampled_from([b"\x00", b"\x01"]), st.binary(max_size=300))
def test_fuzz_rpcudp_bodies(tag: bytes, body: bytes) -> None:
    _rpcudp_or_protocol_error(tag + MSG_ID + body)


def test_fuzz_rpcudp_seeded_mutations() -> None:
    rng = random.Random(8192)
    valid = [encode_rpcudp_request(MSG_ID, name, args) for name, args in KADEMLIA_REQUESTS]
    valid += [encode_rpcudp_response(MSG_ID, value) for value in KADEMLIA_RESPONSES]
    for _ in range(10_000):
        raw = bytearray(rng.choice(valid))
        at = rng.randrange(len(raw))
        if rng.random() < 0.7:
            raw[at] ^= 1 << rng.randrange(8)
        else:
            raw[at:at] = rng.randbytes(rng.randint(1, 4))
        _rpcudp_or_protocol_error(bytes(raw))


def test_memoised_structs_stay_strict_and_bounded() -> None:
    from p2pchat.core.schema import STRUCT_MEMO_SIZE  # noqa: PLC0415

    good = [NODE_ID, bytes([127, 0, 0, 1]), 80]
    first = Struct(NodeInfo).check(good)
    assert Struct(NodeInfo).check(list(good)) is first  # the second decode is the memoised object
    # A bool or float where an int belongs never reaches the memo (True == 1 as a dict key), and is refused.
    for odd in (True, 80.0):
        with pytest.raises(ProtocolError):
            Struct(NodeInfo).check([NODE_ID, bytes([127, 0, 0, 1]), odd])
    memo = NodeInfo.__dict__["__wire_decode_memo__"]
    for port in range(1, STRUCT_MEMO_SIZE + 100):
        Struct(NodeInfo).check([NODE_ID, bytes([127, 0, 0, 1]), port])
    assert len(memo) == STRUCT_MEMO_SIZE
    info = NodeInfo(NODE_ID, "127.0.0.1", 80)
    encoded = Struct(NodeInfo).to_wire(info)
    assert Struct(NodeInfo).to_wire(info) is encoded  # kept in the object itself
    assert Struct(NodeInfo).to_wire(NodeInfo(NODE_ID, "127.0.0.1", 80)) == encoded
    assert info == NodeInfo(NODE_ID, "127.0.0.1", 80)  # the kept form is not a field: equality ignores it
    with pytest.raises(ValueError, match="expected NodeInfo"):
        Struct(NodeInfo).to_wire(CERT)
    with pytest.raises(ValueError, match="port"):  # an invalid object is refused, and nothing is kept
        Struct(NodeInfo).to_wire(NodeInfo(NODE_ID, "127.0.0.1", 0))
