"""One target under atheris (libFuzzer): ``python -m tests.fuzz.atheris_runner TARGET [libFuzzer flags] CORPUS``.

Started by :mod:`tests.fuzz.campaign`; the p2pchat modules are imported under atheris' instrumentation so that
libFuzzer sees their coverage.  An allowed error (the target's protocol error) is a normal outcome; any other
exception escapes to atheris, which reports it and writes the input as a crash artifact.
"""

from __future__ import annotations

import logging
import sys

import atheris  # type: ignore[import-not-found]


def main() -> None:
    """Set up the target named in ``sys.argv[1]`` and hand the rest of the arguments to libFuzzer."""
    name = sys.argv[1]
    logging.disable(logging.CRITICAL)
    with atheris.instrument_imports(include=["p2pchat"]):
        from tests.fuzz.campaign import NODE_TARGET  # noqa: PLC0415 - imported under instrumentation on purpose

        if name == NODE_TARGET:
            from tests.fuzz.node import ThreadedNodeTarget  # noqa: PLC0415

            harness = ThreadedNodeTarget()

            def one_input(data: bytes) -> None:
                harness.feed(data)

        else:
            from tests.fuzz.targets import TARGETS, run_checked  # noqa: PLC0415

            target = TARGETS[name]
            target.seeds()  # build the corpus (and its keys) once, outside the timed inputs

            def one_input(data: bytes) -> None:
                run_checked(target, data)

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
