"""LAN discovery: the thread bridge under a flood, interface resolution, what a node announces as its addresses
change (fake adapters), and real zeroconf on 127.0.0.1 -- three DHT nodes with no bootstrap find each other,
hostile announcements and a flood of them are counted and ignored, a clean shutdown is a goodbye, a node that
moves or whose address leaves the machine is re-announced or withdrawn, and two whole Nodes chat after meeting on
the LAN.

Every Zeroconf here is bound to 127.0.0.1 only (the fake adapters only ever name loopback addresses to a running
Zeroconf), and each test browses a service type of its own (``lan_support.lan_service_type``) so that other
tests and other test runs on this host cannot add peers or counts to it.  zeroconf's probing and announcing run
on the wall clock, so the real-network tests wait for a condition with a deadline (polling it every 50 ms);
nothing sleeps as a substitute for synchronisation.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import ifaddr
import pytest
import trio
from lan_support import lan_service_type
from zeroconf import IPVersion, ServiceInfo, ServiceStateChange, Zeroconf

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.lan import MAX_TXT_BYTES, MAX_TXT_KEYS, MAX_TXT_VALUE_BYTES, SERVICE_TYPE, encode_txt, service_name
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.env import Env
from p2pchat.errors import P2PChatError, UserError
from p2pchat.lan.discovery import (
    MAX_CONCURRENT_VERIFICATIONS,
    MAX_LAN_PEERS,
    MAX_PENDING_EVENTS,
    Announcement,
    EventBridge,
    LanDiscovery,
    LanPeer,
    LanStats,
    interface_addresses,
    is_local_ipv4,
    resolve_interfaces,
)
from p2pchat.messaging.db import MessageDB
from p2pchat.messaging.messenger import IncomingMessage, Messenger
from p2pchat.net.base import Address
from p2pchat.node import Node

LOOPBACK = "127.0.0.1"
DEADLINE = 30.0
"""Seconds a step may take on a loaded machine (mDNS probing alone takes about two)."""

# --- the bridge from zeroconf's thread ---------------------------------------------------------------------------


async def test_a_flood_from_another_thread_is_dropped_and_counted_never_blocking_it() -> None:
    bridge = EventBridge(trio.lowlevel.current_trio_token(), capacity=16)
    flood = 10_000

    def post_all() -> None:
        for i in range(flood):
            bridge.post((f"n{i}", ServiceStateChange.Added))

    # The worker returns only if post() never blocked; its result reaches us after every callback it queued ran.
    with trio.fail_after(DEADLINE):
        await trio.to_thread.run_sync(post_all)
    delivered = []
    while True:
        try:
            delivered.append(bridge.receive.receive_nowait())
        except trio.WouldBlock:
            break
    assert 0 < len(delivered) <= 16
    assert len(delivered) + bridge.dropped == bridge.posted == flood
    assert delivered[0] == ("n0", ServiceStateChange.Added)


async def test_the_bridge_carries_items_in_order_and_drops_after_close() -> None:
    bridge = EventBridge(trio.lowlevel.current_trio_token(), capacity=4)

    def post_three() -> None:
        for i in range(3):
            bridge.post((str(i), ServiceStateChange.Updated))

    await trio.to_thread.run_sync(post_three)
    assert [bridge.receive.receive_nowait()[0] for _ in range(3)] == ["0", "1", "2"]
    bridge.close()
    await trio.to_thread.run_sync(bridge.post, ("late", ServiceStateChange.Added))
    assert bridge.dropped == 1


# --- interfaces --------------------------------------------------------------------------------------------------


def _fake_adapters() -> list[ifaddr.Adapter]:
    return [
        ifaddr.Adapter("lo", "lo", [ifaddr.IP("127.0.0.1", 8, "lo"), ifaddr.IP(("::1", 0, 0), 128, "lo")]),
        ifaddr.Adapter("eth0", "eth0", [ifaddr.IP("192.168.1.5", 24, "eth0")]),
        ifaddr.Adapter("wg0", "wg0", [ifaddr.IP(("fd00::5", 0, 0), 64, "wg0")]),
    ]


def _fake_names() -> list[tuple[int, str]]:
    return [(1, "lo"), (2, "eth0"), (3, "wg0")]


def _resolve(*choices: str) -> list[str]:
    return resolve_interfaces(list(choices), names=_fake_names, adapters=_fake_adapters)


def test_interfaces_by_address_or_name() -> None:
    assert _resolve("127.0.0.1") == ["127.0.0.1"]
    assert _resolve("eth0") == ["192.168.1.5"]
    assert _resolve("lo", "127.0.0.1", "eth0") == ["127.0.0.1", "192.168.1.5"]


@pytest.mark.parametrize(
    ("choice", "says"),
    [
        ("eth7", "no network interface named 'eth7'"),
        ("10.9.9.9", "no interface has the address '10.9.9.9'"),
        ("wg0", "interface 'wg0' has no IPv4 address"),
        ("::1", "only IPv4"),
    ],
)
def test_a_missing_interface_names_the_ones_that_exist(choice: str, says: str) -> None:
    with pytest.raises(UserError, match=says) as info:
        _resolve(choice)
    if "IPv4 addresses are supported" not in str(info.value):
        assert "lo (127.0.0.1), eth0 (192.168.1.5), wg0" in str(info.value)


def test_no_interface_at_all_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no LAN interface"):
        _resolve()


def test_the_real_loopback_interface_resolves() -> None:
    assert resolve_interfaces(["lo"]) == [LOOPBACK]
    assert resolve_interfaces([LOOPBACK]) == [LOOPBACK]
    with pytest.raises(UserError, match=r"the interfaces are: .*lo"):
        resolve_interfaces(["no-such-if0"])


async def test_discovery_refuses_a_mistyped_interface_before_starting() -> None:
    env = Env.real()
    dht = DhtNode(env, Identity.generate(env.random_bytes), host=LOOPBACK)
    with pytest.raises(UserError, match="no-such-if0"):
        LanDiscovery(env, dht, None, dht.identity, interfaces=["no-such-if0"])


async def test_verified_peers_are_bounded_and_the_excess_counted() -> None:
    env = Env.real()
    dht = DhtNode(env, Identity.generate(env.random_bytes), host=LOOPBACK)
    lan = LanDiscovery(env, dht, None, dht.identity, interfaces=[LOOPBACK])
    for i in range(MAX_LAN_PEERS + 1):
        who = Identity.generate(env.random_bytes).public
        lan._admit(service_name(who.node_id), LanPeer(who.node_id, who, Address(LOOPBACK, 1000 + i), None))
    assert len(lan.peers) == MAX_LAN_PEERS
    assert lan.stats.peers_full == 1 and lan.stats.verified == MAX_LAN_PEERS


# --- what the node announces, with fake adapters ----------------------------------------------------------------


class _FakeDht:
    """The DHT side of discovery, without a network: an id, an address that a test may move, and a ping whose
    answers a test decides (``None``: no answer)."""

    def __init__(self, identity: Identity, address: Address) -> None:
        self.identity = identity
        self.node_id = identity.public.node_id
        self.address = address
        self.answers: dict[Address, NodeId | None] = {}

    async def ping(self, address: Address) -> NodeId:
        await trio.sleep(0.1)  # a request timeout's worth of virtual time
        answer = self.answers.get(address)
        if answer is None:
            raise P2PChatError(f"no answer from {address}")
        return answer


class _FakeMessenger:
    def __init__(self, tcp: Address) -> None:
        self.tcp_address = tcp
        self.hints: dict[bytes, list[Address]] = {}

    def add_hint(self, key: bytes, address: Address) -> None:
        self.hints.setdefault(key, []).append(address)

    def remove_hint(self, key: bytes, address: Address) -> None:
        self.hints[key].remove(address)
        if not self.hints[key]:
            del self.hints[key]


class _Machine:
    """Fake adapters whose addresses a test changes: ``{interface name: ["ip/prefix", ...]}``."""

    def __init__(self, interfaces: dict[str, list[str]]) -> None:
        self.interfaces = interfaces

    def __call__(self) -> list[ifaddr.Adapter]:
        return [
            ifaddr.Adapter(name, name, [ifaddr.IP(ip.split("/")[0], int(ip.split("/")[1]), name) for ip in ips])
            for name, ips in self.interfaces.items()
        ]


def test_the_announcement_is_where_the_dht_listens_and_follows_its_address_and_ports() -> None:
    identity = Identity.generate(random.Random(1).randbytes)
    machine = _Machine({"lo": ["127.0.0.1/8"], "eth0": ["192.168.1.5/24"]})
    dht = _FakeDht(identity, Address("192.168.1.5", 4000))
    messenger = _FakeMessenger(Address("192.168.1.5", 4001))
    # No Zeroconf runs in this test: the fake eth0 address is only ever compared, never bound.
    lan = LanDiscovery(Env.real(), dht, messenger, identity, interfaces=["eth0"], adapters=machine)
    assert lan.addresses == ["192.168.1.5"]
    assert lan.wanted(machine()) == Announcement(("192.168.1.5",), 4000, 4001)

    # Only the address the node is bound to, however many the interface has: no other would verify.
    machine.interfaces["eth0"].append("192.168.1.9/24")
    assert lan.wanted(machine()) == Announcement(("192.168.1.5",), 4000, 4001)
    assert interface_addresses(["eth0"], machine()) == ["192.168.1.5", "192.168.1.9"]

    # Ports follow the DHT and the messenger (a node that rebinds), unless overridden.
    dht.address = Address("192.168.1.5", 4100)
    messenger.tcp_address = Address("192.168.1.5", 4101)
    assert lan.wanted(machine()) == Announcement(("192.168.1.5",), 4100, 4101)
    lan.tcp_port = 5000
    assert lan.wanted(machine()) == Announcement(("192.168.1.5",), 4100, 5000)
    lan.tcp_port = None

    # A new lease: the bind address has left the machine -- nothing to announce; mDNS would move to the new one.
    machine.interfaces["eth0"] = ["192.168.1.6/24"]
    assert lan.wanted(machine()) is None
    assert interface_addresses(["eth0"], machine()) == ["192.168.1.6"]
    assert interface_addresses(["192.168.1.5"], machine()) == []
    assert interface_addresses(["eth0", "wlan9"], {}.values()) == []  # nothing there: never an error

    # The address comes back: announced again.  A node that moved to the new address is announced there.
    machine.interfaces["eth0"] = ["192.168.1.6/24", "192.168.1.5/24"]
    assert lan.wanted(machine()) == Announcement(("192.168.1.5",), 4100, 4101)
    dht.address = Address("192.168.1.6", 4100)
    assert lan.wanted(machine()) == Announcement(("192.168.1.6",), 4100, 4101)

    # Bound everywhere (no single address to announce): every address of the mDNS interfaces.
    dht.address = Address("0.0.0.0", 4100)
    assert lan.wanted(machine()) == Announcement(("192.168.1.6", "192.168.1.5"), 4100, 4101)


def test_the_standard_service_type_unless_a_test_asks_for_its_own() -> None:
    identity = Identity.generate(random.Random(5).randbytes)
    dht = _FakeDht(identity, Address(LOOPBACK, 4000))
    lan = LanDiscovery(Env.real(), dht, None, identity, interfaces=[LOOPBACK])
    assert lan.service_type == SERVICE_TYPE == "_p2pchat._udp.local."
    assert lan.name == f"{identity.public.node_id.hex()}.{SERVICE_TYPE}"
    own = lan_service_type()
    assert LanDiscovery(Env.real(), dht, None, identity, interfaces=[LOOPBACK], service_type=own).name.endswith(own)
    with pytest.raises(ValueError, match="service type"):
        LanDiscovery(Env.real(), dht, None, identity, interfaces=[LOOPBACK], service_type="_p2pchat._tcp.local.")


def test_every_loopback_address_is_local_but_only_listed_addresses_elsewhere() -> None:
    machine = _Machine({"lo": ["127.0.0.1/8"], "eth0": ["192.168.1.5/24"]})
    assert is_local_ipv4("127.0.0.1", machine()) and is_local_ipv4("127.0.0.2", machine())
    assert is_local_ipv4("192.168.1.5", machine())
    assert not is_local_ipv4("192.168.1.6", machine())  # in the subnet, but not ours
    machine.interfaces["lo"] = []
    assert not is_local_ipv4("127.0.0.1", machine())


async def test_an_ipv6_node_is_refused_with_a_clear_error() -> None:
    identity = Identity.generate(random.Random(2).randbytes)
    dht = _FakeDht(identity, Address("::1", 4000))
    lan = LanDiscovery(Env.real(), dht, None, identity, interfaces=[LOOPBACK])
    with pytest.raises(UserError, match="IPv4 only and this node listens on ::1"):
        await lan.run()


async def test_a_bad_port_is_refused_before_it_is_kept() -> None:
    identity = Identity.generate(random.Random(3).randbytes)
    lan = LanDiscovery(Env.real(), _FakeDht(identity, Address(LOOPBACK, 4000)), None, identity, interfaces=[LOOPBACK])
    with pytest.raises(ValueError, match="tcp_port"):
        await lan.reannounce(tcp_port=70000)
    assert lan.tcp_port is None
    with pytest.raises(RuntimeError, match="not running"):
        await lan.reannounce(tcp_port=4001)


async def test_a_peer_that_stops_answering_is_dropped_with_its_hint(autojump_clock: trio.testing.MockClock) -> None:
    rng = random.Random(4)
    me, them = Identity.generate(rng.randbytes), Identity.generate(rng.randbytes)
    dht = _FakeDht(me, Address(LOOPBACK, 4000))
    messenger = _FakeMessenger(Address(LOOPBACK, 4001))
    lan = LanDiscovery(Env.real(), dht, messenger, me, interfaces=[LOOPBACK], recheck_interval=60.0)
    name = service_name(them.public.node_id)
    peer = LanPeer(them.public.node_id, them.public, Address(LOOPBACK, 5000), Address(LOOPBACK, 5001))
    dht.answers[peer.udp] = them.public.node_id
    lan._admit(name, peer)
    assert messenger.hints == {them.public.key: [peer.tcp]}
    # Re-verified at a new TCP port: the old hint goes, the new one comes.
    moved = LanPeer(peer.node_id, peer.identity, peer.udp, Address(LOOPBACK, 5002))
    lan._admit(name, moved)
    assert messenger.hints == {them.public.key: [moved.tcp]}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lan._recheck_loop)
        await trio.sleep(3 * 60.0)
        assert lan.peers == {name: moved}  # it answers each recheck
        del dht.answers[peer.udp]  # it crashed: no goodbye, mDNS records still cached
        await trio.sleep(60.0 + 1.0)
        assert lan.peers == {}
        assert messenger.hints == {}
        assert lan.stats.removed == 1
        nursery.cancel_scope.cancel()


async def test_the_messenger_forgets_a_removed_hint(tmp_path: Path) -> None:
    env = Env.real()
    identity = Identity.generate(env.random_bytes)
    dht = DhtNode(env, identity, host=LOOPBACK)
    messenger = Messenger(env, identity, dht, MessageDB(tmp_path / "m.sqlite"), host=LOOPBACK)
    key = Identity.generate(env.random_bytes).public.key
    a, b = Address(LOOPBACK, 1), Address(LOOPBACK, 2)
    messenger.add_hint(key, a)
    messenger.add_hint(key, b)
    assert messenger.hints(key) == [b, a]
    messenger.remove_hint(key, a)
    assert messenger.hints(key) == [b]
    messenger.remove_hint(key, a)  # unknown: ignored
    messenger.remove_hint(key, b)
    assert messenger.hints(key) == []
    assert key not in messenger._hints  # an identity that came and went leaves nothing behind
    messenger.db.close()


# --- real zeroconf on 127.0.0.1 ---------------------------------------------------------------------------------


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for *condition*, which zeroconf's wall-clock timers make true, under the caller's deadline."""
    while not condition():
        await trio.sleep(0.05)


