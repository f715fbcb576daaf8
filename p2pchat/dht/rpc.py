"""Datagram RPC: send requests, match replies, serve requests -- one receive loop, no task per packet.

A reply is accepted only if it comes from the address the request went to and echoes the request's random
transaction id (BEP 5's rule), once; anything else is dropped and counted.  A datagram claiming to come from this
transport's own address (a reflected or spoofed packet) is dropped and counted, and no request is sent to it.
Requests are answered synchronously in the receive loop by a handler that must not block, so a flood of requests
costs no tasks and no memory beyond the socket's queue.  Timeouts adapt to measured round trips
(:mod:`p2pchat.core.rtt`).

Two ways to ask: :meth:`RpcTransport.request` awaits one reply; :meth:`RpcTransport.send_request` hands the
reply (or ``None`` on timeout) to a callback run in the receive loop, so a lookup with twenty requests in flight
needs no task, cancel scope or event per request; it can also be told when a request becomes overdue (its soft
timeout, :meth:`~p2pchat.core.rtt.TimeoutPolicy.soft_timeout`), so a lookup can ask someone else
meanwhile.  Every pending request's deadlines sit in one heap, watched by one timer task.

A lookup request still unanswered at its soft timeout is sent again, same bytes, same transaction id, up to
:data:`RETRANSMITS` times (a lost datagram is the common case on a lossy path, and a lookup that gave up on a
node at its timeout dropped a live node from its result).  Its eventual reply matches any copy; its round trip
is not measured (Karn's rule: it cannot be told which copy it answers).  Lookup requests only read, so a copy
answered twice costs a reply, nothing else.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import outcome
import trio

from p2pchat.core.framing import DatagramKind, classify_datagram, decode_datagram, encode_datagram
from p2pchat.core.packets import TXID_BYTES
from p2pchat.core.ratelimit import RateLimiter
from p2pchat.core.rtt import SOFT_TIMEOUT_SHARE, TimeoutPolicy
from p2pchat.core.schema import Packet
from p2pchat.env import Env
from p2pchat.errors import P2PChatError, ProtocolError
from p2pchat.net.base import Address, DatagramEndpoint

__all__ = [
    "LOSSY_OVERDUE_SHARE",
    "MAX_PENDING_REQUESTS",
    "MAX_SETTLED_DEADLINES",
    "OVERDUE_WEIGHT",
    "RETRANSMITS",
    "TXIDS_PER_DRAW",
    "PendingKey",
    "ReplyCallback",
    "RequestTimeoutError",
    "RpcStats",
    "RpcTransport",
    "SelfRequestError",
    "TooManyRequestsError",
]

log = logging.getLogger(__name__)

MAX_PENDING_REQUESTS: Final = 4096
"""Requests this node may have waiting for a reply at once; a lookup uses alpha=3, so this is generous."""

RETRANSMITS: Final = 2
"""Times a lookup request still unanswered is sent again (at its soft timeout, then again one soft timeout later)
before its timeout settles it.  With 5% loss each way a request or its reply is lost one time in ten; two resends
make that one in a thousand.  On the WAN scenario they took the lookups that find the closest live node from 91%
to 99% (p99 2.2 s to 1.8 s): a lookup had given up on that node at its timeout.  Only lookup requests (those
with an overdue callback) are resent; a plain request's caller retries as it sees fit (parts, pings)."""

OVERDUE_WEIGHT: Final = 1 / 64
"""Weight of the latest request in :attr:`RpcTransport.overdue_share`, a moving average over about the last 64."""

LOSSY_OVERDUE_SHARE: Final = 0.03
"""Share of overdue requests (:attr:`RpcTransport.overdue_share`) above which the network counts as lossy: lookups
then ask :data:`~p2pchat.core.lookup.FINAL_ROUND_SPARES` spares in their final round and start it early
(``EARLY_FINAL_ROUND_RTT`` in :mod:`p2pchat.dht.node`), and requests to peers not yet measured are reported to the
lookup sooner (:data:`~p2pchat.core.rtt.HEDGE_RTTVARS`)."""

TXIDS_PER_DRAW: Final = 256
"""Transaction ids drawn from the environment's random bytes at once.  The production Env reads os.urandom, and a
system call per request was 2% of a 500-node benchmark; a pool of secure random bytes is just as unpredictable."""

