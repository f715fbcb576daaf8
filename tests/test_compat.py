"""CompatService: serving stock ``kademlia`` nodes in rpcudp, checked against the stock package's own code.

Requests are built the way rpcudp builds them (and, where it matters, by a real ``KademliaProtocol`` on a fake
transport), and replies are read back by the stock code, so "what a stock node expects" is the stock node's
verdict, not our reading of it.  Malformed input must raise ProtocolError and nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import umsgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.crawling import RPCFindResponse
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import ForgetfulStorage

from p2pchat.core.framing import (
    MAX_RPCUDP_BODY,
    MAX_RPCUDP_DATAGRAM,
    MAX_RPCUDP_DEPTH,
    RPCUDP_HEADER_SIZE,
    DatagramKind,
    classify_datagram,
)
from p2pchat.core.ids import NodeId
from p2pchat.dht.compat import (
    MAX_COMPAT_CONTACTS,
    MAX_COMPAT_VALUE_BYTES,
    CompatBackend,
    CompatService,
    CompatStats,
)
from p2pchat.errors import ProtocolError
from p2pchat.net.base import Address

FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None)

WALL = 1_767_225_600.0
OUR_ID = NodeId(hashlib.sha1(b"our node").digest())
OUR_ADDRESS = Address("127.0.0.1", 4000)
STOCK_ID = hashlib.sha1(b"stock node").digest()
STOCK_ADDRESS = Address("127.0.0.1", 8468)
MSG_ID = bytes(range(20))
KEY = hashlib.sha1(b"greeting").digest()  # what kademlia.utils.digest("greeting") is


class FakeBackend:
    """A CompatBackend with nothing but the protocol's members, so any other use of it fails the test."""

    def __init__(self, contacts: list[tuple[NodeId, Address]] | None = None, *, accept: bool = True) -> None:
        self._node_id = OUR_ID
        self.contacts = contacts if contacts is not None else []
        self.values: dict[bytes, bytes] = {}
        self.accept = accept
        self.puts: list[tuple[bytes, bytes, Address, float]] = []
        self.closest_asked: list[tuple[NodeId, int]] = []

    @property
    def node_id(self) -> NodeId:
        return self._node_id

    def compat_closest(self, target: NodeId, count: int) -> list[tuple[NodeId, Address]]:
        self.closest_asked.append((target, count))
        return sorted(self.contacts, key=lambda c: c[0].distance(target))[:count]

    def compat_get(self, key: bytes, now: float) -> bytes | None:
        assert now == WALL
        return self.values.get(key)

    def compat_put(self, key: bytes, packed: bytes, source: Address, now: float) -> bool:
        self.puts.append((key, packed, source, now))
        if self.accept:
            self.values[key] = packed
        return self.accept

    def wall_time(self) -> float:
        return WALL


def _contacts(count: int, seed: int = 1, host: str = "127.0.0.1") -> list[tuple[NodeId, Address]]:
    rng = random.Random(seed)
    return [(NodeId(rng.randbytes(20)), Address(host, 5000 + i)) for i in range(count)]


def _service(backend: FakeBackend | None = None) -> tuple[CompatService, FakeBackend]:
    backend = backend if backend is not None else FakeBackend(_contacts(30))
    return CompatService(backend), backend


def _request(name: object, args: object, msg_id: bytes = MSG_ID) -> bytes:
    """A request exactly as rpcudp frames it (it packs the args tuple with umsgpack)."""
    body: bytes = umsgpack.packb([name, args])
    return b"\x00" + msg_id + body


def _serve(service: CompatService, frame: bytes, source: Address = STOCK_ADDRESS) -> Any:
    """Hand *frame* to the service as the transport would; return the reply's body as umsgpack reads it."""
    reply = service.handle(frame, source, classify_datagram(frame))
    assert reply is not None
    assert reply[:RPCUDP_HEADER_SIZE] == b"\x01" + frame[1:RPCUDP_HEADER_SIZE]
    assert len(reply) <= MAX_RPCUDP_DATAGRAM
    return umsgpack.unpackb(reply[RPCUDP_HEADER_SIZE:])


