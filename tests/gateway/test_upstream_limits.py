"""What an upstream may make the gateway hold: head, body, decompressed body, one stream event;
and usage counting that stays bounded and off the event loop when an upstream reports none."""

from __future__ import annotations

import asyncio
import gzip
import threading
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from gateway.accounting import Accountant, ServedText, Settled, client_usage
from providers.http1 import Http1Transport, UpstreamLimitExceeded, origin_of
from providers.http1_decode import BoundedDecoder
from providers.sse import EventTooLarge, SSEDecoder
from tests.gateway.test_http1 import Reply, Server, serve  # noqa: F401 (the fixture)
from tests.gateway.test_http1_raw import encoded

# -- the SSE decoder ----------------------------------------------------------------------------


def test_an_event_over_the_limit_is_refused_before_it_is_held() -> None:
    decoder = SSEDecoder(max_event_bytes=1024)
    assert decoder.feed(b"data: " + b"x" * 1000) == []
    with pytest.raises(EventTooLarge):
        decoder.feed(b"x" * 100)  # the line goes on past the limit, no end in sight
    decoder = SSEDecoder(max_event_bytes=1024)
    with pytest.raises(EventTooLarge):  # many short data lines of one event count together
        decoder.feed(b"data: " + b"y" * 600 + b"\ndata: " + b"y" * 600 + b"\n")
    decoder = SSEDecoder(max_event_bytes=1024)
    with pytest.raises(EventTooLarge):  # a whole event in one read, the decoder's short way
        decoder.feed(b"data: " + b"z" * 2000 + b"\n\n")


def test_a_line_split_into_many_reads_is_joined_once() -> None:
    decoder = SSEDecoder(max_event_bytes=1 << 20)
    payload = b'{"choices": [{"text": "' + b"z" * 200_000 + b'"}]}'
    wire = b"data: " + payload + b"\r\n\r\n"
    events: list[bytes] = []
    for i in range(0, len(wire), 7):  # 7-byte reads, CR LF split across two of them too
        events += decoder.feed(wire[i : i + 7])
        assert len(decoder._pending) <= i // 7 + 1  # pieces kept, never re-joined per read
        if b"\r" not in wire[: i + 7]:  # still the one unterminated line: a piece per read
            assert len(decoder._pending) == i // 7 + 1
    assert events == [payload]


def test_events_under_the_limit_parse_as_before() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    out = decoder.feed(b": keep-alive\n\ndata: a\ndata: b\n\nevent: error\ndata: {}\n\n")
    assert out == [b"a\nb", b'{"error": {}}']
    assert decoder.feed(b"data: tail") == [] and decoder.close() == [b"tail"]


# -- bounded decompression ---------------------------------------------------------------------


def test_a_gzip_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))
    assert len(bomb) < 100_000
    decoder = BoundedDecoder("gzip", 1 << 20)
    with pytest.raises(UpstreamLimitExceeded):
        decoder.decode(bomb)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
def test_bodies_within_the_limit_decode_whole_and_in_pieces(encoding: str) -> None:
    data = b'{"choices": []}' * 1000
    if encoding == "gzip":
        packed = gzip.compress(data)
    elif encoding == "deflate":
        packed = zlib.compress(data)
    else:
        raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        packed = raw.compress(data) + raw.flush()
    name = "deflate" if encoding == "raw-deflate" else encoding
    decoder = BoundedDecoder(name, len(data))
    assert decoder.decode(packed) + decoder.flush() == data
    decoder = BoundedDecoder(name, len(data))
    pieces = [decoder.decode(packed[i : i + 100]) for i in range(0, len(packed), 100)]
    assert b"".join(pieces) + decoder.flush() == data


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, br"])
def test_encodings_we_never_asked_for_are_refused(encoding: str) -> None:
    with pytest.raises(UpstreamLimitExceeded):
        BoundedDecoder(encoding, 1 << 20).decode(b"\x1f\x8b anything")


# -- the transport's limits --------------------------------------------------------------------


