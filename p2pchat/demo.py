"""``p2pchat demo``: a small network on 127.0.0.1 that shows direct and offline delivery end to end.

It needs no set-up.  It starts ``nodes`` real nodes on loopback sockets -- two users, alice and bob, and DHT nodes
that hold mail for others -- each with its own home in one temporary directory, and prints a transcript:

1. alice sends bob a message over a direct channel; bob's receipt comes back;
2. bob's node stops (its sockets close, its databases are closed);
3. alice sends again: the message is sealed to bob's mailbox -- the pairwise one for alice's mail, since she has
   heard from him -- and stored on the DHT nodes closest to the mailbox key, and the transcript names them (it
   looks into every node's store);
4. bob's node starts again from its home directory -- the key file and databases it left on disk -- fetches its
   mailbox, takes the message and deletes the entries;
5. bob's receipt reaches alice: delivered.

Every wait has a deadline; a step that does not happen in time ends the demo with a line saying which, and a
non-zero exit code.  Nothing leaves loopback: the network's allow-list holds 127.0.0.0/8 only, and LAN discovery
(mDNS) is off.

All nodes share one IP address, so the DHT runs with :meth:`~p2pchat.dht.node.DhtConfig.single_host` (per-source
quota raised to the total, per-source rate limit off), and with ``k`` = :data:`DEMO_K`, so that in a network of
eight one can see that only the nodes closest to a mailbox hold it (with the default k of 20, every node would).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

import trio

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.pairwise import inbound_mailbox
from p2pchat.core.records import mailbox_key
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.dht.store import Space, SqliteBackend, Store
from p2pchat.env import Env
from p2pchat.errors import ConnectError, P2PChatError
from p2pchat.keyfile import load_identity, save_identity
from p2pchat.messaging.db import MessageRow, MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.net.base import Address
from p2pchat.net.real import RealNetwork
from p2pchat.node import DHT_DB_NAME, Node

__all__ = [
    "DEFAULT_NODES",
    "DEMO_DEADLINE",
    "DEMO_K",
    "MAX_NODES",
    "MIN_NODES",
    "STEP_DEADLINE",
    "DemoError",
    "check_nodes",
    "main",
    "run_demo",
]

DEFAULT_NODES: Final = 8
"""Nodes in the demo network: alice, bob and six DHT nodes."""

MIN_NODES: Final = 4
"""Alice, bob and two DHT nodes.  With a single DHT node, bob's mail would have one holder besides alice's own
node while he is away, and the demo would not show it replicated."""

MAX_NODES: Final = 64
"""Most nodes the demo starts: each is a real node with its own sockets and databases.  Larger networks belong in
``simulations/``, which runs thousands of nodes on a simulated network."""

DEMO_K: Final = 4
"""Replication factor (Kademlia's k) in the demo network; see the module docstring."""

STEP_DEADLINE: Final = 20.0
"""Seconds one step may take (each normally takes well under one; a direct send that went out just as the peer
left waits up to ~12 s for the receipt before it falls back to the mailbox)."""

DEMO_DEADLINE: Final = 50.0
"""Seconds the whole demo may take, so that it finishes within a minute even on a loaded machine."""

CHANNEL_CLOSE_POLL: Final = 0.01
"""Seconds between checks that alice's node has noticed bob's channel close."""

LOOPBACK: Final = "127.0.0.1"
LOOPBACK_NETWORK: Final = "127.0.0.0/8"
IDENTITY_FILE: Final = "identity.key"
"""Where each user's key file lives in the user's home (the demo's own layout)."""

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

_MAX_NAMES_LISTED: Final = 6
"""Nodes named one by one in a line of the transcript; beyond this they are counted."""

_FIRST_TEXT: Final = "Hi Bob! Are you there?"
_SECOND_TEXT: Final = "Sent while you were away: see you at 8?"


class DemoError(P2PChatError):
    """A step of the demo did not happen as it should."""


def check_nodes(nodes: int) -> str | None:
    """Why *nodes* cannot be used (one line), or ``None`` if it can."""
    if nodes < MIN_NODES:
        return (
            f"--nodes must be at least {MIN_NODES} (alice, bob and at least {MIN_NODES - 2} DHT nodes to hold bob's "
            f"mail while he is away), got {nodes}"
        )
    if nodes > MAX_NODES:
        return (
            f"--nodes must be at most {MAX_NODES} (every node is real, with its own sockets and databases; "
            f"use simulations/ for large networks), got {nodes}"
        )
    return None


def run_demo(nodes: int = DEFAULT_NODES, out: TextIO = sys.stdout) -> int:
    """Run the demo with *nodes* nodes, print its transcript to *out*, and return the process exit code.

    0: every step happened.  1: a step failed or timed out (the transcript says which).  2: *nodes* is out of
    range (one line on stderr).  130: interrupted.  All state lives in a temporary directory, removed at the end.
    """
    problem = check_nodes(nodes)
    if problem is not None:
        print(f"p2pchat demo: {problem}", file=sys.stderr)
        return EXIT_USAGE
    with tempfile.TemporaryDirectory(prefix="p2pchat-demo-") as tmp:
        transcript = _Transcript(out)
        try:
            trio.run(_Demo(Path(tmp), nodes, transcript).run)
        except BaseException as exc:  # every way out is reported; the exit code says which
            # Errors leave trio's nurseries wrapped in exception groups: report what is inside.
            leaves = _leaves(exc)
            if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
                transcript.line("interrupted")
                return EXIT_INTERRUPTED
            if not all(isinstance(leaf, Exception) for leaf in leaves):
                raise
            for leaf in leaves:
                if isinstance(leaf, DemoError):
                    transcript.failure(str(leaf))
                elif isinstance(leaf, P2PChatError | OSError):
                    transcript.failure(f"{transcript.step}: {type(leaf).__name__}: {leaf}")
                else:  # a bug: say where
                    transcript.failure(f"{transcript.step}: unexpected {type(leaf).__name__}: {leaf}")
                    traceback.print_exception(leaf, file=sys.stderr)
            return EXIT_FAILED
    transcript.line(f"the demo's temporary directory {tmp} is removed.")
    return EXIT_OK


class _Transcript:
    """Lines stamped with seconds since the demo began; continuation lines are indented under the text."""

    _STAMP_WIDTH: Final = 9

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.start: float | None = None
        self.step = "starting"

    def _stamp(self) -> str:
        if self.start is None:
            return " " * self._STAMP_WIDTH
        try:
            elapsed = trio.current_time() - self.start
        except RuntimeError:  # outside trio.run: the demo is over
            return " " * self._STAMP_WIDTH
        return f"[{elapsed:5.2f}s] "

    def line(self, text: str) -> None:
        """One stamped line."""
        print(f"{self._stamp()}{text}", file=self.out, flush=True)

    def more(self, text: str) -> None:
        """A continuation line, indented under the previous one."""
        print(f"{' ' * self._STAMP_WIDTH}  {text}", file=self.out, flush=True)

    def heading(self, text: str) -> None:
        """A blank line and a step heading."""
        print(f"\n{' ' * self._STAMP_WIDTH}== {text}", file=self.out, flush=True)

    def failure(self, text: str) -> None:
        """The failure line, in the transcript and on stderr (where it is seen even with stdout redirected)."""
        self.line(f"FAILED: {text}")
        print(f"p2pchat demo: failed: {text}", file=sys.stderr, flush=True)


@dataclass
class _Running:
    """A node running in its own cancel scope, so it can be stopped alone."""

    scope: trio.CancelScope
    done: trio.Event

    async def stop(self) -> None:
        """Cancel the node and wait until it has closed its sockets and databases."""
        self.scope.cancel()
        await self.done.wait()


async def _start(nursery: trio.Nursery, run: Callable[..., Awaitable[None]]) -> _Running:
    """Start ``run`` (a node's ``run`` method) in *nursery* inside a scope of its own."""
    running = _Running(trio.CancelScope(), trio.Event())

    async def life(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with running.scope:
                await run(task_status=task_status)
        finally:
            running.done.set()

    await nursery.start(life)
    return running


class _Watcher:
    """Reads one user's node events, prints them, and lets the script wait for a particular one."""

    def __init__(self, name: str, node: Node, demo: _Demo) -> None:
        self.name = name
        self.node = node
        self.demo = demo
        self.events: list[IncomingMessage | DeliveryUpdate] = []
        self._changed = trio.Event()

    async def run(self) -> None:
        """Consume the node's events until cancelled."""
        async for event in self.node.events:
            self.events.append(event)
            self._describe(event)
            self._changed.set()
            self._changed = trio.Event()

    def _describe(self, event: IncomingMessage | DeliveryUpdate) -> None:
        say = self.demo.say
        if isinstance(event, IncomingMessage):
            row = event.message
            sender = self.demo.name_of(row.peer)
            say.line(f'{self.name} received {self.demo.label(row.id)} from {sender}: "{row.text}"')
            return
        peer = self.demo.name_of(event.peer)
        label = self.demo.label(event.message_id)
        if event.state is MessageState.SENT:
            say.line(f"{self.name}: {label} sent to {peer} over a direct channel; waiting for the receipt")
        elif event.state is MessageState.STORED:
            say.line(f"{self.name}: {label} stored in {peer}'s mailbox: {event.replicas} replicas confirmed")
        elif event.state is MessageState.DELIVERED:
            say.line(f"{self.name}: {label} delivered ({peer}'s receipt arrived)")
        else:
            say.line(f"{self.name}: {label} is now {event.state}" + (f" ({event.reason})" if event.reason else ""))

    async def wait_for(self, predicate: Callable[[IncomingMessage | DeliveryUpdate], bool]) -> None:
        """Return once an event matching *predicate* has arrived (or had arrived already)."""
        seen = 0
        while True:
            if any(predicate(e) for e in self.events[seen:]):
                return
            seen = len(self.events)
            await self._changed.wait()


class _Demo:
    """The demo script: one instance per run."""

    def __init__(self, tmp: Path, nodes: int, say: _Transcript) -> None:
        self.tmp = tmp
        self.node_count = nodes
        self.say = say
        self.config = DhtConfig.single_host(k=DEMO_K)
        self.network = RealNetwork([LOOPBACK_NETWORK])
        self.names: dict[bytes, str] = {}
        """Demo names by identity key."""
        self.stores: dict[str, Store] = {}
        """Every live node's store, by name: what the transcript looks into."""
        self._dht_stores: list[Store] = []
        self._labels: dict[bytes, str] = {}

    def label(self, message_id: bytes) -> str:
        """How the transcript calls a message ("message 1"), by its id."""
        return self._labels.get(message_id, f"message {message_id.hex()[:8]}")

    def send(self, sender: Node, peer: str, text: str) -> MessageRow:
        """Queue a message, label it, and say so."""
        row = sender.send(peer, text)
        self._labels[row.id] = f"message {len(self._labels) + 1}"
        self.say.line(f'{self.name_of(sender.key)} sends {peer} {self.label(row.id)}: "{text}"')
        return row

    def name_of(self, key: bytes) -> str:
        """The demo name of an identity key (or a short prefix of the key)."""
        return self.names.get(key, key.hex()[:8])

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """A step with a deadline; if it runs out, the demo fails naming *what* did not happen."""
        self.say.step = what
        try:
            with trio.fail_after(STEP_DEADLINE):
                yield
        except trio.TooSlowError:
            raise DemoError(f"{what}: did not happen within {STEP_DEADLINE:g} s") from None

    def env(self) -> Env:
        """A real environment whose network reaches loopback only."""
        return Env.real(self.network)

    # --- the script ----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run every step (all within :data:`DEMO_DEADLINE`), then stop every node."""
        self.say.start = trio.current_time()
        dht_count = self.node_count - 2
        self.say.line(f"p2pchat demo: {self.node_count} nodes on {LOOPBACK}: alice, bob and {dht_count} DHT nodes")
        self.say.more(f"a mailbox is kept by the k={DEMO_K} nodes closest to its key (and by the sender's own")
        self.say.more("node when it is one of them); LAN discovery is off")
        self.say.more(f"state in {self.tmp} (removed at the end)")
        try:
            with trio.fail_after(DEMO_DEADLINE):
                async with trio.open_nursery() as nursery:
                    await self._script(nursery, dht_count)
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            raise DemoError(f"{self.say.step}: the demo ran out of its {DEMO_DEADLINE:g} s") from None
        finally:
            for store in self._dht_stores:
                store.close()

    async def _script(self, nursery: trio.Nursery, dht_count: int) -> None:
        self.say.heading("the network")
        bootstrap = await self._start_dht(nursery, dht_count)
        with self.step("alice and bob join"):
            alice, _, alice_watch = await self._user(nursery, "alice", bootstrap, new=True)
            bob, bob_running, bob_watch = await self._user(nursery, "bob", bootstrap, new=True)
        alice.add_contact("bob", bob.address)
        bob.add_contact("alice", alice.address)
        self.say.line("alice and bob add each other as contacts (addresses swapped out of band)")

        self.say.heading("1. a direct message")
        first = await self._send(alice, alice_watch, bob_watch, _FIRST_TEXT, "reaches bob directly")
        direct = alice.messenger.stats.sent_direct
        self.say.more(f"one encrypted channel alice<->bob; no DHT node saw it ({_count(direct, 'direct send')})")

        self.say.heading("2. bob goes offline")
        # Alice has heard from bob (his receipt), so her mail goes to his pairwise mailbox for her.
        bob_mailbox = mailbox_key(inbound_mailbox(bob.identity, alice.identity.public.key).public.key)
        await self._stop_bob(alice, bob, bob_running)

        self.say.heading("3. a message while bob is away")
        with self.step("alice's second message is stored in bob's mailbox on the DHT"):
            second = self.send(alice, "bob", _SECOND_TEXT)
            await alice_watch.wait_for(_in_state(second.id, MessageState.STORED))
        self._show_holders(bob_mailbox)

        self.say.heading("4. bob comes back")
        with self.step("bob's node restarts from its home directory"):
            bob, bob_running, bob_watch = await self._user(nursery, "bob", bootstrap, new=False)
        self.say.more("new ports: the peer record his node just published says where to reach him now")
        with self.step("bob fetches his mailbox and receives alice's message"):
            taken = await bob.messenger.fetch_mailbox()
            self.say.line(f"bob's node fetched his mailbox: {taken} {'entry' if taken == 1 else 'entries'} taken")
            await bob_watch.wait_for(_received(second.id))
        self._show_leftovers(bob_mailbox)

        self.say.heading("5. the receipt")
        with self.step("bob's receipt for the second message reaches alice"):
            await alice_watch.wait_for(_in_state(second.id, MessageState.DELIVERED))
        self._check_histories(alice, bob, [first.id, second.id])
        self.say.heading("done")
        self.say.line("both messages delivered: one directly, one through bob's mailbox while he was offline")

    async def _start_dht(self, nursery: trio.Nursery, count: int) -> list[Address]:
        """Start *count* DHT-only nodes, each joining through the first; returns the first one's address."""
        first: Address | None = None
        with self.step(f"{count} DHT nodes start and join"):
            for index in range(1, count + 1):
                name = f"node-{index}"
                home = self.tmp / name
                home.mkdir()
                env = self.env()
                identity = Identity.generate(env.random_bytes)
                self.names[identity.public.key] = name
                store = Store(
                    identity.public.node_id,
                    self.config.store_limits,
                    SqliteBackend(home / DHT_DB_NAME),
                    now=env.wall_time(),
                )
                self._dht_stores.append(store)
                node = DhtNode(env, identity, host=LOOPBACK, config=self.config, store=store)
                await _start(nursery, node.run)
                if first is None:
                    first = node.address
                elif not await node.bootstrap([first]):
                    raise DemoError(f"{name} could not reach node-1 at {first}")
                self.stores[name] = store
                role = "  (everyone joins through it)" if index == 1 else ""
                self.say.line(f"{name:7} id {_short_id(identity.public.node_id)}  udp {node.address}{role}")
        assert first is not None
        return [first]

    async def _user(
        self, nursery: trio.Nursery, name: str, bootstrap: list[Address], *, new: bool
    ) -> tuple[Node, _Running, _Watcher]:
        """Start a user's node in ``tmp/name``: a new identity, or (``new=False``) what an earlier run left there."""
        home = self.tmp / name
        env = self.env()
        key_file = home / IDENTITY_FILE
        if new:
            identity = Identity.generate(env.random_bytes)
            save_identity(key_file, identity)
        else:
            identity = load_identity(key_file)
        self.names[identity.public.key] = name
        node = Node(env, identity, host=LOOPBACK, home=home, dht_config=self.config)
        if not new:
            contacts = [c.name for c in node.db.contacts() if c.name]
            self.say.line(
                f"{name}'s node starts again from {home.name}/ on disk: key file, "
                f"{_count(len(contacts), 'contact')}, {_count(len(node.history()), 'message')} in history"
            )
        running = await _start(nursery, node.run)
        watcher = _Watcher(name, node, self)
        nursery.start_soon(watcher.run)
        if not await node.bootstrap(bootstrap):
            raise DemoError(f"{name}'s node could not reach node-1 at {bootstrap[0]}")
        self.stores[name] = node.store
        self.say.line(
            f"{name:7} id {_short_id(identity.public.node_id)}  udp {node.dht.address}"
            f"  tcp port {node.messenger.tcp_address.port}  address {_short_address(node.address)}"
        )
        return node, running, watcher

    async def _send(self, sender: Node, sender_watch: _Watcher, to_watch: _Watcher, text: str, how: str) -> MessageRow:
        """Send *text* and wait until the recipient has it and the sender has the receipt."""
        with self.step(f"alice's message {how}, and bob's receipt comes back"):
            row = self.send(sender, "bob", text)
            await to_watch.wait_for(_received(row.id))
            await sender_watch.wait_for(_in_state(row.id, MessageState.DELIVERED))
        return row

    async def _stop_bob(self, alice: Node, bob: Node, running: _Running) -> None:
        """Stop bob's node, check that its port is closed, and wait until alice's node has noticed."""
        old_tcp = bob.messenger.tcp_address
        with self.step("bob's node stops"):
            await running.stop()
            del self.stores["bob"]
        self.say.line("bob's node stops: sockets closed, databases closed")
        with self.step("bob's old tcp port refuses connections"):
            try:
                stream = await self.network.connect(old_tcp)
            except ConnectError:
                self.say.more(f"(his old tcp port {old_tcp.port} refuses connections now)")
            else:
                await stream.aclose()
                raise DemoError(f"bob's node stopped, yet its tcp port {old_tcp.port} still accepts connections")
        # Until alice's node reads the end of the channel it would still send on it (the first write to a closed
        # connection succeeds), and the message would wait out the receipt timeout before going to the mailbox.
        with self.step("alice's node notices that its channel to bob closed"):
            while alice.messenger.has_channel(bob.key):
                await trio.sleep(CHANNEL_CLOSE_POLL)
        self.say.line("alice's node sees its channel to bob close")

    def _show_holders(self, mailbox: NodeId) -> None:
        """Print which live nodes hold entries under *mailbox*, ranked by XOR distance to it."""
        self.say.more(f"bob's mailbox for alice's mail has key {_short_id(mailbox)}: the hash of the public half of")
        self.say.more("a key pair derived from a secret only alice and bob share, so no one else can compute it")
        self.say.more("(mail from strangers goes to his public mailbox).  The nodes closest to it (XOR distance)")
        self.say.more("store the sealed entry:")
        ranked = sorted(self.stores.items(), key=lambda item: item[1].own_id.distance(mailbox))
        holders: list[str] = []
        for rank, (name, store) in enumerate(ranked, 1):
            entries = [i for i in store.items_for(Space.ENTRY, mailbox) if i.space is Space.ENTRY]
            if entries:
                holders.append(name)
                held = ", ".join(f"entry {i.item_id.hex()[:8]} ({len(i.blob)} bytes)" for i in entries)
                self.say.more(f"  #{rank} closest: {name:7} id {_short_id(store.own_id)}  holds {held}")
        if not holders:
            raise DemoError("alice's node reported the message stored, yet no live node holds bob's mailbox")
        others = sorted((name for name, _ in ranked if name not in holders), key=_natural)
        if not others:
            self.say.more("every live node is among the closest, so every one holds it")
        elif len(others) <= _MAX_NAMES_LISTED:
            self.say.more(f"the others hold nothing for bob: {', '.join(others)}")
        else:
            self.say.more(f"the other {len(others)} nodes hold nothing for bob")
        self.say.more("the entry is sealed to bob's mailbox key: holders can't read it or tell who sent it")

    def _show_leftovers(self, mailbox: NodeId) -> None:
        """After bob's fetch: which nodes still hold an entry for him (his tombstone went to the k closest)."""
        self.say.more("his node deletes what it took with a tombstone signed by his mailbox key")
        still = sorted((name for name, store in self.stores.items() if store.entry_count(mailbox)), key=_natural)
        if not still:
            self.say.more("no node holds an entry for bob any more")
            return
        verb = "holds" if len(still) == 1 else "hold"
        self.say.more(f"{', '.join(still)} still {verb} a copy, beyond the k={DEMO_K} closest his tombstone went to;")
        self.say.more("met again it is known as taken, and it expires with the entry")

    def _check_histories(self, alice: Node, bob: Node, ids: list[bytes]) -> None:
        """Both sides' histories, from their databases: every message delivered, and received once."""
        sent = [(r.id, r.state) for r in alice.history("bob") if r.outgoing]
        if sent != [(i, MessageState.DELIVERED) for i in ids]:
            states = ", ".join(str(state) for _, state in sent)
            raise DemoError(f"alice's history should hold {len(ids)} delivered messages to bob, not: {states}")
        received = [r.id for r in bob.history("alice") if not r.outgoing]
        if received != ids:
            raise DemoError(f"bob's history should hold alice's {len(ids)} messages once each, in order")


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or *exc* itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _received(message_id: bytes) -> Callable[[IncomingMessage | DeliveryUpdate], bool]:
    def matches(event: IncomingMessage | DeliveryUpdate) -> bool:
        return isinstance(event, IncomingMessage) and event.message.id == message_id

    return matches


def _in_state(message_id: bytes, state: MessageState) -> Callable[[IncomingMessage | DeliveryUpdate], bool]:
    def matches(event: IncomingMessage | DeliveryUpdate) -> bool:
        return isinstance(event, DeliveryUpdate) and event.message_id == message_id and event.state is state

    return matches


def _natural(name: str) -> tuple[str, int]:
    """Sort key putting node-2 before node-10."""
    stem, _, number = name.rpartition("-")
    return (stem, int(number)) if number.isdigit() else (name, 0)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _short_id(node_id: NodeId) -> str:
    return node_id.hex()[:8]


def _short_address(address: str) -> str:
    return f"{address[:10]}...{address[-4:]}"


def main(argv: list[str] | None = None) -> int:
    """``python -m p2pchat.demo [--nodes N]``."""
    parser = argparse.ArgumentParser(
        prog="p2pchat demo",
        description="Start a small p2pchat network on 127.0.0.1 and show direct and offline delivery.",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=DEFAULT_NODES,
        help=f"nodes in the network, alice and bob included ({MIN_NODES}..{MAX_NODES}, default {DEFAULT_NODES})",
    )
    args = parser.parse_args(argv)
    return run_demo(args.nodes, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
