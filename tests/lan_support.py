"""Shared by the LAN tests: a DNS-SD service type of their own for each test.

Every zeroconf on 127.0.0.1 hears every other on this host -- other tests of this run, and other test runs
going on at the same time (several checkouts share a machine).  Under the standard service type a test's nodes
would find, verify and store mail on nodes that some other test started, and its exact assertions (how many
peers, which counters) would depend on what else runs.  A service type per test is a LAN of its own, as a
network namespace would be; the code under test is the same, only the type string differs.  The netns test runs
the standard type, alone on its veth pair.
"""

from __future__ import annotations

import itertools
import os

_counter = itertools.count(1)


def lan_service_type() -> str:
    """A service type no other test on this host uses now: ``_p2pt<pid hex>-<n>._udp.local.``.

    DNS-SD limits the name to 15 characters; the pid (at most 0x400000 on Linux) fits in six hex digits.
    """
    label = f"p2pt{os.getpid():x}-{next(_counter)}"
    assert len(label) <= 15, label
    return f"_{label}._udp.local."
