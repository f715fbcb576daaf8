"""SimNetwork: an in-memory network of simulated hosts on virtual time.

Every host gets its own IP addresses and implements :class:`~p2pchat.net.base.Network`, so a node runs on it
unchanged.  Links have latency distributions, loss, duplication, reordering and optional bandwidth; hosts can go
down and come back; the network can be partitioned.  Every random draw comes from one seeded RNG.

How it stays fast and deterministic:

* One scheduler task owns a heap of everything in flight (datagrams, stream segments), keyed by arrival time
  and a sequence number.  There is no task per packet.
* Arrival times are rounded up to :attr:`SimNetwork.time_resolution` (1 ms by default), so that what is due in
  the same millisecond is delivered in one scheduler wake-up, and a receiving task drains everything that has
  arrived for it in one wake-up (:meth:`SimDatagramEndpoint.receive_batch`).
* Run it under ``trio.testing.MockClock(autojump_threshold=0)``: virtual time jumps straight to the next event.
  :meth:`SimNetwork.run` also seeds trio's scheduler and switches it to its deterministic mode (the hook trio
  itself uses under Hypothesis), because trio otherwise shuffles the order of tasks that become runnable
  together; with both, the same seed replays the same event trace.
* Datagrams and stream segments are delivered only if, at arrival time, the destination host is up and not
  partitioned away from the source.  TCP under a partition would stall and then reset; here a segment that
  crosses a partition breaks the connection at once.  A host that goes down takes its connections with it
  silently, as a crash would: its peers notice through their own timeouts.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import outcome
import trio

from p2pchat.errors import ConnectError
from p2pchat.net.base import Address, DatagramEndpoint, Listener, Network, Stream

__all__ = [
    "DEFAULT_TIME_RESOLUTION",
    "RECEIVE_QUEUE_LIMIT",
    "STREAM_WINDOW_BYTES",
    "Constant",
    "LatencyModel",
    "LinkModel",
    "LogNormal",
    "SimHost",
    "SimNetwork",
    "SimStats",
    "Uniform",
    "open_sim_network",
]

DEFAULT_TIME_RESOLUTION = 0.001
"""Arrival times are rounded up to a multiple of this many seconds (0 keeps exact times)."""

RECEIVE_QUEUE_LIMIT = 4096
"""Datagrams queued at one endpoint before further arrivals are dropped, like a full socket buffer."""

STREAM_WINDOW_BYTES = 262144
"""Bytes a stream sender may have in flight or unread at the receiver before ``send_all`` waits."""

LISTEN_BACKLOG = 128
"""Connections waiting in a listener's accept queue before further connects are refused."""

CONNECT_TIMEOUT = 3.0
"""Virtual seconds a connect to a down, unknown or partitioned host takes to fail (no RST arrives)."""

_EPHEMERAL_PORT_FIRST = 32768
_EPHEMERAL_PORT_LAST = 60999


# --- link models -------------------------------------------------------------------------------------------


class LatencyModel(Protocol):
    """A one-way delay distribution in seconds."""

    def sample(self, rng: random.Random) -> float:
        """Draw one delay."""
        ...


@dataclass(frozen=True, slots=True)
class Constant:
    """Always the same delay."""

    delay: float

    def sample(self, rng: random.Random) -> float:
        """Return the fixed delay."""
        return self.delay


@dataclass(frozen=True, slots=True)
class Uniform:
    """A delay uniform in ``[low, high]``."""

    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        """Draw a uniform delay."""
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True, slots=True)
class LogNormal:
    """A heavy-tailed delay around ``median``, capped at ``cap`` (as measured WAN latencies look)."""

    median: float
    sigma: float = 0.5
    cap: float = 10.0

    def sample(self, rng: random.Random) -> float:
        """Draw a log-normal delay."""
        return min(self.cap, self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0)))


@dataclass(frozen=True, slots=True)
class LinkModel:
    """How a directed link between two hosts behaves.

    ``reorder`` is the probability that a datagram is held back by one more latency draw, which lets later
    datagrams overtake it even on a constant-latency link.  ``bandwidth`` (bytes per second, None: unlimited)
    adds serialisation delay per directed link.
    """

    latency: LatencyModel = Constant(0.010)
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    bandwidth: float | None = None

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability, got {value}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError("bandwidth must be positive")


LinkPolicy = Callable[["SimHost", "SimHost"], LinkModel]


