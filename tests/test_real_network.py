"""RealNetwork: UDP and TCP on 127.0.0.1 and ::1, and the allow-list that keeps tests on loopback.

These tests use real sockets, so they wait for events with deadlines (``trio.fail_after``), never fixed sleeps.
"""

from __future__ import annotations

import os

import pytest
import trio

from p2pchat.errors import ConnectError, DestinationNotAllowedError, UserError
from p2pchat.net import Address, parse_address
from p2pchat.net.real import ALLOW_ENV_VAR, MAX_DATAGRAMS_PER_BATCH, AllowList, RealNetwork

DEADLINE = 10.0
LOOPBACKS = ["127.0.0.1", "::1"]


@pytest.fixture
def network() -> RealNetwork:
    return RealNetwork(["127.0.0.0/8", "::1/128"])


@pytest.mark.parametrize("host", LOOPBACKS)
async def test_udp_echo(network: RealNetwork, host: str) -> None:
    async with await network.open_datagram(host) as server, await network.open_datagram(host) as client:
        assert server.local_address.host == host
        assert server.local_address.port > 0

        async def echo() -> None:
            data, source = await server.receive()
            server.send(data.upper(), source)

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo)
                client.send(b"hello", server.local_address)
                data, source = await client.receive()
        assert (data, source) == (b"HELLO", server.local_address)
        assert client.stats.sent == 1
        assert client.stats.received == 1


async def test_udp_receive_batch_drains_what_has_arrived(network: RealNetwork) -> None:
    async with await network.open_datagram("127.0.0.1") as server, await network.open_datagram("127.0.0.1") as client:
        count = MAX_DATAGRAMS_PER_BATCH + 50
        for i in range(count):
            client.send(i.to_bytes(2, "big"), server.local_address)
        got: list[int] = []
        with trio.fail_after(DEADLINE):
            # Loopback queues every datagram inside sendto, so all of them are waiting now.
            first = await server.receive_batch()
            assert len(first) == MAX_DATAGRAMS_PER_BATCH
            got.extend(int.from_bytes(d, "big") for d, _ in first)
            while len(got) < count:
                batch = await server.receive_batch()
                assert len(batch) <= MAX_DATAGRAMS_PER_BATCH
                got.extend(int.from_bytes(d, "big") for d, _ in batch)
        assert sorted(got) == list(range(count))


async def test_udp_close_wakes_receiver(network: RealNetwork) -> None:
    endpoint = await network.open_datagram("127.0.0.1")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:

            async def receiver() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await endpoint.receive_batch()

            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await endpoint.aclose()
    with pytest.raises(trio.ClosedResourceError):
        endpoint.send(b"x", Address("127.0.0.1", 9))


@pytest.mark.parametrize("host", LOOPBACKS)
async def test_tcp_echo(network: RealNetwork, host: str) -> None:
    async with await network.open_listener(host) as listener:

        async def serve_one() -> None:
            stream = await listener.accept()
            async with stream:
                data = b""
                while not data.endswith(b"\n"):
                    data += await stream.receive_some()
                await stream.send_all(data.upper())
                await stream.send_eof()

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_one)
                stream = await network.connect(listener.local_address)
                async with stream:
                    assert stream.remote_address == listener.local_address
                    assert stream.local_address.host == host
                    await stream.send_all(b"hello over tcp\n")
                    reply = b""
                    while chunk := await stream.receive_some():
                        reply += chunk
        assert reply == b"HELLO OVER TCP\n"


async def test_connect_refused_is_a_connect_error(network: RealNetwork) -> None:
    async with await network.open_listener("127.0.0.1") as listener:
        port = listener.local_address.port
    with trio.fail_after(DEADLINE), pytest.raises(ConnectError, match="cannot connect"):
        await network.connect(Address("127.0.0.1", port))


@pytest.mark.parametrize("destination", ["192.0.2.1", "10.0.0.1", "8.8.8.8", "2001:db8::1", "fe80::1"])
async def test_allow_list_refuses_other_destinations(network: RealNetwork, destination: str) -> None:
    async with await network.open_datagram("127.0.0.1" if ":" not in destination else "::1") as endpoint:
        with pytest.raises(DestinationNotAllowedError, match=destination):
            endpoint.send(b"must not leave this machine", Address(destination, 4000))
        assert endpoint.stats.sent == 0
    with pytest.raises(DestinationNotAllowedError):
        await network.connect(Address(destination, 4000))


def test_suite_default_allow_list_is_loopback_only() -> None:
    # conftest sets the variable; a RealNetwork built without an explicit list must pick it up.

    assert os.environ[ALLOW_ENV_VAR] == "127.0.0.0/8,::1/128"
    default = RealNetwork()
    assert default.allow.allows("127.0.0.1")
    assert default.allow.allows("::1")
    assert not default.allow.allows("192.168.1.1")
    assert not default.allow.allows("not an ip")


def test_allow_list_everywhere_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_ENV_VAR)
    assert AllowList.from_environment().allows("203.0.113.5")
    assert str(AllowList(None)) == "(everywhere)"


async def test_binding_a_host_name_is_refused(network: RealNetwork) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        await network.open_datagram("localhost")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:4000", Address("127.0.0.1", 4000)), ("[::1]:53", Address("::1", 53)), (" 10.0.0.2:1 ", None)],
)
def test_parse_address(text: str, expected: Address | None) -> None:
    assert parse_address(text) == (expected or Address("10.0.0.2", 1))


@pytest.mark.parametrize("text", ["127.0.0.1", "host:4000", "127.0.0.1:0", "127.0.0.1:70000", "[::1]", ":4000"])
def test_parse_address_errors_name_the_problem(text: str) -> None:
    with pytest.raises(UserError, match="address"):
        parse_address(text)
