"""The offline half of :mod:`simulations.bench_messaging`: do messages to an absent recipient get through churn?

A SimNetwork on virtual time (trio ``MockClock``, autojump) with ``nodes`` hosts:

* ``nodes - 2 * pairs`` plain :class:`~p2pchat.dht.node.DhtNode` -- the DHT that holds the mailboxes -- joining
  in growing batches (1, 1, 2, 4, ... up to ``join_batch`` at once), each from a random node of an earlier batch;
* ``pairs`` messaging pairs of :class:`~p2pchat.node.Node` (in-memory SQLite), each Node also a DHT node.

Every link has a one-way latency uniform in 10-60 ms, no loss (the SimNetwork rounds arrivals up to 1 ms).  All
nodes share one :class:`~p2pchat.core.nodecert.CertCache` (each certificate signature is checked once per run
instead of once per node: a shortcut for wall time, not a change in what is accepted).

**Churn.**  Every plain DHT node alternates online sessions and offline periods, both exponentially distributed:
offline for ``offline_mean`` seconds on average (at least :data:`MIN_OFFLINE`), online for ``1 / churn -
offline_mean`` on average, so that ``churn`` (30%) of the nodes go offline per hour and ``offline_mean / (1 /
churn)`` of them are offline at any moment (15% with the defaults: 30 min offline, 2 h 50 min online).  The
process starts in its steady state (each node offline at the start with that probability).  Going offline is
:meth:`~p2pchat.net.sim.SimHost.set_down`: the host vanishes from the network, its connections die silently,
and it comes back with what it held (as a node restarting on its own ``dht.sqlite`` would).  The pairs' Nodes do
not churn: senders stay online, and each recipient is offline exactly once, as below.

**Messages.**  After a warm-up message per pair (sent and delivered with both online, so that the pair has a
session, as contacts who talked before do; not counted), each recipient goes offline at a random moment of the
first hour, for a duration uniform in [:data:`MIN_RECIPIENT_OFFLINE`, ``hours``].  While it is away its sender
sends ``messages_per_pair`` messages at uniformly random moments.  After the recipient comes back the simulation
runs until every message has arrived or ``settle`` seconds after the last recipient came back.

**Figure.**  ``ratio`` = messages received by their recipient exactly once (one ``IncomingMessage`` with the
right text and sender) / messages sent.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import trio
import trio.testing

from p2pchat.core.identity import Identity
from p2pchat.core.nodecert import CertCache
from p2pchat.dht.node import DhtNode
from p2pchat.env import Env
from p2pchat.messaging.db import MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.net.sim import DEFAULT_TIME_RESOLUTION, LinkModel, SimHost, SimNetwork, Uniform, open_sim_network
from p2pchat.node import Node
from simulations._messaging_loopback import info, message_text
from simulations._simkit import (
    UDP_PORT,
    ChurnDriver,
    Exponential,
    join_batches,
    join_in_batches,
    make_full_node,
)

__all__ = [
    "LINK",
    "MIN_OFFLINE",
    "MIN_RECIPIENT_OFFLINE",
    "OfflineConfig",
    "OfflineResult",
    "simulate_offline",
]

LINK = LinkModel(latency=Uniform(0.010, 0.060))
"""Every link: 10-60 ms one way, uniform; no loss."""

HOUR = 3600.0

MIN_OFFLINE = 60.0
"""Shortest offline period of a churning DHT node, seconds."""

MIN_RECIPIENT_OFFLINE = 600.0
"""Shortest time a recipient is away, seconds (ten minutes)."""

WARM_UP_TIMEOUT = 2 * HOUR
"""Virtual seconds the warm-up messages may take to be delivered."""


@dataclass(frozen=True, slots=True)
class OfflineConfig:
    """What to simulate; see the module docstring."""

    nodes: int = 2000
    pairs: int = 100
    hours: float = 24.0
    """Longest time a recipient is offline, hours."""
    churn: float = 0.30
    """Fraction of the plain DHT nodes going offline per hour."""
    offline_mean: float = 1800.0
    """Mean offline period of a churning DHT node, seconds."""
    messages_per_pair: int = 20
    settle: float = 2 * HOUR
    """Virtual seconds after the last recipient's return before the count is taken (earlier if all arrived)."""
    join_batch: int = 64
    time_resolution: float = DEFAULT_TIME_RESOLUTION
    """Arrival times are rounded up to a multiple of this (seconds); see :class:`~p2pchat.net.sim.SimNetwork`."""
    seed: int = 1

    def __post_init__(self) -> None:
        if self.pairs < 1 or self.messages_per_pair < 1:
            raise ValueError("need at least one pair and one message per pair")
        if self.nodes - 2 * self.pairs < 20:
            raise ValueError(f"{self.nodes} nodes leave fewer than 20 plain DHT nodes beside {self.pairs} pairs")
        if self.hours * HOUR < MIN_RECIPIENT_OFFLINE:
            raise ValueError(f"hours must be at least {MIN_RECIPIENT_OFFLINE / HOUR:g}")
        if self.churn < 0 or (self.churn > 0 and self.offline_mean >= HOUR / self.churn):
            raise ValueError("churn must be >= 0, and the mean offline period shorter than 1 / churn")

    @property
    def dht_nodes(self) -> int:
        """Plain DHT nodes (the rest are the pairs' Nodes)."""
        return self.nodes - 2 * self.pairs