async def _dht_node(nursery: trio.Nursery, host: str = LOOPBACK, identity: Identity | None = None) -> DhtNode:
    env = Env.real()
    identity = identity or Identity.generate(env.random_bytes)
    node = DhtNode(env, identity, host=host, config=DhtConfig.single_host())
    await nursery.start(node.run)
    return node


async def _start_in_own_scope(nursery: trio.Nursery, run: Callable[..., object]) -> trio.CancelScope:
    """Start *run* (a ``run(task_status=)`` method) so that cancelling the returned scope stops it alone."""
    scope = trio.CancelScope()

    async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await run(task_status=task_status)  # type: ignore[operator]

    await nursery.start(runner)
    return scope


@asynccontextmanager
async def _hostile_zeroconf() -> AsyncIterator[Zeroconf]:
    zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only))
    try:
        yield zc
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(zc.close)


def _service(
    label: str,
    properties: dict[bytes, bytes] | bytes,
    port: int,
    service_type: str,
    addresses: list[bytes] | None = None,
) -> ServiceInfo:
    return ServiceInfo(
        service_type,
        f"{label}.{service_type}",
        addresses=addresses if addresses is not None else [socket.inet_aton(LOOPBACK)],
        port=port,
        properties=properties,
        server=f"{label}.local.",
    )


