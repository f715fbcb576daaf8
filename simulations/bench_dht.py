"""Benchmark of the DHT: p2pchat's DhtNode against the stock kademlia package (and OpenDHT, when installed).

    python -m simulations.bench_dht --nodes 500 --ops 1000 --json
    python -m simulations.bench_dht --sim --nodes 10000 --ops 10000 --json

**Real mode** runs the same workload on each system named by ``--systems`` (default ``p2pchat,kademlia``, plus
``opendht`` when the ``opendht`` package is importable), each system in a subprocess of its own, all nodes of
that system inside it, on 127.0.0.1 UDP:

1. ``--nodes`` N nodes start one after another; each one after the first bootstraps from a random earlier node.
2. ``--ops`` M operations run one after another.  An operation puts a fresh random 100-byte value under a fresh
   random key on a random node, then gets that key from another random node.  It succeeds when the get returns
   the value put.  For p2pchat the key is a signed peer record's owner (signing happens before the clock starts).

Prints one JSON object keyed by system name, each ``{"success", "ops", "median_ms", "p99_ms", "rss_mb"}``:

* ``success`` of ``ops``: operations whose get returned the value.
* ``median_ms``, ``p99_ms``: wall time of put + get together, over all operations (failed ones included; an
  operation is abandoned, and failed, after 30 s).  Nearest-rank percentiles.
* ``rss_mb``: peak resident set size of that system's subprocess (all N nodes plus the Python runtime), MiB.

The joins and the operations come from ``--seed``, so every system gets the same ones and a run repeats.  All
nodes of a system share one process and one CPU, and all share the address 127.0.0.1: the figures compare
implementations on equal terms, not what a deployment sees (no network latency, and per-IP limits are relaxed
where a system has them; the workers say which on stderr).  Without ``--json`` a table is printed, with the ratio
of p2pchat's median to kademlia's (below 1: p2pchat is faster).

**Sim mode** (``--sim``) runs p2pchat's DhtNodes on a SimNetwork in virtual time (one-way latency uniform in
10-60 ms on every link, no loss): N nodes join in concurrent batches of up to ``--join-batch`` nodes (default
100; batches grow 1, 2, 4, ... up to it, never larger than the network they join), each node bootstrapping from a
random node of an earlier batch; then M ``find_node`` lookups of random targets from random nodes, with
``--lookup-concurrency`` of them in flight at once (default 100).  A lookup succeeds when its first contact is the
node truly closest to the target.  Prints ``{"p2pchat": {"success", "ops", "median_hops", "p95_hops",
"rpcs_per_lookup", "median_ms", "p99_ms", "wall_s", "rss_mb"}}`` where hops is the length of the referral chain to
the closest node that answered, hops, RPCs and ms are each lookup's own (ms: *virtual* milliseconds from its start to
its end), and ``wall_s`` is the wall time of the whole simulation (bootstrap and lookups).  Both settings are printed
on stderr next to the figures.

Why batches and concurrency: every simulated node runs its maintenance meanwhile, and a bucket nobody touched for
15 minutes gets a refresh lookup.  One join at a time (~0.45 s virtual each) and one lookup at a time (~260 ms)
would stretch 10,000 of each over ~2 hours of virtual time, in which every idle node refreshes its buckets several
times: the refresh traffic of an idle network, not the workload, would then dominate the datagrams and the wall
time.  With the defaults the whole run spans a couple of virtual minutes.  ``--join-batch 1 --lookup-concurrency
1`` gives the one-at-a-time run.

Progress and information go to stderr; with ``--json``, stdout carries nothing but the JSON.  Each subprocess is
bounded by ``--timeout`` (it ends itself with SIGALRM; the parent kills it a little later if it has not).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from simulations._dht_workers import ALLOWED_NETWORKS
from simulations._dht_workload import SIM_JOIN_BATCH, SIM_LOOKUP_CONCURRENCY, Figures

__all__ = ["main"]

REAL_SYSTEMS = ("p2pchat", "kademlia", "opendht")
DEFAULT_TIMEOUT = 3600.0
"""Wall seconds a system's subprocess may run (override with --timeout)."""

KILL_GRACE = 30.0
"""Seconds the parent waits past the timeout, for the worker's own SIGALRM, before it kills the worker."""

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _opendht_importable() -> bool:
    return importlib.util.find_spec("opendht") is not None


def _default_systems() -> str:
    return "p2pchat,kademlia" + (",opendht" if _opendht_importable() else "")


def _run_worker(system: str, args: argparse.Namespace) -> Figures | None:
    """Run one system's worker; return its figures, or None (the reason is on stderr)."""
    command = [
        sys.executable,
        "-m",
        "simulations._dht_workers",
        system,
        f"--nodes={args.nodes}",
        f"--ops={args.ops}",
        f"--seed={args.seed}",
        f"--deadline={args.timeout}",
    ]
    if args.shared_cert_cache:
        command.append("--shared-cert-cache")
    if args.sim:
        command += [f"--join-batch={args.join_batch}", f"--lookup-concurrency={args.lookup_concurrency}"]
    if args.profile:
        command.append(f"--profile={args.profile}.{system}")
    env = dict(os.environ, P2PCHAT_ALLOW_NETWORKS=ALLOWED_NETWORKS)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, cwd=_PROJECT_ROOT, text=True)
    try:
        out, _ = process.communicate(timeout=args.timeout + KILL_GRACE)
    except subprocess.TimeoutExpired:
        print(f"[{system}] still running {args.timeout + KILL_GRACE:.0f}s after start: killed", file=sys.stderr)
        return None
    finally:
        if process.poll() is None:
            process.kill()  # this worker's own pid, on timeout, Ctrl-C or any error here
            process.wait()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        if process.returncode == -signal.SIGALRM:
            how = f"ended by its own --timeout of {args.timeout:.0f}s"
        elif process.returncode < 0:
            how = f"killed by {signal.Signals(-process.returncode).name}"
        else:
            how = f"exit status {process.returncode}"
        print(f"[{system}] worker failed ({how}) after {elapsed:.1f}s", file=sys.stderr)
        return None
    lines = out.strip().splitlines()
    if not lines:
        print(f"[{system}] worker printed no figures", file=sys.stderr)
        return None
    figures: Figures = json.loads(lines[-1])
    print(f"[{system}] done in {elapsed:.1f}s wall (subprocess)", file=sys.stderr)
    if args.sim:
        print(f"[{system}] {_sim_settings(args)}: {json.dumps(figures)}", file=sys.stderr)
    return figures


