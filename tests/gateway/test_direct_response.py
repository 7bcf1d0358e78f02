"""A completion's answer written in one piece past uvicorn's `send` (api/direct_response.py):
byte for byte what uvicorn's ASGI path writes, with its keep-alive, close, pipelining and
access-log behaviour."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.api.http_server import GatewayHttpProtocol
from gateway.api.openai_routes import JSONBodyResponse

HEADERS = {"x-gateway-provider": "lepton", "x-gateway-route": "lepton/w", "x-gateway-attempts": "1"}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    response = JSONBodyResponse(b'{"path": "%s"}' % scope["path"].encode(), HEADERS)
    if scope["path"].startswith("/asgi"):  # the ASGI way: a send that is not a cycle's own

        async def plain_send(message: Any) -> None:
            await send(message)

        await response(scope, receive, plain_send)
    else:
        await response(scope, receive, send)


async def start(access_log: bool = False) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        http=GatewayHttpProtocol,
        log_level="info" if access_log else "critical",
        access_log=access_log,
        lifespan="off",
    )
    served = uvicorn.Server(config)
    task = asyncio.create_task(served.serve(sockets=[sock]))
    while not served.started:
        await asyncio.sleep(0.01)
    return served, task, int(sock.getsockname()[1])


@pytest.fixture
async def port() -> AsyncIterator[int]:
    served, task, port = await start()
    yield port
    served.should_exit = True
    await task


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ASGI messages uvicorn's own send() handled."""
    seen: list[str] = []
    original = RequestResponseCycle.send

    async def counting(self: RequestResponseCycle, message: Any) -> None:
        seen.append(message["type"])
        await original(self, message)

    monkeypatch.setattr(RequestResponseCycle, "send", counting)
    return seen


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), 5)  # until the server closes
    finally:
        writer.close()


def without_date(response: bytes) -> bytes:
    return b"\r\n".join(line for line in response.split(b"\r\n") if not line.startswith(b"date:"))


async def test_the_answer_is_what_the_asgi_path_writes_in_one_piece(
    port: int, sends: list[str]
) -> None:
    direct = await exchange(port, b"GET /xxxx HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
    assert sends == []  # uvicorn's send() was not involved
    via_asgi = await exchange(port, b"GET /asgi HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
    assert sends == ["http.response.start", "http.response.body"]
    assert without_date(direct) == without_date(via_asgi).replace(b'"/asgi"', b'"/xxxx"')
    assert direct.startswith(b"HTTP/1.1 200 OK\r\ndate: ")
    assert b"\r\ncontent-length: 17\r\n" in direct and b"\r\nconnection: close\r\n" in direct
    assert direct.endswith(b'\r\n\r\n{"path": "/xxxx"}')


async def test_keep_alive_and_pipelined_requests_each_get_their_answer(
    port: int, sends: list[str]
) -> None:
    raw = b"".join(
        b"POST /%d HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\n\r\n{}" % i for i in range(3)
    )
    answers = await exchange(port, raw + b"GET /last HTTP/1.1\r\nconnection: close\r\n\r\n")
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in answers.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b'{"path": "/0"}', b'{"path": "/1"}', b'{"path": "/2"}', b'{"path": "/last"}']
    assert answers.count(b"connection: close") == 1 and sends == []


async def test_an_http_1_0_request_gets_connection_close(port: int) -> None:
    answer = await exchange(port, b"GET /old HTTP/1.0\r\n\r\n")  # no keep-alive: the server closes
    assert b"\r\nconnection: close\r\n" in answer and answer.endswith(b'{"path": "/old"}')


async def test_a_head_request_goes_the_asgi_way(port: int, sends: list[str]) -> None:
    answer = await exchange(port, b"HEAD /h HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\n")  # no body
    assert sends == ["http.response.start", "http.response.body"]


async def test_the_access_log_has_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    served, task, port = await start(access_log=True)  # uvicorn's handler: stdout
    try:
        await exchange(port, b"GET /logged?q=1 HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
    finally:
        served.should_exit = True
        await task
    assert "127.0.0.1:" in (out := capsys.readouterr().out)
    assert '"GET /logged?q=1 HTTP/1.1" 200' in out, out
