"""Benchmark of messaging: 200-byte messages on loopback three ways, and offline delivery through churn.

    python -m simulations.bench_messaging --json
    python -m simulations.bench_messaging --messages 50 --nodes 60 --pairs 2 --hours 2 --json   # a quick run

Prints ``{"raw_per_s", "channel_per_s", "end_to_end_per_s", "offline_delivery_ratio"}``:

* ``raw_per_s``: length-prefixed msgpack frames over a plain TCP stream on 127.0.0.1.
* ``channel_per_s``: the same frames through an established direct channel (target: at least half of raw).
* ``end_to_end_per_s``: ``Node.send`` to the other Node's ``IncomingMessage``, with the Double Ratchet and
  durable SQLite commits on both sides, after a warm-up message established session and channel (target: at
  least 1,000 messages/s).
* ``offline_delivery_ratio``: on a simulated network of ``--nodes`` nodes (virtual time), with ``--churn`` of the
  DHT nodes going offline per hour, the fraction of messages sent to recipients who are away for up to
  ``--hours`` hours that each recipient receives exactly once after coming back (target: at least 0.999).

The three rates are messages received over the wall time from the first send to the last message received,
``--messages`` messages each, sender and receiver in this one process (so on one CPU); see
:mod:`simulations._messaging_loopback`.  The offline model (churn, absences, settling time) is described in
:mod:`simulations._messaging_offline`; it is deterministic for a ``--seed``.

Wall time.  The loopback part takes about half a minute (10,000 messages, mostly the end-to-end run).  The offline
simulation takes the rest, and grows with ``--nodes`` times the simulated hours: every simulated datagram costs
150-250 us of CPU (trio's scheduling about a third, then packet encoding and decoding, routing, lookups), and the
DHT's own traffic (bucket refreshes, liveness pings, hand-overs) runs whatever the messages do.  As of this writing
that traffic also grows with virtual time under churn: a node keeps its copy of a key after it is no longer among
the key's k closest, until it expires, and copies pile up (on 2,000 nodes at 3a9323d the keys a node holds grew from
9 to 69 on average in 6 virtual hours).  Since commit 3a9323d a far key costs hand-over one check an hour instead of
one a minute, which halved the pings of that check but did not stop the growth.  A line per virtual hour on stderr
shows datagrams and wall time.  Measured on the two-core development machine: the quick run above ~15 s; ``--nodes
150 --pairs 10`` (24 hours) a few minutes; the full size (commit 6ac6249) went from 0.73 million datagrams and 95 s
of wall time in virtual hour 1 to 3.0 million and 690 s in hour 16, at 2.7 GB, so the whole run takes three and a
half hours or more, hence ``--timeout`` (default 8 hours).

Progress, the ratios to the targets and the details behind each figure go to stderr; with ``--json``, stdout
carries nothing but the JSON object.  Real sockets may reach loopback only (the allow-list is set before any is
opened).  ``--profile PREFIX`` writes cProfile statistics of the end-to-end run to ``PREFIX.end_to_end`` and of
the offline simulation to ``PREFIX.offline``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import signal
import sys
import time

import trio

from p2pchat.net.real import ALLOW_ENV_VAR
from simulations._messaging_loopback import (
    ALLOWED_NETWORKS,
    MESSAGE_BYTES,
    channel_rate,
    end_to_end_rate,
    info,
    raw_rate,
)
from simulations._messaging_offline import OfflineConfig, simulate_offline

__all__ = ["main"]

CHANNEL_TARGET = 0.5
"""Channel rate over raw rate the channel should reach."""

END_TO_END_TARGET = 1000.0
"""Messages per second end to end the messenger should reach."""

OFFLINE_TARGET = 0.999
"""Offline delivery ratio the system should reach."""

DEFAULT_END_TO_END_TIMEOUT = 600.0
"""Wall seconds the end-to-end run waits for its last message before it reports the rate of those received."""

DEFAULT_TIMEOUT = 8 * 3600.0
"""Wall seconds the whole benchmark may run before it ends itself (exit status 2, no figures).  The full-size
offline simulation takes hours on a two-core machine; see the module docstring."""


def _parser() -> argparse.ArgumentParser:
    defaults = OfflineConfig()
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_messaging", description=__doc__.split("\n")[0])
    loopback = parser.add_argument_group("loopback rates")
    loopback.add_argument("--messages", type=int, default=10_000, help="messages per loopback run (default 10,000)")
    loopback.add_argument(
        "--e2e-timeout",
        type=float,
        default=DEFAULT_END_TO_END_TIMEOUT,
        help="wall seconds the end-to-end run may take after its first send",
    )
    offline = parser.add_argument_group("offline delivery (simulated, virtual time)")
    offline.add_argument("--nodes", type=int, default=defaults.nodes, help="all nodes: DHT nodes plus 2 per pair")
    offline.add_argument("--pairs", type=int, default=defaults.pairs, help="sender/recipient pairs of Nodes")
    offline.add_argument("--hours", type=float, default=defaults.hours, help="longest absence of a recipient")
    offline.add_argument(
        "--messages-per-pair", type=int, default=defaults.messages_per_pair, help="messages sent while away"
    )
    offline.add_argument("--churn", type=float, default=defaults.churn, help="DHT nodes going offline per hour")
    offline.add_argument(
        "--offline-mean", type=float, default=defaults.offline_mean, help="mean offline period of a DHT node, s"
    )
    offline.add_argument(
        "--settle", type=float, default=defaults.settle, help="virtual seconds after the last return (at most)"
    )
    offline.add_argument("--join-batch", type=int, default=defaults.join_batch, help="DHT nodes joining at once")
    offline.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="wall seconds before the benchmark gives up (exit 2)"
    )
    parser.add_argument("--profile", metavar="PREFIX", help="write cProfile stats to PREFIX.end_to_end/.offline")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return parser


def _give_up(signum: int, frame: object) -> None:
    print("[bench_messaging] --timeout reached: giving up without figures", file=sys.stderr, flush=True)
    os._exit(2)  # from inside trio.run: nothing to clean up but loopback sockets and a temporary directory


def _profiler(prefix: str | None) -> cProfile.Profile | None:
    return None if prefix is None else cProfile.Profile()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.messages < 1 or args.e2e_timeout <= 0 or args.timeout < 1:
        parser.error("need --messages >= 1, a positive --e2e-timeout and a --timeout of at least 1 s")
    try:
        config = OfflineConfig(
            nodes=args.nodes,
            pairs=args.pairs,
            hours=args.hours,
            churn=args.churn,
            offline_mean=args.offline_mean,
            messages_per_pair=args.messages_per_pair,
            settle=args.settle,
            join_batch=args.join_batch,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    os.environ[ALLOW_ENV_VAR] = ALLOWED_NETWORKS  # before any RealNetwork reads it
    signal.signal(signal.SIGALRM, _give_up)
    signal.alarm(math.ceil(args.timeout))

    started = time.perf_counter()
    info(f"{args.messages:,} messages of {MESSAGE_BYTES} bytes per loopback run")
    raw = trio.run(raw_rate, args.messages)
    info(f"raw: {raw:,.0f} messages/s")
    channel = trio.run(channel_rate, args.messages)
    info(f"channel: {channel:,.0f} messages/s, {channel / raw:.2f}x raw (target >= {CHANNEL_TARGET}x)")
    e2e_profile = _profiler(args.profile)
    e2e = trio.run(lambda: end_to_end_rate(args.messages, timeout=args.e2e_timeout, profile=e2e_profile))
    info(f"end to end: {e2e:,.0f} messages/s (target >= {END_TO_END_TARGET:,.0f})")
    if e2e_profile is not None:
        e2e_profile.dump_stats(f"{args.profile}.end_to_end")

    offline_profile = _profiler(args.profile)
    if offline_profile is not None:
        offline_profile.enable()
    offline = simulate_offline(config)
    if offline_profile is not None:
        offline_profile.disable()
        offline_profile.dump_stats(f"{args.profile}.offline")
    phases = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in offline.phases.items())
    info(
        f"offline delivery ratio: {offline.delivered:,}/{offline.sent:,} = {offline.ratio:.4f} "
        f"(target >= {OFFLINE_TARGET}); simulation {offline.wall_s:.0f}s wall ({phases})"
    )
    info(f"whole benchmark: {time.perf_counter() - started:.0f}s wall")

    result = {
        "raw_per_s": round(raw, 1),
        "channel_per_s": round(channel, 1),
        "end_to_end_per_s": round(e2e, 1),
        "offline_delivery_ratio": round(offline.ratio, 6),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"raw {raw:,.0f}/s, channel {channel:,.0f}/s ({channel / raw:.2f}x raw), end to end {e2e:,.0f}/s; "
            f"offline delivery {offline.ratio:.4%} of {offline.sent:,} messages"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