@dataclass(slots=True)
class SimStats:
    """Network-wide counters; every datagram sent ends in exactly one of the outcome counters."""

    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    dropped_partition: int = 0
    dropped_down: int = 0
    dropped_unreachable: int = 0
    dropped_overflow: int = 0
    stream_bytes: int = 0
    bytes_sent: int = 0
    """Datagram payload bytes sent (a duplicate made by the link not counted)."""


TraceEvent = tuple[float, str, str, str, int]


# --- the network ---------------------------------------------------------------------------------------------


class SimNetwork:
    """The simulated internet: hosts, links, and the scheduler that moves everything in flight."""

    def __init__(
        self,
        seed: int = 0,
        *,
        default_link: LinkModel | None = None,
        link_policy: LinkPolicy | None = None,
        time_resolution: float = DEFAULT_TIME_RESOLUTION,
        trace: bool = False,
        receive_queue_limit: int = RECEIVE_QUEUE_LIMIT,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.default_link = default_link or LinkModel()
        self.link_policy = link_policy
        self.time_resolution = time_resolution
        self.receive_queue_limit = receive_queue_limit
        self.stats = SimStats()
        self.trace: list[TraceEvent] | None = [] if trace else None
        self.hosts: list[SimHost] = []
        self._hosts_by_ip: dict[str, SimHost] = {}
        self._links: dict[tuple[int, int], LinkModel] = {}
        self._link_busy_until: dict[tuple[int, int], float] = {}
        self._endpoints: dict[Address, SimDatagramEndpoint] = {}
        self._listeners: dict[Address, SimListener] = {}
        self._heap: list[tuple[float, int, Callable[[Any, Any], None], Any, Any]] = []
        self._seq = 0
        self._next_auto_ip = 1
        self._scope: trio.CancelScope | None = None
        self._running = False

    # -- topology

    def add_host(self, *addresses: str) -> SimHost:
        """Add a host with the given IP addresses (default: the next free one in 10.0.0.0/8)."""
        if not addresses:
            while True:
                n = self._next_auto_ip
                self._next_auto_ip += 1
                candidate = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
                if candidate not in self._hosts_by_ip:
                    addresses = (candidate,)
                    break
        host = SimHost(self, len(self.hosts), tuple(str(ipaddress.ip_address(a)) for a in addresses))
        for ip in host.addresses:
            if ip in self._hosts_by_ip:
                raise ValueError(f"address {ip} already belongs to a host")
            self._hosts_by_ip[ip] = host
        self.hosts.append(host)
        return host

    def host_of(self, ip: str) -> SimHost | None:
        """The host that owns ``ip``, if any."""
        return self._hosts_by_ip.get(ip)

    def set_link(self, a: SimHost, b: SimHost, model: LinkModel, *, symmetric: bool = True) -> None:
        """Give the link from ``a`` to ``b`` (and back, when symmetric) its own model."""
        self._links[(a.index, b.index)] = model
        if symmetric:
            self._links[(b.index, a.index)] = model

    def link(self, src: SimHost, dst: SimHost) -> LinkModel:
        """The model of the directed link from ``src`` to ``dst``."""
        if self._links:
            model = self._links.get((src.index, dst.index))
            if model is not None:
                return model
        if self.link_policy is not None:
            return self.link_policy(src, dst)
        return self.default_link

    def partition(self, groups: Iterable[Iterable[SimHost]]) -> None:
        """Split the network: hosts in different groups cannot reach each other.

        Hosts not named in any group form one more group of their own.
        """
        for host in self.hosts:
            host.partition = 0
        for number, group in enumerate(groups, start=1):
            for host in group:
                host.partition = number

    def heal(self) -> None:
        """Undo :meth:`partition`."""
        for host in self.hosts:
            host.partition = 0

    # -- scheduler

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The scheduler: deliver everything in flight at its arrival time.  Runs until cancelled."""
        if self._running:
            raise RuntimeError("SimNetwork.run is already running")
        self._running = True
        _make_trio_scheduling_deterministic(self.seed)
        heap = self._heap
        pop = heapq.heappop
        task_status.started()
        try:
            while True:
                deadline = heap[0][0] if heap else math.inf
                with trio.CancelScope(deadline=deadline) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self._scope = None
                now = trio.current_time()
                while heap and heap[0][0] <= now:
                    _, _, handler, a, b = pop(heap)
                    handler(a, b)
        finally:
            self._running = False
            self._scope = None

    def _schedule(self, when: float, handler: Callable[[Any, Any], None], a: object, b: object) -> None:
        resolution = self.time_resolution
        if resolution:
            when = math.ceil(when / resolution - 1e-9) * resolution
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, handler, a, b))
        scope = self._scope
        if scope is not None and when < scope.deadline:
            scope.deadline = when

    def _record(self, event: str, src: object, dst: object, size: int) -> None:
        assert self.trace is not None
        self.trace.append((trio.current_time(), event, str(src), str(dst), size))

    # -- datagrams

    def _send_datagram(self, src_host: SimHost, source: Address, data: bytes, destination: Address) -> None:
        stats = self.stats
        stats.sent += 1
        stats.bytes_sent += len(data)
        src_host.datagrams_sent += 1
        src_host.bytes_sent += len(data)
        tracing = self.trace is not None
        if tracing:
            self._record("send", source, destination, len(data))
        if not src_host.up:
            stats.dropped_down += 1
            return
        dst_host = self._hosts_by_ip.get(destination.host)
        if dst_host is None:
            stats.dropped_unreachable += 1
            if tracing:
                self._record("unreachable", source, destination, len(data))
            return
        model = self.link(src_host, dst_host)
        rng = self.rng
        if model.loss and rng.random() < model.loss:
            stats.lost += 1
            if tracing:
                self._record("lose", source, destination, len(data))
            return
        now = trio.current_time()
        copies = 2 if model.duplicate and rng.random() < model.duplicate else 1
        if copies == 2:
            stats.duplicated += 1
            stats.sent += 1  # the copy also ends in exactly one outcome counter
            if tracing:
                self._record("duplicate", source, destination, len(data))
        for _ in range(copies):
            when = now + model.latency.sample(rng)
            if model.reorder and rng.random() < model.reorder:
                when += model.latency.sample(rng)
            if model.bandwidth is not None:
                when = self._serialise(src_host, dst_host, model.bandwidth, len(data), when)
            self._schedule(when, self._arrive_datagram, (src_host, source, destination), data)

    def _serialise(self, src: SimHost, dst: SimHost, bandwidth: float, size: int, when: float) -> float:
        key = (src.index, dst.index)
        start = max(trio.current_time(), self._link_busy_until.get(key, 0.0))
        done = start + size / bandwidth
        self._link_busy_until[key] = done
        return when + (done - trio.current_time())

    def _arrive_datagram(self, route: tuple[SimHost, Address, Address], data: bytes) -> None:
        src_host, source, destination = route
        stats = self.stats
        dst_host = self._hosts_by_ip[destination.host]
        if not dst_host.up:
            stats.dropped_down += 1
            outcome_name = "drop-down"
        elif dst_host.partition != src_host.partition:
            stats.dropped_partition += 1
            outcome_name = "drop-partition"
        else:
            endpoint = self._endpoints.get(destination)
            if endpoint is None:
                stats.dropped_unreachable += 1
                outcome_name = "drop-no-endpoint"
            elif endpoint._deliver(data, source):
                stats.delivered += 1
                outcome_name = "deliver"
            else:
                stats.dropped_overflow += 1
                outcome_name = "drop-overflow"
        if self.trace is not None:
            self._record(outcome_name, source, destination, len(data))

    # -- ports

    def _allocate_port(self, ip: str, taken: Callable[[Address], bool]) -> int:
        span = _EPHEMERAL_PORT_LAST - _EPHEMERAL_PORT_FIRST + 1
        start = self.rng.randrange(span)
        for offset in range(span):
            port = _EPHEMERAL_PORT_FIRST + (start + offset) % span
            if not taken(Address(ip, port)):
                return port
        raise OSError(f"no free port left on simulated host {ip}")

    def _own_ip(self, host: SimHost, ip: str) -> str:
        canonical = str(ipaddress.ip_address(ip))
        if canonical not in host.addresses:
            raise OSError(f"cannot bind {ip}: simulated host has addresses {', '.join(host.addresses)}")
        return canonical


def _make_trio_scheduling_deterministic(seed: int) -> None:
    # trio shuffles tasks that become runnable together to shake out ordering bugs; a simulation needs the same
    # order every run.  This is the switch trio flips for itself under Hypothesis.
    core_run: Any = trio._core._run
    if hasattr(core_run, "_ALLOW_DETERMINISTIC_SCHEDULING") and hasattr(core_run, "_r"):
        core_run._ALLOW_DETERMINISTIC_SCHEDULING = True
        core_run._r.seed(seed)


@asynccontextmanager
async def open_sim_network(seed: int = 0, **options: Any) -> AsyncIterator[SimNetwork]:
    """Create a :class:`SimNetwork` and run its scheduler for the duration of the ``async with`` block."""
    network = SimNetwork(seed, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        yield network
        nursery.cancel_scope.cancel()


# --- hosts -----------------------------------------------------------------------------------------------------


class SimHost(Network):
    """One simulated machine: its addresses, its state (up or down), and the sockets opened on it."""

    __slots__ = ("_streams", "addresses", "bytes_sent", "datagrams_sent", "index", "network", "partition", "up")

    def __init__(self, network: SimNetwork, index: int, addresses: tuple[str, ...]) -> None:
        self.network = network
        self.index = index
        self.addresses = addresses
        self.partition = 0
        self.up = True
        self.datagrams_sent = 0
        """Datagrams this host handed to the network (a duplicate made by the link not counted)."""
        self.bytes_sent = 0
        """Bytes this host handed to the network: datagram payloads plus stream bytes (no header overhead)."""
        self._streams: set[SimStream] | None = None

    @property
    def address(self) -> str:
        """The host's first (primary) IP address."""
        return self.addresses[0]

    def set_down(self) -> None:
        """Take the host off the network, as a crash or a pulled cable would; its connections die silently."""
        self.up = False
        if self._streams:
            for stream in list(self._streams):
                stream._break()
            self._streams.clear()

    def set_up(self) -> None:
        """Put the host back on the network.  Sockets it still holds work again; connections do not come back."""
        self.up = True

    async def open_datagram(self, host: str, port: int = 0) -> DatagramEndpoint:
        """Bind a simulated UDP endpoint."""
        net = self.network
        ip = net._own_ip(self, host)
        if port == 0:
            port = net._allocate_port(ip, net._endpoints.__contains__)
        address = Address(ip, port)
        if address in net._endpoints:
            raise OSError(f"address {address} already in use")
        endpoint = SimDatagramEndpoint(self, address)
        net._endpoints[address] = endpoint
        await trio.lowlevel.checkpoint()
        return endpoint

    async def open_listener(self, host: str, port: int = 0) -> Listener:
        """Listen for simulated stream connections."""
        net = self.network
        ip = net._own_ip(self, host)
        if port == 0:
            port = net._allocate_port(ip, net._listeners.__contains__)
        address = Address(ip, port)
        if address in net._listeners:
            raise OSError(f"address {address} already in use")
        listener = SimListener(self, address)
        net._listeners[address] = listener
        await trio.lowlevel.checkpoint()
        return listener

    async def connect(self, address: Address) -> Stream:
        """Open a simulated stream; takes one round trip, or fails like TCP would."""
        net = self.network
        dst_host = net.host_of(address.host)
        if not self.up or dst_host is None:
            await trio.sleep(CONNECT_TIMEOUT)
            raise ConnectError(f"cannot connect to {address}: timed out")
        forward = net.link(self, dst_host).latency.sample(net.rng)
        back = net.link(dst_host, self).latency.sample(net.rng)
        await trio.sleep(forward)
        if not (self.up and dst_host.up) or dst_host.partition != self.partition:
            await trio.sleep(max(0.0, CONNECT_TIMEOUT - forward))
            raise ConnectError(f"cannot connect to {address}: timed out")
        listener = net._listeners.get(address)
        if listener is None or len(listener._backlog) >= LISTEN_BACKLOG:
            await trio.sleep(back)
            raise ConnectError(f"cannot connect to {address}: connection refused")
        local = Address(self.address, net._allocate_port(self.address, lambda a: False))
        client = SimStream(self, local, address)
        server = SimStream(dst_host, address, local)
        client._peer, server._peer = server, client
        listener._enqueue(server)
        await trio.sleep(back)
        if not self.up:
            client._break()
            raise ConnectError(f"cannot connect to {address}: host went down")
        return client

    def _track(self, stream: SimStream) -> None:
        if self._streams is None:
            self._streams = set()
        self._streams.add(stream)

    def _untrack(self, stream: SimStream) -> None:
        if self._streams is not None:
            self._streams.discard(stream)

    def __repr__(self) -> str:
        return f"<SimHost {self.index} {' '.join(self.addresses)}{'' if self.up else ' down'}>"


# --- datagram endpoints -------------------------------------------------------------------------------------


class SimDatagramEndpoint(DatagramEndpoint):
    """A simulated UDP socket.  Kept small: 10,000 idle ones must fit in a few tens of MiB."""

    __slots__ = ("_closed", "_host", "_queue", "_waiter")

    def __init__(self, host: SimHost, address: Address) -> None:
        super().__init__(address)
        self._host = host
        self._queue: list[tuple[bytes, Address]] = []
        self._waiter: trio.lowlevel.Task | None = None
        self._closed = False

    def send(self, data: bytes, destination: Address) -> None:
        """Hand a datagram to the simulated network."""
        if self._closed:
            raise trio.ClosedResourceError("datagram endpoint is closed")
        if not isinstance(destination, Address):
            destination = Address(*destination)
        self.stats.sent += 1
        self._host.network._send_datagram(self._host, self.local_address, bytes(data), destination)

    def _deliver(self, data: bytes, source: Address) -> bool:
        queue = self._queue
        if len(queue) >= self._host.network.receive_queue_limit:
            self.stats.receive_overflow += 1
            return False
        queue.append((data, source))
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)
        return True

    async def receive_batch(self) -> list[tuple[bytes, Address]]:
        """Wait for at least one datagram; return all that have arrived."""
        if self._closed:
            raise trio.ClosedResourceError("datagram endpoint is closed")
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already receiving on this endpoint")
        if self._queue:
            await trio.lowlevel.checkpoint()
        else:
            self._waiter = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            if self._closed:
                raise trio.ClosedResourceError("datagram endpoint is closed")
        batch = self._queue
        self._queue = []
        self.stats.received += len(batch)
        return batch

    async def aclose(self) -> None:
        """Close the endpoint and free its port."""
        if not self._closed:
            self._closed = True
            net = self._host.network
            if net._endpoints.get(self.local_address) is self:
                del net._endpoints[self.local_address]
            waiter = self._waiter
            if waiter is not None:
                self._waiter = None
                trio.lowlevel.reschedule(waiter, outcome.Error(trio.ClosedResourceError("endpoint closed")))
        await trio.lowlevel.checkpoint()


