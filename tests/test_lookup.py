"""The iterative lookup state machine, driven against an in-memory network of 2,000 nodes (no I/O, no trio).

Every node of the fake network answers find_node with the closest contacts of a routing table that has heard of
every other node, so an honest lookup must converge to the true k closest.  Replies come back in random order
(seeded), which stands in for latency.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Iterator
from itertools import combinations

import pytest

from p2pchat.core.ids import NODE_ID_BITS, NodeId
from p2pchat.core.lookup import (
    ALPHA,
    DISJOINT_PATHS,
    FINAL_ROUND_SPARES,
    MAX_ADDRESSES_PER_CANDIDATE,
    MAX_CANDIDATES_PER_K,
    MAX_CONTACTS_PER_REPLY,
    MAX_UNANSWERED_REFERRALS,
    Candidate,
    CandidateState,
    DisjointLookup,
    Lookup,
)
from p2pchat.core.routing import K, RoutingTable
from p2pchat.net.base import Address

NETWORK_SIZE = 2000

Reply = list[tuple[NodeId, Address]]
Answer = Callable[[NodeId], Reply | None]  # None: the request times out


def address_of(i: int) -> Address:
    return Address(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 4000)


class FakeNetwork:
    """Node ids, their addresses, and (built on first use) each node's routing table with everyone in it."""

    def __init__(self, size: int, seed: int) -> None:
        rng = random.Random(seed)
        self.ids = [NodeId.from_int(rng.getrandbits(NODE_ID_BITS)) for _ in range(size)]
        self.addresses = {node_id: address_of(i) for i, node_id in enumerate(self.ids)}
        self._tables: dict[NodeId, RoutingTable] = {}

    def table(self, node_id: NodeId) -> RoutingTable:
        table = self._tables.get(node_id)
        if table is None:
            # Observing everyone in this order leaves in each far bucket the first K ids of its shared-prefix
            # length, and everyone after those is only cached or dropped; so observing just those gives the same
            # table about ten times faster.
            table = RoutingTable(node_id)
            firsts: dict[int, list[NodeId]] = {}
            for other in self.ids:
                if other is not node_id:
                    group = firsts.setdefault((other.int ^ node_id.int).bit_length(), [])
                    if len(group) < K:
                        group.append(other)
            for group in firsts.values():
                for other in group:
                    table.observe(other, self.addresses[other], 0.0)
            self._tables[node_id] = table
        return table

    def honest_answer(self, target: NodeId) -> Callable[[NodeId], Reply]:
        def answer(node_id: NodeId) -> Reply:
            return [(c.node_id, c.address) for c in self.table(node_id).closest(target)]

        return answer

    def true_closest(self, target: NodeId, among: list[NodeId], count: int = K) -> list[NodeId]:
        return sorted(among, key=lambda n: n.int ^ target.int)[:count]


@pytest.fixture(scope="module")
def network() -> FakeNetwork:
    return FakeNetwork(NETWORK_SIZE, seed=1)


def random_id(rng: random.Random) -> NodeId:
    return NodeId.from_int(rng.getrandbits(NODE_ID_BITS))


def drive(
    lookup: Lookup | DisjointLookup,
    answer: Answer,
    rng: random.Random,
    *,
    first: Callable[[NodeId], bool] | None = None,
) -> int:
    """Run *lookup* to the end, answering requests in random order (those *first* picks before the others).

    Checks on every step that the lookup's bookkeeping matches what is really in flight, that alpha holds until
    the lookup converges (then up to k may be in flight: the final round), and that a lookup which is not done
    always has something in flight.  Returns the most requests in flight before the final round.
    """
    in_flight: list[NodeId] = []
    peak = 0
    while True:
        for candidate in lookup.next_requests():
            assert candidate.state is CandidateState.IN_FLIGHT
            assert candidate.node_id not in in_flight
            in_flight.append(candidate.node_id)
        paths = lookup.paths if isinstance(lookup, DisjointLookup) else [lookup]
        if not any(p.widened for p in paths):
            peak = max(peak, len(in_flight))
        assert lookup.in_flight == len(in_flight)
        assert all(p.in_flight <= (p.k if p.widened else p.alpha) for p in paths)
        if lookup.done:
            return peak
        assert in_flight, "a lookup that is not done must be waiting for someone"
        preferred = [i for i, n in enumerate(in_flight) if first is not None and first(n)]
        node_id = in_flight.pop(preferred[0] if preferred else rng.randrange(len(in_flight)))
        reply = answer(node_id)
        if reply is None:
            assert lookup.on_failure(node_id)
        else:
            assert lookup.on_reply(node_id, reply)


