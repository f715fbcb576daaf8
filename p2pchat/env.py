"""The one injected environment: where every service gets its clock, its randomness and its network.

No module of p2pchat reads the wall clock, draws random numbers or opens a socket on its own.  A node in
production gets :meth:`Env.real`; a node in a test or a simulation gets :meth:`Env.simulated`, whose clock is
trio's (a ``MockClock`` on virtual time), whose randomness comes from a seed, and whose network is a
:class:`~p2pchat.net.sim.SimHost`.  Give each simulated node its own ``Env`` so each can have its own seed and
clock skew.

Monotonic time is always ``trio.current_time()`` (and sleeping is ``trio.sleep``), which follows a MockClock by
itself.  Wall time -- what goes into signed records and expiry stamps shared with other nodes -- comes from
:meth:`Env.wall_time`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

import trio

from p2pchat.net.base import Network

__all__ = ["SIM_EPOCH", "Env"]

SIM_EPOCH = 1_767_225_600.0
"""Wall-clock time (2026-01-01T00:00:00Z) at virtual time zero in simulations, so timestamps look real."""


class Env:
    """Clock, randomness and network for one node.

    ``rng`` is for non-secret choices (jitter, which peer to ask); ``random_bytes`` is for keys and nonces.
    In a simulation both come from the seed, which is what makes a run repeatable -- and why simulated keys
    are never secret.
    """

    __slots__ = ("_wall", "network", "random_bytes", "rng")

    def __init__(
        self,
        network: Network,
        *,
        rng: random.Random,
        random_bytes: Callable[[int], bytes],
        wall: Callable[[], float],
    ) -> None:
        self.network = network
        self.rng = rng
        self.random_bytes = random_bytes
        self._wall = wall

    @classmethod
    def real(cls, network: Network | None = None) -> Env:
        """The production environment: system clock, OS randomness, real sockets."""
        if network is None:
            from p2pchat.net.real import RealNetwork  # noqa: PLC0415 - keeps simulations free of socket code

            network = RealNetwork()
        return cls(network, rng=random.SystemRandom(), random_bytes=os.urandom, wall=time.time)

    @classmethod
    def simulated(cls, network: Network, seed: int, *, clock_skew: float = 0.0) -> Env:
        """A repeatable environment on virtual time; ``clock_skew`` shifts this node's wall clock."""
        rng = random.Random(seed)
        epoch = SIM_EPOCH + clock_skew
        return cls(network, rng=rng, random_bytes=rng.randbytes, wall=lambda: epoch + trio.current_time())

    def wall_time(self) -> float:
        """Seconds since the Unix epoch by this node's clock (virtual in simulations)."""
        return self._wall()

    @staticmethod
    def now() -> float:
        """Monotonic seconds (trio's clock: virtual under a MockClock)."""
        return trio.current_time()
