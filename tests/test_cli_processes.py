"""The ``p2pchat`` command as people use it: real processes on 127.0.0.1, one home each.

Two daemons chat (``send``, ``chat``, ``inbox``); a recipient whose daemon is stopped gets its mail from the DHT
mailbox when it starts again; a sender's daemon killed with SIGKILL right after ``send`` returned delivers the
message after a restart; ``send`` with no daemon runs a node of its own.  The DHT the mailboxes need is a handful
of in-test nodes on loopback.  Every daemon runs with ``--no-lan``, ``--host 127.0.0.1`` and port 0, and
bootstraps only from loopback (conftest.py confines every real socket to loopback, daemons included).

No fixed sleeps: each step waits for its event -- the ``ready`` line, a state seen on the control socket, a
line printed -- under a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pchat.control.client import ControlClient

from daemons import (
    DEADLINE,
    LOOPBACK_FLAGS,
    Lines,
    command,
    in_process_dht,
    joined,
    make_users,
    message_with,
    p2pchat,
    start_daemon,
    until,
)
from daemons import output as _text

pytestmark = pytest.mark.realnet

DHT_NODES = 6
"""In-test DHT nodes, so a mailbox has replicas besides the two users."""


@pytest.fixture
async def dht() -> AsyncIterator[list[str]]:
    """A few DHT nodes on loopback; yields their HOST:PORT."""
    async with in_process_dht(DHT_NODES) as addresses:
        yield addresses


@pytest.fixture
async def users(tmp_path: Path) -> dict[str, Any]:
    """Homes for alice and bob, each the other's contact."""
    return await make_users(tmp_path)


# --- the tests ----------------------------------------------------------------------------------------------------


