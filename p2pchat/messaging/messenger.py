"""The messenger: sessions, delivery (direct or through DHT mailboxes), acknowledgements, outbox and history.

Sending.  ``send`` commits the message (state *queued*) and returns.  A delivery task then, per peer: makes sure a
session exists (X3DH from the peer's prekey record in the DHT, so the first message works while the peer is
offline), encrypts each queued message once with the Double Ratchet (ciphertext and ratchet state committed
together), and tries the direct channel (state *sent*); if that fails, it seals the ratchet message in an
envelope to the peer's mailbox and appends it to the DHT (state *stored*, with the number of replicas that
confirmed).  It retries with backoff until the peer's acknowledgement arrives (*delivered*) or the message's
time to live runs out (*failed*).

Receiving.  A ratchet message arrives on a direct channel or from one of our mailboxes.  One transaction takes
it: the session step (and the one-time prekey X3DH consumed), the history row (a duplicate id is dropped), and the
acknowledgement owed.  Only then does the acknowledgement leave -- directly, or sealed in the sender's mailbox.
Mailbox entries taken are deleted with a tombstone signed by the key of the mailbox they were in.

Which mailbox.  Every user has a *public* mailbox, named in its prekey record, and for each peer a *pairwise*
one (:mod:`p2pchat.core.pairwise`): a key pair only the two of them can derive, so nobody else can compute its
DHT key and place Sybil nodes next to it.  Two durable facts per peer, each committed in the transaction that
makes it true, decide which is used:

* *heard*: we have taken an authenticated ratchet message (a text or an acknowledgement) from the peer.  From
  then on our texts and acknowledgements that go through a mailbox go to the peer's pairwise mailbox for us;
  before that (first contact, contact requests) to its public mailbox.
* *wrote*: we have encrypted a ratchet message for the peer -- a text, or only acknowledgements.  We poll our
  pairwise mailbox for the peer if we wrote it a text, or if it is an accepted contact and we wrote it anything;
  never for a blocked identity.

So a peer stores into our pairwise mailbox only after taking something we wrote, and we poll it from the moment
we wrote that -- except for the one case where polling would let strangers cost us DHT traffic: someone whose
contact request we only acknowledged.  Its later mail waits in our pairwise mailbox until we accept the request
(or write to it), and is taken at the next fetch; mail that comes directly is taken at once as ever.

Everything is driven by the injected :class:`~p2pchat.env.Env`, so the same code runs on sockets and on
SimNetwork.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import trio

from p2pchat.core import envelope, ratchet, x3dh
from p2pchat.core.identity import Identity, PublicIdentity
from p2pchat.core.ids import NodeId
from p2pchat.core.messages import (
    MAX_ACKS_PER_MESSAGE,
    MAX_TEXT_BYTES,
    MESSAGE_ID_BYTES,
    Content,
    ContentKind,
    PeerAddress,
    PeerInfo,
    PrekeyInfo,
    RatchetMessage,
    SessionRecord,
    decode,
    encode,
)
from p2pchat.core.pairwise import inbound_mailbox, outbound_mailbox
from p2pchat.core.records import (
    MAX_TOMBSTONE_IDS,
    RecordKind,
    entry_expiry,
    mailbox_key,
    make_entry,
    sign_record,
    sign_tombstone,
)
from p2pchat.dht.node import DhtNode
from p2pchat.env import Env
from p2pchat.errors import P2PChatError, ProtocolError, UserError
from p2pchat.messaging.channel import Channel, ChannelServerStats, open_channel, serve_channels
from p2pchat.messaging.db import ContactStatus, MessageDB, MessageRow, MessageState
from p2pchat.messaging.sessions import SessionCodec
from p2pchat.net.base import Address, Listener

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_MESSAGE_TTL",
    "MAILBOX_FETCH_INTERVAL",
    "MAX_CONCURRENT_MAILBOX_FETCHES",
    "MAX_EVENTS_QUEUED",
    "MAX_RETRY_INTERVAL",
    "RECORD_TTL",
    "DeliveryUpdate",
    "IncomingMessage",
    "Messenger",
    "MessengerStats",
]

log = logging.getLogger(__name__)

DEFAULT_MESSAGE_TTL: Final = 7 * 24 * 3600.0
"""A message not acknowledged within this many seconds fails (a mailbox entry lives 7 days from when it is
stored)."""

FIRST_RETRY: Final = 5.0
"""Base of the retry backoff: attempt n waits FIRST_RETRY * 2**n seconds (jittered), up to MAX_RETRY_INTERVAL."""

MAX_RETRY_INTERVAL: Final = 1800.0
"""Longest wait between two delivery attempts of one message."""

MAILBOX_FETCH_INTERVAL: Final = 300.0
"""Seconds between fetches of our own mailbox while things go well (online peers reach us directly; the mailbox
is for what arrived while we were away, and is fetched at start)."""

MAX_MAILBOX_FETCH_INTERVAL: Final = 600.0
"""Longest wait between mailbox fetches when fetches keep failing (backoff)."""

MAX_CONCURRENT_MAILBOX_FETCHES: Final = 4
"""Mailboxes (the public one and the pairwise ones) fetched at once: each fetch is a DHT lookup with its own
parallel queries, so a user with many contacts spreads them out instead of sending a burst."""

CONNECT_TIMEOUT: Final = 5.0
"""Seconds to connect and finish the channel handshake with a peer."""

RESTART_AFTER_DIRECT_ATTEMPTS: Final = 3
"""Direct deliveries of a message on a session the peer never answered, after which the session is started over
(see ``Messenger._restart_refused_session``)."""

ACK_WAIT: Final = 10.0
"""Seconds a direct send waits for the peer's acknowledgement before also storing the message in its mailbox."""

