"""Node certificates: how a DHT node proves that it owns its node id, verified once and cached.

A node id is the hash of the node's public key (:func:`~p2pchat.core.ids.node_id_for_key`), so owning an id
means holding the key.  Rather than sign every datagram, a node signs one small certificate that binds its key
to the address it answers on and a time of issue, and attaches it to its requests and replies.  A receiver
checks the signature once, caches the verdict by the certificate's bytes, and from then on only compares the
datagram's source address with the certificate's: a certificate replayed from another address proves nothing,
and IP spoofing cannot receive the replies that would make a spoofed contact useful.

The signed message is canonical bytes built here (never a re-encoded msgpack), with a domain-separation prefix.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Final

from p2pchat.core.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PublicIdentity
from p2pchat.core.ids import NodeId, node_id_for_key
from p2pchat.core.schema import IP_CACHE_SIZE, Bytes, Int, IpAddress, WireStruct, wire_struct
from p2pchat.errors import ProtocolError

__all__ = [
    "CERT_CACHE_SIZE",
    "CERT_CLOCK_SKEW",
    "CERT_LIFETIME",
    "CERT_REISSUE_AFTER",
    "CertCache",
    "NodeCert",
    "issue_cert",
]

CERT_LIFETIME: Final = 7 * 24 * 3600
"""Seconds after issue that a certificate is accepted; long enough for a node that sleeps through a weekend."""

CERT_REISSUE_AFTER: Final = 24 * 3600
"""A node signs a fresh certificate this often (and whenever its address changes)."""

CERT_CLOCK_SKEW: Final = 3600
"""How far in the future an issue time may be: two nodes' clocks may differ by an hour without harm."""

CERT_CACHE_SIZE: Final = 4096
"""Verified certificates remembered per cache (least recently used ones are forgotten and re-verified)."""

_DOMAIN: Final = b"p2pchat-nodecert-v1\x00"
_IPV4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"
_MAX_TIME: Final = 2**48


@wire_struct(memo=True)
@dataclass(frozen=True, slots=True)
class NodeCert(WireStruct):
    """A node's signed claim: "the node whose key is ``key`` answers at ``host:port``" (since ``issued_at``)."""

    key: Annotated[bytes, Bytes(min_len=PUBLIC_KEY_BYTES, max_len=PUBLIC_KEY_BYTES)]
    host: Annotated[str, IpAddress()]
    port: Annotated[int, Int(min_value=1, max_value=65535)]
    issued_at: Annotated[int, Int(min_value=0, max_value=_MAX_TIME)]
    signature: Annotated[bytes, Bytes(min_len=SIGNATURE_BYTES, max_len=SIGNATURE_BYTES)]

    @property
    def node_id(self) -> NodeId:
        """The node id this certificate speaks for (the hash of its key)."""
        return node_id_for_key(self.key)

    def signed_bytes(self) -> bytes:
        """The canonical message the signature covers."""
        return _message(self.key, self.host, self.port, self.issued_at)


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def _mapped_ip(host: str) -> bytes:
    # IPv4 is written as IPv4-mapped IPv6 so every message has the same layout.  Cached: each new certificate
    # from a known address would otherwise parse it again.
    packed = ipaddress.ip_address(host).packed
    return packed if len(packed) == 16 else _IPV4_MAPPED_PREFIX + packed


def _message(key: bytes, host: str, port: int, issued_at: int) -> bytes:
    return _DOMAIN + key + _mapped_ip(host) + port.to_bytes(2, "big") + issued_at.to_bytes(8, "big")


def issue_cert(identity: Identity, host: str, port: int, issued_at: int) -> NodeCert:
    """Sign a certificate for ``identity`` answering at ``host:port``."""
    host = str(ipaddress.ip_address(host))
    signature = identity.sign(_message(identity.public.key, host, port, issued_at))
    return NodeCert(identity.public.key, host, port, issued_at, signature)


class CertCache:
    """Remembers which certificates verified, so each is checked with Ed25519 once.

    A simulation may share one cache among all its nodes (a named shortcut: the verdict does not depend on who
    checks), which saves one signature check per pair of nodes that meet.
    """

    __slots__ = ("_verified", "verifications")

    def __init__(self) -> None:
        # Keyed by the signature, with the certificate kept to compare whole: the verdict covers every field.
        self._verified: OrderedDict[bytes, tuple[NodeCert, NodeId]] = OrderedDict()
        self.verifications = 0

    def __len__(self) -> int:
        return len(self._verified)

    def knows(self, cert: NodeCert) -> bool:
        """Whether ``cert``'s signature was verified already (so :meth:`verify` would not check it again)."""
        hit = self._verified.get(cert.signature)
        return hit is not None and (hit[0] is cert or hit[0] == cert)

    def verify(self, cert: NodeCert, source_host: str, source_port: int, now: float) -> NodeId:
        """Return the node id ``cert`` proves for a datagram from ``source``; raise ProtocolError if it does not.

        The address binding and the freshness are checked every time (they depend on the datagram and the
        clock); the signature only the first time a certificate is seen.
        """
        if cert.host != source_host or cert.port != source_port:
            raise ProtocolError(
                f"node certificate is for {cert.host}:{cert.port} "
                f"but the datagram came from {source_host}:{source_port}"
            )
        if cert.issued_at > now + CERT_CLOCK_SKEW:
            raise ProtocolError("node certificate is issued in the future")
        if cert.issued_at + CERT_LIFETIME < now:
            raise ProtocolError("node certificate has expired")
        # A hit must be the very certificate verified (decoding memoises certificates, so usually the same object;
        # otherwise every field is compared): a certificate that differs in any field is verified afresh.
        signature = cert.signature
        hit = self._verified.get(signature)
        if hit is not None and (hit[0] is cert or hit[0] == cert):
            self._verified.move_to_end(signature)
            return hit[1]
        self.verifications += 1
        if not PublicIdentity(cert.key).verify(cert.signed_bytes(), signature):
            raise ProtocolError("node certificate signature does not verify")
        node_id = cert.node_id
        self._verified[signature] = (cert, node_id)
        if len(self._verified) > CERT_CACHE_SIZE:
            self._verified.popitem(last=False)
        return node_id
