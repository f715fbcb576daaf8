"""``chat NAME``: the conversation so far, then each line typed is sent; incoming messages and every change of a
sent message's state are printed as they happen.  End with Ctrl-D (or ``/quit``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final, TextIO

import trio

from p2pchat.cli.contacts import open_db, resolve_peer
from p2pchat.cli.messages import format_message
from p2pchat.cli.session import Session, open_session
from p2pchat.core.identity import PublicIdentity
from p2pchat.errors import UserError
from p2pchat.home import Home

__all__ = ["HISTORY_SHOWN", "cmd_chat"]

HISTORY_SHOWN: Final = 10
"""Messages of the conversation shown when a chat opens."""

JsonDict = dict[str, Any]


def _state_line(view: JsonDict) -> str:
    extra = f" on {view['replicas']} nodes" if view["state"] == "stored" else ""
    reason = f" ({view['reason']})" if view["state"] == "failed" and view["reason"] else ""
    return f"  [{view['id'][:8]}] {view['state']}{extra}{reason}: {view['text'][:40]}"


async def _show_events(session: Session, peer_address: str, out: TextIO) -> None:
    while True:
        event = await session.next_event()
        view = event.get("message", {})
        if peer_address not in (view.get("from_address"), view.get("to_address")):
            continue
        if event["event"] == "message":
            print(format_message(view), file=out, flush=True)
        elif event["event"] == "delivery":
            print(_state_line(view), file=out, flush=True)


async def _read_lines(session: Session, peer: str, source: TextIO, out: TextIO) -> None:
    while True:
        line = await trio.to_thread.run_sync(source.readline, abandon_on_cancel=True)
        if not line:
            return
        text = line.rstrip("\n")
        if text.strip() == "/quit":
            return
        if not text.strip():
            continue
        try:
            view = await session.send(peer, text)
        except UserError as exc:
            print(f"not sent: {exc}", file=out, flush=True)
            continue
        print(_state_line(view), file=out, flush=True)


async def _chat(home: Home, args: argparse.Namespace, peer_address: str, out: TextIO) -> int:
    async with open_session(home, args) as session:
        for view in await session.history(args.name, HISTORY_SHOWN):
            print(format_message(view), file=out)
        where = "through the daemon" if not session.local else "on a node run by this command"
        print(f"chatting with {args.name} {where}; type a line and Enter to send, Ctrl-D to leave", file=out)
        out.flush()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_show_events, session, peer_address, out)
            await _read_lines(session, args.name, sys.stdin, out)
            nursery.cancel_scope.cancel()
    return 0


def cmd_chat(args: argparse.Namespace, home: Home, out: TextIO) -> int:
    """Chat with one contact interactively."""
    with open_db(home) as db:
        peer_address = PublicIdentity(resolve_peer(db, args.name)).address
    return trio.run(_chat, home, args, peer_address, out)
