"""p2pchat: a peer-to-peer, serverless, end-to-end-encrypted messenger."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("p2pchat")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
