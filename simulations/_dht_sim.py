"""The ``--sim`` workload of :mod:`simulations.bench_dht`: many DhtNodes on a SimNetwork, in virtual time.

N nodes join in concurrent batches (see :meth:`~simulations._dht_workload.Workload.join_batches`: node 0 alone,
then batches growing 1, 2, 4, ... up to ``join_batch`` nodes, never larger than the network they join), each node
of a batch bootstrapping from a random node of an earlier batch; the next batch starts when the whole batch has
joined.  Then M ``find_node`` lookups, each for a random 160-bit target from a random node, with
``lookup_concurrency`` of them in flight at once (a lookup starts as soon as one ends).  Each lookup's latency is
measured on its own, in virtual milliseconds from its start to its end, and its hops and RPCs are its own.  A lookup
succeeds when the first contact it returns is the node whose id is truly closest to the target (the asker excluded:
a lookup never returns its own node).  Nobody leaves, so every node is live.

Why batches and concurrency: virtual time passes only through the workload's own round trips, and every node keeps
its periodic maintenance meanwhile -- each bucket untouched for ``BUCKET_REFRESH_INTERVAL`` (15 min) is refreshed by a
lookup.  One join at a time (~0.45 s virtual each) and one lookup at a time (~260 ms each) stretch 10,000 of each to
~4,500 s + ~2,600 s of virtual time, in which every idle node refreshes its buckets several times: most of the traffic,
and of the wall time, was then maintenance of an idle network, not the workload.  Joining 100 at a time and keeping
100 lookups in flight keeps the simulated span to a minute or two, short of the first refresh; the figures are per
lookup either way.

Network model: every link has a one-way latency drawn uniformly from [10, 60] ms per datagram (RTTs 20-120 ms,
as between hosts on one continent), no loss, no duplication, no bandwidth limit (lookups in flight together do not
slow each other); the SimNetwork rounds arrival times up to 1 ms.  All nodes share one
:class:`~p2pchat.core.nodecert.CertCache`, a shortcut the simulation names on stderr.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import trio
import trio.testing

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NODE_ID_BYTES, NodeId
from p2pchat.core.nodecert import CertCache
from p2pchat.dht.node import DhtNode
from p2pchat.env import Env
from p2pchat.net.sim import LinkModel, SimNetwork, Uniform, open_sim_network
from simulations._dht_workload import (
    SIM_JOIN_BATCH,
    SIM_LOOKUP_CONCURRENCY,
    Figures,
    Operation,
    Progress,
    Workload,
    info,
    percentile,
)
from simulations._simkit import GcSettler, closest_but, join_in_batches

__all__ = ["LINK", "simulate"]

LINK = LinkModel(latency=Uniform(0.010, 0.060))
"""Every link of the simulated network: 10-60 ms one way, uniform; no loss."""

_SYSTEM = "p2pchat-sim"
_PORT = 4000
_SETTLE_EVERY = 1000
"""Lookups between two :meth:`GcSettler.settle` calls (the joins settle after each batch)."""


def simulate(
    workload: Workload, *, join_batch: int = SIM_JOIN_BATCH, lookup_concurrency: int = SIM_LOOKUP_CONCURRENCY
) -> Figures:
    """Run the simulation on a MockClock and return its figures (without rss_mb)."""
    if join_batch < 1 or lookup_concurrency < 1:
        raise ValueError("join_batch and lookup_concurrency must be at least 1")
    clock = trio.testing.MockClock(autojump_threshold=0)
    with GcSettler() as collector:
        return trio.run(_simulate, workload, join_batch, lookup_concurrency, collector, clock=clock)


async def _simulate(workload: Workload, join_batch: int, lookup_concurrency: int, collector: GcSettler) -> Figures:
    wall_started = time.perf_counter()
    cpu_started = time.process_time()
    info(
        _SYSTEM,
        "SimNetwork on virtual time: one-way latency uniform in [10, 60] ms on every link, no loss; "
        "one CertCache shared by all simulated nodes",
    )
    info(
        _SYSTEM,
        f"join batch {join_batch} (batches grow 1, 2, 4, ... up to it; each node bootstraps from a random node of "
        f"an earlier batch); lookup concurrency {lookup_concurrency} (lookups in flight at once, random askers)",
    )
    async with open_sim_network(workload.seed, default_link=LINK) as net, trio.open_nursery() as nursery:
        certs = CertCache()
        nodes = await _join(net, nursery, workload, certs, join_batch, collector)
        joined_wall = time.perf_counter() - wall_started
        joined_cpu = time.process_time() - cpu_started
        joined_virtual = trio.current_time()
        sent_at_join = net.stats.sent
        info(
            _SYSTEM,
            f"bootstrap of {len(nodes):,} nodes (join batch {join_batch}): {joined_wall:.1f}s wall "
            f"({joined_cpu:.1f}s CPU), {joined_virtual:,.1f}s virtual, {sent_at_join:,} datagrams, "
            f"{certs.verifications:,} certificate signature checks, {collector.seconds:.1f}s wall in "
            f"{collector.collections:,} garbage collections",
        )
        gc_at_join = collector.seconds

        operations = workload.operations()
        lookups = _Lookups(nodes, len(operations), collector)
        lookups_started = time.perf_counter()
        lookups_cpu_started = time.process_time()
        pending = iter(operations)  # shared by the workers: each operation is taken by exactly one
        async with trio.open_nursery() as workers:
            for _ in range(min(lookup_concurrency, len(operations))):
                workers.start_soon(lookups.work, pending)
        lookups_wall = time.perf_counter() - lookups_started
        lookups_cpu = time.process_time() - lookups_cpu_started
        lookups_sent = net.stats.sent - sent_at_join
        info(
            _SYSTEM,
            f"{len(operations):,} lookups (concurrency {lookup_concurrency}): {lookups_wall:.1f}s wall "
            f"({lookups_cpu:.1f}s CPU), {trio.current_time() - joined_virtual:,.1f}s virtual, {lookups_sent:,} "
            f"datagrams, of which {2 * lookups.rpcs:,} the lookups' own requests and replies "
            f"(the rest: maintenance and liveness pings), {collector.seconds - gc_at_join:.1f}s wall in garbage "
            f"collections",
        )
        _report_network(net)
        nursery.cancel_scope.cancel()

    hops = sorted(lookups.hops)
    times_ms = sorted(lookups.times_ms)
    return {
        "success": lookups.success,
        "ops": len(operations),
        "median_hops": percentile(hops, 0.5),
        "p95_hops": percentile(hops, 0.95),
        "rpcs_per_lookup": round(lookups.rpcs / len(operations), 2) if operations else 0.0,
        "median_ms": round(percentile(times_ms, 0.5), 3),
        "p99_ms": round(percentile(times_ms, 0.99), 3),
        "wall_s": round(time.perf_counter() - wall_started, 1),
    }


class _Lookups:
    """The lookup phase's figures, kept per lookup by the workers that run them."""

    def __init__(self, nodes: list[DhtNode], total: int, collector: GcSettler) -> None:
        self.nodes = nodes
        self.collector = collector
        self.sorted_ids = sorted(node.node_id.int for node in nodes)
        self.hops: list[int] = []
        self.times_ms: list[float] = []
        self.rpcs = 0
        self.success = 0
        self.progress = Progress(_SYSTEM, "lookups", total)

    async def work(self, pending: Iterator[Operation]) -> None:
        """Run the next pending lookup until none is left (one worker: one lookup in flight)."""
        for op in pending:
            asker = self.nodes[op.put_node]
            target = NodeId(op.key[:NODE_ID_BYTES])
            started = trio.current_time()
            result = await asker.find_node(target)
            self.times_ms.append((trio.current_time() - started) * 1000.0)
            self.hops.append(result.hops)
            self.rpcs += result.rpcs
            expected = closest_but(self.sorted_ids, target.int, asker.node_id.int)
            self.success += bool(result.contacts) and result.contacts[0].node_id.int == expected
            self.progress.tick(len(self.hops), f", {self.success:,} found the closest node")
            if len(self.hops) % _SETTLE_EVERY == 0:
                self.collector.settle()


