"""Datagram RPC: replies matched by address and transaction id; timeouts adapt; bad input dropped and counted."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from p2pchat.core.framing import encode_datagram
from p2pchat.core.identity import Identity
from p2pchat.core.nodecert import issue_cert
from p2pchat.core.packets import TXID_BYTES, FindNode, Nodes, Ping, Pong
from p2pchat.core.rtt import (
    HEDGE_RTTVARS,
    INITIAL_RTO,
    MAX_RTO,
    MIN_RTO,
    SOFT_TIMEOUT_SHARE,
    TRUSTED_SAMPLES,
    RttEstimator,
    TimeoutPolicy,
)
from p2pchat.core.schema import Packet
from p2pchat.dht import rpc
from p2pchat.dht.rpc import (
    LOSSY_OVERDUE_SHARE,
    MAX_PENDING_REQUESTS,
    MAX_SETTLED_DEADLINES,
    OVERDUE_WEIGHT,
    TXIDS_PER_DRAW,
    RequestTimeoutError,
    RpcTransport,
    TooManyRequestsError,
)
from p2pchat.env import Env
from p2pchat.errors import ProtocolError
from p2pchat.net import Address
from p2pchat.net.sim import Constant, LinkModel, SimNetwork, open_sim_network

REPLIES = (Pong, Nodes)
# The transport does not interpret certificates (the DHT service does), so any well-formed one will do here.
CERT = issue_cert(Identity.from_seed(bytes(32)), "10.0.0.1", 4000, 0)


def pong_handler(packet: Packet, source: Address) -> Packet | None:
    if isinstance(packet, Ping):
        return Pong(packet.txid, CERT, source.host, source.port)
    if isinstance(packet, FindNode):
        raise ProtocolError("not serving lookups in this test")
    return None


async def _transport(net: SimNetwork, seed: int, handler=pong_handler) -> RpcTransport:  # type: ignore[no-untyped-def]
    host = net.add_host()
    endpoint = await host.open_datagram(host.address, 4000)
    return RpcTransport(Env.simulated(host, seed), endpoint, handler, reply_types=REPLIES)


async def test_txids_are_drawn_from_the_environments_random_bytes_in_pools() -> None:
    async with open_sim_network(3) as net:
        transport = await _transport(net, 3)
        draws: list[int] = []
        random_bytes = transport.env.random_bytes

        def counted(n: int) -> bytes:
            draws.append(n)
            return random_bytes(n)

        transport.env.random_bytes = counted
        txids = [transport.new_txid() for _ in range(TXIDS_PER_DRAW + 1)]
        assert draws == [TXID_BYTES * TXIDS_PER_DRAW] * 2  # the last txid needed a second draw
        assert all(len(txid) == TXID_BYTES for txid in txids)
        assert len(set(txids)) == len(txids)


async def test_request_gets_its_reply_and_measures_rtt(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(1, default_link=LinkModel(latency=Constant(0.030)), time_resolution=0) as net:
        a, b = await _transport(net, 1), await _transport(net, 2)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            reply = await a.request(Ping(a.new_txid(), None), b.local_address)
            assert isinstance(reply, Pong)
            assert (reply.observed_host, reply.observed_port) == a.local_address
            # One sample is not trusted yet: a node that has measured almost nothing keeps the initial timeout.
            assert a.timeouts.timeout(b.local_address) == INITIAL_RTO
            for _ in range(TRUSTED_SAMPLES - 1):
                await a.request(Ping(a.new_txid(), None), b.local_address)
            assert a.timeouts.timeout(b.local_address) == MIN_RTO  # 30 ms round trips: the floor
            assert b.stats.requests_served == TRUSTED_SAMPLES
            nursery.cancel_scope.cancel()


async def test_timeout_when_nobody_answers(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(2) as net:
        a = await _transport(net, 1)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            start = trio.current_time()
            with pytest.raises(RequestTimeoutError):
                await a.request(Ping(a.new_txid(), None), Address("10.9.9.9", 4000))
            assert trio.current_time() - start == pytest.approx(INITIAL_RTO)
            assert a.stats.timeouts == 1
            assert a.pending_count() == 0
            nursery.cancel_scope.cancel()


async def test_reply_from_another_address_or_txid_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(3) as net:
        a = await _transport(net, 1)
        liar_host = net.add_host()
        liar = await liar_host.open_datagram(liar_host.address, 4000)
        silent_host = net.add_host()
        silent = Address(silent_host.address, 4000)
        await silent_host.open_datagram(silent_host.address, 4000)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            txid = a.new_txid()

            async def forge() -> None:
                await trio.sleep(0.05)
                # Right txid from the wrong address, then the wrong txid: both must be ignored.
                liar.send(encode_datagram(Pong(txid, CERT, "10.0.0.1", 1)), a.local_address)
                liar.send(encode_datagram(Pong(bytes(8), CERT, "10.0.0.1", 1)), a.local_address)

            nursery.start_soon(forge)
            with pytest.raises(RequestTimeoutError):
                await a.request(Ping(txid, None), silent)
            assert a.stats.dropped_unsolicited == 2
            nursery.cancel_scope.cancel()


async def test_garbage_and_refused_requests_are_counted(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(4) as net:
        a, b = await _transport(net, 1), await _transport(net, 2)
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            for junk in (b"", b"\x50", b"\xff" * 50, b"\x50\x09\x01\x90", b"\x00" + bytes(30)):
                a.endpoint.send(junk, b.local_address)
            a.send(FindNode(a.new_txid(), None, bytes(20)), b.local_address)
            await trio.sleep(1)
            assert b.stats.dropped_malformed == 4
            assert b.stats.dropped_unsolicited == 1  # an rpcudp frame with no compat handler
            assert b.stats.dropped_by_handler == 1
            nursery.cancel_scope.cancel()


async def test_pending_request_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(5) as net:
        a = await _transport(net, 1)
        silent = Address("10.9.9.9", 4000)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)

            async def hang() -> None:
                with pytest.raises(RequestTimeoutError):
                    await a.request(Ping(a.new_txid(), None), silent, timeout=100)

            for _ in range(MAX_PENDING_REQUESTS):
                nursery.start_soon(hang)
            await trio.testing.wait_all_tasks_blocked()
            assert a.pending_count() == MAX_PENDING_REQUESTS
            with pytest.raises(TooManyRequestsError):
                await a.request(Ping(a.new_txid(), None), silent)
            nursery.cancel_scope.cancel()


async def test_callback_requests_and_the_bounded_deadline_heap(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(6, default_link=LinkModel(latency=Constant(0.010)), time_resolution=0) as net:
        a, b = await _transport(net, 1), await _transport(net, 2)
        silent = Address("10.9.9.9", 4000)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            outcomes: list[str] = []

            def record(reply: Packet | None) -> None:
                outcomes.append("timeout" if reply is None else type(reply).__name__)

            a.send_request(Ping(a.new_txid(), None), silent, record, timeout=0.5)
            withdrawn = a.send_request(Ping(a.new_txid(), None), b.local_address, record)
            a.cancel(withdrawn)  # its reply comes back unsolicited, and nothing is reported
            answered = 3 * MAX_SETTLED_DEADLINES
            for _ in range(answered):
                a.send_request(Ping(a.new_txid(), None), b.local_address, record)
            await trio.sleep(0.1)
            assert outcomes == ["Pong"] * answered
            assert a.stats.dropped_unsolicited == 1
            # Answered requests leave their deadlines behind, but never more than the bound.
            assert a.deadlines_held() <= 2 * a.pending_count() + MAX_SETTLED_DEADLINES + 1
            await trio.sleep(1)
            assert outcomes[-1] == "timeout"
            assert a.stats.timeouts == 1
            assert a.pending_count() == 0
            assert a.deadlines_held() == 0  # the timer swept the rest when it fired
            nursery.cancel_scope.cancel()


async def test_requests_pending_when_the_transport_stops_are_settled(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim_network(7) as net:
        a = await _transport(net, 1)
        silent = Address("10.9.9.9", 4000)
        outcomes: list[Packet | None] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            a.send_request(Ping(a.new_txid(), None), silent, outcomes.append, timeout=100)

            async def waiter() -> None:
                with pytest.raises(RequestTimeoutError):
                    await a.request(Ping(a.new_txid(), None), silent, timeout=100)
                outcomes.append(None)

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await a.endpoint.aclose()  # the receive loop ends: no reply can come any more
        assert outcomes == [None, None]  # both settled at once, not after their 100 s
        assert trio.current_time() < 1
        assert a.pending_count() == 0
        with pytest.raises(trio.ClosedResourceError):
            a.send_request(Ping(a.new_txid(), None), silent, outcomes.append)


def test_rtt_estimator_follows_rfc6298() -> None:
    estimator = RttEstimator()
    assert estimator.rto() == INITIAL_RTO
    estimator.observe(0.100)
    assert estimator.srtt == pytest.approx(0.100)
    assert estimator.rto() == pytest.approx(0.300)
    for _ in range(50):
        estimator.observe(0.010)
    assert estimator.rto() == pytest.approx(MIN_RTO, abs=0.01)
    for _ in range(50):
        estimator.observe(5.0)
    assert estimator.rto() == MAX_RTO


def test_timeout_policy_uses_overall_estimate_for_strangers() -> None:
    policy = TimeoutPolicy()
    assert policy.timeout("stranger") == INITIAL_RTO
    for _ in range(20):
        policy.observe("friend", 0.400)
    assert policy.timeout("friend") == pytest.approx(0.400 + 4 * policy._peers["friend"].rttvar)
    assert policy.timeout("friend") < policy.timeout("stranger") <= MAX_RTO


async def test_an_overdue_request_is_reported_at_its_soft_timeout_and_still_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # b answers after 300 ms: past the soft timeout of a 0.5 s request, within the timeout itself.
    async with open_sim_network(8, default_link=LinkModel(latency=Constant(0.150)), time_resolution=0) as net:
        a, b = await _transport(net, 1), await _transport(net, 2)
        silent = Address("10.9.9.9", 4000)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            events: list[tuple[str, float]] = []
            start = trio.current_time()

            def note(name: str) -> Callable[[], None]:
                return lambda: events.append((name, trio.current_time() - start))

            def replied(name: str) -> Callable[[Packet | None], None]:
                return lambda reply: events.append((f"{name}:{'timeout' if reply is None else 'reply'}", 0.0))

            a.send_request(Ping(a.new_txid(), None), b.local_address, replied("b"), timeout=0.5, on_slow=note("b"))
            a.send_request(Ping(a.new_txid(), None), silent, replied("s"), timeout=0.5, on_slow=note("s"))
            quick = a.send_request(Ping(a.new_txid(), None), silent, replied("q"), timeout=0.5, on_slow=note("q"))
            a.cancel(quick)  # withdrawn: neither callback runs
            await trio.sleep(1)
            assert [name for name, _ in events] == ["b", "s", "b:reply", "s:timeout"]
            assert events[0][1] == pytest.approx(SOFT_TIMEOUT_SHARE * 0.5)
            assert a.stats.timeouts == 1
            assert a.pending_count() == 0
            nursery.cancel_scope.cancel()


def test_the_soft_timeout_is_a_share_of_the_timeout() -> None:
    policy = TimeoutPolicy()
    assert policy.soft_timeout("x") == pytest.approx(SOFT_TIMEOUT_SHARE * INITIAL_RTO)
    policy.observe("x", 0.2)
    assert policy.soft_timeout("x") == pytest.approx(SOFT_TIMEOUT_SHARE * policy.timeout("x"))
    assert policy.soft_timeout("x") > 0.2  # above the round trip the estimator expects


def test_the_hedge_for_a_stranger_is_srtt_plus_hedge_rttvars() -> None:
    policy = TimeoutPolicy()
    for rtt in (0.05, 0.30, 0.10, 0.25, 0.175, 0.20):  # round trips of 50-300 ms
        policy.observe("known", rtt)
    overall = policy.overall
    assert overall.srtt is not None
    hedge = policy.hedge_timeout("stranger")
    assert hedge == pytest.approx(overall.srtt + HEDGE_RTTVARS * overall.rttvar)
    assert hedge < policy.soft_timeout("stranger")
    # Not for a peer measured TRUSTED_SAMPLES times: its own estimate knows how slow it is.
    assert policy.hedge_timeout("known") is None
    # Nor before the overall estimate is trusted.
    fresh = TimeoutPolicy()
    fresh.observe("known", 0.1)
    assert fresh.hedge_timeout("stranger") is None
    # Never below half the minimum timeout, however short and steady the round trips.
    steady = TimeoutPolicy()
    for _ in range(TRUSTED_SAMPLES):
        steady.observe("lan", 0.001)
    assert steady.hedge_timeout("stranger") == pytest.approx(SOFT_TIMEOUT_SHARE * MIN_RTO)
    # And never when it would not come before the soft timeout.
    jittery = TimeoutPolicy()
    for rtt in (0.01, 0.9, 0.01, 0.9, 0.01, 0.9):
        jittery.observe("far", rtt)
    assert jittery.hedge_timeout("stranger") is None


async def test_on_a_lossy_network_a_lookup_is_told_of_a_silent_request_at_its_hedge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(12, default_link=LinkModel(latency=Constant(0.030)), time_resolution=0) as net:
        a, b = await _transport(net, 1), await _transport(net, 2)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            for _ in range(TRUSTED_SAMPLES):
                assert isinstance(await _lookup_request(a, b.local_address), Pong)
            silent = Address("10.9.9.9", 4000)

            async def slow_after(*, hedge: bool = True) -> tuple[float, int, float]:
                """When on_slow came; how many copies were sent by then and by the soft timeout; the share."""
                start = trio.current_time()
                slow, settled = trio.Event(), trio.Event()
                a.send_request(Ping(a.new_txid(), None), silent, lambda _: settled.set(), on_slow=slow.set, hedge=hedge)
                await slow.wait()
                told = trio.current_time() - start
                copies = a.stats.retransmits
                await trio.sleep_until(start + a.timeouts.soft_timeout(silent) + 0.001)
                resent = a.stats.retransmits - copies
                await settled.wait()  # timed out: nothing of it is left to send
                return told, copies, resent

            clean, _, resent = await slow_after()
            assert clean == pytest.approx(a.timeouts.soft_timeout(silent))
            assert resent == 0  # sent again at that very moment, before on_slow
            a.overdue_share = 2 * LOSSY_OVERDUE_SHARE  # as after many unanswered requests
            share = a.overdue_share
            lossy, _, resent = await slow_after()
            assert lossy == pytest.approx(a.timeouts.hedge_timeout(silent))
            assert lossy < clean
            # Not for a request its lookup did not ask to hedge (a lookup that decides where to write).
            a.overdue_share = 2 * LOSSY_OVERDUE_SHARE
            unhedged, _, _ = await slow_after(hedge=False)
            assert unhedged == pytest.approx(clean)
            # The hedge only moved the lookup on: the copy still went at the soft timeout, and the request was
            # counted overdue only then.
            assert resent == 1
            assert a.overdue_share > share
            nursery.cancel_scope.cancel()


def test_a_peer_measured_fewer_than_trusted_samples_times_gets_at_least_the_overall_timeout() -> None:
    policy = TimeoutPolicy()
    for _ in range(TRUSTED_SAMPLES):
        policy.observe("slow", 0.4)
    policy.observe("lucky", 0.05)  # one short round trip says little
    assert policy.timeout("lucky") == pytest.approx(policy.overall.rto())
    for _ in range(TRUSTED_SAMPLES - 1):
        policy.observe("lucky", 0.05)
    assert policy.timeout("lucky") == MIN_RTO  # trusted now: its own estimate alone


def _deaf(times: int) -> Callable[[Packet, Address], Packet | None]:
    """A handler that ignores the first *times* requests (as if lost), then answers pings."""
    heard = [0]

    def handler(packet: Packet, source: Address) -> Packet | None:
        heard[0] += 1
        if heard[0] <= times:
            return None
        return pong_handler(packet, source)

    return handler


async def _lookup_request(transport: RpcTransport, destination: Address, timeout: float | None = None) -> Packet | None:
    """One request as a lookup sends it (with an overdue callback, so it may be sent again); its reply or None."""
    done = trio.Event()
    got: list[Packet | None] = []

    def callback(reply: Packet | None) -> None:
        got.append(reply)
        done.set()

    transport.send_request(
        Ping(transport.new_txid(), None), destination, callback, timeout=timeout, on_slow=lambda: None
    )
    await done.wait()
    return got[0]


RESENDS = 2
"""What the resend tests set :data:`RETRANSMITS` to, so that they hold whatever it ships as."""


async def test_a_lookup_request_unanswered_at_its_soft_timeout_is_sent_again(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc, "RETRANSMITS", RESENDS)
    async with open_sim_network(9, default_link=LinkModel(latency=Constant(0.030)), time_resolution=0) as net:
        a, b = await _transport(net, 1), await _transport(net, 2, handler=_deaf(RESENDS))
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            start = trio.current_time()
            assert isinstance(await _lookup_request(a, b.local_address, timeout=0.3), Pong)
            # The last copy (RESENDS soft timeouts after the first send) was answered: past the first deadline,
            # which moved on (by the timeout, from the first resend) so that a copy's reply could still arrive.
            elapsed = trio.current_time() - start
            assert elapsed == pytest.approx(RESENDS * SOFT_TIMEOUT_SHARE * 0.3 + 0.060)
            assert elapsed > 0.3
            assert a.stats.retransmits == RESENDS
            assert b.stats.dropped_by_handler == RESENDS
            assert a.stats.timeouts == 0
            # Karn's rule: which copy the reply answered is unknown, so no round trip was measured.
            assert a.timeouts.overall.samples == 0
            assert a.overdue_share == pytest.approx(OVERDUE_WEIGHT)
            # A request whose timeout is already the ceiling is not extended past it: one resend fits.
            assert await _lookup_request(a, Address("10.9.9.9", 4000)) is None
            assert a.stats.retransmits == RESENDS + 1
            # A request that is not a lookup's is never sent again.
            with pytest.raises(RequestTimeoutError):
                await a.request(Ping(a.new_txid(), None), Address("10.9.9.9", 4000))
            assert a.stats.retransmits == RESENDS + 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("resends", [RESENDS, 0])
async def test_a_lookup_request_is_sent_at_most_retransmits_times_more(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, resends: int
) -> None:
    monkeypatch.setattr(rpc, "RETRANSMITS", resends)
    async with open_sim_network(10, default_link=LinkModel(latency=Constant(0.030)), time_resolution=0) as net:
        a, b = await _transport(net, 1), await _transport(net, 2, handler=_deaf(10**6))
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            start = trio.current_time()
            assert await _lookup_request(a, b.local_address, timeout=0.3) is None
            # With resends the deadline moved on by the timeout from the first resend; without, it did not move.
            extended = SOFT_TIMEOUT_SHARE * 0.3 if resends else 0.0
            assert trio.current_time() - start == pytest.approx(0.3 + extended)
            assert a.stats.retransmits == resends
            assert b.stats.dropped_by_handler == 1 + resends
            assert a.stats.timeouts == 1
            assert a.pending_count() == 0
            nursery.cancel_scope.cancel()


async def test_the_overdue_share_falls_as_requests_are_answered_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim_network(11, default_link=LinkModel(latency=Constant(0.030)), time_resolution=0) as net:
        a, b = await _transport(net, 1), await _transport(net, 2)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            # Overdue: its soft timeout (half of 40 ms) passes before the 60 ms round trip ends, then it times out.
            assert await _lookup_request(a, b.local_address, timeout=0.040) is None
            assert a.overdue_share == pytest.approx(OVERDUE_WEIGHT)
            for _ in range(3):
                assert isinstance(await _lookup_request(a, b.local_address, timeout=0.5), Pong)
            assert a.overdue_share == pytest.approx(OVERDUE_WEIGHT * (1 - OVERDUE_WEIGHT) ** 3)
            nursery.cancel_scope.cancel()
