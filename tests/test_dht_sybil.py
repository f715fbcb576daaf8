"""A lookup that ends in a cluster of ids ground next to its target runs again over disjoint paths; in an honest
network none does (SimNetwork, virtual time, seeded)."""

from __future__ import annotations

import random

import trio
import trio.testing

from p2pchat.core.ids import NodeId
from p2pchat.core.packets import NodeInfo
from p2pchat.dht.node import DhtConfig
from p2pchat.env import Env
from p2pchat.net.sim import open_sim_network
from simulations.hostile import HostileDhtNode, grind_identities

from dhtsim import LINK, start_nodes

CLUSTER = 20
PREFIX_BITS = 10
"""Bits the Sybil ids share with the key: about 200 times denser than 80 honest nodes are (20 * 2**10 tries)."""


async def test_a_lookup_captured_by_a_sybil_cluster_runs_again_over_disjoint_paths(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(5, default_link=LINK) as net, trio.open_nursery() as nursery:
        honest, _ = await start_nodes(net, nursery, 80, seed=5)
        rng = random.Random(5)
        for _ in range(60):  # an honest network: nothing is crowded
            await honest[rng.randrange(len(honest))].find_node(NodeId(rng.randbytes(20)))
        assert sum(node.sybil_suspicions for node in honest) == 0

        key = NodeId(rng.randbytes(20))
        identities, _ = grind_identities(key, CLUSTER, PREFIX_BITS, "crowd")
        cluster: list[NodeInfo] = []
        sybils = []
        for i, identity in enumerate(identities):
            host = net.add_host()
            env = Env.simulated(host, 7_000 + i)
            node = HostileDhtNode(env, identity, host=host.address, port=4000, cert_cache=honest[0].certs)
            node.configure("sybil", lie_rng=random.Random(i))
            await nursery.start(node.run)
            cluster.append(NodeInfo(identity.public.node_id.bytes, host.address, 4000))
            sybils.append(node)
        for i, node in enumerate(sybils):
            node.allies = tuple(cluster)
            await node.bootstrap([honest[i].address])
        sybil_ids = {NodeId(info.node_id) for info in cluster}
        closest_honest = min(honest, key=lambda n: n.node_id.distance(key)).node_id

        asker = max(honest, key=lambda n: n.node_id.distance(key))  # far from the key: it must be routed there
        plain = await asker.find_node(key, paths=1)
        assert plain.contacts[0].node_id in sybil_ids  # the cluster does capture a plain lookup
        found = await asker.find_node(key)
        assert asker.sybil_suspicions == 1
        assert closest_honest in {c.node_id for c in found.contacts}

        # With disjoint paths off, nothing is asked twice (the comparison the benchmarks make).
        single = honest[1]
        single.config = DhtConfig(disjoint_paths=1)
        await single.find_node(key)
        assert single.sybil_suspicions == 0
        nursery.cancel_scope.cancel()
