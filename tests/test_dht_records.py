"""Records and mailboxes over the DHT on SimNetwork (virtual time, seeded): every node finds every record, records
survive dead nodes and the departure of all their first storers, values of 64 KiB travel in parts, write tokens,
quotas and rate limits hold, forged and stale records lose, lying nodes do not break gets, client mode."""

from __future__ import annotations

import math
import random

import trio
import trio.testing

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.packets import ErrorCode, ErrorReply, FindValue, Found, LookupSpace, NodeInfo, Nodes, Ping, Store
from p2pchat.core.parts import make_parts
from p2pchat.core.ratelimit import DEFAULT_BURST
from p2pchat.core.records import (
    MAX_VALUE_BYTES,
    RecordKind,
    SignedRecord,
    encode_entry,
    encode_record,
    encode_tombstone,
    entry_expiry,
    mailbox_key,
    make_entry,
    record_key,
    sign_record,
    sign_tombstone,
)
from p2pchat.core.routing import K
from p2pchat.core.schema import Packet
from p2pchat.core.tokens import TOKEN_ROTATION
from p2pchat.dht.node import (
    HANDOVER_FAR_RECHECK,
    HANDOVER_GIVER_SEEN_WITHIN,
    HANDOVER_GIVERS,
    HANDOVER_INTERVAL,
    REPUBLISH_INTERVAL,
    DhtConfig,
    DhtNode,
)
from p2pchat.dht.rpc import RpcTransport
from p2pchat.dht.store import Space, StoreLimits
from p2pchat.env import Env
from p2pchat.net.base import Address
from p2pchat.net.sim import SimNetwork, open_sim_network

from dhtsim import LINK, start_nodes, true_closest


def _record(env: Env, owner: Identity, seq: int, value: bytes, ttl: int = 24 * 3600) -> SignedRecord:
    return sign_record(owner, RecordKind.PEER, seq, int(env.wall_time()) + ttl, value)


def _holders(nodes: list[DhtNode], key: NodeId) -> list[DhtNode]:
    return [n for n in nodes if n.store.record(key, n.env.wall_time()) is not None]


async def _raw_client(net: SimNetwork, nursery: trio.Nursery) -> RpcTransport:
    """A bare transport on its own host: a peer that speaks the protocol by hand (and may lie)."""
    host = net.add_host()
    env = Env.simulated(host, 99)
    endpoint = await host.open_datagram(host.address, 5000)
    transport = RpcTransport(
        env, endpoint, lambda packet, source: None, reply_types=(Found, Nodes, ErrorReply, *_reply_types())
    )
    await nursery.start(transport.run)
    return transport


def _reply_types() -> tuple[type[Packet], ...]:
    from p2pchat.core.packets import EntryIds, PartReply, Pong, Stored  # noqa: PLC0415

    return (EntryIds, PartReply, Pong, Stored)