@dataclass(slots=True)
class OfflineResult:
    """The figure and what stands behind it."""

    sent: int = 0
    delivered: int = 0
    duplicated: int = 0
    wall_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds per phase."""

    @property
    def ratio(self) -> float:
        """Messages received exactly once / messages sent."""
        return self.delivered / self.sent if self.sent else 0.0


@dataclass(slots=True)
class _Pair:
    sender: Node
    recipient: Node
    recipient_host: SimHost
    away_from: float = 0.0
    away_until: float = 0.0
    send_times: list[float] = field(default_factory=list)
    sent: dict[bytes, str] = field(default_factory=dict)
    received: Counter[bytes] = field(default_factory=Counter)
    wrong: int = 0
    arrival_delay: list[float] = field(default_factory=list)
    """Virtual seconds from the recipient's return to each message's arrival."""
    acked: set[bytes] = field(default_factory=set)
    stored_replicas: list[int] = field(default_factory=list)


def simulate_offline(config: OfflineConfig) -> OfflineResult:
    """Run the simulation on a MockClock; its trace follows from ``config.seed``."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(_simulate, config, clock=clock)


async def _simulate(config: OfflineConfig) -> OfflineResult:
    result = OfflineResult()
    wall_started = time.perf_counter()
    rng = random.Random(config.seed)
    on_mean = HOUR / config.churn - config.offline_mean if config.churn else math.inf
    info(
        f"offline: {config.nodes:,} nodes = {config.dht_nodes:,} DhtNodes + {config.pairs} pairs of Nodes; "
        f"SimNetwork, one-way latency 10-60 ms, no loss; one CertCache shared by all nodes; seed {config.seed}"
    )
    info(
        f"offline: churn {config.churn:.0%} of the DhtNodes per hour: offline periods exp(mean "
        f"{config.offline_mean / 60:.0f} min, min {MIN_OFFLINE:.0f} s), online sessions exp(mean "
        f"{on_mean / 60:.0f} min); recipients away {MIN_RECIPIENT_OFFLINE / 60:.0f} min to {config.hours:g} h, "
        f"{config.messages_per_pair} messages each while away"
    )
    async with (
        open_sim_network(config.seed, default_link=LINK, time_resolution=config.time_resolution) as net,
        trio.open_nursery() as nursery,
    ):
        certs = CertCache()
        phase = time.perf_counter()
        dht, dht_hosts = await _join_dht(net, nursery, config, certs, rng)
        pairs = await _start_pairs(net, nursery, config, certs, rng, dht)
        result.phases["join"] = time.perf_counter() - phase
        info(
            f"offline: {config.nodes:,} nodes joined: {result.phases['join']:.1f}s wall, "
            f"{trio.current_time() / 60:.1f} min virtual, {net.stats.sent:,} datagrams"
        )

        phase = time.perf_counter()
        await _warm_up(pairs)
        result.phases["warm-up"] = time.perf_counter() - phase

        start = trio.current_time()
        _plan(pairs, config, rng, start)
        horizon = max(p.away_until for p in pairs) + config.settle
        churn = ChurnDriver.at_rate(
            dht_hosts,
            rate_per_hour=config.churn,
            offline=Exponential(config.offline_mean, MIN_OFFLINE),
            rng=random.Random(rng.getrandbits(64)),
            start=start,
            horizon=horizon,
        )
        churn_scope = trio.CancelScope()

        async def run_churn() -> None:
            with churn_scope:
                await churn.run()

        nursery.start_soon(run_churn)
        all_arrived = trio.Event()
        expected = config.pairs * config.messages_per_pair
        arrived = _Counter(expected, all_arrived)
        phase = time.perf_counter()
        async with trio.open_nursery() as work:
            for pair in pairs:
                work.start_soon(_recipient_reads, pair, arrived)
                work.start_soon(_sender_reads, pair)
                work.start_soon(_run_pair, pair)
            work.start_soon(_progress, net, pairs, arrived, dht_hosts, start, horizon)
            with trio.move_on_at(horizon):
                await all_arrived.wait()
            end = trio.current_time()
            work.cancel_scope.cancel()
        churn_scope.cancel()
        result.phases["offline and settling"] = time.perf_counter() - phase
        info(
            f"offline: ran {(end - start) / HOUR:.1f} h virtual after the warm-up "
            f"({'every message arrived' if arrived.count >= expected else 'settling time over'}), "
            f"{result.phases['offline and settling']:.1f}s wall; churn: {churn.initially_down:,} DhtNodes offline at "
            f"the start, {churn.downs:,} went offline later "
            f"({churn.downs / max(1e-9, config.dht_nodes * (end - start) / HOUR):.2f} per node-hour), "
            f"{churn.offline_fraction(end):.1%} offline on average"
        )
        _report(pairs, net, result)
        nursery.cancel_scope.cancel()
    result.wall_s = time.perf_counter() - wall_started
    return result


