"""kill -9 of real daemons at the moments that matter: nothing acknowledged is lost, nothing is shown twice.

A handful of the trials of the crash campaign (``tests/crash_campaign.py``, which runs hundreds at random moments),
here at chosen moments so that what each step checks is certain.  One network of ``p2pchat run`` daemons on
127.0.0.1 -- three DHT-only nodes, alice and bob, each on its own home and one fixed port kept across restarts:

1. bob is killed the moment a message he received directly is on his disk: after his restart the
   acknowledgement he owed still reaches alice;
2. alice is killed the moment bob has her message, while his acknowledgement may be on its way to her;
3. a DHT node holding bob's mailbox entries for him (bob away) is killed: after its restart it holds every one;
4. bob, back, is killed the moment the first entry from his mailbox is on his disk (the rest and the deletes
   not yet done);
5. then two seeded campaign trials (random victim and moment) on the same network.

After each step everything must settle (alice shows every message whose ``send`` returned delivered); at the
end, through ``p2pchat inbox --json`` and ``p2pchat history --json``, each is shown exactly once on both sides, in
order.  Every wait is for an
event (a ready line, a state or a count seen on a control socket) under a deadline; no fixed sleeps.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from p2pchat.control.client import ControlClient

from crash_campaign import Message, Network, TrialRun, check_histories, settle_and_check, until_delivered
from daemons import message_with, output, p2pchat, request, until

pytestmark = pytest.mark.realnet

DHT_NODES = 3
"""DHT-only daemons besides alice and bob."""

SETTLE = 60.0
"""Seconds everything may take to settle after a step (a step normally settles in about a second)."""

CAMPAIGN_TRIALS = 2
"""Seeded campaign trials run after the chosen moments."""

SEED = 8
"""Seed of the network's ports and of the campaign trials at the end."""


async def _send(net: Network, text: str) -> Message:
    """Alice sends *text* to bob through her daemon (what ``p2pchat send --no-wait`` does): queued."""
    reply = await request(net.homes["alice"], "send", to="bob", text=text)
    assert reply["message"]["state"] in ("queued", "sent", "stored", "delivered")
    return Message(text, "queued", reply["message"]["id"])


async def _held(net: Network, name: str, at_least: int) -> int:
    """Wait until *name* holds at least *at_least* mailbox entries for others; how many."""

    async def check(client: ControlClient) -> int:
        held = int((await client.request("status"))["mailbox_entries_held"])
        return held if held >= at_least else 0

    return await until(net.homes[name], check, f"{name} to hold {at_least} mailbox entries", SETTLE)


async def _settled(net: Network, sent: Sequence[Message], step: str) -> None:
    """Wait until alice shows every message sent so far delivered (the histories are checked at the end)."""
    pending = {m.message_id for m in sent if m.message_id and not m.delivered}
    try:
        await until_delivered(net.homes["alice"], pending, SETTLE)
    except trio.TooSlowError:
        raise AssertionError(f"{step}: not delivered within {SETTLE:.0f} s\n{net.logs()}") from None
    for message in sent:
        message.delivered = True


async def _ids(net: Network, sent: Sequence[Message]) -> None:
    """Fill in the ids of messages sent with the command line (it prints the state, not the id)."""
    history = (await request(net.homes["alice"], "history", peer="bob"))["messages"]
    known = {view["text"]: view["id"] for view in history}
    for message in sent:
        message.message_id = message.message_id or known[message.text]


async def test_kill_9_at_the_moments_that_matter_loses_nothing_and_shows_nothing_twice(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    sent: list[Message] = []
    async with trio.open_nursery() as nursery:
        net = Network(tmp_path, nursery, rng, DHT_NODES)
        await net.start()
        alice, bob = net.homes["alice"], net.homes["bob"]

        # 1. Bob dies right after taking a message directly; he owes the acknowledgement and sends it on restart.
        sent.append(await _send(net, "1: taken, then bob dies"))
        await message_with(bob, "alice", sent[-1].text)
        await net.kill("bob")
        await net.start_one("bob")
        await _settled(net, sent, "bob killed after taking a direct message")

        # 2. Alice dies right after bob took her message: his acknowledgement finds her gone, or arrived just before.
        sent.append(await _send(net, "2: taken, then alice dies"))
        await message_with(bob, "alice", sent[-1].text)
        await net.kill("alice")
        await net.start_one("alice")
        await _settled(net, sent, "alice killed while the acknowledgement travels")

        # 3. Bob away: alice's messages go to his mailbox; a DHT node holding them is killed and restarted.
        await net.stop("bob")
        result = await p2pchat(alice, "send", "bob", "3: stored for bob")  # the command waits until it is stored
        assert result.returncode == 0 and result.stdout.decode().startswith("stored:"), output(result)
        sent.append(Message("3: stored for bob", "queued"))
        sent += [await _send(net, "4: stored for bob"), await _send(net, "5: stored for bob")]
        victim = net.dht_names[0]
        held = await _held(net, victim, 3)
        await net.kill(victim)
        await net.start_one(victim)
        # Asked as soon as it is back (its store is reloaded from disk before it is ready): everything it had
        # acknowledged storing survived kill -9.  Entries only come, never go, while bob is away.
        assert await net.held(victim) >= held

        # 4. Bob comes back and is killed as soon as the first entry of his mailbox is on his disk.
        await net.start_one("bob")
        await message_with(bob, "alice", "3: stored for bob")
        await net.kill("bob")
        await net.start_one("bob")
        await _ids(net, sent)
        await _settled(net, sent, "bob killed while fetching his mailbox")

        # 5. A few campaign trials: a random victim at a random moment, the same checks.
        for index in range(CAMPAIGN_TRIALS):
            run = TrialRun(net, rng, index, f"suite{SEED}")
            trial = await run.run()
            sent += run.messages
            await settle_and_check(net, sent, trial, SETTLE)
            assert not trial.failures, f"campaign trial {trial}: {trial.failures}\n{net.logs()}"

        # What the user sees: every message once, delivered, in order.
        bob_inbox = await p2pchat(bob, "inbox", "--json", "--limit", "1000")
        alice_history = await p2pchat(alice, "history", "bob", "--json", "--limit", "1000")
        assert check_histories(sent, json.loads(bob_inbox.stdout), json.loads(alice_history.stdout)) == []
        assert len(json.loads(bob_inbox.stdout)) == len([m for m in sent if m.message_id])
        await net.stop_all()
