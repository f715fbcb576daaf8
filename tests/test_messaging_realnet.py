"""Two Nodes on real sockets on 127.0.0.1 exchange messages directly, and through the mailbox of a 10-node local
DHT while the recipient is away.  Every wait has a deadline; nothing sleeps for a fixed time.

All nodes share 127.0.0.1, so the DHT runs with ``DhtConfig.single_host()`` (per-source quota raised to the total,
per-source rate limit off).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from p2pchat.core.identity import Identity
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.env import Env
from p2pchat.messaging.db import MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.node import Node

pytestmark = pytest.mark.realnet

DEADLINE = 60.0
"""Seconds a step may take on a loaded machine (each normally takes well under one)."""


async def _event(node: Node, kind: type, predicate: object = None) -> IncomingMessage | DeliveryUpdate:
    with trio.fail_after(DEADLINE):
        while True:
            event = await node.events.receive()
            if isinstance(event, kind) and (predicate is None or predicate(event)):  # type: ignore[operator]
                return event


async def test_two_nodes_on_loopback_direct_and_through_the_mailbox(tmp_path: Path) -> None:
    config = DhtConfig.single_host()
    async with trio.open_nursery() as nursery:
        dht: list[DhtNode] = []
        with trio.fail_after(DEADLINE):
            for _ in range(10):
                env = Env.real()
                node = DhtNode(env, Identity.generate(env.random_bytes), host="127.0.0.1", config=config)
                await nursery.start(node.run)
                if dht:
                    await node.bootstrap([dht[-1].address])
                dht.append(node)

        async def user(name: str, identity: Identity | None = None) -> Node:
            env = Env.real()
            node = Node(
                env,
                identity or Identity.generate(env.random_bytes),
                host="127.0.0.1",
                home=tmp_path / name,
                dht_config=config,
            )
            await nursery.start(node.run)
            assert await node.bootstrap([dht[0].address]) == 1
            return node

        with trio.fail_after(DEADLINE):
            alice = await user("alice")
            bob_identity = Identity.generate(Env.real().random_bytes)
            async with trio.open_nursery() as bob_life:
                env = Env.real()
                bob = Node(env, bob_identity, host="127.0.0.1", home=tmp_path / "bob", dht_config=config)
                await bob_life.start(bob.run)
                assert await bob.bootstrap([dht[3].address]) == 1
                alice.add_contact("bob", bob.address)
                bob.add_contact("alice", alice.address)

                row = alice.send("bob", "hello over loopback")
                event = await _event(bob, IncomingMessage)
                assert isinstance(event, IncomingMessage) and event.message.text == "hello over loopback"
                await _event(alice, DeliveryUpdate, lambda e: e.message_id == row.id and e.state == "delivered")
                assert alice.messenger.stats.sent_direct >= 1
                bob_life.cancel_scope.cancel()

            # Bob is gone: the next message goes to his mailbox on the DHT.
            row = alice.send("bob", "while you were away")
            await _event(alice, DeliveryUpdate, lambda e: e.message_id == row.id and e.state == MessageState.STORED)
            stored = alice.history("bob")[-1]
            assert stored.state is MessageState.STORED and stored.replicas >= 5

            bob = await user("bob", bob_identity)
            await bob.messenger.fetch_mailbox()
            texts = [m.text for m in bob.history("alice") if not m.outgoing]
            assert texts == ["hello over loopback", "while you were away"]
            await _event(alice, DeliveryUpdate, lambda e: e.message_id == row.id and e.state == "delivered")
        nursery.cancel_scope.cancel()
