"""RealNetwork: UDP and TCP on 127.0.0.1 and ::1, and the allow-list that keeps tests on loopback.

These tests use real sockets, so they wait for events with deadlines (``trio.fail_after``), never fixed sleeps.
"""

from __future__ import annotations

import os

import pytest
import trio

from p2pchat.errors import ConnectError, DestinationNotAllowedError, UserError
from p2pchat.net import Address, parse_address
from p2pchat.net.base import DatagramEndpoint
from p2pchat.net.real import (
    ALLOW_ENV_VAR,
    MAX_DATAGRAMS_PER_BATCH,
    MAX_SOCKETS_PER_POLL,
    POLLED_DATAGRAMS_PER_TURN,
    AllowList,
    RealNetwork,
)

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


class _Inbox:
    """What one served endpoint received, and a way to wait until it holds a given number of datagrams."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.got: list[bytes] = []
        self.fail_on = fail_on
        self._changed = trio.Event()

    def deliver(self, data: bytes, source: Address) -> None:
        del source
        if data == self.fail_on:
            raise ValueError("this deliver refuses " + data.decode())
        self.got.append(data)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.got) < count:
            await self._changed.wait()


async def _serve(
    endpoint: DatagramEndpoint, inbox: _Inbox, ended: list[BaseException], finished: trio.Event | None = None
) -> None:
    try:
        await endpoint.serve(inbox.deliver)
    except (trio.ClosedResourceError, ValueError) as exc:
        ended.append(exc)
    if finished is not None:
        finished.set()


async def test_every_endpoint_is_served_while_others_close_whichever_polls_for_them(network: RealNetwork) -> None:
    # All endpoints of one network share one poller that runs in one of their tasks.  Closing them one by one
    # closes the polling one at some point: the others must go on receiving whatever the order.
    async with await network.open_datagram("127.0.0.1") as client:
        endpoints = [await network.open_datagram("127.0.0.1") for _ in range(4)]
        inboxes = [_Inbox() for _ in endpoints]
        ended: list[list[BaseException]] = [[] for _ in endpoints]
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                for endpoint, inbox, errors in zip(endpoints, inboxes, ended, strict=True):
                    nursery.start_soon(_serve, endpoint, inbox, errors)
                await trio.testing.wait_all_tasks_blocked()
                for round_ in range(len(endpoints)):
                    open_ones = endpoints[round_:]
                    for endpoint in open_ones:
                        client.send(b"round %d" % round_, endpoint.local_address)
                    for inbox in inboxes[round_:]:
                        await inbox.wait_for(round_ + 1)
                    await endpoints[round_].aclose()
        for i, inbox in enumerate(inboxes):
            assert inbox.got == [b"round %d" % r for r in range(i + 1)]
            assert len(ended[i]) == 1
            assert isinstance(ended[i][0], trio.ClosedResourceError)
        # With every endpoint gone, a new one is served again.
        async with await network.open_datagram("127.0.0.1") as fresh:
            inbox, errors = _Inbox(), []
            with trio.fail_after(DEADLINE):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_serve, fresh, inbox, errors)
                    client.send(b"again", fresh.local_address)
                    await inbox.wait_for(1)
                    nursery.cancel_scope.cancel()
            assert inbox.got == [b"again"]


@pytest.mark.parametrize("failing_first", [True, False], ids=["failing-one-polls", "other-one-polls"])
async def test_an_error_in_deliver_ends_only_that_endpoints_serve(network: RealNetwork, failing_first: bool) -> None:
    async with (
        await network.open_datagram("127.0.0.1") as client,
        await network.open_datagram("127.0.0.1") as failing,
        await network.open_datagram("127.0.0.1") as healthy,
    ):
        bad_inbox, good_inbox = _Inbox(fail_on=b"boom"), _Inbox()
        bad_ended: list[BaseException] = []
        good_ended: list[BaseException] = []
        bad_finished = trio.Event()
        order = [(failing, bad_inbox, bad_ended, bad_finished), (healthy, good_inbox, good_ended, None)]
        if not failing_first:
            order.reverse()
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                for args in order:
                    nursery.start_soon(_serve, *args)
                    await trio.testing.wait_all_tasks_blocked()  # the first one started polls for both
                client.send(b"boom", failing.local_address)
                await bad_finished.wait()
                client.send(b"still here", healthy.local_address)
                await good_inbox.wait_for(1)
                nursery.cancel_scope.cancel()
        assert [str(e) for e in bad_ended] == ["this deliver refuses boom"]
        assert good_ended == []
        assert good_inbox.got == [b"still here"]


async def test_a_cancelled_serve_hands_the_polling_on(network: RealNetwork) -> None:
    async with (
        await network.open_datagram("127.0.0.1") as client,
        await network.open_datagram("127.0.0.1") as first,
        await network.open_datagram("127.0.0.1") as second,
    ):
        first_inbox, second_inbox = _Inbox(), _Inbox()
        errors: list[BaseException] = []
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                first_scope = trio.CancelScope()

                async def serve_first() -> None:
                    with first_scope:
                        await _serve(first, first_inbox, errors)

                nursery.start_soon(serve_first)  # the first to serve polls for both
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(_serve, second, second_inbox, errors)
                await trio.testing.wait_all_tasks_blocked()
                first_scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                client.send(b"after the cancel", second.local_address)
                await second_inbox.wait_for(1)
                nursery.cancel_scope.cancel()
        assert second_inbox.got == [b"after the cancel"]
        assert first_inbox.got == []
        assert errors == []


async def test_a_flooded_endpoint_does_not_keep_the_others_waiting(network: RealNetwork) -> None:
    # One datagram per readable socket per round: a socket with a thousand queued costs the others one each.
    async with (
        await network.open_datagram("127.0.0.1") as client,
        await network.open_datagram("127.0.0.1") as flooded,
        await network.open_datagram("127.0.0.1") as quiet,
    ):
        arrivals: list[bytes] = []
        done = trio.Event()
        flood = 200  # well inside the default socket buffer, whatever the machine's limits

        def deliver(data: bytes, source: Address) -> None:
            del source
            arrivals.append(data)
            if len(arrivals) == flood + 1:
                done.set()

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flooded.serve, deliver)
                nursery.start_soon(quiet.serve, deliver)
                await trio.testing.wait_all_tasks_blocked()
                # Loopback queues each datagram inside sendto: all are waiting before the poller runs again.
                for i in range(flood):
                    client.send(b"flood %d" % i, flooded.local_address)
                client.send(b"quiet", quiet.local_address)
                await done.wait()
                nursery.cancel_scope.cancel()
        assert arrivals.index(b"quiet") <= 1
        assert [d for d in arrivals if d != b"quiet"] == [b"flood %d" % i for i in range(flood)]
        assert flooded.stats.received == flood
        assert quiet.stats.received == 1


async def test_more_readable_sockets_than_one_poll_takes_are_all_served(network: RealNetwork) -> None:
    async with await network.open_datagram("127.0.0.1") as client:
        endpoints = [await network.open_datagram("127.0.0.1") for _ in range(MAX_SOCKETS_PER_POLL + 20)]
        arrivals: list[bytes] = []
        done = trio.Event()

        def deliver(data: bytes, source: Address) -> None:
            del source
            arrivals.append(data)
            if len(arrivals) == len(endpoints):
                done.set()

        try:
            with trio.fail_after(DEADLINE):
                async with trio.open_nursery() as nursery:
                    for endpoint in endpoints:
                        nursery.start_soon(endpoint.serve, deliver)
                    await trio.testing.wait_all_tasks_blocked()
                    for i, endpoint in enumerate(endpoints):
                        client.send(b"%d" % i, endpoint.local_address)
                    await done.wait()
                    nursery.cancel_scope.cancel()
        finally:
            for endpoint in endpoints:
                await endpoint.aclose()
        assert sorted(arrivals, key=int) == [b"%d" % i for i in range(len(endpoints))]


async def test_the_poller_lets_other_tasks_run_between_turns(network: RealNetwork) -> None:
    async with await network.open_datagram("127.0.0.1") as client, await network.open_datagram("127.0.0.1") as server:
        count = 3 * POLLED_DATAGRAMS_PER_TURN
        ticks = 0
        ticks_seen: list[int] = []
        done = trio.Event()

        def deliver(data: bytes, source: Address) -> None:
            del data, source
            ticks_seen.append(ticks)
            if len(ticks_seen) == count:
                done.set()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await trio.lowlevel.checkpoint()
                ticks += 1

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve, deliver)
                await trio.testing.wait_all_tasks_blocked()
                for i in range(count):
                    client.send(b"%d" % i, server.local_address)
                nursery.start_soon(ticker)
                await done.wait()
                nursery.cancel_scope.cancel()
        # No other task runs inside a turn; between turns, they do.
        changes = [i for i in range(1, count) if ticks_seen[i] != ticks_seen[i - 1]]
        assert changes
        assert all(i % POLLED_DATAGRAMS_PER_TURN == 0 for i in changes)


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
