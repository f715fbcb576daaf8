"""``python -m simulations run``: p2pchat's real node code, thousands of nodes in one process, on virtual time.

What runs (the results' ``model`` field says the same):

* Every node is the project's :class:`~p2pchat.dht.node.DhtNode` (real certificates, signatures, records, write
  tokens, quotas, in-memory stores) on a :class:`~p2pchat.net.sim.SimNetwork` under trio's ``MockClock``.
* The nodes of the messaging workload are whole :class:`~p2pchat.node.Node` objects -- DHT, Messenger, X3DH and
  Double Ratchet, direct channels, mailboxes, in-memory SQLite.  The other nodes are DHT nodes only: a Node also
  publishes a peer record and a prekey bundle (50 one-time prekeys, each an X25519 key generation) when it joins,
  which would cost 10,000 nodes minutes of CPU and 10,000 x 2 records nobody reads.
* Hostile nodes are DhtNodes whose answers lie or stay silent (:mod:`simulations.hostile`).
* Shortcut: all nodes share one :class:`~p2pchat.core.nodecert.CertCache` (each certificate's signature is checked
  once per run instead of once per node that meets it; what is accepted does not change).

How a run goes: the plain DHT nodes join in batches (1, 1, 2, 4, ... up to ``join_batch`` at once), each from a
random *honest* node of an earlier batch (bootstrap addresses are well known; hostile nodes join like everyone but
are nobody's bootstrap); then the messaging Nodes start and join.  Then the workload runs for ``duration_s``:
dead contacts vanish at its start; churn takes honest plain nodes down and up; lookups start at random moments,
each from a random honest plain node online at the time; senders send at random moments; recipients chosen to be
away go offline once.  The run ends when every lookup has ended and every message has arrived, or ``settle_s``
after the workload, whichever is first.  Samples of replicas and storage are taken every ``sample_interval_s``.

**Determinism.**  Every random draw comes from the scenario's seed (one stream per purpose, so changing, say, the
number of lookups does not move the churn); the SimNetwork seeds trio's scheduler.  The results hold no wall-clock
figure: wall time, CPU time and memory go to :class:`RunInfo` (``run.json``), beside them.
"""

from __future__ import annotations

import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import trio
import trio.testing

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.nodecert import CertCache
from p2pchat.core.packets import NodeInfo
from p2pchat.core.records import RecordKind, record_key
from p2pchat.core.routing import K
from p2pchat.dht.node import DhtNode
from p2pchat.dht.store import Space
from p2pchat.env import Env
from p2pchat.messaging.db import MessageState
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.net.sim import LinkModel, LogNormal, SimHost, open_sim_network
from p2pchat.node import Node
from simulations._messaging_loopback import message_text
from simulations._progress import ProgressDisplay
from simulations._simkit import (
    UDP_PORT,
    ChurnDriver,
    Exponential,
    GcSettler,
    closest_where,
    join_batches,
    join_in_batches,
    make_full_node,
)
from simulations.hostile import HostileDhtNode, grind_identities
from simulations.scenario import Scenario, duration_model, latency_model, mean_of

__all__ = ["FORMAT", "MODEL", "SHORTCUTS", "RunInfo", "run_scenario", "summarize"]

FORMAT = 1
"""Version of the results layout."""

MODEL = (
    "Every node runs p2pchat's real DhtNode (node certificates, signed records, write tokens, quotas, in-memory "
    "stores) on SimNetwork with trio's MockClock (virtual time). The messaging pairs are whole Nodes (DHT + "
    "Messenger: X3DH, Double Ratchet, direct channels, mailboxes, in-memory SQLite); the other nodes are DHT "
    "nodes only. Hostile nodes are DhtNodes whose answers lie or stay silent."
)

SHORTCUTS = (
    "one CertCache shared by all nodes: each node certificate's signature is checked once per run, not once per "
    "node that meets it (what is accepted does not change)",
    "plain DHT nodes are DhtNodes, not whole Nodes: they publish no peer record or prekey bundle and run no "
    "Messenger (only the messaging pairs do)",
    "bootstrap addresses are honest nodes (hostile nodes join like everyone else but are nobody's bootstrap)",
    "a churning node comes back with the routing table and store it had (a restart from its own databases)",
)

QUANTILE_POINTS = 100
"""Points kept of each latency distribution (the 1st to the 100th percentile), for the CDF plots."""

SETTLE_EVERY = 1000
"""Lookups between two garbage-collector settles."""

TICKS = 200
"""Progress updates over a run's virtual time (the ticker runs whether or not anything is shown)."""

