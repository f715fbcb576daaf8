"""IP-bound write tokens (BitTorrent's BEP 5 rule, bound to the key as well).

A node hands a token to whoever asks it about a key (in :class:`~p2pchat.core.packets.Found`) and accepts a store
under that key only with a token it issued to the storer's IP address recently.  So a writer must have done a
lookup from the address it writes from: a spoofed source address never sees the token, which stops blind store
floods with forged sources, and a token for one key cannot be spent on another.

A token is a keyed BLAKE2b-128 of the IP (packed) and the key under a secret that rotates every
:data:`TOKEN_ROTATION` seconds; the previous secret is still accepted, so a token lives between one and two
rotations.  Epochs are fixed windows of the monotonic clock (not counted from the last use), so the bound holds
however often tokens are asked for.  No per-peer state is kept: checking a token costs one hash.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from typing import Final

from p2pchat.core.ids import NodeId
from p2pchat.core.schema import IP_CACHE_SIZE

__all__ = ["TOKEN_BYTES", "TOKEN_ROTATION", "TOKEN_SECRET_BYTES", "WriteTokens"]

TOKEN_BYTES: Final = 16
"""Size of a write token."""

TOKEN_SECRET_BYTES: Final = 32
"""Size of the rotating secret (a BLAKE2b key)."""

TOKEN_ROTATION: Final = 300.0
"""Length of a secret's epoch: a token is accepted until the end of the epoch after the one it was issued in,
so for 5 to 10 minutes."""


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def _packed_ip(host: str) -> bytes:
    # Every lookup and store asks for a token: parsing the same few addresses again costs more than the hash.
    return ipaddress.ip_address(host).packed


class WriteTokens:
    """Issues and checks write tokens; time is the caller's monotonic clock."""

    __slots__ = ("_current", "_epoch", "_previous", "_random_bytes")

    def __init__(self, random_bytes: Callable[[int], bytes], now: float) -> None:
        self._random_bytes = random_bytes
        self._epoch = int(now // TOKEN_ROTATION)
        self._current = random_bytes(TOKEN_SECRET_BYTES)
        self._previous = random_bytes(TOKEN_SECRET_BYTES)

    def _rotate(self, now: float) -> None:
        # Secrets belong to fixed epochs of TOKEN_ROTATION seconds, so a token's life does not depend on how often
        # tokens are asked for: issued in epoch e, it is accepted until epoch e + 1 ends.
        epoch = int(now // TOKEN_ROTATION)
        if epoch == self._epoch:
            return
        if epoch == self._epoch + 1:
            self._previous = self._current
        else:
            self._previous = self._random_bytes(TOKEN_SECRET_BYTES)
        self._current = self._random_bytes(TOKEN_SECRET_BYTES)
        self._epoch = epoch

    @staticmethod
    def _token(secret: bytes, host: str, key: NodeId) -> bytes:
        packed = _packed_ip(host)
        return hashlib.blake2b(packed + key.bytes, key=secret, digest_size=TOKEN_BYTES).digest()

    def issue(self, host: str, key: NodeId, now: float) -> bytes:
        """The token for a store from *host* under *key*."""
        self._rotate(now)
        return self._token(self._current, host, key)

    def check(self, token: bytes, host: str, key: NodeId, now: float) -> bool:
        """Whether *token* was issued to *host* for *key* within the last one or two rotations."""
        self._rotate(now)
        if len(token) != TOKEN_BYTES:
            return False
        return hmac.compare_digest(token, self._token(self._current, host, key)) or hmac.compare_digest(
            token, self._token(self._previous, host, key)
        )
