"""Reading a test subprocess's stdout a line at a time, with a bound on the line length."""

from __future__ import annotations

import trio

MAX_LINE = 65536
"""Longest line a test subprocess may write; a longer one fails the test instead of growing a buffer."""


class LineReader:
    """Lines from a subprocess's stdout, each at most :data:`MAX_LINE` bytes; *who* names the writer in failures."""

    def __init__(self, stream: trio.abc.ReceiveStream, who: str) -> None:
        self._stream = stream
        self._who = who
        self._buffer = bytearray()

    async def line(self) -> bytes:
        """The next line, without its newline."""
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise AssertionError(f"{self._who} wrote a line over {MAX_LINE} bytes")
            chunk = await self._stream.receive_some()
            if not chunk:
                raise AssertionError(f"{self._who} closed stdout (after {bytes(self._buffer)!r})")
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line
