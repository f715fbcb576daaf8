"""``python -m simulations``: run a scenario, re-plot a result, or measure how a run grows with the network.

    python -m simulations run --scenario baseline --out docs/simulations/baseline
    python -m simulations run --nodes 2000 --lookups 2000 --set churn.rate_per_hour=0.3 --json
    python -m simulations plot docs/simulations/baseline
    python -m simulations scale --sizes 1000,2000,5000,10000 --out docs/simulations/scale

``run`` takes a scenario file (a path, or the name of one in ``simulations/scenarios/``), then the flags, then
``--set section.key=value`` overrides, later ones winning.  ``--out DIR`` writes ``results.json`` (byte-identical for
the same scenario and seed), ``run.json`` (wall time, CPU, memory), ``summary.md`` and plots.  ``--json`` prints the
results JSON on stdout (and nothing else goes there).  ``--check`` exits 1 when a target of the scenario is missed.
A bad scenario or flag exits 2 with one line saying what is wrong.

The other modules (``python -m simulations.bench_dht`` and friends) are the benchmarks; they work as before.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from p2pchat.errors import UserError
from simulations._progress import ProgressDisplay
from simulations.report import dump_results, load_results, plot_results, write_outputs
from simulations.runner import run_scenario
from simulations.scenario import ScenarioError, load_scenario, parse_value

__all__ = ["SCENARIO_DIR", "main"]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
"""Where the shipped scenarios live; ``--scenario NAME`` looks here when NAME is not a file."""

# flag -> scenario key
_FLAGS: dict[str, tuple[str, type]] = {
    "seed": ("seed", int),
    "nodes": ("nodes", int),
    "join_batch": ("join_batch", int),
    "duration": ("duration_s", float),
    "lookups": ("lookups.count", int),
    "loss": ("network.loss", float),
    "duplicate": ("network.duplicate", float),
    "churn": ("churn.rate_per_hour", float),
    "dead": ("churn.dead_fraction", float),
    "silent": ("hostile.silent_fraction", float),
    "lying": ("hostile.lying_fraction", float),
    "sybils": ("hostile.sybils", int),
    "pairs": ("messaging.pairs", int),
    "messages_per_pair": ("messaging.messages_per_pair", int),
    "offline_share": ("messaging.offline_share", float),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a scenario")
    run.add_argument("--scenario", help="a TOML file, or the name of one in simulations/scenarios/")
    run.add_argument("--out", type=Path, help="write results.json, run.json, summary.md and plots here")
    run.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    run.add_argument("--check", action="store_true", help="exit 1 if a target of the scenario is missed")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    for flag, (key, kind) in _FLAGS.items():
        run.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, help=f"sets {key}")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any scenario key, e.g. --set network.latency='{kind=\"constant\", ms=40}' (repeatable)",
    )
    plot = commands.add_parser("plot", help="draw the plots and summary of a results.json again")
    plot.add_argument("dir", type=Path, help="the directory holding results.json (and run.json)")
    scale = commands.add_parser("scale", help="wall time, memory and hops from small to large networks")
    scale.add_argument("--sizes", default="1000,2000,5000,10000", help="comma-separated node counts")
    scale.add_argument("--scenario", default="scale", help="the scenario each size runs (its nodes and lookups set)")
    scale.add_argument("--out", type=Path, required=True, help="write scale.json, scale.md and plots here")
    return parser


def _scenario_path(name: str | None) -> Path | None:
    if name is None:
        return None
    path = Path(name)
    if path.exists() or path.suffix == ".toml":
        return path
    return SCENARIO_DIR / f"{name}.toml"


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for flag, (key, _) in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ScenarioError(f"--set wants KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_value(value.strip())
    return overrides


def _run(args: argparse.Namespace) -> int:
    scenario = load_scenario(_scenario_path(args.scenario), _overrides(args))
    display = ProgressDisplay(enabled=not args.no_progress)
    display.info(
        f"scenario {scenario.name}: {scenario.nodes:,} nodes, seed {scenario.seed}, "
        f"{scenario.lookups.count + scenario.lookups.targeted:,} lookups, {scenario.messaging.pairs} messaging pairs"
    )
    results, info = run_scenario(scenario, display)
    if args.out is not None:
        written = write_outputs(args.out, results, info.to_dict(), plots=not args.no_plots)
        display.info(f"wrote {', '.join(written)} to {args.out}")
    display.info(
        f"{info.wall_s:.1f}s wall, {info.cpu_s:.1f}s CPU, peak RSS {info.peak_rss_mib:,.0f} MiB; "
        + "; ".join(f"{t['metric']} {t['actual']} ({'met' if t['met'] else 'MISSED'})" for t in results["targets"])
    )
    if args.json:
        sys.stdout.write(dump_results(results))
    missed = [t for t in results["targets"] if not t["met"]]
    return 1 if args.check and missed else 0


def _plot(args: argparse.Namespace) -> int:
    from simulations.report import summary_markdown  # noqa: PLC0415

    results = load_results(args.dir / "results.json")
    run = json.loads((args.dir / "run.json").read_text(encoding="utf-8"))
    images = plot_results(results, args.dir)
    (args.dir / "summary.md").write_text(summary_markdown(results, run, images), encoding="utf-8")
    return 0


def _scale(args: argparse.Namespace) -> int:
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError as exc:
        raise ScenarioError(f"--sizes wants comma-separated node counts, got {args.sizes!r}") from exc
    rows = []
    display = ProgressDisplay()
    for size in sizes:
        # Each size in a process of its own (so its peak RSS is its own), its output kept in OUT/SIZE; a size whose
        # results are there already is not run again (a long series can be resumed).
        where = args.out / str(size)
        if not (where / "results.json").exists():
            display.info(f"scale: {size:,} nodes")
            command = [
                sys.executable, "-m", "simulations", "run", "--scenario", args.scenario,
                "--nodes", str(size), "--lookups", str(size), "--out", str(where), "--no-plots",
            ]  # fmt: skip
            subprocess.run(command, check=True, env=dict(os.environ))
        results = load_results(where / "results.json")
        run = json.loads((where / "run.json").read_text(encoding="utf-8"))
        lk = results["lookups"]
        rows.append(
            {
                "nodes": size,
                "log2_nodes": round(math.log2(size), 3),
                "wall_s": run["wall_s"],
                "cpu_s": run["cpu_s"],
                "join_wall_s": run["phases_wall_s"].get("join"),
                "workload_wall_s": run["phases_wall_s"].get("workload"),
                "peak_rss_mib": run["peak_rss_mib"],
                "load_average_start": run["load_average_start"],
                "lookups": lk["ran"],
                "lookup_success_rate": lk["success_rate"],
                "hops_mean": lk["hops"]["mean"],
                "hops_p50": lk["hops"]["p50"],
                "hops_p99": lk["hops"]["p99"],
                "rpcs_mean": lk["rpcs"]["mean"],
                "latency_ms_p50": lk["latency_ms"]["p50"],
                "datagrams": results["network"]["datagrams_sent"],
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    images = _plot_scale(rows, args.out)
    lines = [
        f"# How a run grows: scenario `{args.scenario}`, {', '.join(f'{n:,}' for n in sizes)} nodes",
        "",
        "Each size ran in a process of its own (its output in the directory named after it): N nodes join, then N "
        "lookups. Wall time and memory are this machine's at the time: 2 cores shared with other work, the load "
        "average at each start is in scale.json; CPU seconds are what the wall time would be on an idle core.",
        "",
        "| nodes | wall s | CPU s | join s | lookups s | peak RSS MiB | load at start | hops mean | hops p99 | "
        "RPCs/lookup | success |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nodes']:,} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['join_wall_s']:.0f} | "
            f"{r['workload_wall_s']:.0f} | {r['peak_rss_mib']:,.0f} | {r['load_average_start'][0]:.1f} | "
            f"{r['hops_mean']:.2f} | {r['hops_p99']:.0f} | {r['rpcs_mean']:.1f} | "
            f"{r['lookup_success_rate']:.2%} |"
        )
    lines += ["", *[f"![{name}]({name})" for name in images], ""]
    (args.out / "scale.md").write_text("\n".join(lines), encoding="utf-8")
    return 0


def _plot_scale(rows: list[dict[str, Any]], out: Path) -> list[str]:
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("matplotlib") is None:
        return []
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    nodes = [r["nodes"] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    a.plot(nodes, [r["wall_s"] for r in rows], "o-", label="total wall")
    a.plot(nodes, [r["cpu_s"] for r in rows], "o-", label="total CPU")
    a.plot(nodes, [r["join_wall_s"] for r in rows], "o--", label="join")
    a.plot(nodes, [r["workload_wall_s"] for r in rows], "o--", label="lookups")
    a.set_xlabel("nodes")
    a.set_ylabel("wall seconds")
    a.set_title("Wall time (N joins + N lookups)")
    a.legend()
    b.plot(nodes, [r["peak_rss_mib"] for r in rows], "o-")
    b.set_xlabel("nodes")
    b.set_ylabel("peak RSS (MiB)")
    b.set_title("Memory")
    logs = [r["log2_nodes"] for r in rows]
    c.plot(logs, [r["hops_mean"] for r in rows], "o-", label="mean hops")
    c.plot(logs, [r["hops_p99"] for r in rows], "o--", label="p99 hops")
    c.set_xlabel("log2(nodes)")
    c.set_ylabel("hops")
    c.set_title("Lookup rounds against log N")
    c.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return ["scale.png"]


def main(argv: list[str] | None = None) -> int:
    """The command line."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "plot":
            return _plot(args)
        return _scale(args)
    except UserError as exc:
        print(f"simulations: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
