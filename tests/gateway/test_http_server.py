"""`gateway serve`'s HTTP protocol (gateway/api/http_server.py): writes coalesced per loop step."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from gateway.api.http_server import CoalescingTransport, GatewayHttpProtocol


class RecordingTransport:
    """The socket side: what reached it, in which calls."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1234)}.get(name, default)


async def turn() -> None:
    """Let the loop run what is queued now (the transport's flush)."""
    await asyncio.sleep(0)


async def test_writes_in_one_step_reach_the_socket_as_one_write() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(bytearray(b"o"))
    transport.write(b"")  # nothing to send: no effect
    transport.writelines([memoryview(b"k")])
    assert raw.writes == [] and transport.get_write_buffer_size() == 40
    await turn()
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    transport.write(b"next")
    await turn()
    assert raw.writes[1:] == [b"next"]  # a later step: its own write


async def test_close_sends_what_was_written_first_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, loop)  # type: ignore[arg-type]
    transport.write(b"last words")
    transport.close()
    assert raw.writes == [b"last words"] and raw.closing
    await turn()
    assert raw.writes == [b"last words"]  # the queued flush found nothing more

    raw = RecordingTransport()
    transport = CoalescingTransport(raw, loop)  # type: ignore[arg-type]
    transport.write(b"never")
    transport.abort()
    await turn()
    assert raw.writes == [] and raw.aborted


async def test_nothing_is_written_to_a_socket_already_closing() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"too late")
    raw.closing = True  # the peer went away meanwhile
    await turn()
    assert raw.writes == []
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)  # the rest delegates


# -- served by uvicorn with the protocol, over a real socket ------------------------------------


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/stream":
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"path": "%s"}' % scope["path"].encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def server() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=GatewayHttpProtocol, log_level="critical", access_log=False, lifespan="off"
    )
    served = uvicorn.Server(config)
    task = asyncio.create_task(served.serve(sockets=[sock]))
    while not served.started:
        await asyncio.sleep(0.01)
    yield int(sock.getsockname()[1])
    served.should_exit = True
    await task


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


async def test_keep_alive_answers_each_request_whole(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    for path in (b"/a", b"/b"):
        writer.write(b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % path)
        head, body = await asyncio.wait_for(read_response(reader), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert body == b'{"path": "%s"}' % path
    writer.close()


async def test_a_closing_connection_gets_its_whole_answer_before_the_close(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET /bye HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    everything = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    assert everything.startswith(b"HTTP/1.1 200 OK\r\n")
    assert everything.endswith(b'\r\n\r\n{"path": "/bye"}')
    writer.close()


async def test_stream_events_leave_as_they_are_produced(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    started = time.monotonic()
    await asyncio.wait_for(reader.readuntil(b"data: one\n\n"), 5)
    first_at = time.monotonic() - started
    await asyncio.wait_for(reader.readuntil(b"data: two\n\n"), 5)
    second_at = time.monotonic() - started
    assert first_at < 0.4 <= second_at  # the first event did not wait for the second
    writer.close()
