"""SimNetwork: latency, loss, duplication, reordering, bandwidth, partitions, hosts down/up, streams, determinism."""

from __future__ import annotations

import itertools
import statistics

import pytest
import trio
import trio.testing

from p2pchat.errors import ConnectError
from p2pchat.net import Address
from p2pchat.net.sim import (
    CONNECT_TIMEOUT,
    LISTEN_BACKLOG,
    RECEIVE_QUEUE_LIMIT,
    STREAM_WINDOW_BYTES,
    Constant,
    LinkModel,
    LogNormal,
    SimNetwork,
    Uniform,
    open_sim_network,
)


async def _pair(net: SimNetwork, port: int = 5000):  # type: ignore[no-untyped-def]
    a, b = net.add_host(), net.add_host()
    ea = await a.open_datagram(a.address, port)
    eb = await b.open_datagram(b.address, port)
    return a, b, ea, eb


async def test_constant_latency_is_observed(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(1, default_link=LinkModel(latency=Constant(0.080)), time_resolution=0) as net:
        _, _, ea, eb = await _pair(net)
        start = trio.current_time()
        ea.send(b"ping", eb.local_address)
        data, source = await eb.receive()
        assert (data, source) == (b"ping", ea.local_address)
        assert trio.current_time() - start == pytest.approx(0.080)


async def test_time_resolution_rounds_arrivals_up(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(1, default_link=LinkModel(latency=Constant(0.0801)), time_resolution=0.001) as net:
        _, _, ea, eb = await _pair(net)
        start = trio.current_time()
        ea.send(b"x", eb.local_address)
        await eb.receive()
        assert trio.current_time() - start == pytest.approx(0.081)


async def test_latency_distribution_is_observed(autojump_clock: trio.testing.MockClock) -> None:
    model = LinkModel(latency=Uniform(0.020, 0.100))
    async with open_sim_network(2, default_link=model, time_resolution=0) as net:
        _, _, ea, eb = await _pair(net)
        delays = []
        for i in range(400):
            sent = trio.current_time()
            ea.send(i.to_bytes(2, "big"), eb.local_address)
            await eb.receive()
            delays.append(trio.current_time() - sent)
        assert min(delays) >= 0.020
        assert max(delays) <= 0.100
        assert statistics.mean(delays) == pytest.approx(0.060, abs=0.005)


async def test_lognormal_latency_has_its_median(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(3, default_link=LinkModel(latency=LogNormal(0.050, 0.4)), time_resolution=0) as net:
        _, _, ea, eb = await _pair(net)
        delays = []
        for _ in range(400):
            sent = trio.current_time()
            ea.send(b"x", eb.local_address)
            await eb.receive()
            delays.append(trio.current_time() - sent)
        assert statistics.median(delays) == pytest.approx(0.050, rel=0.1)


async def test_loss_rate_is_observed(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(4, default_link=LinkModel(loss=0.25)) as net:
        _, _, ea, eb = await _pair(net)
        for _ in range(4000):
            ea.send(b"x", eb.local_address)
        await trio.sleep(1)
        received = len(await eb.receive_batch())
        assert received == net.stats.delivered
        assert net.stats.lost + received == 4000
        assert received / 4000 == pytest.approx(0.75, abs=0.03)


async def test_duplication_is_observed(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(5, default_link=LinkModel(duplicate=0.1)) as net:
        _, _, ea, eb = await _pair(net)
        for i in range(2000):
            ea.send(i.to_bytes(2, "big"), eb.local_address)
        await trio.sleep(1)
        batch = await eb.receive_batch()
        assert len(batch) == 2000 + net.stats.duplicated
        assert net.stats.duplicated / 2000 == pytest.approx(0.1, abs=0.03)
        assert len({data for data, _ in batch}) == 2000


async def test_reordering_is_observed(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(6, default_link=LinkModel(latency=Constant(0.010), reorder=0.2)) as net:
        _, _, ea, eb = await _pair(net)
        for i in range(500):
            ea.send(i.to_bytes(2, "big"), eb.local_address)
            await trio.sleep(0.001)
        await trio.sleep(1)
        order = [int.from_bytes(data, "big") for data, _ in await eb.receive_batch()]
        assert sorted(order) == list(range(500))
        inversions = sum(1 for x, y in itertools.pairwise(order) if x > y)
        assert inversions > 20


async def test_constant_latency_without_reorder_keeps_order(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(6, default_link=LinkModel(latency=Constant(0.010))) as net:
        _, _, ea, eb = await _pair(net)
        for i in range(300):
            ea.send(i.to_bytes(2, "big"), eb.local_address)
        await trio.sleep(1)
        order = [int.from_bytes(data, "big") for data, _ in await eb.receive_batch()]
        assert order == list(range(300))


async def test_bandwidth_adds_serialisation_delay(autojump_clock: trio.testing.MockClock) -> None:
    model = LinkModel(latency=Constant(0.010), bandwidth=100_000)
    async with open_sim_network(7, default_link=model, time_resolution=0) as net:
        _, _, ea, eb = await _pair(net)
        start = trio.current_time()
        for _ in range(100):
            ea.send(bytes(1000), eb.local_address)
        received = 0
        while received < 100:
            received += len(await eb.receive_batch())
        # 100 kB over a 100 kB/s link: the last datagram leaves after 1 s, arrives 10 ms later.
        assert trio.current_time() - start == pytest.approx(1.010)


async def test_per_link_model_overrides_default(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(8, default_link=LinkModel(latency=Constant(0.010)), time_resolution=0) as net:
        a, _b, ea, eb = await _pair(net)
        c = net.add_host()
        ec = await c.open_datagram(c.address, 5000)
        net.set_link(a, c, LinkModel(latency=Constant(0.200)))
        start = trio.current_time()
        ea.send(b"slow", ec.local_address)
        await ec.receive()
        assert trio.current_time() - start == pytest.approx(0.200)
        start = trio.current_time()
        ec.send(b"slow back", ea.local_address)
        await ea.receive()
        assert trio.current_time() - start == pytest.approx(0.200)
        start = trio.current_time()
        ea.send(b"fast", eb.local_address)
        await eb.receive()
        assert trio.current_time() - start == pytest.approx(0.010)


async def test_partition_blocks_and_heal_restores(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(9) as net:
        a, b, ea, eb = await _pair(net)
        c = net.add_host()
        ec = await c.open_datagram(c.address, 5000)
        net.partition([[a], [b, c]])
        ea.send(b"across", eb.local_address)
        ec.send(b"inside", eb.local_address)
        await trio.sleep(1)
        assert [d for d, _ in await eb.receive_batch()] == [b"inside"]
        assert net.stats.dropped_partition == 1
        net.heal()
        ea.send(b"healed", eb.local_address)
        assert (await eb.receive())[0] == b"healed"


async def test_host_down_drops_traffic_both_ways_and_up_restores(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(10) as net:
        _, b, ea, eb = await _pair(net)
        b.set_down()
        ea.send(b"to a dead host", eb.local_address)
        eb.send(b"from a dead host", ea.local_address)
        await trio.sleep(1)
        assert net.stats.dropped_down == 2
        with trio.move_on_after(5):
            await ea.receive()
            pytest.fail("a down host sent a datagram")
        b.set_up()
        ea.send(b"back", eb.local_address)
        assert (await eb.receive())[0] == b"back"


async def test_unknown_destination_is_dropped_and_counted(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(11) as net:
        _, _, ea, eb = await _pair(net)
        ea.send(b"x", Address("10.99.99.99", 1))
        ea.send(b"x", Address(eb.local_address.host, 1))
        await trio.sleep(1)
        assert net.stats.dropped_unreachable == 2


async def test_receive_queue_limit_drops_excess(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(12) as net:
        _, _, ea, eb = await _pair(net)
        for _ in range(RECEIVE_QUEUE_LIMIT + 10):
            ea.send(b"x", eb.local_address)
        await trio.sleep(1)
        assert len(await eb.receive_batch()) == RECEIVE_QUEUE_LIMIT
        assert eb.stats.receive_overflow == 10
        assert net.stats.dropped_overflow == 10


async def test_closed_endpoint_wakes_receiver_and_frees_port(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(13) as net:
        a, _, ea, _ = await _pair(net)
        async with trio.open_nursery() as nursery:

            async def receiver() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await ea.receive_batch()

            nursery.start_soon(receiver)
            await trio.sleep(0.1)
            await ea.aclose()
        with pytest.raises(trio.ClosedResourceError):
            ea.send(b"x", ea.local_address)
        again = await a.open_datagram(a.address, 5000)
        assert again.local_address.port == 5000


async def test_binding_twice_or_foreign_ip_fails(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(14) as net:
        a, _, _, _ = await _pair(net)
        with pytest.raises(OSError, match="in use"):
            await a.open_datagram(a.address, 5000)
        with pytest.raises(OSError, match="simulated host has addresses"):
            await a.open_datagram("10.250.0.1", 5000)


# --- streams -----------------------------------------------------------------------------------------------


async def test_stream_round_trip_and_eof(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(20, default_link=LinkModel(latency=Constant(0.025)), time_resolution=0) as net:
        a, b = net.add_host(), net.add_host()
        listener = await b.open_listener(b.address, 7000)
        start = trio.current_time()
        client = await a.connect(listener.local_address)
        assert trio.current_time() - start == pytest.approx(0.050)
        server = await listener.accept()
        assert server.remote_address == client.local_address
        assert client.remote_address == listener.local_address
        payload = bytes(range(256)) * 4000  # more than one send window
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            received = bytearray()
            while len(received) < len(payload):
                received += await server.receive_some()
        assert bytes(received) == payload
        await client.send_eof()
        assert await server.receive_some() == b""
        await server.send_all(b"reply after half-close")
        assert await client.receive_some() == b"reply after half-close"
        await server.aclose()
        assert await client.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"after close")
        other = await a.connect(listener.local_address)
        await (await listener.accept()).aclose()
        with pytest.raises(trio.BrokenResourceError):
            await other.send_all(b"to a closed peer")


async def test_stream_send_window_applies_backpressure(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(21) as net:
        a, b = net.add_host(), net.add_host()
        listener = await b.open_listener(b.address, 7000)
        client = await a.connect(listener.local_address)
        server = await listener.accept()
        with trio.move_on_after(10) as scope:
            await client.send_all(bytes(STREAM_WINDOW_BYTES + 1))
        assert scope.cancelled_caught, "send_all beyond the window must wait for the reader"
        assert len(await server.receive_some()) >= 1


async def test_connect_refused_without_listener(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(22) as net:
        a, b = net.add_host(), net.add_host()
        with pytest.raises(ConnectError, match="refused"):
            await a.connect(Address(b.address, 7000))


async def test_connect_to_down_host_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(23) as net:
        a, b = net.add_host(), net.add_host()
        await b.open_listener(b.address, 7000)
        b.set_down()
        start = trio.current_time()
        with pytest.raises(ConnectError, match="timed out"):
            await a.connect(Address(b.address, 7000))
        assert trio.current_time() - start == pytest.approx(CONNECT_TIMEOUT, abs=0.01)


async def test_listen_backlog_limit_refuses(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(24) as net:
        a, b = net.add_host(), net.add_host()
        listener = await b.open_listener(b.address, 7000)
        for _ in range(LISTEN_BACKLOG):
            await a.connect(listener.local_address)
        with pytest.raises(ConnectError, match="refused"):
            await a.connect(listener.local_address)


async def test_host_down_breaks_its_streams(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(25) as net:
        a, b = net.add_host(), net.add_host()
        listener = await b.open_listener(b.address, 7000)
        client = await a.connect(listener.local_address)
        server = await listener.accept()
        a.set_down()
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")
        # The survivor hears nothing: a crashed peer sends no reset.
        await server.send_all(b"into the void")
        with trio.move_on_after(30) as scope:
            await server.receive_some()
        assert scope.cancelled_caught


async def test_partition_breaks_streams_that_cross_it(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(26) as net:
        a, b = net.add_host(), net.add_host()
        listener = await b.open_listener(b.address, 7000)
        client = await a.connect(listener.local_address)
        server = await listener.accept()
        net.partition([[a], [b]])
        await client.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()


# --- determinism and scale -------------------------------------------------------------------------------


async def _chatter(seed: int) -> list[tuple[float, str, str, str, int]]:
    model = LinkModel(latency=Uniform(0.005, 0.050), loss=0.05, duplicate=0.02, reorder=0.05)
    async with open_sim_network(seed, default_link=model, trace=True) as net:
        hosts = [net.add_host() for _ in range(30)]
        endpoints = [await h.open_datagram(h.address, 4000) for h in hosts]
        addresses = [e.local_address for e in endpoints]

        async def node(index: int) -> None:
            endpoint = endpoints[index]
            # Several tasks per host send at the same virtual instants: ordering must still repeat.
            for round_ in range(20):
                endpoint.send(bytes([index, round_]), addresses[(index * 7 + round_) % len(addresses)])
                await trio.sleep(0.01)
                with trio.move_on_after(0.02):
                    for data, source in await endpoint.receive_batch():
                        endpoint.send(data[::-1], source)

        async with trio.open_nursery() as nursery:
            for i in range(len(hosts)):
                nursery.start_soon(node, i)
        assert net.trace is not None
        return net.trace


def test_same_seed_gives_identical_trace() -> None:
    first = trio.run(_chatter, 42, clock=trio.testing.MockClock(autojump_threshold=0))
    second = trio.run(_chatter, 42, clock=trio.testing.MockClock(autojump_threshold=0))
    other = trio.run(_chatter, 43, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(first) > 1000
    assert first == second
    assert first != other


async def test_ten_thousand_hosts_exchange_a_hundred_thousand_datagrams(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hosts_count, total = 10_000, 100_000
    async with open_sim_network(30, default_link=LinkModel(latency=Uniform(0.010, 0.050))) as net:
        endpoints = []
        for _ in range(hosts_count):
            host = net.add_host()
            endpoints.append(await host.open_datagram(host.address, 4000))
        received = [0]
        done = trio.Event()

        async def sink(endpoint) -> None:  # type: ignore[no-untyped-def]
            while True:
                batch = await endpoint.receive_batch()
                received[0] += len(batch)
                if received[0] == total:
                    done.set()

        async with trio.open_nursery() as nursery:
            for endpoint in endpoints:
                nursery.start_soon(sink, endpoint)
            for i in range(total):
                endpoints[i % hosts_count].send(b"d" * 64, endpoints[(i * 7919) % hosts_count].local_address)
            await done.wait()
            nursery.cancel_scope.cancel()
        assert received[0] == net.stats.delivered == total
