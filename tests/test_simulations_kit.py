"""The pieces simulations share: byte counters of SimNetwork, join batches, churn, the truly closest node."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from p2pchat.net.sim import Constant, LinkModel, open_sim_network
from simulations._simkit import ChurnDriver, Exponential, closest_where, join_batches, xor_closest


async def test_hosts_count_the_bytes_they_send(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(1, default_link=LinkModel(latency=Constant(0.01))) as net:
        a, b = net.add_host(), net.add_host()
        ea = await a.open_datagram(a.address, 4000)
        eb = await b.open_datagram(b.address, 4000)
        ea.send(b"12345", eb.local_address)
        ea.send(b"123", eb.local_address)
        await eb.receive_batch()
        listener = await b.open_listener(b.address, 4001)
        stream = await a.connect(listener.local_address)
        await stream.send_all(b"x" * 100)
        assert (a.datagrams_sent, a.bytes_sent) == (2, 108)
        assert (b.datagrams_sent, b.bytes_sent) == (0, 0)
        assert net.stats.bytes_sent == 8


def test_join_batches_grow_to_the_batch_size() -> None:
    sizes = [len(b) for b in join_batches(40, 8)]
    assert sizes == [1, 1, 2, 4, 8, 8, 8, 8]
    assert sum(sizes) == 40
    assert join_batches(1, 8) == [range(1)]
    with pytest.raises(ValueError, match="join_batch"):
        join_batches(10, 0)


def test_closest_where_agrees_with_brute_force() -> None:
    rng = random.Random(5)
    ids = sorted(rng.getrandbits(160) for _ in range(500))
    alive = {i for i in ids if rng.random() < 0.6}
    for _ in range(200):
        target = rng.getrandbits(160)
        expected = min(alive, key=lambda i: i ^ target)
        assert closest_where(ids, target, alive.__contains__) == expected
        assert xor_closest(ids, target) == min(ids, key=lambda i: i ^ target)
    assert closest_where(ids, 0, lambda _: False) is None


async def test_churn_at_rate_takes_the_share_it_promises(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(2) as net:
        hosts = [net.add_host() for _ in range(400)]
        hours = 20.0
        churn = ChurnDriver.at_rate(
            hosts, rate_per_hour=0.3, offline=Exponential(1800.0), rng=random.Random(3), start=0.0, horizon=hours * 3600
        )
        await churn.run()
        # 30% of the hosts go offline per hour, each for half an hour on average: 15% offline at any moment.
        assert churn.downs / (len(hosts) * hours) == pytest.approx(0.3, rel=0.1)
        assert churn.offline_fraction(hours * 3600) == pytest.approx(0.15, rel=0.15)
    with pytest.raises(ValueError, match="shorter"):
        ChurnDriver.at_rate(
            hosts, rate_per_hour=2.0, offline=Exponential(1800.0), rng=random.Random(), start=0, horizon=1
        )
