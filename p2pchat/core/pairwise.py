"""Pairwise mailboxes: a mailbox per ordered pair of identities, at a DHT key only those two can compute.

A user's public mailbox is named in its prekey record, so anyone can compute its DHT key and grind node ids next
to it (a Sybil attack that black-holes the user's offline mail).  Once two users have talked, they need no public
name for their mail: each can derive, from a secret only the two of them hold, a mailbox key pair for each
direction, and the sender stores into the recipient's pairwise mailbox instead.

Derivation (``R`` the recipient, ``S`` the sender, both Ed25519 identity public keys of 32 bytes)::

    DH   = X25519(own identity private key, peer identity public key)     (both converted to X25519, as in X3DH)
    seed = HKDF-SHA256(salt = "", ikm = DH, info = PAIRWISE_MAILBOX_INFO || R || S, length = 32)
    mailbox key pair = the Ed25519 key pair of seed;  DHT key = mailbox_key(its public key)

Both sides compute the same ``DH`` (R with its private key and S's public key; S the other way round), so both
derive the same key pair.  The info string names the recipient first and the sender second, so the mailbox
where R receives from S differs from the one where S receives from R, and a pair differs from every other pair.
The Ed25519 keys in the info also tell apart the two Ed25519 keys that share one X25519 key (they differ in the
sign bit), which the DH alone cannot.

Because the result is an ordinary Ed25519 mailbox key pair, storers treat it like any mailbox: the DHT key is the
hash of its public key, tombstones are signed by its private key, and nothing in it says whose it is.  Both
parties hold the private key; the sender could delete from the mailbox, but it only holds that sender's own mail.
"""

from __future__ import annotations

from typing import Final

from p2pchat.core.identity import PUBLIC_KEY_BYTES, SEED_BYTES, Identity
from p2pchat.core.kdf import hkdf_sha256
from p2pchat.core.x3dh import ed25519_to_x25519_public, identity_x25519_private, x25519_shared

__all__ = ["PAIRWISE_MAILBOX_INFO", "inbound_mailbox", "outbound_mailbox", "pairwise_mailbox_seed"]

PAIRWISE_MAILBOX_INFO: Final = b"p2pchat-pairwise-mailbox-v1"
"""HKDF info prefix of a pairwise mailbox seed (followed by the recipient's and the sender's identity keys)."""


def pairwise_mailbox_seed(own: Identity, peer_key: bytes, *, recipient: bytes, sender: bytes) -> bytes:
    """The 32-byte seed of the mailbox where *recipient* receives from *sender*, computed by *own* (one of them).

    *peer_key* is the other party's identity key.  :class:`ValueError` if *own* and the peer are not exactly the
    recipient and the sender (or are the same key); :class:`~p2pchat.errors.ProtocolError` if the peer's key is
    not a usable curve point (no mailbox can then be shared with it).
    """
    own_key = own.public.key
    if len(peer_key) != PUBLIC_KEY_BYTES or peer_key == own_key or {own_key, peer_key} != {recipient, sender}:
        raise ValueError("a pairwise mailbox is between two distinct identities: ourselves and the peer")
    shared = x25519_shared(identity_x25519_private(own), ed25519_to_x25519_public(peer_key))
    return hkdf_sha256(salt=b"", ikm=shared, info=PAIRWISE_MAILBOX_INFO + recipient + sender, length=SEED_BYTES)


def inbound_mailbox(own: Identity, sender: bytes) -> Identity:
    """The key pair of our mailbox for mail from *sender* (we poll it; see :func:`pairwise_mailbox_seed`)."""
    return Identity.from_seed(pairwise_mailbox_seed(own, sender, recipient=own.public.key, sender=sender))


def outbound_mailbox(own: Identity, recipient: bytes) -> Identity:
    """The key pair of *recipient*'s mailbox for mail from us (we store into it; see
    :func:`pairwise_mailbox_seed`)."""
    return Identity.from_seed(pairwise_mailbox_seed(own, recipient, recipient=recipient, sender=own.public.key))
