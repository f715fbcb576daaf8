"""The Kademlia routing table, without I/O: which contacts a node keeps, and which it offers for a target.

The table covers the 160-bit id space with buckets of at most :data:`K` contacts.  It starts as one bucket for
the whole space; a full bucket splits only while its range contains our own id (classic Kademlia), so the table
is a chain: bucket ``i`` (for ``i`` below the last) holds the contacts whose id shares exactly ``i`` leading bits
with ours, and the last bucket holds everyone sharing at least as many bits as its depth.  The paper's relaxation
(also splitting far buckets whose depth is not a multiple of 5) is *not* implemented: it multiplies the table
size by up to ~6 for a fraction of a hop, and 10,000 simulated nodes each hold a table.  With this shape the
bucket of an id is found with one XOR and a ``bit_length``, and there are at most ``NODE_ID_BITS + 1`` buckets.

The table never does I/O.  The DHT service tells it what happened, and it answers with what to do:

* :meth:`RoutingTable.observe` -- we just heard from a node whose identity the caller has already verified.  The
  answer (:class:`ObserveResult`) says whether it was added, updated, held back as an address conflict, put in
  the bucket's replacement cache (with a ``ping_candidate`` the caller should ping), or rejected.
* :meth:`RoutingTable.request_succeeded` / :meth:`RoutingTable.request_failed` -- the outcome of a request we
  sent.  :data:`MAX_FAILURES` consecutive failures make a contact *bad*: it is left out of :meth:`closest` and
  replaced by the freshest replacement-cache entry.  A bad contact with nobody to replace it stays, so that a
  few minutes without network do not empty the table (the Kademlia paper's advice).
* :meth:`RoutingTable.stale_buckets` -- random ids in buckets nobody touched for
  :data:`BUCKET_REFRESH_INTERVAL` (our neighbourhood) or :data:`FAR_BUCKET_REFRESH_INTERVAL` (farther); the
  caller looks them up and calls :meth:`RoutingTable.touch_bucket`.

Anti-Sybil: one bucket takes at most :data:`MAX_CONTACTS_PER_SUBNET_PER_BUCKET` contacts from one IPv4 /24 or
IPv6 /64 (as BEP 42 and OpenDHT limit a single network's weight), and a known contact's address is never
silently replaced by another -- only when its old address has started failing.

Time is the caller's ``now`` (any monotonic float) and randomness the caller's :class:`random.Random`.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

from p2pchat.core.ids import NODE_ID_BITS, NodeId

if TYPE_CHECKING:
    # Only for annotations: p2pchat.net imports trio, which the protocol core must not, and randomness always
    # comes from the caller's generator.
    import random

    from p2pchat.net.base import Address

__all__ = [
    "BUCKET_REFRESH_INTERVAL",
    "FAR_BUCKET_REFRESH_INTERVAL",
    "ID_RANGE_BITS",
    "MAX_BUCKETS",
    "MAX_CONTACTS_PER_ID_RANGE",
    "MAX_CONTACTS_PER_SUBNET_PER_BUCKET",
    "MAX_FAILURES",
    "PING_CANDIDATE_MIN_IDLE",
    "PING_CANDIDATE_TIMEOUT",
    "REPLACEMENT_CACHE_SIZE",
    "Bucket",
    "Contact",
    "K",
    "ObserveOutcome",
    "ObserveResult",
    "RoutingTable",
    "is_local_host",
    "subnet_of",
]

K: Final = 20
"""Bucket size, and how many closest nodes a lookup collects and a record is stored on."""

REPLACEMENT_CACHE_SIZE: Final = 10
"""Most contacts waiting per bucket to replace one that stops answering; the oldest is dropped first."""

MAX_CONTACTS_PER_SUBNET_PER_BUCKET: Final = 2
"""Most contacts from one IPv4 /24 or IPv6 /64 in one bucket (and, separately, in its replacement cache)."""

ID_RANGE_BITS: Final = 6
"""Bits after a bucket's prefix that split its range into 64 id ranges (see :data:`MAX_CONTACTS_PER_ID_RANGE`)."""

