"""Session records and ratchet states, decoded once and remembered by their encodings.

Every message sent or received reads the session with its peer from the database, steps the ratchet and writes it
back.  Decoding a ratchet state is not cheap -- it checks the state is one the ratchet can reach, which costs an
X25519 base-point multiplication -- and it was most of the CPU time of a message.  The database stays the truth:
the cache maps *encodings* to decoded values, so whatever the database holds is decoded exactly as before, only
not twice; and an encoding this node just wrote is known without decoding it at all.  Both values are immutable
(the ratchet is functional), so sharing them is safe.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, TypeVar

from p2pchat.core import ratchet
from p2pchat.core.messages import SessionRecord, decode, encode
from p2pchat.core.ratchet import RatchetState

__all__ = ["MAX_DECODED_SESSIONS", "SessionCodec"]

MAX_DECODED_SESSIONS: Final = 64
"""Encodings remembered, of each kind (records, states): the sessions in active use.  A session record holds its
ratchet state, so a peer takes one entry of each; the oldest go first."""

_V = TypeVar("_V")


class SessionCodec:
    """Encodes and decodes session records and ratchet states, remembering the last :data:`MAX_DECODED_SESSIONS`."""

    def __init__(self, capacity: int = MAX_DECODED_SESSIONS) -> None:
        self._capacity = capacity
        self._records: OrderedDict[bytes, SessionRecord] = OrderedDict()
        self._states: OrderedDict[bytes, RatchetState] = OrderedDict()
        self.decoded = 0
        """Decodings actually done (not answered from memory): for tests and statistics."""

    def record(self, blob: bytes) -> SessionRecord:
        """The record *blob* encodes (:class:`~p2pchat.errors.ProtocolError` if it is not one)."""
        hit = self._get(self._records, blob)
        if hit is None:
            hit = decode(SessionRecord, blob)
            self.decoded += 1
            self._put(self._records, blob, hit)
        return hit

    def encode_record(self, record: SessionRecord) -> bytes:
        """The encoding of *record*, remembered so that reading it back costs nothing."""
        blob = encode(record)
        self._put(self._records, blob, record)
        return blob

    def state(self, blob: bytes) -> RatchetState:
        """The ratchet state *blob* encodes (:class:`~p2pchat.errors.ProtocolError` if invalid)."""
        hit = self._get(self._states, blob)
        if hit is None:
            hit = ratchet.decode_state(blob)
            self.decoded += 1
            self._put(self._states, blob, hit)
        return hit

    def encode_state(self, state: RatchetState) -> bytes:
        """The encoding of *state*, remembered so that reading it back costs nothing."""
        blob = ratchet.encode_state(state)
        self._put(self._states, blob, state)
        return blob

    def _get(self, memo: OrderedDict[bytes, _V], blob: bytes) -> _V | None:
        hit = memo.get(blob)
        if hit is not None:
            memo.move_to_end(blob)
        return hit

    def _put(self, memo: OrderedDict[bytes, _V], blob: bytes, value: _V) -> None:
        memo[blob] = value
        memo.move_to_end(blob)
        while len(memo) > self._capacity:
            memo.popitem(last=False)