# --- streams ---------------------------------------------------------------------------------------------------


class SimListener(Listener):
    """A simulated TCP listener."""

    __slots__ = ("_backlog", "_closed", "_host", "_waiter")

    def __init__(self, host: SimHost, address: Address) -> None:
        super().__init__(address)
        self._host = host
        self._backlog: list[SimStream] = []
        self._waiter: trio.lowlevel.Task | None = None
        self._closed = False

    def _enqueue(self, stream: SimStream) -> None:
        self._backlog.append(stream)
        stream._host._track(stream)
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            trio.lowlevel.reschedule(waiter)

    async def accept(self) -> Stream:
        """Wait for the next connection."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("listener is closed")
            if self._backlog:
                await trio.lowlevel.checkpoint()
                if self._backlog:
                    return self._backlog.pop(0)
                continue
            if self._waiter is not None:
                raise trio.BusyResourceError("another task is already accepting")
            self._waiter = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)

    async def aclose(self) -> None:
        """Stop listening; connections still in the backlog are reset."""
        if not self._closed:
            self._closed = True
            net = self._host.network
            if net._listeners.get(self.local_address) is self:
                del net._listeners[self.local_address]
            for stream in self._backlog:
                stream._break()
                if stream._peer is not None:
                    stream._peer._break()
            self._backlog.clear()
            if self._waiter is not None:
                waiter, self._waiter = self._waiter, None
                trio.lowlevel.reschedule(waiter, outcome.Error(trio.ClosedResourceError("listener closed")))
        await trio.lowlevel.checkpoint()


_EOF = object()


class SimStream(Stream):
    """One end of a simulated TCP connection: reliable, ordered, with latency, bandwidth and a send window."""

    def __init__(self, host: SimHost, local: Address, remote: Address) -> None:
        self._host = host
        self.local_address = local
        self.remote_address = remote
        self._peer: SimStream | None = None
        self._buffer = bytearray()
        self._eof_received = False
        self._eof_sent = False
        self._closed = False
        self._broken = False
        self._in_flight = 0  # bytes sent by this end, not yet read by the peer
        self._last_arrival = 0.0
        self._recv_waiter: trio.lowlevel.Task | None = None
        self._send_waiter: trio.lowlevel.Task | None = None
        self._sending = False
        host._track(self)

    # -- internal events

    def _wake_receiver(self) -> None:
        if self._recv_waiter is not None:
            waiter, self._recv_waiter = self._recv_waiter, None
            trio.lowlevel.reschedule(waiter)

    def _wake_sender(self) -> None:
        if self._send_waiter is not None:
            waiter, self._send_waiter = self._send_waiter, None
            trio.lowlevel.reschedule(waiter)

    def _break(self) -> None:
        self._broken = True
        self._host._untrack(self)
        self._wake_receiver()
        self._wake_sender()

    def _arrive(self, sender: SimStream, chunk: object) -> None:
        receiver = self
        if receiver._broken or receiver._closed:
            return
        if not receiver._host.up:
            return  # a dead host's kernel answers nothing; the sender finds out by timing out
        if receiver._host.partition != sender._host.partition:
            receiver._break()
            sender._break()
            return
        if chunk is _EOF:
            receiver._eof_received = True
        else:
            assert isinstance(chunk, bytes)
            receiver._buffer += chunk
            receiver._host.network.stats.stream_bytes += len(chunk)
        receiver._wake_receiver()

    def _wait(self, slot: str) -> Any:
        setattr(self, slot, trio.lowlevel.current_task())

        def abort(_: object) -> trio.lowlevel.Abort:
            setattr(self, slot, None)
            return trio.lowlevel.Abort.SUCCEEDED

        return trio.lowlevel.wait_task_rescheduled(abort)

    def _check_send(self) -> SimStream:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was already called")
        peer = self._peer
        if self._broken or peer is None or peer._closed or not self._host.up:
            raise trio.BrokenResourceError("connection lost")
        return peer

    # -- trio stream API

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; waits while the send window is full."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            peer = self._check_send()
            await trio.lowlevel.checkpoint()
            view = memoryview(bytes(data))
            while view:
                peer = self._check_send()
                room = STREAM_WINDOW_BYTES - self._in_flight
                if room <= 0:
                    await self._wait("_send_waiter")
                    continue
                chunk = bytes(view[:room])
                view = view[room:]
                self._in_flight += len(chunk)
                self._transmit(peer, chunk, len(chunk))
        finally:
            self._sending = False

    def _transmit(self, peer: SimStream, chunk: object, size: int) -> None:
        net = self._host.network
        self._host.bytes_sent += size
        model = net.link(self._host, peer._host)
        when = trio.current_time() + model.latency.sample(net.rng)
        if model.bandwidth is not None:
            when = net._serialise(self._host, peer._host, model.bandwidth, size, when)
        when = max(when, self._last_arrival)  # TCP delivers in order whatever each segment's delay
        self._last_arrival = when
        net._schedule(when, peer._arrive, self, chunk)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the send window has room."""
        while STREAM_WINDOW_BYTES - self._in_flight <= 0:
            self._check_send()
            await self._wait("_send_waiter")
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive some bytes; ``b""`` once the peer has sent EOF and everything before it was read."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._recv_waiter is not None:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
            if self._buffer:
                size = len(self._buffer) if max_bytes is None else min(max_bytes, len(self._buffer))
                data = bytes(self._buffer[:size])
                del self._buffer[:size]
                peer = self._peer
                if peer is not None:
                    peer._in_flight -= size
                    peer._wake_sender()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            if self._eof_received:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            if self._broken or not self._host.up:
                raise trio.BrokenResourceError("connection lost")
            await self._wait("_recv_waiter")

    async def send_eof(self) -> None:
        """Half-close the stream."""
        if self._eof_sent or self._closed:
            await trio.lowlevel.checkpoint()
            return
        peer = self._check_send()
        self._eof_sent = True
        self._transmit(peer, _EOF, 0)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close this end; the peer reads end-of-stream after what was already sent."""
        if not self._closed:
            peer = self._peer
            if not self._eof_sent and not self._broken and peer is not None and self._host.up:
                self._eof_sent = True
                self._transmit(peer, _EOF, 0)
            self._closed = True
            self._host._untrack(self)
            self._wake_receiver()
            self._wake_sender()
        await trio.lowlevel.checkpoint()