MAX_CONTACTS_PER_ID_RANGE: Final = 4
"""Most contacts in one bucket whose ids fall in one of its :data:`ID_RANGE_BITS` id ranges.

Honest ids are spread evenly over a bucket's range (twenty in 64 ranges put five in one about once in a thousand
buckets); ids ground next to one key all share their leading bits, so a cluster of them fills one range.  Without
the limit a cluster of k Sybils could fill a far bucket: in the hostile simulation, a node whose bucket covering a
targeted key held 19 Sybils of the other cluster and a liar started its lookup of that key among them only, and
never reached an honest node."""

MAX_FAILURES: Final = 3
"""Consecutive failed requests after which a contact is bad: no longer offered, and evicted when replaceable."""

BUCKET_REFRESH_INTERVAL: Final = 15 * 60.0
"""Seconds after which a bucket of our own neighbourhood (the buckets that hold our k closest contacts) nobody
touched is stale and should be refreshed by a lookup inside it (BEP 5's 15 minutes; measured: with the Kademlia
paper's hour, lookups 4 hours after a fifth of the nodes crashed still missed some of the closest live nodes --
the nodes near a key answer for it from their own neighbourhood, so that is where freshness matters)."""

FAR_BUCKET_REFRESH_INTERVAL: Final = 60 * 60.0
"""The same for the buckets beyond our own neighbourhood (the Kademlia paper's hour).  They only route: a lookup
through a stale far bucket loses a timeout on a dead contact and goes on with the next, and any traffic from the
range touches the bucket anyway.  Measured in the offline-delivery simulation (300 nodes, 30% churn per hour), the
15-minute refresh of every bucket was a third of all DHT requests, three quarters of it in far buckets."""

PING_CANDIDATE_MIN_IDLE: Final = 15 * 60.0
"""Seconds a healthy contact must have been silent before a newcomer gets it pinged (BEP 5's "questionable" age).

Without it every newcomer to a full bucket would cost a ping of a contact we heard from lately: measured on 2,500
simulated nodes with 60 s, liveness pings were 58% of all requests and grew faster than the network.
"""

PING_CANDIDATE_TIMEOUT: Final = 30.0
"""Seconds after which an unreported ping of a bucket's ping candidate is forgotten and another may be asked for.

Only one ping per bucket is outstanding at a time; this keeps a lost report from freezing the bucket forever.
"""

MAX_BUCKETS: Final = NODE_ID_BITS
"""Most buckets a table can have: one per shared-prefix length 0..158, plus the one holding our own id.

The deepest own bucket (depth 159) spans two ids, ours and one other, so it can never overfill and split.
"""


_UNIQUE_LOCAL: Final = ipaddress.IPv6Network("fc00::/7")


def subnet_of(host: str) -> str | bytes:
    """The network *host* belongs to for the per-subnet limit: its IPv4 /24 or its IPv6 /64.

    *host* is a canonical IP literal (as in :class:`~p2pchat.net.base.Address`).  IPv4-mapped IPv6 addresses
    count as their IPv4 address, so an attacker cannot spread one /24 over two spellings.
    """
    if ":" not in host:
        # A dotted quad: slicing the string is ~20 times cheaper than parsing it, and this runs per contact.
        return host[: host.rfind(".")]
    ip = ipaddress.IPv6Address(host)
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return subnet_of(str(mapped))
    return ip.packed[:8]


def is_local_host(host: str) -> bool:
    """Whether *host* is in BEP 42's local ranges -- exempt from the subnet limit by default.

    Those are 10/8, 172.16/12, 192.168/16, 169.254/16 and 127/8, and for IPv6 loopback, unique-local (fc00::/7)
    and link-local (fe80::/10).  A LAN (or a loopback test) legitimately has many nodes in one /24, and an
    attacker there can already do worse than fill buckets.
    """
    if ":" not in host:
        # Runs for every newcomer: comparing two octets beats building an ipaddress object by ~10 times.
        first, second, _ = host.split(".", 2)
        a, b = int(first), int(second)
        return a in (10, 127) or (a == 172 and 16 <= b <= 31) or (a, b) in ((192, 168), (169, 254))
    ip = ipaddress.IPv6Address(host)
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return is_local_host(str(mapped))
    return ip.is_loopback or ip.is_link_local or ip in _UNIQUE_LOCAL


