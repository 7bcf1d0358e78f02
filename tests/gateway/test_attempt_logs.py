"""Operator logs: one structured line per failed attempt (text or JSON), a startup summary of
live and skipped routes, and no secret in any line — against a real `gateway serve` process
and an in-process gateway, with fake upstreams on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from gateway.logging_setup import JsonFormatter
from tests.fakes.server import free_port
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, PROVIDER_KEYS, Gateway
from tests.gateway.test_cli import REPO, clean_env, gateway_cmd

LEPTON = "lepton/wizardlm-2-8x22b"
REVOKED = "sk-revoked-0123456789abcdef"
HI = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


def _serve(upstreams: FakeUpstreams, port: int) -> subprocess.Popen[str]:
    env = clean_env(
        LEPTON_API_KEY=REVOKED,
        LEPTON_BASE_URL=upstreams.base_url("lepton"),
        GATEWAY_API_KEYS="ops:sk-client-key-abcdef123456",
        TIMEOUT_HEADERS_S="2",
        LOG_LEVEL="info",  # the access log too (off at the default, warning): JSON as well
    )
    return subprocess.Popen(
        [*gateway_cmd(), "serve", "--port", str(port), "--log-format", "json"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_up(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            httpx.get(f"{url}/livez", timeout=1)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "gateway serve did not start"
            time.sleep(0.2)


def test_a_revoked_key_logs_one_redacted_json_line(upstreams: FakeUpstreams) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve(upstreams, port)
    try:
        _wait_up(process, url)
        upstreams["lepton"].inject(Fault("http_401"))
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json=HI,
            headers={"authorization": "Bearer sk-client-key-abcdef123456"},
            timeout=10,
        )
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    assert response.status_code == 502  # lepton was the only live route
    assert REVOKED not in response.text
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(lines) == len(output.strip().splitlines()), output  # every line is JSON
    assert REVOKED not in output and "sk-client-key-abcdef123456" not in output
    failed = [line for line in lines if line.get("event") == "upstream_attempt_failed"]
    assert len(failed) == 1, output
    (line,) = failed
    assert line["level"] == "error"  # our key was refused: someone must act
    assert (line["route"], line["status"], line["error"]) == (LEPTON, 401, "auth")
    assert (line["phase"], line["attempt"], line["client"]) == ("headers", 1, "ops")
    ready = [line for line in lines if line.get("event") == "routes_ready"]
    assert len(ready) == 1 and ready[0]["live"] == LEPTON
    skipped = ready[0]["skipped"]
    assert "deepinfra: no API key configured (DEEPINFRA_API_KEY)" in skipped
    assert "local: local backend not configured" in skipped
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert access and "/v1/chat/completions" in access[-1]["msg"]


class Captured(logging.Handler):
    """The final text of every gateway record, as the JSON formatter writes it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.lines.append(record.getMessage())  # and the text form


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("gateway")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_every_failed_attempt_is_one_line_with_its_phase_and_number(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams, captured: Captured
) -> None:
    gateway = start_gateway(novita_api_key=None, deepinfra_api_key=None)
    upstreams["openrouter"].inject(Fault("http_500"), times=2)  # echoes our key in its body
    upstreams["lepton"].inject(Fault("stall_headers"))
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions", json={**HI, "provider": {"order": ["openrouter", "lepton"]}}
        )
    assert response.status_code == 200  # lepton's retry served it
    events = [json.loads(x) for x in captured.lines if x.startswith("{")]
    failed = [e for e in events if e.get("event") == "upstream_attempt_failed"]
    summary = [(e["route"].split("/")[0], e["error"], e["phase"], e["attempt"]) for e in failed]
    assert summary == [
        ("openrouter", "http_500", "headers", 1),
        ("openrouter", "http_500", "headers", 2),
        ("lepton", "timeout_headers", "headers", 3),
    ]
    assert all(e["level"] == "warning" and e["client"] == "anonymous" for e in failed)
    assert failed[0]["status"] == 500 and "status" not in failed[2]
    text = "\n".join(captured.lines)
    for key in PROVIDER_KEYS.values():
        assert key not in text
    assert "upstream_attempt_failed route=openrouter/microsoft/wizardlm-2-8x22b" in text


def test_a_stream_cut_after_the_first_token_logs_phase_stream(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams, captured: Captured
) -> None:
    gateway = start_gateway(novita_api_key=None, deepinfra_api_key=None, openrouter_api_key=None)
    upstreams["lepton"].inject(Fault("cut_after_first"))
    with gateway.http() as http:
        body = http.post("/v1/chat/completions", json={**HI, "stream": True}).text
    assert '"stream_interrupted"' in body
    failed = [
        json.loads(x)
        for x in captured.lines
        if x.startswith("{") and '"upstream_attempt_failed"' in x
    ]
    assert len(failed) == 1 and failed[0]["phase"] == "stream", failed


class _Live:
    def has_capacity(self) -> bool:
        return True


def test_the_startup_summary_shows_at_the_default_level(caplog: pytest.LogCaptureFixture) -> None:
    """The default level is warning (the access log's cost), but the line that says which
    routes are live and why the others are not must still reach the operator."""
    from gateway.api.startup_report import log_route_summary
    from gateway.catalog import load_catalog
    from gateway.logging_setup import configure_logging
    from gateway.settings import DEFAULT_CONFIG

    configure_logging("warning", ())
    with caplog.at_level(logging.NOTSET):
        log_route_summary(load_catalog(DEFAULT_CONFIG), {"lepton": _Live()})
    ready = [r for r in caplog.records if "routes_ready" in r.getMessage()]
    assert len(ready) == 1 and ready[0].levelno == logging.INFO
    assert "lepton/wizardlm-2-8x22b" in ready[0].getMessage()
