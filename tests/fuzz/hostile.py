"""Decoded-but-hostile values: random instances of any schema class that pass the decoder's field checks.

A packet whose every field is in range gets past :func:`~p2pchat.core.framing.decode_datagram` and reaches the
handler, which is where a node's own logic (lookups in the store, tokens, reassembly) meets hostile input.
Values favour the edges of each field's range.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack  # type: ignore[import-untyped]

from p2pchat.core.framing import P2P_MAGIC, PROTOCOL_VERSION
from p2pchat.core.records import RecordKind
from p2pchat.core.schema import (
    Bool,
    Bytes,
    Float,
    Int,
    IpAddress,
    List,
    Optional,
    Packet,
    Spec,
    Str,
    Struct,
    WireStruct,
    schema_of,
    to_wire,
)

__all__ = ["HOSTS", "encode_unchecked", "random_instance", "random_value"]

HOSTS = ("127.0.0.1", "0.0.0.0", "255.255.255.255", "10.0.0.1", "::", "::1", "2001:db8::1", "fe80::1")
"""Addresses a hostile packet names: loopback, unspecified, broadcast, link-local, documentation ranges."""

_TEXT = ("", "x", "é", "\u2603" * 60, "a" * 200, "\x00", "\U0001f600" * 50)


def _length(rng: random.Random, low: int, high: int) -> int:
    return rng.choice(
        (low, high, low + 1 if low < high else low, high - 1 if high > low else high, rng.randint(low, high))
    )


def random_value(spec: Spec, rng: random.Random) -> Any:
    """A Python value that *spec*'s checks accept, chosen with a bias to the edges."""
    if isinstance(spec, Bytes):
        return rng.randbytes(_length(rng, spec.min_len, min(spec.max_len, spec.min_len + 2048)))
    if isinstance(spec, Int):
        low, high = int(spec.min_value), int(spec.max_value)
        return rng.choice((low, high, max(low, min(high, 0)), max(low, min(high, 1)), rng.randint(low, high)))
    if isinstance(spec, Bool):
        return rng.random() < 0.5
    if isinstance(spec, Float):
        return rng.choice((spec.min_value, spec.max_value, rng.uniform(spec.min_value, spec.max_value)))
    if isinstance(spec, Str):
        text = rng.choice(_TEXT)
        while len(text.encode()) > spec.max_bytes:
            text = text[:-1]
        return text
    if isinstance(spec, IpAddress):
        return rng.choice(HOSTS)
    if isinstance(spec, Optional):
        return None if rng.random() < 0.3 else random_value(spec.spec, rng)
    if isinstance(spec, List):
        count = _length(rng, spec.min_items, min(spec.max_items, spec.min_items + 64))
        return tuple(random_value(spec.item, rng) for _ in range(count))
    if isinstance(spec, Struct):
        return random_instance(spec.cls, rng)
    if type(spec).__name__ == "_RecordKindSpec":
        return rng.choice(list(RecordKind))
    raise TypeError(f"no generator for {spec!r}")


def random_instance(cls: type[WireStruct], rng: random.Random) -> Any:
    """An instance of *cls* built from :func:`random_value` of each field (cross-field rules may still fail)."""
    schema = schema_of(cls)
    return cls(*(random_value(spec, rng) for spec in schema.specs))


def encode_unchecked(packet: Packet) -> bytes:
    """*packet* as a datagram without the size limit, so oversized ones also reach the decoder (which drops them)."""
    return bytes((P2P_MAGIC, PROTOCOL_VERSION, packet.KIND)) + msgpack.packb(to_wire(packet))
