"""Running a node on a home: in the foreground as the daemon (``p2pchat run``), or for one command's duration.

Both hold the home's lock (one node per home), build the :class:`~p2pchat.node.Node` on real sockets, and turn
the usual start-up failures -- a port in use, a mistyped LAN interface -- into one-line errors.  The daemon then
serves the control socket, prints ``ready udp=PORT tcp=PORT address=ADDRESS`` on stdout, and keeps the node
joined: it bootstraps from ``--bootstrap`` and from the addresses the last run saved, warns and retries with
backoff while no bootstrap node or LAN peer answers, and whenever it goes from alone to connected it fetches its
mailbox and retries its outbox at once.  SIGINT or SIGTERM stops it cleanly (LAN goodbye, databases closed).

On loopback every peer shares one IP address, so a node bound to 127.0.0.0/8 or ::1 runs the DHT with
``DhtConfig.single_host()`` (per-source quotas and rate limits would otherwise treat all its peers as one).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final, TextIO

import ifaddr
import trio

from p2pchat.control.server import ControlServer
from p2pchat.core.identity import Identity
from p2pchat.dht.node import DhtConfig
from p2pchat.env import Env
from p2pchat.errors import P2PChatError, UserError
from p2pchat.home import Home, HomeLock
from p2pchat.lan.discovery import resolve_interfaces
from p2pchat.net.base import Address
from p2pchat.node import Node
from p2pchat.service import ChatService

__all__ = [
    "ALONE_POLL",
    "BOOTSTRAP_SAVE_INTERVAL",
    "DEFAULT_TCP_PORT",
    "DEFAULT_UDP_PORT",
    "FIRST_BOOTSTRAP_RETRY",
    "MAX_BOOTSTRAP_RETRY",
    "NodeOptions",
    "default_host",
    "join_once",
    "keep_joined",
    "run_daemon",
    "running_node",
]

log = logging.getLogger(__name__)

DEFAULT_UDP_PORT: Final = 7391
"""The DHT's UDP port when ``--udp-port`` is not given (0 picks any free port)."""

DEFAULT_TCP_PORT: Final = 7391
"""The direct-channel TCP port when ``--tcp-port`` is not given (0 picks any free port)."""

FIRST_BOOTSTRAP_RETRY: Final = 5.0
"""Seconds before the first retry when no bootstrap node answered; doubled each time."""

MAX_BOOTSTRAP_RETRY: Final = 120.0
"""Longest wait between bootstrap attempts while alone."""

ALONE_POLL: Final = 1.0
"""Seconds between checks for a first peer (a LAN peer appearing, a bootstrap node answering us) while alone."""

CONNECTED_POLL: Final = 10.0
"""Seconds between checks that the node still knows someone, once it does."""

BOOTSTRAP_SAVE_INTERVAL: Final = 300.0
"""Seconds between saves of the bootstrap file while running (it is saved on joining and at exit too)."""


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """Where and how to run a node (the ``run`` command's options)."""

    host: str
    udp_port: int = DEFAULT_UDP_PORT
    tcp_port: int = DEFAULT_TCP_PORT
    bootstrap: list[Address] = field(default_factory=list)
    lan: bool = True
    lan_only: bool = False
    lan_interfaces: list[str] | None = None
    """Where LAN discovery announces and browses; None: the interface of ``host``."""

    @property
    def on_loopback(self) -> bool:
        """Whether the node is bound to a loopback address (so all its peers share one IP)."""
        return ipaddress.ip_address(self.host).is_loopback


def check_host(host: str) -> str:
    """*host* as a canonical IP literal; UserError if it is not one peers could reach."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UserError(f"--host {host!r} is not an IP address; give the address peers reach you at") from None
    if ip.is_unspecified:
        raise UserError(
            f"--host {host} would listen everywhere but tell peers nothing; give the one address peers reach you at"
        )
    return str(ip)


def default_host(lan_interfaces: list[str] | None) -> str:
    """The address to serve on when ``--host`` is not given: the first LAN interface's, else the first non-loopback
    IPv4 address of this machine, else 127.0.0.1."""
    if lan_interfaces:
        return resolve_interfaces(lan_interfaces)[0]
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                address = ipaddress.ip_address(ip.ip)
                if not (address.is_loopback or address.is_link_local):
                    return str(address)
    log.warning("no network interface besides loopback: serving on 127.0.0.1 (only this machine can reach it)")
    return "127.0.0.1"


def bootstrap_addresses(home: Home, options: NodeOptions) -> list[Address]:
    """What to bootstrap from: ``--bootstrap`` first, then the addresses the last run saved (none if LAN-only)."""
    if options.lan_only:
        return []
    addresses = list(options.bootstrap)
    addresses += [a for a in home.saved_bootstrap() if a not in addresses]
    return addresses


def _port_error(exc: OSError, options: NodeOptions) -> UserError:
    udp_busy = False
    if options.udp_port:
        probe = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((options.host, options.udp_port))
        except OSError:
            udp_busy = True
        finally:
            probe.close()
    kind, port, flag = ("UDP", options.udp_port, "--udp-port") if udp_busy else ("TCP", options.tcp_port, "--tcp-port")
    if exc.errno == errno.EADDRINUSE:
        return UserError(
            f"{kind} port {port} on {options.host} is already in use (another p2pchat?); "
            f"choose another with {flag} N, or {flag} 0 for any free port"
        )
    return UserError(f"cannot listen on {options.host} ({kind} port {port}): {exc.strerror or exc}; check --host")


def _first_os_error(group: BaseException) -> OSError | None:
    if isinstance(group, OSError):
        return group
    if isinstance(group, BaseExceptionGroup):
        for inner in group.exceptions:
            found = _first_os_error(inner)
            if found is not None:
                return found
    return None


@contextlib.asynccontextmanager
async def running_node(home: Home, identity: Identity, options: NodeOptions) -> AsyncIterator[Node]:
    """Hold the home's lock and run a node on it for the body of the ``async with``; stop it on exit."""
    lock: HomeLock = home.lock()
    with lock:
        home.make_private()
        lan_interfaces = options.lan_interfaces or [options.host]
        node = Node(
            Env.real(),
            identity,
            host=options.host,
            udp_port=options.udp_port,
            tcp_port=options.tcp_port,
            home=home.path,
            dht_config=DhtConfig.single_host() if options.on_loopback else DhtConfig(),
            lan=options.lan,
            lan_interfaces=lan_interfaces if options.lan else None,
        )
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(node.run)
            except BaseException as exc:
                os_error = _first_os_error(exc)
                if os_error is None:
                    raise
                raise _port_error(os_error, options) from None
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()