def _sim_settings(args: argparse.Namespace) -> str:
    return (
        f"{args.nodes:,} nodes, join batch {args.join_batch}, {args.ops:,} lookups, "
        f"lookup concurrency {args.lookup_concurrency}"
    )


def _table(results: dict[str, Figures], args: argparse.Namespace) -> str:
    if args.sim:
        lines = []
        for name, f in results.items():
            lines.append(
                f"{name} ({_sim_settings(args)}): {f['success']:,}/{f['ops']:,} lookups found the closest node; "
                f"hops median "
                f"{f['median_hops']}, p95 {f['p95_hops']}; {f['rpcs_per_lookup']} RPCs per lookup; "
                f"{f['median_ms']:.1f} ms median, {f['p99_ms']:.1f} ms p99 (virtual); "
                f"{f['wall_s']:.1f}s wall; {f['rss_mb']:.0f} MiB peak RSS"
            )
        return "\n".join(lines)
    header = f"{'system':<10} {'success':>13} {'median ms':>10} {'p99 ms':>10} {'peak RSS MiB':>13}"
    lines = [header, "-" * len(header)]
    for name, f in results.items():
        ok = f"{f['success']:,}/{f['ops']:,}"
        lines.append(f"{name:<10} {ok:>13} {f['median_ms']:>10.2f} {f['p99_ms']:>10.2f} {f['rss_mb']:>13.1f}")
    ours, theirs = results.get("p2pchat"), results.get("kademlia")
    if ours and theirs and theirs["median_ms"]:
        ratio = ours["median_ms"] / theirs["median_ms"]
        lines.append(f"p2pchat median / kademlia median: {ratio:.2f} (below 1: p2pchat is faster)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_dht", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, help="nodes per system (default 500; with --sim 10,000)")
    parser.add_argument("--ops", type=int, default=1000, help="operations, one after another (with --sim: lookups)")
    parser.add_argument(
        "--systems",
        default=None,
        help=f"comma-separated, from {', '.join(REAL_SYSTEMS)} (default: {_default_systems()})",
    )
    parser.add_argument("--sim", action="store_true", help="p2pchat on a SimNetwork in virtual time: find_node lookups")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="wall seconds per system's subprocess")
    parser.add_argument(
        "--shared-cert-cache",
        action="store_true",
        help="real mode: p2pchat's nodes share one CertCache (each certificate verified once per process)",
    )
    parser.add_argument(
        "--join-batch",
        type=int,
        help=f"sim mode: nodes that join at once, each from a node of an earlier batch (default {SIM_JOIN_BATCH})",
    )
    parser.add_argument(
        "--lookup-concurrency",
        type=int,
        metavar="C",
        help=f"sim mode: lookups in flight at once, from random nodes (default {SIM_LOOKUP_CONCURRENCY})",
    )
    parser.add_argument("--profile", metavar="PREFIX", help="write each worker's cProfile stats to PREFIX.SYSTEM")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)

    if args.nodes is None:
        args.nodes = 10_000 if args.sim else 500
    if not args.sim and (args.join_batch is not None or args.lookup_concurrency is not None):
        parser.error("--join-batch and --lookup-concurrency are for --sim (real mode runs one by one)")
    if args.join_batch is None:
        args.join_batch = SIM_JOIN_BATCH
    if args.lookup_concurrency is None:
        args.lookup_concurrency = SIM_LOOKUP_CONCURRENCY
    if args.nodes < 2 or args.ops < 0 or args.join_batch < 1 or args.lookup_concurrency < 1 or args.timeout <= 0:
        parser.error(
            "need --nodes >= 2, --ops >= 0, --join-batch >= 1, --lookup-concurrency >= 1 and a positive --timeout"
        )
    if args.sim:
        if args.systems not in (None, "p2pchat"):
            parser.error("--sim benchmarks p2pchat only")
        workers = {"p2pchat": "p2pchat-sim"}
    else:
        systems = [s.strip() for s in (args.systems or _default_systems()).split(",") if s.strip()]
        unknown = [s for s in systems if s not in REAL_SYSTEMS]
        if unknown or not systems:
            parser.error(f"unknown systems {unknown}; choose from {', '.join(REAL_SYSTEMS)}")
        if "opendht" in systems and not _opendht_importable():
            parser.error("opendht is not importable here (pip install opendht)")
        workers = {s: s for s in dict.fromkeys(systems)}

    results: dict[str, Figures] = {}
    for name, worker in workers.items():
        what = _sim_settings(args) if args.sim else f"{args.nodes:,} nodes, {args.ops:,} operations"
        print(f"[{worker}] {what}, seed {args.seed}", file=sys.stderr)
        figures = _run_worker(worker, args)
        if figures is not None:
            results[name] = figures
    if args.json:
        print(json.dumps(results))
    else:
        print(_table(results, args))
    return 0 if len(results) == len(workers) else 1


if __name__ == "__main__":
    sys.exit(main())
