"""The messaging benchmark's command runs, small, and prints exactly the JSON other tools read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = {"raw_per_s", "channel_per_s", "end_to_end_per_s", "offline_delivery_ratio"}

SMALL = (
    "--messages", "50",
    "--nodes", "60", "--pairs", "2", "--hours", "1", "--messages-per-pair", "3", "--settle", "3600",
)  # fmt: skip


@pytest.mark.realnet
def test_bench_messaging_small() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "simulations.bench_messaging", *SMALL, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    assert set(result) == KEYS
    assert all(isinstance(value, float) for value in result.values())
    assert result["raw_per_s"] > 0 and result["channel_per_s"] > 0 and result["end_to_end_per_s"] > 0
    assert 0.0 <= result["offline_delivery_ratio"] <= 1.0
