"""The Kademlia routing table: buckets and splitting, liveness, replacement cache, anti-Sybil limits, closest()."""

from __future__ import annotations

import itertools
import random

import pytest

from p2pchat.core.ids import NODE_ID_BITS, NodeId
from p2pchat.core.routing import (
    BUCKET_REFRESH_INTERVAL,
    FAR_BUCKET_REFRESH_INTERVAL,
    ID_RANGE_BITS,
    MAX_BUCKETS,
    MAX_CONTACTS_PER_ID_RANGE,
    MAX_CONTACTS_PER_SUBNET_PER_BUCKET,
    MAX_FAILURES,
    PING_CANDIDATE_MIN_IDLE,
    PING_CANDIDATE_TIMEOUT,
    REPLACEMENT_CACHE_SIZE,
    Contact,
    K,
    ObserveOutcome,
    RoutingTable,
    is_local_host,
    subnet_of,
)
from p2pchat.net.base import Address

TOP = 1 << (NODE_ID_BITS - 1)
OWN = NodeId.from_int(0)
LATER = PING_CANDIDATE_MIN_IDLE + 1.0  # a time at which contacts seen at 0 may be pinged


def lan(i: int) -> Address:
    """A distinct private address per i (exempt from the subnet limit by default)."""
    return Address(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 4000)


def public(i: int) -> Address:
    """A distinct public address per i, each in its own /24."""
    return Address(f"81.{(i >> 8) & 255}.{i & 255}.1", 4000)


def far_ids(rng: random.Random, count: int) -> list[NodeId]:
    """Ids in the half of the space away from OWN (all land in one far bucket once the table has split)."""
    return [NodeId.from_int(TOP | rng.getrandbits(NODE_ID_BITS - 1)) for _ in range(count)]


def full_far_bucket(rng: random.Random, table: RoutingTable) -> list[NodeId]:
    """Fill the far half's bucket with K contacts seen at time 0; return their ids, least recently seen first."""
    ids = far_ids(rng, K)
    for i, node_id in enumerate(ids):
        assert table.observe(node_id, public(i), 0.0).outcome is ObserveOutcome.ADDED
    return ids


def check_invariants(table: RoutingTable) -> None:
    """Ranges tile the id space, contacts sit in their bucket, nothing is duplicated, sizes stay bounded."""
    buckets = table.buckets
    assert 1 <= len(buckets) <= MAX_BUCKETS
    assert buckets[-1].covers(table.own_id)
    seen: set[NodeId] = set()
    for i, bucket in enumerate(buckets):
        if i < len(buckets) - 1:
            assert bucket.depth == i + 1
        assert len(bucket.contacts) <= table.k
        assert len(bucket.replacements) <= table.replacement_cache_size
        for contact in [*bucket.contacts, *bucket.replacements]:
            assert bucket.covers(contact.node_id)
            assert table.bucket_for(contact.node_id) is bucket
            assert contact.node_id not in seen
            assert contact.node_id != table.own_id
            seen.add(contact.node_id)
        times = [c.last_seen for c in bucket.contacts]
        assert times == sorted(times)
    spans = sorted((b.lo, b.hi) for b in buckets)
    assert spans[0][0] == 0
    assert spans[-1][1] == 1 << NODE_ID_BITS
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert len(table) == sum(len(b) for b in buckets) == len(list(table))


# --- insertion and splitting -----------------------------------------------------------------------------------


def test_a_new_table_is_one_bucket_over_the_whole_space() -> None:
    table = RoutingTable(NodeId.from_int(12345))
    assert len(table.buckets) == 1
    bucket = table.buckets[0]
    assert (bucket.lo, bucket.hi, bucket.depth) == (0, 1 << NODE_ID_BITS, 0)
    assert len(table) == 0
    check_invariants(table)


def test_observe_adds_then_updates_to_most_recently_seen() -> None:
    table = RoutingTable(OWN)
    a, b = NodeId.from_int(TOP | 1), NodeId.from_int(TOP | 2)
    added = table.observe(a, lan(1), 1.0, cert="cert-a")
    assert added.outcome is ObserveOutcome.ADDED
    assert added.contact is not None
    assert added.contact.cert == "cert-a"
    table.observe(b, lan(2), 2.0)
    assert [c.node_id for c in table.bucket_for(a).contacts] == [a, b]

    updated = table.observe(a, lan(1), 3.0)
    assert updated.outcome is ObserveOutcome.UPDATED
    assert updated.contact is added.contact
    assert updated.contact.last_seen == 3.0
    assert updated.contact.cert == "cert-a"  # no certificate given: the old one stays
    assert [c.node_id for c in table.bucket_for(a).contacts] == [b, a]
    recertified = table.observe(a, lan(1), 4.0, cert="cert-a2").contact
    assert recertified is added.contact
    assert recertified.cert == "cert-a2"
    assert table.get(a) is added.contact
    assert a in table
    assert NodeId.from_int(TOP | 3) not in table
    assert len(table) == 2


