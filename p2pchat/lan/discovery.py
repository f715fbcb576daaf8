"""LAN discovery: announce this node over mDNS/DNS-SD, find the others, and let them in once they prove who they are.

python-zeroconf runs its own asyncio loop in its own thread, and a :class:`~zeroconf.ServiceBrowser` calls its
handlers from a thread of its own.  Nothing of that reaches trio directly: a handler only posts ``(name, change)``
through an :class:`EventBridge`, which hands it to the trio thread with ``TrioToken.run_sync_soon`` (never waits)
and into a bounded memory channel.  When the trio side falls behind, events are dropped and counted, so a flood
of announcements can neither block zeroconf's thread nor grow memory.  Every zeroconf call that blocks (start,
register, unregister, service info, close) runs in ``trio.to_thread``.

A discovered service is only a claim.  Its TXT record must decode (:func:`p2pchat.core.lan.decode_txt`: the key
hashes to the node id), and then the node must answer a DHT ping from the announced address with a certificate
for that id.  The ping itself makes it a routing-table contact (the DHT records every node that proves its id);
the service then remembers it in :attr:`LanDiscovery.peers` and gives the messenger its TCP address as a
direct-connect hint, which it takes back when the peer leaves (goodbye), expires or stops answering.

What this node announces is where it can be reached: the address its DHT socket is bound to (its node certificate
names that address, so no other would verify) and its UDP and TCP ports.  Every :data:`ADDRESS_CHECK_INTERVAL`
seconds it looks at this machine's addresses and its own ports again: a changed port or bind address is
re-announced; a bind address that has left the machine (a new DHCP lease, a cable moved) withdraws the
announcement with a goodbye, and it is announced again when the address comes back; mDNS follows the configured
interfaces to their new addresses (``Zeroconf.update_interfaces``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

import ifaddr
import trio
from zeroconf import Error as ZeroconfError
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from p2pchat.core.identity import Identity, PublicIdentity
from p2pchat.core.ids import NodeId
from p2pchat.core.lan import SERVICE_TYPE, LanAnnouncement, decode_txt, encode_txt, service_name
from p2pchat.env import Env
from p2pchat.errors import P2PChatError, ProtocolError, UserError
from p2pchat.net.base import Address

__all__ = [
    "ADDRESS_CHECK_INTERVAL",
    "MAX_ADDRESSES_TRIED",
    "MAX_CONCURRENT_VERIFICATIONS",
    "MAX_LAN_PEERS",
    "MAX_PENDING_EVENTS",
    "RECHECK_INTERVAL",
    "SERVICE_INFO_TIMEOUT",
    "Announcement",
    "EventBridge",
    "LanDiscovery",
    "LanPeer",
    "LanStats",
    "interface_addresses",
    "resolve_interfaces",
]

log = logging.getLogger(__name__)

MAX_LAN_PEERS: Final = 256
"""Verified LAN peers remembered; a LAN with more p2pchat nodes than this is found through the DHT instead."""

MAX_PENDING_EVENTS: Final = 128
"""Browser events waiting for the trio side (queued callbacks plus the channel); beyond this they are dropped."""

MAX_CONCURRENT_VERIFICATIONS: Final = 8
"""Announcements being resolved and pinged at once; while all are busy, new events wait in the bounded channel."""

MAX_ADDRESSES_TRIED: Final = 4
"""Addresses of one announcement that are pinged, in the order announced (a host may list one per interface)."""

SERVICE_INFO_TIMEOUT: Final = 3.0
"""Seconds to wait for a discovered service's SRV/TXT/A records (normally already in zeroconf's cache)."""

RECHECK_INTERVAL: Final = 60.0
"""Seconds between pings of every LAN peer; one that fails is dropped (a crashed node sends no goodbye, and its
mDNS records would only expire after an hour and a quarter)."""

ADDRESS_CHECK_INTERVAL: Final = 5.0
"""Seconds between looks at this machine's addresses and the node's ports (a change is announced at the next
look); one look is a ``getifaddrs`` call, cheap enough to make often so that a laptop changing networks is
noticed within seconds."""

_Event = tuple[str, ServiceStateChange]
Adapters: TypeAlias = Callable[[], Iterable[ifaddr.Adapter]]
"""Where the machine's interfaces and their addresses come from (``ifaddr.get_adapters``; tests pass fakes)."""


