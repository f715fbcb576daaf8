"""The DHT node service: routing, node verification, lookups and bootstrap over an RPC transport.

This is the trio shell around the pure core.  It owns one datagram endpoint; its receive loop answers requests
synchronously (no task per packet); lookups run their alpha requests as short tasks.  Every contact that enters
the routing table has proved its node id with a certificate checked from the address it is listed under
(:mod:`p2pchat.core.nodecert`); contacts named in other nodes' replies are only lookup candidates until they
answer for themselves.

Status: ping, find_node, bootstrap, iterative lookups, liveness checks of full buckets and bucket refresh work.
Records, mailboxes, the durable store and kademlia-package interop build on this (see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import trio

from p2pchat.core.identity import Identity
from p2pchat.core.ids import NodeId
from p2pchat.core.lookup import ALPHA, Candidate, Lookup
from p2pchat.core.nodecert import CERT_REISSUE_AFTER, CertCache, NodeCert, issue_cert
from p2pchat.core.packets import MAX_NODES_PER_REPLY, FindNode, NodeInfo, Nodes, Ping, Pong
from p2pchat.core.routing import BUCKET_REFRESH_INTERVAL, K, ObserveOutcome, RoutingTable
from p2pchat.core.schema import Packet
from p2pchat.dht.rpc import RequestTimeoutError, RpcTransport
from p2pchat.env import Env
from p2pchat.errors import P2PChatError, ProtocolError
from p2pchat.net.base import Address

__all__ = ["LIVENESS_QUEUE_SIZE", "MAINTENANCE_INTERVAL", "DhtNode", "LookupResult"]

log = logging.getLogger(__name__)

LIVENESS_QUEUE_SIZE: Final = 64
"""Least-recently-seen contacts waiting to be pinged because a newcomer wants their bucket slot; beyond this the
newcomer just waits in the replacement cache."""

MAINTENANCE_INTERVAL: Final = 60.0
"""Seconds between maintenance passes (stale bucket refresh, certificate renewal)."""

_REPLY_TYPES: Final = (Pong, Nodes)


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What an iterative lookup found, and what it cost."""

    contacts: list[Candidate]
    hops: int
    rpcs: int


