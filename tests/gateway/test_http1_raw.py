"""Http1Transport's own interface (what the providers use): encoded requests, Http1Response."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import httpx
import pytest

from providers.http1 import Http1Transport, origin_of, request_head
from tests.gateway.test_http1 import Reply, Server, fixed, serve  # noqa: F401 (the fixture)

HEADERS = [(b"Authorization", b"Bearer k"), (b"content-type", b"application/json")]


def encoded(url: str, body: bytes, headers: list[tuple[bytes, bytes]] = HEADERS) -> bytes:
    return request_head("POST", httpx.URL(url), headers) + b"content-length: %d\r\n\r\n" % len(body)


def test_request_head_puts_host_first_and_leaves_framing_to_the_caller() -> None:
    url = httpx.URL("http://127.0.0.1:8080/v1/chat/completions?x=1")
    head = request_head("POST", url, [*HEADERS, (b"Content-Length", b"99")])
    assert head == (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8080\r\n"
        b"Authorization: Bearer k\r\n"
        b"content-type: application/json\r\n"
    )
    assert origin_of(httpx.URL("https://api.example/v1")) == (b"https", "api.example", 443)
    with pytest.raises(httpx.UnsupportedProtocol):
        origin_of(httpx.URL("ftp://example/x"))


async def test_a_request_goes_out_in_one_piece_and_its_body_reads_whole(
    serve: Callable[[Reply], Awaitable[Server]],  # noqa: F811
) -> None:
    server = await serve(fixed(b'{"ok": true}'))
    url = httpx.URL(server.url)
    transport = Http1Transport()
    try:
        for _ in range(2):
            response = await transport.request(
                origin_of(url), encoded(server.url, b"{}"), b"{}", read_timeout=2
            )
            assert response.status == 200 and response.header(b"content-length") == "12"
            assert response.header(b"x-missing") is None
            await asyncio.sleep(0.05)  # the body is in by now
            assert response.complete and response.ready
            assert await response.aread() == b'{"ok": true}'
    finally:
        await transport.aclose()
    assert server.connections == 1  # released to the pool after each read
    assert server.requests[0] == encoded(server.url, b"{}") + b"{}"


async def test_pieces_arrive_as_sent_and_none_marks_the_end(
    serve: Callable[[Reply], Awaitable[Server]],  # noqa: F811
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()

    server = await serve(reply)
    transport = Http1Transport()
    try:
        response = await transport.request(
            origin_of(httpx.URL(server.url)), encoded(server.url, b""), b""
        )
        assert await response.next_bytes() == b"first"
        assert not response.ready  # the rest is 0.2 s away: a read now would wait
        assert await response.next_bytes() == b"second"
        assert await response.next_bytes() is None
    finally:
        await transport.aclose()


async def test_a_compressed_body_is_decoded_although_identity_was_asked(
    serve: Callable[[Reply], Awaitable[Server]],  # noqa: F811
) -> None:
    packed = gzip.compress(b'{"choices": []}')

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s"
            % (len(packed), packed)
        )
        await writer.drain()

    server = await serve(reply)
    transport = Http1Transport()
    try:
        origin, head = origin_of(httpx.URL(server.url)), encoded(server.url, b"")
        response = await transport.request(origin, head, b"")
        assert await response.aread() == b'{"choices": []}'
        response = await transport.request(origin, head, b"")
        pieces = []
        while (piece := await response.next_bytes()) is not None:
            pieces.append(piece)
        assert b"".join(pieces) == b'{"choices": []}'
    finally:
        await transport.aclose()


async def test_the_pool_timeout_applies_only_when_the_pool_is_full(
    serve: Callable[[Reply], Awaitable[Server]],  # noqa: F811
) -> None:
    server = await serve(fixed(b"x"))
    origin, head = origin_of(httpx.URL(server.url)), encoded(server.url, b"")
    transport = Http1Transport(max_connections=1)
    try:
        held = await transport.request(origin, head, b"", pool_timeout=0.1)
        with pytest.raises(httpx.PoolTimeout):
            await transport.request(origin, head, b"", pool_timeout=0.1)
        await held.aclose()
        again = await transport.request(origin, head, b"", pool_timeout=0.1)
        assert await again.aread() == b"x"
    finally:
        await transport.aclose()
