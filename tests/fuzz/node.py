"""A DHT node under fire: hostile datagrams straight into its receive path, then proof that it still serves.

:class:`NodeUnderFire` runs a target :class:`~p2pchat.dht.node.DhtNode` and an honest one on SimNetwork.  Each
fuzz input becomes one or more datagrams handed to the target's receive path (``RpcTransport._on_datagram``,
exactly what its receive loop calls) from an attacker's address.  An input is either

* ``0x00`` + raw bytes: one datagram, mutated from real p2pchat and rpcudp packets; or
* ``0x01`` + entropy: a seeded generator builds packets that *decode* -- every field in range -- so they reach
  the request handlers: lookups of keys the node holds, a valid certificate for the attacker's address, valid
  write tokens, and stores of real records, entries and tombstones (mutated) cut into parts.

The invariant: no input raises out of the receive path (any exception would end the node's receive loop), and
:meth:`NodeUnderFire.check` -- the honest node pings the target and looks a key up through it -- still succeeds,
with every per-node structure within its named bound.  The target's per-source rate limit is off so that the
flood reaches the handlers rather than the limiter (the limiter has tests of its own).

:class:`ThreadedNodeTarget` runs the same thing in a trio thread so that a synchronous fuzzer (atheris, the
mutation loop) can feed it.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Final

import trio
import trio.testing

from p2pchat.core.ids import NodeId
from p2pchat.core.nodecert import CERT_CACHE_SIZE, NodeCert, issue_cert
from p2pchat.core.packets import (
    FindNode,
    FindValue,
    Found,
    GetPart,
    ItemSpace,
    ListEntries,
    Nodes,
    PartReply,
    Ping,
    Pong,
    Store,
    Stored,
)
from p2pchat.core.parts import MAX_CONCURRENT_TRANSFERS, MAX_REASSEMBLY_BYTES, make_parts
from p2pchat.core.ratelimit import RateLimits
from p2pchat.core.records import encode_entry, encode_record, encode_tombstone
from p2pchat.core.schema import Packet
from p2pchat.dht.node import MAX_RECENT_STORES, DhtConfig, DhtNode
from p2pchat.dht.rpc import MAX_PENDING_REQUESTS
from p2pchat.env import Env
from p2pchat.net.base import Address, DatagramEndpoint
from p2pchat.net.sim import Constant, LinkModel, SimNetwork, open_sim_network

from .corpus import corpus, identity
from .hostile import encode_unchecked, random_instance
from .mutate import mutate

__all__ = ["CHECK_TIMEOUT", "NodeUnderFire", "ThreadedNodeTarget", "node_seeds", "node_under_fire"]

CHECK_TIMEOUT: Final = 30.0
"""Virtual seconds the liveness check may take (a ping and a lookup need well under one)."""

_RAW: Final = 0
_STRUCTURED: Final = 1
_REQUESTS: Final = (Ping, FindNode, FindValue, GetPart, ListEntries, Store)
_REPLIES: Final = (Pong, Nodes, Found, PartReply, Stored)
_MAX_PACKETS_PER_INPUT: Final = 8


class NodeUnderFire:
    """The target node, an honest node that checks on it, and the attacker's address."""

    def __init__(self, net: SimNetwork, target: DhtNode, honest: DhtNode, attacker: DatagramEndpoint) -> None:
        self.net = net
        self.target = target
        self.honest = honest
        self.attacker = attacker
        self.attacker_identity = identity(99)
        self.inputs = 0
        self.datagrams = 0
        self._cert: tuple[int, NodeCert] | None = None
        c = corpus()
        self._blobs = [encode_record(c.record), *(encode_entry(e) for e in c.entries), encode_tombstone(c.tombstone)]
        self._keys = [c.record_key.bytes, c.mailbox.bytes, c.mailbox.bytes, c.mailbox.bytes]
        self._spaces = [ItemSpace.RECORD, ItemSpace.ENTRY, ItemSpace.ENTRY, ItemSpace.TOMBSTONE]
        self._raw_seeds = c.datagrams()

    @property
    def source(self) -> Address:
        """Where the hostile datagrams come from."""
        return self.attacker.local_address

    def feed(self, data: bytes) -> None:
        """Hand the datagrams of one fuzz input to the target's receive path (synchronously)."""
        self.inputs += 1
        receive = self.target.transport._on_datagram
        for datagram in self.datagrams_of(data):
            self.datagrams += 1
            receive(datagram, self.source)

    def datagrams_of(self, data: bytes) -> list[bytes]:
        """The datagrams a fuzz input stands for (see the module docstring)."""
        if not data:
            return [data]
        if data[0] % 2 == _RAW:
            return [data[1:]]
        rng = random.Random(data[1:])
        return [self._hostile(rng) for _ in range(rng.randint(1, _MAX_PACKETS_PER_INPUT))]

    def _attacker_cert(self) -> NodeCert:
        now = int(self.target.env.wall_time())
        if self._cert is None or self._cert[0] + 3600 < now:
            self._cert = (now, issue_cert(self.attacker_identity, self.source.host, self.source.port, now))
        return self._cert[1]

    def _hostile(self, rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.1:
            return mutate(rng.choice(self._raw_seeds), rng, self._raw_seeds, 1400)
        if roll < 0.2:
            return encode_unchecked(random_instance(rng.choice(_REPLIES), rng))
        packet: Packet = random_instance(rng.choice(_REQUESTS), rng)
        if hasattr(packet, "sender") and rng.random() < 0.5:
            packet = replace(packet, sender=self._attacker_cert())  # type: ignore[type-var]
        which = rng.randrange(len(self._blobs))
        if hasattr(packet, "key") and rng.random() < 0.6:
            packet = replace(packet, key=self._keys[which])  # type: ignore[type-var]
        if isinstance(packet, Store) and rng.random() < 0.8:
            packet = self._store(packet, which, rng)
        return encode_unchecked(packet)

    def _store(self, packet: Store, which: int, rng: random.Random) -> Store:
        """A store with a valid token of one part of a (maybe mutated) real blob."""
        blob = self._blobs[which]
        if rng.random() < 0.5:
            blob = mutate(blob, rng, self._blobs, len(blob) + 64) or blob
        parts = make_parts(blob, rng.randbytes(8))
        key = NodeId(packet.key)
        token = self.target.tokens.issue(self.source.host, key, trio.current_time())
        return replace(packet, token=token, space=int(self._spaces[which]), part=rng.choice(parts))

    async def check(self) -> None:
        """The honest node pings the target and looks a key up through it; every bound holds."""
        target = self.target
        with trio.fail_after(CHECK_TIMEOUT):
            assert await self.honest.ping(target.address) == target.node_id
            result = await self.honest.find_node(NodeId(bytes(20)))
            assert any(c.node_id == target.node_id for c in result.contacts)
        limits = target.config.store_limits
        assert target.store.total_bytes <= limits.total_bytes
        assert target.store.compat_bytes <= limits.compat_total_bytes
        assert len(target._reassembler) <= MAX_CONCURRENT_TRANSFERS
        assert target._reassembler.buffered_bytes <= MAX_REASSEMBLY_BYTES
        assert len(target._recent_stores) <= MAX_RECENT_STORES
        assert len(target.certs) <= CERT_CACHE_SIZE
        assert target.transport.pending_count() <= MAX_PENDING_REQUESTS


@contextlib.asynccontextmanager
async def node_under_fire(seed: int = 1) -> AsyncIterator[NodeUnderFire]:
    """A running :class:`NodeUnderFire` on its own SimNetwork (call inside trio, any clock)."""
    config = DhtConfig(rate_limits=RateLimits(rate=None))
    async with (
        open_sim_network(seed, default_link=LinkModel(latency=Constant(0.005))) as net,
        trio.open_nursery() as nursery,
    ):
        hosts = [net.add_host() for _ in range(3)]
        envs = [Env.simulated(host, seed * 10 + i) for i, host in enumerate(hosts)]
        target = DhtNode(envs[0], identity(90), host=hosts[0].address, port=4000, config=config)
        honest = DhtNode(envs[1], identity(91), host=hosts[1].address, port=4000)
        await nursery.start(target.run)
        await nursery.start(honest.run)
        await honest.bootstrap([target.address])
        attacker = await hosts[2].open_datagram(hosts[2].address, 4000)
        nursery.start_soon(_discard_replies, attacker)
        try:
            yield NodeUnderFire(net, target, honest, attacker)
        finally:
            nursery.cancel_scope.cancel()


async def _discard_replies(endpoint: DatagramEndpoint) -> None:
    """The attacker reads (and ignores) what the target answers, as a flooding peer would."""
    while True:
        await endpoint.receive_batch()


def node_seeds() -> list[bytes]:
    """Raw datagrams (marked 0x00) and a few structured inputs (0x01 + entropy)."""
    raw = [bytes((_RAW,)) + d for d in corpus().datagrams()]
    return raw + [bytes((_STRUCTURED,)) + i.to_bytes(4, "big") for i in range(16)]


class ThreadedNodeTarget:
    """:class:`NodeUnderFire` in a trio thread, fed synchronously; virtual time moves only during checks."""

    def __init__(self, seed: int = 1, check_every: int = 1000) -> None:
        self.check_every = check_every
        self.checks = 0
        self._ready = threading.Event()
        self._fire: NodeUnderFire | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._clock = trio.testing.MockClock(autojump_threshold=0)
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(seed,), daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self, seed: int) -> None:
        try:
            trio.run(self._serve, seed, clock=self._clock)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self, seed: int) -> None:
        async with node_under_fire(seed) as fire:
            self._fire = fire
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            # Between inputs nothing should run: no autojump, so virtual time stands still while the fuzzer works.
            self._clock.autojump_threshold = float("inf")
            self._ready.set()
            await self._stop.wait()

    def feed(self, data: bytes) -> None:
        """One input; every :attr:`check_every` inputs, the liveness check too."""
        assert self._fire is not None and self._token is not None
        trio.from_thread.run_sync(self._fire.feed, data, trio_token=self._token)
        if self._fire.inputs % self.check_every == 0:
            self.check()

    def check(self) -> None:
        """Run :meth:`NodeUnderFire.check` (virtual time runs meanwhile)."""
        assert self._fire is not None and self._token is not None
        trio.from_thread.run(self._check, trio_token=self._token)
        self.checks += 1

    async def _check(self) -> None:
        assert self._fire is not None
        self._clock.autojump_threshold = 0
        try:
            await self._fire.check()
        finally:
            self._clock.autojump_threshold = float("inf")

    def close(self) -> None:
        """Stop the trio thread."""
        if self._stop is not None and self._token is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=30)
