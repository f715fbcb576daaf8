"""The direct channel between two nodes: the trio shell around :mod:`p2pchat.core.handshake`.

:func:`open_channel` runs the handshake over any :class:`~p2pchat.net.base.Stream` (real TCP or SimNetwork) and
returns a :class:`Channel` that sends and receives encrypted, authenticated messages in order.
:func:`serve_channels` accepts connections from a listener, runs the responder's handshake for each and hands
each established channel to a handler in its own task.

Every message travels in one stream frame (:func:`~p2pchat.core.framing.encode_frame`); the stream is read in
chunks of at most :data:`_RECEIVE_CHUNK` bytes into a :class:`~p2pchat.core.framing.FrameDecoder`, which never
holds more than one frame, and an incomplete frame longer than the current phase allows (a handshake message,
then a transport frame) is refused as soon as that much of it is buffered.

Errors, by who must act:

* :class:`~p2pchat.errors.ProtocolError` -- the peer sent something invalid; the channel is over.
* :class:`HandshakeTimeoutError`, :class:`IdleTimeoutError` -- the peer went quiet.
* :class:`trio.BrokenResourceError` -- the connection went away (reset, or closed without a close frame).
* :class:`trio.EndOfChannel` -- the peer closed the channel cleanly (an authenticated close frame).
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from p2pchat.core.framing import STREAM_HEADER_SIZE, FrameDecoder, encode_frame
from p2pchat.core.handshake import (
    MAX_CHANNEL_FRAME,
    MAX_CHANNEL_WIRE_FRAME,
    MAX_HANDSHAKE_MESSAGE,
    Handshake,
    HandshakeResult,
)
from p2pchat.core.identity import Identity, PublicIdentity
from p2pchat.errors import P2PChatError, ProtocolError
from p2pchat.net.base import Address, Listener, Stream

__all__ = [
    "ACCEPT_RETRY_DELAY",
    "CLOSE_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_CHANNEL_FRAME",
    "MAX_CONNECTIONS",
    "Channel",
    "ChannelHandler",
    "ChannelServerStats",
    "ChannelTimeoutError",
    "HandshakeTimeoutError",
    "IdleTimeoutError",
    "open_channel",
    "serve_channels",
]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds a whole handshake may take (three messages, so three one-way trips and the signing)."""

IDLE_TIMEOUT: Final = 300.0
"""Seconds :meth:`Channel.receive` waits without a single byte arriving before it raises
:class:`IdleTimeoutError`.  The channel sends no keep-alives of its own: a peer with nothing to say for this
long is treated as gone, and the caller decides whether to close or keep waiting."""

CLOSE_TIMEOUT: Final = 5.0
"""Seconds :meth:`Channel.aclose` spends trying to send the close frame (the peer may have stopped reading)
before it closes the connection regardless."""

MAX_CONNECTIONS: Final = 256
"""Connections :func:`serve_channels` holds at once (in handshake or established); further ones are closed at
once, so a flood of connections costs one accept each and no memory."""

ACCEPT_RETRY_DELAY: Final = 0.1
"""Seconds :func:`serve_channels` pauses after the operating system refuses an accept for lack of resources
(out of file descriptors or memory), instead of spinning; trio's own ``serve_listeners`` does the same."""

_RECEIVE_CHUNK: Final = 65536
"""Bytes asked of the stream per read: bounds what one read adds to the decoder's buffer."""

_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class ChannelTimeoutError(P2PChatError):
    """The peer of a channel went quiet for longer than allowed."""


class HandshakeTimeoutError(ChannelTimeoutError):
    """The handshake did not complete within its timeout; the connection has been closed."""


class IdleTimeoutError(ChannelTimeoutError):
    """Nothing arrived for :data:`IDLE_TIMEOUT` seconds.  The channel is still open: close it or receive again."""


