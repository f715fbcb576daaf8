"""The real network: trio sockets, UDP and TCP, IPv4 and IPv6, behind an allow-list of destinations.

The allow-list exists so that a test suite (or a LAN-only deployment) can make it impossible to send anywhere
but where it means to.  It is read from :data:`ALLOW_ENV_VAR` when not given, so that daemons started by a test
in subprocesses inherit the test suite's loopback-only policy.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket as stdlib_socket
from collections.abc import Callable, Iterable

import outcome
import trio

from p2pchat.errors import ConnectError, DestinationNotAllowedError
from p2pchat.net.base import Address, DatagramEndpoint, Listener, Network, Stream

__all__ = [
    "ALLOW_ENV_VAR",
    "MAX_DATAGRAMS_PER_BATCH",
    "MAX_SOCKETS_PER_POLL",
    "POLLED_DATAGRAMS_PER_TURN",
    "RECEIVE_BUFFER_BYTES",
    "UDP_SOCKET_BUFFER_BYTES",
    "AllowList",
    "RealNetwork",
]

ALLOW_ENV_VAR = "P2PCHAT_ALLOW_NETWORKS"
"""Comma-separated CIDR networks a :class:`RealNetwork` may send to when no allow-list is passed."""

RECEIVE_BUFFER_BYTES = 65536
"""Largest datagram read from a socket; protocol layers apply their own, smaller limits."""

UDP_SOCKET_BUFFER_BYTES = 1 << 20
"""Requested kernel send/receive buffer per UDP socket (the kernel may cap it), so bursts of replies to a
lookup are not dropped at the socket."""

MAX_DATAGRAMS_PER_BATCH = 256
"""Datagrams drained per wake-up, so one flooded socket cannot starve the other tasks."""

MAX_SOCKETS_PER_POLL = 256
"""Readable sockets one round of a shared poller serves (one datagram each)."""

POLLED_DATAGRAMS_PER_TURN = 64
"""Datagrams a shared poller delivers before it lets the other tasks run (it goes on at once while there are
more): a scheduler pass per round cost about 4% of a 500-node benchmark, and the deliveries are short."""

_ALLOW_CACHE_LIMIT = 4096

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllowList:
    """The set of destination networks traffic may go to; ``None`` networks means everywhere."""

    __slots__ = ("_cache", "networks")

    def __init__(self, networks: Iterable[str | IPNetwork] | None) -> None:
        self.networks: tuple[IPNetwork, ...] | None = (
            None if networks is None else tuple(ipaddress.ip_network(n) for n in networks)
        )
        self._cache: dict[str, bool] = {}

    @classmethod
    def from_environment(cls) -> AllowList:
        """The allow-list named by :data:`ALLOW_ENV_VAR`, or one that allows everything."""
        value = os.environ.get(ALLOW_ENV_VAR, "").strip()
        if not value:
            return cls(None)
        return cls(part.strip() for part in value.split(",") if part.strip())

    def allows(self, host: str) -> bool:
        """Whether ``host`` (an IP literal) lies inside an allowed network."""
        if self.networks is None:
            return True
        verdict = self._cache.get(host)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                verdict = False
            else:
                verdict = any(ip in net for net in self.networks)
            if len(self._cache) >= _ALLOW_CACHE_LIMIT:
                self._cache.clear()
            self._cache[host] = verdict
        return verdict

    def check(self, host: str) -> None:
        """Raise :class:`DestinationNotAllowedError` unless ``host`` is allowed."""
        if not self.allows(host):
            raise DestinationNotAllowedError(f"destination {host} is outside the allowed networks {self}")

    def __str__(self) -> str:
        if self.networks is None:
            return "(everywhere)"
        return ",".join(str(n) for n in self.networks)


def _family(host: str) -> stdlib_socket.AddressFamily:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address literal") from None
    return stdlib_socket.AF_INET6 if ip.version == 6 else stdlib_socket.AF_INET


def _address(sockaddr: tuple[object, ...]) -> Address:
    host, port = sockaddr[0], sockaddr[1]
    assert isinstance(host, str)
    assert isinstance(port, int)
    return Address(host, port)


class _Served:
    """One endpoint served by a :class:`_SharedPoller`: where its datagrams go and whom to tell when it ends."""

    __slots__ = ("deliver", "endpoint", "error", "fd", "parked", "task")

    def __init__(self, endpoint: RealDatagramEndpoint, deliver: Callable[[bytes, Address], None]) -> None:
        self.endpoint = endpoint
        self.fd = endpoint.fileno()  # kept: a closed socket's fileno() is -1
        self.deliver = deliver
        self.task = trio.lowlevel.current_task()
        self.error: BaseException | None = None  # raised in ``task``: from ``deliver``, a socket, or a close
        self.parked = False  # the task sleeps in _SharedPoller.serve and may be woken once


class _SharedPoller:
    """Serves every endpoint of one :class:`RealNetwork` from one epoll set, in the task of one of them.

    With a task per socket, each datagram costs a trio wake-up: re-arming the socket in trio's epoll, the
    scheduler's pass and a task switch.  That is nothing for a node alone, but a process hosting hundreds of nodes
    (a benchmark, a test network on loopback) spent about a tenth of its time there.  Here the sockets stay
    registered (level-triggered) in an epoll set of our own; one served endpoint's task, the leader, waits on it,
    reads one datagram from each readable socket per round and calls that endpoint's ``deliver`` at once, and
    yields after :data:`POLLED_DATAGRAMS_PER_TURN` datagrams or when nothing is left; the other tasks
    sleep until their endpoint closes, their ``deliver`` raises, or the leader leaves (then one of them leads).
    """

    __slots__ = ("_epoll", "_leader", "_leader_scope", "_served")

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._served: dict[int, _Served] = {}
        self._leader: _Served | None = None
        self._leader_scope: trio.CancelScope | None = None

    async def serve(self, endpoint: RealDatagramEndpoint, deliver: Callable[[bytes, Address], None]) -> None:
        served = _Served(endpoint, deliver)
        if self._epoll is None:
            self._epoll = select.epoll()
        self._epoll.register(served.fd, select.EPOLLIN)
        self._served[served.fd] = served
        try:
            while True:
                if served.error is not None:
                    raise served.error
                if self._leader is None:
                    await self._lead(served)
                else:
                    await self._park(served)
        finally:
            self._forget(served)
            epoll = self._epoll
            if not self._served and self._leader is None and epoll is not None:
                # The last one out closes the set (a leader on its way out would still poll it).
                self._epoll = None
                trio.lowlevel.notify_closing(epoll.fileno())
                epoll.close()

    def closing(self, endpoint: RealDatagramEndpoint) -> None:
        """``endpoint`` is about to close its socket: stop polling it (before its fd number can be reused) and end
        its :meth:`serve` with :class:`trio.ClosedResourceError`."""
        served = self._served.get(endpoint.fileno())
        if served is not None and served.endpoint is endpoint:
            self._forget(served)
            self._fail(served, trio.ClosedResourceError("datagram endpoint is closed"))

    def _forget(self, served: _Served) -> None:
        fd = served.fd
        if self._served.get(fd) is served:
            del self._served[fd]
            if self._epoll is not None:
                self._epoll.unregister(fd)

    def _fail(self, served: _Served, error: BaseException) -> None:
        # The error belongs to the served endpoint's own task: it ends that serve, not the leader's.
        if served.error is None:
            served.error = error
        if served is self._leader:
            assert self._leader_scope is not None
            self._leader_scope.cancel()
        else:
            self._wake(served)

    @staticmethod
    def _wake(served: _Served) -> None:
        if served.parked:
            served.parked = False
            trio.lowlevel.reschedule(served.task, outcome.Value(None))

    async def _park(self, served: _Served) -> None:
        def abort(_: object) -> trio.lowlevel.Abort:
            served.parked = False
            return trio.lowlevel.Abort.SUCCEEDED

        served.parked = True
        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _lead(self, served: _Served) -> None:
        self._leader = served
        try:
            with trio.CancelScope() as scope:
                self._leader_scope = scope
                await self._poll()
        finally:
            self._leader = None
            self._leader_scope = None
            # Someone must go on polling for the others.
            for other in self._served.values():
                if other.parked:
                    self._wake(other)
                    break

    async def _poll(self) -> None:
        epoll = self._epoll
        assert epoll is not None
        served_by_fd = self._served
        turn = POLLED_DATAGRAMS_PER_TURN
        while True:
            ready = epoll.poll(0, MAX_SOCKETS_PER_POLL)
            if not ready:
                turn = POLLED_DATAGRAMS_PER_TURN
                await trio.lowlevel.wait_readable(epoll.fileno())
                continue
            turn -= len(ready)
            for fd, _ in ready:
                served = served_by_fd.get(fd)
                if served is None:
                    continue  # closed by an earlier delivery in this round
                # One datagram per socket per round: readiness is level-triggered, so a socket with more is in
                # the next round's list, and no read is wasted on finding a socket empty.
                try:
                    data, sockaddr = served.endpoint.recv_one()
                except (BlockingIOError, ConnectionRefusedError):
                    continue  # nothing after all, or an earlier send's ICMP error (not data)
                except OSError as exc:
                    self._forget(served)
                    self._fail(served, exc)
                    continue
                try:
                    served.deliver(data, _address(sockaddr))
                except Exception as exc:
                    # The endpoint's own task raises it, as its receive loop would have; the others go on.
                    self._forget(served)
                    self._fail(served, exc)
            if turn <= 0:
                turn = POLLED_DATAGRAMS_PER_TURN
                await trio.lowlevel.checkpoint()


class RealDatagramEndpoint(DatagramEndpoint):
    """A UDP socket.  :meth:`serve` hands it to its network's shared poller; :meth:`receive_batch` waits on it
    alone with trio's readiness API, so that a wake-up drains everything queued in the kernel."""

    __slots__ = ("_allow", "_closed", "_emptied", "_poller", "_sock")

    def __init__(self, sock: stdlib_socket.socket, allow: AllowList, poller: _SharedPoller | None = None) -> None:
        super().__init__(_address(sock.getsockname()))
        self._sock = sock
        self._allow = allow
        self._poller = poller
        self._closed = False
        self._emptied = False

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed)."""
        return self._sock.fileno()

    def recv_one(self) -> tuple[bytes, tuple[object, ...]]:
        """Read one datagram without waiting (:class:`BlockingIOError` if there is none); for the poller."""
        data, sockaddr = self._sock.recvfrom(RECEIVE_BUFFER_BYTES)
        self.stats.received += 1
        return data, sockaddr

    async def serve(self, deliver: Callable[[bytes, Address], None]) -> None:
        """See :meth:`DatagramEndpoint.serve`.  Where epoll exists, every endpoint of the network is served by
        one poller in the task of one of them (so ``deliver`` may run in another endpoint's task); its errors
        are still raised here."""
        if self._closed:
            raise trio.ClosedResourceError("datagram endpoint is closed")
        if self._poller is None:
            await super().serve(deliver)
        else:
            await self._poller.serve(self, deliver)

    def send(self, data: bytes, destination: Address) -> None:
        """Send one datagram; a full kernel buffer or an ICMP error drops it and counts it."""
        if self._closed:
            raise trio.ClosedResourceError("datagram endpoint is closed")
        self._allow.check(destination.host)
        try:
            self._sock.sendto(data, (destination.host, destination.port))
        except OSError:
            self.stats.send_errors += 1
        else:
            self.stats.sent += 1

    async def receive_batch(self) -> list[tuple[bytes, Address]]:
        """Wait until the socket is readable, then drain up to :data:`MAX_DATAGRAMS_PER_BATCH` datagrams."""
        await trio.lowlevel.checkpoint_if_cancelled()
        batch: list[tuple[bytes, Address]] = []
        waited = False
        if self._emptied:
            # The last batch emptied the socket: a read now would almost always find nothing (a syscall and an
            # exception per datagram handled), and readiness is level-triggered, so whatever arrived since wakes
            # this wait at once.
            await self._wait_readable()
            waited = True
        while True:
            if self._closed:
                raise trio.ClosedResourceError("datagram endpoint is closed")
            emptied = False
            try:
                while len(batch) < MAX_DATAGRAMS_PER_BATCH:
                    data, sockaddr = self._sock.recvfrom(RECEIVE_BUFFER_BYTES)
                    batch.append((data, _address(sockaddr)))
            except BlockingIOError:
                emptied = True
            except ConnectionRefusedError:
                # Linux reports an earlier send's ICMP port-unreachable on the next recv; it is not data.
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF and self._closed:
                    raise trio.ClosedResourceError("datagram endpoint is closed") from None
                raise
            if batch:
                self._emptied = emptied
                self.stats.received += len(batch)
                if not waited:
                    # Data was there at once: yield anyway, so a flooded socket cannot starve the other tasks.
                    # After a wait the scheduler has just run, and a second round trip through it would cost as
                    # much as handling a datagram.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return batch
            await self._wait_readable()
            waited = True

    async def _wait_readable(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self._sock)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("datagram endpoint is closed") from None

    async def aclose(self) -> None:
        """Close the socket (wakes a blocked receive with ClosedResourceError)."""
        if not self._closed:
            self._closed = True
            if self._poller is not None:
                self._poller.closing(self)
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


class RealStream(Stream):
    """A TCP connection: a trio SocketStream plus its two addresses."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self._inner = inner
        self.local_address = _address(inner.socket.getsockname())
        self.remote_address = _address(inner.socket.getpeername())

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` (see :meth:`trio.abc.SendStream.send_all`)."""
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """See :meth:`trio.abc.SendStream.wait_send_all_might_not_block`."""
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive some bytes; ``b""`` at end of stream."""
        return await self._inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        """Half-close: the peer reads end-of-stream after what was sent."""
        await self._inner.send_eof()

    async def aclose(self) -> None:
        """Close the connection."""
        await self._inner.aclose()


class RealListener(Listener):
    """A TCP listener on one address."""

    __slots__ = ("_inner",)

    def __init__(self, inner: trio.SocketListener) -> None:
        super().__init__(_address(inner.socket.getsockname()))
        self._inner = inner

    async def accept(self) -> Stream:
        """Wait for the next connection."""
        return RealStream(await self._inner.accept())

    async def aclose(self) -> None:
        """Stop listening."""
        await self._inner.aclose()


class RealNetwork(Network):
    """The host's real network, limited to the destinations of an :class:`AllowList`."""

    def __init__(self, allow: Iterable[str | IPNetwork] | AllowList | None = None) -> None:
        # Without epoll (not Linux) each endpoint's serve waits on its own socket.
        self._poller = _SharedPoller() if hasattr(select, "epoll") else None
        if isinstance(allow, AllowList):
            self.allow = allow
        elif allow is None:
            self.allow = AllowList.from_environment()
        else:
            self.allow = AllowList(allow)

    async def open_datagram(self, host: str, port: int = 0) -> DatagramEndpoint:
        """Bind a UDP socket to ``host:port``."""
        family = _family(host)
        sock = stdlib_socket.socket(family, stdlib_socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (stdlib_socket.SO_RCVBUF, stdlib_socket.SO_SNDBUF):
                with contextlib.suppress(OSError):  # a capped or refused size is not an error: UDP may drop
                    sock.setsockopt(stdlib_socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER_BYTES)
            if family == stdlib_socket.AF_INET6:
                sock.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        await trio.lowlevel.checkpoint()
        return RealDatagramEndpoint(sock, self.allow, self._poller)

    async def open_listener(self, host: str, port: int = 0) -> Listener:
        """Listen for TCP connections on ``host:port``."""
        _family(host)  # reject host names early: we bind IP literals only
        listeners = await trio.open_tcp_listeners(port, host=host)
        for extra in listeners[1:]:
            await extra.aclose()
        return RealListener(listeners[0])

    async def connect(self, address: Address) -> Stream:
        """Open a TCP connection to ``address``."""
        _family(address.host)
        self.allow.check(address.host)
        try:
            inner = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConnectError(f"cannot connect to {address}: {reason}") from exc
        return RealStream(inner)
