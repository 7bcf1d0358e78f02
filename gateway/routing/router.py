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
(ContextLengthExceeded, 400); routes that fit but are all filtered out by the request's own
preferences or parameters (every one of them, whether configured or not) are its mistake too
(NoMatchingRoute, 404, as OpenRouter's "no endpoints found"); otherwise ours (NoEligibleRoute,
503, with `skipped`). Routes without a key or backend are not this deployment's: they do not
make a prompt "fit" (a 64k hosted route with no key does not excuse an 8k local one).
The decision itself takes tens of microseconds (bench/routing.py, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.catalog import Catalog, CatalogError, Model, Route
from gateway.errors import ContextLengthExceeded, ModelNotFound, NoEligibleRoute, NoMatchingRoute
from gateway.prices import PriceBook
from gateway.routing.availability import Availability, NotConfigured
from gateway.routing.filters import (
    GATEWAY_FIELDS,
    Asked,
    ClientExcluded,
    Limits,
    combine,
    requested_max_tokens,
)
from gateway.routing.order import (
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
from gateway.routing.route_facts import (
    TYPICAL_COMPLETION_TOKENS,
    FactsCache,
    ModelFacts,
    RouteFacts,
    request_cost,
)
from gateway.stats.base import StatsStore

__all__ = ["TYPICAL_COMPLETION_TOKENS", "RoutePlan", "Router", "request_cost"]

_NOTHING_ASKED = Asked(None, 0, frozenset())  # rank(): a bare request, no parameters


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
        self._facts = FactsCache(prices)  # route_facts.py: what does not depend on the prompt
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

    def _route_facts(
        self, route: Route, prefs: ProviderPrefs, asked: Asked, max_tokens: int | None
    ) -> RouteFacts:
        unavailable = self.unavailable(route)
        return RouteFacts.of(
            route,
            self._limits[route.provider],
            self._prices,
            prefs,
            asked,
            max_tokens,
            unavailable,
            static_unavailable=isinstance(unavailable, NotConfigured),  # no key: fixed at start
        )

    def _model_facts(
        self, model: Model, prefs: ProviderPrefs, prefs_key: Any, asked: Asked, max_tokens: Any
    ) -> ModelFacts:
        return self._facts.get(
            (model.id, max_tokens, prefs_key, asked),
            lambda: ModelFacts.of(
                [self._route_facts(r, prefs, asked, max_tokens) for r in model.routes]
            ),
        )

    def _evaluate(
        self,
        facts: RouteFacts,
        fit_tokens: int,
        cost_tokens: int,
        max_tokens: int | None,
        exact: bool = True,
    ) -> RankedRoute:
        unavailable = facts.unavailable
        if not facts.static_unavailable:
            unavailable = self.unavailable(facts.route)
        return facts.evaluate(fit_tokens, cost_tokens, max_tokens, exact, unavailable)

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
        facts = self._model_facts(model, DEFAULT_PREFS, None, _NOTHING_ASKED, max_tokens).routes
        evals = [self._evaluate(f, prompt_tokens, prompt_tokens, max_tokens) for f in facts]
        for e in evals:
            e.health = self._stats.route_health(e.route.id)
        evals.sort(key=by_cost)
        return evals

    def traffic_shares(
        self, model: str | Model, prompt_tokens: int, max_tokens: int | None
    ) -> dict[str, float]:
        """Route id -> the share of such requests the server tries on it first: plan()'s own
        filters (default `provider` preferences) and order_routes()'s 1/cost² weights."""
        if isinstance(model, str):
            model = self.resolve(model)
        eligible = []
        facts = self._model_facts(model, DEFAULT_PREFS, None, _NOTHING_ASKED, max_tokens).routes
        for f in facts:
            e = self._evaluate(f, prompt_tokens, prompt_tokens, max_tokens)
            if f.skip(e) is None:
                e.health = self._stats.route_health(e.route.id)
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
        # (a parsed `provider` object is valid JSON data: its repr identifies its shape)
        prefs_key = None if provider is None else repr(provider)
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
            shape = self._model_facts(model, prefs, prefs_key, asked, max_tokens)
            if fit_tokens <= shape.fit_all_up_to:  # the common case: size decides nothing
                if index == 0:
                    plan.prompt_tokens, plan.prompt_tokens_exact = cost_tokens, exact
                fitting = (fit_tokens, cost_tokens, max_tokens, exact)
                self._choose_fitting(shape.routes, fitting, prefs, plan)
                continue
            facts = shape.routes
            evals = [self._evaluate(f, fit_tokens, cost_tokens, max_tokens, exact) for f in facts]
            if not exact and self._counter is not None and not all(e.fits for e in evals):
                # Near (or over) some route's limit: the bound is not good enough, count.
                key = (model.tokenizer, model.chat_format)
                if key not in exact_counts:
                    if defer:
                        raise _CountNeeded(model, key, counted)
                    exact_counts[key] = self._counter.count(model, counted, endpoint)
                fit_tokens = cost_tokens = exact_counts[key]
                exact = True
                evals = [self._evaluate(f, fit_tokens, fit_tokens, max_tokens) for f in facts]
            if index == 0:
                plan.prompt_tokens, plan.prompt_tokens_exact = cost_tokens, exact
            # Too long for every route this deployment has (routes with no key or backend are
            # not ours to offer; when none is configured, the 503 below says so instead).
            deployed = [e for e in evals if not isinstance(e.unavailable, NotConfigured)]
            if not any(e.fits for e in deployed or evals):
                largest = max(deployed or evals, key=lambda e: e.route.context)  # most telling
                fit_errors.append(f"{model.id}: {largest.fit_error}")
            self._choose(facts, evals, prefs, plan)

        if len(fit_errors) == len(models):
            raise ContextLengthExceeded(
                "the request does not fit any route: " + "; ".join(fit_errors),
                param="messages" if endpoint == "chat" else "prompt",
            )
        if not plan.candidates:
            if plan.skipped and all(isinstance(r, ClientExcluded) for r in plan.skipped.values()):
                raise NoMatchingRoute(
                    "no route matches the request's provider preferences and parameters",
                    skipped=plan.skipped,
                )
            raise NoEligibleRoute("no route can serve this request", skipped=plan.skipped)
        return plan

    def _choose(
        self,
        facts: list[RouteFacts],
        evals: list[RankedRoute],
        prefs: ProviderPrefs,
        plan: RoutePlan,
    ) -> None:
        """Filter one model's evaluated routes and append them, ordered, to the plan."""
        eligible: list[RankedRoute] = []
        for f, e in zip(facts, evals, strict=True):
            reason = f.skip(e)
            if reason is not None:
                plan.skipped[e.route.id] = reason
                continue
            e.health = self._stats.route_health(e.route.id)  # only routes we may order
            eligible.append(e)
            if f.dropped:
                plan.dropped_params[e.route.id] = f.dropped
        self._append_ordered(eligible, prefs, plan)

    def _choose_fitting(
        self,
        facts: list[RouteFacts],
        size: tuple[int, int, int | None, bool],  # fit tokens, cost tokens, max_tokens, exact
        prefs: ProviderPrefs,
        plan: RoutePlan,
    ) -> None:
        """_choose for a prompt that fits every route: the same answer from the cached facts,
        evaluating only the routes that stay candidates."""
        eligible: list[RankedRoute] = []
        for f in facts:
            route = f.route
            unavailable = None  # asked only when nothing before it rules the route out
            if f.output_error is None and f.preference_skip is None:
                unavailable = f.unavailable if f.static_unavailable else self.unavailable(route)
            reason = combine(f.output_error, f.preference_skip, unavailable, f.later_skip)
            if reason is not None:
                plan.skipped[route.id] = reason
                continue
            e = f.evaluate(*size, None)
            e.health = self._stats.route_health(route.id)
            eligible.append(e)
            if f.dropped:
                plan.dropped_params[route.id] = f.dropped
        self._append_ordered(eligible, prefs, plan)

    def _append_ordered(
        self, eligible: list[RankedRoute], prefs: ProviderPrefs, plan: RoutePlan
    ) -> None:
        ordered = order_routes(eligible, prefs, self._rng)
        if not prefs.allow_fallbacks and not prefs.order:
            for e in ordered[1:]:
                plan.skipped[e.route.id] = "provider.allow_fallbacks is false: first choice only"
            ordered = ordered[:1]
        for e in ordered:
            plan.candidates.append(e.route)
            plan.estimated_cost[e.route.id] = e.cost
