"""The DHT node on SimNetwork (virtual time, seeded): bootstrap, lookups that find the true closest nodes,
lookups that survive dead and lying nodes, and garbage that never kills a node."""

from __future__ import annotations

import random

import trio
import trio.testing

from p2pchat.core.ids import NodeId
from p2pchat.core.lookup import DISJOINT_PATHS
from p2pchat.core.routing import K
from p2pchat.net.sim import open_sim_network

from dhtsim import LINK, start_nodes, true_closest


async def test_two_hundred_nodes_find_the_true_closest(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(1, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 200, seed=1)
        rng = random.Random(7)
        hops = []
        for _ in range(100):
            asker = nodes[rng.randrange(len(nodes))]
            target = NodeId(rng.randbytes(20))
            expected = [i for i in true_closest(nodes, target, K + 1) if i != asker.node_id][:K]
            plain = await asker.find_node(target, paths=1)
            assert [c.node_id for c in plain.contacts] == expected
            # Disjoint paths return every path's k closest: the true k closest come first.
            result = await asker.find_node(target)
            assert [c.node_id for c in result.contacts][:K] == expected
            assert len(result.contacts) <= DISJOINT_PATHS * K
            hops.append(result.hops)
        hops.sort()
        assert hops[len(hops) // 2] <= 3
        for node in nodes:
            assert len(node.routing) >= K
        nursery.cancel_scope.cancel()


async def test_lookups_succeed_with_a_fifth_of_the_nodes_dead(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(2, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, hosts = await start_nodes(net, nursery, 200, seed=2)
        rng = random.Random(8)
        dead = set(rng.sample(range(len(nodes)), 40))
        for index in dead:
            hosts[index].set_down()
        alive = [n for i, n in enumerate(nodes) if i not in dead]
        # Right after the crash every routing table still lists the dead; bucket refreshes find them out.
        await trio.sleep(2 * 3600)
        for _ in range(50):
            asker = alive[rng.randrange(len(alive))]
            target = NodeId(rng.randbytes(20))
            result = await asker.find_node(target)
            expected = [i for i in true_closest(alive, target, K + 1) if i != asker.node_id][:K]
            found = [c.node_id for c in result.contacts]
            # The closest live node is always found; of the k closest live ones, nearly all.
            assert found[0] == expected[0]
            assert len(set(found) & set(expected)) >= K - 2
        nursery.cancel_scope.cancel()


async def test_garbage_datagrams_never_kill_a_node(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(3, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 30, seed=3)
        attacker = net.add_host()
        junk_endpoint = await attacker.open_datagram(attacker.address, 9999)
        rng = random.Random(9)
        victim = nodes[0]
        for _ in range(5000):
            size = rng.randrange(0, 1400)
            junk = bytes([rng.choice([0x50, 0x00, 0x01, rng.randrange(256)])]) + rng.randbytes(size)
            junk_endpoint.send(junk, victim.address)
        await trio.sleep(1)
        stats = victim.transport.stats
        dropped = (
            stats.dropped_malformed + stats.dropped_unsolicited + stats.dropped_by_handler + stats.dropped_rate_limited
        )
        assert dropped >= 4900
        # Still serving and still finding nodes.
        result = await nodes[5].find_node(victim.node_id)
        assert result.contacts[0].node_id == victim.node_id
        result = await victim.find_node(nodes[5].node_id)
        assert result.contacts[0].node_id == nodes[5].node_id
        nursery.cancel_scope.cancel()
