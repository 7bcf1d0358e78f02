"""Routing: which routes may serve a request, and in what order (see router.py).

router.py   Router.plan / aplan / rank, RoutePlan: the decision
prefs.py    OpenRouter's `provider` object and the `models` fallback list
filters.py  why a route is skipped (context fit, provider filters, limits, max_price)
order.py    1/price² weighted order, failing routes last, provider.sort
prompt.py   the request's prompt text and its size bound
tokens.py   PromptCounter: prompt tokens with the model's own tokenizer (torch-free)
"""

from gateway.routing.availability import Availability, NotConfigured, available_from
from gateway.routing.filters import GATEWAY_FIELDS
from gateway.routing.order import STATS_WINDOWS, RankedRoute, recent_stat
from gateway.routing.router import (
    TYPICAL_COMPLETION_TOKENS,
    RoutePlan,
    Router,
    request_cost,
)

__all__ = [
    "GATEWAY_FIELDS",
    "STATS_WINDOWS",
    "TYPICAL_COMPLETION_TOKENS",
    "Availability",
    "NotConfigured",
    "RankedRoute",
    "RoutePlan",
    "Router",
    "available_from",
    "recent_stat",
    "request_cost",
]
