"""A user's p2pchat home directory: where it is, what lives in it, and the lock that lets one process run a node.

Layout (every file private to the user; the directory itself is 0700)::

    identity.key      the identity key file (p2pchat.keyfile), optionally sealed under a passphrase
    profile.json      public facts written by ``init``/``restore``: the address and the chosen display name, so
                      commands that need no secret (``id``, ``contacts``, ``history``) never ask for a passphrase
    messages.sqlite   contacts, sessions, history, outbox (p2pchat.messaging.db)
    dht.sqlite        what this node stores for others (p2pchat.dht.store)
    bootstrap         DHT nodes that answered during the last ``run``, one HOST:PORT a line, for the next start
    daemon.lock       held (flock) by the one process running a node on this home; holds its pid
    control.sock      the running daemon's control socket (p2pchat.control)

Which directory: ``--home`` if given, else ``$P2PCHAT_HOME``, else the platform's user data directory
(platformdirs: ``~/.local/share/p2pchat`` on Linux).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import platformdirs

from p2pchat.core.identity import Identity, PublicIdentity
from p2pchat.errors import AddressError, UserError
from p2pchat.net.base import Address
from p2pchat.node import MESSAGES_DB_NAME

__all__ = [
    "APP_NAME",
    "HOME_ENV_VAR",
    "MAX_BOOTSTRAP_FILE_BYTES",
    "MAX_NAME_CHARS",
    "MAX_PROFILE_BYTES",
    "MAX_SAVED_BOOTSTRAP",
    "Home",
    "HomeLock",
    "Profile",
    "check_name",
    "parse_host_port",
    "resolve_home",
]

APP_NAME: Final = "p2pchat"
"""The directory name under the platform's user data directory."""

HOME_ENV_VAR: Final = "P2PCHAT_HOME"
"""Environment variable naming the home directory when ``--home`` is not given."""

MAX_PROFILE_BYTES: Final = 4096
"""A profile.json larger than this is refused unread (a real one is ~150 bytes)."""

MAX_NAME_CHARS: Final = 64
"""Longest display name or contact name."""

MAX_SAVED_BOOTSTRAP: Final = 16
"""Most addresses kept in the bootstrap file."""

MAX_BOOTSTRAP_FILE_BYTES: Final = 64 * 1024
"""A bootstrap file larger than this is refused unread."""

_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600


def resolve_home(option: str | None, environ: Mapping[str, str] | None = None) -> Home:
    """The home named by ``--home`` (*option*), else ``$P2PCHAT_HOME``, else the platform default."""
    env = os.environ if environ is None else environ
    if option:
        return Home(Path(option).expanduser())
    value = env.get(HOME_ENV_VAR, "").strip()
    if value:
        return Home(Path(value).expanduser())
    return Home(Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)))


def parse_host_port(text: str) -> Address:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as an Address; a one-line UserError if it is not one."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UserError(f"{text!r} is not HOST:PORT with an IP address (e.g. 192.0.2.7:7391)") from None
    if not sep or not 0 < port < 65536:
        raise UserError(f"{text!r} is not HOST:PORT with a port between 1 and 65535")
    return Address(str(ip), port)


def check_name(name: str, what: str = "name") -> str:
    """A display or contact name, stripped; UserError if empty, too long or shaped like an address."""
    cleaned = name.strip()
    if not cleaned:
        raise UserError(f"the {what} is empty; give a short name such as alice")
    if len(cleaned) > MAX_NAME_CHARS:
        raise UserError(f"the {what} is {len(cleaned)} characters; use at most {MAX_NAME_CHARS}")
    if cleaned.lower().startswith("p2p1") or any(ch.isspace() for ch in cleaned):
        raise UserError(f"the {what} {cleaned!r} must not contain spaces or start with p2p1 (that is an address)")
    return cleaned


@dataclass(frozen=True, slots=True)
class Profile:
    """The public half of a home: this user's address and display name."""

    address: str
    name: str | None

    @property
    def public(self) -> PublicIdentity:
        """This user's public identity."""
        return PublicIdentity.from_address(self.address)

    @property
    def label(self) -> str:
        """How this user is named in listings: the display name, else the address."""
        return self.name or self.address


