"""/admin: disabled without a token, token or cookie required, price overrides, no secrets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from gateway.api.admin import COOKIE, SESSION_S, session_cookie
from gateway.prices import PriceBook, PriceStoreUnavailable
from tests.gateway.routing_fixtures import (
    DEEPINFRA,
    LEPTON,
    REDIS_URL,
    delete_prefix,
    hermetic_settings,
    real_catalog,
    redis_prefix,
    running_app,
)

TOKEN = "admin-token-0123456789"
BEARER = {"authorization": f"Bearer {TOKEN}"}
KEYS = {
    "deepinfra_api_key": "sk-deepinfra-SECRET-abcdef0123",
    "lepton_api_key": "lepton-key-SECRET-456789",
    "openrouter_api_key": "or-key-SECRET-zyx987",
}
CREDENTIAL_URL = "https://ops:hunter2pass@deepinfra.internal:8443/v1/openai?api_key=querysecret#x"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = redis_prefix()
    yield value
    await delete_prefix(value)


async def test_disabled_without_a_token_is_404_everywhere() -> None:
    async with running_app(hermetic_settings()) as (_, client):
        for method, path in [
            ("GET", "/admin"),
            ("POST", "/admin/login"),
            ("GET", "/admin/api/prices"),
            ("POST", "/admin/api/prices"),
            ("GET", "/admin/api/dashboard"),
            ("DELETE", f"/admin/api/prices/{LEPTON}"),
        ]:
            response = await client.request(method, path, headers=BEARER)
            assert response.status_code == 404, (method, path)


async def test_token_required_bearer_and_login_cookie() -> None:
    async with running_app(hermetic_settings(gateway_admin_token=TOKEN)) as (_, client):
        page = await client.get("/admin")
        assert page.status_code == 401 and "<form" in page.text and LEPTON not in page.text
        assert (await client.get("/admin/api/prices")).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert (await client.get("/admin/api/prices", headers=wrong)).status_code == 401
        assert (await client.get("/admin/api/prices", headers=BEARER)).status_code == 200

        bad_login = await client.post("/admin/login", data={"token": "nope"})
        assert bad_login.status_code == 401 and COOKIE not in bad_login.cookies
        login = await client.post("/admin/login", data={"token": TOKEN})
        assert login.status_code == 303
        set_cookie = login.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert "path=/admin" in set_cookie
        cookie = login.cookies[COOKIE]
        assert TOKEN not in cookie
        client.cookies.clear()
        signed_in = await client.get("/admin", cookies={COOKIE: cookie})
        assert signed_in.status_code == 200 and LEPTON in signed_in.text

        expires, name, mac = cookie.split(".")
        assert name == "admin"  # no name given at sign-in
        tampered = f"{int(expires) + 3600}.{name}.{mac}"
        renamed = f"{expires}.mallory.{mac}"  # the name is signed too
        expired = session_cookie(TOKEN, now=time.time() - 2 * SESSION_S)
        other_token = session_cookie("another-token")
        for bad in (tampered, renamed, expired, other_token, "garbage"):
            client.cookies.clear()
            response = await client.get("/admin/api/prices", cookies={COOKIE: bad})
            assert response.status_code == 401, bad


async def test_page_lists_routes_and_never_shows_keys_or_credential_urls() -> None:
    settings = hermetic_settings(
        gateway_admin_token=TOKEN, deepinfra_base_url=CREDENTIAL_URL, **KEYS
    )
    async with running_app(settings) as (_, client):
        page = await client.get("/admin", headers=BEARER)
        data = await client.get("/admin/api/dashboard", headers=BEARER)
        endpoints = await client.get("/v1/models/wizardlm-2-8x22b/endpoints")
        assert page.status_code == data.status_code == endpoints.status_code == 200
        for route in real_catalog().routes():
            assert route.id in page.text
        assert "https://deepinfra.internal:8443/v1/openai" in page.text
        shown = {r["route"]: r for r in data.json()["routes"]}
        assert shown[DEEPINFRA]["base_url"] == "https://deepinfra.internal:8443/v1/openai"
        assert shown[DEEPINFRA]["configured"] is True
        for text in (page.text, data.text, endpoints.text):
            for secret in [*KEYS.values(), TOKEN, "hunter2pass", "querysecret", "ops:"]:
                assert secret not in text


async def test_overrides_set_and_cleared_through_the_json_api() -> None:
    async with running_app(hermetic_settings(gateway_admin_token=TOKEN)) as (app, client):
        body = {"route_id": DEEPINFRA, "input": 0.3, "output": 0.35}
        response = await client.post("/admin/api/prices", json=body, headers=BEARER)
        assert response.status_code == 200 and response.json()["input"] == 0.3
        route = next(r for r in real_catalog().routes() if r.id == DEEPINFRA)
        assert app.state.gw.prices.effective(route) == (0.3, 0.35)
        listed = (await client.get("/admin/api/prices", headers=BEARER)).json()
        assert listed["overrides"][DEEPINFRA]["output"] == 0.35 and listed["shared"] is False
        endpoints = (await client.get("/v1/models/wizardlm-2-8x22b/endpoints")).json()
        deepinfra = next(e for e in endpoints["data"]["endpoints"] if e["route"] == DEEPINFRA)
        assert deepinfra["effective_price_per_1m"] == {
            "input": 0.3,
            "output": 0.35,
            "overridden": True,
        }
        assert deepinfra["price_per_1m"] == {"input": 0.65, "output": 0.65}

        for bad in (
            {"route_id": "nope/nope", "input": 1, "output": 1},
            {"route_id": DEEPINFRA, "input": -1, "output": 1},
            {"route_id": DEEPINFRA, "input": "cheap", "output": 1},
            {"route_id": DEEPINFRA, "input": 1},
        ):
            response = await client.post("/admin/api/prices", json=bad, headers=BEARER)
            assert response.status_code == 400, bad
            assert response.json()["error"]["type"] == "invalid_request_error"
        assert app.state.gw.prices.effective(route) == (0.3, 0.35)

        cleared = await client.delete(f"/admin/api/prices/{DEEPINFRA}", headers=BEARER)
        assert cleared.json() == {"route_id": DEEPINFRA, "cleared": True}
        assert app.state.gw.prices.effective(route) == (0.65, 0.65)


async def test_dashboard_form_sets_a_price_and_refuses_cross_site_posts() -> None:
    async with running_app(hermetic_settings(gateway_admin_token=TOKEN)) as (app, client):
        login = await client.post("/admin/login", data={"token": TOKEN})
        cookies = {COOKIE: login.cookies[COOKIE]}
        client.cookies.clear()
        form = {"route_id": LEPTON, "input": "0.41", "output": "0.42", "action": "set"}
        evil = {"origin": "https://evil.example"}
        refused = await client.post("/admin/prices", data=form, cookies=cookies, headers=evil)
        assert refused.status_code == 403
        assert LEPTON not in app.state.gw.prices.overrides()
        done = await client.post("/admin/prices", data=form, cookies=cookies)
        assert done.status_code == 303
        assert app.state.gw.prices.overrides()[LEPTON].input == 0.41
        page = await client.get("/admin", cookies=cookies)
        assert "override" in page.text and "0.41" in page.text
        bad = await client.post("/admin/prices", data={**form, "input": "x"}, cookies=cookies)
        assert bad.status_code == 400 and "input must be a number" in bad.text


async def test_overrides_are_shared_through_redis(prefix: str) -> None:
    settings = hermetic_settings(
        gateway_admin_token=TOKEN, redis_url=REDIS_URL, stats_prefix=prefix
    )
    catalog = real_catalog()
    routes = {r.id: r for r in catalog.routes()}
    other = PriceBook(catalog, redis_url=REDIS_URL, prefix=prefix)
    try:
        async with running_app(settings) as (app, client):
            body = {"route_id": DEEPINFRA, "input": 0.2, "output": 0.25}
            response = await client.post("/admin/api/prices", json=body, headers=BEARER)
            assert response.status_code == 200
            assert (await client.get("/admin/api/prices", headers=BEARER)).json()["shared"]
            await other.refresh()
            assert other.effective(routes[DEEPINFRA]) == (0.2, 0.25)

            await other.set(LEPTON, 0.11, 0.12)  # another replica's admin page
            assert other.effective(routes[LEPTON]) == (0.11, 0.12)  # at once, locally
            book = app.state.gw.prices
            await book.refresh()
            assert book.effective(routes[LEPTON]) == (0.11, 0.12)

            await client.delete(f"/admin/api/prices/{DEEPINFRA}", headers=BEARER)
            await other.refresh()
            assert other.effective(routes[DEEPINFRA]) == (0.65, 0.65)
    finally:
        await other.aclose()


async def test_redis_down_refuses_the_override_instead_of_diverging() -> None:
    catalog = real_catalog()
    route = next(r for r in catalog.routes() if r.id == LEPTON)
    book = PriceBook(catalog, redis_url="redis://127.0.0.1:1/0", prefix="unused:")
    try:
        with pytest.raises(PriceStoreUnavailable) as exc:
            await book.set(LEPTON, 0.1, 0.1)
        assert exc.value.status == 503
        assert book.effective(route) == (0.5, 0.5)
        await book.refresh()  # a failing refresh keeps the last prices, raises nothing
        assert book.effective(route) == (0.5, 0.5)
    finally:
        await book.aclose()


async def test_background_refresh_picks_up_another_replicas_override(prefix: str) -> None:
    catalog = real_catalog()
    route = next(r for r in catalog.routes() if r.id == LEPTON)
    watcher = PriceBook(catalog, redis_url=REDIS_URL, prefix=prefix, refresh_interval_s=0.05)
    writer = PriceBook(catalog, redis_url=REDIS_URL, prefix=prefix)
    try:
        await watcher.start()
        await writer.set(LEPTON, 0.3, 0.31)
        deadline = asyncio.get_running_loop().time() + 5
        while watcher.effective(route) != (0.3, 0.31):
            assert asyncio.get_running_loop().time() < deadline, "override never arrived"
            await asyncio.sleep(0.02)
        await writer.clear(LEPTON)
        while watcher.effective(route) != (0.5, 0.5):
            assert asyncio.get_running_loop().time() < deadline, "clear never arrived"
            await asyncio.sleep(0.02)
    finally:
        await watcher.aclose()
        await writer.aclose()
