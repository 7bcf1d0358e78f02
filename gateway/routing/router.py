"""Which routes may serve a request, and in what order: `Router`.

    router = Router(catalog, prices, stats, available, counter, rng)
    plan = router.plan(body, "chat")    # RoutePlan: ordered candidates + why others were skipped
    plan = await router.aplan(body)     # the same; an exact token count runs in a thread
    router.rank("wizardlm-2-8x22b", prompt_tokens=2000, max_tokens=500)   # `gateway cheapest`

Both go through `_evaluate` (effective price for the token mix, context fit, health), so the CLI
ranks exactly as the server routes. `plan`:

1. models: `model`, then the `models` fallback list (unknown name: ModelNotFound, 404);
2. per model, each route is evaluated for this request's size: the prompt is bounded cheaply
   and counted exactly with the model's tokenizer only when the bound does not fit some route
   (prompt.py); the completion budget is max_tokens, else the provider's default
   (DeepInfra 512), else whatever the route's context leaves;
3. filters, the first failing one named in `skipped` (filters.py): context fit,
   provider.ignore/only, allow_fallbacks with order, availability (hosted: key set; local:
   configured and has capacity), provider limits (DeepInfra n <= 2, stop <= 16),
   require_parameters, max_price (effective prices, overrides included);
4. order (order.py; prefs.py parses the `provider` object): provider.order
   entries first, exactly as the client listed them; then, by default, OpenRouter-style load
   balancing: a weighted random order with weight 1/cost² for this request's token mix among
   healthy routes; routes with recent failures (open circuit, consecutive failures) after
   them, the least failing first; the local route of last resort at the very end.
   `provider.sort` replaces the random order by a deterministic one (price asc, throughput
   desc, latency p50 asc); with sort=price the last-resort route takes its place by price only
   when it is the cheapest. allow_fallbacks=false without an order keeps the first choice only.

A prompt that fits no configured route of any requested model is the client's error
(ContextLengthExceeded, 400); routes that fit but are all filtered out are ours (NoEligibleRoute,
503, with `skipped`). Routes without a key or backend are not this deployment's: they do not
make a prompt "fit" (a 64k hosted route with no key does not excuse an 8k local one).
The decision itself takes tens of microseconds (bench/routing.py, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.catalog import Catalog, CatalogError, Model, Route
from gateway.errors import ContextLengthExceeded, ModelNotFound, NoEligibleRoute
from gateway.prices import PriceBook
from gateway.routing.filters import (
    GATEWAY_FIELDS,
    Asked,
    Limits,
    requested_max_tokens,
    skip_reason,
)
from gateway.routing.order import (
    NO_HEALTH,
    RankedRoute,
    by_cost,
    first_choice_shares,
    order_routes,
)
from gateway.routing.prefs import (
    DEFAULT_PREFS,
    ProviderPrefs,
    parse_model_list,
    parse_provider_prefs,
)
from gateway.routing.prompt import (
    MINIMAL_CHAT,
    PromptCounterLike,
    PromptText,
    without_surrogates,
)
from gateway.stats.base import StatsStore

_FLOAT_EXACT = 2**53
TYPICAL_COMPLETION_TOKENS = 256  # prices the completion when the request sets no max_tokens

Availability = set[str] | frozenset[str] | Callable[[str], bool | str | None]


@dataclass(slots=True)
class RoutePlan:
    model: Model  # the primary model
    candidates: list[Route]  # in the order to try them (fallback models' routes after)
    skipped: dict[str, str]  # route id -> why it is not a candidate
    prompt_tokens: int  # primary model: exact count, or the cheap estimate
    prompt_tokens_exact: bool
    max_tokens: int | None = None  # as the client asked (None: provider default)
    models: list[Model] = field(default_factory=list)  # primary + fallbacks, in order
    dropped_params: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per route id
    estimated_cost: dict[str, float] = field(default_factory=dict)  # per candidate, USD

    def body_for(self, route: Route, body: dict[str, Any]) -> dict[str, Any]:
        """The body to send `route`: gateway-only fields and the route's dropped params removed."""
        drop = GATEWAY_FIELDS.union(self.dropped_params.get(route.id, ()))
        return {k: v for k, v in body.items() if k not in drop}


