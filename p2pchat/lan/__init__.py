"""LAN discovery over mDNS/DNS-SD (python-zeroconf, bridged to trio): see :mod:`p2pchat.lan.discovery`."""

from __future__ import annotations

from p2pchat.lan.discovery import (
    MAX_LAN_PEERS,
    EventBridge,
    LanDiscovery,
    LanPeer,
    LanStats,
    resolve_interfaces,
)

__all__ = ["MAX_LAN_PEERS", "EventBridge", "LanDiscovery", "LanPeer", "LanStats", "resolve_interfaces"]
