"""``send``, ``inbox`` and ``history``.

``inbox`` and ``history`` read the home's database directly (a daemon need not run).  ``send`` goes through a
session (:mod:`p2pchat.cli.session`) and waits, up to :data:`SEND_WAIT`, for the message to leave: delivered
directly, or stored in the recipient's DHT mailbox.  Either way it was on disk before anything was tried, so a
message that could go nowhere stays queued and the command says so.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Final, TextIO

import trio

from p2pchat.cli.contacts import open_db, resolve_peer
from p2pchat.cli.session import Session, open_session
from p2pchat.home import Home
from p2pchat.messaging.db import MessageRow
from p2pchat.views import message_view

__all__ = ["ACK_GRACE", "SEND_WAIT", "cmd_history", "cmd_inbox", "cmd_send", "describe_state", "format_message"]

SEND_WAIT: Final = 30.0
"""Seconds ``send`` waits for its message to be sent directly or stored in a mailbox (a lookup of the peer's
record, a connect timeout and a mailbox store, on a slow network)."""

ACK_GRACE: Final = 5.0
"""Seconds ``send`` then waits for the recipient's receipt when the message went directly."""

JsonDict = dict[str, Any]


def describe_state(view: JsonDict, *, local: bool) -> str:
    """One line: the message's state and what it means."""
    state, peer = view["state"], view["to"]
    if state == "delivered":
        return f"delivered: {peer} has it"
    if state == "sent":
        return f"sent: directly to {peer}'s node; the receipt comes back when their node confirms"
    if state == "stored":
        return f"stored: in {peer}'s DHT mailbox on {view['replicas']} nodes; {peer} gets it on coming online"
    if state == "failed":
        return f"failed: {view['reason'] or 'not delivered in time'}"
    if local:
        return (
            f"queued: neither {peer}'s node nor the DHT could be reached; it stays queued and goes out the next time "
            "a node runs on this home (`p2pchat run`)"
        )
    return "queued: the daemon keeps trying to deliver it"


def format_message(view: JsonDict) -> str:
    """One line for a listing: time, who, text, and an outgoing message's state."""
    when = view["sent_at"][:19].replace("T", " ")
    if view["direction"] == "out":
        return f"{when}  you -> {view['to']}: {view['text']}  [{view['state']}]"
    return f"{when}  {view['from']}: {view['text']}"


async def _wait_for_state(session: Session, view: JsonDict) -> JsonDict:
    with trio.move_on_after(SEND_WAIT):
        while view["state"] == "queued":
            view = await _next_update(session, view)
    if view["state"] == "sent":
        with trio.move_on_after(ACK_GRACE):
            while view["state"] == "sent":
                view = await _next_update(session, view)
    return view


async def _next_update(session: Session, view: JsonDict) -> JsonDict:
    while True:
        event = await session.next_event()
        if event.get("event") == "delivery" and event["message"]["id"] == view["id"]:
            message: JsonDict = event["message"]
            return message


async def _send(home: Home, args: argparse.Namespace, out: TextIO) -> int:
    async with open_session(home, args) as session:
        view = await session.send(args.name, args.text)
        if not args.no_wait and session.joined:
            view = await _wait_for_state(session, view)
        print(describe_state(view, local=session.local), file=out)
        return 1 if view["state"] == "failed" else 0


def cmd_send(args: argparse.Namespace, home: Home, out: TextIO) -> int:
    """Send one message."""
    # Check the recipient before anything starts, so a typo costs nothing.
    with open_db(home) as db:
        resolve_peer(db, args.name)
    return trio.run(_send, home, args, out)


def _views(home: Home, rows: list[MessageRow]) -> list[JsonDict]:
    profile = home.profile()
    with open_db(home) as db:
        return [message_view(row, db, profile.public, profile.name) for row in rows]


def _print(views: list[JsonDict], as_json: bool, empty: str, out: TextIO) -> None:
    if as_json:
        print(json.dumps(views), file=out)
    elif not views:
        print(empty, file=out)
    else:
        for view in views:
            print(format_message(view), file=out)


def cmd_inbox(args: argparse.Namespace, home: Home, out: TextIO) -> int:
    """Messages received, oldest first (the newest ``--limit``)."""
    with open_db(home) as db:
        rows = db.recent(None, args.limit, incoming_only=True)
    _print(_views(home, rows), args.json, "no messages yet", out)
    return 0


def cmd_history(args: argparse.Namespace, home: Home, out: TextIO) -> int:
    """The conversation with one contact, oldest first (the newest ``--limit``)."""
    with open_db(home) as db:
        rows = db.recent(resolve_peer(db, args.name), args.limit)
    _print(_views(home, rows), args.json, f"no messages with {args.name} yet", out)
    return 0
