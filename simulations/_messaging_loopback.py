"""The loopback half of :mod:`simulations.bench_messaging`: three ways to move 200-byte messages on 127.0.0.1.

All three run in this process, one after another, on real TCP sockets through :class:`~p2pchat.net.real.RealNetwork`
(allow-list: loopback only), with the sending and the receiving side in the same trio run -- so both share one
CPU, as two processes on a two-core machine would not: the figures compare the three paths, they are not a
deployment's.

* :func:`raw_rate`: each message is ``msgpack([seq, text])`` in one length-prefixed stream frame
  (:func:`~p2pchat.core.framing.encode_frame`), one ``send_all`` per frame; the receiver splits the stream with a
  :class:`~p2pchat.core.framing.FrameDecoder` and unpacks each frame.
* :func:`channel_rate`: the same msgpack frames through an established direct channel
  (:func:`~p2pchat.messaging.channel.open_channel`: handshake done before the clock starts; each frame sealed
  with XChaCha20-Poly1305 and counter nonce), ``Channel.send`` / ``Channel.receive``.
* :func:`end_to_end_rate`: ``Node.send`` on one Node to ``IncomingMessage`` on the other, with everything a
  message costs there: the outbox commit, the Double Ratchet, the direct channel, the receiver's commit (session
  step, history row, ack owed), the acknowledgement back and the sender's commits of its state.  The Nodes keep
  their SQLite files in a temporary directory (WAL, ``synchronous=NORMAL``: a commit survives kill -9) and share a
  small DHT of :class:`~p2pchat.dht.node.DhtNode` on 127.0.0.1, run with ``DhtConfig.single_host()`` (per-source
  quota and rate limit off, since every node has the same IP).  A warm-up message, sent and acknowledged before
  the clock starts, establishes the session and the channel.

Each rate is messages received divided by the wall time from the first send to the last message received.
"""

from __future__ import annotations

import cProfile
import math
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import trio

from p2pchat.core.framing import FrameDecoder, encode_frame, unpack_strict
from p2pchat.core.identity import Identity
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.env import Env
from p2pchat.messaging.channel import Channel, open_channel
from p2pchat.messaging.db import MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.net.base import Listener, Stream
from p2pchat.node import Node

__all__ = [
    "ALLOWED_NETWORKS",
    "DHT_NODES",
    "LOOPBACK",
    "MESSAGE_BYTES",
    "channel_rate",
    "end_to_end_rate",
    "info",
    "message_text",
    "raw_rate",
]

ALLOWED_NETWORKS = "127.0.0.0/8,::1/128"
"""What the benchmark's RealNetworks may reach: loopback only."""

LOOPBACK = "127.0.0.1"

MESSAGE_BYTES = 200
"""Bytes of text in each message."""

DHT_NODES = 4
"""DhtNodes (besides the two Nodes' own) in the end-to-end run: enough for records and a mailbox to live on."""

SETUP_TIMEOUT = 60.0
"""Wall seconds the set-up of a run (connections, handshake, DHT, warm-up) may take."""

_RECEIVE_CHUNK = 65536


def info(message: str) -> None:
    """A line of progress or information, on stderr."""
    print(f"[bench_messaging] {message}", file=sys.stderr, flush=True)


def message_text(seq: int) -> str:
    """The 200-byte text of message *seq* (distinct per message, so a mix-up would show)."""
    head = f"message {seq} "
    return head + "x" * (MESSAGE_BYTES - len(head))


def _payload(seq: int) -> bytes:
    packed: bytes = msgpack.packb([seq, message_text(seq)])
    return packed


def _frame(seq: int) -> bytes:
    return encode_frame(_payload(seq))


def _check(seq: int, payload: bytes) -> None:
    value = unpack_strict(payload)
    if value != [seq, message_text(seq)]:
        raise AssertionError(f"message {seq} arrived as {value!r}")