def test_own_id_is_rejected() -> None:
    table = RoutingTable(OWN)
    result = table.observe(OWN, lan(1), 0.0)
    assert result.outcome is ObserveOutcome.REJECTED_OWN_ID
    assert result.contact is None
    assert len(table) == 0


def test_own_bucket_splits_but_a_far_bucket_sends_newcomers_to_the_replacement_cache() -> None:
    rng = random.Random(1)
    table = RoutingTable(OWN)
    ids = far_ids(rng, K + 1)
    for i, node_id in enumerate(ids[:K]):
        assert table.observe(node_id, lan(i), 0.0).outcome is ObserveOutcome.ADDED
    assert len(table.buckets) == 1  # K contacts fit in the single bucket

    result = table.observe(ids[K], lan(K), 0.0)
    # The full bucket held our own id, so it split; everything fell in the far half, which does not split again.
    assert result.outcome is ObserveOutcome.CACHED
    assert len(table.buckets) == 2
    far, near = table.buckets
    assert (far.depth, far.lo) == (1, TOP)
    assert (near.depth, near.lo) == (1, 0)
    assert [c.node_id for c in far.contacts] == ids[:K]
    assert [c.node_id for c in far.replacements] == [ids[K]]
    assert len(near) == 0
    assert table.get(ids[K]) is None  # a cache entry is not a contact
    check_invariants(table)


def test_the_own_bucket_splits_down_to_single_ids_and_the_bucket_count_reaches_its_bound() -> None:
    # With k=1 and an id at every distance 2**i, every shared-prefix length gets its own bucket.
    table = RoutingTable(OWN, k=1)
    for i in range(NODE_ID_BITS):
        assert table.observe(NodeId.from_int(1 << i), lan(i), 0.0).outcome is ObserveOutcome.ADDED
    assert len(table.buckets) == MAX_BUCKETS == NODE_ID_BITS
    assert [b.depth for b in table.buckets] == [*range(1, NODE_ID_BITS), NODE_ID_BITS - 1]
    # The deepest bucket spans our id and id 1 only, so it is never full with a newcomer waiting: no 161st bucket.
    assert [c.node_id.int for c in table.buckets[-1].contacts] == [1]
    assert table.observe(NodeId.from_int(1), lan(0), 1.0).outcome is ObserveOutcome.UPDATED
    assert len(table.buckets) == MAX_BUCKETS
    check_invariants(table)


def test_splitting_keeps_contacts_and_their_recency_order() -> None:
    rng = random.Random(2)
    table = RoutingTable(OWN, k=4)
    ids = [NodeId.from_int(rng.getrandbits(NODE_ID_BITS)) for _ in range(300)]
    for t, node_id in enumerate(ids):
        table.observe(node_id, lan(t), float(t))
    check_invariants(table)
    assert len(table.buckets) > 5


def test_table_size_stays_bounded_when_100000_random_ids_are_observed() -> None:
    rng = random.Random(3)
    own = NodeId.from_int(rng.getrandbits(NODE_ID_BITS))
    table = RoutingTable(own)
    for i in range(100_000):
        table.observe(NodeId.from_int(rng.getrandbits(NODE_ID_BITS)), lan(i), float(i))
    buckets = table.buckets
    total = sum(len(b.contacts) + len(b.replacements) for b in buckets)
    assert len(buckets) <= MAX_BUCKETS
    assert total <= len(buckets) * (K + REPLACEMENT_CACHE_SIZE)
    # Random ids fill every far bucket and its cache: about log2(100000 / K) buckets, none over its limits.
    assert 10 <= len(buckets) <= 16
    assert all(len(b) == K and len(b.replacements) == REPLACEMENT_CACHE_SIZE for b in buckets[:-4])
    check_invariants(table)


# --- liveness: ping candidate, failures, replacement cache ------------------------------------------------------


def test_a_newcomer_to_a_full_bucket_gets_the_least_recently_seen_contact_pinged() -> None:
    rng = random.Random(4)
    table = RoutingTable(OWN)
    ids = full_far_bucket(rng, table)
    table.observe(ids[0], public(0), 1.0)  # ids[0] is now the most recent; ids[1] the least
    newcomer = far_ids(rng, 1)[0]
    result = table.observe(newcomer, public(100), LATER)
    assert result.outcome is ObserveOutcome.CACHED
    assert result.ping_candidate is not None
    assert result.ping_candidate.node_id == ids[1]


