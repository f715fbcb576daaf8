"""Helpers for tests and campaigns that run the ``p2pchat`` command as real processes on 127.0.0.1.

Shared by ``tests/test_cli_processes.py``, ``tests/test_crash_processes.py``, ``tests/test_corrupt_files.py``
and the crash campaign (``python -m tests.fuzz.crash_campaign``).  Every daemon runs with ``--no-lan`` and
``--host 127.0.0.1`` and bootstraps only from loopback; ``tests/conftest.py`` (and the campaign) confine every
real socket to loopback, daemons included, through ``P2PCHAT_ALLOW_NETWORKS``.

No fixed sleeps: each helper waits for its event -- a ``ready`` line, a state seen on the control socket, a line
printed, a process ending -- under :data:`DEADLINE`.  Processes are started here and killed only by their own
:class:`trio.Process` handle (their pid), never by name.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from p2pchat.control.client import ControlClient, DaemonNotRunning
from p2pchat.core.identity import Identity
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.env import Env
from p2pchat.errors import UserError

__all__ = [
    "DEADLINE",
    "LOOPBACK_FLAGS",
    "POLL",
    "Daemon",
    "Lines",
    "command",
    "fixed_port_flags",
    "free_port",
    "in_process_dht",
    "joined",
    "make_users",
    "message_with",
    "output",
    "p2pchat",
    "request",
    "start_daemon",
    "until",
]

DEADLINE = 60.0
"""Seconds one step may take on a loaded machine (each normally takes well under two)."""

POLL = 0.05
"""Seconds between two looks at a daemon's state while waiting for it to change."""

LOOPBACK_FLAGS = ["--host", "127.0.0.1", "--udp-port", "0", "--tcp-port", "0", "--no-lan"]
"""A node on loopback, any free ports, no LAN discovery."""

T = TypeVar("T")


def command(home: Path, *argv: str) -> list[str]:
    """The argv of ``p2pchat --home HOME ARGV...`` run with this interpreter."""
    return [sys.executable, "-m", "p2pchat", "--home", str(home), *argv]


