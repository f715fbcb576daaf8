"""The iterative Kademlia lookup as a state machine, without I/O: whom to ask next, and when we are done.

The DHT shell drives a :class:`Lookup` like this::

    lookup = Lookup(target, table.closest(target), own_id=table.own_id)
    while not lookup.done:
        for candidate in lookup.next_requests():     # at most alpha in flight, closest unasked first
            send find_node(target) to candidate.address
        ... wait for a reply or a timeout, then one of:
        lookup.on_reply(node_id, contacts)          # contacts: (NodeId, Address) pairs from the reply
        lookup.on_wire_reply(node_id, infos)        # or: the reply's contacts as decoded (see WireContact)
        lookup.on_value(node_id, contacts)          # the node also holds a value for the target
        lookup.on_failure(node_id)                  # timeout, garbage, wrong identity
        lookup.on_slow(node_id)                     # overdue (soft timeout): ask someone else meanwhile
    closest = lookup.result()                        # the k closest nodes that answered, closest first

A lookup is done when the k closest candidates that have not failed (and are not overdue) have all answered, or
nothing is left to ask.  A request past its soft timeout (:meth:`Lookup.on_slow`) stops counting against alpha and
the lookup moves on to the next candidate, as libtorrent and OpenDHT do: a silent node then costs a soft timeout,
not a whole request timeout, while its late reply is still taken.

Everything a remote peer can influence is bounded: a reply adds at most :data:`MAX_CONTACTS_PER_REPLY` contacts,
the candidate set keeps only the :data:`MAX_CANDIDATES_PER_K` ``* k`` closest, replies are taken only from nodes
asked and still in flight (or overdue), and each candidate is retried at a different address at most once (so a
liar who hands out a real node id with a false address cannot hide that node from us).

:class:`DisjointLookup` runs :data:`DISJOINT_PATHS` lookups side by side that never ask the same node (S/Kademlia),
so a few hostile nodes on one path cannot steer the whole result; :meth:`DisjointLookup.union` is what every path
found (a Sybil cluster closer to the key than any honest node fills the k closest overall, but each path's own k
reach past the Sybils that path claimed).
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Callable, Iterable, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Final, Protocol

from p2pchat.core.ids import NodeId
from p2pchat.core.routing import K

if TYPE_CHECKING:
    # Only for annotations: p2pchat.net imports trio, which the protocol core must not.
    from p2pchat.net.base import Address

__all__ = [
    "ALPHA",
    "DISJOINT_PATHS",
    "FINAL_ROUND_SPARES",
    "MAX_ADDRESSES_PER_CANDIDATE",
    "MAX_CANDIDATES_PER_K",
    "MAX_CONTACTS_PER_REPLY",
    "MAX_UNANSWERED_REFERRALS",
    "Candidate",
    "CandidateState",
    "ContactLike",
    "DisjointLookup",
    "Lookup",
    "WireContact",
]

ALPHA: Final = 3
"""Requests a lookup keeps in flight at once."""

DISJOINT_PATHS: Final = 3
"""Paths of a :class:`DisjointLookup` (S/Kademlia's d)."""

FINAL_ROUND_SPARES: Final = 3
"""Candidates past the k closest that a final round on a lossy network also asks (``spares``).  *Why:* the
lookup is done when the k closest that are not overdue have answered, so each one that is dead or lost its
datagram is otherwise replaced only once it is overdue -- a soft timeout and then one more round trip; spares
already asked take its place at once.  On the WAN scenario (5% loss, 10% dead contacts) a final round has two or
three such nodes; on a clean network spares would only add requests, so the DHT asks for them only when its
requests are often overdue (``LOSSY_OVERDUE_SHARE`` in :mod:`p2pchat.dht.rpc`)."""

MAX_CONTACTS_PER_REPLY: Final = K
"""Contacts taken from one reply; the rest are ignored (an honest node returns at most k)."""

MAX_CANDIDATES_PER_K: Final = 8
"""A lookup keeps at most this many times k candidates, dropping the farthest, so liars cannot grow it."""

MAX_ADDRESSES_PER_CANDIDATE: Final = 2
"""Addresses a candidate is tried at: a failed candidate is asked again if a reply names it at a new address."""

MAX_UNANSWERED_REFERRALS: Final = 3
"""Nodes one reply named that may fail (or be overdue) with none of them answering before the lookup drops the
rest of what that reply named.  *Why:* a liar who names fabricated nodes next to the target, at addresses where
nobody answers, otherwise costs a timeout per fabrication -- closer than any real node, every one is asked first.
An honest node's referrals include dead nodes now and then, but not three with no live one among them before."""


class ContactLike(Protocol):
    """Anything with a node id and an address: a routing-table contact, a lookup candidate."""

    @property
    def node_id(self) -> NodeId:
        """The node's id."""

    @property
    def address(self) -> Address:
        """Where the node answers."""


class WireContact(Protocol):
    """A contact as a reply carries it (:class:`~p2pchat.core.packets.NodeInfo`): raw id bytes, host and port."""

    @property
    def node_id(self) -> bytes:
        """The node's id, :data:`~p2pchat.core.ids.NODE_ID_BYTES` bytes."""

    @property
    def host(self) -> str:
        """The node's IP literal."""

    @property
    def port(self) -> int:
        """The node's port."""


class CandidateState(enum.Enum):
    """Where a candidate stands in a lookup."""

    UNASKED = "unasked"
    """Known, not asked yet."""
    IN_FLIGHT = "in_flight"
    """Asked; no reply or failure reported yet."""
    ANSWERED = "answered"
    """Replied."""
    FAILED = "failed"
    """Timed out or answered garbage -- or never asked, dropped with the rest of what a failing referrer named
    (``addresses_tried`` is then 0; see :data:`MAX_UNANSWERED_REFERRALS`)."""
    TAKEN = "taken"
    """Asked by another path of the same :class:`DisjointLookup`, so this path will not use it."""
    SLOW = "slow"
    """Asked, and overdue (past its soft timeout): a reply is still taken, but it no longer counts in flight, so
    the lookup asks someone else meanwhile and does not wait for it to finish."""


# Module-level names: enum member lookups through the class cost a dictionary walk in the hot loops.
_UNASKED: Final = CandidateState.UNASKED
_IN_FLIGHT: Final = CandidateState.IN_FLIGHT
_ANSWERED: Final = CandidateState.ANSWERED
_FAILED: Final = CandidateState.FAILED
_TAKEN: Final = CandidateState.TAKEN
_SLOW: Final = CandidateState.SLOW


class Candidate:
    """A node a lookup knows of.

    ``depth`` is the length of the referral chain that led to it (seeds are 1; a node named in a reply from a
    depth-d node is d+1; the shortest chain seen counts).  ``has_value`` says it answered with a value.
    Read-only outside the lookup.
    """

    __slots__ = (
        "address",
        "addresses_tried",
        "depth",
        "distance",
        "has_value",
        "node_id",
        "referrals_answered",
        "referrals_failed",
        "referrer",
        "state",
    )

    def __init__(
        self, node_id: NodeId, address: Address, distance: int, depth: int, referrer: Candidate | None = None
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.distance = distance
        self.depth = depth
        self.state = _UNASKED
        self.has_value = False
        self.addresses_tried = 1
        self.referrer = referrer
        """The candidate whose reply first named this one (``None`` for a seed)."""
        self.referrals_answered = 0
        """Candidates this one's reply first named that answered."""
        self.referrals_failed = 0
        """Candidates this one's reply first named that failed or were overdue."""

    def __repr__(self) -> str:
        return f"Candidate({self.node_id!r}, {self.address}, depth={self.depth}, {self.state.value})"


_by_distance: Final = attrgetter("distance")


class Lookup:
    """One iterative lookup for *target*, started from *seeds* (usually the routing table's closest).

    ``own_id`` is never asked or returned.  With ``stop_at_first_value`` the lookup is done as soon as one node
    answers with a value (find_value); without it, values are noted and the lookup goes on until the k closest
    have answered, which merged gets (mailboxes, records) need.  :meth:`finish` stops it at any time.

    Once the closest live candidate has answered (the lookup has converged), the rest of the k closest are asked
    all at once rather than alpha at a time -- the Kademlia paper's final round; ``final_round=False`` keeps
    strict alpha (for comparison).  ``spares`` more candidates past the k closest are asked in that round (see
    :data:`FINAL_ROUND_SPARES`).  With ``early_final_round`` that round starts at the first answer instead, and
    runs alongside the rest of the convergence (see :data:`EARLY_FINAL_ROUND_RTT` in :mod:`p2pchat.dht.node` for
    when the DHT asks for it).

    ``rpcs`` counts the requests handed out so far; ``value_found`` says whether some node answered with a value.
    ``make_address`` builds an address from a host and a port, for :meth:`on_wire_reply`.
    """

    __slots__ = (
        "_by_id",
        "_early",
        "_finished",
        "_in_flight",
        "_make_address",
        "_own",
        "_own_bytes",
        "_sorted",
        "_target",
        "alpha",
        "final_round",
        "k",
        "max_candidates",
        "rpcs",
        "spares",
        "stop_at_first_value",
        "target",
        "value_found",
        "widened",
    )

    def __init__(
        self,
        target: NodeId,
        seeds: Iterable[ContactLike],
        *,
        k: int = K,
        alpha: int = ALPHA,
        own_id: NodeId | None = None,
        stop_at_first_value: bool = False,
        final_round: bool = True,
        spares: int = 0,
        early_final_round: bool = False,
        make_address: Callable[[str, int], Address] | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not 1 <= alpha <= MAX_CANDIDATES_PER_K * k:
            raise ValueError(f"alpha must be between 1 and {MAX_CANDIDATES_PER_K} * k, got {alpha}")
        self.target = target
        self.k = k
        self.alpha = alpha
        self.max_candidates = MAX_CANDIDATES_PER_K * k
        self.stop_at_first_value = stop_at_first_value
        self.rpcs = 0
        self.value_found = False
        self.final_round = final_round
        self.spares = spares
        self.widened = False
        """Whether the lookup has converged (or, with ``early_final_round``, has had an answer) and now asks the k
        closest at once (see :meth:`_converged`)."""
        self._early = early_final_round and final_round
        self._target = target.int
        self._own = own_id.int if own_id is not None else -1
        self._own_bytes = own_id.bytes if own_id is not None else b""
        self._make_address = make_address
        # Keyed by the id's bytes, which replies carry: a contact named again is found without building a NodeId.
        self._by_id: dict[bytes, Candidate] = {}
        self._sorted: list[Candidate] = []  # by distance to the target, closest first
        self._in_flight = 0
        self._finished = False
        for seed in seeds:
            self._learn(seed.node_id, seed.address, 1)

    # --- introspection ---------------------------------------------------------------------------------------

    @property
    def candidates(self) -> Sequence[Candidate]:
        """Every candidate kept, closest to the target first."""
        return self._sorted

    @property
    def in_flight(self) -> int:
        """Requests handed out and not yet answered or failed."""
        return self._in_flight

    @property
    def done(self) -> bool:
        """Whether the k closest candidates that have not failed and are not overdue have all answered (or nobody is
        left to ask, and no overdue request may still bring an answer).

        Overdue candidates are skipped while k answered ones can be found past them, so a silent node does not
        hold up the end of a lookup; when fewer than k have answered, the overdue ones are waited for (a slow
        network, or a stalled process, must not shrink the result)."""
        if self._finished:
            return True
        live = 0
        overdue = False
        for c in self._sorted:
            state = c.state
            if state is _ANSWERED:
                live += 1
                if live >= self.k:
                    return True
            elif state is _UNASKED:
                if self._claim_fails(c):
                    continue
                return False
            elif state is _IN_FLIGHT:
                return False
            elif state is _SLOW:
                if live == 0:
                    # The closest candidate still in the running is overdue: waited for until its timeout, since
                    # it is the one node a lookup most needs (its datagram may have been lost and sent again).
                    return False
                overdue = True
        return not overdue

    @property
    def hops(self) -> int:
        """Length of the referral chain from us to the closest node that answered (0 if none did)."""
        for c in self._sorted:
            if c.state is _ANSWERED:
                return c.depth
        return 0

    def result(self) -> list[Candidate]:
        """The k closest candidates that answered, closest first."""
        out: list[Candidate] = []
        for c in self._sorted:
            if c.state is _ANSWERED:
                out.append(c)
                if len(out) >= self.k:
                    break
        return out

    def union(self) -> list[Candidate]:
        """What the lookup found, for callers that also drive a :class:`DisjointLookup`: here, :meth:`result`."""
        return self.result()

    def value_holders(self) -> list[Candidate]:
        """The candidates that answered with a value, closest first."""
        return [c for c in self._sorted if c.has_value]

    # --- driving -----------------------------------------------------------------------------------------------

    def next_requests(self) -> list[Candidate]:
        """Candidates to ask now: the closest unasked among the k closest live ones, up to alpha in flight.

        They count as in flight from here on; report each with :meth:`on_reply`, :meth:`on_value` or
        :meth:`on_failure`.
        """
        if self.final_round and not self.widened and self._converged():
            self.widened = True
        widened = self.widened
        room = (self.k + self.spares if widened else self.alpha) - self._in_flight
        if room <= 0 or self._finished:
            return []
        out: list[Candidate] = []
        live = 0
        limit = self.k + self.spares if widened else self.k
        for c in self._sorted:
            state = c.state
            if state is _FAILED or state is _TAKEN or state is _SLOW:
                continue
            if state is _UNASKED:
                if self._claim_fails(c):
                    continue
                c.state = _IN_FLIGHT
                out.append(c)
                room -= 1
                if room == 0:
                    break
            live += 1
            if live >= limit:
                break
        self._in_flight += len(out)
        self.rpcs += len(out)
        return out

    def _converged(self) -> bool:
        """Whether the closest live candidate has answered: its reply named nobody closer, so the lookup has
        reached the target's neighbourhood.  From then on every one of the k closest still unasked is asked at
        once (the Kademlia paper's final round) -- they must all answer before the lookup is done anyway, and
        asking them alpha at a time would only add round trips."""
        for c in self._sorted:
            state = c.state
            if state is _FAILED or state is _TAKEN or state is _SLOW:
                continue
            return state is _ANSWERED
        return False

    def on_reply(
        self, node_id: NodeId, contacts: Iterable[tuple[NodeId, Address]] = (), *, has_value: bool = False
    ) -> bool:
        """Take *node_id*'s reply: the contacts it named (at most :data:`MAX_CONTACTS_PER_REPLY` are read).

        Returns ``False`` (and changes nothing) unless the node was asked and is still in flight.
        """
        c = self._answered(node_id, has_value)
        if c is None:
            return False
        depth = c.depth + 1
        for contact_id, address in itertools.islice(contacts, MAX_CONTACTS_PER_REPLY):
            self._learn(contact_id, address, depth, c)
        return True

    def on_wire_reply(self, node_id: NodeId, contacts: Sequence[WireContact], *, has_value: bool = False) -> bool:
        """:meth:`on_reply` for contacts as a reply carries them; needs ``make_address``.  Cheaper: a contact the
        lookup knows already costs one dictionary look-up."""
        make_address = self._make_address
        if make_address is None:
            raise TypeError("on_wire_reply needs a Lookup built with make_address")
        c = self._answered(node_id, has_value)
        if c is None:
            return False
        depth = c.depth + 1
        by_id = self._by_id
        for info in contacts[:MAX_CONTACTS_PER_REPLY]:
            raw = info.node_id
            known = by_id.get(raw)
            if known is None:
                if raw != self._own_bytes:
                    self._learn_new(NodeId(raw), raw, make_address(info.host, info.port), depth, c)
            else:
                known.depth = min(known.depth, depth)
                if known.state is _FAILED and known.addresses_tried < MAX_ADDRESSES_PER_CANDIDATE:
                    self._retry_at(known, make_address(info.host, info.port), c)
        return True

    def _answered(self, node_id: NodeId, has_value: bool) -> Candidate | None:
        c = self._by_id.get(node_id.bytes)
        if c is None:
            return None
        state = c.state
        if state is _IN_FLIGHT:
            self._in_flight -= 1
        elif state is not _SLOW:
            return None
        c.state = _ANSWERED
        if self._early:
            # The final round starts now rather than at convergence: it overlaps the hops still to come.
            self.widened = True
        if c.referrer is not None:
            c.referrer.referrals_answered += 1
        if has_value:
            c.has_value = True
            self.value_found = True
            if self.stop_at_first_value:
                self._finished = True
        return c

    def on_value(self, node_id: NodeId, contacts: Iterable[tuple[NodeId, Address]] = ()) -> bool:
        """Take a reply from *node_id* that carried a value for the target (and maybe contacts)."""
        return self.on_reply(node_id, contacts, has_value=True)

    def on_failure(self, node_id: NodeId) -> bool:
        """Record that *node_id* timed out or answered garbage; returns ``False`` if it was not in flight."""
        c = self._by_id.get(node_id.bytes)
        if c is None:
            return False
        state = c.state
        if state is _IN_FLIGHT:
            self._in_flight -= 1
            self._blame(c)  # (an overdue one was blamed when it became overdue)
        elif state is not _SLOW:
            return False
        c.state = _FAILED
        return True

    def on_slow(self, node_id: NodeId) -> bool:
        """Record that *node_id*'s reply is overdue (its soft timeout passed): it stops counting against alpha and
        the lookup's window moves past it, but its reply is still taken until :meth:`on_failure`.  Returns
        ``False`` if it was not in flight."""
        c = self._by_id.get(node_id.bytes)
        if c is None or c.state is not _IN_FLIGHT:
            return False
        c.state = _SLOW
        self._in_flight -= 1
        self._blame(c)
        return True

    def _blame(self, c: Candidate) -> None:
        """*c* failed or is overdue: count it against the node that named it, and once that node has named
        :data:`MAX_UNANSWERED_REFERRALS` such nodes and no live one, drop the rest it named that are still
        unasked (they fail as if asked; a reply naming one at another address gives it its second chance)."""
        referrer = c.referrer
        if referrer is None:
            return
        referrer.referrals_failed += 1
        if referrer.referrals_failed != MAX_UNANSWERED_REFERRALS or referrer.referrals_answered:
            return
        for other in self._sorted:
            if other.referrer is referrer and other.state is _UNASKED:
                other.state = _FAILED
                other.addresses_tried = 0  # never asked: a reply from another node that names it revives it

    def finish(self) -> None:
        """Stop: :attr:`done` becomes true and nothing more is asked (replies in flight are still accepted)."""
        self._finished = True

    # --- internals ---------------------------------------------------------------------------------------------

    def _claim_fails(self, candidate: Candidate) -> bool:
        """Whether another path has the candidate (then it is marked taken); a plain lookup owns everyone."""
        del candidate
        return False

    def _rejects(self, node_id: NodeId) -> bool:
        """Whether to ignore *node_id* when learned (a disjoint path ignores nodes other paths asked)."""
        del node_id
        return False

    def _learn(self, node_id: NodeId, address: Address, depth: int, referrer: Candidate | None = None) -> None:
        if node_id.int == self._own:
            return
        raw = node_id.bytes
        c = self._by_id.get(raw)
        if c is not None:
            c.depth = min(c.depth, depth)
            if c.state is _FAILED and c.addresses_tried < MAX_ADDRESSES_PER_CANDIDATE:
                self._retry_at(c, address, referrer)
            return
        self._learn_new(node_id, raw, address, depth, referrer)

    @staticmethod
    def _retry_at(c: Candidate, address: Address, referrer: Candidate | None) -> None:
        if c.addresses_tried == 0:
            # Dropped unasked with the rest of a failing referrer's referrals (see _blame); another node names it.
            c.address = address
            c.addresses_tried = 1
            c.referrer = referrer
            c.state = _UNASKED
        elif address != c.address:
            # Someone may have handed us a false address for a real node; give the other one a chance.
            c.address = address
            c.addresses_tried += 1
            c.state = _UNASKED

    def _learn_new(
        self, node_id: NodeId, raw: bytes, address: Address, depth: int, referrer: Candidate | None = None
    ) -> None:
        distance = node_id.int ^ self._target
        ranked = self._sorted
        if len(ranked) >= self.max_candidates and distance >= ranked[-1].distance:
            return
        if self._rejects(node_id):
            return
        c = Candidate(node_id, address, distance, depth, referrer)
        self._by_id[raw] = c
        bisect.insort(ranked, c, key=_by_distance)
        if len(ranked) > self.max_candidates:
            # Drop the farthest candidate not in flight (one always exists: alpha <= max_candidates), so a reply
            # for a request we sent is never lost.
            for i in range(len(ranked) - 1, -1, -1):
                if ranked[i].state is not _IN_FLIGHT:
                    del self._by_id[ranked.pop(i).node_id.bytes]
                    break


class _DisjointPath(Lookup):
    """One path of a :class:`DisjointLookup`: a lookup that asks only nodes no other path has asked."""

    __slots__ = ("_claims", "_index")

    def __init__(
        self,
        target: NodeId,
        seeds: Iterable[ContactLike],
        claims: dict[NodeId, int],
        index: int,
        *,
        k: int,
        alpha: int,
        own_id: NodeId | None,
        stop_at_first_value: bool,
        final_round: bool,
        make_address: Callable[[str, int], Address] | None,
    ) -> None:
        # Set before the base class learns the seeds, which asks _rejects.
        self._claims = claims
        self._index = index
        super().__init__(
            target,
            seeds,
            k=k,
            alpha=alpha,
            own_id=own_id,
            stop_at_first_value=stop_at_first_value,
            final_round=final_round,
            make_address=make_address,
        )

    def _claim_fails(self, candidate: Candidate) -> bool:
        owner = self._claims.setdefault(candidate.node_id, self._index)
        if owner != self._index:
            candidate.state = _TAKEN
            return True
        return False

    def _rejects(self, node_id: NodeId) -> bool:
        owner = self._claims.get(node_id)
        return owner is not None and owner != self._index


class DisjointLookup:
    """S/Kademlia's lookup over *paths* disjoint paths; same driving interface as :class:`Lookup`.

    The seeds, ranked by distance, are dealt to the paths in turn.  A node is asked by at most one path: the
    first path that asks it claims it, and the others skip it.  Each path keeps its own alpha requests in
    flight and runs until its own k closest have answered; :meth:`result` is the k closest answered over all paths,
    :meth:`union` every path's k closest.  ``paths`` holds the per-path lookups, for introspection.
    """

    __slots__ = ("_claims", "k", "paths", "target")

    def __init__(
        self,
        target: NodeId,
        seeds: Iterable[ContactLike],
        *,
        paths: int = DISJOINT_PATHS,
        k: int = K,
        alpha: int = ALPHA,
        own_id: NodeId | None = None,
        stop_at_first_value: bool = False,
        final_round: bool = True,
        make_address: Callable[[str, int], Address] | None = None,
    ) -> None:
        if paths < 1:
            raise ValueError(f"a disjoint lookup needs at least one path, got {paths}")
        self.target = target
        self.k = k
        own = own_id.int if own_id is not None else -1
        unique: dict[NodeId, ContactLike] = {}
        for seed in seeds:
            if seed.node_id.int != own:
                unique.setdefault(seed.node_id, seed)
        ranked = sorted(unique.values(), key=lambda s: s.node_id.int ^ target.int)
        self._claims: dict[NodeId, int] = {}
        self.paths: list[Lookup] = [
            _DisjointPath(
                target,
                ranked[i::paths],
                self._claims,
                i,
                k=k,
                alpha=alpha,
                own_id=own_id,
                stop_at_first_value=stop_at_first_value,
                final_round=final_round,
                make_address=make_address,
            )
            for i in range(paths)
        ]

    @property
    def done(self) -> bool:
        """Whether every path is done."""
        return all(p.done for p in self.paths)

    @property
    def rpcs(self) -> int:
        """Requests handed out over all paths."""
        return sum(p.rpcs for p in self.paths)

    @property
    def in_flight(self) -> int:
        """Requests in flight over all paths."""
        return sum(p.in_flight for p in self.paths)

    @property
    def value_found(self) -> bool:
        """Whether some node on some path answered with a value."""
        return any(p.value_found for p in self.paths)

    @property
    def hops(self) -> int:
        """Referral-chain length to the closest node that answered on any path (0 if none did)."""
        result = self.result()
        return result[0].depth if result else 0

    def result(self) -> list[Candidate]:
        """The k closest nodes that answered on any path, closest first."""
        merged = [c for p in self.paths for c in p.result()]
        merged.sort(key=_by_distance)
        return merged[: self.k]

    def union(self) -> list[Candidate]:
        """Every path's k closest that answered, merged, closest first (at most ``paths * k``; no node twice, since
        no node is asked by two paths).

        This, not :meth:`result`, is what a lookup under attack should use: a cluster of ids ground next to the
        target fills the k closest overall, but each path keeps k of its own, and a path the cluster did not
        capture ends in the honest neighbourhood -- so the closest honest node is here if any path reached it.
        """
        merged = [c for p in self.paths for c in p.result()]
        merged.sort(key=_by_distance)
        return merged

    def value_holders(self) -> list[Candidate]:
        """The nodes that answered with a value on any path, closest first."""
        merged = [c for p in self.paths for c in p.value_holders()]
        merged.sort(key=_by_distance)
        return merged

    def next_requests(self) -> list[Candidate]:
        """What every path wants to ask now (each path claims its nodes as it hands them out)."""
        return [c for p in self.paths for c in p.next_requests()]

    def on_reply(
        self, node_id: NodeId, contacts: Iterable[tuple[NodeId, Address]] = (), *, has_value: bool = False
    ) -> bool:
        """Pass a reply to the path that asked *node_id*; ``False`` if no path did."""
        path = self._path_of(node_id)
        return path is not None and path.on_reply(node_id, contacts, has_value=has_value)

    def on_wire_reply(self, node_id: NodeId, contacts: Sequence[WireContact], *, has_value: bool = False) -> bool:
        """Pass a reply's contacts as decoded to the path that asked *node_id* (needs ``make_address``)."""
        path = self._path_of(node_id)
        return path is not None and path.on_wire_reply(node_id, contacts, has_value=has_value)

    def on_value(self, node_id: NodeId, contacts: Iterable[tuple[NodeId, Address]] = ()) -> bool:
        """Pass a reply carrying a value to the path that asked *node_id*."""
        return self.on_reply(node_id, contacts, has_value=True)

    def on_failure(self, node_id: NodeId) -> bool:
        """Pass a failure to the path that asked *node_id*; ``False`` if no path did."""
        path = self._path_of(node_id)
        return path is not None and path.on_failure(node_id)

    def on_slow(self, node_id: NodeId) -> bool:
        """Tell the path that asked *node_id* that its reply is overdue; ``False`` if no path has it in flight."""
        path = self._path_of(node_id)
        return path is not None and path.on_slow(node_id)

    def finish(self) -> None:
        """Stop every path."""
        for p in self.paths:
            p.finish()

    def _path_of(self, node_id: NodeId) -> Lookup | None:
        index = self._claims.get(node_id)
        return self.paths[index] if index is not None else None
