"""LAN discovery: the thread bridge under a flood, interface resolution, and real zeroconf on 127.0.0.1 -- three
DHT nodes with no bootstrap find each other, hostile announcements are counted and ignored, a clean shutdown is a
goodbye, and two whole Nodes chat after meeting on the LAN.

Every Zeroconf here is bound to 127.0.0.1 only.  zeroconf's probing and announcing run on the wall clock, so the
real-network tests wait for a condition with a deadline (polling it every 50 ms); nothing sleeps as a substitute
for synchronisation.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import ifaddr
import pytest
import trio
from zeroconf import IPVersion, ServiceInfo, ServiceStateChange, Zeroconf

from p2pchat.core.identity import Identity
from p2pchat.core.lan import SERVICE_TYPE, encode_txt, service_name
from p2pchat.dht.node import DhtConfig, DhtNode
from p2pchat.env import Env
from p2pchat.errors import UserError
from p2pchat.lan.discovery import MAX_LAN_PEERS, EventBridge, LanDiscovery, LanPeer, resolve_interfaces
from p2pchat.messaging.messenger import IncomingMessage
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
    assert len(delivered) + bridge.dropped == flood
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


# --- real zeroconf on 127.0.0.1 ---------------------------------------------------------------------------------


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for *condition*, which zeroconf's wall-clock timers make true, under the caller's deadline."""
    while not condition():
        await trio.sleep(0.05)


async def _dht_node(nursery: trio.Nursery) -> DhtNode:
    env = Env.real()
    node = DhtNode(env, Identity.generate(env.random_bytes), host=LOOPBACK, config=DhtConfig.single_host())
    await nursery.start(node.run)
    return node


@asynccontextmanager
async def _hostile_zeroconf() -> AsyncIterator[Zeroconf]:
    zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only))
    try:
        yield zc
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(zc.close)


def _service(label: str, properties: dict[bytes, bytes] | bytes, port: int) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(LOOPBACK)],
        port=port,
        properties=properties,
        server=f"{label}.local.",
    )


@pytest.mark.realnet
async def test_three_nodes_with_no_bootstrap_find_each_other_and_a_goodbye_drops_one() -> None:
    async with trio.open_nursery() as nursery:
        nodes = [await _dht_node(nursery) for _ in range(3)]
        lans = [LanDiscovery(n.env, n, None, n.identity, interfaces=[LOOPBACK]) for n in nodes]
        scopes = []
        for lan in lans[:2]:
            await nursery.start(lan.run)
        # The third runs in its own scope so that it alone can be shut down cleanly.
        third = trio.CancelScope()
        scopes.append(third)

        async def run_third(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with third:
                await lans[2].run(task_status=task_status)

        await nursery.start(run_third)

        with trio.fail_after(DEADLINE):
            await _until(lambda: all(len(lan.peers) == 2 for lan in lans))
        for node, lan in zip(nodes, lans, strict=True):
            others = {n.node_id for n in nodes if n is not node}
            assert {c.node_id for c in node.contacts()} == others
            assert {p.node_id for p in lan.peers.values()} == others
            assert all(p.udp.host == LOOPBACK and p.tcp is None for p in lan.peers.values())
            assert lan.stats.invalid == lan.stats.unverified == lan.stats.events_dropped == 0

        third.cancel()  # a clean shutdown: unregister (goodbye), then close
        with trio.fail_after(DEADLINE):
            await _until(lambda: all(len(lan.peers) == 1 for lan in lans[:2]))
        gone = service_name(nodes[2].node_id)
        assert all(gone not in lan.peers for lan in lans[:2])
        assert all(lan.stats.removed == 1 for lan in lans[:2])
        nursery.cancel_scope.cancel()


@pytest.mark.realnet
async def test_hostile_announcements_are_counted_and_ignored() -> None:
    rng_env = Env.real()
    mallory = Identity.generate(rng_env.random_bytes).public
    victim = Identity.generate(rng_env.random_bytes).public
    async with trio.open_nursery() as nursery:
        honest = [await _dht_node(nursery) for _ in range(2)]
        lan = LanDiscovery(honest[0].env, honest[0], None, honest[0].identity, interfaces=[LOOPBACK])
        await nursery.start(lan.run)
        async with _hostile_zeroconf() as zc:
            # 1. A TXT whose key is not the key of the node id it names (and the label is that id).
            mismatched = dict(encode_txt(mallory, udp_port=honest[1].address.port, tcp_port=0))
            mismatched[b"key"] = victim.key.hex().encode()
            # 2. Garbage TXT bytes.
            garbage = b"\x05v=999\xffid=\x00\x00" + bytes(range(40))
            # 3. A well-formed announcement of someone else's id at an address where another node answers.
            impostor = encode_txt(victim, udp_port=honest[1].address.port, tcp_port=0)
            with trio.fail_after(DEADLINE):
                announcements: list[tuple[str, dict[bytes, bytes] | bytes]] = [
                    (mallory.node_id.hex(), mismatched),
                    ("garbage", garbage),
                    (victim.node_id.hex(), impostor),
                ]
                for label, props in announcements:
                    await trio.to_thread.run_sync(zc.register_service, _service(label, props, 9))
                await _until(lambda: lan.stats.invalid >= 2 and lan.stats.unverified >= 1)
        assert lan.stats.invalid == 2
        assert lan.stats.unverified == 1
        assert lan.peers == {}
        # The node that answered the impostor's ping proved its own id, so it is a contact -- under its own id.
        assert {c.node_id for c in honest[0].contacts()} == {honest[1].node_id}
        assert victim.node_id not in {c.node_id for c in honest[0].contacts()}
        nursery.cancel_scope.cancel()


@pytest.mark.realnet
async def test_two_nodes_meet_on_the_lan_and_chat_with_no_bootstrap() -> None:
    config = DhtConfig.single_host()
    async with trio.open_nursery() as nursery:
        users: list[Node] = []
        lans: list[LanDiscovery] = []
        for _ in range(2):
            env = Env.real()
            node = Node(env, Identity.generate(env.random_bytes), host=LOOPBACK, dht_config=config)
            await nursery.start(node.run)
            lan = LanDiscovery(env, node.dht, node.messenger, node.identity, interfaces=[LOOPBACK])
            await nursery.start(lan.run)
            users.append(node)
            lans.append(lan)
        alice, bob = users
        with trio.fail_after(DEADLINE):
            await _until(lambda: all(len(lan.peers) == 1 for lan in lans))
            peer = next(iter(lans[0].peers.values()))
            assert peer.identity.key == bob.key and peer.tcp == bob.messenger.tcp_address
            alice.add_contact("bob", bob.address)
            bob.add_contact("alice", alice.address)
            alice.send("bob", "hello over the LAN")
            while True:
                event = await bob.events.receive()
                if isinstance(event, IncomingMessage):
                    break
        assert event.message.text == "hello over the LAN"
        assert alice.messenger.stats.sent_direct >= 1
        nursery.cancel_scope.cancel()