class _CountNeeded(Exception):
    """aplan(): this model's prompt must be counted exactly (off the event loop) first."""

    def __init__(self, model: Model, key: tuple[str, str], body: dict[str, Any]):
        self.model = model
        self.key = key
        self.body = body  # what to count (lone surrogates replaced, see routing_prompt.py)


def request_cost(prompt: int, completion: int, input_price: float, output_price: float) -> float:
    """USD for the token mix; prices are USD per 1M tokens. Counts are capped at 2^53 (exact
    as floats): a bigger one fails every context check anyway and must not overflow float()."""
    prompt, completion = min(prompt, _FLOAT_EXACT), min(completion, _FLOAT_EXACT)
    return (prompt * input_price + completion * output_price) / 1e6


class NotConfigured(str):
    """An unavailability reason meaning the route is not part of this deployment at all (no key,
    no backend), as opposed to a passing one (at capacity). Such routes do not count when
    deciding whether a prompt is too long for every route."""


def available_from(providers: Mapping[str, Any]) -> Callable[[str], str | None]:
    """Availability from the configured providers (`GatewayState.providers`)."""

    def check(name: str) -> str | None:
        provider = providers.get(name)
        if provider is None:
            if name == "local":
                return NotConfigured("local backend not configured")
            return NotConfigured(f"no API key configured ({name.upper()}_API_KEY)")
        if provider.has_capacity():
            return None
        # a provider that knows why (the local backend: loading, failed, queue full) says so
        explain = getattr(provider, "unavailable_reason", None)
        return (explain() if explain is not None else None) or "at capacity"

    return check


def _context_error(route: Route, prompt_tokens: int, budget: int | None, exact: bool) -> str:
    size = f"{prompt_tokens} tokens" if exact else f"up to {prompt_tokens} tokens"
    if budget is None:
        return f"prompt ({size}) leaves no room in the context of {route.context}"
    return f"prompt ({size}) + max_tokens ({budget}) exceeds the context of {route.context}"


