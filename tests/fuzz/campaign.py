"""The long fuzz campaign: every target for a million inputs or ten minutes, with atheris when it is installed.

Run from the repository root::

    python -m tests.fuzz.campaign --list
    python -m tests.fuzz.campaign --target datagram --seconds 600 --runs 1000000
    python -m tests.fuzz.campaign --all --seconds 600 --runs 1000000 --json fuzz-results.json

Each target stops at whichever limit comes first.  Engines:

* ``atheris`` (coverage-guided libFuzzer; ``pip install atheris`` -- a binary wheel exists for CPython 3.11 on
  x86-64 Linux, no compiler needed): one subprocess per target, seeded with the target's valid encodings, the
  p2pchat modules instrumented.  libFuzzer stops at the first crash and writes the input to ``--artifacts``.
* ``mutate`` (no extra dependency): the seeded mutation loop of :mod:`tests.fuzz.mutate`, in this process;
  it keeps going after a crash and reports every distinct one.
* ``auto`` (default): atheris if it imports, else ``mutate``.

Both run on one core (libFuzzer without ``-jobs``/``-workers``; the loop is single-threaded): other work
shares the machine.  A crash is any exception other than the target's allowed error, a failed bound included;
the report gives inputs run, seconds, inputs per second, crashes and peak RSS.  The node target (``node``) feeds
a DHT node on SimNetwork and checks every 1,000 inputs that it still answers a ping and a lookup.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["CampaignResult", "main", "run_mutation_loop"]

DEFAULT_SECONDS = 600.0
DEFAULT_RUNS = 1_000_000
NODE_TARGET = "node"
_REPO = Path(__file__).resolve().parents[2]


@dataclass
class CampaignResult:
    """The figures of one target's campaign."""

    target: str
    engine: str
    inputs: int
    seconds: float
    crashes: int
    peak_rss_mb: float
    parsed: int | None = None
    """Inputs that parsed (the mutation loop only: libFuzzer does not say)."""
    crash_kinds: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Inputs per second."""
        return self.inputs / self.seconds if self.seconds else 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_target(name: str) -> tuple[Callable[[bytes], bool], list[bytes], int, Callable[[], None]]:
    """(run one input -> parsed?, seeds, max input size, cleanup) for *name*."""
    if name == NODE_TARGET:
        from .node import ThreadedNodeTarget, node_seeds  # noqa: PLC0415 - starts a trio thread: only on demand

        harness = ThreadedNodeTarget()

        def run_node(data: bytes) -> bool:
            harness.feed(data)
            return True

        def close() -> None:
            harness.check()
            harness.close()

        return run_node, node_seeds(), 1400, close
    from .targets import TARGETS, run_checked  # noqa: PLC0415

    target = TARGETS[name]
    return (lambda data: run_checked(target, data)), target.seeds(), target.max_size, lambda: None


def target_names() -> list[str]:
    """Every target, the node target last."""
    from .targets import TARGETS  # noqa: PLC0415

    return [*TARGETS, NODE_TARGET]


def run_mutation_loop(name: str, *, seconds: float, runs: int, seed: int, artifacts: Path) -> CampaignResult:
    """Fuzz *name* in this process with the seeded mutation loop until *runs* inputs or *seconds* pass."""
    from .mutate import mutate, random_input  # noqa: PLC0415

    run, seeds, max_size, close = _load_target(name)
    rng = random.Random(seed)
    crashes: collections.Counter[str] = collections.Counter()
    saved: list[str] = []
    parsed = 0
    inputs = 0
    start = time.monotonic()
    queue: list[bytes] = list(seeds)
    while inputs < runs and time.monotonic() - start < seconds:
        if inputs < len(seeds):
            data = seeds[inputs]
        elif rng.random() < 0.05:
            data = random_input(rng, max_size)
        else:
            data = mutate(rng.choice(queue), rng, seeds, max_size)
        inputs += 1
        try:
            ok = run(data)
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            kind = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}: {str(exc)[:120]}"
            if kind not in crashes:
                path = artifacts / f"crash-{name}-{hashlib.sha1(data).hexdigest()[:16]}"
                path.write_bytes(data)
                saved.append(str(path))
                print(f"[{name}] CRASH {kind} -> {path}", file=sys.stderr)
            crashes[kind] += 1
            continue
        if ok:
            parsed += 1
            # Inputs that parse are the interesting ones to mutate further (a poor man's corpus).
            if len(queue) < 512:
                queue.append(data)
            elif rng.random() < 0.01:
                queue[rng.randrange(len(queue))] = data
    elapsed = time.monotonic() - start
    close()
    return CampaignResult(
        name,
        "mutate",
        inputs,
        round(elapsed, 1),
        sum(crashes.values()),
        round(_peak_rss_mb(), 1),
        parsed,
        list(crashes),
        saved,
    )


def run_atheris(name: str, *, seconds: float, runs: int, seed: int, artifacts: Path) -> CampaignResult:
    """Fuzz *name* with atheris in a subprocess (see :mod:`tests.fuzz.atheris_runner`)."""
    _, seeds, max_size, close = _load_seeds_only(name)
    with tempfile.TemporaryDirectory(prefix=f"p2pchat-corpus-{name}-") as corpus_dir:
        for index, data in enumerate(seeds):
            Path(corpus_dir, f"seed-{index}").write_bytes(data)
        command = [
            sys.executable,
            "-m",
            "tests.fuzz.atheris_runner",
            name,
            f"-max_total_time={int(seconds)}",
            f"-runs={runs}",
            f"-seed={seed}",
            f"-max_len={max_size}",
            "-rss_limit_mb=2048",
            "-timeout=60",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/{name}-",
            corpus_dir,
        ]
        start = time.monotonic()
        process = subprocess.run(command, cwd=_REPO, capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - start
    close()
    log = process.stderr
    (artifacts / f"{name}.log").write_text(log)
    executed = _stat(log, "number_of_executed_units") or _done_runs(log)
    rss = _stat(log, "peak_rss_mb")
    crashed = process.returncode != 0
    kinds = re.findall(r"=== Uncaught Python exception: ===\n(.*)", log)
    found = re.findall(r"Test unit written to (\S+)", log)
    return CampaignResult(
        name,
        "atheris",
        executed,
        round(elapsed, 1),
        1 if crashed else 0,
        float(rss),
        None,
        kinds or ([f"exit status {process.returncode}"] if crashed else []),
        found,
    )


def _load_seeds_only(name: str) -> tuple[None, list[bytes], int, Callable[[], None]]:
    if name == NODE_TARGET:
        from .node import node_seeds  # noqa: PLC0415

        return None, node_seeds(), 1400, lambda: None
    from .targets import TARGETS  # noqa: PLC0415

    target = TARGETS[name]
    return None, target.seeds(), target.max_size, lambda: None


def _stat(log: str, key: str) -> int:
    match = re.search(rf"stat::{key}:\s*(\d+)", log)
    return int(match.group(1)) if match else 0


def _done_runs(log: str) -> int:
    match = re.search(r"Done (\d+) runs in", log)
    return int(match.group(1)) if match else 0


def _have_atheris() -> bool:
    try:
        import atheris  # type: ignore[import-not-found]  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the number of targets with crashes (0: all clean)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", action="append", help="a target name (repeatable)")
    which.add_argument("--all", action="store_true", help="every target in turn")
    which.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="time limit per target")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="input limit per target")
    parser.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"), help="crash inputs and logs")
    parser.add_argument("--json", type=Path, help="append the results to this JSON file")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # dropped-input logs would dominate the time
    if args.list:
        print("\n".join(target_names()))
        return 0
    names = target_names() if args.all else args.target
    unknown = set(names) - set(target_names())
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}; see --list")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _have_atheris() else "mutate"
    args.artifacts.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in names:
        runner = run_atheris if engine == "atheris" else run_mutation_loop
        result = runner(name, seconds=args.seconds, runs=args.runs, seed=args.seed, artifacts=args.artifacts)
        failed += result.crashes > 0
        print(
            f"{result.target:26} {result.engine:8} {result.inputs:>10,} inputs {result.seconds:>7.1f} s "
            f"{result.rate:>9,.0f}/s  crashes {result.crashes}  peak RSS {result.peak_rss_mb:.0f} MiB",
            flush=True,
        )
        for kind in result.crash_kinds:
            print(f"    {kind}", flush=True)
        if args.json is not None:
            existing = json.loads(args.json.read_text()) if args.json.exists() else []
            existing.append({**asdict(result), "rate": round(result.rate, 1)})
            args.json.write_text(json.dumps(existing, indent=2) + "\n")
    return failed


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
