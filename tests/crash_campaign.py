"""Crash campaign: kill -9 a p2pchat daemon at random moments and check that no acknowledged message is lost or
shown twice.

Run from the repository root (it imports its sibling ``tests/daemons.py``)::

    python tests/crash_campaign.py --trials 100 --seed 1
    python tests/crash_campaign.py --trials 100 --seed 1 --json crash-results.json

What it does, all with real processes on 127.0.0.1 (``p2pchat run`` daemons, each with its own home and one
fixed port, kept across restarts as a real node's would be):

* a network of ``--dht-nodes`` DHT-only daemons plus alice and bob (renewed every ``--trials-per-network`` trials,
  so fresh sessions -- X3DH first messages -- are crashed too);
* each trial: bob is online or away (stopped cleanly) by a coin toss; alice is asked, through her control socket
  exactly as ``p2pchat send`` asks, to send a short stream of messages to bob; one daemon -- alice, bob or a DHT
  node, chosen at random -- is killed with SIGKILL at a random moment (while alice sends, while bob receives
  directly or fetches his mailbox, while DHT nodes store entries for bob, while acknowledgements travel), stays
  down a random while, and is started again from its home; bob comes back if he was away;
* then the trial waits, under a deadline, for everything to settle and checks, through ``p2pchat inbox --json``
  and ``p2pchat history --json``:

  - every message whose ``send`` returned (it was on disk: *queued*) is in bob's inbox exactly once, and alice
    shows it *delivered*;
  - a message whose ``send`` was cut off by alice's death (*in doubt*: the user was never told) is either in
    both histories once, delivered, or in neither;
  - nothing is shown twice, nothing appears that alice never sent, and both histories list alice's messages in
    the order she sent them.

Seeded (``--seed``): the seed fixes every choice the campaign makes (who, when, how many, how long down); the
machine's scheduling still varies, so two runs crash at slightly different instants.  Bounded: ``--trials``
trials and ``--time-limit`` seconds (whichever comes first; the current trial finishes); every wait has a
deadline.  It kills only the processes it started, by their pid, and removes its temporary directory (``--keep``
keeps it; a failing run keeps it and says where).  Exit status 0 when every invariant held in every trial, 1
otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from p2pchat.control.client import ControlClient, DaemonNotRunning
from p2pchat.errors import UserError
from p2pchat.net.real import ALLOW_ENV_VAR

from daemons import DEADLINE, Daemon, fixed_port_flags, joined, make_users, output, p2pchat, start_daemon

ROLES: Final = ("alice", "bob", "dht")
"""Who a trial kills: the sender, the receiver, or a DHT node storing for others."""

MAX_MESSAGES: Final = 8
"""Most messages alice sends in one trial (at least 2)."""

MAX_GAP: Final = 0.3
"""Longest pause, in seconds, between two of alice's sends."""

BOB_AWAY_AFTER_STREAM: Final = (0.5, 2.5)
"""When bob is away for a trial, he comes back this many seconds (uniform) after alice's last send: meanwhile
alice stores her messages in his mailbox on the DHT nodes."""

KILL_WINDOW_AFTER: Final = 2.0
"""Seconds after the stream's nominal end (and bob's return) during which the kill may still fall: delivery,
acknowledgements, bob's mailbox fetch and its deletes."""

BOB_KILL_WINDOW: Final = 1.5
"""When bob is the victim but away at the chosen moment: he is killed this long at most after he comes back (his
mailbox fetch and the acknowledgements it causes)."""

MID_SEND_SHARE: Final = 0.4
"""Share of the trials killing alice that kill her while a send request is in flight."""

MID_SEND_DELAY: Final = 0.005
"""Longest wait, in seconds, between writing that request and the kill (the daemon commits within milliseconds)."""

MAX_DOWNTIME: Final = 1.0
"""Longest time, in seconds, a killed daemon stays down before it is started again."""

