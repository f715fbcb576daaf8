"""The DHT node service: routing, lookups, signed records, mailboxes and a quota'd store, over one datagram socket.

This is the trio shell around the pure core.  It owns one datagram endpoint; its receive loop answers requests
synchronously (no task per packet); lookups, fetches and stores run their requests as short tasks.  Every contact
that enters the routing table has proved its node id with a certificate checked from the address it is listed
under (:mod:`p2pchat.core.nodecert`); contacts named in other nodes' replies are only lookup candidates until
they answer for themselves.

Values travel in two steps so that no datagram exceeds 1280 bytes whatever the value's size: a lookup
(:class:`~p2pchat.core.packets.FindValue`) collects contacts, write tokens and a summary of what each node holds;
then the values are fetched (:class:`~p2pchat.core.packets.GetPart`) or stored
(:class:`~p2pchat.core.packets.Store`) part by part.  A get merges what every node that answered holds and
checks every signature itself; a put stores at the k closest nodes that answered.  Stored data is handed to new
close nodes when they appear, owners republish their records, and a get repairs replicas that lag behind.
The wire protocol is specified in docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Final

import trio

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.lookup import ALPHA, DISJOINT_PATHS, FINAL_ROUND_SPARES, Candidate, DisjointLookup, Lookup
from p2pchat.core.nodecert import CERT_REISSUE_AFTER, CertCache, NodeCert, issue_cert
from p2pchat.core.packets import (
    MAX_ENTRY_IDS_PER_REPLY,
    MAX_ERROR_MESSAGE_BYTES,
    MAX_NODES_PER_REPLY,
    EntryIds,
    ErrorCode,
    ErrorReply,
    FindNode,
    FindValue,
    Found,
    GetPart,
    ItemSpace,
    ListEntries,
    LookupSpace,
    NodeInfo,
    Nodes,
    PartReply,
    Ping,
    Pong,
    Store,
    Stored,
)
from p2pchat.core.parts import TRANSFER_ID_BYTES, Part, Reassembler, blob_digest, make_parts
from p2pchat.core.ratelimit import RateLimiter, RateLimits
from p2pchat.core.records import (
    ConflictingRecordError,
    MailboxEntry,
    RecordKind,
    SignedRecord,
    StaleRecordError,
    Tombstone,
    decode_entry,
    decode_record,
    encode_entry,
    encode_record,
    encode_tombstone,
    mailbox_key,
    merge_records,
    record_key,
    validate_entry,
    validate_record,
    validate_tombstone,
)
from p2pchat.core.routing import MAX_FAILURES, Contact, K, ObserveOutcome, RoutingTable
from p2pchat.core.schema import Packet
from p2pchat.core.tokens import WriteTokens
from p2pchat.dht.compat import CompatService
from p2pchat.dht.rpc import LOSSY_OVERDUE_SHARE, PendingKey, RequestTimeoutError, RpcTransport
from p2pchat.dht.store import DeletedEntryError, QuotaExceededError, Space, StoreLimits
from p2pchat.dht.store import Store as ItemStore
from p2pchat.env import Env
from p2pchat.errors import P2PChatError, ProtocolError
from p2pchat.net.base import Address

__all__ = [
    "BOOTSTRAP_ATTEMPTS",
    "BOOTSTRAP_REMEMBERED",
    "CROWDING_FACTOR",
    "EARLY_FINAL_ROUND_RTT",
    "FETCH_WINDOW",
    "HANDOVER_GIVERS",
    "HANDOVER_GIVER_SEEN_WITHIN",
    "HANDOVER_INTERVAL",
    "LIVENESS_QUEUE_SIZE",
    "LOSSY_OVERDUE_SHARE",
    "MAINTENANCE_INTERVAL",
    "MAX_MAILBOX_PAGES",
    "MAX_PUBLISHED",
    "MAX_RECENT_STORES",
    "MAX_REJOIN_INTERVAL",
    "PART_ATTEMPTS",
    "REPUBLISH_INTERVAL",
    "SERVED_KEYS_REMEMBERED",
    "DhtConfig",
    "DhtNode",
    "GetResult",
    "LookupResult",
    "MailboxResult",
    "PutResult",
]

log = logging.getLogger(__name__)

LIVENESS_QUEUE_SIZE: Final = 64
"""Contacts waiting to be pinged -- the least recently seen of a full bucket a newcomer wants a slot in, or a
contact marked bad that asked us something; beyond this the newcomer just waits in the replacement cache, and the
bad contact waits for its next request."""

MAINTENANCE_INTERVAL: Final = 60.0
"""Seconds between maintenance passes (stale bucket refresh, certificate renewal, expiry sweep)."""

EARLY_FINAL_ROUND_RTT: Final = 0.010
"""Smoothed round trip over all peers (seconds) from which a plain lookup on a lossy network (``LOSSY_OVERDUE_SHARE``)
starts its final round at its first answer rather than once it has converged (``early_final_round`` of
:class:`~p2pchat.core.lookup.Lookup`).  *Why:* the final round asks every one of the k closest known anyway, and
waits for the slowest; started at the first answer it runs alongside the last hop or two of the convergence
instead of after them.  The cost is requests to nodes that closer ones then push out of the k closest: on the WAN
scenario (round trips 50-300 ms, 5% loss) the median lookup went from 30 to 45 requests and from 5.6 to 4.2 round
trips (3.9 with the hedge, :data:`~p2pchat.core.rtt.HEDGE_RTTVARS`).  *Why only where lossy:* that is where
lookups are slow (each round trip in sequence risks a lost datagram); on a clean network the classic order already
ends in about 4 round trips, and the early round took the 10,000-node simulation (``bench_dht --sim``) from 28 to
45 requests per lookup and past its 5-minute budget, and the baseline scenario's bytes per node-hour up 34%, for
0.8 round trip.  Joins are the exception (a lookup of the node's own id, on any network): their answers fill the
new node's routing table, and without it the WAN scenario's median stayed at 4.3 round trips.  *Why only where
round trips are long:* where they are short, as between nodes on one host, a lookup's time is the work of its
requests, not their round trips (the extra requests made ``bench_dht``'s put + get 10% slower)."""

HANDOVER_INTERVAL: Final = 60.0
"""Seconds between checks whether new nodes joined the neighbourhood of stored keys (then data is handed over)."""

CROWDING_FACTOR: Final = 2
"""A lookup whose k-th closest node is this many times closer to the target than our own k-th closest contact is
to us was steered into a cluster of ground ids, and runs again over disjoint paths.  Honest networks almost never
trip it (twenty nodes where about ten are expected); a cluster that stays below it leaves about half of the k
closest honest -- enough for a get, which merges every answer.  (Measured on the hostile scenario: at 4, one pair's
pairwise mailbox, which by chance shared its top bits with a Sybil cluster's target, lost 4 messages.)"""

HANDOVER_GIVERS: Final = 3
"""Holders of a key that hand it over: a node gives a key to new neighbours of the key only while fewer than this
many live nodes it knows are closer to the key than itself."""

HANDOVER_GIVER_SEEN_WITHIN: Final = 15 * 60.0
"""A closer holder counts among the :data:`HANDOVER_GIVERS` if it was heard from this recently (seconds; the
neighbourhood's refresh interval), or answers a ping (see :meth:`DhtNode._alive`); so does each of the k closer
nodes that tell a holder it is no longer among the k closest to a key."""

REPUBLISH_INTERVAL: Final = 3600.0
"""Seconds between an owner's republishes of the records it put, so they outlive every replica that held them."""

MAX_PUBLISHED: Final = 64
"""Records this node republishes for their owners (its own peer record and prekey bundle need two)."""

FETCH_WINDOW: Final = 8
"""Part requests (GetPart or Store) in flight at once to one node for one value."""

PART_ATTEMPTS: Final = 3
"""Tries per part request before the peer counts as failed for that value."""

BOOTSTRAP_ATTEMPTS: Final = 3
"""Pings sent to each bootstrap address before giving up on it (one lost datagram must not leave a node alone)."""

BOOTSTRAP_REMEMBERED: Final = 16
"""Bootstrap addresses a node keeps (the last ones :meth:`DhtNode.bootstrap` was given), to try again at
maintenance while none of them has answered and the node knows fewer than k contacts in good standing."""

MAX_REJOIN_INTERVAL: Final = 3600.0
"""Longest wait (seconds) between two attempts of a node that knows fewer than k contacts in good standing to
learn more at maintenance (its own id looked up again, or its bootstrap addresses tried again); the wait starts at
:data:`MAINTENANCE_INTERVAL` and doubles each time an attempt teaches the node nothing new, as in a network of
fewer than k + 1 nodes."""

MAX_MAILBOX_PAGES: Final = 32
"""Most :class:`ListEntries` pages read from one node in one fetch (32 * 60 ids covers the per-key quota)."""

MAX_RECENT_STORES: Final = 1024
"""Finished store transfers remembered, so a retried part of a stored blob gets the same answer."""

SERVED_KEYS_REMEMBERED: Final = 64
"""Keys whose closest contacts, as named in this node's last FindValue answer, are kept for the store that
usually follows (it needs them for hand-over bookkeeping); the oldest is forgotten first."""

MAX_HANDED_PER_KEY: Final = 2 * K
"""Nodes remembered per key as already holding it (the k closest, and some that were)."""

BAD_RECHECK_INTERVAL: Final = 10 * 60.0
"""Seconds between pings to one bad contact among the :data:`NEIGHBOURS_RECHECKED` closest to this node."""

NEIGHBOURS_RECHECKED: Final = 2 * K
"""Contacts closest to this node's own id whose bad ones are pinged again now and then (nodes back from being
offline are needed most here)."""

HANDOVER_FAR_RECHECK: Final = 3600.0
"""Seconds a key stays out of hand-over once this node found k live nodes closer to it than itself (it is no longer
among those responsible for the key).  See :meth:`DhtNode.hand_over`."""

_REPLY_TYPES: Final = (Pong, Nodes, Found, PartReply, EntryIds, Stored, ErrorReply)

_ITEM_TO_STORE: Final = {
    ItemSpace.RECORD: Space.RECORD,
    ItemSpace.ENTRY: Space.ENTRY,
    ItemSpace.TOMBSTONE: Space.TOMBSTONE,
}


@dataclass(frozen=True, slots=True)
class DhtConfig:
    """How a node behaves; the defaults are for a node on its own IP address."""

    k: int = K
    alpha: int = ALPHA
    client_mode: bool = False
    """Ask but never be asked: for a node that cannot receive unsolicited datagrams.  It is never listed as a
    contact and stores nothing for others."""
    store_limits: StoreLimits = field(default_factory=StoreLimits)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    compat: bool = True
    """Serve ``kademlia``-package peers (rpcudp) on the same socket."""
    disjoint_paths: int = DISJOINT_PATHS
    """Disjoint paths (S/Kademlia's d) of the lookups a Sybil cluster can hurt: :meth:`DhtNode.find_node`, gets,
    puts, mailbox appends, fetches and deletes.  1 is a plain Kademlia lookup (for comparison)."""

    def __post_init__(self) -> None:
        if self.disjoint_paths < 1:
            raise ValueError(f"disjoint_paths must be at least 1, got {self.disjoint_paths}")

    @classmethod
    def single_host(cls, **changes: object) -> DhtConfig:
        """For many nodes sharing one IP address (a benchmark or test on loopback): the per-source quota is raised
        to the total and the per-source rate limit is off, since every node's traffic comes from the same IP.
        Whoever uses this must say so next to its figures."""
        base = cls()
        limits = replace(base.store_limits, per_source_bytes=base.store_limits.total_bytes)
        return replace(base, store_limits=limits, rate_limits=RateLimits(rate=None), **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What an iterative lookup found, and what it cost: ``contacts`` are the k closest nodes that answered, or
    with disjoint paths every path's k closest, merged (see :meth:`DisjointLookup.union`), closest first."""

    contacts: list[Candidate]
    hops: int
    rpcs: int


@dataclass(frozen=True, slots=True)
class PutResult:
    """How a put, append or delete went: ``stored`` replicas confirmed (this node included if it is one)."""

    stored: int
    asked: int
    hops: int
    rpcs: int


@dataclass(frozen=True, slots=True)
class GetResult:
    """The merged record (``None`` if no node held a valid one), and the evidence."""

    record: SignedRecord | None
    conflict: bool
    """The owner signed different contents under the winning sequence number."""
    invalid: int
    """Versions fetched that failed validation (forged, expired, under the wrong key)."""
    holders: int
    """Nodes that said they hold some version."""
    hops: int
    rpcs: int


@dataclass(frozen=True, slots=True)
class MailboxResult:
    """The valid entries the nodes closest to a mailbox hold (each once), and the cost of finding them."""

    entries: list[MailboxEntry]
    holders: int
    invalid: int
    hops: int
    rpcs: int


class _Fetched:
    """What one lookup-with-values learned from each node that answered."""

    __slots__ = ("replies",)

    def __init__(self) -> None:
        self.replies: dict[NodeId, tuple[Candidate, Found]] = {}


class _LookupRun:
    """Drives one :class:`Lookup` or :class:`DisjointLookup` from reply callbacks, which run in the transport's
    receive loop: each reply is checked and handed to the lookup, and the next requests go out at once; a request
    past its soft timeout is reported overdue, so the lookup asks the next candidate meanwhile.  ``finished`` is
    set when the lookup is done.  (An object rather than closures: closures that call each other form a reference
    cycle, which only the garbage collector frees.)"""

    __slots__ = (
        "_hedge",
        "_in_flight",
        "_lookup",
        "_node",
        "_on_answer",
        "_reply_type",
        "_request_for",
        "_slow",
        "closed",
        "finished",
    )

    def __init__(
        self,
        node: DhtNode,
        lookup: Lookup | DisjointLookup,
        request_for: Callable[[bytes], Packet],
        reply_type: type[Nodes] | type[Found],
        on_answer: Callable[[Candidate, Nodes | Found], None] | None,
        *,
        hedge: bool = False,
    ) -> None:
        self._node = node
        self._hedge = hedge
        self._lookup = lookup
        self._request_for = request_for
        self._reply_type = reply_type
        self._on_answer = on_answer
        # Keyed by the request, not the node: a candidate dropped from a full candidate set while overdue may be
        # learned and asked again while its first request is still pending.
        self._in_flight: set[PendingKey] = set()
        self._slow: set[PendingKey] = set()
        self.finished = trio.Event()
        self.closed = False

    def ask_more(self) -> None:
        """Send what the lookup wants asked now; set ``finished`` if it is done (or the transport has stopped:
        then ``closed`` is set)."""
        if self.finished.is_set():
            return
        lookup = self._lookup
        transport = self._node.transport
        again = True
        while again:
            again = False
            for candidate in lookup.next_requests():
                txid = transport.new_txid()
                key = (txid, candidate.address)
                try:
                    transport.send_request(
                        self._request_for(txid),
                        candidate.address,
                        functools.partial(self._answered, candidate, key),
                        on_slow=functools.partial(self._overdue, candidate, key),
                        hedge=self._hedge,
                    )
                except P2PChatError as exc:  # too many requests in flight, a refused destination, our own address
                    log.debug("lookup request to %s failed: %s", candidate.address, exc)
                    lookup.on_failure(candidate.node_id)
                    again = True
                except trio.ClosedResourceError:
                    # Raised to the caller by _iterate (a callback, which may run as the transport stops, must not).
                    self.closed = True
                    lookup.on_failure(candidate.node_id)
                    lookup.finish()
                else:
                    self._in_flight.add(key)
        if lookup.done:
            self.finished.set()

    def cancel(self) -> None:
        """Withdraw every request still in flight."""
        transport = self._node.transport
        for key in self._in_flight:
            transport.cancel(key)
        self._in_flight.clear()
        self._slow.clear()

    def detach(self) -> None:
        """The lookup is over: withdraw the requests still in flight, except overdue ones, which are left to
        settle so that a silent node is still reported to the routing table when its request times out (a lookup
        that waited for it would have done so)."""
        transport = self._node.transport
        for key in self._in_flight - self._slow:
            transport.cancel(key)
        self._in_flight &= self._slow

    def _overdue(self, candidate: Candidate, key: PendingKey) -> None:
        if self.finished.is_set() or key not in self._in_flight:
            return
        self._slow.add(key)
        if self._lookup.on_slow(candidate.node_id):
            self.ask_more()

    def _answered(self, candidate: Candidate, key: PendingKey, reply: Packet | None) -> None:
        node = self._node
        node_id = candidate.node_id
        self._in_flight.discard(key)
        self._slow.discard(key)
        over = self.finished.is_set()
        try:
            if reply is None:
                raise RequestTimeoutError(f"no reply from {candidate.address} in time")
            if type(reply) is not self._reply_type:
                raise ProtocolError(f"{self._reply_type.__name__} was expected, not {type(reply).__name__}")
            node._verify_reply(reply.responder, candidate.address, node_id)
        except (RequestTimeoutError, ProtocolError) as exc:
            log.debug("lookup request to %s failed: %s", candidate.address, exc)
            node._failed(node_id, candidate.address)
            if not over:
                self._lookup.on_failure(node_id)
        else:
            # Once the lookup is over, a late reply only tells the routing table the node is alive (above): what
            # the caller has read from the lookup must not change under it.
            if not over:
                if self._on_answer is not None:
                    self._on_answer(candidate, reply)
                self._lookup.on_wire_reply(node_id, reply.nodes)
        self.ask_more()


class _StoreTransfer:
    """Sends a blob's parts to one node: :data:`FETCH_WINDOW` in flight, each tried :data:`PART_ATTEMPTS` times.

    Driven by reply callbacks in the transport's receive loop.  After a refusal or a part that ran out of tries,
    nothing more is sent; once nothing is in flight, ``done`` is called once with whether the node confirmed the
    whole blob stored.
    """

    __slots__ = (
        "_address",
        "_complete",
        "_done",
        "_failed",
        "_keys",
        "_next",
        "_parts",
        "_request",
        "_transport",
        "closed",
    )

    def __init__(
        self,
        transport: RpcTransport,
        address: Address,
        *,
        key: bytes,
        space: int,
        token: bytes,
        parts: list[Part],
        done: Callable[[bool], None],
    ) -> None:
        self._transport = transport
        self._address = address
        self._parts = parts
        self._done: Callable[[bool], None] | None = done
        self._request = functools.partial(Store, key=key, space=space, token=token)
        self._keys: dict[int, PendingKey] = {}
        self._next = 0
        self._complete = False
        self._failed = False
        self.closed = False
        """The transport stopped under it (the caller raises trio.ClosedResourceError)."""

    def start(self) -> None:
        """Send the first window of parts."""
        self._fill()

    def cancel(self) -> None:
        """Withdraw whatever is in flight; ``done`` is not called any more."""
        self._done = None
        for key in self._keys.values():
            self._transport.cancel(key)
        self._keys.clear()

    def _fill(self) -> None:
        while not self._failed and self._next < len(self._parts) and len(self._keys) < FETCH_WINDOW:
            index = self._next
            self._next += 1
            self._send(index, 1)
        self._check_done()

    def _send(self, index: int, attempt: int) -> None:
        transport = self._transport
        try:
            self._keys[index] = transport.send_request(
                self._request(txid=transport.new_txid(), part=self._parts[index]),
                self._address,
                functools.partial(self._answered, index, attempt),
            )
        except P2PChatError:
            self._failed = True
        except trio.ClosedResourceError:
            self._failed = self.closed = True

    def _answered(self, index: int, attempt: int, reply: Packet | None) -> None:
        del self._keys[index]
        if reply is None:
            if attempt < PART_ATTEMPTS:
                self._send(index, attempt + 1)
            else:
                self._failed = True
        elif isinstance(reply, Stored):
            self._complete |= reply.complete
        else:
            if isinstance(reply, ErrorReply):
                log.debug("%s refused a store: code %d (%s)", self._address, reply.code, reply.message)
            self._failed = True
        self._fill()

    def _check_done(self) -> None:
        done = self._done
        if done is not None and not self._keys and (self._failed or self._next == len(self._parts)):
            self._done = None
            done(self._complete)


class DhtNode:
    """One Kademlia node.  Call :meth:`run` in a nursery (``await nursery.start(node.run)``), then use it."""

    def __init__(
        self,
        env: Env,
        identity: Identity,
        *,
        host: str,
        port: int = 0,
        cert_cache: CertCache | None = None,
        config: DhtConfig | None = None,
        store: ItemStore | None = None,
    ) -> None:
        self.env = env
        self.identity = identity
        self.node_id = identity.public.node_id
        self.host = host
        self.port = port
        self.config = config or DhtConfig()
        self.client_mode = self.config.client_mode
        self.k = self.config.k
        self.alpha = self.config.alpha
        self.certs = cert_cache if cert_cache is not None else CertCache()
        now = trio.current_time()
        self.routing = RoutingTable(self.node_id, self.k, now=now)
        self.store = store if store is not None else ItemStore(self.node_id, self.config.store_limits)
        self.tokens = WriteTokens(env.random_bytes, now)
        self.limiter = RateLimiter(self.config.rate_limits)
        self.compat = CompatService(self) if self.config.compat else None
        self._reassembler = Reassembler()
        self._recent_stores: OrderedDict[tuple[Address, bytes], Packet] = OrderedDict()
        self._transport: RpcTransport | None = None
        self._nursery: trio.Nursery | None = None
        self._cert: NodeCert | None = None
        self._liveness_send, self._liveness_receive = trio.open_memory_channel[NodeId](LIVENESS_QUEUE_SIZE)
        self._rechecking: set[NodeId] = set()
        self._bootstrap_addresses: list[Address] = []
        self._unbootstrapped = False
        self._rejoin_at = 0.0
        self._rejoin_wait = MAINTENANCE_INTERVAL / 2  # doubled by a first attempt that teaches nothing
        self._rechecked: dict[NodeId, float] = {}
        self.liveness_dropped = 0
        self.senders_unchecked = 0
        """Requests whose sender's certificate was not checked: the routing table had no room for the sender."""
        self._published: OrderedDict[NodeId, SignedRecord] = OrderedDict()
        # Per key, the node ids (as bytes: hashed and compared in C, 20 at a time on every store) known to hold it.
        self._handed: dict[tuple[Space, NodeId], set[bytes]] = {}
        self._far_until: dict[tuple[Space, NodeId], float] = {}
        self._served: OrderedDict[NodeId, list[Contact]] = OrderedDict()
        self._neighbourhood_changed = False
        self.handovers = 0
        self.sybil_suspicions = 0
        """Lookups whose k closest were crowded round the target, so they ran again over disjoint paths."""

    # --- running ---------------------------------------------------------------------------------------------

    @property
    def transport(self) -> RpcTransport:
        """The RPC transport (available once :meth:`run` has started)."""
        if self._transport is None:
            raise RuntimeError("the DHT node is not running")
        return self._transport

    @property
    def address(self) -> Address:
        """The UDP address this node answers on."""
        return self.transport.local_address

    @property
    def cert(self) -> NodeCert:
        """This node's current certificate."""
        if self._cert is None:
            raise RuntimeError("the DHT node is not running")
        return self._cert

    def contacts(self) -> list[Contact]:
        """Every contact in the routing table (for status pages and tests)."""
        return list(self.routing)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        endpoint = await self.env.network.open_datagram(self.host, self.port)
        self._transport = RpcTransport(
            self.env,
            endpoint,
            self._handle,
            reply_types=_REPLY_TYPES,
            compat_handler=self.compat.handle if self.compat is not None else None,
            limiter=self.limiter,
        )
        self._renew_cert()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._transport.run)
                nursery.start_soon(self._liveness_checks)
                nursery.start_soon(self._maintenance)
                nursery.start_soon(self._republish_loop)
                task_status.started()
        finally:
            self._nursery = None
            await endpoint.aclose()

    def _renew_cert(self) -> None:
        local = self.transport.local_address
        self._cert = issue_cert(self.identity, local.host, local.port, int(self.env.wall_time()))

    def _spawn(self, fn: Callable[[], Awaitable[object]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn)

    async def _maintenance(self) -> None:
        last_handover = trio.current_time()
        while True:
            await trio.sleep(MAINTENANCE_INTERVAL * (0.5 + self.env.rng.random()))
            now = trio.current_time()
            if self.env.wall_time() - self.cert.issued_at > CERT_REISSUE_AFTER:
                self._renew_cert()
            self.store.sweep(self.env.wall_time())
            self._reassembler.expire(now)
            # Hand-over memory only for keys still held: it is bounded by the store, never by time.
            held = set(self.store.keys())
            for memo in (self._handed, self._far_until):
                for slot_key in [k for k in memo if k not in held]:
                    del memo[slot_key]
            self._recheck_bad_neighbours(now)
            if now >= self._rejoin_at and len(self.routing.closest(self.node_id, self.k)) < self.k:
                await self._rejoin(now)
            for target in self.routing.stale_buckets(now, self.env.rng):
                await self.find_node(target, paths=1)
            if self._neighbourhood_changed and now - last_handover >= HANDOVER_INTERVAL:
                self._neighbourhood_changed = False
                last_handover = now
                await self.hand_over()

    async def _republish_loop(self) -> None:
        while True:
            await trio.sleep(REPUBLISH_INTERVAL * (0.9 + 0.2 * self.env.rng.random()))
            await self.republish()

    async def republish(self) -> int:
        """Put every record this node published again (dropping expired ones); returns how many."""
        wall = self.env.wall_time()
        count = 0
        for key, record in list(self._published.items()):
            if record.expires_at <= wall:
                del self._published[key]
                continue
            with contextlib.suppress(P2PChatError):
                await self._put_blob(key, LookupSpace.RECORD, ItemSpace.RECORD, encode_record(record), record.seq)
                count += 1
        return count

    async def _liveness_checks(self) -> None:
        # A newcomer wants a full bucket's slot: the least recently seen contact there must answer a ping or go.
        # And a contact marked bad that asked us something: it must answer a ping to be counted again.
        async for node_id in self._liveness_receive:
            contact = self.routing.get(node_id)
            if contact is not None:
                with contextlib.suppress(RequestTimeoutError, ProtocolError):  # the routing table has been told
                    await self._ask_ping(contact.address, expected=node_id)
            self._rechecking.discard(node_id)

    # --- serving ---------------------------------------------------------------------------------------------

    def _sender(self) -> NodeCert | None:
        return None if self.client_mode else self.cert

    def _handle(self, packet: Packet, source: Address) -> Packet | None:
        sender: NodeCert | None = getattr(packet, "sender", None)
        if (
            sender is not None
            and not self.certs.knows(sender)
            and not self.routing.would_keep(sender.node_id, trio.current_time())
        ):
            # A stranger whose bucket here is full of contacts heard from lately could only wait in the replacement
            # cache: its signature is not worth checking (in the 500-node benchmark, a tenth of all checks).  It is
            # answered all the same; the cache fills from the answers to our own requests.
            self.senders_unchecked += 1
        elif sender is not None:
            # A bad certificate means we will not list the sender; it is still answered, as a client would be.
            try:
                node_id = self.certs.verify(sender, source.host, source.port, self.env.wall_time())
            except ProtocolError as exc:
                log.debug("unverifiable sender certificate from %s: %s", source, exc)
            else:
                self._observe(node_id, source, sender)
        if isinstance(packet, Ping):
            return Pong(packet.txid, self.cert, source.host, source.port)
        if isinstance(packet, FindNode):
            return Nodes(packet.txid, self.cert, self._node_infos(NodeId(packet.target)))
        if isinstance(packet, FindValue):
            return self._serve_find_value(packet, source)
        if isinstance(packet, GetPart):
            return self._serve_get_part(packet)
        if isinstance(packet, ListEntries):
            ids, more = self.store.mailbox_ids(
                NodeId(packet.key), self.env.wall_time(), packet.after, MAX_ENTRY_IDS_PER_REPLY
            )
            return EntryIds(packet.txid, tuple(ids), more)
        if isinstance(packet, Store):
            return self._serve_store(packet, source)
        return None

    def _node_infos(self, target: NodeId) -> tuple[NodeInfo, ...]:
        return self._infos_of(self.routing.closest(target, MAX_NODES_PER_REPLY, ordered=False))

    @staticmethod
    def _infos_of(contacts: list[Contact]) -> tuple[NodeInfo, ...]:
        infos = []
        for contact in contacts:
            info = contact.wire
            if info is None:
                # Kept on the contact: the same object is then sent in reply after reply, and its encoding is
                # memoised by identity (the table clears it when the address changes).
                address = contact.address
                info = contact.wire = NodeInfo(contact.node_id.bytes, address.host, address.port)
            infos.append(info)
        return tuple(infos)  # type: ignore[arg-type]

    def _serve_find_value(self, packet: FindValue, source: Address) -> Found:
        key = NodeId(packet.key)
        token = self.tokens.issue(source.host, key, trio.current_time())
        seq: int | None = None
        digest: bytes | None = None
        entries = 0
        if packet.space == LookupSpace.RECORD:
            item = self.store.record(key, self.env.wall_time())
            if item is not None:
                seq, digest = item.seq, item.digest
        else:
            entries = self.store.entry_count(key)
        # In no particular order: the asker sorts them, and the hand-over bookkeeping below takes them all.
        contacts = self.routing.closest(key, MAX_NODES_PER_REPLY, ordered=False)
        # A store under this key is likely to follow: its hand-over bookkeeping reuses these contacts.
        served = self._served
        served[key] = contacts
        if len(served) > SERVED_KEYS_REMEMBERED:
            served.popitem(last=False)
        return Found(packet.txid, self.cert, self._infos_of(contacts), token, seq, digest, entries)

    def _serve_get_part(self, packet: GetPart) -> Packet:
        key = NodeId(packet.key)
        item = self.store.item(_ITEM_TO_STORE[ItemSpace(packet.space)], key, packet.item_id, self.env.wall_time())
        if item is None:
            return ErrorReply(packet.txid, int(ErrorCode.NOT_FOUND), "not held")
        parts = item.parts()
        if packet.index >= len(parts):
            return ErrorReply(packet.txid, int(ErrorCode.NOT_FOUND), "no such part")
        return PartReply(packet.txid, parts[packet.index])

    def _serve_store(self, packet: Store, source: Address) -> Packet:
        txid = packet.txid
        if self.client_mode:
            return ErrorReply(txid, int(ErrorCode.BAD_REQUEST), "client-mode node stores nothing")
        key = NodeId(packet.key)
        if not self.tokens.check(packet.token, source.host, key, trio.current_time()):
            return ErrorReply(txid, int(ErrorCode.BAD_TOKEN), "write token missing or stale")
        recent_key = (source, packet.part.transfer_id)
        recent = self._recent_stores.get(recent_key)
        if recent is not None:
            return replace(recent, txid=txid)  # type: ignore[type-var]
        try:
            blob = self._reassembler.add(source, packet.part, trio.current_time())
        except ProtocolError as exc:
            return ErrorReply(txid, int(ErrorCode.INVALID), _hint(exc))
        if blob is None:
            return Stored(txid, complete=False)
        space = _ITEM_TO_STORE[ItemSpace(packet.space)]
        reply: Packet
        try:
            self.store.put(space, key, blob, source.host, self.env.wall_time())
        except QuotaExceededError as exc:
            reply = ErrorReply(txid, int(ErrorCode.QUOTA), _hint(exc))
        except (StaleRecordError, ConflictingRecordError) as exc:
            reply = ErrorReply(txid, int(ErrorCode.STALE), _hint(exc))
        except DeletedEntryError as exc:
            reply = ErrorReply(txid, int(ErrorCode.DELETED), _hint(exc))
        except ProtocolError as exc:
            reply = ErrorReply(txid, int(ErrorCode.INVALID), _hint(exc))
        else:
            reply = Stored(txid, complete=True)
            # Whoever stored this looked the key up, so it found the nodes closest to it: assume they hold it too
            # (the contacts this node named in its answer to that lookup, when it still remembers them).
            handed = self._handed.setdefault((_group(space), key), set())
            closest = self._served.get(key)
            if closest is None or self.k != MAX_NODES_PER_REPLY:  # (the remembered answer is in no order)
                closest = self.routing.closest(key, self.k)
            handed.update([c.node_id.bytes for c in closest])
        self._recent_stores[recent_key] = reply
        if len(self._recent_stores) > MAX_RECENT_STORES:
            self._recent_stores.popitem(last=False)
        return reply

    def _observe(self, node_id: NodeId, address: Address, cert: NodeCert, *, answered: bool = False) -> None:
        result = self.routing.observe(node_id, address, trio.current_time(), cert=cert, answered=answered)
        if result.outcome is ObserveOutcome.ADDED:
            self._neighbourhood_changed = True
        elif result.outcome is ObserveOutcome.CACHED and result.ping_candidate is not None:
            self._check_liveness(result.ping_candidate.node_id)
        elif (
            not answered
            and result.outcome is ObserveOutcome.UPDATED
            and result.contact is not None
            and result.contact.failures >= MAX_FAILURES
            and node_id not in self._rechecking
        ):
            # A contact that failed MAX_FAILURES requests in a row is left out of every lookup and hand-over, so
            # nothing we send would ever clear it; now it asks us something: it is probably back.  A request
            # alone does not clear it (a source address can be forged), a ping answered at its address does.
            # Without this, nodes back from being offline stayed out of the tables of the nodes around them: in
            # the offline-delivery simulation (1,000 nodes, 30% churn per hour), when a node among the 20 closest
            # to a key gave the key to one ranked past 100, 88% of the key's 20 closest live nodes were in its
            # table, marked bad -- so it gave to nodes far out, and copies piled up.
            self._recheck(node_id)

    async def _rejoin(self, now: float) -> None:
        # Fewer than k contacts in good standing: we may be cut off with a few others.  If no bootstrap node ever
        # answered us (every ping lost, or they were down), try them again; else look up our own id again through
        # whom we know.  Nodes that joined through us while we were alone know only us and each other: an island
        # that nothing else tells of the rest.  In the WAN simulation (5% loss) about one join in a thousand lost
        # all its pings, islands of two to five nodes formed around those, and a node that joined through one
        # still knew two contacts 40 minutes later.
        known = len(self.routing)
        if self._unbootstrapped:
            self._unbootstrapped = not await self._join(self._bootstrap_addresses)
        else:
            await self.find_node(self.node_id, paths=1)
        # Backing off while it teaches us nothing new: in a network of fewer than k + 1 nodes it never will.
        grew = len(self.routing) > known
        self._rejoin_wait = MAINTENANCE_INTERVAL if grew else min(2 * self._rejoin_wait, MAX_REJOIN_INTERVAL)
        self._rejoin_at = now + self._rejoin_wait

    def _recheck_bad_neighbours(self, now: float) -> None:
        # Bad contacts among our 2k closest are pinged again, each at most once per BAD_RECHECK_INTERVAL: nodes back
        # from being offline are needed here most (hand-over gives our keys to our neighbours), and a returning node
        # asks few of its old neighbours anything soon.  BEP 5 pings questionable nodes at refresh for the same
        # reason.
        for contact in self.routing.closest(self.node_id, NEIGHBOURS_RECHECKED, exclude_failing=False):
            node_id = contact.node_id
            if contact.failures < MAX_FAILURES or node_id in self._rechecking:
                continue
            if now - self._rechecked.get(node_id, -math.inf) < BAD_RECHECK_INTERVAL:
                continue
            self._rechecked[node_id] = now
            self._recheck(node_id)
        if len(self._rechecked) > 4 * NEIGHBOURS_RECHECKED:
            self._rechecked = {n: t for n, t in self._rechecked.items() if now - t < BAD_RECHECK_INTERVAL}

    def _recheck(self, node_id: NodeId) -> None:
        # _rechecking holds what is queued, so a bad contact is not queued twice.
        self._rechecking.add(node_id)
        self._check_liveness(node_id)

    def _check_liveness(self, node_id: NodeId) -> None:
        try:
            self._liveness_send.send_nowait(node_id)
        except trio.WouldBlock:
            self._rechecking.discard(node_id)
            self.liveness_dropped += 1

    # --- the kademlia-package compat backend (see p2pchat.dht.compat) ----------------------------------------

    def compat_closest(self, target: NodeId, count: int) -> list[tuple[NodeId, Address]]:
        """p2pchat contacts closest to *target*, for a ``kademlia`` peer's find_node."""
        return [(c.node_id, c.address) for c in self.routing.closest(target, count)]

    def compat_get(self, key: bytes, now: float) -> bytes | None:
        """The packed compat value held under *key*."""
        return self.store.compat(NodeId(key), now)

    def compat_put(self, key: bytes, packed: bytes, source: Address, now: float) -> bool:
        """Store a packed compat value; False when a compat quota refuses it."""
        if self.client_mode:
            return False
        try:
            self.store.put(Space.COMPAT, NodeId(key), packed, source.host, now)
        except ProtocolError:
            return False
        return True

    def wall_time(self) -> float:
        """This node's wall clock."""
        return self.env.wall_time()

    # --- asking ----------------------------------------------------------------------------------------------

    def _verify_reply(self, cert: NodeCert, address: Address, expected: NodeId | None) -> NodeId:
        node_id = self.certs.verify(cert, address.host, address.port, self.env.wall_time())
        if expected is not None and node_id != expected:
            raise ProtocolError(f"{address} answered for node {node_id!r}, not {expected!r}")
        self._observe(node_id, address, cert, answered=True)
        return node_id

    def _failed(self, expected: NodeId | None, address: Address) -> None:
        if expected is not None:
            self.routing.request_failed(expected, trio.current_time(), address)

    async def _ask_ping(self, address: Address, *, expected: NodeId | None = None) -> NodeId:
        transport = self.transport
        try:
            reply = await transport.request(Ping(transport.new_txid(), self._sender()), address)
            if not isinstance(reply, Pong):
                raise ProtocolError("a ping was answered with something other than a pong")
            return self._verify_reply(reply.responder, address, expected)
        except (RequestTimeoutError, ProtocolError):
            self._failed(expected, address)
            raise

    async def ping(self, address: Address) -> NodeId:
        """Ping ``address``; return the node id it proved.  Raises RequestTimeoutError or ProtocolError."""
        return await self._ask_ping(address)

    async def _ask(self, packet: Packet, candidate: Candidate, reply_type: type[Nodes] | type[Found]) -> Nodes | Found:
        transport = self.transport
        try:
            reply = await transport.request(packet, candidate.address)
            if not isinstance(reply, reply_type):
                raise ProtocolError(f"{type(packet).__name__} was answered with {type(reply).__name__}")
            self._verify_reply(reply.responder, candidate.address, candidate.node_id)
        except (RequestTimeoutError, ProtocolError):
            self._failed(candidate.node_id, candidate.address)
            raise
        return reply

    async def _iterate(
        self,
        target: NodeId,
        request_for: Callable[[bytes], Packet],
        reply_type: type[Nodes] | type[Found],
        on_answer: Callable[[Candidate, Nodes | Found], None] | None = None,
        *,
        paths: int = 1,
        hedge: bool = False,
    ) -> Lookup | DisjointLookup:
        """Run a lookup for *target*, asking with ``request_for(txid)``; ``on_answer`` sees every valid Found.

        ``hedge``: the lookup may stop waiting for a node at its hedge on a lossy network
        (:data:`~p2pchat.core.rtt.HEDGE_RTTVARS`).  Only for lookups whose answer any of the k closest gives whole:
        ``find_node`` and record gets (each replica holds the whole record, and the highest sequence wins).  Not
        where the lookup decides where to write or delete -- a store or tombstone must reach the true k closest,
        slow ones too -- nor for a mailbox fetch, which merges what each node holds: a slow node may hold entries
        no other one does.

        A plain lookup first; when *paths* > 1 and the k closest it found are crowded around the target
        (:meth:`_crowded`), the lookup runs again over *paths* disjoint paths, and that one is returned.  *Why not
        always disjoint:* in an honest network three paths cost about four times the requests and 40% more
        latency for the same answer (measured on the baseline scenario: 92 against 23 requests per lookup), and a
        cluster that leaves the honest nodes in the k closest cannot black-hole a get, which merges all k answers.
        To push every honest node out of the k closest, a cluster must sit about k times denser than the network,
        and :data:`CROWDING_FACTOR` flags it well before that.

        Replies are handled as they arrive, in the transport's receive loop, which also sends the next requests:
        the lookup costs this task one wait, not a task and a cancel scope per request, whatever the paths.
        """
        # The k closest seed a disjoint lookup too, dealt among its paths (S/Kademlia).  (Seeding each path with k of
        # its own reached farther out, and hand-over under churn then kept fewer copies at the true k closest.)
        wanted = self.k
        seeds = self.routing.closest(target, wanted)
        if len(seeds) < wanted:
            # Too few contacts in good standing -- typically after this node was offline itself and every request
            # failed.  Contacts that failed lately are better seeds than none; the lookup sorts them out.
            seen = {c.node_id for c in seeds}
            seeds += [c for c in self.routing.closest(target, wanted, exclude_failing=False) if c.node_id not in seen]
            seeds = seeds[:wanted]
        self.routing.touch_bucket(target, trio.current_time())
        # Spares, and an early final round, only where requests often go unanswered: on a clean network they cost
        # more than they save.  Except the early round of a lookup of our own id (a join): its answers are what
        # fill our routing table, and every later lookup is shorter for it.
        transport = self.transport
        lossy = transport.lossy
        srtt = transport.timeouts.overall.srtt
        plain = Lookup(
            target,
            seeds,
            k=self.k,
            alpha=self.alpha,
            own_id=self.node_id,
            spares=FINAL_ROUND_SPARES if lossy else 0,
            early_final_round=(lossy or target == self.node_id) and srtt is not None and srtt >= EARLY_FINAL_ROUND_RTT,
            make_address=Address,
        )
        await self._drive(plain, request_for, reply_type, on_answer, hedge=hedge)
        if paths == 1 or not self._crowded(target, plain.result()):
            return plain
        # The nodes around the target sit far closer together than nodes sit around us: ids ground next to it (a
        # Sybil cluster).  Ask again over disjoint paths, which reach past a cluster that captured some of them.
        self.sybil_suspicions += 1
        disjoint = DisjointLookup(
            target, seeds, paths=paths, k=self.k, alpha=self.alpha, own_id=self.node_id, make_address=Address
        )
        await self._drive(disjoint, request_for, reply_type, on_answer, hedge=hedge)
        return disjoint

    def _crowded(self, target: NodeId, found: list[Candidate]) -> bool:
        """Whether the k closest nodes *found* for *target* sit :data:`CROWDING_FACTOR` times denser around it than
        our own k closest contacts sit around our own id (where our routing table is complete)."""
        k = self.k
        if len(found) < k:
            return False
        ours = self.routing.closest(self.node_id, k)
        if len(ours) < k:
            return False
        return found[k - 1].node_id.distance(target) * CROWDING_FACTOR < ours[-1].node_id.distance(self.node_id)

    async def _drive(
        self,
        lookup: Lookup | DisjointLookup,
        request_for: Callable[[bytes], Packet],
        reply_type: type[Nodes] | type[Found],
        on_answer: Callable[[Candidate, Nodes | Found], None] | None,
        *,
        hedge: bool,
    ) -> None:
        run = _LookupRun(self, lookup, request_for, reply_type, on_answer, hedge=hedge)
        run.ask_more()
        try:
            await run.finished.wait()
        except BaseException:
            run.cancel()
            raise
        run.detach()
        if run.closed:
            raise trio.ClosedResourceError("the DHT node's transport has stopped")

    async def find_node(self, target: NodeId, *, paths: int | None = None) -> LookupResult:
        """Iteratively find the k nodes closest to ``target`` that answer, over ``paths`` disjoint paths (default:
        the configured :attr:`DhtConfig.disjoint_paths`; then every path's k closest are returned, merged).

        Bucket refresh and bootstrap ask with ``paths=1``: they look for contacts to fill the routing table, which
        admits a contact only once it has proved its id and keeps per-subnet limits, so a liar on the single path
        costs at worst a less useful refresh -- not worth three times the requests on every refresh.
        """
        sender, raw = self._sender(), target.bytes
        lookup = await self._iterate(
            target,
            lambda txid: FindNode(txid, sender, raw),
            Nodes,
            paths=self.config.disjoint_paths if paths is None else paths,
            hedge=True,
        )
        return LookupResult(lookup.union(), lookup.hops, lookup.rpcs)

    async def _find_value(
        self, key: NodeId, space: LookupSpace, *, hedge: bool
    ) -> tuple[Lookup | DisjointLookup, _Fetched]:
        fetched = _Fetched()
        replies = fetched.replies
        sender, raw, number = self._sender(), key.bytes, int(space)

        def keep(candidate: Candidate, reply: Nodes | Found) -> None:
            assert isinstance(reply, Found)  # the lookup checked the reply type
            replies[candidate.node_id] = (candidate, reply)

        lookup = await self._iterate(
            key,
            lambda txid: FindValue(txid, sender, raw, number),
            Found,
            keep,
            paths=self.config.disjoint_paths,
            hedge=hedge,
        )
        return lookup, fetched

    async def bootstrap(self, addresses: Iterable[Address]) -> int:
        """Join the network through ``addresses``: ping each, then look up our own id.

        Returns how many bootstrap addresses answered (0 means this node is alone, for now).  If none did, the node
        keeps the addresses (up to :data:`BOOTSTRAP_REMEMBERED`) and tries them again at maintenance (backing off up
        to :data:`MAX_REJOIN_INTERVAL`) until one answers, or it knows k contacts in good standing some other way.
        """
        addresses = list(addresses)
        answered = await self._join(addresses)
        self._bootstrap_addresses = addresses[-BOOTSTRAP_REMEMBERED:]
        self._unbootstrapped = not answered and bool(addresses)
        return answered

    async def _join(self, addresses: list[Address]) -> int:
        answered = 0

        async def try_one(address: Address) -> None:
            nonlocal answered
            for attempt in range(BOOTSTRAP_ATTEMPTS):
                try:
                    await self._ask_ping(address)
                except RequestTimeoutError as exc:
                    if attempt == BOOTSTRAP_ATTEMPTS - 1:
                        log.info("bootstrap node %s did not answer: %s", address, exc)
                except ProtocolError as exc:
                    log.info("bootstrap node %s answered wrongly: %s", address, exc)
                    return
                else:
                    answered += 1
                    return

        async with trio.open_nursery() as nursery:
            for address in addresses:
                nursery.start_soon(try_one, address)
        if answered:
            # Our own neighbourhood; farther buckets fill from the traffic that follows and from refreshes.  (Looking
            # up every far bucket at once cost ~150 requests per join and made a growing network's joins quadratic.)
            # A lookup that nobody answered (a lossy path lost the request and its resend) is tried again: a node
            # that knows only its bootstrap nodes is all but invisible until its next refresh.
            for _ in range(BOOTSTRAP_ATTEMPTS):
                if (await self.find_node(self.node_id, paths=1)).contacts:
                    break
        return answered

    # --- parts -----------------------------------------------------------------------------------------------

    async def _part_request(self, packet_for: Callable[[bytes], Packet], address: Address) -> Packet:
        """One part request, retried: a lost datagram should not cost the whole value."""
        transport = self.transport
        for attempt in range(PART_ATTEMPTS):
            try:
                return await transport.request(packet_for(transport.new_txid()), address)
            except RequestTimeoutError:
                if attempt == PART_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _fetch_blob(self, address: Address, key: NodeId, space: ItemSpace, item_id: bytes) -> bytes:
        """Fetch a whole item from one node, part by part; ProtocolError if it sends something inconsistent."""

        def get(index: int) -> Callable[[bytes], Packet]:
            return lambda txid: GetPart(txid, key.bytes, int(space), item_id, index)

        def part_of(reply: Packet) -> Part:
            if isinstance(reply, ErrorReply):
                raise ProtocolError(f"{address} could not send the part: {reply.message}")
            if not isinstance(reply, PartReply):
                raise ProtocolError(f"GetPart was answered with {type(reply).__name__}")
            return reply.part

        first = part_of(await self._part_request(get(0), address))
        parts: list[Part | None] = [None] * first.total
        parts[0] = first
        if first.total > 1:
            limiter = trio.CapacityLimiter(FETCH_WINDOW)
            failure: list[P2PChatError] = []

            async def fetch(index: int, cancel_scope: trio.CancelScope) -> None:
                async with limiter:
                    try:
                        parts[index] = part_of(await self._part_request(get(index), address))
                    except P2PChatError as exc:
                        # Raised here it would leave the nursery as an ExceptionGroup, which callers that catch
                        # P2PChatError would not catch: keep the first failure and stop the other parts.
                        failure.append(exc)
                        cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                for index in range(1, first.total):
                    nursery.start_soon(fetch, index, nursery.cancel_scope)
            if failure:
                raise failure[0]
        blob = bytearray()
        for index, part in enumerate(parts):
            if part is None or part.index != index or part.total != first.total or part.digest != first.digest:
                raise ProtocolError(f"{address} sent inconsistent parts")
            blob += part.chunk
        if blob_digest(bytes(blob)) != first.digest:
            raise ProtocolError(f"{address} sent parts that do not match their digest")
        return bytes(blob)

    async def _store_blob(self, address: Address, key: NodeId, space: ItemSpace, token: bytes, blob: bytes) -> bool:
        """Store a blob at one node; True once it confirms the whole is stored."""
        return await self._store_at([(address, token)], key, space, blob) == 1

    async def _store_many(
        self, targets: list[tuple[Candidate, Found]], key: NodeId, space: ItemSpace, blob: bytes
    ) -> int:
        return await self._store_at([(c.address, found.token) for c, found in targets], key, space, blob)

    async def _store_at(self, targets: list[tuple[Address, bytes]], key: NodeId, space: ItemSpace, blob: bytes) -> int:
        """Store a blob at each (address, write token) of *targets* at once; returns how many confirmed it."""
        if not targets:
            return 0
        # One transfer id for all: each target is another node, and a transfer is known by its source and id.
        parts = make_parts(blob, self.env.random_bytes(TRANSFER_ID_BYTES))
        finished = trio.Event()
        stored = 0
        remaining = len(targets)

        def done(ok: bool) -> None:
            nonlocal stored, remaining
            stored += ok
            remaining -= 1
            if remaining == 0:
                finished.set()

        transfers = [
            _StoreTransfer(
                self.transport, address, key=key.bytes, space=int(space), token=token, parts=parts, done=done
            )
            for address, token in targets
        ]
        for transfer in transfers:
            transfer.start()
        try:
            await finished.wait()
        finally:
            for transfer in transfers:
                transfer.cancel()
        if any(transfer.closed for transfer in transfers):
            raise trio.ClosedResourceError("the DHT node's transport has stopped")
        return stored

    def _among_closest(self, key: NodeId, others: list[Candidate]) -> bool:
        if self.client_mode:
            return False
        if len(others) < self.k:
            return True
        return self.node_id.distance(key) < others[-1].node_id.distance(key)

    def _replica_set(self, key: NodeId, lookup: Lookup | DisjointLookup) -> tuple[list[Candidate], bool]:
        """The k closest nodes to *key* counting this one: the other nodes to store at, and whether to store here.

        Storing at k others *and* here made k + 1 copies, one beyond the k closest a later delete reaches, which
        then lingered until it expired.  After a disjoint lookup these are the k closest over all paths.  *Not*
        also the next nodes of every path (S/Kademlia's way to put honest copies beyond a Sybil cluster that
        fills the k closest): those reach as far out as the putter's lookup happened to go, and a later delete
        from another node, whose lookup went elsewhere, missed some (tried: the copies came back in the next
        fetch, in tests/test_dht_records.py and tests/test_messaging.py).
        """
        closest = lookup.result()
        if not self._among_closest(key, closest):
            return closest, False
        return closest[: self.k - 1], True

    def _store_locally(self, space: Space, key: NodeId, blob: bytes) -> bool:
        try:
            self.store.put(space, key, blob, self.host, self.env.wall_time())
        except (StaleRecordError, ConflictingRecordError, DeletedEntryError, QuotaExceededError):
            return False
        return True

    async def _put_blob(
        self, key: NodeId, lookup_space: LookupSpace, space: ItemSpace, blob: bytes, seq: int | None = None
    ) -> PutResult:
        lookup, fetched = await self._find_value(key, lookup_space, hedge=False)
        if space is ItemSpace.TOMBSTONE:
            # A delete must reach every copy, not just the k closest now: the k closest when an entry was stored
            # may differ (the mailbox owner, offline then, is back among them).  So the tombstone goes to the k
            # closest, this node, and every node the lookup found holding entries of this mailbox.
            closest = lookup.union()
            here = self._among_closest(key, closest[: self.k]) or bool(self.store.items_for(Space.ENTRY, key))
            listed = {c.node_id for c in closest}
            closest += [c for c, found in fetched.replies.values() if found.entries > 0 and c.node_id not in listed]
        else:
            closest, here = self._replica_set(key, lookup)
        targets: list[tuple[Candidate, Found]] = []
        already = 0
        digest = blob_digest(blob)
        for candidate in closest:
            found = fetched.replies[candidate.node_id][1]
            if seq is not None and found.seq is not None and found.seq >= seq:
                # Holds this record already (same digest), or a newer one: storing ours would be refused.
                already += found.seq == seq and found.digest == digest
                continue
            targets.append((candidate, found))
        stored = already + await self._store_many(targets, key, space, blob)
        if here and self._store_locally(_ITEM_TO_STORE[space], key, blob):
            stored += 1
        return PutResult(stored, len(closest) + here, lookup.hops, lookup.rpcs)

    # --- the API: records --------------------------------------------------------------------------------------

    async def put_record(self, record: SignedRecord) -> PutResult:
        """Store a signed record at the k nodes closest to its key; this node then republishes it hourly until it
        expires.  :class:`ValueError` if the record does not validate here and now."""
        key = record_key(record.kind, record.owner_key)
        try:
            validate_record(record, key, self.env.wall_time())
        except ProtocolError as exc:
            raise ValueError(f"refusing to publish an invalid record: {exc}") from exc
        self._published[key] = record
        self._published.move_to_end(key)
        while len(self._published) > MAX_PUBLISHED:
            self._published.popitem(last=False)
        return await self._put_blob(key, LookupSpace.RECORD, ItemSpace.RECORD, encode_record(record), record.seq)

    async def get_record(self, kind: RecordKind, owner_key: bytes) -> GetResult:
        """Find the newest valid record of *kind* for *owner_key*: merged from every node that answered the lookup
        (not the first answer, not a vote), each version's signature checked here.  Replicas found lagging are
        repaired in the background."""
        key = record_key(kind, owner_key)
        lookup, fetched = await self._find_value(key, LookupSpace.RECORD, hedge=True)
        wall = self.env.wall_time()
        versions: dict[tuple[int, bytes], list[Candidate]] = {}
        for candidate, found in fetched.replies.values():
            if found.seq is not None and found.digest is not None:
                versions.setdefault((found.seq, found.digest), []).append(candidate)
        candidates: list[SignedRecord] = []
        local = self.store.record(key, wall)
        if local is not None:
            candidates.append(decode_record(local.blob))
        invalid = 0
        winner_seq: int | None = None
        for (seq, digest), holders in sorted(versions.items(), key=lambda v: (-v[0][0], v[0][1])):
            if winner_seq is not None and seq < winner_seq:
                break
            if local is not None and digest == local.digest:
                winner_seq = local.seq if winner_seq is None else winner_seq
                continue
            record = await self._fetch_version(key, digest, holders)
            if record is None:
                invalid += 1
                continue
            try:
                validate_record(record, key, wall)
            except ProtocolError:
                invalid += 1
                continue
            candidates.append(record)
            if winner_seq is None:
                winner_seq = seq
        merged = merge_records(candidates, key, wall)
        if merged.record is not None:
            lagging = self._lagging(merged.record, self._replica_set(key, lookup)[0], fetched)
            if lagging:
                self._spawn(lambda: self._repair(key, merged.record, lagging))  # type: ignore[arg-type]
        return GetResult(
            merged.record,
            merged.conflict,
            invalid + merged.invalid,
            sum(len(h) for h in versions.values()),
            lookup.hops,
            lookup.rpcs,
        )

    async def _fetch_version(self, key: NodeId, digest: bytes, holders: list[Candidate]) -> SignedRecord | None:
        for holder in holders:
            try:
                blob = await self._fetch_blob(holder.address, key, ItemSpace.RECORD, digest)
                if blob_digest(blob) != digest:
                    raise ProtocolError("record does not match the digest its holder announced")
                return decode_record(blob)
            except P2PChatError as exc:
                log.debug("fetching a record from %s failed: %s", holder.address, exc)
        return None

    @staticmethod
    def _lagging(record: SignedRecord, closest: list[Candidate], fetched: _Fetched) -> list[tuple[Candidate, Found]]:
        """The closest nodes that hold an older version of *record*, or none."""
        lagging = []
        for candidate in closest:
            found = fetched.replies[candidate.node_id][1]
            if found.seq is None or found.seq < record.seq:
                lagging.append((candidate, found))
        return lagging

    async def _repair(self, key: NodeId, record: SignedRecord, lagging: list[tuple[Candidate, Found]]) -> None:
        with contextlib.suppress(P2PChatError):
            await self._store_many(lagging, key, ItemSpace.RECORD, encode_record(record))

    # --- the API: mailboxes ------------------------------------------------------------------------------------

    async def append_entry(self, mailbox: NodeId, entry: MailboxEntry) -> PutResult:
        """Add *entry* to the mailbox at DHT key *mailbox*, at its k closest nodes.  :class:`ValueError` if the
        entry does not validate here and now."""
        try:
            validate_entry(entry, mailbox, self.env.wall_time())
        except ProtocolError as exc:
            raise ValueError(f"refusing to store an invalid entry: {exc}") from exc
        return await self._put_blob(mailbox, LookupSpace.MAILBOX, ItemSpace.ENTRY, encode_entry(entry))

    async def append_entries(self, mailbox: NodeId, entries: list[MailboxEntry]) -> list[PutResult]:
        """Add several entries to one mailbox with one lookup (a sender with a backlog for an offline peer).
        Returns one result per entry, in order.  :class:`ValueError` if an entry does not validate."""
        wall = self.env.wall_time()
        for entry in entries:
            try:
                validate_entry(entry, mailbox, wall)
            except ProtocolError as exc:
                raise ValueError(f"refusing to store an invalid entry: {exc}") from exc
        if not entries:
            return []
        lookup, fetched = await self._find_value(mailbox, LookupSpace.MAILBOX, hedge=False)
        closest, here = self._replica_set(mailbox, lookup)
        targets = [(c, fetched.replies[c.node_id][1]) for c in closest]
        results: list[PutResult] = []
        for entry in entries:
            blob = encode_entry(entry)
            stored = await self._store_many(targets, mailbox, ItemSpace.ENTRY, blob)
            if here and self._store_locally(Space.ENTRY, mailbox, blob):
                stored += 1
            results.append(PutResult(stored, len(closest) + here, lookup.hops, lookup.rpcs))
        return results

    async def delete_entries(self, tombstone: Tombstone) -> PutResult:
        """Delete the entries *tombstone* names from its mailbox at the k closest nodes."""
        key = mailbox_key(tombstone.mailbox_public_key)
        try:
            validate_tombstone(tombstone, key, self.env.wall_time())
        except ProtocolError as exc:
            raise ValueError(f"refusing to send an invalid tombstone: {exc}") from exc
        return await self._put_blob(key, LookupSpace.MAILBOX, ItemSpace.TOMBSTONE, encode_tombstone(tombstone))

    async def fetch_mailbox(self, mailbox: NodeId) -> MailboxResult:
        """Every valid entry the nodes closest to *mailbox* hold, each once (merged across nodes)."""
        lookup, fetched = await self._find_value(mailbox, LookupSpace.MAILBOX, hedge=False)
        wall = self.env.wall_time()
        holders = [(c, f) for c, f in fetched.replies.values() if f.entries > 0]
        where: dict[bytes, list[Candidate]] = {}

        async def list_ids(candidate: Candidate) -> None:
            ids = await self._list_entries(candidate.address, mailbox)
            for entry_id in ids or ():
                where.setdefault(entry_id, []).append(candidate)

        async with trio.open_nursery() as nursery:
            for candidate, _ in holders:
                nursery.start_soon(list_ids, candidate)
        entries: dict[bytes, MailboxEntry] = {}
        local_ids, _ = self.store.mailbox_ids(mailbox, wall, b"", 1 << 30)
        for entry_id in local_ids:
            item = self.store.item(Space.ENTRY, mailbox, entry_id, wall)
            if item is not None:
                entries[entry_id] = decode_entry(item.blob)
        invalid = 0
        limiter = trio.CapacityLimiter(FETCH_WINDOW)

        async def fetch(entry_id: bytes, sources: list[Candidate]) -> None:
            nonlocal invalid
            async with limiter:
                for source in sources:
                    try:
                        blob = await self._fetch_blob(source.address, mailbox, ItemSpace.ENTRY, entry_id)
                        entry = decode_entry(blob)
                        validate_entry(entry, mailbox, wall)
                        if entry.entry_id != entry_id:
                            raise ProtocolError("entry is not the one asked for")
                    except P2PChatError as exc:
                        invalid += isinstance(exc, ProtocolError)
                        continue
                    entries[entry_id] = entry
                    return

        async with trio.open_nursery() as nursery:
            for entry_id, sources in where.items():
                if entry_id not in entries:
                    nursery.start_soon(fetch, entry_id, sources)
        ordered = sorted(entries.values(), key=lambda e: (e.expires_at, e.entry_id))
        return MailboxResult(ordered, len(holders), invalid, lookup.hops, lookup.rpcs)

    async def _list_entries(self, address: Address, mailbox: NodeId) -> set[bytes] | None:
        """The entry ids a node holds in *mailbox* (None if it does not answer properly)."""
        ids: set[bytes] = set()
        after = b""
        for _ in range(MAX_MAILBOX_PAGES):
            try:
                page = await self._part_request(functools.partial(ListEntries, key=mailbox.bytes, after=after), address)
            except P2PChatError:
                return None
            if not isinstance(page, EntryIds):
                return None
            ids.update(page.ids)
            # Pages must move forward, or a liar could keep us paging forever.
            if not page.more or not page.ids or page.ids[-1] <= after:
                break
            after = page.ids[-1]
        return ids

    # --- hand-over -----------------------------------------------------------------------------------------------

    async def hand_over(self) -> int:
        """Give what this node holds to nodes now among the k closest to its key that may not have it (new
        neighbours); returns how many nodes were given data.  Runs by itself when the neighbourhood changes."""
        if self.client_mode:
            return 0
        given = 0
        now = trio.current_time()
        for group, key in self.store.keys():  # noqa: SIM118 - a method, not a dict
            if group is Space.COMPAT or self._far_until.get((group, key), now) > now:
                continue
            # 2k contacts: spares for those of the k closest that are offline (with 15% of nodes offline, "k of the
            # k closest live" would almost never hold, and a node far out would go on as if responsible).
            known = self.routing.closest(key, 2 * self.k)
            closest = known[: self.k]
            own = self.node_id.distance(key)
            closer = [c for c in known if c.node_id.distance(key) < own]
            if len(closer) >= self.k and await self._alive(closer, self.k):
                # We know k live nodes closer to the key than we are: we are no longer among those responsible for
                # it, and our copy lives out its expiry.  Giving from out here spread keys outward without end:
                # each node beyond the k closest gave to the k closest *it* knew, some of them farther out still
                # (in the baseline simulation a record ended on 135 live nodes).
                #
                # And the key rests for HANDOVER_FAR_RECHECK: proving "k live closer" costs a ping to each of them not
                # heard from lately, and a node keeps far copies for days.  Checking every one at every pass cost 87,000
                # of the 226,000 hand-over requests in the second virtual hour (2,000 nodes, 30% churn per hour), and
                # grew with the far copies each node collects.
                self._far_until[(group, key)] = now + HANDOVER_FAR_RECHECK
                continue
            handed = self._handed.setdefault((group, key), set())
            if await self._alive([c for c in closer if c.node_id.bytes in handed], HANDOVER_GIVERS):
                # HANDOVER_GIVERS live nodes closer to the key than we are hold it: they hand it over, and our copy
                # lives out its expiry.  (The Kademlia paper's "only the closest holder transfers", with a few more
                # so that one giver offline or behind does not stall it.)  Every holder giving to every newcomer
                # made hand-over the largest share of all DHT traffic under churn: each change of a key's k closest
                # cost up to k FindValue/Store exchanges instead of a few.  The givers are near the key, so their
                # tables are complete there, and "the k closest they know" are the true k closest -- no outward
                # spread.  Only known holders count (``handed``: told so by their answer, or given it by us): nodes
                # closer than us that lack the key must not silence us, or a key would reach no newcomer at all.
                continue
            newcomers = [c for c in closest if c.node_id.bytes not in handed]
            for contact in newcomers:
                if await self._give(contact, group, key):
                    given += 1
                    handed.add(contact.node_id.bytes)
            if len(handed) > MAX_HANDED_PER_KEY:
                current = {c.node_id.bytes for c in closest}
                self._handed[(group, key)] = handed & current
        self.handovers += given
        return given

    async def _alive(self, contacts: list[Contact], needed: int) -> bool:
        """Whether *needed* of *contacts* (closest first) are alive: heard from within
        :data:`HANDOVER_GIVER_SEEN_WITHIN`, or answering a ping now.

        *Why ask:* a node that left stays in routing tables until a request to it fails, and nodes near a key
        rarely ask each other anything, so departed holders counted as givers kept the live ones silent (under
        heavy churn a key ended up on 11 nodes, 9 of them among its 20 closest).  Not counting a contact unheard
        from instead made every holder give in a quiet network.  A ping settles it, and refreshes the contact for
        every other key.
        """
        if len(contacts) < needed:
            return False
        cutoff = trio.current_time() - HANDOVER_GIVER_SEEN_WITHIN
        alive = 0
        for index, contact in enumerate(contacts):
            if alive + len(contacts) - index < needed:
                return False  # too few left to make it
            if contact.last_seen < cutoff:
                try:
                    await self._ask_ping(contact.address, expected=contact.node_id)
                except (RequestTimeoutError, ProtocolError):
                    continue
            alive += 1
            if alive >= needed:
                return True
        return False

    async def _give(self, contact: Contact, group: Space, key: NodeId) -> bool:
        wall = self.env.wall_time()
        candidate = Candidate(contact.node_id, contact.address, 0, 1)
        space = LookupSpace.RECORD if group is Space.RECORD else LookupSpace.MAILBOX
        try:
            reply = await self._ask(
                FindValue(self.transport.new_txid(), self._sender(), key.bytes, int(space)), candidate, Found
            )
        except P2PChatError:
            return False
        assert isinstance(reply, Found)
        if group is Space.RECORD:
            item = self.store.record(key, wall)
            if item is None:
                return True
            if reply.seq is not None and reply.seq >= item.seq:
                return True
            return await self._store_blob(contact.address, key, ItemSpace.RECORD, reply.token, item.blob)
        # A mailbox: push the entries it lacks, and the tombstones that delete entries it still holds.
        held = await self._list_entries(contact.address, key)
        if held is None:
            return False
        ok = True
        for item in self.store.items_for(Space.ENTRY, key):
            if item.expires_at <= wall:
                continue
            if item.space is Space.ENTRY and item.item_id in held:
                continue
            if item.space is Space.TOMBSTONE and held.isdisjoint(item.deletes):
                # Nothing there for it to delete.  Pushing every tombstone to every newcomer made hand-over traffic
                # grow for as long as a mailbox is used (a recipient's fetches add tombstones, which live a week):
                # in the offline-delivery simulation (300 nodes, 30% churn per hour) tombstone stores grew from none
                # to over a quarter of all stores in 11 hours.  An entry a stale holder later gives it shows up at
                # the recipient's next fetch, which deletes it again.
                continue
            item_space = ItemSpace.ENTRY if item.space is Space.ENTRY else ItemSpace.TOMBSTONE
            ok &= await self._store_blob(contact.address, key, item_space, reply.token, item.blob)
        return ok


def _hint(exc: Exception) -> str:
    """An exception's text cut to what an ErrorReply carries (bytes, not characters: UTF-8 may be longer)."""
    return str(exc).encode()[:MAX_ERROR_MESSAGE_BYTES].decode(errors="ignore")


def _group(space: Space) -> Space:
    return Space.ENTRY if space in (Space.ENTRY, Space.TOMBSTONE) else space
