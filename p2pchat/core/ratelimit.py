"""Per-source rate limits: a token bucket per IP address, for a bounded number of addresses.

A remote peer can cost us work only at the rate its bucket refills; the table of buckets is bounded
(:data:`MAX_TRACKED_SOURCES`, least recently seen forgotten first), so many sources cannot grow it either.  A
forgotten source starts again with a full bucket -- an attacker with that many addresses gets no more than it
could by using them in turn.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_BURST", "DEFAULT_RATE", "MAX_TRACKED_SOURCES", "RateLimiter", "RateLimits"]

DEFAULT_RATE: Final = 250.0
"""Requests per second one IP address may make of a node, sustained.  A lookup asks a node once; a 64 KiB store
is 65 part requests; so one honest peer stays far below this."""

DEFAULT_BURST: Final = 500.0
"""Requests one IP address may make at once (the bucket's size)."""

MAX_TRACKED_SOURCES: Final = 4096
"""Buckets kept at once; the least recently used is forgotten beyond this."""


@dataclass(frozen=True, slots=True)
class RateLimits:
    """How fast each source may go.  ``rate=None`` switches the limit off (many nodes behind one address, e.g.
    a benchmark on loopback; whoever does that says so)."""

    rate: float | None = DEFAULT_RATE
    burst: float = DEFAULT_BURST


class RateLimiter:
    """Token buckets per source; time is the caller's monotonic clock."""

    __slots__ = ("_buckets", "dropped", "limits")

    def __init__(self, limits: RateLimits | None = None) -> None:
        self.limits = limits or RateLimits()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now: float, cost: float = 1.0) -> bool:
        """Take *cost* from *source*'s bucket; False (and counted) if it has not enough."""
        rate = self.limits.rate
        if rate is None:
            return True
        burst = self.limits.burst
        state = self._buckets.pop(source, None)
        if state is None:
            level = burst
            if len(self._buckets) >= MAX_TRACKED_SOURCES:
                self._buckets.popitem(last=False)
        else:
            level, then = state
            level = min(burst, level + (now - then) * rate)
        if level < cost:
            self._buckets[source] = (level, now)
            self.dropped += 1
            return False
        self._buckets[source] = (level - cost, now)
        return True