def test_would_keep_is_false_only_for_a_stranger_that_a_full_bucket_would_just_cache() -> None:
    rng = random.Random(41)
    table = RoutingTable(OWN)
    assert not table.would_keep(OWN, 0.0)
    ids = full_far_bucket(rng, table)
    assert table.would_keep(far_ids(rng, 1)[0], 1.0)  # the bucket still holds our own id: it would split
    table.observe(far_ids(rng, 1)[0], public(50), 1.0)  # split; the far bucket is full of contacts seen at 0
    stranger = far_ids(rng, 1)[0]
    assert table.would_keep(ids[3], 1.0)  # a member
    assert table.would_keep(NodeId.from_int(1), 1.0)  # the near bucket has room
    assert not table.would_keep(stranger, 1.0)
    assert table.would_keep(stranger, LATER)  # the oldest contact is idle long enough to be pinged for it
    assert table.observe(stranger, public(51), LATER).ping_candidate is not None
    assert not table.would_keep(far_ids(rng, 1)[0], LATER)  # a ping is already out for this bucket
    # A bad contact makes way without a ping (it stays bad while no replacement waits).
    table = RoutingTable(OWN)
    ids = full_far_bucket(rng, table)
    table.observe(NodeId.from_int(1), public(60), 1.0)  # splits; lands in the near half
    assert not table.would_keep(stranger, 1.0)
    for _ in range(MAX_FAILURES):
        table.request_failed(ids[5], 1.0)
    assert table.would_keep(stranger, 1.0)
    assert table.observe(stranger, public(61), 1.0).outcome is ObserveOutcome.ADDED


def test_a_far_bucket_takes_at_most_max_contacts_per_id_range_from_one_id_range() -> None:
    rng = random.Random(42)
    table = RoutingTable(OWN)
    table.observe(NodeId.from_int(1), public(0), 0.0)
    table.observe(NodeId.from_int(TOP | 1), public(1), 0.0)
    table.observe(NodeId.from_int(2), public(2), 0.0)
    for i in range(K - 2):  # fill the single bucket, then split it: the far half becomes a bucket of depth 1
        table.observe(NodeId.from_int(rng.getrandbits(NODE_ID_BITS - 1)), public(10 + i), 0.0)
    table.observe(NodeId.from_int(3), public(3), 0.0)
    far = table.bucket_for(NodeId.from_int(TOP))
    assert far.depth == 1 and far is not table.buckets[-1]
    # A cluster of ids ground next to one key: they share far more than the bucket's prefix and ID_RANGE_BITS.
    shift = NODE_ID_BITS - 1 - ID_RANGE_BITS
    cluster = [NodeId.from_int(TOP | (0b101101 << shift) | rng.getrandbits(shift)) for _ in range(10)]
    outcomes = [table.observe(node_id, public(100 + i), 0.0).outcome for i, node_id in enumerate(cluster)]
    assert outcomes[:MAX_CONTACTS_PER_ID_RANGE] == [ObserveOutcome.ADDED] * MAX_CONTACTS_PER_ID_RANGE
    assert set(outcomes[MAX_CONTACTS_PER_ID_RANGE:]) == {ObserveOutcome.REJECTED_ID_RANGE}
    # Ids elsewhere in the bucket's range still get in.
    spread = [NodeId.from_int(TOP | (r << shift) | rng.getrandbits(shift)) for r in range(1, 8)]
    assert all(table.observe(n, public(200 + i), 0.0).outcome is ObserveOutcome.ADDED for i, n in enumerate(spread))
    check_invariants(table)


def test_the_bucket_holding_our_own_id_has_no_id_range_limit() -> None:
    table = RoutingTable(OWN)
    near = [NodeId.from_int(i + 1) for i in range(K)]  # all in one id range of the single bucket
    assert all(table.observe(n, public(i), 0.0).outcome is ObserveOutcome.ADDED for i, n in enumerate(near))


def test_promotion_skips_a_replacement_whose_id_range_is_full() -> None:
    rng = random.Random(43)
    table = RoutingTable(OWN)
    shift = NODE_ID_BITS - 1 - ID_RANGE_BITS
    # The far bucket: MAX_CONTACTS_PER_ID_RANGE - 1 contacts in range 0b000001, the rest spread over other ranges.
    crowded = [NodeId.from_int(TOP | (1 << shift) | rng.getrandbits(shift)) for _ in range(MAX_CONTACTS_PER_ID_RANGE)]
    others = [NodeId.from_int(TOP | ((2 + i % 60) << shift) | rng.getrandbits(shift)) for i in range(K - len(crowded))]
    for i, node_id in enumerate(crowded + others):
        table.observe(node_id, public(i), 0.0)
    table.observe(NodeId.from_int(1), public(90), 0.0)  # split: the far half is now a bucket of its own
    far = table.bucket_for(crowded[0])
    assert len(far.contacts) == K
    # Two newcomers wait in the cache: the older in a free range, the newer in the crowded one.
    free = NodeId.from_int(TOP | (63 << shift) | rng.getrandbits(shift))
    more = NodeId.from_int(TOP | (1 << shift) | rng.getrandbits(shift))
    assert table.observe(free, public(91), 1.0).outcome is ObserveOutcome.CACHED
    assert table.observe(more, public(92), 2.0).outcome is ObserveOutcome.CACHED
    table.remove(others[0])  # a contact outside the crowded range leaves: the newer cache entry would crowd it
    assert table.get(free) is not None
    assert table.get(more) is None
    check_invariants(table)


