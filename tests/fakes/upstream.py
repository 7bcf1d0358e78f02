"""Fake upstream providers: real HTTP on 127.0.0.1, one OpenAI-compatible API per provider.

    fakes = FakeUpstreams(["lepton", "novita", "openrouter", "deepinfra"]).start()
    fakes.base_url("deepinfra")            # http://127.0.0.1:PORT/deepinfra/v1
    fakes["lepton"].inject(Fault("http_429", retry_after="1"), times=2)  # the next two: 429
    fakes["lepton"].served                 # Served(requests, prompt_tokens, completion_tokens)
    fakes.stop()

All fakes share one uvicorn server (its own thread and event loop) and are told apart by the
first path segment. Each speaks its provider's dialect: OpenRouter sends ": OPENROUTER
PROCESSING" comments and `usage.cost`, Novita ends SSE lines with CRLF, Lepton splits each
event's JSON over two `data:` lines, and DeepInfra answers "Hello!" with the sample responses
from its model page (seeds/003: the body with `usage.estimated_cost`; the stream " ", " Hi",
"!", "", "</s>", then the finish chunk).

Faults are queued per provider, one request each (`Fault`). A request is served (counted) when
the fake sent its usage; `disconnects` counts requests whose client hung up first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.deepinfra_samples import (
    DEEPINFRA_SAMPLE_BODY,
    DEEPINFRA_SAMPLE_PROMPT_TOKENS,
    DEEPINFRA_SAMPLE_STREAM,
)
from tests.fakes.hostile import HOSTILE_KINDS
from tests.fakes.hostile import serve as serve_hostile
from tests.fakes.server import ServerThread, read_body, send_json

FAULT_KINDS = (
    "http_500",  # 500 with an error body that echoes our key (the gateway must redact it)
    "http_429",  # 429 with Retry-After (seconds or an HTTP date)
    "http_401",  # the key is refused
    "http_400",  # the request is refused as invalid
    "stall_headers",  # accept the request, never answer
    "stall_first_token",  # send 200 + headers (and a role chunk), then nothing
    "cut_before_first",  # headers + role chunk, then drop the connection
    "cut_after_first",  # `after` content chunks, then drop the connection
    "stall_after_first",  # `after` content chunks, then nothing
    "malformed",  # a body / first event that is not JSON
    "malformed_after_first",  # `after` content chunks, then an event that is not JSON
    "no_usage",  # a normal answer that reports no usage (even when asked)
    *HOSTILE_KINDS,  # too big, too slow, not what was asked (hostile.py)
    "no_role_chunk",  # a stream that starts with content: no {"role": "assistant"} delta
)


@dataclass(frozen=True)
class Fault:
    kind: str
    retry_after: str | None = None  # http_429: the header value
    after: int = 1  # *_after_first: content chunks sent before the fault
    size: int = 0  # hostile.py's oversized_* and gzip_bomb: bytes
    interval_s: float = 0.1  # trickle: between two chunks

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}")


@dataclass
class Served:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class FakeProvider:
    name: str
    tokens: list[str] = field(default_factory=list)  # the reply, one stream chunk each
    chunk_delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)  # {"path", "headers", "body"}
    served: Served = field(default_factory=Served)
    disconnects: int = 0
    faults: deque[Fault] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.tokens = ["Hello", " from", f" {self.name}", "!"]
            self.chunk_delay_s = 0.0
            self.requests = []
            self.served = Served()
            self.disconnects = 0
            self.faults = deque()

    def inject(self, fault: Fault, times: int = 1) -> None:
        with self._lock:
            self.faults.extend([fault] * times)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self.faults.popleft() if self.faults else None

    def _count(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.served.requests += 1
            self.served.prompt_tokens += prompt
            self.served.completion_tokens += completion

    def _hung_up(self) -> None:
        with self._lock:
            self.disconnects += 1

    # -- the dialect ----------------------------------------------------------------------

    def encode_event(self, data: str) -> bytes:
        if self.name == "novita":
            return f"data: {data}\r\n\r\n".encode()
        if self.name == "lepton" and data.startswith("{") and len(data) > 8:
            half = data.find(",") + 1 or len(data) // 2  # JSON over two data lines (joined by "\n")
            return f"data: {data[:half]}\ndata: {data[half:]}\n\n".encode()
        return f"data: {data}\n\n".encode()

    def keepalive(self) -> bytes:
        return b": OPENROUTER PROCESSING\n\n" if self.name == "openrouter" else b""


def prompt_tokens_of(body: dict[str, Any]) -> int:
    """The fake's own prompt count: words of every message (or of the prompt) + 3 per message."""
    if "messages" in body:
        messages = body.get("messages") or []
        words = sum(len(str(m.get("content") or "").split()) for m in messages)
        return words + 3 * len(messages)
    prompt = body.get("prompt")
    return len(prompt.split()) + 1 if isinstance(prompt, str) else 1