class HomeLock:
    """An exclusive ``flock`` on ``daemon.lock``, held for as long as a process runs a node on the home.

    The kernel drops the lock when the process dies, kill -9 included, so a crash never leaves a stale lock.
    """

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        """Let go of the lock (idempotent)."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> HomeLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Home:
    """One home directory and the files in it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"Home({str(self.path)!r})"

    @property
    def key_file(self) -> Path:
        """The identity key file."""
        return self.path / "identity.key"

    @property
    def profile_file(self) -> Path:
        """The public profile."""
        return self.path / "profile.json"

    @property
    def messages_db(self) -> Path:
        """The messenger's database (contacts, history, outbox)."""
        return self.path / MESSAGES_DB_NAME

    @property
    def bootstrap_file(self) -> Path:
        """Addresses saved by the last ``run``."""
        return self.path / "bootstrap"

    @property
    def lock_file(self) -> Path:
        """The daemon lock."""
        return self.path / "daemon.lock"

    @property
    def control_socket(self) -> Path:
        """The running daemon's control socket."""
        return self.path / "control.sock"

    def exists(self) -> bool:
        """Whether ``init`` (or ``restore``) has been run here."""
        return self.key_file.exists()

    def require(self) -> None:
        """UserError unless this home holds an identity."""
        if not self.exists():
            raise UserError(f"no p2pchat identity in {self.path}; create one with `p2pchat init` (or pass --home)")

    def make_private(self) -> None:
        """Create the directory (and parents) if needed and make it 0700: the control socket and keys live here."""
        self.path.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        os.chmod(self.path, _DIR_MODE)

    # --- profile -------------------------------------------------------------------------------------------------

    def write_profile(self, profile: Profile) -> None:
        """Write profile.json (replacing it atomically)."""
        document = {"address": profile.address, "name": profile.name}
        _write_private(self.profile_file, (json.dumps(document, indent=2) + "\n").encode())

    def profile(self) -> Profile:
        """Read profile.json; UserError if there is no identity here or the file is damaged."""
        self.require()
        path = self.profile_file
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_PROFILE_BYTES + 1)
        except FileNotFoundError:
            raise UserError(f"{path} is missing; recreate it with `p2pchat id --repair`") from None
        try:
            if len(data) > MAX_PROFILE_BYTES:
                raise ValueError("too large")
            document = json.loads(data)
            address = document["address"]
            name = document.get("name")
            if not isinstance(address, str) or not (name is None or isinstance(name, str)):
                raise ValueError("wrong types")
            PublicIdentity.from_address(address)
        except (ValueError, KeyError, TypeError, RecursionError, AddressError):
            # RecursionError: json nests arrays by recursion, and 4 KiB of "[" is deeper than Python allows.
            raise UserError(f"{path} is damaged; recreate it with `p2pchat id --repair`") from None
        return Profile(address, name)

    def check_identity(self, identity: Identity) -> None:
        """UserError if the unlocked key is not the one the profile names (files from two homes mixed up)."""
        profile = self.profile()
        if profile.address != identity.public.address:
            # A flipped bit in an unsealed key file reads as another valid key: which file is wrong cannot be known
            # from here, and repairing the profile from a damaged key would give the identity up for good.
            raise UserError(
                f"{self.key_file} holds {identity.public.address} but {self.profile_file} names {profile.address}; "
                "if the key file was damaged, restore it from a backup; if the profile is wrong, "
                "`p2pchat id --repair` rewrites it from the key"
            )

    # --- bootstrap addresses -------------------------------------------------------------------------------------

    def saved_bootstrap(self) -> list[Address]:
        """Addresses saved by the last ``run`` (lines that do not parse are skipped: the file is ours)."""
        try:
            with self.bootstrap_file.open("rb") as handle:
                data = handle.read(MAX_BOOTSTRAP_FILE_BYTES + 1)
        except FileNotFoundError:
            return []
        if len(data) > MAX_BOOTSTRAP_FILE_BYTES:
            return []
        found: list[Address] = []
        for line in data.decode("utf-8", "replace").splitlines():
            with contextlib.suppress(UserError):
                address = parse_host_port(line)
                if address not in found:
                    found.append(address)
        return found[:MAX_SAVED_BOOTSTRAP]

    def save_bootstrap(self, addresses: list[Address]) -> None:
        """Replace the bootstrap file with *addresses* (at most :data:`MAX_SAVED_BOOTSTRAP`)."""
        lines = [_format_address(a) for a in addresses[:MAX_SAVED_BOOTSTRAP]]
        _write_private(self.bootstrap_file, "".join(f"{line}\n" for line in lines).encode())

    # --- the lock --------------------------------------------------------------------------------------------------

    def lock(self) -> HomeLock:
        """Take the daemon lock, or UserError naming the process that holds it."""
        self.make_private()
        descriptor = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(descriptor)
            os.close(descriptor)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock {self.lock_file}: {exc.strerror}") from None
            who = f" (pid {holder})" if holder else ""
            raise UserError(
                f"another p2pchat process{who} is already running a node on {self.path}; "
                "use that one, stop it first, or pass a different --home"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        return HomeLock(self.lock_file, descriptor)


def _read_pid(descriptor: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(descriptor, 32, 0).decode().strip())
    return None


def _format_address(address: Address) -> str:
    return f"[{address.host}]:{address.port}" if ":" in address.host else f"{address.host}:{address.port}"


def _write_private(path: Path, data: bytes) -> None:
    """Write *data* to *path* atomically (temp file + rename), mode 0600."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
