"""The dashboard against a live gateway and fake upstreams: health colours, charts with data,
the request log, spend by key name, price history with who/when, shared across two replicas.

(The same in a real browser: tests/browser/test_dashboard_browser.py.)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.api.dashboard_views import BAD, GOOD, OFF, route_health
from gateway.api.svg_charts import Series, line_chart
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, PROVIDER_KEYS, Gateway
from tests.gateway.routing_fixtures import REDIS_URL, delete_prefix

TOKEN = "admin-token-0123456789"
BEARER = {"authorization": f"Bearer {TOKEN}"}
ALICE_KEY = "sk-client-alice-0123456789"
LEPTON = "lepton/wizardlm-2-8x22b"
OPENROUTER = "openrouter/microsoft/wizardlm-2-8x22b"
LEPTON_FIRST = {"provider": {"order": ["lepton", "openrouter"]}}


def _admin_gateway(start: Callable[..., Gateway], **overrides: Any) -> Gateway:
    return start(gateway_admin_token=TOKEN, gateway_api_keys=[f"alice:{ALICE_KEY}"], **overrides)


def _chat(gateway: Gateway, n: int, **extra: Any) -> None:
    client = gateway.openai(api_key=ALICE_KEY)
    for i in range(n):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"hello {i}"}],
            max_tokens=8,
            extra_body=extra or None,
        )


def _fragment(http: httpx.Client, name: str, **query: str) -> str:
    response = http.get(f"/admin/fragments/{name}", params=query, headers=BEARER)
    assert response.status_code == 200, response.text
    return response.text


@pytest.fixture
def failing_lepton(start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams) -> Gateway:
    """lepton answers 500 to every call; openrouter serves. Three requests, lepton first."""
    gateway = _admin_gateway(start_gateway, retry_attempts_per_route=1)
    upstreams["lepton"].inject(Fault("http_500"), times=100)
    _chat(gateway, 3, **LEPTON_FIRST)
    gateway.call(gateway.state.stats.flush())
    return gateway


def test_a_route_that_fails_every_call_is_red(failing_lepton: Gateway) -> None:
    with failing_lepton.http() as http:
        html = _fragment(http, "routes")
    rows = dict(re.findall(r"data-route='([^']+)' data-health='(\w+)'", html))
    assert rows[LEPTON] == BAD  # circuit still closed (3 < 5 failures), yet 0% uptime: red
    assert rows[OPENROUTER] == GOOD
    assert "failing: 3 consecutive failures, 0% uptime" in html
    health = failing_lepton.state.stats.route_health(LEPTON)
    assert health.circuit == "closed" and health.consecutive_failures == 3


def test_route_health_classes() -> None:
    def entry(**kw: Any) -> dict[str, Any]:
        window = {"requests": kw.pop("requests", 10), "uptime": kw.pop("uptime", 1.0)}
        base = {"state": "available", "circuit": "closed", "consecutive_failures": 0}
        return {**base, "windows": {"5m": window, "30m": window}, **kw}

    assert route_health(entry(state="no_key"))[0] == OFF
    assert route_health(entry(circuit="open", consecutive_failures=5))[0] == BAD
    assert route_health(entry(consecutive_failures=2, uptime=0.0))[0] == BAD
    assert route_health(entry(uptime=0.9))[0] == "warn"
    assert route_health(entry(circuit="half_open"))[0] == "warn"
    assert route_health(entry(uptime=1.0))[0] == GOOD
    assert route_health(entry(requests=0, uptime=None))[1] == "healthy (no recent traffic)"


@pytest.mark.parametrize("span", ["1h", "24h", "7d"])
def test_charts_and_history_have_the_traffic(failing_lepton: Gateway, span: str) -> None:
    with failing_lepton.http() as http:
        html = _fragment(http, "charts", span=span)
        data = http.get("/admin/api/history", params={"span": span}, headers=BEARER).json()
    assert html.count("<svg") == 6
    points = [int(n) for n in re.findall(r"data-points='(\d+)'", html)]
    assert min(points) >= 1  # every chart plots something (uptime 0 for lepton is a point)
    assert "polyline" in html or "<circle" in html
    lepton = [p for p in data["routes"][LEPTON] if p["requests"]]
    openrouter = [p for p in data["routes"][OPENROUTER] if p["requests"]]
    assert sum(p["requests"] for p in lepton) == 3 and sum(p["failures"] for p in lepton) == 3
    assert sum(p["requests"] for p in openrouter) == 3 and openrouter[-1]["uptime"] == 1.0
    assert data["bucket_s"] == {"1h": 60, "24h": 900, "7d": 3600}[span]


def test_request_log_fills_and_filters(failing_lepton: Gateway) -> None:
    with failing_lepton.http() as http:
        everything = http.get("/admin/api/requests", headers=BEARER).json()
        errors = http.get("/admin/api/requests", params={"status": "error"}, headers=BEARER).json()
        served = http.get(
            "/admin/api/requests", params={"route": OPENROUTER, "status": "ok"}, headers=BEARER
        ).json()
        html = _fragment(http, "log", status="error")
        bad = http.get("/admin/api/requests", params={"status": "maybe"}, headers=BEARER)
    assert len(everything["entries"]) == 6 and everything["shared"] is False
    assert [e["status"] for e in errors["entries"]] == [500, 500, 500]
    assert all(e["route"] == LEPTON and e["error"] == "http_500" for e in errors["entries"])
    assert len(served["entries"]) == 3
    for e in served["entries"]:
        assert e["cost_usd"] > 0 and e["prompt_tokens"] > 0 and e["completion_tokens"] > 0
    assert html.count("class='logrow bad'") == 3 and "logrow good" not in html
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


def test_spend_shows_key_names_never_keys(failing_lepton: Gateway) -> None:
    with failing_lepton.http() as http:
        by_client = _fragment(http, "spend", by="client")
        page = http.get("/admin", params={"by": "client"}, headers=BEARER).text
    assert "alice" in by_client and "data-bars='1'" in by_client
    for text in (by_client, page):
        assert ALICE_KEY not in text
        assert not any(key in text for key in PROVIDER_KEYS.values())


def test_price_history_records_who_and_when(start_gateway: Callable[..., Gateway]) -> None:
    gateway = _admin_gateway(start_gateway)
    with gateway.http() as http:
        login = http.post("/admin/login", data={"token": TOKEN, "name": "alice ops"})
        assert login.status_code == 303
        form = {"route_id": LEPTON, "input": "0.3", "output": "0.35", "action": "set"}
        assert http.post("/admin/prices", data=form).status_code == 303
        http.cookies.clear()
        api = {**BEARER, "x-admin-user": "deploy-bot"}
        assert http.delete(f"/admin/api/prices/{LEPTON}", headers=api).status_code == 200
        history = http.get("/admin/api/prices/history", headers=BEARER).json()
        html = _fragment(http, "prices")
    changes = history["changes"]
    assert [(c["by"], c["action"], c["route_id"]) for c in changes] == [
        ("deploy-bot", "clear", LEPTON),
        ("alice ops", "set", LEPTON),
    ]
    assert changes[1]["input"] == 0.3 and changes[0]["input"] == 0.5  # back to the catalog's
    assert html.count("class='change'") == 2 and "alice ops" in html


def test_fragments_are_admin_only(start_gateway: Callable[..., Gateway]) -> None:
    disabled = start_gateway()
    enabled = _admin_gateway(start_gateway)
    with disabled.http() as off, enabled.http() as on:
        assert off.get("/admin/fragments/routes", headers=BEARER).status_code == 404
        assert off.get("/admin/static/htmx.min.js", headers=BEARER).status_code == 404
        assert on.get("/admin/fragments/routes").status_code == 401
        assert on.get("/admin/api/history").status_code == 401
        assert on.get("/admin/fragments/nope", headers=BEARER).status_code == 400
        assert on.get("/admin/api/history?span=1y", headers=BEARER).status_code == 400
        script = on.get("/admin/static/htmx.min.js", headers=BEARER)
        assert script.status_code == 200 and "htmx" in script.text[:2000]
        page = on.get("/admin?span=7d&route=%3Cscript%3E&status=x", headers=BEARER)
        assert page.status_code == 200 and "<script>" not in page.text.replace(
            "<script src='/admin/static/htmx.min.js' defer></script>", ""
        )


@pytest.fixture
def shared_prefix() -> Iterator[str]:
    import asyncio

    prefix = f"moegw-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    asyncio.run(delete_prefix(prefix))


def test_two_replicas_share_log_history_and_prices(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams, shared_prefix: str
) -> None:
    shared = {"redis_url": REDIS_URL, "stats_prefix": shared_prefix}
    a = _admin_gateway(start_gateway, **shared)
    b = _admin_gateway(start_gateway, **shared)
    _chat(a, 2, provider={"order": ["openrouter"]})
    a.call(a.state.stats.flush())
    a.call(a.state.request_log.flush(settled_only=False))
    with a.http() as http_a, b.http() as http_b:
        log_b = http_b.get("/admin/api/requests", headers=BEARER).json()
        history_b = http_b.get("/admin/api/history?span=1h", headers=BEARER).json()
        set_a = http_a.post(
            "/admin/api/prices",
            json={"route_id": OPENROUTER, "input": 0.1, "output": 0.2},
            headers={**BEARER, "x-admin-user": "alice"},
        )
        assert set_a.status_code == 200
        changes_b = http_b.get("/admin/api/prices/history", headers=BEARER).json()
    assert log_b["shared"] is True and len(log_b["entries"]) == 2
    assert {e["route"] for e in log_b["entries"]} == {OPENROUTER}
    assert sum(p["requests"] for p in history_b["routes"][OPENROUTER]) == 2
    assert changes_b["shared"] is True
    assert changes_b["changes"][0]["by"] == "alice" and changes_b["changes"][0]["input"] == 0.1


def test_line_chart_breaks_at_gaps_and_escapes_names() -> None:
    html = line_chart(
        "t<x>",
        [Series("<b>route</b>", [0.5, None, 0.7, 0.8]), Series("r2", [None, None, None, 1.0])],
        start=0,
        step=60,
    )
    assert "<b>" not in html and "&lt;b&gt;route&lt;/b&gt;" in html
    assert html.count("<polyline") == 1  # [0.7, 0.8]; 0.5 and r2's 1.0 stand alone
    assert html.count("<circle") == 2
    assert "data-points='4'" in html