def test_a_failed_ping_evicts_the_candidate_and_promotes_the_newcomer() -> None:
    rng = random.Random(5)
    table = RoutingTable(OWN)
    ids = full_far_bucket(rng, table)
    newcomer = far_ids(rng, 1)[0]
    result = table.observe(newcomer, public(100), LATER)
    assert result.ping_candidate is not None
    candidate = result.ping_candidate.node_id

    # One failure is enough for the ping candidate when someone is waiting to replace it.
    assert table.request_failed(candidate, LATER + 1) is True
    assert candidate not in table
    assert newcomer in table
    bucket = table.bucket_for(newcomer)
    assert len(bucket) == K
    assert len(bucket.replacements) == 0
    assert [c.node_id for c in bucket.contacts][-1] == newcomer  # seen most recently
    assert set(ids) - {candidate} <= {c.node_id for c in bucket.contacts}
    check_invariants(table)


def test_a_successful_ping_keeps_the_candidate_and_the_newcomer_waits_in_the_cache() -> None:
    rng = random.Random(6)
    table = RoutingTable(OWN)
    ids = full_far_bucket(rng, table)
    newcomer = far_ids(rng, 1)[0]
    result = table.observe(newcomer, public(100), LATER)
    assert result.ping_candidate is not None
    candidate = result.ping_candidate

    assert table.request_succeeded(candidate.node_id, LATER + 1) is True
    bucket = table.bucket_for(newcomer)
    assert candidate.node_id in table
    assert candidate.last_seen == LATER + 1
    assert bucket.contacts[-1] is candidate
    assert newcomer not in table
    assert [c.node_id for c in bucket.replacements] == [newcomer]
    # The next least recently seen contact is proposed for the next newcomer.
    another = table.observe(far_ids(rng, 1)[0], public(101), LATER + 2)
    assert another.ping_candidate is not None
    assert another.ping_candidate.node_id == ids[1]


def test_observing_an_answer_is_observe_then_request_succeeded() -> None:
    rng = random.Random(16)
    twins = [RoutingTable(OWN), RoutingTable(OWN)]
    for table in twins:
        full_far_bucket(random.Random(17), table)
    newcomer = far_ids(rng, 1)[0]
    candidates = [table.observe(newcomer, public(100), LATER).ping_candidate for table in twins]
    assert all(c is not None for c in candidates)
    failing = twins[0].closest(far_ids(rng, 1)[0], 1)[0].node_id
    for table in twins:
        table.request_failed(failing, LATER)
    # The ping candidate answers, and so does the failing contact; a third, failing too, answers from a new
    # address (which it may move to, having failed at the old one).
    answers = [(candidates[0].node_id, candidates[0].address), (failing, twins[0].get(failing).address)]  # type: ignore[union-attr]
    stranger = twins[0].closest(far_ids(rng, 1)[0], 3)[-1].node_id
    twins[0].request_failed(stranger, LATER)
    twins[1].request_failed(stranger, LATER)
    answers.append((stranger, public(999)))
    for node_id, address in answers:
        twins[0].observe(node_id, address, LATER + 1)
        twins[0].request_succeeded(node_id, LATER + 1, address)
        twins[1].observe(node_id, address, LATER + 1, answered=True)
    for a, b in zip(twins[0], twins[1], strict=True):
        assert (a.node_id, a.address, a.failures, a.last_seen) == (b.node_id, b.address, b.failures, b.last_seen)
    for a, b in zip(twins[0].buckets, twins[1].buckets, strict=True):
        assert (a._pinging is None) == (b._pinging is None)


def test_only_one_ping_per_bucket_is_outstanding_until_it_times_out() -> None:
    rng = random.Random(7)
    table = RoutingTable(OWN)
    full_far_bucket(rng, table)
    first = table.observe(far_ids(rng, 1)[0], public(100), LATER)
    assert first.ping_candidate is not None
    second = table.observe(far_ids(rng, 1)[0], public(101), LATER + 1)
    assert second.outcome is ObserveOutcome.CACHED
    assert second.ping_candidate is None
    # Nobody reported the ping: after the timeout another may be asked for.
    third = table.observe(far_ids(rng, 1)[0], public(102), LATER + PING_CANDIDATE_TIMEOUT)
    assert third.ping_candidate is first.ping_candidate


def test_no_ping_when_the_whole_bucket_was_heard_from_recently() -> None:
    rng = random.Random(8)
    table = RoutingTable(OWN)
    full_far_bucket(rng, table)
    soon = table.observe(far_ids(rng, 1)[0], public(100), PING_CANDIDATE_MIN_IDLE - 1)
    assert soon.outcome is ObserveOutcome.CACHED
    assert soon.ping_candidate is None
    due = table.observe(far_ids(rng, 1)[0], public(101), PING_CANDIDATE_MIN_IDLE)
    assert due.ping_candidate is not None


def test_a_contact_is_evicted_at_max_failures_when_a_replacement_waits() -> None:
    rng = random.Random(9)
    table = RoutingTable(OWN)
    ids = full_far_bucket(rng, table)
    newcomer = far_ids(rng, 1)[0]
    table.observe(newcomer, public(100), 1.0)  # cached; too early for a ping candidate
    victim = ids[5]
    for _ in range(MAX_FAILURES - 1):
        assert table.request_failed(victim, 2.0) is False
    assert victim in table
    assert table.request_failed(victim, 2.0) is True
    assert victim not in table
    assert newcomer in table


