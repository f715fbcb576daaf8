"""The direct channel's trio shell on SimNetwork (virtual time) and once on real loopback sockets."""

from __future__ import annotations

import errno
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from p2pchat.core.framing import MAX_STREAM_FRAME, FrameDecoder, encode_frame
from p2pchat.core.handshake import MAX_HANDSHAKE_MESSAGE, Handshake
from p2pchat.core.identity import Identity
from p2pchat.env import Env
from p2pchat.errors import ProtocolError
from p2pchat.messaging import (
    ACCEPT_RETRY_DELAY,
    CLOSE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CHANNEL_FRAME,
    MAX_CONNECTIONS,
    Channel,
    ChannelHandler,
    ChannelServerStats,
    HandshakeTimeoutError,
    IdleTimeoutError,
    open_channel,
    serve_channels,
)
from p2pchat.net.base import Address, Listener, Stream
from p2pchat.net.sim import Constant, LinkModel, SimHost, SimNetwork, open_sim_network

ALICE = Identity.from_seed(bytes([1]) * 32)
BOB = Identity.from_seed(bytes([2]) * 32)
MALLORY = Identity.from_seed(bytes([3]) * 32)

LATENCY = 0.010
PORT = 7000
DEADLINE = 10.0


def _random(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


async def _echo(channel: Channel) -> None:
    async for message in channel:
        await channel.send(message)


@asynccontextmanager
async def _network(seed: int) -> AsyncIterator[tuple[SimNetwork, SimHost, SimHost]]:
    async with open_sim_network(seed, default_link=LinkModel(latency=Constant(LATENCY)), time_resolution=0) as net:
        yield net, net.add_host(), net.add_host()


@asynccontextmanager
async def _server(
    host: SimHost, handler: ChannelHandler = _echo, **options: Any
) -> AsyncIterator[tuple[Address, ChannelServerStats]]:
    """Bob serving channels on *host*; yields where to connect and the server's counters."""
    listener = await host.open_listener(host.address, PORT)
    stats = ChannelServerStats()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_channels, listener, BOB, _random(2), handler, stats=stats, **options))
        yield listener.local_address, stats
        nursery.cancel_scope.cancel()


async def _connect(client: SimHost, address: Address, seed: int = 1, **options: Any) -> Channel:
    stream = await client.connect(address)
    return await open_channel(stream, ALICE, _random(seed), initiator=True, **options)


async def _read_frame(stream: Stream) -> bytes:
    """One frame read off a raw stream (whatever follows it in the same read is dropped)."""
    decoder = FrameDecoder()
    while (frame := decoder.next_frame()) is None:
        decoder.feed(await stream.receive_some())
    return frame


async def _wait_for(condition: Callable[[], bool]) -> None:
    """Let virtual time pass until *condition* holds (bounded by the caller's fail_after)."""
    while not condition():
        await trio.sleep(LATENCY)


# --- the happy path ---------------------------------------------------------------------------------------------


async def test_two_channels_exchange_1000_frames_both_ways(autojump_clock: trio.testing.MockClock) -> None:
    count = 1000
    received_by_bob: list[bytes] = []

    def frame(sender: bytes, index: int) -> bytes:
        return sender + index.to_bytes(4, "big") + bytes(195)  # 200 bytes

    async def talk(channel: Channel, me: bytes, received: list[bytes]) -> None:
        async def send_all() -> None:
            for i in range(count):
                await channel.send(frame(me, i))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            for _ in range(count):
                received.append(await channel.receive())

    async def bob(channel: Channel) -> None:
        assert channel.peer == ALICE.public
        await talk(channel, b"B", received_by_bob)

    received_by_alice: list[bytes] = []
    async with _network(1) as (_, client, server_host), _server(server_host, bob) as (address, stats):
        channel = await _connect(client, address, expected_peer=BOB.public.key)
        assert channel.peer == BOB.public
        await talk(channel, b"A", received_by_alice)
        assert channel.frames_sent == channel.frames_received == count
        await channel.aclose()
        with trio.fail_after(DEADLINE):
            await _wait_for(lambda: stats.active == 0)
    assert received_by_alice == [frame(b"B", i) for i in range(count)]
    assert received_by_bob == [frame(b"A", i) for i in range(count)]
    assert (stats.established, stats.channel_errors) == (1, 0)


