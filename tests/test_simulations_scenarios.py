"""Every shipped scenario runs, small, in seconds; the same scenario and seed give byte-identical results.

The small versions keep each scenario's kind (its latency model, churn, hostile mix, messaging shape) and shrink
its size and time span.  They check that the figures are there and consistent, not that targets are met: the
targets belong to the full-size runs committed under docs/simulations/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulations.__main__ import SCENARIO_DIR, main
from simulations.report import dump_results
from simulations.runner import run_scenario
from simulations.scenario import ScenarioError, load_scenario

SHIPPED = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))

SMALL: dict[str, Any] = {"nodes": 120, "join_batch": 32, "lookups.count": 40, "sample_interval_s": 300.0}
SMALLER_BY_SCENARIO: dict[str, dict[str, Any]] = {
    "baseline": {"duration_s": 600.0, "messaging.pairs": 4, "messaging.settle_s": 1200.0},
    "churn": {"duration_s": 1200.0, "messaging.pairs": 4, "messaging.settle_s": 1200.0},
    "wan": {"duration_s": 300.0, "messaging.pairs": 3, "messaging.settle_s": 600.0},
    "hostile": {
        "duration_s": 900.0,
        "lookups.targeted": 20,
        "hostile.sybils": 6,
        "messaging.pairs": 4,
        "messaging.settle_s": 1200.0,
    },
    "offline": {
        "duration_s": 1800.0,
        "messaging.pairs": 4,
        "messaging.messages_per_pair": 3,
        "messaging.settle_s": 1800.0,
    },
    "scale": {"duration_s": 60.0},
}


def _small(name: str, **more: Any) -> dict[str, Any]:
    return {**SMALL, **SMALLER_BY_SCENARIO[name], **more}


def test_every_shipped_scenario_has_a_small_version() -> None:
    assert set(SHIPPED) == set(SMALLER_BY_SCENARIO)
    assert {"baseline", "churn", "wan", "hostile", "offline"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario_runs_small(name: str) -> None:
    scenario = load_scenario(SCENARIO_DIR / f"{name}.toml", _small(name))
    results, info = run_scenario(scenario)
    assert results["scenario"]["name"] == name
    lookups = results["lookups"]
    assert lookups["planned"] == scenario.lookups.count
    assert lookups["ran"] > 0.9 * lookups["planned"]
    assert 0.0 <= lookups["success_rate"] <= 1.0
    assert lookups["hops"]["count"] == lookups["ran"]
    msg = results["messaging"]
    assert msg["sent"] == scenario.messaging.pairs * scenario.messaging.messages_per_pair
    assert msg["delivered"] == msg["direct"] + msg["mailbox"] + msg["other_path"]
    assert msg["mailbox"] == msg["mailbox_public"] + msg["mailbox_pairwise"]
    assert results["replicas"]["samples"], "replicas and storage are sampled"
    assert results["traffic"]["bytes_per_node_per_hour"]["count"] == scenario.nodes
    assert len(results["targets"]) == len(scenario.targets)
    assert all(t["actual"] is not None for t in results["targets"]), "every target names a figure that exists"
    assert info.wall_s > 0 and info.peak_rss_mib > 0
    if scenario.hostile.targeted_keys:
        pop = results["population"]
        assert pop["sybil"] == scenario.sybil_count
        assert pop["silent"] + pop["far"] + pop["fake"] == round(0.2 * scenario.nodes)
        assert "targeted" in lookups and "targeted" in msg
    if scenario.churn.rate_per_hour:
        assert results["churn"]["went_offline"] > 0
    if scenario.churn.dead_fraction:
        assert results["population"]["dead"] == round(scenario.churn.dead_fraction * scenario.dht_nodes)


def test_same_scenario_and_seed_give_identical_results_in_another_process(tmp_path: Path) -> None:
    """Byte-identical results.json across processes with different hash seeds; another seed differs."""
    args = [
        "run", "--scenario", "hostile", "--no-progress", "--nodes", "70", "--lookups", "20",
        "--duration", "400", "--set", "lookups.targeted=10", "--set", "hostile.sybils=4",
        "--set", "messaging.pairs=3", "--set", "messaging.settle_s=900", "--set", "network.loss=0.02",
        "--set", "churn.rate_per_hour=0.3",
    ]  # fmt: skip
    outputs = []
    for run, (hash_seed, seed) in enumerate([("1", "7"), ("2", "7"), ("1", "8")]):
        out = tmp_path / f"run{run}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run(
            [sys.executable, "-m", "simulations", *args, "--seed", seed, "--out", str(out), "--no-plots"],
            check=True,
            env=env,
            timeout=300,
        )
        outputs.append((out / "results.json").read_bytes())
        assert json.loads((out / "run.json").read_text())["wall_s"] > 0
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_results_hold_no_wall_clock_figures() -> None:
    scenario = load_scenario(SCENARIO_DIR / "baseline.toml", _small("baseline", **{"messaging.pairs": 1}))
    first, _ = run_scenario(scenario)
    second, _ = run_scenario(scenario)
    assert dump_results(first) == dump_results(second)
    text = dump_results(first)
    assert "wall" not in text.replace("wall_time", "") and "rss" not in text


def test_cli_json_prints_only_the_results(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--no-progress", "--nodes", "40", "--lookups", "10", "--duration", "60", "--json", "--check"])
    out = capsys.readouterr().out
    results = json.loads(out)
    assert results["scenario"]["nodes"] == 40 and results["lookups"]["planned"] == 10
    assert code == 0  # no targets: nothing to miss


def test_check_fails_when_a_target_is_missed(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "run", "--no-progress", "--nodes", "40", "--lookups", "10", "--duration", "60", "--check",
            "--set", 'targets=[{metric = "lookups.latency_ms.p50", op = "<=", value = 0.001}]',
        ]
    )  # fmt: skip
    assert code == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nodes": 10, "messaging.pairs": 5}, "fewer than"),
        ({"network.loss": 1.5}, "network.loss must be between 0 and 1"),
        ({"network.latency": {"kind": "gaussian"}}, "kind must be one of"),
        ({"network.latency": {"kind": "uniform", "low_ms": 5}}, "missing parameter high_ms"),
        ({"lookups.speed": 3}, "unknown scenario key(s): lookups.speed"),
        ({"hostile.lie": "sometimes"}, "hostile.lie must be one of"),
        ({"hostile.targeted_keys": 2}, "cannot exceed messaging.pairs"),
        ({"churn.rate_per_hour": 3.0}, "shorter on average"),
        ({"nodes": "many"}, "nodes must be an integer"),
        ({"targets": [{"metric": "x", "op": "==", "value": 1}]}, "op must be"),
    ],
)
def test_bad_scenarios_are_refused_with_a_clear_message(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_scenario(None, overrides)


def test_cli_reports_a_bad_scenario_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--no-progress", "--set", "network.loss=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["simulations: network.loss must be between 0 and 1, got 2.0"]
    assert main(["run", "--no-progress", "--scenario", "no-such-scenario"]) == 2
    assert "cannot read scenario" in capsys.readouterr().err


def test_out_writes_results_run_summary_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["run", "--no-progress", "--nodes", "40", "--lookups", "10", "--duration", "120", "--pairs", "2"]
    assert main([*args, "--json", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "results.json").read_text() == printed
    summary = (out / "summary.md").read_text()
    assert "## Targets" in summary and "shared by all nodes" in summary
    assert json.loads((out / "run.json").read_text())["peak_rss_mib"] > 0
    expected = {"lookups.png", "delivery.png", "replicas_storage.png"}
    have = {p.name for p in out.glob("*.png")}
    assert have == expected or (not have and "matplotlib is not installed" in summary)
    assert main(["plot", str(out)]) == 0
    assert (out / "summary.md").read_text() == summary
