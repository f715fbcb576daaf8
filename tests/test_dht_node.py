"""The DHT node on SimNetwork (virtual time, seeded): bootstrap, lookups that find the true closest nodes,
lookups that survive dead and lying nodes, and garbage that never kills a node."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import pytest
import trio
import trio.testing

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId, node_id_for_key
from p2pchat.core.lookup import DISJOINT_PATHS, FINAL_ROUND_SPARES, Lookup
from p2pchat.core.nodecert import CertCache
from p2pchat.core.packets import FindNode, Ping
from p2pchat.core.routing import MAX_FAILURES, Contact, K
from p2pchat.core.schema import Packet
from p2pchat.dht import node as dht_node
from p2pchat.dht.node import (
    BAD_RECHECK_INTERVAL,
    BOOTSTRAP_ATTEMPTS,
    EARLY_FINAL_ROUND_RTT,
    LOSSY_OVERDUE_SHARE,
    MAINTENANCE_INTERVAL,
    DhtNode,
)
from p2pchat.dht.rpc import RequestTimeoutError
from p2pchat.env import Env
from p2pchat.net import Address
from p2pchat.net.sim import SimHost, open_sim_network

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


class _DeafToFindNode(DhtNode):
    """Answers pings, but ignores its next ``deaf`` FindNode requests, every copy of each (as if all were lost)."""

    deaf = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ignored: set[bytes] = set()

    def _handle(self, packet: Packet, source: Address) -> Packet | None:
        if isinstance(packet, FindNode):
            if packet.txid in self.ignored:
                return None
            if self.deaf > 0:
                self.deaf -= 1
                self.ignored.add(packet.txid)
                return None
        return super()._handle(packet, source)


async def test_a_join_lookup_nobody_answered_is_tried_again_up_to_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(15, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 30, seed=15)
        gate, _ = await start_nodes(net, nursery, 1, seed=16, bootstrap_from=nodes, factory=_DeafToFindNode)
        door = gate[0]
        assert isinstance(door, _DeafToFindNode)
        # Its first FindNode lost: the join looks up its own id again, and learns the network.
        door.deaf = 1
        joined, _ = await start_nodes(net, nursery, 1, seed=17, bootstrap_from=[door])
        assert door.deaf == 0
        assert len(joined[0].routing) > 1
        # Every attempt lost: BOOTSTRAP_ATTEMPTS lookups, then the join gives up knowing only its bootstrap node.
        door.deaf = BOOTSTRAP_ATTEMPTS + 1
        alone, _ = await start_nodes(net, nursery, 1, seed=18, bootstrap_from=[door])
        assert door.deaf == 1
        assert [c.node_id for c in alone[0].routing] == [door.node_id]
        nursery.cancel_scope.cancel()


async def test_a_node_left_alone_and_an_island_it_started_join_the_network_at_maintenance(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(18, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, hosts = await start_nodes(net, nursery, 30, seed=18)
        # Every bootstrap ping of the first newcomer is lost (its bootstrap node is briefly unreachable): alone.
        hosts[7].set_down()
        alone, _ = await start_nodes(net, nursery, 1, seed=19, bootstrap_from=[nodes[7]])
        hosts[7].set_up()
        # A second newcomer joins through the first: the two know each other, and nobody else knows either.
        island, _ = await start_nodes(net, nursery, 1, seed=20, bootstrap_from=alone)
        a, b = alone[0], island[0]
        assert [c.node_id for c in a.routing] == [b.node_id]
        assert [c.node_id for c in b.routing] == [a.node_id]
        # Knowing fewer than k contacts in good standing, each tries again at maintenance (at most 1.5 intervals
        # apart): the first through its bootstrap address (node 7), the second by looking up its own id through the
        # first.
        await trio.sleep(4 * MAINTENANCE_INTERVAL)
        for node in (a, b):
            assert len(node.routing.closest(node.node_id, K)) == K
            others = [n for n in [*nodes, a, b] if n is not node]
            assert [c.node_id for c in (await node.find_node(node.node_id, paths=1)).contacts] == true_closest(
                others, node.node_id
            )
        nursery.cancel_scope.cancel()


async def _lookup_rpcs(overdue_share: float | None) -> tuple[list[NodeId], int]:
    """One lookup on a fresh, identical 60-node network, with the asker's overdue share set as given."""
    async with open_sim_network(16, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 60, seed=16)
        asker = nodes[-1]
        assert asker.transport.overdue_share <= LOSSY_OVERDUE_SHARE  # a clean network
        if overdue_share is not None:
            asker.transport.overdue_share = overdue_share  # as after many unanswered requests
        result = await asker.find_node(NodeId(random.Random(5).randbytes(20)), paths=1)
        nursery.cancel_scope.cancel()
    return [c.node_id for c in result.contacts], result.rpcs


