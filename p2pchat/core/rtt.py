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
    "INITIAL_RTO",
    "MAX_RTO",
    "MIN_RTO",
    "RTT_PEERS_REMEMBERED",
    "SOFT_TIMEOUT_SHARE",
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

RTT_PEERS_REMEMBERED: Final = 1024
"""Peers whose own round-trip estimates are kept (least recently used forgotten)."""

_ALPHA: Final = 1 / 8
_BETA: Final = 1 / 4


class RttEstimator:
    """SRTT and RTTVAR for one path (RFC 6298, section 2)."""

    __slots__ = ("rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def observe(self, rtt: float) -> None:
        """Fold in one measured round trip."""
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
        if estimator is None or estimator.srtt is None:
            # An unknown peer is probably about as far as the others, but give it room: twice the overall.
            overall = self.overall
            if overall.srtt is None:
                return min(INITIAL_RTO, self.max_rto)
            return min(self.max_rto, max(self.min_rto, 2 * overall.rto(self.min_rto, self.max_rto)))
        return estimator.rto(self.min_rto, self.max_rto)

    def soft_timeout(self, peer: Hashable) -> float:
        """After how long a lookup stops waiting for ``peer``'s reply (while still taking it until
        :meth:`timeout`)."""
        return SOFT_TIMEOUT_SHARE * self.timeout(peer)

    def __len__(self) -> int:
        return len(self._peers)
