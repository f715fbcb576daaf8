"""Hypothesis strategies built from schema specs, and a test-only packet with a field of every spec kind.

Shared by the codec tests and the compiled-decoder tests (``test_fastwire.py``), which check the same schemas
from two sides.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated, Any

from hypothesis import strategies as st

import p2pchat.core.packets  # noqa: F401 - registers the protocol's packets in PACKETS
from p2pchat.core.schema import (
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
    packet,
    schema_of,
    wire_struct,
)
from p2pchat.errors import ProtocolError

# --- a test-only registry that exercises every spec -------------------------------------------------------------

TEST_PACKETS = PacketRegistry()


@wire_struct
@dataclass(frozen=True, slots=True)
class Pair(WireStruct):
    """A small nested struct."""

    flag: Annotated[bool, Bool()]
    ratio: Annotated[float, Float(min_value=-1.0, max_value=1.0)]


@packet(kind=MAX_PACKET_KIND, registry=TEST_PACKETS)
@dataclass(frozen=True, slots=True)
class Everything(Packet):
    """One field of every spec kind, with extreme bounds."""

    wide: Annotated[int, Int(min_value=MSGPACK_INT_MIN, max_value=MSGPACK_INT_MAX)]
    maybe_blob: Annotated[bytes | None, Optional(Bytes(min_len=1, max_len=300))]
    maybe_pair: Annotated[Pair | None, Optional(Struct(Pair))]
    grid: Annotated[
        tuple[tuple[int, ...], ...], List(item=List(item=Int(min_value=-200, max_value=200), max_items=3), max_items=16)
    ]
    label: Annotated[str, Str(max_bytes=40)]
    host: Annotated[str, IpAddress()]


# --- strategies built from the specs ----------------------------------------------------------------------------


def _utf8_prefix(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode("utf-8", "ignore")


def strategy_for(spec: Spec) -> st.SearchStrategy[Any]:
    """Values that *spec* accepts."""
    match spec:
        case Bytes():
            return st.binary(min_size=spec.min_len, max_size=spec.max_len)
        case Str():
            return st.text(max_size=spec.max_bytes).map(lambda s: _utf8_prefix(s, spec.max_bytes))
        case Int():
            return st.integers(spec.min_value, spec.max_value)
        case Bool():
            return st.booleans()
        case Float():
            return st.floats(spec.min_value, spec.max_value, allow_nan=False, allow_infinity=False)
        case IpAddress():
            return st.ip_addresses().map(str)
        case Optional():
            return st.none() | strategy_for(spec.spec)
        case List():
            return st.lists(strategy_for(spec.item), min_size=spec.min_items, max_size=spec.max_items).map(tuple)
        case Struct():
            return struct_strategy(spec.cls)
    # A spec of another module (a record kind): the small integers it accepts, as it turns them into values.
    accepted = []
    for value in range(256):
        with contextlib.suppress(ProtocolError):
            accepted.append(spec.check(value))
    assert accepted, f"no strategy for {spec!r}"
    return st.sampled_from(accepted)


def struct_strategy(cls: type[WireStruct]) -> st.SearchStrategy[Any]:
    """Valid instances of a schema class: values each spec accepts, minus those the class's own invariants
    (``__post_init__``) refuse."""

    def build(values: tuple[Any, ...]) -> WireStruct | None:
        try:
            return cls(*values)
        except ProtocolError:
            return None

    fields = st.tuples(*[strategy_for(spec) for spec in schema_of(cls).specs])
    return fields.map(build).filter(lambda obj: obj is not None)


any_packet = st.sampled_from(list(PACKETS)).flatmap(struct_strategy)
