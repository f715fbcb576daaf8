"""``init``, ``id``, ``backup`` and ``restore``: creating, showing and carrying the identity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TextIO

from p2pchat.backup import Backup, BackupContact, read_backup, write_backup
from p2pchat.cli.passphrases import ask_new_passphrase, read_passphrase_file, unlock
from p2pchat.core.identity import Identity
from p2pchat.errors import UserError
from p2pchat.home import Home, Profile, check_name
from p2pchat.keyfile import save_identity
from p2pchat.messaging.db import MessageDB

__all__ = ["cmd_backup", "cmd_id", "cmd_init", "cmd_restore", "id_view"]


def _new_passphrase(args: argparse.Namespace, interactive: bool) -> str | None:
    if args.passphrase_file is not None:
        return read_passphrase_file(args.passphrase_file)
    if interactive:
        return ask_new_passphrase("Passphrase to protect your key")
    return None


def _refuse_existing(home: Home) -> None:
    if home.exists():
        try:
            address = home.profile().address
        except UserError:
            address = "an identity"
        raise UserError(f"{home.path} already holds {address}; an identity is never overwritten (pass another --home)")


def _create(home: Home, identity: Identity, name: str | None, passphrase: str | None) -> None:
    home.make_private()
    save_identity(home.key_file, identity, passphrase)
    home.write_profile(Profile(identity.public.address, name))


def cmd_init(args: argparse.Namespace, home: Home, out: TextIO, *, interactive: bool) -> int:
    """Create the identity; print the address."""
    name = None if args.name is None else check_name(args.name)
    _refuse_existing(home)
    passphrase = _new_passphrase(args, interactive and not args.no_passphrase)
    identity = Identity.generate()
    _create(home, identity, name, passphrase)
    protected = "protected by your passphrase" if passphrase else "not passphrase-protected"
    print(f"created your identity in {home.path} ({protected})", file=out)
    print(f"your address: {identity.public.address}", file=out)
    print("give it to the people you want to chat with; run `p2pchat run` to go online", file=out)
    return 0


def id_view(identity_address: str) -> dict[str, str]:
    """The ``id --json`` object."""
    public = Profile(identity_address, None).public
    return {"address": public.address, "node_id": public.node_id.hex(), "fingerprint": public.fingerprint}


def cmd_id(args: argparse.Namespace, home: Home, out: TextIO) -> int:
    """Print the address, node id and fingerprint."""
    if args.repair:
        home.require()
        identity = unlock(home, args.passphrase_file, check_profile=False)
        try:
            name = home.profile().name
        except UserError:
            name = None
        home.write_profile(Profile(identity.public.address, name))
        print(f"rewrote {home.profile_file}", file=out)
    profile = home.profile()
    view = id_view(profile.address)
    if args.json:
        print(json.dumps(view), file=out)
        return 0
    digits = view["fingerprint"]
    print(f"address      {view['address']}", file=out)
    if profile.name:
        print(f"name         {profile.name}", file=out)
    print(f"node id      {view['node_id']}", file=out)
    print(f"fingerprint  {' '.join(digits[i : i + 5] for i in range(0, len(digits), 5))}", file=out)
    return 0


def _backup_passphrase(args: argparse.Namespace, interactive: bool, *, new: bool) -> str:
    if args.backup_passphrase_file is not None:
        return read_passphrase_file(args.backup_passphrase_file)
    if interactive:
        if new:
            passphrase = ask_new_passphrase("Passphrase for the backup")
            if passphrase:
                return passphrase
            raise UserError("a backup must have a passphrase; run the command again and choose one")
        import getpass  # noqa: PLC0415 - only on a terminal

        return getpass.getpass("Passphrase of the backup: ")
    raise UserError("give the backup's passphrase with --backup-passphrase-file FILE (or run this on a terminal)")


def cmd_backup(args: argparse.Namespace, home: Home, out: TextIO, *, interactive: bool) -> int:
    """Seal the identity and contacts into a new file."""
    identity = unlock(home, args.passphrase_file)
    passphrase = _backup_passphrase(args, interactive, new=True)
    db = MessageDB(home.messages_db)
    try:
        contacts = [BackupContact(c.name, c.key, c.status, c.added_at) for c in db.contacts()]
    finally:
        db.close()
    write_backup(Path(args.file), Backup(identity, home.profile().name, contacts), passphrase)
    print(f"wrote {args.file}: your identity and {len(contacts)} contacts, sealed under the passphrase", file=out)
    return 0


def cmd_restore(args: argparse.Namespace, home: Home, out: TextIO, *, interactive: bool) -> int:
    """Recreate the identity and contacts from a backup in an empty home."""
    _refuse_existing(home)
    backup = read_backup(Path(args.file), _backup_passphrase(args, interactive, new=False))
    passphrase = _new_passphrase(args, interactive)
    _create(home, backup.identity, backup.name, passphrase)
    db = MessageDB(home.messages_db)
    try:
        with db.transaction():
            for contact in backup.contacts:
                db.set_contact(contact.key, contact.name, contact.status, contact.added_at)
    finally:
        db.close()
    print(f"restored {backup.identity.public.address} and {len(backup.contacts)} contacts into {home.path}", file=out)
    return 0
