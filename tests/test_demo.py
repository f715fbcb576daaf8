"""``p2pchat demo``: the whole story on real sockets on 127.0.0.1, and its limits and failures.

The demo is run as a user runs it (a subprocess, ``python -m p2pchat demo``: the command) and in-process through
``run_demo``.  Every run has a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pchat import demo
from p2pchat.messaging.messenger import Messenger

pytestmark = pytest.mark.realnet

DEADLINE = 120.0
"""Seconds the demo subprocess may take on a loaded machine (it exits by itself within DEMO_DEADLINE, ~50 s)."""

HOLDER = re.compile(r"#(\d+) closest: (\S+)\s+id ([0-9a-f]{8})\s+holds entry ([0-9a-f]{8})")


def _state_dir(transcript: str) -> Path:
    match = re.search(r"state in (\S+) \(removed at the end\)", transcript)
    assert match, transcript
    return Path(match.group(1))


def _position(transcript: str, text: str) -> int:
    index = transcript.find(text)
    assert index >= 0, f"{text!r} is not in the transcript:\n{transcript}"
    return index


def test_demo_shows_direct_delivery_then_mailbox_delivery_while_bob_is_offline() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "p2pchat", "demo"], capture_output=True, text=True, timeout=DEADLINE, check=False
    )
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    assert "FAILED" not in out and "Traceback" not in done.stderr
    assert f"{demo.DEFAULT_NODES} nodes on 127.0.0.1" in out

    # The story, in order: direct delivery and its receipt; bob stops; the message is stored; bob returns from
    # disk, receives it, and alice gets the receipt.
    steps = [
        'alice sends bob message 1: "',
        "bob received message 1 from alice",
        "alice: message 1 delivered (bob's receipt arrived)",
        "bob's node stops",
        "alice sends bob message 2",
        "alice: message 2 stored in bob's mailbox:",
        "bob's node starts again from bob/ on disk: key file, 1 contact, 1 message in history",
        "bob received message 2 from alice",
        "alice: message 2 delivered (bob's receipt arrived)",
    ]
    positions = [_position(out, step) for step in steps]
    assert positions == sorted(positions), out

    # The holders are named, ranked by distance to bob's mailbox key, and they hold the same sealed entry.
    stored = re.search(r"message 2 stored in bob's mailbox: (\d+) replicas confirmed", out)
    assert stored, out
    replicas = int(stored.group(1))
    holders = HOLDER.findall(out)
    assert replicas >= 1 and holders, out
    names = [name for _, name, _, _ in holders]
    assert "bob" not in names and all(n == "alice" or re.fullmatch(r"node-\d+", n) for n in names), names
    assert len({entry for *_, entry in holders}) == 1
    ranks = [int(rank) for rank, *_ in holders]
    assert ranks == sorted(ranks)
    assert all(_position(out, "alice: message 2 stored") < out.find(f"#{r} closest") for r in ranks)
    assert out.find("#1 closest") < _position(out, "bob received message 2")

    assert "message 1 sent to bob over a direct channel" in out
    assert "both messages delivered" in out
    assert not _state_dir(out).exists()


def test_too_few_or_too_many_nodes_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    for nodes in (demo.MIN_NODES - 1, 0, -3):
        out = io.StringIO()
        assert demo.run_demo(nodes, out) == 2
        assert out.getvalue() == ""
        err = capsys.readouterr().err
        assert err == (
            f"p2pchat demo: --nodes must be at least {demo.MIN_NODES} (alice, bob and at least "
            f"{demo.MIN_NODES - 2} DHT nodes to hold bob's mail while he is away), got {nodes}\n"
        )
    assert demo.main(["--nodes", str(demo.MAX_NODES + 1)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"p2pchat demo: --nodes must be at most {demo.MAX_NODES} ")
    assert captured.err.count("\n") == 1


def test_the_smallest_network_allowed_runs_the_whole_demo() -> None:
    out = io.StringIO()
    assert demo.run_demo(demo.MIN_NODES, out) == 0, out.getvalue()
    transcript = out.getvalue()
    assert "alice, bob and 2 DHT nodes" in transcript
    assert "alice: message 2 stored in bob's mailbox:" in transcript
    assert "alice: message 2 delivered" in transcript
    assert HOLDER.search(transcript)
    assert not _state_dir(transcript).exists()


def test_a_step_that_does_not_happen_in_time_fails_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def mail_never_comes(self: Messenger) -> int:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    # Generous for the steps before (each takes well under a second), short for a test to wait out.
    monkeypatch.setattr(demo, "STEP_DEADLINE", 5.0)
    monkeypatch.setattr(Messenger, "fetch_mailbox", mail_never_comes)
    out = io.StringIO()
    assert demo.run_demo(demo.MIN_NODES, out) == 1
    transcript = out.getvalue()
    failure = "FAILED: bob fetches his mailbox and receives alice's message: did not happen within 5 s"
    assert failure in transcript, transcript
    assert "alice: message 2 stored in bob's mailbox" in transcript
    assert "Traceback" not in capsys.readouterr().err
    assert not _state_dir(transcript).exists()


def test_the_whole_demo_has_a_deadline(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "DEMO_DEADLINE", 0.0)
    out = io.StringIO()
    assert demo.run_demo(demo.MIN_NODES, out) == 1
    transcript = out.getvalue()
    assert "FAILED: 2 DHT nodes start and join: the demo ran out of its 0 s" in transcript, transcript
    assert capsys.readouterr().err == (
        "p2pchat demo: failed: 2 DHT nodes start and join: the demo ran out of its 0 s\n"
    )
    assert not _state_dir(transcript).exists()