def _raw_txt(properties: dict[bytes, bytes]) -> bytes:
    """TXT rdata as on the wire (zeroconf would refuse to build some hostile records from a dict)."""
    strings = [key + b"=" + value for key, value in properties.items()]
    return b"".join(bytes([len(string)]) + string for string in strings)


def _quiet(stats: LanStats) -> bool:
    return stats.invalid == stats.unverified == stats.unresolved == stats.events_dropped == 0


@pytest.mark.realnet
async def test_three_nodes_with_no_bootstrap_find_each_other_and_a_goodbye_drops_one() -> None:
    service_type = lan_service_type()
    async with trio.open_nursery() as nursery:
        nodes = [await _dht_node(nursery) for _ in range(3)]
        lans = [
            LanDiscovery(n.env, n, None, n.identity, interfaces=[LOOPBACK], service_type=service_type) for n in nodes
        ]
        for lan in lans[:2]:
            await nursery.start(lan.run)
        third = await _start_in_own_scope(nursery, lans[2].run)  # so that it alone can be shut down cleanly

        with trio.fail_after(DEADLINE):
            # register_service returns after its announcements went out, so peers may know us a little sooner.
            await _until(lambda: all(len(lan.peers) == 2 and lan.announcing is not None for lan in lans))
        for node, lan in zip(nodes, lans, strict=True):
            others = {n.node_id for n in nodes if n is not node}
            assert {c.node_id for c in node.contacts()} == others
            assert {p.node_id for p in lan.peers.values()} == others
            assert all(p.udp.host == LOOPBACK and p.tcp is None for p in lan.peers.values())
            assert _quiet(lan.stats)
            assert lan.announcing == Announcement((LOOPBACK,), node.address.port, 0)

        third.cancel()  # a clean shutdown: unregister (goodbye), then close
        with trio.fail_after(DEADLINE):
            await _until(lambda: all(len(lan.peers) == 1 for lan in lans[:2]))
        gone = service_name(nodes[2].node_id, service_type)
        assert all(gone not in lan.peers for lan in lans[:2])
        assert all(lan.stats.removed == 1 for lan in lans[:2])
        nursery.cancel_scope.cancel()


