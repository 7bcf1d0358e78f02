"""The fakes' hostile faults: answers that are too big, too slow, or not what was asked.

Each applies to one request, like the faults in upstream.py (`Fault(kind, size=...)`):

    trickle              a stream whose content chunks keep coming, every `interval_s`, each
                         within the gap limit, and never end (the request's deadline must)
    wrong_content_type   200 with an HTML page, to a stream or a JSON request alike
    oversized_body       200 with a JSON answer of `size` bytes
    oversized_headers    200 whose headers take `size` bytes
    oversized_line       a stream whose first event is one line of `size` bytes
    gzip_bomb            Content-Encoding: gzip, a small body inflating to `size` bytes
    echo_key             a normal answer whose text repeats the Authorization header it got

Big bodies are sent in 1 MiB pieces (the fake holds no more than that per send), and the
gzip bomb is built once per size.
"""

from __future__ import annotations

import asyncio
import functools
import json
import zlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.upstream import Fault, _Handler

HOSTILE_KINDS = (
    "trickle",
    "wrong_content_type",
    "oversized_body",
    "oversized_headers",
    "oversized_line",
    "gzip_bomb",
    "echo_key",
)
_PIECE = 1 << 20


@functools.cache
def gzip_bomb(size: int) -> bytes:
    """`size` bytes of a JSON-looking answer, gzip-compressed (about 1000:1), built 1 MiB at a
    time (a 500 MB bomb never exists inflated here)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [packer.compress(b'{"choices": [{"text": "')]
    spaces = b" " * _PIECE
    for start in range(0, size, _PIECE):
        out.append(packer.compress(spaces[: min(_PIECE, size - start)]))
    out.append(packer.compress(b'"}]}') + packer.flush())
    return b"".join(out)


async def serve(h: _Handler, body: dict[str, Any], fault: Fault) -> None:
    stream = bool(body.get("stream"))
    kind = fault.kind
    if kind == "trickle":
        return await _trickle(h, body, fault)
    if kind == "wrong_content_type":
        page = b"<html><body>502 Bad Gateway (cloudflare)</body></html>"
        return await _answer(h, [(b"content-type", b"text/html")], page)
    if kind == "oversized_body":
        return await _answer(h, [(b"content-type", b"application/json")], None, fault.size)
    if kind == "oversized_headers":
        count = max(1, fault.size // 1024)
        filler = [(b"x-filler-%d" % i, b"f" * 1000) for i in range(count)]
        kind_header = b"text/event-stream" if stream else b"application/json"
        return await _answer(h, [(b"content-type", kind_header), *filler], b"{}")
    if kind == "oversized_line":
        head = [(b"content-type", b"text/event-stream")]
        await h.send({"type": "http.response.start", "status": 200, "headers": head})
        await _pieces(h, b'data: {"choices": [{"index": 0, "delta": {"content": "', fault.size)
        return await h.stall()
    if kind == "gzip_bomb":
        kind_header = b"text/event-stream" if stream else b"application/json"
        head = [(b"content-type", kind_header), (b"content-encoding", b"gzip")]
        return await _answer(h, head, gzip_bomb(fault.size))
    if kind == "echo_key":
        key = dict(h.scope["headers"]).get(b"authorization", b"").decode()
        h.p.tokens = ["you sent ", key, " ok"]
        if stream:
            return await h._stream(body, None)
        return await h._complete(body, None)
    raise ValueError(kind)


async def _answer(
    h: _Handler, headers: list[tuple[bytes, bytes]], raw: bytes | None, size: int = 0
) -> None:
    length = len(raw) if raw is not None else size
    head = [*headers, (b"content-length", str(length).encode())]
    await h.send({"type": "http.response.start", "status": 200, "headers": head})
    if raw is not None:
        await h.send({"type": "http.response.body", "body": raw})
        return
    await _pieces(h, b"", size)
    await h.send({"type": "http.response.body", "body": b""})


async def _pieces(h: _Handler, first: bytes, size: int) -> None:
    """`first`, then spaces up to `size` bytes, 1 MiB per send, until the client hangs up."""
    sent = 0
    chunk = first
    while sent < size and not h.gone.is_set():
        piece = chunk + b" " * min(_PIECE, size - sent - len(chunk))
        await h.send({"type": "http.response.body", "body": piece, "more_body": True})
        sent += len(piece)
        chunk = b""
        await asyncio.sleep(0)


async def _trickle(h: _Handler, body: dict[str, Any], fault: Fault) -> None:
    head = [(b"content-type", b"text/event-stream")]
    await h.send({"type": "http.response.start", "status": 200, "headers": head})
    chat = "messages" in body
    n = 0
    while not h.gone.is_set():
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": f"{n} "}}
        else:
            choice = {"index": 0, "text": f"{n} "}
        event = {"id": "trickle", "object": "chunk", "choices": [choice]}
        await h.send(
            {
                "type": "http.response.body",
                "body": h.p.encode_event(json.dumps(event)),
                "more_body": True,
            }
        )
        n += 1
        await h.hung_up_within(fault.interval_s)
    h.p._hung_up()
