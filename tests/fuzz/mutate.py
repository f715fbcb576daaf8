"""A seeded mutator for fuzz inputs: byte-level edits, and msgpack-aware edits that keep the outer layers valid.

Random bytes rarely get past a decoder's first check (a magic byte, a msgpack array header, a length), so most
inputs start from a valid encoding (:mod:`tests.fuzz.corpus`) and change a little of it.  The msgpack-aware
edits decode the input (after a header of 0, 1, 3, 4 or 21 bytes: a version byte, a datagram header, a frame
length, an rpcudp header), replace one value deep inside -- a boundary integer, a value of the wrong type, a
byte string one byte too long, a nested encoding mutated in turn -- and encode it again, so the fuzzer reaches
the schema and validation checks behind the msgpack layer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgpack  # type: ignore[import-untyped]

__all__ = ["INTERESTING_INTS", "mutate", "random_input"]

INTERESTING_INTS = (
    0,
    1,
    -1,
    2,
    7,
    8,
    15,
    16,
    20,
    31,
    32,
    127,
    128,
    255,
    256,
    1023,
    1024,
    1280,
    65535,
    65536,
    131072,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 48) + 1,
    (1 << 63) - 1,
    -(1 << 63),
    (1 << 64) - 1,
)
"""Integers at the edges of msgpack's forms and of our limits."""

_INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x90, 0x9F, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC7, 0xD4, 0xDC, 0xDD)
"""Single bytes that mean something to msgpack (nil, bool, bin8, ext, array16 ...) or to a length."""

_HEADER_OFFSETS = (0, 1, 3, 4, 21)

_MAX_DEPTH = 6


def random_input(rng: random.Random, max_size: int) -> bytes:
    """Random bytes of a random length up to *max_size* (short ones more often)."""
    size = min(max_size, int(rng.expovariate(1 / 64)))
    return rng.randbytes(size)


def mutate(data: bytes, rng: random.Random, seeds: Sequence[bytes], max_size: int) -> bytes:
    """One to four random edits of *data*, the result cut to *max_size* bytes."""
    for _ in range(rng.randint(1, 4)):
        data = _structured(data, rng, seeds, 0) if rng.random() < 0.35 else _bytewise(data, rng, seeds)
    return data[:max_size]


def _bytewise(data: bytes, rng: random.Random, seeds: Sequence[bytes]) -> bytes:
    buf = bytearray(data)
    op = rng.randrange(10)
    if not buf and op < 8:
        op = 8
    if op == 0:
        position = rng.randrange(len(buf) * 8)
        buf[position // 8] ^= 1 << (position % 8)
    elif op == 1:
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif op == 2:
        buf[rng.randrange(len(buf))] = rng.choice(_INTERESTING_BYTES)
    elif op == 3:
        start = rng.randrange(len(buf))
        del buf[start : start + rng.randint(1, 16)]
    elif op == 4:
        start = rng.randrange(len(buf))
        chunk = buf[start : start + rng.randint(1, 32)]
        buf[start:start] = chunk
    elif op == 5:
        del buf[rng.randrange(len(buf)) :]
    elif op == 6:
        width = rng.choice((1, 2, 4, 8))
        start = rng.randrange(len(buf))
        value = rng.choice(INTERESTING_INTS) % (1 << (8 * width))
        buf[start : start + width] = value.to_bytes(width, "big")
    elif op == 7:
        other = rng.choice(seeds) if seeds else b""
        cut = rng.randrange(len(buf) + 1)
        buf = buf[:cut] + other[rng.randrange(len(other) + 1) :]
    elif op == 8:
        position = rng.randrange(len(buf) + 1)
        buf[position:position] = rng.randbytes(rng.randint(1, 8))
    else:
        buf += rng.randbytes(rng.randint(1, 64))
    return bytes(buf)


def _structured(data: bytes, rng: random.Random, seeds: Sequence[bytes], depth: int) -> bytes:
    """Decode *data* as msgpack after some header, change one value inside, encode it again."""
    for offset in rng.sample(_HEADER_OFFSETS, len(_HEADER_OFFSETS)):
        if offset >= len(data):
            continue
        try:
            value = msgpack.unpackb(data[offset:], raw=False, strict_map_key=False)
        except Exception:
            continue
        try:
            body: bytes = msgpack.packb(_change(value, rng, seeds, depth), use_bin_type=True)
        except (ValueError, TypeError, OverflowError):
            return data
        if offset == 4:
            return len(body).to_bytes(4, "big") + body  # a stream frame: keep its length right
        return data[:offset] + body
    return _bytewise(data, rng, seeds)


def _change(value: object, rng: random.Random, seeds: Sequence[bytes], depth: int) -> object:
    """*value* with one node (chosen at random, leaves more often) replaced."""
    if isinstance(value, list) and value and depth < _MAX_DEPTH and rng.random() < 0.8:
        copy = list(value)
        op = rng.randrange(10)
        index = rng.randrange(len(copy))
        if op == 0:
            del copy[index]
        elif op == 1:
            copy.insert(index, copy[index])
        elif op == 2:
            copy[index], copy[-1] = copy[-1], copy[index]
        else:
            copy[index] = _change(copy[index], rng, seeds, depth + 1)
        return copy
    if isinstance(value, dict) and value and depth < _MAX_DEPTH and rng.random() < 0.8:
        copy_map = dict(value)
        key = rng.choice(list(copy_map))
        copy_map[key] = _change(copy_map[key], rng, seeds, depth + 1)
        return copy_map
    return _leaf(value, rng, seeds, depth)


def _leaf(value: object, rng: random.Random, seeds: Sequence[bytes], depth: int) -> object:
    roll = rng.random()
    if isinstance(value, bytes) and roll < 0.6:
        if len(value) > 4 and rng.random() < 0.5:
            return _structured(value, rng, seeds, depth + 1)  # a nested encoding (a header, a part's chunk ...)
        return rng.choice(
            (
                value[:-1],
                value + b"\x00",
                bytes(len(value)),
                b"",
                _bytewise(value, rng, seeds) if value else b"\x00",
            )
        )
    if type(value) is int and roll < 0.6:
        return rng.choice((value - 1, value + 1, -value, rng.choice(INTERESTING_INTS)))
    if isinstance(value, str) and roll < 0.6:
        return rng.choice((value[:-1], value + "\u00e9", "", "x" * rng.randint(0, 300), value.upper()))
    return rng.choice(
        (
            None,
            True,
            False,
            rng.choice(INTERESTING_INTS),
            1.5,
            float("nan"),
            float("inf"),
            "",
            "p2p",
            b"",
            rng.randbytes(rng.choice((1, 8, 16, 20, 32, 33, 64))),
            [],
            {},
            [[[[[[]]]]]],
            {"value": b"x"},
            rng.choice(seeds)[:64] if seeds else b"",
        )
    )
