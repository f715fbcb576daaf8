"""Stream framing: FrameDecoder splits a TCP byte stream into length-prefixed frames, bounded and sans-I/O."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.core.framing import (
    MAX_STREAM_BUFFER,
    MAX_STREAM_FRAME,
    MIN_STREAM_FRAME,
    STREAM_HEADER_SIZE,
    FrameDecoder,
    encode_frame,
)
from p2pchat.errors import ProtocolError

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def _feed_in_chunks(stream: bytes, sizes: list[int]) -> tuple[list[bytes], int]:
    """Feed *stream* in chunks of the given sizes (cycled); return the frames and the largest buffered size seen."""
    decoder = FrameDecoder()
    frames: list[bytes] = []
    peak = 0
    offset = 0
    index = 0
    while offset < len(stream):
        size = sizes[index % len(sizes)]
        index += 1
        decoder.feed(stream[offset : offset + size])
        offset += size
        for frame in decoder.frames():
            frames.append(frame)
            peak = max(peak, decoder.buffered_size)
        peak = max(peak, decoder.buffered_size)
        assert decoder.buffered_size <= MAX_STREAM_BUFFER
    decoder.feed_eof()
    return frames, peak


@FAST
@given(
    st.lists(st.binary(min_size=MIN_STREAM_FRAME, max_size=300), max_size=20),
    st.lists(st.integers(1, 700), min_size=1, max_size=10),
)
def test_round_trip_in_random_chunks(payloads: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(encode_frame(payload) for payload in payloads)
    frames, _ = _feed_in_chunks(stream, sizes)
    assert frames == payloads


@FAST
@given(st.lists(st.binary(min_size=MIN_STREAM_FRAME, max_size=50), min_size=1, max_size=10))
def test_round_trip_one_byte_at_a_time(payloads: list[bytes]) -> None:
    stream = b"".join(encode_frame(payload) for payload in payloads)
    frames, _ = _feed_in_chunks(stream, [1])
    assert frames == payloads


def test_many_small_frames_in_one_chunk_are_sliced_without_buffering() -> None:
    payloads = [i.to_bytes(3, "big") for i in range(20_000)]
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_frame(payload) for payload in payloads))
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
        # Whole frames come straight out of the fed chunk: nothing is copied into the decoder's buffer.
        assert decoder.buffered_size == 0
    assert frames == payloads


def test_max_size_frame_is_accepted_whole() -> None:
    payload = random.Random(1).randbytes(MAX_STREAM_FRAME)
    decoder = FrameDecoder()
    decoder.feed(encode_frame(payload))
    assert list(decoder.frames()) == [payload]
    assert decoder.buffered_size == 0
    decoder.feed_eof()


def test_max_size_frame_one_byte_at_a_time_stays_within_the_buffer_bound() -> None:
    payload = random.Random(2).randbytes(MAX_STREAM_FRAME)
    frames, peak = _feed_in_chunks(encode_frame(payload), [1])
    assert frames == [payload]
    # The decoder held all but the last byte of the largest frame, and never more.
    assert peak == MAX_STREAM_BUFFER - 1


def test_big_frames_in_big_chunks_stay_within_the_buffer_bound() -> None:
    rng = random.Random(3)
    payloads = [rng.randbytes(rng.choice([MAX_STREAM_FRAME, MAX_STREAM_FRAME - 1, 100_000, 5])) for _ in range(8)]
    stream = b"".join(encode_frame(payload) for payload in payloads)
    frames, peak = _feed_in_chunks(stream, [65_536, 99_999, 7, 150_000])
    assert frames == payloads
    assert peak <= MAX_STREAM_BUFFER


def test_oversize_length_is_refused_as_soon_as_its_header_arrives() -> None:
    decoder = FrameDecoder()
    header = struct.pack(">I", MAX_STREAM_FRAME + 1)
    for byte in header[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.feed(header[-1:])
    # No payload byte was ever sent: the header alone is enough to refuse.
    with pytest.raises(ProtocolError, match=f"length {MAX_STREAM_FRAME + 1} outside"):
        decoder.next_frame()


@pytest.mark.parametrize("length", [MAX_STREAM_FRAME + 1, 2**32 - 1, 0])
def test_bad_length_is_refused_when_fed_whole(length: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"ok") + struct.pack(">I", length) + b"x" * 10)
    assert decoder.next_frame() == b"ok"
    with pytest.raises(ProtocolError, match="outside"):
        decoder.next_frame()


def test_a_broken_decoder_stays_broken() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", 0))
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    assert decoder.buffered_size == 0
    with pytest.raises(ProtocolError, match="already broken"):
        decoder.next_frame()
    with pytest.raises(ProtocolError, match="already broken"):
        decoder.feed(encode_frame(b"fine"))
    with pytest.raises(ProtocolError, match="already broken"):
        decoder.feed_eof()


def test_encode_frame_limits() -> None:
    assert encode_frame(b"x" * MAX_STREAM_FRAME)[:STREAM_HEADER_SIZE] == struct.pack(">I", MAX_STREAM_FRAME)
    with pytest.raises(ValueError, match="stream frame holds"):
        encode_frame(b"x" * (MAX_STREAM_FRAME + 1))
    with pytest.raises(ValueError, match="stream frame holds"):
        encode_frame(b"")


def test_feeding_before_draining_is_a_programming_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"a") + encode_frame(b"b"))
    assert decoder.next_frame() == b"a"
    with pytest.raises(RuntimeError, match="drain"):
        decoder.feed(encode_frame(b"c"))
    with pytest.raises(RuntimeError, match="drain"):
        decoder.feed_eof()
    assert decoder.next_frame() == b"b"
    assert decoder.next_frame() is None
    decoder.feed(encode_frame(b"c"))
    assert list(decoder.frames()) == [b"c"]


@pytest.mark.parametrize("cut", [1, STREAM_HEADER_SIZE - 1, STREAM_HEADER_SIZE, STREAM_HEADER_SIZE + 2])
def test_stream_ending_inside_a_frame_is_refused(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"hello")[:cut])
    assert decoder.next_frame() is None
    with pytest.raises(ProtocolError, match="ended inside a frame"):
        decoder.feed_eof()


def test_empty_feeds_and_clean_eof() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"")
    assert decoder.next_frame() is None
    decoder.feed_eof()
    decoder.feed(encode_frame(b"x")[:2])
    assert decoder.next_frame() is None
    decoder.feed(b"")
    assert decoder.next_frame() is None
    decoder.feed(encode_frame(b"x")[2:])
    assert decoder.next_frame() == b"x"
    decoder.feed_eof()


def test_mutable_input_is_copied_so_the_caller_may_reuse_it() -> None:
    decoder = FrameDecoder()
    chunk = bytearray(encode_frame(b"first") + encode_frame(b"second")[:3])
    decoder.feed(chunk)
    chunk[:] = b"\x00" * len(chunk)  # the caller reuses its receive buffer
    assert decoder.next_frame() == b"first"
    assert decoder.next_frame() is None
    view = memoryview(bytearray(encode_frame(b"second")[3:]))
    decoder.feed(view)
    assert decoder.next_frame() == b"second"
