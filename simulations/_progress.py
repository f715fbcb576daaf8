"""The progress display of ``python -m simulations run``: a tqdm bar on stderr when tqdm is installed (the ``sim``
extra), otherwise a line about every tenth of a phase.  It only shows what the simulation reports; whether it is
shown or not changes nothing in the run (the simulation's own ticker task runs either way)."""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any, TextIO

__all__ = ["ProgressDisplay"]


class ProgressDisplay:
    """One phase at a time: :meth:`start`, then :meth:`update` as often as you like, then :meth:`finish`."""

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.use_tqdm = enabled and importlib.util.find_spec("tqdm") is not None
        self._bar: Any = None
        self._name = ""
        self._total = 0.0
        self._unit = ""
        self._next_line = 0.0
        self._started = 0.0

    def start(self, name: str, total: float, unit: str) -> None:
        """Begin a phase of ``total`` steps of ``unit``."""
        self.finish()
        self._name, self._total, self._unit = name, total, unit
        self._started = time.perf_counter()
        self._next_line = 0.0
        if self.use_tqdm:
            from tqdm import tqdm  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: PLC0415 - an optional extra

            self._bar = tqdm(total=total, desc=name, unit=unit, file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, done: float, note: str = "") -> None:
        """``done`` of the phase's total so far; ``note`` is shown beside the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = min(done, self._total)
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(0)  # redraws at most every tqdm mininterval
            return
        if done >= self._next_line or done >= self._total:
            step = max(self._total / 10, 1e-9)
            self._next_line = (done // step + 1) * step
            elapsed = time.perf_counter() - self._started
            print(
                f"[simulations] {self._name}: {done:,.0f}/{self._total:,.0f} {self._unit} after {elapsed:.1f}s wall"
                f"{'; ' + note if note else ''}",
                file=self.stream,
                flush=True,
            )

    def finish(self) -> None:
        """End the current phase."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def info(self, message: str) -> None:
        """A line of information (between phases)."""
        if self.enabled:
            print(f"[simulations] {message}", file=self.stream, flush=True)
