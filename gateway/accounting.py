"""Usage and cost of a served response, and recording it exactly once.

Token counts come from the upstream's `usage` when it reports one (the gateway asks every
stream for it with `stream_options.include_usage`). When an upstream reports none (a stream cut
short, a provider that ignores include_usage) the gateway counts: the prompt with the model's
own tokenizer (`gateway.routing.tokens`) and the completion from the text it actually
served. Without a tokenizer available the count falls back to the router's byte estimate
(4 bytes per token).
Counting is bounded (`acounts`): the completion's first `max_count_chars` characters are
tokenized and the rest extrapolated by length (`ServedText` keeps only that sample, however
long the stream), and the counting runs in a worker thread, so a 60 MB
answer never stalls the event loop. Counted usage is flagged `"estimated": true` for the client.
Cost is always ours: the route's effective prices (PriceBook, overrides included) times the
counts, in USD; an upstream's own figure stays in `usage.cost_details.upstream_inference_cost`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from gateway.catalog import Model, Route
from gateway.prices import PriceBook
from gateway.routing.prompt import BYTES_PER_TOKEN_ESTIMATE, PromptText
from gateway.stats.base import StatsStore, Usage

log = logging.getLogger(__name__)
DEFAULT_MAX_COUNT_CHARS = 256 * 1024


class TokenCounter(Protocol):
    def count(self, model: Model, body: dict[str, Any], endpoint: str) -> int: ...

    def count_text(self, model: Model, text: str) -> int: ...


class EstimateCounter:
    """The fallback when no tokenizer is available: the router's byte estimate."""

    def count(self, model: Model, body: dict[str, Any], endpoint: str) -> int:
        return PromptText.of(body, endpoint).estimate

    def count_text(self, model: Model, text: str) -> int:
        return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN_ESTIMATE)


def default_counter() -> TokenCounter:
    """`gateway.routing.tokens.PromptCounter` when it can load the tokenizers, else the estimate."""
    try:
        from gateway.routing.tokens import PromptCounter

        counter: TokenCounter = PromptCounter()
        return counter
    except Exception as exc:  # missing module or tokenizer files: count by bytes
        log.warning("no tokenizer for usage counting (%s); using the byte estimate", exc)
        return EstimateCounter()


def reported_counts(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) from an upstream usage object, when it has both as integers."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    ok = all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (prompt, completion)
    )
    return (prompt, completion) if ok else None  # type: ignore[return-value]


def output_text(pieces: Iterable[Any]) -> str:
    """The text a list of messages / deltas / choices carries: content, text, tool calls."""
    out: list[str] = []
    for piece in pieces:
        if not isinstance(piece, dict):
            continue
        for key in ("content", "text", "refusal"):
            value = piece.get(key)
            if isinstance(value, str):
                out.append(value)
        calls = piece.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    out.extend(v for v in function.values() if isinstance(v, str))
        function_call = piece.get("function_call")
        if isinstance(function_call, dict):
            out.append(json.dumps(function_call))
    return "".join(out)


def body_output_text(body: dict[str, Any]) -> str:
    """All the text of a non-stream body's choices."""
    pieces = []
    for choice in body.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            pieces.append(message if isinstance(message, dict) else choice)
    return output_text(pieces)