MAX_SETTLED_DEADLINES: Final = 256
"""Deadlines of answered or withdrawn requests the timer heap may hold beyond twice the pending ones.  They are
left there rather than removed one by one (the timer drops them when it wakes); past this they are swept."""

RequestHandler = Callable[[Packet, Address], Packet | None]
CompatHandler = Callable[[bytes, Address, DatagramKind], bytes | None]
ReplyCallback = Callable[[Packet | None], None]
"""Called once with the reply to a request, or with ``None`` when it timed out (not when it was cancelled)."""
PendingKey = tuple[bytes, Address]
"""A pending request: its transaction id and the address asked."""


class RequestTimeoutError(P2PChatError):
    """No valid reply arrived in time."""


class SelfRequestError(RequestTimeoutError):
    """The destination is this transport's own address: only we could answer, so the request fails at once, as
    if unanswered (a liar may name a node at our address; a lookup must not ask itself)."""


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
    dropped_reflected: int = 0
    compat_served: int = 0
    retransmits: int = 0


def _settled(_: Packet | None) -> None:
    """The callback of a request that was answered or withdrawn (its deadline may still sit in the heap, and must
    not keep the real callback, and all the lookup state behind it, alive)."""


# What a timer-heap entry is for: a request's timeout, its soft timeout, or its hedge (see HEDGE_RTTVARS).
_DEADLINE: Final = 0
_SOFT: Final = 1
_HEDGE: Final = 2


