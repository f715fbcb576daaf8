"""One system of :mod:`simulations.bench_dht` in one process: ``python -m simulations._dht_workers SYSTEM ...``.

The parent starts one worker per system.  A worker writes progress to stderr and exactly one JSON object (its
figures) to stdout, then exits.  Bounded: ``--deadline`` arms ``SIGALRM`` with its default action, so a worker
that overruns is ended by the kernel even inside C code (OpenDHT's threads, a stuck event loop); every single
operation also has its own timeout, after which it counts as failed.

Systems:

* ``kademlia``: the stock ``kademlia.network.Server`` (asyncio), all nodes in one event loop.
* ``opendht``: ``opendht.DhtRunner`` nodes (C++ threads behind a Cython binding), all in this process.
* ``p2pchat``: :class:`p2pchat.dht.node.DhtNode` on real UDP, all nodes in one trio run.
* ``p2pchat-sim``: DhtNodes on a SimNetwork in virtual time (see :mod:`simulations._dht_sim`).

Every socket is bound to loopback (OpenDHT also opens an IPv6 socket, bound to ::1), and every bootstrap address
is a loopback port of a node started here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from simulations._dht_workload import (
    SIM_JOIN_BATCH,
    SIM_LOOKUP_CONCURRENCY,
    Figures,
    OpFigures,
    Progress,
    Workload,
    info,
    peak_rss_mb,
)

if TYPE_CHECKING:
    from p2pchat.dht.node import DhtNode

__all__ = ["ALLOWED_NETWORKS", "LOOPBACK", "OP_TIMEOUT", "SYSTEMS", "WorkerError", "main"]

LOOPBACK = "127.0.0.1"
LOOPBACK6 = "::1"
ALLOWED_NETWORKS = "127.0.0.0/8,::1/128"
"""What p2pchat's RealNetwork may send to in a worker (the value of ``P2PCHAT_ALLOW_NETWORKS``)."""

OP_TIMEOUT = 30.0
"""Wall seconds one put + get may take before it counts as failed."""

JOIN_TIMEOUT = 30.0
"""Wall seconds one node's bootstrap may take before the worker gives up on it (and goes on)."""

SHUTDOWN_TIMEOUT = 10.0
"""Wall seconds the worker waits for its nodes to stop before it exits anyway."""


class WorkerError(Exception):
    """The system cannot be benchmarked (not installed, API missing); the message says why."""


# --- kademlia ----------------------------------------------------------------------------------------------------


def run_kademlia(workload: Workload, options: argparse.Namespace) -> Figures:
    """The stock kademlia package: N ``Server`` s in one asyncio loop."""
    return asyncio.run(_kademlia(workload))


async def _kademlia(workload: Workload) -> Figures:
    try:
        from kademlia.network import Server  # noqa: PLC0415 - only this worker needs it
    except ImportError as exc:
        raise WorkerError(f"the kademlia package is not importable: {exc}") from None
    timeouts = _RpcTimeoutCounter()
    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    rpcudp_log = logging.getLogger("rpcudp")
    rpcudp_log.addHandler(timeouts)  # it logs an error line per unanswered RPC: count them instead
    rpcudp_log.propagate = False
    random.seed(workload.seed)  # kademlia draws node ids from the global generator
    peers = workload.bootstrap_peers()
    servers: list[Any] = []
    ports: list[int] = []
    try:
        joining = Progress("kademlia", "joined", workload.nodes)
        for i in range(workload.nodes):
            server = Server()
            await server.listen(0, interface=LOOPBACK)
            servers.append(server)
            ports.append(server.transport.get_extra_info("sockname")[1])
            if i:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.bootstrap([(LOOPBACK, ports[peers[i - 1]])]), JOIN_TIMEOUT)
            joining.tick(i + 1, f", {timeouts.count:,} RPC timeouts")
        figures = OpFigures()
        operations = workload.operations()
        running = Progress("kademlia", "operations", len(operations))
        for n, op in enumerate(operations, start=1):
            key = op.key.hex()
            started = time.perf_counter()
            ok = False
            with contextlib.suppress(asyncio.TimeoutError):
                ok = await asyncio.wait_for(
                    _kademlia_op(servers[op.put_node], servers[op.get_node], key, op.value), OP_TIMEOUT
                )
            figures.add(time.perf_counter() - started, ok)
            running.tick(n, f", {figures.success:,} succeeded, {timeouts.count:,} RPC timeouts (5 s each)")
        return figures.figures()
    finally:
        for server in servers:
            server.stop()
        # Requests still being answered would write to closed sockets: end them here, not in asyncio's teardown.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


