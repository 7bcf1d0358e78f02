"""Refusing cross-site requests to state-changing endpoints: one dependency for a whole router.

    router = APIRouter(prefix="/admin", dependencies=[Depends(guard)])
    async def guard(request):                    # e.g. skip while the feature is disabled
        refuse_cross_site(request, allowed_origins)

A browser tells where a request comes from: `Sec-Fetch-Site` (current browsers), `Origin` (every
cross-origin POST, whatever its content type), `Referer` (older ones). A request that changes
state (any method but GET / HEAD / OPTIONS) is refused with a 403 when any of them names another
site. Checking the session cookie's SameSite flag or the HTML form alone is not enough: a
`text/plain` POST from a foreign page to a JSON API carries the cookie in some browsers and
needs no CORS preflight. Clients that send none of the headers (curl, SDKs, tests) are not
browsers and pass; they authenticate with a bearer token that a foreign page cannot attach.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from fastapi import Request

from gateway.errors import GatewayError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME_SITE_FETCH = frozenset({"same-origin", "none"})  # "none": typed in, a bookmark


class CrossSiteRequest(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "cross_site_request"


def _origin_of(url: str) -> str:
    parts = urlsplit(url.strip())
    return parts.netloc.lower() if parts.scheme in ("http", "https") else ""


def cross_site_reason(
    headers: Mapping[str, str], host: str, allowed_origins: Iterable[str] = ()
) -> str | None:
    """Why this request comes from another site, or None when it does not (or cannot tell)."""
    allowed = {host.lower()} | {_origin_of(o) or o.lower() for o in allowed_origins}
    allowed.discard("")
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.strip().lower() not in _SAME_SITE_FETCH:
        return f"the browser marked it {fetch_site.strip().lower()!r}"
    origin = headers.get("origin")
    if origin is not None:
        if _origin_of(origin) not in allowed:  # "null" (sandboxed frames, redirects) included
            return "its Origin is another site"
        return None
    referer = headers.get("referer")
    if referer is not None and _origin_of(referer) not in allowed:
        return "its Referer is another site"
    return None


def refuse_cross_site(request: Request, allowed_origins: Iterable[str] = ()) -> None:
    """Raise CrossSiteRequest (403) for a state-changing request from another site."""
    if request.method in SAFE_METHODS:
        return
    reason = cross_site_reason(request.headers, request.headers.get("host", ""), allowed_origins)
    if reason is not None:
        raise CrossSiteRequest(f"cross-site request refused: {reason}")
