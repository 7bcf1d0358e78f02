"""The dashboard in a real browser: Playwright driving the system Chromium against two live
gateway replicas on one Redis, with fake upstreams.

Skipped, with the reason, where Chromium or Playwright is missing (`make test` installs both:
Debian's `chromium` package and the `playwright` wheel; Playwright never downloads a browser
here, it is pointed at the system one). DASHBOARD_SCREENSHOT=path saves a screenshot (docs/).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, Gateway
from tests.gateway.routing_fixtures import REDIS_URL, delete_prefix

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"),
]

TOKEN = "admin-token-0123456789"
CLIENT_KEY = "sk-client-alice-0123456789"
LEPTON = "lepton/wizardlm-2-8x22b"
OPENROUTER = "openrouter/microsoft/wizardlm-2-8x22b"
RED = "rgb(220, 38, 38)"


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"moegw-test-{uuid.uuid4().hex[:12]}:"
    yield value
    asyncio.run(delete_prefix(value))


def _chat(gateway: Gateway, n: int, **extra: Any) -> None:
    client = gateway.openai(api_key=CLIENT_KEY)
    for i in range(n):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"hi {i}"}],
            max_tokens=8,
            extra_body=extra,
        )


def _sign_in(page: Any, gateway: Gateway, name: str) -> None:
    page.goto(f"{gateway.url}/admin")
    page.fill("input[name=name]", name)
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#routes-table")


def test_dashboard_in_a_browser(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams, prefix: str
) -> None:
    settings = {
        "redis_url": REDIS_URL,
        "stats_prefix": prefix,
        "gateway_admin_token": TOKEN,
        "gateway_api_keys": [f"alice:{CLIENT_KEY}"],
        "retry_attempts_per_route": 1,
    }
    a = start_gateway(**settings)
    b = start_gateway(**settings)
    upstreams["lepton"].inject(Fault("http_500"), times=100)
    _chat(a, 3, provider={"order": ["lepton", "openrouter"]})
    a.call(a.state.stats.flush())
    a.call(a.state.request_log.flush(settled_only=False))

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _sign_in(page, a, "alice")

            # the charts render, with data
            charts = page.locator("#charts svg")
            assert charts.count() == 6
            assert page.locator("#charts svg polyline, #charts svg circle").count() >= 6
            points = [int(charts.nth(i).get_attribute("data-points") or 0) for i in range(6)]
            assert min(points) >= 1

            # the failing route is red, the serving one is not
            lepton = page.locator(f"tr[data-route='{LEPTON}']")
            assert "bad" in (lepton.get_attribute("class") or "")
            dot = lepton.locator(".dot").evaluate("e => getComputedStyle(e).backgroundColor")
            assert dot == RED
            served = page.locator(f"tr[data-route='{OPENROUTER}']")
            assert "good" in (served.get_attribute("class") or "")

            # the request log fills, and keeps filling without a reload (htmx refresh)
            rows = page.locator("#log-table tr.logrow")
            assert rows.count() == 6
            _chat(a, 2, provider={"order": ["openrouter"]})
            a.call(a.state.stats.flush())
            page.wait_for_function(
                "document.querySelectorAll('#log-table tr.logrow').length == 8", timeout=15_000
            )
            assert "alice" in page.inner_text("#log-table")  # the key's name, never the key
            assert CLIENT_KEY not in page.content()

            # a price edit on replica A shows on replica B, with who made it
            page.select_option("#price-form select[name=route_id]", OPENROUTER)
            page.fill("#price-form input[name=input]", "0.11")
            page.fill("#price-form input[name=output]", "0.22")
            page.click("#price-form button[value=set]")
            page.wait_for_selector("#routes-table")
            other = browser.new_page(viewport={"width": 1400, "height": 1000})
            _sign_in(other, b, "bob")
            history = other.inner_text("#price-history")
            assert "alice" in history and OPENROUTER in history and "0.11 / 0.22" in history
            # B's own price book sees it at its next refresh; the section refreshes itself
            other.wait_for_function(
                "document.querySelector('#overrides').innerText.includes('0.11')", timeout=15_000
            )
            if os.environ.get("DASHBOARD_SCREENSHOT"):
                page.reload()
                page.screenshot(path=os.environ["DASHBOARD_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