class ServedText:
    """The text a response served, as much as counting needs: the first `cap` characters and
    the total length (a stream can be far longer than anything worth keeping)."""

    __slots__ = ("_cap", "_kept", "_parts", "total")

    def __init__(self, cap: int = DEFAULT_MAX_COUNT_CHARS):
        self._cap = cap
        self._parts: list[str] = []
        self._kept = 0
        self.total = 0  # characters served

    def add(self, text: str) -> None:
        self.total += len(text)
        if self._kept < self._cap:
            piece = text[: self._cap - self._kept]
            self._parts.append(piece)
            self._kept += len(piece)

    @property
    def sample(self) -> str:
        return "".join(self._parts)

    def total_estimate(self) -> int:
        """Tokens by length alone (no tokenizer), for a record that cannot wait for one."""
        return -(-self.total // BYTES_PER_TOKEN_ESTIMATE)


@dataclass(slots=True)  # (a value, not changed after settle(); not frozen: cheaper to make)
class Settled:
    prompt_tokens: int
    completion_tokens: int
    cost: float
    counted: bool  # True when the gateway counted (the upstream reported no usage)


class Accountant:
    """Prices a served response and records it: one `record_usage` per settle()."""

    def __init__(
        self,
        prices: PriceBook,
        stats: StatsStore,
        counter: TokenCounter,
        max_count_chars: int = DEFAULT_MAX_COUNT_CHARS,
    ):
        self._prices = prices
        self._stats = stats
        self.counter = counter
        self.max_count_chars = max_count_chars

    def cost(self, route: Route, prompt_tokens: int, completion_tokens: int) -> float:
        input_price, output_price = self._prices.effective(route)
        return (prompt_tokens * input_price + completion_tokens * output_price) / 1e6

    def counts(
        self,
        route: Route,
        model: Model,
        usage: Any,
        request_body: dict[str, Any],
        endpoint: str,
        served: str | ServedText,
    ) -> tuple[int, int, bool]:
        """(prompt, completion, counted): the upstream's usage, else counted here, capped."""
        reported = reported_counts(usage)
        if reported is not None:
            return reported[0], reported[1], False
        sample, total = self._sample(served)
        return self._count_both(model, request_body, endpoint, sample, total)

    def _sample(self, served: str | ServedText) -> tuple[str, int]:
        if isinstance(served, str):
            return served[: self.max_count_chars], len(served)
        return served.sample, served.total

    def count_text(self, model: Model, sample: str, total_chars: int) -> int:
        """Tokens of a text of `total_chars` characters that starts with `sample`: the first
        `max_count_chars` of it counted, the rest extrapolated at the same ratio."""
        if total_chars <= 0:
            return 0
        sample = sample[: self.max_count_chars]
        if not sample:
            return -(-total_chars // BYTES_PER_TOKEN_ESTIMATE)
        tokens = self.counter.count_text(model, sample)
        if total_chars <= len(sample):
            return tokens
        return -(-tokens * total_chars // len(sample))

    async def acounts(
        self,
        route: Route,
        model: Model,
        usage: Any,
        request_body: dict[str, Any],
        endpoint: str,
        served: str | ServedText,
    ) -> tuple[int, int, bool]:
        """counts(), bounded and off the event loop unless the texts are short."""
        reported = reported_counts(usage)
        if reported is not None:
            return reported[0], reported[1], False
        sample, total = self._sample(served)
        # Always a thread (this path is rare: cut streams, silent upstreams): even a short text
        # may be the process's first count, which loads the tokenizer (~1 s).
        return await asyncio.to_thread(
            self._count_both, model, request_body, endpoint, sample, total
        )

    def _count_both(
        self, model: Model, body: dict[str, Any], endpoint: str, sample: str, total: int
    ) -> tuple[int, int, bool]:
        prompt = self.counter.count(model, body, endpoint)
        return prompt, self.count_text(model, sample, total), True

    def settle(
        self,
        route: Route,
        model: Model,
        client_key: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        counted: bool = False,
        after: list[Callable[[], None]] | None = None,
    ) -> Settled:
        """`after`: where to leave the usage write for after the response (None: write now)."""
        cost = self.cost(route, prompt_tokens, completion_tokens)
        usage = Usage(
            route_id=route.id,
            model=model.id,
            client_key=client_key,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
        )
        if after is not None:
            after.append(partial(self._stats.record_usage, usage))
        else:
            self._stats.record_usage(usage)
        return Settled(prompt_tokens, completion_tokens, cost, counted)


def client_usage(upstream: Any, settled: Settled) -> dict[str, Any]:
    """The usage object a client sees: the upstream's details kept, counts and cost ours."""
    usage = dict(upstream) if isinstance(upstream, dict) else {}
    usage["prompt_tokens"] = settled.prompt_tokens
    usage["completion_tokens"] = settled.completion_tokens
    usage["total_tokens"] = settled.prompt_tokens + settled.completion_tokens
    usage["cost"] = round(settled.cost, 12)
    if settled.counted:
        usage["estimated"] = True  # the upstream reported none: the gateway counted
    return usage
