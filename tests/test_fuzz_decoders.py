"""Bounded fuzzing of every decoder that reads network or disk input (the long campaign: ``tests/fuzz/``).

For each target of :mod:`fuzz.targets`: its valid seeds parse, and hypothesis inputs -- the seeds, seeds
mutated byte-wise and msgpack-aware, and random bytes -- either parse or raise the target's own error, nothing
else, while allocating at most :data:`MEMORY_BOUND` bytes each.  Deterministic (``derandomize=True``, no example
database); the whole file takes a few seconds.
"""

from __future__ import annotations

import random
import tracemalloc

import pytest
from fuzz.mutate import mutate
from fuzz.targets import TARGETS, Target, run_checked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MEMORY_BOUND = 8 * 1024 * 1024
"""Most bytes any one input may make a decoder allocate at once (inputs are at most 16 KiB): a decoder that
trusted a length or a count from its input would blow far past it."""

EXAMPLES = 250
"""Hypothesis examples per fast target."""

SLOW_EXAMPLES = 60
"""Per target that touches SQLite, a file or Argon2 (milliseconds an input)."""


def inputs(target: Target) -> st.SearchStrategy[bytes]:
    """Seeds, mutated seeds (three times as likely) and random bytes."""
    seeds = target.seeds()
    mutated = st.builds(
        lambda seed, entropy: mutate(seed, random.Random(entropy), seeds, target.max_size),
        st.sampled_from(seeds),
        st.integers(0, 2**32 - 1),
    )
    return st.one_of(st.sampled_from(seeds), mutated, mutated, mutated, st.binary(max_size=min(target.max_size, 2048)))


def _bounded(target: Target, data: bytes) -> bool:
    tracemalloc.start()
    try:
        parsed = run_checked(target, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= MEMORY_BOUND, f"{target.name}: {peak} bytes allocated for a {len(data)}-byte input"
    return parsed


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_seed_parses(name: str) -> None:
    # The fuzzer starts from these: if they did not parse, it would test nothing but the first check.
    target = TARGETS[name]
    assert all(run_checked(target, seed) for seed in target.seeds())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_parses_or_raises_its_own_error_only(name: str) -> None:
    target = TARGETS[name]

    @settings(
        max_examples=SLOW_EXAMPLES if target.slow else EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(inputs(target))
    def fuzz(data: bytes) -> None:
        _bounded(target, data)

    fuzz()


def test_the_mutator_reaches_past_the_first_checks() -> None:
    # Mutated seeds must parse some of the time (or fail deep inside), or the fuzzer only tests the headers.
    target = TARGETS["datagram"]
    seeds = target.seeds()
    rng = random.Random(5)
    parsed = sum(run_checked(target, mutate(rng.choice(seeds), rng, seeds, target.max_size)) for _ in range(2000))
    assert 20 <= parsed < 2000
