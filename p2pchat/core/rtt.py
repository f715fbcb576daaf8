"""Adaptive request timeouts: RFC 6298's smoothed round-trip estimator, per peer and overall.

A DHT lookup is only as fast as its slowest wait: with a fixed one-second timeout a dead contact costs a full
second; with an estimate it costs a few round trips.  The estimator is pure: the shell reports measured round
trips and asks for the timeout to use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Final

__all__ = [
    "HEDGE_RTTVARS",
    "INITIAL_RTO",
    "MAX_RTO",
    "MIN_RTO",
    "RTT_PEERS_REMEMBERED",
    "SOFT_TIMEOUT_SHARE",
    "TRUSTED_SAMPLES",
    "RttEstimator",
    "TimeoutPolicy",
]

INITIAL_RTO: Final = 1.0
"""Timeout before anything was measured (seconds); also the default ceiling, as the DHT issue asks."""

MAX_RTO: Final = 1.0
"""Longest timeout ever used for one datagram request (seconds)."""

MIN_RTO: Final = 0.25
"""Shortest timeout (seconds).  A lookup gives up on a node at its timeout, so a timeout shorter than the
slowest honest round trip loses answers; this stays well above WAN jitter, and lookups stop waiting earlier
with the soft timeout (:data:`SOFT_TIMEOUT_SHARE`) instead."""

SOFT_TIMEOUT_SHARE: Final = 0.5
"""A lookup request still unanswered after this share of its timeout is *overdue*: the lookup asks the next
candidate in its place (libtorrent's and OpenDHT's "short timeout") but still takes a late reply until the
timeout itself.  Half the timeout is still above the round trip the estimator expects (srtt + 4 rttvar, at least
:data:`MIN_RTO`), so honest nodes are rarely overdue, while a silent one holds a lookup slot half as long."""

HEDGE_RTTVARS: Final = 2
"""On a lossy network a lookup stops waiting for a request to a peer without a trusted estimate of its own after the
overall SRTT plus this many RTTVARs (:meth:`TimeoutPolicy.hedge_timeout`), if that comes before the soft timeout --
never before ``SOFT_TIMEOUT_SHARE * min_rto``.  *Why:* where datagrams are often lost, a request still unanswered
past most round trips has more likely lost its datagram than met a slow peer, so the lookup asks the next candidate
at about the 95th percentile of round trips (the hedged request of Dean and Barroso's "The Tail at Scale") rather
than at SRTT + 4 RTTVAR.  Only the lookup's wait changes: the request is sent again, counted overdue and excluded
from the round-trip estimate (Karn's rule) only at its soft timeout, as before -- hedging those too would starve
the estimator of its slow samples, shrink the hedge, and feed on itself (tried: half of all requests were then
overdue).  On the WAN scenario (round trips 50-300 ms, 5% loss) a third of lookups ended waiting on such a request,
about 420 ms after it was sent.  Not on a clean network: there an unanswered request is usually a slow one, and a
lookup that stops waiting for it may miss one of the true k closest (as the DHT tests found when this rule applied
everywhere)."""

RTT_PEERS_REMEMBERED: Final = 1024
"""Peers whose own round-trip estimates are kept (least recently used forgotten)."""

TRUSTED_SAMPLES: Final = 4
"""Round trips measured to a peer before its own estimate alone sets its timeout.  Before that the timeout is
at least the overall one: after a single sample RFC 6298's rule gives three times that sample, and a first
round trip that happened to be short (a jittery path, a quiet moment) would then time out honest replies."""

_ALPHA: Final = 1 / 8
_BETA: Final = 1 / 4


class RttEstimator:
    """SRTT and RTTVAR for one path (RFC 6298, section 2)."""

    __slots__ = ("rttvar", "samples", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples = 0

    def observe(self, rtt: float) -> None:
        """Fold in one measured round trip."""
        self.samples += 1
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - rtt)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * rtt

    def rto(self, min_rto: float = MIN_RTO, max_rto: float = MAX_RTO) -> float:
        """The timeout to use now."""
        if self.srtt is None:
            return min(INITIAL_RTO, max_rto)
        return min(max_rto, max(min_rto, self.srtt + 4 * self.rttvar))


class TimeoutPolicy:
    """Timeouts per peer, falling back to the estimate over all peers for a peer never measured."""

    __slots__ = ("_peers", "max_rto", "min_rto", "overall")

    def __init__(self, *, min_rto: float = MIN_RTO, max_rto: float = MAX_RTO) -> None:
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.overall = RttEstimator()
        self._peers: OrderedDict[Hashable, RttEstimator] = OrderedDict()

    def observe(self, peer: Hashable, rtt: float) -> None:
        """Record a round trip to ``peer``."""
        self.overall.observe(rtt)
        estimator = self._peers.get(peer)
        if estimator is None:
            estimator = self._peers[peer] = RttEstimator()
            if len(self._peers) > RTT_PEERS_REMEMBERED:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
        estimator.observe(rtt)

    def timeout(self, peer: Hashable) -> float:
        """How long to wait for ``peer``'s reply."""
        estimator = self._peers.get(peer)
        overall = self.overall
        if overall.samples < TRUSTED_SAMPLES:
            # A node that has measured almost nothing yet (it is joining) waits as RFC 6298 starts: a second.
            floor = min(INITIAL_RTO, self.max_rto)
        else:
            floor = overall.rto(self.min_rto, self.max_rto)
        if estimator is None or estimator.srtt is None:
            # An unknown peer is probably about as far as the others, but give it room: twice the overall.
            return min(self.max_rto, max(self.min_rto, 2 * floor))
        own = estimator.rto(self.min_rto, self.max_rto)
        if estimator.samples < TRUSTED_SAMPLES:
            return max(own, floor)
        return own

    def soft_timeout(self, peer: Hashable) -> float:
        """After how long a request to ``peer`` is sent again and a lookup stops waiting for it (while still taking
        its reply until :meth:`timeout`).

        *Not* the round trip expected (SRTT + 2 RTTVAR), though that cut the WAN scenario's median lookup by a
        round trip: about one honest reply in twenty comes later than that, and a lookup that stops waiting for
        it may end without one of the true k closest -- on a clean network too.  (On a lossy one a lookup stops
        waiting sooner: :meth:`hedge_timeout`.)
        """
        return SOFT_TIMEOUT_SHARE * self.timeout(peer)

    def hedge_timeout(self, peer: Hashable) -> float | None:
        """On a lossy network, after how long a lookup stops waiting for a request to ``peer`` (see
        :data:`HEDGE_RTTVARS`); ``None`` where that would not come before :meth:`soft_timeout`: the overall estimate
        is not trusted yet, or the peer has a trusted estimate of its own."""
        overall = self.overall
        if overall.srtt is None or overall.samples < TRUSTED_SAMPLES:
            return None
        estimator = self._peers.get(peer)
        if estimator is not None and estimator.samples >= TRUSTED_SAMPLES:
            return None
        hedge = max(SOFT_TIMEOUT_SHARE * self.min_rto, overall.srtt + HEDGE_RTTVARS * overall.rttvar)
        return hedge if hedge < self.soft_timeout(peer) else None

    def __len__(self) -> int:
        return len(self._peers)
