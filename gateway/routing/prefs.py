"""The request's routing preferences: OpenRouter's `provider` object and the `models` list.

    "provider": {
        "order": ["DeepInfra", "lepton"],    # try these first, in this order
        "only": ["deepinfra", "novita"],     # never any other provider
        "ignore": ["novita"],                # never these
        "allow_fallbacks": false,            # with order: only the ordered providers;
                                             # without: only the first choice
        "sort": "price" | "throughput" | "latency",   # deterministic instead of load balancing
        "max_price": {"prompt": 0.6, "completion": 0.6},   # USD per 1M tokens
        "require_parameters": true           # skip routes that would drop a parameter
    }

Provider names match ours case-insensitively, ignoring punctuation ("DeepInfra", "deep-infra"),
plus OpenRouter's display names ("NovitaAI", "Lepton AI"); an entry with a "/" may also name one
route id ("deepinfra/microsoft/WizardLM-2-8x22B"). Unknown names match nothing (a client's list
written for OpenRouter may name providers we do not have). Accepted and ignored, because every
route we have serves the same published weights and we keep no per-provider policy about them:
`data_collection`, `zdr`, `enforce_distillable_text`, `quantizations`,
`preferred_min_throughput`, `preferred_max_latency`, and `max_price.request|image|audio` (our
routes charge per token only). Any other key, or a wrong type, is a 400 naming the field.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from gateway.catalog import Route
from gateway.errors import InvalidRequest

Sort = Literal["price", "throughput", "latency"]
SORTS: tuple[Sort, ...] = ("price", "throughput", "latency")

_IGNORED_KEYS = frozenset(
    {
        "data_collection",
        "zdr",
        "enforce_distillable_text",
        "quantizations",
        "preferred_min_throughput",
        "preferred_max_latency",
    }
)
_LIST_KEYS = ("order", "only", "ignore")
_BOOL_KEYS = ("allow_fallbacks", "require_parameters")
_KNOWN_KEYS = frozenset({*_LIST_KEYS, *_BOOL_KEYS, "sort", "max_price"}) | _IGNORED_KEYS
_MAX_PRICE_KEYS = frozenset({"prompt", "completion"})
_MAX_PRICE_IGNORED = frozenset({"request", "image", "audio"})

# OpenRouter's display names for the providers we share with it, normalised.
_PROVIDER_ALIASES = {"novitaai": "novita", "leptonai": "lepton"}
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


@functools.lru_cache(maxsize=1024)
def normalize_provider(name: str) -> str:
    key = _NOT_ALNUM.sub("", name.lower())
    return _PROVIDER_ALIASES.get(key, key)


@dataclass(frozen=True, slots=True)
class ProviderPrefs:
    order: tuple[str, ...] = ()  # entries as normalised by _entry()
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    allow_fallbacks: bool = True
    sort: Sort | None = None
    max_prompt_price: float | None = None  # USD / 1M
    max_completion_price: float | None = None
    require_parameters: bool = False

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_PREFS


DEFAULT_PREFS = ProviderPrefs()


@functools.lru_cache(maxsize=1024)
def _lower(text: str) -> str:
    return text.lower()


def route_matches(entry: str, route: Route) -> bool:
    """Does a normalised `provider` list entry name this route (its provider or its id)?"""
    return entry == normalize_provider(route.provider) or entry == _lower(route.id)


def order_index(prefs: ProviderPrefs, route: Route) -> int | None:
    for i, entry in enumerate(prefs.order):
        if route_matches(entry, route):
            return i
    return None


def _entry(value: str) -> str:
    # Route ids keep their slashes (lower-cased); plain provider names are normalised.
    return value.lower() if "/" in value else normalize_provider(value)


def _bad(field: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"provider.{field}: {what}", param=f"provider.{field}")


def _name_list(field: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(field, "must be a list of provider names")
    return tuple(_entry(v) for v in value)


def _price(field: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(field, "must be a non-negative number (USD per 1M tokens)")
    try:
        price = float(value)  # OverflowError for an integer beyond any float
    except OverflowError:
        price = math.inf
    if math.isnan(price) or price < 0:  # NaN would pass every comparison: no cap at all
        raise _bad(field, "must be a non-negative number (USD per 1M tokens)")
    return price  # +inf (1e400 in JSON): no cap, as the client wrote


def parse_provider_prefs(value: object) -> ProviderPrefs:
    """The `provider` object of a request body; InvalidRequest when malformed."""
    if value is None:
        return DEFAULT_PREFS
    if not isinstance(value, dict):
        raise InvalidRequest("provider: must be an object", param="provider")
    unknown = sorted(set(value) - _KNOWN_KEYS)
    if unknown:
        raise _bad(unknown[0], f"unknown field (known: {', '.join(sorted(_KNOWN_KEYS))})")
    kw: dict[str, Any] = {}
    for key in _LIST_KEYS:
        if value.get(key) is not None:
            kw[key] = _name_list(key, value[key])
    if "only" in kw:
        if not kw["only"]:  # "no provider at all" can never be served: the client's mistake
            raise _bad("only", "must name at least one provider (omit it to allow any)")
        kw["only"] = frozenset(kw["only"])
    if "ignore" in kw:
        kw["ignore"] = frozenset(kw["ignore"])
    for key in _BOOL_KEYS:
        if value.get(key) is not None:
            if not isinstance(value[key], bool):
                raise _bad(key, "must be true or false")
            kw[key] = value[key]
    sort = value.get("sort")
    if sort is not None:
        if sort not in SORTS:
            raise _bad("sort", f"must be one of {', '.join(SORTS)}")
        kw["sort"] = sort
    max_price = value.get("max_price")
    if max_price is not None:
        if not isinstance(max_price, dict):
            raise _bad("max_price", "must be an object like {prompt, completion}")
        unknown = sorted(set(max_price) - _MAX_PRICE_KEYS - _MAX_PRICE_IGNORED)
        if unknown:
            raise _bad(f"max_price.{unknown[0]}", "unknown field (known: prompt, completion)")
        kw["max_prompt_price"] = _price("max_price.prompt", max_price.get("prompt"))
        kw["max_completion_price"] = _price("max_price.completion", max_price.get("completion"))
    return ProviderPrefs(**kw)


def parse_model_list(body: dict[str, Any]) -> list[str]:
    """`model` first, then the `models` fallback list in order, without repeats."""
    names: list[str] = []
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model: must be a non-empty string", param="model")
        names.append(model)
    fallbacks = body.get("models")
    if fallbacks is not None:
        if not isinstance(fallbacks, list) or not all(isinstance(m, str) and m for m in fallbacks):
            raise InvalidRequest("models: must be a list of model names", param="models")
        for name in fallbacks:
            if name not in names:
                names.append(name)
    if not names:
        raise InvalidRequest("model: required", param="model")
    return names
