"""A node on real sockets (127.0.0.1) under 100,000 random datagrams and 1,000 junk TCP connections.

    python -m tests.fuzz.flood [--datagrams 100000] [--connections 1000] [--json flood.json]

It starts a small DHT (``DhtConfig.single_host()``: every node shares 127.0.0.1; the victim keeps its per-source
rate limit, and the attacker sends from 127.0.0.2), a victim Node (DHT, messenger,
SQLite in a temporary home) and a sender Node, all in this process; floods the victim's UDP port from a plain
socket (random bytes and mutated real packets, in bursts) and its TCP port with junk connections (garbage, an
absurd frame length, a hello then garbage, a hello then silence, silence, an immediate close; 100 at a time);
then checks that a lookup through the victim and a record lookup of it succeed and that a message reaches it and
is acknowledged.  It prints what arrived and what was dropped (by counter), and the process's resident memory
before the flood, after it and at its peak -- the RSS of the whole process, all nodes and the attacker included,
so it over-states the victim's own.  Datagrams the kernel drops when the victim's socket buffer is full are the
difference between those sent and those received (which also counts the honest nodes' traffic meanwhile).
Traffic goes to 127.0.0.1 only (the allow-list is set to loopback).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from p2pchat.core.framing import encode_frame
from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.ratelimit import RateLimits
from p2pchat.core.records import RecordKind
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.env import Env
from p2pchat.messaging.channel import HANDSHAKE_TIMEOUT
from p2pchat.messaging.db import MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.net.base import Address
from p2pchat.net.real import ALLOW_ENV_VAR
from p2pchat.node import Node

from .corpus import corpus
from .mutate import mutate, random_input

HOST = "127.0.0.1"
ATTACKER = "127.0.0.2"
"""The flood's source: another loopback address, so the victim's per-source rate limit (on, unlike the other
nodes', which all share 127.0.0.1) applies to the attacker and not to its honest peers."""
DEADLINE = 120.0
"""Seconds any one step may take on a loaded machine (each takes far less)."""

BURST = 500
"""Datagrams sent before the flooder yields to the nodes."""

CONCURRENT_CONNECTIONS = 100

MEMORY_BOUND_MIB = 256
"""The documented bound (docs/security.md section 12) on a node's memory above its idle baseline, whatever its
peers send; the run fails if the process's RSS grows by more over the flood."""


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """The current resident set size of this process, in MiB."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """The peak resident set size of this process so far, in MiB."""
    return _status_mib("VmHWM")


async def flood_datagrams(victim: Address, count: int, rng: random.Random) -> int:
    """Send *count* hostile datagrams to *victim* from a plain UDP socket; returns how many left it."""
    seeds = corpus().datagrams()
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ATTACKER, 0))
        sock.setblocking(False)
        for start in range(0, count, BURST):
            for _ in range(min(BURST, count - start)):
                roll = rng.random()
                data = random_input(rng, 1400) if roll < 0.4 else mutate(rng.choice(seeds), rng, seeds, 1400)
                try:
                    sock.sendto(data if roll < 0.95 else rng.choice(seeds), (victim.host, victim.port))
                    sent += 1
                except BlockingIOError:
                    await trio.sleep(0.001)
            await trio.sleep(0.001)
    return sent


async def junk_connection(victim: Address, kind: int, rng: random.Random) -> None:
    """One junk connection of the given *kind* (see the module docstring)."""
    try:
        stream = await trio.open_tcp_stream(victim.host, victim.port, local_address=ATTACKER)
    except OSError:
        return
    hello = corpus().handshake.hello
    try:
        if kind == 0:
            await stream.send_all(rng.randbytes(rng.randint(1, 4096)))
        elif kind == 1:
            await stream.send_all((1 << 31).to_bytes(4, "big") + rng.randbytes(64))
        elif kind == 2:
            await stream.send_all(encode_frame(hello) + encode_frame(rng.randbytes(200)))
        elif kind == 3:
            await stream.send_all(encode_frame(hello))
        if kind in (0, 1, 2, 3, 4):
            with trio.move_on_after(HANDSHAKE_TIMEOUT * 2):
                while await stream.receive_some(65536):
                    pass
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def flood_connections(victim: Address, count: int) -> None:
    """*count* junk connections, :data:`CONCURRENT_CONNECTIONS` at a time."""
    for start in range(0, count, CONCURRENT_CONNECTIONS):
        async with trio.open_nursery() as nursery:
            for index in range(start, min(count, start + CONCURRENT_CONNECTIONS)):
                nursery.start_soon(junk_connection, victim, index % 6, random.Random(index))


async def run(datagrams: int, connections: int, home: Path) -> dict[str, Any]:
    """The whole experiment; returns its figures."""
    config = DhtConfig.single_host()
    rng = random.Random(1)
    async with trio.open_nursery() as nursery:
        dht: list[DhtNode] = []
        with trio.fail_after(DEADLINE):
            for _ in range(6):
                env = Env.real()
                node = DhtNode(env, Identity.generate(env.random_bytes), host=HOST, config=config)
                await nursery.start(node.run)
                if dht:
                    await node.bootstrap([dht[-1].address])
                dht.append(node)
            users = []
            # The victim keeps the default per-source rate limit: the attacker has an address of its own.
            victim_config = replace(config, rate_limits=RateLimits())
            for name, user_config in (("bob", victim_config), ("alice", config)):
                env = Env.real()
                identity = Identity.generate(env.random_bytes)
                user = Node(env, identity, host=HOST, home=home / name, dht_config=user_config)
                await nursery.start(user.run)
                assert await user.bootstrap([dht[0].address]) == 1
                users.append(user)
        bob, alice = users
        alice.add_contact("bob", bob.address)
        victim_udp, victim_tcp = bob.dht.address, bob.messenger.tcp_address
        gc.collect()
        rss_before = rss_mib()
        endpoint_before = bob.dht.transport.endpoint.stats.received
        started = time.monotonic()
        async with trio.open_nursery() as flood:
            sent = 0

            async def datagram_flood() -> None:
                nonlocal sent
                sent = await flood_datagrams(victim_udp, datagrams, rng)

            flood.start_soon(datagram_flood)
            flood.start_soon(flood_connections, victim_tcp, connections)
        flood_seconds = time.monotonic() - started
        # Let the server finish with the last silent connections.
        with trio.fail_after(DEADLINE):
            while bob.messenger.channel_stats.active:
                await trio.sleep(0.1)
        gc.collect()
        rss_after = rss_mib()

        with trio.fail_after(DEADLINE):
            lookup = await alice.dht.find_node(NodeId(rng.randbytes(20)))
            pinged = await dht[2].ping(victim_udp) == bob.dht.node_id
            record = await alice.dht.get_record(RecordKind.PEER, bob.key)
            row = alice.send("bob", "still there after the flood?")
            received = delivered = False
            while not received:
                event = await bob.events.receive()
                received = isinstance(event, IncomingMessage) and event.message.text == "still there after the flood?"
            while not delivered:
                update = await alice.events.receive()
                delivered = (
                    isinstance(update, DeliveryUpdate)
                    and update.message_id == row.id
                    and update.state is MessageState.DELIVERED
                )
        rpc = bob.dht.transport.stats
        channels = bob.messenger.channel_stats
        arrived = bob.dht.transport.endpoint.stats.received - endpoint_before
        figures = {
            "datagrams_sent": sent,
            "datagrams_received_by_victim_socket": arrived,  # honest DHT traffic included
            "dropped_malformed": rpc.dropped_malformed,
            "dropped_unsolicited": rpc.dropped_unsolicited,
            "dropped_rate_limited": rpc.dropped_rate_limited,
            "dropped_by_handler": rpc.dropped_by_handler,
            "requests_served": rpc.requests_served,
            "compat_served": rpc.compat_served,
            "connections": connections,
            "connections_accepted": channels.accepted,
            "connections_refused_at_limit": channels.refused,
            "handshake_failures": channels.handshake_failures,
            "handshake_timeouts": channels.handshake_timeouts,
            "handshake_disconnects": channels.handshake_disconnects,
            "channels_established": channels.established,
            "flood_seconds": round(flood_seconds, 1),
            "rss_before_mib": round(rss_before, 1),
            "rss_after_mib": round(rss_after, 1),
            "rss_peak_mib": round(peak_rss_mib(), 1),
            "rss_bound_mib": MEMORY_BOUND_MIB,
            "store_bytes": bob.store.total_bytes,
            "lookup_ok": bool(lookup.contacts),
            "ping_ok": pinged,
            "record_lookup_ok": record.record is not None,
            "message_received": received,
            "message_delivered": delivered,
        }
        nursery.cancel_scope.cancel()
    return figures


def main(argv: list[str] | None = None) -> int:
    """Command line entry; exit status 0 if the node kept serving."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datagrams", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    # Every network this process opens may reach loopback only (read when each RealNetwork is made).
    os.environ[ALLOW_ENV_VAR] = "127.0.0.0/8,::1/128"
    with tempfile.TemporaryDirectory(prefix="p2pchat-flood-") as home:
        figures = trio.run(run, args.datagrams, args.connections, Path(home))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    ok = all(figures[k] for k in ("lookup_ok", "ping_ok", "record_lookup_ok", "message_received", "message_delivered"))
    bounded = figures["rss_peak_mib"] - figures["rss_before_mib"] < MEMORY_BOUND_MIB
    return 0 if ok and bounded else 1


if __name__ == "__main__":
    sys.exit(main())
