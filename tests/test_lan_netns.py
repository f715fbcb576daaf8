"""Two nodes in two network namespaces, joined by a veth pair, find each other over mDNS on the veth and chat.

The test creates the namespaces (``p2pchat-<pid>-a`` and ``-b``) and the veth pair directly inside them, gives
the ends addresses in a private test subnet, and always deletes both namespaces at the end (which removes the
veth pair with them).  Nothing is added to the namespace this test runs in, and the nodes have no route out of
their own subnet, so no traffic leaves the pair.

One peer process (``tests/lan_netns_peer.py``) runs in each namespace with LAN discovery on its veth address and
no bootstrap; ``P2PCHAT_ALLOW_NETWORKS`` is set to the test subnet for them.  Each reports, as JSON lines, that it
is ready, that it found (and verified) the other, that it received the other's message and that its own was
delivered.  Every wait is for such a line under a deadline; nothing sleeps.

Creating namespaces needs root.  CI runs as root, so this test never skips: without root it fails and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pchat.net.real import ALLOW_ENV_VAR

from line_reader import LineReader

pytestmark = pytest.mark.realnet

PEER_SCRIPT = Path(__file__).with_name("lan_netns_peer.py")
DEADLINE = 30.0
"""Seconds for the peers to find each other and chat (normally a few: mDNS probing, then a ping and a message)."""
STARTUP_DEADLINE = 15.0
"""Seconds for a peer process to start its node."""
EXIT_DEADLINE = 5.0
"""Seconds a peer gets to say goodbye and exit once its stdin is closed, before it is killed."""
SETUP_TIMEOUT = 10.0
"""Seconds any one ``ip`` command may take."""


class Peer:
    """A running peer process in one namespace and the events it has reported."""

    def __init__(self, name: str, ip: str, process: trio.Process, stderr_path: Path) -> None:
        self.name = name
        self.ip = ip
        self.process = process
        self.stderr_path = stderr_path
        assert process.stdout is not None
        self._lines = LineReader(process.stdout, "peer")
        self.events: dict[str, dict[str, Any]] = {}

    async def next_event(self) -> dict[str, Any]:
        """The next JSON event line (the caller sets the deadline)."""
        event: dict[str, Any] = json.loads(await self._lines.line())
        self.events.setdefault(event["event"], event)
        return event

    async def collect(self, *kinds: str) -> None:
        """Read events until one of each of *kinds* has been seen."""
        while not all(kind in self.events for kind in kinds):
            await self.next_event()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]


async def _ip(*args: str) -> None:
    """Run ``ip ARGS``; fail the test with its stderr if it fails."""
    with trio.fail_after(SETUP_TIMEOUT):
        result = await trio.run_process(["ip", *args], check=False, capture_stdout=True, capture_stderr=True)
    if result.returncode != 0:
        raise AssertionError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.decode().strip()}")


@asynccontextmanager
async def veth_namespaces(prefix: str, subnet: str) -> AsyncIterator[tuple[tuple[str, str], tuple[str, str]]]:
    """Two namespaces joined by a veth pair with ``subnet.1/24`` and ``subnet.2/24``; yields ``(ns, ip)`` twice.

    Both namespaces are deleted on the way out, whatever happened (deleting one removes the veth pair).
    """
    ns_a, ns_b = f"{prefix}-a", f"{prefix}-b"
    ip_a, ip_b = f"{subnet}.1", f"{subnet}.2"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            await _ip("netns", "add", ns)
            created.append(ns)
        # Created directly inside the namespaces: no interface ever appears in ours.
        await _ip("link", "add", "veth-a", "netns", ns_a, "type", "veth", "peer", "name", "veth-b", "netns", ns_b)
        for ns, dev, ip in ((ns_a, "veth-a", ip_a), (ns_b, "veth-b", ip_b)):
            await _ip("-n", ns, "link", "set", "lo", "up")
            await _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            await _ip("-n", ns, "link", "set", dev, "up")
        yield (ns_a, ip_a), (ns_b, ip_b)
    finally:
        with trio.CancelScope(shield=True):
            for ns in created:
                with trio.move_on_after(SETUP_TIMEOUT):
                    await trio.run_process(["ip", "netns", "delete", ns], check=False, capture_stderr=True)


@asynccontextmanager
async def peer_process(tmp_path: Path, name: str, ns: str, ip: str, subnet_cidr: str) -> AsyncIterator[Peer]:
    """Start the peer script inside *ns*; on the way out close its stdin, give it a moment, then kill it."""
    stderr_path = tmp_path / f"{name}.stderr"
    command = [
        "ip", "netns", "exec", ns,
        sys.executable, str(PEER_SCRIPT), "--ip", ip, "--home", str(tmp_path / name), "--name", name,
    ]  # fmt: skip
    env = {**os.environ, ALLOW_ENV_VAR: subnet_cidr}
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env
        )
    try:
        yield Peer(name, ip, process, stderr_path)
    finally:
        with trio.CancelScope(shield=True):
            assert process.stdin is not None
            await process.stdin.aclose()  # asks for a clean exit (with an mDNS goodbye)
            with trio.move_on_after(EXIT_DEADLINE):
                await process.wait()
            process.kill()
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            f"test_lan_netns needs root (euid is {os.geteuid()}) to create network namespaces and a veth pair; it "
            f"is never skipped, since CI runs as root (CI={os.environ.get('CI', '')!r} here).  Run the suite as "
            f"root, e.g. `sudo -E pytest tests/test_lan_netns.py`",
            pytrace=False,
        )
    if shutil.which("ip") is None:
        pytest.fail("test_lan_netns needs the `ip` command (iproute2) to create network namespaces", pytrace=False)


def test_nodes_in_two_namespaces_discover_each_other_over_mdns_on_a_veth_and_chat(tmp_path: Path) -> None:
    # Checked before trio starts, so that the failure is reported as it is (not inside an exception group).
    _require_root()
    trio.run(_chat_over_veth, tmp_path)


async def _chat_over_veth(tmp_path: Path) -> None:
    pid = os.getpid()
    subnet = f"10.213.{pid % 250 + 1}"
    subnet_cidr = f"{subnet}.0/24"
    async with (
        veth_namespaces(f"p2pchat-{pid}", subnet) as ((ns_a, ip_a), (ns_b, ip_b)),
        peer_process(tmp_path, "alice", ns_a, ip_a, subnet_cidr) as alice,
        peer_process(tmp_path, "bob", ns_b, ip_b, subnet_cidr) as bob,
    ):
        peers = (alice, bob)
        try:
            with trio.fail_after(STARTUP_DEADLINE):
                for peer in peers:
                    await peer.collect("ready")
            with trio.fail_after(DEADLINE):
                for peer in peers:  # one after the other: the other's lines wait in its pipe meanwhile
                    await peer.collect("found", "received", "delivered")
        except (trio.TooSlowError, AssertionError) as exc:
            report = "\n".join(f"{p.name}: events {list(p.events)}; stderr:\n{p.stderr()}" for p in peers)
            raise AssertionError(f"{exc!r}\n{report}") from exc

        for me, other in ((alice, bob), (bob, alice)):
            other_address = other.events["ready"]["address"]
            # Found over mDNS on the veth, and verified at the other namespace's address.
            assert me.events["found"]["address"] == other_address
            assert me.events["found"]["udp"].split(":")[0] == other.ip
            assert other.events["ready"]["udp"].split(":")[0] == other.ip
            # A message each way, and each sender heard it was delivered.
            assert me.events["received"]["text"] == f"hello from {other.name}"
            assert me.events["received"]["sender"] == other_address
            assert me.events["delivered"]["to"] == other_address

        # A clean shutdown (goodbye, zeroconf closed, databases closed) once asked to stop.
        for peer in peers:
            assert peer.process.stdin is not None
            await peer.process.stdin.aclose()
        with trio.fail_after(EXIT_DEADLINE):
            codes = [await peer.process.wait() for peer in peers]
        assert codes == [0, 0], "\n".join(f"{p.name} stderr:\n{p.stderr()}" for p in peers)
