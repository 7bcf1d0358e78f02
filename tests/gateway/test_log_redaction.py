"""Secrets in URLs never reach a log line, encoded or not (issue 8, defect 9).

`?key=KEY%5F...` used to be logged verbatim: the literal secret `KEY_...` never appears in the
line, so a plain string match missed it. Lines are now checked after percent-decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import quote, unquote

import httpx
import pytest

from gateway.api.app import create_app
from gateway.logging_setup import redact_url_text, scrub
from tests.fakes.upstream import FakeUpstreams

from .conftest import MODEL, PROVIDER_KEYS, gateway_settings
from .hostile import served_like_cli

CLIENT_KEY = "KEY_client0123456789"
ADMIN_TOKEN = "admin_TOKEN_0123456789"


class Lines(logging.Handler):
    """Every formatted line of the uvicorn and gateway loggers, once attached."""

    LOGGERS = ("uvicorn.access", "uvicorn.error", "gateway")

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def attach(self) -> None:
        """After uvicorn's Config has set its loggers up (it replaces their handlers)."""
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


@pytest.fixture
def captured() -> Iterator[Lines]:
    handler = Lines()
    yield handler
    handler.detach()


def encodings(secret: str) -> list[str]:
    every_byte = "".join(f"%{b:02X}" for b in secret.encode())
    return [secret, quote(secret, safe=""), quote(secret.replace("_", "%5F"), safe=""), every_byte]


def test_secrets_in_query_strings_are_redacted_in_the_access_log(
    upstreams: FakeUpstreams, captured: Lines
) -> None:
    settings = gateway_settings(
        upstreams, gateway_api_keys=[CLIENT_KEY], gateway_admin_token=ADMIN_TOKEN, log_level="info"
    )
    server = served_like_cli(create_app(settings), settings, log_level="info", access_log=True)
    captured.attach()
    server.start()
    secrets = [CLIENT_KEY, ADMIN_TOKEN, PROVIDER_KEYS["lepton"]]
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for secret in secrets:
                for form in encodings(secret):
                    client.get(f"/v1/models?key={form}")  # a credential by its name
                    client.get(f"/livez?q={form}&model={MODEL}")  # a secret by its value
                    client.get(f"/admin/{form}")  # a secret in the path
                    client.post(f"/v1/chat/completions?api%5Fkey={form}", json={})
    finally:
        server.stop()
    access = [line for line in captured.lines if line.startswith("uvicorn.access")]
    assert len(access) >= 4 * 4 * 3, "the access log was not captured"
    for line in captured.lines:
        for secret in secrets:
            assert secret not in unquote(unquote(line)), line
    assert any(f"/livez?q=[redacted]&model={MODEL}" in line for line in access)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /v1/models?key=KEY%5Fabcdef HTTP/1.1", "GET /v1/models?key=[redacted] HTTP/1.1"),
        ("/p?api%5Fkey=x&model=m", "/p?api%5Fkey=[redacted]&model=m"),
        ("/p?Access-Token=abc", "/p?Access-Token=[redacted]"),
        ("/p?q=sk%2Dabcdefghijkl", "/p?q=[redacted]"),
        ("/p?model=wizard%2Flm&n=2", "/p?model=wizard%2Flm&n=2"),  # nothing secret: unchanged
        ("/p/%0Afake%20line", "/p/%0Afake%20line"),  # never decoded into the log
        ("/p/KEY%5Fabcdef/x", "/p/[redacted]/x"),
    ],
)
def test_redact_url_text(text: str, expected: str) -> None:
    assert scrub(text, ("KEY_abcdef",)) == expected
    assert redact_url_text("no url here", ("KEY_abcdef",)) == "no url here"