def ids_of(candidates: list[Candidate]) -> list[NodeId]:
    return [c.node_id for c in candidates]


# --- honest networks -------------------------------------------------------------------------------------------


def test_a_lookup_converges_to_the_true_k_closest_in_few_hops(network: FakeNetwork) -> None:
    rng = random.Random(2)
    hops: list[int] = []
    rpcs: list[int] = []
    for _ in range(150):
        target, asker = random_id(rng), rng.choice(network.ids)
        lookup = Lookup(target, network.table(asker).closest(target), own_id=asker)
        drive(lookup, network.honest_answer(target), rng)
        others = [n for n in network.ids if n != asker]
        result = lookup.result()
        assert ids_of(result) == network.true_closest(target, others)
        assert all(c.state is CandidateState.ANSWERED for c in result)
        assert [c.address for c in result] == [network.addresses[c.node_id] for c in result]
        hops.append(lookup.hops)
        rpcs.append(lookup.rpcs)
    assert statistics.median(hops) <= 4
    assert max(hops) <= 6
    assert statistics.mean(rpcs) < 3 * K


def test_a_lookup_for_an_existing_id_puts_that_node_first(network: FakeNetwork) -> None:
    rng = random.Random(3)
    target, asker = rng.sample(network.ids, 2)
    lookup = Lookup(target, network.table(asker).closest(target), own_id=asker)
    drive(lookup, network.honest_answer(target), rng)
    assert lookup.result()[0].node_id == target


@pytest.mark.parametrize("alpha", [1, ALPHA, 8])
def test_never_more_than_alpha_requests_are_in_flight(network: FakeNetwork, alpha: int) -> None:
    rng = random.Random(4)
    for _ in range(20):
        target, asker = random_id(rng), rng.choice(network.ids)
        seeds = network.table(asker).closest(target)
        probe = Lookup(target, seeds, alpha=alpha, own_id=asker)
        assert len(probe.next_requests()) == alpha  # the seeds fill every slot at once...
        assert probe.next_requests() == []  # ...and no more
        lookup = Lookup(target, seeds, alpha=alpha, own_id=asker)
        assert drive(lookup, network.honest_answer(target), rng) == alpha
        assert ids_of(lookup.result()) == network.true_closest(target, [n for n in network.ids if n != asker])


def test_requests_go_to_the_closest_unasked_first() -> None:
    target = NodeId.from_int(0)
    seeds = [Candidate(NodeId.from_int(d), address_of(d), d, 1) for d in (50, 10, 40, 20, 30)]
    lookup = Lookup(target, seeds, k=4, alpha=2)
    assert [c.distance for c in lookup.next_requests()] == [10, 20]
    assert lookup.on_failure(NodeId.from_int(10))
    assert [c.distance for c in lookup.next_requests()] == [30]
    # 20, the closest live candidate, answered without naming anyone closer: the lookup has converged, so the
    # rest of the k closest live ones (30 is in flight; 40 and 50) are asked at once, not alpha at a time.
    assert not lookup.widened
    assert lookup.on_reply(NodeId.from_int(20), [])
    assert [c.distance for c in lookup.next_requests()] == [40, 50]
    assert lookup.widened
    assert lookup.next_requests() == []


def test_an_early_final_round_starts_at_the_first_answer() -> None:
    target = NodeId.from_int(0)
    seeds = [Candidate(NodeId.from_int(d), address_of(d), d, 1) for d in (10, 20, 30, 40, 50, 60)]
    for early in (False, True):
        lookup = Lookup(target, seeds, k=5, alpha=2, early_final_round=early)
        assert [c.distance for c in lookup.next_requests()] == [10, 20]
        # 20 answered, naming someone closer than 10: no convergence yet, since 10 (the closest) has not answered.
        assert lookup.on_reply(NodeId.from_int(20), [(NodeId.from_int(5), address_of(5))])
        asked = [c.distance for c in lookup.next_requests()]
        if early:
            # The final round has started: the rest of the k closest (5, 30, 40; 10 is in flight) at once.
            assert lookup.widened
            assert asked == [5, 30, 40]
        else:
            assert not lookup.widened
            assert asked == [5]  # alpha at a time: 10 and 5 in flight
    # Without a final round at all, there is no early one either.
    strict = Lookup(target, seeds, k=5, alpha=2, final_round=False, early_final_round=True)
    strict.next_requests()
    assert strict.on_reply(NodeId.from_int(20), [])
    assert not strict.widened
    assert len(strict.next_requests()) == 1