class _MovingDht:
    """The DHT node of one identity that moves from one socket to another, as a node that rebinds would (the
    sockets are DhtNodes with that identity; discovery only reads the id and address and sends pings)."""

    def __init__(self, first: DhtNode) -> None:
        self.node_id = first.node_id
        self.current = first

    @property
    def address(self) -> Address:
        return self.current.address

    async def ping(self, address: Address) -> NodeId:
        return await self.current.ping(address)


@pytest.mark.realnet
async def test_a_peer_sees_the_new_address_and_ports_after_the_node_moves() -> None:
    service_type = lan_service_type()
    env = Env.real()
    moving_identity = Identity.generate(env.random_bytes)
    async with trio.open_nursery() as nursery:
        watcher = await _dht_node(nursery)
        seen = LanDiscovery(
            watcher.env, watcher, None, watcher.identity, interfaces=[LOOPBACK], service_type=service_type
        )
        await nursery.start(seen.run)
        first_life = trio.CancelScope()

        async def first_socket(task_status: trio.TaskStatus[DhtNode] = trio.TASK_STATUS_IGNORED) -> None:
            with first_life:
                async with trio.open_nursery() as inner:
                    task_status.started(await _dht_node(inner, LOOPBACK, moving_identity))

        first: DhtNode = await nursery.start(first_socket)
        moving = _MovingDht(first)
        lan = LanDiscovery(
            env, moving, None, moving_identity, interfaces=[LOOPBACK], service_type=service_type,
            address_check_interval=0.05,
        )  # fmt: skip
        await nursery.start(lan.run)
        name = lan.name

        def peer() -> LanPeer | None:
            return seen.peers.get(name)

        with trio.fail_after(DEADLINE):
            await _until(lambda: (p := peer()) is not None and p.udp == first.address)
        assert lan.stats.reannounced == 0

        # The node moves to another loopback address and port; the old socket closes.  Nobody tells discovery:
        # its next look at the DHT's address sees the move and re-announces.
        second = await _dht_node(nursery, "127.0.0.2", moving_identity)
        assert second.address.port != first.address.port or second.address.host != first.address.host
        moving.current = second
        first_life.cancel()
        moved = Announcement(("127.0.0.2",), second.address.port, 0)
        with trio.fail_after(DEADLINE):
            await _until(lambda: (p := peer()) is not None and p.udp == second.address and lan.announcing == moved)
        assert lan.stats.reannounced == 1

        # A new TCP port, announced at once.
        await lan.reannounce(tcp_port=4242)
        with trio.fail_after(DEADLINE):
            await _until(lambda: (p := peer()) is not None and p.tcp == Address("127.0.0.2", 4242))
        assert lan.stats.reannounced == 2
        assert seen.stats.removed == 0  # updated in place, never dropped
        assert _quiet(lan.stats)
        nursery.cancel_scope.cancel()


