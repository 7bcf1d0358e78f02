"""What the router knows about a route before it sees the prompt: cached per request shape.

    facts = RouteFacts.of(route, limits, prices, prefs, asked, max_tokens, unavailable)
    e = facts.evaluate(fit_tokens, cost_tokens, max_tokens, exact)     # one request's size
    reason = facts.skip(e)                                             # filters.skip_reason

Of a plan's per-route work only the context fit and the cost depend on the prompt's size; the
effective prices, the completion budget, the output-limit check, the provider filters, limits,
require_parameters, max_price and the dropped parameters depend on the model, the `provider`
object, max_tokens and which parameters are set. `FactsCache` keeps those per (model,
max_tokens, provider object, asked) and drops everything when a price changes (the PriceBook's
generation). Availability is cached only when it says the route is not part of this
deployment (no key: fixed at start); a configured provider is asked again on every plan (the
local backend's capacity changes). Health is never cached: it is read on every plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.catalog import Route
from gateway.prices import PriceBook
from gateway.routing.filters import Asked, Limits, combine, later_skip, preference_skip
from gateway.routing.order import NO_HEALTH, RankedRoute
from gateway.routing.prefs import ProviderPrefs

TYPICAL_COMPLETION_TOKENS = 256  # prices the completion when the request sets no max_tokens
_FLOAT_EXACT = 2**53
MAX_CACHED_SHAPES = 1024  # distinct request shapes kept; a flood of unique ones only clears it


def request_cost(prompt: int, completion: int, input_price: float, output_price: float) -> float:
    """USD for the token mix; prices are USD per 1M tokens. Counts are capped at 2^53 (exact
    as floats): a bigger one fails every context check anyway and must not overflow float()."""
    prompt, completion = min(prompt, _FLOAT_EXACT), min(completion, _FLOAT_EXACT)
    return (prompt * input_price + completion * output_price) / 1e6


def context_error(route: Route, prompt_tokens: int, budget: int | None, exact: bool) -> str:
    size = f"{prompt_tokens} tokens" if exact else f"up to {prompt_tokens} tokens"
    if budget is None:
        return f"prompt ({size}) leaves no room in the context of {route.context}"
    return f"prompt ({size}) + max_tokens ({budget}) exceeds the context of {route.context}"


@dataclass(frozen=True, slots=True)
class RouteFacts:
    route: Route
    input_price: float
    output_price: float
    budget: int | None  # max_tokens, else the provider's default
    output_error: str | None  # the budget is above the route's output limit
    preference_skip: str | None  # provider.ignore / only / order
    unavailable: str | None  # cached only when `static_unavailable`
    static_unavailable: bool
    later_skip: str | None  # limits, require_parameters, max_price
    dropped: tuple[str, ...]  # parameters the route does not take, dropped for it

    @classmethod
    def of(
        cls,
        route: Route,
        limits: Limits,
        prices: PriceBook,
        prefs: ProviderPrefs,
        asked: Asked,
        max_tokens: int | None,
        unavailable: str | None,
        static_unavailable: bool,
    ) -> RouteFacts:
        budget = max_tokens if max_tokens is not None else limits.default_max_tokens
        output_error = None
        if budget is not None and route.max_output is not None and budget > route.max_output:
            output_error = f"max_tokens {budget} above the output limit of {route.max_output}"
        input_price, output_price = prices.effective(route)
        dropped: tuple[str, ...] = ()
        if asked.params and route.unsupported_params:
            dropped = tuple(sorted(asked.params & route.unsupported_params))
        return cls(
            route,
            input_price,
            output_price,
            budget,
            output_error,
            preference_skip(route, prefs),
            unavailable if static_unavailable else None,
            static_unavailable,
            later_skip(route, limits, prefs, asked, input_price, output_price),
            dropped,
        )

    def evaluate(
        self,
        fit_tokens: int,
        cost_tokens: int,
        max_tokens: int | None,
        exact: bool,
        unavailable: str | None,
    ) -> RankedRoute:
        """The route for one request's size (health filled in later, for candidates only)."""
        route, budget = self.route, self.budget
        fit_error = self.output_error
        if fit_error is None and (
            fit_tokens >= route.context if budget is None else fit_tokens + budget > route.context
        ):
            fit_error = context_error(route, fit_tokens, budget, exact)
        if max_tokens is not None:
            completion = max_tokens
        else:
            room = max(route.context - cost_tokens, 1)
            completion = min(TYPICAL_COMPLETION_TOKENS, budget or room, room)
        return RankedRoute(
            route,
            self.input_price,
            self.output_price,
            completion,
            request_cost(cost_tokens, completion, self.input_price, self.output_price),
            fit_error,
            unavailable,
            NO_HEALTH,
        )

    def skip(self, e: RankedRoute) -> str | None:
        """filters.skip_reason, from what is cached and this request's fit and availability."""
        return combine(e.fit_error, self.preference_skip, e.unavailable, self.later_skip)

    @property
    def room(self) -> int | None:
        """The largest prompt that fits with the budget; None when nothing fits (the budget is
        above the output limit)."""
        if self.output_error is not None:
            return None
        context = self.route.context
        return context - 1 if self.budget is None else context - self.budget


def fits_every_route(facts: list[RouteFacts]) -> int:
    """The largest prompt (tokens) that fits every route its budget lets fit at all: for
    prompts up to it no route's candidacy depends on the prompt's size (-1: no route)."""
    rooms = [room for room in (f.room for f in facts) if room is not None]
    return min(rooms) if rooms else -1


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """One model's routes for one request shape."""

    routes: list[RouteFacts]
    fit_all_up_to: int  # fits_every_route(routes)

    @classmethod
    def of(cls, routes: list[RouteFacts]) -> ModelFacts:
        return cls(routes, fits_every_route(routes))


class FactsCache:
    """Route facts per request shape, valid while the prices stay as they were."""

    def __init__(self, prices: PriceBook):
        self._prices = prices
        self._generation = prices.generation
        self._shapes: dict[Any, ModelFacts] = {}

    def get(self, key: Any, build: Callable[[], ModelFacts]) -> ModelFacts:
        generation = self._prices.generation
        if self._generation != generation:
            self._shapes.clear()
            self._generation = generation
        found = self._shapes.get(key)
        if found is None:
            found = build()
            if len(self._shapes) >= MAX_CACHED_SHAPES:
                self._shapes.clear()
            self._shapes[key] = found
        return found
