"""``run`` (the daemon), ``status`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from typing import Any, TextIO

import trio

from p2pchat.cli.contacts import open_db
from p2pchat.cli.passphrases import unlock
from p2pchat.cli.session import node_options
from p2pchat.control.client import ControlClient, DaemonNotRunning
from p2pchat.daemon import run_daemon
from p2pchat.errors import UserError
from p2pchat.home import Home

__all__ = ["cmd_demo", "cmd_run", "cmd_status"]

JsonDict = dict[str, Any]


def cmd_run(args: argparse.Namespace, home: Home, out: TextIO) -> int:
    """Run the daemon in the foreground."""
    options = node_options(args)
    # Check the lock before asking for a passphrase: a second daemon should fail at once.
    home.require()
    home.lock().release()
    identity = unlock(home, args.passphrase_file)
    return trio.run(run_daemon, home, identity, home.profile().name, options, out)


async def _daemon_status(home: Home) -> JsonDict | None:
    try:
        client = await ControlClient.connect(home.control_socket)
    except DaemonNotRunning:
        return None
    async with client:
        reply = await client.request("status")
    reply.pop("id", None)
    reply.pop("ok", None)
    return reply


def cmd_status(args: argparse.Namespace, home: Home, out: TextIO) -> int:
    """The daemon's counts, or what can be known without one."""
    profile = home.profile()
    view = trio.run(_daemon_status, home)
    if view is None:
        with open_db(home) as db:
            view = {
                "running": False,
                "address": profile.address,
                "node_id": profile.public.node_id.hex(),
                "outbox": len(db.open_outgoing()),
            }
    with open_db(home) as db:
        view["contacts"] = len(db.contacts())
    if args.json:
        print(json.dumps(view), file=out)
        return 0
    if not view["running"]:
        print(f"no daemon is running on {home.path} (start one with `p2pchat run`)", file=out)
        print(f"address       {view['address']}", file=out)
        print(f"outbox        {view['outbox']} messages waiting", file=out)
        print(f"contacts      {view['contacts']}", file=out)
        return 0
    lines = [
        ("address", view["address"]),
        ("ports", f"udp {view['udp_port']}, tcp {view['tcp_port']}"),
        ("peers known", view["peers_known"]),
        ("DHT contacts", view["dht_contacts"]),
        ("LAN peers", view["lan_peers"] if view["lan"] else "LAN discovery off"),
        ("mailbox", f"{view['mailbox_entries_held']} entries held for others"),
        ("outbox", f"{view['outbox']} messages waiting"),
        ("contacts", view["contacts"]),
    ]
    for label, value in lines:
        print(f"{label:<14}{value}", file=out)
    return 0


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``p2pchat.demo.run_demo`` (imported only when asked for: it is the one command that needs it)."""
    try:
        module = importlib.import_module("p2pchat.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "p2pchat.demo":
            raise
        raise UserError("the demo is not part of this installation of p2pchat") from None
    run_demo: Callable[[int, TextIO], int] = module.run_demo
    return run_demo(args.nodes, out)