def _is_deepinfra_hello(provider: FakeProvider, body: dict[str, Any]) -> bool:
    messages = body.get("messages")
    return (
        provider.name == "deepinfra"
        and isinstance(messages, list)
        and len(messages) == 1
        and messages[0].get("content") == "Hello!"
    )


class _Handler:
    """One request to one fake provider."""

    def __init__(self, provider: FakeProvider, scope: dict[str, Any], receive: Any, send: Any):
        self.p = provider
        self.scope = scope
        self.receive = receive
        self.send = send
        self.gone = asyncio.Event()

    async def watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                return

    async def stall(self) -> None:
        """Wait for the client to hang up (the gateway's timeout), and count it."""
        await self.gone.wait()
        self.p._hung_up()

    async def hung_up_within(self, seconds: float) -> bool:
        """Wait `seconds` (the fake's generation time); True, counted, if the client left."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gone.wait(), seconds)
        if self.gone.is_set():
            self.p._hung_up()
            return True
        return False

    async def run(self, body: dict[str, Any], fault: Fault | None) -> None:
        watcher = asyncio.ensure_future(self.watch())
        try:
            await self._run(body, fault)
        finally:
            watcher.cancel()

    async def _run(self, body: dict[str, Any], fault: Fault | None) -> None:
        kind = fault.kind if fault else None
        if kind == "http_500":
            key = dict(self.scope["headers"]).get(b"authorization", b"").decode()
            error = {"error": {"message": f"internal error while serving {key}", "type": "server"}}
            return await send_json(self.send, 500, error)
        if kind == "http_429":
            retry_after = fault.retry_after if fault else None
            headers = ((b"retry-after", retry_after.encode()),) if retry_after else ()
            return await send_json(self.send, 429, {"error": {"message": "rate limited"}}, headers)
        if kind == "http_401":  # echoes the key it refused, as some providers do
            key = dict(self.scope["headers"]).get(b"authorization", b"").decode()
            error = {"error": {"message": f"invalid api key: {key}", "type": "auth"}}
            return await send_json(self.send, 401, error)
        if kind == "http_400":
            return await send_json(self.send, 400, {"error": {"message": "bad parameter: foo"}})
        if kind == "stall_headers":
            return await self.stall()
        if fault is not None and kind in HOSTILE_KINDS:
            return await serve_hostile(self, body, fault)
        if body.get("stream"):
            return await self._stream(body, fault)
        return await self._complete(body, fault)

    async def _complete(self, body: dict[str, Any], fault: Fault | None) -> None:
        kind = fault.kind if fault else None
        if kind == "stall_first_token":
            head = [(b"content-type", b"application/json")]
            await self.send({"type": "http.response.start", "status": 200, "headers": head})
            return await self.stall()
        if kind == "malformed":
            return await send_json(self.send, 200, b'{"id": "x", "choices": [')
        if _is_deepinfra_hello(self.p, body):
            data = json.loads(json.dumps(DEEPINFRA_SAMPLE_BODY))
        else:
            data = self._body(body)
        if kind == "no_usage":
            data.pop("usage")
        if await self.hung_up_within(self.p.chunk_delay_s * len(self.p.tokens)):
            return
        await send_json(self.send, 200, data)
        usage = data.get("usage")
        if usage:
            self.p._count(usage["prompt_tokens"], usage["completion_tokens"])

    def _body(self, body: dict[str, Any]) -> dict[str, Any]:
        text = "".join(self.p.tokens)
        prompt, completion = prompt_tokens_of(body), len(self.p.tokens)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if self.p.name == "openrouter":
            usage["cost"] = 0.000123
        if "messages" in body:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            kind = "text_completion"
        return {
            "id": f"{self.p.name}-{time.monotonic_ns()}",
            "object": kind,
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [choice],
            "usage": usage,
        }

    async def _stream(self, body: dict[str, Any], fault: Fault | None) -> None:
        kind = fault.kind if fault else None
        chat = "messages" in body
        sample = _is_deepinfra_hello(self.p, body)
        pieces = DEEPINFRA_SAMPLE_STREAM if sample else self.p.tokens
        ident = f"{self.p.name}-{time.monotonic_ns()}"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if role or (sample and text is not None):
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return json.dumps(
                {
                    "id": ident,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [choice],
                }
            )

        await self.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        out = self.p.keepalive()
        if chat and not sample and kind != "no_role_chunk":
            out += self.p.encode_event(chunk("", role=True))
        if kind == "malformed":
            out += self.p.encode_event("{not json")
        if out:
            await self._write(out)
        if kind in ("stall_first_token",):
            return await self.stall()
        if kind == "malformed":
            await self._write(self.p.encode_event("[DONE]"))
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if kind == "cut_before_first":
            return  # returning without finishing the response drops the connection
        for sent, piece in enumerate(pieces):
            if kind in ("cut_after_first", "stall_after_first", "malformed_after_first") and (
                fault and sent == fault.after
            ):
                if kind == "stall_after_first":
                    return await self.stall()
                if kind == "malformed_after_first":
                    bad = self.p.encode_event('{"choices": [{"delta": {"content": "x"')
                    await self._write(bad + self.p.encode_event("[DONE]"))
                    await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if await self.hung_up_within(self.p.chunk_delay_s):
                return
            await self._write(self.p.encode_event(chunk(piece)))
        finish = chunk(None, "stop")
        wants_usage = (body.get("stream_options") or {}).get("include_usage") and kind != "no_usage"
        completion = sum(1 for piece in pieces if piece)
        prompt = DEEPINFRA_SAMPLE_PROMPT_TOKENS if sample else prompt_tokens_of(body)
        out = self.p.encode_event(finish)
        if wants_usage:
            usage_chunk = json.loads(finish)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            if self.p.name == "deepinfra":
                usage_chunk["usage"]["estimated_cost"] = 0.0000268
            out += self.p.encode_event(json.dumps(usage_chunk))
        out += self.p.encode_event("[DONE]")
        await self._write(out)
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        if wants_usage:
            self.p._count(prompt, completion)

    async def _write(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})


class FakeUpstreams:
    """Every fake provider behind one uvicorn server on 127.0.0.1."""

    def __init__(self, names: list[str]):
        self.providers = {name: FakeProvider(name) for name in names}
        self.server: ServerThread | None = None

    def __getitem__(self, name: str) -> FakeProvider:
        return self.providers[name]

    def start(self) -> FakeUpstreams:
        self.server = ServerThread(self.app).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def reset(self) -> None:
        for provider in self.providers.values():
            provider.reset()

    def base_url(self, name: str) -> str:
        assert self.server is not None
        return f"{self.server.url}/{name}/v1"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        name = scope["path"].strip("/").split("/")[0]
        provider = self.providers.get(name)
        raw = await read_body(receive)
        if provider is None:
            return await send_json(send, 404, {"error": {"message": "no such provider"}})
        body = json.loads(raw) if raw else {}
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        with provider._lock:
            provider.requests.append({"path": scope["path"], "headers": headers, "body": body})
        await _Handler(provider, scope, receive, send).run(body, provider._next_fault())
