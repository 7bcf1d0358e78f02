"""`/admin`: the operators' dashboard and the run-time price overrides.

Enabled only when GATEWAY_ADMIN_TOKEN is set; otherwise every /admin path answers 404, as if
it did not exist. A caller proves it knows the token with `Authorization: Bearer <token>` or
with the session cookie the login form sets: `<expiry>.<name>.<HMAC-SHA256(token, expiry,
name)>`, so the cookie is not the token, works on every replica, dies when the token changes,
and carries the name the admin gave at sign-in (shown in the price history; a bearer call may
name itself with `X-Admin-User`, else "api"). The cookie is HttpOnly, SameSite=Strict and
Secure under https; and every state-changing request (forms, JSON API, login, logout, and any
endpoint added to this router) is refused with a 403 when its Sec-Fetch-Site / Origin / Referer
names another site (csrf.py; GATEWAY_ADMIN_ORIGINS adds the public origins a reverse proxy
serves the dashboard under, when it rewrites Host).

    GET    /admin                        the dashboard (HTML, see dashboard_views.py), or the
                                         login form (401); ?span=1h|24h|7d&by=route|model|client
                                         &route=ID&status=all|ok|error
    POST   /admin/login                  form: name, token  -> cookie, 303 to /admin
    POST   /admin/logout                 drops the cookie
    POST   /admin/prices                 form: route_id, input, output, action=set|clear
    GET    /admin/api/dashboard          the dashboard's data (JSON)
    GET    /admin/api/prices             {"overrides": {route_id: {input, output, set_at}}}
    POST   /admin/api/prices             JSON {route_id, input, output} -> the override
    DELETE /admin/api/prices/{route_id}  back to the catalog price
The fragments htmx refreshes, the static script and the history/log JSON are in
admin_dashboard.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from gateway.api.admin_page import dashboard_data, login_page
from gateway.api.csrf import refuse_cross_site
from gateway.api.dashboard_views import shell
from gateway.api.state import GatewayState, get_state
from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    render_error,
)
from gateway.stats.base import USAGE_GROUPS
from gateway.stats.request_log import STATUS_FILTERS
from gateway.stats.windows import SERIES


async def _no_cross_site_writes(request: Request) -> None:
    """The router's guard: while /admin is enabled, no state change from another site."""
    state = get_state(request)
    if _token(state) is not None:
        refuse_cross_site(request, state.settings.gateway_admin_origins)


router = APIRouter(prefix="/admin", dependencies=[Depends(_no_cross_site_writes)])

COOKIE = "gw_admin"
SESSION_S = 12 * 3600
MAX_FORM_BYTES = 16 * 1024
_EXPIRY = re.compile(r"[0-9]{1,12}")  # a session cookie's expiry: unix seconds
_NAME = re.compile(r"[A-Za-z0-9 _@-][A-Za-z0-9 ._@-]{0,39}")  # no "." first: parsing stays exact


class _Denied(Exception):
    def __init__(self, response: Response):
        self.response = response


def _not_found() -> JSONResponse:
    body = {"error": {"message": "not found", "type": "invalid_request_error", "code": None}}
    return JSONResponse(body, status_code=404)


def _session_mac(token: str, expires: int, name: str) -> str:
    message = f"admin-session:{expires}:{name}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def clean_name(value: object) -> str:
    """An admin's display name: letters, digits and ` ._@-`, at most 40; else "admin"."""
    text = value.strip() if isinstance(value, str) else ""
    return text if _NAME.fullmatch(text) else "admin"


def session_cookie(token: str, now: float | None = None, name: str = "admin") -> str:
    expires = int((now if now is not None else time.time()) + SESSION_S)
    name = clean_name(name)
    return f"{expires}.{name}.{_session_mac(token, expires, name)}"


def _cookie_user(token: str, value: str) -> str | None:
    """The name a valid session cookie carries, None for anything else."""
    # The cookie is the client's: only ASCII digits, at most 12 of them (unix seconds until
    # the year 33658), reach int(); "²" or 5000 digits are simply not a session.
    expires_text, _, rest = value.partition(".")
    name, _, mac = rest.rpartition(".")
    if _EXPIRY.fullmatch(expires_text) is None or _NAME.fullmatch(name) is None:
        return None
    expires = int(expires_text)
    if expires < time.time():
        return None
    if not hmac.compare_digest(mac.encode(), _session_mac(token, expires, name).encode()):
        return None
    return name


def _valid_cookie(token: str, value: str) -> bool:
    return _cookie_user(token, value) is not None


def admin_user(request: Request, token: str) -> str:
    """Who is acting: the session's name, or X-Admin-User (else "api") for a bearer call."""
    cookie = request.cookies.get(COOKIE)
    user = _cookie_user(token, cookie) if cookie else None
    if user is not None and not request.headers.get("authorization"):
        return user
    named = request.headers.get("x-admin-user")
    return clean_name(named) if named else "api"


def _token(state: GatewayState) -> str | None:
    secret = state.settings.gateway_admin_token
    value = secret.get_secret_value() if secret is not None else ""
    return value or None


def _authorized(request: Request, token: str) -> bool:
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(
        credential.strip().encode(), token.encode()
    ):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and _valid_cookie(token, cookie)


