"""Stock ``kademlia`` nodes use a p2pchat DHT as their network: real sockets, 127.0.0.1 only.

Five p2pchat DhtNodes run in this process.  A stock node (``tests/kademlia_peer.py``, its own process) joins
through one of them and sets some keys; it exits; a second stock node, with empty storage, joins through another
p2pchat node and gets them (and one nobody set).  The values can only have travelled through the p2pchat nodes:
they never list a stock node in their routing tables (checked at the end), so they never tell B about A.

Real sockets mean real time, so every wait is for an event (a line from the subprocess) under a deadline; nothing
sleeps.  The conftest confines RealNetwork to loopback, and the peer script refuses any other destination.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import trio

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.dht.node import DhtNode
from p2pchat.env import Env
from p2pchat.net.base import Address

from line_reader import LineReader

pytestmark = pytest.mark.realnet

HOST = "127.0.0.1"
P2PCHAT_NODES = 5
DEADLINE = 30.0
"""Seconds for one stock-node step; each takes well under a second when all goes well (rpcudp waits 5 s for a
missing reply, so this allows a few)."""
PEER_SCRIPT = Path(__file__).with_name("kademlia_peer.py")

VALUES: dict[str, Any] = {"greeting": "hello from a stock kademlia node", "answer": 42, "ratio": 0.5, "flag": True}
"""What stock node A sets (JSON carries them to the peer script; bytes values are covered by test_compat)."""
MISSING = "nobody set this"


class StockNode:
    """A running ``tests/kademlia_peer.py`` process and the events it has reported."""

    def __init__(self, process: trio.Process, stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        assert process.stdout is not None
        self._lines = LineReader(process.stdout, "stock node")
        self.events: list[dict[str, Any]] = []

    async def next_event(self) -> dict[str, Any]:
        """The next JSON event line, waiting at most DEADLINE seconds for it."""
        try:
            with trio.fail_after(DEADLINE):
                line = await self._lines.line()
        except (trio.TooSlowError, AssertionError) as exc:
            raise AssertionError(f"{exc!r}; stock node stderr:\n{self.stderr()}") from exc
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    async def run_to_completion(self) -> list[dict[str, Any]]:
        """Every event up to and including ``done``, then the process's clean exit."""
        while (await self.next_event())["event"] != "done":
            pass
        with trio.fail_after(DEADLINE):
            code = await self.process.wait()
        assert code == 0, f"stock node exited with {code}; stderr:\n{self.stderr()}"
        return self.events

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]


@asynccontextmanager
async def stock_node(tmp_path: Path, name: str, bootstrap: Address, args: Sequence[str]) -> AsyncIterator[StockNode]:
    """Start the peer script; kill it on the way out, whatever happened."""
    stderr_path = tmp_path / f"{name}.stderr"
    command = [sys.executable, str(PEER_SCRIPT), "--bootstrap", f"{bootstrap.host}:{bootstrap.port}", *args]
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        yield StockNode(process, stderr_path)
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        assert process.stdout is not None
        await process.stdout.aclose()


def _events(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in events if event["event"] == kind]


async def test_stock_nodes_store_and_find_values_through_p2pchat_nodes(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        nodes: list[DhtNode] = []
        for _ in range(P2PCHAT_NODES):
            node = DhtNode(Env.real(), Identity.generate(), host=HOST, port=0)
            await nursery.start(node.run)
            if nodes:
                with trio.fail_after(DEADLINE):
                    assert await node.bootstrap([n.address for n in nodes]) == len(nodes)
            nodes.append(node)
        for node in nodes:
            assert len(node.routing) == P2PCHAT_NODES - 1

        async with stock_node(tmp_path, "A", nodes[0].address, ["--set", json.dumps(VALUES)]) as a:
            a_events = await a.run_to_completion()
        (a_ready,) = _events(a_events, "ready")
        assert a_ready["neighbors"] == P2PCHAT_NODES  # the bootstrap crawl found every p2pchat node
        assert _events(a_events, "set") == [{"event": "set", "key": key, "ok": True} for key in VALUES]

        # A has exited: from here the values exist only on the p2pchat nodes, under kademlia's key digest (sha1) --
        # on every node, since A stores on its k=20 closest and there are five.
        for key, value in VALUES.items():
            digest = hashlib.sha1(key.encode()).digest()  # kademlia.utils.digest(key)
            held = [node.compat_get(digest, node.wall_time()) for node in nodes]
            assert held == [msgpack.packb(value)] * P2PCHAT_NODES

        async with stock_node(tmp_path, "B", nodes[-1].address, ["--get", json.dumps([*VALUES, MISSING])]) as b:
            b_events = await b.run_to_completion()
        assert _events(b_events, "got") == [
            *(
                {"event": "got", "key": key, "value": value, "type": type(value).__name__}
                for key, value in VALUES.items()
            ),
            {"event": "got", "key": MISSING, "value": None, "type": "NoneType"},
        ]

        # Served, and never listed: no stock node's id or address is in any p2pchat routing table.
        readies = [_events(events, "ready")[0] for events in (a_events, b_events)]
        stock_ids = {NodeId(bytes.fromhex(ready["node_id"])) for ready in readies}
        stock_addresses = {Address(HOST, ready["port"]) for ready in readies}
        for node in nodes:
            assert len(node.routing) == P2PCHAT_NODES - 1
            assert all(contact.node_id not in stock_ids for contact in node.routing)
            assert all(contact.address not in stock_addresses for contact in node.routing)
            assert node.transport.stats.dropped_malformed == 0
            assert node.compat is not None
            assert node.compat.stats.malformed == 0
            assert node.compat.stats.refused == 0
        assert sum(node.compat.stats.stores for node in nodes if node.compat) == len(VALUES) * P2PCHAT_NODES
        assert sum(node.compat.stats.values_found for node in nodes if node.compat) >= len(VALUES)
        nursery.cancel_scope.cancel()