async def p2pchat(home: Path, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run one command to completion (under the deadline)."""
    with trio.fail_after(DEADLINE):
        return await trio.run_process(
            command(home, *argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )


def output(result: subprocess.CompletedProcess[bytes]) -> str:
    """A finished command's stdout and stderr, for assertion messages."""
    return result.stdout.decode() + result.stderr.decode()


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
"""Where Linux says which ports it hands out to outgoing connections."""


def free_port(rng: random.Random) -> int:
    """A port on 127.0.0.1 that is free for both UDP and TCP now, below the kernel's ephemeral range.

    A daemon restarted after kill -9 comes back on the ports it had, as a real user's node does (its peers'
    routing tables and cached records still name them).  Below the ephemeral range, no outgoing connection of
    another process can take the port while the daemon is down.
    """
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = rng.randrange(10000, max(low, 10001))
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port below the ephemeral range")


def fixed_port_flags(rng: random.Random) -> list[str]:
    """Loopback flags with one port (UDP and TCP) chosen now, to keep across restarts."""
    port = str(free_port(rng))
    return ["--host", "127.0.0.1", "--udp-port", port, "--tcp-port", port, "--no-lan"]


class Lines:
    """Lines of a process's output, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.seen: list[str] = []

    async def until(self, predicate: Callable[[str], bool]) -> str:
        """The first line (from now) for which *predicate* holds; AssertionError if the output ends first."""
        with trio.fail_after(DEADLINE):
            while True:
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    text = line.decode()
                    self.seen.append(text)
                    if predicate(text):
                        return text
                data = await self.stream.receive_some(65536)
                if not data:
                    raise AssertionError(f"output ended; seen: {self.seen}")
                self.buffer += data


class Daemon:
    """A ``p2pchat run`` process on one home."""

    def __init__(self, home: Path, process: trio.Process, log: Path) -> None:
        self.home = home
        self.process = process
        self.log = log
        self.udp = self.tcp = 0
        self.address = ""

    @property
    def pid(self) -> int:
        """The process id (what a kill is aimed at)."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the process has not ended yet (as far as anyone has waited for it)."""
        return self.process.returncode is None

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send *sig* to this process and wait for it to end; its exit status."""
        self.process.send_signal(sig)
        with trio.fail_after(DEADLINE):
            return await self.process.wait()

    async def kill(self) -> int:
        """kill -9 this process (by its pid) and wait for it to end."""
        return await self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        """The end of this run's log, for failure reports."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


async def start_daemon(
    nursery: trio.Nursery, home: Path, bootstrap: Sequence[str], node_flags: Sequence[str] = LOOPBACK_FLAGS
) -> Daemon:
    """Start ``p2pchat run`` on *home* and wait for its ready line (stderr goes to ``HOME/daemon-N.log``).

    The process is reaped by a task in *nursery*, which kills it if the nursery is cancelled first.
    """
    log = home / f"daemon-{len(list(home.glob('daemon-*.log')))}.log"
    flags = [*node_flags, *(arg for address in bootstrap for arg in ("--bootstrap", address))]
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(command(home, "run", *flags), stdout=subprocess.PIPE, stderr=stderr)
    nursery.start_soon(_reap, process)
    assert process.stdout is not None
    try:
        line = await Lines(process.stdout).until(lambda text: text.startswith("ready "))
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise AssertionError(f"{home.name}'s daemon did not start:\n{log.read_text(errors='replace')}") from None
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    daemon = Daemon(home, process, log)
    daemon.udp, daemon.tcp, daemon.address = int(fields["udp"]), int(fields["tcp"]), fields["address"]
    assert daemon.address.startswith("p2p1")
    return daemon


async def _reap(process: trio.Process) -> None:
    try:
        await process.wait()
    except trio.Cancelled:
        if process.returncode is None:
            process.kill()
        raise


async def request(home: Path, op: str, **args: Any) -> dict[str, Any]:
    """One control request to the daemon of *home*."""
    async with await ControlClient.connect(home / "control.sock") as client:
        return await client.request(op, **args)


async def until(
    home: Path, check: Callable[[ControlClient], Awaitable[T | None]], what: str, deadline: float = DEADLINE
) -> T:
    """Poll the daemon of *home* until ``check(client)`` returns something truthy; that value.

    While the daemon is starting or stopping (no socket, or a connection cut) the poll just goes on; the
    deadline bounds the whole wait and its error names *what* was awaited.
    """
    try:
        with trio.fail_after(deadline):
            while True:
                try:
                    async with await ControlClient.connect(home / "control.sock") as client:
                        value = await check(client)
                        if value:
                            return value
                except (DaemonNotRunning, UserError):
                    pass  # starting or stopping
                await trio.sleep(POLL)
    except trio.TooSlowError:
        raise AssertionError(f"waited {deadline:.0f} s for {what}") from None


async def joined(home: Path) -> None:
    """Wait until the daemon of *home* has a DHT contact."""

    async def check(client: ControlClient) -> bool:
        return bool((await client.request("status"))["dht_contacts"] > 0)

    await until(home, check, f"{home.name}'s daemon to join the DHT")


async def message_with(home: Path, peer: str, text: str, state: str | None = None) -> dict[str, Any]:
    """Wait until the daemon of *home* shows a message *text* with *peer* (in *state*, if given); its view."""

    async def check(client: ControlClient) -> dict[str, Any] | None:
        for message in (await client.request("history", peer=peer))["messages"]:
            if message["text"] == text and (state is None or message["state"] == state):
                return dict(message)
        return None

    return await until(home, check, f"{text!r} in {home.name}'s history with {peer} (state {state})")


async def make_users(base: Path, names: Sequence[str] = ("alice", "bob")) -> dict[str, Any]:
    """Homes under *base* for *names*, each the others' contact: ``{name: home, f"{name}_address": address}``."""
    found: dict[str, Any] = {}

    async def create(name: str) -> None:
        home = base / name
        result = await p2pchat(home, "init", "--name", name)
        assert result.returncode == 0, output(result)
        found[name] = home
        found[f"{name}_address"] = json.loads((await p2pchat(home, "id", "--json")).stdout)["address"]

    async def befriend(me: str, other: str) -> None:
        result = await p2pchat(found[me], "contacts", "add", other, found[f"{other}_address"])
        assert result.returncode == 0, output(result)

    # Each command is a Python start-up: run the independent ones side by side.
    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(create, name)
    async with trio.open_nursery() as nursery:
        for me in names:
            for other in names:
                if other != me:
                    nursery.start_soon(befriend, me, other)
    return found


@contextlib.asynccontextmanager
async def in_process_dht(count: int) -> AsyncIterator[list[str]]:
    """*count* DHT nodes in this process on loopback, joined to each other; yields their ``HOST:PORT``."""
    config = DhtConfig.single_host()
    async with trio.open_nursery() as nursery:
        nodes: list[DhtNode] = []
        with trio.fail_after(DEADLINE):
            for _ in range(count):
                env = Env.real()
                node = DhtNode(env, Identity.generate(env.random_bytes), host="127.0.0.1", config=config)
                await nursery.start(node.run)
                if nodes:
                    await node.bootstrap([nodes[-1].address])
                nodes.append(node)
        yield [f"{n.address.host}:{n.address.port}" for n in nodes]
        nursery.cancel_scope.cancel()
