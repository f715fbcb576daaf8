"""A node stopped dead right after any one of its commits, then restarted from its files, loses nothing and shows
nothing twice.  SimNetwork on virtual time, real SQLite files; the crash is injected through the message
database's commit hook, for every commit boundary of a short exchange, on either side."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pchat.core.identity import Identity
from p2pchat.core.nodecert import CertCache
from p2pchat.dht.node import DhtNode
from p2pchat.env import Env
from p2pchat.messaging.db import MessageState
from p2pchat.net.sim import SimHost, SimNetwork, open_sim_network
from p2pchat.node import Node

from dhtsim import LINK, start_nodes

MESSAGES = 3


class SimulatedCrash(Exception):  # noqa: N818 - it is not an error of the code under test
    """Raised by the commit hook: the process dies right after that commit."""


@dataclass
class User:
    name: str
    identity: Identity
    home: Path
    host: SimHost
    seed: int
    node: Node | None = None
    crashed: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope | None = None


async def _life(user: User, node: Node, crash_at: int | None, *, task_status: trio.TaskStatus[None]) -> None:
    base = node.db.commits  # the commits of opening the database and creating its keys

    def hook(count: int) -> None:
        if crash_at is not None and count - base == crash_at:
            raise SimulatedCrash(f"{user.name} dies after commit {count - base} of its run")

    node.db.after_commit = hook
    try:
        async with trio.open_nursery() as nursery:
            user.scope = nursery.cancel_scope
            await nursery.start(node.run)
            task_status.started()
    except* SimulatedCrash:
        user.crashed.set()


async def _start(user: User, nursery: trio.Nursery, dht: list[DhtNode], certs: CertCache, crash_at: int | None) -> Node:
    env = Env.simulated(user.host, user.seed)
    node = Node(
        env, user.identity, host=user.host.address, udp_port=4000, tcp_port=4001, home=user.home, cert_cache=certs
    )
    user.node = node
    user.crashed = trio.Event()
    await nursery.start(_life, user, node, crash_at)
    try:
        await node.bootstrap([dht[user.seed % len(dht)].address])
    except* SimulatedCrash:
        # The commit hook fired in the bootstrap's own publish (called from here, not from the node's tasks).
        assert user.scope is not None
        user.scope.cancel()
        user.crashed.set()
    except* trio.ClosedResourceError:
        # It died during its start (a commit in one of its tasks): its sockets are closed.
        await trio.sleep(1)
        assert user.crashed.is_set()
    return node


async def _scenario(net: SimNetwork, tmp: Path, victim: str, crash_at: int) -> bool:
    """Alice sends to Bob; *victim* dies after its *crash_at*-th commit (counted from start).  Returns whether the
    crash happened (a point past the last commit is a run without a crash)."""
    certs = CertCache()
    async with trio.open_nursery() as nursery:
        dht, _ = await start_nodes(net, nursery, 10, seed=crash_at + 1, certs=certs)
        users = {
            name: User(name, Identity.from_seed(bytes([i + 1]) * 32), tmp / name, net.add_host(), i + 1)
            for i, name in enumerate(("alice", "bob"))
        }
        alice, bob = users["alice"], users["bob"]
        for user in (alice, bob):
            await _start(user, nursery, dht, certs, crash_at if user.name == victim else None)
        sent = 0
        while sent < MESSAGES and not alice.crashed.is_set():
            try:
                assert alice.node is not None
                alice.node.send(bob.identity.public.key, f"message {sent}")
            except SimulatedCrash:
                # The commit landed; the caller was never told "queued"; the process is gone.
                assert alice.scope is not None
                alice.scope.cancel()
                alice.crashed.set()
            sent += 1
            await trio.sleep(1)
        with trio.move_on_after(3600):
            await users[victim].crashed.wait()
        crashed = users[victim].crashed.is_set()
        if crashed:
            await trio.sleep(30)
            await _start(users[victim], nursery, dht, certs, None)
            if victim == "alice":  # what Alice was never told was queued, she sends again after the restart
                assert alice.node is not None
                queued = {m.text for m in alice.node.history()}
                for i in range(MESSAGES):
                    if f"message {i}" not in queued:
                        alice.node.send(bob.identity.public.key, f"message {i}")
        assert alice.node is not None and bob.node is not None
        with trio.fail_after(12 * 3600):
            while True:
                outgoing = [m for m in alice.node.history() if m.outgoing]
                if len(outgoing) == MESSAGES and all(m.state is MessageState.DELIVERED for m in outgoing):
                    break
                await trio.sleep(60)
        texts = sorted(m.text for m in bob.node.history() if not m.outgoing)
        assert texts == [f"message {i}" for i in range(MESSAGES)]  # every one, once
        nursery.cancel_scope.cancel()
    return crashed


@pytest.mark.parametrize("victim", ["alice", "bob"])
async def test_a_crash_after_any_commit_loses_nothing(
    victim: str, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    crash_at = 1
    crashes = 0
    while True:
        async with open_sim_network(crash_at, default_link=LINK) as net:
            crashed = await _scenario(net, tmp_path / f"{victim}-{crash_at}", victim, crash_at)
        if not crashed:
            break  # past the last commit of the exchange
        crashes += 1
        crash_at += 1
        assert crash_at < 200, "the exchange should not need this many commits"
    assert crashes >= 5