class _Pingable(Protocol):
    """What discovery needs of the DHT node (a :class:`~p2pchat.dht.node.DhtNode`)."""

    node_id: NodeId

    @property
    def address(self) -> Address: ...

    async def ping(self, address: Address) -> NodeId: ...


class _Hintable(Protocol):
    """What discovery needs of the messenger (a :class:`~p2pchat.messaging.messenger.Messenger`)."""

    @property
    def tcp_address(self) -> Address: ...

    def add_hint(self, key: bytes, address: Address) -> None: ...

    def remove_hint(self, key: bytes, address: Address) -> None: ...


@dataclass(frozen=True, slots=True)
class LanPeer:
    """A LAN node that proved its node id: where its DHT answers and (``None``: nowhere) its direct channel."""

    node_id: NodeId
    identity: PublicIdentity
    udp: Address
    tcp: Address | None


@dataclass(frozen=True, slots=True)
class Announcement:
    """What this node announces: the addresses it answers at and its UDP (DHT) and TCP (direct channel) ports."""

    addresses: tuple[str, ...]
    udp_port: int
    tcp_port: int


@dataclass(slots=True)
class LanStats:
    """Counters of one discovery service; every announcement that was not used is counted somewhere."""

    events: int = 0
    """Browser events zeroconf handed over (what a flood beyond the kernel's socket buffer still delivers)."""
    events_dropped: int = 0
    """Browser events dropped because the trio side was behind (a flood)."""
    unresolved: int = 0
    """Services whose records did not arrive in time."""
    invalid: int = 0
    """Services with a malformed or inconsistent TXT record."""
    unverified: int = 0
    """Well-formed announcements whose node did not prove the announced id from the announced address."""
    peers_full: int = 0
    """Verified peers not remembered because :data:`MAX_LAN_PEERS` were already."""
    verified: int = 0
    removed: int = 0
    """Peers dropped: goodbye, expiry, or a failed recheck."""
    reannounced: int = 0
    """Our own announcement changed (new ports or address) or came back after a withdrawal."""
    withdrawn: int = 0
    """Our announcement was withdrawn because the address the node listens on left this machine."""


class EventBridge:
    """Carries items from any thread into a trio memory channel without ever blocking the sending thread.

    At most ``capacity`` items are in transit (queued with the trio token, or in the channel); beyond that
    :meth:`post` drops the item and counts it in :attr:`dropped`.
    """

    def __init__(self, token: trio.lowlevel.TrioToken, capacity: int = MAX_PENDING_EVENTS) -> None:
        self._token = token
        self._capacity = capacity
        self._lock = threading.Lock()
        self._in_transit = 0
        self._posted = 0
        self._dropped = 0
        self._send, self.receive = trio.open_memory_channel[_Event](capacity)

    @property
    def dropped(self) -> int:
        """Items dropped so far because ``capacity`` were already in transit (or the receiver was gone)."""
        with self._lock:
            return self._dropped

    @property
    def posted(self) -> int:
        """Items offered so far (delivered or dropped)."""
        with self._lock:
            return self._posted

    def post(self, item: _Event) -> None:
        """From any thread: hand *item* to the trio side, or drop and count it.  Never blocks."""
        with self._lock:
            self._posted += 1
            if self._in_transit >= self._capacity:
                self._dropped += 1
                return
            self._in_transit += 1
        try:
            self._token.run_sync_soon(self._deliver, item)
        except trio.RunFinishedError:
            with self._lock:
                self._in_transit -= 1
                self._dropped += 1

    def _deliver(self, item: _Event) -> None:
        # In the trio thread.  An item leaves transit when the receiver takes it, which only taken() can see, so
        # the count is released when the item enters the channel and the channel's own capacity bounds the rest.
        with self._lock:
            self._in_transit -= 1
        try:
            self._send.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            with self._lock:
                self._dropped += 1

    def close(self) -> None:
        """Stop delivering (from the trio thread); later items are dropped."""
        self._send.close()


def _ipv4_by_name(adapters: Iterable[ifaddr.Adapter]) -> dict[str, list[ipaddress.IPv4Interface]]:
    by_name: dict[str, list[ipaddress.IPv4Interface]] = {}
    for adapter in adapters:
        found = by_name.setdefault(adapter.name, [])
        found += [
            ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}") for ip in adapter.ips if isinstance(ip.ip, str)
        ]
    return by_name