async def test_lookups_ask_spares_only_when_requests_are_often_overdue(autojump_clock: trio.testing.MockClock) -> None:
    clean, clean_rpcs = await _lookup_rpcs(None)
    lossy, lossy_rpcs = await _lookup_rpcs(2 * LOSSY_OVERDUE_SHARE)
    assert lossy == clean  # the same k closest
    # The final round also asked FINAL_ROUND_SPARES past them (on the same network, up to that moment).
    assert lossy_rpcs >= clean_rpcs + FINAL_ROUND_SPARES


async def test_lookups_start_their_final_round_early_only_where_lossy_and_round_trips_are_long(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Lookup] = []

    def spy(*args: Any, **kwargs: Any) -> Lookup:
        made.append(Lookup(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(dht_node, "Lookup", spy)
    async with open_sim_network(19, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 40, seed=21)
        asker = nodes[-1]
        estimate = asker.transport.timeouts.overall
        assert estimate.srtt is not None and estimate.srtt >= EARLY_FINAL_ROUND_RTT  # 20-120 ms round trips
        target = NodeId(random.Random(6).randbytes(20))
        clean = await asker.find_node(target, paths=1)
        assert not made[-1]._early  # a clean network: the classic order...
        await asker.find_node(asker.node_id, paths=1)
        assert made[-1]._early  # ...except for a join's lookup of the own id, whose answers fill the routing table
        asker.transport.overdue_share = 2 * LOSSY_OVERDUE_SHARE  # as after many unanswered requests
        early = await asker.find_node(target, paths=1)
        assert made[-1]._early
        assert made[-1].widened
        estimate.srtt = EARLY_FINAL_ROUND_RTT / 2  # as between nodes on one host
        asker.transport.overdue_share = 2 * LOSSY_OVERDUE_SHARE
        short = await asker.find_node(target, paths=1)
        assert not made[-1]._early
        # The same k closest every way.
        assert [c.node_id for c in early.contacts] == [c.node_id for c in clean.contacts]
        assert [c.node_id for c in short.contacts] == [c.node_id for c in clean.contacts]
        nursery.cancel_scope.cancel()


async def _marked_bad(us: DhtNode, peer: DhtNode, peer_host: SimHost) -> Contact:
    """Take *peer* offline and let MAX_FAILURES of *us*'s pings to it fail; returns its entry in *us*'s table."""
    peer_host.set_down()
    for _ in range(MAX_FAILURES):
        with contextlib.suppress(RequestTimeoutError):
            await us._ask_ping(peer.address, expected=peer.node_id)
    contact = us.routing.get(peer.node_id)
    assert contact is not None
    return contact


async def test_a_stranger_a_full_bucket_could_only_cache_is_answered_without_a_certificate_check(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(24, default_link=LINK) as net, trio.open_nursery() as nursery:
        us, _ = await start_nodes(net, nursery, 1, seed=24, certs=CertCache())
        us_node = us[0]
        far_half = (~us_node.node_id.int) & (1 << 159)  # the top bit we do not have
        rng = random.Random(24)
        fakes = [NodeId.from_int(far_half | rng.getrandbits(159)) for _ in range(K)]
        now = trio.current_time()
        for i, fake in enumerate(fakes):
            us_node.routing.observe(fake, Address(f"10.9.{i}.1", 4000), now)
        us_node.routing.observe(NodeId.from_int(us_node.node_id.int ^ 1), Address("10.9.99.1", 4000), now)  # split
        assert len(us_node.routing.bucket_for(fakes[0])) == K
        # A node whose id lies in that full far bucket, with a certificate cache of its own.
        seed = 0
        while True:
            host = net.add_host()
            env = Env.simulated(host, 2400 + seed)
            identity = Identity.generate(env.random_bytes)
            if node_id_for_key(identity.public.key).int & (1 << 159) == far_half:
                break
            seed += 1
        stranger = DhtNode(env, identity, host=host.address, port=4000)
        await nursery.start(stranger.run)
        checks = us_node.certs.verifications
        assert await stranger.ping(us_node.address) == us_node.node_id  # answered all the same
        assert us_node.certs.verifications == checks
        assert us_node.senders_unchecked == 1
        assert stranger.node_id not in us_node.routing
        # Once the bucket has room, the next request is checked and the stranger taken.
        us_node.routing.remove(fakes[0])
        assert await stranger.ping(us_node.address) == us_node.node_id
        assert us_node.certs.verifications == checks + 1
        assert us_node.senders_unchecked == 1
        assert stranger.node_id in us_node.routing
        nursery.cancel_scope.cancel()


async def test_a_contact_marked_bad_that_asks_us_something_is_pinged_and_counted_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A contact that failed MAX_FAILURES requests in a row is left out of lookups and hand-over, so nothing we send
    # would clear it.  Under churn that kept nodes back from being offline out of their neighbours' tables (a
    # key's closest nodes then gave it to nodes ranked past 100).
    async with open_sim_network(21, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, hosts = await start_nodes(net, nursery, 8, seed=21)
        us, peer = nodes[0], nodes[1]
        contact = await _marked_bad(us, peer, hosts[1])
        assert contact.failures >= MAX_FAILURES
        assert peer.node_id not in {c.node_id for c in us.routing.closest(peer.node_id, K)}
        hosts[1].set_up()
        sent = us.transport.stats.requests_sent
        assert await peer.ping(us.address) == us.node_id  # it is back, and asks us something
        await trio.sleep(5)
        assert us.transport.stats.requests_sent == sent + 1  # one ping to check it ...
        assert contact.failures == 0  # ... answered: counted again
        assert us.routing.closest(peer.node_id, 1)[0].node_id == peer.node_id
        nursery.cancel_scope.cancel()


async def test_a_request_from_a_bad_contact_that_does_not_answer_leaves_it_bad(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A request alone proves nothing (its source address can be forged): only an answered ping clears the contact.
    async with open_sim_network(22, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, hosts = await start_nodes(net, nursery, 8, seed=22)
        us, peer = nodes[0], nodes[1]
        contact = await _marked_bad(us, peer, hosts[1])
        failures = contact.failures
        us._observe(peer.node_id, peer.address, peer.cert)  # as a request from it would
        await trio.sleep(5)
        assert contact.failures == failures + 1  # the check ping failed too
        assert peer.node_id not in {c.node_id for c in us.routing.closest(peer.node_id, K)}
        nursery.cancel_scope.cancel()


async def test_bad_neighbours_are_pinged_again_now_and_then(autojump_clock: trio.testing.MockClock) -> None:
    # A node back from being offline may ask none of its old neighbours anything for a long while; those that
    # marked it bad ping it again themselves, each at most once per BAD_RECHECK_INTERVAL.
    async with open_sim_network(23, default_link=LINK) as net, trio.open_nursery() as nursery:
        # k + 4 nodes: enough that `us` knows k in good standing (with fewer it would also look up its own id
        # through whomever it knows, bad ones too).  Its lookups may still ask the bad contact when another node
        # lists it: the pings are what is counted.
        nodes, hosts = await start_nodes(net, nursery, K + 4, seed=23)
        us, peer = nodes[0], nodes[1]
        contact = await _marked_bad(us, peer, hosts[1])
        assert len(us.routing.closest(us.node_id, K)) == K
        assert contact.failures >= MAX_FAILURES
        pings: list[float] = []
        request = us.transport.request

        async def counting(packet: Packet, destination: Address, *, timeout: float | None = None) -> Packet:
            if isinstance(packet, Ping) and destination == peer.address:
                pings.append(trio.current_time())
            return await request(packet, destination, timeout=timeout)

        us.transport.request = counting  # type: ignore[method-assign]
        await trio.sleep(BAD_RECHECK_INTERVAL - 2 * MAINTENANCE_INTERVAL)
        assert len(pings) == 1  # one ping in that time, unanswered
        await trio.sleep(BAD_RECHECK_INTERVAL)
        assert len(pings) == 2  # and one more
        assert contact.failures >= MAX_FAILURES + 2
        hosts[1].set_up()
        await trio.sleep(BAD_RECHECK_INTERVAL + 2 * MAINTENANCE_INTERVAL)
        assert contact.failures == 0
        assert us.routing.closest(peer.node_id, 1)[0].node_id == peer.node_id
        nursery.cancel_scope.cancel()