class DhtNode:
    """One Kademlia node.  Call :meth:`run` in a nursery (``await nursery.start(node.run)``), then use it."""

    def __init__(
        self,
        env: Env,
        identity: Identity,
        *,
        host: str,
        port: int = 0,
        cert_cache: CertCache | None = None,
        client_mode: bool = False,
        k: int = K,
        alpha: int = ALPHA,
    ) -> None:
        self.env = env
        self.identity = identity
        self.node_id = identity.public.node_id
        self.host = host
        self.port = port
        self.client_mode = client_mode
        self.k = k
        self.alpha = alpha
        self.certs = cert_cache if cert_cache is not None else CertCache()
        self.routing = RoutingTable(self.node_id, k, now=trio.current_time())
        self._transport: RpcTransport | None = None
        self._cert: NodeCert | None = None
        self._liveness_send, self._liveness_receive = trio.open_memory_channel[NodeId](LIVENESS_QUEUE_SIZE)
        self.liveness_dropped = 0

    # --- running ---------------------------------------------------------------------------------------------

    @property
    def transport(self) -> RpcTransport:
        """The RPC transport (available once :meth:`run` has started)."""
        if self._transport is None:
            raise RuntimeError("the DHT node is not running")
        return self._transport

    @property
    def address(self) -> Address:
        """The UDP address this node answers on."""
        return self.transport.local_address

    @property
    def cert(self) -> NodeCert:
        """This node's current certificate."""
        if self._cert is None:
            raise RuntimeError("the DHT node is not running")
        return self._cert

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        endpoint = await self.env.network.open_datagram(self.host, self.port)
        self._transport = RpcTransport(self.env, endpoint, self._handle, reply_types=_REPLY_TYPES)
        self._renew_cert()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._transport.run)
                nursery.start_soon(self._liveness_checks)
                nursery.start_soon(self._maintenance)
                task_status.started()
        finally:
            await endpoint.aclose()

    def _renew_cert(self) -> None:
        local = self.transport.local_address
        self._cert = issue_cert(self.identity, local.host, local.port, int(self.env.wall_time()))

    async def _maintenance(self) -> None:
        while True:
            await trio.sleep(MAINTENANCE_INTERVAL * (0.5 + self.env.rng.random()))
            if self.env.wall_time() - self.cert.issued_at > CERT_REISSUE_AFTER:
                self._renew_cert()
            for target in self.routing.stale_buckets(trio.current_time(), self.env.rng):
                await self.find_node(target)

    async def _liveness_checks(self) -> None:
        # A newcomer wants a full bucket's slot: the least recently seen contact there must answer a ping or go.
        async for node_id in self._liveness_receive:
            contact = self.routing.get(node_id)
            if contact is None:
                continue
            with contextlib.suppress(RequestTimeoutError, ProtocolError):  # the routing table has been told
                await self._ask_ping(contact.address, expected=node_id)

    # --- serving ---------------------------------------------------------------------------------------------

    def _sender(self) -> NodeCert | None:
        return None if self.client_mode else self.cert

    def _handle(self, packet: Packet, source: Address) -> Packet | None:
        sender: NodeCert | None = getattr(packet, "sender", None)
        if sender is not None:
            # A bad certificate means we will not list the sender; it is still answered, as a client would be.
            try:
                node_id = self.certs.verify(sender, source.host, source.port, self.env.wall_time())
            except ProtocolError as exc:
                log.debug("unverifiable sender certificate from %s: %s", source, exc)
            else:
                self._observe(node_id, source, sender)
        if isinstance(packet, Ping):
            return Pong(packet.txid, self.cert, source.host, source.port)
        if isinstance(packet, FindNode):
            target = NodeId(packet.target)
            contacts = self.routing.closest(target, MAX_NODES_PER_REPLY)
            nodes = tuple(NodeInfo(c.node_id.bytes, c.address.host, c.address.port) for c in contacts)
            return Nodes(packet.txid, self.cert, nodes)
        return None

    def _observe(self, node_id: NodeId, address: Address, cert: NodeCert) -> None:
        result = self.routing.observe(node_id, address, trio.current_time(), cert=cert)
        if result.outcome is ObserveOutcome.CACHED and result.ping_candidate is not None:
            try:
                self._liveness_send.send_nowait(result.ping_candidate.node_id)
            except trio.WouldBlock:
                self.liveness_dropped += 1

    # --- asking ----------------------------------------------------------------------------------------------

    def _verify_reply(self, cert: NodeCert, address: Address, expected: NodeId | None) -> NodeId:
        node_id = self.certs.verify(cert, address.host, address.port, self.env.wall_time())
        if expected is not None and node_id != expected:
            raise ProtocolError(f"{address} answered for node {node_id!r}, not {expected!r}")
        self._observe(node_id, address, cert)
        self.routing.request_succeeded(node_id, trio.current_time())
        return node_id

    def _failed(self, expected: NodeId | None) -> None:
        if expected is not None:
            self.routing.request_failed(expected, trio.current_time())

    async def _ask_ping(self, address: Address, *, expected: NodeId | None = None) -> NodeId:
        transport = self.transport
        try:
            reply = await transport.request(Ping(transport.new_txid(), self._sender()), address)
            if not isinstance(reply, Pong):
                raise ProtocolError("a ping was answered with something other than a pong")
            return self._verify_reply(reply.responder, address, expected)
        except (RequestTimeoutError, ProtocolError):
            self._failed(expected)
            raise

    async def ping(self, address: Address) -> NodeId:
        """Ping ``address``; return the node id it proved.  Raises RequestTimeoutError or ProtocolError."""
        return await self._ask_ping(address)

    async def _ask_find_node(self, address: Address, target: NodeId, expected: NodeId) -> list[tuple[NodeId, Address]]:
        transport = self.transport
        try:
            reply = await transport.request(FindNode(transport.new_txid(), self._sender(), target.bytes), address)
            if not isinstance(reply, Nodes):
                raise ProtocolError("find_node was answered with something other than nodes")
            self._verify_reply(reply.responder, address, expected)
        except (RequestTimeoutError, ProtocolError):
            self._failed(expected)
            raise
        return [(NodeId(n.node_id), Address(n.host, n.port)) for n in reply.nodes]

    async def find_node(self, target: NodeId) -> LookupResult:
        """Iteratively find the k nodes closest to ``target`` that answer."""
        lookup = Lookup(
            target,
            self.routing.closest(target, self.k),
            k=self.k,
            alpha=self.alpha,
            own_id=self.node_id,
        )
        self.routing.touch_bucket(target, trio.current_time())
        progress = trio.Event()

        async def ask(candidate: Candidate) -> None:
            nonlocal progress
            try:
                contacts = await self._ask_find_node(candidate.address, target, candidate.node_id)
            except (RequestTimeoutError, ProtocolError):
                lookup.on_failure(candidate.node_id)
            except P2PChatError as exc:  # e.g. too many requests in flight: treat as a failure of this path
                log.debug("find_node to %s failed: %s", candidate.address, exc)
                lookup.on_failure(candidate.node_id)
            else:
                lookup.on_reply(candidate.node_id, contacts)
            progress.set()

        async with trio.open_nursery() as nursery:
            while not lookup.done:
                for candidate in lookup.next_requests():
                    nursery.start_soon(ask, candidate)
                if lookup.done:
                    break
                await progress.wait()
                progress = trio.Event()
            nursery.cancel_scope.cancel()
        return LookupResult(lookup.result(), lookup.hops, lookup.rpcs)

    async def bootstrap(self, addresses: Iterable[Address]) -> int:
        """Join the network through ``addresses``: ping each, then look up our own id.

        Returns how many bootstrap addresses answered (0 means this node is alone, for now).
        """
        answered = 0

        async def try_one(address: Address) -> None:
            nonlocal answered
            try:
                await self._ask_ping(address)
            except (RequestTimeoutError, ProtocolError) as exc:
                log.info("bootstrap node %s did not answer: %s", address, exc)
            else:
                answered += 1

        async with trio.open_nursery() as nursery:
            for address in addresses:
                nursery.start_soon(try_one, address)
        if answered:
            await self.find_node(self.node_id)
            # Fill the farther buckets too, so that lookups from here start well spread.
            for target in self.routing.stale_buckets(trio.current_time() + BUCKET_REFRESH_INTERVAL, self.env.rng):
                if self.routing.bucket_for(target) is not self.routing.bucket_for(self.node_id):
                    await self.find_node(target)
        return answered
