"""The DHT benchmark's command runs, small, and prints exactly the JSON other tools read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = {"success", "ops", "median_ms", "p99_ms", "rss_mb"}
SIM_KEYS = {"success", "ops", "median_hops", "p95_hops", "rpcs_per_lookup", "median_ms", "p99_ms", "wall_s", "rss_mb"}


def _run(*args: str) -> dict[str, dict[str, float]]:
    done = subprocess.run(
        [sys.executable, "-m", "simulations.bench_dht", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


@pytest.mark.realnet
def test_loopback_bench_small() -> None:
    result = _run("--nodes", "30", "--ops", "10", "--systems", "p2pchat,kademlia")
    assert set(result) == {"p2pchat", "kademlia"}
    for figures in result.values():
        assert set(figures) == KEYS
        assert figures["ops"] == 10
        assert figures["rss_mb"] > 0
    assert result["p2pchat"]["success"] == 10
    assert 0 < result["p2pchat"]["median_ms"] <= result["p2pchat"]["p99_ms"]


def test_sim_bench_small() -> None:
    result = _run("--sim", "--nodes", "60", "--ops", "30")
    assert set(result) == {"p2pchat"}
    figures = result["p2pchat"]
    assert set(figures) == SIM_KEYS
    assert figures["ops"] == 30 and figures["success"] == 30
    assert 1 <= figures["median_hops"] <= figures["p95_hops"] <= 4
