"""Node ids: 160 bits, a personalized hash of the key, XOR distance, bucket index, a cheap value type."""

from __future__ import annotations

import copy
import hashlib
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pchat.core.ids import NODE_ID_BITS, NODE_ID_BYTES, NodeId, bucket_index, node_id_for_key

ids = st.binary(min_size=NODE_ID_BYTES, max_size=NODE_ID_BYTES).map(NodeId.from_bytes)


def test_node_id_is_160_bits_and_matches_an_independent_hash() -> None:
    key = bytes(range(32))
    node_id = node_id_for_key(key)
    assert NODE_ID_BITS == 160
    assert len(node_id.bytes) == NODE_ID_BYTES == 20
    assert 0 <= node_id.int < 2**160
    hasher = hashlib.blake2b(digest_size=20, person=b"p2pchat-nodeid".ljust(16, b"\0"))
    hasher.update(key)
    assert node_id.bytes == hasher.digest()


def test_node_id_is_deterministic_and_differs_per_key() -> None:
    keys = [bytes([i]) * 32 for i in range(50)]
    assert [node_id_for_key(k) for k in keys] == [node_id_for_key(k) for k in keys]
    assert len({node_id_for_key(k) for k in keys}) == len(keys)


def test_node_id_for_key_needs_a_32_byte_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        node_id_for_key(bytes(31))


@pytest.mark.parametrize("size", [0, 19, 21, 32])
def test_from_bytes_rejects_wrong_length(size: int) -> None:
    with pytest.raises(ValueError, match="20 bytes"):
        NodeId.from_bytes(bytes(size))


@pytest.mark.parametrize("value", [-1, 2**160])
def test_from_int_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="2\\*\\*160"):
        NodeId.from_int(value)


@given(ids)
def test_bytes_int_and_hex_agree(node_id: NodeId) -> None:
    assert NodeId.from_int(node_id.int) == node_id
    assert node_id.int == int.from_bytes(node_id.bytes, "big")
    assert node_id.hex() == node_id.bytes.hex()
    assert NodeId.from_bytes(bytes.fromhex(node_id.hex())) == node_id


@given(ids, ids)
def test_distance_is_symmetric_xor_and_zero_only_to_self(a: NodeId, b: NodeId) -> None:
    assert a.distance(a) == 0
    assert a.distance(b) == b.distance(a) == a.int ^ b.int
    assert (a.distance(b) == 0) == (a == b)


@given(ids, ids)
def test_ordering_follows_the_integer_value(a: NodeId, b: NodeId) -> None:
    assert (a < b) == (a.int < b.int)
    assert (a <= b) == (a.int <= b.int)
    assert (a > b) == (a.int > b.int)
    assert (a >= b) == (a.int >= b.int)


def test_bucket_index_is_the_highest_differing_bit() -> None:
    zero = NodeId.from_int(0)
    assert bucket_index(zero, zero) == -1
    assert bucket_index(zero, NodeId.from_int(1)) == 0
    assert bucket_index(zero, NodeId.from_int(0b110)) == 2
    assert bucket_index(zero, NodeId.from_int(2**159)) == 159
    assert bucket_index(NodeId.from_int(2**160 - 1), NodeId.from_int(2**159 - 1)) == 159


@given(ids, ids)
def test_bucket_index_is_symmetric_and_bounds_the_distance(a: NodeId, b: NodeId) -> None:
    index = bucket_index(a, b)
    assert index == bucket_index(b, a)
    assert -1 <= index < NODE_ID_BITS
    if index >= 0:
        assert 2**index <= a.distance(b) < 2 ** (index + 1)


def test_node_id_is_an_immutable_hashable_value() -> None:
    a = NodeId.from_int(12345)
    b = NodeId.from_bytes(a.bytes)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != a.bytes
    with pytest.raises(AttributeError):
        a._int = 0
    with pytest.raises(AttributeError):
        a.extra = 1
    assert copy.deepcopy(a) == a
    assert pickle.loads(pickle.dumps(a)) == a


def test_repr_is_short() -> None:
    node_id = NodeId.from_bytes(bytes.fromhex("1030da75e683036d15c6f364b496ed9014d20421"))
    assert repr(node_id) == "NodeId(1030da75…)"