SETTLE_DEADLINE: Final = 240.0
"""Seconds a trial may take to settle: a message whose direct send was cut waits ``ACK_WAIT`` (10 s) and then a
retry backoff (5 s doubling) before it is resent, so most settle in seconds and a few take a minute."""

MAX_TRIALS: Final = 10_000
"""Most trials one run may ask for."""


@dataclass
class Message:
    """One message alice was asked to send."""

    text: str
    status: str
    """``queued`` (send returned: on disk), ``in doubt`` (alice died during the request)."""
    message_id: str | None = None
    delivered: bool = False
    """Seen delivered at alice (a final state: it is not polled again)."""


@dataclass
class Trial:
    """What one trial did and saw."""

    index: int
    role: str
    victim: str
    phase: str
    bob_online: bool
    kill_at: float
    downtime: float
    held_at_kill: int
    """Mailbox entries the victim held for others when it was killed (-1: unknown)."""
    queued: int = 0
    in_doubt: int = 0
    in_doubt_delivered: int = 0
    refused: int = 0
    settle_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


class Network:
    """The daemons of one campaign network: DHT nodes, alice and bob, each a ``p2pchat run`` on its own home."""

    def __init__(self, base: Path, nursery: trio.Nursery, rng: random.Random, dht_nodes: int) -> None:
        self.base = base
        self.nursery = nursery
        # Ports are probed (a busy one is skipped), so they draw from their own generator: the trials' choices
        # stay the same whatever the probing consumed.
        self.port_rng = random.Random(rng.getrandbits(64))
        self.dht_names = [f"dht{i}" for i in range(dht_nodes)]
        self.homes: dict[str, Path] = {}
        self.flags: dict[str, list[str]] = {}
        self.daemons: dict[str, Daemon | None] = {}
        self.up: dict[str, trio.Event] = {}
        self.bootstrap: list[str] = []

    async def start(self) -> None:
        """Create every home and start every daemon; return once all have joined."""

        async def create_dht_home(name: str) -> None:
            home = self.base / name
            result = await p2pchat(home, "init", "--name", name)
            assert result.returncode == 0, output(result)
            self.homes[name] = home

        users: dict[str, Any] = {}

        async def create_users() -> None:
            users.update(await make_users(self.base))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create_users)
            for name in self.dht_names:
                nursery.start_soon(create_dht_home, name)
        self.homes["alice"], self.homes["bob"] = users["alice"], users["bob"]
        for name in [*self.dht_names, "alice", "bob"]:
            self.flags[name] = fixed_port_flags(self.port_rng)
            self.daemons[name] = None
            self.up[name] = trio.Event()
        self.bootstrap = [f"127.0.0.1:{self.flags[name][3]}" for name in self.dht_names]
        # The first DHT node, then everyone else at once (they bootstrap from it, among others).
        await self.start_one(self.dht_names[0])
        async with trio.open_nursery() as nursery:
            for name in [*self.dht_names[1:], "alice", "bob"]:
                nursery.start_soon(self.start_one, name)
        async with trio.open_nursery() as nursery:
            for home in self.homes.values():
                nursery.start_soon(joined, home)

    def running(self, name: str) -> bool:
        """Whether *name*'s daemon runs now."""
        daemon = self.daemons[name]
        return daemon is not None and daemon.running

    async def start_one(self, name: str) -> Daemon:
        """Start *name*'s daemon from its home, on its ports; wait for its ready line."""
        own = f"127.0.0.1:{self.flags[name][3]}"
        bootstrap = [address for address in self.bootstrap if address != own]
        daemon = await start_daemon(self.nursery, self.homes[name], bootstrap, self.flags[name])
        self.daemons[name] = daemon
        self.up[name].set()
        return daemon

    async def kill(self, name: str) -> None:
        """kill -9 *name*'s daemon (by its pid) and wait for it to die."""
        daemon = self.daemons[name]
        assert daemon is not None and daemon.running
        self.up[name] = trio.Event()
        await daemon.kill()

    async def stop(self, name: str) -> None:
        """Stop *name*'s daemon cleanly (SIGTERM), as a user going offline does."""
        daemon = self.daemons[name]
        if daemon is not None and daemon.running:
            self.up[name] = trio.Event()
            code = await daemon.stop()
            assert code == 0, f"{name}'s daemon exited with {code}:\n{daemon.log_tail()}"

    async def stop_all(self) -> None:
        """Stop every daemon still running (SIGTERM)."""
        for name in self.homes:
            await self.stop(name)

    async def held(self, name: str) -> int:
        """Mailbox entries *name* holds for others now (-1 if its daemon does not answer)."""
        try:
            with trio.fail_after(DEADLINE):
                async with await ControlClient.connect(self.homes[name] / "control.sock") as client:
                    return int((await client.request("status"))["mailbox_entries_held"])
        except (DaemonNotRunning, UserError, trio.BrokenResourceError):
            return -1

    def logs(self) -> str:
        """The end of each daemon's current log."""
        parts = []
        for name, daemon in self.daemons.items():
            if daemon is not None:
                parts.append(f"--- {name} ({daemon.log})\n{daemon.log_tail(15)}")
        return "\n".join(parts)


