"""Resource bounds under a flood (bounded version; the full one is ``python -m tests.fuzz.flood`` on loopback).

A full node (DHT + messenger) on SimNetwork receives 5,000 hostile datagrams -- random bytes and mutated real
packets, through the network and its receive loop -- and 100 junk TCP connections (garbage, an oversized length
prefix, a valid hello then garbage, a hello and silence, silence, an immediate close).  Every datagram and
connection is accounted for in the node's counters, its bounded structures stay within their limits, its memory
grows by less than :data:`MEMORY_GROWTH_BOUND`, and afterwards a lookup through it and a message to it succeed.
Virtual time, fixed seeds.
"""

from __future__ import annotations

import gc
import hashlib
import random
import tracemalloc

import pytest
import trio
import trio.testing
from fuzz.corpus import NOW, corpus
from fuzz.mutate import mutate, random_input

from p2pchat.core.framing import encode_frame
from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.nodecert import CertCache
from p2pchat.core.parts import MAX_CONCURRENT_TRANSFERS, MAX_REASSEMBLY_BYTES
from p2pchat.core.records import RecordKind, encode_entry, entry_expiry, make_entry
from p2pchat.dht.store import QuotaExceededError, Space, Store, StoreLimits
from p2pchat.env import Env
from p2pchat.messaging.channel import HANDSHAKE_TIMEOUT
from p2pchat.messaging.db import MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.net.base import Address
from p2pchat.net.sim import SimHost, SimNetwork, open_sim_network
from p2pchat.node import Node

from dhtsim import LINK, start_nodes

STORE_MEMORY_FACTOR = 1.25
"""A full store's Python memory over its quota (measured: 1.06 for one-byte entries, 0.99 for 60 KB ones)."""

DATAGRAMS = 5000
CONNECTIONS = 100
BURST = 250
"""Datagrams sent per 0.1 s of virtual time (2,500/s from one source)."""

MEMORY_GROWTH_BOUND = 4 * 1024 * 1024
"""Python memory the whole simulation may gain over the flood (its store, tables and channels are bounded far
below: the flood is garbage, so nearly all of it must be dropped without a trace; measured: about 0.2 MiB)."""


async def _user(net: SimNetwork, nursery: trio.Nursery, seed: int, certs: CertCache, boot: Address) -> Node:
    host = net.add_host()
    env = Env.simulated(host, seed)
    node = Node(
        env, Identity.generate(env.random_bytes), host=host.address, udp_port=4000, tcp_port=4001, cert_cache=certs
    )
    await nursery.start(node.run)
    assert await node.bootstrap([boot]) == 1
    return node


async def _flood_datagrams(attacker: SimHost, victim: Address, rng: random.Random) -> int:
    endpoint = await attacker.open_datagram(attacker.address, 6000)
    seeds = corpus().datagrams()
    for start in range(0, DATAGRAMS, BURST):
        for _ in range(BURST):
            roll = rng.random()
            data = random_input(rng, 1400) if roll < 0.4 else mutate(rng.choice(seeds), rng, seeds, 1400)
            endpoint.send(data if roll < 0.95 else rng.choice(seeds), victim)
        await trio.sleep(0.1)
        assert start < DATAGRAMS
    await endpoint.aclose()
    return DATAGRAMS


