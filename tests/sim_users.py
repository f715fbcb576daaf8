"""Shared by the messaging tests: whole Nodes ("users") on a small DHT on SimNetwork, and waits for their events."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pchat.core.identity import Identity
from p2pchat.core.nodecert import CertCache
from p2pchat.core.records import mailbox_key
from p2pchat.dht.node import DhtNode
from p2pchat.env import Env
from p2pchat.messaging.db import MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.net.sim import SimHost, SimNetwork
from p2pchat.node import Node

from dhtsim import start_nodes


class World:
    """A small DHT and the users on it."""

    def __init__(self, net: SimNetwork, nursery: trio.Nursery, dht: list[DhtNode], certs: CertCache) -> None:
        self.net = net
        self.nursery = nursery
        self.dht = dht
        self.certs = certs
        self.hosts: dict[str, SimHost] = {}

    async def user(self, name: str, seed: int, home: Path | None = None, identity: Identity | None = None) -> Node:
        """Start (or restart, on the same host) the user *name* and bootstrap it from one of the DHT nodes."""
        host = self.hosts.get(name) or self.net.add_host()
        self.hosts[name] = host
        env = Env.simulated(host, seed)
        identity = identity or Identity.generate(env.random_bytes)
        node = Node(env, identity, host=host.address, udp_port=4000, tcp_port=4001, home=home, cert_cache=self.certs)
        await self.nursery.start(node.run)
        assert await node.bootstrap([self.dht[seed % len(self.dht)].address]) == 1
        return node

    async def entries(self, key_of_mailbox: bytes) -> int:
        """How many entries the DHT holds in the mailbox with this public key."""
        return len((await self.dht[0].fetch_mailbox(mailbox_key(key_of_mailbox))).entries)


async def make_world(net: SimNetwork, nursery: trio.Nursery, count: int = 30, seed: int = 1) -> World:
    """A World on *count* DHT nodes started with *seed*."""
    certs = CertCache()
    dht, _ = await start_nodes(net, nursery, count, seed=seed, certs=certs)
    return World(net, nursery, dht, certs)


async def next_event(node: Node, kind: type, timeout: float = 3600) -> IncomingMessage | DeliveryUpdate:
    """The next event of type *kind* from *node* (earlier events of other types are passed over)."""
    with trio.fail_after(timeout):
        while True:
            event = await node.events.receive()
            if isinstance(event, kind):
                return event


async def received_text(node: Node, timeout: float = 3600) -> str:
    """The text of the next message *node* receives."""
    event = await next_event(node, IncomingMessage, timeout)
    assert isinstance(event, IncomingMessage)
    return event.message.text


async def until_delivered(node: Node, ids: set[bytes], timeout: float = 3600) -> None:
    """Wait until *node* has seen every message of *ids* delivered (removing them from *ids*)."""
    with trio.fail_after(timeout):
        while ids:
            event = await node.events.receive()
            if isinstance(event, DeliveryUpdate) and event.state is MessageState.DELIVERED:
                ids.discard(event.message_id)
