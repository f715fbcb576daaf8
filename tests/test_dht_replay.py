"""Replayed, reflected and unfinished packets at the DHT level (SimNetwork, virtual time, seeded): a reply counts
once and only from the address asked; a packet reflected back to its sender is dropped, never answered or looped;
a store replayed after its write token expired is refused; a peer that starts a multi-part store or fetch and
never finishes it leaves nothing behind for long, and the memory it can hold is bounded."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from p2pchat.core.framing import decode_datagram, encode_datagram
from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.packets import (
    EntryIds,
    ErrorCode,
    ErrorReply,
    FindNode,
    FindValue,
    Found,
    GetPart,
    ItemSpace,
    LookupSpace,
    Nodes,
    PartReply,
    Ping,
    Pong,
    Store,
    Stored,
)
from p2pchat.core.parts import (
    MAX_REASSEMBLY_BYTES,
    MAX_TRANSFERS_PER_SOURCE,
    PART_PAYLOAD_BYTES,
    TRANSFER_TIMEOUT,
    make_parts,
)
from p2pchat.core.records import (
    MAX_VALUE_BYTES,
    RecordKind,
    encode_entry,
    encode_record,
    entry_expiry,
    mailbox_key,
    make_entry,
    record_key,
    sign_record,
    sign_tombstone,
)
from p2pchat.core.schema import Packet
from p2pchat.core.tokens import TOKEN_ROTATION
from p2pchat.dht.node import MAINTENANCE_INTERVAL, PART_ATTEMPTS, DhtNode
from p2pchat.dht.rpc import RpcTransport, SelfRequestError
from p2pchat.env import Env
from p2pchat.net.base import Address
from p2pchat.net.sim import SimHost, SimNetwork, open_sim_network

from dhtsim import LINK, start_nodes

_REPLIES = (Pong, Nodes, Found, Stored, ErrorReply, PartReply, EntryIds)


async def _raw_client(net: SimNetwork, nursery: trio.Nursery, seed: int = 99) -> RpcTransport:
    """A bare transport on its own host: a peer that speaks the protocol by hand."""
    host = net.add_host()
    endpoint = await host.open_datagram(host.address, 5000)
    transport = RpcTransport(Env.simulated(host, seed), endpoint, lambda packet, source: None, reply_types=_REPLIES)
    await nursery.start(transport.run)
    return transport


def _spoof(net: SimNetwork, data: bytes, source: Address, destination: Address) -> None:
    """Put a datagram on the simulated wire with a forged source address (the network does not check it)."""
    sender = net.host_of(source.host)
    assert sender is not None
    net._send_datagram(sender, source, data, destination)


def _record_datagrams(net: SimNetwork, node: DhtNode) -> list[tuple[bytes, Address]]:
    """Every datagram sent to *node* from now on, as (bytes, source); the links lose nothing, so it receives them."""
    seen: list[tuple[bytes, Address]] = []
    send = net._send_datagram
    address = node.address

    def spy(src_host: SimHost, source: Address, data: bytes, destination: Address) -> None:
        if destination == address:
            seen.append((data, source))
        send(src_host, source, data, destination)

    net._send_datagram = spy  # type: ignore[method-assign]
    return seen


async def test_a_reply_replayed_later_or_from_another_address_is_not_an_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(61, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 12, seed=61)
        asker = nodes[0]
        seen = _record_datagrams(net, asker)
        target = NodeId(random.Random(1).randbytes(20))
        first = await asker.find_node(target, paths=1)
        replies = [(data, source) for data, source in seen if isinstance(decode_datagram(data), Nodes)]
        assert replies and all(source != asker.address for _, source in replies)
        stats = asker.transport.stats
        before = stats.dropped_unsolicited
        routing_before = {c.node_id for c in asker.routing}
        # The same replies again, from the address that sent them and from an attacker's: all dropped.
        attacker = net.add_host()
        for data, source in replies:
            _spoof(net, data, source, asker.address)
            _spoof(net, data, Address(attacker.address, source.port), asker.address)
        await trio.sleep(1)
        assert stats.dropped_unsolicited == before + 2 * len(replies)
        assert {c.node_id for c in asker.routing} == routing_before
        # A reply replayed while a new request to the same node is pending does not answer it (another txid): the
        # ping waits for the real pong.
        data, source = replies[0]
        async with trio.open_nursery() as inner:
            inner.start_soon(asker.ping, source)
            await trio.sleep(0.001)
            _spoof(net, data, source, asker.address)
        assert stats.dropped_unsolicited == before + 2 * len(replies) + 1
        again = await asker.find_node(target, paths=1)
        assert [c.node_id for c in again.contacts] == [c.node_id for c in first.contacts]
        nursery.cancel_scope.cancel()


async def test_a_reflected_request_is_dropped_and_a_node_never_asks_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(62, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 8, seed=62)
        victim, peer = nodes[0], nodes[1]
        stats = victim.transport.stats
        served = stats.requests_served
        sent = stats.requests_sent
        # A request with the source spoofed as the victim itself -- carrying the victim's own certificate, as a
        # replay of one of its own requests would: not answered, so nothing can bounce back and forth.
        for packet in (
            Ping(bytes(8), victim.cert),
            FindNode(bytes(8), victim.cert, peer.node_id.bytes),
            FindValue(bytes(8), victim.cert, peer.node_id.bytes, int(LookupSpace.RECORD)),
        ):
            _spoof(net, encode_datagram(packet), victim.address, victim.address)
        # A reply reflected to its sender likewise.
        _spoof(net, encode_datagram(Pong(bytes(8), victim.cert, victim.host, 4000)), victim.address, victim.address)
        await trio.sleep(1)
        assert stats.dropped_reflected == 4
        assert stats.requests_served == served
        assert stats.requests_sent == sent
        assert victim.node_id not in {c.node_id for c in victim.routing}
        # Its own request, addressed to itself, is never sent: it fails at once.
        start = trio.current_time()
        with pytest.raises(SelfRequestError):
            await victim.ping(victim.address)
        assert trio.current_time() == start
        assert stats.requests_sent == sent
        nursery.cancel_scope.cancel()


class _SelfNamer(DhtNode):
    """Names, in every lookup answer, a made-up node id next to the target at the asker's own address."""

    def _handle(self, packet: Packet, source: Address) -> Packet | None:
        reply = super()._handle(packet, source)
        if isinstance(packet, FindNode) and isinstance(reply, Nodes):
            fake = (NodeId(packet.target).int ^ 1).to_bytes(20, "big")
            info = type(reply.nodes[0])(fake, source.host, source.port) if reply.nodes else None
            if info is not None:
                return Nodes(reply.txid, reply.responder, (info, *reply.nodes[:-1]))
        return reply


