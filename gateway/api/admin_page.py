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
from gateway.stats.base import USAGE_GROUPS, StatsUnavailableError, UsageTotals


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
    for by in USAGE_GROUPS:
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
body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#1f2937;max-width:1400px}
h2{margin:1.4em 0 .4em;border-bottom:1px solid #e5e7eb}
table{border-collapse:collapse;margin-bottom:1em;font-size:13px}
th,td{border-bottom:1px solid #e5e7eb;padding:4px 8px;text-align:left;white-space:nowrap}
th{background:#f9fafb} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#6b7280;font-size:13px} .inline{display:inline}
.dot{display:inline-block;width:.7em;height:.7em;border-radius:50%;margin-right:.4em;
background:#9ca3af} tr.good .dot{background:#16a34a} tr.warn .dot{background:#d97706}
tr.bad .dot{background:#dc2626} tr.bad td{color:#b91c1c} tr.off td{color:#9ca3af}
tr.logrow.bad td{color:#b91c1c} p.bad{color:#b91c1c}
.tabs a{margin-right:.6em} .tabs a.on{font-weight:bold;text-decoration:none;color:#111}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:1em}
figure.chart{margin:0;max-width:720px}
figure svg{width:100%;height:auto;font-size:11px;fill:#6b7280}
figure svg .grid{stroke:#e5e7eb} figcaption{font-size:13px;font-weight:600}
.legend{font-size:12px} .key{margin-right:1em} .key i{display:inline-block;width:.8em;
height:.8em;margin-right:.3em;vertical-align:middle}
"""

HTMX = "/admin/static/htmx.min.js"


def _e(value: object) -> str:
    return html.escape("—" if value is None else str(value))


MIN_SECRET_LEN = 8  # shorter "secrets" would blank out ordinary letters of the page


def page(title: str, body: str, secrets: tuple[str, ...] = (), *, scripts: bool = False) -> str:
    script = f"<script src='{HTMX}' defer></script>" if scripts else ""
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_STYLE}</style>{script}</head><body><h1>{_e(title)}</h1>{body}</body></html>"
    )
    return redact_html(doc, secrets)


def redact_html(text: str, secrets: tuple[str, ...]) -> str:
    """Every configured secret (long enough to be one) and credential pattern scrubbed."""
    return redact(text, tuple(s for s in secrets if len(s) >= MIN_SECRET_LEN))


def login_page(error: str | None = None) -> str:
    message = f"<p class='bad'>{_e(error)}</p>" if error else ""
    return page(
        "moe-gateway admin: sign in",
        f"{message}<form method='post' action='/admin/login'>"
        "<label>Your name <input type='text' name='name' maxlength=40 "
        "placeholder='shown in the price history'></label> "
        "<label>Admin token <input type='password' name='token' autofocus></label> "
        "<button type='submit'>Sign in</button></form>",
    )
