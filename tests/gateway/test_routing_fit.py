"""Context fit: the byte bound, exact counting near the limit, output limits, default max_tokens.

With a fixed-count fake counter (exact boundaries) and with the real tokenizers
(gateway.routing.tokens.PromptCounter): the cheap bound must never be below the real count.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from gateway.catalog import build_catalog
from gateway.errors import ContextLengthExceeded
from gateway.routing.prompt import PromptText
from gateway.routing.tokens import PromptCounter
from tests.gateway.routing_fixtures import (
    CountingCounter,
    chat,
    make_router,
    real_catalog,
    small_catalog,
    small_catalog_data,
)


def ids(plan: Any) -> list[str]:
    return [route.id for route in plan.candidates]


def test_short_prompt_is_never_tokenized() -> None:
    counter = CountingCounter(tokens=10)
    plan = make_router(small_catalog(), counter=counter).plan(
        chat("x" * 700, model="small", max_tokens=100)
    )
    assert counter.calls == []
    assert plan.prompt_tokens_exact is False
    assert "lepton/small" in ids(plan)


@pytest.mark.parametrize(("tokens", "fits"), [(900, True), (901, False)])
def test_context_boundary_is_exact(tokens: int, fits: bool) -> None:
    counter = CountingCounter(tokens=tokens)
    router = make_router(small_catalog(), counter=counter)
    body = chat("x" * 950, model="small", max_tokens=100)  # the byte bound says "too big"
    if fits:
        plan = router.plan(body)
        assert sorted(ids(plan)) == ["deepinfra/org/Small", "lepton/small", "novita/org/small"]
        assert (plan.prompt_tokens, plan.prompt_tokens_exact) == (900, True)
    else:
        with pytest.raises(ContextLengthExceeded) as exc:
            router.plan(body)
        assert exc.value.status == 400
        assert "901" in exc.value.message and "1000" in exc.value.message
    assert counter.calls == ["small"]


def test_no_max_tokens_uses_deepinfra_default_and_what_the_context_leaves() -> None:
    router = make_router(small_catalog(), counter=CountingCounter(tokens=999))
    plan = router.plan(chat("x" * 990, model="small"))
    assert sorted(ids(plan)) == ["lepton/small", "novita/org/small"]
    assert "512" in plan.skipped["deepinfra/org/Small"]
    with pytest.raises(ContextLengthExceeded):
        make_router(small_catalog(), counter=CountingCounter(tokens=1000)).plan(
            chat("x" * 990, model="small")
        )


def test_output_limit_and_fallback_model_with_a_larger_context() -> None:
    counter = CountingCounter(tokens=1500)
    router = make_router(small_catalog(), counter=counter)
    body = chat("x" * 2000, model="small", models=["small-long"], max_tokens=300)
    plan = router.plan(body)
    assert ids(plan) == ["lepton/small-long"]
    assert "exceeds the context of 1000" in plan.skipped["lepton/small"]
    assert counter.calls == ["small"]  # small-long fits by its byte bound: never tokenized
    with pytest.raises(ContextLengthExceeded) as exc:
        router.plan({**body, "max_tokens": 301})
    assert "output limit of 300" in exc.value.message


def test_without_a_tokenizer_the_byte_bound_decides() -> None:
    with pytest.raises(ContextLengthExceeded) as exc:
        make_router(small_catalog()).plan(chat("x" * 950, model="small", max_tokens=100))
    assert "up to" in exc.value.message  # an upper bound, said so


class SpyCounter(PromptCounter):
    """The real counter, remembering which models it tokenized a prompt for."""

    def __init__(self) -> None:
        super().__init__()
        self.counted: list[str] = []

    def count(self, model: Any, body: Any, endpoint: str) -> int:
        self.counted.append(model.id)
        return super().count(model, body, endpoint)


@pytest.fixture(scope="module")
def counter() -> SpyCounter:
    return SpyCounter()


ALPHABET = "abc xyz 0123456789 .,;:!?\n\t" + "éüß" + "日本語" + "🙂" + "[INST]</s>"


def random_chat(rng: random.Random) -> dict[str, Any]:
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    start = rng.choice([0, 1])
    messages = []
    for role in roles[start : start + rng.randint(1, 5)]:
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60)))
        messages.append({"role": role, "content": text})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "?"})
    return {"model": "x", "messages": messages}


def test_the_fast_bound_is_never_below_the_real_count(counter: SpyCounter) -> None:
    catalog = real_catalog()
    router = make_router(catalog, counter=counter)
    rng = random.Random(2024)
    for _ in range(150):
        body = random_chat(rng)
        text = PromptText.of(body, "chat")
        assert text.plain
        for model in catalog.models.values():
            fast = router.prompt_bound(model, text, body, "chat")
            assert fast >= counter.bound(model, body, "chat") >= counter.count(model, body, "chat")


def test_real_tokenizer_boundary(counter: SpyCounter) -> None:
    body = chat("The quick brown fox jumps over the lazy dog. " * 20, model="small", max_tokens=50)
    exact = counter.count(real_catalog().models["wizardlm-2-8x22b"], body, "chat")  # v1 vicuna
    data = small_catalog_data()
    data["models"]["small"]["context"] = exact + 50
    router = make_router(build_catalog(data, source="fit.yaml"), counter=counter)
    counter.counted.clear()
    plan = router.plan(body)
    assert (plan.prompt_tokens, plan.prompt_tokens_exact) == (exact, True)
    assert counter.counted == ["small"]
    assert "lepton/small" in ids(plan)
    with pytest.raises(ContextLengthExceeded) as exc:
        router.plan({**body, "max_tokens": 51})
    assert f"prompt ({exact} tokens) + max_tokens (51)" in exc.value.message


def test_short_chats_are_not_tokenized_by_the_real_counter(counter: SpyCounter) -> None:
    router = make_router(counter=counter)
    counter.counted.clear()
    for body in (chat(max_tokens=100), chat("hi " * 1000, max_tokens=4000)):
        plan = router.plan(body)
        assert plan.prompt_tokens_exact is False and plan.candidates
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    router.plan(chat(model="mixtral-8x22b-instruct", tools=tools, max_tokens=10))
    assert counter.counted == []


class ThreadRecordingCounter(CountingCounter):
    def __init__(self, tokens: int):
        super().__init__(tokens)
        self.threads: list[int] = []

    def count(self, model: Any, body: dict[str, Any], endpoint: str) -> int:
        self.threads.append(threading.get_ident())
        return super().count(model, body, endpoint)


async def test_aplan_counts_off_the_event_loop_and_agrees_with_plan() -> None:
    counter = ThreadRecordingCounter(tokens=1500)
    router = make_router(small_catalog(), counter=counter)
    body = chat("x" * 2000, model="small", models=["small-long"], max_tokens=300)
    plan = await router.aplan(body)
    assert ids(plan) == ["lepton/small-long"] and counter.calls == ["small"]
    assert counter.threads and threading.get_ident() not in counter.threads
    assert ids(router.plan(body)) == ids(plan)
    short = await router.aplan(chat(model="small", max_tokens=10))
    assert short.candidates and counter.calls == ["small", "small"]  # plan() above, not aplan
    with pytest.raises(ContextLengthExceeded):
        await router.aplan({**body, "max_tokens": 301})