def interface_addresses(choices: Sequence[str], adapters: Iterable[ifaddr.Adapter]) -> list[str]:
    """The IPv4 addresses *choices* (as for :func:`resolve_interfaces`) stand for on *adapters* now.

    Unlike :func:`resolve_interfaces` it never raises: a choice whose address has gone, or whose interface has no
    IPv4 address (or no longer exists), contributes nothing.
    """
    by_name = _ipv4_by_name(adapters)
    present = {str(iface.ip) for ifaces in by_name.values() for iface in ifaces}
    found: list[str] = []
    for choice in choices:
        if choice in by_name:
            ips = [str(iface.ip) for iface in by_name[choice]]
        else:
            ips = [choice] if choice in present else []
        found += [ip for ip in ips if ip not in found]
    return found


def is_local_ipv4(host: str, adapters: Iterable[ifaddr.Adapter]) -> bool:
    """Whether the IPv4 address *host* is one of this machine's on *adapters* (all of a loopback interface's
    network counts: Linux answers on every 127.x.y.z)."""
    ip = ipaddress.IPv4Address(host)
    for ifaces in _ipv4_by_name(adapters).values():
        for iface in ifaces:
            if iface.ip == ip or (iface.ip.is_loopback and ip in iface.network):
                return True
    return False


def resolve_interfaces(
    choices: Sequence[str],
    *,
    names: Callable[[], list[tuple[int, str]]] = socket.if_nameindex,
    adapters: Adapters = ifaddr.get_adapters,
) -> list[str]:
    """The IPv4 addresses to run mDNS on, for *choices* that are each an IPv4 address or an interface name.

    Raises :class:`~p2pchat.errors.UserError` naming the interfaces (and their addresses) that do exist when a
    choice matches none of them.
    """
    if not choices:
        raise UserError("no LAN interface given; name one (e.g. eth0) or give its IP address")
    by_name = {name: [str(iface.ip) for iface in ifaces] for name, ifaces in _ipv4_by_name(adapters()).items()}
    known_names = [name for _, name in names()]
    known_names += [name for name in by_name if name not in known_names]
    known_ips = {ip for ips in by_name.values() for ip in ips}
    resolved: list[str] = []
    for choice in choices:
        try:
            ip = ipaddress.ip_address(choice)
        except ValueError:
            ip = None
        if ip is not None:
            if ip.version != 4:
                raise UserError(f"LAN interface {choice!r}: only IPv4 addresses are supported for now")
            if str(ip) not in known_ips:
                raise UserError(f"no interface has the address {choice!r}; {_available(known_names, by_name)}")
            found = [str(ip)]
        elif choice in known_names:
            found = by_name.get(choice, [])
            if not found:
                raise UserError(f"interface {choice!r} has no IPv4 address; {_available(known_names, by_name)}")
        else:
            raise UserError(f"no network interface named {choice!r}; {_available(known_names, by_name)}")
        resolved += [ip for ip in found if ip not in resolved]
    return resolved


def _available(names: list[str], by_name: dict[str, list[str]]) -> str:
    shown = [f"{name} ({', '.join(by_name[name])})" if by_name.get(name) else name for name in names]
    return "the interfaces are: " + ", ".join(shown) if shown else "this machine reports no network interfaces"


def _all_ipv4(adapters: Iterable[ifaddr.Adapter]) -> list[str]:
    return [
        ip.ip
        for adapter in adapters
        for ip in adapter.ips
        if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback
    ]


