"""A DHT node fed hostile datagrams keeps serving (bounded run; the long one is ``tests/fuzz/campaign.py``).

Raw garbage mutated from real packets, and packets that decode -- valid certificates, write tokens and parts of
real (or mutated) records and entries -- go straight into the node's receive path; no input may raise out of it,
and every few hundred inputs an honest node pings the target and looks a key up through it (see
:mod:`fuzz.node`).  Virtual time, fixed seeds.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace

import trio
import trio.testing
from fuzz.corpus import corpus, identity
from fuzz.hostile import encode_unchecked, random_instance
from fuzz.mutate import mutate
from fuzz.node import node_seeds, node_under_fire

from p2pchat.core.framing import decode_datagram
from p2pchat.core.ids import NodeId
from p2pchat.core.nodecert import NodeCert, issue_cert
from p2pchat.core.packets import (
    EntryIds,
    FindNode,
    FindValue,
    Found,
    GetPart,
    ListEntries,
    Nodes,
    PartReply,
    Ping,
    Pong,
    Store,
    Stored,
)
from p2pchat.core.records import RecordKind
from p2pchat.core.schema import Packet
from p2pchat.errors import P2PChatError, ProtocolError
from p2pchat.net.base import DatagramEndpoint

INPUTS = 3000
CHECK_EVERY = 500


async def test_node_survives_garbage_and_hostile_requests_and_keeps_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seeds = node_seeds()
    rng = random.Random(8)
    async with node_under_fire(seed=8) as fire:
        for index in range(INPUTS):
            if index < len(seeds):
                data = seeds[index]
            elif index % 2:
                data = mutate(rng.choice(seeds), rng, seeds, 1400)
            else:
                data = b"\x01" + rng.randbytes(8)
            fire.feed(data)
            if index % CHECK_EVERY == CHECK_EVERY - 1:
                await fire.check()
        await fire.check()
        stats = fire.target.transport.stats
        store = fire.target.store.stats
        # Every path was reached: garbage dropped, requests answered, stores refused and accepted, compat served.
        assert stats.dropped_malformed > 100
        assert stats.dropped_unsolicited > 100
        assert stats.requests_served > 1000
        assert stats.compat_served > 0
        assert store.refused_invalid > 10
        assert store.stored > 0
        assert fire.datagrams > INPUTS


_REPLY_TO: dict[type[Packet], type[Packet]] = {
    Ping: Pong,
    FindNode: Nodes,
    FindValue: Found,
    GetPart: PartReply,
    ListEntries: EntryIds,
    Store: Stored,
}


async def _lie(liar: DatagramEndpoint, cert: NodeCert, rng: random.Random, counts: dict[str, int]) -> None:
    """Answer every request with replies that decode but lie: right txid, hostile fields, sometimes the wrong kind."""
    while True:
        for data, source in await liar.receive_batch():
            try:
                request = decode_datagram(data)
            except ProtocolError:
                continue
            for _ in range(rng.randint(1, 3)):
                kind = (
                    _REPLY_TO.get(type(request), Pong) if rng.random() < 0.8 else rng.choice(list(_REPLY_TO.values()))
                )
                reply = replace(random_instance(kind, rng), txid=request.txid)  # type: ignore[attr-defined]
                if hasattr(reply, "responder") and rng.random() < 0.7:
                    reply = replace(reply, responder=cert)
                liar.send(encode_unchecked(reply), source)
                counts["replies"] += 1


async def test_node_survives_lying_replies_to_its_own_requests(autojump_clock: trio.testing.MockClock) -> None:
    # A peer with a valid certificate (so it enters the honest node's routing table) answers every lookup, fetch
    # and store with hostile replies that decode.  Every call ends -- with a result or a P2PChatError -- and
    # the node still serves.
    rng = random.Random(9)
    c = corpus()
    counts = {"replies": 0, "calls": 0}
    async with node_under_fire(seed=9) as fire, trio.open_nursery() as nursery:
        host = fire.net.add_host()
        liar = await host.open_datagram(host.address, 4000)
        cert = issue_cert(identity(98), host.address, 4000, int(fire.honest.env.wall_time()))
        nursery.start_soon(_lie, liar, cert, rng, counts)
        honest = fire.honest
        with trio.move_on_after(5):
            with contextlib.suppress(P2PChatError):
                await honest.ping(liar.local_address)
        calls = [
            lambda: honest.find_node(NodeId(rng.randbytes(20))),
            lambda: honest.get_record(RecordKind.PEER, c.alice.public.key),
            lambda: honest.fetch_mailbox(c.mailbox),
            lambda: honest.put_record(c.record),
            lambda: honest.append_entry(c.mailbox, c.entries[0]),
            lambda: honest.ping(liar.local_address),
        ]
        for index in range(36):
            with trio.move_on_after(60), contextlib.suppress(P2PChatError):
                await calls[index % len(calls)]()
            counts["calls"] += 1
        assert counts["replies"] > 30
        await fire.check()
        nursery.cancel_scope.cancel()