class _FrameReader:
    """Reads stream frames one at a time, with the size bound of the current phase."""

    __slots__ = ("_decoder", "_stream")

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._decoder = FrameDecoder()

    async def next_frame(self, max_size: int, timeout: float = math.inf) -> bytes | None:
        """The next frame, or None at a clean end of stream.

        :class:`ProtocolError` for broken framing or an incomplete frame already longer than *max_size*;
        :class:`IdleTimeoutError` if no bytes arrive for *timeout* seconds.  (A complete frame is returned
        whatever its size: the caller's decoder checks it, with a message that names what it expected.)
        """
        decoder = self._decoder
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            if decoder.buffered_size > STREAM_HEADER_SIZE + max_size:
                raise ProtocolError(f"incoming frame is longer than the {max_size} bytes allowed here")
            if timeout == math.inf:
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
            else:
                with trio.move_on_after(timeout) as scope:
                    data = await self._stream.receive_some(_RECEIVE_CHUNK)
                if scope.cancelled_caught:
                    raise IdleTimeoutError(f"nothing arrived for {timeout:g} s")
            if not data:
                decoder.feed_eof()
                return None
            decoder.feed(data)


class Channel(trio.abc.Channel[bytes]):
    """An established, encrypted, mutually authenticated channel to :attr:`peer`; made by :func:`open_channel`.

    Messages arrive whole and in order.  Several tasks may send at once (frames go out one at a time); one task
    at a time may receive.  ``async for message in channel`` receives until the peer closes the channel.

    A send interrupted by cancellation or a broken connection ends the sending side (the frame may be half
    written); a bad incoming frame ends the whole channel and closes its connection.
    """

    def __init__(
        self, stream: Stream, result: HandshakeResult, reader: _FrameReader, *, idle_timeout: float = IDLE_TIMEOUT
    ) -> None:
        self._stream = stream
        self._reader = reader
        self._sender = result.sender
        self._receiver = result.receiver
        self._idle_timeout = idle_timeout
        self._send_lock = trio.StrictFIFOLock()
        self._receiving = False
        self._closed = False
        self._send_broken: str | None = None
        self._receive_error: str | None = None
        self._peer_closed = False
        self.peer: PublicIdentity = result.peer
        """The authenticated identity at the other end."""
        self.handshake_hash: bytes = result.handshake_hash
        """The session's final transcript hash: the same on both ends, unique to this session."""

    @property
    def remote_address(self) -> Address:
        """The network address of the other end."""
        return self._stream.remote_address

    @property
    def frames_sent(self) -> int:
        """Frames sent so far (the close frame included)."""
        return self._sender.frames_sent

    @property
    def frames_received(self) -> int:
        """Frames received so far (the close frame included)."""
        return self._receiver.frames_received

    async def send(self, payload: bytes) -> None:
        """Send one message of at most :data:`MAX_CHANNEL_FRAME` bytes (:class:`ValueError` if larger).

        :class:`trio.ClosedResourceError` after :meth:`aclose`; :class:`trio.BrokenResourceError` if the
        connection is gone or an earlier send was interrupted.
        """
        if len(payload) > MAX_CHANNEL_FRAME:
            raise ValueError(f"a channel message is at most {MAX_CHANNEL_FRAME} bytes, got {len(payload)}")
        lock = self._send_lock
        # Uncontended (the usual case) the lock is taken without a trip through the scheduler: send_all below is
        # this call's checkpoint.  A trio.Lock's acquire() always yields, which cost a third of a small message.
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            self._check_can_send()
            await self._send_frame(self._sender.seal(payload))
        finally:
            lock.release()

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the channel is closed")
        if self._send_broken is not None:
            raise trio.BrokenResourceError(self._send_broken)

    async def _send_frame(self, frame: bytes) -> None:
        try:
            await self._stream.send_all(encode_frame(frame))
        except BaseException as exc:
            # The frame may be half written, and its counter is spent either way: the peer would refuse whatever
            # came next, so nothing more can be sent on this connection.
            self._send_broken = f"an earlier send did not complete ({type(exc).__name__})"
            if isinstance(exc, trio.ClosedResourceError) and not self._closed:
                # Closed under us because a bad incoming frame ended the channel: to the caller, it broke.
                raise trio.BrokenResourceError(self._send_broken) from exc
            raise

    async def receive(self) -> bytes:
        """The next message.

        :class:`trio.EndOfChannel` once the peer has closed the channel; :class:`ProtocolError` for a bad frame
        (which ends the channel); :class:`IdleTimeoutError` if nothing arrives for the idle timeout;
        :class:`trio.BrokenResourceError` if the connection ends without the peer's close frame.
        """
        self._start_receiving()
        try:
            payload = await self._receive_one(self._idle_timeout)
        finally:
            self._receiving = False
        if payload is None:
            raise trio.EndOfChannel
        return payload

    async def receive_each(self, handle: Callable[[bytes], object]) -> None:
        """Receive messages, handing each to *handle* as it arrives, until the peer closes the channel (then
        return); raises as :meth:`receive` does.

        This is the fast way to read a channel for good: :meth:`receive` must set up a timeout for every message,
        which cost a fifth of a small message's time, while this loop keeps one and moves its deadline at most
        every half idle timeout.  So here :class:`IdleTimeoutError` comes between half the idle timeout and the
        whole of it after the last message (after the whole of it if nothing came since the call).
        """
        self._start_receiving()
        idle = self._idle_timeout
        try:
            with trio.move_on_after(idle) as scope:
                while True:
                    payload = await self._receive_one(math.inf)
                    if payload is None:
                        return
                    handle(payload)
                    now = trio.current_time()
                    if scope.deadline - now < idle / 2:
                        scope.deadline = now + idle
        finally:
            self._receiving = False
        raise IdleTimeoutError(f"nothing arrived for at least {idle / 2:g} s")

    def _start_receiving(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the channel is closed")
        if self._peer_closed:
            raise trio.EndOfChannel
        if self._receive_error is not None:
            raise ProtocolError(self._receive_error)
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this channel")
        self._receiving = True

    async def _receive_one(self, timeout: float) -> bytes | None:
        """The next message, or None for the peer's close frame."""
        try:
            frame = await self._reader.next_frame(MAX_CHANNEL_WIRE_FRAME, timeout)
            if frame is None:
                raise trio.BrokenResourceError(
                    "the connection ended without the peer's close frame (peer crashed, or the stream was cut)"
                )
            payload = self._receiver.open(frame)
        except ProtocolError as exc:
            self._receive_error = f"the channel was ended by a bad incoming frame: {exc}"
            self._send_broken = self._receive_error
            await trio.aclose_forcefully(self._stream)
            raise
        if payload is None:
            self._peer_closed = True
        return payload

    async def aclose(self) -> None:
        """Send the close frame (for at most :data:`CLOSE_TIMEOUT` seconds) and close the connection."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            with trio.move_on_after(CLOSE_TIMEOUT):
                async with self._send_lock:
                    if self._send_broken is None:
                        await self._send_frame(self._sender.seal_close())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone already: there is nobody to tell
        finally:
            await self._stream.aclose()


async def _run_handshake(stream: Stream, reader: _FrameReader, handshake: Handshake) -> HandshakeResult:
    outgoing = handshake.start()
    while True:
        if outgoing is not None:
            await stream.send_all(encode_frame(outgoing))
        if handshake.result is not None:
            return handshake.result
        message = await reader.next_frame(MAX_HANDSHAKE_MESSAGE)
        if message is None:
            raise trio.BrokenResourceError("the peer closed the connection during the handshake")
        outgoing = handshake.receive(message)


async def open_channel(
    stream: Stream,
    identity: Identity,
    random_bytes: Callable[[int], bytes],
    *,
    initiator: bool,
    expected_peer: bytes | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
) -> Channel:
    """Run the handshake on *stream* and return the established channel, which then owns the stream.

    The side that opened the connection passes ``initiator=True``; it may pass the peer's identity key as
    *expected_peer* and then talks to nobody else.  On any failure the stream is closed and the error raised:
    :class:`ProtocolError` (bad message, bad signature, unexpected peer), :class:`HandshakeTimeoutError`, or
    :class:`trio.BrokenResourceError` (the peer hung up -- a server at its connection limit does that).
    """
    handshake = Handshake(identity, random_bytes, initiator=initiator, expected_peer=expected_peer)
    reader = _FrameReader(stream)
    result: HandshakeResult | None = None
    try:
        with trio.move_on_after(handshake_timeout):
            result = await _run_handshake(stream, reader, handshake)
        if result is None:
            raise HandshakeTimeoutError(f"the handshake did not complete within {handshake_timeout:g} s")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return Channel(stream, result, reader, idle_timeout=idle_timeout)


ChannelHandler = Callable[[Channel], Awaitable[None]]
"""What :func:`serve_channels` calls with each established channel; the channel is closed when it returns."""


@dataclass(slots=True)
class ChannelServerStats:
    """What :func:`serve_channels` did with its connections.

    Once its handshake is over, every accepted connection is counted in exactly one of ``refused``, the
    ``handshake_*`` counters and ``established``."""

    accepted: int = 0
    """Connections accepted from the listener."""
    refused: int = 0
    """Closed at once because :data:`MAX_CONNECTIONS` were open."""
    handshake_timeouts: int = 0
    """Dropped because the handshake did not complete within its timeout."""
    handshake_failures: int = 0
    """Dropped for a bad handshake (garbage, bad signature): a :class:`ProtocolError`."""
    handshake_disconnects: int = 0
    """The peer hung up or the connection broke during the handshake."""
    established: int = 0
    """Handshakes completed and handed to the handler."""
    channel_errors: int = 0
    """Established channels that ended in a protocol error, a timeout or a broken connection."""
    active: int = 0
    """Connections open now (in handshake or established)."""


async def serve_channels(
    listener: Listener,
    identity: Identity,
    random_bytes: Callable[[int], bytes],
    handler: ChannelHandler,
    *,
    max_connections: int = MAX_CONNECTIONS,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
    stats: ChannelServerStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on *listener* and run ``handler(channel)`` for each, as the responder.

    Connections beyond *max_connections* open at once are closed as soon as they are accepted.  A connection
    whose handshake fails or does not complete within *handshake_timeout* is closed and counted in *stats*.  A
    handler ending in :class:`ProtocolError`, :class:`ChannelTimeoutError` or :class:`trio.BrokenResourceError`
    is counted, not raised: a peer cannot take the server down.  Any other exception from a handler is a bug
    and propagates.  When the listener is closed, serving stops and this returns once every handler is done.
    Use with ``nursery.start``: it reports started once it is accepting.
    """
    counts = stats if stats is not None else ChannelServerStats()

    async def serve_connection(stream: Stream) -> None:
        try:
            try:
                channel = await open_channel(
                    stream,
                    identity,
                    random_bytes,
                    initiator=False,
                    handshake_timeout=handshake_timeout,
                    idle_timeout=idle_timeout,
                )
            except HandshakeTimeoutError:
                counts.handshake_timeouts += 1
                return
            except ProtocolError as exc:
                counts.handshake_failures += 1
                log.debug("dropped connection from %s: bad handshake: %s", stream.remote_address, exc)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                counts.handshake_disconnects += 1
                return
            counts.established += 1
            async with channel:
                try:
                    await handler(channel)
                except trio.EndOfChannel:
                    pass  # a handler that let the peer's clean close escape: nothing went wrong
                except (ProtocolError, ChannelTimeoutError, trio.BrokenResourceError) as exc:
                    counts.channel_errors += 1
                    log.debug("channel with %s ended: %s", channel.peer.address, exc)
        finally:
            counts.active -= 1

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                break
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                log.warning("accept failed (%s); retrying in %g s", exc, ACCEPT_RETRY_DELAY)
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            counts.accepted += 1
            if counts.active >= max_connections:
                counts.refused += 1
                await trio.aclose_forcefully(stream)
                continue
            counts.active += 1
            nursery.start_soon(serve_connection, stream)
