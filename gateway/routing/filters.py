"""Why a route may not serve a request: the router's filters, first failing one wins.

    context fit                      RankedRoute.fit_error (routing.py evaluates it)
    provider.ignore / provider.only  the request's `provider` object (routing_prefs.py)
    provider.order without fallbacks
    availability                     hosted: key set; local: configured and has capacity
    provider limits                  e.g. DeepInfra n <= 2, stop <= 16 (pricing.yaml `limits`)
    provider.require_parameters      route/provider `unsupported_params` used by the request
    provider.max_price               effective prices (overrides included)

Without require_parameters a route that does not support a parameter stays a candidate and
the parameter is dropped for it (`RoutePlan.dropped_params`, `RoutePlan.body_for`); limits
are never dropped silently (three answers where the client asked for n=3 would be wrong).

Every reason but availability is the request's own doing (`ClientExcluded`; an unavailable
route the request would rule out anyway counts as such): when such reasons rule out every
route, the request can never be served as asked, and the router answers OpenRouter's 404
instead of a 503 (router.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.catalog import ProviderSpec, Route
from gateway.errors import InvalidRequest
from gateway.routing.order import RankedRoute
from gateway.routing.prefs import DEFAULT_PREFS, ProviderPrefs, order_index, route_matches

# Gateway-only fields never sent upstream, and fields every route takes; anything else a
# request sets is a "parameter" for unsupported_params / require_parameters.
GATEWAY_FIELDS = frozenset({"models", "provider", "route", "transforms"})
_NOT_PARAMS = GATEWAY_FIELDS | {
    "model",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "user",
}


class ClientExcluded(str):
    """A skip reason that is the request's own choice: preferences, parameters, size."""


MAX_BUDGET = 2**31 - 1  # as api/schemas.py: a completion budget is an int32 everywhere


@dataclass(frozen=True, slots=True)
class Limits:
    max_n: int | None
    max_stop: int | None
    default_max_tokens: int | None

    @classmethod
    def of(cls, spec: ProviderSpec) -> Limits:
        return cls(spec.limits.max_n, spec.limits.max_stop, spec.limits.default_max_tokens)


@dataclass(frozen=True, slots=True)
class Asked:
    """What the filters need from the body, read once per plan."""

    n: int | None
    stops: int  # stop sequences in a list (a single string never hits a limit)
    params: frozenset[str]

    @classmethod
    def of(cls, body: dict[str, Any]) -> Asked:
        n = body.get("n")
        stop = body.get("stop")
        return cls(
            n=n if isinstance(n, int) else None,
            stops=len(stop) if isinstance(stop, list) else 0,
            params=frozenset(k for k, v in body.items() if v is not None and k not in _NOT_PARAMS),
        )


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    """max_completion_tokens, else max_tokens; None when the client set neither."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BUDGET:
            raise InvalidRequest(f"{key}: must be an integer from 1 to {MAX_BUDGET}", param=key)
        return value
    return None


def limit_error(route: Route, limits: Limits, asked: Asked) -> str | None:
    if limits.max_n is not None and asked.n is not None and asked.n > limits.max_n:
        return f"n={asked.n} above {route.provider}'s limit of {limits.max_n}"
    if limits.max_stop is not None and asked.stops > limits.max_stop:
        return f"{asked.stops} stop sequences above {route.provider}'s limit of {limits.max_stop}"
    return None


def skip_reason(e: RankedRoute, limits: Limits, prefs: ProviderPrefs, asked: Asked) -> str | None:
    """Why `e` is not a candidate (the first failing filter), or None when it is one."""
    later = later_skip(e.route, limits, prefs, asked, e.input_price, e.output_price)
    return combine(e.fit_error, preference_skip(e.route, prefs), e.unavailable, later)


def combine(
    fit_error: str | None, preference: str | None, unavailable: str | None, later: str | None
) -> str | None:
    """The first failing filter. Every reason but availability is the request's own doing
    (`ClientExcluded`); an unavailable route the request would rule out anyway counts as such."""
    if fit_error is not None:
        return ClientExcluded(fit_error)
    if preference is not None:
        return preference
    if unavailable is not None:
        return unavailable if later is None else ClientExcluded(f"{later}; {unavailable}")
    return later


def preference_skip(route: Route, prefs: ProviderPrefs) -> ClientExcluded | None:
    """The filters between context fit and availability: provider.ignore / only / order."""
    if prefs is DEFAULT_PREFS:  # the common case, kept short
        return None
    if any(route_matches(entry, route) for entry in prefs.ignore):
        return ClientExcluded("ignored by provider.ignore")
    if prefs.only is not None and not any(route_matches(x, route) for x in prefs.only):
        return ClientExcluded("not in provider.only")
    if prefs.order and not prefs.allow_fallbacks and order_index(prefs, route) is None:
        return ClientExcluded("not in provider.order and provider.allow_fallbacks is false")
    return None


def later_skip(
    route: Route,
    limits: Limits,
    prefs: ProviderPrefs,
    asked: Asked,
    input_price: float,
    output_price: float,
) -> ClientExcluded | None:
    """The filters after availability: provider limits, require_parameters, max_price. None
    of them depends on the prompt's size, so the router caches the answer (route_facts.py)."""
    limit = limit_error(route, limits, asked)
    if limit is not None or prefs is DEFAULT_PREFS:
        return None if limit is None else ClientExcluded(limit)
    if prefs.require_parameters:
        missing = sorted(asked.params & route.unsupported_params)
        if missing:
            why = f"does not support {', '.join(missing)} (provider.require_parameters)"
            return ClientExcluded(why)
    prompt_cap, completion_cap = prefs.max_prompt_price, prefs.max_completion_price
    if (prompt_cap is not None and input_price > prompt_cap) or (
        completion_cap is not None and output_price > completion_cap
    ):
        why = f"price {input_price:g}/{output_price:g} per 1M above provider.max_price"
        return ClientExcluded(why)
    return None
