"""The Node: one user's p2pchat, composed of identity, DHT, sessions, messaging and storage.

It runs unchanged on real sockets (``Env.real()``) and on SimNetwork (``Env.simulated(host, seed)``).  With a
``home`` directory its state lives in SQLite files there (``dht.sqlite``: what the node holds for others;
``messages.sqlite``: contacts, sessions, history and outbox); without one everything is in memory (simulations).

Use it as ``await nursery.start(node.run)``, then ``await node.bootstrap([...])``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from p2pchat.core.identity import Identity, PublicIdentity
from p2pchat.core.lan import SERVICE_TYPE
from p2pchat.core.nodecert import CertCache
from p2pchat.core.routing import K
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.dht.store import Space, SqliteBackend, Store
from p2pchat.env import Env
from p2pchat.errors import P2PChatError, UserError
from p2pchat.lan.discovery import LanDiscovery
from p2pchat.messaging.db import MessageDB, MessageRow
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage, Messenger
from p2pchat.net.base import Address

__all__ = ["DHT_DB_NAME", "LAN_PUBLISH_CHECK", "MESSAGES_DB_NAME", "Node", "NodeStatus"]

DHT_DB_NAME = "dht.sqlite"
"""File in the home directory holding what this node stores for others."""

MESSAGES_DB_NAME = "messages.sqlite"
"""File in the home directory holding contacts, sessions, history and the outbox."""

LAN_PUBLISH_CHECK = 2.0
"""Seconds between checks for new LAN peers to publish our records to (LAN-only mode has no bootstrap)."""


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """Counts a front end shows: who this node knows, what it holds for others, what it still has to send."""

    peers_known: int
    """Distinct nodes known: DHT routing-table contacts and verified LAN peers together."""
    dht_contacts: int
    """Contacts in the DHT routing table."""
    lan_peers: int
    """Verified LAN peers (0 without LAN discovery)."""
    mailbox_entries_held: int
    """Mailbox entries this node stores for other users."""
    records_held: int
    """Signed records (peer and prekey records) this node stores, its own included when it is among their closest
    nodes."""
    outbox: int
    """Outgoing messages not yet delivered (queued, sent or stored)."""


class Node:
    """A whole p2pchat node for one identity."""

    def __init__(
        self,
        env: Env,
        identity: Identity,
        *,
        host: str,
        udp_port: int = 0,
        tcp_port: int = 0,
        home: Path | None = None,
        dht_config: DhtConfig | None = None,
        cert_cache: CertCache | None = None,
        lan: bool = False,
        lan_interfaces: list[str] | None = None,
        lan_service_type: str = SERVICE_TYPE,
    ) -> None:
        self.env = env
        self.identity = identity
        config = dht_config or DhtConfig()
        node_id = identity.public.node_id
        if home is not None:
            home.mkdir(parents=True, exist_ok=True)
            backend = SqliteBackend(home / DHT_DB_NAME)
            store = Store(node_id, config.store_limits, backend, now=env.wall_time())
            db = MessageDB(home / MESSAGES_DB_NAME)
        else:
            store = Store(node_id, config.store_limits)
            db = MessageDB(":memory:")
        self.store = store
        self.db = db
        self.dht = DhtNode(env, identity, host=host, port=udp_port, cert_cache=cert_cache, config=config, store=store)
        self.messenger = Messenger(env, identity, self.dht, db, host=host, tcp_port=tcp_port)
        # LAN discovery only when asked, on the interfaces named (None there means all: a user's explicit choice,
        # never a test's).  Resolving them here makes a mistyped interface fail before anything starts.
        # lan_service_type is the standard one except in tests that keep apart from other tests on the same host.
        self.lan = (
            LanDiscovery(
                env, self.dht, self.messenger, identity, interfaces=lan_interfaces, service_type=lan_service_type
            )
            if lan
            else None
        )

    @property
    def address(self) -> str:
        """This user's p2pchat address."""
        return self.identity.public.address

    @property
    def key(self) -> bytes:
        """This user's identity key."""
        return self.identity.public.key

    @property
    def events(self) -> trio.MemoryReceiveChannel[IncomingMessage | DeliveryUpdate]:
        """Incoming messages and delivery updates, as they happen."""
        return self.messenger.events

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the DHT and the messenger until cancelled; then close the databases."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.dht.run)
                await nursery.start(self.messenger.run)
                if self.lan is not None:
                    await nursery.start(self.lan.run)
                    nursery.start_soon(self._publish_on_first_lan_peer)
                task_status.started()
        finally:
            self.store.close()
            self.db.close()

    async def _publish_on_first_lan_peer(self) -> None:
        # With no bootstrap (LAN-only), the DHT forms from LAN peers: publish our records (and fetch our mailbox)
        # once there is someone to ask, then again whenever a peer appears while we know fewer than a bucket's
        # worth.
        assert self.lan is not None
        published_with = 0
        while True:
            await trio.sleep(LAN_PUBLISH_CHECK)
            count = len(self.lan.peers)
            if count > published_with and published_with < K:
                published_with = count
                await self.messenger.publish()
                # And look in our mailbox: the fetch at start found no one to ask.
                with contextlib.suppress(P2PChatError):
                    await self.messenger.fetch_mailbox()

    async def bootstrap(self, addresses: Iterable[Address]) -> int:
        """Join the DHT through *addresses* and publish our records; returns how many answered."""
        answered = await self.dht.bootstrap(addresses)
        if answered:
            await self.messenger.publish()
        return answered

    def status(self) -> NodeStatus:
        """The node's counts now (cheap enough for a status page: one pass over the store's keys)."""
        dht_ids = {contact.node_id for contact in self.dht.contacts()}
        lan_ids = {peer.node_id for peer in self.lan.peers.values()} if self.lan is not None else set()
        own_mailboxes = self.messenger.own_mailbox_keys()
        held = list(self.store.keys())  # (space, key) pairs: the store is not a mapping
        entries = sum(
            self.store.entry_count(key) for space, key in held if space is Space.ENTRY and key not in own_mailboxes
        )
        records = sum(1 for space, _ in held if space is Space.RECORD)
        return NodeStatus(
            peers_known=len(dht_ids | lan_ids),
            dht_contacts=len(dht_ids),
            lan_peers=len(lan_ids),
            mailbox_entries_held=entries,
            records_held=records,
            outbox=len(self.db.open_outgoing()),
        )

    def _peer_key(self, peer: str | bytes) -> bytes:
        if isinstance(peer, bytes):
            return peer
        contact = self.db.contact_by_name(peer)
        if contact is not None:
            return contact.key
        if peer.startswith("p2p1"):
            return PublicIdentity.from_address(peer).key
        raise UserError(f"unknown contact {peer!r}; add it first with its address")

    def add_contact(self, name: str, address_or_key: str | bytes) -> bytes:
        """Add a contact by address (``p2p1...``) or key; returns the key."""
        key = address_or_key if isinstance(address_or_key, bytes) else PublicIdentity.from_address(address_or_key).key
        self.messenger.add_contact(name, key)
        return key

    def send(self, peer: str | bytes, text: str) -> MessageRow:
        """Queue a message to a contact name, address or key; it is on disk when this returns."""
        return self.messenger.send(self._peer_key(peer), text)

    def history(self, peer: str | bytes | None = None) -> list[MessageRow]:
        """Messages with *peer* (or everyone), oldest first."""
        return self.db.history(None if peer is None else self._peer_key(peer))
