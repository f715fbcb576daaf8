"""What a run leaves in ``--out DIR``: ``results.json`` (deterministic), ``run.json`` (wall time, CPU, memory: never
the same twice), ``summary.md`` and PNG plots (with matplotlib, the ``sim`` extra; without it the plots are skipped
and the summary says so)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

__all__ = ["dump_results", "plot_results", "summary_markdown", "write_outputs"]


def dump_results(results: dict[str, Any]) -> str:
    """The results as the exact text of ``results.json`` (stable key order, one trailing newline)."""
    return json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def write_outputs(out: Path, results: dict[str, Any], run: dict[str, Any], *, plots: bool = True) -> list[str]:
    """Write everything of a run into *out* (created if needed); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(dump_results(results), encoding="utf-8")
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    images = plot_results(results, out) if plots else []
    (out / "summary.md").write_text(summary_markdown(results, run, images), encoding="utf-8")
    return ["results.json", "run.json", *images, "summary.md"]


# --- the summary ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "**no**", None: "n/a"}[value]
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _dist_row(name: str, d: dict[str, Any], unit: str) -> str:
    return f"| {name} | {_fmt(d['p50'])} | {_fmt(d['p90'])} | {_fmt(d['p99'])} | {_fmt(d['max'])} | {unit} |"


def summary_markdown(results: dict[str, Any], run: dict[str, Any], images: list[str]) -> str:
    """A short Markdown report of one run."""
    s = results["scenario"]
    pop = results["population"]
    lk = results["lookups"]
    msg = results["messaging"]
    lines = [f"# Simulation: {s['name']}", ""]
    if s["description"]:
        lines += [s["description"].strip(), ""]
    lines += [
        f"Seed {s['seed']}; {pop['nodes']:,} nodes ({pop['plain_dht_nodes']:,} DHT nodes, {pop['full_nodes']} "
        f"full Nodes in {msg['pairs']} messaging pairs); {results['virtual_s']['end']:,.0f} s of virtual time "
        f"({results['virtual_s']['join']:,.0f} s of joins, then the workload).",
        "",
        "## Targets",
        "",
    ]
    if results["targets"]:
        lines += ["| metric | target | actual | met |", "|---|---|---|---|"]
        for t in results["targets"]:
            lines.append(
                f"| `{t['metric']}` | {t['op']} {_fmt(t['target'])} | {_fmt(t['actual'])} | {_fmt(t['met'])} |"
            )
    else:
        lines.append("This scenario sets no targets.")
    lines += ["", "## Figures", "", "| figure | p50 | p90 | p99 | max | unit |", "|---|---|---|---|---|---|"]
    lines.append(_dist_row("lookup latency", lk["latency_ms"], "ms virtual"))
    lines.append(_dist_row("lookup hops", lk["hops"], "hops"))
    lines.append(_dist_row("lookup RPCs", lk["rpcs"], "requests"))
    if "targeted" in lk:
        lines.append(_dist_row("targeted-key lookup latency", lk["targeted"]["latency_ms"], "ms virtual"))
    if msg["sent"]:
        lines.append(_dist_row("message delivery, direct", msg["latency_s_direct"], "s virtual"))
        lines.append(_dist_row("message delivery, via mailbox", msg["latency_s_mailbox"], "s virtual"))
    samples = results["replicas"]["samples"]
    if samples and results["replicas"]["tracked_records"]:
        lines.append(_dist_row("record replicas (last sample)", samples[-1]["record_replicas"], "live holders"))
    lines.append(_dist_row("bytes sent per node per hour", results["traffic"]["bytes_per_node_per_hour"], "bytes"))
    lines.append(_dist_row("storage per node (end)", results["storage"]["bytes_per_node"], "bytes"))
    lines += [""]
    lines.append(
        "No lookups in this scenario."
        if not lk["ran"]
        else f"Lookups: {lk['succeeded']:,} of {lk['ran']:,} found the closest live honest node "
        f"({lk['success_rate']:.2%}; first in the list: {lk['exact_first_rate']:.2%}); median RTT of the network "
        f"model {results['network']['median_rtt_ms']:,.0f} ms, so the median lookup took "
        f"{lk['latency_over_median_rtt']['p50']:.2f} RTTs."
    )
    if "targeted" in lk:
        t = lk["targeted"]
        lines.append(
            f"Lookups of the keys the Sybils aim at: {t['succeeded']:,} of {t['ran']:,} ({t['success_rate']:.2%})."
        )
    if msg["sent"]:
        lines.append(
            f"Messages: {msg['delivered']:,} of {msg['sent']:,} delivered ({msg['delivery_ratio']:.2%}): "
            f"{msg['direct']:,} direct, {msg['mailbox']:,} via a mailbox ({msg['mailbox_public']:,} public, "
            f"{msg['mailbox_pairwise']:,} pairwise); {msg['recipients_away']} of "
            f"{msg['pairs']} recipients were away once; of the {msg['while_away']['sent']:,} messages sent while "
            f"their recipient was away, {msg['while_away']['delivered']:,} arrived."
        )
        for group in ("targeted", "untargeted"):
            if group in msg:
                g = msg[group]
                lines.append(
                    f"Messages to {group} recipients: {g['delivered']:,} of {g['sent']:,} ({g['delivery_ratio']:.2%}); "
                    f"{g['mailbox_public']:,} through the public mailbox, {g['mailbox_pairwise']:,} through pairwise "
                    "ones."
                )
        if "targeted" in msg:
            lines.append(
                "The Sybils aim at the public mailboxes (named in the prekey records); pairwise mailboxes, used once a "
                "sender has heard from its recipient, are derived from a secret the two share and are out of their "
                "reach."
            )
    churn = results["churn"]
    if churn.get("churning_nodes"):
        lines.append(
            f"Churn: {churn['went_offline']:,} departures of {churn['churning_nodes']:,} churning nodes "
            f"({churn['per_node_hour']:.2f} per node-hour), {churn['offline_fraction']:.1%} offline on average."
        )
    roles = {k: pop[k] for k in ("silent", "far", "fake", "sybil", "dead") if pop[k]}
    if roles:
        lines.append("Hostile and dead nodes: " + ", ".join(f"{v:,} {k}" for k, v in roles.items()) + ".")
    lines += ["", "## Model and shortcuts", "", results["model"], ""]
    lines += [f"- {shortcut}" for shortcut in results["shortcuts"]]
    lines += ["", "## Plots", ""]
    if images:
        lines += [f"![{name}]({name})" for name in images]
    else:
        lines.append("No plots (matplotlib is not installed: `pip install -e '.[sim]'`).")
    lines += [
        "",
        "## This run (not part of results.json)",
        "",
        f"{run['wall_s']:,.1f} s wall, {run['cpu_s']:,.1f} s CPU, peak RSS {run['peak_rss_mib']:,.0f} MiB on "
        f"{run['cpus']} CPUs (load average {run['load_average_start'][0]:.2f} at the start); Python {run['python']}.",
        "",
    ]
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------------------