class LanDiscovery:
    """Announces this node on the LAN and admits the LAN nodes that prove their ids.

    ``interfaces`` are IPv4 addresses or interface names for mDNS; ``None`` means every interface (a user's
    explicit choice; tests always name 127.0.0.1).  What is announced is where ``dht_node`` is bound, with its
    UDP port and ``messenger``'s TCP port (0 without a messenger: no direct channels); ``udp_port``/``tcp_port``
    override the ports.  ``service_type`` is :data:`~p2pchat.core.lan.SERVICE_TYPE` except in tests that keep
    apart from other tests on the same host; ``adapters`` is where the machine's addresses are read (tests pass a
    fake).  Run it with ``await nursery.start(discovery.run)`` after both have started.
    """

    def __init__(
        self,
        env: Env,
        dht_node: _Pingable,
        messenger: _Hintable | None,
        identity: Identity,
        *,
        interfaces: list[str] | None,
        udp_port: int | None = None,
        tcp_port: int | None = None,
        recheck_interval: float = RECHECK_INTERVAL,
        address_check_interval: float = ADDRESS_CHECK_INTERVAL,
        service_type: str = SERVICE_TYPE,
        adapters: Adapters = ifaddr.get_adapters,
    ) -> None:
        if identity.public.node_id != dht_node.node_id:
            raise ValueError("the identity is not the DHT node's identity")
        if not service_type.endswith("._udp.local."):
            raise ValueError(f"service type {service_type!r} must end in ._udp.local.")
        self.env = env
        self.dht = dht_node
        self.messenger = messenger
        self.identity = identity
        self.service_type = service_type
        self._adapters = adapters
        self.interfaces = list(interfaces) if interfaces is not None else None
        # Resolved now, so a mistyped interface is reported before anything starts.
        self.addresses = resolve_interfaces(interfaces, adapters=adapters) if interfaces is not None else None
        """The IPv4 addresses mDNS runs on (``None``: every interface); followed when they change."""
        self.udp_port = udp_port
        self.tcp_port = tcp_port
        self.recheck_interval = recheck_interval
        self.address_check_interval = address_check_interval
        self.peers: dict[str, LanPeer] = {}
        """Verified LAN peers by service name (at most :data:`MAX_LAN_PEERS`)."""
        self._stats = LanStats()
        self.announced = trio.Event()
        """Set once our service is first registered (probing on the LAN takes a second or two)."""
        self._zc: Zeroconf | None = None
        self._registered: ServiceInfo | None = None
        self._announcing: Announcement | None = None
        self._refused: Announcement | None = None
        self._all_seen: list[str] | None = None
        self._refresh_lock = trio.Lock()
        self._bridge: EventBridge | None = None
        self._inflight: set[str] = set()
        self._again: set[str] = set()
        self._gone: set[str] = set()

    @property
    def stats(self) -> LanStats:
        """The counters (events dropped by the thread bridge included)."""
        if self._bridge is not None:
            self._stats.events = self._bridge.posted
            self._stats.events_dropped = self._bridge.dropped
        return self._stats

    @property
    def name(self) -> str:
        """Our service name."""
        return service_name(self.identity.public.node_id, self.service_type)

    @property
    def announcing(self) -> Announcement | None:
        """What the LAN is told now (``None``: nothing -- not yet, withdrawn, or our name is taken)."""
        return self._announcing

    def wanted(self, adapters: Iterable[ifaddr.Adapter]) -> Announcement | None:
        """What this node should announce, given this machine's *adapters*: the address its DHT socket is bound to
        while that address is this machine's (``None`` once it has left), and its current ports."""
        here = self.dht.address
        udp = self.udp_port if self.udp_port is not None else here.port
        if self.tcp_port is not None:
            tcp = self.tcp_port
        else:
            tcp = self.messenger.tcp_address.port if self.messenger is not None else 0
        ip = ipaddress.ip_address(here.host)
        if ip.version != 4:
            return None  # refused by run(); see docs/architecture.md on IPv6
        if ip.is_unspecified:  # bound everywhere: every address mDNS runs on reaches it
            adapters = list(adapters)
            if self.interfaces is None:
                addresses = tuple(_all_ipv4(adapters))
            else:
                addresses = tuple(interface_addresses(self.interfaces, adapters))
        else:
            addresses = (here.host,) if is_local_ipv4(here.host, adapters) else ()
        return Announcement(addresses, udp, tcp) if addresses else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Browse, announce and follow address changes until cancelled; then say goodbye and close zeroconf."""
        host = self.dht.address.host
        if ipaddress.ip_address(host).version != 4:
            raise UserError(
                f"LAN discovery works over IPv4 only and this node listens on {host}; give it an IPv4 address or "
                f"turn LAN discovery off"
            )
        choice: list[str] | InterfaceChoice = self.addresses if self.addresses is not None else InterfaceChoice.All
        bridge = self._bridge = EventBridge(trio.lowlevel.current_trio_token())
        zc = self._zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=choice, ip_version=IPVersion.V4Only))
        browser: ServiceBrowser | None = None
        try:
            browser = await trio.to_thread.run_sync(
                lambda: ServiceBrowser(zc, self.service_type, handlers=[self._on_service_state_change])
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_addresses)
                nursery.start_soon(self._consume, bridge.receive)
                nursery.start_soon(self._recheck_loop)
                task_status.started()
        finally:
            bridge.close()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._shutdown, zc, browser, self._registered)
            self._zc = None
            self._registered = self._announcing = None

    @staticmethod
    def _shutdown(zc: Zeroconf, browser: ServiceBrowser | None, registered: ServiceInfo | None) -> None:
        # In a worker thread: these calls wait for zeroconf's loop.
        if browser is not None:
            browser.cancel()
        if registered is not None:
            zc.unregister_service(registered)  # the goodbye: TTL-0 records, so peers drop us at once
        zc.close()

    async def _watch_addresses(self) -> None:
        while True:
            await self.refresh()
            await trio.sleep(self.address_check_interval)

    async def refresh(self) -> None:
        """Look at this machine's addresses and the node's ports now, and bring the announcement up to date.

        Runs every :attr:`address_check_interval` seconds by itself; call it to act on a change at once.  A
        zeroconf failure is logged and left for the next look.
        """
        zc = self._zc
        if zc is None:
            raise RuntimeError("LAN discovery is not running")
        async with self._refresh_lock:
            adapters = await trio.to_thread.run_sync(lambda: list(self._adapters()))
            try:
                await self._follow_interfaces(zc, adapters)
                await self._announce(zc, self.wanted(adapters))
            except (ZeroconfError, OSError) as exc:
                log.warning("LAN announcement not updated (will try again): %s", exc)

    async def reannounce(self, *, udp_port: int | None = None, tcp_port: int | None = None) -> None:
        """Announce changed ports now (``None``: as before) -- and any address change :meth:`refresh` sees.

        Ports given here override the DHT's and messenger's from now on.
        """
        encode_txt(  # refuse a bad port here, not at every later look
            self.identity.public,
            udp_port=udp_port if udp_port is not None else 1,
            tcp_port=tcp_port if tcp_port is not None else 0,
        )
        if udp_port is not None:
            self.udp_port = udp_port
        if tcp_port is not None:
            self.tcp_port = tcp_port
        await self.refresh()

    async def _follow_interfaces(self, zc: Zeroconf, adapters: list[ifaddr.Adapter]) -> None:
        # mDNS sockets are bound per interface address: move them when an interface's address changes.  When a
        # configured interface has no address at all, the old sockets stay (there is nothing to move them to).
        if self.interfaces is None:
            seen = _all_ipv4(adapters)
            if self._all_seen is not None and seen != self._all_seen and seen:
                await trio.to_thread.run_sync(zc.update_interfaces)  # rescans every interface
            self._all_seen = seen
            return
        now = interface_addresses(self.interfaces, adapters)
        if now and now != self.addresses:
            log.info("LAN interfaces now have addresses %s (were %s)", ", ".join(now), ", ".join(self.addresses or []))
            await trio.to_thread.run_sync(zc.update_interfaces, now)
            self.addresses = now

    async def _announce(self, zc: Zeroconf, wanted: Announcement | None) -> None:
        current = self._announcing
        if wanted == current or (wanted is not None and wanted == self._refused):
            return
        registered = self._registered
        if wanted is None:
            assert registered is not None
            log.warning(
                "this node's address %s is no longer on this machine: LAN announcement withdrawn until it comes "
                "back (p2pchat does not move to a new address by itself; restart it to listen there)",
                self.dht.address.host,
            )
            await trio.to_thread.run_sync(zc.unregister_service, registered)  # a goodbye
            self._registered = self._announcing = None
            self._stats.withdrawn += 1
            return
        info = ServiceInfo(
            self.service_type,
            self.name,
            addresses=[socket.inet_aton(ip) for ip in wanted.addresses],
            port=wanted.udp_port,
            properties=encode_txt(self.identity.public, udp_port=wanted.udp_port, tcp_port=wanted.tcp_port),
            server=f"{self.identity.public.node_id.hex()}.local.",
        )
        if registered is not None:
            await trio.to_thread.run_sync(zc.update_service, info)
        else:
            try:
                await trio.to_thread.run_sync(zc.register_service, info)
            except NonUniqueNameException:
                # Someone on the LAN already answers for our node id: a copy of our key, or an impostor.  The DHT
                # still works; LAN peers just cannot find us by mDNS.  Tried again when what we announce changes.
                log.warning("another host on the LAN claims our service name %s; not announcing", info.name)
                self._refused = wanted
                return
        if self.announced.is_set():
            self._stats.reannounced += 1
        self._registered, self._announcing, self._refused = info, wanted, None
        self.announced.set()

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # In zeroconf's browser thread: post and return.
        assert self._bridge is not None
        self._bridge.post((name, state_change))

    async def _consume(self, receive: trio.MemoryReceiveChannel[_Event]) -> None:
        limiter = trio.CapacityLimiter(MAX_CONCURRENT_VERIFICATIONS)
        async with trio.open_nursery() as nursery:
            async for name, change in receive:
                if name == self.name:
                    continue
                if change is ServiceStateChange.Removed:
                    if name in self._inflight:
                        self._gone.add(name)
                        self._again.discard(name)
                    self._drop(name)
                    continue
                if name in self._inflight:
                    self._again.add(name)  # an update during verification: verify once more afterwards
                    self._gone.discard(name)
                    continue
                # Waiting here (not in the task) is the back pressure: while all verifications are busy the
                # channel fills and the bridge drops the excess.
                await limiter.acquire_on_behalf_of(name)
                self._inflight.add(name)
                nursery.start_soon(self._verify_loop, name, limiter)

    async def _verify_loop(self, name: str, limiter: trio.CapacityLimiter) -> None:
        try:
            while True:
                self._again.discard(name)
                peer = await self._verify(name)
                if name in self._gone:
                    break
                if peer is not None:
                    self._admit(name, peer)
                if name not in self._again:
                    break
        finally:
            self._inflight.discard(name)
            self._gone.discard(name)
            self._again.discard(name)
            limiter.release_on_behalf_of(name)

    async def _verify(self, name: str) -> LanPeer | None:
        zc = self._zc
        if zc is None:
            return None
        info = await trio.to_thread.run_sync(
            lambda: zc.get_service_info(self.service_type, name, timeout=int(SERVICE_INFO_TIMEOUT * 1000))
        )
        if info is None:
            self._stats.unresolved += 1
            return None
        try:
            announcement = decode_txt(info.properties, name=name, service_type=self.service_type)
        except ProtocolError as exc:
            self._stats.invalid += 1
            log.info("ignoring LAN service %r: %s", name, exc)
            return None
        return await self._prove(announcement, info.parsed_addresses(IPVersion.V4Only)[:MAX_ADDRESSES_TRIED])

    async def _prove(self, announcement: LanAnnouncement, ips: list[str]) -> LanPeer | None:
        for ip in ips:
            udp = Address(ip, announcement.udp_port)
            try:
                proved = await self.dht.ping(udp)
            except P2PChatError as exc:  # timeout, bad certificate, or not allowed to send there
                log.debug("LAN peer %s did not answer at %s: %s", announcement.node_id, udp, exc)
                continue
            if proved != announcement.node_id:
                # A real node answered, but for another id: the announcement lied (the ping still made the
                # answering node a contact, since it proved its own id).
                break
            tcp = Address(ip, announcement.tcp_port) if announcement.tcp_port else None
            return LanPeer(announcement.node_id, announcement.identity, udp, tcp)
        self._stats.unverified += 1
        return None

    def _admit(self, name: str, peer: LanPeer) -> None:
        old = self.peers.get(name)
        if old is None and len(self.peers) >= MAX_LAN_PEERS:
            self._stats.peers_full += 1
            return
        self.peers[name] = peer
        self._stats.verified += 1
        if self.messenger is not None:
            if old is not None and old.tcp is not None and old.tcp != peer.tcp:
                self.messenger.remove_hint(old.identity.key, old.tcp)  # it moved
            if peer.tcp is not None:
                self.messenger.add_hint(peer.identity.key, peer.tcp)

    def _drop(self, name: str) -> None:
        peer = self.peers.pop(name, None)
        if peer is None:
            return
        self._stats.removed += 1
        if self.messenger is not None and peer.tcp is not None:
            self.messenger.remove_hint(peer.identity.key, peer.tcp)

    async def _recheck_loop(self) -> None:
        while True:
            await trio.sleep(self.recheck_interval)
            for name, peer in list(self.peers.items()):
                try:
                    proved = await self.dht.ping(peer.udp)
                except P2PChatError:
                    proved = None
                if proved != peer.node_id and self.peers.get(name) is peer:
                    self._drop(name)