def test_the_final_round_saves_round_trips(network: FakeNetwork) -> None:
    # Answer in waves (every request in flight answered together, as with equal round trips) and count waves.
    rng = random.Random(11)
    fewer = 0
    for _ in range(20):
        target, asker = random_id(rng), rng.choice(network.ids)
        seeds = network.table(asker).closest(target)
        answer = network.honest_answer(target)
        waves = []
        for widen in (True, False):
            lookup = Lookup(target, seeds, own_id=asker, final_round=widen)
            count = 0
            while not lookup.done:
                batch = lookup.next_requests()
                count += 1
                for candidate in batch:
                    lookup.on_reply(candidate.node_id, answer(candidate.node_id))
            waves.append(count)
            assert ids_of(lookup.result()) == network.true_closest(target, [n for n in network.ids if n != asker])
        fewer += waves[0] < waves[1]
    assert fewer >= 15


# --- failures and hostile peers -------------------------------------------------------------------------------


def test_nodes_that_time_out_are_skipped(network: FakeNetwork) -> None:
    rng = random.Random(5)
    dead = set(rng.sample(network.ids, NETWORK_SIZE // 5))
    alive = [n for n in network.ids if n not in dead]
    failures = 0
    for _ in range(60):
        target, asker = random_id(rng), rng.choice(alive)
        honest = network.honest_answer(target)

        def answer(node_id: NodeId, honest: Answer = honest) -> Reply | None:
            return None if node_id in dead else honest(node_id)

        lookup = Lookup(target, network.table(asker).closest(target), own_id=asker)
        drive(lookup, answer, rng)
        result = ids_of(lookup.result())
        truth = network.true_closest(target, [n for n in alive if n != asker])
        # Every table still lists the dead (nobody has evicted them yet), so replies may name fewer than k live
        # nodes near the target, and a live one ranked behind dead ones in every reply stays unknown.  What a
        # lookup must do: return no dead node, find the closest live ones, and answer with everything it learned.
        assert not dead & set(result)
        assert result[:10] == truth[:10]
        learned_live = [c for c in lookup.candidates if c.node_id not in dead]
        assert result == ids_of(learned_live[:K])
        failures += sum(c.state is CandidateState.FAILED for c in lookup.candidates)
    assert failures > 0


def test_liars_with_garbage_and_far_contacts_do_not_break_a_lookup(network: FakeNetwork) -> None:
    rng = random.Random(6)
    liars = set(rng.sample(network.ids, NETWORK_SIZE // 10))
    for _ in range(60):
        target, asker = random_id(rng), rng.choice(network.ids)
        honest = network.honest_answer(target)
        # Far: the ids farthest from the target; garbage: ids nobody holds (asking them times out).
        far = [
            (n, network.addresses[n])
            for n in network.true_closest(NodeId.from_int(~target.int & (2**160 - 1)), network.ids)
        ]

        def answer(node_id: NodeId, honest: Answer = honest, far: Reply = far) -> Reply | None:
            if node_id in liars:
                garbage = [(random_id(rng), address_of(rng.randrange(1 << 24))) for _ in range(10)]
                return far[:10] + garbage
            if node_id not in network.addresses:
                return None
            return honest(node_id)

        lookup = Lookup(target, network.table(asker).closest(target), own_id=asker)
        drive(lookup, answer, rng)
        assert ids_of(lookup.result()) == network.true_closest(target, [n for n in network.ids if n != asker])
        assert len(lookup.candidates) <= lookup.max_candidates


def test_a_reply_is_read_only_up_to_its_limit_and_the_candidate_set_is_capped() -> None:
    target = NodeId.from_int(0)
    k = 2
    seeds = [Candidate(NodeId.from_int(1 << (100 + i)), address_of(i), 0, 1) for i in range(3)]
    lookup = Lookup(target, seeds, k=k, alpha=2)
    assert ids_of(lookup.next_requests()) == [seeds[0].node_id, seeds[1].node_id]
    read = 0

    def flood() -> Iterator[tuple[NodeId, Address]]:
        nonlocal read
        for i in range(1, 1001):
            read += 1
            yield NodeId.from_int(i), address_of(i)

    assert lookup.on_reply(seeds[0].node_id, flood())
    assert read == MAX_CONTACTS_PER_REPLY
    assert len(lookup.candidates) == lookup.max_candidates == MAX_CANDIDATES_PER_K * k
    # The farthest went -- except the request still in flight, whose reply must still be accepted.
    kept = {c.node_id for c in lookup.candidates}
    assert kept == {seeds[1].node_id} | {NodeId.from_int(i) for i in range(1, lookup.max_candidates)}
    assert lookup.on_reply(seeds[1].node_id, [])
    # Once full, a farther newcomer is not even considered.
    assert ids_of(lookup.next_requests()) == [NodeId.from_int(1), NodeId.from_int(2)]
    assert lookup.on_reply(NodeId.from_int(1), [(NodeId.from_int(1 << 120), address_of(7))])
    assert NodeId.from_int(1 << 120) not in {c.node_id for c in lookup.candidates}
    assert len(lookup.candidates) == lookup.max_candidates


def test_a_liar_sending_1000_contacts_stays_bounded(network: FakeNetwork) -> None:
    rng = random.Random(7)
    liars = set(rng.sample(network.ids, NETWORK_SIZE // 10))
    for _ in range(20):
        target, asker = random_id(rng), rng.choice(network.ids)
        honest = network.honest_answer(target)

        def answer(node_id: NodeId, honest: Answer = honest) -> Reply | None:
            if node_id in liars:
                return [(random_id(rng), address_of(i)) for i in range(1000)]
            return honest(node_id) if node_id in network.addresses else None

        lookup = Lookup(target, network.table(asker).closest(target), own_id=asker)
        drive(lookup, answer, rng)
        assert len(lookup.candidates) <= MAX_CANDIDATES_PER_K * K
        assert ids_of(lookup.result()) == network.true_closest(target, [n for n in network.ids if n != asker])


def test_replies_from_nodes_not_asked_are_ignored() -> None:
    target = NodeId.from_int(0)
    a, b, stranger = (Candidate(NodeId.from_int(d), address_of(d), d, 1) for d in (10, 20, 30))
    lookup = Lookup(target, [a, b], alpha=1)
    [asked] = lookup.next_requests()
    assert asked.node_id == a.node_id
    before = list(lookup.candidates)
    offered = [(NodeId.from_int(1), address_of(1))]
    assert lookup.on_reply(b.node_id, offered) is False  # known, but not asked
    assert lookup.on_reply(stranger.node_id, offered) is False  # never heard of
    assert lookup.on_value(stranger.node_id) is False
    assert lookup.on_failure(stranger.node_id) is False
    assert list(lookup.candidates) == before
    assert not lookup.value_found

    assert lookup.on_reply(a.node_id, []) is True
    assert lookup.on_reply(a.node_id, offered) is False  # a second reply to one request
    assert list(lookup.candidates) == before
    [asked] = lookup.next_requests()
    assert lookup.on_failure(asked.node_id) is True
    assert lookup.on_reply(asked.node_id, offered) is False  # too late: it already failed
    assert lookup.on_failure(asked.node_id) is False
    assert lookup.done


def test_duplicates_merge_own_id_is_excluded_and_hops_keep_the_shortest_chain() -> None:
    own = NodeId.from_int(5)
    target = NodeId.from_int(0)
    a, b, c, d = (NodeId.from_int(x) for x in (100, 200, 50, 20))
    addr = address_of
    lookup = Lookup(
        target,
        [Candidate(a, addr(1), 0, 1), Candidate(b, addr(2), 0, 1), Candidate(own, addr(9), 0, 1)],
        alpha=1,
        own_id=own,
    )
    assert {x.node_id for x in lookup.candidates} == {a, b}
    assert ids_of(lookup.next_requests()) == [a]
    lookup.on_reply(a, [(c, addr(3)), (c, addr(3)), (own, addr(9)), (a, addr(1))])
    assert ids_of(lookup.next_requests()) == [c]
    lookup.on_reply(c, [(d, addr(4))])
    depth = {x.node_id: x.depth for x in lookup.candidates}
    assert depth == {a: 1, b: 1, c: 2, d: 3}
    assert ids_of(lookup.next_requests()) == [d]
    lookup.on_reply(d, [])
    assert lookup.hops == 3
    # b (a seed) names d too: d is closer to us than we thought.
    assert ids_of(lookup.next_requests()) == [b]
    lookup.on_reply(b, [(d, addr(4)), (c, addr(3))])
    assert {x.node_id: x.depth for x in lookup.candidates}[d] == 2
    assert lookup.hops == 2
    assert lookup.done
    assert ids_of(lookup.result()) == [d, c, a, b]
    assert own not in ids_of(list(lookup.candidates))


def test_a_failed_candidate_is_retried_once_at_another_address() -> None:
    target = NodeId.from_int(0)
    x, y, z = (NodeId.from_int(v) for v in (10, 100, 200))
    lookup = Lookup(target, [Candidate(y, address_of(1), 0, 1), Candidate(z, address_of(2), 0, 1)], alpha=1)
    assert ids_of(lookup.next_requests()) == [y]
    lookup.on_reply(y, [(x, address_of(66))])  # perhaps a false address for x
    [first] = lookup.next_requests()
    assert (first.node_id, first.address) == (x, address_of(66))
    lookup.on_failure(x)
    assert ids_of(lookup.next_requests()) == [z]
    lookup.on_reply(z, [(x, address_of(3)), (x, address_of(4))])
    [second] = lookup.next_requests()
    assert (second.node_id, second.address, second.addresses_tried) == (x, address_of(3), MAX_ADDRESSES_PER_CANDIDATE)
    lookup.on_failure(x)
    assert lookup.done  # a third address is not tried
    assert ids_of(lookup.result()) == [y, z]


# --- values, stopping ------------------------------------------------------------------------------------------


def test_a_find_value_lookup_can_stop_at_the_first_value_or_collect_from_all(network: FakeNetwork) -> None:
    rng = random.Random(8)
    target, asker = random_id(rng), rng.choice(network.ids)
    holders = set(network.true_closest(target, network.ids)[:5])
    honest = network.honest_answer(target)
    seeds = network.table(asker).closest(target)

    merged = Lookup(target, seeds, own_id=asker)
    stopping = Lookup(target, seeds, own_id=asker, stop_at_first_value=True)
    for lookup in (merged, stopping):
        in_flight: list[NodeId] = []
        while not lookup.done:
            in_flight += ids_of(lookup.next_requests())
            node_id = in_flight.pop(0)
            if node_id in holders:
                lookup.on_value(node_id, honest(node_id))
            else:
                lookup.on_reply(node_id, honest(node_id))
        assert lookup.value_found
    assert len(stopping.value_holders()) == 1
    assert stopping.next_requests() == []
    assert {c.node_id for c in merged.value_holders()} == holders - {asker}
    assert ids_of(merged.result()) == network.true_closest(target, [n for n in network.ids if n != asker])


def test_finish_stops_a_lookup_but_late_replies_still_count() -> None:
    target = NodeId.from_int(0)
    lookup = Lookup(target, [Candidate(NodeId.from_int(d), address_of(d), d, 1) for d in (1, 2, 3, 4)])
    asked = lookup.next_requests()
    lookup.finish()
    assert lookup.done
    assert lookup.next_requests() == []
    assert lookup.on_reply(asked[0].node_id, [])
    assert ids_of(lookup.result()) == [asked[0].node_id]


def test_a_lookup_with_nothing_to_ask_is_done_at_once() -> None:
    lookup = Lookup(NodeId.from_int(0), [])
    assert lookup.done
    assert lookup.next_requests() == []
    assert lookup.result() == []
    assert lookup.hops == 0
    assert lookup.rpcs == 0


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="k must"):
        Lookup(NodeId.from_int(0), [], k=0)
    with pytest.raises(ValueError, match="alpha"):
        Lookup(NodeId.from_int(0), [], alpha=0)
    with pytest.raises(ValueError, match="path"):
        DisjointLookup(NodeId.from_int(0), [], paths=0)


# --- disjoint paths --------------------------------------------------------------------------------------------


def run_with_liars(
    network: FakeNetwork, seed: int, *, disjoint: bool, k: int, lookups: int
) -> tuple[float, list[Lookup | DisjointLookup]]:
    """Lookups where 20% of nodes lie, answering first and naming only the liars closest to the target.

    Returns the share of lookups whose result holds the closest honest node, and the lookups.
    """
    rng = random.Random(seed)
    liars = set(rng.sample(network.ids, NETWORK_SIZE // 5))
    honest_nodes = [n for n in network.ids if n not in liars]
    found = 0
    runs: list[Lookup | DisjointLookup] = []
    for _ in range(lookups):
        target, asker = random_id(rng), rng.choice(honest_nodes)
        honest = network.honest_answer(target)
        lie = [(n, network.addresses[n]) for n in network.true_closest(target, list(liars))]

        def answer(node_id: NodeId, honest: Callable[[NodeId], Reply] = honest, lie: Reply = lie) -> Reply:
            return lie if node_id in liars else honest(node_id)

        seeds = network.table(asker).closest(target)
        lookup: Lookup | DisjointLookup = (
            DisjointLookup(target, seeds, k=k, own_id=asker) if disjoint else Lookup(target, seeds, k=k, own_id=asker)
        )
        drive(lookup, answer, rng, first=liars.__contains__)  # an attacker answers at once
        best_honest = network.true_closest(target, [n for n in honest_nodes if n != asker], 1)[0]
        found += best_honest in ids_of(lookup.result())
        runs.append(lookup)
    return found / lookups, runs


def test_disjoint_paths_find_the_closest_honest_node_despite_20_percent_liars(network: FakeNetwork) -> None:
    rate, runs = run_with_liars(network, 9, disjoint=True, k=K, lookups=60)
    assert rate >= 0.98
    for lookup in runs:
        assert isinstance(lookup, DisjointLookup)
        assert len(lookup.paths) == DISJOINT_PATHS
        asked = [
            {c.node_id for c in path.candidates if c.state in (CandidateState.ANSWERED, CandidateState.FAILED)}
            for path in lookup.paths
        ]
        for one, other in combinations(asked, 2):
            assert not one & other
        result = lookup.result()
        assert ids_of(result) == sorted(ids_of(result), key=lambda n: n.int ^ lookup.target.int)
        assert len(result) == K


def test_disjoint_paths_beat_a_single_path_when_the_window_is_narrow(network: FakeNetwork) -> None:
    # With k=8 the liars' eight closest fill a single lookup's window before the honest neighbourhood is
    # reached; a liar can capture only the path that asked it.
    single, _ = run_with_liars(network, 10, disjoint=False, k=8, lookups=60)
    disjoint, _ = run_with_liars(network, 10, disjoint=True, k=8, lookups=60)
    assert disjoint >= 0.95
    assert single < 0.9


def test_disjoint_seeds_are_dealt_by_distance_and_replies_reach_the_path_that_asked() -> None:
    target = NodeId.from_int(0)
    own = NodeId.from_int(999)
    seeds = [Candidate(NodeId.from_int(d), address_of(d), d, 1) for d in (60, 10, 50, 20, 40, 30)]
    seeds.append(Candidate(own, address_of(0), 0, 1))
    seeds.append(seeds[0])  # a duplicate
    lookup = DisjointLookup(target, seeds, own_id=own, alpha=1)
    assert [[c.distance for c in p.candidates] for p in lookup.paths] == [[10, 40], [20, 50], [30, 60]]
    assert [c.distance for c in lookup.next_requests()] == [10, 20, 30]
    # Path 0 hears of 20 (path 1's) and 5; path 1 already asked 20, so path 0 ignores it.
    assert lookup.on_reply(
        NodeId.from_int(10), [(NodeId.from_int(20), address_of(20)), (NodeId.from_int(5), address_of(5))]
    )
    assert [c.distance for c in lookup.paths[0].candidates] == [5, 10, 40]
    assert lookup.on_reply(NodeId.from_int(20), [(NodeId.from_int(5), address_of(5))])
    assert [c.distance for c in lookup.paths[1].candidates] == [5, 20, 50]
    # Both paths know 5; the first to ask claims it, and the other marks it taken.
    assert [c.distance for c in lookup.next_requests()] == [5, 50]
    assert lookup.paths[1].candidates[0].state is CandidateState.TAKEN
    assert lookup.on_reply(NodeId.from_int(999), []) is False
    assert lookup.on_failure(NodeId.from_int(5))
    assert lookup.on_value(NodeId.from_int(50))
    assert lookup.value_found
    assert ids_of(lookup.value_holders()) == [NodeId.from_int(50)]
    assert lookup.on_reply(NodeId.from_int(30), [])
    while not lookup.done:
        for c in lookup.next_requests():
            lookup.on_reply(c.node_id, [])
    assert [c.distance for c in lookup.result()] == [10, 20, 30, 40, 50, 60]
    assert lookup.hops == 1
    assert lookup.rpcs == 7
    lookup.finish()
    assert lookup.next_requests() == []


# --- overdue requests and failing referrers --------------------------------------------------------------------


def test_an_overdue_request_frees_its_slot_and_its_late_reply_still_counts() -> None:
    target = NodeId.from_int(0)
    seeds = [Candidate(NodeId.from_int(d), address_of(d), d, 1) for d in (10, 20, 30)]
    lookup = Lookup(target, seeds, alpha=1)
    assert [c.distance for c in lookup.next_requests()] == [10]
    assert lookup.next_requests() == []  # alpha is busy
    assert lookup.on_slow(NodeId.from_int(10))
    assert not lookup.on_slow(NodeId.from_int(10))  # once
    assert lookup.candidates[0].state is CandidateState.SLOW
    assert lookup.in_flight == 0
    assert [c.distance for c in lookup.next_requests()] == [20]  # moved on
    assert lookup.on_reply(NodeId.from_int(20), [])
    assert lookup.on_reply(NodeId.from_int(10), [(NodeId.from_int(5), address_of(5))])  # late, still taken
    assert lookup.in_flight == 0
    assert [c.distance for c in lookup.next_requests()] == [5]
    assert lookup.on_slow(NodeId.from_int(5))
    assert lookup.on_failure(NodeId.from_int(5))  # an overdue request may still time out for good
    assert lookup.in_flight == 0
    while not lookup.done:
        for c in lookup.next_requests():
            lookup.on_reply(c.node_id, [])
    assert [c.distance for c in lookup.result()] == [10, 20, 30]


def test_a_lookup_waits_for_overdue_nodes_only_when_too_few_have_answered_or_it_is_the_closest() -> None:
    target = NodeId.from_int(0)
    seeds = [Candidate(NodeId.from_int(d), address_of(d), d, 1) for d in (10, 20, 30)]
    # k = 2 answered can be found past the overdue node, and a closer one answered: it is not waited for.
    lookup = Lookup(target, seeds, k=2, alpha=3)
    assert [c.distance for c in lookup.next_requests()] == [10, 20]
    assert lookup.on_slow(NodeId.from_int(20))
    assert [c.distance for c in lookup.next_requests()] == [30]  # the window moves past the overdue node
    assert lookup.on_reply(NodeId.from_int(10), [])
    assert not lookup.done
    assert lookup.on_reply(NodeId.from_int(30), [])
    assert lookup.done
    assert [c.distance for c in lookup.result()] == [10, 30]
    # The closest node overdue (its datagram may have been lost and sent again) is waited for to the end.
    lookup = Lookup(target, seeds, k=2, alpha=3)
    lookup.next_requests()
    assert lookup.on_slow(NodeId.from_int(10))
    lookup.next_requests()
    assert lookup.on_reply(NodeId.from_int(20), [])
    assert lookup.on_reply(NodeId.from_int(30), [])
    assert not lookup.done
    assert lookup.on_reply(NodeId.from_int(10), [])  # a late reply is taken
    assert lookup.done
    assert [c.distance for c in lookup.result()] == [10, 20]
    # Fewer than k answered and nothing left to ask: the overdue one may still answer, so it is waited for.
    lookup = Lookup(target, seeds, k=3, alpha=3)
    lookup.next_requests()
    assert lookup.on_slow(NodeId.from_int(20))
    assert lookup.on_reply(NodeId.from_int(10), [])
    assert lookup.on_reply(NodeId.from_int(30), [])
    assert not lookup.done
    assert lookup.on_failure(NodeId.from_int(20))
    assert lookup.done
    assert [c.distance for c in lookup.result()] == [10, 30]


def test_spares_are_asked_past_the_k_closest_in_the_final_round_only() -> None:
    target = NodeId.from_int(0)
    seeds = [Candidate(NodeId.from_int(d), address_of(d), d, 1) for d in range(10, 100, 10)]
    lookup = Lookup(target, seeds, k=3, alpha=1, spares=FINAL_ROUND_SPARES)
    assert [c.distance for c in lookup.next_requests()] == [10]  # alpha at a time until converged
    assert lookup.on_reply(NodeId.from_int(10), [])
    # Converged: the rest of the k closest and FINAL_ROUND_SPARES past them, at once.
    asked = [c.distance for c in lookup.next_requests()]
    assert asked == [20, 30, 40, 50, 60][: 2 + FINAL_ROUND_SPARES]
    assert lookup.on_slow(NodeId.from_int(20))  # lost or dead: a spare already asked takes its place
    for d in asked[1:]:
        lookup.on_reply(NodeId.from_int(d), [])
    assert lookup.done
    assert [c.distance for c in lookup.result()] == [10, 30, 40]
    assert lookup.rpcs == 1 + len(asked)
    plain = Lookup(target, seeds, k=3, alpha=1)
    plain.next_requests()
    plain.on_reply(NodeId.from_int(10), [])
    assert [c.distance for c in plain.next_requests()] == [20, 30]  # no spares by default


def test_a_liar_naming_fabricated_nodes_costs_one_round_of_timeouts() -> None:
    # The liar names 20 ids closer than any real node, at addresses where nobody answers.
    target = NodeId.from_int(1 << 100)
    liar = NodeId.from_int((1 << 100) ^ (1 << 90))
    honest = [NodeId.from_int((1 << 100) ^ (d << 95)) for d in range(1, 6)]
    lookup = Lookup(target, [Candidate(n, address_of(i), 0, 1) for i, n in enumerate([liar, *honest])], alpha=3)
    fakes = [(NodeId.from_int((1 << 100) ^ (i + 1)), address_of(1000 + i)) for i in range(K)]
    asked: list[NodeId] = []
    for c in lookup.next_requests():
        asked.append(c.node_id)
        if c.node_id == liar:
            lookup.on_reply(liar, fakes)
        else:
            lookup.on_reply(c.node_id, [])
    rounds = 0
    while not lookup.done:
        rounds += 1
        assert rounds < 100, "the lookup never finished"
        batch = lookup.next_requests()
        if not batch:
            # Fewer than k answered, so the lookup waits for the overdue ones: their full timeouts pass.
            for node_id, _ in fakes:
                lookup.on_failure(node_id)
        asked += [c.node_id for c in batch]
        for c in batch:
            if c.node_id in dict(fakes):
                lookup.on_slow(c.node_id)  # overdue: counted against the liar at once
            else:
                lookup.on_reply(c.node_id, [])
    fake_ids = {n for n, _ in fakes}
    assert len(fake_ids & set(asked)) == MAX_UNANSWERED_REFERRALS
    liar_candidate = next(c for c in lookup.candidates if c.node_id == liar)
    assert liar_candidate.referrals_failed == MAX_UNANSWERED_REFERRALS
    dropped = [c for c in lookup.candidates if c.node_id in fake_ids and c.addresses_tried == 0]
    assert len(dropped) == K - MAX_UNANSWERED_REFERRALS
    assert all(c.state is CandidateState.FAILED for c in dropped)
    assert set(ids_of(lookup.result())) == {liar, *honest}


def test_a_referral_dropped_with_its_referrer_is_revived_when_another_node_names_it() -> None:
    target = NodeId.from_int(0)
    liar, honest = NodeId.from_int(1000), NodeId.from_int(2000)
    seeds = [Candidate(liar, address_of(1), 1000, 1), Candidate(honest, address_of(2), 2000, 1)]
    lookup = Lookup(target, seeds, alpha=1)
    named = [(NodeId.from_int(d), address_of(d)) for d in range(1, MAX_UNANSWERED_REFERRALS + 3)]
    assert ids_of(lookup.next_requests()) == [liar]
    lookup.on_reply(liar, named)
    for expected in named[:MAX_UNANSWERED_REFERRALS]:
        assert ids_of(lookup.next_requests()) == [expected[0]]
        lookup.on_failure(expected[0])
    # The liar's other referrals are dropped unasked: the honest node is next.
    assert ids_of(lookup.next_requests()) == [honest]
    states = {c.node_id.int: c.state for c in lookup.candidates}
    assert all(states[d] is CandidateState.FAILED for d in range(1, MAX_UNANSWERED_REFERRALS + 3))
    # The honest node names the last one (never asked): it gets its chance; the ones that failed do not.
    last = named[-1]
    assert lookup.on_reply(honest, [last, named[0]])
    assert ids_of(lookup.next_requests()) == [last[0]]


def test_an_honest_referrer_with_a_live_referral_is_never_blamed() -> None:
    target = NodeId.from_int(0)
    referrer = NodeId.from_int(5000)
    lookup = Lookup(target, [Candidate(referrer, address_of(1), 5000, 1)], alpha=K)
    named = [(NodeId.from_int(d), address_of(d)) for d in range(1, 11)]
    lookup.next_requests()
    lookup.on_reply(referrer, named)
    batch = lookup.next_requests()
    lookup.on_reply(batch[0].node_id, [])  # one live referral first
    for c in batch[1:]:
        lookup.on_failure(c.node_id)
    assert all(c.addresses_tried == 1 for c in lookup.candidates)  # nothing dropped unasked


def test_disjoint_paths_take_wire_replies_and_overdue_requests_and_union_every_path() -> None:
    target = NodeId.from_int(0)
    seeds = [Candidate(NodeId.from_int(d), address_of(d), d, 1) for d in (10, 20, 30)]

    class Info:
        def __init__(self, d: int) -> None:
            self.node_id = NodeId.from_int(d).bytes
            self.host, self.port = address_of(d).host, 4000

    lookup = DisjointLookup(target, seeds, k=2, alpha=1, make_address=Address)
    assert [c.distance for c in lookup.next_requests()] == [10, 20, 30]
    assert lookup.on_slow(NodeId.from_int(30))
    assert lookup.in_flight == 2
    assert lookup.on_wire_reply(NodeId.from_int(10), [Info(1), Info(2)])
    assert lookup.on_wire_reply(NodeId.from_int(20), [Info(3), Info(4)])
    assert not lookup.on_wire_reply(NodeId.from_int(99), [])
    late = False
    while not lookup.done:
        batch = lookup.next_requests()
        for c in batch:
            lookup.on_reply(c.node_id, [])
        if not batch:
            # Path 2 has nobody else to ask and fewer than k answers, so it waits for its overdue node.
            assert not late, "the lookup never finished"
            assert lookup.on_reply(NodeId.from_int(30), [])  # late, still taken by its path
            late = True
    assert late
    assert [c.distance for c in lookup.result()] == [1, 2]
    # Every path's k closest: path 0 ended with 1 and 2, path 1 with 3 and 4, path 2 with 30.
    assert [c.distance for c in lookup.union()] == [1, 2, 3, 4, 30]
    assert lookup.on_failure(NodeId.from_int(99)) is False
    assert lookup.on_slow(NodeId.from_int(99)) is False
