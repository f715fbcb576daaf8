"""Benchmark of SimNetwork: many simulated hosts exchanging datagrams on virtual time.

    python -m simulations.bench_network --json

Prints ``{"datagrams_per_s": float, "bytes_per_idle_host": float, "hosts": int}``.

* ``datagrams_per_s``: datagrams delivered to a receiving task per second of wall time, while every host
  answers each datagram it receives with one datagram to a random host, until ``--datagrams`` were delivered.
* ``bytes_per_idle_host``: Python memory (tracemalloc) per host that has an open endpoint and a task blocked in
  receive, measured before any traffic.

For comparison it also measures, in the same run, a naive design (one trio task per datagram in flight, one
memory channel per host) on a smaller load, and prints the ratio on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from p2pchat.net.base import Address, DatagramEndpoint
from p2pchat.net.sim import LinkModel, SimNetwork, Uniform

LATENCY = Uniform(0.010, 0.100)
PAYLOAD = b"p" * 100
IN_FLIGHT_PER_HOST = 10


def _run(main: Callable[[], Awaitable[float]]) -> float:
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def _idle_host_bytes(hosts: int, seed: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed, default_link=LinkModel(latency=LATENCY))
        await nursery.start(net.run)
        for _ in range(hosts):
            host = net.add_host()
            endpoint = await host.open_datagram(host.address, 4000)
            nursery.start_soon(endpoint.receive_batch)
        await trio.testing.wait_all_tasks_blocked()
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        nursery.cancel_scope.cancel()
    return used / hosts


async def _traffic(hosts: int, datagrams: int, seed: int) -> float:
    rng = random.Random(seed)
    delivered = 0
    budget = datagrams
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed, default_link=LinkModel(latency=LATENCY))
        await nursery.start(net.run)
        endpoints: list[DatagramEndpoint] = []
        for _ in range(hosts):
            host = net.add_host()
            endpoints.append(await host.open_datagram(host.address, 4000))
        addresses = [e.local_address for e in endpoints]

        async def host_loop(endpoint: DatagramEndpoint) -> None:
            nonlocal delivered, budget
            while True:
                batch = await endpoint.receive_batch()
                delivered += len(batch)
                for data, _ in batch:
                    if budget > 0:
                        budget -= 1
                        endpoint.send(data, addresses[rng.randrange(hosts)])
                if delivered >= datagrams:
                    done.set()

        for endpoint in endpoints:
            nursery.start_soon(host_loop, endpoint)
        await trio.testing.wait_all_tasks_blocked()
        started = time.perf_counter()
        for i in range(min(hosts * IN_FLIGHT_PER_HOST, datagrams)):
            budget -= 1
            endpoints[i % hosts].send(PAYLOAD, addresses[rng.randrange(hosts)])
        await done.wait()
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return delivered / elapsed


async def _naive_traffic(hosts: int, datagrams: int, seed: int) -> float:
    """The design SimNetwork replaces: a task per datagram in flight and a channel per host."""
    rng = random.Random(seed)
    delivered = 0
    budget = datagrams
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        channels = [trio.open_memory_channel[tuple[bytes, Address]](1000) for _ in range(hosts)]

        async def carry(data: bytes, source: Address, destination: int) -> None:
            await trio.sleep(LATENCY.sample(rng))
            channels[destination][0].send_nowait((data, source))

        def send(data: bytes, source: int) -> None:
            nursery.start_soon(carry, data, Address("10.0.0.1", source), rng.randrange(hosts))

        async def host_loop(index: int) -> None:
            nonlocal delivered, budget
            receiver = channels[index][1]
            while True:
                data, _ = await receiver.receive()
                delivered += 1
                if budget > 0:
                    budget -= 1
                    send(data, index)
                if delivered >= datagrams:
                    done.set()

        for index in range(hosts):
            nursery.start_soon(host_loop, index)
        await trio.testing.wait_all_tasks_blocked()
        started = time.perf_counter()
        for i in range(min(hosts * IN_FLIGHT_PER_HOST, datagrams)):
            budget -= 1
            send(PAYLOAD, i % hosts)
        await done.wait()
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return delivered / elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_network", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--datagrams", type=int, default=1_000_000)
    parser.add_argument("--baseline-datagrams", type=int, default=100_000, help="load for the naive design (0: skip)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)

    idle = _run(lambda: _idle_host_bytes(args.hosts, args.seed))
    rate = _run(lambda: _traffic(args.hosts, args.datagrams, args.seed))
    result = {"datagrams_per_s": round(rate, 1), "bytes_per_idle_host": round(idle, 1), "hosts": args.hosts}
    if args.baseline_datagrams:
        naive = _run(lambda: _naive_traffic(args.hosts, args.baseline_datagrams, args.seed))
        print(
            f"naive task-per-datagram design: {naive:,.0f} datagrams/s on {args.baseline_datagrams:,} datagrams; "
            f"SimNetwork is {rate / naive:.1f}x faster",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.hosts:,} hosts: {rate:,.0f} datagrams/s delivered (wall), "
            f"{idle:,.0f} bytes per idle host ({args.datagrams:,} datagrams)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
