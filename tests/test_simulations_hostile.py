"""Hostile simulated nodes answer as their behaviour says; Sybil keys are ground deterministically."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.packets import FindNode, FindValue, Found, ItemSpace, LookupSpace, Nodes, Store, Stored
from p2pchat.core.parts import make_parts
from p2pchat.dht.node import DhtNode
from p2pchat.dht.rpc import RequestTimeoutError
from p2pchat.env import Env
from p2pchat.net.sim import open_sim_network
from simulations.hostile import FAKE_CONTACT_NETWORK, HostileDhtNode, grind_identities

from dhtsim import LINK, start_nodes


def test_grinding_finds_ids_next_to_the_key_and_repeats() -> None:
    key = NodeId(bytes(range(20)))
    found, tried = grind_identities(key, 3, 8, "seed")
    assert len(found) == 3 and tried >= 3
    assert all(i.public.node_id.bytes[0] == key.bytes[0] for i in found)
    again, tried_again = grind_identities(key, 3, 8, "seed")
    assert [i.public.key for i in again] == [i.public.key for i in found] and tried_again == tried
    other, _ = grind_identities(key, 3, 8, "another seed")
    assert [i.public.key for i in other] != [i.public.key for i in found]


async def _network(behaviour: str, nursery: trio.Nursery, net):  # type: ignore[no-untyped-def]
    honest, _ = await start_nodes(net, nursery, 30, seed=4)
    host = net.add_host()
    env = Env.simulated(host, 99)
    hostile = HostileDhtNode(env, Identity.generate(env.random_bytes), host=host.address, port=4000)
    hostile.configure(behaviour, lie_rng=random.Random(1))
    await nursery.start(hostile.run)
    await hostile.bootstrap([honest[0].address])
    return honest, hostile


async def _ask(asker: DhtNode, packet_type: type, target: NodeId, to: HostileDhtNode):  # type: ignore[no-untyped-def]
    transport = asker.transport
    if packet_type is FindNode:
        packet = FindNode(transport.new_txid(), asker.cert, target.bytes)
    else:
        packet = FindValue(transport.new_txid(), asker.cert, target.bytes, int(LookupSpace.MAILBOX))
    return await transport.request(packet, to.address)


@pytest.mark.parametrize("behaviour", ["silent", "far", "fake"])
async def test_hostile_answers(behaviour: str, autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(3, default_link=LINK) as net, trio.open_nursery() as nursery:
        honest, hostile = await _network(behaviour, nursery, net)
        asker = honest[1]
        assert await asker.ping(hostile.address) == hostile.node_id  # every kind stays in routing tables
        target = honest[5].node_id
        if behaviour == "silent":
            with pytest.raises(RequestTimeoutError):
                await _ask(asker, FindNode, target, hostile)
        else:
            reply = await _ask(asker, FindNode, target, hostile)
            assert isinstance(reply, Nodes) and reply.nodes
            ids = [NodeId(n.node_id) for n in reply.nodes]
            if behaviour == "fake":
                assert all(n.host.startswith(FAKE_CONTACT_NETWORK + ".") for n in reply.nodes)
                assert all(i.distance(target) < honest[5].node_id.distance(honest[6].node_id) for i in ids)
            else:
                # The farthest it knows: every contact it did not name is closer to the target than all it named.
                unnamed = [c.node_id for c in hostile.routing if c.node_id not in ids]
                assert unnamed, "the network is larger than one reply"
                assert max(i.distance(target) for i in unnamed) < min(i.distance(target) for i in ids)
            found = await _ask(asker, FindValue, target, hostile)
            assert isinstance(found, Found) and found.entries == 0 and found.seq is None
            part = make_parts(b"x" * 100, b"t" * 8)[0]
            stored = await asker.transport.request(
                Store(asker.transport.new_txid(), target.bytes, int(ItemSpace.ENTRY), found.token, part),
                hostile.address,
            )
            assert isinstance(stored, Stored) and stored.complete  # acknowledged...
            assert len(hostile.store) == 0  # ...and thrown away
        nursery.cancel_scope.cancel()


async def test_sybils_name_only_their_cluster(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(3, default_link=LINK) as net, trio.open_nursery() as nursery:
        honest, hostile = await _network("sybil", nursery, net)
        allies = tuple(hostile._node_infos(honest[2].node_id)[:3])
        hostile.allies = allies
        reply = await _ask(honest[1], FindNode, honest[9].node_id, hostile)
        assert isinstance(reply, Nodes)
        assert set(reply.nodes) == set(allies)
        nursery.cancel_scope.cancel()
