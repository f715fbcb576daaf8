"""The front end's side of the control socket.

:meth:`ControlClient.connect` raises :class:`DaemonNotRunning` when nothing listens on the home's socket (no
socket file, or a stale one left by a daemon that was killed), so a command can fall back to running a node of
its own.  Requests are answered in order; an event that arrives while a reply is awaited is kept (up to
:data:`MAX_PENDING_EVENTS`) for :meth:`ControlClient.next_event`.
"""

from __future__ import annotations

import collections
import socket
from pathlib import Path
from typing import Any, Final

import trio

from p2pchat.control.protocol import MAX_REPLY_BYTES, MAX_REQUEST_BYTES, FrameReader, encode_frame
from p2pchat.errors import P2PChatError, ProtocolError, UserError

__all__ = ["MAX_PENDING_EVENTS", "ControlClient", "DaemonNotRunning"]

MAX_PENDING_EVENTS: Final = 1024
"""Events held while the client waits for a reply; older ones are dropped beyond this."""

_CHUNK: Final = 65536

JsonDict = dict[str, Any]


class DaemonNotRunning(P2PChatError):  # noqa: N818 - a state, not a failure
    """No daemon answers on this home's control socket."""


class ControlClient:
    """One connection to a daemon's control socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._reader = FrameReader(MAX_REPLY_BYTES)
        self._next_id = 0
        self._events: collections.deque[JsonDict] = collections.deque(maxlen=MAX_PENDING_EVENTS)

    @classmethod
    async def connect(cls, path: Path) -> ControlClient:
        """Connect to the socket at *path*; DaemonNotRunning if no daemon listens there."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DaemonNotRunning(f"no p2pchat daemon is running on {path.parent}") from None
        except OSError as exc:
            sock.close()
            raise UserError(f"cannot reach the daemon's control socket {path}: {exc.strerror or exc}") from None
        return cls(trio.SocketStream(sock))

    async def aclose(self) -> None:
        """Close the connection."""
        await self._stream.aclose()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, op: str, **args: Any) -> JsonDict:
        """Send one request and return its reply; UserError with the daemon's message if it refused it."""
        request_id = self._next_id
        self._next_id += 1
        await self._stream.send_all(encode_frame({"id": request_id, "op": op, **args}, MAX_REQUEST_BYTES))
        while True:
            frame = await self._receive()
            if "event" in frame:
                self._events.append(frame)
                continue
            if frame.get("ok") is True and frame.get("id") == request_id:
                return frame
            if frame.get("ok") is False:
                raise UserError(str(frame.get("error", "the daemon refused the request")))
            raise UserError("the daemon answered out of turn; is it the same p2pchat version?")

    async def subscribe(self) -> None:
        """Ask for events on this connection (read them with :meth:`next_event`)."""
        await self.request("subscribe")

    async def next_event(self) -> JsonDict:
        """The next event; UserError if the daemon ends the stream."""
        if self._events:
            return self._events.popleft()
        frame = await self._receive()
        if "event" not in frame:
            raise UserError(str(frame.get("error", "the daemon sent a reply where an event was expected")))
        return frame

    async def _receive(self) -> JsonDict:
        try:
            while (frame := self._reader.next()) is None:
                data = await self._stream.receive_some(_CHUNK)
                if not data:
                    raise UserError("the daemon closed the connection (did it stop?)")
                self._reader.feed(data)
        except ProtocolError as exc:
            raise UserError(f"the daemon sent something unreadable ({exc}); is it the same p2pchat version?") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise UserError("the connection to the daemon broke (did it stop?)") from None
        if frame.get("event") == "closed":
            raise UserError(f"the daemon closed the event stream: {frame.get('reason')}")
        return frame
