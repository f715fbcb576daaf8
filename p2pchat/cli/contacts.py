"""``contacts add | list | remove | verify``, and how a name on the command line becomes a key.

These read and write the home's message database directly, whether or not a daemon runs: SQLite serialises the
two processes' transactions, and the messenger reads contacts from the database each time it needs one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from typing import TextIO

from p2pchat.core.identity import PublicIdentity, format_safety_number, safety_number
from p2pchat.env import Env
from p2pchat.errors import UserError
from p2pchat.home import Home, check_name
from p2pchat.messaging.db import ContactStatus, MessageDB
from p2pchat.views import contact_view

__all__ = ["cmd_contacts", "open_db", "resolve_peer"]


@contextlib.contextmanager
def open_db(home: Home) -> Iterator[MessageDB]:
    """The home's message database, closed afterwards."""
    home.require()
    db = MessageDB(home.messages_db)
    try:
        yield db
    finally:
        db.close()


def resolve_peer(db: MessageDB, name: str) -> bytes:
    """The key behind a contact name or an address; UserError naming what to do if it is neither."""
    contact = db.contact_by_name(name)
    if contact is not None:
        return contact.key
    if name.lower().startswith("p2p1"):
        return PublicIdentity.from_address(name).key
    raise UserError(
        f"unknown contact {name!r}; add it with `p2pchat contacts add {name} ADDRESS` "
        "(`p2pchat contacts list` shows who you have)"
    )


def cmd_contacts(args: argparse.Namespace, home: Home, out: TextIO) -> int:
    """Dispatch ``contacts ACTION``."""
    me = home.profile().public
    with open_db(home) as db:
        if args.action == "add":
            return _add(db, me, args.name, args.address, out)
        if args.action == "list":
            return _list(db, args.json, out)
        if args.action == "remove":
            return _remove(db, args.name, out)
        return _verify(db, me, args.name, out)


def _add(db: MessageDB, me: PublicIdentity, name_text: str, address: str, out: TextIO) -> int:
    name = check_name(name_text, "contact name")
    key = PublicIdentity.from_address(address).key
    if key == me.key:
        raise UserError("that is your own address; give the address of the person you want to add")
    other = db.contact_by_name(name)
    if other is not None and other.key != key:
        raise UserError(
            f"there is already a contact named {name!r} ({PublicIdentity(other.key).address}); "
            "remove it first or choose another name"
        )
    before = db.contact(key)
    with db.transaction():
        db.set_contact(key, name, ContactStatus.CONTACT, Env.real().wall_time())
    if before is not None and before.status is ContactStatus.REQUEST:
        print(f"accepted {name}'s request ({PublicIdentity(key).address})", file=out)
    elif before is not None and before.name and before.name != name:
        print(f"renamed {before.name} to {name}", file=out)
    else:
        print(f"added {name} ({PublicIdentity(key).address})", file=out)
    print(f"compare safety numbers with `p2pchat contacts verify {name}`", file=out)
    return 0


def _list(db: MessageDB, as_json: bool, out: TextIO) -> int:
    views = [contact_view(c) for c in db.contacts()]
    if as_json:
        print(json.dumps(views), file=out)
        return 0
    if not views:
        print("no contacts yet; add one with `p2pchat contacts add NAME ADDRESS`", file=out)
        return 0
    width = max(len(v["name"] or "(request)") for v in views)
    for view in views:
        print(f"{view['name'] or '(request)':<{width}}  {view['status']:<8}  {view['address']}", file=out)
    if any(v["status"] == "request" for v in views):
        print("requests wrote to you first; accept one with `p2pchat contacts add NAME ADDRESS`", file=out)
    return 0


def _remove(db: MessageDB, name: str, out: TextIO) -> int:
    contact = db.contact_by_name(name)
    if contact is None:
        raise UserError(f"unknown contact {name!r}; `p2pchat contacts list` shows who you have")
    with db.transaction():
        db.remove_contact(contact.key)
    print(f"removed {name} (your history with them stays)", file=out)
    return 0


def _verify(db: MessageDB, me: PublicIdentity, name: str, out: TextIO) -> int:
    peer = PublicIdentity(resolve_peer(db, name))
    print(f"safety number for you and {name}:", file=out)
    print(format_safety_number(safety_number(me, peer)), file=out)
    print(
        f"compare it with {name} in person or on a call you trust; if every digit matches, nobody is in the middle",
        file=out,
    )
    return 0
