"""The ``p2pchat`` command line.

Every command works on one home directory (:mod:`p2pchat.home`).  Errors a user can fix are printed as one line,
``p2pchat: what happened; what to do``, with exit status 1 (argparse's own usage errors exit with 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from p2pchat.cli.parser import build_parser
from p2pchat.errors import UserError
from p2pchat.home import Home, resolve_home

__all__ = ["build_parser", "main"]

EXIT_USER_ERROR = 1
"""Exit status for an error the user can fix."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT)."""


def _configure_logging(command: str, verbose: int) -> None:
    # The daemon tells what it does at INFO; one-shot commands only warn, unless asked for more.
    if verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1:
        level = logging.INFO
    else:
        level = logging.WARNING
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "run" and verbose == 0:
        logging.getLogger("p2pchat.daemon").setLevel(logging.INFO)


def _dispatch(args: argparse.Namespace, home: Home, out: TextIO) -> int:
    from p2pchat.cli import chat, contacts, identity, messages, running  # noqa: PLC0415 - keep --help fast

    interactive = sys.stdin.isatty()
    command = args.command
    if command == "init":
        return identity.cmd_init(args, home, out, interactive=interactive)
    if command == "backup":
        return identity.cmd_backup(args, home, out, interactive=interactive)
    if command == "restore":
        return identity.cmd_restore(args, home, out, interactive=interactive)
    if command == "id":
        return identity.cmd_id(args, home, out)
    if command == "contacts":
        return contacts.cmd_contacts(args, home, out)
    if command == "run":
        return running.cmd_run(args, home, out)
    if command == "send":
        return messages.cmd_send(args, home, out)
    if command == "inbox":
        return messages.cmd_inbox(args, home, out)
    if command == "history":
        return messages.cmd_history(args, home, out)
    if command == "chat":
        return chat.cmd_chat(args, home, out)
    if command == "status":
        return running.cmd_status(args, home, out)
    assert command == "demo"
    return running.cmd_demo(args, out)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def user_error_in(group: BaseExceptionGroup[BaseException]) -> UserError | None:
    """The first UserError of a group (trio nurseries wrap errors) whose every leaf is a UserError, else None."""
    leaves = _leaves(group)
    if leaves and all(isinstance(leaf, UserError) for leaf in leaves):
        first = leaves[0]
        assert isinstance(first, UserError)
        return first
    return None


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line and return the process exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.command, args.verbose)
    try:
        return _dispatch(args, resolve_home(args.home), out or sys.stdout)
    except UserError as exc:
        print(f"p2pchat: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BaseExceptionGroup as group:
        error = user_error_in(group)
        if error is None:
            raise
        print(f"p2pchat: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("p2pchat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