async def test_largest_message_crosses_the_network(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(2) as (_, client, server_host), _server(server_host) as (address, _):
        channel = await _connect(client, address)
        largest = random.Random(5).randbytes(MAX_CHANNEL_FRAME)
        await channel.send(largest)
        assert await channel.receive() == largest
        with pytest.raises(ValueError, match=str(MAX_CHANNEL_FRAME)):
            await channel.send(largest + b"!")
        await channel.aclose()


async def test_clean_close_is_end_of_channel(autojump_clock: trio.testing.MockClock) -> None:
    async def bob(channel: Channel) -> None:
        await channel.send(b"bye")  # then the server closes the channel: a close frame

    async with _network(3) as (_, client, server_host), _server(server_host, bob) as (address, stats):
        channel = await _connect(client, address)
        assert [message async for message in channel] == [b"bye"]
        with pytest.raises(trio.EndOfChannel):
            await channel.receive()
        await channel.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await channel.send(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await channel.receive()
        await channel.aclose()  # idempotent
    assert stats.channel_errors == 0


async def test_connection_cut_without_close_frame_is_broken(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(4) as (_, client, server_host):
        listener = await server_host.open_listener(server_host.address, PORT)
        stream = await client.connect(listener.local_address)
        server_stream = await listener.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(open_channel, server_stream, BOB, _random(2), initiator=False))
            channel = await open_channel(stream, ALICE, _random(1), initiator=True)
        await server_stream.aclose()  # an attacker's FIN, or a crash: no authenticated close
        with pytest.raises(trio.BrokenResourceError, match="without the peer's close frame"):
            await channel.receive()


# --- timeouts ---------------------------------------------------------------------------------------------------


async def test_silent_peer_is_dropped_after_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(5) as (_, client, server_host), _server(server_host) as (address, stats):
        silent = await client.connect(address)
        start = trio.current_time()
        assert await silent.receive_some() == b""  # the server hangs up on us
        assert trio.current_time() - start == pytest.approx(HANDSHAKE_TIMEOUT, abs=2 * LATENCY)
        assert (stats.handshake_timeouts, stats.active) == (1, 0)
        channel = await _connect(client, address)  # and keeps serving
        await channel.send(b"still there?")
        assert await channel.receive() == b"still there?"
        await channel.aclose()


async def test_trickling_peer_is_dropped_after_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    # The timeout covers the whole handshake, not each read: a byte a second does not keep a slot open.
    async with _network(6) as (_, client, server_host), _server(server_host) as (address, stats):
        slow = await client.connect(address)
        start = trio.current_time()
        with trio.fail_after(2 * HANDSHAKE_TIMEOUT):
            with pytest.raises(trio.BrokenResourceError):
                for byte in encode_frame(bytes(MAX_HANDSHAKE_MESSAGE)):
                    await slow.send_all(bytes((byte,)))
                    await trio.sleep(1.0)
        assert trio.current_time() - start <= HANDSHAKE_TIMEOUT + 2.0
        assert stats.handshake_timeouts == 1


async def test_initiator_times_out_on_a_silent_responder(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(7) as (_, client, server_host):
        listener = await server_host.open_listener(server_host.address, PORT)
        stream = await client.connect(listener.local_address)
        peer_end = await listener.accept()
        start = trio.current_time()
        with pytest.raises(HandshakeTimeoutError, match="did not complete"):
            await open_channel(stream, ALICE, _random(1), initiator=True)
        assert trio.current_time() - start == pytest.approx(HANDSHAKE_TIMEOUT)
        assert await peer_end.receive_some() != b""  # message 1 arrived ...
        assert await peer_end.receive_some() == b""  # ... and then our close


async def test_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    speak = trio.Event()

    async def bob(channel: Channel) -> None:
        await speak.wait()
        await channel.send(b"finally")
        await channel.receive()

    async with _network(8) as (_, client, server_host), _server(server_host, bob) as (address, _):
        channel = await _connect(client, address)
        start = trio.current_time()
        with pytest.raises(IdleTimeoutError, match="nothing arrived"):
            await channel.receive()
        assert trio.current_time() - start == pytest.approx(IDLE_TIMEOUT)
        # The channel survives a timeout: the caller chose to keep waiting.
        speak.set()
        assert await channel.receive() == b"finally"
        await channel.aclose()


async def test_receive_each_until_close_and_its_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    # receive_each moves its deadline at most every half idle timeout: a peer that speaks now and then is never
    # timed out, and one that goes quiet is, between half the timeout and the whole of it after its last message.
    quiet = trio.Event()

    async def bob(channel: Channel) -> None:
        for i in range(5):
            await channel.send(b"tick %d" % i)
            await trio.sleep(IDLE_TIMEOUT * 0.4)
        quiet.set()
        await trio.sleep_forever()

    async with _network(21) as (_, client, server_host), _server(server_host, bob) as (address, _):
        start = trio.current_time()
        channel = await _connect(client, address)
        got: list[bytes] = []
        with pytest.raises(IdleTimeoutError, match="nothing arrived"):
            await channel.receive_each(got.append)
        assert got == [b"tick %d" % i for i in range(5)]
        assert quiet.is_set()
        last = 4 * IDLE_TIMEOUT * 0.4
        assert last + IDLE_TIMEOUT / 2 <= trio.current_time() - start <= last + IDLE_TIMEOUT + 1.0
        await channel.aclose()

    async def alice_says_three(channel: Channel) -> None:
        for word in (b"one", b"two", b"three"):
            await channel.send(word)
        await channel.aclose()

    async with _network(22) as (_, client, server_host), _server(server_host, alice_says_three) as (address, _):
        channel = await _connect(client, address)
        got = []
        await channel.receive_each(got.append)  # returns at the peer's close frame
        assert got == [b"one", b"two", b"three"]
        with pytest.raises(trio.EndOfChannel):
            await channel.receive()
        await channel.aclose()


async def test_close_gives_up_on_a_peer_that_stopped_reading(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(9) as (_, client, server_host):
        listener = await server_host.open_listener(server_host.address, PORT)
        stream = await client.connect(listener.local_address)
        server_stream = await listener.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(open_channel, server_stream, BOB, _random(2), initiator=False))
            channel = await open_channel(stream, ALICE, _random(1), initiator=True)
        # The server never reads: the stream window fills and a send blocks mid-frame.
        blocked = trio.Event()

        async def flood() -> None:
            with pytest.raises(trio.ClosedResourceError):
                while True:
                    await channel.send(bytes(MAX_CHANNEL_FRAME))
            blocked.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await trio.sleep(1.0)
            start = trio.current_time()
            await channel.aclose()
            assert trio.current_time() - start == pytest.approx(CLOSE_TIMEOUT)
        assert blocked.is_set()


# --- limits and hostile peers --------------------------------------------------------------------------------------


async def test_max_connections_refuses_the_next_and_keeps_the_rest(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(10) as (_, client, server_host), _server(server_host) as (address, stats):
        channels = [await _connect(client, address, seed) for seed in range(MAX_CONNECTIONS)]
        assert stats.active == MAX_CONNECTIONS
        with pytest.raises(trio.BrokenResourceError):
            await _connect(client, address, MAX_CONNECTIONS)
        assert stats.refused == 1
        for channel in (channels[0], channels[-1]):
            await channel.send(b"ping")
            assert await channel.receive() == b"ping"
        # A slot freed is a slot usable again.
        await channels.pop().aclose()
        with trio.fail_after(DEADLINE):
            await _wait_for(lambda: stats.active < MAX_CONNECTIONS)
        channels.append(await _connect(client, address, MAX_CONNECTIONS + 1))
        await channels[-1].send(b"in")
        assert await channels[-1].receive() == b"in"
        assert (stats.accepted, stats.established, stats.refused) == (MAX_CONNECTIONS + 2, MAX_CONNECTIONS + 1, 1)
        for channel in channels:
            await channel.aclose()


async def test_garbage_instead_of_a_handshake_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    garbage = [
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",  # a length prefix of 1.2 GB: refused at once
        encode_frame(b"\xc1 not msgpack"),
        encode_frame(bytes(40)),
        encode_frame(b"\x93\x02\x01\xc4\x20" + bytes(32)),  # version 2
    ]
    async with _network(11) as (_, client, server_host), _server(server_host) as (address, stats):
        for number, junk in enumerate(garbage, start=1):
            stream = await client.connect(address)
            start = trio.current_time()
            await stream.send_all(junk)
            assert await stream.receive_some() == b""  # hung up on
            assert trio.current_time() - start < 1.0  # at once, not at the timeout
            assert stats.handshake_failures == number
        channel = await _connect(client, address)
        await channel.send(b"the server survived")
        assert await channel.receive() == b"the server survived"
        await channel.aclose()
        with trio.fail_after(DEADLINE):
            await _wait_for(lambda: stats.active == 0)
    assert stats.accepted == len(garbage) + 1
    assert stats.handshake_timeouts == stats.channel_errors == 0
    assert stats.accepted == (
        stats.refused
        + stats.handshake_timeouts
        + stats.handshake_failures
        + stats.handshake_disconnects
        + stats.established
    )


async def test_oversized_handshake_frame_is_refused_before_it_is_buffered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A legal stream frame (under MAX_STREAM_FRAME) but far over a handshake message: refused once the first
    # MAX_HANDSHAKE_MESSAGE bytes are in, not after 128 KiB.
    async with _network(12) as (_, client, server_host), _server(server_host) as (address, stats):
        stream = await client.connect(address)
        header = MAX_STREAM_FRAME.to_bytes(4, "big")
        await stream.send_all(header + bytes(MAX_HANDSHAKE_MESSAGE + 1))
        assert await stream.receive_some() == b""
        assert stats.handshake_failures == 1


async def test_bad_frame_on_an_established_channel_ends_it(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(13) as (_, client, server_host), _server(server_host) as (address, stats):
        stream = await client.connect(address)
        channel = await open_channel(stream, ALICE, _random(1), initiator=True)
        await channel.send(b"one")
        assert await channel.receive() == b"one"
        await stream.send_all(encode_frame(bytes(40)))  # forged: counter 0 again, no valid tag
        with pytest.raises(trio.BrokenResourceError):
            await channel.receive()
        with trio.fail_after(DEADLINE):
            await _wait_for(lambda: stats.active == 0)
        assert stats.channel_errors == 1
        await channel.aclose()


async def test_after_a_protocol_error_the_channel_stays_ended(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(14) as (_, client, server_host):
        listener = await server_host.open_listener(server_host.address, PORT)
        stream = await client.connect(listener.local_address)
        server_stream = await listener.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(open_channel, stream, ALICE, _random(1), initiator=True))
            bob = await open_channel(server_stream, BOB, _random(2), initiator=False)
        await stream.send_all(encode_frame(b"\x00" * 8 + bytes(30)))
        with pytest.raises(ProtocolError, match="failed authentication"):
            await bob.receive()
        with pytest.raises(ProtocolError, match="ended by a bad incoming frame"):
            await bob.receive()
        with pytest.raises(trio.BrokenResourceError, match="bad incoming frame"):
            await bob.send(b"x")
        await bob.aclose()


async def test_wrong_expected_peer_over_the_network(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(15) as (_, client, server_host), _server(server_host) as (address, stats):
        with pytest.raises(ProtocolError, match="not the expected"):
            await _connect(client, address, expected_peer=MALLORY.public.key)
        with trio.fail_after(DEADLINE):
            await _wait_for(lambda: stats.active == 0)
        assert stats.handshake_disconnects == 1


async def test_early_data_after_the_handshake_is_kept(autojump_clock: trio.testing.MockClock) -> None:
    # The initiator may send right after message 3; the responder must not lose what arrived with it.
    async with _network(16) as (_, client, server_host):
        listener = await server_host.open_listener(server_host.address, PORT)
        stream = await client.connect(listener.local_address)
        server_stream = await listener.accept()
        handshake = Handshake(ALICE, _random(1), initiator=True)
        first = handshake.start()
        assert first is not None
        await stream.send_all(encode_frame(first))
        result: list[Channel] = []
        async with trio.open_nursery() as nursery:

            async def respond() -> None:
                result.append(await open_channel(server_stream, BOB, _random(2), initiator=False))

            nursery.start_soon(respond)
            third = handshake.receive(await _read_frame(stream))
            assert third is not None and handshake.result is not None
            await stream.send_all(encode_frame(third) + encode_frame(handshake.result.sender.seal(b"early")))
        assert await result[0].receive() == b"early"


async def test_everything_arriving_one_byte_at_a_time(autojump_clock: trio.testing.MockClock) -> None:
    async with _network(18) as (_, client, server_host), _server(server_host) as (address, stats):
        stream = await client.connect(address)

        async def dribble(data: bytes) -> None:
            for byte in data:
                await stream.send_all(bytes((byte,)))
                await trio.sleep(0.001)  # so that each byte arrives, and is read, on its own

        handshake = Handshake(ALICE, _random(1), initiator=True)
        first = handshake.start()
        assert first is not None
        await dribble(encode_frame(first))
        third = handshake.receive(await _read_frame(stream))
        assert third is not None and handshake.result is not None
        await dribble(encode_frame(third) + encode_frame(handshake.result.sender.seal(b"byte by byte")))
        assert handshake.result.receiver.open(await _read_frame(stream)) == b"byte by byte"
        assert stats.established == 1


# --- the accept loop ------------------------------------------------------------------------------------------------


class _FlakyListener(Listener):
    """Fails one accept for lack of file descriptors, then reports that it was closed."""

    def __init__(self, error: int) -> None:
        super().__init__(Address("10.0.0.1", PORT))
        self.error = error
        self.calls = 0

    async def accept(self) -> Stream:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.calls == 1:
            raise OSError(self.error, "accept failed")
        raise trio.ClosedResourceError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_accept_out_of_resources_pauses_and_retries(autojump_clock: trio.testing.MockClock) -> None:
    listener = _FlakyListener(errno.EMFILE)
    start = trio.current_time()
    await serve_channels(listener, BOB, _random(2), _echo)
    assert listener.calls == 2
    assert trio.current_time() - start == pytest.approx(ACCEPT_RETRY_DELAY)


async def test_other_accept_errors_propagate(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="accept failed")):
        await serve_channels(_FlakyListener(errno.EINVAL), BOB, _random(2), _echo)


async def test_closing_the_listener_stops_serving_after_handlers_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _network(17) as (_, client, server_host):
        listener = await server_host.open_listener(server_host.address, PORT)
        stats = ChannelServerStats()
        finished = trio.Event()

        async def serve() -> None:
            await serve_channels(listener, BOB, _random(2), _echo, stats=stats)
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            channel = await _connect(client, listener.local_address)
            await listener.aclose()
            await trio.sleep(1.0)
            assert not finished.is_set()  # Alice's channel is still being served
            await channel.send(b"still served")
            assert await channel.receive() == b"still served"
            await channel.aclose()
        assert finished.is_set()
        assert stats.active == 0


# --- real sockets ---------------------------------------------------------------------------------------------------


@pytest.mark.realnet
async def test_channel_over_real_loopback_tcp() -> None:
    env = Env.real()
    with trio.fail_after(DEADLINE):
        listener = await env.network.open_listener("127.0.0.1")
        stats = ChannelServerStats()
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_channels, listener, BOB, env.random_bytes, _echo, stats=stats))
            stream = await env.network.connect(listener.local_address)
            channel = await open_channel(stream, ALICE, env.random_bytes, initiator=True, expected_peer=BOB.public.key)
            assert channel.peer == BOB.public
            for size in (0, 1, 200, MAX_CHANNEL_FRAME):
                message = env.random_bytes(size)
                await channel.send(message)
                assert await channel.receive() == message
            await channel.aclose()
            await listener.aclose()  # serve_channels returns once the echo handler has seen the close
    assert (stats.established, stats.channel_errors, stats.active) == (1, 0, 0)