async def exchange(server: Server, **limits: Any) -> bytes:
    transport = Http1Transport(max_header_bytes=limits.pop("max_header_bytes", 64 * 1024))
    try:
        url = httpx.URL(server.url)
        response = await transport.request(origin_of(url), encoded(server.url, b""), b"", **limits)
        return await response.aread()
    finally:
        await transport.aclose()


def replying(data: bytes) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return reply


async def test_response_headers_over_the_limit_drop_the_connection(
    serve: Callable[[Reply], Awaitable[Server]],  # noqa: F811
) -> None:
    filler = b"".join(b"x-filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(40))
    head = b"HTTP/1.1 200 OK\r\n" + filler + b"content-length: 2\r\n\r\n{}"
    with pytest.raises(UpstreamLimitExceeded, match="headers"):
        await exchange(await serve(replying(head)), max_header_bytes=16 * 1024)
    assert await exchange(await serve(replying(head)), max_header_bytes=64 * 1024) == b"{}"


async def test_a_body_over_the_limit_drops_the_connection(
    serve: Callable[[Reply], Awaitable[Server]],  # noqa: F811
) -> None:
    body = b" " * (300 * 1024)
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    with pytest.raises(UpstreamLimitExceeded, match="body"):
        await exchange(await serve(replying(reply)), max_body_bytes=256 * 1024)
    assert len(await exchange(await serve(replying(reply)), max_body_bytes=512 * 1024)) == len(body)


async def test_a_compressed_body_is_bounded_by_its_decoded_size(
    serve: Callable[[Reply], Awaitable[Server]],  # noqa: F811
) -> None:
    bomb = gzip.compress(b" " * (16 << 20))
    reply = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s" % (
        len(bomb),
        bomb,
    )
    with pytest.raises(UpstreamLimitExceeded, match="decompressed"):
        await exchange(await serve(replying(reply)), max_decoded_bytes=1 << 20)


# -- counting usage an upstream did not report --------------------------------------------------


class RecordingCounter:
    def __init__(self) -> None:
        self.texts: list[int] = []
        self.threads: set[int] = set()

    def count(self, model: Any, body: dict[str, Any], endpoint: str) -> int:
        self.threads.add(threading.get_ident())
        return 7

    def count_text(self, model: Any, text: str) -> int:
        self.threads.add(threading.get_ident())
        self.texts.append(len(text))
        return len(text) // 4


class Stats:
    def record_usage(self, usage: Any) -> None: ...


async def test_a_huge_answer_is_counted_from_a_sample_off_the_event_loop() -> None:
    counter = RecordingCounter()
    accountant = Accountant(None, Stats(), counter, max_count_chars=64 * 1024)  # type: ignore[arg-type]
    served = ServedText(accountant.max_count_chars)
    for _ in range(600):  # 60 MB, as a cut stream of 100 KB chunks
        served.add("abcd" * 25_000)
    assert served.total == 60_000_000 and len(served.sample) == 64 * 1024
    body = {"messages": [{"role": "user", "content": "hi"}]}
    prompt, completion, counted = await accountant.acounts(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,
        body,
        "chat",
        served,
    )
    assert counted and prompt == 7
    assert counter.texts == [64 * 1024]  # only the sample was tokenized...
    assert completion == 15_000_000  # ...and the rest extrapolated at its ratio
    assert threading.get_ident() not in counter.threads  # never on the event loop's thread


async def test_reported_usage_is_used_as_is_and_never_counted() -> None:
    counter = RecordingCounter()
    accountant = Accountant(None, Stats(), counter)  # type: ignore[arg-type]
    usage = {"prompt_tokens": 3, "completion_tokens": 4}
    result = await accountant.acounts(None, None, usage, {}, "chat", "text")  # type: ignore[arg-type]
    assert result == (3, 4, False) and not counter.threads


def test_counted_usage_is_flagged_estimated_for_the_client() -> None:
    assert client_usage(None, Settled(10, 20, 0.5, True))["estimated"] is True
    assert "estimated" not in client_usage({"prompt_tokens": 1}, Settled(1, 2, 0.1, False))
