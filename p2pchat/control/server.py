"""The daemon's side of the control socket: a Unix socket in the home directory, only the owner may connect.

Each connection reads requests (:mod:`p2pchat.control.protocol`) and answers them in order from a
:class:`~p2pchat.service.ChatService`.  After ``subscribe`` the connection also carries events; replies and
events share the stream under one lock, so frames never interleave.  At most :data:`MAX_CLIENTS` connections are
served at once: one more gets an error reply and is closed.  A request that is not a valid map gets an error
reply and keeps the connection; a broken frame (oversized, not msgpack) gets an error reply and closes it, since
the stream has lost its framing.

Permissions: the home directory is 0700 and the socket is made 0600 right after it is bound, so no other user can
reach it even in the moment between.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from p2pchat.control.protocol import (
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    FrameReader,
    Request,
    encode_frame,
    error_reply,
    parse_request,
)
from p2pchat.errors import P2PChatError, ProtocolError, UserError
from p2pchat.service import MAX_HISTORY_ITEMS, ChatService

__all__ = ["LISTEN_BACKLOG", "MAX_CLIENTS", "RECEIVE_CHUNK", "SOCKET_MODE", "ControlServer", "ControlStats"]

log = logging.getLogger(__name__)

MAX_CLIENTS: Final = 32
"""Connections served at once; the next one is told so and closed."""

LISTEN_BACKLOG: Final = 16
"""Connections the kernel queues before we accept them."""

RECEIVE_CHUNK: Final = 65536
"""Bytes read from a connection at a time."""

SOCKET_MODE: Final = 0o600
"""The control socket's mode: only its owner can connect."""

JsonDict = dict[str, Any]


@dataclass(slots=True)
class ControlStats:
    """Counters of the control server; ``refused_*`` and ``bad_*`` are input it did not serve."""

    connections: int = 0
    requests: int = 0
    refused_clients: int = 0
    bad_requests: int = 0
    bad_frames: int = 0


class ControlServer:
    """Serves one :class:`ChatService` on a Unix socket at *path*."""

    def __init__(self, service: ChatService, path: Path, *, max_clients: int = MAX_CLIENTS) -> None:
        self.service = service
        self.path = path
        self.max_clients = max_clients
        self.stats = ControlStats()
        self.clients = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket (replacing a stale one: the caller holds the home's lock) and serve until cancelled."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            try:
                await sock.bind(str(self.path))
            except OSError as exc:
                if len(os.fsencode(self.path)) > 100 or exc.errno == errno.ENAMETOOLONG:
                    raise UserError(
                        f"the control socket path {self.path} is too long for a Unix socket; use a shorter --home"
                    ) from None
                raise UserError(f"cannot create the control socket {self.path}: {exc.strerror}") from None
            os.chmod(self.path, SOCKET_MODE)
            sock.listen(LISTEN_BACKLOG)
            listener = trio.SocketListener(sock)
        except BaseException:
            sock.close()
            raise
        try:
            async with listener, trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._serve, [listener])
                task_status.started()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        async with stream:
            if self.clients >= self.max_clients:
                self.stats.refused_clients += 1
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    reply = error_reply(None, f"the daemon serves {self.max_clients} clients at once; try again")
                    await stream.send_all(encode_frame(reply, MAX_REPLY_BYTES))
                return
            self.clients += 1
            try:
                await _Connection(self, stream).run()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            finally:
                self.clients -= 1


class _Connection:
    """One client: its requests in order, and its event stream once it subscribes."""

    def __init__(self, server: ControlServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.service = server.service
        self.stream = stream
        self.send_lock = trio.Lock()
        self.events: trio.MemoryReceiveChannel[JsonDict] | None = None
        self.subscribed = False

    async def send(self, value: JsonDict) -> None:
        frame = encode_frame(value, MAX_REPLY_BYTES)
        async with self.send_lock:
            await self.stream.send_all(frame)

    async def run(self) -> None:
        reader = FrameReader(MAX_REQUEST_BYTES)
        async with trio.open_nursery() as nursery:
            while True:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
                try:
                    if not data:
                        reader.feed_eof()
                        break
                    reader.feed(data)
                    while (value := reader.next()) is not None:
                        await self._request(value, nursery)
                except ProtocolError as exc:
                    self.server.stats.bad_frames += 1
                    await self.send(error_reply(None, f"bad frame: {exc}; closing the connection"))
                    break
            nursery.cancel_scope.cancel()

    async def _request(self, value: JsonDict, nursery: trio.Nursery) -> None:
        self.server.stats.requests += 1
        raw_id = value.get("id")
        request_id = raw_id if type(raw_id) is int else None
        try:
            request = parse_request(value)
        except ProtocolError as exc:
            self.server.stats.bad_requests += 1
            await self.send(error_reply(request_id, str(exc)))
            return
        try:
            result = self._dispatch(request)
        except UserError as exc:
            await self.send(error_reply(request.id, str(exc)))
            return
        except P2PChatError as exc:
            log.info("control request %s failed: %s", request.op, exc)
            await self.send(error_reply(request.id, f"{request.op} failed: {exc}"))
            return
        await self.send({"id": request.id, "ok": True, **result})
        if self.events is not None and not self.subscribed:
            # Forwarding starts only after the reply has gone, so the client sees the reply first.
            self.subscribed = True
            nursery.start_soon(self._forward, self.events)

    def _dispatch(self, request: Request) -> JsonDict:
        args = request.args
        if request.op == "status":
            return self.service.status()
        if request.op == "send":
            return {"message": self.service.send(args["to"], args["text"])}
        if request.op == "message":
            return {"message": self.service.message(args["message_id"])}
        if request.op == "history":
            limit = MAX_HISTORY_ITEMS if args["limit"] is None else args["limit"]
            return {"messages": self.service.history(args["peer"], limit)}
        assert request.op == "subscribe"
        if self.events is not None:
            raise UserError("this connection is subscribed already")
        self.events = self.service.subscribe()
        return {}

    async def _forward(self, events: trio.MemoryReceiveChannel[JsonDict]) -> None:
        with events:
            async for event in events:
                await self.send(event)
        # The service cut us off (we fell behind): say so, then end the connection.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send({"event": "closed", "reason": "this client fell too far behind; reconnect"})
        await self.stream.aclose()
