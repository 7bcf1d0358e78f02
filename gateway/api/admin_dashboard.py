"""The dashboard's moving parts: the fragments htmx refreshes, its script, and the data as JSON.

    GET /admin/static/htmx.min.js        the vendored htmx (static/README; no CDN at run time)
    GET /admin/fragments/{name}          routes | charts?span= | spend?by= | log?route=&status=
                                         | prices: the HTML that replaces that section
    GET /admin/api/history?span=1h       each route's series (uptime, latency, TTFT, tokens/s)
    GET /admin/api/requests?route=&status=&limit=   the request log, newest first
    GET /admin/api/prices/history?limit= who changed which price when

Same authentication as the rest of /admin (admin.py): 404 when the dashboard is disabled, 401
without the token or a session.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from gateway.api import dashboard_views as views
from gateway.api.admin import _admin, _choice, _Denied, known_route
from gateway.api.admin_page import redact_html
from gateway.errors import InvalidRequest, render_error
from gateway.stats.base import USAGE_GROUPS, StatsUnavailableError
from gateway.stats.request_log import STATUS_FILTERS
from gateway.stats.windows import SERIES

router = APIRouter(prefix="/admin")
STATIC = Path(__file__).with_name("static")


@router.get("/static/htmx.min.js", response_model=None)
async def htmx_script(request: Request) -> Response:
    try:
        _admin(request, html=False)
    except _Denied as denied:
        return denied.response
    return FileResponse(
        STATIC / "htmx.min.js",
        media_type="text/javascript",
        headers={"cache-control": "private, max-age=86400"},
    )


@router.get("/fragments/{name}", response_model=None)
async def fragment(name: str, request: Request) -> Response:
    try:
        state, _ = _admin(request, html=False)
    except _Denied as denied:
        return denied.response
    q = request.query_params
    if name == "routes":
        inner = views.routes_fragment(state)
    elif name == "charts":
        inner = await views.charts_fragment(state, _choice(q.get("span"), tuple(SERIES), "1h"))
    elif name == "spend":
        inner = await views.spend_fragment(state, _choice(q.get("by"), USAGE_GROUPS, "route"))
    elif name == "log":
        route = known_route(state, q.get("route"))
        inner = await views.log_fragment(
            state, route, _choice(q.get("status"), STATUS_FILTERS, "all")
        )
    elif name == "prices":
        inner = await views.prices_fragment(state)
    else:
        return render_error(InvalidRequest(f"no dashboard fragment {name!r}"))
    body = redact_html(inner, state.settings.secrets())  # a fragment: no page around it
    return HTMLResponse(body, headers={"cache-control": "no-store"})


@router.get("/api/history", response_model=None)
async def history(request: Request) -> Response | dict[str, Any]:
    try:
        state, _ = _admin(request, html=False)
        span = request.query_params.get("span", "1h")
        if span not in SERIES:
            raise InvalidRequest(f"span must be one of {', '.join(SERIES)}", param="span")
        series = await state.stats.history([r.id for r in state.catalog.routes()], span)
    except _Denied as denied:
        return denied.response
    except InvalidRequest as exc:
        return render_error(exc)
    except StatsUnavailableError:
        error = {"message": "stats store unavailable", "type": "service_unavailable"}
        return JSONResponse({"error": error}, status_code=503)
    length, _ = SERIES[span]
    return {
        "span": span,
        "bucket_s": length,
        "routes": {
            route: [{"start": p.start, **asdict(p.stats)} for p in points]
            for route, points in series.items()
        },
    }


@router.get("/api/requests", response_model=None)
async def requests_log(request: Request) -> Response | dict[str, Any]:
    try:
        state, _ = _admin(request, html=False)
        q = request.query_params
        status = q.get("status", "all")
        if status not in STATUS_FILTERS:
            raise InvalidRequest(
                f"status must be one of {', '.join(STATUS_FILTERS)}", param="status"
            )
        limit_text = q.get("limit", "100")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 10_000:
            raise InvalidRequest("limit must be an integer from 1 to 10000", param="limit")
        log = state.request_log
        if log is None:
            return {"entries": [], "shared": False}
        return await log.recent(int(limit_text), route=q.get("route") or None, status=status)
    except _Denied as denied:
        return denied.response
    except InvalidRequest as exc:
        return render_error(exc)


@router.get("/api/prices/history", response_model=None)
async def price_history(request: Request) -> Response | dict[str, Any]:
    try:
        state, _ = _admin(request, html=False)
        limit_text = request.query_params.get("limit", "50")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 200:
            raise InvalidRequest("limit must be an integer from 1 to 200", param="limit")
    except _Denied as denied:
        return denied.response
    except InvalidRequest as exc:
        return render_error(exc)
    return await state.prices.history(int(limit_text))