class _RpcTimeoutCounter(logging.Handler):
    """Counts rpcudp's "Did not receive reply" errors (its only way of telling)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        """Count one record."""
        self.count += 1


async def _kademlia_op(putter: Any, getter: Any, key: str, value: bytes) -> bool:
    await putter.set(key, value)
    got = await getter.get(key)
    return bool(got == value)


# --- opendht -----------------------------------------------------------------------------------------------------


def run_opendht(workload: Workload, options: argparse.Namespace) -> Figures:
    """OpenDHT's ``DhtRunner``: N runners (each with its own threads) in this process."""
    try:
        import opendht  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError as exc:
        raise WorkerError(f"the opendht package is not importable: {exc}") from None
    info("opendht", f"OpenDHT {opendht.version()}; peer discovery off, rate limits off (all nodes share loopback)")
    peers = workload.bootstrap_peers()
    runners: list[Any] = []
    try:
        joining = Progress("opendht", "joined", workload.nodes)
        for i in range(workload.nodes):
            config = opendht.DhtConfig()
            config.setPeerDiscovery(False, False)  # no multicast announcements on the LAN
            config.setRateLimit(-1, -1)  # every node shares 127.0.0.1: per-IP limits would throttle the bench
            runner = opendht.DhtRunner()
            # Explicit loopback binds: an empty address would leave the choice to the resolver.
            runner.run(ipv4=LOOPBACK, ipv6=LOOPBACK6, port=0, config=config)
            runners.append(runner)
            if i:
                bootstrap = runners[peers[i - 1]].getBound(socket.AF_INET)
                _check_loopback(bootstrap.toString())
                _opendht_call(JOIN_TIMEOUT, runner.ping, bootstrap)
            joining.tick(i + 1)
        figures = OpFigures()
        operations = workload.operations()
        running = Progress("opendht", "operations", len(operations))
        for n, op in enumerate(operations, start=1):
            key = opendht.InfoHash.get(op.key.hex())
            putter, getter = runners[op.put_node], runners[op.get_node]
            started = time.perf_counter()
            ok = _opendht_call(OP_TIMEOUT, putter.put, key, opendht.Value(op.value))
            if ok:
                found: list[bytes] = []

                def collect(value: Any, found: list[bytes] = found) -> bool:
                    found.append(bytes(value.data))
                    return True  # go on: another replica may hold it too

                remaining = max(0.0, OP_TIMEOUT - (time.perf_counter() - started))
                _opendht_call(remaining, getter.get, key, get_cb=collect)
                ok = op.value in found
            figures.add(time.perf_counter() - started, ok)
            running.tick(n, f", {figures.success:,} succeeded")
        return figures.figures()
    finally:
        stopped = []
        for runner in runners:
            event = threading.Event()
            runner.shutdown(event.set)
            stopped.append(event)
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        if not all(event.wait(max(0.0, deadline - time.monotonic())) for event in stopped):
            info("opendht", "some runners did not stop in time; exiting anyway")
        # DhtRunner.join() holds the GIL while its thread may want it for a callback: the worker exits instead.


