"""Node certificates: binding of key, id and address; every bit flip rejected; verified once, cache bounded."""

from __future__ import annotations

import dataclasses

import pytest

from p2pchat.core.identity import Identity
from p2pchat.core.nodecert import (
    CERT_CACHE_SIZE,
    CERT_CLOCK_SKEW,
    CERT_LIFETIME,
    CertCache,
    NodeCert,
    issue_cert,
)
from p2pchat.core.schema import from_wire, to_wire
from p2pchat.errors import ProtocolError

NOW = 1_800_000_000
ME = Identity.from_seed(bytes(range(32)))


def test_valid_cert_proves_the_node_id_once() -> None:
    cert = issue_cert(ME, "127.0.0.1", 4000, NOW)
    cache = CertCache()
    assert cache.verify(cert, "127.0.0.1", 4000, NOW) == ME.public.node_id
    assert cache.verify(cert, "127.0.0.1", 4000, NOW + 10) == ME.public.node_id
    assert cache.verifications == 1


@pytest.mark.parametrize("host", ["::1", "2001:db8::7", "192.0.2.1"])
def test_round_trip_through_the_wire(host: str) -> None:
    cert = issue_cert(ME, host, 65535, NOW)
    again = from_wire(NodeCert, to_wire(cert))
    assert again == cert
    assert CertCache().verify(again, host, 65535, NOW) == ME.public.node_id


def test_replayed_from_another_address_is_refused() -> None:
    cert = issue_cert(ME, "127.0.0.1", 4000, NOW)
    with pytest.raises(ProtocolError, match="came from"):
        CertCache().verify(cert, "127.0.0.2", 4000, NOW)
    with pytest.raises(ProtocolError, match="came from"):
        CertCache().verify(cert, "127.0.0.1", 4001, NOW)


def test_time_limits() -> None:
    cache = CertCache()
    cache.verify(issue_cert(ME, "127.0.0.1", 1, NOW + CERT_CLOCK_SKEW), "127.0.0.1", 1, NOW)
    with pytest.raises(ProtocolError, match="future"):
        cache.verify(issue_cert(ME, "127.0.0.1", 1, NOW + CERT_CLOCK_SKEW + 1), "127.0.0.1", 1, NOW)
    cache.verify(issue_cert(ME, "127.0.0.1", 1, NOW - CERT_LIFETIME), "127.0.0.1", 1, NOW)
    with pytest.raises(ProtocolError, match="expired"):
        cache.verify(issue_cert(ME, "127.0.0.1", 1, NOW - CERT_LIFETIME - 1), "127.0.0.1", 1, NOW)


def _flip(value: bytes, bit: int) -> bytes:
    data = bytearray(value)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def test_every_bit_flip_of_key_and_signature_is_refused() -> None:
    cert = issue_cert(ME, "127.0.0.1", 4000, NOW)
    for field in ("key", "signature"):
        original = getattr(cert, field)
        for bit in range(len(original) * 8):
            forged = dataclasses.replace(cert, **{field: _flip(original, bit)})
            with pytest.raises(ProtocolError):
                CertCache().verify(forged, "127.0.0.1", 4000, NOW)


def test_every_bit_flip_of_issue_time_and_port_is_refused() -> None:
    cert = issue_cert(ME, "127.0.0.1", 4000, NOW)
    for bit in range(48):
        forged = dataclasses.replace(cert, issued_at=cert.issued_at ^ (1 << bit))
        with pytest.raises(ProtocolError):
            CertCache().verify(forged, "127.0.0.1", 4000, forged.issued_at)
    for bit in range(16):
        port = cert.port ^ (1 << bit)
        if port == 0:
            continue
        forged = dataclasses.replace(cert, port=port)
        with pytest.raises(ProtocolError, match="signature"):
            CertCache().verify(forged, "127.0.0.1", port, NOW)


def test_a_cert_signed_by_another_key_is_refused() -> None:
    other = Identity.from_seed(bytes(32))
    cert = issue_cert(other, "127.0.0.1", 4000, NOW)
    stolen = dataclasses.replace(cert, key=ME.public.key)
    with pytest.raises(ProtocolError, match="signature"):
        CertCache().verify(stolen, "127.0.0.1", 4000, NOW)


def test_cache_is_bounded() -> None:
    cache = CertCache()
    for port in range(1, CERT_CACHE_SIZE + 11):
        cache.verify(issue_cert(ME, "127.0.0.1", port, NOW), "127.0.0.1", port, NOW)
    assert len(cache) == CERT_CACHE_SIZE
    # The oldest were forgotten: verifying the first again costs a signature check.
    before = cache.verifications
    cache.verify(issue_cert(ME, "127.0.0.1", 1, NOW), "127.0.0.1", 1, NOW)
    assert cache.verifications == before + 1
