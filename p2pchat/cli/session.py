"""A session for ``send`` and ``chat``: the home's running daemon, or else a node run for the command's duration.

Both kinds answer the same calls in the same shapes (:mod:`p2pchat.views`), because the daemon serves the very
:class:`~p2pchat.service.ChatService` that a local session calls directly.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final, Protocol

import trio

from p2pchat.cli.passphrases import unlock
from p2pchat.control.client import ControlClient, DaemonNotRunning
from p2pchat.daemon import NodeOptions, bootstrap_addresses, check_host, default_host, keep_joined, running_node
from p2pchat.errors import UserError
from p2pchat.home import Home, parse_host_port
from p2pchat.lan.discovery import resolve_interfaces
from p2pchat.service import ChatService

__all__ = ["JOIN_WAIT", "DaemonSession", "LocalSession", "Session", "node_options", "open_session"]

JOIN_WAIT: Final = 15.0
"""Seconds a node started for one command waits to join (a bootstrap node or LAN peer answering) before it
goes on alone, leaving its messages queued."""

JsonDict = dict[str, Any]


class Session(Protocol):
    """What ``send`` and ``chat`` need."""

    @property
    def local(self) -> bool:
        """True for a node run by this command (it stops when the command ends)."""
        ...

    @property
    def joined(self) -> bool:
        """Whether the node knows someone (a local node that joined nobody can deliver nothing)."""
        ...

    async def send(self, to: str, text: str) -> JsonDict:
        """Queue a message; its view."""
        ...

    async def history(self, peer: str, limit: int) -> list[JsonDict]:
        """The newest *limit* messages with *peer*."""
        ...

    async def next_event(self) -> JsonDict:
        """The next event (``{"event": "message" | "delivery", "message": view}``)."""
        ...


class DaemonSession:
    """Talks to the daemon over two control connections: one for requests, one subscribed to events (so a chat
    can wait for events and send at the same time)."""

    local = False
    joined = True  # the daemon's business: it keeps trying

    def __init__(self, requests: ControlClient, events: ControlClient) -> None:
        self._requests = requests
        self._events = events

    async def send(self, to: str, text: str) -> JsonDict:
        """Queue a message through the daemon."""
        reply = await self._requests.request("send", to=to, text=text)
        message: JsonDict = reply["message"]
        return message

    async def history(self, peer: str, limit: int) -> list[JsonDict]:
        """Recent messages with *peer*, from the daemon."""
        reply = await self._requests.request("history", peer=peer, limit=limit)
        messages: list[JsonDict] = reply["messages"]
        return messages

    async def next_event(self) -> JsonDict:
        """The daemon's next event."""
        return await self._events.next_event()


class LocalSession:
    """Calls a :class:`ChatService` on a node this command runs."""

    local = True

    def __init__(self, service: ChatService, events: trio.MemoryReceiveChannel[JsonDict], *, joined: bool) -> None:
        self._service = service
        self._events = events
        self.joined = joined

    async def send(self, to: str, text: str) -> JsonDict:
        """Queue a message on the local node."""
        await trio.lowlevel.checkpoint()
        return self._service.send(to, text)

    async def history(self, peer: str, limit: int) -> list[JsonDict]:
        """Recent messages with *peer*."""
        await trio.lowlevel.checkpoint()
        return self._service.history(peer, limit)

    async def next_event(self) -> JsonDict:
        """The local node's next event."""
        try:
            return await self._events.receive()
        except trio.EndOfChannel:
            raise UserError("the event stream ended (this command fell too far behind)") from None


def node_options(args: argparse.Namespace) -> NodeOptions:
    """NodeOptions from the ``run``/``send``/``chat`` flags, checked: one-line UserErrors for contradictions."""
    if args.lan_only and not args.lan:
        raise UserError("--lan-only needs LAN discovery; drop --no-lan")
    if args.lan_only and args.bootstrap:
        raise UserError("--lan-only uses no bootstrap nodes; drop --bootstrap or --lan-only")
    bootstrap = [parse_host_port(text) for text in args.bootstrap]
    interfaces = args.lan_interface if args.lan else None
    if interfaces:
        resolve_interfaces(interfaces)  # a mistyped interface is reported before anything starts
    host = check_host(args.host) if args.host else default_host(interfaces)
    if args.lan and not interfaces and ":" in host:
        raise UserError(
            f"LAN discovery works on IPv4 only and --host {host} is IPv6; add --no-lan or --lan-interface IPv4-ADDRESS"
        )
    return NodeOptions(
        host=host,
        udp_port=args.udp_port,
        tcp_port=args.tcp_port,
        bootstrap=bootstrap,
        lan=args.lan or args.lan_only,
        lan_only=args.lan_only,
        lan_interfaces=interfaces,
    )


@contextlib.asynccontextmanager
async def open_session(home: Home, args: argparse.Namespace) -> AsyncIterator[Session]:
    """The daemon if one runs on *home*; else a node started here, joined (or given up on after JOIN_WAIT)."""
    home.require()
    try:
        requests = await ControlClient.connect(home.control_socket)
    except DaemonNotRunning:
        pass
    else:
        async with requests, await ControlClient.connect(home.control_socket) as events:
            await events.subscribe()
            yield DaemonSession(requests, events)
        return
    options = node_options(args)
    identity = unlock(home, args.passphrase_file)
    async with running_node(home, identity, options) as node, trio.open_nursery() as nursery:
        service = ChatService(node, home.profile().name)
        await nursery.start(service.run)
        stream = service.subscribe()
        joined = trio.Event()
        nursery.start_soon(lambda: keep_joined(node, home, options, save=False, joined=joined))
        if bootstrap_addresses(home, options) or options.lan:
            with trio.move_on_after(JOIN_WAIT):
                await joined.wait()
        yield LocalSession(service, stream, joined=joined.is_set())
        nursery.cancel_scope.cancel()