def _opendht_call(timeout: float, method: Callable[..., object], *args: object, **kwargs: object) -> bool:
    """Call an asynchronous OpenDHT method whose ``done_cb`` gets ``ok`` first; wait for it, up to ``timeout``."""
    event = threading.Event()
    result = [False]

    def done(ok: bool, *_: object) -> None:
        result[0] = bool(ok)
        event.set()

    method(*args, done_cb=done, **kwargs)
    # Waiting on an Event releases the GIL, which OpenDHT's threads need to run our callbacks.
    return event.wait(timeout) and result[0]


def _check_loopback(address: bytes | str) -> None:
    text = address.decode() if isinstance(address, bytes) else address
    if not text.startswith((LOOPBACK + ":", f"[{LOOPBACK6}]:")):
        raise WorkerError(f"refusing to bootstrap to {text}: not a loopback address")


# --- p2pchat on real UDP ---------------------------------------------------------------------------------------


def run_p2pchat(workload: Workload, options: argparse.Namespace) -> Figures:
    """p2pchat's DhtNode: N nodes on real loopback UDP in one trio run."""
    os.environ["P2PCHAT_ALLOW_NETWORKS"] = ALLOWED_NETWORKS  # before any RealNetwork reads it
    import trio  # noqa: PLC0415 - the other workers do without it

    return trio.run(_p2pchat, workload, bool(options.shared_cert_cache))


async def _p2pchat(workload: Workload, shared_cert_cache: bool) -> Figures:
    # Imported here so that a missing API is reported as such, not as a crash of the whole benchmark.
    import trio  # noqa: PLC0415

    from p2pchat.core.identity import Identity  # noqa: PLC0415
    from p2pchat.core.nodecert import CertCache  # noqa: PLC0415
    from p2pchat.core.records import RecordKind, sign_record  # noqa: PLC0415
    from p2pchat.env import Env  # noqa: PLC0415
    from p2pchat.net.real import ALLOW_ENV_VAR, RealNetwork  # noqa: PLC0415

    try:
        from p2pchat.dht.node import DhtConfig, DhtNode  # noqa: PLC0415
    except ImportError as exc:
        raise WorkerError(f"p2pchat's put/get API is not in p2pchat/dht/node.py: {exc}") from None
    if os.environ.get(ALLOW_ENV_VAR) != ALLOWED_NETWORKS:
        raise WorkerError(f"{ALLOW_ENV_VAR} must be {ALLOWED_NETWORKS!r} in the worker")
    config = DhtConfig.single_host()
    info(
        "p2pchat",
        "DhtConfig.single_host(): per-source-IP quotas and rate limits raised, because every node shares 127.0.0.1",
    )
    certs: CertCache | None = None
    if shared_cert_cache:
        certs = CertCache()
        info("p2pchat", "one CertCache shared by all nodes (--shared-cert-cache): each certificate is verified once")
    network = RealNetwork()  # allow-list from P2PCHAT_ALLOW_NETWORKS: loopback only
    key_rng = workload.node_key_rng()
    peers = workload.bootstrap_peers()
    nodes: list[DhtNode] = []
    async with trio.open_nursery() as nursery:
        joining = Progress("p2pchat", "joined", workload.nodes)
        for i in range(workload.nodes):
            identity = Identity.generate(key_rng.randbytes)
            node = DhtNode(Env.real(network), identity, host=LOOPBACK, port=0, config=config, cert_cache=certs)
            await nursery.start(node.run)
            nodes.append(node)
            if i:
                answered = 0
                with trio.move_on_after(JOIN_TIMEOUT):
                    answered = await node.bootstrap([nodes[peers[i - 1]].address])
                if not answered:
                    info("p2pchat", f"node {i} could not bootstrap from node {peers[i - 1]}")
            joining.tick(i + 1)
        info("p2pchat", f"after the joins: {_p2pchat_traffic(nodes)}")
        figures = OpFigures()
        operations = workload.operations()
        running = Progress("p2pchat", "operations", len(operations))
        for n, op in enumerate(operations, start=1):
            owner = Identity.from_seed(op.key)
            putter, getter = nodes[op.put_node], nodes[op.get_node]
            # Signing is the owner's work before a put, not the DHT's: it is left out of the time.
            record = sign_record(owner, RecordKind.PEER, 1, int(putter.env.wall_time()) + 3600, op.value)
            started = time.perf_counter()
            ok = False
            with trio.move_on_after(OP_TIMEOUT):
                await putter.put_record(record)
                got = await getter.get_record(RecordKind.PEER, owner.public.key)
                ok = got.record is not None and got.record.value == op.value
            figures.add(time.perf_counter() - started, ok)
            running.tick(n, f", {figures.success:,} succeeded")
        info("p2pchat", f"after the operations: {_p2pchat_traffic(nodes)}")
        nursery.cancel_scope.cancel()
    return figures.figures()