@pytest.mark.realnet
async def test_an_address_that_leaves_the_machine_withdraws_the_announcement_and_its_return_restores_it() -> None:
    service_type = lan_service_type()
    # The fake machine has loopback only, so the real Zeroconf below is only ever bound to loopback addresses.
    machine = _Machine({"lo": ["127.0.0.1/8"]})
    async with trio.open_nursery() as nursery:
        watcher, node = await _dht_node(nursery), await _dht_node(nursery)
        seen = LanDiscovery(
            watcher.env, watcher, None, watcher.identity, interfaces=[LOOPBACK], service_type=service_type
        )
        await nursery.start(seen.run)
        lan = LanDiscovery(
            node.env, node, None, node.identity, interfaces=["lo"], service_type=service_type, adapters=machine,
            address_check_interval=0.05,
        )  # fmt: skip
        await nursery.start(lan.run)
        with trio.fail_after(DEADLINE):
            await _until(lambda: lan.name in seen.peers)

        # lo gains an address: mDNS follows the interface (Zeroconf.update_interfaces).
        machine.interfaces["lo"] = ["127.0.0.1/8", "127.0.0.2/8"]
        with trio.fail_after(DEADLINE):
            await _until(lambda: lan.addresses == ["127.0.0.1", "127.0.0.2"])

        # The node's address leaves the machine: a goodbye, and the peer drops it.
        machine.interfaces["lo"] = []
        with trio.fail_after(DEADLINE):
            await _until(lambda: lan.name not in seen.peers and lan.announcing is None)
        assert lan.stats.withdrawn == 1
        assert seen.stats.removed == 1
        assert lan.addresses == ["127.0.0.1", "127.0.0.2"]  # nothing to move mDNS to meanwhile

        # It comes back: announced again, and found again.
        machine.interfaces["lo"] = ["127.0.0.1/8"]
        back = Announcement((LOOPBACK,), node.address.port, 0)
        with trio.fail_after(DEADLINE):
            await _until(lambda: lan.name in seen.peers and lan.announcing == back)
        assert lan.stats.reannounced == 1
        assert lan.addresses == [LOOPBACK]
        nursery.cancel_scope.cancel()


