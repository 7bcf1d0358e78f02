"""Http1Transport (the providers' httpx transport) against a scripted server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from providers.http1 import Http1Transport

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Reply], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> Server:
        state = Server(url="")

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                while (request := await read_request(reader)) is not None:
                    state.requests.append(request)
                    await reply(reader, writer)
                    if writer.is_closing():
                        return
                state.closed_by_client.set()
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x"
        return state

    yield start
    for server in servers:
        server.close()


def fixed(body: bytes) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    return reply


async def test_keep_alive_reuses_one_connection(
    serve: Callable[[Reply], Awaitable[Server]],
) -> None:
    server = await serve(fixed(b'{"ok": true}'))
    async with httpx.AsyncClient(transport=Http1Transport()) as client:
        for _ in range(3):
            response = await client.post(server.url, content=b'{"q": 1}')
            assert response.json() == {"ok": True}
    assert server.connections == 1 and len(server.requests) == 3
    assert server.requests[0].startswith(b"POST /v1/x HTTP/1.1\r\n")
    assert server.requests[0].endswith(b'\r\n\r\n{"q": 1}')


async def test_chunked_body_arrives_piece_by_piece(
    serve: Callable[[Reply], Awaitable[Server]],
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")

    server = await serve(reply)
    async with (
        httpx.AsyncClient(transport=Http1Transport()) as client,
        client.stream("POST", server.url, content=b"{}") as response,
    ):
        pieces = [piece async for piece in response.aiter_raw()]
    assert pieces == [b"data: one\n\n", b"data: two\n\n"]


async def test_body_delimited_by_close(serve: Callable[[Reply], Awaitable[Server]]) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    server = await serve(reply)
    async with httpx.AsyncClient(transport=Http1Transport()) as client:
        response = await client.post(server.url, content=b"{}")
        assert response.text == "until the end"
        assert (await client.post(server.url, content=b"{}")).text == "until the end"
    assert server.connections == 2  # "connection: close" is never pooled


async def test_an_idle_connection_the_server_closed_is_not_reused(
    serve: Callable[[Reply], Awaitable[Server]],
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await fixed(b"fine")(reader, writer)
        writer.close()  # a keep-alive timeout on the server's side

    server = await serve(reply)
    async with httpx.AsyncClient(transport=Http1Transport()) as client:
        assert (await client.post(server.url, content=b"{}")).text == "fine"
        await asyncio.sleep(0.05)
        assert (await client.post(server.url, content=b"{}")).text == "fine"
    assert server.connections == 2


async def test_a_truncated_body_is_a_protocol_error(
    serve: Callable[[Reply], Awaitable[Server]],
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
        await writer.drain()
        writer.close()

    server = await serve(reply)
    async with httpx.AsyncClient(transport=Http1Transport()) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(server.url, content=b"{}")


async def test_garbage_is_a_protocol_error(serve: Callable[[Reply], Awaitable[Server]]) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    server = await serve(reply)
    async with httpx.AsyncClient(transport=Http1Transport()) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(server.url, content=b"{}")


async def test_closing_a_response_early_hangs_up(
    serve: Callable[[Reply], Awaitable[Server]],
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # wait for the client to go away

    server = await serve(reply)
    async with (
        httpx.AsyncClient(transport=Http1Transport()) as client,
        client.stream("POST", server.url, content=b"{}") as response,
    ):
        async for piece in response.aiter_raw():
            assert piece == b"first"
            break
    await asyncio.wait_for(server.closed_by_client.wait(), 2)


async def test_the_pool_bounds_open_connections(
    serve: Callable[[Reply], Awaitable[Server]],
) -> None:
    server = await serve(fixed(b"x"))
    transport = Http1Transport(max_connections=1)
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5, pool=0.1)) as client:
        async with client.stream("POST", server.url, content=b"{}"):
            with pytest.raises(httpx.PoolTimeout):
                await client.post(server.url, content=b"{}")  # the one slot is taken
        assert (await client.post(server.url, content=b"{}")).text == "x"  # released


async def test_a_pooled_connection_closed_as_it_is_reused_is_retried_afresh(
    serve: Callable[[Reply], Awaitable[Server]],
) -> None:
    answered: list[int] = []

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(answered) == 1 and len(server.requests) == 2:
            writer.close()  # the keep-alive race: the second request meets a closing socket
            return
        answered.append(1)
        await fixed(b"ok")(reader, writer)

    server = await serve(reply)
    async with httpx.AsyncClient(transport=Http1Transport()) as client:
        assert (await client.post(server.url, content=b"{}")).text == "ok"
        assert (await client.post(server.url, content=b"{}")).text == "ok"
    assert server.connections == 2 and len(server.requests) == 3


async def test_a_fresh_connection_closed_without_an_answer_is_an_error(
    serve: Callable[[Reply], Awaitable[Server]],
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await serve(reply)
    async with httpx.AsyncClient(transport=Http1Transport()) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(server.url, content=b"{}")
    assert len(server.requests) == 1  # not retried: the server saw it and said nothing
