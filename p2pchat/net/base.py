"""The network interface every service talks to.

Two implementations stand behind it: :mod:`p2pchat.net.real` (trio sockets) and :mod:`p2pchat.net.sim` (an
in-memory network on virtual time).  Services never open sockets themselves; they get a :class:`Network` from
their :class:`~p2pchat.env.Env`, so the same node code runs on both.

Datagram sends are synchronous on purpose: UDP gives no delivery guarantee, so a send that cannot go out at once
(kernel buffer full) is dropped and counted exactly as the network would drop it later.  That keeps the hot path
of a 10,000-node simulation free of a scheduler round-trip per packet.
"""

from __future__ import annotations

import abc
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Self

import trio

from p2pchat.errors import UserError

__all__ = [
    "Address",
    "DatagramEndpoint",
    "DatagramStats",
    "Listener",
    "Network",
    "Stream",
    "parse_address",
]


class Address(NamedTuple):
    """A transport address: an IP literal (v4 or v6, no brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT`` or ``[V6HOST]:PORT`` typed by a user into an :class:`Address`.

    Raises :class:`~p2pchat.errors.UserError` with a message naming the problem.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise UserError(f"address {text!r} must look like HOST:PORT, e.g. 127.0.0.1:4000 or [::1]:4000")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UserError(f"address {text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UserError(f"address {text!r}: port must be a number from 1 to 65535")
    return Address(str(ip), int(port_text))


@dataclass(slots=True)
class DatagramStats:
    """Counters of one datagram endpoint; every datagram that did not make it is counted somewhere."""

    sent: int = 0
    received: int = 0
    send_errors: int = 0
    receive_overflow: int = 0


class DatagramEndpoint(abc.ABC):
    """A bound datagram socket: send to any address, receive what arrives."""

    __slots__ = ("_pending", "local_address", "stats")

    def __init__(self, local_address: Address) -> None:
        self.local_address = local_address
        self.stats = DatagramStats()
        self._pending: list[tuple[bytes, Address]] = []

    @abc.abstractmethod
    def send(self, data: bytes, destination: Address) -> None:
        """Send one datagram without blocking.

        Raises :class:`~p2pchat.errors.DestinationNotAllowedError` when the destination is outside the network's
        allow-list and :class:`trio.ClosedResourceError` after :meth:`aclose`.  Anything the network itself
        refuses (full buffers, unreachable hosts) is dropped and counted in :attr:`stats`, as UDP would.
        """

    @abc.abstractmethod
    async def receive_batch(self) -> list[tuple[bytes, Address]]:
        """Wait for at least one datagram, then return every datagram that has arrived, oldest first.

        Draining in one wake-up is what lets thousands of simulated hosts share one process.
        """

    async def serve(self, deliver: Callable[[bytes, Address], None]) -> None:
        """Call ``deliver(data, source)`` for every datagram that arrives, oldest first, until the endpoint closes
        (then raise :class:`trio.ClosedResourceError`) or ``deliver`` raises (then raise that).

        ``deliver`` must not block: it runs inside the receive path, possibly in another endpoint's task (see
        :meth:`p2pchat.net.real.RealDatagramEndpoint.serve`).  Use either this or :meth:`receive_batch`, not both.
        """
        while True:
            for data, source in await self.receive_batch():
                deliver(data, source)

    async def receive(self) -> tuple[bytes, Address]:
        """Return one datagram (convenient for tests and small tools; services should use receive_batch)."""
        if not self._pending:
            batch = await self.receive_batch()
            batch.reverse()  # so that pop() takes the oldest
            self._pending = batch
        return self._pending.pop()

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the endpoint; pending and future receives raise :class:`trio.ClosedResourceError`."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Stream(trio.abc.HalfCloseableStream):
    """A reliable, ordered byte stream (TCP) that knows both of its addresses."""

    local_address: Address
    remote_address: Address


class Listener(abc.ABC):
    """A bound stream listener."""

    __slots__ = ("local_address",)

    def __init__(self, local_address: Address) -> None:
        self.local_address = local_address

    @abc.abstractmethod
    async def accept(self) -> Stream:
        """Wait for and return the next incoming connection."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop listening; a pending :meth:`accept` raises :class:`trio.ClosedResourceError`."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Network(abc.ABC):
    """Opens datagram endpoints, stream listeners and stream connections on one host."""

    @abc.abstractmethod
    async def open_datagram(self, host: str, port: int = 0) -> DatagramEndpoint:
        """Bind a datagram endpoint to ``host:port`` (port 0: any free port)."""

    @abc.abstractmethod
    async def open_listener(self, host: str, port: int = 0) -> Listener:
        """Listen for stream connections on ``host:port`` (port 0: any free port)."""

    @abc.abstractmethod
    async def connect(self, address: Address) -> Stream:
        """Open a stream to ``address``; raises :class:`~p2pchat.errors.ConnectError` if that fails.

        There is no built-in timeout: callers bound it with a trio cancel scope, as they know how long is
        worth waiting.
        """
