"""The error types of p2pchat.

There is one root, :class:`P2PChatError`, so a caller can catch everything this package raises on purpose.
Below it the errors split by who must act:

* :class:`ProtocolError` -- a remote peer sent something we cannot accept.  It is raised only at the receive
  boundary (decoders, validators) and the service that called them drops the input and counts it.  It is never
  shown to a user as their fault.
* :class:`UserError` -- something the user typed or configured is wrong.  Its message is one line that names the
  problem and says what to do about it; the CLI prints it as it is.
* :class:`NetworkError` -- the local network refused an operation (destination not allowed, connect failed).
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "ConnectError",
    "DestinationNotAllowedError",
    "KeyFileError",
    "NetworkError",
    "P2PChatError",
    "PassphraseError",
    "ProtocolError",
    "UserError",
]


class P2PChatError(Exception):
    """Root of every error p2pchat raises on purpose."""


class ProtocolError(P2PChatError):
    """Bad input from a remote peer: malformed, oversized, unknown or invalid.

    Raised only where bytes from the network (or a peer-written record) are decoded or validated.  Services catch
    it, drop the input and count it; it never escapes a receive loop.
    """


class UserError(P2PChatError):
    """A problem the user can fix; the message says what happened and what to do."""


class AddressError(UserError):
    """A p2pchat address that cannot be used: wrong prefix, bad characters, or a typo caught by the checksum."""


class KeyFileError(UserError):
    """A key file that cannot be read or written: missing, corrupt, wrong permissions, or would be overwritten."""


class PassphraseError(KeyFileError):
    """The passphrase does not unlock the key file (or none was given for a protected file)."""


class NetworkError(P2PChatError):
    """The local network layer refused or failed an operation."""


class DestinationNotAllowedError(NetworkError):
    """The destination lies outside the network's allow-list (tests confine traffic to loopback)."""


class ConnectError(NetworkError):
    """A stream connection could not be established (refused, unreachable or timed out)."""
