"""Messaging end to end on SimNetwork (virtual time, seeded): direct delivery, offline delivery through DHT
mailboxes, acknowledgements that wait for an offline sender, restarts, and bad envelopes."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import trio
import trio.testing
from sim_users import make_world, next_event, until_delivered

from p2pchat.core import envelope, x3dh
from p2pchat.core.identity import Identity
from p2pchat.core.messages import MAX_TEXT_BYTES
from p2pchat.core.records import entry_expiry, make_entry
from p2pchat.env import Env
from p2pchat.errors import UserError
from p2pchat.messaging.channel import open_channel
from p2pchat.messaging.db import ContactStatus, MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.net.sim import open_sim_network
from p2pchat.node import Node

from dhtsim import LINK

DAY = 24 * 3600.0


async def test_alice_to_bob_online_goes_direct(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(41, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        alice.add_contact("bob", bob.address)
        bob.add_contact("alice", alice.address)
        assert not alice.messenger.has_channel(bob.key)
        row = alice.send("bob", "hello bob")
        assert alice.history("bob")[0].state is MessageState.QUEUED
        event = await next_event(bob, IncomingMessage)
        assert isinstance(event, IncomingMessage)
        assert event.message.text == "hello bob" and event.message.peer == alice.key
        await until_delivered(alice, {row.id}, 60)
        assert alice.messenger.stats.sent_direct >= 1 and alice.messenger.stats.stored_in_mailbox == 0
        assert alice.messenger.has_channel(bob.key) and bob.messenger.has_channel(alice.key)
        reply = bob.send("alice", "hi alice")
        event = await next_event(alice, IncomingMessage)
        assert isinstance(event, IncomingMessage) and event.message.text == "hi alice"
        await until_delivered(bob, {reply.id}, 60)
        assert [m.text for m in alice.history("bob")] == ["hello bob", "hi alice"]
        nursery.cancel_scope.cancel()


async def test_a_sent_message_awaiting_its_ack_is_not_resent_with_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Each message sent while the previous one's acknowledgement is on its way: the next send must not drag the
    # sent-but-unacknowledged ones along (that made duplicates at the receiver under load), and the session's
    # ratchet states are decoded once each, not at every message.
    async with open_sim_network(45, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        alice.add_contact("bob", bob.address)
        ids = set()
        for i in range(10):
            row = alice.send("bob", f"message {i}")
            ids.add(row.id)
            while True:
                event = await next_event(alice, DeliveryUpdate)
                assert isinstance(event, DeliveryUpdate)
                if event.message_id == row.id and event.state is MessageState.SENT:
                    break
        await until_delivered(alice, ids, 60)
        assert bob.messenger.stats.received == 10 and bob.messenger.stats.duplicates == 0
        assert alice.messenger.stats.sent_direct == 10
        # One decoding of the initial state at most on each side; every later state was known from its encoding.
        assert alice.messenger._sessions.decoded <= 2 and bob.messenger._sessions.decoded <= 2
        nursery.cancel_scope.cancel()


async def test_acks_owed_to_an_unreachable_peer_spend_no_ratchet_keys(autojump_clock: trio.testing.MockClock) -> None:
    # Bob owes Alice an ack while neither she nor any DHT node answers: his retries (every few seconds at first)
    # must not encrypt a new ack message each time, or Alice would face more skipped keys than she keeps.
    async with open_sim_network(46, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery, count=10)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        world.hosts["bob"].set_down()
        row = alice.send(bob.key, "ack me later")
        await trio.sleep(300)  # stored in Bob's mailbox
        world.hosts["alice"].set_down()
        world.hosts["bob"].set_up()
        event = await next_event(bob, IncomingMessage, timeout=3600)
        assert isinstance(event, IncomingMessage)
        dht_hosts = [host for n in world.dht if (host := world.net.host_of(n.host)) is not None]
        for host in dht_hosts:
            host.set_down()  # before Bob's first ack attempt gets past its connection attempt to Alice

        def sending_counter() -> int:
            stored = bob.db.session(alice.key)
            assert stored is not None
            return bob.messenger._sessions.state(bob.messenger._sessions.record(stored[0]).ratchet).ns

        before = sending_counter()
        await trio.sleep(6 * 3600)
        assert bob.db.acks_owed()  # still owed: no path all along
        assert sending_counter() == before
        world.hosts["alice"].set_up()
        for host in dht_hosts:
            host.set_up()
        await until_delivered(alice, {row.id}, 2 * 3600)
        nursery.cancel_scope.cancel()


async def test_bob_offline_for_three_days_gets_all_100_in_order(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(42, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        alice.add_contact("bob", bob.address)
        world.hosts["bob"].set_down()
        ids = {alice.send("bob", f"message {i}").id for i in range(100)}
        await trio.sleep(600)
        states = {m.state for m in alice.history("bob")}
        assert states == {MessageState.STORED}
        assert min(m.replicas for m in alice.history("bob")) >= 15
        await trio.sleep(3 * DAY)
        world.hosts["bob"].set_up()
        await until_delivered(alice, set(ids), 2 * 3600)
        received = [m for m in bob.history() if not m.outgoing]
        assert [m.text for m in received] == [f"message {i}" for i in range(100)]
        assert bob.db.contact(alice.key).status is ContactStatus.REQUEST  # not a contact yet: a request
        # Taken entries are deleted from the DHT -- at the fetch that takes them, or, for messages that came over a
        # direct channel first (Alice retries directly once Bob is back), at the next fetch, which finds them seen.
        await bob.messenger.fetch_mailbox()
        assert (await world.dht[0].fetch_mailbox(bob.messenger.mailbox_key)).entries == []
        nursery.cancel_scope.cancel()


async def test_acks_wait_for_an_offline_sender(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(43, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        world.hosts["bob"].set_down()
        row = alice.send(bob.key, "are you there?")
        await trio.sleep(300)
        world.hosts["alice"].set_down()
        world.hosts["bob"].set_up()
        event = await next_event(bob, IncomingMessage, timeout=3600)
        assert isinstance(event, IncomingMessage)
        await trio.sleep(3600)  # Bob acknowledges into Alice's mailbox, since she is away
        world.hosts["alice"].set_up()
        await until_delivered(alice, {row.id}, 3600)
        nursery.cancel_scope.cancel()


async def test_restarts_lose_nothing(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    async with open_sim_network(44, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        bob_identity = Identity.generate(random.Random(5).randbytes)
        alice = await world.user("alice", 1, home=tmp_path / "alice")
        async with trio.open_nursery() as bob_life:
            world.nursery = bob_life
            bob = await world.user("bob", 2, home=tmp_path / "bob", identity=bob_identity)
            row = alice.send(bob.key, "first")
            await next_event(bob, IncomingMessage)
            bob_life.cancel_scope.cancel()
        world.nursery = nursery
        ids = [alice.send(bob_identity.public.key, f"while bob restarts {i}").id for i in range(5)]
        await trio.sleep(60)
        bob = await world.user("bob", 2, home=tmp_path / "bob", identity=bob_identity)
        await until_delivered(alice, {row.id, *ids}, 3600)
        texts = [m.text for m in bob.history() if not m.outgoing]
        assert texts == ["first"] + [f"while bob restarts {i}" for i in range(5)]
        nursery.cancel_scope.cancel()


async def test_a_64_kib_message_and_bad_envelopes(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(45, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        world.hosts["bob"].set_down()
        big = "x" * MAX_TEXT_BYTES
        row = alice.send(bob.key, big)
        with pytest.raises(UserError, match="too large"):
            alice.send(bob.key, big + "y")
        await trio.sleep(300)
        assert alice.history(bob.key)[0].state is MessageState.STORED
        # Junk in Bob's mailbox: a garbage payload, an envelope sealed to someone else's mailbox, and a replay.
        mbox = bob.messenger.mailbox_key
        wall = alice.env.wall_time()
        other = Identity.generate(random.Random(6).randbytes)
        junk = [
            make_entry(mbox, b"\x00garbage", entry_expiry(wall)),
            make_entry(
                mbox, envelope.seal(alice.identity, other.public.key, b"x", alice.env.random_bytes), entry_expiry(wall)
            ),
        ]
        for entry in junk:
            await world.dht[0].append_entry(mbox, entry)
        world.hosts["bob"].set_up()
        event = await next_event(bob, IncomingMessage)
        assert isinstance(event, IncomingMessage) and event.message.text == big
        await until_delivered(alice, {row.id}, 3600)
        await bob.messenger.fetch_mailbox()  # the garbage is taken (and counted) at the next fetch
        assert bob.messenger.stats.dropped_undecryptable >= 2
        assert [m.text for m in bob.history() if not m.outgoing] == [big]
        nursery.cancel_scope.cancel()


async def test_blocked_identities_are_dropped(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(46, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        bob.messenger.block(alice.key)
        alice.send(bob.key, "spam")
        await trio.sleep(600)
        assert bob.history() == []
        assert bob.messenger.stats.dropped_blocked >= 1
        nursery.cancel_scope.cancel()


async def test_both_start_a_session_at_once_and_converge(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(47, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        world.hosts["alice"].set_down()
        world.hosts["bob"].set_down()
        world.hosts["alice"].set_up()
        world.hosts["bob"].set_up()
        a = alice.send(bob.key, "from alice")
        b = bob.send(alice.key, "from bob")
        await until_delivered(alice, {a.id}, 3600)
        await until_delivered(bob, {b.id}, 3600)
        for i in range(5):  # and the session keeps working both ways
            a = alice.send(bob.key, f"a{i}")
            b = bob.send(alice.key, f"b{i}")
            await until_delivered(alice, {a.id}, 3600)
            await until_delivered(bob, {b.id}, 3600)
        assert [m.text for m in bob.history() if not m.outgoing] == ["from alice"] + [f"a{i}" for i in range(5)]
        nursery.cancel_scope.cancel()


async def test_a_mailbox_holding_1000_entries(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(48, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery, count=25)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        world.hosts["bob"].set_down()
        ids = {alice.send(bob.key, f"m{i}").id for i in range(1000)}
        await trio.sleep(2 * 3600)
        assert all(m.state is MessageState.STORED for m in alice.history(bob.key))
        world.hosts["bob"].set_up()
        await until_delivered(alice, ids, 6 * 3600)
        assert len([m for m in bob.history() if not m.outgoing]) == 1000
        nursery.cancel_scope.cancel()


async def test_clocks_an_hour_apart_and_contact_requests(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(49, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        # Alice's clock runs an hour ahead of Bob's (and of the DHT's).
        host = net.add_host()
        world.hosts["alice"] = host
        env = Env.simulated(host, 1, clock_skew=3600)
        alice = Node(
            env,
            Identity.generate(env.random_bytes),
            host=host.address,
            udp_port=4000,
            tcp_port=4001,
            cert_cache=world.certs,
        )
        await nursery.start(alice.run)
        assert await alice.bootstrap([world.dht[0].address]) == 1
        bob = await world.user("bob", 2)
        world.hosts["bob"].set_down()
        row = alice.send(bob.key, "from the future")
        await trio.sleep(600)
        world.hosts["bob"].set_up()
        event = await next_event(bob, IncomingMessage)
        assert isinstance(event, IncomingMessage) and event.message.text == "from the future"
        await until_delivered(alice, {row.id}, 3600)
        # Alice is not Bob's contact: her message waits as a request until he accepts it.
        contact = bob.db.contact(alice.key)
        assert contact is not None and contact.status is ContactStatus.REQUEST
        bob.add_contact("alice", alice.address)
        contact = bob.db.contact(alice.key)
        assert contact is not None and contact.status is ContactStatus.CONTACT and contact.name == "alice"
        reply = bob.send("alice", "accepted")
        await until_delivered(bob, {reply.id}, 3600)
        nursery.cancel_scope.cancel()


async def test_a_session_the_peer_refused_is_started_over(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(50, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        world.hosts["bob"].set_down()
        row = alice.send(bob.key, "first try")
        await trio.sleep(300)
        # Someone else used the one-time prekey Alice picked before her message reached Bob.
        current = alice.messenger._records(bob.key)[0]
        assert current is not None and current.initial is not None
        used = x3dh.decode_initial_header(current.initial).one_time_prekey_id
        state = x3dh.decode_prekey_state(bob.db.get("prekeys") or b"")
        left = tuple(k for k in state.one_time_prekeys if k.prekey_id != used)
        with bob.db.transaction():
            bob.db.put("prekeys", x3dh.encode_prekey_state(dataclasses.replace(state, one_time_prekeys=left)))
        world.hosts["bob"].set_up()
        await until_delivered(alice, {row.id}, 6 * 3600)
        assert alice.messenger.stats.sessions_restarted >= 1
        assert bob.messenger.stats.dropped_undecryptable >= 1
        assert [m.text for m in bob.history() if not m.outgoing] == ["first try"]
        nursery.cancel_scope.cancel()


async def test_tampered_replayed_and_impostor_messages_are_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(51, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        world.hosts["bob"].set_down()
        row = alice.send(bob.key, "the real one")
        await trio.sleep(300)
        wire = alice.history(bob.key)[0].wire
        assert wire is not None
        info = await alice.messenger._prekey_info(bob.key)
        assert info is not None
        mbox = bob.messenger.mailbox_key
        sealed = envelope.seal(alice.identity, info.mailbox_key, wire, alice.env.random_bytes)
        tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
        wall = alice.env.wall_time()
        # The same sealed envelope again under another expiry (a new entry id), and a tampered copy.
        for payload, ttl in ((sealed, 3600), (tampered, 7200)):
            await world.dht[0].append_entry(mbox, make_entry(mbox, payload, entry_expiry(wall, ttl)))
        world.hosts["bob"].set_up()
        await until_delivered(alice, {row.id}, 3600)
        await bob.messenger.fetch_mailbox()
        assert [m.text for m in bob.history() if not m.outgoing] == ["the real one"]  # once
        assert bob.messenger.stats.duplicates >= 1  # the replay, recognised without decrypting
        assert bob.messenger.stats.dropped_undecryptable >= 1  # the tampered copy
        # Mallory replays Alice's ratchet message over his own authenticated channel: it is not from him.
        mallory = Identity.generate(random.Random(7).randbytes)
        host = net.add_host()
        stream = await host.connect(bob.messenger.tcp_address)
        channel = await open_channel(stream, mallory, random.Random(8).randbytes, initiator=True, expected_peer=bob.key)
        await channel.send(wire)
        await trio.sleep(5)
        assert bob.messenger.stats.dropped_replays == 1
        assert [m.text for m in bob.history() if not m.outgoing] == ["the real one"]
        await channel.aclose()
        nursery.cancel_scope.cancel()
