"""The dashboard's HTML: a page shell and the fragments htmx refreshes in place.

    shell(state, span, secrets)           the whole page, every fragment rendered inline, so it
                                          works without JavaScript; htmx then re-fetches each
                                          fragment every REFRESH_S (hx-trigger="every 5s")
    routes_fragment / charts_fragment / spend_fragment / log_fragment / prices_fragment

Route health is colour-coded from what the router itself sees (circuit, consecutive failures,
recent uptime), not from "is a key configured": a route whose every call fails is red whatever
its circuit says. Client keys are shown by the names given in GATEWAY_API_KEYS (`name:key`;
usage and the log carry that name, auth.py), never as keys; unnamed keys show their key id.
Every page goes through `page()`, which redacts every configured secret as a last line of
defence.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode

from gateway.api.admin_page import _e, _totals, base_url, page
from gateway.api.catalog_routes import endpoint_entry
from gateway.api.state import GatewayState
from gateway.api.svg_charts import Series, bar_chart, line_chart, millis, percent, plain, usd
from gateway.stats.base import USAGE_GROUPS, StatsUnavailableError
from gateway.stats.request_log import STATUS_FILTERS
from gateway.stats.usage import DAY_S, utc_day
from gateway.stats.windows import SERIES

REFRESH_S = 5
SPEND_DAYS = 7
LOG_LIMIT = 100

# (css class, label): red = serving fails, amber = degraded or full, grey = not a candidate
GOOD, WARN, BAD, OFF = "good", "warn", "bad", "off"


def route_health(entry: dict[str, Any]) -> tuple[str, str]:
    """(css class, why) of one endpoint entry (catalog_routes.endpoint_entry)."""
    status = entry["state"]
    if status in ("no_key", "not_configured"):
        return OFF, "skipped: provider not configured" + (
            " (no API key)" if status == "no_key" else ""
        )
    recent = entry["windows"]["5m"]
    uptime = recent["uptime"] if recent["requests"] else entry["windows"]["30m"]["uptime"]
    failures = entry["consecutive_failures"]
    if entry["circuit"] == "open":
        return BAD, f"circuit open after {failures} consecutive failures"
    if failures and (uptime is None or uptime < 0.5):
        return BAD, f"failing: {failures} consecutive failures" + (
            f", {uptime * 100:.0f}% uptime" if uptime is not None else ""
        )
    if entry["circuit"] == "half_open":
        return WARN, "half-open: the next request probes it"
    if status == "at_capacity":
        return WARN, "at capacity: skipped until it has room"
    if uptime is not None and uptime < 0.95:
        return WARN, f"degraded: {uptime * 100:.1f}% uptime"
    if uptime is None:
        return GOOD, "healthy (no recent traffic)"
    return GOOD, f"healthy: {uptime * 100:.1f}% uptime"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def _routes(state: GatewayState) -> list[dict[str, Any]]:
    out = []
    for model in state.catalog.models.values():
        for route in model.routes:
            entry = endpoint_entry(state, route)
            entry["base_url"] = base_url(state, route.provider)
            out.append(entry)
    return out


def routes_fragment(state: GatewayState) -> str:
    head = (
        "<tr><th>route</th><th>model</th><th>health</th><th class=n>uptime 5m / 30m / 1d</th>"
        "<th class=n>p50 / p99 ms</th><th class=n>TTFT p50 ms</th><th class=n>tok/s</th>"
        "<th class=n>$/1M in / out</th><th>base URL</th></tr>"
    )
    rows = []
    for r in _routes(state):
        css, why = route_health(r)
        eff = r["effective_price_per_1m"]
        price = f"{eff['input']:g} / {eff['output']:g}" + (" *" if eff["overridden"] else "")
        rows.append(
            f"<tr class='route {css}' data-route='{_e(r['route'])}' data-health='{css}'>"
            f"<td>{_e(r['route'])}</td><td>{_e(r['model'])}</td>"
            f"<td><span class='dot'></span>{_e(why)}</td>"
            f"<td class=n>{' / '.join(_pct(r['uptime'][w]) for w in ('5m', '30m', '1d'))}</td>"
            f"<td class=n>{_ms(r['latency']['p50_s'])} / {_ms(r['latency']['p99_s'])}</td>"
            f"<td class=n>{_ms(r['ttft']['p50_s'])}</td><td class=n>{_num(r['tokens_per_s'])}</td>"
            f"<td class=n>{price}</td><td>{_e(r['base_url'])}</td></tr>"
        )
    note = "<p class=note>* price overridden at run time (see Prices)</p>"
    return f"<table id='routes-table'>{head}{''.join(rows)}</table>{note}"


_METRICS = (
    ("uptime", "Uptime", percent, 1.0),
    ("latency_p50_s", "Latency p50", millis, None),
    ("latency_p99_s", "Latency p99", millis, None),
    ("ttft_p50_s", "Time to first token p50", millis, None),
    ("tokens_per_s", "Tokens/s (median)", plain, None),
    ("requests", "Attempts per bucket", plain, None),
)


async def charts_fragment(state: GatewayState, span: str) -> str:
    length, _ = SERIES[span]
    route_ids = [r.id for r in state.catalog.routes()]
    try:
        history = await state.stats.history(route_ids, span)
    except StatsUnavailableError:
        return "<p class='bad'>stats store unavailable (Redis down): no history to chart</p>"
    active = {
        route: points for route, points in history.items() if any(p.stats.requests for p in points)
    }
    if not active:
        return f"<p class=note>no traffic in the last {_e(span)}</p>"
    start = next(iter(active.values()))[0].start
    charts = []
    for field, title, fmt, y_max in _METRICS:
        series = []
        for route, points in active.items():
            values: list[float | None] = []
            for p in points:
                value = getattr(p.stats, field)
                values.append(
                    None
                    if value is None or (field != "requests" and not p.stats.requests)
                    else float(value)
                )
            series.append(Series(route, values))
        charts.append(
            line_chart(
                f"{title} — last {span}",
                series,
                start=start,
                step=length,
                y_format=fmt,
                y_max=y_max,
            )
        )
    return f"<div class='charts' data-span='{_e(span)}'>{''.join(charts)}</div>"


async def spend_fragment(state: GatewayState, by: str) -> str:
    today = time.time()
    days = [utc_day(today - i * DAY_S) for i in range(SPEND_DAYS - 1, -1, -1)]  # oldest first
    try:
        per_day = await asyncio.gather(*(state.stats.usage(by=by, day=day) for day in days))
    except StatsUnavailableError:
        return "<p class='bad'>usage store unavailable (Redis down)</p>"
    keys = sorted({k for usage in per_day for k in usage})
    stacks = [Series(k, [u[k].cost_usd if k in u else None for u in per_day]) for k in keys]
    chart = bar_chart(f"Spend per UTC day by {by}", [d[5:] for d in days], stacks, y_format=usd)
    totals = {k: _totals(t) for k, t in sorted(per_day[-1].items())}  # today's
    head = (
        "<tr><th>name</th><th class=n>requests</th><th class=n>prompt</th>"
        "<th class=n>completion</th><th class=n>USD</th></tr>"
    )
    body = "".join(
        f"<tr><td>{_e(k)}</td><td class=n>{t['requests']}</td>"
        f"<td class=n>{t['prompt_tokens']}</td><td class=n>{t['completion_tokens']}</td>"
        f"<td class=n>{t['cost_usd']:.6f}</td></tr>"
        for k, t in totals.items()
    )
    empty = "<tr><td colspan=5>none yet</td></tr>"
    return f"{chart}<h3>Today by {_e(by)}</h3><table>{head}{body or empty}</table>"


async def log_fragment(state: GatewayState, route: str | None, status: str) -> str:
    log = state.request_log
    if log is None:
        return "<p class=note>request log disabled</p>"
    data = await log.recent(LOG_LIMIT, route=route or None, status=status)
    head = (
        "<tr><th>time (UTC)</th><th>route</th><th>status</th><th>error</th>"
        "<th class=n>latency ms</th><th class=n>TTFT ms</th><th class=n>tokens in / out</th>"
        "<th class=n>USD</th><th>client</th></tr>"
    )
    rows = []
    for e in data["entries"]:
        css = GOOD if e.get("ok") else BAD
        tokens = f"{_num(e.get('prompt_tokens'), '{:d}')} / {e.get('completion_tokens', 0)}"
        rows.append(
            f"<tr class='logrow {css}'><td>{time.strftime('%H:%M:%S', time.gmtime(e['at']))}</td>"
            f"<td>{_e(e.get('route'))}</td><td>{_e(e.get('status'))}</td>"
            f"<td>{_e(e.get('error'))}</td><td class=n>{_num(e.get('latency_ms'), '{:.0f}')}</td>"
            f"<td class=n>{_num(e.get('ttft_ms'), '{:.0f}')}</td><td class=n>{tokens}</td>"
            f"<td class=n>{_num(e.get('cost_usd'), '{:.6f}')}</td>"
            f"<td>{_e(e.get('client'))}</td></tr>"
        )
    scope = "every replica" if data["shared"] else "this process"
    empty = "<tr><td colspan=9>no attempts yet</td></tr>"
    return (
        f"<p class=note>latest {len(rows)} attempts ({scope})</p>"
        f"<table id='log-table'>{head}{''.join(rows) or empty}</table>"
    )


async def prices_fragment(state: GatewayState) -> str:
    overrides = state.prices.overrides()
    history = await state.prices.history(30)
    head = "<tr><th>route</th><th class=n>$/1M in</th><th class=n>$/1M out</th><th>since</th></tr>"
    rows = "".join(
        f"<tr><td>{_e(rid)}</td><td class=n>{o.input:g}</td><td class=n>{o.output:g}</td>"
        f"<td>{time.strftime('%Y-%m-%d %H:%M', time.gmtime(o.set_at))}</td></tr>"
        for rid, o in sorted(overrides.items())
    )
    hist = "".join(
        f"<tr class='change'><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(c['at']))}</td>"
        f"<td>{_e(c['by'])}</td><td>{_e(c['action'])}</td><td>{_e(c['route_id'])}</td>"
        f"<td class=n>{c['input']:g} / {c['output']:g}</td></tr>"
        for c in history["changes"]
    )
    scope = "shared through Redis" if state.prices.shared else "this process only (no Redis)"
    return (
        f"<p class=note>Overrides are {scope}.</p>"
        f"<table id='overrides'>{head}{rows or '<tr><td colspan=4>none</td></tr>'}</table>"
        "<h3>History</h3><table id='price-history'><tr><th>when (UTC)</th><th>who</th>"
        "<th>action</th><th>route</th><th class=n>$/1M in / out</th></tr>"
        f"{hist or '<tr><td colspan=5>no changes yet</td></tr>'}</table>"
    )


def _live(name: str, query: dict[str, str], inner: str) -> str:
    url = f"/admin/fragments/{name}" + (f"?{urlencode(query)}" if query else "")
    return (
        f"<div id='{name}' hx-get='{_e(url)}' hx-trigger='every {REFRESH_S}s' "
        f"hx-swap='innerHTML'>{inner}</div>"
    )


def price_form(state: GatewayState) -> str:
    options = "".join(
        f"<option value='{_e(r.id)}'>{_e(r.id)}</option>" for r in state.catalog.routes()
    )
    return (
        "<form method='post' action='/admin/prices' id='price-form'>"
        f"<select name='route_id'>{options}</select> "
        "<label>$/1M in <input type='text' name='input' size=6></label> "
        "<label>$/1M out <input type='text' name='output' size=6></label> "
        "<button name='action' value='set'>set</button> "
        "<button name='action' value='clear'>reset to catalog</button></form>"
    )


async def shell(
    state: GatewayState,
    *,
    span: str,
    by: str,
    route: str | None,
    status: str,
    user: str,
    notice: str = "",
) -> str:
    spans = " ".join(
        f"<a class='{'on' if s == span else ''}' href='?{urlencode({'span': s, 'by': by})}'>{s}</a>"
        for s in SERIES
    )
    groups = " ".join(
        f"<a class='{'on' if g == by else ''}' href='?{urlencode({'span': span, 'by': g})}'>{g}</a>"
        for g in USAGE_GROUPS
    )
    route_options = "<option value=''>all routes</option>" + "".join(
        f"<option value='{_e(r.id)}'{' selected' if r.id == route else ''}>{_e(r.id)}</option>"
        for r in state.catalog.routes()
    )
    status_options = "".join(
        f"<option{' selected' if s == status else ''}>{s}</option>" for s in STATUS_FILTERS
    )
    log_query = {"route": route or "", "status": status}
    body = (
        (f"<p class='bad'>{_e(notice)}</p>" if notice else "")
        + f"<nav>signed in as <b>{_e(user)}</b> · refresh every {REFRESH_S}s · "
        "<form method='post' action='/admin/logout' class=inline><button>Sign out</button></form>"
        "</nav>"
        + "<h2>Routes</h2>"
        + _live("routes", {}, routes_fragment(state))
        + f"<h2>History</h2><p class=tabs>span: {spans}</p>"
        + _live("charts", {"span": span}, await charts_fragment(state, span))
        + f"<h2>Spend</h2><p class=tabs>by: {groups}</p>"
        + _live("spend", {"by": by}, await spend_fragment(state, by))
        + "<h2>Request log</h2><form id='log-filter' method='get' action='/admin'>"
        f"<input type='hidden' name='span' value='{_e(span)}'>"
        f"<input type='hidden' name='by' value='{_e(by)}'>"
        f"<select name='route'>{route_options}</select> "
        f"<select name='status'>{status_options}</select> <button>filter</button></form>"
        + _live("log", log_query, await log_fragment(state, route, status))
        + "<h2>Prices</h2>"
        + price_form(state)
        + _live("prices", {}, await prices_fragment(state))
    )
    return page("moe-gateway admin", body, state.settings.secrets(), scripts=True)
