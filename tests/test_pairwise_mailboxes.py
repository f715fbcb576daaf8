"""Pairwise mailboxes end to end on SimNetwork (virtual time, seeded): which mailbox a sender uses, which ones a
recipient polls, that an observer cannot name them, and that the choice survives restarts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing
from sim_users import World, make_world, received_text, until_delivered

from p2pchat.core import envelope
from p2pchat.core.identity import Identity
from p2pchat.core.ids import node_id_for_key
from p2pchat.core.pairwise import inbound_mailbox, outbound_mailbox
from p2pchat.core.records import entry_expiry, mailbox_key, make_entry, peer_record_key, prekey_bundle_key
from p2pchat.dht.node import MailboxResult
from p2pchat.dht.store import Space
from p2pchat.errors import P2PChatError
from p2pchat.messaging.db import ContactStatus, MessageDB, MessageState
from p2pchat.messaging.messenger import MAX_CONCURRENT_MAILBOX_FETCHES
from p2pchat.net.sim import open_sim_network
from p2pchat.node import Node

from dhtsim import LINK


async def _stored(node: Node, message_id: bytes, timeout: float = 600) -> None:
    with trio.fail_after(timeout):
        while (row := node.db.message(message_id)) is None or row.state is not MessageState.STORED:
            await trio.sleep(5)


async def _contacts_who_talked(world: World) -> tuple[Node, Node]:
    """Alice and Bob, each the other's contact, after one message each way (so each has heard from the other)."""
    alice, bob = await world.user("alice", 1), await world.user("bob", 2)
    alice.add_contact("bob", bob.address)
    bob.add_contact("alice", alice.address)
    first = alice.send("bob", "hello")
    assert await received_text(bob) == "hello"
    await until_delivered(alice, {first.id})
    reply = bob.send("alice", "hi")
    assert await received_text(alice) == "hi"
    await until_delivered(bob, {reply.id})
    return alice, bob