def test_a_bad_contact_with_no_replacement_stays_but_is_not_offered() -> None:
    rng = random.Random(10)
    table = RoutingTable(OWN)
    ids = full_far_bucket(rng, table)
    victim = ids[3]
    for _ in range(MAX_FAILURES + 2):
        assert table.request_failed(victim, 1.0) is False
    contact = table.get(victim)
    assert contact is not None
    assert contact.is_bad
    assert contact.failures == MAX_FAILURES + 2
    assert victim not in [c.node_id for c in table.closest(victim, K)]
    assert table.closest(victim, K, exclude_failing=False)[0].node_id == victim
    # It answers again: back in service.
    table.request_succeeded(victim, 2.0)
    assert not contact.is_bad
    assert table.closest(victim, 1)[0] is contact


def test_a_newcomer_replaces_a_bad_contact_without_a_ping() -> None:
    rng = random.Random(11)
    table = RoutingTable(OWN)
    ids = full_far_bucket(rng, table)
    for _ in range(MAX_FAILURES):
        table.request_failed(ids[7], 1.0)
    newcomer = far_ids(rng, 1)[0]
    result = table.observe(newcomer, public(100), 2.0)
    assert result.outcome is ObserveOutcome.ADDED
    assert ids[7] not in table
    assert newcomer in table


def test_one_failure_below_the_limit_does_not_evict_a_contact_that_was_not_pinged() -> None:
    rng = random.Random(12)
    table = RoutingTable(OWN)
    ids = full_far_bucket(rng, table)
    table.observe(far_ids(rng, 1)[0], public(100), 1.0)  # waits in the cache, no ping proposed
    assert table.request_failed(ids[2], 2.0) is False
    assert ids[2] in table


def test_the_replacement_cache_is_bounded_and_drops_its_oldest_entry() -> None:
    rng = random.Random(13)
    table = RoutingTable(OWN)
    full_far_bucket(rng, table)
    extra = far_ids(rng, REPLACEMENT_CACHE_SIZE + 5)
    for i, node_id in enumerate(extra):
        assert table.observe(node_id, public(100 + i), 1.0 + i).outcome is ObserveOutcome.CACHED
    bucket = table.bucket_for(extra[0])
    assert len(bucket.replacements) == REPLACEMENT_CACHE_SIZE
    assert [c.node_id for c in bucket.replacements] == extra[-REPLACEMENT_CACHE_SIZE:]
    # Hearing again from a cached node makes it the freshest entry, and it is the one promoted.
    table.observe(extra[6], public(106), 100.0)
    assert bucket.replacements[-1].node_id == extra[6]
    assert table.remove(bucket.contacts[0].node_id) is True
    assert extra[6] in table
    check_invariants(table)


def test_request_outcomes_for_cache_entries_and_strangers() -> None:
    rng = random.Random(14)
    table = RoutingTable(OWN)
    full_far_bucket(rng, table)
    cached, other = far_ids(rng, 2)
    table.observe(cached, public(100), 1.0)
    table.observe(other, public(101), 2.0)
    bucket = table.bucket_for(cached)
    assert table.request_succeeded(cached, 3.0) is True
    assert bucket.replacements[-1].node_id == cached
    assert table.request_failed(cached, 4.0) is False  # a failing cache entry is just dropped
    assert [c.node_id for c in bucket.replacements] == [other]
    stranger = NodeId.from_int(TOP | 12345)
    assert table.request_succeeded(stranger, 5.0) is False
    assert table.request_failed(stranger, 5.0) is False
    assert table.remove(stranger) is False
    assert table.remove(other) is True
    assert len(bucket.replacements) == 0


def test_remove_forgets_a_contact() -> None:
    table = RoutingTable(OWN)
    a = NodeId.from_int(TOP | 1)
    table.observe(a, lan(1), 0.0)
    assert table.remove(a) is True
    assert a not in table
    assert len(table) == 0


def test_reports_about_another_address_do_not_touch_a_contact() -> None:
    # A liar names our healthy contact at an address that never answers; those timeouts must not evict it.
    rng = random.Random(26)
    table = RoutingTable(OWN)
    ids = full_far_bucket(rng, table)
    table.observe(far_ids(rng, 1)[0], public(100), 1.0)  # a replacement waits
    victim = ids[4]
    for _ in range(MAX_FAILURES + 1):
        assert table.request_failed(victim, 2.0, address=public(999)) is False
    contact = table.get(victim)
    assert contact is not None
    assert contact.failures == 0
    # Nor does an answer from elsewhere vouch for the address we keep.
    table.request_failed(victim, 3.0, address=public(4))
    assert table.request_succeeded(victim, 4.0, address=public(999)) is False
    assert (contact.failures, contact.last_seen) == (1, 0.0)
    assert table.request_succeeded(victim, 5.0, address=public(4)) is True
    assert (contact.failures, contact.last_seen) == (0, 5.0)


