"""Each of the DHT node's own limits, reached: published records, remembered store transfers, mailbox pages, ids
per reply, and part retries over a lossy link."""

from __future__ import annotations

import random
from typing import Any

import trio
import trio.testing

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.packets import MAX_ENTRY_IDS_PER_REPLY, EntryIds, FindValue, Found, ListEntries, Store, Stored
from p2pchat.core.parts import make_parts
from p2pchat.core.records import (
    MAX_VALUE_BYTES,
    RecordKind,
    encode_record,
    entry_expiry,
    mailbox_key,
    make_entry,
    record_key,
    sign_record,
)
from p2pchat.core.schema import Packet
from p2pchat.dht.node import (
    MAX_MAILBOX_PAGES,
    MAX_PUBLISHED,
    MAX_RECENT_STORES,
    SERVED_KEYS_REMEMBERED,
    DhtNode,
)
from p2pchat.dht.rpc import RpcTransport
from p2pchat.dht.store import Space
from p2pchat.env import Env
from p2pchat.net.base import Address
from p2pchat.net.sim import LinkModel, Uniform, open_sim_network

from dhtsim import LINK, start_nodes


async def test_at_most_max_published_records_are_republished(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(31, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 3, seed=31)
        rng = random.Random(1)
        expires = int(nodes[0].env.wall_time()) + 24 * 3600
        for _ in range(MAX_PUBLISHED + 5):
            owner = Identity.generate(rng.randbytes)
            await nodes[0].put_record(sign_record(owner, RecordKind.PEER, 1, expires, b"x"))
        assert await nodes[0].republish() == MAX_PUBLISHED
        nursery.cancel_scope.cancel()


async def test_remembered_store_transfers_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(32, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 2, seed=32)
        target = nodes[0]
        host = net.add_host()
        endpoint = await host.open_datagram(host.address, 5000)
        me = RpcTransport(Env.simulated(host, 1), endpoint, lambda p, s: None, reply_types=(Found, Stored))
        await nursery.start(me.run)
        owner = Identity.generate(random.Random(2).randbytes)
        key = record_key(RecordKind.PEER, owner.public.key)
        found = await me.request(FindValue(me.new_txid(), None, key.bytes, 1), target.address)
        assert isinstance(found, Found)
        blob = encode_record(sign_record(owner, RecordKind.PEER, 1, int(target.env.wall_time()) + 3600, b"v"))
        for i in range(MAX_RECENT_STORES + 10):
            (part,) = make_parts(blob, i.to_bytes(8, "big"))
            reply = await me.request(Store(me.new_txid(), key.bytes, 1, found.token, part), target.address)
            assert isinstance(reply, Stored) and reply.complete
        assert len(target._recent_stores) == MAX_RECENT_STORES
        nursery.cancel_scope.cancel()


async def test_contacts_remembered_for_stores_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(33, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 6, seed=33)
        target = nodes[0]
        host = net.add_host()
        endpoint = await host.open_datagram(host.address, 5000)
        me = RpcTransport(Env.simulated(host, 1), endpoint, lambda p, s: None, reply_types=(Found, Stored))
        await nursery.start(me.run)
        rng = random.Random(3)
        owners = [Identity.generate(rng.randbytes) for _ in range(SERVED_KEYS_REMEMBERED + 5)]
        tokens = {}
        for owner in owners:
            key = record_key(RecordKind.PEER, owner.public.key)
            found = await me.request(FindValue(me.new_txid(), None, key.bytes, 1), target.address)
            assert isinstance(found, Found)
            tokens[key] = found.token
        assert len(target._served) == SERVED_KEYS_REMEMBERED
        # A store under a key answered long ago (forgotten) and under a recent one: both mark the closest nodes
        # as holders, for hand-over.
        for transfer, owner in enumerate((owners[0], owners[-1])):
            key = record_key(RecordKind.PEER, owner.public.key)
            blob = encode_record(sign_record(owner, RecordKind.PEER, 1, int(target.env.wall_time()) + 3600, b"v"))
            (part,) = make_parts(blob, transfer.to_bytes(8, "big"))
            reply = await me.request(Store(me.new_txid(), key.bytes, 1, tokens[key], part), target.address)
            assert isinstance(reply, Stored) and reply.complete
            held = target._handed[(Space.RECORD, key)]
            assert held == {c.node_id.bytes for c in target.routing.closest(key, target.k)}
        nursery.cancel_scope.cancel()


class _EndlessMailbox(DhtNode):
    """Claims a mailbox with ever more entries: every page says there is another."""

    def _handle(self, packet: Packet, source: Address) -> Packet | None:
        if isinstance(packet, FindValue):
            token = self.tokens.issue(source.host, NodeId(packet.key), trio.current_time())
            return Found(packet.txid, self.cert, (), token, None, None, 1_000_000)
        if isinstance(packet, ListEntries):
            # Pages by where they start: a request sent again (RETRANSMITS) asks for the same page.
            self.pages_asked.add(packet.after)
            start = int.from_bytes(packet.after or bytes(16), "big") + 1
            ids = tuple((start + i).to_bytes(16, "big") for i in range(MAX_ENTRY_IDS_PER_REPLY))
            return EntryIds(packet.txid, ids, True)
        return super()._handle(packet, source)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pages_asked: set[bytes] = set()


async def test_mailbox_listing_stops_after_max_pages(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(33, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 3, seed=33)
        liars, _ = await start_nodes(
            net, nursery, 1, seed=34, bootstrap_from=nodes, certs=nodes[0].certs, factory=_EndlessMailbox
        )
        liar = liars[0]
        assert isinstance(liar, _EndlessMailbox)
        mbox = mailbox_key(Identity.generate(random.Random(3).randbytes).public.key)
        with trio.fail_after(3600):
            result = await nodes[0].fetch_mailbox(mbox)
        assert result.entries == []
        assert len(liar.pages_asked) == MAX_MAILBOX_PAGES
        nursery.cancel_scope.cancel()


async def test_entry_ids_come_in_pages(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(35, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 3, seed=35)
        mailbox = Identity.generate(random.Random(4).randbytes)
        mbox = mailbox_key(mailbox.public.key)
        wall = nodes[0].env.wall_time()
        entries = [make_entry(mbox, i.to_bytes(2, "big"), entry_expiry(wall)) for i in range(150)]
        for entry in entries:
            await nodes[0].append_entry(mbox, entry)
        ids, more = nodes[1].store.mailbox_ids(mbox, wall, b"", MAX_ENTRY_IDS_PER_REPLY)
        assert len(ids) == MAX_ENTRY_IDS_PER_REPLY and more
        fetched = await nodes[2].fetch_mailbox(mbox)
        assert len(fetched.entries) == 150
        nursery.cancel_scope.cancel()


async def test_parts_are_retried_over_a_lossy_link(autojump_clock: trio.testing.MockClock) -> None:
    lossy = LinkModel(latency=Uniform(0.010, 0.060), loss=0.1)
    async with open_sim_network(36, default_link=lossy) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 30, seed=36)
        rng = random.Random(5)
        owner = Identity.generate(rng.randbytes)
        expires = int(nodes[0].env.wall_time()) + 3600
        record = sign_record(owner, RecordKind.PEER, 1, expires, rng.randbytes(MAX_VALUE_BYTES))
        put = await nodes[0].put_record(record)
        assert put.stored >= 14  # 65 parts to each of 20 nodes, 10% of datagrams lost each way
        assert (await nodes[29].get_record(RecordKind.PEER, owner.public.key)).record == record
        assert net.stats.lost > 100
        nursery.cancel_scope.cancel()


async def test_hand_over_memory_follows_the_store(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(37, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 25, seed=37)
        rng = random.Random(6)
        expires = int(nodes[0].env.wall_time()) + 600
        for _ in range(5):
            owner = Identity.generate(rng.randbytes)
            await nodes[0].put_record(sign_record(owner, RecordKind.PEER, 1, expires, b"short-lived"))
        assert sum(len(n._handed) for n in nodes) > 0
        await trio.sleep(900)  # the records expire, are swept, and the memory of who holds them goes too
        assert all(len(n.store) == 0 for n in nodes)
        assert sum(len(n._handed) for n in nodes) == 0
        nursery.cancel_scope.cancel()