RECORD_TTL: Final = 24 * 3600
"""Lifetime of the peer and prekey records we publish (they are republished well before)."""

PUBLISH_INTERVAL: Final = 4 * 3600.0
"""Seconds between republishing our records (new sequence numbers; prekeys replenished and rotated)."""

PEER_INFO_CACHE_TIME: Final = 300.0
"""Seconds a peer's record (where to connect) is reused before it is looked up again."""

MAX_CACHED_PEER_INFOS: Final = 1024
"""Peer records cached at once."""

PREKEY_REPUBLISH_DELAY: Final = 60.0
"""Seconds after a one-time prekey is used before the bundle is republished without it (so a burst of new
sessions costs one publish)."""

TAKEN_MEMORY: Final = 30 * 24 * 3600.0
"""How long the digests of taken ratchet messages and the keys of seen initial headers are kept: longer than any
message's time to live and any signed prekey's grace period."""

MAX_EVENTS_QUEUED: Final = 1024
"""Events waiting for the front end; beyond this new ones are dropped and counted (all of it is in the database
anyway)."""

ONE_TIME_PREKEYS: Final = 50
"""One-time prekeys kept published."""


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A new message from a peer (already committed)."""

    message: MessageRow


@dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    """An outgoing message changed state."""

    message_id: bytes
    peer: bytes
    state: MessageState
    replicas: int
    reason: str | None


@dataclass(slots=True)
class MessengerStats:
    """Counters; the ``dropped_*`` ones are bad or unwanted input."""

    sent_direct: int = 0
    stored_in_mailbox: int = 0
    stored_in_pairwise_mailbox: int = 0
    received: int = 0
    duplicates: int = 0
    dropped_undecryptable: int = 0
    dropped_blocked: int = 0
    dropped_replays: int = 0
    dropped_misaddressed: int = 0
    """Entries in a pairwise mailbox sealed by someone other than the peer it is shared with."""
    dropped_events: int = 0
    mailbox_fetches: int = 0
    mailboxes_fetched: int = 0
    mailbox_fetch_failures: int = 0
    sessions_restarted: int = 0


class Messenger:
    """One user's messaging over a running :class:`~p2pchat.dht.node.DhtNode`."""

    def __init__(self, env: Env, identity: Identity, dht: DhtNode, db: MessageDB, *, host: str, tcp_port: int = 0):
        self.env = env
        self.identity = identity
        self.key = identity.public.key
        self.dht = dht
        self.db = db
        self._sessions = SessionCodec()
        self.host = host
        self.tcp_port = tcp_port
        self.stats = MessengerStats()
        self.channel_stats = ChannelServerStats()
        """What the direct-channel server did with incoming connections (junk ones end in ``handshake_*``)."""
        self.mailbox = self._load_mailbox()
        self.mailbox_key = mailbox_key(self.mailbox.public.key)
        self._events_send, self.events = trio.open_memory_channel[IncomingMessage | DeliveryUpdate](MAX_EVENTS_QUEUED)
        self._channels: dict[bytes, Channel] = {}
        self._wake = trio.Event()
        self._listener: Listener | None = None
        self._nursery: trio.Nursery | None = None
        self._hints: dict[bytes, list[Address]] = {}
        self._record_seq = int(self.env.wall_time())
        self._prekeys_changed = trio.Event()
        self._peer_infos: dict[bytes, tuple[float, PeerInfo | None]] = {}

    # --- set-up ----------------------------------------------------------------------------------------------

    def _load_mailbox(self) -> Identity:
        with self.db.transaction():
            seed = self.db.get("mailbox_seed")
            if seed is None:
                seed = self.env.random_bytes(32)
                self.db.put("mailbox_seed", seed)
            if self.db.get("prekeys") is None:
                state = x3dh.new_prekeys(self.identity, self.env.random_bytes, self.env.wall_time(), ONE_TIME_PREKEYS)
                self.db.put("prekeys", x3dh.encode_prekey_state(state))
        return Identity.from_seed(seed)

    @property
    def tcp_address(self) -> Address:
        """Where this messenger accepts direct channels (once running)."""
        if self._listener is None:
            raise RuntimeError("the messenger is not running")
        return self._listener.local_address

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve direct channels, deliver, fetch the mailbox and publish records until cancelled."""
        self._listener = await self.env.network.open_listener(self.host, self.tcp_port)
        # Retry times are on trio's clock, which starts anew in every process: after a restart the stored ones mean
        # nothing, so everything still open is due now.  One idempotent statement, left to SQLite's autocommit: a
        # crash right after it is the same as a crash before it, so it is no commit boundary worth a hook call.
        self.db.reschedule_open(trio.current_time())
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(
                    functools.partial(serve_channels, stats=self.channel_stats),
                    self._listener,
                    self.identity,
                    self.env.random_bytes,
                    self._serve,
                )
                nursery.start_soon(self._delivery_loop)
                nursery.start_soon(self._mailbox_loop)
                nursery.start_soon(self._publish_loop)
                task_status.started()
        finally:
            self._nursery = None
            for channel in list(self._channels.values()):
                with contextlib.suppress(Exception):
                    await channel.aclose()
            await self._listener.aclose()

    def _emit(self, event: IncomingMessage | DeliveryUpdate) -> None:
        # Nobody may be reading events (a daemon with no front end attached): never block, never grow.
        try:
            self._events_send.send_nowait(event)
        except trio.WouldBlock:
            self.stats.dropped_events += 1

    # --- contacts ----------------------------------------------------------------------------------------------

    def add_contact(self, name: str, key: bytes) -> None:
        """Add (or rename, or accept a request from, or unblock) a contact."""
        if key == self.key:
            raise UserError("that is your own address")
        other = self.db.contact_by_name(name)
        if other is not None and other.key != key:
            raise UserError(f"there is already a contact named {name!r}")
        with self.db.transaction():
            self.db.set_contact(key, name, ContactStatus.CONTACT, self.env.wall_time())

    def block(self, key: bytes) -> None:
        """Drop everything from this identity from now on."""
        with self.db.transaction():
            contact = self.db.contact(key)
            self.db.set_contact(key, contact.name if contact else None, ContactStatus.BLOCKED, self.env.wall_time())

    def add_hint(self, key: bytes, address: Address) -> None:
        """A direct-channel address for *key* learned elsewhere (e.g. on the LAN); tried before the DHT."""
        hints = self._hints.setdefault(key, [])
        if address not in hints:
            hints.insert(0, address)
            del hints[4:]

    def remove_hint(self, key: bytes, address: Address) -> None:
        """Forget a hint given by :meth:`add_hint` (e.g. the LAN peer left); unknown hints are ignored."""
        hints = self._hints.get(key)
        if hints is not None and address in hints:
            hints.remove(address)
            if not hints:
                del self._hints[key]  # so identities that came and went leave nothing behind

    def hints(self, key: bytes) -> list[Address]:
        """The direct-channel addresses for *key* tried before the DHT, newest first."""
        return list(self._hints.get(key, []))

    def retry_now(self) -> None:
        """Make every open outgoing message (and owed acknowledgement) due now, e.g. once the node has joined the
        DHT: attempts made while it knew no one failed for want of peers, not because the recipient is away."""
        with self.db.transaction():
            self.db.reschedule_open(trio.current_time())
        self._wake.set()

    # --- sending -------------------------------------------------------------------------------------------------

    def send(self, peer: bytes, text: str, *, ttl: float = DEFAULT_MESSAGE_TTL) -> MessageRow:
        """Queue *text* for *peer*: committed to disk before this returns.  Delivery goes on in the background."""
        if len(text.encode()) > MAX_TEXT_BYTES:
            raise UserError(f"message too large: {len(text.encode())} bytes, the limit is {MAX_TEXT_BYTES}")
        if peer == self.key:
            raise UserError("cannot send a message to yourself")
        now = self.env.wall_time()
        with self.db.transaction():
            row = MessageRow(
                id=self.env.random_bytes(MESSAGE_ID_BYTES),
                peer=peer,
                outgoing=True,
                text=text,
                sent_at=now,
                seq=self.db.next_seq(peer),
                state=MessageState.QUEUED,
                replicas=0,
                reason=None,
                expires_at=now + ttl,
                received_at=None,
                wire=None,
                next_attempt=trio.current_time(),
                attempts=0,
            )
            self.db.add_message(row)
        self._wake.set()
        return row

    async def _delivery_loop(self) -> None:
        while True:
            self._wake = trio.Event()
            await self._deliver_due()
            # Sleep until the next attempt is due, or something new is queued or owed.
            due = [r.next_attempt for r in self.db.open_outgoing() if r.next_attempt is not None]
            wait = MAX_RETRY_INTERVAL if not due else max(0.0, min(due) - trio.current_time())
            if self.db.acks_owed():
                wait = min(wait, FIRST_RETRY)
            with trio.move_on_after(wait):
                await self._wake.wait()

    async def _deliver_due(self) -> None:
        now = trio.current_time()
        wall = self.env.wall_time()
        open_rows: dict[bytes, list[MessageRow]] = {}
        due_peers: set[bytes] = set()
        for row in self.db.open_outgoing():
            if row.expires_at <= wall:
                self._set_state(row, MessageState.FAILED, reason="not delivered within its time to live")
                continue
            open_rows.setdefault(row.peer, []).append(row)
            if row.next_attempt is None or row.next_attempt <= now:
                due_peers.add(row.peer)
        # When one message to a peer is due, try all of that peer's that are not already sent and awaiting their
        # acknowledgement: one lookup and one connection serve them all, and their retries fall into step.  A sent
        # one waits for its own time (its ack may be on the way: resending early only makes duplicates).
        due = {
            peer: [
                r
                for r in open_rows[peer]
                if r.state is not MessageState.SENT or r.next_attempt is None or r.next_attempt <= now
            ]
            for peer in due_peers
        }
        owed = self.db.acks_owed()
        peers = set(due) | set(owed)
        async with trio.open_nursery() as nursery:
            for peer in sorted(peers):
                nursery.start_soon(self._deliver_to, peer, due.get(peer, []), owed.get(peer, []))

    def _restart_refused_session(self, peer: bytes, rows: list[MessageRow]) -> list[MessageRow]:
        """Start over if the peer evidently refused the session we started.

        Our messages reached the peer over the direct channel several times, yet nothing came back on the session:
        the peer could not accept its initial header (most likely another sender used the same one-time prekey
        first -- everyone who fetches a bundle picks from the same ones).  The session and the ciphertexts are
        dropped; the messages are encrypted again under a session from a freshly fetched bundle.  A message the
        peer did take after all arrives twice under different ciphertexts, and the peer drops the duplicate id.
        """
        current, _ = self._records(peer)
        if current is None or current.answered or current.initial is None:
            return rows
        if not any(r.state is MessageState.SENT and r.attempts >= RESTART_AFTER_DIRECT_ATTEMPTS for r in rows):
            return rows
        log.info("restarting the session with %s: it never answered", PublicIdentity(peer).address[:16])
        with self.db.transaction():
            self.db.delete_session(peer)
            for row in rows:
                self.db.update_message(row.id, wire=None, attempts=0)
        self.stats.sessions_restarted += 1
        return [r for r in (self.db.message(row.id) for row in rows) if r is not None]

    async def _deliver_to(self, peer: bytes, rows: list[MessageRow], acks: list[bytes]) -> None:
        rows = self._restart_refused_session(peer, rows)
        try:
            wires = await self._wires_for(peer, rows)
        except P2PChatError as exc:
            log.info("cannot start a session with %s yet: %s", PublicIdentity(peer).address[:16], exc)
            for row in rows:
                self._retry_later(row)
            return
        channel = await self._channel_to(peer)
        # Acknowledgements are encrypted only once there is a path for them: each encryption spends a key of the
        # sending chain, and a peer unreachable for long would otherwise face more skipped keys than it keeps.
        ack_wires: list[tuple[list[bytes], bytes]] = []
        if channel is not None:
            ack_wires = self._ack_wires(peer, acks)
            try:
                for _, wire in ack_wires:
                    await channel.send(wire)
                for wire in wires:
                    await channel.send(wire)
                self.stats.sent_direct += len(rows)
                self._sent_directly(peer, rows, [chunk for chunk, _ in ack_wires])
                return
            except (P2PChatError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("direct channel to %s failed: %s", PublicIdentity(peer).address[:16], exc)
                await self._drop_channel(peer)
        # No direct path: the peer's mailbox.  A message already stored there stays (entries live as long as the
        # message may) and is not stored again; later attempts only try the direct path.
        unstored = [(row, wire) for row, wire in zip(rows, wires, strict=True) if row.state is not MessageState.STORED]
        mailbox = await self._mailbox_of(peer, probe=bool(acks) and not ack_wires) if acks or unstored else None
        if mailbox is not None:
            if not ack_wires:
                ack_wires = self._ack_wires(peer, acks)
            replicas = await self._store_in_mailbox(
                mailbox[0], [wire for _, wire in ack_wires] + [w for _, w in unstored], pairwise=mailbox[1]
            )
            for (chunk, _), count in zip(ack_wires, replicas, strict=False):
                if count > 0:
                    with self.db.transaction():
                        self.db.acks_sent(peer, chunk)
            for (row, _), count in zip(unstored, replicas[len(ack_wires) :], strict=True):
                if count > 0:
                    self._set_state(row, MessageState.STORED, replicas=count)
        for row in rows:
            self._retry_later(row)

    def _ack_wires(self, peer: bytes, acks: list[bytes]) -> list[tuple[list[bytes], bytes]]:
        """Ratchet messages acknowledging *acks*, :data:`MAX_ACKS_PER_MESSAGE` ids each."""
        wires = []
        for start in range(0, len(acks), MAX_ACKS_PER_MESSAGE):
            chunk = acks[start : start + MAX_ACKS_PER_MESSAGE]
            content = Content(int(ContentKind.ACK), self.env.random_bytes(MESSAGE_ID_BYTES), 0, 0, "", tuple(chunk))
            wires.append((chunk, self._encrypt(peer, content)))
        return wires

    def _retry_later(self, row: MessageRow) -> None:
        current = self.db.message(row.id)
        if current is None or current.state in (MessageState.DELIVERED, MessageState.FAILED):
            return
        attempts = current.attempts + 1
        wait = min(MAX_RETRY_INTERVAL, FIRST_RETRY * 2 ** min(attempts, 20))
        wait *= 0.8 + 0.4 * self.env.rng.random()
        with self.db.transaction():
            self.db.update_message(row.id, attempts=attempts, next_attempt=trio.current_time() + wait)

    def _sent_directly(self, peer: bytes, rows: list[MessageRow], ack_chunks: list[list[bytes]]) -> None:
        """Record a direct send in one transaction: each message *sent* (unless its acknowledgement already came)
        and due again after :data:`ACK_WAIT`, and the acknowledgements that went along no longer owed.

        (One commit per batch rather than two per message and one per acknowledgement: commits were most of the
        end-to-end cost of a message.  A crash before it commits only means the same ciphertexts go again, and the
        peer drops what it already took.)
        """
        now = trio.current_time()
        events: list[DeliveryUpdate] = []
        with self.db.transaction():
            for row in rows:
                current = self.db.message(row.id)
                if current is None or current.state in (MessageState.DELIVERED, MessageState.FAILED):
                    continue
                wait = ACK_WAIT * (0.8 + 0.4 * self.env.rng.random())
                if current.state in (MessageState.QUEUED, MessageState.STORED):
                    self.db.update_message(
                        row.id,
                        state=MessageState.SENT,
                        reason=None,
                        attempts=current.attempts + 1,
                        next_attempt=now + wait,
                    )
                    events.append(DeliveryUpdate(row.id, row.peer, MessageState.SENT, current.replicas, None))
                else:
                    self.db.update_message(row.id, attempts=current.attempts + 1, next_attempt=now + wait)
            for chunk in ack_chunks:
                self.db.acks_sent(peer, chunk)
        for event in events:
            self._emit(event)

    def _set_state(self, row: MessageRow, state: MessageState, *, replicas: int = 0, reason: str | None = None) -> None:
        with self.db.transaction():
            current = self.db.message(row.id)
            if current is None or current.state is MessageState.DELIVERED:
                return
            self.db.update_message(row.id, state=state, replicas=max(replicas, current.replicas), reason=reason)
        self._emit(DeliveryUpdate(row.id, row.peer, state, max(replicas, current.replicas), reason))

    async def _wires_for(self, peer: bytes, rows: list[MessageRow]) -> list[bytes]:
        """The ratchet messages for *rows* (all to *peer*), each encrypted once and kept, so a retry resends the
        same bytes; those encrypted now are committed together (one commit per batch, not per message)."""
        if all(row.wire is not None for row in rows):
            return [row.wire for row in rows if row.wire is not None]
        await self._ensure_session(peer)
        wires: list[bytes] = []
        with self.db.transaction():
            for row in rows:
                current = row if row.wire is not None else self.db.message(row.id)
                if current is not None and current.wire is not None:
                    wires.append(current.wire)
                    continue
                content = Content(int(ContentKind.TEXT), row.id, row.seq, int(row.sent_at * 1000), row.text, ())
                wire = self._encrypt(peer, content)
                self.db.update_message(row.id, wire=wire)
                wires.append(wire)
        return wires

    # --- sessions ------------------------------------------------------------------------------------------------

    def _records(self, peer: bytes) -> tuple[SessionRecord | None, SessionRecord | None]:
        stored = self.db.session(peer)
        if stored is None:
            return None, None
        current = self._sessions.record(stored[0])
        previous = None if stored[1] is None else self._sessions.record(stored[1])
        return current, previous

    def _save(self, peer: bytes, current: SessionRecord, previous: SessionRecord | None) -> None:
        codec = self._sessions
        self.db.set_session(
            peer, codec.encode_record(current), None if previous is None else codec.encode_record(previous)
        )

    async def _ensure_session(self, peer: bytes) -> None:
        if self.db.session(peer) is not None:
            return
        info = await self._prekey_info(peer)
        if info is None:
            raise P2PChatError("no prekey record found for this peer")
        bundle = x3dh.decode_bundle(info.bundle)
        x3dh.validate_bundle(bundle, peer, self.env.wall_time())
        shared, initial, associated = x3dh.initiate(self.identity, bundle, self.env.random_bytes)
        state = ratchet.init_sender(shared, bundle.signed_prekey, self.env.random_bytes)
        initial_bytes = x3dh.encode_initial_header(initial)
        record = SessionRecord(self._sessions.encode_state(state), associated, initial_bytes, None, False)
        with self.db.transaction():
            if self.db.session(peer) is None:
                self._save(peer, record, None)

    def _encrypt(self, peer: bytes, content: Content) -> bytes:
        """Encrypt with the current session (the caller holds a transaction or this opens one)."""
        with self.db.transaction():
            current, previous = self._records(peer)
            if current is None:
                raise P2PChatError("no session with this peer")
            state = self._sessions.state(current.ratchet)
            state, header, ciphertext = ratchet.encrypt(
                state, encode(content), current.associated_data, self.env.random_bytes
            )
            updated = SessionRecord(
                self._sessions.encode_state(state),
                current.associated_data,
                current.initial,
                current.peer_ephemeral,
                current.answered,
            )
            self._save(peer, updated, previous)
            # Before the message can leave: the peer may answer into our pairwise mailbox once it has it.
            self.db.mark_wrote(peer, text=content.kind == ContentKind.TEXT)
        return encode(RatchetMessage(current.initial, ratchet.encode_header(header), ciphertext))

    def _decrypt(self, sender: bytes, message: RatchetMessage) -> Content:
        """Decrypt *message* from *sender* and step the session; inside the caller's transaction."""
        current, previous = self._records(sender)
        header = ratchet.decode_header(message.header)
        candidates: list[tuple[str, SessionRecord]] = []
        fresh: SessionRecord | None = None
        prekeys_after: bytes | None = None
        if message.initial is not None:
            initial = x3dh.decode_initial_header(message.initial)
            if initial.sender_identity_key != sender:
                raise ProtocolError("the initial header names another sender")
            known = [
                (name, r)
                for name, r in (("current", current), ("previous", previous))
                if r is not None and r.peer_ephemeral == initial.ephemeral_key
            ]
            if known:
                candidates.extend(known)
            elif self.db.initial_seen(initial.ephemeral_key):
                raise ProtocolError("a replayed initial header (that session was replaced long ago)")
            else:
                prekeys = x3dh.decode_prekey_state(_required(self.db.get("prekeys")))
                prekeys, shared, associated, _ = x3dh.respond(self.identity, prekeys, initial, self.env.wall_time())
                private, public = x3dh.signed_prekey_pair(prekeys, initial.signed_prekey_id)
                state = ratchet.init_receiver(shared, private, public)
                fresh = SessionRecord(self._sessions.encode_state(state), associated, None, initial.ephemeral_key, True)
                candidates.append(("fresh", fresh))
                prekeys_after = x3dh.encode_prekey_state(prekeys)
        else:
            candidates.extend((name, r) for name, r in (("current", current), ("previous", previous)) if r)
        for name, record in candidates:
            try:
                state, plaintext = ratchet.decrypt(
                    self._sessions.state(record.ratchet),
                    header,
                    message.ciphertext,
                    record.associated_data,
                    self.env.random_bytes,
                )
            except ProtocolError:
                continue
            content = decode(Content, plaintext)
            stepped = SessionRecord(
                self._sessions.encode_state(state),
                record.associated_data,
                None,  # the peer has answered on this session: no need to attach our initial header any more
                record.peer_ephemeral,
                True,
            )
            if name == "current":
                self._save(sender, stepped, previous)
            elif name == "previous":
                assert current is not None
                self._save(sender, current, stepped)
            else:
                # A session the peer started.  If we started one too and the peer has not answered it, both sides
                # keep the session started by the lower identity key, so they converge on one.
                if current is not None and not current.answered and self.key < sender:
                    self._save(sender, current, stepped)
                else:
                    self._save(sender, stepped, current)
                if prekeys_after is not None:
                    self.db.put("prekeys", prekeys_after)  # the one-time prekey is used up, in this transaction
                    self._prekeys_changed.set()
                assert record.peer_ephemeral is not None
                self.db.see_initial(record.peer_ephemeral, self.env.wall_time())
            return content
        raise ProtocolError("no session could decrypt this message")

    # --- receiving -----------------------------------------------------------------------------------------------

    def _retaken(self, sender: bytes, taken: tuple[bytes, bytes | None], entry: tuple[bytes, float] | None) -> bool:
        """A ratchet message whose digest we know: a resend by its sender, or a replay by someone else."""
        # A resend of what we already took (its key is spent, so it would not decrypt): the sender did not get
        # our acknowledgement.  Owe it again.  The same bytes from anyone else are a replay: dropped.
        with self.db.transaction():
            if entry is not None:
                self.db.mark_entry_seen(*entry)
            if taken[0] == sender and taken[1] is not None:
                self.db.owe_ack(sender, taken[1])
        if taken[0] != sender:
            self.stats.dropped_replays += 1
            return False
        self.stats.duplicates += 1
        self._wake.set()
        return taken[1] is not None

    def _take(self, sender: bytes, wire: bytes, entry: tuple[bytes, float] | None = None) -> bool:
        """Take one ratchet message from *sender*, in one transaction.  Returns whether an ack is now owed."""
        contact = self.db.contact(sender)
        if contact is not None and contact.status is ContactStatus.BLOCKED:
            self.stats.dropped_blocked += 1
            if entry is not None:
                with self.db.transaction():
                    self.db.mark_entry_seen(*entry)
            return False
        events: list[IncomingMessage | DeliveryUpdate] = []
        digest = hashlib.blake2b(wire, digest_size=16).digest()
        taken = self.db.taken_wire(digest)
        if taken is not None:
            return self._retaken(sender, taken, entry)
        try:
            with self.db.transaction():
                if entry is not None:
                    self.db.mark_entry_seen(*entry)
                content = self._decrypt(sender, decode(RatchetMessage, wire))
                text_id = content.message_id if content.kind == ContentKind.TEXT else None
                self.db.take_wire(digest, sender, text_id, self.env.wall_time())
                self.db.mark_heard(sender)
                if contact is None:
                    self.db.set_contact(sender, None, ContactStatus.REQUEST, self.env.wall_time())
                if content.kind == ContentKind.TEXT:
                    row = MessageRow(
                        id=content.message_id,
                        peer=sender,
                        outgoing=False,
                        text=content.text,
                        sent_at=content.sent_at / 1000,
                        seq=content.seq,
                        state=MessageState.RECEIVED,
                        replicas=0,
                        reason=None,
                        expires_at=math.inf,
                        received_at=self.env.wall_time(),
                        wire=None,
                        next_attempt=None,
                        attempts=0,
                    )
                    if self.db.add_message(row):
                        self.stats.received += 1
                        events.append(IncomingMessage(row))
                    else:
                        self.stats.duplicates += 1
                    self.db.owe_ack(sender, content.message_id)
                else:
                    for message_id in content.acks:
                        acked = self.db.message(message_id)
                        if (
                            acked is not None
                            and acked.outgoing
                            and acked.peer == sender
                            and acked.state is not MessageState.DELIVERED
                        ):
                            self.db.update_message(message_id, state=MessageState.DELIVERED, next_attempt=None)
                            events.append(
                                DeliveryUpdate(message_id, sender, MessageState.DELIVERED, acked.replicas, None)
                            )
        except ProtocolError as exc:
            self.stats.dropped_undecryptable += 1
            log.info("dropped a message that does not decrypt: %s", exc)
            if entry is not None:
                with self.db.transaction():
                    self.db.mark_entry_seen(*entry)
            return False
        for event in events:
            self._emit(event)
        if content.kind == ContentKind.TEXT:
            self._wake.set()
            return True
        return False

    async def _serve(self, channel: Channel) -> None:
        """Read ratchet messages from an incoming (or outgoing) channel until it closes."""
        peer = channel.peer.key
        if peer not in self._channels:
            self._channels[peer] = channel
        try:
            with contextlib.suppress(
                trio.EndOfChannel, P2PChatError, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await channel.receive_each(lambda wire: self._take(peer, wire))
        finally:
            if self._channels.get(peer) is channel:
                del self._channels[peer]
            with contextlib.suppress(Exception):
                await channel.aclose()

    async def _channel_to(self, peer: bytes) -> Channel | None:
        existing = self._channels.get(peer)
        if existing is not None:
            return existing
        addresses = list(self._hints.get(peer, []))
        info = await self._peer_info(peer)
        if info is not None:
            addresses += [Address(a.host, a.port) for a in info.addresses if Address(a.host, a.port) not in addresses]
        for address in addresses:
            with trio.move_on_after(CONNECT_TIMEOUT):
                try:
                    stream = await self.env.network.connect(address)
                    channel = await open_channel(
                        stream, self.identity, self.env.random_bytes, initiator=True, expected_peer=peer
                    )
                except (P2PChatError, OSError, trio.BrokenResourceError) as exc:
                    log.debug("no direct channel to %s: %s", address, exc)
                    continue
                self._channels[peer] = channel
                if self._nursery is not None:
                    self._nursery.start_soon(self._serve, channel)
                return channel
        self._peer_infos.pop(peer, None)  # none answered: look the record up afresh next time (it may have moved)
        return None

    def has_channel(self, peer: bytes) -> bool:
        """Whether a direct channel to *peer* is open now (as far as this node has noticed)."""
        return peer in self._channels

    async def _drop_channel(self, peer: bytes) -> None:
        channel = self._channels.pop(peer, None)
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.aclose()

    # --- the DHT side --------------------------------------------------------------------------------------------

    async def _peer_info(self, peer: bytes) -> PeerInfo | None:
        cached = self._peer_infos.get(peer)
        if cached is not None and cached[0] > trio.current_time():
            return cached[1]
        info: PeerInfo | None = None
        with contextlib.suppress(P2PChatError):
            got = await self.dht.get_record(RecordKind.PEER, peer)
            if got.record is not None:
                info = decode(PeerInfo, got.record.value)
        if len(self._peer_infos) >= MAX_CACHED_PEER_INFOS:
            self._peer_infos.pop(next(iter(self._peer_infos)))
        self._peer_infos[peer] = (trio.current_time() + PEER_INFO_CACHE_TIME, info)
        return info

    async def _prekey_info(self, peer: bytes) -> PrekeyInfo | None:
        try:
            got = await self.dht.get_record(RecordKind.PREKEYS, peer)
        except P2PChatError:
            return None
        if got.record is None:
            return None
        try:
            return decode(PrekeyInfo, got.record.value)
        except ProtocolError:
            return None

    async def _mailbox_of(self, peer: bytes, *, probe: bool) -> tuple[bytes, bool] | None:
        """The public key of the mailbox where *peer* takes our mail, and whether it is the pairwise one (None if
        it cannot be found now).

        The peer's pairwise mailbox for us once we have heard from it (it polls that mailbox from the moment it
        wrote to us); before that its public mailbox, named in its prekey record.  The pairwise one needs no
        lookup to be known; with *probe* (acknowledgements are to be encrypted for it) it is returned only if a
        lookup of its DHT key reaches someone, since each encryption spends a ratchet key the peer must keep.
        """
        if self.db.heard_from(peer):
            try:
                mailbox = outbound_mailbox(self.identity, peer).public.key
            except ProtocolError:  # not a usable curve point: then no session could have been made with it either
                log.info("no pairwise mailbox with %s: its key is unusable", PublicIdentity(peer).address[:16])
            else:
                if probe:
                    try:
                        found = await self.dht.find_node(mailbox_key(mailbox))
                    except P2PChatError:
                        return None
                    if not found.contacts:
                        return None
                return mailbox, True
        info = await self._prekey_info(peer)
        return None if info is None else (info.mailbox_key, False)

    async def _store_in_mailbox(self, mailbox: bytes, wires: list[bytes], *, pairwise: bool) -> list[int]:
        """Seal each wire to the mailbox with public key *mailbox* and append them all (one lookup); replicas per
        wire."""
        key = mailbox_key(mailbox)
        expires = entry_expiry(self.env.wall_time())
        entries = [
            make_entry(key, envelope.seal(self.identity, mailbox, wire, self.env.random_bytes), expires)
            for wire in wires
        ]
        try:
            results = await self.dht.append_entries(key, entries)
        except P2PChatError as exc:
            log.info("could not store in a mailbox: %s", exc)
            return [0] * len(wires)
        stored = sum(r.stored > 0 for r in results)
        self.stats.stored_in_mailbox += stored
        if pairwise:
            self.stats.stored_in_pairwise_mailbox += stored
        return [r.stored for r in results]

    async def publish(self) -> None:
        """Publish our peer record (where to connect) and prekey record (bundle and mailbox key)."""
        wall = self.env.wall_time()
        with self.db.transaction():
            prekeys = x3dh.decode_prekey_state(_required(self.db.get("prekeys")))
            prekeys = x3dh.rotate_signed_prekey(prekeys, self.identity, self.env.random_bytes, wall)
            prekeys = x3dh.replenish(prekeys, self.env.random_bytes, ONE_TIME_PREKEYS)
            self.db.put("prekeys", x3dh.encode_prekey_state(prekeys))
        bundle = x3dh.bundle_for(prekeys, self.identity, wall)
        self._record_seq = max(self._record_seq + 1, int(wall))
        expires = int(wall) + RECORD_TTL
        address = self.tcp_address
        peer_value = encode(PeerInfo((PeerAddress(address.host, address.port),)))
        prekey_value = encode(PrekeyInfo(x3dh.encode_bundle(bundle), self.mailbox.public.key))
        for kind, value in ((RecordKind.PEER, peer_value), (RecordKind.PREKEYS, prekey_value)):
            record = sign_record(self.identity, kind, self._record_seq, expires, value)
            with contextlib.suppress(P2PChatError):
                await self.dht.put_record(record)

    async def _publish_loop(self) -> None:
        while True:
            self._prekeys_changed = trio.Event()
            await self.publish()
            with trio.move_on_after(PUBLISH_INTERVAL * (0.9 + 0.2 * self.env.rng.random())):
                await self._prekeys_changed.wait()
                # A one-time prekey was used: publish a bundle without it soon (batched: many may go at once).
                await trio.sleep(PREKEY_REPUBLISH_DELAY)

    def polled_peers(self) -> list[bytes]:
        """The peers whose pairwise mailbox for us we poll, by key (the rule is in the module docstring)."""
        polled = []
        for peer, wrote_text in self.db.written_to():
            contact = self.db.contact(peer)
            status = None if contact is None else contact.status
            if status is not ContactStatus.BLOCKED and (wrote_text or status is ContactStatus.CONTACT):
                polled.append(peer)
        return polled

    def _mailboxes(self) -> list[tuple[Identity, bytes | None]]:
        """Every mailbox we poll, with the one sender whose mail it may hold (None for the public mailbox)."""
        mailboxes: list[tuple[Identity, bytes | None]] = [(self.mailbox, None)]
        for peer in self.polled_peers():
            try:
                mailboxes.append((inbound_mailbox(self.identity, peer), peer))
            except ProtocolError:  # a key that is no curve point (typed in as a contact): no mail can come from it
                continue
        return mailboxes

    def own_mailbox_keys(self) -> set[NodeId]:
        """The DHT keys of every mailbox we poll: the public one and the pairwise ones of :meth:`polled_peers`."""
        return {mailbox_key(mailbox.public.key) for mailbox, _ in self._mailboxes()}

    async def fetch_mailbox(self) -> int:
        """Fetch our mailboxes now -- the public one and every polled pairwise one (:meth:`polled_peers`),
        :data:`MAX_CONCURRENT_MAILBOX_FETCHES` at a time: take every new entry, then delete what was taken.

        Returns the entries taken.  :class:`~p2pchat.errors.P2PChatError` if no mailbox could be fetched (the
        DHT is out of reach); a mailbox that fails while others are fetched is counted and tried at the next fetch.
        """
        self.stats.mailbox_fetches += 1
        mailboxes = self._mailboxes()
        limiter = trio.CapacityLimiter(MAX_CONCURRENT_MAILBOX_FETCHES)
        taken = 0
        failures: list[P2PChatError] = []

        async def fetch(mailbox: Identity, sender: bytes | None) -> None:
            nonlocal taken
            async with limiter:
                try:
                    taken += await self._fetch_one(mailbox, sender)
                except P2PChatError as exc:
                    self.stats.mailbox_fetch_failures += 1
                    failures.append(exc)

        async with trio.open_nursery() as nursery:
            for mailbox, sender in mailboxes:
                nursery.start_soon(fetch, mailbox, sender)
        wall = self.env.wall_time()
        with self.db.transaction():
            self.db.forget_seen_entries(wall)
            self.db.forget_taken_wires(wall - TAKEN_MEMORY)
            self.db.forget_initials(wall - TAKEN_MEMORY)
        if len(failures) == len(mailboxes):
            raise failures[0]
        return taken

    async def _fetch_one(self, mailbox: Identity, expected_sender: bytes | None) -> int:
        """Fetch one mailbox, take its new entries and delete them; the entries taken."""
        self.stats.mailboxes_fetched += 1
        result = await self.dht.fetch_mailbox(mailbox_key(mailbox.public.key))
        taken: list[bytes] = []
        for entry in result.entries:
            taken.append(entry.entry_id)
            if self.db.entry_seen(entry.entry_id):
                continue
            try:
                sender, wire = envelope.open_envelope(mailbox, entry.payload)
            except ProtocolError:
                self.stats.dropped_undecryptable += 1
                sender, wire = None, b""
            if sender is not None and expected_sender is not None and sender.key != expected_sender:
                # Only the peer and we can compute this mailbox's key, and we never write to it: anyone else who
                # seals to it learned the key on a lookup path, and does not get to write where only the peer may.
                self.stats.dropped_misaddressed += 1
                sender = None
            if sender is None:
                with self.db.transaction():
                    self.db.mark_entry_seen(entry.entry_id, entry.expires_at)
                continue
            self._take(sender.key, wire, (entry.entry_id, float(entry.expires_at)))
        await self._delete(mailbox, taken)
        return len(taken)

    async def _delete(self, mailbox: Identity, entry_ids: Iterable[bytes]) -> None:
        ids = list(entry_ids)
        for start in range(0, len(ids), MAX_TOMBSTONE_IDS):
            tombstone = sign_tombstone(mailbox, ids[start : start + MAX_TOMBSTONE_IDS], int(self.env.wall_time()))
            with contextlib.suppress(P2PChatError):
                await self.dht.delete_entries(tombstone)

    async def _mailbox_loop(self) -> None:
        interval = MAILBOX_FETCH_INTERVAL
        while True:
            try:
                await self.fetch_mailbox()
                interval = MAILBOX_FETCH_INTERVAL
            except P2PChatError as exc:
                log.info("mailbox fetch failed: %s", exc)
                interval = min(MAX_MAILBOX_FETCH_INTERVAL, interval * 2)
            await trio.sleep(interval * (0.8 + 0.4 * self.env.rng.random()))


def _required(value: bytes | None) -> bytes:
    if value is None:
        raise P2PChatError("the messenger's prekey state is missing from its database")
    return value