@pytest.mark.realnet
async def test_hostile_announcements_are_counted_and_ignored() -> None:
    service_type = lan_service_type()
    rng_env = Env.real()
    mallory = Identity.generate(rng_env.random_bytes).public
    victim = Identity.generate(rng_env.random_bytes).public
    v6_only = Identity.generate(rng_env.random_bytes).public
    async with trio.open_nursery() as nursery:
        honest = [await _dht_node(nursery) for _ in range(2)]
        lan = LanDiscovery(
            honest[0].env, honest[0], None, honest[0].identity, interfaces=[LOOPBACK], service_type=service_type
        )
        await nursery.start(lan.run)
        async with _hostile_zeroconf() as zc:
            # 1. A TXT whose key is not the key of the node id it names (and the label is that id).
            mismatched = dict(encode_txt(mallory, udp_port=honest[1].address.port, tcp_port=0))
            mismatched[b"key"] = victim.key.hex().encode()
            # 2. Garbage TXT bytes.
            garbage = b"\x05v=999\xffid=\x00\x00" + bytes(range(40))
            # 3. Oversized: a record over MAX_TXT_BYTES made of strings each within the limits, and more keys
            #    than allowed.
            pads = {b"pad%d" % i: b"p" * MAX_TXT_VALUE_BYTES for i in range(6)}
            oversized = _raw_txt({**encode_txt(mallory, udp_port=9, tcp_port=0), **pads})
            assert len(oversized) > MAX_TXT_BYTES and len(pads) + 5 <= MAX_TXT_KEYS
            too_many = {
                **encode_txt(mallory, udp_port=9, tcp_port=0),
                **{b"k%d" % i: b"1" for i in range(MAX_TXT_KEYS)},
            }
            # 4. A well-formed announcement of someone else's id at an address where another node answers.
            impostor = encode_txt(victim, udp_port=honest[1].address.port, tcp_port=0)
            # 5. Well formed, but with IPv6 addresses only (not used yet): nothing to verify.
            v6 = encode_txt(v6_only, udp_port=honest[1].address.port, tcp_port=0)
            announcements: list[tuple[str, dict[bytes, bytes] | bytes, list[bytes] | None]] = [
                (mallory.node_id.hex(), mismatched, None),
                ("garbage", garbage, None),
                ("oversized", oversized, None),
                ("toomany", too_many, None),
                (victim.node_id.hex(), impostor, None),
                (v6_only.node_id.hex(), v6, [socket.inet_pton(socket.AF_INET6, "::1")]),
            ]
            with trio.fail_after(DEADLINE):
                for label, props, addresses in announcements:
                    info = _service(label, props, 9, service_type, addresses)
                    await trio.to_thread.run_sync(zc.register_service, info)
                await _until(lambda: lan.stats.invalid >= 4 and lan.stats.unverified >= 2)
        assert lan.stats.invalid == 4
        assert lan.stats.unverified == 2
        assert lan.peers == {}
        # The node that answered the impostor's ping proved its own id, so it is a contact -- under its own id.
        assert {c.node_id for c in honest[0].contacts()} == {honest[1].node_id}
        assert victim.node_id not in {c.node_id for c in honest[0].contacts()}
        nursery.cancel_scope.cancel()