async def join_once(node: Node, addresses: list[Address]) -> int:
    """Bootstrap through *addresses*; how many answered."""
    if not addresses:
        return 0
    return await node.bootstrap(addresses)


async def catch_up(node: Node) -> None:
    """Now that the node knows someone: fetch its mailbox and make its outbox due (both found no one before)."""
    node.messenger.retry_now()
    try:
        taken = await node.messenger.fetch_mailbox()
    except P2PChatError as exc:
        log.info("mailbox fetch failed: %s", exc)
    else:
        if taken:
            log.info("took %d entries from the mailbox", taken)


def _connected(node: Node) -> bool:
    status = node.status()
    return status.dht_contacts > 0 or status.lan_peers > 0


def _save_bootstrap(home: Home, node: Node) -> None:
    own = node.dht.address
    addresses = [contact.address for contact in node.dht.contacts() if contact.address != own]
    if node.lan is not None:
        addresses += [peer.udp for peer in node.lan.peers.values() if peer.udp not in addresses]
    if addresses:
        home.save_bootstrap(addresses)


async def keep_joined(
    node: Node, home: Home, options: NodeOptions, *, save: bool = True, joined: trio.Event | None = None
) -> None:
    """Join and stay joined (see the module docstring); runs until cancelled.  *joined* is set once the node first
    knows someone and has fetched its mailbox."""
    retry = FIRST_BOOTSTRAP_RETRY
    next_bootstrap = trio.current_time()
    last_save = -BOOTSTRAP_SAVE_INTERVAL
    connected = False
    try:
        while True:
            if _connected(node):
                if not connected:
                    connected = True
                    status = node.status()
                    log.info("joined: %d DHT contacts, %d LAN peers", status.dht_contacts, status.lan_peers)
                    await catch_up(node)
                    if joined is not None:
                        joined.set()
                    retry = FIRST_BOOTSTRAP_RETRY
                if save and trio.current_time() - last_save >= BOOTSTRAP_SAVE_INTERVAL:
                    _save_bootstrap(home, node)
                    last_save = trio.current_time()
                await trio.sleep(CONNECTED_POLL)
                continue
            if connected:
                connected = False
                log.warning("lost every peer; trying to join again")
                next_bootstrap = trio.current_time()
            if trio.current_time() >= next_bootstrap:
                addresses = bootstrap_addresses(home, options)
                answered = await join_once(node, addresses)
                if not answered and not _connected(node):  # a LAN peer may have appeared meanwhile
                    _warn_alone(addresses, options, retry)
                    next_bootstrap = trio.current_time() + retry
                    retry = min(retry * 2, MAX_BOOTSTRAP_RETRY)
                continue
            await trio.sleep(ALONE_POLL)
    finally:
        if save and connected:
            with contextlib.suppress(OSError):
                _save_bootstrap(home, node)


def _warn_alone(addresses: list[Address], options: NodeOptions, retry: float) -> None:
    if addresses:
        tried = ", ".join(str(a) for a in addresses[:4]) + (" ..." if len(addresses) > 4 else "")
        lan = " and no LAN peer found yet" if options.lan else ""
        log.warning(
            "no bootstrap node answered (tried %s)%s; retrying in %.0f s. Check that those nodes run, or give "
            "--bootstrap HOST:PORT of a node that does",
            tried,
            lan,
            retry,
        )
    elif options.lan:
        log.warning(
            "no bootstrap node known and no LAN peer found yet; waiting for LAN peers (give --bootstrap HOST:PORT to "
            "join a wider network)"
        )
    else:
        log.warning(
            "no bootstrap node known and LAN discovery is off: this node is alone. Give --bootstrap HOST:PORT of a "
            "running node"
        )


async def run_daemon(home: Home, identity: Identity, my_name: str | None, options: NodeOptions, out: TextIO) -> int:
    """Run the daemon in the foreground until SIGINT or SIGTERM; the exit code."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with running_node(home, identity, options) as node, trio.open_nursery() as nursery:
            service = ChatService(node, my_name)
            await nursery.start(service.run)
            await nursery.start(ControlServer(service, home.control_socket).run)
            udp, tcp = node.dht.address.port, node.messenger.tcp_address.port
            log.info("serving on %s: udp %d, tcp %d; control socket %s", options.host, udp, tcp, home.control_socket)
            print(f"ready udp={udp} tcp={tcp} address={node.address}", file=out, flush=True)
            nursery.start_soon(keep_joined, node, home, options)
            async for signum in signals:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    return 0