def _p2pchat_traffic(nodes: list[DhtNode]) -> str:
    """Totals over all nodes, so a slow tail can be told apart from lost datagrams (RPC timeouts)."""
    requests = sum(node.transport.stats.requests_sent for node in nodes)
    timeouts = sum(node.transport.stats.timeouts for node in nodes)
    unanswered = sum(node.transport.stats.dropped_by_handler for node in nodes)
    send_errors = sum(node.transport.endpoint.stats.send_errors for node in nodes)
    return (
        f"{requests:,} requests sent, {timeouts:,} timed out, {unanswered:,} requests left unanswered by "
        f"their handler, {send_errors:,} datagrams the kernel refused"
    )


# --- p2pchat on SimNetwork ---------------------------------------------------------------------------------------


def run_p2pchat_sim(workload: Workload, options: argparse.Namespace) -> Figures:
    """p2pchat's DhtNode on a SimNetwork, virtual time: bootstrap, then find_node lookups."""
    from simulations._dht_sim import simulate  # noqa: PLC0415 - imports trio and the sim network

    return simulate(workload, join_batch=options.join_batch, lookup_concurrency=options.lookup_concurrency)


SYSTEMS: dict[str, Callable[[Workload, argparse.Namespace], Figures]] = {
    "p2pchat": run_p2pchat,
    "kademlia": run_kademlia,
    "opendht": run_opendht,
    "p2pchat-sim": run_p2pchat_sim,
}


def _claim_stdout() -> IO[str]:
    """Keep the real stdout for the JSON line and send everything else written to fd 1 (C libraries too) to
    stderr, so that stdout carries nothing but the figures."""
    sys.stdout.flush()
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run one system's workload and print its figures as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m simulations._dht_workers", description=__doc__.split("\n")[0])
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--ops", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--deadline", type=float, required=True, help="wall seconds before SIGALRM ends the worker")
    parser.add_argument("--shared-cert-cache", action="store_true")
    parser.add_argument("--join-batch", type=int, default=SIM_JOIN_BATCH, help="p2pchat-sim only")
    parser.add_argument("--lookup-concurrency", type=int, default=SIM_LOOKUP_CONCURRENCY, help="p2pchat-sim only")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile statistics of the run to FILE")
    args = parser.parse_args(argv)

    result_out = _claim_stdout()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # overrun: the kernel ends the process, whatever it is doing
    signal.alarm(max(1, round(args.deadline)))
    workload = Workload(args.nodes, args.ops, args.seed)
    profiler = cProfile.Profile() if args.profile else None
    status = 0
    try:
        if profiler is not None:
            profiler.enable()
        figures = SYSTEMS[args.system](workload, args)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
            info(args.system, f"profile written to {args.profile}")
        figures["rss_mb"] = round(peak_rss_mb(), 1)
        result_out.write(json.dumps(figures) + "\n")
    except WorkerError as exc:
        info(args.system, f"cannot run: {exc}")
        status = 2
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        result_out.flush()
        sys.stderr.flush()
    # Leave without running destructors: OpenDHT's join() in DhtRunner's destructor can deadlock on the GIL.
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
