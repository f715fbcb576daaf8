"""Passphrases from a file or a terminal, and unlocking the home's identity with them."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Final

from p2pchat.core.identity import Identity
from p2pchat.errors import PassphraseError, UserError
from p2pchat.home import Home
from p2pchat.keyfile import is_protected, load_identity

__all__ = ["MAX_PASSPHRASE_FILE_BYTES", "ask_new_passphrase", "read_passphrase_file", "unlock"]

MAX_PASSPHRASE_FILE_BYTES: Final = 4096
"""A passphrase file larger than this is refused (the passphrase is its first line)."""


def read_passphrase_file(path: str) -> str:
    """The first line of *path*, without its line ending; UserError if unreadable or empty."""
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_PASSPHRASE_FILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read the passphrase file {path}: {exc.strerror}") from None
    if len(data) > MAX_PASSPHRASE_FILE_BYTES:
        raise UserError(f"the passphrase file {path} is over {MAX_PASSPHRASE_FILE_BYTES} bytes; is it the right file?")
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    if not lines or not lines[0]:
        raise UserError(f"the passphrase file {path} is empty; put the passphrase on its first line")
    return lines[0]


def _on_terminal() -> bool:
    return sys.stdin.isatty()


def ask_new_passphrase(prompt: str) -> str | None:
    """Ask twice on the terminal; None if the user just presses Enter (no passphrase)."""
    first = getpass.getpass(f"{prompt} (Enter for none): ")
    if not first:
        return None
    if getpass.getpass("Again, to be sure: ") != first:
        raise UserError("the two passphrases differ; run the command again")
    return first


def unlock(home: Home, passphrase_file: str | None, *, check_profile: bool = True) -> Identity:
    """The home's identity, unlocked with the passphrase from *passphrase_file* or the terminal if protected, and
    checked against the home's profile (unless *check_profile* is false: repairing the profile)."""
    home.require()
    path = home.key_file
    passphrase = None
    if is_protected(path):
        if passphrase_file is not None:
            passphrase = read_passphrase_file(passphrase_file)
        elif _on_terminal():
            passphrase = getpass.getpass(f"Passphrase for {path}: ")
        else:
            raise PassphraseError(
                f"the identity in {home.path} is passphrase-protected; give --passphrase-file FILE "
                "(or run the command on a terminal to be asked)"
            )
    try:
        identity = load_identity(path, passphrase)
    except PassphraseError as exc:
        hint = "check the file given to --passphrase-file" if passphrase_file else "type it again"
        raise PassphraseError(f"{exc}; {hint}") from None
    if check_profile:
        home.check_identity(identity)
    return identity
