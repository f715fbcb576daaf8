"""LAN discovery over mDNS/DNS-SD (python-zeroconf, bridged to trio): see :mod:`p2pchat.lan.discovery`."""

from __future__ import annotations

from p2pchat.lan.discovery import (
    ADDRESS_CHECK_INTERVAL,
    MAX_LAN_PEERS,
    Announcement,
    EventBridge,
    LanDiscovery,
    LanPeer,
    LanStats,
    resolve_interfaces,
)

__all__ = [
    "ADDRESS_CHECK_INTERVAL",
    "MAX_LAN_PEERS",
    "Announcement",
    "EventBridge",
    "LanDiscovery",
    "LanPeer",
    "LanStats",
    "resolve_interfaces",
]
