"""The command line in-process: parsing (--home before or after the subcommand), the JSON shapes, and the one-line
errors a person gets for every mistake they can make.  No network: commands that need a node are tested with real
processes in test_cli_processes.py."""

from __future__ import annotations

import io
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from p2pchat import cli
from p2pchat.backup import MAX_BACKUP_BYTES, read_backup
from p2pchat.cli.parser import DEFAULT_DEMO_NODES, build_parser
from p2pchat.cli.session import node_options
from p2pchat.core.identity import Identity, PublicIdentity
from p2pchat.daemon import DEFAULT_TCP_PORT, DEFAULT_UDP_PORT
from p2pchat.errors import UserError
from p2pchat.home import HOME_ENV_VAR, MAX_NAME_CHARS, Home, parse_host_port, resolve_home
from p2pchat.messaging.db import MessageDB, MessageRow, MessageState
from p2pchat.views import MESSAGE_STATES

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue(), capsys.readouterr().err


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert err.startswith("p2pchat: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def homes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in ("alice", "bob"):
        home = str(tmp_path / name)
        assert run(capsys, "--home", home, "init", "--name", name)[0] == 0
        found[name] = home
        found[f"{name}_address"] = json.loads(run(capsys, "--home", home, "id", "--json")[1])["address"]
    return found


# --- parsing ----------------------------------------------------------------------------------------------------


def test_home_before_or_after_the_subcommand_and_after_wins() -> None:
    parser = build_parser()
    assert parser.parse_args(["--home", "/a", "id"]).home == "/a"
    assert parser.parse_args(["id", "--home", "/b"]).home == "/b"
    assert parser.parse_args(["--home", "/a", "id", "--home", "/b"]).home == "/b"
    assert parser.parse_args(["contacts", "list", "--home", "/c"]).home == "/c"
    assert parser.parse_args(["--home", "/a", "contacts", "list"]).home == "/a"
    assert parser.parse_args(["id"]).home is None
    assert parser.parse_args(["send", "bob", "hi", "--passphrase-file", "f"]).passphrase_file == "f"


def test_home_resolution_order(tmp_path: Path) -> None:
    assert resolve_home("/x", {HOME_ENV_VAR: "/y"}).path == Path("/x")
    assert resolve_home(None, {HOME_ENV_VAR: "/y"}).path == Path("/y")
    default = resolve_home(None, {}).path
    assert default.name == "p2pchat" and default.is_absolute()


def test_ports_default_to_the_documented_ones_for_run_and_to_any_for_one_shot_commands() -> None:
    parser = build_parser()
    run_args = parser.parse_args(["run"])
    assert (run_args.udp_port, run_args.tcp_port) == (DEFAULT_UDP_PORT, DEFAULT_TCP_PORT)
    assert run_args.lan is True
    send_args = parser.parse_args(["send", "bob", "hi"])
    assert (send_args.udp_port, send_args.tcp_port) == (0, 0)
    assert parser.parse_args(["run", "--no-lan"]).lan is False


def test_demo_takes_nodes_and_runs_the_demo_module(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).nodes == DEFAULT_DEMO_NODES == 8
    assert parser.parse_args(["demo", "--nodes", "5"]).nodes == 5
    calls = []

    def run_demo(nodes: int, out: Any) -> int:
        calls.append(nodes)
        print("transcript", file=out)
        return 0

    monkeypatch.setitem(sys.modules, "p2pchat.demo", types.SimpleNamespace(run_demo=run_demo))
    out = io.StringIO()
    assert cli.main(["demo", "--nodes", "3"], out=out) == 0
    assert calls == [3] and out.getvalue() == "transcript\n"


@pytest.mark.parametrize("argv", [["demo", "--nodes", "0"], ["run", "--udp-port", "70000"], ["inbox", "--limit", "x"]])
def test_bad_numbers_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "p2pchat" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--lan-only", "--no-lan"], "--lan-only needs LAN discovery"),
        (["run", "--lan-only", "--bootstrap", "127.0.0.1:1"], "--lan-only uses no bootstrap"),
        (["run", "--host", "0.0.0.0"], "would listen everywhere"),
        (["run", "--host", "example.org"], "not an IP address"),
        (["run", "--host", "127.0.0.1", "--bootstrap", "127.0.0.1"], "not HOST:PORT"),
        (["run", "--host", "127.0.0.1", "--bootstrap", "127.0.0.1:0"], "port between 1 and 65535"),
        (["run", "--host", "127.0.0.1", "--lan-interface", "no-such-if0"], "no network interface named"),
        (["run", "--host", "::1"], "LAN discovery works on IPv4 only"),
    ],
)
def test_node_option_mistakes(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        node_options(build_parser().parse_args(argv))


def test_host_port_forms() -> None:
    assert parse_host_port("127.0.0.1:7391") == ("127.0.0.1", 7391)
    assert parse_host_port("[::1]:7391") == ("::1", 7391)


# --- identity ---------------------------------------------------------------------------------------------------


def test_init_id_and_refusing_to_overwrite(homes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--home", homes["alice"], "id", "--json")
    view = json.loads(out)
    assert set(view) == {"address", "node_id", "fingerprint"}
    assert (
        view["address"].startswith("p2p1")
        and len(view["node_id"]) == 40
        and re.fullmatch(r"\d{30}", view["fingerprint"])
    )
    code, out, _ = run(capsys, "id", "--home", homes["alice"])
    assert code == 0 and view["address"] in out and "name         alice" in out
    err = one_line_error(capsys, "--home", homes["alice"], "init")
    assert "never overwritten" in err and view["address"] in err


def test_a_lost_profile_is_repaired_from_the_key(homes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    home = Path(homes["alice"])
    (home / "profile.json").unlink()
    assert "p2pchat id --repair" in one_line_error(capsys, "--home", str(home), "id")
    code, _, _ = run(capsys, "--home", str(home), "id", "--repair")
    assert code == 0
    assert json.loads(run(capsys, "--home", str(home), "id", "--json")[1])["address"] == homes["alice_address"]
    (home / "profile.json").write_text('{"address": "p2p1nonsense"}')
    assert "damaged" in one_line_error(capsys, "--home", str(home), "contacts", "list")


def test_commands_on_a_home_without_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["id"], ["contacts", "list"], ["inbox"], ["send", "bob", "hi"], ["run"], ["status"]):
        err = one_line_error(capsys, "--home", str(tmp_path / "empty"), *argv)
        assert "p2pchat init" in err


def test_names_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "must not contain spaces" in one_line_error(capsys, "--home", str(tmp_path / "h"), "init", "--name", "a b")
    long_name = "x" * (MAX_NAME_CHARS + 1)
    assert f"at most {MAX_NAME_CHARS}" in one_line_error(
        capsys, "--home", str(tmp_path / "h"), "init", "--name", long_name
    )


def test_passphrase_protected_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(tmp_path / "carol")
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("incorrect horse\n")
    code, out, _ = run(capsys, "init", "--home", home, "--passphrase-file", str(secret))
    assert code == 0 and "protected by your passphrase" in out
    # Public facts need no passphrase.
    assert run(capsys, "--home", home, "id")[0] == 0
    # Commands that need the key: a wrong passphrase, or none without a terminal, is one clear line.
    err = one_line_error(capsys, "--home", home, "backup", str(tmp_path / "b"), "--passphrase-file", str(wrong))
    assert "wrong passphrase" in err and "--passphrase-file" in err
    err = one_line_error(capsys, "--home", home, "run", "--host", "127.0.0.1", "--no-lan")
    assert "passphrase-protected" in err and "--passphrase-file" in err


# --- contacts ---------------------------------------------------------------------------------------------------


def test_contacts_add_list_verify_remove(homes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    alice = homes["alice"]
    code, out, _ = run(capsys, "--home", alice, "contacts", "add", "bob", homes["bob_address"])
    assert code == 0 and "added bob" in out
    code, out, _ = run(capsys, "--home", alice, "contacts", "list", "--json")
    (contact,) = json.loads(out)
    assert contact["name"] == "bob" and contact["address"] == homes["bob_address"] and contact["status"] == "contact"
    assert ISO_UTC.match(contact["added_at"]) and re.fullmatch(r"\d{30}", contact["fingerprint"])
    code, mine, _ = run(capsys, "--home", alice, "contacts", "verify", "bob")
    run(capsys, "--home", homes["bob"], "contacts", "add", "alice", homes["alice_address"])
    code, theirs, _ = run(capsys, "--home", homes["bob"], "contacts", "verify", "alice")
    digits = re.findall(r"^(?:\d{5} ){3}\d{5}$", mine, re.MULTILINE)
    assert len(digits) == 3 and digits == re.findall(r"^(?:\d{5} ){3}\d{5}$", theirs, re.MULTILINE)
    assert run(capsys, "--home", alice, "contacts", "remove", "bob")[0] == 0
    assert json.loads(run(capsys, "--home", alice, "contacts", "list", "--json")[1]) == []


def test_contact_mistakes_are_one_line(homes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = homes["alice"], homes["bob_address"]
    typo = bob[:20] + ("q" if bob[20] != "q" else "p") + bob[21:]
    assert "character" in one_line_error(capsys, "--home", alice, "contacts", "add", "bob", typo)
    assert "too short" in one_line_error(capsys, "--home", alice, "contacts", "add", "bob", bob[:30])
    assert "own address" in one_line_error(capsys, "--home", alice, "contacts", "add", "me", homes["alice_address"])
    run(capsys, "--home", alice, "contacts", "add", "bob", bob)
    other = Identity.generate().public.address
    assert "already a contact named 'bob'" in one_line_error(capsys, "--home", alice, "contacts", "add", "bob", other)
    for argv in (["contacts", "remove", "carol"], ["contacts", "verify", "carol"], ["history", "carol"]):
        assert "unknown contact 'carol'" in one_line_error(capsys, "--home", alice, *argv)
    err = one_line_error(capsys, "--home", alice, "send", "carol", "hello")
    assert "unknown contact 'carol'" in err and "p2pchat contacts add carol ADDRESS" in err
    assert "too short" in one_line_error(capsys, "--home", alice, "send", "p2p1qqqq", "hello")


# --- messages -----------------------------------------------------------------------------------------------------


def _row(peer: bytes, *, outgoing: bool, text: str, state: MessageState, at: float) -> MessageRow:
    return MessageRow(
        id=text.encode().ljust(16, b"-")[:16],
        peer=peer,
        outgoing=outgoing,
        text=text,
        sent_at=at,
        seq=0,
        state=state,
        replicas=3 if state is MessageState.STORED else 0,
        reason=None,
        expires_at=at + 3600,
        received_at=None if outgoing else at + 1,
        wire=None,
        next_attempt=None,
        attempts=0,
    )


def test_inbox_and_history_json(homes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    alice = homes["alice"]
    run(capsys, "--home", alice, "contacts", "add", "bob", homes["bob_address"])
    bob_key = Identity.generate().public.key  # a stranger too
    bob = PublicIdentity.from_address(homes["bob_address"]).key
    db = MessageDB(Home(Path(alice)).messages_db)
    with db.transaction():
        db.add_message(_row(bob, outgoing=True, text="hi bob", state=MessageState.STORED, at=1_767_225_600.25))
        db.add_message(_row(bob, outgoing=False, text="hi alice!", state=MessageState.RECEIVED, at=1_767_225_601))
        db.add_message(_row(bob_key, outgoing=False, text="who am I?", state=MessageState.RECEIVED, at=1_767_225_602))
    db.close()
    code, out, _ = run(capsys, "--home", alice, "history", "bob", "--json")
    sent, received = json.loads(out)
    for view in (sent, received):
        assert {"id", "from", "to", "text", "sent_at", "state"} <= set(view)
        assert view["state"] in MESSAGE_STATES and ISO_UTC.match(view["sent_at"])
    assert sent == {
        **sent,
        "from": "alice",
        "to": "bob",
        "text": "hi bob",
        "state": "stored",
        "replicas": 3,
        "sent_at": "2026-01-01T00:00:00.250Z",
        "direction": "out",
    }
    assert received["from"] == "bob" and received["to"] == "alice" and received["state"] == "delivered"
    code, out, _ = run(capsys, "--home", alice, "inbox", "--json")
    views = json.loads(out)
    assert [v["text"] for v in views] == ["hi alice!", "who am I?"]
    assert views[1]["from"] == PublicIdentity(bob_key).address  # not a contact: named by address
    code, out, _ = run(capsys, "--home", alice, "inbox", "--limit", "1")
    assert "who am I?" in out and "hi alice!" not in out
    code, out, _ = run(capsys, "--home", alice, "history", "bob")
    assert code == 0
    assert "you -> bob: hi bob  [stored]" in out and "bob: hi alice!" in out


def test_status_without_a_daemon(homes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--home", homes["alice"], "status", "--json")
    view = json.loads(out)
    assert view == {**view, "running": False, "address": homes["alice_address"], "outbox": 0, "contacts": 0}
    code, out, _ = run(capsys, "--home", homes["alice"], "status")
    assert code == 0 and "no daemon is running" in out


# --- backup ---------------------------------------------------------------------------------------------------------


def test_backup_and_restore(homes: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice = homes["alice"]
    run(capsys, "--home", alice, "contacts", "add", "bob", homes["bob_address"])
    secret = tmp_path / "backup-pass"
    secret.write_text("a long backup passphrase\n")
    target = tmp_path / "alice.p2pbackup"
    code, out, _ = run(capsys, "--home", alice, "backup", str(target), "--backup-passphrase-file", str(secret))
    assert code == 0 and "1 contacts" in out and target.stat().st_mode & 0o077 == 0
    err = one_line_error(capsys, "--home", alice, "backup", str(target), "--backup-passphrase-file", str(secret))
    assert "already exists" in err
    restored = str(tmp_path / "restored")
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    err = one_line_error(capsys, "--home", restored, "restore", str(target), "--backup-passphrase-file", str(wrong))
    assert "wrong passphrase for the backup" in err
    assert "already holds" in one_line_error(
        capsys, "--home", alice, "restore", str(target), "--backup-passphrase-file", str(secret)
    )
    code, out, _ = run(capsys, "--home", restored, "restore", str(target), "--backup-passphrase-file", str(secret))
    assert code == 0
    assert json.loads(run(capsys, "--home", restored, "id", "--json")[1])["address"] == homes["alice_address"]
    (contact,) = json.loads(run(capsys, "--home", restored, "contacts", "list", "--json")[1])
    assert contact["name"] == "bob"


def test_backup_files_are_bounded(tmp_path: Path) -> None:
    huge = tmp_path / "huge"
    huge.write_bytes(b"\x00" * (MAX_BACKUP_BYTES + 1))
    with pytest.raises(UserError, match="larger than a backup can be"):
        read_backup(huge, "x")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x81\xa1a\x01")
    with pytest.raises(UserError, match="not a p2pchat backup"):
        read_backup(junk, "x")


def test_one_daemon_per_home(homes: dict[str, Any]) -> None:
    home = Home(Path(homes["alice"]))
    with home.lock(), pytest.raises(UserError, match=r"another p2pchat process \(pid \d+\) is already running"):
        home.lock()
    home.lock().release()  # free again once released