async def test_offline_mail_to_a_contact_goes_to_the_pairwise_mailbox(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(61, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery, 25, seed=7)
        alice, bob = await _contacts_who_talked(world)
        assert alice.db.heard_from(bob.key) and bob.messenger.polled_peers() == [alice.key]
        world.hosts["bob"].set_down()
        row = alice.send("bob", "while you were away")
        await _stored(alice, row.id)
        # The DHT key used is the pairwise one, as both sides derive it -- not Bob's public mailbox.
        pairwise = outbound_mailbox(alice.identity, bob.key).public.key
        assert pairwise == inbound_mailbox(bob.identity, alice.key).public.key
        assert mailbox_key(pairwise) != bob.messenger.mailbox_key
        assert await world.entries(pairwise) == 1
        assert await world.entries(bob.messenger.mailbox.public.key) == 0
        assert alice.messenger.stats.stored_in_pairwise_mailbox == 1
        assert bob.messenger.own_mailbox_keys() == {bob.messenger.mailbox_key, mailbox_key(pairwise)}
        world.hosts["bob"].set_up()
        assert await received_text(bob) == "while you were away"
        await until_delivered(alice, {row.id})
        await trio.sleep(2 * 3600)  # more fetches (and Alice's direct resend): nothing shows twice
        assert [m.text for m in bob.history() if not m.outgoing] == ["hello", "while you were away"]
        assert await world.entries(pairwise) == 0  # deleted by a tombstone signed with the pairwise key
        nursery.cancel_scope.cancel()


async def test_a_stranger_writes_to_the_public_mailbox_and_a_request_acknowledged_waits_for_acceptance(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(62, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery, 25, seed=7)
        alice, bob = await world.user("alice", 1), await world.user("bob", 2)
        world.hosts["bob"].set_down()
        first = alice.send(bob.key, "hello stranger")
        await _stored(alice, first.id)
        assert await world.entries(bob.messenger.mailbox.public.key) == 1
        assert await world.entries(outbound_mailbox(alice.identity, bob.key).public.key) == 0
        world.hosts["bob"].set_up()
        assert await received_text(bob) == "hello stranger"
        contact = bob.db.contact(alice.key)
        assert contact is not None and contact.status is ContactStatus.REQUEST
        await until_delivered(alice, {first.id})
        # Bob only acknowledged a request: Alice (who has heard from him) now writes to the pairwise mailbox, which
        # Bob does not poll until he accepts -- a stranger costs him no DHT traffic.
        assert alice.db.heard_from(bob.key) and bob.messenger.polled_peers() == []
        world.hosts["bob"].set_down()
        second = alice.send(bob.key, "again")
        await _stored(alice, second.id)
        world.hosts["alice"].set_down()  # so the mailbox is the only way
        world.hosts["bob"].set_up()
        await trio.sleep(3600)
        assert [m.text for m in bob.history() if not m.outgoing] == ["hello stranger"]
        bob.add_contact("alice", alice.address)
        assert bob.messenger.polled_peers() == [alice.key]
        assert await bob.messenger.fetch_mailbox() == 1
        assert [m.text for m in bob.history() if not m.outgoing] == ["hello stranger", "again"]
        world.hosts["alice"].set_up()
        await until_delivered(alice, {second.id})
        nursery.cancel_scope.cancel()


async def test_an_observer_with_every_public_key_cannot_name_the_mailbox(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(63, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery, 25, seed=7)
        alice, bob = await _contacts_who_talked(world)
        world.hosts["bob"].set_down()
        row = alice.send("bob", "private")
        await _stored(alice, row.id)
        stores = [node.store for node in world.dht] + [alice.store, bob.store]
        held = [(store, list(store.keys())) for store in stores]  # (space, key) pairs: the store is no mapping
        used = {key for store, keys in held for space, key in keys if space is Space.ENTRY and store.entry_count(key)}
        assert used == {mailbox_key(outbound_mailbox(alice.identity, bob.key).public.key)}
        # Everything an observer can derive from public data: the public mailbox (from Bob's prekey record), the
        # DHT keys of both identities' records and nodes, and the mailbox scheme applied to the identity keys.
        info = await alice.messenger._prekey_info(bob.key)
        assert info is not None
        public = {mailbox_key(info.mailbox_key)}
        for key in (alice.key, bob.key):
            public |= {mailbox_key(key), peer_record_key(key), prekey_bundle_key(key), node_id_for_key(key)}
        assert not used & public
        nursery.cancel_scope.cancel()


async def test_restarts_keep_what_decides_the_mailbox(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    async with open_sim_network(64, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery, 25, seed=7)
        alice_identity = Identity.generate(random.Random(11).randbytes)
        bob_identity = Identity.generate(random.Random(12).randbytes)
        async with trio.open_nursery() as first_life:
            world.nursery = first_life
            alice = await world.user("alice", 1, home=tmp_path / "alice", identity=alice_identity)
            bob = await world.user("bob", 2, home=tmp_path / "bob", identity=bob_identity)
            alice.add_contact("bob", bob.address)
            bob.add_contact("alice", alice.address)
            row = alice.send("bob", "before")
            assert await received_text(bob) == "before"
            await until_delivered(alice, {row.id})
            first_life.cancel_scope.cancel()
        for node in (alice, bob):
            node.db.close()
        world.nursery = nursery
        # Both restart; Bob then goes away.  Alice still knows Bob polls the pairwise mailbox, Bob still polls it.
        alice = await world.user("alice", 1, home=tmp_path / "alice", identity=alice_identity)
        assert alice.db.heard_from(bob_identity.public.key)
        world.hosts["bob"].set_down()
        row = alice.send("bob", "after the restart")
        await _stored(alice, row.id)
        assert alice.messenger.stats.stored_in_pairwise_mailbox == 1
        world.hosts["bob"].set_up()
        bob = await world.user("bob", 2, home=tmp_path / "bob", identity=bob_identity)
        assert bob.messenger.polled_peers() == [alice_identity.public.key]
        assert await received_text(bob) == "after the restart"
        await until_delivered(alice, {row.id})
        nursery.cancel_scope.cancel()


async def test_blocked_peers_are_not_polled_and_strangers_cannot_use_a_pairwise_mailbox(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(65, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery, 25, seed=7)
        alice, bob = await _contacts_who_talked(world)
        # Carol somehow learned the pairwise key (she cannot derive it): what she seals there is not Alice's mail.
        carol = Identity.generate(random.Random(13).randbytes)
        pairwise = outbound_mailbox(alice.identity, bob.key).public.key
        key = mailbox_key(pairwise)
        sealed = envelope.seal(carol, pairwise, b"not a ratchet message", random.Random(14).randbytes)
        await world.dht[0].append_entry(key, make_entry(key, sealed, entry_expiry(alice.env.wall_time())))
        assert await bob.messenger.fetch_mailbox() == 1
        assert bob.messenger.stats.dropped_misaddressed == 1
        assert await world.entries(pairwise) == 0
        bob.messenger.block(alice.key)
        assert bob.messenger.polled_peers() == []
        nursery.cancel_scope.cancel()


async def test_mailboxes_are_fetched_concurrently_up_to_the_bound(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(66, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery, 25, seed=7)
        bob = await world.user("bob", 2)
        peers = [Identity.generate(random.Random(100 + i).randbytes).public.key for i in range(10)]
        with bob.db.transaction():
            for peer in peers:
                bob.db.mark_wrote(peer, text=True)
        assert bob.messenger.polled_peers() == sorted(peers)
        fetch = bob.dht.fetch_mailbox
        running = most = 0

        async def counting(mailbox: object) -> MailboxResult:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                return await fetch(mailbox)  # type: ignore[arg-type]
            finally:
                running -= 1

        bob.dht.fetch_mailbox = counting  # type: ignore[method-assign]
        before = bob.messenger.stats.mailboxes_fetched
        await bob.messenger.fetch_mailbox()
        assert bob.messenger.stats.mailboxes_fetched - before == 1 + len(peers)
        assert most == MAX_CONCURRENT_MAILBOX_FETCHES
        nursery.cancel_scope.cancel()


async def test_a_fetch_fails_only_when_no_mailbox_could_be_fetched(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(67, default_link=LINK) as net, trio.open_nursery() as nursery:
        world = await make_world(net, nursery, 25, seed=7)
        alice, bob = await _contacts_who_talked(world)
        fetch = bob.dht.fetch_mailbox
        broken: set[object] = {bob.messenger.mailbox_key}

        async def failing(mailbox: object) -> MailboxResult:
            if mailbox in broken:
                raise P2PChatError("no one answered")
            return await fetch(mailbox)  # type: ignore[arg-type]

        bob.dht.fetch_mailbox = failing  # type: ignore[method-assign]
        failures = bob.messenger.stats.mailbox_fetch_failures
        assert await bob.messenger.fetch_mailbox() == 0  # the pairwise one was fetched
        assert bob.messenger.stats.mailbox_fetch_failures == failures + 1
        broken.add(mailbox_key(inbound_mailbox(bob.identity, alice.key).public.key))
        with pytest.raises(P2PChatError, match="no one answered"):
            await bob.messenger.fetch_mailbox()
        nursery.cancel_scope.cancel()


def test_what_decides_the_mailboxes_is_kept_and_added_to_older_databases(tmp_path: Path) -> None:
    path = tmp_path / "messages.sqlite"
    db = MessageDB(path)
    with db.transaction():
        db._db.execute("DROP TABLE pairwise")  # as a database written before pairwise mailboxes
    db.close()
    db = MessageDB(path)
    alice, bob, carol = (bytes([i]) * 32 for i in (1, 2, 3))
    assert not db.heard_from(alice) and db.written_to() == []
    with db.transaction():
        db.mark_heard(alice)
        db.mark_wrote(bob, text=False)
        db.mark_wrote(carol, text=False)
        db.mark_wrote(carol, text=True)
        db.mark_wrote(carol, text=False)  # an ack after a text: it still wrote a text
    db.close()
    db = MessageDB(path)
    assert db.heard_from(alice) and not db.heard_from(bob)
    assert db.written_to() == [(bob, False), (carol, True)]
    db.close()
