"""The daemon's control socket: a local Unix socket speaking length-prefixed msgpack (docs/control.md)."""

from __future__ import annotations

from p2pchat.control.client import ControlClient, DaemonNotRunning
from p2pchat.control.protocol import MAX_REPLY_BYTES, MAX_REQUEST_BYTES
from p2pchat.control.server import MAX_CLIENTS, ControlServer

__all__ = ["MAX_CLIENTS", "MAX_REPLY_BYTES", "MAX_REQUEST_BYTES", "ControlClient", "ControlServer", "DaemonNotRunning"]