async def _join_dht(
    net: SimNetwork, nursery: trio.Nursery, config: OfflineConfig, certs: CertCache, rng: random.Random
) -> tuple[list[DhtNode], list[SimHost]]:
    hosts: list[SimHost] = []

    def make_node(i: int) -> DhtNode:
        host = net.add_host()
        hosts.append(host)
        env = Env.simulated(host, (config.seed << 32) | i)
        return DhtNode(env, Identity.generate(env.random_bytes), host=host.address, port=UDP_PORT, cert_cache=certs)

    batches = join_batches(config.dht_nodes, config.join_batch)
    nodes, _ = await join_in_batches(nursery, batches, make_node, lambda _, first: rng.randrange(first))
    return nodes, hosts


async def _start_pairs(
    net: SimNetwork,
    nursery: trio.Nursery,
    config: OfflineConfig,
    certs: CertCache,
    rng: random.Random,
    dht: list[DhtNode],
) -> list[_Pair]:
    users: list[tuple[Node, SimHost]] = []
    for i in range(2 * config.pairs):
        node, host = make_full_node(net, (config.seed << 32) | (config.dht_nodes + i), certs)
        await nursery.start(node.run)
        users.append((node, host))
    async with trio.open_nursery() as joins:
        for node, _ in users:
            joins.start_soon(node.bootstrap, [dht[rng.randrange(len(dht))].address])
    pairs = []
    for i in range(config.pairs):
        (sender, _), (recipient, recipient_host) = users[2 * i], users[2 * i + 1]
        sender.add_contact(f"peer{i}", recipient.address)
        recipient.add_contact(f"peer{i}", sender.address)
        pairs.append(_Pair(sender, recipient, recipient_host))
    return pairs