def plot_results(results: dict[str, Any], out: Path) -> list[str]:
    """PNG plots of one run (none without matplotlib); returns the file names."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    import matplotlib  # noqa: PLC0415 - an optional extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written: list[str] = []
    percent = list(range(1, 101))

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(name)

    lk = results["lookups"]
    if lk["ran"]:
        _plot_lookups(plt, lk, percent, save)

    msg = results["messaging"]
    if msg["sent"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, key in (("direct", "latency_s_quantiles_direct"), ("via mailbox", "latency_s_quantiles_mailbox")):
            if msg[key]:
                ax.plot(msg[key], percent[: len(msg[key])], label=label)
        ax.set_xlabel("send to arrival (virtual s)")
        ax.set_ylabel("% of delivered messages")
        ax.set_title("Message delivery latency (CDF)")
        ax.legend()
        save(fig, "delivery.png")

    samples = results["replicas"]["samples"]
    if samples:
        t = [x["t_s"] / 60 for x in samples]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        if results["replicas"]["tracked_records"]:
            for stat in ("min", "p50", "max"):
                left.plot(t, [x["record_replicas"][stat] for x in samples], label=stat)
            left.legend()
        left.set_xlabel("workload time (virtual min)")
        left.set_ylabel("live nodes holding the record")
        left.set_title("Replicas per record")
        for stat in ("mean", "p99", "max"):
            right.plot(t, [x["storage_bytes"][stat] / 1024 for x in samples], label=stat)
        right.set_xlabel("workload time (virtual min)")
        right.set_ylabel("KiB held for others")
        right.set_title("Storage per live node")
        right.legend()
        save(fig, "replicas_storage.png")
    return written


def _plot_lookups(plt: Any, lk: dict[str, Any], percent: list[int], save: Any) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, group in (("random keys", lk), ("targeted keys", lk.get("targeted"))):
        if group and group["latency_ms_quantiles"]:
            left.plot(group["latency_ms_quantiles"], percent, label=label)
    left.set_xlabel("lookup latency (virtual ms)")
    left.set_ylabel("% of lookups")
    left.set_title("Lookup latency (CDF)")
    left.legend()
    hist = lk["hops_histogram"]
    right.bar([int(h) for h in hist], list(hist.values()))
    right.set_xlabel("hops")
    right.set_ylabel("lookups")
    right.set_title("Lookup hops")
    save(fig, "lookups.png")


def load_results(path: Path) -> dict[str, Any]:
    """Read a ``results.json``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data
