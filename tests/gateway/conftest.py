"""Shared fixtures for the gateway tests: fake upstreams and a gateway served by uvicorn.

    def test_x(gateway, upstreams):           # a fresh gateway (memory stats) per test
        client = gateway.openai()             # the official SDK, pointed at the gateway
        upstreams["lepton"].inject(Fault("http_500"))

The fakes start once per session (one uvicorn thread); each test gets them reset. Each test gets
its own gateway (its own uvicorn thread, stats store and httpx clients), so health learned in
one test never reorders routes in another. Timeouts are short so fault tests stay fast.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from gateway.api.app import create_app
from gateway.api.http_server import GatewayHttpProtocol
from gateway.api.state import GatewayState
from gateway.settings import HOSTED_PROVIDERS, Settings
from tests.fakes.server import ServerThread
from tests.fakes.upstream import FakeUpstreams

PROVIDER_KEYS = {name: f"sk-test-{name}-0123456789abcdef" for name in HOSTED_PROVIDERS}
CHEAPEST_FIRST = {"provider": {"sort": "price"}}  # openrouter, lepton, novita, deepinfra
MODEL = "wizardlm-2-8x22b"

TEST_TIMEOUTS = {
    "timeout_connect_s": 0.3,
    "timeout_headers_s": 0.4,
    "timeout_first_token_s": 0.5,
    "timeout_gap_s": 0.5,
    "timeout_total_s": 5.0,
    "retry_attempts_per_route": 2,
    "retry_backoff_base_s": 0.01,
    "retry_budget_s": 1.0,
    "retry_after_cap_s": 1.0,
}


def gateway_settings(fakes: FakeUpstreams, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": None,
        "stats_prefix": f"moegw-test-{uuid.uuid4().hex[:8]}:",
        "gateway_api_keys": [],
        "gateway_admin_token": None,
        "local_base_url": None,
        "local_model_dir": None,
        "openrouter_referer": "https://example.test/app",
        "openrouter_title": "gateway tests",
        "log_level": "warning",
        **TEST_TIMEOUTS,
    }
    for name in HOSTED_PROVIDERS:
        values[f"{name}_api_key"] = PROVIDER_KEYS[name]
        values[f"{name}_base_url"] = fakes.base_url(name)
    values.update(overrides)
    return Settings(**values)


class Gateway:
    """A running gateway: its URL, its state, and a way to run coroutines on its loop."""

    def __init__(self, settings: Settings, http: Any = GatewayHttpProtocol, **app_kwargs: Any):
        self.settings = settings
        self.app = create_app(settings, **app_kwargs)
        # `gateway serve`'s own protocol by default; "httptools" for plain uvicorn
        self.server = ServerThread(self.app, http=http)
        self.url = self.server.url
        self.base_url = f"{self.url}/v1"

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.app.state.gw
        return state

    def call(self, coro: Any) -> Any:
        return self.server.call(coro)

    def openai(self, api_key: str = "client-key", **kwargs: Any) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=10, **kwargs)

    def async_openai(self, api_key: str = "client-key", **kwargs: Any) -> AsyncOpenAI:
        return AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=0, timeout=10, **kwargs
        )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def usage(self, by: str) -> dict[str, Any]:
        stats = self.state.stats
        self.call(stats.flush())
        return dict(self.call(stats.usage(by=by)))


@pytest.fixture(scope="session")
def fakes_session() -> Iterator[FakeUpstreams]:
    fakes = FakeUpstreams(list(HOSTED_PROVIDERS)).start()
    yield fakes
    fakes.stop()


@pytest.fixture
def upstreams(fakes_session: FakeUpstreams) -> FakeUpstreams:
    fakes_session.reset()
    return fakes_session


@pytest.fixture(scope="session")
def stopping() -> Iterator[list[ServerThread]]:
    """Gateways told to exit: joined once at the end instead of ~0.2 s per test."""
    servers: list[ServerThread] = []
    yield servers
    for server in servers:
        server.join()


@pytest.fixture
def start_gateway(
    upstreams: FakeUpstreams, stopping: list[ServerThread]
) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(
        app_kwargs: dict[str, Any] | None = None,
        server_http: Any = GatewayHttpProtocol,
        **overrides: Any,
    ) -> Gateway:
        settings = gateway_settings(upstreams, **overrides)
        gateway = Gateway(settings, http=server_http, **(app_kwargs or {}))
        gateway.server.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.server.stop(wait=False)
        stopping.append(gateway.server)


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`faults_heavy` tests run only when asked for by name (`make test-faults`)."""
    if "faults_heavy" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="heavy fault sizes: run with -m faults_heavy")
    for item in items:
        if item.get_closest_marker("faults_heavy") is not None:
            item.add_marker(skip)
