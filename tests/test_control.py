"""The control protocol and server: frames bounded both ways, requests checked field by field, the client limit,
the event fan-out and its cut-off, and a socket only its owner can open.  Real Unix sockets; every wait has a
deadline."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import trio

from p2pchat.control.client import ControlClient, DaemonNotRunning
from p2pchat.control.protocol import (
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    FrameReader,
    encode_frame,
    parse_request,
)
from p2pchat.control.server import MAX_CLIENTS, SOCKET_MODE, ControlServer
from p2pchat.core.messages import MAX_TEXT_BYTES
from p2pchat.errors import ProtocolError, UserError
from p2pchat.service import MAX_HISTORY_ITEMS, MAX_SUBSCRIBERS, SUBSCRIBER_QUEUE, ChatService

DEADLINE = 10.0


def _frame(value: object) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


# --- frames ---------------------------------------------------------------------------------------------------


def test_frames_round_trip_whole_and_byte_by_byte() -> None:
    frames = b"".join(encode_frame({"id": i, "op": "status"}, MAX_REQUEST_BYTES) for i in range(3))
    whole = FrameReader(MAX_REQUEST_BYTES)
    whole.feed(frames)
    assert [whole.next(), whole.next(), whole.next(), whole.next()] == [
        {"id": 0, "op": "status"},
        {"id": 1, "op": "status"},
        {"id": 2, "op": "status"},
        None,
    ]
    one = FrameReader(MAX_REQUEST_BYTES)
    got = []
    for byte in frames:
        one.feed(bytes([byte]))
        while (value := one.next()) is not None:
            got.append(value["id"])
    assert got == [0, 1, 2]
    one.feed_eof()


def test_oversized_request_is_refused_from_its_length_alone() -> None:
    reader = FrameReader(MAX_REQUEST_BYTES)
    reader.feed(struct.pack(">I", MAX_REQUEST_BYTES + 1))
    with pytest.raises(ProtocolError, match="frames hold"):
        reader.next()
    assert reader.buffered == 0
    with pytest.raises(ProtocolError):
        reader.feed(b"x")  # broken for good


def test_a_request_of_exactly_the_limit_is_read() -> None:
    value = {"id": 1, "op": "send", "to": "bob", "text": ""}
    padding = MAX_REQUEST_BYTES - len(msgpack.packb(value, use_bin_type=True)) - 4  # fixstr header -> str32: +4
    value["text"] = "x" * padding
    frame = encode_frame(value, MAX_REQUEST_BYTES)
    assert len(frame) == 4 + MAX_REQUEST_BYTES
    reader = FrameReader(MAX_REQUEST_BYTES)
    reader.feed(frame)
    assert reader.next() == value
    with pytest.raises(ValueError, match="over the"):
        encode_frame({**value, "text": value["text"] + "y"}, MAX_REQUEST_BYTES)


def test_a_maximal_message_fits_a_send_request() -> None:
    text = "é" * (MAX_TEXT_BYTES // 2)
    frame = encode_frame({"id": 2**53, "op": "send", "to": "x" * 128, "text": text}, MAX_REQUEST_BYTES)
    assert len(frame) <= 4 + MAX_REQUEST_BYTES


def test_a_full_history_reply_fits_the_reply_limit() -> None:
    message = {
        "id": "00" * 16,
        "direction": "out",
        "from": "x" * 64,
        "to": "y" * 64,
        "from_address": "p" * 63,
        "to_address": "q" * 63,
        "text": "z" * MAX_TEXT_BYTES,
        "sent_at": "2026-01-01T00:00:00.000Z",
        "received_at": "2026-01-01T00:00:00.000Z",
        "state": "delivered",
        "replicas": 20,
        "reason": None,
    }
    encode_frame({"id": 1, "ok": True, "messages": [message] * MAX_HISTORY_ITEMS}, MAX_REPLY_BYTES)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack(">I", 0), "frames hold"),
        (_frame([1, 2]), "not a map"),
        (struct.pack(">I", 2) + b"\xc1\xc1", "malformed msgpack"),
        (struct.pack(">I", 5) + msgpack.packb({"a": 1}) + b"\x00", "malformed msgpack"),  # trailing bytes
    ],
)
def test_broken_frames_are_protocol_errors(data: bytes, reason: str) -> None:
    reader = FrameReader(MAX_REQUEST_BYTES)
    reader.feed(data)
    with pytest.raises(ProtocolError, match=reason):
        reader.next()


def test_a_stream_ending_inside_a_frame_is_refused() -> None:
    reader = FrameReader(MAX_REQUEST_BYTES)
    reader.feed(_frame({"id": 1})[:-1])
    assert reader.next() is None
    with pytest.raises(ProtocolError, match="ended inside a frame"):
        reader.feed_eof()


# --- requests -------------------------------------------------------------------------------------------------


def test_valid_requests_parse() -> None:
    assert parse_request({"id": 0, "op": "status"}).args == {}
    assert parse_request({"id": 1, "op": "send", "to": "bob", "text": "hi"}).args == {"to": "bob", "text": "hi"}
    assert parse_request({"id": 2, "op": "message", "message_id": "ab" * 16}).args == {"message_id": b"\xab" * 16}
    assert parse_request({"id": 3, "op": "history", "peer": None}).args == {"peer": None, "limit": None}
    assert parse_request({"id": 4, "op": "history", "peer": "bob", "limit": 5}).args == {"peer": "bob", "limit": 5}


@pytest.mark.parametrize(
    ("request_value", "reason"),
    [
        ({"op": "status"}, "'id' must be"),
        ({"id": True, "op": "status"}, "'id' must be"),
        ({"id": -1, "op": "status"}, "'id' must be"),
        ({"id": 2**53 + 1, "op": "status"}, "'id' must be"),
        ({"id": 1, "op": "shutdown"}, "unknown op"),
        ({"id": 1, "op": "send", "to": "bob"}, "'text' must be"),
        ({"id": 1, "op": "send", "to": "", "text": "x"}, "'to' must be"),
        ({"id": 1, "op": "send", "to": "b" * 129, "text": "x"}, "'to' must be"),
        ({"id": 1, "op": "send", "to": "bob", "text": "x", "ttl": 5}, "takes no 'ttl'"),
        ({"id": 1, "op": "message", "message_id": "zz" * 16}, "hexadecimal"),
        ({"id": 1, "op": "message", "message_id": b"\x00" * 16}, "hexadecimal"),
        ({"id": 1, "op": "history", "peer": "bob", "limit": -1}, "'limit' must be"),
        ({"id": 1, "op": "status", "extra": 1}, "takes no 'extra'"),
    ],
)
def test_invalid_requests_are_refused_with_a_reason(request_value: dict[str, Any], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_request(request_value)


# --- the server -----------------------------------------------------------------------------------------------


class FakeService:
    """Answers like a ChatService, without a node."""

    def __init__(self) -> None:
        self.inner = ChatService.__new__(ChatService)
        ChatService.__init__(self.inner, None, None)  # type: ignore[arg-type]  # the fan-out needs no node

    def status(self) -> dict[str, Any]:
        return {"running": True}

    def send(self, to: str, text: str) -> dict[str, Any]:
        if to != "bob":
            raise UserError(f"unknown contact {to!r}")
        return {"id": "00" * 16, "to": to, "text": text, "state": "queued"}

    def message(self, message_id: bytes) -> dict[str, Any]:
        return {"id": message_id.hex()}

    def history(self, peer: str | None, limit: int) -> list[dict[str, Any]]:
        return [{"peer": peer, "limit": limit}]

    def subscribe(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        return self.inner.subscribe()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    # Short: a Unix socket path has ~100 bytes.
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"p2pc-{os.getpid()}-{tmp_path.name[-12:]}"
    directory.mkdir(mode=0o700)
    yield directory / "control.sock"
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


async def _serve(nursery: trio.Nursery, path: Path, **kwargs: Any) -> tuple[ControlServer, FakeService]:
    service = FakeService()
    server = ControlServer(service, path, **kwargs)  # type: ignore[arg-type]
    await nursery.start(server.run)
    return server, service


async def _raw(path: Path) -> trio.SocketStream:
    return await trio.open_unix_socket(str(path))


async def _read_frame(stream: trio.SocketStream) -> dict[str, Any] | None:
    reader = FrameReader(MAX_REPLY_BYTES)
    while (value := reader.next()) is None:
        data = await stream.receive_some(65536)
        if not data:
            return None
        reader.feed(data)
    return value


async def test_requests_are_answered_and_refusals_keep_the_connection(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await _serve(nursery, socket_path)
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == SOCKET_MODE
        with trio.fail_after(DEADLINE):
            async with await ControlClient.connect(socket_path) as client:
                assert (await client.request("status"))["running"] is True
                reply = await client.request("send", to="bob", text="hi")
                assert reply["message"]["state"] == "queued"
                with pytest.raises(UserError, match="unknown contact 'carol'"):
                    await client.request("send", to="carol", text="hi")
                with pytest.raises(UserError, match="unknown op"):
                    await client.request("reboot")
                assert (await client.request("history", peer="bob", limit=3))["messages"] == [
                    {"peer": "bob", "limit": 3}
                ]
        nursery.cancel_scope.cancel()
    assert not socket_path.exists()  # removed on shutdown


async def test_an_oversized_request_is_answered_and_the_connection_closed(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        server, _ = await _serve(nursery, socket_path)
        with trio.fail_after(DEADLINE):
            stream = await _raw(socket_path)
            await stream.send_all(struct.pack(">I", MAX_REQUEST_BYTES + 1))
            reply = await _read_frame(stream)
            assert reply is not None and reply["ok"] is False and "bad frame" in reply["error"]
            assert await _read_frame(stream) is None  # closed
            assert server.stats.bad_frames == 1
        nursery.cancel_scope.cancel()


async def test_the_client_after_max_clients_is_refused(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        server, _ = await _serve(nursery, socket_path)
        with trio.fail_after(DEADLINE):
            clients = [await ControlClient.connect(socket_path) for _ in range(MAX_CLIENTS)]
            for client in clients:  # each is being served
                await client.request("status")
            extra = await _raw(socket_path)
            reply = await _read_frame(extra)
            assert reply is not None and "serves 32 clients at once" in reply["error"]
            assert server.stats.refused_clients == 1
            await clients[0].aclose()
            while server.clients == MAX_CLIENTS:
                await trio.sleep(0.01)
            async with await ControlClient.connect(socket_path) as again:
                await again.request("status")
            for client in clients[1:]:
                await client.aclose()
        nursery.cancel_scope.cancel()


async def test_events_reach_subscribers_after_the_reply(socket_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _, service = await _serve(nursery, socket_path)
        with trio.fail_after(DEADLINE):
            async with await ControlClient.connect(socket_path) as client:
                await client.subscribe()
                while service.inner.subscribers == 0:
                    await trio.sleep(0.01)
                service.inner.publish({"event": "message", "message": {"text": "one"}})
                service.inner.publish({"event": "delivery", "message": {"state": "sent"}})
                assert (await client.next_event())["message"] == {"text": "one"}
                assert (await client.request("status"))["running"] is True  # requests still work
                assert (await client.next_event())["message"] == {"state": "sent"}
                with pytest.raises(UserError, match="subscribed already"):
                    await client.subscribe()
        nursery.cancel_scope.cancel()


def test_a_subscriber_that_falls_behind_is_cut_off() -> None:
    service = ChatService(None, None)  # type: ignore[arg-type]  # the fan-out needs no node
    slow = service.subscribe()
    for i in range(SUBSCRIBER_QUEUE):
        service.publish({"event": "message", "n": i})
    assert service.subscribers == 1
    service.publish({"event": "message", "n": SUBSCRIBER_QUEUE})
    assert service.subscribers == 0 and service.stats.subscribers_cut_off == 1
    received = [slow.receive_nowait()["n"] for _ in range(SUBSCRIBER_QUEUE)]
    assert received == list(range(SUBSCRIBER_QUEUE))
    with pytest.raises(trio.EndOfChannel):
        slow.receive_nowait()


def test_subscribers_are_bounded() -> None:
    service = ChatService(None, None)  # type: ignore[arg-type]
    streams = [service.subscribe() for _ in range(MAX_SUBSCRIBERS)]
    with pytest.raises(UserError, match="event streams are open already"):
        service.subscribe()
    assert service.stats.subscribers_refused == 1
    streams[0].close()
    service.publish({"event": "message"})  # a closed subscriber is dropped on the next event
    service.subscribe()


async def test_no_daemon_means_daemon_not_running(socket_path: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        await ControlClient.connect(socket_path)
    # A stale socket file left by a killed daemon: nobody listens.
    stale = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await stale.bind(str(socket_path))
    stale.close()
    with pytest.raises(DaemonNotRunning):
        await ControlClient.connect(socket_path)
    async with trio.open_nursery() as nursery:
        await _serve(nursery, socket_path)  # the server replaces the stale file
        with trio.fail_after(DEADLINE):
            async with await ControlClient.connect(socket_path) as client:
                await client.request("status")
        nursery.cancel_scope.cancel()
