"""What the server limits cost per request: the protocol with them against the one without.

    .venv/bin/python bench/server_protocol.py            # writes docs/benchmarks.md (section)
    .venv/bin/python bench/server_protocol.py --no-write

One protocol object per class on an in-memory transport; each request (an SDK-like POST with 8
headers and a 60-byte body) is fed in one read and answered by a two-message ASGI app, on
uvloop. Rounds alternate between the classes (and their order) so machine noise hits both
alike; on a shared 2-core machine the spread between runs is larger than the difference.
"without" is main's GatewayHttpProtocol before issue 8 (coalesced writes only).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uvicorn  # noqa: E402
import uvloop  # noqa: E402
from doc_section import write_section  # noqa: E402  (bench/ is the script's path)
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from gateway.api.http_server import CoalescingTransport, GatewayHttpProtocol  # noqa: E402

START, END = "<!-- server-protocol:start -->", "<!-- server-protocol:end -->"
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept: application/json\r\n"
    b"Content-Type: application/json\r\nUser-Agent: OpenAI/Python 1.0\r\n"
    b"Authorization: Bearer abc\r\nX-Stainless-Lang: python\r\nContent-Length: 60\r\n\r\n"
    + b"x"
    * 60
)


class WithoutLimits(HttpToolsProtocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


class MemoryTransport:
    def __init__(self) -> None:
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def microseconds_per_request(cls: Any, requests: int) -> float:
    config = uvicorn.Config(app, log_level="critical", access_log=False)
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(MemoryTransport())
    started = time.perf_counter()
    for _ in range(requests):
        protocol.data_received(REQUEST)
        for _ in range(3):  # the app's task, its writes' flush
            await asyncio.sleep(0)
    return (time.perf_counter() - started) / requests * 1e6


async def measure(rounds: int, requests: int) -> dict[str, float]:
    runs: dict[str, list[float]] = {"without": [], "with": []}
    classes = {"without": WithoutLimits, "with": GatewayHttpProtocol}
    for round_ in range(rounds):
        order = ["without", "with"] if round_ % 2 == 0 else ["with", "without"]
        for name in order:
            runs[name].append(await microseconds_per_request(classes[name], requests))
    return {name: statistics.median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    result = uvloop.run(measure(args.rounds, args.requests))
    ratio = result["with"] / result["without"]
    text = "\n".join(
        [
            START,
            "## Server limits: cost per request",
            "",
            f"`.venv/bin/python bench/server_protocol.py` ({time.strftime('%Y-%m-%d')}, "
            f"{platform.machine()}, {os.cpu_count()} CPUs, shared; median of {args.rounds} "
            f"alternating rounds of {args.requests} requests, protocol + minimal ASGI app).",
            "",
            "| protocol | µs per request | ratio |",
            "|---|---:|---:|",
            f"| without limits (main before issue 8) | {result['without']:.1f} | 1.00 |",
            f"| GatewayHttpProtocol with ServerLimits | {result['with']:.1f} | {ratio:.2f} |",
            END,
        ]
    )
    print(text)
    if not args.no_write:
        write_section(text, START, END)


if __name__ == "__main__":
    main()
