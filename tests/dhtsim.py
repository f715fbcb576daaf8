"""Shared by the DHT tests: start a network of DhtNodes on SimNetwork (virtual time, seeded)."""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.nodecert import CertCache
from p2pchat.core.routing import K
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.env import Env
from p2pchat.net.sim import LinkModel, SimHost, SimNetwork, Uniform

LINK = LinkModel(latency=Uniform(0.010, 0.060))
"""10-60 ms one way: a continent's worth of round trips."""

NodeFactory = Callable[..., DhtNode]


async def start_nodes(
    net: SimNetwork,
    nursery: trio.Nursery,
    count: int,
    seed: int,
    *,
    certs: CertCache | None = None,
    bootstrap_from: list[DhtNode] | None = None,
    factory: NodeFactory = DhtNode,
    config: DhtConfig | None = None,
) -> tuple[list[DhtNode], list[SimHost]]:
    """Start *count* nodes, each bootstrapped from a random node started before it (or from *bootstrap_from*)."""
    rng = random.Random(seed)
    certs = certs if certs is not None else CertCache()  # shared: verdicts do not depend on who checks
    known = list(bootstrap_from or [])
    nodes: list[DhtNode] = []
    hosts: list[SimHost] = []
    for i in range(count):
        host = net.add_host()
        env = Env.simulated(host, seed * 100_000 + i)
        node = factory(
            env, Identity.generate(env.random_bytes), host=host.address, port=4000, cert_cache=certs, config=config
        )
        await nursery.start(node.run)
        if known:
            await node.bootstrap([known[rng.randrange(len(known))].address])
        known.append(node)
        nodes.append(node)
        hosts.append(host)
    return nodes, hosts


def true_closest(nodes: list[DhtNode], target: NodeId, count: int = K) -> list[NodeId]:
    """The ids of the *count* nodes closest to *target* among *nodes*."""
    return sorted((n.node_id for n in nodes), key=lambda i: i.distance(target))[:count]