class Contact:
    """A node in the routing table: its id, the address it answers on, and how it has been answering.

    The table owns and mutates contacts; callers read them.  ``cert`` is whatever proof of identity the DHT
    attached (its verified node certificate); the table stores it and never looks inside.  ``wire`` is the DHT's
    cached wire form of the contact (id and address, as replies carry it); the table clears it whenever the
    address changes.
    """

    __slots__ = ("_key", "address", "cert", "failures", "last_seen", "node_id", "wire")

    def __init__(
        self, node_id: NodeId, address: Address, last_seen: float, failures: int = 0, cert: object | None = None
    ) -> None:
        self.node_id = node_id
        self._key = node_id.int  # shares the id's int object; scans of a bucket skip a property call per contact
        self.address = address
        self.last_seen = last_seen
        self.failures = failures
        self.cert = cert
        self.wire: object | None = None

    @property
    def is_bad(self) -> bool:
        """Whether :data:`MAX_FAILURES` requests in a row have failed (and none succeeded since)."""
        return self.failures >= MAX_FAILURES

    def __repr__(self) -> str:
        return f"Contact({self.node_id!r}, {self.address}, last_seen={self.last_seen}, failures={self.failures})"


class Bucket:
    """One range of the id space and the contacts the table keeps in it.

    The range is the ids whose first :attr:`depth` bits equal those of :attr:`lo`, i.e. ``[lo, hi)``.
    :attr:`contacts` is ordered least recently seen first; :attr:`replacements` is the replacement cache in the
    same order.  Read-only for everyone but the table.
    """

    __slots__ = ("_contacts", "_ping_sent", "_pinging", "_replacements", "depth", "last_touched", "lo")

    def __init__(self, lo: int, depth: int, last_touched: float) -> None:
        self.lo = lo
        self.depth = depth
        self.last_touched = last_touched
        self._contacts: list[Contact] = []
        self._replacements: list[Contact] = []
        # The contact we asked the caller to ping, and when; None when no such ping is outstanding.
        self._pinging: Contact | None = None
        self._ping_sent = 0.0

    @property
    def hi(self) -> int:
        """One past the largest id in the bucket's range."""
        return self.lo + (1 << (NODE_ID_BITS - self.depth))

    @property
    def contacts(self) -> Sequence[Contact]:
        """The bucket's contacts, least recently seen first."""
        return self._contacts

    @property
    def replacements(self) -> Sequence[Contact]:
        """The replacement cache, least recently seen first."""
        return self._replacements

    def covers(self, node_id: NodeId) -> bool:
        """Whether *node_id* lies in this bucket's range."""
        return self.lo <= node_id.int < self.hi

    def random_id(self, rng: random.Random) -> NodeId:
        """A uniformly random id inside the bucket's range (the target of a refresh lookup)."""
        return NodeId.from_int(self.lo + rng.getrandbits(NODE_ID_BITS - self.depth))

    def __len__(self) -> int:
        return len(self._contacts)

    def __repr__(self) -> str:
        return (
            f"Bucket(depth={self.depth}, lo={self.lo:040x}, contacts={len(self._contacts)}, "
            f"replacements={len(self._replacements)})"
        )


class ObserveOutcome(enum.Enum):
    """What :meth:`RoutingTable.observe` did with a node we heard from."""

    ADDED = "added"
    """New contact, now in its bucket."""
    UPDATED = "updated"
    """Known contact at the same address: now the most recently seen in its bucket."""
    ADDRESS_CHANGED = "address_changed"
    """Known contact whose old address was failing: it now has the new address (and certificate)."""
    ADDRESS_CONFLICT = "address_conflict"
    """Known, healthy contact heard from at another address: the old address is kept and nothing changed."""
    CACHED = "cached"
    """Its bucket is full: it waits in the replacement cache; ping ``ping_candidate`` if there is one."""
    REJECTED_OWN_ID = "rejected_own_id"
    """It claims our own id."""
    REJECTED_SUBNET = "rejected_subnet"
    """Its bucket already holds :data:`MAX_CONTACTS_PER_SUBNET_PER_BUCKET` contacts from its subnet."""
    REJECTED_ID_RANGE = "rejected_id_range"
    """Its bucket already holds :data:`MAX_CONTACTS_PER_ID_RANGE` contacts in its id range."""


