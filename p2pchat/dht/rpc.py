"""Datagram RPC: send requests, match replies, serve requests -- one receive loop, no task per packet.

A reply is accepted only if it comes from the address the request went to and echoes the request's random
transaction id (BEP 5's rule); anything else is dropped and counted.  Requests are answered synchronously in the
receive loop by a handler that must not block, so a flood of requests costs no tasks and no memory beyond the
socket's queue.  Timeouts adapt to measured round trips (:mod:`p2pchat.core.rtt`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import outcome
import trio

from p2pchat.core.framing import DatagramKind, classify_datagram, decode_datagram, encode_datagram
from p2pchat.core.ratelimit import RateLimiter
from p2pchat.core.rtt import TimeoutPolicy
from p2pchat.core.schema import Packet
from p2pchat.env import Env
from p2pchat.errors import P2PChatError, ProtocolError
from p2pchat.net.base import Address, DatagramEndpoint

__all__ = ["MAX_PENDING_REQUESTS", "RequestTimeoutError", "RpcStats", "RpcTransport", "TooManyRequestsError"]

log = logging.getLogger(__name__)

MAX_PENDING_REQUESTS: Final = 4096
"""Requests this node may have waiting for a reply at once; a lookup uses alpha=3, so this is generous."""

RequestHandler = Callable[[Packet, Address], Packet | None]
CompatHandler = Callable[[bytes, Address, DatagramKind], bytes | None]


class RequestTimeoutError(P2PChatError):
    """No valid reply arrived in time."""


class TooManyRequestsError(P2PChatError):
    """:data:`MAX_PENDING_REQUESTS` requests are already waiting."""


@dataclass(slots=True)
class RpcStats:
    """What the transport did with every datagram; the ``dropped_*`` counters are bad or unwanted input."""

    requests_sent: int = 0
    replies_received: int = 0
    timeouts: int = 0
    requests_served: int = 0
    dropped_malformed: int = 0
    dropped_unsolicited: int = 0
    dropped_by_handler: int = 0
    dropped_rate_limited: int = 0
    compat_served: int = 0


class _Pending:
    __slots__ = ("sent_at", "task")

    def __init__(self, task: trio.lowlevel.Task, sent_at: float) -> None:
        self.task = task
        self.sent_at = sent_at


class RpcTransport:
    """Request/reply over one datagram endpoint."""

    def __init__(
        self,
        env: Env,
        endpoint: DatagramEndpoint,
        handler: RequestHandler,
        *,
        reply_types: tuple[type[Packet], ...],
        compat_handler: CompatHandler | None = None,
        timeouts: TimeoutPolicy | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.env = env
        self.endpoint = endpoint
        self.handler = handler
        self.compat_handler = compat_handler
        self.reply_types = reply_types
        self.timeouts = timeouts or TimeoutPolicy()
        self.limiter = limiter
        self.stats = RpcStats()
        self._pending: dict[tuple[bytes, Address], _Pending] = {}

    @property
    def local_address(self) -> Address:
        """Where this transport receives."""
        return self.endpoint.local_address

    def new_txid(self) -> bytes:
        """A fresh random transaction id (unpredictable with the production Env, so replies cannot be forged
        blindly)."""
        return self.env.rng.getrandbits(64).to_bytes(8, "big")

    def send(self, packet: Packet, destination: Address) -> None:
        """Send a packet that expects no reply (a reply to a request, or a notification)."""
        self.endpoint.send(encode_datagram(packet), destination)

    async def request(self, packet: Packet, destination: Address, *, timeout: float | None = None) -> Packet:
        """Send ``packet`` (its ``txid`` must be fresh) and return the reply, or raise :class:`RequestTimeoutError`."""
        txid: bytes = packet.txid  # type: ignore[attr-defined]
        key = (txid, destination)
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            raise TooManyRequestsError(f"{MAX_PENDING_REQUESTS} requests already waiting for replies")
        if key in self._pending:
            raise ValueError("transaction id already in use for this destination")
        wait = self.timeouts.timeout(destination) if timeout is None else timeout
        sent_at = trio.current_time()
        self.endpoint.send(encode_datagram(packet), destination)
        self.stats.requests_sent += 1
        pending = _Pending(trio.lowlevel.current_task(), sent_at)
        self._pending[key] = pending

        def abort(_: object) -> trio.lowlevel.Abort:
            self._pending.pop(key, None)
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(wait):
            reply: Packet = await trio.lowlevel.wait_task_rescheduled(abort)
            self.timeouts.observe(destination, trio.current_time() - sent_at)
            return reply
        self.stats.timeouts += 1
        raise RequestTimeoutError(f"no reply from {destination} within {wait:.3f}s")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The receive loop; runs until cancelled or the endpoint is closed."""
        task_status.started()
        endpoint = self.endpoint
        while True:
            try:
                batch = await endpoint.receive_batch()
            except trio.ClosedResourceError:
                return
            for data, source in batch:
                self._on_datagram(data, source)

    def _on_datagram(self, data: bytes, source: Address) -> None:
        stats = self.stats
        try:
            kind = classify_datagram(data)
            if kind is not DatagramKind.P2PCHAT:
                self._on_compat(data, source, kind)
                return
            packet = decode_datagram(data)
        except ProtocolError as exc:
            stats.dropped_malformed += 1
            log.debug("dropped malformed datagram from %s: %s", source, exc)
            return
        if isinstance(packet, self.reply_types):
            pending = self._pending.pop((packet.txid, source), None)  # type: ignore[attr-defined]
            if pending is None:
                stats.dropped_unsolicited += 1
                return
            stats.replies_received += 1
            trio.lowlevel.reschedule(pending.task, outcome.Value(packet))
            return
        if not self._allowed(source):
            return
        try:
            reply = self.handler(packet, source)
        except ProtocolError as exc:
            stats.dropped_by_handler += 1
            log.debug("refused request from %s: %s", source, exc)
            return
        if reply is None:
            stats.dropped_by_handler += 1
            return
        try:
            data = encode_datagram(reply)
        except ValueError:
            # Our own bug (a reply that does not encode, e.g. for an address we cannot represent): it must cost
            # this request, never the receive loop.
            stats.dropped_by_handler += 1
            log.exception("could not encode a reply to %s", source)
            return
        stats.requests_served += 1
        self.endpoint.send(data, source)

    def _allowed(self, source: Address) -> bool:
        # Requests only: a reply was asked for, and the limit must not make our own lookups fail.
        if self.limiter is None or self.limiter.allow(source.host, trio.current_time()):
            return True
        self.stats.dropped_rate_limited += 1
        return False

    def _on_compat(self, data: bytes, source: Address, kind: DatagramKind) -> None:
        if self.compat_handler is None:
            self.stats.dropped_unsolicited += 1
            return
        if kind is not DatagramKind.RPCUDP_REQUEST:
            self.stats.dropped_unsolicited += 1  # we never ask rpcudp peers anything, so no response is ours
            return
        if not self._allowed(source):
            return
        try:
            reply = self.compat_handler(data, source, kind)
        except ProtocolError:
            self.stats.dropped_malformed += 1
            return
        if reply is None:
            self.stats.dropped_by_handler += 1
            return
        self.stats.compat_served += 1
        self.endpoint.send(reply, source)

    def pending_count(self) -> int:
        """Requests waiting for a reply."""
        return len(self._pending)
