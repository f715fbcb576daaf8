"""What every simulation of p2pchat nodes on a SimNetwork shares: joining in batches, churn, the garbage
collector at quiet points, duration distributions, and finding the node truly closest to a key.

Used by :mod:`simulations._dht_sim` (the ``bench_dht --sim`` mode), :mod:`simulations._messaging_offline` and
:mod:`simulations.runner` (``python -m simulations run``).
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NODE_ID_BITS
from p2pchat.core.nodecert import CertCache
from p2pchat.dht.node import DhtNode
from p2pchat.env import Env
from p2pchat.net.sim import SimHost, SimNetwork
from p2pchat.node import Node

__all__ = [
    "TCP_PORT",
    "UDP_PORT",
    "ChurnDriver",
    "Duration",
    "Exponential",
    "GcSettler",
    "closest_but",
    "closest_where",
    "join_batches",
    "join_in_batches",
    "make_full_node",
    "xor_closest",
]

UDP_PORT = 4000
"""The DHT port of every simulated node (each has a host of its own)."""

TCP_PORT = 4001
"""The direct-channel port of every simulated full Node."""


def make_full_node(net: SimNetwork, env_seed: int, certs: CertCache) -> tuple[Node, SimHost]:
    """A whole :class:`~p2pchat.node.Node` (in memory) on a new host, its keys and choices drawn from ``env_seed``;
    not started yet."""
    host = net.add_host()
    env = Env.simulated(host, env_seed)
    node = Node(
        env,
        Identity.generate(env.random_bytes),
        host=host.address,
        udp_port=UDP_PORT,
        tcp_port=TCP_PORT,
        cert_cache=certs,
    )
    return node, host


# --- durations ---------------------------------------------------------------------------------------------


class Duration(Protocol):
    """A distribution of durations in seconds (the latency models of :mod:`p2pchat.net.sim` are ones too)."""

    def sample(self, rng: random.Random) -> float:
        """Draw one duration."""
        ...


@dataclass(frozen=True, slots=True)
class Exponential:
    """Exponentially distributed with mean ``mean``, never shorter than ``minimum`` (memoryless sessions)."""

    mean: float
    minimum: float = 0.0

    def sample(self, rng: random.Random) -> float:
        """Draw one duration."""
        return max(self.minimum, rng.expovariate(1.0 / self.mean))


# --- the garbage collector ---------------------------------------------------------------------------------


class GcSettler:
    """Python's cyclic garbage collector, run at quiet points only, and the time it takes.

    Left to itself, the collector keeps walking the objects of every simulated node (routing tables, certificates,
    tasks), and it collects almost nothing (they are freed by reference counting): measured on 3,000 nodes, 29% of
    the wall time, growing faster than the network.  So while it is entered the collector is switched off, and the
    simulation calls :meth:`settle` at quiet points (after a batch of joins, every thousand lookups): it collects
    once and then freezes the survivors (``gc.freeze``: later collections skip them).  Whatever garbage cycles there
    are get freed at the next settle (a task in flight at a freeze keeps its cycles, if any, to the end: a bounded
    leak that the peak RSS includes).  Nothing the nodes do changes, only when the runtime does its bookkeeping.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._started = 0.0
        self._was_enabled = False

    def __enter__(self) -> GcSettler:
        self._was_enabled = gc.isenabled()
        gc.disable()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()

    def _callback(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1

    def settle(self) -> None:
        """Collect the garbage cycles there are, then exempt every live object from later collections."""
        gc.collect()
        gc.freeze()


# --- joining -----------------------------------------------------------------------------------------------


def join_batches(count: int, join_batch: int) -> list[range]:
    """The nodes that join together, in order: node 0 alone, then batches of at most ``join_batch`` nodes and at
    most as many nodes as have joined before (sizes 1, 1, 2, 4, ..., up to ``join_batch``), so that no batch is a
    crowd around one lone node."""
    if join_batch < 1:
        raise ValueError("join_batch must be at least 1")
    batches = [range(min(1, count))]
    first = 1
    while first < count:
        stop = min(count, first + min(join_batch, first))
        batches.append(range(first, stop))
        first = stop
    return batches


async def join_in_batches(
    nursery: trio.Nursery,
    batches: Sequence[range],
    make_node: Callable[[int], DhtNode],
    bootstrap_peer: Callable[[int, int], int],
    after_batch: Callable[[list[DhtNode]], None] | None = None,
) -> tuple[list[DhtNode], int]:
    """Start the nodes of each batch (``make_node(i)``) in *nursery*, then bootstrap them all at once, node ``i``
    from node ``bootstrap_peer(i, batch.start)`` (an index below ``batch.start``: an earlier batch); the next batch
    starts when the whole batch has joined.  Returns the nodes in order and how many got no answer."""
    nodes: list[DhtNode] = []
    unanswered = 0

    async def bootstrap(node: DhtNode, peer: DhtNode) -> None:
        nonlocal unanswered
        if not await node.bootstrap([peer.address]):
            unanswered += 1

    for batch in batches:
        newcomers = [make_node(i) for i in batch]
        for node in newcomers:
            await nursery.start(node.run)
        if nodes:
            async with trio.open_nursery() as joins:
                for i, node in zip(batch, newcomers, strict=True):
                    joins.start_soon(bootstrap, node, nodes[bootstrap_peer(i, batch.start)])
        nodes.extend(newcomers)
        if after_batch is not None:
            after_batch(nodes)
    return nodes, unanswered


# --- churn -------------------------------------------------------------------------------------------------


class ChurnDriver:
    """Takes hosts down and up on a schedule drawn in advance: alternating online sessions and offline periods.

    Each host starts offline with probability ``offline_share`` (the steady state of the process, so a run does not
    begin with everyone fresh), then alternates ``session`` and ``offline`` draws until ``horizon``.  Going offline
    is :meth:`~p2pchat.net.sim.SimHost.set_down`: the host vanishes, its connections die silently, and it comes back
    with what it held (as a node restarting on its own database would).
    """

    def __init__(
        self,
        hosts: Sequence[SimHost],
        *,
        session: Duration,
        offline: Duration,
        offline_share: float,
        rng: random.Random,
        start: float,
        horizon: float,
    ) -> None:
        self.hosts = hosts
        self.start = start
        self.downs = 0
        self.initially_down = 0
        self._offline_seconds = 0.0
        self._down_since: dict[int, float] = {}
        self._events: list[tuple[float, int, bool]] = []  # (when, host index, goes up)
        for index in range(len(hosts)):
            t = start
            up = rng.random() >= offline_share
            if not up:
                self._events.append((t, index, False))
            while t < horizon:
                t += session.sample(rng) if up else offline.sample(rng)
                up = not up
                if t < horizon:
                    self._events.append((t, index, up))
        heapq.heapify(self._events)

    @classmethod
    def at_rate(
        cls,
        hosts: Sequence[SimHost],
        *,
        rate_per_hour: float,
        offline: Exponential,
        rng: random.Random,
        start: float,
        horizon: float,
    ) -> ChurnDriver:
        """``rate_per_hour`` of the hosts go offline per hour, for ``offline`` each: online sessions are then
        exponential with mean ``1 / rate - offline.mean`` hours, and ``offline.mean * rate`` of the hosts are
        offline at any moment."""
        cycle = 3600.0 / rate_per_hour if rate_per_hour > 0 else math.inf
        if offline.mean >= cycle:
            raise ValueError("the mean offline period must be shorter than 1 / churn rate")
        return cls(
            hosts,
            session=Exponential(cycle - offline.mean),
            offline=offline,
            offline_share=offline.mean / cycle,
            rng=rng,
            start=start,
            horizon=horizon if rate_per_hour > 0 else start,
        )

    async def run(self) -> None:
        """Apply the schedule (run in a nursery; cancel it to stop)."""
        events = self._events
        while events:
            when, index, up = heapq.heappop(events)
            await trio.sleep_until(when)
            host = self.hosts[index]
            if up:
                if not host.up:
                    host.set_up()
                    self._offline_seconds += when - self._down_since.pop(index)
            elif host.up:
                host.set_down()
                if when > self.start:
                    self.downs += 1  # those offline from the start are the steady state, not churn
                else:
                    self.initially_down += 1
                self._down_since[index] = when

    def offline_fraction(self, now: float) -> float:
        """Average fraction of the hosts offline from the start until *now*."""
        total = self._offline_seconds + sum(now - since for since in self._down_since.values())
        span = max(1e-9, (now - self.start) * len(self.hosts))
        return total / span


# --- the truly closest node --------------------------------------------------------------------------------


def xor_closest(sorted_ids: list[int], target: int) -> int:
    """The id in the non-empty, sorted ``sorted_ids`` closest to ``target`` by XOR distance.

    Walks the implicit binary trie of the sorted list from the top bit down: at each bit, keep the half that
    agrees with the target's bit if there is one.  160 bisections instead of N distance computations.
    """
    lo, hi = 0, len(sorted_ids)
    prefix = 0
    for bit in reversed(range(NODE_ID_BITS)):
        if hi - lo == 1:
            break
        one = prefix | (1 << bit)
        mid = bisect_left(sorted_ids, one, lo, hi)  # [lo, mid) has this bit clear, [mid, hi) has it set
        if (target >> bit) & 1:
            if mid < hi:
                lo, prefix = mid, one
            else:
                hi = mid
        elif mid > lo:
            hi = mid
        else:
            prefix = one
    return sorted_ids[lo]


def closest_but(sorted_ids: list[int], target: int, excluded: int) -> int:
    """:func:`xor_closest` among ``sorted_ids`` without ``excluded`` (the list is restored before returning)."""
    position = bisect_left(sorted_ids, excluded)
    if position < len(sorted_ids) and sorted_ids[position] == excluded:
        del sorted_ids[position]
        try:
            return xor_closest(sorted_ids, target)
        finally:
            sorted_ids.insert(position, excluded)
    return xor_closest(sorted_ids, target)


def closest_where(sorted_ids: list[int], target: int, accept: Callable[[int], bool]) -> int | None:
    """The id closest to ``target`` by XOR among those of ``sorted_ids`` that ``accept`` (None if none does).

    The ids sharing the target's top ``160 - b`` bits form one contiguous run of the sorted list, and every id
    outside it is farther than every id inside; so widen the run one bit at a time until it holds an accepted id.
    """
    lo = hi = 0
    for low_bits in range(NODE_ID_BITS + 1):
        base = (target >> low_bits) << low_bits
        new_lo = bisect_left(sorted_ids, base)
        new_hi = bisect_left(sorted_ids, base + (1 << low_bits))
        if (new_lo, new_hi) != (lo, hi):
            lo, hi = new_lo, new_hi
            accepted = [i for i in sorted_ids[lo:hi] if accept(i)]
            if accepted:
                return min(accepted, key=lambda i: i ^ target)
    return None
