"""One p2pchat node for the network-namespace LAN test, run in its own process inside a namespace.

Usage: ``python tests/lan_netns_peer.py --ip IP --home DIR --name NAME``

It runs a :class:`~p2pchat.node.Node` on ``IP`` (its veth address) with LAN discovery on that address only and no
bootstrap.  When LAN discovery has verified another node, it sends that node ``"hello from NAME"``.  It prints one
JSON object per line on stdout, each with an ``event``:

* ``ready``: the node is running -- ``address`` (its p2pchat address), ``udp`` and ``tcp`` (``IP:PORT``);
* ``found``: LAN discovery verified a peer -- ``address`` (the peer's p2pchat address), ``udp`` (where it answered);
* ``received``: a message arrived -- ``text``, ``sender`` (the sender's p2pchat address);
* ``delivered``: our message reached the peer -- ``to`` (its p2pchat address).

It runs until its stdin closes (or it is killed).  Destinations are confined by ``P2PCHAT_ALLOW_NETWORKS``,
which the test sets to the namespaces' subnet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from p2pchat.core.identity import Identity, PublicIdentity
from p2pchat.env import Env
from p2pchat.messaging.db import MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.node import Node

POLL = 0.05
"""Seconds between looks at the LAN peer table (discovery has no event for a new peer)."""


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def _until_stdin_closes() -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    while await stdin.receive_some():
        pass


async def chat(node: Node, name: str) -> None:
    """Wait for a verified LAN peer, send it a message, and report what happens."""
    assert node.lan is not None
    while not node.lan.peers:
        await trio.sleep(POLL)
    peer = next(iter(node.lan.peers.values()))
    emit("found", address=peer.identity.address, udp=f"{peer.udp.host}:{peer.udp.port}")
    row = node.send(peer.identity.key, f"hello from {name}")
    async for event in node.events:
        if isinstance(event, IncomingMessage):
            emit("received", text=event.message.text, sender=PublicIdentity(event.message.peer).address)
        elif isinstance(event, DeliveryUpdate) and event.message_id == row.id and event.state is MessageState.DELIVERED:
            emit("delivered", to=peer.identity.address)


async def main(ip: str, home: Path, name: str) -> None:
    env = Env.real()
    node = Node(env, Identity.generate(env.random_bytes), host=ip, home=home, lan=True, lan_interfaces=[ip])
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        udp, tcp = node.dht.address, node.messenger.tcp_address
        emit("ready", address=node.address, udp=f"{udp.host}:{udp.port}", tcp=f"{tcp.host}:{tcp.port}")
        nursery.start_soon(chat, node, name)
        await _until_stdin_closes()
        nursery.cancel_scope.cancel()  # a clean shutdown: the mDNS goodbye, then the databases close


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ip", required=True, help="this node's (veth) IPv4 address")
    parser.add_argument("--home", required=True, type=Path, help="directory for the node's databases")
    parser.add_argument("--name", required=True, help="a name used in the message text")
    args = parser.parse_args()
    trio.run(main, args.ip, args.home, args.name)