class TrialRun:
    """One trial: a stream of sends, one kill -9 and restart, bob away or not; then the checks."""

    def __init__(self, net: Network, rng: random.Random, index: int, token: str) -> None:
        self.net = net
        self.rng = rng
        self.index = index
        self.token = token
        self.messages: list[Message] = []
        self.streaming = True
        self.bob_online = rng.random() < 0.5
        self.role = rng.choice(ROLES)
        self.victim = rng.choice(net.dht_names) if self.role == "dht" else self.role
        self.count = rng.randint(2, MAX_MESSAGES)
        self.gaps = [rng.uniform(0, MAX_GAP) for _ in range(self.count)]
        self.bob_delay = 0.0 if self.bob_online else rng.uniform(*BOB_AWAY_AFTER_STREAM)
        if self.role == "dht" and not self.bob_online:
            # While bob is away, alice stores her messages on the DHT nodes: kill one of them then.
            self.kill_at = rng.uniform(0, sum(self.gaps) + self.bob_delay)
        else:
            self.kill_at = rng.uniform(0, sum(self.gaps) + self.bob_delay + KILL_WINDOW_AFTER)
        # Alice is sometimes killed with a send request in flight (after it was written, before the reply was
        # read): the message may or may not have been committed, and the user was never told.
        self.kill_on_send = (
            rng.randrange(self.count) if self.role == "alice" and rng.random() < MID_SEND_SHARE else None
        )
        self.mid_send_delay = rng.uniform(0, MID_SEND_DELAY)
        self.request_written = trio.Event()
        self.bob_kill_delay = rng.uniform(0, BOB_KILL_WINDOW)
        self.downtime = rng.uniform(0, MAX_DOWNTIME)
        self.phase = ""
        self.held = -1
        self.refused = 0

    async def run(self) -> Trial:
        """Run the trial; the caller settles and checks it."""
        if self.bob_online and not self.net.running("bob"):
            await self.net.start_one("bob")
        elif not self.bob_online:
            await self.net.stop("bob")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stream)
            nursery.start_soon(self._kill_and_restart)
        if not self.net.running("bob"):
            await self.net.start_one("bob")
        return Trial(
            index=self.index,
            role=self.role,
            victim=self.victim,
            phase=self.phase,
            bob_online=self.bob_online,
            kill_at=round(self.kill_at, 3),
            downtime=round(self.downtime, 3),
            held_at_kill=self.held,
            queued=sum(m.status == "queued" for m in self.messages),
            in_doubt=sum(m.status == "in doubt" for m in self.messages),
            refused=self.refused,
        )

    async def _stream(self) -> None:
        try:
            for i, gap in enumerate(self.gaps):
                await trio.sleep(gap)
                await self._send(f"trial {self.index} message {i} {self.token}", i == self.kill_on_send)
        finally:
            self.streaming = False
        if not self.bob_online:
            await trio.sleep(self.bob_delay)
            if not self.net.running("bob"):
                await self.net.start_one("bob")

    async def _send(self, text: str, signal_kill: bool) -> None:
        """Ask alice's daemon to send *text*, as ``p2pchat send`` does; wait for her if she is down."""
        home = self.net.homes["alice"]
        while True:
            try:
                client = await ControlClient.connect(home / "control.sock")
            except (DaemonNotRunning, UserError):
                # Nothing was asked: the user would see "no daemon" and try again once it is back.
                self.refused += 1
                with trio.fail_after(DEADLINE):
                    await self.net.up["alice"].wait()
                continue
            async with client:
                try:
                    with trio.fail_after(DEADLINE):
                        if signal_kill:
                            self.request_written.set()
                        reply = await client.request("send", to="bob", text=text)
                except (UserError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    # The request may or may not have been written before she died: the user was never told.
                    self.messages.append(Message(text, "in doubt"))
                    return
            self.messages.append(Message(text, "queued", reply["message"]["id"]))
            return

    async def _kill_and_restart(self) -> None:
        if self.kill_on_send is not None:
            with trio.fail_after(DEADLINE):
                await self.request_written.wait()
            await trio.sleep(self.mid_send_delay)
            self.phase = "sending, within 5 ms of a request"
        else:
            await trio.sleep(self.kill_at)
            if not self.net.running(self.victim):
                # Bob is away at this moment: kill him while he catches up once he is back.
                with trio.fail_after(DEADLINE):
                    await self.net.up[self.victim].wait()
                await trio.sleep(self.bob_kill_delay)
                self.phase = "fetching his mailbox and acknowledging"
            else:
                self.phase = self._phase_now()
            self.held = await self.net.held(self.victim)
        await self.net.kill(self.victim)
        await trio.sleep(self.downtime)
        await self.net.start_one(self.victim)

    def _phase_now(self) -> str:
        bob_up = self.net.running("bob")
        if self.role == "alice":
            return "sending" if self.streaming else "awaiting acknowledgements"
        if self.role == "bob":
            if not self.bob_online:
                return "fetching his mailbox and acknowledging"
            return "receiving directly" if self.streaming else "acknowledging"
        if not bob_up:
            return "bob away: storing his mail"
        return "bob online: serving lookups, fetches and deletes"


async def until_delivered(home: Path, ids: set[str], deadline: float) -> None:
    """Wait until alice's daemon shows every message in *ids* delivered."""
    pending = set(ids)
    with trio.fail_after(deadline):
        while pending:
            try:
                async with await ControlClient.connect(home / "control.sock") as client:
                    for message_id in sorted(pending):
                        view = (await client.request("message", message_id=message_id))["message"]
                        if view["state"] == "delivered":
                            pending.discard(message_id)
                        elif view["state"] == "failed":
                            raise AssertionError(f"message {message_id} failed: {view['reason']}")
            except (DaemonNotRunning, UserError):
                pass
            if pending:
                await trio.sleep(0.1)


async def _views(home: Path, *argv: str) -> list[dict[str, Any]]:
    result = await p2pchat(home, *argv, "--json", "--limit", "1000000")
    assert result.returncode == 0, output(result)
    views: list[dict[str, Any]] = json.loads(result.stdout)
    return views


def check_histories(
    sent: Sequence[Message], bob_inbox: list[dict[str, Any]], alice_history: list[dict[str, Any]]
) -> list[str]:
    """Every invariant over everything sent so far; a list of violations (empty: all hold)."""
    failures: list[str] = []
    bob_texts = collections.Counter(v["text"] for v in bob_inbox if v["from"] == "alice")
    alice_out = [v for v in alice_history if v["direction"] == "out"]
    alice_texts = collections.Counter(v["text"] for v in alice_out)
    states = {v["text"]: v["state"] for v in alice_out}
    attempted = {m.text for m in sent}
    for message in sent:
        in_bob, in_alice = bob_texts[message.text], alice_texts[message.text]
        if message.status == "queued":
            if in_bob != 1:
                failures.append(f"{'lost' if in_bob == 0 else 'duplicate'}: {message.text!r} x{in_bob} in bob's inbox")
            if in_alice != 1 or states.get(message.text) != "delivered":
                failures.append(f"{message.text!r} x{in_alice} in alice's history, state {states.get(message.text)}")
        elif in_alice > 1 or in_bob > 1 or in_bob != in_alice or (in_alice and states[message.text] != "delivered"):
            failures.append(
                f"in doubt {message.text!r}: x{in_alice} at alice ({states.get(message.text)}), x{in_bob} at bob"
            )
    for text in bob_texts:
        if text not in attempted:
            failures.append(f"bob shows {text!r}, which alice never sent")
    ids = [v["id"] for v in bob_inbox]
    if len(ids) != len(set(ids)):
        failures.append("bob's inbox shows one message id twice")
    order = {m.text: i for i, m in enumerate(sent)}
    for who, views in (("bob's inbox", [v for v in bob_inbox if v["from"] == "alice"]), ("alice's history", alice_out)):
        positions = [order[v["text"]] for v in views if v["text"] in order]
        if positions != sorted(positions):
            failures.append(f"{who} is out of order: {positions}")
    return failures


async def settle_and_check(net: Network, sent: list[Message], trial: Trial, deadline: float) -> None:
    """Wait for the trial's messages to be delivered, then check every invariant; violations go into *trial*."""
    start = time.monotonic()
    alice, bob = net.homes["alice"], net.homes["bob"]
    try:
        await until_delivered(alice, {m.message_id for m in sent if m.message_id and not m.delivered}, deadline)
        if any(m.status == "in doubt" and m.message_id is None for m in sent):
            # A message in doubt that alice did write down must be delivered like any other.
            known = {v["text"]: v["id"] for v in await _views(alice, "history", "bob")}
            for message in sent:
                if message.status == "in doubt" and message.message_id is None and message.text in known:
                    message.message_id = known[message.text]
                    trial.in_doubt_delivered += 1
            doubtful = {m.message_id for m in sent if m.message_id and not m.delivered}
            await until_delivered(alice, doubtful, max(1.0, deadline - (time.monotonic() - start)))
        for message in sent:
            message.delivered = message.message_id is not None
    except (trio.TooSlowError, AssertionError) as exc:
        trial.failures.append(f"not settled within {deadline:.0f} s: {exc or 'deadline'}")
    trial.settle_seconds = round(time.monotonic() - start, 2)
    trial.failures += check_histories(sent, await _views(bob, "inbox"), await _views(alice, "history", "bob"))


@dataclass
class Figures:
    """The campaign's totals."""

    seed: int
    trials: int = 0
    networks: int = 0
    kills: dict[str, int] = field(default_factory=dict)
    kills_by_phase: dict[str, int] = field(default_factory=dict)
    kills_holding_entries: int = 0
    bob_away_trials: int = 0
    messages_queued: int = 0
    messages_in_doubt: int = 0
    in_doubt_delivered: int = 0
    sends_refused_while_alice_down: int = 0
    lost: int = 0
    duplicates: int = 0
    other_violations: int = 0
    settle_median_seconds: float = 0.0
    settle_max_seconds: float = 0.0
    wall_seconds: float = 0.0
    stopped_by_time_limit: bool = False
    failures: list[str] = field(default_factory=list)

    def add(self, trial: Trial) -> None:
        """Count one trial."""
        self.trials += 1
        self.kills[trial.role] = self.kills.get(trial.role, 0) + 1
        key = f"{trial.role}: {trial.phase}"
        self.kills_by_phase[key] = self.kills_by_phase.get(key, 0) + 1
        self.kills_holding_entries += trial.held_at_kill > 0
        self.bob_away_trials += not trial.bob_online
        self.messages_queued += trial.queued
        self.messages_in_doubt += trial.in_doubt
        self.in_doubt_delivered += trial.in_doubt_delivered
        self.sends_refused_while_alice_down += trial.refused
        for failure in trial.failures:
            if failure.startswith("lost"):
                self.lost += 1
            elif failure.startswith("duplicate"):
                self.duplicates += 1
            else:
                self.other_violations += 1
            self.failures.append(f"trial {trial.index} ({trial.victim}, {trial.phase}): {failure}")


async def campaign(args: argparse.Namespace, base: Path, log: Any) -> Figures:
    """Run the trials; the figures."""
    rng = random.Random(args.seed)
    figures = Figures(seed=args.seed)
    settles: list[float] = []
    started = time.monotonic()
    index = 0
    while index < args.trials and not figures.failures:
        if time.monotonic() - started > args.time_limit:
            figures.stopped_by_time_limit = True
            break
        directory = base / f"network-{figures.networks}"
        directory.mkdir()
        figures.networks += 1
        sent: list[Message] = []
        async with trio.open_nursery() as nursery:
            net = Network(directory, nursery, rng, args.dht_nodes)
            await net.start()
            for _ in range(args.trials_per_network):
                if index >= args.trials or time.monotonic() - started > args.time_limit:
                    break
                run = TrialRun(net, rng, index, f"{rng.getrandbits(32):08x}")
                trial = await run.run()
                sent += run.messages
                await settle_and_check(net, sent, trial, args.settle_deadline)
                figures.add(trial)
                settles.append(trial.settle_seconds)
                index += 1
                print(
                    f"trial {trial.index:4d}  kill {trial.victim:<5} ({trial.phase}) at {trial.kill_at:5.2f}s"
                    f"  bob {'online' if trial.bob_online else 'away  '}  queued {trial.queued}"
                    f"  in doubt {trial.in_doubt}  settled in {trial.settle_seconds:6.2f}s"
                    f"  {'OK' if not trial.failures else 'FAILED: ' + '; '.join(trial.failures)}",
                    file=log,
                    flush=True,
                )
                if trial.failures:
                    print(net.logs(), file=log, flush=True)
                    break
            await net.stop_all()
        if not figures.failures and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    figures.settle_median_seconds = round(statistics.median(settles), 2) if settles else 0.0
    figures.settle_max_seconds = round(max(settles), 2) if settles else 0.0
    return figures


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100, help="trials to run (default 100)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    parser.add_argument("--dht-nodes", type=int, default=4, help="DHT-only daemons besides alice and bob (default 4)")
    parser.add_argument("--trials-per-network", type=int, default=20, help="trials before a fresh network (default 20)")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds before no new trial starts")
    parser.add_argument("--settle-deadline", type=float, default=SETTLE_DEADLINE, help="seconds a trial may settle")
    parser.add_argument("--json", metavar="FILE", help="also write the figures and every trial there")
    parser.add_argument("--keep", action="store_true", help="keep the homes and logs (a failing run always does)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the campaign; exit status 0 if every invariant held."""
    args = _parser().parse_args(argv)
    if not 1 <= args.trials <= MAX_TRIALS or not 1 <= args.dht_nodes <= 16 or args.trials_per_network < 1:
        print(f"--trials must be 1..{MAX_TRIALS}, --dht-nodes 1..16, --trials-per-network >= 1", file=sys.stderr)
        return 2
    # Every daemon this campaign starts may reach loopback only.
    os.environ[ALLOW_ENV_VAR] = "127.0.0.0/8,::1/128"
    base = Path(tempfile.mkdtemp(prefix="p2pchat-crash-"))
    wall = time.monotonic()
    try:
        figures = trio.run(campaign, args, base, sys.stderr)
    except BaseException:
        print(f"the campaign stopped with an error; homes and logs kept in {base}", file=sys.stderr)
        raise
    figures.wall_seconds = round(time.monotonic() - wall, 1)
    summary = asdict(figures)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if figures.failures or args.keep:
        print(f"homes and logs kept in {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if figures.failures else 0


if __name__ == "__main__":
    sys.exit(main())
