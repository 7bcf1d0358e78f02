"""Server limits against hostile clients on loopback (issue 8, defects 2 and 11).

Each test serves the gateway as `gateway serve` does (tests/gateway/hostile.py) with short
limits, then attacks it with raw sockets: silent, dripping, bodiless, oversized, too many.
Before the limits, uvicorn held every such socket open indefinitely and let unfinished heads grow.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.api.app import create_app
from gateway.api.http_server import SERVER_EVENTS
from tests.fakes.server import ServerThread
from tests.fakes.upstream import FakeUpstreams

from .conftest import MODEL, gateway_settings
from .hostile import (
    close_all,
    need_fds,
    open_sockets,
    rss_bytes,
    send_all,
    served_like_cli,
    wait_closed,
)

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
SLACK_S = 2.0  # scheduling slack on a busy 2-core machine: a bound, not a speed goal
LIMITS = {
    "server_header_timeout_s": HEADER_TIMEOUT_S,
    "server_body_timeout_s": BODY_TIMEOUT_S,
    "server_keepalive_timeout_s": 5.0,
}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def start_hardened(
    upstreams: FakeUpstreams, stopping: list[ServerThread]
) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        settings = gateway_settings(upstreams, **{**LIMITS, **overrides})
        server = served_like_cli(create_app(settings), settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(wait=False)
        stopping.append(server)


def error_of(response: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and JSON body of one raw HTTP/1.1 response."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def assert_openai_error(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def connections_of(server: ServerThread) -> int:
    return len(server.server.server_state.connections)


def test_a_thousand_silent_sockets_are_closed_at_the_header_timeout(start_hardened: Any) -> None:
    need_fds(1000)
    server = start_hardened()
    socks = open_sockets(server.port, 1000)
    try:
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        closed = wait_closed(socks, HEADER_TIMEOUT_S + SLACK_S)
        assert len(closed) == 1000, f"{1000 - len(closed)} sockets still open"
        assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9  # not before the timeout
        assert set(closed.values()) == {b""}  # no request had begun: closed without an answer
        assert connections_of(server) == 0
    finally:
        close_all(socks)


def test_dripping_a_header_line_never_extends_the_deadline(start_hardened: Any) -> None:
    need_fds(1000)
    server = start_hardened()
    socks = open_sockets(server.port, 1000)
    try:
        send_all(socks, b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n")
        closed = wait_closed(
            socks,
            HEADER_TIMEOUT_S + SLACK_S,
            tick=lambda still_open: send_all(still_open, b"X-Drip: 1\r\n"),
            tick_every_s=0.25,
        )
        assert len(closed) == 1000, f"{1000 - len(closed)} dripping sockets still open"
        # Each got a 408 unless its next drip crossed the close (a reset drops unread bytes).
        answered = [reply for reply in closed.values() if reply]
        assert answered, "no dripping client was told why"
        for reply in answered:
            status, _, body = error_of(reply)
            assert status == 408
            assert_openai_error(body, "request_timeout")
    finally:
        close_all(socks)


def test_headers_without_the_promised_body_get_408_at_the_body_timeout(
    start_hardened: Any,
) -> None:
    need_fds(1000)
    server = start_hardened(server_max_inflight_requests=2000)  # all admitted: all time out
    socks = open_sockets(server.port, 1000)
    try:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n"
        send_all(socks, head + b'{"model": ')  # 10 of the 100 bytes, then nothing
        started = time.monotonic()
        closed = wait_closed(socks, BODY_TIMEOUT_S + SLACK_S)
        assert len(closed) == 1000, f"{1000 - len(closed)} bodiless sockets still open"
        assert time.monotonic() - started >= BODY_TIMEOUT_S * 0.9
        for reply in closed.values():
            status, _, body = error_of(reply)
            assert status == 408
            assert_openai_error(body, "request_timeout")
        assert connections_of(server) == 0
    finally:
        close_all(socks)


def test_unfinished_megabyte_headers_are_refused_and_memory_stays_bounded(
    start_hardened: Any,
) -> None:
    need_fds(300)
    server = start_hardened()
    socks = open_sockets(server.port, 300)
    line = b"X-Filler: " + b"a" * 8180 + b"\r\n"  # 8 KiB header lines, 128 of them = 1 MiB
    before = rss_bytes()
    try:
        send_all(socks, b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n")
        for _ in range(128):
            send_all(socks, line)  # errors once the server has refused and closed
            time.sleep(0.001)
        grown = rss_bytes() - before
        closed = wait_closed(socks, SLACK_S)
        assert len(closed) == 300, f"{300 - len(closed)} sockets with huge heads still open"
        for reply in closed.values():
            if reply:
                status, _, body = error_of(reply)
                assert status == 431
                assert_openai_error(body, "headers_too_large")
        # 300 unfinished 1 MiB heads held in full would be 300+ MiB (the issue saw +257 MB).
        assert grown < 64 * 1024 * 1024, f"RSS grew {grown / 2**20:.0f} MiB"
        assert SERVER_EVENTS["head_too_large"] >= 300
    finally:
        close_all(socks)


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while part := sock.recv(65536):
            received += part
            if b"\r\n\r\n" in received:
                head, _, body = received.partition(b"\r\n\r\n")
                length = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
        return received


def test_header_count_and_size_limits_are_431_and_just_under_them_is_served(
    start_hardened: Any,
) -> None:
    server = start_hardened(server_max_header_count=20, server_max_header_bytes=4096)
    base = b"GET /livez HTTP/1.1\r\nHost: gw\r\n"
    ok = raw_exchange(server.port, base + b"".join(b"X-%d: v\r\n" % i for i in range(19)) + b"\r\n")
    assert ok.startswith(b"HTTP/1.1 200")
    too_many = base + b"".join(b"X-%d: v\r\n" % i for i in range(20)) + b"\r\n"
    status, _, body = error_of(raw_exchange(server.port, too_many))
    assert status == 431
    assert_openai_error(body, "headers_too_large")

    fits = base + b"X-Big: " + b"a" * 3900 + b"\r\n\r\n"
    assert raw_exchange(server.port, fits).startswith(b"HTTP/1.1 200")
    too_big = base + b"X-Big: " + b"a" * 4100 + b"\r\n\r\n"  # one read: checked when it completes
    status, _, body = error_of(raw_exchange(server.port, too_big))
    assert status == 431
    assert_openai_error(body, "headers_too_large")


def test_a_slow_but_timely_client_and_a_long_stream_are_not_cut(
    start_hardened: Any, upstreams: FakeUpstreams
) -> None:
    server = start_hardened()
    body = json.dumps({**CHAT, "stream": True}).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n" % len(body)
    for name in ("lepton", "novita", "openrouter", "deepinfra"):
        upstreams[name].chunk_delay_s = 0.4  # 4 chunks: a response outliving the body timeout
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(HEADER_TIMEOUT_S * 0.5)
        sock.sendall(b"\r\n" + body[:10])
        time.sleep(BODY_TIMEOUT_S * 0.5)
        sock.sendall(body[10:])
        started = time.monotonic()
        received = b""
        while b"data: [DONE]" not in received and (part := sock.recv(65536)):
            received += part
        assert time.monotonic() - started > BODY_TIMEOUT_S  # it did outlive the body timeout
    assert received.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" in received


def test_keep_alive_requests_spaced_out_are_each_served(start_hardened: Any) -> None:
    server = start_hardened()
    ports = set()  # the client's end of the connection: one port if it was kept alive
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(3):
            response = client.get("/livez")
            assert response.status_code == 200
            ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])
            time.sleep(HEADER_TIMEOUT_S * 0.6)  # idle less than keep-alive, more than half a head
        assert client.get("/livez").status_code == 200
    # httpx would silently reconnect to a server that dropped the connection: check it did not
    assert len(ports) == 1


def test_connections_over_the_limit_get_503_with_retry_after(start_hardened: Any) -> None:
    server = start_hardened(server_max_connections=20, server_retry_after_s=2)
    socks = open_sockets(server.port, 20)
    try:
        time.sleep(0.2)  # the server has accepted them
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            reply = extra.recv(65536)
        status, headers, body = error_of(reply)
        assert status == 503 and headers["retry-after"] == "2"
        assert_openai_error(body, "overloaded")
    finally:
        close_all(socks)
    time.sleep(0.2)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/livez").status_code == 200


async def test_requests_over_the_inflight_limit_are_shed_and_probes_still_answer(
    start_hardened: Any, upstreams: FakeUpstreams
) -> None:
    server = start_hardened(server_max_inflight_requests=8)
    for name in ("lepton", "novita", "openrouter", "deepinfra"):
        upstreams[name].chunk_delay_s = 0.3
    stream = {**CHAT, "stream": True}
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=server.url, timeout=20, limits=limits) as client:

        async def one() -> httpx.Response:
            async with client.stream("POST", "/v1/chat/completions", json=stream) as response:
                await response.aread()
                return response

        tasks = [asyncio.create_task(one()) for _ in range(40)]
        await asyncio.sleep(0.3)  # the first ones are streaming: the process is at its limit
        probes = [await client.get(path) for path in ("/livez", "/metrics")]
        results = await asyncio.gather(*tasks)
        for name in ("lepton", "novita", "openrouter", "deepinfra"):
            upstreams[name].chunk_delay_s = 0.0
        after = await client.post("/v1/chat/completions", json=CHAT)
    assert [p.status_code for p in probes] == [200, 200]
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) >= 8 and statuses.count(503) >= 1
    assert set(statuses) == {200, 503}
    for response in results:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert_openai_error(json.loads(response.content), "overloaded")
        else:
            assert b"data: [DONE]" in response.content
    assert after.status_code == 200  # capacity comes back once the streams end


def test_pipelined_requests_in_one_write_are_each_answered(start_hardened: Any) -> None:
    server = start_hardened()
    body = json.dumps(CHAT).encode()
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n" + post + body + post + body)
        received = b""
        while received.count(b"HTTP/1.1 200") < 3 and (part := sock.recv(65536)):
            received += part
        time.sleep(HEADER_TIMEOUT_S * 1.5)  # idle after the answers: keep-alive, not a timeout
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n")
        again = sock.recv(65536)
    assert received.count(b"HTTP/1.1 200") == 3
    assert again.startswith(b"HTTP/1.1 200")


def test_livez_answered_by_the_protocol_keeps_http_semantics(start_hardened: Any) -> None:
    server = start_hardened()
    closing = raw_exchange(
        server.port, b"GET /livez HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    status, headers, body = error_of(closing)
    assert (status, headers["connection"], body) == (200, "close", {"status": "ok"})
    old = raw_exchange(server.port, b"GET /livez HTTP/1.0\r\n\r\n")
    assert old.startswith(b"HTTP/1.1 200") and old.endswith(b'{"status":"ok"}')
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/livez", params={"verbose": "1"}).json() == {"status": "ok"}  # the app's
        assert client.post("/livez").status_code == 405  # only GET is answered early


def test_open_file_limit_is_raised_for_the_connection_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    from gateway.api import http_server
    from gateway.api.server_limits import ServerLimits

    current = {"soft": 1024, "hard": 4096}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (current["soft"], current["hard"]))

    def setrlimit(_: int, limits: tuple[int, int]) -> None:
        current["soft"] = limits[0]

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert http_server.ensure_open_files(ServerLimits(max_connections=1000)) == 3048
    assert current["soft"] == 3048 and not caplog.records
    current["soft"] = 1024  # the hard limit caps it: a warning names the setting
    assert http_server.ensure_open_files(ServerLimits(max_connections=4000)) == 4096
    assert "SERVER_MAX_CONNECTIONS" in caplog.text