# --- address changes -------------------------------------------------------------------------------------------


def test_a_healthy_contact_keeps_its_address_when_heard_from_another() -> None:
    table = RoutingTable(OWN)
    a = NodeId.from_int(TOP | 1)
    table.observe(a, public(1), 1.0, cert="old")
    result = table.observe(a, public(2), 2.0, cert="new")
    assert result.outcome is ObserveOutcome.ADDRESS_CONFLICT
    contact = table.get(a)
    assert contact is result.contact
    assert contact is not None
    assert (contact.address, contact.cert, contact.last_seen) == (public(1), "old", 1.0)


def test_a_failing_contact_moves_to_the_new_address() -> None:
    table = RoutingTable(OWN)
    a = NodeId.from_int(TOP | 1)
    table.observe(a, public(1), 1.0, cert="old")
    table.request_failed(a, 2.0)
    result = table.observe(a, public(2), 3.0, cert="new")
    assert result.outcome is ObserveOutcome.ADDRESS_CHANGED
    contact = table.get(a)
    assert contact is not None
    assert (contact.address, contact.cert, contact.failures, contact.last_seen) == (public(2), "new", 0, 3.0)
    # A certificate binds an address, so a move without one leaves none rather than the stale one.
    table.request_failed(a, 4.0)
    table.observe(a, public(3), 5.0)
    assert (contact.address, contact.cert) == (public(3), None)


# --- anti-Sybil subnet limit -----------------------------------------------------------------------------------


def test_subnet_of_groups_ipv4_by_slash_24_and_ipv6_by_slash_64() -> None:
    assert subnet_of("81.2.69.1") == subnet_of("81.2.69.254") != subnet_of("81.2.70.1")
    assert subnet_of("2a00:1450:4001:81c::1") == subnet_of("2a00:1450:4001:81c:ffff::2")
    assert subnet_of("2a00:1450:4001:81c::1") != subnet_of("2a00:1450:4001:81d::1")
    assert subnet_of("::ffff:81.2.69.7") == subnet_of("81.2.69.1")


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("10.1.2.3", True),
        ("127.0.0.1", True),
        ("172.16.0.1", True),
        ("172.31.255.1", True),
        ("172.32.0.1", False),
        ("192.168.1.1", True),
        ("169.254.3.4", True),
        ("81.2.69.1", False),
        ("::1", True),
        ("fd00::1", True),
        ("fe80::1", True),
        ("2a00:1450:4001:81c::1", False),
        ("::ffff:10.0.0.1", True),
    ],
)
def test_local_hosts_follow_bep_42(host: str, local: bool) -> None:
    assert is_local_host(host) is local


def test_a_bucket_takes_at_most_two_contacts_from_one_subnet() -> None:
    rng = random.Random(15)
    table = RoutingTable(OWN)
    # Half near, half far, then one more: the table splits into a far and a near bucket with room in each.
    for i in range(K + 1):
        table.observe(NodeId.from_int((TOP if i % 2 else 0) | rng.getrandbits(NODE_ID_BITS - 2)), lan(i), 0.0)
    assert len(table.buckets) == 2
    ids = far_ids(rng, 5)
    for i in range(MAX_CONTACTS_PER_SUBNET_PER_BUCKET):
        assert table.observe(ids[i], Address(f"81.2.69.{i + 1}", 4000), 0.0).outcome is ObserveOutcome.ADDED
    rejected = table.observe(ids[2], Address("81.2.69.200", 4000), 0.0)
    assert rejected.outcome is ObserveOutcome.REJECTED_SUBNET
    assert rejected.contact is None
    assert ids[2] not in table
    assert table.observe(ids[3], Address("81.2.70.1", 4000), 0.0).outcome is ObserveOutcome.ADDED
    v6 = [Address(f"2a00:1450:4001:81c::{i + 1}", 4000) for i in range(3)]
    assert table.observe(far_ids(rng, 1)[0], v6[0], 0.0).outcome is ObserveOutcome.ADDED
    assert table.observe(far_ids(rng, 1)[0], v6[1], 0.0).outcome is ObserveOutcome.ADDED
    assert table.observe(far_ids(rng, 1)[0], v6[2], 0.0).outcome is ObserveOutcome.REJECTED_SUBNET
    # The limit is per bucket: the same /24 is welcome in another bucket.
    near = NodeId.from_int(1)
    assert table.bucket_for(near) is not table.bucket_for(ids[0])
    assert table.observe(near, Address("81.2.69.9", 4000), 0.0).outcome is ObserveOutcome.ADDED