def _stock_call(service: CompatService, method: str, *args: Any) -> tuple[bool, Any]:
    """Make a real KademliaProtocol call ``method`` on us, and return what the stock future resolves to."""

    async def call() -> tuple[bool, Any]:
        protocol = KademliaProtocol(Node(STOCK_ID, *STOCK_ADDRESS), ForgetfulStorage(), 20)
        sent: list[tuple[bytes, tuple[str, int]]] = []

        class Transport:
            def sendto(self, data: bytes, address: tuple[str, int]) -> None:
                sent.append((data, address))

        protocol.connection_made(Transport())
        future = getattr(protocol, method)(tuple(OUR_ADDRESS), *args)
        assert len(sent) == 1
        request, destination = sent[0]
        assert destination == tuple(OUR_ADDRESS)
        reply = service.handle(request, STOCK_ADDRESS, classify_datagram(request))
        assert reply is not None
        protocol.datagram_received(reply, tuple(OUR_ADDRESS))
        result: tuple[bool, Any] = await asyncio.wait_for(future, timeout=10)
        return result

    return asyncio.run(call())


# --- each RPC, as a stock node sees it -----------------------------------------------------------------------


def test_ping_answers_our_node_id_byte_for_byte() -> None:
    service, _ = _service()
    reply = service.handle(_request("ping", (STOCK_ID,)), STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    assert reply == b"\x01" + MSG_ID + umsgpack.packb(OUR_ID.bytes)
    assert _stock_call(service, "ping", STOCK_ID) == (True, OUR_ID.bytes)
    assert service.stats == CompatStats(pings=2)


STOCK_VALUES: list[Any] = [
    0,
    -1,
    2**63,
    2**64 - 1,
    -(2**63),
    1.25,
    -0.0,
    True,
    False,
    "",
    "héllo wörld",
    b"",
    b"\x00\xff raw",
]


@pytest.mark.parametrize("value", STOCK_VALUES, ids=repr)
def test_store_then_find_value_returns_the_value(value: Any) -> None:
    service, backend = _service()
    reply = service.handle(_request("store", (STOCK_ID, KEY, value)), STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    assert reply == b"\x01" + MSG_ID + umsgpack.packb(True)
    assert backend.puts == [(KEY, msgpack.packb(value), STOCK_ADDRESS, WALL)]

    reply = service.handle(_request("find_value", (STOCK_ID, KEY)), STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    assert reply == b"\x01" + MSG_ID + umsgpack.packb({"value": value})

    found = RPCFindResponse(_stock_call(service, "find_value", STOCK_ID, KEY))
    assert found.happened()
    assert found.has_value()
    got = found.get_value()
    assert type(got) is type(value)
    assert got == value
    assert service.stats == CompatStats(stores=1, find_values=2, values_found=2)


def test_a_stock_store_call_is_acknowledged() -> None:
    service, backend = _service()
    assert _stock_call(service, "store", STOCK_ID, KEY, "hi") == (True, True)
    assert backend.values == {KEY: msgpack.packb("hi")}


def test_find_node_lists_the_closest_contacts_as_stock_nodes() -> None:
    contacts = _contacts(30)
    service, backend = _service(FakeBackend(contacts))
    target = NodeId(KEY)
    expected = sorted(contacts, key=lambda c: c[0].distance(target))[:MAX_COMPAT_CONTACTS]
    frame = _request("find_node", (STOCK_ID, KEY))
    reply = service.handle(frame, STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    as_stock = [(node_id.bytes, address.host, address.port) for node_id, address in expected]
    assert reply == b"\x01" + MSG_ID + umsgpack.packb(as_stock)
    assert backend.closest_asked == [(target, MAX_COMPAT_CONTACTS)]

    response = RPCFindResponse(_stock_call(service, "find_node", STOCK_ID, KEY))
    assert response.happened()
    assert not response.has_value()
    nodes = response.get_node_list()
    assert [(n.id, n.ip, n.port) for n in nodes] == as_stock
    assert service.stats == CompatStats(find_nodes=2)


def test_find_value_for_a_missing_key_answers_with_contacts() -> None:
    contacts = _contacts(5)
    service, _ = _service(FakeBackend(contacts))
    body = _serve(service, _request("find_value", (STOCK_ID, KEY)))
    target = NodeId(KEY)
    assert body == [
        [node_id.bytes, address.host, address.port]
        for node_id, address in sorted(contacts, key=lambda c: c[0].distance(target))
    ]
    response = RPCFindResponse(_stock_call(service, "find_value", STOCK_ID, KEY))
    assert not response.has_value()
    assert len(response.get_node_list()) == 5
    assert service.stats == CompatStats(find_values=2)


def test_with_no_contacts_find_node_answers_an_empty_list() -> None:
    service, _ = _service(FakeBackend([]))
    assert _serve(service, _request("find_node", (STOCK_ID, KEY))) == []
    assert _serve(service, _request("find_value", (STOCK_ID, KEY))) == []


def test_the_reply_echoes_each_message_id() -> None:
    service, _ = _service()
    for msg_id in (b"\x00" * 20, b"\xff" * 20, MSG_ID):
        reply = service.handle(_request("ping", (STOCK_ID,), msg_id), STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
        assert reply is not None
        assert reply[1:RPCUDP_HEADER_SIZE] == msg_id


# --- limits ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("largest", "too_large"),
    [
        # bin16 and str16 headers are 3 bytes: 997 bytes of content pack to exactly MAX_COMPAT_VALUE_BYTES.
        (b"x" * (MAX_COMPAT_VALUE_BYTES - 3), b"x" * (MAX_COMPAT_VALUE_BYTES - 2)),
        ("x" * (MAX_COMPAT_VALUE_BYTES - 3), "x" * (MAX_COMPAT_VALUE_BYTES - 2)),
    ],
    ids=["bytes", "str"],
)
def test_value_size_limit_is_reached_exactly(largest: bytes | str, too_large: bytes | str) -> None:
    assert len(msgpack.packb(largest)) == MAX_COMPAT_VALUE_BYTES
    assert len(msgpack.packb(too_large)) == MAX_COMPAT_VALUE_BYTES + 1
    service, backend = _service()
    other_key = hashlib.sha1(b"other").digest()
    assert _serve(service, _request("store", (STOCK_ID, KEY, largest))) is True
    assert _serve(service, _request("store", (STOCK_ID, other_key, too_large))) is False
    # The refused value never reached the backend; the accepted one is served back whole.
    assert [put[0] for put in backend.puts] == [KEY]
    assert _serve(service, _request("find_value", (STOCK_ID, KEY))) == {"value": largest}
    assert isinstance(_serve(service, _request("find_value", (STOCK_ID, other_key))), list)
    assert service.stats.stores == 1
    assert service.stats.refused == 1


def test_a_store_the_backend_refuses_is_answered_false() -> None:
    service, backend = _service(FakeBackend(accept=False))
    assert _serve(service, _request("store", (STOCK_ID, KEY, "over quota"))) is False
    assert len(backend.puts) == 1
    assert service.stats == CompatStats(refused=1)


def test_contact_count_is_limited_to_max_compat_contacts() -> None:
    service, _ = _service(FakeBackend(_contacts(MAX_COMPAT_CONTACTS * 3)))
    body = _serve(service, _request("find_node", (STOCK_ID, KEY)))
    assert len(body) == MAX_COMPAT_CONTACTS


def test_twenty_ipv6_contacts_fit_untrimmed() -> None:
    longest_v6 = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"  # the longest IP literal there is
    service, _ = _service(FakeBackend(_contacts(MAX_COMPAT_CONTACTS, host=longest_v6)))
    body = _serve(service, _request("find_node", (STOCK_ID, KEY)))
    assert len(body) == MAX_COMPAT_CONTACTS


@pytest.mark.parametrize("host_length", [300, 399, 400, 401, 500, 1000, 4000])
def test_contact_lists_are_trimmed_to_fit_the_body_limit(host_length: int) -> None:
    # Real hosts are short, so only absurd ones reach the limit; the point is the reply can never exceed it.
    contacts = _contacts(MAX_COMPAT_CONTACTS, host="h" * host_length)
    service, _ = _service(FakeBackend(contacts))
    for name in ("find_node", "find_value"):
        frame = _request(name, (STOCK_ID, KEY))
        reply = service.handle(frame, STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
        assert reply is not None
        body = umsgpack.unpackb(reply[RPCUDP_HEADER_SIZE:])
        assert len(reply) - RPCUDP_HEADER_SIZE <= MAX_RPCUDP_BODY
        target = NodeId(KEY)
        closest = [
            [node_id.bytes, address.host, address.port]
            for node_id, address in sorted(contacts, key=lambda c: c[0].distance(target))
        ]
        # The nearest are kept, and as many as fit: one more would not have.
        assert body == closest[: len(body)]
        assert len(body) >= 1
        if len(body) < len(closest):
            assert len(umsgpack.packb(closest[: len(body) + 1])) > MAX_RPCUDP_BODY


# --- malformed input: ProtocolError, nothing else ----------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_ID_19 = b"i" * 19
BAD_ID_21 = b"i" * 21

MALFORMED: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("header only", b"\x00" + MSG_ID),
    ("short message id", b"\x00" + MSG_ID[:5]),
    ("not msgpack", b"\x00" + MSG_ID + b"\xc1"),
    ("trailing bytes", _request("ping", (STOCK_ID,)) + b"\x00"),
    ("body not a list", b"\x00" + MSG_ID + umsgpack.packb({"ping": [STOCK_ID]})),
    ("body of three", b"\x00" + MSG_ID + umsgpack.packb(["ping", [STOCK_ID], 1])),
    ("name not str", _request(b"ping", (STOCK_ID,))),
    ("name an int", _request(7, (STOCK_ID,))),
    ("args not a list", _request("ping", STOCK_ID)),
    ("args a map", _request("ping", {"nodeid": STOCK_ID})),
    ("unknown method", _request("stun", ())),
    ("dunder method", _request("__init__", ())),
    ("rpc_ prefixed", _request("rpc_ping", (STOCK_ID,))),
    ("ping without args", _request("ping", ())),
    ("ping with two args", _request("ping", (STOCK_ID, STOCK_ID))),
    ("ping id as str", _request("ping", ("s" * 20,))),
    ("ping id as int", _request("ping", (1,))),
    ("ping id of 19 bytes", _request("ping", (BAD_ID_19,))),
    ("ping id of 21 bytes", _request("ping", (BAD_ID_21,))),
    ("ping id empty", _request("ping", (b"",))),
    ("store with two args", _request("store", (STOCK_ID, KEY))),
    ("store with four args", _request("store", (STOCK_ID, KEY, 1, 2))),
    ("store key of 19 bytes", _request("store", (STOCK_ID, BAD_ID_19, 1))),
    ("store key of 21 bytes", _request("store", (STOCK_ID, BAD_ID_21, 1))),
    ("store key as str", _request("store", (STOCK_ID, "k" * 20, 1))),
    ("store node id of 19 bytes", _request("store", (BAD_ID_19, KEY, 1))),
    ("store value None", _request("store", (STOCK_ID, KEY, None))),
    ("store value a list", _request("store", (STOCK_ID, KEY, [1, 2]))),
    ("store value a map", _request("store", (STOCK_ID, KEY, {"a": 1}))),
    ("find_node with one arg", _request("find_node", (STOCK_ID,))),
    ("find_node with three args", _request("find_node", (STOCK_ID, KEY, KEY))),
    ("find_node key of 21 bytes", _request("find_node", (STOCK_ID, BAD_ID_21))),
    ("find_node key None", _request("find_node", (STOCK_ID, None))),
    ("find_value with no args", _request("find_value", ())),
    ("find_value key of 19 bytes", _request("find_value", (STOCK_ID, BAD_ID_19))),
    ("find_value node id a float", _request("find_value", (1.5, KEY))),
    ("huge args list", _request("ping", [STOCK_ID] * 300)),
    ("huge list of small ints", _request("find_node", [0] * 8000)),
    ("huge value list", _request("store", (STOCK_ID, KEY, [0] * 4000))),
    ("nested past MAX_RPCUDP_DEPTH", _request("store", (STOCK_ID, KEY, _nested(MAX_RPCUDP_DEPTH)))),
    ("declared huge array", b"\x00" + MSG_ID + b"\x92\xa4ping\xdd\xff\xff\xff\xff"),
    ("over the datagram limit", _request("store", (STOCK_ID, KEY, b"x" * MAX_RPCUDP_BODY))),
    ("ext type", b"\x00" + MSG_ID + b"\x92\xa4ping\x91\xd4\x01\x00"),
]


@pytest.mark.parametrize("frame", [frame for _, frame in MALFORMED], ids=[name for name, _ in MALFORMED])
def test_malformed_requests_raise_protocol_error(frame: bytes) -> None:
    service, backend = _service()
    with pytest.raises(ProtocolError):
        service.handle(frame, STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    assert service.stats == CompatStats(malformed=1)
    assert backend.puts == []


@pytest.mark.parametrize(
    "frame",
    [
        _request("ping", (STOCK_ID,)),
        _request("store", (STOCK_ID, KEY, "a value")),
        _request("find_node", (STOCK_ID, KEY)),
        _request("find_value", (STOCK_ID, KEY)),
    ],
    ids=["ping", "store", "find_node", "find_value"],
)
def test_every_truncation_of_a_valid_request_is_refused(frame: bytes) -> None:
    service, backend = _service()
    assert service.handle(frame, STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST) is not None
    for end in range(len(frame)):
        with pytest.raises(ProtocolError):
            service.handle(frame[:end], STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    assert service.stats.malformed == len(frame)
    assert len(backend.puts) <= 1  # only the whole store request got through


rpc_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=30)
    | st.sampled_from([STOCK_ID, KEY, BAD_ID_19, BAD_ID_21])
)
rpc_value = st.recursive(
    rpc_scalar,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)
rpc_name = st.sampled_from(["ping", "store", "find_node", "find_value", "stun", "x"]) | st.text(max_size=40)


@FAST
@given(rpc_name, st.lists(rpc_value, max_size=5))
def test_random_requests_are_answered_or_refused_with_protocol_error(name: str, args: list[Any]) -> None:
    service, _ = _service()
    frame = _request(name, args)
    try:
        reply = service.handle(frame, STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    except ProtocolError:
        assert service.stats.malformed == 1
        return
    assert reply is not None
    assert reply[:RPCUDP_HEADER_SIZE] == b"\x01" + MSG_ID
    assert len(reply) <= MAX_RPCUDP_DATAGRAM
    umsgpack.unpackb(reply[RPCUDP_HEADER_SIZE:])  # a stock node can read whatever we send
    assert service.stats.malformed == 0


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_after_a_request_header_raise_only_protocol_error(body: bytes) -> None:
    service, _ = _service()
    frame = b"\x00" + MSG_ID + body
    try:
        reply = service.handle(frame, STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    except ProtocolError:
        assert service.stats.malformed == 1
    else:
        assert reply is not None
        assert reply[:RPCUDP_HEADER_SIZE] == b"\x01" + MSG_ID


@FAST
@given(st.binary(max_size=300))
def test_random_datagrams_raise_only_protocol_error(frame: bytes) -> None:
    service, _ = _service()
    try:
        kind = classify_datagram(frame)
    except ProtocolError:
        kind = DatagramKind.RPCUDP_REQUEST  # a transport never passes these on, but the service must cope
    try:
        reply = service.handle(frame, STOCK_ADDRESS, kind)
    except ProtocolError:
        assert service.stats.malformed == 1
    else:
        assert reply is None or reply[:1] == b"\x01"


@FAST
@given(st.sampled_from(["ping", "store", "find_node", "find_value"]), st.lists(rpc_value, max_size=5))
def test_any_truncation_or_bit_flip_raises_only_protocol_error(name: str, args: list[Any]) -> None:
    frame = _request(name, args)
    service, _ = _service()
    for end in range(len(frame)):
        with pytest.raises(ProtocolError):
            service.handle(frame[:end], STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    for position in range(RPCUDP_HEADER_SIZE, len(frame)):
        flipped = bytearray(frame)
        flipped[position] ^= 0x40
        try:
            reply = service.handle(bytes(flipped), STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
        except ProtocolError:
            continue
        assert reply is None or reply[:RPCUDP_HEADER_SIZE] == b"\x01" + MSG_ID


# --- responses and stored values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        b"\x01" + MSG_ID + umsgpack.packb(OUR_ID.bytes),
        b"\x01" + MSG_ID + umsgpack.packb({"value": "spoofed"}),
        b"\x01" + MSG_ID + b"\xc1 not msgpack at all",
        b"\x01",
    ],
    ids=["ping reply", "find_value reply", "garbage", "bare tag"],
)
def test_responses_are_ignored_without_touching_the_backend(frame: bytes) -> None:
    service, backend = _service()
    assert service.handle(frame, STOCK_ADDRESS, DatagramKind.RPCUDP_RESPONSE) is None
    assert service.stats == CompatStats(responses_ignored=1)
    assert backend.puts == []
    assert backend.closest_asked == []


def test_a_response_mislabelled_as_a_request_is_still_ignored() -> None:
    service, _ = _service()
    frame = b"\x01" + MSG_ID + umsgpack.packb(True)
    assert service.handle(frame, STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST) is None
    assert service.stats == CompatStats(responses_ignored=1)


@pytest.mark.parametrize(
    "stored",
    [
        b"\xc1",  # never valid msgpack
        msgpack.packb("ok") + b"\x00",  # trailing bytes
        msgpack.packb([1, 2]),  # not a stock value type
        msgpack.packb(None),
        msgpack.packb(b"x" * MAX_COMPAT_VALUE_BYTES),  # over the limit
        b"",
    ],
    ids=["invalid", "trailing", "list", "nil", "oversized", "empty"],
)
def test_unusable_stored_values_are_answered_as_absent(stored: bytes) -> None:
    backend = FakeBackend(_contacts(3))
    backend.values[KEY] = stored
    service, _ = _service(backend)
    body = _serve(service, _request("find_value", (STOCK_ID, KEY)))
    assert isinstance(body, list)
    assert len(body) == 3
    assert service.stats == CompatStats(find_values=1, stored_unusable=1)


# --- stock nodes stay out of routing ----------------------------------------------------------------------------


def test_the_backend_offers_no_way_to_add_a_contact() -> None:
    # The service can only reach the node through this protocol, so a stock node cannot enter a routing
    # table through it.  Adding a member here is a design change: it must not be a way to add contacts.
    members = {name for name in vars(CompatBackend) if not name.startswith("_")}
    assert members == {"node_id", "compat_closest", "compat_get", "compat_put", "wall_time"}


def test_stats_count_each_kind() -> None:
    service, _ = _service()
    _serve(service, _request("ping", (STOCK_ID,)))
    _serve(service, _request("store", (STOCK_ID, KEY, 1)))
    _serve(service, _request("store", (STOCK_ID, KEY, b"x" * MAX_COMPAT_VALUE_BYTES)))
    _serve(service, _request("find_node", (STOCK_ID, KEY)))
    _serve(service, _request("find_value", (STOCK_ID, KEY)))
    _serve(service, _request("find_value", (STOCK_ID, OUR_ID.bytes)))
    with pytest.raises(ProtocolError):
        service.handle(_request("ping", ()), STOCK_ADDRESS, DatagramKind.RPCUDP_REQUEST)
    assert service.handle(b"\x01" + MSG_ID + b"\xc0", STOCK_ADDRESS, DatagramKind.RPCUDP_RESPONSE) is None
    assert service.stats == CompatStats(
        pings=1,
        stores=1,
        find_nodes=1,
        find_values=2,
        values_found=1,
        refused=1,
        malformed=1,
        responses_ignored=1,
    )