class _Pending:
    __slots__ = ("callback", "data", "deadline", "on_slow", "overdue", "resends", "sent_at", "soft")

    def __init__(
        self,
        callback: ReplyCallback,
        sent_at: float,
        deadline: float,
        on_slow: Callable[[], None] | None,
        *,
        data: bytes,
        soft: float,
    ) -> None:
        self.callback = callback
        self.sent_at = sent_at
        self.deadline = deadline
        self.on_slow = on_slow
        self.data = data
        """The datagram, kept while it may be sent again."""
        self.soft = soft
        """Seconds from one send to the next (the soft timeout)."""
        self.resends = RETRANSMITS if on_slow is not None else 0
        self.overdue = False


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
        self._pending: dict[PendingKey, _Pending] = {}
        # (deadline, sequence, key, pending, kind); entries whose request was answered or cancelled stay until they
        # come up (cheaper than removing them), and the heap is compacted when they outnumber the live ones.  A soft
        # entry is a request's soft timeout: it calls on_slow and leaves the request pending; a hedge entry only
        # calls on_slow, sooner.
        self._deadlines: list[tuple[float, int, PendingKey, _Pending, int]] = []
        self._sequence = itertools.count()
        self._timer: trio.CancelScope | None = None
        self._stopped = False
        self._txids = b""
        self._txid_at = 0
        self.overdue_share = 0.0
        """Moving average of the requests that were overdue (unanswered at their soft timeout): how lossy, or how
        full of departed contacts, this node's network looks from here."""

    @property
    def lossy(self) -> bool:
        """Whether requests are often overdue (:data:`LOSSY_OVERDUE_SHARE`): lookups then ask spares, start their
        final round early and hedge."""
        return self.overdue_share > LOSSY_OVERDUE_SHARE

    @property
    def local_address(self) -> Address:
        """Where this transport receives."""
        return self.endpoint.local_address

    def new_txid(self) -> bytes:
        """A fresh random transaction id (unpredictable with the production Env, so replies cannot be forged
        blindly)."""
        at = self._txid_at
        if at >= len(self._txids):
            self._txids = self.env.random_bytes(TXID_BYTES * TXIDS_PER_DRAW)
            at = 0
        self._txid_at = at + TXID_BYTES
        return self._txids[at : at + TXID_BYTES]

    def send(self, packet: Packet, destination: Address) -> None:
        """Send a packet that expects no reply (a reply to a request, or a notification)."""
        self.endpoint.send(encode_datagram(packet), destination)

    def send_request(
        self,
        packet: Packet,
        destination: Address,
        callback: ReplyCallback,
        *,
        timeout: float | None = None,
        on_slow: Callable[[], None] | None = None,
        hedge: bool = False,
    ) -> PendingKey:
        """Send ``packet`` (its ``txid`` must be fresh); ``callback`` gets the reply, or ``None`` after the timeout.

        ``on_slow``, if given, is called once when the request is still unanswered at its soft timeout
        (:meth:`~p2pchat.core.rtt.TimeoutPolicy.soft_timeout`, or :data:`~p2pchat.core.rtt.SOFT_TIMEOUT_SHARE` of
        an explicit ``timeout``); such a request may also be sent again then (:data:`RETRANSMITS`), and stays
        pending.  With ``hedge`` (and no explicit ``timeout``), on a lossy network ``on_slow`` may come sooner, at
        :meth:`~p2pchat.core.rtt.TimeoutPolicy.hedge_timeout`; nothing else moves.  The callbacks run in the receive
        loop (or the timer task) and must not block.  Returns the key
        with which :meth:`cancel` withdraws the request.  Raises :class:`TooManyRequestsError` when
        :data:`MAX_PENDING_REQUESTS` are waiting, :class:`SelfRequestError` for this transport's own address.
        """
        if self._stopped:
            raise trio.ClosedResourceError("the transport has stopped: no reply could be received")
        if destination == self.endpoint.local_address:
            raise SelfRequestError(f"{destination} is this node's own address")
        txid: bytes = packet.txid  # type: ignore[attr-defined]
        key = (txid, destination)
        pending_requests = self._pending
        if len(pending_requests) >= MAX_PENDING_REQUESTS:
            raise TooManyRequestsError(f"{MAX_PENDING_REQUESTS} requests already waiting for replies")
        if key in pending_requests:
            raise ValueError("transaction id already in use for this destination")
        wait = self.timeouts.timeout(destination) if timeout is None else timeout
        data = encode_datagram(packet)
        self.endpoint.send(data, destination)
        self.stats.requests_sent += 1
        now = trio.current_time()
        soft = min(wait, self.timeouts.soft_timeout(destination) if timeout is None else SOFT_TIMEOUT_SHARE * timeout)
        pending = _Pending(callback, now, now + wait, on_slow, data=data, soft=soft)
        pending_requests[key] = pending
        heapq.heappush(self._deadlines, (pending.deadline, next(self._sequence), key, pending, _DEADLINE))
        # The soft timeout: the request is sent again, and a lookup told it is overdue.
        first = now + soft
        heapq.heappush(self._deadlines, (first, next(self._sequence), key, pending, _SOFT))
        if hedge and on_slow is not None and timeout is None and self.lossy:
            # On a lossy network the lookup is told sooner (the request is sent again at its soft timeout, as ever).
            hedge_after = self.timeouts.hedge_timeout(destination)
            if hedge_after is not None:
                first = now + hedge_after
                heapq.heappush(self._deadlines, (first, next(self._sequence), key, pending, _HEDGE))
        timer = self._timer
        if timer is not None and first < timer.deadline:
            timer.deadline = first
        return key

    def cancel(self, key: PendingKey) -> None:
        """Withdraw a pending request: a late reply is dropped as unsolicited and the callback is not called."""
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.callback = _settled
            pending.on_slow = None
            self._sweep_settled()

    def _sweep_settled(self) -> None:
        deadlines = self._deadlines
        pending_requests = self._pending
        if len(deadlines) > 2 * len(pending_requests) + MAX_SETTLED_DEADLINES:
            deadlines[:] = [entry for entry in deadlines if pending_requests.get(entry[2]) is entry[3]]
            heapq.heapify(deadlines)

    async def request(self, packet: Packet, destination: Address, *, timeout: float | None = None) -> Packet:
        """Send ``packet`` (its ``txid`` must be fresh) and return the reply, or raise :class:`RequestTimeoutError`."""
        task = trio.lowlevel.current_task()

        def wake(reply: Packet | None) -> None:
            trio.lowlevel.reschedule(task, outcome.Value(reply))

        key = self.send_request(packet, destination, wake, timeout=timeout)

        def abort(_: object) -> trio.lowlevel.Abort:
            self.cancel(key)
            return trio.lowlevel.Abort.SUCCEEDED

        reply: Packet | None = await trio.lowlevel.wait_task_rescheduled(abort)
        if reply is None:
            raise RequestTimeoutError(f"no reply from {destination} in time")
        return reply

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The receive loop and the timeout timer; runs until cancelled or the endpoint is closed.

        When it ends, every request still pending is settled as timed out (no reply can come any more), and later
        requests raise :class:`trio.ClosedResourceError`.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire_loop)
                task_status.started()
                with contextlib.suppress(trio.ClosedResourceError):
                    await self.endpoint.serve(self._on_datagram)
                nursery.cancel_scope.cancel()
        finally:
            self._stop()

    def _stop(self) -> None:
        self._stopped = True
        self._timer = None
        settled = list(self._pending.values())
        self._pending.clear()
        self._deadlines.clear()
        for pending in settled:
            callback = pending.callback
            pending.callback = _settled
            try:
                callback(None)
            except Exception:  # a waiter's own bug must not hide the others' wake-ups, nor why the loop ended
                log.exception("a reply callback failed while the transport stopped")

    async def _expire_loop(self) -> None:
        # One task sleeps until the earliest deadline; send_request moves that deadline earlier when it must.
        deadlines = self._deadlines
        pending_requests = self._pending
        stats = self.stats
        while True:
            try:
                with trio.CancelScope(deadline=deadlines[0][0] if deadlines else math.inf) as timer:
                    self._timer = timer
                    await trio.sleep_forever()
            finally:
                self._timer = None
            now = trio.current_time()
            while deadlines and deadlines[0][0] <= now:
                _, _, key, pending, kind = heapq.heappop(deadlines)
                if kind == _HEDGE:
                    on_slow = pending.on_slow
                    pending.on_slow = None
                    if on_slow is not None and pending_requests.get(key) is pending:
                        on_slow()
                elif kind == _SOFT:
                    if pending_requests.get(key) is pending:
                        self._soft_timeout(key, pending, now)
                elif pending_requests.get(key) is pending and pending.deadline <= now:
                    del pending_requests[key]
                    stats.timeouts += 1
                    callback = pending.callback
                    pending.callback = _settled
                    callback(None)
            # Requests answered meanwhile stay in the heap (moving the timer's deadline on every reply would cost
            # more than this): drop those at the top, so the next wake-up is for a request still pending.
            while deadlines and pending_requests.get(deadlines[0][2]) is not deadlines[0][3]:
                heapq.heappop(deadlines)

    def _soft_timeout(self, key: PendingKey, pending: _Pending, now: float) -> None:
        """A pending request reached its soft timeout: count it overdue, send it again, tell its lookup."""
        deadlines = self._deadlines
        first_overdue = not pending.overdue
        if first_overdue:
            pending.overdue = True
            self.overdue_share += (1.0 - self.overdue_share) * OVERDUE_WEIGHT
        if first_overdue and pending.resends > 0:
            # The copies get the round trip the first send had, within the ceiling counted from the first send: the
            # first deadline would often come before an answer to a copy could.
            wait = pending.deadline - pending.sent_at
            later = min(now + wait, pending.sent_at + max(wait, self.timeouts.max_rto))
            if later > pending.deadline:
                pending.deadline = later
                heapq.heappush(deadlines, (later, next(self._sequence), key, pending, _DEADLINE))
        if pending.resends > 0:
            pending.resends -= 1
            self.stats.retransmits += 1
            self.endpoint.send(pending.data, key[1])
            again = now + pending.soft
            if pending.resends > 0 and again < pending.deadline:
                heapq.heappush(deadlines, (again, next(self._sequence), key, pending, _SOFT))
        on_slow = pending.on_slow
        pending.on_slow = None
        if on_slow is not None:
            on_slow()

    def _on_datagram(self, data: bytes, source: Address) -> None:
        stats = self.stats
        if source == self.endpoint.local_address:
            # We never send to ourselves, so this was reflected or spoofed: answering it would be talking to
            # ourselves (and, with a reflected reply, could loop).
            stats.dropped_reflected += 1
            return
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
            if not pending.overdue:
                # Not sent again: the round trip is this copy's (Karn's rule).
                self.timeouts.observe(source, trio.current_time() - pending.sent_at)
                self.overdue_share -= self.overdue_share * OVERDUE_WEIGHT
            callback = pending.callback
            pending.callback = _settled
            pending.on_slow = None
            self._sweep_settled()
            callback(packet)
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

    def deadlines_held(self) -> int:
        """Entries in the timer heap: the pending requests' deadlines and, lazily, some settled ones."""
        return len(self._deadlines)