def test_local_addresses_are_exempt_unless_the_table_is_told_otherwise() -> None:
    rng = random.Random(16)
    ids = far_ids(rng, 3)
    lenient = RoutingTable(OWN)
    strict = RoutingTable(OWN, subnet_exempt=None)
    unlimited = RoutingTable(OWN, subnet_limit=None)
    outcomes = {
        name: [table.observe(n, Address(f"10.0.0.{i + 1}", 4000), 0.0).outcome for i, n in enumerate(ids)]
        for name, table in (("lenient", lenient), ("strict", strict), ("unlimited", unlimited))
    }
    assert outcomes["lenient"] == [ObserveOutcome.ADDED] * 3
    assert outcomes["unlimited"] == [ObserveOutcome.ADDED] * 3
    assert outcomes["strict"] == [ObserveOutcome.ADDED] * 2 + [ObserveOutcome.REJECTED_SUBNET]


def test_one_subnet_cannot_fill_the_replacement_cache() -> None:
    rng = random.Random(17)
    table = RoutingTable(OWN)
    full_far_bucket(rng, table)
    sybils = far_ids(rng, 5)
    for i, node_id in enumerate(sybils):
        assert table.observe(node_id, Address(f"95.1.1.{i + 1}", 4000), 1.0 + i).outcome is ObserveOutcome.CACHED
    bucket = table.bucket_for(sybils[0])
    assert [c.node_id for c in bucket.replacements] == sybils[-MAX_CONTACTS_PER_SUBNET_PER_BUCKET:]


def test_a_move_into_a_full_subnet_is_rejected() -> None:
    rng = random.Random(18)
    table = RoutingTable(OWN)
    a, b, c = far_ids(rng, 3)
    table.observe(a, Address("81.2.69.1", 4000), 0.0)
    table.observe(b, Address("81.2.69.2", 4000), 0.0)
    table.observe(c, Address("95.1.1.1", 4000), 0.0)
    table.request_failed(c, 1.0)
    assert table.observe(c, Address("81.2.69.3", 4000), 2.0).outcome is ObserveOutcome.REJECTED_SUBNET
    contact = table.get(c)
    assert contact is not None
    assert contact.address == Address("95.1.1.1", 4000)


def test_promotion_skips_a_replacement_whose_subnet_is_full() -> None:
    rng = random.Random(19)
    table = RoutingTable(OWN)
    ids = far_ids(rng, K + 2)
    for i, node_id in enumerate(ids[:K]):
        host = f"81.2.69.{i + 1}" if i < MAX_CONTACTS_PER_SUBNET_PER_BUCKET else f"95.{i}.1.1"
        table.observe(node_id, Address(host, 4000), 0.0)
    fresh_other_subnet, fresh_same_subnet = ids[K], ids[K + 1]
    table.observe(fresh_other_subnet, Address("99.9.9.9", 4000), 1.0)
    table.observe(fresh_same_subnet, Address("81.2.69.100", 4000), 2.0)
    assert table.remove(ids[MAX_CONTACTS_PER_SUBNET_PER_BUCKET]) is True  # frees a slot, not in 81.2.69/24
    assert fresh_other_subnet in table
    assert fresh_same_subnet not in table


# --- closest and refresh ---------------------------------------------------------------------------------------


def brute_force_closest(table: RoutingTable, target: NodeId, count: int, exclude_failing: bool) -> list[Contact]:
    contacts = [c for c in table if not (exclude_failing and c.is_bad)]
    return sorted(contacts, key=lambda c: c.node_id.int ^ target.int)[:count]


