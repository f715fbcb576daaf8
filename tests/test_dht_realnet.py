"""The DHT on real UDP sockets on 127.0.0.1: thirty nodes store and find records and mailbox entries, and a
node's store survives a restart.

All nodes share 127.0.0.1, so they run with ``DhtConfig.single_host()``: per-source quotas raised to the total and
the per-source rate limit off (otherwise every node would count every other node's traffic as one source's).
Each step waits with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from p2pchat.core.identity import Identity
from p2pchat.core.records import (
    RecordKind,
    entry_expiry,
    mailbox_key,
    make_entry,
    record_key,
    sign_record,
)
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.dht.store import SqliteBackend, Store
from p2pchat.env import Env

pytestmark = pytest.mark.realnet

DEADLINE = 30.0
"""Seconds any one step may take on a loaded CI machine (each normally takes milliseconds)."""


async def test_thirty_nodes_on_loopback_store_and_find(tmp_path: Path) -> None:
    rng = random.Random(1)
    config = DhtConfig.single_host()
    async with trio.open_nursery() as nursery:
        nodes: list[DhtNode] = []
        with trio.fail_after(DEADLINE):
            for _ in range(30):
                env = Env.real()
                node = DhtNode(env, Identity.generate(env.random_bytes), host="127.0.0.1", config=config)
                await nursery.start(node.run)
                if nodes:
                    assert await node.bootstrap([nodes[rng.randrange(len(nodes))].address]) == 1
                nodes.append(node)
        assert all(len(node.routing) >= 10 for node in nodes)

        owners = [Identity.generate(rng.randbytes) for _ in range(5)]
        records = []
        with trio.fail_after(DEADLINE):
            expires = int(nodes[0].env.wall_time()) + 3600
            for owner in owners:
                record = sign_record(owner, RecordKind.PEER, 1, expires, rng.randbytes(300))
                put = await nodes[rng.randrange(30)].put_record(record)
                assert put.stored >= 19
                records.append(record)
        with trio.fail_after(DEADLINE):
            for node in nodes:
                for owner, record in zip(owners, records, strict=True):
                    assert (await node.get_record(RecordKind.PEER, owner.public.key)).record == record

        mailbox = Identity.generate(rng.randbytes)
        mbox = mailbox_key(mailbox.public.key)
        entries = [make_entry(mbox, rng.randbytes(3000), entry_expiry(nodes[0].env.wall_time())) for _ in range(3)]
        with trio.fail_after(DEADLINE):
            for i, entry in enumerate(entries):
                assert (await nodes[i].append_entry(mbox, entry)).stored >= 19
            fetched = await nodes[-1].fetch_mailbox(mbox)
        assert {e.entry_id for e in fetched.entries} == {e.entry_id for e in entries}
        nursery.cancel_scope.cancel()


async def test_a_restarted_node_still_serves_what_it_stored(tmp_path: Path) -> None:
    rng = random.Random(2)
    config = DhtConfig.single_host()
    path = tmp_path / "dht.sqlite"
    identity = Identity.generate(rng.randbytes)
    owner = Identity.generate(rng.randbytes)
    async with trio.open_nursery() as nursery:
        env = Env.real()
        other = DhtNode(env, Identity.generate(env.random_bytes), host="127.0.0.1", config=config)
        await nursery.start(other.run)
        record = sign_record(owner, RecordKind.PEER, 4, int(env.wall_time()) + 3600, b"kept across restarts")
        key = record_key(RecordKind.PEER, owner.public.key)

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as first_life:
                store = Store(identity.public.node_id, config.store_limits, SqliteBackend(path), now=env.wall_time())
                keeper = DhtNode(env, identity, host="127.0.0.1", config=config, store=store)
                await first_life.start(keeper.run)
                await keeper.bootstrap([other.address])
                # Two nodes: both are among the closest, so the other stores at the keeper.
                assert (await other.put_record(record)).stored == 2
                assert keeper.store.record(key, env.wall_time()) is not None
                port = keeper.address.port
                first_life.cancel_scope.cancel()
            store.close()

        with trio.fail_after(DEADLINE):
            store = Store(identity.public.node_id, config.store_limits, SqliteBackend(path), now=env.wall_time())
            keeper = DhtNode(env, identity, host="127.0.0.1", port=port, config=config, store=store)
            await nursery.start(keeper.run)
            await keeper.bootstrap([other.address])
            other.store.sweep(env.wall_time() + 7200)  # the other copy is gone: only the restarted keeper has it
            assert other.store.record(key, env.wall_time() + 7200) is None
            got = await other.get_record(RecordKind.PEER, owner.public.key)
        assert got.record == record
        store.close()
        nursery.cancel_scope.cancel()