async def _join(
    net: SimNetwork,
    nursery: trio.Nursery,
    workload: Workload,
    certs: CertCache,
    join_batch: int,
    collector: GcSettler,
) -> list[DhtNode]:
    peers = workload.bootstrap_peers(join_batch)
    progress = Progress(_SYSTEM, "joined", workload.nodes)
    virtual_started = trio.current_time()

    def make_node(i: int) -> DhtNode:
        host = net.add_host()
        env = Env.simulated(host, (workload.seed << 32) | i)
        return DhtNode(env, Identity.generate(env.random_bytes), host=host.address, port=_PORT, cert_cache=certs)

    def after_batch(nodes: list[DhtNode]) -> None:
        collector.settle()
        progress.tick(
            len(nodes), f", {trio.current_time() - virtual_started:,.1f}s virtual, {net.stats.sent:,} datagrams"
        )

    nodes, alone = await join_in_batches(
        nursery, workload.join_batches(join_batch), make_node, lambda i, _: peers[i - 1], after_batch
    )
    if alone:
        info(_SYSTEM, f"{alone:,} nodes got no answer from their bootstrap node")
    return nodes


def _report_network(net: SimNetwork) -> None:
    stats = net.stats
    dropped = stats.dropped_overflow + stats.dropped_unreachable + stats.dropped_down + stats.dropped_partition
    info(_SYSTEM, f"network: {stats.sent:,} datagrams sent, {stats.delivered:,} delivered, {dropped:,} dropped")
