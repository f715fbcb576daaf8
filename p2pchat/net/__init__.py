"""The network layer: one interface, two implementations (real trio sockets and SimNetwork)."""

from p2pchat.net.base import (
    Address,
    DatagramEndpoint,
    DatagramStats,
    Listener,
    Network,
    Stream,
    parse_address,
)

__all__ = ["Address", "DatagramEndpoint", "DatagramStats", "Listener", "Network", "Stream", "parse_address"]
