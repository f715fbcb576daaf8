"""JSON-ready views of messages, contacts and node status: the shapes ``--json`` prints and the control socket sends.

One module builds them so the command line and the daemon can never disagree.  A message view::

    {"id": hex, "direction": "in" | "out", "from": name, "to": name, "from_address": p2p1..., "to_address": p2p1...,
     "text": str, "sent_at": ISO 8601 UTC, "received_at": ISO 8601 UTC | None,
     "state": "queued" | "sent" | "stored" | "delivered" | "failed", "replicas": int, "reason": str | None}

``from``/``to`` are the contact's name, or the address when the peer is not a named contact; this user is named
by the display name chosen at ``init``, else by the address.  An incoming message is ``delivered`` (it reached
us); the database's internal ``received`` state is never shown.
"""

from __future__ import annotations

import datetime
from typing import Any

from p2pchat.core.identity import PublicIdentity
from p2pchat.messaging.db import Contact, MessageDB, MessageRow, MessageState
from p2pchat.node import NodeStatus

__all__ = ["MESSAGE_STATES", "contact_view", "iso_utc", "message_view", "peer_label", "status_view"]

MESSAGE_STATES = ("queued", "sent", "stored", "delivered", "failed")
"""Every ``state`` a message view can have."""

JsonDict = dict[str, Any]


def iso_utc(timestamp: float) -> str:
    """*timestamp* (seconds since the epoch) as ISO 8601 in UTC with milliseconds, e.g. 2026-01-01T12:00:00.000Z."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def peer_label(db: MessageDB, key: bytes) -> str:
    """A peer's contact name, else its address."""
    contact = db.contact(key)
    if contact is not None and contact.name:
        return contact.name
    return PublicIdentity(key).address


def message_view(row: MessageRow, db: MessageDB, me: PublicIdentity, my_name: str | None) -> JsonDict:
    """The view of one message (see the module docstring)."""
    peer = PublicIdentity(row.peer)
    peer_name = peer_label(db, row.peer)
    my_label = my_name or me.address
    if row.outgoing:
        sender, recipient = (my_label, me.address), (peer_name, peer.address)
    else:
        sender, recipient = (peer_name, peer.address), (my_label, me.address)
    state = MessageState.DELIVERED if row.state is MessageState.RECEIVED else row.state
    return {
        "id": row.id.hex(),
        "direction": "out" if row.outgoing else "in",
        "from": sender[0],
        "to": recipient[0],
        "from_address": sender[1],
        "to_address": recipient[1],
        "text": row.text,
        "sent_at": iso_utc(row.sent_at),
        "received_at": None if row.received_at is None else iso_utc(row.received_at),
        "state": str(state),
        "replicas": row.replicas,
        "reason": row.reason,
    }


def contact_view(contact: Contact) -> JsonDict:
    """The view of one contact: name (None for a request from a stranger), address, status, fingerprint."""
    public = PublicIdentity(contact.key)
    return {
        "name": contact.name,
        "address": public.address,
        "status": str(contact.status),
        "fingerprint": public.fingerprint,
        "added_at": iso_utc(contact.added_at),
    }


def status_view(status: NodeStatus) -> JsonDict:
    """The counts of a running node."""
    return {
        "peers_known": status.peers_known,
        "dht_contacts": status.dht_contacts,
        "lan_peers": status.lan_peers,
        "mailbox_entries_held": status.mailbox_entries_held,
        "records_held": status.records_held,
        "outbox": status.outbox,
    }
