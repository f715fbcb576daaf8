"""The ``--sim`` workload of :mod:`simulations.bench_dht`: many DhtNodes on a SimNetwork, in virtual time.

N nodes join one after another (node ``i`` bootstraps from a random earlier node, as on real UDP), then M
``find_node`` lookups run one after another, each for a random 160-bit target from a random node.  A lookup
succeeds when the first contact it returns is the node whose id is truly closest to the target (the asker
excluded: a lookup never returns its own node).  Nobody leaves, so every node is live.

Network model: every link has a one-way latency drawn uniformly from [10, 60] ms per datagram (RTTs 20-120 ms,
as between hosts on one continent), no loss, no duplication; the SimNetwork rounds arrival times up to 1 ms.
All nodes share one :class:`~p2pchat.core.nodecert.CertCache`, a shortcut the simulation names on stderr.
"""

from __future__ import annotations

import time
from bisect import bisect_left

import trio
import trio.testing

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NODE_ID_BITS, NODE_ID_BYTES, NodeId
from p2pchat.core.nodecert import CertCache
from p2pchat.dht.node import DhtNode
from p2pchat.env import Env
from p2pchat.net.sim import LinkModel, SimNetwork, Uniform, open_sim_network
from simulations._dht_workload import Figures, Progress, Workload, info, percentile

__all__ = ["LINK", "simulate", "xor_closest"]

LINK = LinkModel(latency=Uniform(0.010, 0.060))
"""Every link of the simulated network: 10-60 ms one way, uniform; no loss."""

_SYSTEM = "p2pchat-sim"
_PORT = 4000


def simulate(workload: Workload, *, join_batch: int = 1) -> Figures:
    """Run the simulation on a MockClock and return its figures (without rss_mb)."""
    if join_batch < 1:
        raise ValueError("join_batch must be at least 1")
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(_simulate, workload, join_batch, clock=clock)


async def _simulate(workload: Workload, join_batch: int) -> Figures:
    wall_started = time.perf_counter()
    cpu_started = time.process_time()
    info(
        _SYSTEM,
        "SimNetwork on virtual time: one-way latency uniform in [10, 60] ms on every link, no loss; "
        "one CertCache shared by all simulated nodes",
    )
    if join_batch > 1:
        info(_SYSTEM, f"nodes join {join_batch} at a time, each from a random node that joined before its batch")
    async with open_sim_network(workload.seed, default_link=LINK) as net, trio.open_nursery() as nursery:
        certs = CertCache()
        nodes = await _join(net, nursery, workload, certs, join_batch)
        joined_wall = time.perf_counter() - wall_started
        joined_cpu = time.process_time() - cpu_started
        joined_virtual = trio.current_time()
        sent_at_join = net.stats.sent
        info(
            _SYSTEM,
            f"bootstrap of {len(nodes):,} nodes: {joined_wall:.1f}s wall ({joined_cpu:.1f}s CPU), "
            f"{joined_virtual:,.0f}s virtual, "
            f"{sent_at_join:,} datagrams, {certs.verifications:,} certificate signature checks",
        )

        sorted_ids = sorted(node.node_id.int for node in nodes)
        hops: list[int] = []
        times_ms: list[float] = []
        rpcs = 0
        success = 0
        operations = workload.operations()
        lookups_started = time.perf_counter()
        lookups_cpu_started = time.process_time()
        progress = Progress(_SYSTEM, "lookups", len(operations))
        for n, op in enumerate(operations, start=1):
            asker = nodes[op.put_node]
            target = NodeId(op.key[:NODE_ID_BYTES])
            started = trio.current_time()
            result = await asker.find_node(target)
            times_ms.append((trio.current_time() - started) * 1000.0)
            hops.append(result.hops)
            rpcs += result.rpcs
            expected = _closest_but(sorted_ids, target.int, asker.node_id.int)
            success += bool(result.contacts) and result.contacts[0].node_id.int == expected
            progress.tick(n, f", {success:,} found the closest node")
        lookups_wall = time.perf_counter() - lookups_started
        lookups_cpu = time.process_time() - lookups_cpu_started
        info(
            _SYSTEM,
            f"{len(operations):,} lookups: {lookups_wall:.1f}s wall ({lookups_cpu:.1f}s CPU), "
            f"{trio.current_time() - joined_virtual:,.0f}s virtual, {net.stats.sent - sent_at_join:,} datagrams "
            f"(maintenance and liveness pings included)",
        )
        _report_network(net)
        nursery.cancel_scope.cancel()

    hops.sort()
    times_ms.sort()
    return {
        "success": success,
        "ops": len(operations),
        "median_hops": percentile(hops, 0.5),
        "p95_hops": percentile(hops, 0.95),
        "rpcs_per_lookup": round(rpcs / len(operations), 2) if operations else 0.0,
        "median_ms": round(percentile(times_ms, 0.5), 3),
        "p99_ms": round(percentile(times_ms, 0.99), 3),
        "wall_s": round(time.perf_counter() - wall_started, 1),
    }


async def _join(
    net: SimNetwork, nursery: trio.Nursery, workload: Workload, certs: CertCache, join_batch: int
) -> list[DhtNode]:
    peers = workload.bootstrap_peers()
    nodes: list[DhtNode] = []
    progress = Progress(_SYSTEM, "joined", workload.nodes)
    virtual_started = trio.current_time()
    first = 0
    while first < workload.nodes:
        batch = range(first, min(workload.nodes, first + (1 if first == 0 else join_batch)))
        newcomers: list[DhtNode] = []
        for i in batch:
            host = net.add_host()
            env = Env.simulated(host, (workload.seed << 32) | i)
            node = DhtNode(env, Identity.generate(env.random_bytes), host=host.address, port=_PORT, cert_cache=certs)
            await nursery.start(node.run)
            newcomers.append(node)
        if nodes:
            async with trio.open_nursery() as joins:
                for i, node in zip(batch, newcomers, strict=True):
                    # The peer drawn for node i is any earlier node; in a batch it must have joined already.
                    peer = peers[i - 1] % first
                    joins.start_soon(node.bootstrap, [nodes[peer].address])
        nodes.extend(newcomers)
        first = batch.stop
        progress.tick(
            len(nodes), f", {trio.current_time() - virtual_started:,.0f}s virtual, {net.stats.sent:,} datagrams"
        )
    return nodes


def _report_network(net: SimNetwork) -> None:
    stats = net.stats
    dropped = stats.dropped_overflow + stats.dropped_unreachable + stats.dropped_down + stats.dropped_partition
    info(_SYSTEM, f"network: {stats.sent:,} datagrams sent, {stats.delivered:,} delivered, {dropped:,} dropped")


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


def _closest_but(sorted_ids: list[int], target: int, excluded: int) -> int:
    position = bisect_left(sorted_ids, excluded)
    if position < len(sorted_ids) and sorted_ids[position] == excluded:
        del sorted_ids[position]
        try:
            return xor_closest(sorted_ids, target)
        finally:
            sorted_ids.insert(position, excluded)
    return xor_closest(sorted_ids, target)
