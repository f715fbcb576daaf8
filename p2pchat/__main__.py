"""``python -m p2pchat`` runs the command-line interface."""

from __future__ import annotations

import sys

from p2pchat.cli import main

sys.exit(main())