async def test_a_lookup_does_not_ask_its_own_address_when_a_liar_names_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(63, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 10, seed=63)
        liars, _ = await start_nodes(
            net, nursery, 3, seed=64, bootstrap_from=nodes, certs=nodes[0].certs, factory=_SelfNamer
        )
        asker = nodes[0]
        sent = asker.transport.stats.requests_sent
        target = liars[0].node_id
        result = await asker.find_node(target, paths=1)
        assert result.contacts[0].node_id == target
        assert asker.transport.stats.dropped_reflected == 0
        stats = asker.transport.stats
        # The made-up node at our own address was handed out by the lookup but never sent, and cost no timeout.
        assert result.rpcs - (stats.requests_sent - sent) >= 1
        assert stats.timeouts == 0
        assert all(c.address != asker.address for c in result.contacts)
        nursery.cancel_scope.cancel()


async def test_a_store_replayed_after_its_token_expired_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(65, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 4, seed=65)
        target = nodes[0]
        me = await _raw_client(net, nursery)
        mailbox = Identity.generate(random.Random(5).randbytes)
        mbox = mailbox_key(mailbox.public.key)
        wall = target.env.wall_time()
        entry = make_entry(mbox, b"hello", entry_expiry(wall))
        found = await me.request(FindValue(me.new_txid(), None, mbox.bytes, int(LookupSpace.MAILBOX)), target.address)
        assert isinstance(found, Found)
        (part,) = make_parts(encode_entry(entry), bytes(8))
        store = Store(me.new_txid(), mbox.bytes, int(ItemSpace.ENTRY), found.token, part)
        reply = await me.request(store, target.address)
        assert isinstance(reply, Stored) and reply.complete
        # The owner deletes it; the same datagram replayed while the token lives gets the remembered answer and
        # does not bring the entry back.
        tombstone = sign_tombstone(mailbox, [entry.entry_id], int(wall))
        assert (await nodes[1].delete_entries(tombstone)).stored >= 1
        assert len(target.store) == 1  # the tombstone
        reply = await me.request(store, target.address)
        assert isinstance(reply, Stored)
        assert target.store.mailbox_ids(mbox, target.env.wall_time(), b"", 10)[0] == []
        # Once the token has expired, the replay is refused for its token before anything else is looked at.
        await trio.sleep(2 * TOKEN_ROTATION + 1)
        reply = await me.request(store, target.address)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_TOKEN
        # And a record put under an expired token, replayed to a node that never held it, is refused too.
        owner = Identity.generate(random.Random(6).randbytes)
        key = record_key(RecordKind.PEER, owner.public.key)
        blob_record = sign_record(owner, RecordKind.PEER, 1, int(target.env.wall_time()) + 3600, b"v")
        other = nodes[2]
        found = await me.request(FindValue(me.new_txid(), None, key.bytes, int(LookupSpace.RECORD)), other.address)
        assert isinstance(found, Found)
        await trio.sleep(2 * TOKEN_ROTATION + 1)
        (part,) = make_parts(encode_record(blob_record), bytes(8))
        reply = await me.request(
            Store(me.new_txid(), key.bytes, int(ItemSpace.RECORD), found.token, part), other.address
        )
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_TOKEN
        assert other.store.record(key, other.env.wall_time()) is None
        nursery.cancel_scope.cancel()


