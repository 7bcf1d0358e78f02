"""Admin CSRF (issue 8, defect 7): no state change from another site, on any admin endpoint.

The attack the issue found: POST /admin/api/prices with the admin cookie, a foreign Origin and
`text/plain` set a price to 0 (only the HTML form checked Origin).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.api.admin import COOKIE, session_cookie
from gateway.api.csrf import cross_site_reason
from tests.gateway.routing_fixtures import LEPTON, hermetic_settings, running_app

TOKEN = "admin-token-0123456789"
COOKIES = {COOKIE: session_cookie(TOKEN)}
PRICE = {"route_id": LEPTON, "input": 0, "output": 0}
FORM = {"route_id": LEPTON, "input": "0", "output": "0", "action": "set"}

FOREIGN = [
    {"origin": "https://evil.example"},
    {"origin": "null"},
    {"origin": "http://testserver.evil.example"},
    {"referer": "https://evil.example/page?x=1"},
    {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site", "origin": "http://testserver"},  # a sibling subdomain
]

# Every state-changing admin endpoint: method, path, request keyword arguments.
WRITES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/admin/api/prices", {"content": json.dumps(PRICE), "ctype": "text/plain"}),
    ("POST", "/admin/api/prices", {"json": PRICE}),
    ("DELETE", f"/admin/api/prices/{LEPTON}", {}),
    ("POST", "/admin/prices", {"data": FORM}),
    ("POST", "/admin/login", {"data": {"token": TOKEN}}),
    ("POST", "/admin/logout", {}),
]


async def _send(client: Any, method: str, path: str, kwargs: dict[str, Any], headers: Any) -> Any:
    kwargs = dict(kwargs)
    ctype = kwargs.pop("ctype", None)
    headers = {**headers, **({"content-type": ctype} if ctype else {})}
    client.cookies.clear()
    return await client.request(method, path, headers=headers, cookies=COOKIES, **kwargs)


@pytest.mark.parametrize("foreign", FOREIGN)
async def test_every_admin_write_from_another_site_is_refused(foreign: dict[str, str]) -> None:
    async with running_app(hermetic_settings(gateway_admin_token=TOKEN)) as (app, client):
        await app.state.gw.prices.set(LEPTON, 0.5, 0.5)  # DELETE would clear this one
        for method, path, kwargs in WRITES:
            response = await _send(client, method, path, kwargs, foreign)
            assert response.status_code == 403, (method, path, foreign)
            error = response.json()["error"]
            assert error["code"] == "cross_site_request", (method, path)
            assert "set-cookie" not in response.headers  # no login, no logout
        assert app.state.gw.prices.overrides()[LEPTON].input == 0.5  # untouched


async def test_the_same_writes_from_the_dashboard_itself_or_a_script_pass() -> None:
    settings = hermetic_settings(gateway_admin_token=TOKEN)
    same_site = [
        {"origin": "http://testserver", "sec-fetch-site": "same-origin"},
        {"referer": "http://testserver/admin"},
        {},  # curl / an SDK: no browser headers
    ]
    async with running_app(settings) as (_, client):
        for headers in same_site:
            for method, path, kwargs in WRITES:
                response = await _send(client, method, path, kwargs, headers)
                assert response.status_code in (200, 303), (method, path, headers)
        # reads are never refused, whatever the page that asks
        client.cookies.clear()
        read = await client.get("/admin/api/prices", cookies=COOKIES, headers=FOREIGN[0])
        assert read.status_code == 200


async def test_configured_public_origin_passes_behind_a_proxy() -> None:
    settings = hermetic_settings(
        gateway_admin_token=TOKEN, gateway_admin_origins="https://gw.example.com"
    )
    async with running_app(settings) as (app, client):
        headers = {"origin": "https://gw.example.com"}
        ok = await _send(client, "POST", "/admin/api/prices", {"json": PRICE}, headers)
        assert ok.status_code == 200
        assert app.state.gw.prices.overrides()[LEPTON].input == 0


async def test_a_disabled_admin_stays_404_for_cross_site_writes() -> None:
    async with running_app(hermetic_settings()) as (_, client):
        response = await _send(client, "POST", "/admin/api/prices", {"json": PRICE}, FOREIGN[0])
        assert response.status_code == 404


@pytest.mark.parametrize(
    ("headers", "host", "foreign"),
    [
        ({"origin": "http://gw:8000"}, "gw:8000", False),
        ({"origin": "HTTP://GW:8000"}, "gw:8000", False),
        ({"origin": "http://gw:8001"}, "gw:8000", True),
        ({"origin": "javascript:alert(1)"}, "gw:8000", True),
        ({"referer": "http://gw:8000/admin"}, "gw:8000", False),
        ({"sec-fetch-site": "none"}, "gw:8000", False),
        ({}, "", False),
    ],
)
def test_cross_site_reason(headers: dict[str, str], host: str, foreign: bool) -> None:
    assert (cross_site_reason(headers, host) is not None) is foreign