def _admin(request: Request, *, html: bool) -> tuple[GatewayState, str]:
    """The state and the admin token, or _Denied with 404 (disabled) / 401 (not signed in)."""
    state = get_state(request)
    token = _token(state)
    if token is None:
        raise _Denied(_not_found())
    if not _authorized(request, token):
        if html:
            raise _Denied(HTMLResponse(login_page(), status_code=401))
        raise _Denied(render_error(AuthenticationFailed("admin token required")))
    return state, token


async def _read_body(request: Request) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PayloadTooLarge("admin request body too large")
    return body


async def _form(request: Request) -> dict[str, str]:
    fields = parse_qs((await _read_body(request)).decode("utf-8", "replace"))
    return {name: values[-1] for name, values in fields.items()}


def _number(value: object, name: str) -> object:
    """Form fields arrive as text; JSON numbers pass through for PriceBook to check."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise InvalidRequest(f"{name} must be a number", param=name) from None
    return value


@router.get("", response_class=HTMLResponse, response_model=None)
async def dashboard(request: Request) -> Response:
    try:
        state, _ = _admin(request, html=True)
    except _Denied as denied:
        return denied.response
    return HTMLResponse(await _dashboard(request, state))


def _choice(value: str | None, allowed: tuple[str, ...], default: str) -> str:
    return value if value in allowed else default


def known_route(state: GatewayState, route: str | None) -> str | None:
    """A route id of the catalog, or None (anything else a client sends is ignored)."""
    return route if route and any(r.id == route for r in state.catalog.routes()) else None


async def _dashboard(request: Request, state: GatewayState, notice: str = "") -> str:
    q = request.query_params
    token = _token(state) or ""
    return await shell(
        state,
        span=_choice(q.get("span"), tuple(SERIES), "1h"),
        by=_choice(q.get("by"), USAGE_GROUPS, "route"),
        route=known_route(state, q.get("route")),
        status=_choice(q.get("status"), STATUS_FILTERS, "all"),
        user=admin_user(request, token),
        notice=notice,
    )


@router.post("/login", response_model=None)
async def login(request: Request) -> Response:
    state = get_state(request)
    token = _token(state)
    if token is None:
        return _not_found()
    try:
        form = await _form(request)
    except PayloadTooLarge as exc:
        return render_error(exc)
    given = form.get("token", "")
    if not hmac.compare_digest(given.encode(), token.encode()):
        return HTMLResponse(login_page("wrong token"), status_code=401)
    response = RedirectResponse("/admin", status_code=303)
    response.set_cookie(
        COOKIE,
        session_cookie(token, name=form.get("name", "admin")),
        max_age=SESSION_S,
        path="/admin",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", response_model=None)
async def logout(request: Request) -> Response:
    if _token(get_state(request)) is None:
        return _not_found()
    response = RedirectResponse("/admin", status_code=303)
    response.delete_cookie(COOKIE, path="/admin")
    return response


@router.post("/prices", response_model=None)
async def set_price_form(request: Request) -> Response:
    try:
        state, token = _admin(request, html=True)
    except _Denied as denied:
        return denied.response
    by = admin_user(request, token)
    try:
        form = await _form(request)
        route_id = form.get("route_id", "")
        if form.get("action") == "clear":
            await state.prices.clear(route_id, by=by)
        else:
            inp = _number(form.get("input", ""), "input")
            out = _number(form.get("output", ""), "output")
            await state.prices.set(route_id, inp, out, by=by)
    except GatewayError as exc:
        page = await _dashboard(request, state, notice=exc.message)
        return HTMLResponse(page, status_code=exc.status)
    return RedirectResponse("/admin", status_code=303)


@router.get("/api/dashboard", response_model=None)
async def dashboard_json(request: Request) -> Response | dict[str, Any]:
    try:
        state, _ = _admin(request, html=False)
    except _Denied as denied:
        return denied.response
    return await dashboard_data(state)


def _override_json(state: GatewayState) -> dict[str, Any]:
    return {
        "shared": state.prices.shared,
        "overrides": {
            route_id: {"input": o.input, "output": o.output, "set_at": o.set_at}
            for route_id, o in sorted(state.prices.overrides().items())
        },
    }


@router.get("/api/prices", response_model=None)
async def list_prices(request: Request) -> Response | dict[str, Any]:
    try:
        state, _ = _admin(request, html=False)
    except _Denied as denied:
        return denied.response
    return _override_json(state)


@router.post("/api/prices", response_model=None)
async def set_price(request: Request) -> Response | dict[str, Any]:
    try:
        state, token = _admin(request, html=False)
        payload = json.loads(await _read_body(request) or b"null")
        if not isinstance(payload, dict):
            raise InvalidRequest("body must be a JSON object {route_id, input, output}")
        override = await state.prices.set(
            payload.get("route_id"),
            _number(payload.get("input"), "input"),
            _number(payload.get("output"), "output"),
            by=admin_user(request, token),
        )
    except _Denied as denied:
        return denied.response
    except json.JSONDecodeError:
        return render_error(InvalidRequest("body must be JSON"))
    except GatewayError as exc:
        return render_error(exc)
    return {
        "route_id": override.route_id,
        "input": override.input,
        "output": override.output,
        "set_at": override.set_at,
    }


@router.delete("/api/prices/{route_id:path}", response_model=None)
async def clear_price(route_id: str, request: Request) -> Response | dict[str, Any]:
    try:
        state, token = _admin(request, html=False)
        cleared = await state.prices.clear(route_id, by=admin_user(request, token))
    except _Denied as denied:
        return denied.response
    except GatewayError as exc:
        return render_error(exc)
    return {"route_id": route_id, "cleared": cleared}
