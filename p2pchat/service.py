"""What a front end can ask of a running node: send, look up messages, status, and a stream of events.

:class:`ChatService` wraps one running :class:`~p2pchat.node.Node` and answers in the JSON-ready shapes of
:mod:`p2pchat.views`.  The daemon serves it on its control socket (:mod:`p2pchat.control`); a command that runs a
node for its own duration (``send``/``chat`` with no daemon) calls it directly.  Either way the same code decides.

Events fan out: the node has one event channel, read here by :meth:`ChatService.run`; every subscriber gets its
own bounded queue.  A subscriber that falls :data:`SUBSCRIBER_QUEUE` events behind is cut off (its stream ends and
it is counted) rather than slowing the node or growing memory -- everything it missed is in the database.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

import trio

from p2pchat.errors import UserError
from p2pchat.messaging.messenger import DeliveryUpdate, IncomingMessage
from p2pchat.node import Node
from p2pchat.views import message_view, status_view

__all__ = ["MAX_HISTORY_ITEMS", "MAX_SUBSCRIBERS", "SUBSCRIBER_QUEUE", "ChatService", "ServiceStats"]

log = logging.getLogger(__name__)

MAX_SUBSCRIBERS: Final = 32
"""Event streams open at once (a chat window, a web UI tab ...); one more is refused."""

SUBSCRIBER_QUEUE: Final = 256
"""Events waiting for one subscriber; one more and that subscriber is cut off."""

MAX_HISTORY_ITEMS: Final = 50
"""Most messages one history request returns (the newest ones): 50 maximal messages fit one control reply."""

JsonDict = dict[str, Any]


@dataclass(slots=True)
class ServiceStats:
    """Counters of the event fan-out."""

    events: int = 0
    subscribers_cut_off: int = 0
    subscribers_refused: int = 0


class ChatService:
    """The front-end face of one running node."""

    def __init__(self, node: Node, my_name: str | None) -> None:
        self.node = node
        self.my_name = my_name
        self.stats = ServiceStats()
        self._subscribers: set[trio.MemorySendChannel[JsonDict]] = set()

    # --- requests ----------------------------------------------------------------------------------------------

    def send(self, to: str, text: str) -> JsonDict:
        """Queue *text* for *to* (a contact name or an address); the message view, state ``queued``."""
        row = self.node.send(to, text)
        return self._view_of(row.id)

    def message(self, message_id: bytes) -> JsonDict:
        """The view of one message; UserError if there is none with that id."""
        return self._view_of(message_id)

    def history(self, peer: str | None, limit: int = MAX_HISTORY_ITEMS) -> list[JsonDict]:
        """The newest *limit* messages (at most :data:`MAX_HISTORY_ITEMS`) with *peer* or everyone, oldest first."""
        limit = max(0, min(limit, MAX_HISTORY_ITEMS))
        rows = self.node.history(peer)[-limit:] if limit else []
        me = self.node.identity.public
        return [message_view(row, self.node.db, me, self.my_name) for row in rows]

    def status(self) -> JsonDict:
        """Who this node is, where it listens, and its counts."""
        public = self.node.identity.public
        view = {
            "running": True,
            "address": public.address,
            "node_id": public.node_id.hex(),
            "udp_port": self.node.dht.address.port,
            "tcp_port": self.node.messenger.tcp_address.port,
            "lan": self.node.lan is not None,
        }
        view.update(status_view(self.node.status()))
        return view

    def _view_of(self, message_id: bytes) -> JsonDict:
        row = self.node.db.message(message_id)
        if row is None:
            raise UserError(f"no message with id {message_id.hex()}")
        return message_view(row, self.node.db, self.node.identity.public, self.my_name)

    # --- events ------------------------------------------------------------------------------------------------

    def subscribe(self) -> trio.MemoryReceiveChannel[JsonDict]:
        """A new event stream: ``{"event": "message" | "delivery", "message": view}`` per event, from now on."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            self.stats.subscribers_refused += 1
            raise UserError(f"{MAX_SUBSCRIBERS} event streams are open already; close one first")
        send, receive = trio.open_memory_channel[JsonDict](SUBSCRIBER_QUEUE)
        self._subscribers.add(send)
        return receive

    @property
    def subscribers(self) -> int:
        """Event streams open now."""
        return len(self._subscribers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the node's events and hand each to every subscriber until cancelled."""
        task_status.started()
        async for event in self.node.events:
            self.publish(self._event_view(event))

    def publish(self, event: JsonDict) -> None:
        """Give *event* to every subscriber; cut off those that are full or gone."""
        self.stats.events += 1
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                log.warning("an event subscriber fell %d events behind and was cut off", SUBSCRIBER_QUEUE)
                self.stats.subscribers_cut_off += 1
                self._subscribers.discard(channel)
                channel.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)

    def _event_view(self, event: IncomingMessage | DeliveryUpdate) -> JsonDict:
        if isinstance(event, IncomingMessage):
            me = self.node.identity.public
            return {"event": "message", "message": message_view(event.message, self.node.db, me, self.my_name)}
        # The event's own state, not the row's: the row may have moved on already, and a chat window shows each
        # change once, in order.
        view = self._view_of(event.message_id)
        view.update(state=str(event.state), replicas=event.replicas, reason=event.reason)
        return {"event": "delivery", "message": view}
