"""What the admin dashboard shows, as data (`dashboard_data`) and as one HTML page.

Nothing here may carry a credential: base URLs go through `safe_url` (no userinfo, query or
fragment), keys appear only as "configured: yes/no", the Redis URL not at all, and the rendered
page is passed through `redact()` with every configured secret as a last line of defence.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlsplit

from gateway.api.catalog_routes import endpoint_entry
from gateway.api.state import GatewayState
from gateway.errors import redact
from gateway.stats.base import StatsUnavailableError, UsageTotals


def safe_url(url: str | None) -> str | None:
    """scheme://host[:port]/path of a URL: userinfo, query and fragment dropped."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else "(invalid URL)"


def base_url(state: GatewayState, provider: str) -> str | None:
    if provider == "local" and state.settings.local_base_url is None:
        return "in-process" if state.settings.local_model_dir else None
    configured = state.settings.provider_base_url(provider)
    spec = state.catalog.providers.get(provider)
    return safe_url(configured or (spec.base_url if spec else None))


def _totals(totals: UsageTotals) -> dict[str, Any]:
    return {
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "cost_usd": totals.cost_usd,
    }


async def spend_today(state: GatewayState) -> dict[str, Any]:
    """Today's usage (UTC) by route, model and client key id; None where the store is down."""
    out: dict[str, Any] = {}
    for by in ("route", "model", "client"):
        try:
            usage = await state.stats.usage(by=by)
        except StatsUnavailableError:
            out[by] = None
            continue
        out[by] = {name: _totals(totals) for name, totals in sorted(usage.items())}
    return out


async def dashboard_data(state: GatewayState) -> dict[str, Any]:
    routes = []
    for model in state.catalog.models.values():
        for route in model.routes:
            entry = endpoint_entry(state, route)
            entry["base_url"] = base_url(state, route.provider)
            entry["configured"] = route.provider in state.providers
            routes.append(entry)
    overrides = {
        route_id: {"input": o.input, "output": o.output, "set_at": o.set_at}
        for route_id, o in sorted(state.prices.overrides().items())
    }
    return {
        "routes": routes,
        "overrides": overrides,
        "prices_shared": state.prices.shared,
        "spend_today": await spend_today(state),
    }


# -- HTML -----------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-bottom:2em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}
th{background:#f3f3f3} .bad{color:#b00} .ok{color:#070} input[type=text]{width:5em}
form.inline{display:inline}
"""


def _e(value: object) -> str:
    return html.escape("—" if value is None else str(value))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _secs(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f} ms"


MIN_SECRET_LEN = 8  # shorter "secrets" would blank out ordinary letters of the page


def page(title: str, body: str, secrets: tuple[str, ...] = ()) -> str:
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>{body}</body></html>"
    )
    return redact(doc, tuple(s for s in secrets if len(s) >= MIN_SECRET_LEN))


def login_page(error: str | None = None) -> str:
    message = f"<p class='bad'>{_e(error)}</p>" if error else ""
    return page(
        "moe-gateway admin: sign in",
        f"{message}<form method='post' action='/admin/login'>"
        "<label>Admin token <input type='password' name='token' autofocus></label> "
        "<button type='submit'>Sign in</button></form>",
    )


def _route_row(r: dict[str, Any]) -> str:
    eff = r["effective_price_per_1m"]
    status_class = "ok" if r["state"] == "available" else "bad"
    price_form = (
        "<form class='inline' method='post' action='/admin/prices'>"
        f"<input type='hidden' name='route_id' value='{_e(r['route'])}'>"
        f"<input type='text' name='input' value='{eff['input']:g}'>"
        f"<input type='text' name='output' value='{eff['output']:g}'>"
        "<button name='action' value='set'>set</button>"
        + ("<button name='action' value='clear'>reset</button>" if eff["overridden"] else "")
        + "</form>"
    )
    cells = [
        _e(r["model"]),
        _e(r["route"]),
        _e(r["base_url"]),
        f"{r['price_per_1m']['input']:g} / {r['price_per_1m']['output']:g}",
        price_form + (" <b>override</b>" if eff["overridden"] else ""),
        _e(r["context_length"]),
        f"<span class='{status_class}'>{_e(r['state'])}</span>",
        " / ".join(_pct(r["uptime"][w]) for w in ("5m", "30m", "1d")),
        f"{_secs(r['latency']['p50_s'])} / {_secs(r['latency']['p99_s'])}",
        f"{_secs(r['ttft']['p50_s'])} / {_secs(r['ttft']['p99_s'])}",
        _e(None if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"),
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _spend_table(title: str, rows: dict[str, Any] | None) -> str:
    if rows is None:
        return f"<h3>{_e(title)}</h3><p class='bad'>usage store unavailable</p>"
    head = "<tr><th>name</th><th>requests</th><th>prompt</th><th>completion</th><th>USD</th></tr>"
    body = "".join(
        f"<tr><td>{_e(name)}</td><td>{t['requests']}</td><td>{t['prompt_tokens']}</td>"
        f"<td>{t['completion_tokens']}</td><td>{t['cost_usd']:.6f}</td></tr>"
        for name, t in rows.items()
    )
    return (
        f"<h3>{_e(title)}</h3><table>{head}{body or '<tr><td colspan=5>none yet</td></tr>'}</table>"
    )


def dashboard_page(data: dict[str, Any], secrets: tuple[str, ...], notice: str = "") -> str:
    head = (
        "<tr><th>model</th><th>route</th><th>base URL</th><th>catalog $/1M in / out</th>"
        "<th>effective $/1M in / out</th><th>context</th><th>status</th>"
        "<th>uptime 5m / 30m / 1d</th><th>latency p50 / p99</th><th>TTFT p50 / p99</th>"
        "<th>tokens/s</th></tr>"
    )
    rows = "".join(_route_row(r) for r in data["routes"])
    shared = "shared through Redis" if data["prices_shared"] else "this process only (no Redis)"
    spend = data["spend_today"]
    body = (
        (f"<p class='bad'>{_e(notice)}</p>" if notice else "")
        + "<form method='post' action='/admin/logout'><button>Sign out</button></form>"
        + f"<h2>Routes</h2><p>Price overrides: {_e(shared)}.</p><table>{head}{rows}</table>"
        + "<h2>Spend today (UTC)</h2>"
        + _spend_table("by route", spend["route"])
        + _spend_table("by model", spend["model"])
        + _spend_table("by client key id", spend["client"])
    )
    return page("moe-gateway admin", body, secrets)