FLOOD = 3 * MAX_PENDING_EVENTS
"""Announcements in the flood: more than the bridge holds and many times the verifications run at once."""


@pytest.mark.realnet
async def test_a_flood_of_announcements_is_counted_bounded_and_survived() -> None:
    assert FLOOD > MAX_PENDING_EVENTS + MAX_CONCURRENT_VERIFICATIONS
    service_type = lan_service_type()
    async with trio.open_nursery() as nursery:
        node = await _dht_node(nursery)
        lan = LanDiscovery(node.env, node, None, node.identity, interfaces=[LOOPBACK], service_type=service_type)
        await nursery.start(lan.run)
        async with _hostile_zeroconf() as zc:

            def flood() -> None:
                # Unsolicited announcements, as fast as they can be sent and several to a packet: no probing,
                # nothing registered.  (One to a packet, the burst overflows the receiving socket's kernel buffer
                # and the kernel drops the excess before zeroconf sees it; packed, it is 36 packets of 51 KB.)
                infos = [_service(f"flood{i}", {b"v": b"1", b"junk": b"x" * 40}, 9, service_type) for i in range(FLOOD)]
                out = zc.generate_service_broadcast(infos[0], None)
                for info in infos[1:]:
                    for record in (info.dns_pointer(), info.dns_service(), info.dns_text(), *info.dns_addresses()):
                        out.add_answer_at_time(record, 0)
                zc.send(out)

            await trio.to_thread.run_sync(flood)

            # Every flooding service is accounted for: its first event was either dropped at the bridge or led to
            # a verification that refused its TXT.  (Later events of a service -- records split over packets
            # arrive as updates -- may add counts or merge into a verification under way.)
            def accounted() -> bool:
                stats = lan.stats
                return stats.events >= FLOOD and stats.invalid + stats.unresolved + stats.events_dropped >= FLOOD

            with trio.fail_after(DEADLINE):
                await _until(accounted)
        assert lan.peers == {}
        assert lan.stats.unverified == lan.stats.verified == 0
        assert len(lan._inflight) <= MAX_CONCURRENT_VERIFICATIONS

        # Discovery still works: an honest node that appears after the flood is found and verified.
        honest = await _dht_node(nursery)
        other = LanDiscovery(
            honest.env, honest, None, honest.identity, interfaces=[LOOPBACK], service_type=service_type
        )
        await nursery.start(other.run)
        with trio.fail_after(DEADLINE):
            await _until(lambda: other.name in lan.peers)
        assert {p.node_id for p in lan.peers.values()} == {honest.node_id}
        nursery.cancel_scope.cancel()