async def test_two_daemons_chat(dht: list[str], users: dict[str, Any]) -> None:
    alice, bob = users["alice"], users["bob"]
    async with trio.open_nursery() as nursery:
        alice_daemon = await start_daemon(nursery, alice, dht[:1])
        bob_daemon = await start_daemon(nursery, bob, dht[1:2])
        await joined(alice)
        await joined(bob)

        # send through the daemon: delivered directly.
        result = await p2pchat(alice, "send", "bob", "hello bob")
        assert result.returncode == 0, _text(result)
        assert result.stdout.decode().split(":")[0] in ("sent", "delivered")
        await message_with(bob, "alice", "hello bob")
        await message_with(alice, "bob", "hello bob", "delivered")
        inbox = json.loads((await p2pchat(bob, "inbox", "--json")).stdout)
        assert [(m["from"], m["to"], m["text"], m["state"]) for m in inbox] == [
            ("alice", "bob", "hello bob", "delivered")
        ]

        # chat: a typed line goes out, an incoming message and the state changes show up as they happen.
        chat = await trio.lowlevel.open_process(
            command(bob, "chat", "alice"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert chat.stdin is not None and chat.stdout is not None
        lines = Lines(chat.stdout)
        await lines.until(lambda text: text.startswith("chatting with alice"))
        assert any("alice: hello bob" in seen for seen in lines.seen)  # the conversation so far
        await chat.stdin.send_all(b"hi alice, typed in a chat\n")
        await lines.until(lambda text: "delivered" in text and "hi alice, typed" in text)
        await message_with(alice, "bob", "hi alice, typed in a chat")
        result = await p2pchat(alice, "send", "bob", "and back to the chat window")
        assert result.returncode == 0, _text(result)
        await lines.until(lambda text: "alice: and back to the chat window" in text)
        await chat.stdin.aclose()  # Ctrl-D
        with trio.fail_after(DEADLINE):
            assert await chat.wait() == 0

        # status through the control socket.
        status = json.loads((await p2pchat(alice, "status", "--json")).stdout)
        assert status["running"] is True and status["udp_port"] == alice_daemon.udp
        assert status["dht_contacts"] >= 1 and status["peers_known"] >= status["dht_contacts"]
        assert status["lan_peers"] == 0 and status["outbox"] == 0 and status["contacts"] == 1

        # One daemon per home; a port in use; both one line and exit 1.
        result = await p2pchat(alice, "run", *LOOPBACK_FLAGS)
        assert result.returncode == 1 and result.stderr.decode().count("\n") == 1
        assert "already running a node on" in result.stderr.decode()
        carol = users["alice"].parent / "carol"
        assert (await p2pchat(carol, "init")).returncode == 0
        result = await p2pchat(carol, "run", "--host", "127.0.0.1", "--no-lan", "--udp-port", str(bob_daemon.udp))
        assert result.returncode == 1 and result.stderr.decode().count("\n") == 1
        assert f"UDP port {bob_daemon.udp} on 127.0.0.1 is already in use" in result.stderr.decode()

        # A clean stop: exit 0, the socket gone, the bootstrap file kept for next time.
        assert await alice_daemon.stop() == 0
        assert not (alice / "control.sock").exists()
        assert (alice / "bootstrap").read_text().strip()
        assert await bob_daemon.stop(signal.SIGINT) == 0


async def test_daemons_find_each_other_on_the_lan(users: dict[str, Any]) -> None:
    # No bootstrap at all: mDNS, bound to 127.0.0.1 only, is how the two nodes meet.
    lan = ["--host", "127.0.0.1", "--udp-port", "0", "--tcp-port", "0", "--lan-interface", "127.0.0.1"]
    alice, bob = users["alice"], users["bob"]
    async with trio.open_nursery() as nursery:
        for home in (alice, bob):
            await start_daemon(nursery, home, [], lan)
        for home in (alice, bob):

            async def lan_peer(client: ControlClient) -> bool:
                status = await client.request("status")
                return bool(status["lan"] and status["lan_peers"] == 1)

            await until(home, lan_peer, "a LAN peer found")
        result = await p2pchat(alice, "send", "bob", "found you on the LAN")
        assert result.returncode == 0, _text(result)
        await message_with(alice, "bob", "found you on the LAN", "delivered")
        nursery.cancel_scope.cancel()


async def test_mail_waits_in_the_dht_while_the_recipient_is_away(dht: list[str], users: dict[str, Any]) -> None:
    alice, bob = users["alice"], users["bob"]
    async with trio.open_nursery() as nursery:
        await start_daemon(nursery, alice, dht[:1])
        bob_daemon = await start_daemon(nursery, bob, dht[2:3])
        await joined(alice)
        await joined(bob)
        assert (await p2pchat(alice, "send", "bob", "before you left")).returncode == 0
        await message_with(bob, "alice", "before you left")
        assert await bob_daemon.stop() == 0

        result = await p2pchat(alice, "send", "bob", "while you were away")
        assert result.returncode == 0, _text(result)
        assert result.stdout.decode().startswith("stored: in bob's DHT mailbox on"), _text(result)
        stored = await message_with(alice, "bob", "while you were away", "stored")
        assert stored["replicas"] >= 3

        await start_daemon(nursery, bob, [])  # bootstraps from the addresses its last run saved
        await message_with(bob, "alice", "while you were away")
        await message_with(alice, "bob", "while you were away", "delivered")
        nursery.cancel_scope.cancel()


async def test_a_message_survives_kill_9_of_the_sender_right_after_send(dht: list[str], users: dict[str, Any]) -> None:
    alice, bob = users["alice"], users["bob"]
    async with trio.open_nursery() as nursery:
        alice_daemon = await start_daemon(nursery, alice, dht[:1])
        await start_daemon(nursery, bob, dht[3:4])
        await joined(alice)
        await joined(bob)
        result = await p2pchat(alice, "send", "--no-wait", "bob", "written before the crash")
        assert result.returncode == 0, _text(result)
        assert result.stdout.decode().startswith("queued"), _text(result)
        assert await alice_daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        assert (alice / "control.sock").exists()  # left behind by the crash; the next daemon replaces it

        await start_daemon(nursery, alice, [])
        await message_with(bob, "alice", "written before the crash")
        await message_with(alice, "bob", "written before the crash", "delivered")
        texts = [m["text"] for m in json.loads((await p2pchat(bob, "inbox", "--json")).stdout)]
        assert texts.count("written before the crash") == 1
        nursery.cancel_scope.cancel()


async def test_send_without_a_daemon(dht: list[str], users: dict[str, Any]) -> None:
    alice, bob = users["alice"], users["bob"]
    # Nobody to reach: the message stays queued, and the command says so (exit 0: it is safe on disk).
    result = await p2pchat(alice, "send", *LOOPBACK_FLAGS, "bob", "queued for later")
    assert result.returncode == 0, _text(result)
    assert result.stdout.decode().startswith("queued: neither bob's node nor the DHT could be reached")
    status = json.loads((await p2pchat(alice, "status", "--json")).stdout)
    assert status["running"] is False and status["outbox"] == 1

    async with trio.open_nursery() as nursery:
        await start_daemon(nursery, bob, dht[:1])
        await joined(bob)
        # A node of its own for this command: it joins, sends directly (bob is online), and stops.
        result = await p2pchat(alice, "send", *LOOPBACK_FLAGS, "--bootstrap", dht[4], "bob", "from a one-shot node")
        assert result.returncode == 0, _text(result)
        assert result.stdout.decode().split(":")[0] in ("sent", "delivered"), _text(result)
        await message_with(bob, "alice", "from a one-shot node")
        # The message queued earlier went too: a node running on the home retries its whole outbox.
        await message_with(bob, "alice", "queued for later")
        assert not (alice / "control.sock").exists()
        nursery.cancel_scope.cancel()
    assert os.path.exists(alice / "daemon.lock")
