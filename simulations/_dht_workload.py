"""The workload of :mod:`simulations.bench_dht`, shared by every system's worker, and how figures are kept.

Everything random here comes from the benchmark's seed, so every system is handed the same joins and the same
operations: node ``i`` (``i >= 1``) bootstraps from node ``bootstrap_peers()[i - 1]`` (a random earlier node), and
operation ``j`` puts ``value`` under ``key`` on node ``put_node`` and then gets ``key`` from node ``get_node``
(always another node).  The ``--sim`` lookups reuse the operations: node ``put_node`` looks up the first 20
bytes of ``key``.

The ``--sim`` joins come in batches (:meth:`Workload.join_batches`): node 0 alone, then batches that grow 1, 2, 4,
... up to ``join_batch`` nodes, never more nodes than have joined already (so no batch is a crowd around one lone
node).  Every node of a batch bootstraps from a random node of the earlier batches
(``bootstrap_peers(join_batch)``); with ``join_batch=1`` the batches are single nodes and the draws are exactly the
one-by-one ones above.

:class:`OpFigures` keeps the time and outcome of every operation; :class:`Progress` writes progress to stderr.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from simulations._simkit import join_batches

__all__ = [
    "KEY_BYTES",
    "SIM_JOIN_BATCH",
    "SIM_LOOKUP_CONCURRENCY",
    "VALUE_BYTES",
    "Figures",
    "OpFigures",
    "Operation",
    "Progress",
    "Workload",
    "info",
    "peak_rss_mb",
    "percentile",
]

KEY_BYTES = 32
"""Random bytes behind each key (for p2pchat: the seed of the record owner's Ed25519 key)."""

VALUE_BYTES = 100
"""Size of each value put: about a peer record (a few addresses and ports)."""

SIM_JOIN_BATCH = 100
"""``--sim`` default: nodes that join at once (each from a random node of an earlier batch)."""

SIM_LOOKUP_CONCURRENCY = 100
"""``--sim`` default: lookups in flight at once, each from a random node."""

Figures = dict[str, float | int]
"""One system's figures, as printed in the JSON output."""

_BOOTSTRAP_STREAM = 1
_OPERATION_STREAM = 2
_NODE_KEY_STREAM = 3


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation: put ``value`` under ``key`` on ``put_node``, then get ``key`` from ``get_node``."""

    put_node: int
    get_node: int
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Workload:
    """``nodes`` nodes and ``ops`` operations drawn from ``seed``."""

    nodes: int
    ops: int
    seed: int

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise ValueError("the workload needs at least two nodes (a get always asks another node)")
        if self.ops < 0:
            raise ValueError("the number of operations cannot be negative")

    def _rng(self, stream: int) -> random.Random:
        # One generator per purpose, so that (say) the joins do not change when the number of operations does.
        return random.Random(self.seed * 16 + stream)

    def join_batches(self, join_batch: int = 1) -> list[range]:
        """The nodes that join together, in order (see :func:`simulations._simkit.join_batches`)."""
        return join_batches(self.nodes, join_batch)

    def bootstrap_peers(self, join_batch: int = 1) -> list[int]:
        """For node ``i >= 1``, at index ``i - 1``: the node it bootstraps from, a random node of an earlier batch
        of :meth:`join_batches` (with ``join_batch=1``: any earlier node)."""
        rng = self._rng(_BOOTSTRAP_STREAM)
        return [rng.randrange(batch.start) for batch in self.join_batches(join_batch)[1:] for _ in batch]

    def operations(self) -> list[Operation]:
        """The operations, in the order they run."""
        rng = self._rng(_OPERATION_STREAM)
        out: list[Operation] = []
        for _ in range(self.ops):
            put_node = rng.randrange(self.nodes)
            get_node = rng.randrange(self.nodes - 1)
            if get_node >= put_node:
                get_node += 1
            out.append(Operation(put_node, get_node, rng.randbytes(KEY_BYTES), rng.randbytes(VALUE_BYTES)))
        return out

    def node_key_rng(self) -> random.Random:
        """A generator for the nodes' own keys (systems whose node ids come from a key pair)."""
        return self._rng(_NODE_KEY_STREAM)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    """Progress lines on stderr, about every tenth of a phase, with wall and CPU time (the CPU time of this
    process tells what the wall time would be on a machine that runs nothing else)."""

    def __init__(self, system: str, phase: str, total: int) -> None:
        self.system = system
        self.phase = phase
        self.total = total
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        self._step = max(1, total // 10)
        self._next = self._step

    def tick(self, done: int, extra: str = "") -> None:
        """Report ``done`` of ``total`` when it crosses a tenth, or at the end."""
        if done >= self._next or done == self.total:
            self._next = (done // self._step + 1) * self._step
            elapsed = time.perf_counter() - self.started
            cpu = time.process_time() - self.cpu_started
            info(self.system, f"{self.phase} {done:,}/{self.total:,} after {elapsed:.1f}s wall ({cpu:.1f}s CPU){extra}")


class OpFigures:
    """Success count and wall time of each put + get."""

    def __init__(self) -> None:
        self.times_ms: list[float] = []
        self.success = 0

    def add(self, elapsed_s: float, ok: bool) -> None:
        """Record one operation."""
        self.times_ms.append(elapsed_s * 1000.0)
        self.success += ok

    def figures(self) -> Figures:
        """The JSON figures (without rss_mb, which the worker adds last)."""
        times = sorted(self.times_ms)
        return {
            "success": self.success,
            "ops": len(times),
            "median_ms": round(percentile(times, 0.5), 3),
            "p99_ms": round(percentile(times, 0.99), 3),
        }


def info(system: str, message: str) -> None:
    """One line of information on stderr."""
    print(f"[{system}] {message}", file=sys.stderr, flush=True)
