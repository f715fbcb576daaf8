"""Hostile DHT nodes for simulations: the real :class:`~p2pchat.dht.node.DhtNode`, answering falsely or not at all.

A hostile node joins, keeps its routing table, refreshes its buckets and asks its own questions exactly as an
honest node does (its requests carry a valid certificate, so others list it); only its answers to others differ:

* ``silent``: answers pings (so it stays in routing tables and passes liveness checks) and nothing else -- a black
  hole that costs every lookup through it a timeout.
* ``far``: answers ``find_node``/``find_value`` with the contacts it knows *farthest* from the target.
* ``fake``: answers them with fabricated ids right next to the target, at addresses where nobody listens (the
  asker learns nothing and waits for timeouts).
* ``sybil``: one of a cluster whose ids were ground next to a key (:func:`grind_identities`); answers with its
  fellow Sybils only, so a lookup that reaches the cluster stays inside it.

Every hostile kind but ``silent`` also claims to hold nothing (``Found`` with no record and no entries), answers
``ListEntries`` with no ids and ``GetPart`` with "not held", and acknowledges every ``Store`` without keeping it:
a put counts it as a replica that does not exist.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NODE_ID_BITS, NodeId
from p2pchat.core.packets import (
    MAX_NODES_PER_REPLY,
    EntryIds,
    ErrorCode,
    ErrorReply,
    FindNode,
    FindValue,
    GetPart,
    ListEntries,
    NodeInfo,
    Nodes,
    Ping,
    Store,
    Stored,
)
from p2pchat.core.schema import Packet
from p2pchat.dht.node import DhtNode
from p2pchat.net.base import Address

__all__ = ["BEHAVIOURS", "FAKE_CONTACT_NETWORK", "HostileDhtNode", "grind_identities"]

BEHAVIOURS = ("silent", "far", "fake", "sybil")

FAKE_CONTACT_NETWORK = "10.255"
"""First two octets of the addresses fake contacts are given: no simulated host is ever numbered there (hosts are
numbered up from 10.0.0.1), so datagrams to them are dropped as unreachable."""

_FAKE_SPREAD_BITS = NODE_ID_BITS - 40
"""Fake ids differ from the target only in their low bits: closer than any real node of a feasible network."""


class HostileDhtNode(DhtNode):
    """A DhtNode whose answers to others follow ``behaviour`` (see the module docstring)."""

    behaviour: str = "silent"
    allies: tuple[NodeInfo, ...] = ()
    """For ``sybil``: the cluster (this node included), named in every answer."""
    lie_rng: random.Random = random.Random(0)
    """For ``fake``: where the fabricated ids and addresses come from (the node's own seeded generator)."""

    def configure(self, behaviour: str, *, allies: tuple[NodeInfo, ...] = (), lie_rng: random.Random) -> None:
        """Set how this node misbehaves (before it runs)."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown hostile behaviour {behaviour!r}")
        self.behaviour = behaviour
        self.allies = allies
        self.lie_rng = lie_rng

    def _handle(self, packet: Packet, source: Address) -> Packet | None:
        if isinstance(packet, Ping):
            return super()._handle(packet, source)
        if self.behaviour == "silent":
            return None
        if isinstance(packet, Store):
            return Stored(packet.txid, complete=True)  # a replica that does not exist
        if isinstance(packet, ListEntries):
            return EntryIds(packet.txid, (), False)
        if isinstance(packet, GetPart):
            return ErrorReply(packet.txid, int(ErrorCode.NOT_FOUND), "not held")
        if isinstance(packet, FindNode | FindValue):
            reply = super()._handle(packet, source)  # the certificate check, the write token
            target = NodeId(packet.target if isinstance(packet, FindNode) else packet.key)
            lies = self._lies(target)
            if isinstance(reply, Nodes):
                return replace(reply, nodes=lies)
            if reply is not None:
                return replace(reply, nodes=lies, seq=None, digest=None, entries=0)  # type: ignore[type-var]
            return None
        return super()._handle(packet, source)

    def _lies(self, target: NodeId) -> tuple[NodeInfo, ...]:
        if self.behaviour == "sybil":
            ranked = sorted(self.allies, key=lambda n: NodeId(n.node_id).distance(target))
            return tuple(ranked[:MAX_NODES_PER_REPLY])
        if self.behaviour == "far":
            known = sorted(self.routing, key=lambda c: c.node_id.distance(target), reverse=True)
            return tuple(NodeInfo(c.node_id.bytes, c.address.host, c.address.port) for c in known[:MAX_NODES_PER_REPLY])
        rng = self.lie_rng
        fakes = []
        for _ in range(MAX_NODES_PER_REPLY):
            node_id = target.int ^ rng.getrandbits(NODE_ID_BITS - _FAKE_SPREAD_BITS)
            host = f"{FAKE_CONTACT_NETWORK}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            fakes.append(NodeInfo(node_id.to_bytes(NODE_ID_BITS // 8, "big"), host, 4000))
        return tuple(fakes)


def grind_identities(key: NodeId, count: int, prefix_bits: int, seed: str) -> tuple[list[Identity], int]:
    """``count`` identities whose node ids share the top ``prefix_bits`` bits of ``key``, found by trying key seeds
    derived from ``seed`` in order (so the same seed grinds the same keys).  Returns them and how many were tried:
    about ``count * 2**prefix_bits``, which is why disjoint lookups matter more than id-from-key alone."""
    shift = NODE_ID_BITS - prefix_bits
    wanted = key.int >> shift
    found: list[Identity] = []
    tried = 0
    while len(found) < count:
        material = hashlib.blake2b(f"{seed}:{tried}".encode(), digest_size=32).digest()
        tried += 1
        identity = Identity.from_seed(material)
        if identity.public.node_id.int >> shift == wanted:
            found.append(identity)
    return found, tried
