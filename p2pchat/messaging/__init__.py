"""Messaging between users: the encrypted direct channel between two nodes (more to come on top of it)."""

from p2pchat.messaging.channel import (
    ACCEPT_RETRY_DELAY,
    CLOSE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CHANNEL_FRAME,
    MAX_CONNECTIONS,
    Channel,
    ChannelHandler,
    ChannelServerStats,
    ChannelTimeoutError,
    HandshakeTimeoutError,
    IdleTimeoutError,
    open_channel,
    serve_channels,
)

__all__ = [
    "ACCEPT_RETRY_DELAY",
    "CLOSE_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_CHANNEL_FRAME",
    "MAX_CONNECTIONS",
    "Channel",
    "ChannelHandler",
    "ChannelServerStats",
    "ChannelTimeoutError",
    "HandshakeTimeoutError",
    "IdleTimeoutError",
    "open_channel",
    "serve_channels",
]