async def _junk_connection(attacker: SimHost, victim: Address, kind: int, rng: random.Random) -> None:
    hello = corpus().handshake.hello
    try:
        stream = await attacker.connect(victim)
    except OSError:
        return
    try:
        if kind == 0:
            await stream.send_all(rng.randbytes(rng.randint(1, 4096)))
        elif kind == 1:
            await stream.send_all((1 << 31).to_bytes(4, "big") + rng.randbytes(64))  # an absurd frame length
        elif kind == 2:
            await stream.send_all(encode_frame(hello) + encode_frame(rng.randbytes(200)))
        elif kind == 3:
            await stream.send_all(encode_frame(hello))
            await trio.sleep(HANDSHAKE_TIMEOUT * 2)  # never finishes the handshake
        elif kind == 4:
            await trio.sleep(HANDSHAKE_TIMEOUT * 2)  # says nothing at all
        with trio.move_on_after(HANDSHAKE_TIMEOUT * 3):
            while await stream.receive_some(65536):
                pass
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def test_node_under_a_datagram_and_connection_flood_keeps_serving(autojump_clock: trio.testing.MockClock) -> None:
    rng = random.Random(21)
    certs = CertCache()
    async with open_sim_network(21, default_link=LINK) as net, trio.open_nursery() as nursery:
        dht, _ = await start_nodes(net, nursery, 8, seed=21, certs=certs)
        bob = await _user(net, nursery, 1, certs, dht[0].address)
        alice = await _user(net, nursery, 2, certs, dht[3].address)
        alice.add_contact("bob", bob.address)
        await trio.sleep(60)
        victim_udp, victim_tcp = bob.dht.address, bob.messenger.tcp_address
        rpc_before = bob.dht.transport.stats
        served_before = rpc_before.requests_served + rpc_before.compat_served
        gc.collect()
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            attacker = net.add_host()
            async with trio.open_nursery() as flood:
                flood.start_soon(_flood_datagrams, attacker, victim_udp, rng)
                for index in range(CONNECTIONS):
                    flood.start_soon(_junk_connection, attacker, victim_tcp, index % 6, random.Random(index))
            await trio.sleep(HANDSHAKE_TIMEOUT * 2)
            gc.collect()
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert after - before < MEMORY_GROWTH_BOUND

        # Every datagram is accounted for: received by the socket and then dropped (malformed, unsolicited,
        # rate-limited, refused by a handler) or answered; none crashed the loop.
        rpc = bob.dht.transport.stats
        dropped = rpc.dropped_malformed + rpc.dropped_unsolicited + rpc.dropped_rate_limited + rpc.dropped_by_handler
        assert rpc.dropped_malformed > DATAGRAMS // 3
        assert dropped + rpc.requests_served + rpc.compat_served - served_before >= DATAGRAMS * 0.95
        # Every junk connection was accepted and ended in a handshake counter; none is still open.
        channels = bob.messenger.channel_stats
        junk = channels.handshake_failures + channels.handshake_timeouts + channels.handshake_disconnects
        assert junk + channels.refused == channels.accepted == CONNECTIONS
        assert channels.established == 0
        assert channels.handshake_timeouts > 0 and channels.handshake_failures > 0
        assert channels.active == 0
        # Bounded structures stayed bounded.
        assert len(bob.dht._reassembler) <= MAX_CONCURRENT_TRANSFERS
        assert bob.dht._reassembler.buffered_bytes <= MAX_REASSEMBLY_BYTES
        assert bob.store.total_bytes <= bob.dht.config.store_limits.total_bytes

        # And it still serves: a lookup through it, a record lookup of it, a message to it and back.
        result = await alice.dht.find_node(NodeId(rng.randbytes(20)))
        assert result.contacts
        assert await dht[5].ping(victim_udp) == bob.dht.node_id
        found = await alice.dht.get_record(RecordKind.PEER, bob.key)
        assert found.record is not None
        row = alice.send("bob", "still there?")
        with trio.fail_after(600):
            while True:
                event = await bob.events.receive()
                if isinstance(event, IncomingMessage):
                    assert event.message.text == "still there?"
                    break
            while True:
                update = await alice.events.receive()
                if isinstance(update, DeliveryUpdate) and update.message_id == row.id:
                    assert update.state in (MessageState.SENT, MessageState.DELIVERED)
                    if update.state is MessageState.DELIVERED:
                        break
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("payload_bytes", [1, 60_000])
def test_flood_of_entries_from_many_addresses_stays_within_the_store_quota(payload_bytes: int) -> None:
    # An attacker with many addresses (an IPv6 /64 is plenty) fills a store with entries under distinct keys,
    # each from another source, and asks for each one (so its parts are cached).  The quota charges each item its
    # blob plus ITEM_OVERHEAD_BYTES; the Python memory behind that must stay within 1.25 times the quota.  At the
    # former 128-byte charge one-byte entries took 6.5 times their quota, and cached parts doubled a large blob.
    limits = StoreLimits(total_bytes=2 * 1024 * 1024)
    payload = bytes(payload_bytes)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        store = Store(NodeId(bytes(20)), limits)
        count = 0
        while True:
            key = NodeId(hashlib.blake2b(count.to_bytes(8, "big"), digest_size=20).digest())
            entry = make_entry(key, payload, entry_expiry(NOW))
            try:
                store.put(Space.ENTRY, key, encode_entry(entry), f"2001:db8::{count:x}", NOW)
            except QuotaExceededError:
                break
            item = store.item(Space.ENTRY, key, entry.entry_id, NOW)
            assert item is not None
            item.parts()
            count += 1
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.stats.refused_quota == 1 and store.total_bytes <= limits.total_bytes
    assert count > (10 if payload_bytes > 1 else 1000)
    assert after - before < STORE_MEMORY_FACTOR * limits.total_bytes
