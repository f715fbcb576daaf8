"""A stock ``kademlia`` node for the interop test, run in its own process: join, set and/or get, report, exit.

Usage: ``python tests/kademlia_peer.py --bootstrap HOST:PORT [--set JSON_OBJECT] [--get JSON_LIST]``

It prints one JSON object per line on stdout, each with an ``event``:

* ``ready``: listening and bootstrapped -- ``node_id`` (hex), ``port``, ``neighbors`` (how many the bootstrap
  crawl found);
* ``set``: one per key of ``--set`` -- ``key``, ``ok`` (what ``Server.set`` returned);
* ``got``: one per key of ``--get`` -- ``key``, ``value`` (JSON; None if not found), ``type`` (its type name);
* ``done``: everything was done; the process exits right after.

It only ever talks to loopback: it listens on 127.0.0.1, and every datagram it sends goes through a guard that
refuses any other destination (the stock node sends to whatever addresses its peers name, so this is where the
test suite's loopback-only rule is enforced for it).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import sys
from typing import Any

from kademlia.network import Server
from kademlia.protocol import KademliaProtocol

LISTEN_HOST = "127.0.0.1"


class NonLoopbackDestinationError(RuntimeError):
    """The stock node tried to send somewhere other than loopback."""


class _LoopbackOnlyTransport:
    """Wraps the datagram transport rpcudp sends through; refuses every non-loopback destination."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise NonLoopbackDestinationError(f"refusing to send to {address[0]}")
        self._inner.sendto(data, address)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class LoopbackOnlyProtocol(KademliaProtocol):  # type: ignore[misc]  # kademlia has no type hints
    """The stock protocol, unchanged except that its transport can only reach loopback."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's UDP transport is not a DatagramTransport subclass, so no isinstance check here.
        super().connection_made(_LoopbackOnlyTransport(transport))


class LoopbackOnlyServer(Server):  # type: ignore[misc]
    """A stock ``kademlia.network.Server`` using :class:`LoopbackOnlyProtocol`."""

    protocol_class = LoopbackOnlyProtocol


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _bootstrap_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"bootstrap address {text} is not on loopback")
    return host, int(port)


async def _main(args: argparse.Namespace) -> None:
    server = LoopbackOnlyServer()
    await server.listen(0, interface=LISTEN_HOST)
    try:
        port = server.transport.get_extra_info("sockname")[1]
        found = await server.bootstrap([_bootstrap_address(args.bootstrap)])
        _emit(event="ready", node_id=server.node.id.hex(), port=port, neighbors=len(found))
        for key, value in json.loads(args.set).items():
            _emit(event="set", key=key, ok=bool(await server.set(key, value)))
        for key in json.loads(args.get):
            value = await server.get(key)
            shown = value.hex() if isinstance(value, bytes) else value
            _emit(event="got", key=key, value=shown, type=type(value).__name__)
        _emit(event="done")
    finally:
        server.stop()


def main() -> None:
    """Parse the command line and run the stock node until its work is done."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True, help="HOST:PORT of a node to join through (loopback only)")
    parser.add_argument("--set", default="{}", help="JSON object of key: value pairs to set")
    parser.add_argument("--get", default="[]", help="JSON list of keys to get")
    args = parser.parse_args()
    # The stock package logs every missing reply at WARNING; stderr goes to a file the test shows on failure.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