MAX_ASKER_DRAWS = 1000
"""Draws of a random honest node before a lookup gives up finding one online (then it is not run)."""


# --- figures -----------------------------------------------------------------------------------------------------


def _rank(sorted_values: list[float], fraction: float) -> float:
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values: list[float], digits: int = 3) -> dict[str, float | int]:
    """Count, mean, minimum, nearest-rank percentiles and maximum of ``values`` (all 0 for none)."""
    if not values:
        return {"count": 0, "mean": 0.0, "min": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "mean": round(math.fsum(ordered) / len(ordered), digits),
        "min": round(ordered[0], digits),
        "p50": round(_rank(ordered, 0.5), digits),
        "p90": round(_rank(ordered, 0.9), digits),
        "p99": round(_rank(ordered, 0.99), digits),
        "max": round(ordered[-1], digits),
    }


def _quantiles(values: list[float], digits: int = 3) -> list[float]:
    if not values:
        return []
    ordered = sorted(values)
    return [round(_rank(ordered, q / QUANTILE_POINTS), digits) for q in range(1, QUANTILE_POINTS + 1)]


def _ratio(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 1.0


@dataclass(slots=True)
class RunInfo:
    """What a run cost in the real world: never part of the results (it differs run to run)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mib: float = 0.0
    phases_wall_s: dict[str, float] = field(default_factory=dict)
    gc_s: float = 0.0
    gc_collections: int = 0
    load_average_start: list[float] = field(default_factory=list)
    load_average_end: list[float] = field(default_factory=list)
    cpus: int = 0
    python: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``run.json``."""
        data = asdict(self)
        for key in ("wall_s", "cpu_s", "peak_rss_mib", "gc_s"):
            data[key] = round(data[key], 2)
        data["phases_wall_s"] = {k: round(v, 2) for k, v in self.phases_wall_s.items()}
        return data


# --- the population ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pair:
    index: int
    sender: Node
    recipient: Node
    recipient_host: SimHost
    targeted: bool
    away_from: float | None = None
    away_until: float | None = None
    send_times: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _Message:
    pair: _Pair
    sent_at: float
    while_away: bool
    arrived_at: float | None = None
    path: str = ""
    mailbox: str = ""
    """Where it was stored, if it was: "public" (the recipient's mailbox named in its prekey record) or "pairwise"."""
    copies: int = 0


@dataclass(slots=True)
class _Lookup:
    at: float
    asker: int
    target: int
    targeted: bool
    ran: bool = False
    success: bool = False
    exact: bool = False
    hops: int = 0
    rpcs: int = 0
    latency_ms: float = 0.0


class _Population:
    """Who is who among the plain DHT nodes: honest, hostile (by behaviour), Sybil (by target), dead, churning."""

    def __init__(self, scenario: Scenario, targeted_keys: list[NodeId]) -> None:
        s = scenario
        rng = random.Random(f"{s.seed}:roles")
        count = s.dht_nodes
        self.roles = ["honest"] * count
        self.sybil_identity: dict[int, Identity] = {}
        self.sybil_target: dict[int, int] = {}
        self.ground_keys = 0
        self.prefix_bits = s.hostile.sybil_prefix_bits or _auto_prefix_bits(s.nodes)
        # Node 0 founds the network and stays honest; everyone else may be anything.
        others = list(range(1, count))
        rng.shuffle(others)
        cursor = 0
        for t, key in enumerate(targeted_keys):
            identities, tried = grind_identities(key, s.hostile.sybils, self.prefix_bits, f"{s.seed}:sybil:{t}")
            self.ground_keys += tried
            for identity in identities:
                index = others[cursor]
                cursor += 1
                self.roles[index] = "sybil"
                self.sybil_identity[index] = identity
                self.sybil_target[index] = t
        silent = round(s.hostile.silent_fraction * s.nodes)
        lying = round(s.hostile.lying_fraction * s.nodes)
        for _ in range(silent):
            self.roles[others[cursor]] = "silent"
            cursor += 1
        for _ in range(lying):
            kind = s.hostile.lie if s.hostile.lie != "mixed" else rng.choice(("far", "fake"))
            self.roles[others[cursor]] = kind
            cursor += 1
        honest = [i for i in range(count) if self.roles[i] == "honest"]
        dead_count = round(s.churn.dead_fraction * count)
        self.dead = sorted(rng.sample(honest, min(dead_count, len(honest) - 1)))
        dead = set(self.dead)
        self.honest = honest
        self.churning = [i for i in honest if i not in dead] if _churns(s) else []

    def counts(self) -> dict[str, int]:
        """How many plain nodes have each role."""
        out: dict[str, int] = {}
        for role in ("honest", "silent", "far", "fake", "sybil"):
            out[role] = self.roles.count(role)
        out["dead"] = len(self.dead)
        out["churning"] = len(self.churning)
        return out


def _churns(s: Scenario) -> bool:
    return s.churn.rate_per_hour > 0 or s.churn.session is not None


def _auto_prefix_bits(nodes: int) -> int:
    # The k-th closest of N random ids shares about log2(N / k) bits with a key; four more bits put a Sybil closer
    # than the closest honest node with high probability, at 16 times the grinding.
    return max(4, math.ceil(math.log2(max(2, nodes) / K)) + 4)


# --- the network model -------------------------------------------------------------------------------------------


def _network_options(s: Scenario) -> tuple[dict[str, Any], list[int]]:
    """SimNetwork options; with regions, also the region of each host index (drawn for a generous number)."""
    net = s.network
    options: dict[str, Any] = {"time_resolution": net.time_resolution_ms / 1000.0}
    if net.regions is None:
        options["default_link"] = LinkModel(latency=latency_model(net.latency), loss=net.loss, duplicate=net.duplicate)
        return options, []
    regions = net.regions
    rng = random.Random(f"{s.seed}:regions")
    host_region = rng.choices(range(len(regions.names)), weights=regions.shares, k=s.nodes + 1)
    links = [
        [
            LinkModel(
                latency=LogNormal(rtt / 2000.0, regions.sigma, cap=rtt * 5 / 1000.0),
                loss=net.loss,
                duplicate=net.duplicate,
            )
            for rtt in row
        ]
        for row in regions.rtt_ms
    ]

    def policy(src: SimHost, dst: SimHost) -> LinkModel:
        return links[host_region[src.index]][host_region[dst.index]]

    options["link_policy"] = policy
    return options, host_region


def median_rtt_ms(s: Scenario, draws: int = 20_000) -> float:
    """The median round trip between two random hosts under the scenario's latency model (from fixed draws)."""
    rng = random.Random(f"{s.seed}:rtt")
    net = s.network
    rtts: list[float] = []
    if net.regions is None:
        model = latency_model(net.latency)
        rtts = [model.sample(rng) + model.sample(rng) for _ in range(draws)]
    else:
        r = net.regions
        picks = rng.choices(range(len(r.names)), weights=r.shares, k=2 * draws)
        for a, b in zip(picks[::2], picks[1::2], strict=True):
            one_way = r.rtt_ms[a][b] / 2000.0
            rtts.append(sum(one_way * math.exp(r.sigma * rng.gauss(0.0, 1.0)) for _ in range(2)))
    return round(_rank(sorted(rtts), 0.5) * 1000.0, 3)


# --- the run -----------------------------------------------------------------------------------------------------


def run_scenario(scenario: Scenario, display: ProgressDisplay | None = None) -> tuple[dict[str, Any], RunInfo]:
    """Run *scenario* on a MockClock; return its results (deterministic for the scenario) and what it cost."""
    display = display or ProgressDisplay(enabled=False)
    info = RunInfo(
        load_average_start=[round(x, 2) for x in os.getloadavg()],
        cpus=os.cpu_count() or 0,
        python=sys.version.split()[0],
    )
    wall = time.perf_counter()
    cpu = time.process_time()
    clock = trio.testing.MockClock(autojump_threshold=0)
    with GcSettler() as settler:
        results = trio.run(_Run(scenario, display, info, settler).run, clock=clock)
        info.gc_s, info.gc_collections = settler.seconds, settler.collections
    display.finish()
    info.wall_s = time.perf_counter() - wall
    info.cpu_s = time.process_time() - cpu
    info.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info.load_average_end = [round(x, 2) for x in os.getloadavg()]
    return results, info


class _Run:
    def __init__(self, scenario: Scenario, display: ProgressDisplay, info: RunInfo, settler: GcSettler) -> None:
        self.s = scenario
        self.display = display
        self.info = info
        self.settler = settler
        self.certs = CertCache()
        self.pairs: list[_Pair] = []
        self.messages: dict[bytes, _Message] = {}
        self.lookups: list[_Lookup] = []
        self.lookups_done = 0
        self.delivered = 0
        self.all_arrived = trio.Event()
        self.lookups_finished = trio.Event()
        self.samples: list[dict[str, Any]] = []
        self.mailbox_replicas: list[float] = []
        self.plain: list[DhtNode] = []
        self.plain_hosts: list[SimHost] = []
        self.users: list[tuple[Node, SimHost]] = []

    def _phase_done(self, name: str, started: float) -> None:
        self.info.phases_wall_s[name] = time.perf_counter() - started

    async def run(self) -> dict[str, Any]:
        s = self.s
        options, _ = _network_options(s)
        async with open_sim_network(s.seed, **options) as net, trio.open_nursery() as nursery:
            self.net = net
            started = time.perf_counter()
            self._make_users()
            # The Sybils aim at what an outsider can know: the public mailbox named in the recipient's prekey record.
            # Pairwise mailboxes (what a sender uses once it has heard from its recipient) are derived from a
            # secret the two share, so no id can be ground next to them.
            targeted_keys = [p.recipient.messenger.mailbox_key for p in self.pairs if p.targeted]
            self.population = _Population(s, targeted_keys)
            self._phase_done("plan (incl. grinding Sybil keys)", started)
            started = time.perf_counter()
            await self._join(nursery)
            await self._start_users(nursery)
            self._phase_done("join", started)
            self.t_join = trio.current_time()
            started = time.perf_counter()
            await self._workload(nursery)
            self._phase_done("workload", started)
            nursery.cancel_scope.cancel()
        return self._results()

    # -- set-up

    def _make_users(self) -> None:
        s = self.s
        for j in range(2 * s.messaging.pairs):
            node, host = make_full_node(self.net, (s.seed << 32) | (s.dht_nodes + j), self.certs)
            self.users.append((node, host))
        for i in range(s.messaging.pairs):
            (sender, _), (recipient, recipient_host) = self.users[2 * i], self.users[2 * i + 1]
            sender.add_contact(f"peer{i}", recipient.address)
            recipient.add_contact(f"peer{i}", sender.address)
            self.pairs.append(_Pair(i, sender, recipient, recipient_host, targeted=i < s.hostile.targeted_keys))

    async def _join(self, nursery: trio.Nursery) -> None:
        s = self.s
        pop = self.population
        rng = random.Random(f"{s.seed}:bootstrap")
        clusters: list[list[NodeInfo]] = [[] for _ in range(s.hostile.targeted_keys)]
        sybils: list[tuple[HostileDhtNode, list[NodeInfo]]] = []

        def make_node(i: int) -> DhtNode:
            host = self.net.add_host()
            self.plain_hosts.append(host)
            env = Env.simulated(host, (s.seed << 32) | i)
            role = pop.roles[i]
            identity = pop.sybil_identity.get(i) or Identity.generate(env.random_bytes)
            if role == "honest":
                return DhtNode(env, identity, host=host.address, port=UDP_PORT, cert_cache=self.certs)
            node = HostileDhtNode(env, identity, host=host.address, port=UDP_PORT, cert_cache=self.certs)
            node.configure(role, lie_rng=random.Random(f"{s.seed}:lies:{i}"))
            if role == "sybil":
                cluster = clusters[pop.sybil_target[i]]
                cluster.append(NodeInfo(identity.public.node_id.bytes, host.address, UDP_PORT))
                sybils.append((node, cluster))
            return node

        def bootstrap_peer(i: int, first: int) -> int:
            while True:  # an honest node of an earlier batch (node 0 is one)
                peer = rng.randrange(first)
                if pop.roles[peer] == "honest":
                    return peer

        def after_batch(nodes: list[DhtNode]) -> None:
            for node, cluster in sybils:
                node.allies = tuple(cluster)  # the members of its cluster that exist by now
            self.settler.settle()
            self.display.update(len(nodes), f"{trio.current_time():,.0f}s virtual, {self.net.stats.sent:,} datagrams")

        self.display.start("join", s.dht_nodes, "nodes")
        batches = join_batches(s.dht_nodes, s.join_batch)
        self.plain, self.unanswered = await join_in_batches(nursery, batches, make_node, bootstrap_peer, after_batch)
        self.display.finish()

    async def _start_users(self, nursery: trio.Nursery) -> None:
        if not self.users:
            return
        rng = random.Random(f"{self.s.seed}:user-bootstrap")
        honest = self.population.honest
        for node, _ in self.users:
            await nursery.start(node.run)
        async with trio.open_nursery() as joins:
            for node, _ in self.users:
                joins.start_soon(node.bootstrap, [self.plain[honest[rng.randrange(len(honest))]].address])
        self.settler.settle()

    # -- the workload

    async def _workload(self, nursery: trio.Nursery) -> None:
        s = self.s
        t0 = trio.current_time()
        self.t0 = t0
        t_end = t0 + s.duration_s
        horizon = t_end + s.messaging.settle_s
        self.bytes_at_start = [h.bytes_sent for h in self.net.hosts]
        self.datagrams_at_start = [h.datagrams_sent for h in self.net.hosts]
        for i in self.population.dead:
            self.plain_hosts[i].set_down()
        churn = self._churn(t0, horizon)
        self.churn = churn
        self._plan_lookups(t0)
        self._plan_messages(t0)
        self.display.start("workload", horizon - t0, "virtual s")
        async with trio.open_nursery() as work:
            if churn is not None:
                work.start_soon(churn.run)
            work.start_soon(self._ticker, t0, horizon)
            work.start_soon(self._sampler, t0)
            work.start_soon(self._lookup_driver)
            for pair in self.pairs:
                work.start_soon(self._recipient_reads, pair)
                work.start_soon(self._sender_reads, pair)
                work.start_soon(self._sends, pair)
                if pair.away_from is not None:
                    work.start_soon(self._away, pair)
            await self.lookups_finished.wait()
            if not s.messaging.pairs * s.messaging.messages_per_pair:
                self.all_arrived.set()
            with trio.move_on_at(horizon):
                await self.all_arrived.wait()
            # With lookups the workload ends when the last one does; without, it still lasts duration_s.
            until = t_end if not self.lookups else trio.current_time()
            await trio.sleep_until(max(trio.current_time(), until))
            self.t_stop = trio.current_time()
            self._sample()
            work.cancel_scope.cancel()
        self.display.finish()

    def _churn(self, t0: float, horizon: float) -> ChurnDriver | None:
        s = self.s
        if not self.population.churning:
            return None
        hosts = [self.plain_hosts[i] for i in self.population.churning]
        rng = random.Random(f"{s.seed}:churn")
        offline = duration_model(s.churn.offline, "churn.offline")
        if s.churn.session is None:
            assert isinstance(offline, Exponential)
            return ChurnDriver.at_rate(
                hosts, rate_per_hour=s.churn.rate_per_hour, offline=offline, rng=rng, start=t0, horizon=horizon
            )
        session = duration_model(s.churn.session, "churn.session")
        off_mean, on_mean = mean_of(offline, s.seed), mean_of(session, s.seed)
        return ChurnDriver(
            hosts,
            session=session,
            offline=offline,
            offline_share=off_mean / (off_mean + on_mean),
            rng=rng,
            start=t0,
            horizon=horizon,
        )

    def _plan_lookups(self, t0: float) -> None:
        s = self.s
        rng = random.Random(f"{s.seed}:lookups")
        honest = self.population.honest
        targets = [p.recipient.messenger.mailbox_key.int for p in self.pairs if p.targeted]
        plan = [
            _Lookup(t0 + rng.uniform(0, s.duration_s), honest[rng.randrange(len(honest))], rng.getrandbits(160), False)
            for _ in range(s.lookups.count)
        ]
        plan += [
            _Lookup(t0 + rng.uniform(0, s.duration_s), honest[rng.randrange(len(honest))], rng.choice(targets), True)
            for _ in range(s.lookups.targeted)
        ]
        plan.sort(key=lambda lookup: lookup.at)
        self.lookups = plan
        self.asker_rng = random.Random(f"{s.seed}:askers")
        # Who counts as "the closest node": honest nodes (plain and messaging), online at the lookup's end.
        self.honest_ids: dict[int, SimHost] = {self.plain[i].node_id.int: self.plain_hosts[i] for i in honest}
        for node, host in self.users:
            self.honest_ids[node.dht.node_id.int] = host
        self.sorted_honest = sorted(self.honest_ids)

    def _plan_messages(self, t0: float) -> None:
        s = self.s
        m = s.messaging
        rng = random.Random(f"{s.seed}:messages")
        offline = duration_model(m.offline, "messaging.offline")
        for pair in self.pairs:
            if pair.targeted or rng.random() < m.offline_share:
                length = min(offline.sample(rng), s.duration_s)
                pair.away_from = t0 + rng.uniform(0.0, s.duration_s - length)
                pair.away_until = pair.away_from + length
            pair.send_times = sorted(t0 + rng.uniform(0.0, s.duration_s) for _ in range(m.messages_per_pair))

    async def _ticker(self, t0: float, horizon: float) -> None:
        step = max(1.0, (horizon - t0) / TICKS)
        total = len(self.pairs) * self.s.messaging.messages_per_pair
        while True:
            await trio.sleep(step)
            self.display.update(
                trio.current_time() - t0,
                f"lookups {self.lookups_done:,}/{len(self.lookups):,}, messages {self.delivered:,}/{total:,}",
            )

    async def _sampler(self, t0: float) -> None:
        while True:
            self._sample()
            await trio.sleep(self.s.sample_interval_s)

    def _sample(self) -> None:
        wall = None
        tracked = self._tracked_records()
        holders = dict.fromkeys(tracked, 0)
        storage: list[float] = []
        entries = 0
        live = 0
        for node, host in self._all_nodes():
            if not host.up:
                continue
            live += 1
            store = node.store
            storage.append(float(store.total_bytes))
            for space, key in store.keys():  # noqa: SIM118 - a method, not a dict
                if space is Space.RECORD and key in holders:
                    if wall is None:
                        wall = node.env.wall_time()
                    if store.record(key, wall) is not None:
                        holders[key] += 1
                elif space is Space.ENTRY:
                    entries += store.entry_count(key)
        counts = [float(c) for c in holders.values()]
        self.samples.append(
            {
                "t_s": round(trio.current_time() - self.t0, 3),
                "live_nodes": live,
                "record_replicas": summarize(counts, 2),
                "mailbox_entries_held": entries,
                "storage_bytes": summarize(storage, 1),
            }
        )

    def _tracked_records(self) -> list[NodeId]:
        keys = []
        for node, _ in self.users:
            keys.append(record_key(RecordKind.PEER, node.key))
            keys.append(record_key(RecordKind.PREKEYS, node.key))
        return keys

    def _all_nodes(self) -> list[tuple[DhtNode, SimHost]]:
        out = list(zip(self.plain, self.plain_hosts, strict=True))
        out += [(node.dht, host) for node, host in self.users]
        return out

    async def _lookup_driver(self) -> None:
        async with trio.open_nursery() as lookups:
            for lookup in self.lookups:
                await trio.sleep_until(lookup.at)
                lookups.start_soon(self._one_lookup, lookup)
        self.lookups_finished.set()

    async def _one_lookup(self, lookup: _Lookup) -> None:
        honest = self.population.honest
        asker = lookup.asker
        draws = 0
        while not self.plain_hosts[asker].up:
            draws += 1
            if draws > MAX_ASKER_DRAWS:
                return
            asker = honest[self.asker_rng.randrange(len(honest))]
        node = self.plain[asker]
        started = trio.current_time()
        result = await node.find_node(NodeId.from_int(lookup.target))
        lookup.ran = True
        lookup.latency_ms = (trio.current_time() - started) * 1000.0
        lookup.hops, lookup.rpcs = result.hops, result.rpcs
        own = node.node_id.int
        hosts = self.honest_ids
        closest = closest_where(self.sorted_honest, lookup.target, lambda i: i != own and hosts[i].up)
        found = [c.node_id.int for c in result.contacts]
        lookup.success = closest is not None and closest in found
        lookup.exact = bool(found) and found[0] == closest
        self.lookups_done += 1
        if self.lookups_done % SETTLE_EVERY == 0:
            self.settler.settle()

    async def _away(self, pair: _Pair) -> None:
        assert pair.away_from is not None and pair.away_until is not None
        await trio.sleep_until(pair.away_from)
        pair.recipient_host.set_down()
        await trio.sleep_until(pair.away_until)
        pair.recipient_host.set_up()

    async def _sends(self, pair: _Pair) -> None:
        for n, when in enumerate(pair.send_times):
            await trio.sleep_until(when)
            row = pair.sender.send(pair.recipient.key, message_text(n))
            self.messages[row.id] = _Message(pair, trio.current_time(), not pair.recipient_host.up)

    async def _recipient_reads(self, pair: _Pair) -> None:
        total = len(self.pairs) * self.s.messaging.messages_per_pair
        async for event in pair.recipient.events:
            if not isinstance(event, IncomingMessage):
                continue
            message = self.messages.get(event.message.id)
            if message is None or message.pair is not pair:
                continue
            message.copies += 1
            if message.copies > 1:
                continue
            message.arrived_at = trio.current_time()
            # How it came: the sender's state for it now.  "sent" = over a direct channel; "stored" = stored in the
            # mailbox and not sent directly since, so the recipient took it from there.
            row = pair.sender.db.message(event.message.id)
            state = row.state if row is not None else None
            message.path = {MessageState.SENT: "direct", MessageState.STORED: "mailbox"}.get(state, "other")  # type: ignore[arg-type]
            self.delivered += 1
            if self.delivered >= total:
                self.all_arrived.set()

    async def _sender_reads(self, pair: _Pair) -> None:
        async for event in pair.sender.events:
            if isinstance(event, DeliveryUpdate) and event.state is MessageState.STORED:
                self.mailbox_replicas.append(float(event.replicas))
                message = self.messages.get(event.message_id)
                if message is not None and not message.mailbox:
                    # The sender picks the pairwise mailbox once it has heard from the recipient; the recipient is
                    # away while its mail is stored, so this cannot have changed since the store.
                    heard = pair.sender.db.heard_from(pair.recipient.key)
                    message.mailbox = "pairwise" if heard else "public"

    # -- results

    def _results(self) -> dict[str, Any]:
        s = self.s
        pop = self.population
        rtt = median_rtt_ms(s)
        results: dict[str, Any] = {
            "format": FORMAT,
            "scenario": s.to_dict(),
            "model": MODEL,
            "shortcuts": list(SHORTCUTS),
            "population": {
                "nodes": s.nodes,
                "plain_dht_nodes": s.dht_nodes,
                "full_nodes": 2 * s.messaging.pairs,
                **pop.counts(),
                "sybil_prefix_bits": pop.prefix_bits if pop.sybil_identity else 0,
                "sybil_keys_tried": pop.ground_keys,
                "bootstrap_unanswered": self.unanswered,
            },
            "virtual_s": {
                "join": round(self.t_join, 3),
                "workload": round(self.t_stop - self.t0, 3),
                "end": round(self.t_stop, 3),
            },
            "network": self._network(rtt),
            "lookups": self._lookup_results(rtt),
            "messaging": self._messaging_results(),
            "replicas": {
                "tracked_records": len(self._tracked_records()),
                "interval_s": s.sample_interval_s,
                "samples": self.samples,
            },
            "traffic": self._traffic(),
            "storage": self._storage(),
            "churn": self._churn_results(),
        }
        results["targets"] = [_evaluate(t.metric, t.op, t.value, results) for t in s.targets]
        return results

    def _network(self, rtt: float) -> dict[str, Any]:
        stats = self.net.stats
        return {
            "median_rtt_ms": rtt,
            "datagrams_sent": stats.sent,
            "datagrams_delivered": stats.delivered,
            "lost": stats.lost,
            "duplicated": stats.duplicated,
            "dropped_down": stats.dropped_down,
            "dropped_unreachable": stats.dropped_unreachable,
            "dropped_overflow": stats.dropped_overflow,
            "datagram_bytes": stats.bytes_sent,
            "stream_bytes": stats.stream_bytes,
        }

    def _lookup_results(self, rtt: float) -> dict[str, Any]:
        def group(items: list[_Lookup]) -> dict[str, Any]:
            ran = [x for x in items if x.ran]
            latencies = [x.latency_ms for x in ran]
            hops = [float(x.hops) for x in ran]
            histogram: dict[str, int] = {}
            for x in sorted(ran, key=lambda x: x.hops):
                histogram[str(x.hops)] = histogram.get(str(x.hops), 0) + 1
            summary = summarize(latencies)
            return {
                "planned": len(items),
                "ran": len(ran),
                "succeeded": sum(x.success for x in ran),
                "success_rate": _ratio(sum(x.success for x in ran), len(ran)),
                "exact_first_rate": _ratio(sum(x.exact for x in ran), len(ran)),
                "hops": summarize(hops, 2),
                "hops_histogram": histogram,
                "rpcs": summarize([float(x.rpcs) for x in ran], 2),
                "latency_ms": summary,
                "latency_ms_quantiles": _quantiles(latencies),
                "latency_over_median_rtt": {
                    "p50": round(float(summary["p50"]) / rtt, 3) if rtt else 0.0,
                    "p99": round(float(summary["p99"]) / rtt, 3) if rtt else 0.0,
                },
            }

        out = group([x for x in self.lookups if not x.targeted])
        out["definition"] = (
            "success: the honest node closest to the target among those online when the lookup ended (the asker "
            "excluded) is among the contacts it returned; exact_first: it is the first of them. hops: length of the "
            "referral chain to the closest node that answered. latency: virtual time from start to end."
        )
        if self.s.lookups.targeted:
            out["targeted"] = group([x for x in self.lookups if x.targeted])
        return out

    def _messaging_results(self) -> dict[str, Any]:
        def group(items: list[_Message]) -> dict[str, Any]:
            arrived = [x for x in items if x.arrived_at is not None]
            latency = [x.arrived_at - x.sent_at for x in arrived if x.arrived_at is not None]
            by_path = {p: [x for x in arrived if x.path == p] for p in ("direct", "mailbox", "other")}
            return {
                "sent": len(items),
                "delivered": len(arrived),
                "delivery_ratio": _ratio(len(arrived), len(items)),
                "lost": len(items) - len(arrived),
                "direct": len(by_path["direct"]),
                "mailbox": len(by_path["mailbox"]),
                "mailbox_public": sum(x.mailbox == "public" for x in by_path["mailbox"]),
                "mailbox_pairwise": sum(x.mailbox == "pairwise" for x in by_path["mailbox"]),
                "other_path": len(by_path["other"]),
                "received_more_than_once": sum(x.copies > 1 for x in items),
                "latency_s": summarize(latency),
                "latency_s_direct": summarize([x.arrived_at - x.sent_at for x in by_path["direct"]]),  # type: ignore[operator]
                "latency_s_mailbox": summarize([x.arrived_at - x.sent_at for x in by_path["mailbox"]]),  # type: ignore[operator]
                "latency_s_quantiles_direct": _quantiles([x.arrived_at - x.sent_at for x in by_path["direct"]]),  # type: ignore[operator]
                "latency_s_quantiles_mailbox": _quantiles([x.arrived_at - x.sent_at for x in by_path["mailbox"]]),  # type: ignore[operator]
            }

        messages = list(self.messages.values())
        out = group(messages)
        out["pairs"] = len(self.pairs)
        out["recipients_away"] = sum(p.away_from is not None for p in self.pairs)
        out["mailbox_replicas_confirmed"] = summarize(self.mailbox_replicas, 2)
        out["while_away"] = group([x for x in messages if x.while_away])
        if self.s.hostile.targeted_keys:
            out["targeted"] = group([x for x in messages if x.pair.targeted])
            out["untargeted"] = group([x for x in messages if not x.pair.targeted])
        out["definition"] = (
            "delivered: the recipient's IncomingMessage arrived (first copy counted). direct/mailbox: the sender's "
            "state for the message when it arrived ('sent' over a direct channel, or 'stored' in the mailbox and "
            "not sent directly since). mailbox_public/mailbox_pairwise: of those, stored in the recipient's public "
            "mailbox (named in its prekey record: first contact) or in its pairwise mailbox for the sender (once the "
            "sender has heard from the recipient; its DHT key cannot be computed by others). latency: virtual "
            "seconds from send to arrival. while_away: messages sent while their recipient was offline (the mailbox "
            "path)."
        )
        return out

    def _traffic(self) -> dict[str, Any]:
        hours = max(1e-9, (self.t_stop - self.t0) / 3600.0)
        hosts = self.net.hosts
        per_host = [(h.bytes_sent - self.bytes_at_start[h.index]) / hours for h in hosts]
        datagrams = [(h.datagrams_sent - self.datagrams_at_start[h.index]) / hours for h in hosts]
        user_hosts = {host.index for _, host in self.users}
        return {
            "window_s": round(self.t_stop - self.t0, 3),
            "bytes_per_node_per_hour": summarize(per_host, 1),
            "datagrams_per_node_per_hour": summarize(datagrams, 1),
            "messaging_nodes_bytes_per_hour": summarize([per_host[i] for i in sorted(user_hosts)], 1),
            "definition": "bytes each host handed to the network during the workload (datagram payloads and "
            "stream bytes, no IP/UDP/TCP headers), per virtual hour; all hosts, offline time included.",
        }

    def _storage(self) -> dict[str, Any]:
        nodes = self._all_nodes()
        return {
            "bytes_per_node": summarize([float(n.store.total_bytes) for n, _ in nodes], 1),
            "items_per_node": summarize([float(len(n.store)) for n, _ in nodes], 1),
            "definition": "what each node's store holds for others at the end (its quota accounting: blob bytes).",
        }

    def _churn_results(self) -> dict[str, Any]:
        churn = self.churn
        if churn is None:
            return {"churning_nodes": 0}
        return {
            "churning_nodes": len(self.population.churning),
            "initially_down": churn.initially_down,
            "went_offline": churn.downs,
            "offline_fraction": round(churn.offline_fraction(self.t_stop), 4),
            "per_node_hour": round(
                churn.downs / max(1e-9, len(self.population.churning) * (self.t_stop - self.t0) / 3600.0), 4
            ),
        }


def _evaluate(metric: str, op: str, value: float, results: dict[str, Any]) -> dict[str, Any]:
    actual: Any = results
    for part in metric.split("."):
        actual = actual.get(part) if isinstance(actual, dict) else None
    met: bool | None = None
    if isinstance(actual, int | float):
        met = actual <= value if op == "<=" else actual >= value
    return {"metric": metric, "op": op, "target": value, "actual": actual, "met": met}