@pytest.mark.parametrize(("seed", "k", "nodes"), [(20, K, 3000), (21, 4, 2000), (22, 1, 500), (23, K, 30)])
def test_closest_equals_a_brute_force_sort(seed: int, k: int, nodes: int) -> None:
    rng = random.Random(seed)
    own = NodeId.from_int(rng.getrandbits(NODE_ID_BITS))
    table = RoutingTable(own, k)
    ids = [NodeId.from_int(rng.getrandbits(NODE_ID_BITS)) for _ in range(nodes)]
    # Some ids close to our own, so the deep buckets are populated too.
    ids += [NodeId.from_int(own.int ^ rng.getrandbits(rng.randrange(1, 40))) for _ in range(nodes // 10)]
    for i, node_id in enumerate(ids):
        table.observe(node_id, lan(i), 0.0)
    for contact in rng.sample(list(table), len(table) // 5):
        for _ in range(MAX_FAILURES):
            table.request_failed(contact.node_id, 1.0)
    targets = [NodeId.from_int(rng.getrandbits(NODE_ID_BITS)) for _ in range(300)]
    targets += [NodeId.from_int(own.int ^ rng.getrandbits(rng.randrange(0, 60))) for _ in range(300)]
    targets += [rng.choice(ids), own]
    for target in targets:
        count = rng.choice([1, 3, k, K, 2 * K, 10_000])
        exclude = rng.random() < 0.7
        expected = brute_force_closest(table, target, count, exclude)
        assert table.closest(target, count, exclude_failing=exclude) == expected
        unordered = table.closest(target, count, exclude_failing=exclude, ordered=False)
        assert sorted(unordered, key=lambda c: c.node_id.int ^ target.int) == expected


def test_closest_of_an_empty_table_or_for_no_count() -> None:
    table = RoutingTable(OWN)
    assert table.closest(NodeId.from_int(5)) == []
    table.observe(NodeId.from_int(TOP), lan(1), 0.0)
    assert table.closest(NodeId.from_int(5), 0) == []


def test_untouched_buckets_become_stale_with_a_random_id_inside() -> None:
    rng = random.Random(24)
    table = RoutingTable(OWN, now=100.0)
    ids = far_ids(rng, K + 1)
    for i, node_id in enumerate(ids):
        table.observe(node_id, lan(i), 100.0)  # the last one splits the table
    assert len(table.buckets) == 2
    far, near = table.buckets
    assert table.stale_buckets(100.0 + BUCKET_REFRESH_INTERVAL - 1, rng) == []

    stale = table.stale_buckets(100.0 + BUCKET_REFRESH_INTERVAL, rng)
    assert len(stale) == 2
    assert far.covers(stale[0])
    assert near.covers(stale[1])
    assert len({tuple(table.stale_buckets(100.0 + BUCKET_REFRESH_INTERVAL, rng)) for _ in range(5)}) == 5

    # A refresh lookup in the near bucket, and an answer from a far contact, make both fresh again.
    table.touch_bucket(stale[1], 1000.0)
    table.request_succeeded(ids[0], 1000.0)
    assert table.stale_buckets(1000.0 + BUCKET_REFRESH_INTERVAL - 1, rng) == []
    assert len(table.stale_buckets(1000.0 + BUCKET_REFRESH_INTERVAL, rng)) == 2


def test_buckets_beyond_our_neighbourhood_are_refreshed_hourly() -> None:
    rng = random.Random(26)
    table = RoutingTable(OWN, now=0.0)
    # K contacts in each of the three ranges nearest to OWN (prefix 001, 01 and 1): the table splits into buckets
    # holding K each, and the nearest K contacts fill what is left of OWN's half.
    ranges = [(TOP >> 2, NODE_ID_BITS - 3), (TOP >> 1, NODE_ID_BITS - 2), (TOP, NODE_ID_BITS - 1)]
    for n, (prefix, bits) in enumerate(ranges):
        for i in range(K):
            table.observe(NodeId.from_int(prefix | rng.getrandbits(bits)), lan(n * K + i), 0.0)
    far, middle, *near = table.buckets
    assert len(far.contacts) == len(middle.contacts) == K
    assert sum(len(b.contacts) for b in near) == K  # our k closest: all in the neighbourhood

    stale = table.stale_buckets(BUCKET_REFRESH_INTERVAL, rng)
    assert len(stale) == len(near)
    assert all(any(b.covers(t) for b in near) for t in stale)
    almost = table.stale_buckets(FAR_BUCKET_REFRESH_INTERVAL - 1, rng)
    assert not any(far.covers(t) or middle.covers(t) for t in almost)
    hourly = table.stale_buckets(FAR_BUCKET_REFRESH_INTERVAL, rng)
    assert len(hourly) == len(table.buckets)
    assert far.covers(hourly[0]) and middle.covers(hourly[1])


def test_random_operations_keep_every_invariant() -> None:
    rng = random.Random(25)
    own = NodeId.from_int(rng.getrandbits(NODE_ID_BITS))
    table = RoutingTable(own, k=3, replacement_cache_size=2, subnet_exempt=None)
    known: list[NodeId] = []
    not_kept = kept_anyway = 0
    for step in range(20_000):
        now = step * 0.5
        roll = rng.random()
        if roll < 0.5 or not known:
            node_id = NodeId.from_int(own.int ^ rng.getrandbits(rng.randrange(1, NODE_ID_BITS + 1)))
            known.append(node_id)
            host = f"81.{rng.randrange(4)}.{rng.randrange(3)}.{rng.randrange(1, 255)}"
            keep = table.would_keep(node_id, now)
            result = table.observe(node_id, Address(host, 4000), now)
            if not keep:  # then the DHT skips the certificate check: the table must not have taken it
                kept_anyway += result.outcome in (ObserveOutcome.ADDED, ObserveOutcome.UPDATED)
                kept_anyway += result.ping_candidate is not None
                not_kept += 1
        elif roll < 0.7:
            table.request_failed(rng.choice(known), now)
        elif roll < 0.85:
            table.request_succeeded(rng.choice(known), now)
        elif roll < 0.95:
            node_id = rng.choice(known)
            contact = table.get(node_id)
            if contact is not None:
                table.observe(node_id, contact.address, now)
        else:
            table.remove(rng.choice(known))
        if step % 1000 == 0:
            check_invariants(table)
    check_invariants(table)
    assert not_kept > 1000  # would_keep said no often enough to mean something, and was right every time
    assert kept_anyway == 0


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="bucket size"):
        RoutingTable(OWN, k=0)
    with pytest.raises(ValueError, match="replacement cache"):
        RoutingTable(OWN, replacement_cache_size=-1)
    with pytest.raises(ValueError, match="subnet limit"):
        RoutingTable(OWN, subnet_limit=0)