async def test_an_unfinished_multi_part_store_is_dropped_after_the_timeout_and_memory_stays_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(66, default_link=LINK) as net, trio.open_nursery() as nursery:
        nodes, _ = await start_nodes(net, nursery, 3, seed=66)
        target = nodes[0]
        me = await _raw_client(net, nursery)
        mailbox = Identity.generate(random.Random(7).randbytes)
        mbox = mailbox_key(mailbox.public.key)
        wall = target.env.wall_time()
        found = await me.request(FindValue(me.new_txid(), None, mbox.bytes, int(LookupSpace.MAILBOX)), target.address)
        assert isinstance(found, Found)
        rng = random.Random(8)
        # More unfinished transfers than one source may have, each every part but its last.
        for n in range(MAX_TRANSFERS_PER_SOURCE + 3):
            entry = make_entry(mbox, rng.randbytes(MAX_VALUE_BYTES // 8), entry_expiry(wall))
            parts = make_parts(encode_entry(entry), n.to_bytes(8, "big"))
            assert len(parts) > 2
            for part in parts[:-1]:
                reply = await me.request(
                    Store(me.new_txid(), mbox.bytes, int(ItemSpace.ENTRY), found.token, part), target.address
                )
                assert isinstance(reply, Stored) and not reply.complete
        reassembler = target._reassembler
        assert len(reassembler) == MAX_TRANSFERS_PER_SOURCE
        assert reassembler.evicted == 3
        assert 0 < reassembler.buffered_bytes <= MAX_TRANSFERS_PER_SOURCE * (len(parts) - 1) * PART_PAYLOAD_BYTES
        assert reassembler.buffered_bytes <= MAX_REASSEMBLY_BYTES
        # Nobody finishes them: the node's maintenance drops them once they are TRANSFER_TIMEOUT old.
        await trio.sleep(TRANSFER_TIMEOUT + 1.5 * MAINTENANCE_INTERVAL)
        assert len(reassembler) == 0
        assert reassembler.buffered_bytes == 0
        assert reassembler.expired == MAX_TRANSFERS_PER_SOURCE
        assert target.store.entry_count(mbox) == 0
        nursery.cancel_scope.cancel()


class _StallingHolder(DhtNode):
    """Serves the first part of anything it holds, then never answers for the other parts."""

    asked_for_later_parts = 0

    def _handle(self, packet: Packet, source: Address) -> Packet | None:
        if isinstance(packet, GetPart) and packet.index > 0:
            self.asked_for_later_parts += 1
            return None
        return super()._handle(packet, source)


async def test_a_holder_that_stops_in_the_middle_of_a_fetch_costs_bounded_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(67, default_link=LINK) as net, trio.open_nursery() as nursery:
        stallers, _ = await start_nodes(net, nursery, 4, seed=67, factory=_StallingHolder)
        owner = Identity.generate(random.Random(9).randbytes)
        record = sign_record(
            owner, RecordKind.PEER, 1, int(stallers[0].env.wall_time()) + 3600, random.Random(10).randbytes(5000)
        )
        put = await stallers[0].put_record(record)
        assert put.stored == 4
        asker = stallers[1]
        with trio.fail_after(60):
            got = await asker.get_record(RecordKind.PEER, owner.public.key)
        # Held here too, so the record is found; every remote holder was asked for its later parts a bounded
        # number of times, and nothing is left pending.
        assert got.record == record
        assert asker.transport.pending_count() == 0
        assert all(s.asked_for_later_parts <= 4 * PART_ATTEMPTS for s in stallers)
        # A node that holds nothing itself gets nothing, in bounded time, and keeps nothing pending.
        outsider_nodes, _ = await start_nodes(net, nursery, 1, seed=68, bootstrap_from=stallers, certs=asker.certs)
        outsider = outsider_nodes[0]
        started = trio.current_time()
        with trio.fail_after(60):
            got = await outsider.get_record(RecordKind.PEER, owner.public.key)
        assert got.record is None and got.holders >= 4
        assert trio.current_time() - started < 4 * PART_ATTEMPTS * 1.0 + 5
        assert sum(s.asked_for_later_parts for s in stallers) >= PART_ATTEMPTS
        assert outsider.transport.pending_count() == 0
        nursery.cancel_scope.cancel()
