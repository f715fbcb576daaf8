"""Suite-wide safety: real sockets may only reach loopback, so no test can send anywhere else by mistake."""

from __future__ import annotations

import os

from p2pchat.net.real import ALLOW_ENV_VAR

# Set before any test runs, and inherited by daemons that tests start as subprocesses.  Tests that create
# network namespaces add their own ranges explicitly.
os.environ[ALLOW_ENV_VAR] = "127.0.0.0/8,::1/128"