async def test_every_node_finds_every_record_even_with_a_fifth_dead(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(11, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, hosts = await start_nodes(net, nursery, 200, seed=11)
        rng = random.Random(1)
        owners = [Identity.generate(rng.randbytes) for _ in range(4)]
        records = {}
        for i, owner in enumerate(owners):
            putter = nodes[rng.randrange(len(nodes))]
            record = _record(putter.env, owner, 1, f"where owner {i} is".encode())
            put = await putter.put_record(record)
            assert put.stored >= 19
            records[owner.public.key] = record
        for node in nodes:
            for owner_key, record in records.items():
                got = await node.get_record(RecordKind.PEER, owner_key)
                assert got.record == record
                assert not got.conflict and got.invalid == 0
        # A mailbox too, then a fifth of the nodes die at once.
        mailbox = Identity.generate(rng.randbytes)
        mbox = mailbox_key(mailbox.public.key)
        entries = [make_entry(mbox, bytes([i]) * 200, entry_expiry(nodes[0].env.wall_time())) for i in range(6)]
        for i, entry in enumerate(entries):
            assert (await nodes[i].append_entry(mbox, entry)).stored >= 19
        dead = set(rng.sample(range(len(nodes)), 40))
        for index in dead:
            hosts[index].set_down()
        alive = [n for i, n in enumerate(nodes) if i not in dead]
        for _ in range(40):
            asker = alive[rng.randrange(len(alive))]
            owner_key, record = rng.choice(list(records.items()))
            assert (await asker.get_record(RecordKind.PEER, owner_key)).record == record
        fetched = await alive[0].fetch_mailbox(mbox)
        assert sorted(e.entry_id for e in fetched.entries) == sorted(e.entry_id for e in entries)
        nursery.cancel_scope.cancel()


async def test_a_record_outlives_all_its_first_storers(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(12, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, hosts = await start_nodes(net, nursery, 60, seed=12)
        rng = random.Random(2)
        owner = Identity.generate(rng.randbytes)
        key = record_key(RecordKind.PEER, owner.public.key)
        record = _record(nodes[0].env, owner, 7, b"handed over")
        await nodes[0].put_record(record)
        first = {id(n) for n in _holders(nodes, key)}
        assert len(first) >= 20
        # Newcomers join; within a hand-over interval or two the storers give them the record.
        newcomers, _ = await start_nodes(net, nursery, 60, seed=13, bootstrap_from=nodes, certs=nodes[0].certs)
        await trio.sleep(3 * HANDOVER_INTERVAL)
        everyone = nodes + newcomers
        assert sum(n.handovers for n in nodes) > 0
        for node, host in zip(nodes, hosts, strict=True):
            if id(node) in first and node is not nodes[0]:
                host.set_down()
        live_holders = [n for n in _holders(everyone, key) if id(n) not in first]
        assert live_holders, "no newcomer was handed the record"
        got = await newcomers[-1].get_record(RecordKind.PEER, owner.public.key)
        assert got.record == record

        # Republish: a second record whose storers all die at once, before any hand-over; its owner puts it again.
        owner2 = Identity.generate(rng.randbytes)
        key2 = record_key(RecordKind.PEER, owner2.public.key)
        publisher = newcomers[0]
        record2 = _record(publisher.env, owner2, 1, b"republished")
        await publisher.put_record(record2)
        for node in _holders(everyone, key2):
            if node is not publisher:
                net.host_of(node.host).set_down()  # type: ignore[union-attr]
        asker = next(n for n in newcomers[1:] if n.store.record(key2, n.env.wall_time()) is None and n.routing)
        assert (await asker.get_record(RecordKind.PEER, owner2.public.key)).record in (None, record2)
        await trio.sleep(REPUBLISH_INTERVAL * 1.2)
        got = await asker.get_record(RecordKind.PEER, owner2.public.key)
        assert got.record == record2
        nursery.cancel_scope.cancel()


async def test_mailbox_append_fetch_delete_and_the_largest_values(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(14, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 50, seed=14)
        rng = random.Random(3)
        mailbox = Identity.generate(rng.randbytes)
        mbox = mailbox_key(mailbox.public.key)
        wall = nodes[0].env.wall_time()
        entries = [make_entry(mbox, rng.randbytes(100 + i), entry_expiry(wall)) for i in range(5)]
        entries.append(make_entry(mbox, rng.randbytes(MAX_VALUE_BYTES), entry_expiry(wall)))  # 65 parts
        for i, entry in enumerate(entries):
            assert (await nodes[i].append_entry(mbox, entry)).stored >= 19
        fetched = await nodes[40].fetch_mailbox(mbox)
        assert sorted(fetched.entries, key=lambda e: e.entry_id) == sorted(entries, key=lambda e: e.entry_id)
        assert fetched.holders >= 19 and fetched.invalid == 0
        tombstone = sign_tombstone(mailbox, [e.entry_id for e in entries[:3]], int(wall))
        assert (await nodes[40].delete_entries(tombstone)).stored >= 19
        fetched = await nodes[41].fetch_mailbox(mbox)
        assert {e.entry_id for e in fetched.entries} == {e.entry_id for e in entries[3:]}
        # A deleted entry cannot be put back.
        assert (await nodes[5].append_entry(mbox, entries[0])).stored == 0
        # A record of the largest size travels in parts, there and back.
        owner = Identity.generate(rng.randbytes)
        big = _record(nodes[0].env, owner, 1, rng.randbytes(MAX_VALUE_BYTES))
        assert (await nodes[1].put_record(big)).stored >= 19
        assert (await nodes[30].get_record(RecordKind.PEER, owner.public.key)).record == big
        nursery.cancel_scope.cancel()


async def test_hand_over_gives_a_tombstone_only_where_it_deletes_something(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every tombstone to every newcomer made hand-over traffic grow for as long as a mailbox was in use.
    async with open_sim_network(19, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 6, seed=19)
        giver, stale, fresh = nodes[0], nodes[1], nodes[2]
        rng = random.Random(5)
        mailbox = Identity.generate(rng.randbytes)
        mbox = mailbox_key(mailbox.public.key)
        wall = giver.env.wall_time()
        gone, kept = (make_entry(mbox, rng.randbytes(50), entry_expiry(wall)) for _ in range(2))
        tombstone = sign_tombstone(mailbox, [gone.entry_id], int(wall))
        assert giver.store.put(Space.ENTRY, mbox, encode_entry(kept), "10.0.0.1", wall)
        assert giver.store.put(Space.TOMBSTONE, mbox, encode_tombstone(tombstone), "10.0.0.1", wall)
        assert stale.store.put(Space.ENTRY, mbox, encode_entry(gone), "10.0.0.1", wall)  # away when it was deleted

        def held(node: DhtNode) -> tuple[set[bytes], int]:
            items = node.store.items_for(Space.ENTRY, mbox)
            return {i.item_id for i in items if i.space is Space.ENTRY}, sum(i.space is Space.TOMBSTONE for i in items)

        for node in (stale, fresh):
            contact = giver.routing.get(node.node_id)
            assert contact is not None
            assert await giver._give(contact, Space.ENTRY, mbox)
        assert held(stale) == ({kept.entry_id}, 1)  # the tombstone deleted what it held
        assert held(fresh) == ({kept.entry_id}, 0)  # nothing for the tombstone to delete: not sent
        nursery.cancel_scope.cancel()


async def test_stores_need_a_fresh_token_for_this_address_and_key(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(15, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 5, seed=15)
        target = nodes[0]
        me, other = await _raw_client(net, nursery), await _raw_client(net, nursery)
        owner = Identity.generate(random.Random(4).randbytes)
        key = record_key(RecordKind.PEER, owner.public.key)
        part = make_parts(encode_record(_record(target.env, owner, 1, b"x")), bytes(8))[0]

        async def find(transport: RpcTransport, for_key: NodeId) -> bytes:
            reply = await transport.request(
                FindValue(transport.new_txid(), None, for_key.bytes, int(LookupSpace.RECORD)), target.address
            )
            assert isinstance(reply, Found)
            return reply.token

        async def store(transport: RpcTransport, token: bytes, transfer: bytes = bytes(8)) -> Packet:
            packet = Store(transport.new_txid(), key.bytes, 1, token, part.__class__(transfer, *_rest(part)))
            return await transport.request(packet, target.address)

        token = await find(me, key)
        refused = [
            await store(me, bytes(16)),  # made up
            await store(other, token),  # someone else's
            await store(me, await find(me, NodeId(bytes(20)))),  # for another key
        ]
        assert all(isinstance(r, ErrorReply) and r.code == ErrorCode.BAD_TOKEN for r in refused)
        assert target.store.record(key, target.env.wall_time()) is None
        await trio.sleep(TOKEN_ROTATION + 1)
        reply = await store(me, token, b"\x01" * 8)  # one rotation later: still good
        assert not isinstance(reply, ErrorReply)
        assert target.store.record(key, target.env.wall_time()) is not None
        await trio.sleep(2 * TOKEN_ROTATION + 1)
        reply = await store(me, token, b"\x02" * 8)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_TOKEN
        nursery.cancel_scope.cancel()


def _rest(part: object) -> tuple[object, ...]:
    return (part.index, part.total, part.digest, part.chunk)  # type: ignore[attr-defined]


async def test_quotas_forgeries_and_stale_records_over_the_network(autojump_clock: trio.testing.MockClock) -> None:
    config = DhtConfig(store_limits=StoreLimits(per_source_bytes=20_000))
    async with open_sim_network(16, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 5, seed=16, config=config)
        target = nodes[0]
        me = await _raw_client(net, nursery)
        rng = random.Random(5)
        owner = Identity.generate(rng.randbytes)
        key = record_key(RecordKind.PEER, owner.public.key)

        async def put(blob: bytes, space: int, under: NodeId) -> Packet:
            found = await me.request(
                FindValue(me.new_txid(), None, under.bytes, 1 if space == 1 else 2), target.address
            )
            assert isinstance(found, Found)
            last: Packet | None = None
            for part in make_parts(blob, rng.randbytes(8)):
                last = await me.request(Store(me.new_txid(), under.bytes, space, found.token, part), target.address)
            assert last is not None
            return last

        def code(reply: Packet) -> int | None:
            return reply.code if isinstance(reply, ErrorReply) else None

        good = _record(target.env, owner, 5, b"v5")
        assert code(await put(encode_record(good), 1, key)) is None
        forged = bytearray(encode_record(_record(target.env, owner, 9, b"v9")))
        forged[-1] ^= 0x80
        assert code(await put(bytes(forged), 1, key)) == ErrorCode.INVALID
        assert code(await put(encode_record(_record(target.env, owner, 4, b"v4")), 1, key)) == ErrorCode.STALE
        assert code(await put(encode_record(_record(target.env, owner, 5, b"other")), 1, key)) == ErrorCode.STALE
        stranger = Identity.generate(rng.randbytes)
        misplaced = _record(target.env, stranger, 10, b"not yours")
        assert code(await put(encode_record(misplaced), 1, key)) == ErrorCode.INVALID
        item = target.store.record(key, target.env.wall_time())
        assert item is not None and item.seq == 5
        # The per-source quota (20,000 bytes here) is reached, and refusals say so.
        mbox = mailbox_key(Identity.generate(rng.randbytes).public.key)
        codes = []
        for i in range(30):
            entry = make_entry(mbox, bytes([i]) * 1000, entry_expiry(target.env.wall_time()))
            codes.append(code(await put(encode_entry(entry), 2, mbox)))
        assert codes[0] is None and ErrorCode.QUOTA in codes
        assert target.store.source_bytes(me.local_address.host) <= 20_000
        nursery.cancel_scope.cancel()


class _Liar(DhtNode):
    """Answers lookups with made-up contacts and claims to hold a newer version of every record it is asked about,
    which it then serves as garbage."""

    def _handle(self, packet: Packet, source: Address) -> Packet | None:
        rng = self.env.rng
        fake = tuple(NodeInfo(rng.randbytes(20), f"10.99.{rng.randrange(256)}.1", 4000) for _ in range(20))
        if isinstance(packet, FindValue):
            token = self.tokens.issue(source.host, NodeId(packet.key), trio.current_time())
            return Found(packet.txid, self.cert, fake, token, 1 << 40, rng.randbytes(16), 0)
        if isinstance(packet, Ping):
            return super()._handle(packet, source)
        if rng.random() < 0.5:
            return None  # silence
        return super()._handle(packet, source)


async def test_lying_and_silent_nodes_do_not_break_gets(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(17, default_link=LINK) as net, trio.open_nursery() as nursery:
        honest, _ = await start_nodes(net, nursery, 80, seed=17)
        await start_nodes(net, nursery, 20, seed=18, bootstrap_from=honest, factory=_Liar)
        await trio.sleep(600)  # let the liars spread into routing tables
        rng = random.Random(6)
        invalid = 0
        for _ in range(10):
            owner = Identity.generate(rng.randbytes)
            record = _record(honest[0].env, owner, 3, rng.randbytes(50))
            await honest[rng.randrange(80)].put_record(record)
            got = await honest[rng.randrange(80)].get_record(RecordKind.PEER, owner.public.key)
            assert got.record == record
            invalid += got.invalid
        assert invalid > 0  # the liars' "newer versions" were fetched, checked and refused
        assert sum(n.transport.stats.timeouts for n in honest) > 0
        nursery.cancel_scope.cancel()


async def test_a_flood_from_one_source_is_rate_limited(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(19, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 10, seed=19)
        victim = nodes[0]
        flood = await _raw_client(net, nursery)
        for _ in range(3000):
            flood.send(Ping(flood.new_txid(), None), victim.address)
        await trio.sleep(1)
        assert victim.transport.stats.dropped_rate_limited >= 3000 - DEFAULT_BURST - 250
        assert victim.limiter.dropped == victim.transport.stats.dropped_rate_limited
        # Everyone else is still served.
        assert await nodes[3].ping(victim.address) == victim.node_id
        nursery.cancel_scope.cancel()


async def test_a_client_mode_node_asks_but_is_never_listed(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(20, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 30, seed=20)
        clients, _ = await start_nodes(
            net, nursery, 1, seed=21, bootstrap_from=nodes, certs=nodes[0].certs, config=DhtConfig(client_mode=True)
        )
        client = clients[0]
        owner = Identity.generate(random.Random(7).randbytes)
        record = _record(client.env, owner, 1, b"from a client")
        assert (await client.put_record(record)).stored >= 19
        assert (await nodes[10].get_record(RecordKind.PEER, owner.public.key)).record == record
        assert (await client.get_record(RecordKind.PEER, owner.public.key)).record == record
        await trio.sleep(3600)
        assert all(node.routing.get(client.node_id) is None for node in nodes)
        assert len(client.store) == 0
        assert len(client.routing) > 0
        assert client.compat_put(bytes(20), b"\x01", client.address, client.env.wall_time()) is False
        nursery.cancel_scope.cancel()


async def test_compat_values_are_kept_apart(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(22, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 3, seed=22)
        node = nodes[0]
        owner = Identity.generate(random.Random(8).randbytes)
        key = record_key(RecordKind.PEER, owner.public.key)
        await node.put_record(_record(node.env, owner, 1, b"signed"))
        wall = node.env.wall_time()
        assert node.compat_put(key.bytes, b"\xa5plain", Address("10.7.0.1", 1), wall)
        assert node.compat_get(key.bytes, wall) == b"\xa5plain"
        item = node.store.record(key, wall)
        assert item is not None and item.seq == 1  # the signed record under the same key is untouched
        assert node.store.items_for(Space.COMPAT, key)[0].blob == b"\xa5plain"
        nursery.cancel_scope.cancel()


class _OddRefuser(DhtNode):
    """Refuses every store with an error code no version of the protocol defines."""

    def _handle(self, packet: Packet, source: Address) -> Packet | None:
        if isinstance(packet, Store):
            return ErrorReply(packet.txid, 60000, "\u00e9" * 100)
        return super()._handle(packet, source)


async def test_unknown_error_codes_are_only_refusals(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(23, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 10, seed=23)
        await start_nodes(net, nursery, 5, seed=24, bootstrap_from=nodes, certs=nodes[0].certs, factory=_OddRefuser)
        owner = Identity.generate(random.Random(9).randbytes)
        put = await nodes[0].put_record(_record(nodes[0].env, owner, 1, b"v"))
        assert 0 < put.stored < put.asked + 1
        assert (await nodes[3].get_record(RecordKind.PEER, owner.public.key)).record is not None
        nursery.cancel_scope.cancel()


async def _churned_key(seed: int) -> tuple[int, int, bool]:
    """Put a record on 150 nodes, replace 15 of them every 5 minutes for an hour; how many of the key's k closest
    live nodes hold it, how many live nodes hold it, and whether a get still finds it."""
    async with open_sim_network(seed, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, hosts = await start_nodes(net, nursery, 150, seed=seed)
        rng = random.Random(seed - 10)
        owner = Identity.generate(rng.randbytes)
        key = record_key(RecordKind.PEER, owner.public.key)
        record = _record(nodes[0].env, owner, 1, b"stays near its key")
        await nodes[0].put_record(record)
        alive = dict(zip(nodes[1:], hosts[1:], strict=True))  # the owner stays, so it republishes
        for round_ in range(12):
            for node in rng.sample(sorted(alive, key=lambda n: n.node_id), 15):
                alive.pop(node).set_down()
            joined, joined_hosts = await start_nodes(
                net, nursery, 15, seed=seed + 6 + round_, bootstrap_from=list(alive), certs=nodes[0].certs
            )
            alive.update(zip(joined, joined_hosts, strict=True))
            await trio.sleep(5 * HANDOVER_INTERVAL)
        live = [nodes[0], *alive]
        holders = {n.node_id for n in _holders(live, key)}
        closest = set(true_closest(live, key))
        found = (await live[-1].get_record(RecordKind.PEER, owner.public.key)).record == record
        nursery.cancel_scope.cancel()
    return len(closest & holders), len(holders), found


async def test_hand_over_keeps_a_key_near_its_closest_nodes(autojump_clock: trio.testing.MockClock) -> None:
    # Under churn at a steady size, the live holders of a key must stay the nodes near it.  If every holder handed
    # over to the closest nodes *it* knew (its table is complete near its own id, not near the key), the key would
    # spread outward with each round of joins and hand-over traffic would grow without end.  Four seeds, because
    # one run's count moves by two or three with any change to the timing of anything (measured over 20 seeds of
    # this workload: mean 18.55 of the 20 closest, fewest 14).
    runs = [await _churned_key(seed) for seed in (14, 15, 16, 17)]
    assert all(found for _, _, found in runs)
    assert sum(near for near, _, _ in runs) / len(runs) >= 18, runs
    assert all(holders <= 30 for _, holders, _ in runs), runs


async def test_a_holder_counts_itself_far_out_past_offline_nodes(autojump_clock: trio.testing.MockClock) -> None:
    # With 15% of nodes offline, "the k closest contacts to the key are all live" almost never holds, and a node far
    # from a key went on as if it were responsible for it -- pinging, and giving the key to nodes that had it.  The
    # check counts k live ones among its 2k closest contacts instead.
    async with open_sim_network(18, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, hosts = await start_nodes(net, nursery, 3 * K, seed=18)
        owner = Identity.generate(random.Random(6).randbytes)
        key = record_key(RecordKind.PEER, owner.public.key)
        far = max(nodes, key=lambda n: n.node_id.distance(key))
        known = far.routing.closest(key, 2 * K)
        assert len(known) == 2 * K
        assert far.store.put(
            Space.RECORD, key, encode_record(_record(far.env, owner, 1, b"far")), "10.0.0.1", far.env.wall_time()
        )
        offline = {c.node_id for c in known[:3]}
        for node, host in zip(nodes, hosts, strict=True):
            if node.node_id in offline:
                host.set_down()
        for contact in known:
            contact.last_seen = -math.inf  # nobody heard from lately: each must answer a ping
        sent = far.transport.stats.requests_sent
        assert await far.hand_over() == 0  # far out: it gives nothing ...
        assert far.transport.stats.requests_sent - sent == K + len(offline)  # ... and pinged k + 3 to know it
        nursery.cancel_scope.cancel()


async def test_departed_holders_do_not_keep_the_live_ones_from_handing_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(17, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, hosts = await start_nodes(net, nursery, 12, seed=17)
        me = nodes[0]
        others = [me.routing.get(n.node_id) for n in nodes[1 : 2 + HANDOVER_GIVERS]]
        holders = [c for c in others if c is not None]
        assert len(holders) == 1 + HANDOVER_GIVERS
        # Heard from lately: they count without a word sent.
        sent = me.transport.stats.requests_sent
        assert await me._alive(holders, HANDOVER_GIVERS)
        assert me.transport.stats.requests_sent == sent

        # Unheard from for longer than HANDOVER_GIVER_SEEN_WITHIN: each is pinged, and the live ones count.  (Set
        # rather than waited for: in a network this small, the others' maintenance lookups ask everyone now and
        # then.)
        def unheard() -> None:
            for contact in holders:
                contact.last_seen = trio.current_time() - HANDOVER_GIVER_SEEN_WITHIN - 1

        hosts[1].set_down()
        unheard()
        assert await me._alive(holders, HANDOVER_GIVERS)  # one of 1 + HANDOVER_GIVERS left: enough answer
        assert me.transport.stats.requests_sent == sent + len(holders)
        # Too many departed: this node must give the key to the newcomers itself.
        hosts[2].set_down()
        unheard()
        assert not await me._alive(holders, HANDOVER_GIVERS)
        nursery.cancel_scope.cancel()


async def test_a_holder_outside_the_k_closest_it_knows_does_not_hand_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Without this rule keys spread outward: in the baseline simulation a record ended up on 135 live nodes.
    async with open_sim_network(18, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 40, seed=18)
        owner = Identity.generate(random.Random(6).randbytes)
        key = record_key(RecordKind.PEER, owner.public.key)
        blob = encode_record(_record(nodes[0].env, owner, 1, b"left behind"))
        by_distance = sorted(nodes, key=lambda n: n.node_id.distance(key))
        far, near = by_distance[-1], by_distance[0]
        assert (
            len([c for c in far.routing.closest(key, far.k) if c.node_id.distance(key) < far.node_id.distance(key)])
            == far.k
        )
        for node in (far, near):
            assert node.store.put(Space.RECORD, key, blob, "10.0.0.1", node.env.wall_time())
        sent = far.transport.stats.requests_sent
        assert await far.hand_over() == 0  # k nodes it knows are closer: not its job
        assert far.transport.stats.requests_sent == sent
        assert await near.hand_over() > 0  # the closest node gives it to its k closest

        # The far key then rests for HANDOVER_FAR_RECHECK: checking it again would ping every closer node not heard
        # from lately, for every far copy held.
        def forget_closer() -> None:
            for contact in far.routing.closest(key, far.k):
                contact.last_seen = -math.inf

        forget_closer()
        sent = far.transport.stats.requests_sent
        assert await far.hand_over() == 0
        assert far.transport.stats.requests_sent == sent
        await trio.sleep(HANDOVER_FAR_RECHECK)
        forget_closer()
        sent = far.transport.stats.requests_sent
        assert await far.hand_over() == 0  # checked again: each closer node is asked whether it is alive
        assert far.transport.stats.requests_sent - sent >= far.k
        nursery.cancel_scope.cancel()
