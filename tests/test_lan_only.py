"""LAN-only mode with real zeroconf bound to 127.0.0.1: no bootstrap, no internet.  Bob goes offline, Alice's
message is held by the DHT formed among the LAN peers (Carol's node), Bob comes back and receives it.

All nodes share 127.0.0.1, so the DHT runs with ``DhtConfig.single_host()``.  The test's nodes browse a service
type of their own (``lan_support``), so no node of another test on this host joins their DHT or holds their mail.
Waits have deadlines (zeroconf's timers run on the wall clock); nothing sleeps as synchronisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from lan_support import lan_service_type

from p2pchat.core.identity import Identity
from p2pchat.dht.node import DhtConfig
from p2pchat.env import Env
from p2pchat.messaging.db import MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.node import Node

pytestmark = pytest.mark.realnet

DEADLINE = 60.0
LOOPBACK = ["127.0.0.1"]


def _node(identity: Identity, home: Path, service_type: str) -> Node:
    return Node(
        Env.real(),
        identity,
        host="127.0.0.1",
        home=home,
        dht_config=DhtConfig.single_host(),
        lan=True,
        lan_interfaces=LOOPBACK,
        lan_service_type=service_type,
    )


async def _until(predicate: object) -> None:
    with trio.fail_after(DEADLINE):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.05)


async def test_lan_only_offline_mail(tmp_path: Path) -> None:
    env = Env.real()
    service_type = lan_service_type()
    alice_id, bob_id, carol_id = (Identity.generate(env.random_bytes) for _ in range(3))
    async with trio.open_nursery() as nursery:
        alice = _node(alice_id, tmp_path / "alice", service_type)
        carol = _node(carol_id, tmp_path / "carol", service_type)
        await nursery.start(alice.run)
        await nursery.start(carol.run)
        async with trio.open_nursery() as bob_life:
            bob = _node(bob_id, tmp_path / "bob", service_type)
            await bob_life.start(bob.run)
            await _until(lambda: all(n.lan is not None and len(n.lan.peers) == 2 for n in (alice, bob, carol)))
            row = alice.send(bob.key, "hello on the LAN")
            with trio.fail_after(DEADLINE):
                event = await bob.events.receive()
                while not isinstance(event, IncomingMessage):
                    event = await bob.events.receive()
            assert event.message.text == "hello on the LAN"
            bob_life.cancel_scope.cancel()  # Bob leaves (his goodbye goes out)
        await _until(lambda: all(n.lan is not None and len(n.lan.peers) == 1 for n in (alice, carol)))
        row = alice.send(bob.key, "while you were away")
        await _until(lambda: alice.history(bob.key)[-1].state is MessageState.STORED)
        assert alice.history(bob.key)[-1].replicas >= 1
        assert any(len(n.store) > 0 for n in (carol,))  # Carol's node holds mail for Bob
        bob = _node(bob_id, tmp_path / "bob", service_type)
        await nursery.start(bob.run)
        await _until(lambda: [m.text for m in bob.history() if not m.outgoing][-1:] == ["while you were away"])
        with trio.fail_after(DEADLINE):
            while True:
                event = await alice.events.receive()
                if isinstance(event, DeliveryUpdate) and event.message_id == row.id and event.state == "delivered":
                    break
        nursery.cancel_scope.cancel()
