"""The argument parser of the ``p2pchat`` command.

``--home`` and ``--passphrase-file`` are accepted before or after the subcommand: every subparser has them too,
with ``default=SUPPRESS``, so a value given after the subcommand overrides one given before and an absent one
leaves the top level's in place.
"""

from __future__ import annotations

import argparse

from p2pchat import __version__
from p2pchat.daemon import DEFAULT_TCP_PORT, DEFAULT_UDP_PORT
from p2pchat.home import HOME_ENV_VAR

__all__ = ["DEFAULT_DEMO_NODES", "build_parser"]

DEFAULT_DEMO_NODES = 8
"""Nodes in ``p2pchat demo`` when ``--nodes`` is not given."""


def _common(*, suppress: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--home",
        metavar="DIR",
        default=default,
        help=f"the p2pchat home directory (default: ${HOME_ENV_VAR}, else the user data directory)",
    )
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        default=default,
        help="read the identity's passphrase from the first line of FILE (else it is asked for on a terminal)",
    )
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0..65535; 0 = any free port)")
    return port


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _node_options(*, udp_port: int, tcp_port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("node")
    group.add_argument("--host", metavar="IP", help="the IP address to serve on and publish (default: this machine's)")
    group.add_argument(
        "--udp-port", type=_port, default=udp_port, metavar="N", help=f"DHT port (default {udp_port}; 0 = any free)"
    )
    group.add_argument(
        "--tcp-port", type=_port, default=tcp_port, metavar="N", help=f"direct-chat port (default {tcp_port}; 0 = any)"
    )
    group.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a running node to join the DHT through (repeatable; the last run's peers are tried too)",
    )
    group.add_argument(
        "--lan", action=argparse.BooleanOptionalAction, default=True, help="find peers on the LAN with mDNS (default)"
    )
    group.add_argument("--lan-only", action="store_true", help="use LAN peers only: no bootstrap nodes, no internet")
    group.add_argument(
        "--lan-interface",
        action="append",
        metavar="IP|NAME",
        help="announce and browse on this interface (repeatable; default: the interface of --host)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for the ``p2pchat`` command."""
    parser = argparse.ArgumentParser(
        prog="p2pchat",
        description="A peer-to-peer, serverless, end-to-end-encrypted messenger.",
        parents=[_common(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"p2pchat {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug logs)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_common(suppress=True)]
    daemon_node = _node_options(udp_port=DEFAULT_UDP_PORT, tcp_port=DEFAULT_TCP_PORT)
    one_shot_node = _node_options(udp_port=0, tcp_port=0)

    init = commands.add_parser("init", parents=common, help="create your identity and print your address")
    init.add_argument("--name", help="your display name (shown in your own listings)")
    init.add_argument("--no-passphrase", action="store_true", help="do not ask for a passphrase on a terminal")

    backup = commands.add_parser("backup", parents=common, help="write your identity and contacts to a sealed file")
    backup.add_argument("file", metavar="FILE")
    backup.add_argument("--backup-passphrase-file", metavar="FILE", help="the backup's passphrase (else asked for)")
    restore = commands.add_parser("restore", parents=common, help="recreate an identity and contacts from a backup")
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--backup-passphrase-file", metavar="FILE", help="the backup's passphrase (else asked for)")

    ident = commands.add_parser("id", parents=common, help="show your address, node id and fingerprint")
    ident.add_argument("--json", action="store_true", help='print {"address", "node_id", "fingerprint"}')
    ident.add_argument("--repair", action="store_true", help="rewrite profile.json from the key file")

    contacts = commands.add_parser("contacts", parents=common, help="add, list, remove and verify contacts")
    actions = contacts.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", parents=common, help="add a contact (or accept a request, or rename)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("address", metavar="ADDRESS")
    listing = actions.add_parser("list", parents=common, help="list contacts and requests")
    listing.add_argument("--json", action="store_true")
    remove = actions.add_parser("remove", parents=common, help="forget a contact (the history stays)")
    remove.add_argument("name", metavar="NAME")
    verify = actions.add_parser("verify", parents=common, help="show the safety number to compare with a contact")
    verify.add_argument("name", metavar="NAME")

    commands.add_parser(
        "run",
        parents=[*common, daemon_node],
        help="run your node in the foreground (the daemon the other commands talk to)",
        description=(
            f"Run the node until Ctrl-C or SIGTERM. Default ports: {DEFAULT_UDP_PORT}/udp (DHT) and "
            f"{DEFAULT_TCP_PORT}/tcp (direct chats); 0 picks any free port. Prints "
            "'ready udp=PORT tcp=PORT address=ADDRESS' once serving; logs go to stderr."
        ),
    )

    send = commands.add_parser(
        "send",
        parents=[*common, one_shot_node],
        help="send a message (through the running daemon, or a node started for this command)",
    )
    send.add_argument("name", metavar="NAME", help="a contact name or an address")
    send.add_argument("text", metavar="TEXT")
    send.add_argument("--no-wait", action="store_true", help="return once the message is queued on disk")

    inbox = commands.add_parser("inbox", parents=common, help="messages you received")
    inbox.add_argument("--json", action="store_true")
    inbox.add_argument("--limit", type=_positive, default=50, metavar="N", help="the newest N (default 50)")
    history = commands.add_parser("history", parents=common, help="your conversation with a contact")
    history.add_argument("name", metavar="NAME")
    history.add_argument("--json", action="store_true")
    history.add_argument("--limit", type=_positive, default=50, metavar="N", help="the newest N (default 50)")

    chat = commands.add_parser("chat", parents=[*common, one_shot_node], help="chat with a contact interactively")
    chat.add_argument("name", metavar="NAME")

    status = commands.add_parser("status", parents=common, help="peers, DHT contacts, LAN peers, mailbox, outbox")
    status.add_argument("--json", action="store_true")

    demo = commands.add_parser("demo", parents=common, help="run a small local network and show p2pchat working")
    demo.add_argument(
        "--nodes", type=_positive, default=DEFAULT_DEMO_NODES, metavar="N", help="nodes to start (default 8)"
    )
    return parser