async def _connected_pair(env: Env) -> tuple[Listener, Stream, Stream]:
    listener = await env.network.open_listener(LOOPBACK, 0)
    async with trio.open_nursery() as nursery:
        accepted: list[Stream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await env.network.connect(listener.local_address)
    return listener, client, accepted[0]


async def _timed(send: Callable[[], Awaitable[None]], receive: Callable[[], Awaitable[None]]) -> float:
    """Wall seconds from the start of *send* until *receive* has returned (both run concurrently)."""
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await send()
    return time.perf_counter() - started


async def raw_rate(messages: int) -> float:
    """Messages per second as plain length-prefixed msgpack frames over one TCP connection."""
    env = Env.real()
    with trio.fail_after(SETUP_TIMEOUT):
        listener, client, server = await _connected_pair(env)

    async def send() -> None:
        for seq in range(messages):
            await client.send_all(_frame(seq))

    async def receive() -> None:
        decoder = FrameDecoder()
        seq = 0
        while seq < messages:
            data = await server.receive_some(_RECEIVE_CHUNK)
            if not data:
                raise AssertionError("the connection ended early")
            decoder.feed(data)
            for frame in decoder.frames():
                _check(seq, frame)
                seq += 1

    elapsed = await _timed(send, receive)
    for resource in (client, server, listener):
        await resource.aclose()
    return messages / elapsed


async def channel_rate(messages: int) -> float:
    """Messages per second through an established direct channel (handshake before the clock starts)."""
    env = Env.real()
    alice, bob = Identity.generate(env.random_bytes), Identity.generate(env.random_bytes)
    with trio.fail_after(SETUP_TIMEOUT):
        listener, client, server = await _connected_pair(env)
        channels: dict[str, Channel] = {}

        async def respond() -> None:
            channels["bob"] = await open_channel(server, bob, env.random_bytes, initiator=False)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(respond)
            channels["alice"] = await open_channel(
                client, alice, env.random_bytes, initiator=True, expected_peer=bob.public.key
            )
    sender, receiver = channels["alice"], channels["bob"]

    async def send() -> None:
        for seq in range(messages):
            await sender.send(_payload(seq))

    async def receive() -> None:
        # The way the messenger reads a channel: one loop for the channel's life (see Channel.receive_each).
        received = 0

        def take(payload: bytes) -> None:
            nonlocal received
            _check(received, payload)
            received += 1
            if received == messages:
                scope.cancel()

        with trio.CancelScope() as scope:
            await receiver.receive_each(take)
        if received != messages:
            raise AssertionError(f"the channel closed after {received} of {messages} messages")

    elapsed = await _timed(send, receive)
    for resource in (sender, receiver, listener):
        await resource.aclose()
    return messages / elapsed


async def _drained(
    events: trio.MemoryReceiveChannel[IncomingMessage | DeliveryUpdate],
) -> AsyncIterator[IncomingMessage | DeliveryUpdate]:
    """Every event, taking all that are queued at each wake-up.

    Each ``receive()`` of a memory channel is a checkpoint, so a reader taking one event per wake-up falls behind a
    messenger that emits many per scheduling round, and the messenger's bounded queue drops the excess (by
    design: it never blocks on a slow reader).
    """
    while True:
        yield await events.receive()
        while True:
            try:
                yield events.receive_nowait()
            except trio.WouldBlock:
                break


async def _event(node: Node, predicate: Callable[[IncomingMessage | DeliveryUpdate], bool]) -> None:
    while True:
        if predicate(await node.events.receive()):
            return


async def end_to_end_rate(messages: int, *, timeout: float, profile: cProfile.Profile | None = None) -> float:
    """Messages per second from ``Node.send`` to the other Node's ``IncomingMessage``, durable commits included.

    If not every message has arrived within *timeout* wall seconds, the rate is of those that did (said on
    stderr).  With *profile*, the profiler runs from the first send to the last message received.
    """
    config = DhtConfig.single_host()
    with tempfile.TemporaryDirectory(prefix="p2pchat-bench-") as home:
        return await _end_to_end(Path(home), config, messages, timeout, profile)


async def _end_to_end(
    home: Path, config: DhtConfig, messages: int, timeout: float, profile: cProfile.Profile | None
) -> float:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(SETUP_TIMEOUT):
            dht: list[DhtNode] = []
            for _ in range(DHT_NODES):
                env = Env.real()
                node = DhtNode(env, Identity.generate(env.random_bytes), host=LOOPBACK, config=config)
                await nursery.start(node.run)
                if dht:
                    await node.bootstrap([dht[-1].address])
                dht.append(node)
            users: list[Node] = []
            for name in ("alice", "bob"):
                env = Env.real()
                user = Node(
                    env, Identity.generate(env.random_bytes), host=LOOPBACK, home=home / name, dht_config=config
                )
                await nursery.start(user.run)
                if await user.bootstrap([dht[len(users)].address]) != 1:
                    raise AssertionError(f"{name} could not join the DHT")
                users.append(user)
            alice, bob = users
            alice.add_contact("bob", bob.address)
            bob.add_contact("alice", alice.address)
            warm_up = alice.send("bob", message_text(-1))
            await _event(bob, lambda e: isinstance(e, IncomingMessage))
            await _event(
                alice,
                lambda e: (
                    isinstance(e, DeliveryUpdate) and e.message_id == warm_up.id and e.state is MessageState.DELIVERED
                ),
            )
        info(
            f"end to end: {DHT_NODES} DhtNodes and 2 Nodes on {LOOPBACK} (DhtConfig.single_host()), SQLite files in "
            f"{home}; warm-up message delivered and acknowledged (direct: {alice.messenger.stats.sent_direct})"
        )

        received = 0
        acked = 0
        all_received = trio.Event()
        all_acked = trio.Event()
        last_received = math.nan
        last_acked = math.nan

        async def bob_reads() -> None:
            nonlocal received, last_received
            async for event in _drained(bob.events):
                if isinstance(event, IncomingMessage):
                    if event.message.text != message_text(received):
                        raise AssertionError(f"message {received} arrived as {event.message.text[:20]!r}...")
                    received += 1
                    if received == messages:
                        last_received = time.perf_counter()
                        all_received.set()

        async def alice_reads() -> None:
            nonlocal acked, last_acked
            async for event in _drained(alice.events):
                if isinstance(event, DeliveryUpdate) and event.state is MessageState.DELIVERED:
                    acked += 1
                    if acked == messages:
                        last_acked = time.perf_counter()
                        all_acked.set()

        nursery.start_soon(bob_reads)
        nursery.start_soon(alice_reads)
        if profile is not None:
            profile.enable()
        cpu_started = time.process_time()
        started = time.perf_counter()
        # A checkpoint after each send, as a front end gives the delivery task a chance to run between user
        # actions; without it every message would be committed before the first one left.
        for seq in range(messages):
            alice.send("bob", message_text(seq))
            await trio.lowlevel.checkpoint()
        queued = time.perf_counter() - started
        with trio.move_on_after(max(0.0, timeout - queued)):
            await all_received.wait()
        if profile is not None:
            profile.disable()
        cpu = time.process_time() - cpu_started
        end = last_received if received == messages else time.perf_counter()
        elapsed = end - started
        info(
            f"end to end: {messages:,} sends took {queued:.2f}s; {received:,} received after {elapsed:.2f}s "
            f"({cpu:.2f}s CPU: {received / max(cpu, 1e-9):,.0f} messages per CPU second)"
            + ("" if received == messages else f" (timeout of {timeout:g}s reached: the rate is of those received)")
        )
        with trio.move_on_after(max(1.0, timeout - (time.perf_counter() - started))):
            await all_acked.wait()
        if acked == messages:
            info(f"end to end: all {messages:,} acknowledged to the sender {last_acked - started:.2f}s after the first")
        else:
            info(f"end to end: {acked:,}/{messages:,} acknowledged to the sender by the deadline")
        stats_a, stats_b = alice.messenger.stats, bob.messenger.stats
        info(
            f"end to end: alice sent_direct={stats_a.sent_direct:,} stored_in_mailbox={stats_a.stored_in_mailbox} "
            f"dropped_events={stats_a.dropped_events}; bob received={stats_b.received:,} "
            f"duplicates={stats_b.duplicates:,} dropped_events={stats_b.dropped_events}"
        )
        nursery.cancel_scope.cancel()
    return received / elapsed