class Router:
    def __init__(
        self,
        catalog: Catalog,
        prices: PriceBook,
        stats: StatsStore,
        available: Availability,
        counter: PromptCounterLike | None = None,
        rng: random.Random | None = None,
    ):
        self.catalog = catalog
        self._prices = prices
        self._stats = stats
        self._counter = counter
        self._rng = rng or random.Random()
        if callable(available):
            self._available: Callable[[str], bool | str | None] = available
        else:
            names = frozenset(available)
            self._available = lambda name: name in names
        self._limits = {name: Limits.of(spec) for name, spec in catalog.providers.items()}
        # Per model: the counter's sound bound of a minimal chat (template overhead), so plain
        # chats are bounded without rendering them (prompt.py).
        self._allowance: dict[str, int] = {}
        if counter is not None:
            for model in catalog.models.values():
                try:
                    self._allowance[model.id] = counter.bound(model, MINIMAL_CHAT, "chat")
                except ValueError as exc:  # e.g. a chat_format the tokenizer cannot serve
                    raise CatalogError(f"{catalog.source}: models.{model.id}: {exc}") from None

    def prompt_bound(
        self, model: Model, text: PromptText, body: dict[str, Any], endpoint: str
    ) -> int:
        """A sound upper bound of the prompt's tokens in `model`'s format, without tokenizing."""
        if self._counter is None or text.completions:
            return text.bound()  # completions: no template, the byte bound is the counter's
        allowance = self._allowance.get(model.id)
        if text.plain and allowance is not None:
            return text.bound(allowance)
        return self._counter.bound(model, body, endpoint)  # renders the chat: tools, parts

    # -- evaluation shared by rank() and plan() ------------------------------------------------

    def unavailable(self, route: Route) -> str | None:
        """Why the route's provider cannot take a request now; None when it can."""
        answer = self._available(route.provider)
        if answer is True or answer is None:
            return None
        if answer is False:
            if route.kind == "local":
                return "local backend not configured or at capacity"
            return NotConfigured(f"no API key configured ({route.provider.upper()}_API_KEY)")
        return answer if isinstance(answer, str) else str(answer)

    def _evaluate(
        self,
        route: Route,
        fit_tokens: int,
        cost_tokens: int,
        max_tokens: int | None,
        exact: bool = True,
        with_health: bool = True,
    ) -> RankedRoute:
        budget = max_tokens
        if budget is None:
            budget = self._limits[route.provider].default_max_tokens
        fit_error = None
        if budget is not None and route.max_output is not None and budget > route.max_output:
            fit_error = f"max_tokens {budget} above the output limit of {route.max_output}"
        elif fit_tokens >= route.context if budget is None else fit_tokens + budget > route.context:
            fit_error = _context_error(route, fit_tokens, budget, exact)
        if max_tokens is not None:
            completion = max_tokens
        else:
            room = max(route.context - cost_tokens, 1)
            completion = min(TYPICAL_COMPLETION_TOKENS, budget or room, room)
        input_price, output_price = self._prices.effective(route)
        return RankedRoute(
            route,
            input_price,
            output_price,
            completion,
            request_cost(cost_tokens, completion, input_price, output_price),
            fit_error,
            self.unavailable(route),
            self._stats.route_health(route.id) if with_health else NO_HEALTH,
        )

    def resolve(self, name: str, param: str = "model") -> Model:
        model = self.catalog.resolve(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} does not exist", param=param)
        return model

    def rank(
        self, model: str | Model, prompt_tokens: int, max_tokens: int | None
    ) -> list[RankedRoute]:
        """Every route of the model, cheapest first for this mix (fit and health included)."""
        if isinstance(model, str):
            model = self.resolve(model)
        evals = [self._evaluate(r, prompt_tokens, prompt_tokens, max_tokens) for r in model.routes]
        evals.sort(key=by_cost)
        return evals

    def traffic_shares(
        self, model: str | Model, prompt_tokens: int, max_tokens: int | None
    ) -> dict[str, float]:
        """Route id -> the share of such requests the server tries on it first: plan()'s own
        filters (default `provider` preferences) and order_routes()'s 1/cost² weights."""
        if isinstance(model, str):
            model = self.resolve(model)
        asked = Asked.of({} if max_tokens is None else {"max_tokens": max_tokens})
        eligible = []
        for r in model.routes:
            e = self._evaluate(r, prompt_tokens, prompt_tokens, max_tokens)
            if skip_reason(e, self._limits[r.provider], DEFAULT_PREFS, asked) is None:
                eligible.append(e)
        return first_choice_shares(eligible, DEFAULT_PREFS)

    # -- plan -----------------------------------------------------------------------------------

    def plan(self, body: dict[str, Any], endpoint: str = "chat") -> RoutePlan:
        """The ordered candidates for this request (see the module doc); counts inline."""
        return self._plan(body, endpoint, {}, defer=False)

    async def aplan(self, body: dict[str, Any], endpoint: str = "chat") -> RoutePlan:
        """plan(), but an exact token count (only near a context limit; ~0.3 s for a prompt of
        60K tokens) runs in a worker thread, so the event loop keeps serving other requests."""
        counts: dict[tuple[str, str], int] = {}
        while True:
            try:
                return self._plan(body, endpoint, counts, defer=True)
            except _CountNeeded as need:
                assert self._counter is not None
                counts[need.key] = await asyncio.to_thread(
                    self._counter.count, need.model, need.body, endpoint
                )

    def _plan(
        self,
        body: dict[str, Any],
        endpoint: str,
        exact_counts: dict[tuple[str, str], int],  # (tokenizer, chat format) -> tokens
        defer: bool,  # raise _CountNeeded instead of counting here
    ) -> RoutePlan:
        names = parse_model_list(body)
        models = [self.resolve(names[0], "model" if "model" in body else "models")]
        for name in names[1:]:
            model = self.resolve(name, "models")
            if all(m.id != model.id for m in models):
                models.append(model)
        provider = body.get("provider")
        prefs = DEFAULT_PREFS if provider is None else parse_provider_prefs(provider)
        max_tokens = requested_max_tokens(body)
        asked = Asked.of(body)
        text = PromptText.of(body, endpoint)
        # the tokenizer cannot encode a lone surrogate: it counts the text with U+FFFD instead
        counted = without_surrogates(body) if text.surrogates else body

        plan = RoutePlan(models[0], [], {}, text.estimate, False, max_tokens, models)
        fit_errors: list[str] = []
        for index, model in enumerate(models):
            cost_tokens, exact = text.estimate, text.exact
            fit_tokens = cost_tokens if exact else self.prompt_bound(model, text, counted, endpoint)
            evals = [
                self._evaluate(r, fit_tokens, cost_tokens, max_tokens, exact, False)
                for r in model.routes
            ]
            if not exact and self._counter is not None and not all(e.fits for e in evals):
                # Near (or over) some route's limit: the bound is not good enough, count.
                key = (model.tokenizer, model.chat_format)
                if key not in exact_counts:
                    if defer:
                        raise _CountNeeded(model, key, counted)
                    exact_counts[key] = self._counter.count(model, counted, endpoint)
                fit_tokens = cost_tokens = exact_counts[key]
                exact = True
                evals = [
                    self._evaluate(r, fit_tokens, fit_tokens, max_tokens, True, False)
                    for r in model.routes
                ]
            if index == 0:
                plan.prompt_tokens, plan.prompt_tokens_exact = cost_tokens, exact
            # Too long for every route this deployment has (routes with no key or backend are
            # not ours to offer; when none is configured, the 503 below says so instead).
            deployed = [e for e in evals if not isinstance(e.unavailable, NotConfigured)]
            if not any(e.fits for e in deployed or evals):
                largest = max(deployed or evals, key=lambda e: e.route.context)  # most telling
                fit_errors.append(f"{model.id}: {largest.fit_error}")
            self._choose(evals, prefs, asked, plan)

        if len(fit_errors) == len(models):
            raise ContextLengthExceeded(
                "the request does not fit any route: " + "; ".join(fit_errors),
                param="messages" if endpoint == "chat" else "prompt",
            )
        if not plan.candidates:
            raise NoEligibleRoute("no route can serve this request", skipped=plan.skipped)
        return plan

    def _choose(
        self, evals: list[RankedRoute], prefs: ProviderPrefs, asked: Asked, plan: RoutePlan
    ) -> None:
        """Filter one model's evaluated routes and append them, ordered, to the plan."""
        eligible: list[RankedRoute] = []
        for e in evals:
            reason = skip_reason(e, self._limits[e.route.provider], prefs, asked)
            if reason is not None:
                plan.skipped[e.route.id] = reason
                continue
            e.health = self._stats.route_health(e.route.id)  # only routes we may order
            eligible.append(e)
            if asked.params and e.route.unsupported_params:
                dropped = asked.params & e.route.unsupported_params
                if dropped:
                    plan.dropped_params[e.route.id] = tuple(sorted(dropped))
        ordered = order_routes(eligible, prefs, self._rng)
        if not prefs.allow_fallbacks and not prefs.order:
            for e in ordered[1:]:
                plan.skipped[e.route.id] = "provider.allow_fallbacks is false: first choice only"
            ordered = ordered[:1]
        for e in ordered:
            plan.candidates.append(e.route)
            plan.estimated_cost[e.route.id] = e.cost