class ObserveResult(NamedTuple):
    """The answer of :meth:`RoutingTable.observe`.

    ``contact`` is the table's entry (or replacement-cache entry) for the node, ``None`` when rejected.
    ``ping_candidate`` is set only with :attr:`ObserveOutcome.CACHED`, when the caller should ping that contact
    now and report the outcome with :meth:`RoutingTable.request_succeeded` or
    :meth:`RoutingTable.request_failed` (a failure promotes the newcomer at once).
    """

    outcome: ObserveOutcome
    contact: Contact | None = None
    ping_candidate: Contact | None = None


_REJECTED_OWN_ID: Final = ObserveResult(ObserveOutcome.REJECTED_OWN_ID)
_REJECTED_SUBNET: Final = ObserveResult(ObserveOutcome.REJECTED_SUBNET)
_REJECTED_ID_RANGE: Final = ObserveResult(ObserveOutcome.REJECTED_ID_RANGE)


def _find(contacts: list[Contact], key: int) -> int:
    """Index of the contact with id integer *key* in *contacts*, or -1 (a scan of at most K entries)."""
    for i, contact in enumerate(contacts):
        if contact._key == key:
            return i
    return -1


class RoutingTable:
    """A Kademlia routing table for the node *own_id* (see the module docstring for the rules).

    ``subnet_limit`` (``None``: no limit) is the most contacts per subnet per bucket; addresses for which
    ``subnet_exempt`` returns true are not limited (default: loopback, private and link-local, as BEP 42).
    Simulations of Sybil attacks on private address space pass ``subnet_exempt=None``.  ``now`` is the creation
    time: buckets count as fresh from then.
    """

    __slots__ = ("_buckets", "_own", "_subnet_exempt", "k", "own_id", "replacement_cache_size", "subnet_limit")

    def __init__(
        self,
        own_id: NodeId,
        k: int = K,
        *,
        replacement_cache_size: int = REPLACEMENT_CACHE_SIZE,
        subnet_limit: int | None = MAX_CONTACTS_PER_SUBNET_PER_BUCKET,
        subnet_exempt: Callable[[str], bool] | None = is_local_host,
        now: float = 0.0,
    ) -> None:
        if k < 1:
            raise ValueError(f"bucket size must be at least 1, got {k}")
        if replacement_cache_size < 0:
            raise ValueError(f"replacement cache size must not be negative, got {replacement_cache_size}")
        if subnet_limit is not None and subnet_limit < 1:
            raise ValueError(f"subnet limit must be at least 1 (or None), got {subnet_limit}")
        self.own_id = own_id
        self.k = k
        self.replacement_cache_size = replacement_cache_size
        self.subnet_limit = subnet_limit
        self._subnet_exempt = subnet_exempt
        self._own = own_id.int
        self._buckets = [Bucket(0, 0, now)]

    # --- introspection ---------------------------------------------------------------------------------------

    @property
    def buckets(self) -> Sequence[Bucket]:
        """The buckets, farthest range from our own id first; the last one contains our own id."""
        return self._buckets

    def bucket_for(self, node_id: NodeId) -> Bucket:
        """The bucket whose range contains *node_id*."""
        return self._bucket_of(node_id.int)

    def get(self, node_id: NodeId) -> Contact | None:
        """The table's contact for *node_id* (replacement-cache entries are not contacts yet), or ``None``."""
        contacts = self._bucket_of(node_id.int)._contacts
        i = _find(contacts, node_id.int)
        return contacts[i] if i >= 0 else None

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, NodeId) and self.get(node_id) is not None

    def __len__(self) -> int:
        return sum(len(b._contacts) for b in self._buckets)

    def __iter__(self) -> Iterator[Contact]:
        for bucket in self._buckets:
            yield from bucket._contacts

    # --- what happened -----------------------------------------------------------------------------------------

    def observe(
        self, node_id: NodeId, address: Address, now: float, cert: object | None = None, *, answered: bool = False
    ) -> ObserveResult:
        """Record that a node whose identity the caller verified just sent us something from *address*.

        *cert*, when given, replaces the stored certificate (``None`` keeps the old one, except when the address
        changes, since a certificate binds an address).  See :class:`ObserveOutcome` for the answers.
        ``answered=True`` says it was the reply to a request sent to *address*: the same as calling
        :meth:`request_succeeded` afterwards, in one pass over the bucket.
        """
        key = node_id.int
        if key == self._own:
            return _REJECTED_OWN_ID
        bucket = self._bucket_of(key)
        contacts = bucket._contacts
        i = _find(contacts, key)
        if i >= 0:
            result = self._update(bucket, i, address, now, cert)
            contact = result.contact
            if answered and contact is not None and contact.address == address:
                contact.failures = 0
                if bucket._pinging is contact:
                    bucket._pinging = None
            return result

        # A newcomer -- or a replacement-cache entry heard from again, which is handled as a newcomer that keeps
        # its certificate.
        replacements = bucket._replacements
        j = _find(replacements, key)
        if j >= 0:
            cached = replacements.pop(j)
            if cert is None and cached.address == address:
                cert = cached.cert
        limited = self._limited_subnet(address)
        while True:
            if limited is not None and self._subnet_count(contacts, limited) >= self._subnet_cap():
                return _REJECTED_SUBNET
            if len(contacts) < self.k:
                if self._range_full(bucket, contacts, key):
                    return _REJECTED_ID_RANGE
                contact = Contact(node_id, address, now, cert=cert)
                contacts.append(contact)
                bucket.last_touched = now
                return ObserveResult(ObserveOutcome.ADDED, contact)
            if bucket is self._buckets[-1] and len(self._buckets) < MAX_BUCKETS:
                self._split_own_bucket()
                bucket = self._bucket_of(key)
                contacts = bucket._contacts
                continue
            break

        for i, old in enumerate(contacts):
            if old.failures >= MAX_FAILURES and not self._range_full(
                bucket, [c for c in contacts if c is not old], key
            ):
                # Replacing a contact known to be dead needs no ping.
                del contacts[i]
                if bucket._pinging is old:
                    bucket._pinging = None
                contact = Contact(node_id, address, now, cert=cert)
                contacts.append(contact)
                bucket.last_touched = now
                return ObserveResult(ObserveOutcome.ADDED, contact)

        contact = Contact(node_id, address, now, cert=cert)
        self._cache(bucket, contact, limited)
        return ObserveResult(ObserveOutcome.CACHED, contact, self._ping_candidate(bucket, now))

    def would_keep(self, node_id: NodeId, now: float) -> bool:
        """Whether :meth:`observe` would do more with *node_id* now than park it in the replacement cache.

        True when it is in the table, or its bucket has room, can split, holds a bad contact, or is due a ping of
        its least recently seen contact.  The DHT asks first so that it checks a stranger's certificate only when
        the table could take the stranger: in a large network most requests come from nodes whose bucket here is
        full.  ``False`` is exact: :meth:`observe` would cache the node (or reject it) and ask for no ping.  ``True``
        may be too hopeful (a split that leaves no room, a full subnet); that only costs the check.
        """
        key = node_id.int
        if key == self._own:
            return False
        bucket = self._bucket_of(key)
        contacts = bucket._contacts
        if len(contacts) < self.k or _find(contacts, key) >= 0:
            return True
        if bucket is self._buckets[-1] and len(self._buckets) < MAX_BUCKETS:
            return True
        for contact in contacts:
            if contact.failures >= MAX_FAILURES:
                return True
        return self._ping_due(bucket, now)

    def request_succeeded(self, node_id: NodeId, now: float, address: Address | None = None) -> bool:
        """Record that *node_id* answered a request: its failures reset and it becomes the most recently seen.

        Returns whether the report was taken: the node is in the table (or its replacement cache) and, when
        *address* is given, listed at that address.  On a reply, the DHT calls :meth:`observe` first (which adds
        a newcomer) and then this, passing the address it asked.
        """
        key = node_id.int
        bucket = self._bucket_of(key)
        contacts = bucket._contacts
        i = _find(contacts, key)
        if i >= 0:
            if address is not None and contacts[i].address != address:
                return False  # an answer from elsewhere says nothing about the address we keep
            contact = contacts.pop(i)
            contact.failures = 0
            contact.last_seen = now
            contacts.append(contact)
            bucket.last_touched = now
            if bucket._pinging is contact:
                bucket._pinging = None
            return True
        replacements = bucket._replacements
        j = _find(replacements, key)
        if j >= 0 and (address is None or replacements[j].address == address):
            contact = replacements.pop(j)
            contact.failures = 0
            contact.last_seen = now
            replacements.append(contact)
            return True
        return False

    def request_failed(self, node_id: NodeId, now: float, address: Address | None = None) -> bool:
        """Record that a request to *node_id* failed (timeout or garbage); returns whether it was evicted.

        A contact is evicted when a replacement is waiting and it either reached :data:`MAX_FAILURES` or was the
        bucket's ping candidate; the most recently seen replacement takes its place.  A failing
        replacement-cache entry is simply dropped.  When *address* (the address asked) is given and the node is
        listed at another one, the report is ignored: otherwise anyone could get a healthy contact evicted by
        naming it, in a lookup reply, at an address that never answers.
        """
        del now  # failures count requests, not time; the argument keeps the reporting API uniform
        key = node_id.int
        bucket = self._bucket_of(key)
        contacts = bucket._contacts
        i = _find(contacts, key)
        if i < 0:
            replacements = bucket._replacements
            j = _find(replacements, key)
            if j >= 0 and (address is None or replacements[j].address == address):
                del replacements[j]
            return False
        contact = contacts[i]
        if address is not None and contact.address != address:
            return False
        contact.failures += 1
        was_candidate = bucket._pinging is contact
        if was_candidate:
            bucket._pinging = None
        if (contact.failures >= MAX_FAILURES or was_candidate) and self._promotable(bucket, contact) is not None:
            del contacts[i]
            self._promote(bucket)
            return True
        return False

    def remove(self, node_id: NodeId) -> bool:
        """Forget *node_id* (from its bucket or its replacement cache); returns whether it was there.

        A replacement, if one fits, takes a removed contact's place.
        """
        key = node_id.int
        bucket = self._bucket_of(key)
        contacts = bucket._contacts
        i = _find(contacts, key)
        if i >= 0:
            contact = contacts.pop(i)
            if bucket._pinging is contact:
                bucket._pinging = None
            self._promote(bucket)
            return True
        replacements = bucket._replacements
        j = _find(replacements, key)
        if j >= 0:
            del replacements[j]
            return True
        return False

    # --- what to ask -------------------------------------------------------------------------------------------

    def closest(
        self, target: NodeId, count: int = K, *, exclude_failing: bool = True, ordered: bool = True
    ) -> list[Contact]:
        """Up to *count* contacts closest to *target* by XOR distance, closest first.

        Bad contacts (see :attr:`Contact.is_bad`) are left out unless *exclude_failing* is false.  The table is
        walked outward from the target's bucket, so a call sorts a few buckets, not the whole table.  With
        ``ordered=False`` the same contacts come in no particular order, and only a group of buckets that holds
        more than are still wanted is sorted (a reply's contacts: the asker sorts them itself).
        """
        if count <= 0:
            return []
        t = target.int
        buckets = self._buckets
        last = len(buckets) - 1
        # Shared-prefix length of target and own id.  Every contact in bucket p agrees with the target on one more
        # bit than any contact elsewhere, so buckets can be taken whole in a fixed order: the target's own bucket,
        # then (if that is not the last) everything deeper as one group, then the shallower buckets, nearest first.
        p = NODE_ID_BITS - (t ^ self._own).bit_length()
        # Buckets in order of distance from the target, as groups: each group's contacts are all closer than the
        # next group's.  Groups are merged until they hold enough contacts, then sorted once.
        order = [last] if p >= last else [*range(p, last + 1)]
        order.extend(range(min(p, last) - 1, -1, -1))
        final = len(order) - 1
        group_end = last - p  # positions 1..group_end are the deeper buckets: one group, never split
        result: list[Contact] = []
        need = count
        taken: list[Bucket] = []
        held = 0
        for position, index in enumerate(order):
            bucket = buckets[index]
            taken.append(bucket)
            held += len(bucket._contacts)
            if position < final and (0 < position < group_end or (ordered and held < need)):
                continue
            if exclude_failing:
                members = [c for b in taken for c in b._contacts if c.failures < MAX_FAILURES]
            else:
                members = [c for b in taken for c in b._contacts]
            if not ordered and len(members) <= need:
                result.extend(members)  # a whole group fits: it is in the answer whatever the order inside it
            else:
                # (distance, contact) pairs sort in C, without a Python key call per contact; distances are distinct
                # (so are ids), so a contact is never compared.
                ranked = [(c._key ^ t, c) for c in members]
                ranked.sort()
                result.extend([c for _, c in ranked[:need]])
            need = count - len(result)
            if need <= 0:
                break
            taken = []
            held = 0
        return result

    def stale_buckets(self, now: float, rng: random.Random) -> list[NodeId]:
        """A random id inside each stale bucket: untouched for :data:`BUCKET_REFRESH_INTERVAL` seconds if it is
        one of the buckets holding our k closest contacts (counted from our own bucket outward), else for
        :data:`FAR_BUCKET_REFRESH_INTERVAL`.

        The caller looks each one up and calls :meth:`touch_bucket` when it starts, so the next call does not
        return the same bucket again.
        """
        stale: list[NodeId] = []
        held = 0
        for bucket in reversed(self._buckets):
            limit = BUCKET_REFRESH_INTERVAL if held < self.k else FAR_BUCKET_REFRESH_INTERVAL
            held += len(bucket._contacts)
            if now - bucket.last_touched >= limit:
                stale.append(bucket.random_id(rng))
        stale.reverse()  # farthest range first, as the buckets are listed
        return stale

    def touch_bucket(self, node_id: NodeId, now: float) -> None:
        """Mark the bucket containing *node_id* as refreshed at *now* (a lookup for an id in it ran)."""
        self._bucket_of(node_id.int).last_touched = now

    # --- internals ---------------------------------------------------------------------------------------------

    def _bucket_of(self, key: int) -> Bucket:
        buckets = self._buckets
        index = NODE_ID_BITS - (key ^ self._own).bit_length()
        last = len(buckets) - 1
        return buckets[index if index < last else last]

    def _update(self, bucket: Bucket, i: int, address: Address, now: float, cert: object | None) -> ObserveResult:
        contacts = bucket._contacts
        contact = contacts[i]
        outcome = ObserveOutcome.UPDATED
        if contact.address != address:
            if contact.failures == 0:
                # A healthy contact does not move because someone says so: the old address keeps answering.
                return ObserveResult(ObserveOutcome.ADDRESS_CONFLICT, contact)
            limited = self._limited_subnet(address)
            if limited is not None:
                others = [c for c in contacts if c is not contact]
                if self._subnet_count(others, limited) >= self._subnet_cap():
                    return _REJECTED_SUBNET
            contact.address = address
            contact.wire = None
            contact.cert = cert
            contact.failures = 0  # those failures were the old address's
            outcome = ObserveOutcome.ADDRESS_CHANGED
        elif cert is not None:
            contact.cert = cert
        contact.last_seen = now
        del contacts[i]
        contacts.append(contact)
        bucket.last_touched = now
        return ObserveResult(outcome, contact)

    def _split_own_bucket(self) -> None:
        own_bucket = self._buckets[-1]
        d = own_bucket.depth
        shift = NODE_ID_BITS - 1 - d
        near_lo = (self._own >> shift) << shift
        far_lo = near_lo ^ (1 << shift)
        far = Bucket(far_lo, d + 1, own_bucket.last_touched)
        near = Bucket(near_lo, d + 1, own_bucket.last_touched)
        for source, far_list, near_list in (
            (own_bucket._contacts, far._contacts, near._contacts),
            (own_bucket._replacements, far._replacements, near._replacements),
        ):
            for contact in source:
                # Everyone here shares d bits with us; bit d decides the side.  Order (recency) is kept.
                if ((contact._key ^ self._own) >> shift) & 1:
                    far_list.append(contact)
                else:
                    near_list.append(contact)
        pinging = own_bucket._pinging
        if pinging is not None:
            owner = far if pinging in far._contacts else near
            owner._pinging = pinging
            owner._ping_sent = own_bucket._ping_sent
        self._buckets[-1:] = [far, near]

    def _cache(self, bucket: Bucket, contact: Contact, limited: str | bytes | None) -> None:
        replacements = bucket._replacements
        if self.replacement_cache_size == 0:
            return
        if limited is not None:
            same = [i for i, c in enumerate(replacements) if subnet_of(c.address.host) == limited]
            if len(same) >= self._subnet_cap():
                # One network may not fill the cache either; its oldest entry makes way for its newest.
                del replacements[same[0]]
        if len(replacements) >= self.replacement_cache_size:
            del replacements[0]
        replacements.append(contact)

    @staticmethod
    def _ping_due(bucket: Bucket, now: float) -> bool:
        """Whether a newcomer to the full *bucket* would get its least recently seen contact pinged."""
        if bucket._pinging is not None and now - bucket._ping_sent < PING_CANDIDATE_TIMEOUT:
            return False  # one outstanding ping per bucket is enough
        oldest = bucket._contacts[0]
        # Not when everyone in the bucket was heard from a moment ago.
        return oldest.failures > 0 or now - oldest.last_seen >= PING_CANDIDATE_MIN_IDLE

    def _ping_candidate(self, bucket: Bucket, now: float) -> Contact | None:
        if not self._ping_due(bucket, now):
            return None
        oldest = bucket._contacts[0]
        bucket._pinging = oldest
        bucket._ping_sent = now
        return oldest

    def _promotable(self, bucket: Bucket, leaving: Contact | None) -> int | None:
        """Index of the most recently seen replacement that may join the bucket once *leaving* has left."""
        staying = [c for c in bucket._contacts if c is not leaving]
        for j in range(len(bucket._replacements) - 1, -1, -1):
            candidate = bucket._replacements[j]
            limited = self._limited_subnet(candidate.address)
            if limited is not None and self._subnet_count(staying, limited) >= self._subnet_cap():
                continue
            if self._range_full(bucket, staying, candidate._key):
                continue
            return j
        return None

    def _promote(self, bucket: Bucket) -> None:
        if len(bucket._contacts) >= self.k:
            return
        j = self._promotable(bucket, None)
        if j is None:
            return
        contact = bucket._replacements.pop(j)
        contacts = bucket._contacts
        # Keep the least-recently-seen order: a cache entry may have been heard from before some contacts.
        i = len(contacts)
        while i > 0 and contacts[i - 1].last_seen > contact.last_seen:
            i -= 1
        contacts.insert(i, contact)

    def _range_full(self, bucket: Bucket, contacts: Sequence[Contact], key: int) -> bool:
        """Whether *contacts* (of *bucket*) hold :data:`MAX_CONTACTS_PER_ID_RANGE` in *key*'s id range.

        Not for the bucket holding our own id: it splits instead, so its contacts may sit close together (the
        nodes nearest to us do), and its range is not yet the one they will end up in.
        """
        shift = NODE_ID_BITS - bucket.depth - ID_RANGE_BITS
        if bucket is self._buckets[-1] or shift <= 0:
            return False
        in_range = key >> shift
        count = 0
        for contact in contacts:
            if contact._key >> shift == in_range:
                count += 1
                if count >= MAX_CONTACTS_PER_ID_RANGE:
                    return True
        return False

    def _limited_subnet(self, address: Address) -> str | bytes | None:
        """The subnet key of *address* if the subnet limit applies to it, else ``None``."""
        if self.subnet_limit is None:
            return None
        exempt = self._subnet_exempt
        if exempt is not None and exempt(address.host):
            return None
        return subnet_of(address.host)

    def _subnet_cap(self) -> int:
        limit = self.subnet_limit
        assert limit is not None  # only called once _limited_subnet found the limit applies
        return limit

    @staticmethod
    def _subnet_count(contacts: Sequence[Contact], subnet: str | bytes) -> int:
        return sum(1 for c in contacts if subnet_of(c.address.host) == subnet)