@pytest.mark.realnet
async def test_two_nodes_meet_on_the_lan_and_chat_with_no_bootstrap_and_a_goodbye_takes_the_hint_back() -> None:
    config = DhtConfig.single_host()
    service_type = lan_service_type()
    async with trio.open_nursery() as nursery:
        users: list[Node] = []
        lans: list[LanDiscovery] = []
        scopes: list[trio.CancelScope] = []
        for _ in range(2):
            env = Env.real()
            node = Node(env, Identity.generate(env.random_bytes), host=LOOPBACK, dht_config=config)
            await nursery.start(node.run)
            lan = LanDiscovery(
                env, node.dht, node.messenger, node.identity, interfaces=[LOOPBACK], service_type=service_type
            )
            scopes.append(await _start_in_own_scope(nursery, lan.run))
            users.append(node)
            lans.append(lan)
        alice, bob = users
        with trio.fail_after(DEADLINE):
            await _until(lambda: all(len(lan.peers) == 1 for lan in lans))
            peer = next(iter(lans[0].peers.values()))
            assert peer.identity.key == bob.key and peer.tcp == bob.messenger.tcp_address
            assert alice.messenger.hints(bob.key) == [bob.messenger.tcp_address]
            alice.add_contact("bob", bob.address)
            bob.add_contact("alice", alice.address)
            alice.send("bob", "hello over the LAN")
            while True:
                event = await bob.events.receive()
                if isinstance(event, IncomingMessage):
                    break
            # Bob's task may see the message before Alice's resumes after the send and counts it.
            await _until(lambda: alice.messenger.stats.sent_direct >= 1)
        assert event.message.text == "hello over the LAN"
        assert alice.messenger.stats.stored_in_mailbox == 0

        scopes[1].cancel()  # Bob's discovery says goodbye: Alice drops him and forgets his LAN address
        with trio.fail_after(DEADLINE):
            await _until(lambda: lans[0].peers == {})
        assert alice.messenger.hints(bob.key) == []
        nursery.cancel_scope.cancel()