async def _warm_up(pairs: list[_Pair]) -> None:
    started = trio.current_time()
    ids = {pair.sender.send(pair.recipient.key, "warm-up").id: pair for pair in pairs}
    waiting = set(ids)

    async def delivered(pair: _Pair) -> None:
        async for event in pair.sender.events:
            if isinstance(event, DeliveryUpdate) and event.state is MessageState.DELIVERED:
                waiting.discard(event.message_id)
                return

    async def received(pair: _Pair) -> None:
        async for event in pair.recipient.events:
            if isinstance(event, IncomingMessage):
                return

    with trio.move_on_after(WARM_UP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for pair in pairs:
                nursery.start_soon(delivered, pair)
                nursery.start_soon(received, pair)
    direct = sum(p.sender.messenger.stats.sent_direct > 0 for p in pairs)
    info(
        f"offline: warm-up: {len(pairs) - len(waiting)}/{len(pairs)} pairs delivered and acknowledged in "
        f"{trio.current_time() - started:.0f}s virtual ({direct} direct)"
    )


def _plan(pairs: list[_Pair], config: OfflineConfig, rng: random.Random, start: float) -> None:
    for pair in pairs:
        pair.away_from = start + rng.uniform(0.0, HOUR)
        pair.away_until = pair.away_from + rng.uniform(MIN_RECIPIENT_OFFLINE, config.hours * HOUR)
        pair.send_times = sorted(rng.uniform(pair.away_from, pair.away_until) for _ in range(config.messages_per_pair))


async def _run_pair(pair: _Pair) -> None:
    await trio.sleep_until(pair.away_from)
    pair.recipient_host.set_down()
    for n, when in enumerate(pair.send_times):
        await trio.sleep_until(when)
        text = message_text(n)
        pair.sent[pair.sender.send(pair.recipient.key, text).id] = text
    await trio.sleep_until(pair.away_until)
    pair.recipient_host.set_up()
    await trio.sleep_forever()


async def _progress(
    net: SimNetwork, pairs: list[_Pair], arrived: _Counter, hosts: list[SimHost], start: float, horizon: float
) -> None:
    """A line on stderr per virtual hour: where the run is, and what it costs."""
    wall = time.perf_counter()
    cpu = time.process_time()
    datagrams = net.stats.sent
    hour = 0
    while start + (hour + 1) * HOUR < horizon:
        hour += 1
        await trio.sleep_until(start + hour * HOUR)
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        away = sum(not p.recipient_host.up for p in pairs)
        info(
            f"offline: hour {hour}: {sum(len(p.sent) for p in pairs):,} sent, {arrived.count:,} arrived, "
            f"{away} recipients away, {sum(not h.up for h in hosts):,} DhtNodes offline; this hour "
            f"{net.stats.sent - datagrams:,} datagrams, {now_wall - wall:.1f}s wall ({now_cpu - cpu:.1f}s CPU)"
        )
        wall, cpu, datagrams = now_wall, now_cpu, net.stats.sent


class _Counter:
    def __init__(self, expected: int, done: trio.Event) -> None:
        self.expected = expected
        self.count = 0
        self.done = done

    def add(self) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.done.set()


async def _recipient_reads(pair: _Pair, arrived: _Counter) -> None:
    async for event in pair.recipient.events:
        if not isinstance(event, IncomingMessage):
            continue
        message = event.message
        if message.peer != pair.sender.key or pair.sent.get(message.id) != message.text:
            pair.wrong += 1
            continue
        pair.received[message.id] += 1
        if pair.received[message.id] == 1:
            pair.arrival_delay.append(trio.current_time() - pair.away_until)
            arrived.add()


async def _sender_reads(pair: _Pair) -> None:
    async for event in pair.sender.events:
        if not isinstance(event, DeliveryUpdate):
            continue
        if event.state is MessageState.DELIVERED:
            pair.acked.add(event.message_id)
        elif event.state is MessageState.STORED:
            pair.stored_replicas.append(event.replicas)


def _report(pairs: list[_Pair], net: SimNetwork, result: OfflineResult) -> None:
    sent = sum(len(p.sent) for p in pairs)
    once = sum(1 for p in pairs for message_id in p.sent if p.received[message_id] == 1)
    duplicated = sum(1 for p in pairs for message_id in p.sent if p.received[message_id] > 1)
    wrong = sum(p.wrong for p in pairs)
    acked = sum(len(p.acked & set(p.sent)) for p in pairs)
    result.sent, result.delivered, result.duplicated = sent, once, duplicated
    delays = sorted(d for p in pairs for d in p.arrival_delay)
    replicas = [r for p in pairs for r in p.stored_replicas]
    missing = [p for p in pairs if any(p.received[m] != 1 for m in p.sent)]
    # Cross-check against the recipients' databases (an event could only be lost if nobody read them).
    in_history = sum(
        len(set(p.sent) & {m.id for m in p.recipient.history(p.sender.key) if not m.outgoing}) for p in pairs
    )
    info(
        f"offline: {once:,}/{sent:,} messages received exactly once ({duplicated} more than once, {wrong} wrong or "
        f"unexpected; {in_history:,} in the recipients' histories); {acked:,} acknowledged back to their senders"
    )
    if delays:
        info(
            f"offline: arrival after the recipient's return: median {statistics.median(delays):.0f}s, "
            f"max {delays[-1]:.0f}s virtual"
        )
    if replicas:
        info(
            f"offline: stored in mailboxes with {min(replicas)}-{max(replicas)} replicas confirmed "
            f"(median {statistics.median(replicas):.0f})"
        )
    for p in missing[:5]:
        lost = sum(1 for m in p.sent if p.received[m] == 0)
        info(
            f"offline: pair missing {lost}/{len(p.sent)}: away {(p.away_until - p.away_from) / HOUR:.1f} h; "
            f"sender stats {p.sender.messenger.stats}; recipient stats {p.recipient.messenger.stats}"
        )
    stats = net.stats
    dropped = stats.dropped_overflow + stats.dropped_unreachable + stats.dropped_down + stats.dropped_partition
    info(f"offline: network: {stats.sent:,} datagrams sent, {stats.delivered:,} delivered, {dropped:,} dropped")
